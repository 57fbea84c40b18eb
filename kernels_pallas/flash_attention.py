"""Flash attention in Pallas: forward, backward (dq and dk/dv kernels) and a pure-JAX reference.

    out_BLHD = flash_attention(q_BLHD, k_BLKD, v_BLKD, causal=True, segment_ids_BL=seg_BL)

The mask rule is the project's (pathways_jax.models.attention): query i sees key j iff they carry the
same segment id, the key's id is not 0 (padding) and, if causal, j <= i. A query that sees no key at
all (a padding row) gets output 0 and zero gradients, never NaN.

Design (see docs/kernels.md):
- The forward streams K/V blocks past one resident Q block with the online softmax, in the base-2
  domain (exp2 is one instruction on GPUs; the log2(e) factor is folded into the score scale), and
  stores the per-row log-sum-exp. The backward recomputes probabilities from that lse: one kernel
  owns a Q block and accumulates dQ over K/V blocks, the other owns a K/V block and accumulates
  dK/dV over Q blocks *and over the H/K query heads that share it* (GQA), so no [L, L] array and
  no per-query-head dK/dV copies ever exist.
- Causal block skipping is done with loop bounds, not masks: blocks above the diagonal are never
  visited, and blocks fully below it run a mask-free loop body. Only the diagonal band (and the
  block that holds the end of an odd-length sequence) pays for the iota/compare/select.
- Layout: on GPU (and in the interpreter) the kernels read [B, L, H, D] as given — a Triton tile
  is a strided pointer block, so a [block, D] slice of one head costs nothing extra, and the
  activations are never transposed. Mosaic (TPU) needs the last two block dims full or
  (8, 128)-aligned, which a one-head slice of [.., H, D] is not, so there the arrays are made
  head-major [B, H, L, D] first. Per-row statistics (lse, delta) are always [B, H, L, 1].
- Lengths are padded to a multiple of the block sizes here, not in the caller; padded keys are
  masked, padded queries are dropped on the way out.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
# Finite, so that exp2(m_prev - m_new) of a row that has seen only masked keys is exp2(0) = 1
# rather than exp2(-inf + inf) = NaN; scores in the log2 domain never come near it.
_M_INIT = -1e30
# Smallest block edge: tl.dot needs every matmul dimension >= 16.
_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. Forward: [block_q, D] Q tile against [block_k, D] K/V tiles. dq kernel: a
  [block_q_dq, D] Q tile against [block_k_dq, D] steps; dkv kernel: a [block_k_dkv, D] K/V tile
  against [block_q_dkv, D] steps. Must be powers of two >= 16 on GPU (Triton)."""
  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 32
  block_q_dkv: int = 32
  block_k_dkv: int = 64
  num_warps: int | None = None  # Triton only; None: 4 for head_dim <= 64, else 8
  num_stages: int = 2  # Triton only

  @classmethod
  def default(cls, backend: str, head_dim: int) -> 'BlockSizes':
    """Starting points, not tuned results (see docs/kernels.md).

    GPU: the Triton FA2 tutorial's shapes for H100 — a wide Q tile in the forward, and in the
    backward the tile that is resident (dQ's Q, dKV's K/V) wider than the streamed one, because the
    resident tile's accumulator lives in registers for the whole loop. Large head dims shrink the
    forward K step so that the [block_q, D] accumulator plus the K/V tiles fit in registers/SMEM.
    TPU: 128 everywhere (the MXU edge). CPU interpret: big blocks, because the interpreter's cost
    is per grid step, not per FLOP.
    """
    if backend == 'gpu':
      return cls(block_q=128, block_k=64 if head_dim <= 128 else 32, block_q_dq=128,
                 block_k_dq=32, block_q_dkv=32, block_k_dkv=128, num_stages=2)
    if backend == 'tpu':
      return cls(128, 128, 128, 128, 128, 128)
    return cls(128, 128, 128, 128, 128, 128)

  def clamp(self, length: int) -> 'BlockSizes':
    """Shrinks blocks for short sequences so padding stays below one block of 16."""
    cap = max(_MIN_BLOCK, 1 << max(0, (length - 1).bit_length()))
    return dataclasses.replace(self, **{f: min(getattr(self, f), cap) for f in _BLOCK_FIELDS})


