"""How much of the synthetic corpus's arithmetic a pretrained (or fine-tuned) run recalls.

    python experiments/arithmetic_recall.py --run=runs/instr/base [--run=runs/pathway/llada_base]

For every worked line `a op b = r` of the run's synthetic corpus (the world of its config), the
answer's tokens are predicted in one forward pass, teacher-forced: an AR model reads the line up
to each answer token (argmax of the next-token logits); a LLaDA model (shifted logits or not:
the model aligns them) sees the line with the answer's tokens masked and fills them all at once
(argmax at each masked position); with `--unmask=confidence` it fills them as LLaDA's sampler
does with one token per step: each pass commits the argmax at the masked answer position it is
most confident of, until none is left; with `--unmask=alone` each answer token is masked alone,
the answer's other tokens shown (for an AR model every mode is the teacher-forced pass, whose
all-right answers are exactly those greedy decoding gives). `--reading=causal` reads a LLaDA
model with causal attention (its annealing mask at ratio 0): with `--unmask=alone`, a model
adapted from an AR one (shifted logits) is then read exactly as its AR source was, which tells
what the adaptation kept of the AR model's memory from what bidirectional reading uses. A line
counts as recalled when every answer token is right. The problems the training split works out
(what the model read, `synthetic.arithmetic_problems`) and as many other problems of the same
distribution that it does not are reported apart, per operator: recall of read problems against
computing unread ones. `read_in_document` asks each read line's result inside its own
document, every other line visible as pretraining showed it (as many as fit in data.seq_len) (an AR model that memorised the
documents as sequences recalls these, whatever it knows of the sums). `new_name_copied` asks
for a new made-up first name where a sentence of the corpus's biography form repeats it: the
one item a model cannot have read, only copied from its context. The probe is the same
question in the pretraining format for both model families, so a chat model's failure can be
told apart from a base that never learnt the sums.
"""
from __future__ import annotations

import collections
import json
import sys

from absl import app, flags
import numpy as np

FLAGS = flags.FLAGS
UNMASK = ('one_pass', 'confidence', 'alone')
READING = ('model', 'causal')


def worked_lines(data_cfg, split: str) -> list[tuple[str, str]]:
  """(problem 'a op b', result) of every worked line in `split`'s documents, first occurrence."""
  from pathways_jax.data import corpora, synthetic  # pylint: disable=g-import-not-at-top,multiple-import
  return list(synthetic.worked_arithmetic(data_cfg.synthetic, corpora.synthetic_seed(data_cfg),
                                          split).items())


def unread_problems(read: set[str], n: int, seed: int = 0) -> list[tuple[str, str]]:
  """Up to `n` distinct problems of the corpus's own distribution (`synthetic.arithmetic`) that
  `read` lacks, with their results."""
  import random  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  rng, out = random.Random(f'arithmetic_recall/{seed}'), {}
  for _ in range(100 * n):
    a = synthetic.arithmetic(rng)
    problem = f'{a.a} {a.op} {a.b}'
    if problem not in read:
      out.setdefault(problem, str(a.result))
      if len(out) == n:
        break
  return list(out.items())


def answer_rows(tokenizer, items, length: int):
  """Rows for `recalled` from items (text before the answer, the answer, text after it): rows
  [N, 2, length] (tokens: bos, the text, eos padding; segment ids: the padding in segment 0,
  which no position attends to), answer [N, length] (bool: the tokens the answer adds to the
  text before it, as the whole text tokenises), and which items were kept (no answer token of
  its own, or longer than `length` even alone: dropped). A text longer than `length` loses its
  lines after the answer, then its first lines, until it fits."""
  rows, answers, keep = [], [], []
  encode = lambda text: [tokenizer.bos_id] + tokenizer.encode(text)
  for before, answer, after in items:
    while len(encode(before + answer + after)) > length and (after or '\n' in before):
      after, before = ('', before) if after else ('', before.split('\n', 1)[1])
    prefix, upto, full = encode(before), encode(before + answer), encode(before + answer + after)
    common = 0
    while common < min(len(prefix), len(upto)) and prefix[common] == upto[common]:
      common += 1
    keep.append(len(full) <= length and common < len(upto) and full[:len(upto)] == upto)
    if not keep[-1]:
      continue
    row = np.full((2, length), tokenizer.eos_id, np.int32)
    row[0, :len(full)] = full
    row[1] = np.arange(length) < len(full)
    ans = np.zeros(length, bool)
    ans[common:len(upto)] = True
    rows.append(row)
    answers.append(ans)
  if not rows:  # nothing fits: no rows (the table says 0/0)
    return np.zeros((0, 2, length), np.int32), np.zeros((0, length), bool), keep
  return np.stack(rows), np.stack(answers), keep


def line_items(lines) -> list[tuple[str, str, str]]:
  """Each worked line alone: 'a op b =' -> ' r'."""
  return [(f'{problem} =', f' {result}', '') for problem, result in lines]


