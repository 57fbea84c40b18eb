"""The figures' data files: each experiment's numbers copied from its finished run directories
(`extract_<experiment>`) into docs/results/data/<experiment>.json, and read back (`load_data`).
experiments/figures.py draws from them; see its docstring for the command line.

Needs nothing beyond the standard library and `pathways_jax.eval.seed_stats` (not JAX, not
matplotlib).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess

from pathways_jax.eval import seed_stats

EXPERIMENTS = ('rho1', 'gstack', 'gstack_study', 'gstack_study_llada', 'reversal',
               'instruction_sft', 'dpo_instructions',
               'knowledge_injection', 'grpo_instructions', 'grpo_arithmetic',
               'grpo_arithmetic_long', 'grpo_arithmetic_unseen', 'paprika', 'pathway', 'scaling',
               'prorl', 'rpt')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, 'docs', 'results', 'data')


class MissingData(FileNotFoundError):
  """A data file or a run's results.json is not there."""


def _r(x, nd=4):
  """Rounds floats (and nested lists of them) so the data files stay small and diffable."""
  if isinstance(x, float):
    return round(x, nd)
  if isinstance(x, (list, tuple)):
    return [_r(v, nd) for v in x]
  return x


def _load_results(run_dir: str) -> dict:
  path = os.path.join(run_dir, 'results.json')
  if not os.path.isfile(path):
    raise MissingData(f'{path} not found: is {run_dir} a finished run directory?')
  with open(path) as f:
    res = json.load(f)
  if res.get('status', 'completed') != 'completed':
    raise MissingData(f'{path}: the run is not finished (status {res.get("status")!r})')
  return res


def _commit() -> str | None:
  try:
    return subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def _device(dev) -> str:
  if isinstance(dev, dict):  # rho1/gstack write jax's device fields
    return (f'{dev.get("platform")} x{dev.get("count")} ({dev.get("machine")}, '
            f'{dev.get("cpus")} cores)')
  return str(dev)


def _meta(name: str, res: dict, run_dir: str, commit: str | None, wall_s) -> dict:
  return {'experiment': name, 'source': f'experiments/{name}.py', 'run_dir': run_dir,
          'date': res.get('date'), 'device': _device(res.get('device')),
          # Runs do not record their commit: this is --commit, else HEAD when the data was saved.
          'commit': commit or _commit(), 'wall_s': _r(wall_s, 1),
          'seed': (res.get('config') or {}).get('seed')}


# ---------------------------------------------------------------------------- run dir -> data

def extract_rho1(run_dir: str, commit: str | None = None) -> dict:
  res = _load_results(run_dir)

  def family(fam: dict) -> dict:
    arms = {}
    for arm, a in fam['arms'].items():
      arms[arm] = {'final': _r(a['val']), 'curve': _r(a['curve']),
                   'token_savings': _r(a.get('token_savings'), 3),
                   'noise_share_kept': _r(a.get('noise_share_kept'), 3),
                   'noise_dropped': _r(a.get('noise_recall_dropped'), 3)}
    return {'ref_val': _r(fam['ref_val']), 'arms': arms}

  out = _meta('rho1', res, run_dir, commit, res.get('wall_s'))
  noise = ((res.get('config') or {}).get('data') or {}).get('noise') or {}
  out.update(tokens_per_arm=res.get('tokens_per_arm'), noise_fraction=noise.get('fraction'),
             token_savings=_r(res.get('token_savings'), 3),
             autoregressive=family(res['autoregressive']))
  if 'llada' in res:
    out['llada'] = family(res['llada'])
    out['llada_token_savings'] = _r(res.get('llada_token_savings'), 3)
  return out


def extract_gstack(run_dir: str, commit: str | None = None) -> dict:
  res = _load_results(run_dir)

  def family(arms: dict, scratch_name: str) -> dict:
    scratch = arms.get(scratch_name)
    step_flops = scratch['flops'] / scratch['steps'] if scratch else None  # a target-size step
    out = {}
    for name, e in arms.items():
      if not isinstance(e, dict):  # llada's 'speedup' entry
        continue
      entry = {'final': _r(e['final_val']), 'flops': e['flops'], 'steps': e['steps'],
               'speedup': _r(e.get('speedup'), 3), 'curve': _r(e['curve'])}
      g = e.get('growth')
      if g and step_flops:
        # FLOPs spent before the growth: all of the arm's FLOPs but its target-size steps.
        entry['growth'] = {'at_step': g['at_step'],
                           'flops': e['flops'] - step_flops * (e['steps'] - g['at_step']),
                           'val_before': _r(g.get('val_loss_before')),
                           'val_after': _r(g.get('val_loss_after'))}
      out[name] = entry
    return out

  out = _meta('gstack', res, run_dir, commit, res.get('wall_s'))
  out.update(small_layers=res.get('small_layers'), target_layers=res.get('target_layers'),
             scratch_final=_r(res.get('scratch_final_val')), speedup=_r(res.get('speedup'), 3),
             arms=family(res['arms'], 'scratch'))
  if res.get('llada'):
    out['llada'] = family(res['llada'], 'llada_scratch')
    out['llada_speedup'] = _r(res['llada'].get('speedup'), 3)
  return out


