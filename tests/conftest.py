"""Session-wide test setup: one persistent JAX compilation cache for the whole test session.

Most end-to-end tests train the same tiny model (tests/helpers.py), in this process, in CLI
subprocesses and in notebook kernels, so they compile the same init, train, eval and sampling
programs again and again; on a 2-core CPU that compilation is most of their time. The cache lives
in this session's pytest temp root (shared by the xdist workers, new for every `pytest` run), so
a run never reuses programs compiled by an earlier one.
"""
import os

import pytest

from helpers import session_dir

_CACHE_ENV = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
              'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


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
