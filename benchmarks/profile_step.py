"""Where the time of one train step goes: XLA ops grouped by kind and by model part.

    python benchmarks/profile_step.py [--config=experiments/quickstart.py] [--steps=5]
                                      [--single_core] [--top=25]

Traces a few steps of the project's jitted train step with `jax.profiler` (a Perfetto trace, no
TensorBoard plugin needed), maps every executed op back to the compiled HLO, and prints

  * time by kind: `matmul` (dots and fusions holding a dot), `reduce`, `copy` (copies and
    transposes), `elementwise` (every other fusion), `kernel` (custom calls: the 'cpu' attention),
    `other`;
  * the top op groups: kind, output shape, and the op's source location in the model
    (`fwd` or `bwd`, i.e. under `transpose(jvp(...))`, with layer indices folded together).

On several cores XLA runs independent ops concurrently, so op times overlap and their sum exceeds
the step time; `--single_core` pins the process to one core first, which makes them add up.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time


def _parse_hlo(text: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (kind, output shape, op_name metadata) for every instruction."""
  bodies = {}
  for m in re.finditer(r'^%?(\S+) \([^\n]*\) -> [^\n]*\{\n(.*?)^\}', text, re.M | re.S):
    bodies[m.group(1)] = m.group(2)
  info = {}
  # The shape is one token, or a tuple in parentheses (a custom call's several outputs).
  for m in re.finditer(r'^\s+(?:ROOT )?%?(\S+) = (\([^=]*?\)|\S+) ([\w-]+)\(([^\n]*)$', text,
                       re.M):
    name, shape, op, rest = m.groups()
    called = re.search(r'calls=%?([^,\s}]+)', rest)
    body = bodies.get(called.group(1), '') if called else ''
    if op in ('dot', 'convolution') or ' dot(' in body or ' convolution(' in body:
      kind = 'matmul'
    elif op == 'custom-call':
      kind = 'kernel'
    elif op == 'reduce' or ' reduce(' in body or ' reduce-window(' in body:
      kind = 'reduce'
    elif op in ('copy', 'transpose') or (body and not re.search(
        r' (?!copy|transpose|bitcast|parameter|constant|reshape)[\w-]+\(', body)):
      kind = 'copy'
    elif op == 'fusion':
      kind = 'elementwise'
    else:
      kind = 'other'
    meta = re.search(r'op_name="([^"]*)"', rest)
    info[name] = (kind, re.sub(r'\{[^}]*\}', '', shape), meta.group(1) if meta else '')
  return info


def _where(op_name: str) -> str:
  side = 'bwd' if 'transpose(jvp(' in op_name else 'fwd'
  path = re.sub(r'^jit\([^)]*\)/', '', op_name)
  path = re.sub(r'transpose\(jvp\(([^)]*)\)\)', r'\1', path)
  path = re.sub(r'jvp\(([^)]*)\)', r'\1', path)
  path = re.sub(r'blocks_\d+', 'blocks_*', path)
  return f'{side} {path}' if path else '(no source)'


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='experiments/quickstart.py')
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--top', type=int, default=25)
  ap.add_argument('--single_core', action='store_true')
  args = ap.parse_args()
  if args.steps < 1 or args.top < 1:
    ap.error('--steps and --top must be >= 1')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from pathways_jax import host_memory  # pylint: disable=g-import-not-at-top
  try:
    host_memory.reuse_freed_memory()  # as the trainer does, before the backend starts
  except ValueError as e:
    ap.error(str(e))
  if args.single_core:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import train_throughput as tt  # pylint: disable=g-import-not-at-top
  from pathways_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  try:
    cfg, model_cfg = tt.load_config(args.config)
  except config_lib.ConfigError as e:
    ap.error(str(e))
  fn, state, batch, mesh, rules = tt.jax_step(cfg, model_cfg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    info = _parse_hlo(fn.lower(state, batch).compile().as_text())
  for _ in range(2):
    state, m = step_lib.run_with_rules(mesh, rules, fn, state, batch)
  jax.block_until_ready(m['loss'])

  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, m = step_lib.run_with_rules(mesh, rules, fn, state, batch)
      jax.block_until_ready(m['loss'])
      wall = (time.perf_counter() - t0) / args.steps
    trace = glob.glob(os.path.join(logdir, '**', 'perfetto_trace.json.gz'), recursive=True)
    events = json.load(gzip.open(trace[0]))
  events = events['traceEvents'] if isinstance(events, dict) else events

  by_kind, by_group, count = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e or e['name'] not in info:
      continue  # Python frames and runtime bookkeeping, not XLA ops
    kind, shape, op_name = info[e['name']]
    by_kind[kind] += e['dur']
    by_group[(kind, shape, _where(op_name))] += e['dur']
    count[(kind, shape, _where(op_name))] += 1
  per_step = lambda us: us / args.steps / 1e3  # microseconds over all steps -> ms per step
  total = sum(by_kind.values())
  cores = len(os.sched_getaffinity(0))
  print(f'{args.config}: {wall * 1e3:.1f} ms per step (wall, under the profiler) on {cores} '
        f'core(s); op time summed {per_step(total):.1f} ms per step')
  print(f"\n{'kind':<12} {'ms/step':>8} {'share':>6}")
  for kind, us in by_kind.most_common():
    print(f'{kind:<12} {per_step(us):>8.1f} {us / total:>6.1%}')
  print(f"\n{'ms/step':>8} {'share':>6} {'ops':>4}  {'kind':<11} {'shape':<22} where")
  for key, us in by_group.most_common(args.top):
    kind, shape, where = key
    print(f'{per_step(us):>8.2f} {us / total:>6.1%} {count[key] // args.steps:>4}  {kind:<11} '
          f'{shape:<22} {where[:90]}')


if __name__ == '__main__':
  main()
