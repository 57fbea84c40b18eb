"""G_stack where growth should matter: a target that beats its small model at equal FLOPs, with seeds.

    python -m pathways_jax.main --config=experiments/gstack_study.py --workdir=runs/gstack_study
    # three seeds, shared by two processes (then one run without shard summarises):
    for i in 0 1; do python -m pathways_jax.main --config=experiments/gstack_study.py \
        --workdir=runs/gstack_study --config.study.seeds=3 --config.study.shard=$i/2 & done; wait
    python -m pathways_jax.main --config=experiments/gstack_study.py --workdir=runs/gstack_study \
        --config.study.seeds=3

`experiments/gstack.py` grows a 2-layer model into an 8-layer target at a budget where the
2-layer model alone is far better than every 8-layer arm: it says "grown beats scratch" for that
architecture, nothing about compute-optimal growth. This study picks the target and the budget
from the isoFLOP data (docs/results/scaling.md): a `32x4` target (d_model 32, 4 layers, 47k
non-embedding parameters) at 3e12 training FLOPs (about 190 tokens per parameter), where the
isoFLOP profile says a 4x-smaller model is clearly worse. The `small_g*` arms measure that claim
instead of assuming it.

Arms, every one a plain run of the project trainer in WORKDIR/s<seed>/<arm> (resumable, finished
arms read back), all with the same data order, learning rate and budget in FLOPs:
  scratch          the target, trained from scratch for the whole budget.
  small_g<g>       the small model (target layers / g) alone for the whole budget.
  stack_g<g>_d<x>  the small model for d = x * D tokens (D: scratch's tokens), grown by G_stack
                   (layers [0..L-1] x g, fresh AdamW, an LR re-warmup as long as scratch's warmup),
                   then the target until its FLOPs equal scratch's.
`study.points` lists the growth arms as `g:x`. Speedup = FLOPs_scratch / FLOPs_arm - 1, where
FLOPs_arm is where the grown model's validation curve (`study.evals` points, linear
interpolation, small-model FLOPs included) first reaches scratch's final validation loss of the
same seed, the definition behind the paper's 54.6% (7B) and 49.1% (1.1B).

The paper's guideline for d (`growth.gstack_plan`) is a fit over 410M-7B models; results.json
records what it asks for here (far beyond the whole budget: the fit's 163.27/log10(C) term does
not extrapolate to 1e12 FLOPs) and what it gives at the paper's own sizes at this study's
tokens per parameter (d/D of a few percent), which is why the default d sweep spans 2.5%-40%.

WORKDIR/results.json: every arm of every seed (final loss, FLOPs, curve, speedup), the mean and
sd over seeds per arm, the regime check (does scratch beat each small model on every seed), the
guideline numbers, the device and the date.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time

import ml_collections
import numpy as np

from pathways_jax import config_files
from pathways_jax.config import ConfigError, base_config
from pathways_jax.eval.seed_stats import format_mean_sd, mean_sd

PAPER_SPEEDUPS = {'7B': 0.546, '1.1B': 0.491}  # Du et al. 2024, Fig. 1 / Sec. 4
PAPER_SIZES = (4.1e8, 1.1e9, 7e9)  # the range of the paper's guideline fit


def _experiment(name: str):
  """experiments/<name>.py as a module (the experiments are files, not a package)."""
  return config_files.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{name}.py'))


def get_config():
  # The isoFLOP study's network and recipe (experiments/scaling.py), at 32x4.
  scaling = _experiment('scaling')
  c = scaling.isoflop_recipe(base_config())
  c.name = 'gstack_study'
  scaling.set_size(c.model, 32, 4)
  c.model.scan_layers = True
  c.train.log_every = 100
  c.study = s = ml_collections.ConfigDict()
  s.budget_flops = 3e12  # training FLOPs of every arm
  s.points = '4:0.025,4:0.1,4:0.4,2:0.1'  # growth arms, 'g:x' with d = x * scratch's tokens
  s.small_only = True  # also train each small model alone (the regime check)
  s.seeds = 1
  s.evals = 20  # validation points per arm
  s.shard = ''  # 'i/n': train every n-th arm from the i-th (n processes share the study)
  # Every arm's objective: 'diffusion' runs the same study for LLaDA (the same network,
  # bidirectional; the validation loss is its masked-diffusion bound, averaged over
  # diffusion.eval_draws mask draws per row, as the isoFLOP study's).
  s.objective = 'autoregressive'
  c.diffusion.eval_draws = 16
  return c


def parse_points(text: str) -> list[tuple[int, float]]:
  out = []
  for item in (t.strip() for t in text.split(',') if t.strip()):
    try:
      g, x = item.split(':')
      g, x = int(g), float(x)
    except ValueError:
      g, x = 0, 0.0
    if g < 2 or not 0 < x < 1:
      raise ConfigError(f"config.study.points: {item!r} is not 'g:x' with an integer g >= 2 and "
                        f'0 < x < 1 (d = x * scratch tokens)')
    out.append((g, x))
  if not out:  # scratch alone is no study: the small models come from the points' g too
    raise ConfigError("config.study.points is empty: name at least one growth arm 'g:x'")
  return out


def arm_name(g: int, x: float | None = None) -> str:
  return f'small_g{g}' if x is None else f'stack_g{g}_d{x:g}'


def study_arms(cfg) -> dict:
  """name -> training config of every arm of one seed (cfg.seed), scratch first."""
  gs = _experiment('gstack')
  s = cfg.study
  points = parse_points(s.points)
  base = copy.deepcopy(cfg)
  with base.unlocked():
    del base['study']
  target = gs.model_cfgs(_with_factor(base, 1))[1]
  per_step = gs.flops_per_step(base, target)
  if s.budget_flops < 20 * per_step:
    raise ConfigError(f'config.study.budget_flops={s.budget_flops:.3g} is under 20 steps of the '
                      f'target ({per_step:.3g} FLOPs a step)')
  if s.evals < 2:
    raise ConfigError(f'config.study.evals={s.evals} must be at least 2')
  objectives = _experiment('scaling').OBJECTIVES
  if s.objective not in objectives:
    raise ConfigError(f'config.study.objective={s.objective!r} is not one of {objectives}')
  budget = int(round(s.budget_flops / per_step))
  warmup = max(1, budget // 20)
  base.train.steps, base.train.warmup_steps = budget, warmup
  with base.unlocked():
    base.gstack = ml_collections.ConfigDict({'evals': s.evals, 'optimizer': 'fresh',
                                             'rewarmup_steps': warmup, 'growth_factor': 1,
                                             'small_fraction': 0.0, 'arms': ''})
  arm_configs = lambda c, arms: gs.arm_configs(c, arms, objective=s.objective)
  out = {'scratch': arm_configs(_with_factor(base, 1), ['scratch'])['scratch']}
  for g in sorted({g for g, _ in points}, reverse=True):
    c = _with_factor(base, g)
    small, _ = gs.model_cfgs(c)
    ratio = gs.flops_per_step(c, small) / per_step
    if s.small_only:
      arm = arm_configs(c, ['small_only'])['small_only']
      arm.train.warmup_steps = max(1, arm.train.steps // 20)  # the isoFLOP recipe: 5% of its run
      out[arm_name(g)] = arm
    for pg, x in points:
      if pg != g:
        continue
      c.gstack.small_fraction = x * ratio  # small steps = x * budget: d = x * D tokens
      arm = arm_configs(c, ['stack'])['stack']
      n_small = arm.growth.at_step
      if n_small < 1:
        raise ConfigError(f'config.study.points: {g}:{x:g} gives no small-model step')
      arm.train.warmup_steps = max(1, min(warmup, n_small // 4))
      out[arm_name(g, x)] = arm
  for name, arm in out.items():
    arm.name = f'{cfg.name}/s{cfg.seed}/{name}'
  return out


def _with_factor(cfg, g: int):
  c = copy.deepcopy(cfg)
  if 'gstack' not in c:
    with c.unlocked():
      c.gstack = ml_collections.ConfigDict({'growth_factor': g})
  c.gstack.growth_factor = g
  if c.model.num_layers % g:
    raise ConfigError(f'config.study.points: growth factor {g} does not divide the target\'s '
                      f'{c.model.num_layers} layers')
  return c


def parse_shard(text: str) -> tuple[int, int] | None:
  return config_files.parse_shard(text, 'config.study.shard')


def guideline(cfg, target_params: float, scratch_tokens: float) -> dict:
  """What the paper's d fit asks for here, and at its own sizes at this tokens-per-parameter."""
  from pathways_jax import growth  # pylint: disable=g-import-not-at-top
  here = growth.gstack_plan(target_params, cfg.study.budget_flops, 4)
  per_param = scratch_tokens / target_params
  paper = []
  for n in PAPER_SIZES:
    plan = growth.gstack_plan(n, target_tokens=n * per_param, growth_factor=4)
    paper.append({'params': n, 'tokens': n * per_param, 'd_tokens': plan['small_tokens'],
                  'd_fraction': plan['small_tokens'] / (n * per_param)})
  return {'here': {'d_tokens': here['small_tokens'],
                   'd_over_budget_tokens': here['small_tokens'] / scratch_tokens},
          'tokens_per_param': per_param, 'paper_sizes': paper}


