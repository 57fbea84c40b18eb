"""Frozen models (pathways_jax.train.frozen): params only, placed sharded, clear errors."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO, run_on_fake_devices, tiny_config
from pathways_jax import config as config_lib
from pathways_jax import config_files
from pathways_jax import parallel
from pathways_jax.train import checkpoint as ckpt_lib
from pathways_jax.train import frozen, loop


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('frozen') / 'run'
  # Wide enough (0.4M params) that the arrays, not the checkpoint's metadata, are what is read.
  loop.train(tiny_config(str(path.parent / 'cache'), **{
      'train.steps': 2, 'model.d_model': 128, 'model.mlp_dim': 512}), str(path), quiet=True)
  return path


def _mesh_and_rules(cfg):
  return parallel.make_mesh(cfg), parallel.logical_rules(cfg)


def test_the_params_are_the_checkpoints_params_bit_for_bit(run_dir):
  cfg = config_files.load_run_config(str(run_dir))
  mesh, rules = _mesh_and_rules(cfg)
  fm = frozen.load(str(run_dir), mesh, rules)
  assert fm.step == 2 and fm.model_cfg.vocab_size == fm.params['embed'].shape[0]
  _, _, model, _, _ = loop.build(cfg)
  _, want, _ = ckpt_lib.restore_run_params(str(run_dir), model, cfg.train,
                                           np.zeros((1, 8), np.int32), mesh, rules)
  jax.tree_util.tree_map(np.testing.assert_array_equal, fm.params, want)


_BYTES_READ = '''
import json, sys, jax, numpy as np
from pathways_jax import config as config_lib, config_files, parallel
from pathways_jax.train import checkpoint as ckpt_lib, frozen, loop
def rchar():
  with open('/proc/self/io') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('rchar'))
run = sys.argv[1]
cfg = config_files.load_run_config(run)
mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
_, _, model, _, _ = loop.build(cfg)
load_params = lambda: frozen.load(run, mesh, rules)
load_state = lambda: ckpt_lib.restore_run_params(run, model, cfg.train, np.zeros((1, 8), np.int32),
                                                 mesh, rules)
fm, _ = load_params(), load_state()  # the first calls also read the modules they import
before = rchar(); fm = load_params(); params_read = rchar() - before
before = rchar(); load_state(); full_read = rchar() - before
nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(fm.params))
print(json.dumps(dict(params_read=params_read, full_read=full_read, param_bytes=nbytes)))
'''


@pytest.mark.skipif(not os.path.exists('/proc/self/io'), reason='counts bytes in /proc/self/io')
def test_no_optimizer_bytes_are_read(run_dir):
  """The bytes the process reads while loading: about the params' size, where restoring the
  train state reads the AdamW moments too (three times the params)."""
  out = subprocess.run([sys.executable, '-c', _BYTES_READ, str(run_dir)], cwd=REPO,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r['full_read'] > 2.5 * r['param_bytes'], r
  assert r['params_read'] < 1.5 * r['param_bytes'], r


def test_it_lands_sharded_on_the_mesh_of_the_run_that_loads_it(run_dir):
  out = run_on_fake_devices(f'''
import jax, numpy as np
from pathways_jax import config as config_lib, config_files, parallel
from pathways_jax.train import frozen
cfg = config_files.load_run_config({str(run_dir)!r})
cfg.unlock(); cfg.mesh.data, cfg.mesh.fsdp = 1, -1
mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
fm = frozen.load({str(run_dir)!r}, mesh, rules)
w = fm.params['blocks_0']['mlp']['w_gate']
print('SHARD', w.sharding.shard_shape(w.shape), len(w.sharding.device_set), w.shape)
''')
  assert 'SHARD (16, 512) 8 (128, 512)' in out, out


def test_a_grown_run_loads_as_the_model_its_checkpoint_holds(tmp_path):
  run = tmp_path / 'grown'
  loop.train(tiny_config(str(tmp_path / 'cache'), **{
      'train.steps': 3, 'growth.depth_factor': 2, 'growth.at_step': 2}), str(run), quiet=True)
  cfg = config_files.load_run_config(str(run))
  fm = frozen.load(str(run), *_mesh_and_rules(cfg))
  assert fm.step == 3 and fm.model_cfg.num_layers == 2 * cfg.model.num_layers
  assert 'blocks_3' in fm.params


def test_bad_run_directories_are_named(run_dir, tmp_path):
  cfg = config_files.load_run_config(str(run_dir))
  mesh, rules = _mesh_and_rules(cfg)
  with pytest.raises(config_lib.ConfigError, match='is not a run directory'):
    frozen.load(str(tmp_path), mesh, rules)
  empty = tmp_path / 'empty'
  empty.mkdir()
  shutil.copy(run_dir / 'config.json', empty / 'config.json')
  with pytest.raises(ckpt_lib.CheckpointError, match='holds no checkpoint'):
    frozen.load(str(empty), mesh, rules)
  with pytest.raises(ckpt_lib.CheckpointError, match=r'no checkpoint at step 7 \(it has \[2\]\)'):
    frozen.load(str(run_dir), mesh, rules, step=7)
  # A checkpoint whose state has no params (say, written by another tool).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  no_params = tmp_path / 'no_params'
  no_params.mkdir()
  shutil.copy(run_dir / 'config.json', no_params / 'config.json')
  ocp.PyTreeCheckpointer().save(no_params / 'checkpoints' / '5' / 'state',
                                {'step': np.int32(5), 'weights': np.zeros(3, np.float32)})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"holds no params \(its state has \['step', "
                                                     r"'weights'\]\)"):
    frozen.load(str(no_params), mesh, rules)
  # Params of another shape than the config describes.
  other = tmp_path / 'other'
  shutil.copytree(run_dir, other)
  saved = json.loads((other / 'config.json').read_text())
  saved['model']['mlp_dim'] = 96
  (other / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(ckpt_lib.CheckpointError, match='do not match the model its config.json'):
    frozen.load(str(other), mesh, rules)


def test_its_validation_loss_is_the_number_the_trainer_logged(run_dir):
  """loop.frozen_validation_loss (scaling's re-measurement, rho1's reference) re-measures a
  finished run from its checkpoint: the same batches and task give the trainer's final number."""
  cfg = config_files.load_run_config(str(run_dir))
  tok, _, _, mesh, rules = loop.build(cfg)
  with open(run_dir / 'metrics.jsonl') as f:
    logged = [json.loads(line)['val_loss'] for line in f if '"val_loss"' in line][-1]
  got = loop.frozen_validation_loss(cfg, frozen.load(str(run_dir), mesh, rules), tok, mesh, rules)
  assert got == pytest.approx(logged, rel=1e-6)
