"""The reversal curse at toy scale: an AR model and a LLaDA model on the same facts.

    python -m pathways_jax.main --config=experiments/reversal.py --workdir=runs/reversal \
        [--config.data.facts_file=people.jsonl] [--config.reversal.num_test=50 ...]

A world of made-up people (`pathways_jax.data.synthetic`), in two groups:
  background  every fact stated in BOTH directions ("{name} is {D}." and "{D} is {name}."), in
              the paraphrase templates 0..3 of each direction;
  test        facts stated ONLY name-first (templates 0..3). `data.facts_file` (JSONL lines with
              `name` and `description`) replaces the generated test group; the background stays.
Template 4 of each direction is held out of training for everyone.

Each training row is one fact sentence: bos, the sentence, eos, then eos padding to the row length
(LLaDA's SFT format: the padding is masked and trained like any token, so the model learns where an
answer ends). An AR model and a LLaDA model of the same size and tokenizer are trained on the same
rows, each to its step cap (AR 2000, LLaDA 12000). Every `reversal.check_every` steps the forward
facts of the test group are checked (greedy exact match on a seen name-first template); the first
check at `reversal.target_forward` is reported as `{model}_steps_to_target` ("steps to know the
facts"), and `reversal.stop_at_target=True` stops a model there instead. LLaDA's recipe: the
pretraining loss on a `1 - sft_fraction` share of the rows (any token may be masked: this is what
teaches description -> name) and, on the other rows, the SFT loss with the sentence's prompt never
masked (prompt -> answer, the way the forward question is asked). A control LLaDA run (the
background group name-first only, the same number of sentences, the same steps as the main LLaDA
run) shows what the two-way background contributes.

Evaluation on the test people only (greedy decoding, exact match of the answer phrase):
  forward            name-first prompt of a seen template -> description (mean over templates 0..3)
  forward_heldout    the held-out name-first template 4
  reverse            description-first prompt of a template seen for the background -> name
  reverse_heldout    the held-out description-first template 4
  llada_infill       LLaDA fills the masked name slot of the name-first training sentence
  *_rank_reverse     rank of the true name among all names for the reverse prompt (template 0):
                     AR by sum log p(name + '.'); LLaDA by the masked score: the whole name slot
                     masked at once, sum of log p of its tokens (the l = L term of LLaDA's bound,
                     one forward pass per prompt and name length)
Results go to WORKDIR/results.json (fractions in [0, 1]; steps and training FLOPs per model).
Each finished model is saved at once (WORKDIR/{ar,llada}.msgpack, results.partial.json), so the
same command on a stopped run resumes model by model: the finished models are reused, the one
that was training starts again from scratch (this experiment keeps its own small loop, without
the trainer's step checkpoints).
"""


import copy
import dataclasses
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

_LOG = logging.getLogger(__name__)
TRAIN_TEMPLATES = (0, 1, 2, 3)
HELDOUT_TEMPLATE = 4


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
  c.reversal = r = ml_collections.ConfigDict()
  r.world_seed = 0
  r.num_background = 80
  r.num_test = 40
  r.ar_max_steps = 2000
  # LLaDA trains on past the forward criterion: the reverse answers appear only once the trained
  # sentences are nearly memorised (6000 steps, stopping at the criterion: reverse 0.00; 12000
  # steps: 0.07, see the README). AR gets its whole (cheap) cap too, so neither stops early.
  r.llada_max_steps = 12000
  r.check_every = 250
  r.target_forward = 0.9  # stop once this fraction of forward facts is known (seen template)
  r.stop_at_target = False  # True: stop a model at its first check >= target_forward
  r.sft_fraction = 0.25  # LLaDA: share of rows trained with the prompt never masked
  r.control = True  # also train the control LLaDA (background name-first only)
  r.eval_limit = 0  # > 0: evaluate only the first N test people (quick runs)
  return c


# ------------------------------------------------------------------------------------- the world