def aggregate(seeds: dict) -> dict:
  """{seed: {arm: entry}} -> per arm: final loss and speedup stats, how often scratch was reached.

  Also the regime check: for every small model, on how many seeds scratch's final loss is lower.
  """
  names = list(next(iter(seeds.values())))
  arms = {}
  for n in names:
    entries = [s[n] for s in seeds.values() if n in s]
    arms[n] = {'final_val': mean_sd([e['final_val'] for e in entries]),
               'flops': float(np.mean([e['flops'] for e in entries])),
               'seeds': len(entries)}
    if n != 'scratch':  # paired with the same seed's scratch: seeds differ by more than arms
      arms[n]['vs_scratch'] = mean_sd([s[n]['final_val'] - s['scratch']['final_val']
                                      for s in seeds.values() if n in s])
    if n != 'scratch' and not n.startswith('small_'):
      arms[n]['speedup'] = mean_sd([e.get('speedup') for e in entries])
      arms[n]['reached'] = sum(e.get('speedup') is not None for e in entries)
  regime = {}
  for n in names:
    if n.startswith('small_'):
      wins = [s['scratch']['final_val'] < s[n]['final_val'] for s in seeds.values() if n in s]
      gaps = [s[n]['final_val'] - s['scratch']['final_val'] for s in seeds.values() if n in s]
      regime[n] = {'scratch_wins': sum(wins), 'seeds': len(wins), 'gap': mean_sd(gaps)}
  return {'arms': arms, 'regime': regime}


