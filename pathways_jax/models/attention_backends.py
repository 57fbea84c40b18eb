"""Attention backends by name: the kernels `model.attention` may choose, looked up at trace time.

`attention.attend(..., implementation=NAME)` calls the backend registered as NAME with an
`AttentionCall`. A backend returns the output [B, L, H, D], or raises `NotTaken(reason)` when it
cannot serve this call (wrong platform, a KV cache, packed segments it cannot mask, a kernel that
failed to build); the dispatcher then warns once with the reason and runs 'xla', which serves
every call. The model imports no kernel module: the built-in entries below import theirs the
first time a call reaches them, so the C++ CPU kernel is compiled only in runs that ask for it.

    @attention_backends.register('mine')
    def mine(call: AttentionCall) -> jax.Array: ...
    # then --config.model.attention=mine (register it in the config file, as tasks are)

`recording()` collects what each traced attention call asked for and ran (the dry run prints it).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
from typing import Any, Callable

_LOG = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def warn_once(msg: str) -> None:
  _LOG.warning(msg)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """One attention call's operands and flags (see `attention.attend`)."""
  q_BLHD: Any
  k_BSKD: Any
  v_BSKD: Any
  q_segment_BL: Any
  kv_segment_BS: Any
  q_positions_BL: Any
  kv_positions_BS: Any
  causal: bool
  scale: float
  packed: bool  # False promises one document per row and no cache
  kv_from_cache: bool

  @property
  def self_attention(self) -> bool:
    return self.q_BLHD.shape[1] == self.k_BSKD.shape[1]


class NotTaken(Exception):
  """A backend cannot serve this call; the message says why (the dispatcher runs 'xla')."""


Backend = Callable[[AttentionCall], Any]
_REGISTRY: dict[str, Backend | None] = {'xla': None}  # 'xla' is attention.py's own einsum path


def register(name: str) -> Callable[[Backend], Backend]:
  def wrap(fn: Backend) -> Backend:
    if not callable(fn):
      raise TypeError(f'attention backend {name!r} must be callable')
    _REGISTRY[name] = fn
    return fn
  return wrap


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Backend | None:
  """The backend registered as `name` (None for 'xla')."""
  if name not in _REGISTRY:  # config.validate names it first for a run's config
    raise ValueError(f'config.model.attention={name!r} is not an attention backend; known: '
                     f'{sorted(_REGISTRY)}')
  return _REGISTRY[name]


# ------------------------------------------------------------------------------ what was taken

Choice = collections.namedtuple('Choice', 'requested taken reason')
_RECORDS: list[list[Choice]] = []


@contextlib.contextmanager
def recording():
  """Collects a `Choice` per attention call traced inside (a scanned layer stack traces once)."""
  record: list[Choice] = []
  _RECORDS.append(record)
  try:
    yield record
  finally:
    _RECORDS.remove(record)


def note(requested: str, taken: str, reason: str = '') -> None:
  for record in _RECORDS:
    record.append(Choice(requested, taken, reason))


def summarize(record: list[Choice]) -> list[str]:
  """One line per distinct choice: 'cudnn -> xla (reason): 2 traced calls'."""
  counts = collections.Counter(record)
  lines = []
  for (requested, taken, reason), n in sorted(counts.items()):
    what = requested if requested == taken else f'{requested} -> {taken}'
    lines.append(f'{what}{f" ({reason})" if reason else ""}: {n} traced call{"s" * (n != 1)}')
  return lines


# ------------------------------------------------------------------------------- built-in ones

def _platform() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend()


@register('pallas')
def _pallas(call: AttentionCall):
  """kernels_pallas.flash_attention: causality by index order (positions increase within each
  segment in packed rows). Off GPU/TPU it runs the Pallas interpreter (for tests)."""
  if not call.self_attention:
    raise NotTaken('it has no KV-cache path (cached decoding)')
  from kernels_pallas import flash_attention as fa  # pylint: disable=g-import-not-at-top
  if _platform() not in ('gpu', 'tpu'):
    warn_once(f"attention='pallas' on {_platform()} runs the Pallas interpreter (slow: meant for "
              'tests)')
  return fa.flash_attention(call.q_BLHD, call.k_BSKD, call.v_BSKD, causal=call.causal,
                            segment_ids_BL=call.q_segment_BL if call.packed else None,
                            sm_scale=call.scale)


