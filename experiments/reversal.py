"""The reversal curse at toy scale: an AR model and a LLaDA model on the same facts.

    python -m pathways_jax.main --config=experiments/reversal.py --workdir=runs/reversal \
        [--config.data.facts_file=people.jsonl] [--config.reversal.num_test=50 ...]

A world of made-up people (`pathways_jax.data.synthetic`, one world per seed), in two groups:
  background  every fact stated in BOTH directions: name-first in `reversal.name_first_templates`
              paraphrases (16) and description-first in `reversal.description_first_templates` (4);
  test        facts stated ONLY name-first, in the same 16 paraphrases. `data.facts_file` (JSONL
              lines with `name` and `description`) replaces the generated test group; the
              background stays, and `reversal.file_background` of the file's people may join it.
Template 4 of each direction is held out of training for everyone.

Each training row is one fact sentence: bos, the sentence, eos, then eos padding to the row length
(LLaDA's SFT format: the padding is masked and trained like any token, so the model learns where an
answer ends). An AR model and a LLaDA model of the same size and tokenizer are trained on the same
rows, each to its step cap (AR 2000, LLaDA 20000), by the project trainer: each model is a run
directory (WORKDIR/ar, WORKDIR/llada, WORKDIR/llada_control: orbax checkpoints, metrics.jsonl,
TensorBoard) trained on a rows file (`data.corpus='rows'`) with task 'autoregressive' (targets up to
the first eos) or 'llada_sft'. Every `reversal.check_every` steps a trainer callback checks the
forward facts of the test group (greedy exact match on a seen name-first template); the first check
at `reversal.target_forward` is reported as `{model}_steps_to_target` ("steps to know the facts"),
and `reversal.stop_at_target=True` stops a model there instead. LLaDA trains with its pretraining
loss (any token may be masked: this is what teaches description -> name); `reversal.sft_fraction`
> 0 trains that share of the rows with the SFT loss instead (the sentence's prompt never masked),
which took the reverse answers from 0.66 to 0.02 in a pilot. A control LLaDA run (the background
group name-first only, the same number of sentences, the same steps as the main LLaDA run) shows
what the two-way background contributes.

Evaluation on the test people only (greedy decoding, exact match of the answer phrase):
  forward            name-first prompt of a seen template -> description (mean over the first 4)
  forward_heldout    the held-out name-first template 4
  reverse            description-first prompt of a template seen for the background -> name
                     (mean over the first 4)
  reverse_heldout    the held-out description-first template 4
  llada_infill       LLaDA fills the masked name slot of the name-first training sentence
  *_rank_reverse     rank of the true name among all names for the reverse prompt (template 0):
                     AR by sum log p(name + '.'); LLaDA by the masked score: the whole name slot
                     masked at once, sum of log p of its tokens (the l = L term of LLaDA's bound,
                     one forward pass per prompt and name length)
Results go to WORKDIR/results.json (fractions in [0, 1]; steps and training FLOPs per model).
Each finished model's evaluation is saved at once (results.partial.json), so the same command on a
stopped run reuses the finished models and resumes the one that was training from its newest
checkpoint (every `train.checkpoint_every` steps). A run directory is never resumed with another
config: that is an error naming the keys that differ.
"""


import copy
import json
import logging
import os
import platform
import time

import ml_collections
import numpy as np

from pathways_jax.config import base_config
from pathways_jax.data.facts import Entity, Row, encode_fact, entity_of, load_facts_file, to_arrays
from pathways_jax.eval.facts import Evaluator
from pathways_jax.train import metrics as metrics_lib

_LOG = logging.getLogger(__name__)
HELDOUT_TEMPLATE = 4  # of each direction: never trained, for anyone
EVAL_TEMPLATES = 4  # forward/reverse are scored on the first 4 trained templates of a direction