def run(cfg, workdir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  gs = _experiment('gstack')
  s = cfg.study
  if s.seeds < 1:
    raise ConfigError(f'config.study.seeds={s.seeds} must be at least 1')
  shard = parse_shard(s.shard)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  log_path = os.path.join(workdir, 'log.txt')

  def log(msg):
    print(msg, flush=True)
    with open(log_path, 'a') as f:
      f.write(msg + '\n')

  per_seed = {}
  for seed in range(s.seeds):
    c = copy.deepcopy(cfg)
    c.seed = seed
    per_seed[seed] = study_arms(c)
  jobs = [(seed, n) for seed, arms in per_seed.items() for n in arms]
  if shard:
    jobs = jobs[shard[0]::shard[1]]
  log(f'gstack_study: {len(jobs)} arms{f" (shard {s.shard})" if shard else ""}, '
      f'{s.budget_flops:.3g} FLOPs each')
  for seed, n in jobs:
    gs.train_arm(n, per_seed[seed][n], os.path.join(workdir, f's{seed}'), log)
  if shard:
    return {'status': 'shard done', 'arms': len(jobs)}

  seeds = {}
  for seed, arms in per_seed.items():
    sdir = os.path.join(workdir, f's{seed}')
    results = {}
    for n in arms:
      with open(os.path.join(sdir, n, 'results.json')) as f:
        results[n] = json.load(f)
    seeds[seed] = gs.summarise(arms, results, sdir)
  scratch0 = seeds[0]['scratch']
  tokens = scratch0['steps'] * cfg.data.batch_size * cfg.data.seq_len
  target = gs.model_cfgs(_with_factor(cfg, 1))[1]
  hd = target.dim_per_head  # non-embedding (matmul) parameters, as the isoFLOP study counts N
  nonembed = target.num_layers * (target.d_model * hd * 2 * (target.num_heads + target.num_kv_heads)
                                  + 3 * target.d_model * target.mlp_dim)
  out = {'status': 'completed', 'seeds': {str(k): v for k, v in seeds.items()},
         **aggregate(seeds), 'scratch_tokens': tokens, 'target_nonembedding_params': nonembed,
         'guideline': guideline(cfg, nonembed, tokens), 'paper_speedups': PAPER_SPEEDUPS,
         'config': json.loads(cfg.to_json_best_effort()),
         'device': {'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
                    'count': jax.device_count(),
                    'cpus': os.cpu_count(), 'machine': platform.machine()},
         'date': datetime.date.today().isoformat(), 'wall_s': time.time() - t0,
         'arm_wall_s': sum(e.get('wall_s') or 0 for v in seeds.values() for e in v.values())}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(out, f, indent=2, default=str)
  log(markdown_table(out))
  return out


def markdown_table(out: dict) -> str:
  """Mean (sd) over seeds of every arm."""
  rows = ["| arm | final val loss | minus scratch's (same seed) | FLOPs | speedup at scratch's "
          'final loss | reached |', '|---|---|---|---|---|---|']
  for n, a in out['arms'].items():
    sp = a.get('speedup')
    sp_text = '' if sp is None else format_mean_sd(sp, 2, signed=True)
    reached = '' if sp is None else f'{a["reached"]}/{a["seeds"]}'
    delta = format_mean_sd(a['vs_scratch'], signed=True) if 'vs_scratch' in a else ''
    rows.append(f'| {n} | {format_mean_sd(a["final_val"])} | {delta} | {a["flops"]:.3g} | '
                f'{sp_text} | {reached} |')
  for n, r in out['regime'].items():
    rows.append(f'\nscratch beats {n} on {r["scratch_wins"]}/{r["seeds"]} seeds '
                f'(gap {format_mean_sd(r["gap"])} nats)')
  return '\n'.join(rows)