_BLOCK_FIELDS = ('block_q', 'block_k', 'block_q_dq', 'block_k_dq', 'block_q_dkv', 'block_k_dkv')


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on (hashable: it is a custom_vjp nondiff argument)."""
  causal: bool
  scale: float
  blocks: BlockSizes
  length: int  # L before padding
  padded_length: int  # Lp, a multiple of every block size
  head_dim: int  # D before padding (Triton pads D to a power of two)
  groups: int  # H // K
  segments: bool
  lowering: str  # 'triton' | 'mosaic' | 'interpret'
  layout: str  # 'BLHD' | 'BHLD': how q/k/v/o and their gradients are laid out for the kernels


def _layout_for(lowering: str) -> str:
  return 'BHLD' if lowering == 'mosaic' else 'BLHD'


def _resolve_lowering(interpret) -> str:
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend not in ('gpu', 'tpu')
  if interpret:
    return 'interpret'
  if backend == 'gpu':
    return 'triton'
  if backend == 'tpu':
    return 'mosaic'
  raise ValueError(f'flash_attention has no compiled lowering for backend {backend!r}; '
                   'pass interpret=True (or leave interpret=None) to run it interpreted')


# ------------------------------------------------------------------------------------------------
# Block math shared by the three kernels.


def _dot_nt(a_MK, b_NK):
  return lax.dot_general(a_MK, b_NK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a_KM, b_KN):
  # An explicit transpose rather than a dim-0 contraction: Mosaic lowers the transpose reliably.
  return jnp.dot(a_KM.T, b_KN, preferred_element_type=jnp.float32)


def _mask(q_lo, k_lo, shape, *, causal: bool, kv_len: int | None, q_seg_Q1, k_seg_1K):
  """Boolean [bq, bk] for the tile whose first query row is q_lo and first key is k_lo.

  `kv_len` set means the key range may run past the real length. Segment ids arrive pre-encoded
  (padding keys carry -1, padding queries 0) so one equality test covers padding too.
  """
  mask = None
  if causal or kv_len is not None:
    cols = k_lo + lax.broadcasted_iota(jnp.int32, shape, 1)
    if causal:
      rows = q_lo + lax.broadcasted_iota(jnp.int32, shape, 0)
      mask = cols <= rows
    if kv_len is not None:
      in_range = cols < kv_len
      mask = in_range if mask is None else mask & in_range
  if q_seg_Q1 is not None:
    same = q_seg_Q1 == k_seg_1K
    mask = same if mask is None else mask & same
  return mask


def _kv_steps(i, bq: int, bk: int, st: _Static):
  """For Q block i: (number of leading K/V blocks that need no causal/length mask, number of K/V
  blocks to visit). Blocks past the diagonal or wholly in the length padding are never visited."""
  n_visit = pl.cdiv(st.length, bk)
  n_clean = st.length // bk
  if st.causal:
    n_visit = jnp.minimum(n_visit, lax.div((i + 1) * bq + bk - 1, bk))
    n_clean = jnp.minimum(n_clean, lax.div(i * bq + 1, bk))
  return n_clean, n_visit


def _q_steps(j, bq: int, bk: int, st: _Static):
  """For K/V block j (dkv kernel): (first Q block to visit, first Q block needing no causal mask,
  end). Padded query rows carry a zero cotangent, so Q blocks wholly in the padding are skipped."""
  end = pl.cdiv(st.length, bq)
  if not st.causal:
    return 0, 0, end
  start = jnp.minimum(lax.div(j * bk, bq), end)
  clean = jnp.minimum(lax.div(j * bk + bk - 1 + bq - 1, bq), end)
  return start, clean, end


def _reversed(st: _Static, owns_q: bool) -> bool:
  """Triton launches grid axis 0 fastest. Under a causal mask the last Q blocks carry the most
  work (and the first K/V blocks, already first), so Q-owning grids run back to front: the heavy
  programs start first and the tail of the launch is short."""
  return st.causal and owns_q and st.lowering == 'triton'


def _block_index(axis_size: int, st: _Static, owns_q: bool = True):
  """The Q (or K/V) block this program owns; must agree with `_grid`'s index maps."""
  pid = pl.program_id(2 if st.lowering == 'mosaic' else 0)
  return axis_size - 1 - pid if _reversed(st, owns_q) else pid


