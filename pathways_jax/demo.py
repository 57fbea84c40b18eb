"""Fill in the middle: what a diffusion LM does that a left-to-right LM cannot (`make run`'s third step).

    python -m pathways_jax.demo --ar=runs/quickstart --llada=runs/quickstart_llada
        [--lines=100 --span=4 --context=32 --show=6]

From held-out lines of the corpus's validation split it masks `--span` tokens in the middle of
each line and asks both trained runs for them:

  LLaDA             fills the span seeing `--context` tokens on each side of it
                    (sampling.diffusion.infill: greedy, one token per step, most confident first);
  LLaDA, left only  the same with nothing after the span: what the right-hand side is worth to it;
  AR                continues greedily from the same left context for `--span` tokens; it cannot see
                    the rest of the line (the table shows it anyway, after the guess).

It prints a few lines side by side, then each model's token accuracy on the span over `--lines`
lines: a predicted token counts when it equals the held-out token at its position. Both runs must
use the same tokenizer. Python corpora keep only lines that hold code (a name, number or operator
outside strings and comments, by the `tokenize` module); other text keeps every line.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import sys
import time
import tokenize

import numpy as np
from absl import app, flags

_MASK_SHOWN = '[____]'


@dataclasses.dataclass(frozen=True)
class Example:
  """One held-out line with a span to fill.

  window_W holds the document's tokens from `context` before the span to `context` after it, so
  the span is window_W[context:context + span] (W = 2 * context + span).
  """
  doc: int  # index into the split's documents
  lineno: int  # 1-based line number in that document
  line_T: np.ndarray  # the line's tokens, its newline included
  start: int  # where the span begins in line_T
  window_W: np.ndarray


def _code_lines(text: str) -> set[int] | None:
  """1-based numbers of the lines of `text` that hold Python code, or None if it is not Python."""
  lines = set()
  try:
    for t in tokenize.generate_tokens(io.StringIO(text).readline):
      if t.type in (tokenize.NAME, tokenize.NUMBER, tokenize.OP):
        lines.update(range(t.start[0], t.end[0] + 1))
  except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
    return None
  return lines


def _blank(tokenizer, token_id: int) -> bool:
  return not tokenizer.decode([token_id]).strip()


def select_examples(docs, tokenizer, *, num: int, span: int, context: int) -> list[Example]:
  """About `num` lines, the same number from each document (evenly spaced in it), in order.

  Each document is tokenized line by line, with bos before it and eos after it as in training
  (for the stdlib this equals tokenizing the whole file). A line is eligible when it has at least
  2 tokens on each side of a centred span of `span` tokens, after its indentation, and `context`
  tokens of its document before and after the span. Taking lines per document keeps one long
  file (a codec in the stdlib's validation split has a 384-line mapping table) from filling the
  sample.
  """
  per_doc = []
  for d, text in enumerate(docs):
    lines = text.split('\n')
    encoded = [np.asarray(tokenizer.encode(t), np.int32)
               for t in [l + '\n' for l in lines[:-1]] + lines[-1:]]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    doc_N = np.concatenate([bos, *encoded, [tokenizer.eos_id]]).astype(np.int32)
    code = _code_lines(text)
    offset, found = len(bos), []
    for i, (line, line_T) in enumerate(zip(lines, encoded)):
      begin, offset = offset, offset + len(line_T)
      if code is not None and i + 1 not in code:
        continue
      indent = 0
      while indent < len(line_T) and _blank(tokenizer, line_T[indent]):
        indent += 1
      body = len(line_T) - indent - (1 if i < len(lines) - 1 else 0)  # not the newline
      if body < span + 4 or not line.strip():
        continue
      start = indent + (body - span) // 2
      at = begin + start
      if at - context < 0 or at + span + context > len(doc_N):
        continue
      found.append(Example(d, i + 1, line_T, start,
                           doc_N[at - context:at + span + context]))
    if found:
      per_doc.append(found)
  if not per_doc:
    raise ValueError(f'no line of the split has {span + 4} tokens after its indentation and '
                     f'{context} tokens of context on each side (lower --span or --context)')
  # The smallest equal share per document that reaches `num` (documents with fewer give all).
  share = 1
  while share < num and sum(min(share, len(f)) for f in per_doc) < num:
    share += 1
  picked = []
  for found in per_doc:
    picked += [found[i] for i in _spread(len(found), min(share, len(found)))]
  return [picked[i] for i in _spread(len(picked), min(num, len(picked)))]


def _spread(n: int, k: int) -> list[int]:
  """k distinct indices into range(n), the middles of k equal parts (k <= n)."""
  return [int((j + 0.5) * n / k) for j in range(k)]


def predict(ar, llada, examples: list[Example], *, span: int, context: int, seed: int = 0):
  """Each model's tokens for every example's span: {'llada', 'llada_left', 'ar'}, each [N, span].

  `ar` is (model, params), `llada` (model, params, tokenizer). All decoding is
  greedy; LLaDA fills one token per step, the most confident first (its low-confidence
  remasking, one block).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from pathways_jax.sampling import autoregressive, diffusion  # pylint: disable=g-import-not-at-top
  (amodel, aparams), (lmodel, lparams, tokenizer) = ar, llada
  mask_id = tokenizer.mask_id
  n, end = len(examples), context + span
  windows_NW = np.stack([e.window_W for e in examples])
  masked_NW = windows_NW.copy()
  masked_NW[:, context:end] = mask_id
  # Both LLaDA variants in one call (one compile): the left-only rows hold padding after the
  # span that valid_BL hides from attention, which is the same as a row cut after the span.
  left_NW = masked_NW.copy()
  left_NW[:, end:] = tokenizer.pad_id
  valid_2NW = np.ones((2 * n, windows_NW.shape[1]), bool)
  valid_2NW[n:, end:] = False
  key = jax.random.key(seed)  # greedy: the key only satisfies the signatures
  filled = np.asarray(diffusion.infill(lmodel, lparams, np.concatenate([masked_NW, left_NW]),
                                       mask_id=mask_id, key=key, steps=span, valid_BL=valid_2NW))
  # A plain apply_fn takes generate's recompute path (a full forward per token, no KV cache):
  # for a few tokens it compiles faster than the cached decoder, which this one call would not
  # earn back (measured: 7.5 s against 10.2 s for 100 rows, compile included).
  ar_out = autoregressive.generate(lambda p, x: amodel.apply({'params': p}, x), aparams,
                                   windows_NW[:, :context], key=key, max_new_tokens=span,
                                   temperature=0.0)
  return {'llada': filled[:n, context:end], 'llada_left': filled[n:, context:end],
          'ar': np.asarray(ar_out)[:, context:end]}


def accuracy(pred_NS: np.ndarray, truth_NS: np.ndarray) -> dict:
  """Token accuracy (predicted == held-out, position by position) and whole-span exact match."""
  hit_NS = np.asarray(pred_NS) == np.asarray(truth_NS)
  return {'token_accuracy': float(hit_NS.mean()), 'exact_match': float(hit_NS.all(-1).mean()),
          'tokens': int(hit_NS.size), 'lines': int(hit_NS.shape[0])}


def _cell(text: str, width: int) -> str:
  text = text.replace('\n', '\\n').replace('\t', '\\t')
  return text if len(text) <= width else text[:width - 1] + '~'


def render_line(tokenizer, e: Example, span: int, fill=None) -> str:
  """The line (indentation dropped) with the span shown as [____], or as [fill tokens]."""
  left = tokenizer.decode(e.line_T[:e.start]).lstrip()
  right = tokenizer.decode(e.line_T[e.start + span:]).rstrip('\n')
  middle = _MASK_SHOWN if fill is None else '[' + tokenizer.decode(fill) + ']'
  return left + middle + right


def table(tokenizer, examples, preds, *, span: int, show: int, width: int = 36) -> str:
  """Side-by-side text: the masked line, LLaDA's fill, AR's continuation (then the unseen rest)."""
  # Distinct lines that leave room for a fill in the column, spread over the evaluated set
  # (chosen by length, never by result).
  short, seen = [], set()
  for i, e in enumerate(examples):
    masked = render_line(tokenizer, e, span)
    if len(masked) <= width - 6 and masked not in seen:
      short.append(i)
      seen.add(masked)
  rows = [short[j] for j in _spread(len(short), min(show, len(short)))]
  head = ['masked line', 'LLaDA fills [..]', 'ok', 'AR continues [..]', 'ok']
  out = [head]
  for i in rows:
    e = examples[i]
    true_S = e.line_T[e.start:e.start + span]
    out.append([render_line(tokenizer, e, span),
                render_line(tokenizer, e, span, preds['llada'][i]),
                f"{int((preds['llada'][i] == true_S).sum())}/{span}",
                render_line(tokenizer, e, span, preds['ar'][i]),
                f"{int((preds['ar'][i] == true_S).sum())}/{span}"])
  out = [[_cell(c, width) for c in r] for r in out]
  widths = [max(len(r[k]) for r in out) for k in range(len(head))]
  lines = [' | '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in out]
  lines.insert(1, '-+-'.join('-' * w for w in widths))
  return '\n'.join(lines)


def run(ar_dir: str, llada_dir: str, *, lines: int = 100, span: int = 4, context: int = 32,
        show: int = 6, seed: int = 0) -> dict:
  """Loads both runs, fills the spans, returns {'examples', 'truth', 'preds', 'accuracy', 'text'}."""
  from pathways_jax.data import corpora  # pylint: disable=g-import-not-at-top
  from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
  if span < 1 or context < 1:
    raise ValueError(f'--span={span} and --context={context} must be positive')
  acfg, amodel, aparams, atok = load_run(ar_dir)
  lcfg, lmodel, lparams, ltok = load_run(llada_dir)
  if not amodel.cfg.causal or lmodel.cfg.causal:
    raise ValueError(f'--ar={ar_dir} must be a causal (AR) run and --llada={llada_dir} a '
                     'bidirectional (LLaDA) one')
  if getattr(atok, 'fingerprint', 'a') != getattr(ltok, 'fingerprint', 'b'):
    raise ValueError('the two runs use different tokenizers; the demo compares their tokens')
  window = 2 * context + span
  if window > min(amodel.cfg.max_len, lmodel.cfg.max_len):
    raise ValueError(f'2 * --context + --span = {window} tokens exceeds the models\' max_len')
  docs = corpora.load_documents(lcfg.data, 'validation')
  examples = select_examples(docs, ltok, num=lines, span=span, context=context)
  truth_NS = np.stack([e.window_W[context:context + span] for e in examples])
  preds = predict((amodel, aparams), (lmodel, lparams, ltok), examples, span=span,
                  context=context, seed=seed)
  acc = {k: accuracy(v, truth_NS) for k, v in preds.items()}
  n = len(examples)
  text = [f'Fill in the middle: {span} tokens masked mid-line in {n} held-out lines of '
          f'{lcfg.data.corpus!r} (validation split).',
          f'LLaDA sees the {context} tokens before the span and the {context} after it; AR sees '
          f'only the {context} before,',
          "so its line goes on with the part it could not see. [..] = a model's tokens (greedy).",
          '',
          table(ltok, examples, preds, span=span, show=show),
          '',
          f'span accuracy over {n} lines ({n * span} tokens)  token  whole span',
          f"  LLaDA, both sides     {acc['llada']['token_accuracy']:6.1%}  "
          f"{acc['llada']['exact_match']:6.1%}",
          f"  LLaDA, left only      {acc['llada_left']['token_accuracy']:6.1%}  "
          f"{acc['llada_left']['exact_match']:6.1%}",
          f"  AR, left only         {acc['ar']['token_accuracy']:6.1%}  "
          f"{acc['ar']['exact_match']:6.1%}"]
  return {'examples': examples, 'truth': truth_NS, 'preds': preds, 'accuracy': acc,
          'text': '\n'.join(text)}


def main(argv):
  del argv
  f = flags.FLAGS
  # orbax's INFO lines, and its warning that param-only restores lack metadata, would bury the table
  logging.getLogger('absl').setLevel(logging.ERROR)
  logging.getLogger('jax').setLevel(logging.WARNING)
  from pathways_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  try:
    out = run(f.ar, f.llada, lines=f.lines, span=f.span, context=f.context, show=f.show,
              seed=f.seed)
  except (FileNotFoundError, CheckpointError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(out['text'])
  print(f'({time.perf_counter() - t0:.1f} s)')
  return 0


if __name__ == '__main__':
  flags.DEFINE_string('ar', None, 'AR run directory', required=True)
  flags.DEFINE_string('llada', None, 'LLaDA run directory', required=True)
  flags.DEFINE_integer('lines', 100, 'held-out lines to score')
  flags.DEFINE_integer('span', 4, 'masked tokens per line')
  flags.DEFINE_integer('context', 32, 'tokens of context on each side of the span')
  flags.DEFINE_integer('show', 6, 'lines shown in the table')
  flags.DEFINE_integer('seed', 0, 'sampling seed (decoding is greedy)')
  app.run(lambda argv: sys.exit(main(argv)))