REVERSAL_METRICS = ('forward', 'forward_heldout', 'reverse', 'reverse_heldout', 'infill_reverse',
                    'rank_reverse')


def _checks(run_dir: str) -> list:
  """(step, forward exact match) of every check a model's run directory logged."""
  from pathways_jax.train import metrics  # pylint: disable=g-import-not-at-top
  return [[s, _r(a)] for s, a in metrics.logged(run_dir, 'check_forward')]


def _reversal_models(res: dict, run_dir: str) -> dict:
  models = {}
  for model, prefix, suffix in (('ar', 'ar_', ''), ('llada', 'llada_', ''),
                                ('llada_control', 'llada_', '_control')):
    if f'{prefix}forward{suffix}' not in res:
      continue
    m = {k: _r(res.get(f'{prefix}{k}{suffix}')) for k in REVERSAL_METRICS}
    m['steps'] = res.get(f'{model}_steps')
    m['steps_to_target'] = res.get(f'{model}_steps_to_target')
    m['train_seconds'] = res.get(f'{model}_train_seconds')
    # The control's checks are only in its run directory's metrics.jsonl (not in results.json).
    checks = _checks(os.path.join(run_dir, model))
    m['forward_checks'] = checks or _r(res.get(f'{model}_forward_checks') or [])
    models[model] = m
  return models


def reversal_setting(res: dict) -> str:
  """A run's setting: 'default', or what it changed ('facts file people.jsonl',
  'name_first_templates=4', ...), from the keys its results.json records."""
  parts = [f'facts file {os.path.basename(res["facts_file"])}'] if res.get('facts_file') else []
  parts += [f'{k.split(".")[-1]}={v}' for k, v in (res.get('changed_from_defaults') or {}).items()]
  return ', '.join(parts) or 'default'


def _mean_sd(values: list) -> dict:
  st = seed_stats.mean_sd(values)
  return {'mean': _r(st['mean']), 'sd': _r(st['sd']), 'n': st['n']}


def extract_reversal(run_dirs: str, commit: str | None = None) -> dict:
  """Comma-separated WORKDIRs of experiments/reversal.py, grouped by setting (the default, a facts
  file, each ablation) and seed; per setting, the mean and spread (sd, ddof=1) over seeds."""
  settings, first, wall = {}, None, 0.0
  for run_dir in [d for d in run_dirs.split(',') if d]:
    res = _load_results(run_dir)
    first = first or (res, run_dir)
    seed = str((res.get('config') or {}).get('seed'))
    setting = settings.setdefault(reversal_setting(res), {'seeds': {}})
    if seed in setting['seeds']:
      raise MissingData(f'{run_dir}: a second run of seed {seed} in setting '
                        f'{reversal_setting(res)!r}')
    setting['seeds'][seed] = _reversal_models(res, run_dir)
    setting['num_test'] = res.get('num_test')
    wall += sum(res.get(f'{k}_train_seconds') or 0.0 for k in ('ar', 'llada', 'llada_control'))
  if first is None:
    raise MissingData('--reversal: no run directory given')
  for setting in settings.values():
    setting['seeds'] = dict(sorted(setting['seeds'].items()))
    models = sorted({m for per in setting['seeds'].values() for m in per},
                    key=('ar', 'llada', 'llada_control').index)
    setting['summary'] = {
        m: {k: _mean_sd([per[m].get(k) for per in setting['seeds'].values() if m in per])
            for k in REVERSAL_METRICS} for m in models}
  res, _ = first
  out = _meta('reversal', res, run_dirs, commit, wall)  # wall: every model's training time
  out.update(seed=sorted({s for st in settings.values() for s in st['seeds']}),
             settings=settings)
  return out


def _mean_curve(curves: list) -> list:
  """The mean over seeds of curves evaluated at the same FLOPs (the same arm's steps)."""
  n = min(len(c) for c in curves)
  return [[curves[0][i][0], _r(statistics.fmean(c[i][1] for c in curves))] for i in range(n)]


