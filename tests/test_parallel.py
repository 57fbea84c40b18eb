"""Mesh sizes, logical rules and multi-host start-up: the parts that need no extra devices."""
import socket
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pathways_jax import config as config_lib
from pathways_jax import distributed, parallel

from helpers import cli, tiny_config


def _cfg(**mesh):
  c = config_lib.base_config()
  c.mesh.update(mesh)
  return c


@pytest.mark.parametrize('mesh,devices,want', [
    ({}, 8, (8, 1, 1)),
    (dict(data=1, fsdp=-1), 8, (1, 8, 1)),
    (dict(data=1, fsdp=2, tensor=-1), 8, (1, 2, 4)),
    (dict(data=-1, tensor=2), 8, (4, 1, 2)),
    (dict(data=1, fsdp=-1, dcn_data=2), 8, (2, 4, 1)),
    (dict(data=1, fsdp=-1, dcn_data=2), 128, (2, 64, 1)),
    (dict(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
])
def test_mesh_shape_fills_minus_one_and_multiplies_dcn(mesh, devices, want):
  assert parallel.mesh_shape(_cfg(**mesh), devices) == want


@pytest.mark.parametrize('mesh,devices,message', [
    (dict(data=3, fsdp=2), 8, r'= 6 devices, but 8 are available'),
    (dict(data=-1, fsdp=-1), 8, 'at most one'),
    (dict(data=-1, fsdp=3), 8, 'not a multiple of 3'),
    (dict(data=0), 8, 'positive or -1'),
    (dict(dcn_data=3), 8, '3 slices'),
    (dict(data=2, dcn_data=2), 8, r'per slice \(8 devices / 2 slices\)'),
])
def test_impossible_meshes_are_clear_errors(mesh, devices, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    parallel.mesh_shape(_cfg(**mesh), devices)


def test_dcn_minus_one_takes_the_slice_count():
  assert parallel.mesh_shapes(_cfg(data=1, fsdp=-1, dcn_data=-1), 16, num_slices=4) == (
      (1, 4, 1), (4, 1, 1))


def test_emulated_hybrid_mesh_keeps_each_slice_contiguous():
  # 8 fake devices as 2 slices x (fsdp 4): each row of the data axis is one slice's devices.
  arr = parallel._emulated_hybrid((1, 4, 1), (2, 1, 1), list(range(8)))  # pylint: disable=protected-access
  assert arr.shape == (2, 4, 1)
  assert arr[0].ravel().tolist() == [0, 1, 2, 3] and arr[1].ravel().tolist() == [4, 5, 6, 7]
  arr = parallel._emulated_hybrid((2, 1, 2), (2, 1, 1), list(range(8)))  # pylint: disable=protected-access
  assert sorted(arr[:2].ravel().tolist()) == [0, 1, 2, 3]


def test_one_device_mesh_from_the_default_config():
  mesh = parallel.make_mesh(_cfg())
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1, 'tensor': 1}


def test_config_rules_override_the_defaults_by_name():
  rules = dict(parallel.logical_rules(_cfg(rules=(('embed', None),
                                                  ('activation_batch', ('data', 'fsdp', 'tensor')),
                                                  ('vocab', ['fsdp', 'tensor'])))))
  assert rules['embed'] is None
  assert rules['activation_batch'] == ('data', 'fsdp', 'tensor')
  assert rules['vocab'] == ('fsdp', 'tensor')
  assert rules['mlp'] == 'tensor'  # untouched default
  assert parallel.logical_rules(_cfg()) == parallel.DEFAULT_RULES == parallel.logical_rules()


@pytest.mark.parametrize('rules,message', [
    ((('embed', 'model'),), r"names mesh axis 'model', which is not one of the mesh axes"),
    ((('embed', ('fsdp', 'pipeline')),), "mesh axis 'pipeline'"),
    ((('embbed', 'fsdp'),), "unknown logical axis 'embbed'"),
    ((('embed', ('fsdp', 'fsdp')),), 'twice'),
    (('embed',), 'not a \\(logical_name, mesh_axes\\) pair'),
])
def test_bad_rules_are_clear_errors(rules, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    parallel.logical_rules(_cfg(rules=rules))


def test_a_dimension_the_mesh_does_not_divide_is_replicated():
  mesh = jax.sharding.AbstractMesh((1, 2, 4), parallel.MESH_AXES)
  fit = parallel._fit_spec(P('fsdp', 'tensor', None), (32, 2, 8), mesh, 'wk')  # pylint: disable=protected-access
  assert fit == P('fsdp', None, None)


def test_batch_must_split_over_the_data_parallel_devices():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), parallel.MESH_AXES)
  cfg = tiny_config('/unused', **{'data.batch_size': 6})
  with pytest.raises(config_lib.ConfigError, match='not divisible by the 4 data-parallel'):
    parallel.check_batch(cfg, mesh)
  cfg = tiny_config('/unused', **{'data.batch_size': 8, 'train.grad_accum': 4})
  with pytest.raises(config_lib.ConfigError, match='per micro-batch 2'):
    parallel.check_batch(cfg, mesh)
  parallel.check_batch(tiny_config('/unused', **{'data.batch_size': 8}), mesh)


def test_strided_micro_batches_keep_each_devices_rows():
  from pathways_jax.train import step  # pylint: disable=g-import-not-at-top
  x = np.arange(8)
  micro = step._split_micro({'x': x}, 2)['x']  # pylint: disable=protected-access
  assert micro.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


class _Dev:
  def __init__(self, process_index):
    self.process_index = process_index


class _Mesh:
  def __init__(self, shape, owners):
    self.shape = dict(zip(parallel.MESH_AXES, shape))
    self.devices = np.vectorize(_Dev, otypes=[object])(np.asarray(owners).reshape(shape))


@pytest.mark.parametrize('shape,owners,want', [
    ((2, 4, 1), [0] * 4 + [1] * 4, [(0, 2), (1, 2)]),  # DP across processes, FSDP inside
    ((1, 8, 1), [0] * 4 + [1] * 4, [(0, 2), (1, 2)]),  # FSDP across both
    ((1, 1, 8), [0] * 4 + [1] * 4, [(0, 1), (0, 1)]),  # TP across both: same rows for both
    ((2, 2, 2), [0] * 4 + [1] * 4, [(0, 2), (1, 2)]),
    ((1, 2, 4), [0, 0, 1, 1, 0, 0, 1, 1], [(0, 1), (0, 1)]),  # tensor split over processes
    ((4, 1, 1), [0, 1, 2, 3], [(0, 4), (1, 4), (2, 4), (3, 4)]),
])
def test_each_process_feeds_the_rows_its_devices_hold(shape, owners, want):
  mesh = _Mesh(shape, owners)
  got = [parallel._process_batch_slice(mesh, p) for p in range(len(want))]  # pylint: disable=protected-access
  assert got == want


def test_a_mesh_that_scatters_a_processes_rows_is_a_clear_error():
  mesh = _Mesh((4, 1, 1), [0, 1, 0, 1])
  with pytest.raises(config_lib.ConfigError, match='not one aligned contiguous block'):
    parallel._process_batch_slice(mesh, 0)  # pylint: disable=protected-access


def test_one_process_feeds_the_whole_batch():
  mesh = parallel.make_mesh(_cfg())
  assert parallel.process_batch_slice(mesh) == (0, 1)
  batch = parallel.global_batch({'tokens': np.ones((4, 8), np.int32)}, mesh)
  assert batch['tokens'].shape == (4, 8)


# ----------------------------------------------------------------------------------- start-up

def test_single_process_start_up_is_a_no_op(monkeypatch):
  for var in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
              'MEGASCALE_COORDINATOR_ADDRESS', 'TPU_PROCESS_ADDRESSES'):
    monkeypatch.delenv(var, raising=False)
  assert distributed.detect_cluster() is None
  assert distributed.initialize() is False