def get_config():
  c = base_config()
  c.name = 'reversal'
  c.seed = 0
  c.data.corpus = 'synthetic'  # the world; rows are built by this experiment, not the pipeline
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 2048  # whole words: a name is 2 tokens, a description 5 (512 spells them)
  c.data.batch_size = 32
  c.data.seq_len = 0  # 0: the longest sentence, rounded up to a multiple of 8
  c.data.facts_file = ''  # JSONL {name, description}: replaces the generated test group
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 384
  c.model.max_len = 64
  c.train.lr = 3e-3
  # Warmup, constant, then a linear decay over the last quarter of each model's step cap: the
  # facts stick during the decay (a LLaDA pilot went from 0.09 to 0.88 forward in it). A model
  # that reaches the forward target earlier stops in the constant phase (AR does, at ~250 steps).
  c.train.schedule = 'wsd'
  c.train.decay_fraction = 0.25
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.0
  c.train.log_every = 100
  c.train.checkpoint_every = 500  # each model is a run directory: a stopped run resumes mid-model
  c.reversal = r = ml_collections.ConfigDict()
  r.world_seed = -1  # -1: the run's seed (each seed its own people and descriptions)
  r.num_background = 80
  r.num_test = 40
  r.ar_max_steps = 2000
  # LLaDA trains on well past the forward criterion: the reverse answers come once the trained
  # sentences are memorised (seed 0: reverse 0.26 at 12000 steps, 0.89 at 20000; 3 seeds at 12000:
  # 0.49 on average; docs/results/reversal.md). AR gets its whole (cheap) cap too.
  r.llada_max_steps = 20000
  r.check_every = 250
  r.target_forward = 0.9  # stop once this fraction of forward facts is known (seen template)
  r.stop_at_target = False  # True: stop a model at its first check >= target_forward
  # Each person's facts in many name-first paraphrases ("knowledge augmentation"): the former
  # recipe (4 of them, SFT share 0.25) gave LLaDA 0.07 reverse at 12000 steps; a pilot with 16 and
  # no SFT rows 0.66 (one seed each; docs/results/reversal.md).
  r.name_first_templates = 16  # per person (at most 16: every name-first template but the held-out)
  r.description_first_templates = 4  # per background person (at most 11)
  # LLaDA: share of rows trained with the prompt never masked (SFT). 0: pretraining loss only; in
  # that pilot a 0.25 share took reverse from 0.66 to 0.02.
  r.sft_fraction = 0.0
  # With a facts file: this many of its people (a seeded draw per world) join the two-way
  # background; the rest stay the test group. 0: the file is all test, the background generated.
  r.file_background = 0
  r.control = True  # also train the control LLaDA (background name-first only)
  r.eval_limit = 0  # > 0: evaluate only the first N test people (quick runs)
  return c


# ------------------------------------------------------------------------------------- the world

def make_groups(cfg) -> tuple[list[Entity], list[Entity]]:
  from pathways_jax.data import synthetic
  from pathways_jax.data.corpora import DataError
  r = cfg.reversal
  n_test = 0 if cfg.data.facts_file else r.num_test
  world_seed = cfg.seed if r.world_seed < 0 else r.world_seed
  world = synthetic.make_world(world_seed, r.num_background + n_test)
  people = [entity_of(p) for p in world.people]
  background, test = people[:r.num_background], people[r.num_background:]
  if cfg.data.facts_file:
    test = load_facts_file(cfg.data.facts_file, world.cities)
    if not 0 <= r.file_background < len(test):
      from pathways_jax import config as config_lib
      raise config_lib.ConfigError(
          f'config.reversal.file_background={r.file_background} must be in [0, {len(test) - 1}]: '
          f'{cfg.data.facts_file} has {len(test)} people and at least one must stay a test person')
    # The file's own kind of description in both directions: free text, unlike the generated
    # background's formulaic descriptions.
    order = np.random.default_rng(world_seed).permutation(len(test))
    background = background + [test[i] for i in order[:r.file_background]]
    test = [test[i] for i in sorted(order[r.file_background:])]
  elif r.file_background:
    from pathways_jax import config as config_lib
    raise config_lib.ConfigError(f'config.reversal.file_background={r.file_background} needs '
                                 'config.data.facts_file (the people it moves to the background)')
  bg_names = {p.name: p for p in background}
  bg_descs = {p.description.lower(): p for p in background}
  for p in test:  # within each group they are unique already (the world's and the loader's checks)
    other = bg_names.get(p.name) or bg_descs.get(p.description.lower())
    if other is not None:
      raise DataError(f'test person {p.name!r} ({p.description!r}) shares its name or description '
                      f'with background person {other.name!r} ({other.description!r}); names and '
                      'descriptions must be unique across both groups')
  return background, test


