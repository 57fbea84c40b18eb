"""Fused attention for XLA:CPU (attention.cc), built on first use and called through XLA FFI.

`attention(q, k, v, ...)` computes what `pathways_jax.models.attention._xla_attention` computes
under the project's mask rule, for any q/kv lengths (self-attention, KV-cache decoding), with its
own backward. It is what `model.attention='cpu'` runs. The differences from the XLA path:
- a query that sees no key at all (a padding position) gets output 0, not the mean of all values;
- inputs are computed in float32 (bf16 inputs are upcast, the output cast back).

The shared library is compiled once per machine with the C++ compiler found (`$CXX`, else c++,
g++, clang++) and cached under `$PATHWAYS_KERNEL_CACHE` (default ~/.cache/pathways_jax/kernels),
keyed by the source, the flags and the jaxlib version. AVX2/FMA are enabled when the CPU has them.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'attention.cc')
_FWD, _BWD = 'pathways_attention_fwd', 'pathways_attention_bwd'


class KernelBuildError(RuntimeError):
  """The CPU attention kernel could not be compiled or loaded."""


def _cpu_flags() -> list[str]:
  if platform.machine() not in ('x86_64', 'AMD64'):
    return []
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      words = set(f.read().split())
  except OSError:
    return []
  return ['-mavx2', '-mfma'] if {'avx2', 'fma'} <= words else []


def _compiler() -> str:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  raise KernelBuildError("model.attention='cpu' needs a C++ compiler to build its kernel, and none "
                         "was found ($CXX, c++, g++, clang++): install one, or use "
                         "model.attention='xla'")


def cache_dir() -> str:
  return os.environ.get('PATHWAYS_KERNEL_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'pathways_jax', 'kernels')


def build(force: bool = False) -> str:
  """Compiles attention.cc (unless cached) and returns the shared library's path."""
  flags = ['-O3', '-std=c++17', '-ffp-contract=fast', '-fPIC', '-shared', '-fno-math-errno', '-w'] + _cpu_flags()
  with open(_SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(source + ' '.join(flags).encode() + jaxlib.__version__.encode()).hexdigest()
  path = os.path.join(cache_dir(), f'attention_{key[:16]}.so')
  if os.path.exists(path) and not force:
    return path
  compiler = _compiler()
  # Built under a unique name, then renamed into place: processes building at once (test
  # workers, hosts sharing a home directory) never load a half-written library.
  try:
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache_dir())
  except OSError as e:
    raise KernelBuildError(f'kernel cache directory {cache_dir()!r} is not writable ({e}); set '
                           'PATHWAYS_KERNEL_CACHE to a writable directory') from e
  os.close(fd)
  cmd = [compiler, *flags, '-I', jax.ffi.include_dir(), _SOURCE, '-o', tmp]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    os.unlink(tmp)
    raise KernelBuildError(f"building the CPU attention kernel failed ({' '.join(cmd)}):\n"
                           f'{result.stderr[-2000:]}')
  os.replace(tmp, path)
  return path


def load_library() -> ctypes.CDLL:
  """The built kernel, loaded. A cached library that cannot be loaded (a truncated file, say) is
  rebuilt once before this gives up."""
  path = build()
  try:
    return ctypes.cdll.LoadLibrary(path)
  except OSError:
    path = build(force=True)
  try:
    return ctypes.cdll.LoadLibrary(path)
  except OSError as e:
    raise KernelBuildError(f'the CPU attention kernel {path} was rebuilt but cannot be loaded '
                           f'({e})') from e


@functools.lru_cache(maxsize=None)
def _register() -> None:
  lib = load_library()
  jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.PathwaysAttentionFwd), platform='cpu')
  jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.PathwaysAttentionBwd), platform='cpu')


def ensure_built() -> None:
  """Builds (or finds) and registers the kernel; raises KernelBuildError if it cannot."""
  _register()


def _ints(*arrays):
  return [a.astype(jnp.int32) for a in arrays]


def _forward(q_BLHD, k_BSKD, v_BSKD, masks, causal, scale):
  _register()
  b, l, h, _ = q_BLHD.shape
  f32 = jnp.float32
  call = jax.ffi.ffi_call(
      _FWD, (jax.ShapeDtypeStruct(q_BLHD.shape, f32), jax.ShapeDtypeStruct((b, h, l), f32)),
      vmap_method='sequential')
  return call(q_BLHD.astype(f32), k_BSKD.astype(f32), v_BSKD.astype(f32), *masks,
              causal=np.int32(causal), scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention(q_BLHD, k_BSKD, v_BSKD, q_segment_BL, kv_segment_BS, q_positions_BL,
               kv_positions_BS, causal, scale):
  masks = (q_segment_BL, kv_segment_BS, q_positions_BL, kv_positions_BS)
  return _forward(q_BLHD, k_BSKD, v_BSKD, masks, causal, scale)[0].astype(q_BLHD.dtype)


def _attention_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, scale):
  masks = (q_seg, kv_seg, q_pos, kv_pos)
  out, lse = _forward(q, k, v, masks, causal, scale)
  return out.astype(q.dtype), (q, k, v, masks, out, lse)


def _attention_bwd(causal, scale, res, dout):
  q, k, v, masks, out, lse = res
  f32 = jnp.float32
  call = jax.ffi.ffi_call(
      _BWD, (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct(k.shape, f32),
             jax.ShapeDtypeStruct(v.shape, f32)), vmap_method='sequential')
  dq, dk, dv = call(q.astype(f32), k.astype(f32), v.astype(f32), *masks, out, lse,
                    dout.astype(f32), causal=np.int32(causal), scale=np.float32(scale))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q_BLHD, k_BSKD, v_BSKD, *, q_segment_BL, kv_segment_BS, q_positions_BL,
              kv_positions_BS, causal: bool, scale: float) -> jax.Array:
  """Grouped-query attention under the project's mask rule; returns [B, L, H, D].

  H must be a multiple of K (= k_BSKD.shape[2]); query head h uses kv head h // (H / K).
  """
  q, k, v = jnp.shape(q_BLHD), jnp.shape(k_BSKD), jnp.shape(v_BSKD)
  if len(q) != 4 or len(k) != 4 or k != v or q[0] != k[0] or q[3] != k[3]:
    raise ValueError(f'attention wants q [B, L, H, D] and k, v [B, S, K, D]; got q {q}, k {k}, '
                     f'v {v}')
  if q[2] % k[2]:
    raise ValueError(f'{q[2]} query heads do not divide into {k[2]} kv heads')
  for name, arr, want in (('q_segment_BL', q_segment_BL, q[:2]),
                          ('q_positions_BL', q_positions_BL, q[:2]),
                          ('kv_segment_BS', kv_segment_BS, k[:2]),
                          ('kv_positions_BS', kv_positions_BS, k[:2])):
    if tuple(jnp.shape(arr)) != tuple(want):
      raise ValueError(f'{name} has shape {jnp.shape(arr)}, want {tuple(want)}')
  return _attention(q_BLHD, k_BSKD, v_BSKD,
                    *_ints(q_segment_BL, kv_segment_BS, q_positions_BL, kv_positions_BS),
                    bool(causal), float(scale))