@pytest.mark.parametrize('env,want', [
    ({'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '4'}, 'slurm'),
    ({'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}, None),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, 'ompi'),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),
])
def test_cluster_detection_from_the_environment(monkeypatch, env, want):
  for var in ('SLURM_JOB_ID', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS',
              'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
              'TPU_PROCESS_ADDRESSES'):
    monkeypatch.delenv(var, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert distributed.detect_cluster() == want


@pytest.mark.parametrize('args,message', [
    (('127.0.0.1:1234', 2, None), 'missing --process_id'),
    (('127.0.0.1', 2, 1), 'not HOST:PORT'),
    (('127.0.0.1:99999', 2, 1), 'not HOST:PORT'),
    (('127.0.0.1:1234', 2, 2), r'not in \[0, --num_processes=2\)'),
])
def test_bad_multihost_flags_are_clear_errors(args, message):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.initialize(*args)


def test_unreachable_coordinator_is_a_clear_error_in_bounded_time():
  with socket.socket() as s:  # a port nobody listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  t0 = time.monotonic()
  with pytest.raises(distributed.DistributedError, match=f'cannot reach the coordinator at '
                     f'127.0.0.1:{port} within 1 s'):
    distributed.wait_for_coordinator(f'127.0.0.1:{port}', 1)
  assert time.monotonic() - t0 < 10


def test_multihost_without_a_cluster_is_a_one_line_error(tmp_path):
  out = cli('pathways_jax.main', '--config=experiments/quickstart.py', f'--workdir={tmp_path}/r',
            '--multihost', timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().startswith('error: --multihost: JAX found no cluster to join')
  assert len(out.stderr.strip().splitlines()) == 1
