"""Configs from files, run directories and the command line.

    cfg = config_files.config_from_file('experiments/ar_tiny.py')   # its get_config()
    cfg = config_files.load_run_config(workdir)                     # what a run was started with
    app.run(main, flags_parser=config_files.parse_flags)            # one-line errors for bad keys

The schema itself (`base_config`, `validate`, `ModelConfig`) is `pathways_jax.config`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import ml_collections

from pathways_jax.config import ConfigError, base_config


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run directory was started with (WORKDIR/config.json), over `base_config()`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{workdir} is not a run directory (no config.json)')
  with open(path) as f:
    saved = json.load(f)
  cfg = base_config()
  cfg.unlock()
  cfg.update(ml_collections.ConfigDict(saved))
  cfg.lock()
  return cfg


def load_config_module(path: str):
  """A config (or experiment) file imported as a module: one experiment may reuse another's
  helpers and config."""
  if not os.path.isfile(path) or not path.endswith('.py'):
    raise ConfigError(f'config file {path!r} is not a .py file that exists')
  name = os.path.splitext(os.path.basename(path))[0]  # tracebacks name the file
  spec = importlib.util.spec_from_file_location(f'{name}_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_from_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, so one experiment can start from another's config."""
  module = load_config_module(path)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} defines no get_config()')
  return module.get_config()


def experiment_runner(config_path: str):
  """The config file's `run(cfg, workdir)` if it defines one (experiments of several runs)."""
  return getattr(load_config_module(config_path.split(':')[0]), 'run', None)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run(..., flags_parser=parse_flags)` for the CLIs: an override of a key the config lacks
  (`--config.train.no_such_key=1`) exits with one line naming it instead of a traceback.

  ml_collections raises AttributeError for such a key while absl parses the flags; absl's own
  flag errors (e.g. a wrong type) get the same one-line form. An AttributeError or KeyError that
  no `--config.` override explains (a bug inside a config file's get_config, say) is re-raised
  with its traceback rather than misreported as a missing key.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'FATAL Flags parsing error: {e}')
  except (AttributeError, KeyError) as e:
    missing = str(e).strip('"\'')
    bad = [a for a in argv[1:] if a.startswith('--config.') and
           missing in a.split('=', 1)[0].split('.')]
    if not bad:
      raise
    sys.exit(f"FATAL Flags parsing error: {bad[0].split('=', 1)[0]}: the config has no key "
             f'{missing!r}')


def parse_shard(text: str, key: str) -> tuple[int, int] | None:
  """An experiment's 'i/n' shard field (process i of n shares a grid): (i, n), None when empty."""
  if not text:
    return None
  try:
    i, n = (int(t) for t in text.split('/'))
  except ValueError:
    i, n = -1, 0
  if not 0 <= i < n:
    raise ConfigError(f"{key}={text!r} is not 'i/n' with 0 <= i < n")
  return i, n