# ------------------------------------------------------------------------------------------------
# Kernels. Refs are per (batch, head): Q-like tiles [block, D], full-length K/V [Lp, D]; the dkv
# kernel also sees the G query heads of its kv head ([Lp, G, D] or [G, Lp, D] by layout).


def _group_rows(ref, g, rows, st: _Static):
  return ref[rows, g, :] if st.layout == 'BLHD' else ref[g, rows, :]


def _fwd_kernel(*refs, st: _Static):
  if st.segments:
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, lse_ref), qseg_ref, kseg_ref = refs, None, None
  bq, bk = st.blocks.block_q, st.blocks.block_k
  i = _block_index(st.padded_length // bq, st)
  q = q_ref[...]
  q_seg = None if qseg_ref is None else qseg_ref[...]
  c = st.scale * LOG2E
  kv_len = st.length if st.length % bk else None

  def step(j, carry, masked):
    acc, m, l = carry
    cols = pl.ds(pl.multiple_of(j * bk, bk), bk)
    s = _dot_nt(q, k_ref[cols, :]) * c
    k_seg = None if kseg_ref is None else kseg_ref[:, cols]
    mask = _mask(i * bq, j * bk, s.shape, causal=st.causal and masked,
                 kv_len=kv_len if masked else None, q_seg_Q1=q_seg, k_seg_1K=k_seg)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[cols, :]
    acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq, 1), _M_INIT, jnp.float32),
           jnp.zeros((bq, 1), jnp.float32))
  n_clean, n_visit = _kv_steps(i, bq, bk, st)
  carry = lax.fori_loop(0, n_clean, functools.partial(step, masked=False), carry)
  acc, m, l = lax.fori_loop(n_clean, n_visit, functools.partial(step, masked=True), carry)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
  # +inf for rows that saw no key: the backward's exp2(-inf - lse) is then 0, not NaN.
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l))


def _dq_kernel(*refs, st: _Static):
  if st.segments:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), qseg_ref, kseg_ref = refs, None, None
  bq, bk = st.blocks.block_q_dq, st.blocks.block_k_dq
  i = _block_index(st.padded_length // bq, st)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_seg = None if qseg_ref is None else qseg_ref[...]
  c = st.scale * LOG2E
  kv_len = st.length if st.length % bk else None

  def step(j, dq, masked):
    cols = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k = k_ref[cols, :]
    s = _dot_nt(q, k) * c
    k_seg = None if kseg_ref is None else kseg_ref[:, cols]
    mask = _mask(i * bq, j * bk, s.shape, causal=st.causal and masked,
                 kv_len=kv_len if masked else None, q_seg_Q1=q_seg, k_seg_1K=k_seg)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp2(s - lse)
    dp = _dot_nt(do, v_ref[cols, :])
    ds = p * (dp - delta)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  n_clean, n_visit = _kv_steps(i, bq, bk, st)
  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(0, n_clean, functools.partial(step, masked=False), dq)
  dq = lax.fori_loop(n_clean, n_visit, functools.partial(step, masked=True), dq)
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: _Static):
  if st.segments:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = refs
    qseg_ref = kseg_ref = None
  bq, bk = st.blocks.block_q_dkv, st.blocks.block_k_dkv
  j = _block_index(st.padded_length // bk, st, owns_q=False)
  k, v = k_ref[...], v_ref[...]
  k_seg = None if kseg_ref is None else kseg_ref[...]
  c = st.scale * LOG2E
  # No length mask here: a padded key's own dK/dV rows are the only thing its (finite, meaningless)
  # probabilities feed, and those rows are sliced off.

  def step(qi, carry, g, masked):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(qi * bq, bq), bq)
    q = _group_rows(q_ref, g, rows, st)
    do = _group_rows(do_ref, g, rows, st)
    s = _dot_nt(q, k) * c
    q_seg = None if qseg_ref is None else qseg_ref[rows, :]
    mask = _mask(qi * bq, j * bk, s.shape, causal=st.causal and masked, kv_len=None,
                 q_seg_Q1=q_seg, k_seg_1K=k_seg)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp2(s - lse_ref[g, rows, :])
    dv = dv + _dot_tn(p.astype(do.dtype), do)
    ds = p * (_dot_nt(do, v) - delta_ref[g, rows, :])
    dk = dk + _dot_tn(ds.astype(q.dtype), q)
    return dk, dv

  start, clean, end = _q_steps(j, bq, bk, st)

  def head(g, carry):
    carry = lax.fori_loop(start, clean, functools.partial(step, g=g, masked=True), carry)
    return lax.fori_loop(clean, end, functools.partial(step, g=g, masked=False), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, st.groups, head, (zeros, zeros))
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_call plumbing.