# ----------------------------------------------------------------------------------- tokenizing

def make_tokenizer(background, test, vocab_size: int, cache_dir: str):
  """A sentencepiece model trained on every sentence of both groups (all templates)."""
  from pathways_jax.data import tokenizers
  texts, path = _tokenizer_texts_and_path(background, test, vocab_size, cache_dir)
  if os.path.isfile(path):
    return tokenizers.SentencePieceTokenizer.from_file(path)
  return tokenizers.train_sentencepiece(texts, vocab_size, path[:-len('.model')])


def _tokenizer_texts_and_path(background, test, vocab_size: int, cache_dir: str):
  import hashlib
  from pathways_jax.data import synthetic
  texts = [synthetic.fact_sentence(p, d, t).text for p in background + test
           for d in synthetic.DIRECTIONS for t in range(synthetic.NUM_TEMPLATES[d])]
  key = hashlib.blake2b(repr((texts, vocab_size)).encode(), digest_size=10).hexdigest()
  return texts, os.path.abspath(os.path.join(cache_dir, f'reversal-sp{vocab_size}-{key}.model'))


def trained_templates(direction: str, count: int) -> tuple[int, ...]:
  """The first `count` templates of `direction`, skipping the held-out one."""
  from pathways_jax.data import synthetic
  usable = [t for t in range(synthetic.NUM_TEMPLATES[direction]) if t != HELDOUT_TEMPLATE]
  if not 1 <= count <= len(usable):
    from pathways_jax import config as config_lib
    key = 'name_first_templates' if direction == 'name_first' else 'description_first_templates'
    raise config_lib.ConfigError(f'config.reversal.{key}={count} must be in [1, {len(usable)}] '
                                 f'(the {direction} templates but the held-out one)')
  return tuple(usable[:count])


def training_rows(tok, background, test, r, *, control: bool) -> list[Row]:
  """Main: every person name-first in `r.name_first_templates` paraphrases, the background also
  description-first in `r.description_first_templates`; the test group never description-first.
  Control: the background's description-first sentences replaced by more name-first ones
  (cycling through its templates), so both runs see the same number of sentences."""
  names = trained_templates('name_first', r.name_first_templates)
  descs = trained_templates('description_first', r.description_first_templates)
  rows = []
  for p in background:
    rows += [encode_fact(tok, p, 'name_first', t) for t in names]
    if control:
      rows += [encode_fact(tok, p, 'name_first', names[i % len(names)]) for i in range(len(descs))]
    else:
      rows += [encode_fact(tok, p, 'description_first', t) for t in descs]
  for p in test:
    rows += [encode_fact(tok, p, 'name_first', t) for t in names]
  return rows


# ------------------------------------------------------------------------------------- training

