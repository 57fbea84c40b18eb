"""What each part of the train step costs, in pathways_jax and in PyTorch eager, side by side.

    python benchmarks/step_parts.py [--config=experiments/quickstart.py] [--steps=5] [--rounds=6]
                                    [--no_torch]

Times the benchmark's train step (benchmarks/train_throughput.py) three ways in each framework,
in one process, in rounds of a shuffled order, and prints best and median ms per step:

  full          the step as it is;
  no attention  the core attention (scores, mask, softmax, PV) replaced by `out = q`; the q/k/v/o
                projections stay;
  no MLP        the blocks' MLPs left out (JAX then also drops the unused mlp_norm, as does
                PyTorch, which skips the norm too).

The differences are what attention and the MLP cost in each framework. This is a diagnostic: the
JAX variants are made by swapping the model's MLP class and attention function while the step is
compiled (ahead of time: the executables are fixed then), never by a switch in the model itself.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import train_throughput as tt  # noqa: E402
from pathways_jax import config as config_lib, host_memory  # noqa: E402
from pathways_jax.models import attention as attn_lib, transformer  # noqa: E402

PARTS = {'full': {}, 'no attention': {'attention': False}, 'no MLP': {'mlp': False}}


class _NoMLP(nn.Module):
  cfg: object

  @nn.compact
  def __call__(self, x_TD, *_):  # the MLP's other inputs (multi-LoRA adapter ids) are unused
    return jnp.zeros_like(x_TD)


@contextlib.contextmanager
def _without(attention: bool = True, mlp: bool = True):
  saved = transformer.MLP, attn_lib.attend
  if not mlp:
    transformer.MLP = _NoMLP
  if not attention:  # whichever model.attention is configured ('xla', or the 'cpu' kernel)
    attn_lib.attend = lambda q, k, v, **kw: q
  try:
    yield
  finally:
    transformer.MLP, attn_lib.attend = saved


def jax_part_runner(cfg, model_cfg, **parts):
  """(run, number of dots and custom calls (the 'cpu' attention kernel) in the compiled step) for
  the step without `parts`: compiled ahead of time inside the swap, so every run executes that
  program."""
  with _without(**parts):
    run, compiled = tt.compiled_runner(cfg, model_cfg)
  return run, len(re.findall(r' (?:dot|custom-call)\(', compiled.as_text()))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='experiments/quickstart.py')
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--rounds', type=int, default=6)
  ap.add_argument('--no_torch', action='store_true')
  args = ap.parse_args()
  try:
    host_memory.reuse_freed_memory()  # as the trainer does, before the backend starts
  except ValueError as e:
    ap.error(str(e))
  if args.steps < 1 or args.rounds < 1:
    ap.error('--steps and --rounds must be >= 1')
  try:
    cfg, model_cfg = tt.load_config(args.config)
  except config_lib.ConfigError as e:
    ap.error(str(e))

  runners, dots = {}, {}
  for name, parts in PARTS.items():
    runners[('pathways_jax', name)], dots[name] = jax_part_runner(cfg, model_cfg, **parts)
  if not args.no_torch:
    try:
      for name, parts in PARTS.items():
        runners[('pytorch_eager', name)] = tt.torch_runner(cfg, model_cfg, **parts)[0]
    except ImportError:
      print('(torch not installed: install the `bench` extra for the PyTorch column)')
  seconds = tt.time_rounds(runners, args.steps, args.rounds)  # shuffled order, every round
  ms = {k: [1e3 * x for x in v] for k, v in seconds.items()}

  frameworks = sorted({f for f, _ in runners}, key=['pathways_jax', 'pytorch_eager'].index)
  print(f'{args.config}: ms per train step, best / median of {args.rounds} rounds of '
        f'{args.steps} steps; device {jax.devices()[0].device_kind}')
  print(f"{'step':<14}" + ''.join(f'{f:>22}' for f in frameworks))
  for name in PARTS:
    cells = [f'{min(ms[(f, name)]):.1f} / {statistics.median(ms[(f, name)]):.1f}'
             for f in frameworks]
    print(f'{name:<14}' + ''.join(f'{c:>22}' for c in cells))
  print('dot and custom-call ops in the compiled JAX step: '
        + ', '.join(f'{n} {d}' for n, d in dots.items()))
  for part, name in (('attention', 'no attention'), ('MLP', 'no MLP')):
    costs = [min(ms[(f, 'full')]) - min(ms[(f, name)]) for f in frameworks]
    print(f'cost of {part} (best full - best {name}): ' +
          ', '.join(f'{f} {c:.1f} ms' for f, c in zip(frameworks, costs)))


if __name__ == '__main__':
  main()