def _grid(n_blocks: int, b: int, h: int, st: _Static, owns_q: bool = True):
  """Grid and an index-map adapter. Triton: the block axis first (adjacent programs share K/V in
  L2). Mosaic: the block axis last (consecutive steps keep the same K/V tile, so it is not
  re-copied into VMEM). Index maps are written as f(block, batch, head)."""
  if st.lowering == 'mosaic':
    return (b, h, n_blocks), lambda f: (lambda bi, hi, i: f(i, bi, hi))
  if _reversed(st, owns_q):
    return (n_blocks, b, h), lambda f: (lambda i, bi, hi: f(n_blocks - 1 - i, bi, hi))
  return (n_blocks, b, h), lambda f: f


def _compiler_params(st: _Static, grid_rank: int):
  if st.lowering == 'triton':
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    warps = st.blocks.num_warps or (4 if st.head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=st.blocks.num_stages)
  if st.lowering == 'mosaic':
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=('parallel',) * grid_rank)
  return None


def _call(kernel, name, grid, in_specs, out_specs, out_shape, st: _Static):
  return pl.pallas_call(
      functools.partial(kernel, st=st), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=st.lowering == 'interpret', name=name,
      compiler_params=_compiler_params(st, len(grid)))


def _seg_specs(block: int, lp: int, adapt, *, kv_block: bool):
  """Specs for q segments [B, Lp, 1] and kv segments [B, 1, Lp]: the side the grid walks gets
  its [block] tile (the kv side for the dkv kernel, else the q side), the other side is whole."""
  full_q = pl.BlockSpec((None, lp, 1), adapt(lambda i, b, h: (b, 0, 0)))
  full_k = pl.BlockSpec((None, 1, lp), adapt(lambda i, b, h: (b, 0, 0)))
  if kv_block:
    return [full_q, pl.BlockSpec((None, 1, block), adapt(lambda i, b, h: (b, 0, i)))]
  return [pl.BlockSpec((None, block, 1), adapt(lambda i, b, h: (b, i, 0))), full_k]


def _seq_spec(block: int, d: int, adapt, st: _Static, kv_head: bool = False):
  """[block, D] rows of one head; rows of block index i, or all rows when block == Lp. With
  `kv_head`, the head is the kv head serving query head hi (GQA)."""
  whole = block == st.padded_length
  g = st.groups if kv_head else 1

  def index(i, bi, hi):
    row, head = (0 if whole else i), lax.div(hi, g)
    return (bi, head, row, 0) if st.layout == 'BHLD' else (bi, row, head, 0)
  shape = (None, None, block, d) if st.layout == 'BHLD' else (None, block, None, d)
  return pl.BlockSpec(shape, adapt(index))


def _group_spec(d: int, adapt, st: _Static):
  """All rows of the G query heads that share kv head ki."""
  g, lp = st.groups, st.padded_length
  if st.layout == 'BHLD':
    return pl.BlockSpec((None, g, lp, d), adapt(lambda j, bi, ki: (bi, ki, 0, 0)))
  return pl.BlockSpec((None, lp, g, d), adapt(lambda j, bi, ki: (bi, 0, ki, 0)))


def _dims(x, st: _Static):
  """(batch, heads, padded length, head dim) of an array in the kernel layout."""
  if st.layout == 'BHLD':
    return x.shape
  b, lp, h, d = x.shape
  return b, h, lp, d


def _forward(q, k, v, segs, st: _Static):
  b, h, lp, d = _dims(q, st)
  bq = st.blocks.block_q
  grid, adapt = _grid(lp // bq, b, h, st)
  tile = _seq_spec(bq, d, adapt, st)
  kv_full = _seq_spec(lp, d, adapt, st, kv_head=True)
  row = pl.BlockSpec((None, None, bq, 1), adapt(lambda i, bi, hi: (bi, hi, i, 0)))
  in_specs = [tile, kv_full, kv_full]
  if st.segments:
    in_specs += _seg_specs(bq, lp, adapt, kv_block=False)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, h, lp, 1), jnp.float32)]
  return _call(_fwd_kernel, 'flash_fwd', grid, in_specs, [tile, row], out_shape, st)(
      q, k, v, *segs)