@register('cpu')
def _cpu(call: AttentionCall):
  """kernels_cpu.attention: the fused C++ kernel for XLA:CPU (forward and backward, XLA FFI),
  compiled on first use; the exact mask rule (any segments, positions and cache); a query that
  sees no key gets a zero output where 'xla' averages all values."""
  if _platform() != 'cpu':
    raise NotTaken(f'it is the XLA:CPU kernel (backend is {_platform()})')
  from kernels_cpu import attention as cpu_attention  # pylint: disable=g-import-not-at-top
  try:
    cpu_attention.ensure_built()
  except cpu_attention.KernelBuildError as e:
    raise NotTaken(str(e)) from None
  return _per_batch_shard(
      lambda q, k, v, qs, ks, qp, kp: cpu_attention.attention(
          q, k, v, q_segment_BL=qs, kv_segment_BS=ks, q_positions_BL=qp, kv_positions_BS=kp,
          causal=call.causal, scale=call.scale),
      call.q_BLHD, call.k_BSKD, call.v_BSKD, call.q_segment_BL, call.kv_segment_BS,
      call.q_positions_BL, call.kv_positions_BS)


@register('cudnn')
def _cudnn(call: AttentionCall):
  """cuDNN's fused attention through jax.nn.dot_product_attention, which masks by causality and
  sequence lengths, not by segments: packed rows and cached decoding stay on 'xla'."""
  if _platform() != 'gpu':
    raise NotTaken(f'it needs a GPU (backend is {_platform()})')
  if call.packed or not call.self_attention:
    raise NotTaken('jax.nn.dot_product_attention takes no segment ids or cache (packed rows, '
                   'decoding)')
  import jax  # pylint: disable=g-import-not-at-top
  return jax.nn.dot_product_attention(call.q_BLHD, call.k_BSKD, call.v_BSKD, is_causal=call.causal,
                                      scale=call.scale, implementation='cudnn')


def _per_batch_shard(kernel, *args):
  """`kernel(*args)` run per batch shard when a multi-device mesh shards the batch.

  XLA cannot partition a custom call: left alone, it would gather every operand onto every
  device. Under `jax.set_mesh` the batch axis is split the way the logical rules map
  'activation_batch'; the heads are gathered (a kernel takes all of a row's heads).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = None
  if not mesh.empty and mesh.size > 1:
    batch_axes = nn.logical_to_mesh_axes(('activation_batch',))[0]
    if isinstance(batch_axes, str):
      batch_axes = (batch_axes,)
    batch_axes = tuple(a for a in batch_axes or () if a in mesh.axis_names)
  if not batch_axes:
    return kernel(*args)
  spec = jax.sharding.PartitionSpec(batch_axes)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                       check_vma=False)(*args)


# Off TPU, 'splash' declines; tests set this to run its kernels in the Pallas interpreter.
SPLASH_INTERPRET_OFF_TPU = False
_SPLASH_TILE = 128


@register('splash')
def _splash(call: AttentionCall):
  """TPU splash attention (jax.experimental.pallas.ops.tpu), the standard kernel for packed rows:
  segment ids, causal or full masks, blocks of the score matrix that the mask empties skipped.
  Grouped-query heads run as one multi-query kernel per KV head; causality by index order, as
  'pallas' (positions increase within each segment in packed rows)."""
  if not call.self_attention:
    raise NotTaken('it has no KV-cache path (cached decoding)')
  if _platform() != 'tpu' and not SPLASH_INTERPRET_OFF_TPU:
    raise NotTaken(f'it is a TPU kernel (backend is {_platform()})')
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import splash_attention  # imported only when asked for
  sk, sm = splash_attention.splash_attention_kernel, splash_attention.splash_attention_mask
  b, l, h, d = call.q_BLHD.shape
  kh = call.k_BSKD.shape[2]
  g = h // kh
  if l % _SPLASH_TILE:
    raise NotTaken(f'rows of {l} tokens: splash tiles rows in blocks of {_SPLASH_TILE}')
  block = max(c for c in (512, 256, 128) if l % c == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  head_mask = sm.CausalMask((l, l)) if call.causal else sm.FullMask((l, l))
  kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([head_mask] * g), block_sizes=sizes,
                                            interpret=_platform() != 'tpu')
  # splash takes no scale: queries come scaled. [B, L, KH*G, D] -> [B, KH, G, L, D].
  q = (call.q_BLHD * call.scale).astype(call.q_BLHD.dtype)
  q = q.reshape(b, l, kh, g, d).transpose(0, 2, 3, 1, 4)
  k, v = (x.transpose(0, 2, 1, 3) for x in (call.k_BSKD, call.v_BSKD))  # [B, KH, L, D]
  packed = call.packed

  def rows(q, k, v, q_seg, kv_seg):
    def row(q_KGLD, k_KLD, v_KLD, qs_L, ks_L):
      ids = sk.SegmentIds(q=qs_L, kv=ks_L) if packed else None
      return jax.vmap(lambda qh, kh_, vh: kernel(qh, kh_, vh, segment_ids=ids))(
          q_KGLD, k_KLD, v_KLD)
    return jax.vmap(row)(q, k, v, q_seg, kv_seg)

  out = _per_batch_shard(rows, q, k, v, call.q_segment_BL, call.kv_segment_BS)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, d)