def extract_gstack_study(run_dirs: str, commit: str | None = None) -> dict:
  """experiments/gstack_study.py: per arm the mean (sd) final loss and speedup over seeds, the
  seeds' speedups, the mean curve and where the growth happened; the regime check; the guideline.

  run_dirs: the study's WORKDIR, then (comma-separated) any further summaries of it, e.g. more
  seeds of some arms (a WORKDIR whose s<seed> link to the study's): kept under `more_seeds`."""
  run_dir, *more = [d.strip() for d in run_dirs.split(',') if d.strip()]
  res = _load_results(run_dir)
  seeds = res['seeds']
  arms = {}
  for name, stats in res['arms'].items():
    per = [s[name] for s in seeds.values() if name in s]
    entry = {'final': {k: _r(v) for k, v in stats['final_val'].items()},
             'flops': stats['flops'], 'curve': _mean_curve([e['curve'] for e in per])}
    if 'vs_scratch' in stats:  # paired with the same seed's scratch, as the mean is
      entry['vs_scratch'] = {k: _r(v) for k, v in stats['vs_scratch'].items()}
      entry['vs_scratch_seeds'] = [_r(s[name]['final_val'] - s['scratch']['final_val'])
                                   for s in seeds.values() if name in s]
    if 'speedup' in stats:
      entry.update(speedup={k: _r(v, 3) for k, v in stats['speedup'].items()},
                   speedups=[_r(e.get('speedup'), 3) for e in per], reached=stats['reached'])
    growth = per[0].get('growth')
    if growth:  # FLOPs spent before the growth: the arm's FLOPs but its target-size steps
      scratch = seeds[next(iter(seeds))]['scratch']
      target_step = scratch['flops'] / scratch['steps']
      entry['growth'] = {'at_step': growth['at_step'], 'num_layers': growth.get('num_layers'),
                         'flops': per[0]['flops'] - (per[0]['steps'] - growth['at_step'])
                         * target_step}
    arms[name] = entry
  wall = res.get('arm_wall_s') or res.get('wall_s')
  out = _meta('gstack_study', res, run_dir, commit, wall)
  cfg = res['config']
  out.update(objective=cfg['study'].get('objective', 'autoregressive'),
             seed=sorted(seeds), seeds=len(seeds), budget_flops=cfg['study']['budget_flops'],
             target=f"{cfg['model']['d_model']}x{cfg['model']['num_layers']}",
             target_params=res['target_nonembedding_params'], scratch_tokens=res['scratch_tokens'],
             regime={n: {'scratch_wins': r['scratch_wins'], 'seeds': r['seeds'],
                         'gap': {k: _r(v) for k, v in r['gap'].items()}}
                     for n, r in res['regime'].items()},
             guideline=res['guideline'], paper_speedups=res['paper_speedups'], arms=arms)
  out['more_seeds'] = []
  for d in more:
    extra = _load_results(d)
    out['more_seeds'].append({'run_dir': d, 'seed': sorted(extra['seeds']), 'arms': {
        n: {'final': {k: _r(v) for k, v in a['final_val'].items()},
            **({'vs_scratch': {k: _r(v) for k, v in a['vs_scratch'].items()}}
               if 'vs_scratch' in a else {}),
            **({'speedups': [_r(e[n].get('speedup'), 3) for e in extra['seeds'].values()],
                'reached': a['reached']} if 'speedup' in a else {})}
        for n, a in extra['arms'].items()}})
  return out


def extract_scaling(run_dir: str, commit: str | None = None) -> dict:
  """The isoFLOP study's points (mean and sd over seeds), minima, laws, multipliers and task."""
  res = _load_results(run_dir)
  groups = {}
  for p in res['points']:
    key = (p['objective'], p['budget'], p['size'])
    groups.setdefault(key, {'params': p['params'], 'loss': [], 'task': []})
    groups[key]['loss'].append(p['val_loss'])
    if 'task' in p:
      groups[key]['task'].append(p['task']['accuracy'])
  points = [{'objective': o, 'budget': b, 'size': z, 'params': g['params'],
             'seeds': len(g['loss']), 'loss': _mean_sd(g['loss']),
             'task': _mean_sd(g['task']) if g['task'] else None}
            for (o, b, z), g in groups.items()]
  # The study's compute is its runs' (sharded runs overlap; the final analysis run is seconds).
  out = _meta('scaling', res, run_dir, commit, sum(p.get('wall_s', 0) for p in res['points']))
  out.update(seeds=res['config']['scaling']['seeds'], points=points,
             minima={o: [{k: _r(v) for k, v in m.items()} for m in ms]
                     for o, ms in res['minima'].items()},
             laws={o: {'a': _r(law['a']), 'b': _r(law['b'])} for o, law in res['laws'].items()},
             multiplier=[{k: _r(v) for k, v in m.items()} for m in res['multiplier']],
             task=res['config']['scaling'].get('task') or None)
  return out


def save_data(name: str, data: dict, data_dir: str = DATA_DIR) -> str:
  os.makedirs(data_dir, exist_ok=True)
  path = os.path.join(data_dir, f'{name}.json')
  with open(path, 'w') as f:
    f.write(_dumps(data) + '\n')
  return path


def _dumps(x, indent: str = '') -> str:
  """JSON with one key per line and each list on one line (a curve is one line to diff)."""
  if isinstance(x, dict) and x:
    inner = indent + '  '
    items = [f'{inner}{json.dumps(k)}: {_dumps(v, inner)}' for k, v in x.items()]
    return '{\n' + ',\n'.join(items) + f'\n{indent}}}'
  return json.dumps(x, separators=(', ', ': '))


def load_data(name: str, data_dir: str = DATA_DIR) -> dict:
  path = os.path.join(data_dir, f'{name}.json')
  if not os.path.isfile(path):
    raise MissingData(f'{path} not found: make it from a finished run with '
                      f'`python experiments/figures.py --{name}=runs/{name}`')
  with open(path) as f:
    return json.load(f)