def _backward(q, k, v, segs, o, lse, do, st: _Static):
  b, h, lp, d = _dims(q, st)
  kh = h // st.groups
  # delta_i = sum_d dO_id O_id: a cheap bandwidth-bound reduction that XLA fuses well.
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = (delta if st.layout == 'BHLD' else jnp.swapaxes(delta, 1, 2))[..., None]

  bq = st.blocks.block_q_dq
  grid, adapt = _grid(lp // bq, b, h, st)
  tile = _seq_spec(bq, d, adapt, st)
  kv_full = _seq_spec(lp, d, adapt, st, kv_head=True)
  row = pl.BlockSpec((None, None, bq, 1), adapt(lambda i, bi, hi: (bi, hi, i, 0)))
  in_specs = [tile, kv_full, kv_full, tile, row, row]
  if st.segments:
    in_specs += _seg_specs(bq, lp, adapt, kv_block=False)
  dq = _call(_dq_kernel, 'flash_bwd_dq', grid, in_specs, tile,
             jax.ShapeDtypeStruct(q.shape, q.dtype), st)(q, k, v, do, lse, delta, *segs)

  bk = st.blocks.block_k_dkv
  grid, adapt = _grid(lp // bk, b, kh, st, owns_q=False)
  # One program per K/V tile and kv head; it reads the G query heads that share that kv head.
  group = _group_spec(d, adapt, st)
  group_row = pl.BlockSpec((None, st.groups, lp, 1), adapt(lambda j, bi, ki: (bi, ki, 0, 0)))
  kv_tile = _seq_spec(bk, d, adapt, st)
  in_specs = [group, kv_tile, kv_tile, group, group_row, group_row]
  if st.segments:
    in_specs += _seg_specs(bk, lp, adapt, kv_block=True)
  dk, dv = _call(_dkv_kernel, 'flash_bwd_dkv', grid, in_specs, [kv_tile, kv_tile],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 st)(q, k, v, do, lse, delta, *segs)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Layout in and out, and the custom VJP.


def _to_kernel_layout(x_BLHD, st: _Static):
  pad_l, pad_d = st.padded_length - st.length, _padded_head_dim(st) - st.head_dim
  if pad_l or pad_d:
    x_BLHD = jnp.pad(x_BLHD, ((0, 0), (0, pad_l), (0, 0), (0, pad_d)))
  return jnp.swapaxes(x_BLHD, 1, 2) if st.layout == 'BHLD' else x_BLHD


def _from_kernel_layout(x, st: _Static):
  x_BLHD = jnp.swapaxes(x, 1, 2) if st.layout == 'BHLD' else x
  if x_BLHD.shape[1] != st.length or x_BLHD.shape[3] != st.head_dim:
    x_BLHD = x_BLHD[:, :st.length, :, :st.head_dim]
  return x_BLHD


def _padded_head_dim(st: _Static) -> int:
  # Triton tiles must be powers of two; zero columns change neither scores nor outputs.
  if st.lowering == 'triton':
    return max(_MIN_BLOCK, 1 << (st.head_dim - 1).bit_length())
  return st.head_dim


def _encode_segments(segment_ids_BL, st: _Static):
  """q side [B, Lp, 1] (padding rows 0), kv side [B, 1, Lp] with padding keys (id 0, or past L)
  as -1: no query id equals -1, so `q_seg == k_seg` alone implements the whole mask rule."""
  if not st.segments:
    return ()
  seg = segment_ids_BL.astype(jnp.int32)
  pad = st.padded_length - st.length
  q_seg = jnp.pad(seg, ((0, 0), (0, pad)))[:, :, None]
  k_seg = jnp.pad(jnp.where(seg == 0, -1, seg), ((0, 0), (0, pad)), constant_values=-1)
  return q_seg, k_seg[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids_BL, st: _Static):
  return _flash_fwd(q, k, v, segment_ids_BL, st)[0]


def _flash_fwd(q, k, v, segment_ids_BL, st: _Static):
  segs = _encode_segments(segment_ids_BL, st)
  qt, kt, vt = (_to_kernel_layout(x, st) for x in (q, k, v))
  o, lse = _forward(qt, kt, vt, segs, st)
  return _from_kernel_layout(o, st), (qt, kt, vt, segs, o, lse)


def _flash_bwd(st: _Static, res, do_BLHD):
  qt, kt, vt, segs, o, lse = res
  dq, dk, dv = _backward(qt, kt, vt, segs, o, lse, _to_kernel_layout(do_BLHD, st), st)
  return (_from_kernel_layout(dq, st), _from_kernel_layout(dk, st), _from_kernel_layout(dv, st),
          None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, *,
                    causal: bool = False, segment_ids_BL: jax.Array | None = None,
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """Softmax(q k^T * sm_scale, masked) v for self-attention, as [B, L, H, D].

  Args:
    q_BLHD: queries; H must be a multiple of K (grouped-query attention).
    k_BLKD, v_BLKD: keys and values, same length L as the queries.
    causal: key j visible to query i only if j <= i (index order).
    segment_ids_BL: int ids of packed documents; attention stays within an id; 0 is padding
      (such keys are never attended; such queries output 0).
    sm_scale: score scale, default D ** -0.5.
    block_sizes: tile sizes; default `BlockSizes.default(backend, D)`, shrunk for short L.
    interpret: None runs the Pallas interpreter off-accelerator (CPU) and compiles on GPU
      (Triton) / TPU (Mosaic); True forces the interpreter anywhere.
  """
  b, l, h, d = q_BLHD.shape
  if k_BLKD.shape != v_BLKD.shape or k_BLKD.shape[:2] != (b, l) or k_BLKD.shape[3] != d:
    raise ValueError(f'flash_attention is self-attention with equal head dims: got q '
                     f'{q_BLHD.shape}, k {k_BLKD.shape}, v {v_BLKD.shape}')
  kh = k_BLKD.shape[2]
  if h % kh:
    raise ValueError(f'query heads ({h}) must be a multiple of kv heads ({kh})')
  if segment_ids_BL is not None and segment_ids_BL.shape != (b, l):
    raise ValueError(f'segment_ids_BL must be [{b}, {l}], got {segment_ids_BL.shape}')
  lowering = _resolve_lowering(interpret)
  backend = {'triton': 'gpu', 'mosaic': 'tpu'}.get(lowering, 'cpu')
  blocks = (block_sizes or BlockSizes.default(backend, d)).clamp(l)
  sizes = [getattr(blocks, f) for f in _BLOCK_FIELDS]
  if lowering == 'triton' and any(s < _MIN_BLOCK or s & (s - 1) for s in sizes):
    raise ValueError(f'Triton block sizes must be powers of two >= {_MIN_BLOCK}: {blocks}')
  if any(s % 8 for s in sizes):
    raise ValueError(f'block sizes must be multiples of 8: {blocks}')
  tile = math.lcm(*sizes)
  st = _Static(causal=bool(causal), scale=float(d ** -0.5 if sm_scale is None else sm_scale),
               blocks=blocks, length=l, padded_length=-(-l // tile) * tile, head_dim=d,
               groups=h // kh, segments=segment_ids_BL is not None, lowering=lowering,
               layout=_layout_for(lowering))
  return _flash(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, st)


def reference_attention(q_BLHD, k_BLKD, v_BLKD, *, causal=False, segment_ids_BL=None,
                        sm_scale=None):
  """Plain-JAX attention with the same mask rule and empty-row convention (output 0), in f32.

  Materialises [B, H, L, L]: for tests and small shapes only.
  """
  b, l, h, d = q_BLHD.shape
  kh = k_BLKD.shape[2]
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q = q_BLHD.astype(jnp.float32).reshape(b, l, kh, h // kh, d)
  s = jnp.einsum('blkgd,bskd->bkgls', q, k_BLKD.astype(jnp.float32)) * scale
  mask = jnp.ones((b, l, l), bool)
  if causal:
    mask &= jnp.tril(jnp.ones((l, l), bool))[None]
  if segment_ids_BL is not None:
    seg = segment_ids_BL
    mask &= (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum('bkgls,bskd->blkgd', p, v_BLKD.astype(jnp.float32))
  return out.reshape(b, l, h, d).astype(q_BLHD.dtype)
