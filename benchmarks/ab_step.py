"""A/B of the train step: variants of a config or of XLA's compiler options, timed side by side.

    python benchmarks/ab_step.py [--config=experiments/quickstart.py] [--rounds=150] [--steps=1]
        --variant 'qb1: model.causal_query_blocks=1'
        --variant 'conc: xla.xla_cpu_enable_concurrency_optimized_scheduler=true'
        --variant 'old: code.pathways_jax.models.transformer.dense=../old_checkout'
        [--variant 'NAME: KEY=VALUE KEY=VALUE ...'] [--torch]

Each variant is the benchmark's step (train_throughput.jax_step: the config's model, AdamW, a fixed
random batch) with config overrides (`model.causal_query_blocks=1`), XLA compiler options
(`xla.NAME=VALUE`, passed to `compile(compiler_options=...)`) and/or model code from another
checkout (`code.MODULE.NAME=DIR`: MODULE's NAME taken from DIR's copy of the module's file, e.g.
a `git worktree` of an older commit, and swapped in while the variant is compiled; what that
file imports still comes from this checkout). All are compiled first, in one process; then
every round runs each variant for --steps steps, in a shuffled order (see
train_throughput.time_rounds). The figure to quote is
the median over rounds of each variant's time divided by the baseline's in the same round, with
its quartiles: on a shared VM, whole-run timings drift by more than the 2-5% effects this is for,
while a round's timings are taken moments apart (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import importlib.util
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from pathways_jax import config as config_lib, host_memory, sweep  # noqa: E402
import train_throughput as tt  # noqa: E402

BASELINE = 'base'


class VariantError(ValueError):
  """A --variant that cannot be built; the message names it."""


def _option_value(text: str):
  """An XLA option's value: a bool, a number, or a bare string (an enum name, a list)."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_variant(spec: str) -> tuple[str, dict, dict]:
  """'NAME: KEY=VALUE ...' -> (name, config overrides as text, XLA compiler options)."""
  name, sep, body = spec.partition(':')
  name = name.strip()
  if not sep or not name or not body.split():
    raise VariantError(f'--variant {spec!r} is not "NAME: KEY=VALUE [KEY=VALUE ...]"')
  if name == BASELINE:
    raise VariantError(f'--variant name {BASELINE!r} is the unchanged config\'s; pick another')
  overrides, options = {}, {}
  for item in body.split():
    key, eq, value = item.partition('=')
    if not eq or not key or not value:
      raise VariantError(f'--variant {name!r}: {item!r} is not KEY=VALUE')
    if key.startswith('xla.'):
      options[key[4:]] = _option_value(value)
    else:
      overrides[key] = value
  return name, overrides, options


def apply_overrides(cfg, overrides: dict, name: str):
  """A copy of `cfg` with the overrides set (the sweep runner's typed setter), validated."""
  cfg = copy.deepcopy(cfg)
  try:
    for key, text in overrides.items():
      sweep.apply_override(cfg, key, text)
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise VariantError(f'--variant {name!r}: {e}') from e
  return cfg