def write_rows(workdir: str, name: str, arrays, kind: str) -> str:
  """The rows file one model trains on (`data.corpus='rows'`), named by its content.

  AR: `segment_ids` 1 up to and including the first eos (its targets), 0 on the eos padding.
  LLaDA: the whole row is one segment (the padding eos is trained) and `prompt` marks bos + prompt.
  """
  import hashlib
  from pathways_jax.data import rows as rows_lib
  tokens, prompt, real = arrays
  fields = {'tokens': tokens}
  if kind == 'ar':
    fields['segment_ids'] = real.astype(np.int32)
  else:
    fields['prompt'] = prompt.astype(np.int32)
  digest = hashlib.blake2b(digest_size=8)
  for k in sorted(fields):
    digest.update(k.encode() + np.ascontiguousarray(fields[k]).tobytes())
  path = os.path.abspath(os.path.join(workdir, f'rows-{name}-{digest.hexdigest()}.npz'))
  if not os.path.exists(path):
    rows_lib.save_rows(path, train=fields)
  return path


def model_run_config(cfg, kind: str, *, rows_path: str, tokenizer_path: str, seq_len: int,
                     max_len: int, vocab: int, num_rows: int, steps: int, stop_at: int = 0):
  """The trainer's config for one model of the experiment (a run directory of its own)."""
  r = cfg.reversal
  c = copy.deepcopy(cfg)
  with c.unlocked():  # the CLI locks the config it hands to run()
    del c['reversal']
  causal = kind == 'ar'
  c.name = f'{cfg.name}/{kind}'
  c.task = 'autoregressive' if causal else 'llada_sft'
  c.objective = 'autoregressive' if causal else 'diffusion'
  if not causal:
    c.llada_sft.sft_fraction = float(r.sft_fraction)
  c.seed = cfg.seed + (0 if causal else 1)
  c.model.causal = causal
  c.model.max_len = max_len
  c.model.vocab_size = vocab
  c.data.corpus = 'rows'
  c.data.path = rows_path
  c.data.tokenizer = 'sentencepiece'
  c.data.tokenizer_path = tokenizer_path
  c.data.seq_len = seq_len
  c.data.batch_size = min(cfg.data.batch_size, num_rows)
  c.data.eval_batches = 0  # the experiment evaluates the facts itself
  c.train.steps = steps
  c.train.stop_at = stop_at
  c.sample.prompts = ()
  return c


