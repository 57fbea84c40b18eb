"""host_memory: XLA's per-execution temporary buffer stops being page-faulted in every call."""
import json
import os
import platform
import subprocess
import sys

import pytest

from helpers import REPO, cli, cli_overrides

# A jitted function whose temporary buffer (the [4096, 4096] intermediates, 64 MiB each) is far
# over glibc's mmap threshold: by default every call maps it afresh and faults in every page.
_PROBE = r'''
import json, resource, sys
from pathways_jax import host_memory
enabled = host_memory.reuse_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.exp(x[:, None] + x[None, :]) * jnp.cos(x[:, None] - x[None, :])))
x = jnp.linspace(0.0, 1.0, 4096)
for _ in range(3):
  f(x).block_until_ready()
host_memory.release_free_memory()  # as the trainer does after compiling
for _ in range(3):
  f(x).block_until_ready()
per_call = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'enabled': enabled, 'faults_per_call': per_call}))
'''


def _probe(mode: str) -> dict:
  env = {**os.environ, 'PATHWAYS_HOST_MALLOC': mode, 'PYTHONPATH': REPO}
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                    reason='the malloc options are glibc\'s')
def test_reuse_stops_per_call_page_faults():
  default, reuse = _probe('default'), _probe('reuse')
  assert not default['enabled'] and reuse['enabled']
  pages = 64 * 2**20 // 4096
  assert min(default['faults_per_call']) > pages  # the baseline the option exists for
  # With reuse, most calls fault nothing. A few early ones still fault the whole buffer: a small
  # allocation has split the freed one, and the heap grows by a buffer, until it holds enough
  # (measured: 0-7 of 30 calls, then none).
  quiet = [n for n in reuse['faults_per_call'] if n < pages / 10]
  assert len(quiet) >= len(reuse['faults_per_call']) // 2, reuse
  assert max(quiet) < 100, reuse


def test_training_with_reuse_gives_the_same_losses(tmp_path, monkeypatch):
  """The CLI turns reuse on before JAX starts, and the trainer hands pages back after compiling.
  Only where the memory comes from changes: the losses are the same to the bit."""
  flags_ = cli_overrides('experiments/quickstart.py', str(tmp_path / 'cache')) + [
      '--config.train.steps=6', '--config.train.eval_every=3',
      '--config.train.checkpoint_every=100']
  runs = {}
  for mode in ('default', 'reuse'):
    monkeypatch.setenv('PATHWAYS_HOST_MALLOC', mode)
    out = cli('pathways_jax.main', *flags_, f'--workdir={tmp_path / mode}')
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / mode / 'metrics.jsonl') as f:
      losses = {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}
    with open(tmp_path / mode / 'results.json') as f:
      runs[mode] = (losses, json.load(f))
  glibc = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'
  assert runs['reuse'][1]['device']['host_malloc'] == ('reuse' if glibc else 'default')
  assert runs['default'][1]['device']['host_malloc'] == 'default'
  assert len(runs['reuse'][0]) == 6 and runs['reuse'][0] == runs['default'][0]
  assert runs['reuse'][1]['val_loss'] == runs['default'][1]['val_loss']


def test_reuse_is_opt_in_and_the_environment_overrides_the_config(monkeypatch):
  from pathways_jax import config as config_lib
  from pathways_jax import host_memory
  assert config_lib.base_config().host_malloc == 'default'  # off unless a run asks for it
  monkeypatch.delenv('PATHWAYS_HOST_MALLOC', raising=False)
  assert [host_memory.resolve_mode(m) for m in ('default', 'reuse')] == ['default', 'reuse']
  monkeypatch.setenv('PATHWAYS_HOST_MALLOC', 'Default ')
  assert host_memory.resolve_mode('reuse') == 'default'
  monkeypatch.setenv('PATHWAYS_HOST_MALLOC', 'reuse')
  assert host_memory.resolve_mode('default') == 'reuse'
  with pytest.raises(ValueError, match=r"config\.host_malloc='yes' must be one of reuse"):
    host_memory.resolve_mode('yes')
  with pytest.raises(config_lib.ConfigError, match='host_malloc'):
    cfg = config_lib.base_config()
    cfg.host_malloc = 'always'
    config_lib.validate(cfg)


def test_the_cli_takes_the_mode_from_the_config(tmp_path, monkeypatch):
  """No environment variable: the quickstart's own config turns reuse on (on glibc), a run that
  says host_malloc='default' leaves malloc alone."""
  monkeypatch.delenv('PATHWAYS_HOST_MALLOC', raising=False)
  flags_ = cli_overrides('experiments/quickstart.py', str(tmp_path / 'cache')) + [
      '--config.train.steps=1', '--config.train.eval_every=100',
      '--config.train.checkpoint_every=100']
  glibc = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'
  for extra, want in (([], 'reuse' if glibc else 'default'),
                      (['--config.host_malloc=default'], 'default')):
    out = cli('pathways_jax.main', *flags_, *extra, f'--workdir={tmp_path / want}')
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / want / 'results.json') as f:
      assert json.load(f)['device']['host_malloc'] == want


@pytest.mark.parametrize('module', ['pathways_jax.main', 'pathways_jax.sweep'])
def test_a_bad_mode_is_a_one_line_error(tmp_path, monkeypatch, module):
  monkeypatch.setenv('PATHWAYS_HOST_MALLOC', 'defualt')
  out = cli(module, '--config=experiments/quickstart.py', f'--workdir={tmp_path / "r"}')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      "error: PATHWAYS_HOST_MALLOC='defualt' must be one of reuse, default (or unset)"]
  assert not (tmp_path / 'r').exists()  # stopped before touching the run directory
