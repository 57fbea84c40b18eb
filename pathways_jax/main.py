"""Command line entry point for every experiment.

    python -m pathways_jax.main --config=experiments/ar_tiny.py --workdir=runs/ar \
        [--config.train.steps=100 --config.model.num_layers=4 ...]

The config file defines `get_config()`; `--config.a.b=v` overrides any field (unknown keys and
wrong types are rejected with the key's name). Rerunning the same command resumes the run.
Experiments that are more than one training run (e.g. the reversal-curse study) define `run(cfg,
workdir)` in their config file; main calls it instead of the plain trainer.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file (.py)',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (created; resumed if it exists)')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'multi-host: HOST:PORT of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'multi-host: number of processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'multi-host: this process (0-based)')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  logging.getLogger('absl').setLevel(logging.WARNING)
  logging.getLogger('jax').setLevel(logging.WARNING)
  from pathways_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import corpora  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import checkpoint, loop  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    from pathways_jax import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cfg = _CONFIG.value
  if cfg is None:  # no --config: continue a run directory (e.g. one made by pathways_jax.grow)
    try:
      cfg = config_lib.load_run_config(_WORKDIR.value or '.')
    except config_lib.ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
  try:
    config_file = _CONFIG.value is not None and flags.FLAGS['config'].config_filename
    runner = (config_file and config_lib.experiment_runner(config_file)) or loop.train
    runner(cfg, _WORKDIR.value)
  except (config_lib.ConfigError, loop.TrainingError, checkpoint.CheckpointError,
          corpora.DataError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
