"""Does masked diffusion scale like AR? A small isoFLOP study on the Python corpus.

    python -m pathways_jax.main --config=experiments/scaling.py --workdir=runs/scaling \
        [--config.scaling.sizes=16x1,16x2,32x2,48x2,64x3] [--config.scaling.budgets=3e11,1e12,3e12] \
        [--config.scaling.seeds=3] [--config.scaling.force=True] [--config.scaling.shard=0/2]

The grid: model sizes (`d_model x layers`) x training-FLOP budgets x {AR, LLaDA} x seeds. Every
point is a plain training run (WORKDIR/<objective>/<size>/<budget>/s<seed>, resumable; finished
points are skipped) of the same network (LLaDA: the same Transformer, not causal) on the same byte
rows of the Python standard library, the same batch and learning rate, for as many steps as spend
its budget (`train.metrics.flops_per_token` x tokens: 6N + attention, so LLaDA's step costs what
AR's does, bar the causal half of attention). Each run has its own warmup + cosine schedule, as
isoFLOP profiles need (Hoffmann et al. 2022).

Measured: the final validation loss in nats per byte on the same held-out rows: AR's NLL, LLaDA's
masked-diffusion bound (`objectives.diffusion.loss`, the mean of `diffusion.eval_draws` fixed
mask draws per row: an upper bound on its NLL). A finished point measured with other draws is
measured again from its checkpoint, not retrained.

Analysis (`analyse`, pure numpy on the points):
  isoFLOP minimum  per budget and objective, a parabola in log N through the sizes' losses (mean
                   over seeds): N*(C) and L*(C); the grid's best point when the parabola opens
                   downwards or its vertex lies outside the sizes (`fit` says which).
  power law        L*(C) = a C^-b, fitted in log-log per objective.
  multiplier       at each AR budget C: the FLOPs at which LLaDA's law reaches AR's L*(C), over C
                   (SMDM reported ~16x). Whether it shrinks from the smallest to the largest budget
                   is the question; `extrapolated` marks FLOPs beyond the LLaDA grid.
Cost: every point's FLOPs at `scaling.flops_per_second` plus `scaling.overhead_s` per run (start,
compile, evaluation), both measured on the 2-core CPU; a grid estimated above
`scaling.budget_minutes` is refused with the estimate unless `scaling.force=True`.

WORKDIR/results.json: every point (size, params, budget, steps, tokens, FLOPs, final val loss,
wall time), the isoFLOP minima, the fitted laws, the multipliers, the device and the date.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time

import ml_collections
import numpy as np

from pathways_jax import config_files
from pathways_jax.config import ConfigError, base_config
from pathways_jax.eval.seed_stats import format_mean_sd, mean_sd

OBJECTIVES = ('autoregressive', 'diffusion')


def isoflop_recipe(c):
  """The study's data and training recipe, set on config `c` (experiments/gstack_study.py trains
  its arms on it too): byte-level Python source, rows of 128, batch 32, AdamW at 3e-3 without
  weight decay on a cosine schedule."""
  c.data.corpus = 'stdlib'
  c.data.tokenizer = 'byte'
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.data.eval_batches = 8
  c.model.max_len = 128
  c.train.lr = 3e-3
  c.train.schedule = 'cosine'
  c.train.weight_decay = 0.0
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 1
  c.train.progress_bar = False
  c.sample.prompts = ()
  return c


def set_size(model_cfg, d: int, layers: int) -> None:
  """A `d x layers` network: head dim 16, SwiGLU width 8/3 d rounded to a multiple of 16."""
  model_cfg.d_model, model_cfg.num_layers = d, layers
  model_cfg.num_heads = model_cfg.num_kv_heads = d // 16
  model_cfg.mlp_dim = max(16, int(round(8 * d / 3 / 16)) * 16)


def get_config():
  c = isoflop_recipe(base_config())
  c.name = 'scaling'
  c.train.log_every = 50
  # LLaDA's validation bound averaged over 16 mask draws per row: with one draw its estimate on
  # 256 rows varied by ~0.1-0.2 nats across evaluation seeds, more than sizes differ by.
  c.diffusion.eval_draws = 16
  c.scaling = s = ml_collections.ConfigDict()
  s.sizes = '16x1,16x2,32x2,48x2,64x3'  # d_model x layers; head_dim 16, SwiGLU width 8/3 d
  s.budgets = '3e11,1e12,3e12'  # training FLOPs per run
  s.objectives = ','.join(OBJECTIVES)
  s.seeds = 1  # seeds 0..seeds-1 of every point (the fits use the mean over seeds)
  # 'i/n': this process trains every n-th point from the i-th, so n processes share one grid;
  # a run without it then trains what is left and analyses every point.
  s.shard = ''
  s.budget_minutes = 40.0  # the stated budget: a grid estimated above it is refused ...
  s.force = False  # ... unless this is True
  # The downstream check: held-out arithmetic problems ('a op b = c', eval.arithmetic) answered
  # by every point's model with its own sampler. Their training problems make up `task_fraction`
  # of the training documents' bytes; '' trains on the Python corpus alone.
  s.task = 'arithmetic'
  s.task_fraction = 0.1
  s.task_test = 200  # held-out problems, never in any document
  s.task_shots = 4  # training problems written before each question
  # The estimate's rates for one process on the 2-core CPU (docs/results/scaling.md: fitted over
  # the study's 90 runs, 1.3e10 FLOP/s each with two processes sharing the cores, 16 s a run)
  s.flops_per_second = 2.5e10  # training throughput on these sizes
  s.overhead_s = 16.0  # per run: start, compile, final evaluation, the downstream check
  return c


# --------------------------------------------------------------------------------------- grid

def parse_sizes(text: str) -> list[tuple[int, int]]:
  out = []
  for part in [p.strip() for p in text.split(',') if p.strip()]:
    try:
      d, layers = (int(x) for x in part.lower().split('x'))
    except ValueError:
      raise ConfigError(f"config.scaling.sizes: {part!r} is not 'd_model x layers' "
                        "(e.g. '64x3')") from None
    if d < 16 or d % 16 or layers < 1:
      raise ConfigError(f'config.scaling.sizes: {part!r} needs d_model a multiple of 16 (head '
                        'dim 16) and at least one layer')
    out.append((d, layers))
  if len(out) < 3:
    raise ConfigError(f'config.scaling.sizes={text!r}: an isoFLOP parabola needs at least 3 sizes')
  return out


def parse_budgets(text: str) -> list[float]:
  try:
    out = sorted(float(b) for b in text.split(',') if b.strip())
  except ValueError:
    raise ConfigError(f'config.scaling.budgets={text!r} is not a comma-separated list of FLOPs'
                      ) from None
  if len(out) < 2 or out[0] <= 0:
    raise ConfigError(f'config.scaling.budgets={text!r}: a power law needs at least 2 positive '
                      'budgets')
  return out


def parse_objectives(text: str) -> list[str]:
  out = [o.strip() for o in text.split(',') if o.strip()]
  bad = [o for o in out if o not in OBJECTIVES]
  if bad or not out:
    raise ConfigError(f'config.scaling.objectives={text!r}: each must be one of {OBJECTIVES}')
  return out


def point_config(cfg, objective: str, size: tuple[int, int], budget: float, seed: int,
                 corpus_path: str = ''):
  """The training config of one grid point: its steps spend `budget` FLOPs; `corpus_path` (from
  `build_corpus`) replaces the stdlib corpus."""
  from pathways_jax.train import loop, metrics
  d, layers = size
  c = copy.deepcopy(cfg)
  with c.unlocked():
    del c['scaling']
  if corpus_path:
    c.data.corpus, c.data.path, c.data.text_field = 'path', corpus_path, 'text'
  c.name = f'{cfg.name}/{objective}/{d}x{layers}/{budget:.3g}/s{seed}'
  c.seed = seed
  c.objective = objective
  c.model.causal = objective == 'autoregressive'
  set_size(c.model, d, layers)
  mcfg = loop.build(copy.deepcopy(c))[1]
  per_step = metrics.flops_per_token(mcfg, c.data.seq_len) * c.data.batch_size * c.data.seq_len
  if budget < per_step:
    raise ConfigError(f'config.scaling.budgets: {budget:.3g} FLOPs is less than one training step '
                      f'of the {d}x{layers} model ({per_step:.3g} FLOPs at batch '
                      f'{c.data.batch_size} x {c.data.seq_len})')
  steps = int(round(budget / per_step))
  c.train.steps = steps
  c.train.warmup_steps = max(1, steps // 20)
  c.train.eval_every = steps  # one evaluation, at the end
  c.train.checkpoint_every = max(c.train.checkpoint_every, steps // 4)
  return c, mcfg, per_step


def task_problems(cfg):
  """(test, train) arithmetic problems of the downstream check (disjoint), or None without one."""
  from pathways_jax.eval import arithmetic
  s = cfg.scaling
  if not s.task:
    return None
  return arithmetic.split_problems(cfg.seed, int(s.task_test))


def build_corpus(cfg, workdir: str) -> str:
  """The study's corpus as one JSONL file (data.corpus='path'): the standard library's files
  and, with a task, blocks of its training problems (as `data.synthetic` writes arithmetic) to
  `task_fraction` of the training bytes. Only blocks whose hash puts them in the train split are
  kept, so the validation loss is on Python alone. Named by its content hash: a changed corpus is
  a new file, and the points' config digests change with it."""
  from pathways_jax.data import corpora, splits, synthetic
  from pathways_jax.eval import arithmetic
  docs = [d for split in splits.SPLITS
          for d in corpora.load_documents(ml_collections.ConfigDict({'corpus': 'stdlib'}), split)]
  s = cfg.scaling
  if s.task:
    if s.task != 'arithmetic':
      raise ConfigError(f"config.scaling.task={s.task!r}: 'arithmetic' or '' (none)")
    if not 0 < s.task_fraction < 1:
      raise ConfigError(f'config.scaling.task_fraction={s.task_fraction} must be in (0, 1)')
    python_bytes = sum(len(d.encode()) for d in docs if splits.split_of(d) == 'train')
    want = s.task_fraction / (1 - s.task_fraction) * python_bytes
    _, train = task_problems(cfg)
    lines = iter(arithmetic.training_lines(train, int(want // 8) + 1000, cfg.seed))
    per = synthetic.ARITHMETIC_PER_DOCUMENT
    got = 0
    while got < want:
      block = '\n'.join(next(lines) for _ in range(per))
      if splits.split_of(block) == 'train':
        docs.append(block)
        got += len(block.encode())
  text = ''.join(json.dumps({'text': d}) + '\n' for d in docs)
  digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
  path = os.path.join(workdir, f'corpus-{digest}.jsonl')
  if not os.path.exists(path):
    tmp = f'{path}.{os.getpid()}.tmp'  # two processes of one study may build it at once
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  return path


def grid(cfg):
  """[(objective, size, budget, seed)] of the whole study, cheapest first."""
  s = cfg.scaling
  if s.seeds < 1:
    raise ConfigError(f'config.scaling.seeds={s.seeds} must be at least 1')
  for key in ('flops_per_second', 'budget_minutes'):
    if not s[key] > 0:
      raise ConfigError(f'config.scaling.{key}={s[key]} must be positive')
  if s.overhead_s < 0:
    raise ConfigError(f'config.scaling.overhead_s={s.overhead_s} must be >= 0')
  if s.task:
    from pathways_jax.eval import arithmetic
    if s.task_test < 1 or s.task_shots < 0:
      raise ConfigError(f'config.scaling.task_test={s.task_test} must be >= 1 and '
                        f'config.scaling.task_shots={s.task_shots} >= 0')
    longest = arithmetic.longest_prompt(int(s.task_shots)) + arithmetic.ANSWER_WIDTH
    if longest > cfg.model.max_len:
      raise ConfigError(f'config.scaling.task_shots={s.task_shots}: a question with its shots '
                        f'and answer takes up to {longest} bytes, over model.max_len='
                        f'{cfg.model.max_len}')
  pts = [(o, z, b, seed) for b in parse_budgets(s.budgets) for o in parse_objectives(s.objectives)
         for z in parse_sizes(s.sizes) for seed in range(s.seeds)]
  return pts


def parse_shard(text: str) -> tuple[int, int] | None:
  return config_files.parse_shard(text, 'config.scaling.shard')


def estimate_seconds(cfg, points) -> float:
  s = cfg.scaling
  return sum(b / s.flops_per_second + s.overhead_s for _, _, b, _ in points)


def check_cost(cfg, points) -> float:
  """The estimated seconds of the grid; a ConfigError naming them when over the stated budget."""
  est = estimate_seconds(cfg, points)
  if est > 60 * cfg.scaling.budget_minutes and not cfg.scaling.force:
    raise ConfigError(
        f'the scaling grid ({len(points)} runs, {sum(p[2] for p in points):.3g} training FLOPs) is '
        f'estimated at {est / 60:.0f} min at {cfg.scaling.flops_per_second:.3g} FLOP/s + '
        f'{cfg.scaling.overhead_s:g} s a run, over config.scaling.budget_minutes='
        f'{cfg.scaling.budget_minutes:g}; shrink the grid, or set config.scaling.force=True')
  return est


# ----------------------------------------------------------------------------------- analysis

def isoflop_minimum(params: list[float], losses: list[float]) -> dict:
  """The loss-optimal size of one budget: a parabola in log N through (N, loss)."""
  x, y = np.log(np.asarray(params, float)), np.asarray(losses, float)
  best = int(np.argmin(y))
  grid_best = {'params': float(params[best]), 'loss': float(y[best]), 'fit': 'grid'}
  if len(x) < 3:
    return grid_best
  a, b, c = np.polyfit(x, y, 2)
  if a <= 0:
    return grid_best
  xv = -b / (2 * a)
  if not x.min() <= xv <= x.max():
    return grid_best
  return {'params': float(np.exp(xv)), 'loss': float(c - b * b / (4 * a)), 'fit': 'parabola'}


def power_law(flops: list[float], losses: list[float]) -> dict:
  """L = a C^-b, least squares in log-log."""
  slope, intercept = np.polyfit(np.log(flops), np.log(losses), 1)
  return {'a': float(np.exp(intercept)), 'b': float(-slope)}


def flops_for_loss(law: dict, loss: float) -> float:
  return (loss / law['a']) ** (-1.0 / law['b'])


def fit_rates(points: list[dict]) -> dict | None:
  """This machine's measured rates for the cost estimate: wall_s = overhead_s + FLOPs / rate,
  least squares over the finished points (None with fewer than two distinct budgets)."""
  pts = [p for p in points if p.get('wall_s')]
  if len({p['flops'] for p in pts}) < 2:
    return None
  slope, intercept = np.polyfit([p['flops'] for p in pts], [p['wall_s'] for p in pts], 1)
  if slope <= 0:
    return None
  return {'flops_per_second': float(1 / slope), 'overhead_s': float(intercept)}


def analyse(points: list[dict]) -> dict:
  """isoFLOP minima, power laws and compute multipliers of finished points (see the docstring)."""
  out = {'minima': {}, 'laws': {}, 'multiplier': []}
  objectives = sorted({p['objective'] for p in points}, key=OBJECTIVES.index)
  for o in objectives:
    mins = []
    for b in sorted({p['budget'] for p in points if p['objective'] == o}):
      by_size = {}
      for p in points:
        if p['objective'] == o and p['budget'] == b:
          by_size.setdefault(p['params'], []).append(p['val_loss'])
      sizes = sorted(by_size)
      m = isoflop_minimum(sizes, [float(np.mean(by_size[n])) for n in sizes])
      mins.append({'budget': b, **m})
    out['minima'][o] = mins
    if len(mins) >= 2:
      out['laws'][o] = power_law([m['budget'] for m in mins], [m['loss'] for m in mins])
  task = [p for p in points if 'task' in p]
  if task:  # the downstream check: mean accuracy over seeds per objective, budget and size
    acc = {}
    for p in task:
      acc.setdefault((OBJECTIVES.index(p['objective']), p['budget'], p['params'], p['size']),
                     []).append(p['task']['accuracy'])
    out['task'] = [{'objective': OBJECTIVES[o], 'budget': b, 'size': z,
                    'accuracy': st['mean'], 'sd': st['sd'], 'seeds': st['n']}
                   for (o, b, _, z), v in sorted(acc.items()) for st in [mean_sd(v)]]
  if set(OBJECTIVES) <= set(out['laws']):
    llada_law = out['laws']['diffusion']
    llada_max = max(m['budget'] for m in out['minima']['diffusion'])
    for m in out['minima']['autoregressive']:
      need = flops_for_loss(llada_law, m['loss'])
      out['multiplier'].append({'ar_budget': m['budget'], 'ar_loss': m['loss'],
                                'llada_flops': need, 'multiplier': need / m['budget'],
                                'extrapolated': need > llada_max})
  return out


# ---------------------------------------------------------------------------------------- run

def point_dir(workdir, objective, size, budget, seed) -> str:
  return os.path.join(workdir, objective, f'{size[0]}x{size[1]}', f'{budget:.3g}', f's{seed}')


def run(cfg, workdir: str, quiet: bool = False) -> dict:
  import jax
  from pathways_jax.train import loop
  points = grid(cfg)
  shard = parse_shard(cfg.scaling.shard)
  if shard:
    points = points[shard[0]::shard[1]]
  est = check_cost(cfg, points)
  os.makedirs(workdir, exist_ok=True)
  log = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
  log(f'scaling: {len(points)} runs, estimated {est / 60:.0f} min on this machine')
  t_start, done = time.time(), []
  corpus_path = build_corpus(cfg, workdir)
  problems = task_problems(cfg)
  task_key = (cfg.scaling.task, cfg.scaling.task_test, cfg.scaling.task_shots) if problems else ''
  for objective, size, budget, seed in points:
    pcfg, mcfg, per_step = point_config(cfg, objective, size, budget, seed, corpus_path)
    path = point_dir(workdir, objective, size, budget, seed)
    point_path = os.path.join(path, 'point.json')  # written once the point's run completed
    digest = _digest(pcfg, task_key)
    draws = pcfg.diffusion.eval_draws if objective == 'diffusion' else None
    if os.path.exists(point_path):
      with open(point_path) as f:
        entry = json.load(f)
      if entry.get('config_digest') != digest:
        raise ConfigError(f'{path} was trained with another config than this grid point\'s; use '
                          'another workdir (or remove that directory) to train this one')
      if entry.get('eval_draws') != draws:  # measured with other draws: measure it again
        entry.update(val_loss=validation_loss(pcfg, path), eval_draws=draws)
        with open(point_path, 'w') as f:
          json.dump(entry, f)
        log(f'[{pcfg.name}] val {entry["val_loss"]:.4f} nats/byte (re-measured, {draws} draws)')
      done.append(entry)
      continue
    t0 = time.time()
    res = loop.train(pcfg, path, quiet=True)
    if res.get('status') == 'preempted':
      log(f'{pcfg.name} stopped at step {res["step"]} (SIGTERM, saved); rerun to resume')
      return {'status': 'preempted'}
    entry = {'objective': objective, 'size': f'{size[0]}x{size[1]}', 'seed': seed,
             'budget': budget, 'params': _matmul_params(mcfg),
             'steps': pcfg.train.steps, 'tokens': pcfg.train.steps * pcfg.data.batch_size *
             pcfg.data.seq_len, 'flops': pcfg.train.steps * per_step,
             'val_loss': float(res['val_loss']), 'eval_draws': draws,
             'wall_s': round(time.time() - t0, 1), 'config_digest': digest}
    if problems:
      entry['task'] = evaluate_task(path, objective, problems, cfg.scaling.task_shots)
    with open(point_path, 'w') as f:
      json.dump(entry, f)
    log(f'[{pcfg.name}] {entry["steps"]} steps, val {entry["val_loss"]:.4f} nats/byte, '
        + (f'{cfg.scaling.task} {entry["task"]["accuracy"]:.3f}, ' if problems else '')
        + f'{entry["wall_s"]:.0f} s')
    done.append(entry)
  if shard:
    log(f'scaling: shard {cfg.scaling.shard} done; run without scaling.shard to analyse the grid')
    return {'status': 'shard_done', 'points': done}
  results = {'status': 'completed', 'points': done, **analyse(done),
             'estimated_s': round(est, 1), 'measured_rates': fit_rates(done),
             'wall_s': round(time.time() - t_start, 1),
             'device': f'{jax.devices()[0].platform} x{jax.device_count()} '
                       f'({platform.processor() or platform.machine()}, {os.cpu_count()} cores)',
             'date': time.strftime('%Y-%m-%d'), 'config': cfg.to_dict()}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  log(format_table(results))
  return results


def _digest(pcfg, task_key) -> str:
  """A point's training identity: its config (bar the evaluation-only `diffusion.eval_draws`,
  which `run` re-measures instead of refusing) and the downstream task's settings."""
  c = copy.deepcopy(pcfg)
  with c.unlocked():
    del c.diffusion['eval_draws']
  return hashlib.blake2b((c.to_json_best_effort(sort_keys=True) + repr(task_key)).encode(),
                         digest_size=8).hexdigest()


def validation_loss(pcfg, run_dir: str) -> float:
  """The trainer's validation loss of a finished point, measured again from its checkpoint."""
  from pathways_jax.train import frozen, loop
  c = copy.deepcopy(pcfg)
  tok, _, _, mesh, rules = loop.build(c)
  return loop.frozen_validation_loss(c, frozen.load(run_dir, mesh, rules), tok, mesh, rules)


def evaluate_task(run_dir: str, objective: str, problems, shots: int) -> dict:
  """The downstream check of one trained point: held-out problems, exact match, own sampler."""
  from pathways_jax import sample
  from pathways_jax.eval import arithmetic
  test, train = problems
  _, model, params, tok = sample.load_run(run_dir)
  kind = 'ar' if objective == 'autoregressive' else 'llada'
  return arithmetic.accuracy(model, params, tok, kind, test, arithmetic.pick_shots(train, shots, 0))


def _matmul_params(mcfg) -> int:
  """Non-embedding parameters: what scaling laws count as N (Kaplan et al. 2020)."""
  d, f, L = mcfg.d_model, mcfg.mlp_dim, mcfg.num_layers
  hd = d // mcfg.num_heads
  attn = d * hd * (2 * mcfg.num_heads + 2 * mcfg.num_kv_heads)
  return int(L * (attn + 3 * d * f))


def markdown_tables(res: dict) -> str:
  """The results page's two tables: every point (mean and sd over seeds) and the minima."""
  groups = {}
  for p in res['points']:
    g = groups.setdefault((p['budget'], p['params'], p['size']), {})
    g.setdefault(p['objective'], []).append(p)

  def cell(pts, key):
    if not pts:
      return '-'
    st = mean_sd(p['val_loss'] if key == 'loss' else p['task']['accuracy'] for p in pts)
    return format_mean_sd(st) if key == 'loss' else f'{st["mean"]:.3f}'

  lines = ['| budget (FLOPs) | size (N) | AR loss | LLaDA bound | AR arithmetic | '
           'LLaDA arithmetic |', '|---|---|---|---|---|---|']
  for (b, n, z), g in sorted(groups.items()):
    ar, ll = g.get('autoregressive', []), g.get('diffusion', [])
    task = all('task' in p for p in ar + ll)
    lines.append(f'| {b:.0e} | {z} ({n / 1e3:.1f}k) | {cell(ar, "loss")} | {cell(ll, "loss")} | '
                 f'{cell(ar, "task") if task else "-"} | {cell(ll, "task") if task else "-"} |')
  lines += ['', '| budget | AR: N*, L* | LLaDA: N*, L* | multiplier |', '|---|---|---|---|']
  mins = {o: {m['budget']: m for m in ms} for o, ms in res['minima'].items()}
  mult = {m['ar_budget']: m for m in res['multiplier']}
  for b in sorted(mins.get('autoregressive', {})):
    row = [f'{b:.0e}']
    for o in OBJECTIVES:
      m = mins.get(o, {}).get(b)
      row.append(f'{m["params"] / 1e3:.1f}k, {m["loss"]:.3f}' + (' (grid)' if m['fit'] == 'grid'
                                                                  else '') if m else '-')
    m = mult.get(b)
    row.append(f'{m["multiplier"]:.1f}x' + (' (extrapolated)' if m['extrapolated'] else '')
               if m else '-')
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def format_table(res: dict) -> str:
  lines = ['| objective | budget (FLOPs) | loss-optimal N | its loss (nats/byte) | fit |',
           '|---|---|---|---|---|']
  for o, mins in res['minima'].items():
    for m in mins:
      lines.append(f'| {o} | {m["budget"]:.3g} | {m["params"]:.3g} | {m["loss"]:.4f} | '
                   f'{m["fit"]} |')
  for o, law in res['laws'].items():
    lines.append(f'\n{o}: L*(C) = {law["a"]:.3g} C^-{law["b"]:.4f}')
  if res.get('task'):
    lines.append('\n| objective | budget (FLOPs) | size | task accuracy (mean, sd over seeds) |')
    lines.append('|---|---|---|---|')
    for t in res['task']:
      acc = format_mean_sd({'mean': t['accuracy'], 'sd': t['sd']})
      lines.append(f'| {t["objective"]} | {t["budget"]:.3g} | {t["size"]} | {acc}, '
                   f'{t["seeds"]} seeds |')
  for m in res['multiplier']:
    lines.append(f'AR at {m["ar_budget"]:.3g} FLOPs (loss {m["ar_loss"]:.4f}): LLaDA needs '
                 f'{m["llada_flops"]:.3g} = {m["multiplier"]:.1f}x'
                 + (' (extrapolated)' if m['extrapolated'] else ''))
  return '\n'.join(lines)