def take_code_swaps(overrides: dict, name: str) -> dict:
  """Pops the `code.MODULE.NAME=DIR` items off `overrides`: {(MODULE, NAME): the object NAME
  of DIR's copy of MODULE's file}, that file loaded as a module of its own."""
  swaps = {}
  for key in [k for k in overrides if k.startswith('code.')]:
    checkout = overrides.pop(key)
    module, _, attr = key[len('code.'):].rpartition('.')
    path = os.path.join(checkout, *module.split('.')) + '.py'
    if not module or not os.path.isfile(path):
      raise VariantError(f'--variant {name!r}: {key}={checkout}: no file {path}')
    alias = f'_ab_step_{name}_{module}'.replace('.', '_')
    spec = importlib.util.spec_from_file_location(alias, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[alias] = loaded  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(loaded)
    if not hasattr(loaded, attr) or not hasattr(importlib.import_module(module), attr):
      raise VariantError(f'--variant {name!r}: {key}: {attr!r} is not in both {path} and '
                         f'{module}')
    swaps[module, attr] = getattr(loaded, attr)
  return swaps


@contextlib.contextmanager
def swapped(swaps: dict):
  """The objects of take_code_swaps in place of this checkout's, restored on exit."""
  saved = {(m, a): getattr(importlib.import_module(m), a) for m, a in swaps}
  try:
    for (m, a), obj in swaps.items():
      setattr(importlib.import_module(m), a, obj)
    yield
  finally:
    for (m, a), obj in saved.items():
      setattr(importlib.import_module(m), a, obj)


def compiled_runner(cfg, options: dict, name: str, swaps: dict | None = None):
  """run(steps) for the step of `cfg` compiled with XLA `options` (and the code `swaps`), on its
  own copy of the state. The executable is fixed when this returns, so the swap ends here."""
  try:
    with swapped(swaps or {}):
      return tt.compiled_runner(cfg, tt.model_config(cfg), options or None)[0]
  except Exception as e:  # XLA's own message, e.g. "No such compile option"  # pylint: disable=broad-except
    raise VariantError(f'--variant {name!r} does not compile: '
                       f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from e


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='experiments/quickstart.py')
  ap.add_argument('--variant', action='append', default=[],
                  help="'NAME: KEY=VALUE ...' with config keys (model.causal_query_blocks=1) or "
                       'XLA compiler options (xla.NAME=VALUE); repeat for more variants')
  ap.add_argument('--rounds', type=int, default=150)
  ap.add_argument('--steps', type=int, default=1)
  ap.add_argument('--torch', action='store_true',
                  help='also time the same model in PyTorch eager (the `bench` extra)')
  args = ap.parse_args()
  if args.steps < 1 or args.rounds < 1:
    ap.error('--steps and --rounds must be >= 1')
  try:
    host_memory.reuse_freed_memory()  # before the backend starts, as in the trainer
    cfg, model_cfg = tt.load_config(args.config)
    variants = [parse_variant(v) for v in args.variant]
    names = [BASELINE] + [n for n, _, _ in variants]
    if len(set(names)) != len(names):
      raise VariantError(f'--variant names repeat: {names[1:]}')
    shown = {name: dict(overrides) for name, overrides, _ in variants}
    swaps = {name: take_code_swaps(overrides, name) for name, overrides, _ in variants}
    configs = {name: (apply_overrides(cfg, overrides, name), options)  # all checked first
               for name, overrides, options in variants}
    runners = {BASELINE: compiled_runner(cfg, {}, BASELINE)}
    for name, (variant_cfg, options) in configs.items():
      runners[name] = compiled_runner(variant_cfg, options, name, swaps[name])
  except (ValueError, config_lib.ConfigError) as e:  # VariantError, ConfigError, malloc mode
    ap.error(str(e))
  if args.torch:
    try:
      runners['pytorch_eager'] = tt.torch_runner(cfg, model_cfg)[0]
    except ImportError:
      print('(torch not installed: install the `bench` extra for the PyTorch row)')
  seconds = tt.time_rounds(runners, args.steps, args.rounds)

  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()}; {args.config}; '
        f'{args.rounds} alternating rounds of {args.steps} step(s)')
  for name, _, options in variants:
    print(f'  {name}: ' + ' '.join([f'{k}={v}' for k, v in shown[name].items()] +
                                   [f'xla.{k}={v!r}' for k, v in options.items()]))
  print(f"{'variant':<16} {'best ms':>8} {'median ms':>10}   time / {BASELINE}'s, per round: "
        'median [quartiles]')
  for name, s in seconds.items():
    med, lo, hi = tt.paired_ratio(seconds, name, BASELINE)
    print(f'{name:<16} {1e3 * min(s):>8.1f} {1e3 * statistics.median(s):>10.1f}   '
          f'{med:.3f} [{lo:.3f}-{hi:.3f}]')


if __name__ == '__main__':
  main()