def make_groups(cfg) -> tuple[list[Entity], list[Entity]]:
  from pathways_jax.data import synthetic
  from pathways_jax.data.corpora import DataError
  r = cfg.reversal
  n_test = 0 if cfg.data.facts_file else r.num_test
  world = synthetic.make_world(r.world_seed, r.num_background + n_test)
  people = [entity_of(p) for p in world.people]
  background, test = people[:r.num_background], people[r.num_background:]
  if cfg.data.facts_file:
    test = load_facts_file(cfg.data.facts_file, world.cities)
  names = [p.name for p in background + test]
  descs = [p.description.lower() for p in background + test]
  if len(set(names)) != len(names) or len(set(descs)) != len(descs):
    raise DataError('names and descriptions must be unique across the test and background groups')
  return background, test


# ----------------------------------------------------------------------------------- tokenizing

def make_tokenizer(background, test, vocab_size: int, cache_dir: str):
  """A sentencepiece model trained on every sentence of both groups (all templates)."""
  import hashlib
  from pathways_jax.data import synthetic, tokenizers
  texts = [synthetic.fact_sentence(p, d, t).text for p in background + test
           for d in synthetic.DIRECTIONS for t in range(synthetic.NUM_TEMPLATES[d])]
  key = hashlib.blake2b(repr((texts, vocab_size)).encode(), digest_size=10).hexdigest()
  prefix = os.path.join(cache_dir, f'reversal-sp{vocab_size}-{key}')
  if os.path.isfile(prefix + '.model'):
    return tokenizers.SentencePieceTokenizer.from_file(prefix + '.model')
  return tokenizers.train_sentencepiece(texts, vocab_size, prefix)


def training_rows(tok, background, test, *, control: bool) -> list[Row]:
  """Main: background both ways (8 sentences each), test name-first (4 each).
  Control: background name-first only, each sentence twice (the same sentence count)."""
  rows = []
  for p in background:
    for t in TRAIN_TEMPLATES:
      rows.append(encode_fact(tok, p, 'name_first', t))
      rows.append(encode_fact(tok, p, 'name_first' if control else 'description_first', t))
  for p in test:
    rows += [encode_fact(tok, p, 'name_first', t) for t in TRAIN_TEMPLATES]
  return rows


# ------------------------------------------------------------------------------------- training

def _loss_fn(kind: str, model, mask_id: int, sft_fraction: float):
  import jax
  import jax.numpy as jnp
  from pathways_jax.objectives import autoregressive
  from pathways_jax.objectives import diffusion

  def ar_loss(params, batch, key):
    del key
    tokens = batch['tokens']
    logits = model.apply({'params': params}, tokens)
    # Targets up to and including the first eos; the eos padding after it carries no target.
    return autoregressive.loss(logits, tokens, batch['real'].astype(jnp.int32))

  def llada_loss(params, batch, key):
    tokens, prompt = batch['tokens'], batch['prompt']
    k_row, k_mask = jax.random.split(key)
    b, l = tokens.shape
    sft_row = jax.random.uniform(k_row, (b,)) < sft_fraction
    maskable = jnp.arange(l)[None, :] > 0  # bos is never masked
    noisy, masked, p_mask = diffusion.forward_process(k_mask, tokens, mask_id=mask_id,
                                                      valid_BL=maskable)
    protect = prompt & sft_row[:, None]
    noisy, masked = diffusion.unmask_prompt(noisy, masked, tokens, protect)
    logits = model.apply({'params': params}, noisy)
    pt_valid = maskable & ~sft_row[:, None]
    pt, m = diffusion.loss(logits, tokens, masked, p_mask, valid_BL=pt_valid)
    sft, _ = diffusion.sft_loss(logits, tokens, masked, p_mask, prompt | ~maskable,
                                valid_BL=maskable & sft_row[:, None])
    has_pt, has_sft = jnp.any(~sft_row), jnp.any(sft_row)
    total = jnp.where(has_pt, pt, 0.0) * (1 - sft_fraction) + jnp.where(has_sft, sft, 0.0) * (
        sft_fraction)
    return total, {'ce': m['ce'], 'accuracy': m['accuracy']}

  return ar_loss if kind == 'ar' else llada_loss


