"""G_stack (Du et al. 2024, "Stacking Your Transformers") at toy scale, all arms in one run.

    python -m pathways_jax.main --config=experiments/gstack.py --workdir=runs/gstack
    # ablations over the growth factor g and the timing d (with the sweep runner):
    python -m pathways_jax.sweep --config=experiments/gstack.py --workdir=runs/gstack_g \
        --grid='gstack.growth_factor=2,4,8' --config.gstack.arms=stack \
        --config.gstack.llada=False --config.gstack.reference=runs/gstack \
        --fields=speedup,stack_final_val,scratch_final_val,d_tokens
    # and the same with --workdir=runs/gstack_d --grid='gstack.small_fraction=0.05,0.1,0.2,0.4'

The target is `config.model` (8 layers by default). The FLOPs budget is `train.steps` steps of the
target (scratch). Arms, each a normal training run in WORKDIR/<arm> (resumable; finished arms are
skipped), all with the same data order, batch and global LR schedule shape:
  scratch      the target trained from scratch for train.steps steps.
  stack        a small model of num_layers/g layers trained for a share `gstack.small_fraction` of
               the budget (d tokens), grown in-run by G_stack (layers [0..L-1] x g; fresh AdamW
               with an LR re-warmup), then trained at the target size until the FLOPs equal
               scratch's.
  small_only   the small model alone for the whole budget (g-ish times as many steps).
  stack_d0     stacking an untrained small model (d = 0): expected to match scratch.
  interleave   as stack, with layers 0,0,..,1,1,.. (the paper's worse ablation).
  zero         as stack, with identity (zero-output) new blocks: function-preserving growth.
FLOPs are counted with `train.metrics.flops_per_token` per model, so a small-model step costs
~1/g of a target step. Validation loss against cumulative training FLOPs is recorded for every
arm; speedup = FLOPs_scratch / FLOPs_arm - 1 where FLOPs_arm is where the arm's validation
curve (linearly interpolated) first reaches scratch's final validation loss, counting only the
grown (target-size) model's part of a growth arm's curve (from the loss measured right after the
growth on): a small model trained long enough can reach scratch's loss on its own before the
growth (`small_reached_scratch_final` says when it did).
`gstack.llada=True` repeats scratch and stack with the LLaDA objective (bidirectional model,
masked-diffusion loss; val loss = the diffusion bound on held-out rows, fixed masks).

WORKDIR/results.json: scratch_final_val, stack_final_val, speedup, small_only_final_val, and
`arms` (one entry per arm: final val loss, FLOPs, steps, curve, speedup), `llada` (the same for
the LLaDA arms), the device and the wall time per arm.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import time

import ml_collections

from pathways_jax.config import base_config

ARMS = ('scratch', 'stack', 'small_only', 'stack_d0', 'interleave', 'zero')


def get_config():
  c = base_config()
  c.name = 'gstack'
  c.data.corpus = 'stdlib'
  c.data.tokenizer = 'byte'
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.data.eval_batches = 4
  # The target (scratch) model: 8 layers, tiny so that it sees ~10 tokens per parameter within
  # the CPU budget (scanned layers: compile time does not grow with depth).
  c.model.d_model = 32
  c.model.num_layers = 8
  c.model.num_heads = 2
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 96
  c.model.max_len = 128
  c.model.scan_layers = True
  c.train.steps = 300  # the FLOPs budget, in target steps
  c.train.lr = 5e-3
  c.train.warmup_steps = 20
  c.train.schedule = 'cosine'
  c.train.log_every = 25
  c.train.eval_every = 50
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 1
  c.train.progress_bar = False
  c.sample.prompts = ()  # no samples: the experiment is about loss curves
  c.gstack = g = ml_collections.ConfigDict()
  g.growth_factor = 4  # g: the small model has num_layers / g layers
  g.small_fraction = 0.1  # share of the FLOPs budget spent on the small model (sets d)
  g.arms = ','.join(ARMS)
  g.optimizer = 'fresh'  # after growth: 'fresh' AdamW (the paper's code) or 'map'
  g.rewarmup_steps = 20
  g.evals = 10  # validation points per arm
  g.llada = True  # also scratch vs stack with the LLaDA objective
  g.reference = ''  # a finished gstack WORKDIR whose scratch arm(s) to compare with (sweeps)
  return c


# ----------------------------------------------------------------------------------------------
# Arms.

def model_cfgs(cfg):
  """(small ModelConfig, target ModelConfig) for a config."""
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  _, target, _, _, _ = loop.build(cfg)
  g = cfg.gstack.growth_factor
  if target.num_layers % g:
    raise ValueError(f'gstack: model.num_layers={target.num_layers} is not divisible by '
                     f'gstack.growth_factor={g}')
  return target.replace(num_layers=target.num_layers // g), target


def flops_per_step(cfg, model_cfg) -> float:
  from pathways_jax.train import metrics  # pylint: disable=g-import-not-at-top
  return metrics.flops_per_token(model_cfg, cfg.data.seq_len) * cfg.data.batch_size * \
      cfg.data.seq_len


def arm_configs(cfg, arms=None, objective: str = 'autoregressive') -> dict:
  """name -> the training config of each arm (a plain run, some with config.growth set)."""
  small, target = model_cfgs(cfg)
  g, budget = cfg.gstack.growth_factor, cfg.train.steps
  ratio = flops_per_step(cfg, small) / flops_per_step(cfg, target)  # ~1/g
  n_small = int(round(cfg.gstack.small_fraction * budget / ratio))
  out = {}
  for arm in arms or [a.strip() for a in cfg.gstack.arms.split(',') if a.strip()]:
    if arm not in ARMS:
      raise ValueError(f'gstack: unknown arm {arm!r} (arms: {ARMS})')
    c = copy.deepcopy(cfg)
    c.objective = objective
    c.model.causal = objective == 'autoregressive'
    if arm == 'small_only':
      c.model.num_layers = small.num_layers
      c.train.steps = int(round(budget / ratio))
    elif arm != 'scratch':
      d = 0 if arm == 'stack_d0' else n_small
      c.model.num_layers = small.num_layers
      gr = c.growth
      gr.depth_factor = g
      gr.method = {'interleave': 'interleave', 'zero': 'zero'}.get(arm, 'stack')
      gr.at_step = d
      gr.optimizer = cfg.gstack.optimizer
      gr.rewarmup_steps = cfg.gstack.rewarmup_steps
      c.train.steps = d + budget - int(math.ceil(d * ratio))
    c.train.eval_every = max(1, c.train.steps // cfg.gstack.evals)
    c.train.checkpoint_every = max(c.train.checkpoint_every, c.train.eval_every)
    out[arm] = c
  return out


def val_curve(workdir: str, cfg, grown_only: bool = False) -> list[tuple[float, float]]:
  """[(cumulative training FLOPs, validation loss)] of a finished arm.

  grown_only: for an arm that grew, only the grown (target-size) model's part of the curve: the
  validation loss measured right after the growth, then the evaluations from the growth step on.
  (An arm without growth returns its whole curve.)
  """
  from pathways_jax.growth import in_run as growth_phase  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  _, model_cfg, _, _, _ = loop.build(cfg)
  flops = growth_phase.Growth(cfg, model_cfg).flops
  curve, grown_at = {}, None
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'val_loss' in row:
        curve[row['step']] = row['val_loss']
      if 'growth_val_loss_after' in row:
        grown_at = (row['step'], row['growth_val_loss_after'])
  if grown_only and grown_at is not None:
    step, after = grown_at
    curve = {s: v for s, v in curve.items() if s >= step}  # evals at the growth step follow it
    curve.setdefault(step, after)
  return [(flops(s), v) for s, v in sorted(curve.items())]


def flops_to_reach(curve, target: float) -> float | None:
  """FLOPs where the curve first reaches `target` (linear interpolation), None if never."""
  prev = None
  for f, v in curve:
    if v <= target:
      if prev is None or prev[1] == v:
        return f
      (f0, v0) = prev
      return f0 + (f - f0) * (v0 - target) / (v0 - v)
    prev = (f, v)
  return None


def train_arm(name, arm_cfg, workdir, log) -> dict:
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, name)
  res_path = os.path.join(path, 'results.json')
  if os.path.exists(res_path):
    with open(res_path) as f:
      res = json.load(f)
    if res.get('status') == 'completed':
      log(f'[{name}] done, skipped')
      return res
  t0 = time.time()
  gr = arm_cfg.growth
  desc = (f'{arm_cfg.model.num_layers}L x{gr.depth_factor} {gr.method} at step {gr.at_step}'
          if gr.depth_factor > 1 else f'{arm_cfg.model.num_layers}L')
  log(f'[{name}] {desc}, {arm_cfg.train.steps} steps ...')
  res = loop.train(arm_cfg, path, quiet=True)
  res['wall_s'] = time.time() - t0
  with open(res_path, 'w') as f:
    json.dump(res, f, indent=2, default=str)
  log(f'[{name}] val_loss {res["val_loss"]:.4f}, {res["total_flops"]:.3g} FLOPs, '
      f'{res["wall_s"]:.0f} s')
  return res


def summarise(arm_cfgs, results, workdir, reference=None, scratch_name='scratch') -> dict:
  curves = {n: val_curve(os.path.join(workdir, n), arm_cfgs[n]) for n in results}
  grown = {n: val_curve(os.path.join(workdir, n), arm_cfgs[n], grown_only=True) for n in results}
  entries = {n: {'final_val': r['val_loss'], 'flops': r['total_flops'], 'steps': r['step'],
                 'params': r['params'], 'wall_s': r.get('wall_s'), 'curve': curves[n],
                 'growth': r.get('growth')} for n, r in results.items()}
  scratch = entries.get(scratch_name) or reference
  if scratch is not None:
    target = scratch['final_val']
    for n, e in entries.items():
      # The speedup is the grown (target-size) model's: with a long enough d the small model
      # alone can reach scratch's loss before the growth, which says nothing about growth.
      reach = flops_to_reach(grown[n], target)
      e['flops_to_scratch_final'] = reach
      e['speedup'] = None if reach is None else scratch['flops'] / reach - 1
      if e['growth'] and grown[n]:
        e['small_reached_scratch_final'] = any(v <= target for f, v in curves[n]
                                               if f < grown[n][0][0])
  return entries


def run(cfg, workdir: str) -> dict:
  """All arms (and the LLaDA variant); writes WORKDIR/results.json."""
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  log_path = os.path.join(workdir, 'log.txt')

  def log(msg):
    print(msg, flush=True)
    with open(log_path, 'a') as f:
      f.write(msg + '\n')

  small, target = model_cfgs(cfg)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2))
  ratio = flops_per_step(cfg, small) / flops_per_step(cfg, target)
  log(f'gstack: target {target.num_layers}L d={target.d_model}, small {small.num_layers}L '
      f'(g={cfg.gstack.growth_factor}); small step = {ratio:.3f} target steps; budget '
      f'{cfg.train.steps} target steps '
      f'({cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len:,} tokens)')
  ref = None
  if cfg.gstack.reference:
    with open(os.path.join(cfg.gstack.reference, 'results.json')) as f:
      ref = json.load(f)

  arm_cfgs = arm_configs(cfg)
  results = {n: train_arm(n, c, workdir, log) for n, c in arm_cfgs.items()}
  arms = summarise(arm_cfgs, results, workdir, ref and ref['arms'].get('scratch'))
  out = {'status': 'completed', 'arms': arms}
  scratch = arms.get('scratch') or (ref and ref['arms'].get('scratch'))
  if scratch:
    out['scratch_final_val'] = scratch['final_val']
  if 'stack' in arms:
    out['stack_final_val'] = arms['stack']['final_val']
    out['speedup'] = arms['stack'].get('speedup')
    out['d_tokens'] = arms['stack']['growth']['at_step'] * cfg.data.batch_size * cfg.data.seq_len
  if 'small_only' in arms:
    out['small_only_final_val'] = arms['small_only']['final_val']
    if scratch:
      out['scratch_beats_small_only'] = scratch['final_val'] < arms['small_only']['final_val']

  if cfg.gstack.llada:
    llada_cfgs = {f'llada_{n}': c for n, c in
                  arm_configs(cfg, ['scratch', 'stack'], objective='diffusion').items()}
    llada_res = {n: train_arm(n, c, workdir, log) for n, c in llada_cfgs.items()}
    llada = summarise(llada_cfgs, llada_res, workdir, scratch_name='llada_scratch')
    llada['speedup'] = llada['llada_stack'].get('speedup')
    out['llada'] = llada

  out.update(config=json.loads(cfg.to_json_best_effort()),
             device={'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
                     'count': jax.device_count(), 'cpus': os.cpu_count(),
                     'machine': platform.machine()},
             date=datetime.date.today().isoformat(), wall_s=time.time() - t0,
             small_layers=small.num_layers, target_layers=target.num_layers,
             small_step_cost=ratio)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(out, f, indent=2, default=str)
  log(table(out))
  return out


def table(out: dict) -> str:
  """A markdown table of the arms (and the LLaDA arms)."""
  rows = ["| arm | final val loss | FLOPs | speedup at scratch's final loss |",
          '|---|---|---|---|']
  groups = [out.get('arms', {})] + ([{k: v for k, v in out['llada'].items() if k != 'speedup'}]
                                   if out.get('llada') else [])
  for group in groups:
    for name, e in group.items():
      sp = e.get('speedup')
      if name == 'llada_stack':
        sp = out['llada'].get('speedup')
      sp_text = '' if name in ('scratch', 'llada_scratch', 'small_only') else (
          'never reached' if sp is None else f'{sp:+.2f}')
      rows.append(f'| {name} | {e["final_val"]:.4f} | {e["flops"]:.3g} | {sp_text} |')
  return '\n'.join(rows)