def document_items(data_cfg) -> tuple[list[tuple[str, str, str]], list[str]]:
  """Each worked line of the training split's documents in its document: every other line
  visible (what pretraining showed around it), this line's result the answer; and each item's
  operator."""
  from pathways_jax.data import corpora, synthetic  # pylint: disable=g-import-not-at-top,multiple-import
  items, ops = [], []
  for doc in synthetic.documents(data_cfg.synthetic, corpora.synthetic_seed(data_cfg), 'train'):
    lines = doc.split('\n')
    if not all(synthetic.WORKED_LINE.match(line) for line in lines):
      continue
    for i, line in enumerate(lines):
      m = synthetic.WORKED_LINE.match(line)
      cut = line.rindex(' ')
      items.append(('\n'.join(lines[:i] + [line[:cut]]), line[cut:],
                    ''.join('\n' + rest for rest in lines[i + 1:])))
      ops.append(m[2])
  return items, ops


def recalled(cfg, model, params, rows_N2L, answer_NL, batch: int, unmask: str = 'one_pass',
             reading: str = 'model') -> np.ndarray:
  """[N] bool: every answer token predicted right, teacher-forced (see the module docstring)."""
  pred_NL = predictions(cfg, model, params, rows_N2L, answer_NL, batch, unmask, reading)
  return np.all(np.where(answer_NL, pred_NL == rows_N2L[:, 0], True), axis=1)


