"""Keep freed host memory in the process, so XLA's CPU buffers are not page-faulted in every step.

XLA's CPU runtime allocates each execution's temporary buffer with malloc and frees it at the end
(153 MB per step for the quickstart model). glibc serves an allocation that large from a fresh
`mmap` and returns it with `munmap`, because the allocating threads are XLA's pool threads and a
thread's own malloc arena cannot hold a chunk over 64 MB. Every step then takes ~39,000 minor page
faults (the kernel zeroes each 4 KiB page on first touch). PyTorch's CPU tensors, smaller and
allocated on the main thread, mostly escape this.

`reuse_freed_memory()` sets three glibc malloc options:
  * M_ARENA_MAX = 1: every thread allocates from the main arena, which grows with `brk` and can
    hold chunks of any size;
  * M_MMAP_MAX = 0: no allocation is served by a one-off `mmap`;
  * M_TRIM_THRESHOLD = 2 GiB - 1: freed memory at the top of the heap stays mapped.
The temporary buffer is then the same already-mapped memory in every step (faults per step drop
from ~39,000 to none once the heap has grown to fit; the speed-up is in benchmarks/RESULTS.md).
The prices: the process keeps freed memory instead of giving it back to the OS, as PyTorch's and
JAX's device allocators already do; and compiling is about a quarter slower, because the
compiler's threads then share one malloc lock.

It is opt-in: it pays on XLA:CPU only, and on a TPU or GPU host it would cost compile time and
put the input pipeline's threads on one malloc arena for nothing. A run asks for it with
`config.host_malloc='reuse'` (the quickstart configs do; the default is 'default', glibc's own
behaviour); the environment variable `PATHWAYS_HOST_MALLOC=reuse|default`, when set, overrides
the config either way. The CPU benchmarks call `reuse_freed_memory()` themselves. Call it before
JAX starts its CPU backend (the CLIs do so once the config is read, before anything runs):
threads that have already allocated keep their own arenas. It does nothing off glibc (macOS,
musl).

Compiling a step frees hundreds of MB that the heap would then keep (the benchmark step's
process held 1.2 GB instead of 0.68 GB). `release_free_memory()` (glibc's malloc_trim) hands the
free heap pages back once; the trainer calls it after each compilation (0.64-0.78 GB then).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int


@functools.lru_cache(maxsize=None)
def _glibc():
  name = ctypes.util.find_library('c')
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    return libc
  except (OSError, AttributeError):
    return None


_enabled = False  # set by reuse_freed_memory(), once per process


_MODES = ('reuse', 'default')


def resolve_mode(requested: str = 'reuse') -> str:
  """The mode that applies: PATHWAYS_HOST_MALLOC when set, else `requested` (a run's
  config.host_malloc). ValueError naming the source for anything but 'reuse' or 'default'."""
  env = os.environ.get('PATHWAYS_HOST_MALLOC', '').strip().lower()
  if env and env not in _MODES:
    raise ValueError(f'PATHWAYS_HOST_MALLOC={os.environ["PATHWAYS_HOST_MALLOC"]!r} must be one '
                     f'of {", ".join(_MODES)} (or unset)')
  if requested not in _MODES:
    raise ValueError(f'config.host_malloc={requested!r} must be one of {", ".join(_MODES)}')
  return env or requested


def reuse_freed_memory(requested: str = 'reuse') -> bool:
  """Sets the malloc options above when `resolve_mode(requested)` is 'reuse'; True if they are
  set (glibc only). Raises ValueError for a mode that is neither."""
  global _enabled
  mode = resolve_mode(requested)
  if _enabled:
    return True
  if mode == 'default':
    return False
  libc = _glibc()
  if libc is None:
    return False
  ok = True
  for option, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)):
    ok &= libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1
  _enabled = bool(ok)
  return _enabled


def release_free_memory() -> None:
  """Returns the heap's free pages to the OS (after compiling); a no-op unless
  reuse_freed_memory() has set the options."""
  if _enabled:
    _glibc().malloc_trim(ctypes.c_size_t(0))


def trim_after_bulk_io() -> None:
  """Returns the free pages of every malloc arena to the OS, whatever the mode (glibc only).

  For a one-off phase that frees many small buffers on other threads: orbax's save of a run's
  frozen base (tensorstore's write buffers, about the base's size in chunks below the mmap
  threshold) leaves them in those threads' arenas, which glibc trims only when their top chunk
  is free. Held there, they add to the first step's peak (measured, benchmarks/RESULTS.md).
  """
  libc = _glibc()
  if libc is not None:
    libc.malloc_trim(ctypes.c_size_t(0))


def enabled() -> bool:
  """Whether reuse_freed_memory() has set the options in this process."""
  return _enabled