def _check_same_run(run_dir: str, run_cfg) -> None:
  """A run directory trained with another config is never resumed with this one."""
  path = os.path.join(run_dir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    before = _flat(json.load(f))
  now = _flat(json.loads(run_cfg.to_json_best_effort()))
  ignore = {'train.stop_at', 'train.progress_bar'}
  diff = sorted(k for k in set(before) | set(now)
                if k not in ignore and before.get(k) != now.get(k))
  if diff:
    from pathways_jax import config as config_lib
    shown = ', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in diff[:6])
    raise config_lib.ConfigError(
        f'{run_dir} was trained with another config ({shown}); use another workdir (or remove '
        'that run directory) to train this one')


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = json.dumps(v) if isinstance(v, list) else v
  return out


def forward_checks(run_dir: str) -> list[tuple[int, float]]:
  """(step, forward accuracy) of every check a model's run logged (a resumed run: the last)."""
  return metrics_lib.logged(run_dir, 'check_forward')


def train_model(run_cfg, run_dir: str, check_fn, *, check_every: int, target: float,
                stop_at_target: bool, quiet: bool = False):
  """Trains (or resumes) one model through the project trainer, checking the forward facts
  every `check_every` steps; stops at the first check >= target when `stop_at_target`.

  Returns (steps, history, seconds); history lists the checks (step, forward accuracy).
  """
  from pathways_jax.train import loop

  def check(step, params):
    acc = check_fn(params)
    if not quiet:
      print(f'[{run_cfg.name}] step {step}: forward (seen) {acc:.3f}', flush=True)
    if stop_at_target and acc >= target:
      raise loop.StopTraining({'check_forward': acc})
    return {'check_forward': acc}

  _check_same_run(run_dir, run_cfg)
  t0 = time.time()
  res = loop.train(run_cfg, run_dir, quiet=True,
                   callbacks=[loop.Callback(every=check_every, fn=check)])
  if res['status'] == 'preempted':  # SIGTERM: saved; the same command resumes this model
    raise Preempted(f'{run_cfg.name} stopped at step {res["step"]} (SIGTERM, checkpoint saved)')
  return res['step'], forward_checks(run_dir), time.time() - t0


class Preempted(Exception):
  """A model's training was stopped by SIGTERM; rerunning the experiment resumes it."""


# ----------------------------------------------------------------------------------- evaluation

def evaluate_model(ev: Evaluator, tok, test, background, r) -> dict:
  """Forward and reverse on the first EVAL_TEMPLATES trained templates of each direction (the
  reverse ones trained for the background only), each held-out template alone."""
  out = {}
  seen_fwd = trained_templates('name_first', r.name_first_templates)[:EVAL_TEMPLATES]
  seen_rev = trained_templates('description_first', r.description_first_templates)[:EVAL_TEMPLATES]
  fwd = [encode_fact(tok, p, 'name_first', t) for p in test for t in seen_fwd]
  out['forward'] = ev.exact_match(fwd)
  out['forward_heldout'] = ev.exact_match(
      [encode_fact(tok, p, 'name_first', HELDOUT_TEMPLATE) for p in test])
  rev = [encode_fact(tok, p, 'description_first', t) for p in test for t in seen_rev]
  out['reverse'] = ev.exact_match(rev)
  out['reverse_heldout'] = ev.exact_match(
      [encode_fact(tok, p, 'description_first', HELDOUT_TEMPLATE) for p in test])
  if ev.kind == 'llada':
    out['infill_reverse'] = ev.infill_name([encode_fact(tok, p, 'name_first', 0) for p in test])
    # Where the description -> name association lives: the name slot masked in the trained
    # name-first sentence, after the description-first question, and (trained both ways) for
    # the background people.
    out['probe_name_in_training_sentence'] = ev.slot_token_accuracy(
        [encode_fact(tok, p, 'name_first', 0) for p in test])
    out['probe_name_after_question'] = ev.slot_token_accuracy(
        [encode_fact(tok, p, 'description_first', 0) for p in test])
    out['probe_name_after_question_background'] = ev.slot_token_accuracy(
        [encode_fact(tok, p, 'description_first', 0) for p in background])
  cands = [encode_fact(tok, p, 'description_first', 0) for p in background + test]
  cand_ids = [c.tokens[c.answer[0]:c.answer[1]] for c in cands]
  rank = ev.rank_names([encode_fact(tok, p, 'description_first', 0) for p in test], cand_ids)
  out['rank_reverse'] = rank['top1']
  out['rank_reverse_mrr'] = rank['mrr']
  return out


# ------------------------------------------------------------------------------------------ run

KINDS = ('ar', 'llada', 'llada_control')


def load_model(workdir: str, kind: str):
  """(Transformer, params) of a model the experiment trained (WORKDIR/{ar,llada,llada_control},
  each a run directory: `pathways_jax.sample` and frozen-model loading take it too)."""
  from pathways_jax import sample
  _, model, params, _ = sample.load_run(os.path.join(workdir, kind))
  return model, params


def load_tokenizer(workdir: str):
  import glob
  from pathways_jax.data import tokenizers
  path = sorted(glob.glob(os.path.join(workdir, 'reversal-sp*.model')))[-1]
  return tokenizers.SentencePieceTokenizer.from_file(path)


def _finished_models(partial_path: str, config_json: dict) -> dict:
  """The evaluations of the models an earlier run of the same config finished ({} if none).

  A model's evaluation is written to results.partial.json as soon as it is done; a model stopped
  mid-training resumes from its run directory's newest checkpoint instead. `reversal.control`
  is left out of the comparison, so the control can be added to a run that finished without it.
  """
  if not os.path.exists(partial_path):
    return {}
  try:
    with open(partial_path) as f:
      partial = json.load(f)
  except (OSError, ValueError):
    _LOG.warning('ignoring unreadable %s: evaluating every model again', partial_path)
    return {}

  def comparable(c):  # the control flag does not change the other models: it may be switched on
    c = copy.deepcopy(c)
    c.get('reversal', {}).pop('control', None)
    return c

  if comparable(partial.pop('config', None) or {}) != comparable(config_json):
    return {}
  return partial


def run(cfg, workdir: str, quiet: bool = False) -> dict:
  import jax
  from pathways_jax import config as config_lib
  from pathways_jax.models.transformer import Transformer

  r = cfg.reversal
  if not 0.0 < r.target_forward <= 1.0:
    raise config_lib.ConfigError(f'config.reversal.target_forward={r.target_forward} must be in '
                                 '(0, 1]; to train past it set config.reversal.stop_at_target=False')
  for key in ('ar_max_steps', 'llada_max_steps', 'check_every'):
    if r[key] < 1:
      raise config_lib.ConfigError(f'config.reversal.{key}={r[key]} must be at least 1')
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  background, test = make_groups(cfg)
  tok = make_tokenizer(background, test, cfg.data.vocab_size, workdir)
  tokenizer_path = _tokenizer_texts_and_path(background, test, cfg.data.vocab_size, workdir)[1]
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizers.resolve_special_ids(cfg, tok)  # config.data.mask_id: the tokenizer's
  main_rows = training_rows(tok, background, test, r, control=False)
  from pathways_jax.data import synthetic
  all_len = max(len(encode_fact(tok, p, d, t).tokens) for p in background + test
                for d in synthetic.DIRECTIONS for t in range(synthetic.NUM_TEMPLATES[d]))
  seq_len = cfg.data.seq_len or -(-all_len // 8) * 8
  if seq_len < all_len:
    raise config_lib.ConfigError(f'config.data.seq_len={seq_len} is shorter than the longest '
                                 f'sentence ({all_len} tokens)')
  max_answer = max(encode_fact(tok, p, d, 0).answer[1] - encode_fact(tok, p, d, 0).answer[0]
                   for p in test for d in synthetic.DIRECTIONS)
  gen_length = -(-(max_answer + 2) // 4) * 4  # answer, '.', eos, rounded up
  prompt_width = max(encode_fact(tok, p, d, t).prompt_len for p in background + test
                     for d in synthetic.DIRECTIONS for t in range(synthetic.NUM_TEMPLATES[d]))
  vocab = config_lib.round_vocab(tok.vocab_size)
  max_len = max(cfg.model.max_len, seq_len + gen_length)
  eval_test = test[:r.eval_limit] if r.eval_limit > 0 else test
  eval_batch = min(256, EVAL_TEMPLATES * len(eval_test))
  check_rows = [encode_fact(tok, p, 'name_first', 0) for p in eval_test]
  partial_path = os.path.join(workdir, 'results.partial.json')
  config_json = json.loads(json.dumps(cfg.to_dict(), default=str))
  results = _finished_models(partial_path, config_json)
  resumed = [k for k in KINDS if f'{k}_steps' in results]
  if resumed and not quiet:
    print(f'resuming {workdir}: {", ".join(resumed)} already trained and evaluated with this config '
          '(results.partial.json); training the rest', flush=True)
  if not quiet:
    print(f'reversal: {len(background)} background + {len(test)} test people, '
          f'{len(main_rows)} training sentences, seq_len {seq_len}, vocab {vocab}, '
          f'{jax.device_count()} {jax.devices()[0].platform} device(s)', flush=True)

  def save_partial():
    with open(partial_path, 'w') as f:  # survives a stopped run, which resumes from it
      json.dump({**results, 'config': config_json}, f, indent=2, default=str)

  main_arrays = to_arrays(main_rows, seq_len, tok.eos_id)
  control_rows = training_rows(tok, background, test, r, control=True)
  plans = [('ar', 'main', main_arrays, r.ar_max_steps, 0),
           ('llada', 'main', main_arrays, r.llada_max_steps, 0)]
  if r.control:  # the main LLaDA run's steps, on its schedule (its cap)
    plans.append(('llada_control', 'control', to_arrays(control_rows, seq_len, tok.eos_id),
                  r.llada_max_steps, None))
  models = {}
  for kind, rows_name, arrays, steps, stop_at in plans:
    run_dir = os.path.join(workdir, kind)
    model_kind = 'ar' if kind == 'ar' else 'llada'
    if stop_at is None:
      stop_at = results['llada_steps']
    run_cfg = model_run_config(
        cfg, model_kind, rows_path=write_rows(workdir, rows_name, arrays, model_kind),
        tokenizer_path=tokenizer_path, seq_len=seq_len, max_len=max_len, vocab=vocab,
        num_rows=len(arrays[0]), steps=steps, stop_at=stop_at)
    tokenizers.resolve_special_ids(run_cfg, tok)
    run_cfg.name = f'{cfg.name}/{kind}'
    mcfg = config_lib.ModelConfig.from_config(run_cfg.model, vocab_size=vocab)
    if f'{kind}_steps' in results:  # finished before an earlier run of this config stopped
      models[kind] = load_model(workdir, kind)
      continue
    model = Transformer(mcfg)
    check = lambda params, model=model, k=model_kind: Evaluator(
        tok, model, params, k, seq_len, gen_length, prompt_width=prompt_width,
        batch=eval_batch).exact_match(check_rows)
    try:
      steps_done, hist, secs = train_model(
          run_cfg, run_dir, check, check_every=r.check_every, target=r.target_forward,
          stop_at_target=r.stop_at_target and kind != 'llada_control', quiet=quiet)
    except Preempted as e:
      print(f'{e}; rerun the same command to resume', flush=True)
      return {**results, 'status': 'preempted'}
    model, params = load_model(workdir, kind)
    models[kind] = (model, params)
    ev = Evaluator(tok, model, params, model_kind, seq_len, gen_length,
                   prompt_width=prompt_width, batch=eval_batch)
    res = evaluate_model(ev, tok, eval_test, background, r)
    if kind == 'llada_control':
      results.update({f'llada_{k}_control': v for k, v in res.items()})
    else:
      results.update({f'{kind}_{k}': v for k, v in res.items()})
      fpt = metrics_lib.flops_per_token(mcfg, seq_len)
      # The first check at the forward target: the 'steps to know the facts' of each model, also
      # when it trains on past it (stop_at_target=False).
      results[f'{kind}_steps_to_target'] = next((s for s, a in hist if a >= r.target_forward),
                                                None)
      results[f'{kind}_train_flops'] = fpt * steps_done * run_cfg.data.batch_size * seq_len
      results[f'{kind}_forward_checks'] = hist
    results[f'{kind}_steps'] = steps_done
    results[f'{kind}_train_seconds'] = round(secs, 1)  # this invocation's (a resumed model: less)
    save_partial()
    if not quiet:
      print(f'[{kind}] ' + ', '.join(f'{k} {v:.3f}' for k, v in res.items()), flush=True)
  results['llada_rank_method'] = ('masked score: name slot fully masked, sum log p of its tokens '
                                  '(one forward pass per prompt and name length)')
  results['ar_rank_method'] = "sum log p(name + '.' | prompt)"
  n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(models['ar'][1])))
  results['run_dirs'] = {k: os.path.join(workdir, k) for k in models}
  results.update({
      'num_test': len(eval_test), 'num_background': len(background),
      'num_candidates': len(background) + len(test), 'train_sentences': len(main_rows),
      'seq_len': seq_len, 'gen_length': gen_length, 'prompt_width': prompt_width, 'params': n_params,
      'batch_size': min(cfg.data.batch_size, len(main_rows)),
      'facts_file': cfg.data.facts_file or None,
      'changed_from_defaults': changed_from_defaults(cfg),
      'wall_seconds': round(time.time() - t_start, 1),  # this invocation only
      'resumed_models': resumed,  # finished by an earlier, stopped invocation
      'device': f'{jax.devices()[0].platform} x{jax.device_count()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)',
      'date': time.strftime('%Y-%m-%d'),
      'config': cfg.to_dict(),
      'versions': {'jax': jax.__version__, 'python': platform.python_version()},
  })
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  if not quiet:
    print(format_table(results), flush=True)
  return results


def changed_from_defaults(cfg) -> dict:
  """The config keys a run sets away from this file's defaults (its setting, for comparing runs:
  the seed, the facts file and the control switch are reported on their own)."""
  same_everywhere = {'seed', 'name', 'data.facts_file', 'reversal.control'}
  now, default = _flat(json.loads(cfg.to_json_best_effort())), _flat(
      json.loads(get_config().to_json_best_effort()))
  resolved = lambda k: k.startswith('data.') and k.endswith('_id') and default.get(k) == -1
  return {k: now[k] for k in sorted(now)
          if k not in same_everywhere and not resolved(k) and now[k] != default.get(k)}


def format_table(res: dict) -> str:
  g = lambda k: f'{res[k]:.2f}' if isinstance(res.get(k), (int, float)) else '-'
  lines = ['| model | forward | forward (held-out tmpl) | reverse | reverse (held-out tmpl) | '
           'infill name | rank reverse (top-1) | steps (to forward target) | train FLOPs |',
           '|---|---|---|---|---|---|---|---|---|']
  for kind, label, suf in (('ar', 'AR', ''), ('llada', 'LLaDA', ''),
                           ('llada', 'LLaDA control', '_control')):
    if f'{kind}_forward{suf}' not in res:
      continue
    steps = res.get(f'{kind}_steps' if not suf else 'llada_control_steps', '-')
    if not suf:
      steps = f"{steps} ({res.get(f'{kind}_steps_to_target') or 'never'})"
    flops = res.get(f'{kind}_train_flops') if not suf else res.get('llada_train_flops')
    lines.append(f'| {label} | {g(f"{kind}_forward{suf}")} | {g(f"{kind}_forward_heldout{suf}")} | '
                 f'{g(f"{kind}_reverse{suf}")} | {g(f"{kind}_reverse_heldout{suf}")} | '
                 f'{g(f"{kind}_infill_reverse{suf}")} | {g(f"{kind}_rank_reverse{suf}")} | '
                 f'{steps} | {flops:.2e} |')
  return '\n'.join(lines)


def markdown_table(data: dict, setting: str = 'default') -> str:
  """One setting of a figure data file (experiments/figure_data.py: extract_reversal): per model
  and metric, mean ± sample sd over its seeds, then each seed's value."""
  st = data['settings'][setting]
  labels = {'ar': 'AR', 'llada': 'LLaDA', 'llada_control': 'LLaDA control'}
  metrics = ('forward', 'forward_heldout', 'reverse', 'reverse_heldout', 'infill_reverse',
             'rank_reverse')
  lines = ['| model | ' + ' | '.join(m.replace('_', ' ') for m in metrics) + ' |',
           '|---' * (len(metrics) + 1) + '|']
  for model, summary in st['summary'].items():
    cells = []
    for m in metrics:
      s = summary[m]
      if s['mean'] is None:
        cells.append('-')
        continue
      per_seed = ' / '.join(f'{per[model][m]:.2f}' for per in st['seeds'].values()
                            if model in per)
      spread = f' ± {s["sd"]:.2f}' if s['sd'] is not None else ''
      cells.append(f'**{s["mean"]:.2f}**{spread} ({per_seed})' if s['n'] > 1
                   else f'{s["mean"]:.2f}')
    lines.append(f'| {labels.get(model, model)} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
