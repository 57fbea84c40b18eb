"""RHO-1 at toy scale: selective language modelling on a training stream with injected noise.

    python -m pathways_jax.main --config=experiments/rho1.py --workdir=runs/rho1

The Python standard library (byte tokens, rows of 128), with random-token spans (4-32 tokens)
written over about a third of the training targets (`data.noise`; the positions are known) and a
clean validation split. A reference trained on a small clean slice (`selective.reference`: the
same network, as many steps as an arm but on clean rows, i.e. a random ~9% slice of the clean
corpus) scores the tokens. Arms at equal training tokens (`train.steps` x batch):

  uniform    the plain loss on every target
  slm        RHO-1: the top `selective.ratio` (k = 0.6) of the whole batch by excess loss
  slm_seq    the same ranking within each row
  random     a uniformly random 60% of the targets (control)
  oracle     every target that is not noise (upper bound)
  reference  the reference model alone (evaluated, not trained further)

and the LLaDA variant (`rho1.llada`): a masked-diffusion model with a diffusion reference, uniform
vs selective masked diffusion (same mask and t for both models). Each arm is its own run directory
under WORKDIR (resumable; finished arms are skipped). WORKDIR/results.json holds the clean
validation loss per arm (`uniform_val`, `slm_val`, `slm_seq_val`, `random_val`, `oracle_val`,
`ref_val`), the tokens each arm needs to reach the uniform arm's final loss (linear interpolation
between evaluations) and `token_savings` = uniform tokens / SLM tokens at that loss.

The ablation over k uses the sweep runner with only the SLM arm and the shared reference:

    python -m pathways_jax.sweep --config=experiments/rho1.py --workdir=runs/rho1_k \
        --grid='selective.ratio=0.4,0.6,0.8,1.0' --config.rho1.arms=slm \
        --config.rho1.llada=False --config.selective.reference.workdir=runs/rho1/reference \
        --fields=slm_val

(no uniform arm there, so no `token_savings`: compare the curves with WORKDIR/uniform of the main
run). `experiments/rho1_diagnose.py` looks at the tokens a finished SLM arm keeps and drops.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time

import ml_collections

from pathways_jax.config import base_config

ARMS = ('uniform', 'slm', 'slm_seq', 'random', 'oracle')


def get_config():
  c = base_config()
  c.name = 'rho1'
  c.seed = 0
  c.objective = 'autoregressive'
  c.data.corpus = 'stdlib'
  c.data.tokenizer = 'byte'
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.data.eval_batches = 8
  c.data.noise.fraction = 0.33
  c.data.noise.span_min = 4
  c.data.noise.span_max = 32
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 512
  c.model.max_len = 128
  c.train.steps = 300
  c.train.lr = 3e-3
  c.train.warmup_steps = 30
  c.train.log_every = 10
  c.train.eval_every = 25
  c.train.checkpoint_every = 100
  c.sample.prompts = ()  # no samples: the arms are compared by validation loss
  c.selective.ratio = 0.6
  c.selective.mode = 'online'
  rf = c.selective.reference
  rf.workdir = ''  # '' = WORKDIR/reference (the LLaDA one: WORKDIR/llada/reference)
  # The reference sees 300 steps of shuffled clean rows: 1.2M tokens, a random ~9% slice of the
  # clean corpus, and alone reaches 1.276 on the clean validation set -- better than every arm's
  # 300 steps on the noisy stream, worse than a model trained on the whole clean corpus. Weaker
  # references were tried first (README): a slice of the first N files (max_documents = 12 or
  # 100, a narrow domain, ~3.0 alone) put SLM far behind uniform; a 100-step reference (2.035
  # alone) put SLM ahead early and behind at the end, because it is bad at many clean tokens and
  # SLM then drops them (experiments/rho1_diagnose.py: ~22% of clean targets dropped, carrying
  # most of SLM's deficit). RHO-1's reference is a model trained on clean data, not an untrained
  # one: weak means small data here, not few steps.
  rf.max_documents = 0
  rf.steps = 300
  c.rho1 = r = ml_collections.ConfigDict()
  r.arms = ','.join(ARMS)
  r.llada = True  # also the LLaDA variant (uniform vs SLM)
  r.llada_steps = 0  # 0: train.steps
  return c


def tiny(cfg, cache_dir: str = ''):
  """Seconds-scale settings (tests, PATHWAYS_NOTEBOOK_TINY=1): the synthetic corpus, a tiny model."""
  cfg = copy.deepcopy(cfg)
  cfg.data.corpus = 'synthetic'
  if cache_dir:
    cfg.data.cache_dir = cache_dir
  cfg.data.synthetic.num_people = 30
  cfg.data.synthetic.num_stories = 30
  cfg.data.synthetic.num_arithmetic = 200
  cfg.data.seq_len = 32
  cfg.data.batch_size = 8
  cfg.data.eval_batches = 2
  cfg.model.d_model = 32
  cfg.model.num_heads = 2
  cfg.model.num_kv_heads = 2
  cfg.model.mlp_dim = 64
  cfg.model.max_len = 32
  cfg.train.steps = 12
  cfg.train.warmup_steps = 2
  cfg.train.log_every = 3
  cfg.train.eval_every = 4
  cfg.train.checkpoint_every = 1000
  cfg.train.async_checkpoints = False
  cfg.train.progress_bar = False
  cfg.train.peak_flops = 1e10
  cfg.selective.reference.max_documents = 20
  cfg.selective.reference.steps = 6
  return cfg


# ------------------------------------------------------------------------------------- the arms

def arm_config(cfg, arm: str, ref_dir: str):
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-{arm}'
  c.selective.reference.workdir = os.path.abspath(ref_dir)
  c.selective.enabled = arm != 'uniform'
  c.selective.per_sequence = arm == 'slm_seq'
  c.selective.score = {'random': 'random', 'oracle': 'oracle'}.get(arm, cfg.selective.score)
  return c


def _completed(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, 'results.json')
  if os.path.exists(path):
    with open(path) as f:
      res = json.load(f)
    if res.get('status') == 'completed':
      return res
  return None


def train_arm(cfg, run_dir: str) -> dict:
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  done = _completed(run_dir)
  if done is not None:
    return done
  t0 = time.perf_counter()
  res = loop.train(cfg, run_dir, quiet=True)
  if res.get('status') != 'completed':  # SIGTERM: the arm saved a checkpoint; stop here
    raise loop.TrainingError(f'{run_dir} stopped ({res.get("status")}); rerun the same command '
                             'to resume (finished arms are skipped)')
  res['wall_s'] = time.perf_counter() - t0
  with open(os.path.join(run_dir, 'results.json'), 'w') as f:
    json.dump(res, f, indent=2, default=str)
  return res


def curve(run_dir: str) -> list[tuple[int, float]]:
  """(tokens, clean validation loss) at every evaluation of a run."""
  with open(os.path.join(run_dir, 'config.json')) as f:
    c = json.load(f)
  per_step = c['data']['batch_size'] * c['data']['seq_len']
  out = {}
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'val_loss' in row:
        out[row['step'] * per_step] = row['val_loss']
  return sorted(out.items())


def tokens_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
  """Tokens at which the validation curve first reaches `target` (linear interpolation)."""
  prev = None
  for tok, loss in points:
    if loss <= target:
      if prev is None:
        return float(tok)
      t0, l0 = prev
      return float(t0 + (tok - t0) * (l0 - target) / (l0 - loss)) if l0 != loss else float(tok)
    prev = (tok, loss)
  return None


def train_metrics(run_dir: str, last: int = 10) -> dict:
  """Means of the selection metrics over the last `last` logged steps."""
  keys = ('selected_fraction', 'excess_kept', 'excess_dropped', 'noise_share_kept',
          'noise_recall_dropped')
  rows = []
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    rows = [r for r in map(json.loads, f) if 'selected_fraction' in r]
  rows = rows[-last:]
  return {k: sum(r[k] for r in rows) / len(rows) for k in keys if rows and k in rows[0]}


def reference_val(cfg, ref_dir: str) -> float:
  """The reference model alone, on the same clean validation batches as the arms."""
  from pathways_jax.tasks import rho1 as rho1_task  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  c = copy.deepcopy(cfg)
  c.selective.enabled = False
  tokenizer, _, _, mesh, rules = loop.build(c)
  ref = rho1_task.load_reference(c, ref_dir, tokenizer, mesh, rules)
  return loop.frozen_validation_loss(c, ref, tokenizer, mesh, rules)


def noise_share(cfg) -> float:
  """The share of the training targets that are noise (AR: the token predicted is noise)."""
  from pathways_jax.data import pipeline, tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.get_tokenizer(cfg.data)
  tokens, lengths = pipeline.load_tokens(cfg.data, tok, 'train')
  n = cfg.data.noise
  low, high, exclude = tokenizers.ordinary_id_range(tok)
  _, noise = pipeline.inject_noise(tokens, lengths, fraction=n.fraction, span_min=n.span_min,
                                   span_max=n.span_max, seed=n.seed, low=low, high=high,
                                   exclude=exclude)
  return float(noise.sum() / max(1, noise.size - len(lengths)))  # targets: all but each bos


def run_family(cfg, workdir: str, arms, *, log=print) -> dict:
  """Trains the reference (if needed) and `arms` in workdir; their validation numbers."""
  from pathways_jax.tasks import rho1 as rho1_task  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  ref_dir = os.path.abspath(rho1_task.reference_workdir(cfg, workdir))
  rho1_task.ensure_reference(arm_config(cfg, 'slm', ref_dir), workdir, train=loop.train)
  out = {'ref_val': reference_val(cfg, ref_dir), 'reference_dir': ref_dir,
         'reference_train_s': time.perf_counter() - t0, 'arms': {}}
  log(f'reference: val {out["ref_val"]:.4f}')
  for arm in arms:
    run_dir = os.path.join(workdir, arm)
    res = train_arm(arm_config(cfg, arm, ref_dir), run_dir)
    out['arms'][arm] = {'val': res['val_loss'], 'wall_s': res.get('wall_s'),
                        'curve': curve(run_dir), **train_metrics(run_dir)}
    log(f'{arm}: val {res["val_loss"]:.4f}')
  if 'uniform' in out['arms']:
    target = out['arms']['uniform']['val']
    for arm, a in out['arms'].items():
      a['tokens_to_uniform_final'] = tokens_to_reach(a['curve'], target)
    base = out['arms']['uniform']['tokens_to_uniform_final']
    for arm, a in out['arms'].items():
      t = a['tokens_to_uniform_final']
      a['token_savings'] = base / t if t else None
  return out


def run(cfg, workdir: str) -> dict:
  """All arms (and the LLaDA variant) in one run; writes WORKDIR/results.json."""
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  arms = [a.strip() for a in cfg.rho1.arms.split(',') if a.strip()]
  bad = [a for a in arms if a not in ARMS]
  if bad:
    from pathways_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'config.rho1.arms: unknown arm(s) {bad}; known: {ARMS}')
  ar = run_family(cfg, workdir, arms)
  results = {'status': 'completed', 'ref_val': ar['ref_val']}
  for arm, a in ar['arms'].items():
    results[f'{arm}_val'] = a['val']
  slm = ar['arms'].get('slm', {})
  results['token_savings'] = slm.get('token_savings')
  results['tokens_per_arm'] = cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len
  results['noise_share_of_targets'] = noise_share(cfg) if cfg.data.noise.fraction > 0 else 0.0
  results['autoregressive'] = ar
  if cfg.rho1.llada:
    lc = copy.deepcopy(cfg)
    lc.name = f'{cfg.name}-llada'
    lc.objective = 'diffusion'
    lc.model.causal = False
    if cfg.rho1.llada_steps:
      lc.train.steps = cfg.rho1.llada_steps
    if cfg.selective.reference.workdir:  # a given AR reference cannot score a diffusion model
      lc.selective.reference.workdir = ''
    ld = run_family(lc, os.path.join(workdir, 'llada'), ['uniform', 'slm'])
    results['llada'] = ld
    results['llada_uniform_val'] = ld['arms']['uniform']['val']
    results['llada_slm_val'] = ld['arms']['slm']['val']
    results['llada_ref_val'] = ld['ref_val']
    results['llada_token_savings'] = ld['arms']['slm']['token_savings']
  results['wall_s'] = time.perf_counter() - start
  results['date'] = datetime.date.today().isoformat()
  results['device'] = {'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
                       'count': jax.device_count(), 'cpus': os.cpu_count(),
                       'machine': platform.machine()}
  results['config'] = json.loads(cfg.to_json_best_effort())
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  keys = [k for k in ('uniform_val', 'slm_val', 'slm_seq_val', 'random_val', 'oracle_val',
                      'ref_val', 'token_savings', 'llada_uniform_val', 'llada_slm_val',
                      'llada_ref_val', 'llada_token_savings') if k in results]
  print('rho1: ' + ', '.join(f'{k}={results[k]:.4f}' if isinstance(results[k], float)
                             else f'{k}={results[k]}' for k in keys))
  return results
