"""Session-wide test setup: cheaper XLA compilation, shared by every test of the session.

The end-to-end tests train tiny models, so on a 2-core CPU compiling their programs (init, train,
eval, sampling) takes most of their time. Many tests compile the same programs again, in this
process, in CLI subprocesses and in notebook kernels. Two settings cut that time, and both reach
the subprocesses through the environment:

* One persistent JAX compilation cache per test session. It lives in this session's pytest temp
  root, which the xdist workers share and every `pytest` run gets new, so a run never reuses
  programs compiled by an earlier one.
* XLA's CPU backend at optimisation level 0 (`--xla_backend_optimization_level=0`). HLO fusion
  and layout passes still run; only the code generation is less optimised. A tiny training run
  (tests/helpers.tiny_config, no cache) took 4.5 s instead of 8.9 s this way. Set
  PATHWAYS_TEST_XLA_OPT_LEVEL=default to run the suite with XLA's default code generation.

The suite also runs with glibc's default malloc (PATHWAYS_HOST_MALLOC=default, unless set):
pathways_jax.host_memory speeds up training steps but slows compiling by about a quarter, and
these tests mostly compile. tests/test_host_memory.py turns it on where it tests it.
"""
import os

import pytest

from helpers import session_dir

_OPT_FLAG = '--xla_backend_optimization_level'

_CACHE_ENV = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
              'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def pytest_configure(config):
  """Runs before the test modules are imported, so before any JAX backend starts."""
  del config
  flags = os.environ.get('XLA_FLAGS', '')
  level = os.environ.get('PATHWAYS_TEST_XLA_OPT_LEVEL', '0')
  if _OPT_FLAG not in flags and level != 'default':
    os.environ['XLA_FLAGS'] = f'{flags} {_OPT_FLAG}={level}'.strip()
  os.environ.setdefault('PATHWAYS_HOST_MALLOC', 'default')


@pytest.fixture(scope='session', autouse=True)
def cpu_kernel_cache(tmp_path_factory):
  """Builds the CPU attention kernel (kernels_cpu) once per session, from this checkout's source,
  into the session directory; subprocesses inherit it through the environment."""
  if os.environ.get('PATHWAYS_KERNEL_CACHE'):
    yield os.environ['PATHWAYS_KERNEL_CACHE']
    return
  path = str(session_dir(tmp_path_factory, 'kernel_cache'))
  os.environ['PATHWAYS_KERNEL_CACHE'] = path
  yield path
  os.environ.pop('PATHWAYS_KERNEL_CACHE', None)


@pytest.fixture(scope='session', autouse=True)
def jax_compilation_cache(tmp_path_factory):
  """Points this process (and, through the environment, every subprocess) at the session cache."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):  # the user chose one: respect it
    yield os.environ['JAX_COMPILATION_CACHE_DIR']
    return
  import jax  # pylint: disable=g-import-not-at-top
  path = str(session_dir(tmp_path_factory, 'jax_cache'))
  saved = {k: os.environ.get(k) for k in ('JAX_COMPILATION_CACHE_DIR', *_CACHE_ENV)}
  os.environ.update(JAX_COMPILATION_CACHE_DIR=path, **_CACHE_ENV)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  yield path
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
