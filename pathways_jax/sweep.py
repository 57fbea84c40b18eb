"""Ablation sweeps: every combination of a grid of config overrides, one run directory each.

    python -m pathways_jax.sweep --config=experiments/ar_tiny.py --workdir=runs/sweep \
        --grid='train.lr=1e-3,3e-3;model.num_layers=2,4' [--config.train.steps=200] \
        [--fields=val_loss,train_loss,tokens_per_s]

Runs are resumable: finished ones (results.json with status 'completed') are skipped, interrupted
ones resume from their checkpoints. The table of results goes to stdout and to
WORKDIR/sweep.csv and WORKDIR/sweep.md.
"""
from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from pathways_jax import host_memory
from pathways_jax.config import ConfigError
from pathways_jax.config_files import experiment_runner

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'sweep directory (one sub-directory per run)')
_GRID = flags.DEFINE_string('grid', '', "'key=v1,v2;key2=v3,v4' (cartesian product)")
_FIELDS = flags.DEFINE_list('fields', ['val_loss', 'train_loss', 'step', 'tokens_per_s'],
                            'results.json fields to tabulate')


def parse_grid(grid: str) -> list[tuple[str, list[str]]]:
  axes = []
  for part in filter(None, (p.strip() for p in grid.split(';'))):
    if '=' not in part:
      raise ConfigError(f"--grid entry {part!r} is not of the form 'key=v1,v2'")
    key, values = part.split('=', 1)
    vals = [v.strip() for v in values.split(',') if v.strip()]
    if not vals:
      raise ConfigError(f'--grid entry {key!r} has no values')
    axes.append((key.strip(), vals))
  return axes


def _coerce(old, text: str):
  if isinstance(old, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ConfigError(f'{text!r} is not a boolean')
    return text.lower() in ('true', '1')
  if isinstance(old, int):
    return int(float(text)) if float(text).is_integer() else _bad(old, text)
  if isinstance(old, float):
    return float(text)
  return text


def _bad(old, text):
  raise ConfigError(f'{text!r} is not a valid {type(old).__name__}')


def apply_override(cfg, key: str, text: str):
  """Sets the dotted `key` of `cfg` from `text`, coerced to the field's type (also used by
  benchmarks/ab_step.py); an unknown key or a bad value is a ConfigError naming it."""
  node, parts = cfg, key.split('.')
  for p in parts[:-1]:
    if p not in node or not hasattr(node[p], 'keys'):
      raise ConfigError(f'key {key!r}: the config has no field {p!r}')
    node = node[p]
  if parts[-1] not in node:
    raise ConfigError(f'key {key!r}: the config has no field {parts[-1]!r}')
  try:
    node[parts[-1]] = _coerce(node[parts[-1]], text)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'{key}={text}: {e}') from e


def run_name(assignment: list[tuple[str, str]]) -> str:
  return ','.join(f'{k}={v}' for k, v in assignment).replace('/', '_') or 'base'


def run_sweep(cfg, workdir: str, grid: str, fields: list[str], runner=None) -> list[dict]:
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  runner = runner or loop.train
  axes = parse_grid(grid)
  rows = []
  combos = list(itertools.product(*[[(k, v) for v in vals] for k, vals in axes]))
  for i, assignment in enumerate(combos):
    run_cfg = copy.deepcopy(cfg)
    for key, value in assignment:
      try:
        apply_override(run_cfg, key, value)
      except ConfigError as e:
        raise ConfigError(f'--grid {e}') from e
    name = run_name(list(assignment))
    run_dir = os.path.join(workdir, name)
    results_path = os.path.join(run_dir, 'results.json')
    done = False
    if os.path.exists(results_path):
      with open(results_path) as f:
        done = json.load(f).get('status') == 'completed'
    print(f'[{i + 1}/{len(combos)}] {name}' + (' (done, skipped)' if done else ''), flush=True)
    if not done:
      runner(run_cfg, run_dir)
    with open(results_path) as f:
      res = json.load(f)
    rows.append({'run': name, **dict(assignment), **{k: res.get(k) for k in fields}})
  write_table(rows, workdir)
  return rows


def _fmt(v):
  return f'{v:.4g}' if isinstance(v, float) else ('' if v is None else str(v))


def write_table(rows: list[dict], workdir: str) -> str:
  if not rows:
    return ''
  cols = list(rows[0])
  with open(os.path.join(workdir, 'sweep.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  lines += ['| ' + ' | '.join(_fmt(r[c]) for c in cols) + ' |' for r in rows]
  table = '\n'.join(lines)
  with open(os.path.join(workdir, 'sweep.md'), 'w') as f:
    f.write(table + '\n')
  print(table)
  return table


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  try:
    # before anything starts the JAX backend's threads
    host_memory.reuse_freed_memory(_CONFIG.value.get('host_malloc', 'default'))
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  try:
    os.makedirs(_WORKDIR.value, exist_ok=True)
    runner = experiment_runner(flags.FLAGS['config'].config_filename)
    run_sweep(_CONFIG.value, _WORKDIR.value, _GRID.value, _FIELDS.value, runner=runner)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  from pathways_jax.config_files import parse_flags  # pylint: disable=g-import-not-at-top
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