def predictions(cfg, model, params, rows_N2L, answer_NL, batch: int, unmask: str = 'one_pass',
                reading: str = 'model') -> np.ndarray:
  """[N, L] int: the model's token for each answer position (elsewhere the row's own token)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pathways_jax.tasks.pretrain import mask_id  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import anneal  # pylint: disable=g-import-not-at-top
  if unmask not in UNMASK or reading not in READING:
    raise ValueError(f'unmask={unmask!r} / reading={reading!r}: not one of {UNMASK} / {READING}')
  causal = model.cfg.causal  # model.shift_logits moves the head inside the model: no shift here
  if reading == 'causal' and not causal:
    # Each query sees the keys before it only: the annealing mask at ratio 0.
    model = anneal.AnnealedModel(model, jax.random.key(0), 0.0)
  if unmask == 'alone' and not causal and len(rows_N2L):
    # One row per answer token, that token masked alone; the answer's other tokens shown.
    item_A, pos_A = np.nonzero(answer_NL)
    alone_AL = np.zeros((len(item_A), answer_NL.shape[1]), bool)
    alone_AL[np.arange(len(item_A)), pos_A] = True
    pred_AL = predictions(cfg, model, params, rows_N2L[item_A], alone_AL, batch)
    pred_NL = rows_N2L[:, 0].copy()
    pred_NL[item_A, pos_A] = pred_AL[np.arange(len(item_A)), pos_A]
    return pred_NL
  mid = mask_id(cfg)
  # 'confidence': one pass per answer token of the longest answer (a row with fewer stops early).
  passes = int(answer_NL.sum(1).max(initial=1)) if unmask == 'confidence' and not causal else 1

  def fill_most_confident(_, inputs_BL, segments_BL, answer_BL):
    logits = model.apply({'params': params}, inputs_BL, segment_ids_BL=segments_BL)
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    still_BL = answer_BL & (inputs_BL == mid)
    conf_BL = jnp.where(still_BL, probs.max(-1), -1.0)
    pick_BL = (jnp.arange(inputs_BL.shape[1]) == jnp.argmax(conf_BL, 1)[:, None]) & still_BL
    return jnp.where(pick_BL, jnp.argmax(logits, -1), inputs_BL)

  @jax.jit
  def predict(rows_B2L, answer_BL):
    tokens_BL, segments_BL = rows_B2L[:, 0], rows_B2L[:, 1]
    inputs = tokens_BL if causal else jnp.where(answer_BL, mid, tokens_BL)
    if passes > 1:
      pred = jax.lax.fori_loop(0, passes, lambda i, x: fill_most_confident(
          i, x, segments_BL, answer_BL), inputs)
    else:
      pred = jnp.argmax(model.apply({'params': params}, inputs, segment_ids_BL=segments_BL), -1)
      if causal:  # position i predicts token i + 1
        pred = jnp.concatenate([jnp.zeros_like(pred[:, :1]), pred[:, :-1]], axis=1)
    return jnp.where(answer_BL, pred, tokens_BL)

  out = [np.zeros((0, answer_NL.shape[1]), np.int32)]
  for i in range(0, len(rows_N2L), batch):
    t, a = rows_N2L[i:i + batch], answer_NL[i:i + batch]
    pad = batch - len(t)
    if pad:
      t = np.concatenate([t, np.repeat(t[:1], pad, 0)])  # one compiled shape
      a = np.concatenate([a, np.repeat(a[:1], pad, 0)])
    out.append(np.asarray(predict(t, a))[:batch - pad])
  return np.concatenate(out)


def new_name_items(n: int = 256, seed: int = 7) -> list[tuple[str, str, str]]:
  """Sentences of the corpus's biography form about a person with a new made-up name: the answer
  is the first name where the corpus repeats it (a model that copies from context gets it; one
  that only recalls its corpus cannot)."""
  import random  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  rng = random.Random(f'arithmetic_recall/names/{seed}')
  items = []
  for _ in range(n):
    first, family = (synthetic._word(rng, 2).capitalize() for _ in range(2))  # pylint: disable=protected-access
    items.append((f'Among the people of Byfem, {first} {family} is known as the keeper of the '
                  'salt fountain.', f' {first}', ' was born in 1908 in Byfem.'))
  return items


def probe(run_dir: str, step=None, batch: int = 64, unmask: str = 'one_pass',
          reading: str = 'model') -> dict:
  """{'read' | 'unread' | 'read_in_document' | 'new_name_copied': {op: [recalled, n]}} for one
  run directory."""
  from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
  cfg, model, params, tokenizer = load_run(run_dir, step)
  if cfg.data.corpus not in ('synthetic', 'chat'):
    raise ValueError(f'{run_dir}: data.corpus={cfg.data.corpus!r}; the probe needs the synthetic '
                     'world (a base) or a fine-tune of one')
  read = worked_lines(cfg.data, 'train')
  unread = unread_problems({p for p, _ in read}, len(read))
  docs, doc_ops = document_items(cfg.data)
  names = new_name_items()
  table = {}
  for name, lines, ops in (('read', read, [p.split()[1] for p, _ in read]),
                           ('unread', unread, [p.split()[1] for p, _ in unread])):
    table[name] = _count(cfg, model, params, answer_rows(tokenizer, line_items(lines), 32), ops,
                         batch, unmask, reading)
  for name, items, ops in (('read_in_document', docs, doc_ops),
                           ('new_name_copied', names, ['name'] * len(names))):
    table[name] = _count(cfg, model, params, answer_rows(tokenizer, items, cfg.data.seq_len), ops,
                         batch, unmask, reading)
  return table


def _count(cfg, model, params, rows_answer_keep, ops, batch: int, unmask: str,
           reading: str) -> dict:
  """{op | 'all': [recalled, n]} of the kept items."""
  rows, answer, keep = rows_answer_keep
  counts = collections.defaultdict(lambda: [0, 0], {'all': [0, 0]})
  if not len(rows):  # pylint: disable=g-explicit-length-test
    return dict(counts)
  ok = recalled(cfg, model, params, rows, answer, batch, unmask, reading)
  for op, good in zip([o for o, k in zip(ops, keep) if k], ok):
    for key in (op, 'all'):
      counts[key][0] += int(good)
      counts[key][1] += 1
  return dict(counts)


def main(argv):
  del argv
  if not FLAGS.run:
    sys.exit('error: name at least one --run directory')
  if FLAGS.batch < 1:
    sys.exit(f'error: --batch={FLAGS.batch} must be >= 1')
  results = {}
  print('| run | problems | all | + | - | * |\n|---|---|---|---|---|---|')
  for run_dir in FLAGS.run:
    try:
      results[run_dir] = t = probe(run_dir, FLAGS.step, FLAGS.batch, FLAGS.unmask,
                                   FLAGS.reading)
    except (ValueError, OSError) as e:  # not a run directory, not the synthetic world, ...
      sys.exit(f'error: {run_dir}: {e}')
    for name in ('read', 'unread', 'read_in_document', 'new_name_copied'):
      cells = [f'{t[name][k][0]}/{t[name][k][1]}' if k in t[name] else '-'
               for k in ('all', '+', '-', '*')]  # the names have 'all' only
      print(f'| {run_dir} | {name} | ' + ' | '.join(cells) + ' |')
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(results, f, indent=2)


def define_flags():
  """The command's flags, defined when it runs as a script only: a test or another experiment
  may load this file more than once, and absl refuses a flag defined twice."""
  flags.DEFINE_multi_string('run', [], 'run directories (AR or LLaDA) to probe')
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the newest)')
  flags.DEFINE_integer('batch', 64, 'lines per forward pass')
  flags.DEFINE_string('out', '', 'also write the table as JSON here')
  flags.DEFINE_enum('unmask', 'one_pass', UNMASK,
                    "LLaDA: fill the answer in one pass, one token per pass, the most confident "
                    "first ('confidence', as the sampler's low-confidence remasking), or each "
                    "token with the answer's others shown ('alone')")
  flags.DEFINE_enum('reading', 'model', READING,
                    "LLaDA: the model's own attention, or 'causal' (each query sees the keys before "
                    "it: with --unmask=alone and shifted logits, the AR model's teacher-forced pass)")


if __name__ == '__main__':
  define_flags()
  app.run(main)
