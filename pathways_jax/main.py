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
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'multi-host: let JAX detect the cluster '
                               '(Cloud TPU, SLURM, Open MPI); automatic in multi-task SLURM steps')
_HEARTBEAT = flags.DEFINE_integer('heartbeat_timeout_s', 60, 'multi-host: a process silent this '
                                  'long is dead, and every other process exits non-zero')
_INIT_TIMEOUT = flags.DEFINE_integer('init_timeout_s', 300, 'multi-host: how long to wait for '
                                     'the coordinator and the other processes at start-up')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'compile the train step for the config\'s mesh on '
                             'fake CPU devices; print per-device memory, FLOPs and step count')
_DRY_RUN_DEVICES = flags.DEFINE_integer('dry_run_devices', None, 'dry run: number of fake '
                                        'devices (default: config.pod.devices or the mesh product)')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value and not _DRY_RUN.value:
    raise app.UsageError('--workdir is required')
  logging.getLogger('absl').setLevel(logging.WARNING)
  logging.getLogger('jax').setLevel(logging.WARNING)
  from pathways_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax import config_files  # pylint: disable=g-import-not-at-top
  from pathways_jax import host_memory  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  if cfg is None:  # no --config: continue a run directory (e.g. one made by pathways_jax.growth)
    try:
      cfg = config_files.load_run_config(_WORKDIR.value or '.')
    except config_lib.ConfigError as e:
      print(f'error: {e}: give --config', file=sys.stderr)
      return 1
  try:  # before anything starts the JAX backend's threads
    host_memory.reuse_freed_memory(cfg.get('host_malloc', 'default'))
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if _DRY_RUN.value:  # before anything starts a JAX backend: it needs N fake devices
    from pathways_jax import dry_run  # pylint: disable=g-import-not-at-top
    try:
      dry_run.run(cfg, num_devices=_DRY_RUN_DEVICES.value)
    except config_lib.ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    return 0
  from pathways_jax import distributed  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import corpora  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import checkpoint, loop  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           auto_detect=_MULTIHOST.value, heartbeat_timeout_s=_HEARTBEAT.value,
                           init_timeout_s=_INIT_TIMEOUT.value)
  except distributed.DistributedError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  try:
    config_file = _CONFIG.value is not None and flags.FLAGS['config'].config_filename
    runner = (config_file and config_files.experiment_runner(config_file)) or loop.train
    runner(cfg, _WORKDIR.value)
  except (config_lib.ConfigError, loop.TrainingError, checkpoint.CheckpointError,
          corpora.DataError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  from pathways_jax.config_files import parse_flags  # pylint: disable=g-import-not-at-top
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