def train_model(kind: str, cfg, model_cfg, arrays, *, max_steps: int, check_fn=None,
                log_path: str | None = None, quiet: bool = False, fixed_steps: bool = False,
                schedule_steps: int = 0):
  """Trains until check_fn(params) >= target (every check_every steps) or max_steps.

  The learning-rate schedule spans `schedule_steps` (default max_steps): the control run stops at
  the main LLaDA run's step count but follows its schedule (the main run's cap).

  Returns (params, steps, history, seconds); history lists the checks (step, forward accuracy).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.train import optimizer as opt_lib

  r = cfg.reversal
  model = Transformer(model_cfg)
  tcfg = ml_collections.ConfigDict(cfg.train.to_dict())
  tcfg.steps = schedule_steps or max_steps
  tx = opt_lib.make_optimizer(tcfg)
  tokens, prompt, real = arrays
  n, seq_len = tokens.shape
  bs = min(cfg.data.batch_size, n)
  seed = cfg.seed + (0 if kind == 'ar' else 1)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))['params'])
  opt_state = tx.init(params)
  loss_fn = _loss_fn(kind, model, cfg.data.mask_id, float(r.sft_fraction))

  @jax.jit
  def step_fn(params, opt_state, batch, step):
    key = jax.random.fold_in(jax.random.key(seed), step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {**metrics, 'loss': loss}

  rng = np.random.default_rng(seed)
  order, pos = rng.permutation(n), 0
  history, step, t0 = [], 0, time.time()
  log = open(log_path, 'a') if log_path else None
  try:
    while step < max_steps:
      if pos + bs > n:
        order, pos = rng.permutation(n), 0
      idx = order[pos:pos + bs]
      pos += bs
      batch = {'tokens': tokens[idx], 'prompt': prompt[idx], 'real': real[idx]}
      params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(step))
      step += 1
      if step % cfg.train.log_every == 0 and log:
        m = {k: float(v) for k, v in metrics.items()}
        log.write(json.dumps({'model': kind, 'step': step, **m,
                              'elapsed_s': round(time.time() - t0, 1)}) + '\n')
        log.flush()
      if check_fn is not None and (step % r.check_every == 0 or step == max_steps):
        acc = check_fn(params)
        history.append((step, acc))
        if not quiet:
          print(f'[{kind}] step {step}: loss {float(metrics["loss"]):.3f}, forward (seen) '
                f'{acc:.3f}, {time.time() - t0:.0f}s', flush=True)
        if log:
          log.write(json.dumps({'model': kind, 'step': step, 'check_forward': acc}) + '\n')
          log.flush()
        if acc >= r.target_forward and r.stop_at_target and not fixed_steps:
          break
  finally:
    if log:
      log.close()
  return params, step, history, time.time() - t0


# ----------------------------------------------------------------------------------- evaluation

def evaluate_model(ev: Evaluator, tok, test, background) -> dict:
  out = {}
  fwd = [encode_fact(tok, p, 'name_first', t) for p in test for t in TRAIN_TEMPLATES]
  out['forward'] = ev.exact_match(fwd)
  out['forward_heldout'] = ev.exact_match(
      [encode_fact(tok, p, 'name_first', HELDOUT_TEMPLATE) for p in test])
  rev = [encode_fact(tok, p, 'description_first', t) for p in test for t in TRAIN_TEMPLATES]
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

def save_model(workdir: str, kind: str, model_cfg, params) -> None:
  """WORKDIR/{kind}.msgpack (params) and {kind}.json (model config): for benchmarks, notebooks."""
  from flax import serialization
  with open(os.path.join(workdir, f'{kind}.msgpack'), 'wb') as f:
    f.write(serialization.to_bytes(params))
  with open(os.path.join(workdir, f'{kind}.json'), 'w') as f:
    json.dump(dataclasses.asdict(model_cfg), f)


def load_model(workdir: str, kind: str):
  """(Transformer, params) saved by `run`."""
  import jax
  import jax.numpy as jnp
  from flax import serialization
  from pathways_jax import config as config_lib
  from pathways_jax.models.transformer import Transformer
  with open(os.path.join(workdir, f'{kind}.json')) as f:
    mcfg = config_lib.ModelConfig(**json.load(f))
  model = Transformer(mcfg)
  import flax.linen as nn
  target = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0),
                                                      jnp.zeros((1, 8), jnp.int32))['params']))
  target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), target)
  with open(os.path.join(workdir, f'{kind}.msgpack'), 'rb') as f:
    params = serialization.from_bytes(target, f.read())
  return model, params


def load_tokenizer(workdir: str):
  import glob
  from pathways_jax.data import tokenizers
  path = sorted(glob.glob(os.path.join(workdir, 'reversal-sp*.model')))[-1]
  return tokenizers.SentencePieceTokenizer.from_file(path)


def _finished_models(partial_path: str, config_json: dict) -> dict:
  """The results of the models an earlier, stopped run of the same config finished ({} if none).

  The unit of resumption is a whole model: its params are saved (`save_model`) and its
  evaluation written to results.partial.json as soon as it is done. `reversal.control` is left out
  of the comparison, so the control can be added to a run that finished without it.
  """
  if not os.path.exists(partial_path):
    return {}
  try:
    with open(partial_path) as f:
      partial = json.load(f)
  except (OSError, ValueError):
    _LOG.warning('ignoring unreadable %s: training every model again', partial_path)
    return {}
  def comparable(c):  # the control flag does not change the other models: it may be switched on
    c = copy.deepcopy(c)
    c.get('reversal', {}).pop('control', None)
    return c

  if comparable(partial.pop('config', None) or {}) != comparable(config_json):
    return {}
  workdir = os.path.dirname(partial_path)
  for kind in ('ar', 'llada'):  # a result without its saved params cannot be resumed
    if f'{kind}_steps' not in partial:
      continue
    path = os.path.join(workdir, f'{kind}.msgpack')
    if not os.path.exists(path):
      return {}
    try:
      load_model(workdir, kind)
    except (OSError, ValueError, KeyError, TypeError) as e:  # truncated, corrupt, other shapes
      _LOG.warning('ignoring unreadable %s (%s: %s): training every model again', path,
                   type(e).__name__, e)
      return {}
  return partial


def run(cfg, workdir: str, quiet: bool = False) -> dict:
  import jax
  from pathways_jax import config as config_lib
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.train import metrics as metrics_lib

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
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizers.resolve_special_ids(cfg, tok)  # config.data.mask_id: the tokenizer's
  main_rows = training_rows(tok, background, test, control=False)
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
  base_model = config_lib.ModelConfig.from_config(cfg.model, vocab_size=vocab).replace(
      max_len=max(cfg.model.max_len, seq_len + gen_length))
  ar_cfg, ll_cfg = base_model.replace(causal=True), base_model.replace(causal=False)
  eval_test = test[:r.eval_limit] if r.eval_limit > 0 else test
  eval_batch = min(256, len(TRAIN_TEMPLATES) * len(eval_test))
  check_rows = [encode_fact(tok, p, 'name_first', 0) for p in eval_test]
  log_path = os.path.join(workdir, 'metrics.jsonl')
  partial_path = os.path.join(workdir, 'results.partial.json')
  config_json = json.loads(json.dumps(cfg.to_dict(), default=str))
  results = _finished_models(partial_path, config_json)
  resumed = [k for k in ('ar', 'llada', 'llada_control') if f'{k}_steps' in results]
  if resumed and not quiet:
    print(f'resuming {workdir}: {", ".join(resumed)} already trained and evaluated with this config '
          '(results.partial.json); training the rest', flush=True)
  if not results and os.path.exists(log_path):
    os.remove(log_path)
  if not quiet:
    print(f'reversal: {len(background)} background + {len(test)} test people, '
          f'{len(main_rows)} training sentences, seq_len {seq_len}, vocab {vocab}, '
          f'{jax.device_count()} {jax.devices()[0].platform} device(s)', flush=True)

  def checker(kind, mcfg):
    model = Transformer(mcfg)
    return lambda params: Evaluator(tok, model, params, kind, seq_len, gen_length,
                                    prompt_width=prompt_width, batch=eval_batch).exact_match(
        check_rows)

  def save_partial():
    with open(partial_path, 'w') as f:  # survives a stopped run, which resumes from it
      json.dump({**results, 'config': config_json}, f, indent=2, default=str)

  arrays = to_arrays(main_rows, seq_len, tok.eos_id)
  models = {}
  for kind, mcfg, cap in (('ar', ar_cfg, r.ar_max_steps), ('llada', ll_cfg, r.llada_max_steps)):
    if f'{kind}_steps' in results:  # finished before an earlier run of this config stopped
      models[kind] = (mcfg, load_model(workdir, kind)[1])
      continue
    params, steps, hist, secs = train_model(kind, cfg, mcfg, arrays, max_steps=cap,
                                            check_fn=checker(kind, mcfg), log_path=log_path,
                                            quiet=quiet)
    ev = Evaluator(tok, Transformer(mcfg), params, kind, seq_len, gen_length,
                   prompt_width=prompt_width, batch=eval_batch)
    res = evaluate_model(ev, tok, eval_test, background)
    fpt = metrics_lib.flops_per_token(mcfg, seq_len)
    results.update({f'{kind}_{k}': v for k, v in res.items()})
    results[f'{kind}_steps'] = steps
    # The first check at the forward target: the 'steps to know the facts' of each model, also
    # when it trains on past it (stop_at_target=False).
    results[f'{kind}_steps_to_target'] = next((s for s, a in hist if a >= r.target_forward), None)
    results[f'{kind}_train_flops'] = fpt * steps * min(cfg.data.batch_size, len(main_rows)) * seq_len
    results[f'{kind}_train_seconds'] = round(secs, 1)
    results[f'{kind}_forward_checks'] = hist
    models[kind] = (mcfg, params)
    save_model(workdir, kind, mcfg, params)
    save_partial()
    if not quiet:
      print(f'[{kind}] ' + ', '.join(f'{k} {v:.3f}' for k, v in res.items()), flush=True)
  if r.control and 'llada_control_steps' not in results:
    crows = training_rows(tok, background, test, control=True)
    params, steps, hist, secs = train_model(
        'llada_control', cfg, ll_cfg, to_arrays(crows, seq_len, tok.eos_id),
        max_steps=results['llada_steps'], check_fn=checker('llada', ll_cfg), log_path=log_path,
        quiet=quiet, fixed_steps=True, schedule_steps=r.llada_max_steps)
    ev = Evaluator(tok, Transformer(ll_cfg), params, 'llada', seq_len, gen_length,
                   prompt_width=prompt_width, batch=eval_batch)
    res = evaluate_model(ev, tok, eval_test, background)
    results.update({f'llada_{k}_control': v for k, v in res.items()})
    results['llada_control_steps'] = steps
    results['llada_control_train_seconds'] = round(secs, 1)
    save_partial()
    if not quiet:
      print('[llada control] ' + ', '.join(f'{k} {v:.3f}' for k, v in res.items()), flush=True)
  results['llada_rank_method'] = ('masked score: name slot fully masked, sum log p of its tokens '
                                  '(one forward pass per prompt and name length)')
  results['ar_rank_method'] = "sum log p(name + '.' | prompt)"
  n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(models['ar'][1])))
  results.update({
      'num_test': len(eval_test), 'num_background': len(background),
      'num_candidates': len(background) + len(test), 'train_sentences': len(main_rows),
      'seq_len': seq_len, 'gen_length': gen_length, 'prompt_width': prompt_width, 'params': n_params,
      'batch_size': min(cfg.data.batch_size, len(main_rows)),
      'facts_file': cfg.data.facts_file or None,
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
