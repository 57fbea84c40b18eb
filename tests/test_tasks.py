"""Tasks (pathways_jax.tasks): the registry, and a task written outside the package
(tests/distill_task_config.py: distillation from a frozen teacher) trained through
`python -m pathways_jax.main` — resume, 8 fake devices, dry run. (Gradient accumulation weighted
by each micro-batch's count: tests/test_train.py.)"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import cli, cli_overrides, tiny_config, xla_flags
from pathways_jax import config as config_lib
from pathways_jax import tasks

CONFIG = 'tests/distill_task_config.py'


def test_built_in_tasks_and_the_names_older_configs_imply():
  assert {'autoregressive', 'diffusion', 'rho1'} <= set(tasks.names())
  cfg = tiny_config('/unused')
  assert tasks.task_name(cfg) == 'autoregressive'
  cfg.objective = 'diffusion'
  assert tasks.task_name(cfg) == 'diffusion'
  cfg.selective.enabled = True
  assert tasks.task_name(cfg) == 'rho1'
  cfg.task = 'autoregressive'  # an explicit name wins
  assert tasks.task_name(cfg) == 'autoregressive'


def test_an_unknown_task_and_a_missing_batch_field_are_named():
  cfg = tiny_config('/unused', task='no_such_task')
  with pytest.raises(config_lib.ConfigError, match=r"config.task='no_such_task' is not a task; "
                                                   r"known: \[.*'autoregressive'"):
    tasks.make(cfg, None)

  class Weighted(tasks.Task):
    def batch_fields(self):
      return {**super().batch_fields(), 'weights': jnp.float32}

  with pytest.raises(config_lib.ConfigError, match=r"needs batch fields \['weights'\]"):
    Weighted(cfg, None).check_batch({'tokens': 0, 'segment_ids': 0, 'positions': 0})
  with pytest.raises(TypeError, match='subclass'):
    tasks.register('not_a_task')(object)


# ----------------------------------------------------------- a task from outside the package

@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  root = tmp_path_factory.mktemp('distill')
  cache = str(root / 'cache')
  out = cli('pathways_jax.main', *cli_overrides('experiments/quickstart.py', cache),
            '--config.train.steps=3', '--config.sample.prompts=()', f'--workdir={root / "teacher"}')
  assert out.returncode == 0, out.stderr[-3000:]
  return root, cache


def _distill(root, cache, workdir, *extra, env=None):
  return cli('pathways_jax.main', *cli_overrides(CONFIG, cache),
             f'--config.distill.teacher={root / "teacher"}', '--config.train.steps=6',
             '--config.train.checkpoint_every=3', '--config.sample.prompts=()',
             f'--workdir={workdir}', *extra, env=env)


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if 'loss' in r}


def test_a_task_defined_in_a_config_file_trains_and_resumes_exactly(teacher):
  root, cache = teacher
  whole, parts = root / 'whole', root / 'parts'
  out = _distill(root, cache, whole)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'task=distill' in out.stdout and 'distill: teacher' in out.stdout
  for extra in (('--config.train.stop_at=3',), ()):
    out = _distill(root, cache, parts, *extra)
    assert out.returncode == 0, out.stderr[-3000:]
  want, got = _rows(whole), _rows(parts)
  assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5, 6]
  assert all(r['kl'] > 0 for r in want.values())  # the teacher is really in the loss
  assert want[6]['loss'] < want[1]['loss']
  for s in range(1, 7):  # bit-identical on one machine, as for the built-in tasks
    assert got[s]['loss'] == want[s]['loss'] and got[s]['kl'] == want[s]['kl'], s


def test_the_task_runs_sharded_on_8_devices_with_the_teacher_sharded_too(teacher):
  root, cache = teacher
  env = {'XLA_FLAGS': xla_flags(8)}
  out = _distill(root, cache, root / 'fsdp8', '--config.mesh.data=1', '--config.mesh.fsdp=-1',
                 '--config.data.batch_size=8', '--config.train.steps=2', env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh={'data': 1, 'fsdp': 8, 'tensor': 1}" in out.stdout, out.stdout
  assert np.isfinite(_rows(root / 'fsdp8')[2]['loss'])


def test_the_dry_run_compiles_the_task_with_its_frozen_teacher(teacher):
  root, cache = teacher
  out = cli('pathways_jax.main', *cli_overrides(CONFIG, cache), '--dry_run',
            '--dry_run_devices=8', '--config.mesh.data=1', '--config.mesh.fsdp=-1',
            '--config.data.batch_size=8', f'--config.distill.teacher={root / "teacher"}')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'task distill' in out.stdout and 'per-device memory' in out.stdout, out.stdout


def test_a_task_name_that_does_not_exist_is_one_line_from_the_cli(teacher):
  _, cache = teacher
  out = cli('pathways_jax.main', *cli_overrides('experiments/quickstart.py', cache),
            '--config.task=nope', '--workdir=/tmp/unused_pathways_task')
  assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
  assert "config.task='nope' is not a task" in out.stderr
