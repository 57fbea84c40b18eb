"""Scale-out on CPU: strategies on 8 fake devices, two real processes, failures, the dry run.

Everything runs in subprocesses, because the fake device count (XLA_FLAGS) must be set before JAX
starts and each multi-host process is its own JAX runtime. Tiny models, a few steps each.
"""
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, cli_overrides, session_dir, xla_flags
from numerics import assert_close

PY = sys.executable


@contextlib.contextmanager
def _once(directory):
  with open(directory / '.lock', 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


_SHARED = None  # this session's directory shared by the xdist workers (set by a fixture)


def _env(devices: int | None) -> dict:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  env['XLA_FLAGS'] = xla_flags(devices)  # the compilation cache comes through os.environ
  return env


def _free_port() -> int:
  """A free port no other test of this session (any xdist worker) has been given."""
  used_file = os.path.join(_SHARED, 'ports.txt')
  with open(used_file + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    used = set(open(used_file).read().split()) if os.path.exists(used_file) else set()
    while True:
      with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
      if str(port) not in used:
        break
    with open(used_file, 'a') as f:
      f.write(f'{port}\n')
  return port


def _main(*args, devices=None, **kw) -> subprocess.Popen:
  return subprocess.Popen([PY, '-m', 'pathways_jax.main', *args], cwd=REPO, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=300) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def _first_errors(out: str, n: int = 5) -> str:
  """The first lines that look like errors: when one process fails, the other's runtime aborts
  with pages of stack traces that push the cause out of an output's tail."""
  lines = [l for l in out.splitlines() if 'error' in l.lower()][:n]
  return ''.join(f'  {l[:300]}\n' for l in lines)


def _losses(workdir) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  global _SHARED
  _SHARED = str(session_dir(tmp_path_factory, 'multihost'))
  return str(session_dir(tmp_path_factory, 'data_cache'))


def _flags(cache, *extra):
  """The tiny CLI config, FSDP inside each 4-device process and data parallel across the two."""
  return cli_overrides('experiments/quickstart.py', cache) + [
      '--config.data.batch_size=8', '--config.data.eval_batches=0', '--config.sample.prompts=()',
      '--config.train.steps=6', '--config.train.checkpoint_every=1000',
      '--config.mesh.data=1', '--config.mesh.fsdp=-1', '--config.mesh.dcn_data=2', *extra]


# --------------------------------------------------------------------------- 8 fake devices

# Another sharding sums the same gradients in another order: a loss after s steps carries the
# rounding of s updates, each summed over a step's tokens (sharding_worker: STEPS x B x L).
_WORKER_TERMS = 3 * 8 * 32

@pytest.fixture(scope='module')
def sharding_results(tmp_path_factory, cache):
  """tests/sharding_worker.py's measurements, computed once per session even under xdist."""
  shared = session_dir(tmp_path_factory, 'sharding')
  out = shared / 'out.json'
  with _once(shared):
    if not out.exists():
      done = subprocess.run([PY, os.path.join(REPO, 'tests', 'sharding_worker.py'), str(out)],
                            cwd=REPO, env={**_env(8), 'CACHE': cache}, capture_output=True,
                            text=True, timeout=600)
      assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(out.read_text())


def test_every_strategy_matches_the_one_device_losses(sharding_results):
  r = sharding_results
  assert r['devices'] == 8
  assert r['mesh']['fsdp_tp'] == {'data': 1, 'fsdp': 2, 'tensor': 4}
  for name, losses in r['losses'].items():
    assert_close(losses, r['one_device'], terms=_WORKER_TERMS, err_msg=name)
  # Each strategy really shards what it should: w_gate is [embed 32, mlp 64], wq [32, 8 heads, 4].
  assert r['w_gate_shard'] == {'dp': [32, 64], 'fsdp': [4, 64], 'tp': [32, 8],
                               'fsdp_tp': [16, 16]}
  assert r['wq_shard'] == {'dp': [32, 8, 4], 'fsdp': [4, 8, 4], 'tp': [32, 1, 4],
                           'fsdp_tp': [16, 2, 4]}
  # Initialised directly into its shardings, with the same values as on one device.
  assert r['sharded_init_max_diff'] == 0.0


def test_fsdp_holds_at_most_a_sixth_of_the_data_parallel_state(sharding_results):
  dp, fsdp = sharding_results['state_bytes']['dp'], sharding_results['state_bytes']['fsdp']
  assert dp > 0 and fsdp <= dp / 6, (dp, fsdp)


def test_a_checkpoint_restores_onto_another_mesh_with_the_same_next_loss(sharding_results):
  r = sharding_results['reshard']
  assert r['fsdp2_tp4_w_gate_shard'] == [16, 16] and r['one_device_w_gate_shard'] == [32, 64]
  assert r['fsdp2_tp4_step'] == r['one_device_step'] == 3
  assert_close([r['fsdp2_tp4'], r['one_device']], [r['fsdp8']] * 2, terms=_WORKER_TERMS)


@pytest.mark.parametrize('case,message', [
    ('mesh_product', r'data x fsdp x tensor = \[3, 2, 1\] = 6 devices, but 8 are available'),
    ('batch', r'batch_size=4 .* not divisible by the 8 data-parallel devices'),
    ('rule_axis', r"rule for 'embed' names mesh axis 'model'"),
    ('dcn_slices', r'8 devices do not split into 3 equal slices'),
])
def test_bad_mesh_inputs_fail_the_trainer_clearly(sharding_results, case, message):
  assert __import__('re').search(message, sharding_results['errors'][case]), \
      sharding_results['errors'][case]


# ------------------------------------------------------------------------ two real processes

def test_two_processes_match_one_process_and_their_checkpoint_resumes_in_one(tmp_path, cache):
  port = _free_port()
  mp, ref = tmp_path / 'mp', tmp_path / 'ref'
  procs = [_main(*_flags(cache, '--config.train.stop_at=4'), f'--workdir={mp}',
                 f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                 f'--process_id={i}', '--heartbeat_timeout_s=30', devices=4) for i in (0, 1)]
  ref_proc = _main(*_flags(cache), f'--workdir={ref}', devices=8)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, (f'process {i}:\n{_first_errors(out)}{out[-3000:]}\nother:\n'
                               f'{_first_errors(outs[1 - i])}{outs[1 - i][-3000:]}')
  _finish(ref_proc)
  assert "mesh={'data': 2, 'fsdp': 4, 'tensor': 1}" in outs[0]
  assert 'model:' not in outs[1]  # only process 0 logs
  assert sorted(os.listdir(mp / 'checkpoints' / '4' / 'data')) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  assert max(_losses(mp)) == 4
  # Resume the two-process checkpoint in one process on one device (a different mesh, too).
  _finish(_main(*_flags(cache, '--config.mesh.dcn_data=1', '--config.mesh.fsdp=1',
                        '--config.mesh.data=-1'), f'--workdir={mp}'))
  got, want = _losses(mp), _losses(ref)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
  # Six steps of 8 x 32 tokens (quickstart's rows, shortened by cli_overrides).
  assert_close([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], terms=6 * 8 * 32)


def test_two_processes_stream_disjoint_slices_of_a_prepared_dataset_and_resume_in_one(
    tmp_path, cache):
  """corpus='prepared': each process reads only its rows of each batch from the shards; the
  two-process run logs the one-process losses (so the slices' union is the batch) and its
  checkpointed iterator resumes in one process where it stopped."""
  from pathways_jax.config import base_config  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import prepare  # pylint: disable=g-import-not-at-top
  cfg = base_config()
  flags = dict(f[len('--config.'):].split('=', 1) for f in _flags(cache)
               if f.startswith('--config.'))
  cfg.data.cache_dir, cfg.data.corpus, cfg.data.tokenizer = cache, 'synthetic', 'byte'
  for key in ('num_people', 'num_stories', 'num_arithmetic'):
    cfg.data.synthetic[key] = int(flags[f'data.synthetic.{key}'])
  cfg.data.seq_len = int(flags['data.seq_len'])
  prepare.prepare(cfg, str(tmp_path / 'ds'), workers=1, progress=False)
  data = ['--config.data.corpus=prepared', f'--config.data.path={tmp_path / "ds"}',
          '--config.data.eval_batches=1']
  port = _free_port()
  mp, ref = tmp_path / 'mp', tmp_path / 'ref'
  procs = [_main(*_flags(cache, *data, '--config.train.stop_at=3'), f'--workdir={mp}',
                 f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                 f'--process_id={i}', '--heartbeat_timeout_s=30', devices=1) for i in (0, 1)]
  ref_proc = _main(*_flags(cache, *data, '--config.mesh.dcn_data=1'), f'--workdir={ref}',
                   devices=2)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i}:\n{_first_errors(out)}{out[-3000:]}'
  _finish(ref_proc)
  assert max(_losses(mp)) == 3
  _finish(_main(*_flags(cache, *data, '--config.mesh.dcn_data=1', '--config.mesh.fsdp=1',
                        '--config.mesh.data=-1'), f'--workdir={mp}'))
  got, want = _losses(mp), _losses(ref)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
  assert_close([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], terms=6 * 8 * 32)


def _wait_for_line(proc, text, timeout) -> str:
  """Reads proc's output until it contains `text`; fails after `timeout` seconds."""
  seen, deadline = b'', time.time() + timeout
  while time.time() < deadline and text.encode() not in seen:
    ready, _, _ = select.select([proc.stdout], [], [], 1.0)
    if ready:  # raw reads: nothing is left in a Python buffer that select cannot see
      chunk = os.read(proc.stdout.fileno(), 1 << 16)
      if not chunk:
        break
      seen += chunk
  if text.encode() not in seen:
    raise AssertionError(f'no {text!r} within {timeout} s:\n' + seen.decode()[-3000:])
  return seen.decode()


def test_a_dead_process_makes_the_other_exit_nonzero_soon(tmp_path, cache):
  # The same run as above (its programs are in the compilation cache); process 1 is killed once
  # both have initialised and process 0 has entered the training loop.
  port = _free_port()
  procs = [_main(*_flags(cache), f'--workdir={tmp_path / "run"}',
                 f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                 f'--process_id={i}', '--heartbeat_timeout_s=20', devices=4) for i in (0, 1)]
  try:
    _wait_for_line(procs[0], 'model:', 240)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    out, _ = procs[0].communicate(timeout=120)
    waited = time.time() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  assert procs[0].returncode != 0
  assert waited < 60, waited
  assert 'another task died' in out or 'unhealthy' in out, out[-2000:]


def test_a_process_late_to_the_first_collective_is_waited_for(cache):
  # gloo lets processes meet at a first collective at most 30 s apart; a host still compiling
  # would miss that. The train/eval steps compile, then wait at a barrier (no such limit).
  port = _free_port()
  procs = [subprocess.Popen([PY, os.path.join(REPO, 'tests', 'skew_worker.py'), str(i), str(port),
                             '35'], cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
  for i, p in enumerate(procs):
    out = _finish(p, timeout=180)
    assert f'process {i}: sum 6.0' in out


def test_an_unreachable_coordinator_fails_the_cli_with_one_line(tmp_path, cache):
  port = _free_port()
  t0 = time.time()
  proc = _main('--config=experiments/quickstart.py', f'--workdir={tmp_path}/r',
               f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--process_id=1',
               '--init_timeout_s=2')
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 1
  last = out.strip().splitlines()[-1]
  assert last.startswith(f'error: cannot reach the coordinator at 127.0.0.1:{port} within 2 s')
  assert 'Traceback' not in out
  assert time.time() - t0 < 60


# ---------------------------------------------------------------------------------- dry run

def test_dry_run_compiles_a_pod_config_on_fake_devices(cache):
  out = _finish(_main('--config=experiments/pods/ar_1b_8xh100.py', '--dry_run'))
  assert "8 fake CPU devices), mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
  assert 'per-device memory (compiled memory analysis)' in out
  assert 'of 80 GiB HBM: fits' in out
  assert 'FLOPs per step: ' in out and 'steps: 150,000' in out
  # The backends the CPU compile took, and why the config's cuDNN attention was not among them.
  assert ('attention (as compiled here, on CPU): cudnn -> xla (it needs a GPU (backend is cpu))'
          in out)
  assert "cross-entropy: fused (train.cross_entropy='auto'" in out  # vocabulary 32768


def test_the_embedding_lookup_on_a_data_x_fsdp_mesh_is_not_rematerialized(cache):
  """The multi-slice config's layout (data 2 x fsdp 4 here) at toy size: without the lookup's
  own layout (transformer._lookup_layout) XLA warns 'Involuntary full rematerialization' and
  all-gathers the [tokens, d_model / fsdp] lookup every step."""
  out = _finish(_main('--config=experiments/pods/llada_8b_2x_v5p128.py', '--dry_run',
                      '--dry_run_devices=8', '--config.pod.devices=8', '--config.mesh.fsdp=4',
                      '--config.model.d_model=256', '--config.model.num_layers=2',
                      '--config.model.num_heads=4', '--config.model.num_kv_heads=4',
                      '--config.model.mlp_dim=512', '--config.data.seq_len=256',
                      '--config.model.max_len=256', '--config.data.batch_size=16'))
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in out
  assert 'Involuntary full rematerialization' not in out


def test_dry_run_rejects_a_config_that_does_not_fit_or_has_no_device_count(cache):
  tiny = cli_overrides('experiments/quickstart.py', cache)
  proc = _main(*tiny, '--dry_run', '--dry_run_devices=4', '--config.mesh.fsdp=2',
               '--config.pod.hbm_gib=0.0001')
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1, out[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out and 'DOES NOT FIT' in out
  assert out.strip().splitlines()[-1].startswith('error: dry run: estimated peak')
  proc = _main(*tiny, '--dry_run')
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1 and 'give --dry_run_devices=N' in out


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(f for f in os.listdir(os.path.join(REPO, 'experiments',
                                                                            'pods'))
                                        if f.endswith('.py')))
def test_every_pod_config_passes_the_dry_run(name):
  out = _finish(_main(f'--config=experiments/pods/{name}', '--dry_run'), timeout=900)
  assert 'HBM: fits' in out, out[-3000:]
