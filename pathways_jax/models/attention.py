"""Attention: rotary embeddings, the mask rule, and the backend dispatch.

One mask rule serves every model in the project: a query attends to a key iff both carry the same
non-padding segment id (packed documents never see each other) and, for causal models, the key's
position is not after the query's. Keys may come from a KV cache, which is how AR decoding and the
Fast-dLLM block caches both work.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pathways_jax.models import attention_backends


def rope_frequencies(head_dim: int, theta: float, scaling: str = '', factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 0) -> jax.Array:
  """[D/2] float32 rotary frequencies theta^(-2i/D), optionally rescaled for long contexts.

  'linear': every frequency / factor (positions interpolated). 'llama3' (Llama 3.1+): bands by
  wavelength against the pretraining context `original_max_len`: wavelengths longer than
  original_max_len / low_freq_factor are divided by `factor`, shorter than original_max_len /
  high_freq_factor kept, and the band between interpolated smoothly between the two.
  """
  freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling == 'linear':
    return freq / factor
  if scaling == 'llama3':
    wavelen = 2 * jnp.pi / freq
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * freq / factor + smooth * freq
    return jnp.where(wavelen > original_max_len / low_freq_factor, freq / factor,
                     jnp.where(wavelen < original_max_len / high_freq_factor, freq, mid))
  if scaling:
    raise ValueError(f"rope scaling {scaling!r} is not one of ('', 'linear', 'llama3')")
  return freq


def rope_tables(positions_BL: jax.Array, head_dim: int, theta: float, scaling: tuple = ()):
  """(cos, signed sin), each [B, L, 1, 2, D/2] float32: what `apply_rope` multiplies by.

  `scaling`: `rope_frequencies`' arguments after theta, as a tuple (`ModelConfig.rope[1:]`)."""
  freq = rope_frequencies(head_dim, theta, *scaling)  # [D/2]
  angle_BLF = positions_BL[..., None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle_BLF), jnp.cos(angle_BLF)
  cos_BL12F = jnp.stack([cos, cos], axis=-2)[:, :, None]
  sin_BL12F = jnp.stack([-sin, sin], axis=-2)[:, :, None]
  # On CPU, materialised once: left to fusion, XLA:CPU recomputes sin and cos inside every
  # consumer, per head and per gradient term. Only a CPU lowering gets the barrier (chosen when
  # the step is lowered, as `dense` does): TPU and GPU keep their fusion.
  return jax.lax.platform_dependent(cos_BL12F, sin_BL12F,
                                    cpu=lambda c, s: jax.lax.optimization_barrier((c, s)),
                                    default=lambda c, s: (c, s))


def apply_rope(x_BLHD, cos_BL12F, sin_BL12F):
  """Rotate-half RoPE, out = [x1 cos - x2 sin, x2 cos + x1 sin], with the halves as an axis.

  Written as x * cos + swap_halves(x) * sin on a [.., 2, D/2] view: no slice or concatenation
  on the minor axis, which is what makes autodiff's gradient fast on CPU (that of the slicing
  form, with pads and sin/cos recomputed inside its fusions, was the slowest elementwise work of
  the CPU step: benchmarks/RESULTS.md). Plain code, so forward mode works too; the hand-written
  gradient it had until 2026-12-06 compiled to the same CPU instructions. The tables may
  broadcast over any axis (heads, batch).
  """
  b, l, h, d = x_BLHD.shape
  x = x_BLHD.reshape(b, l, h, 2, d // 2)
  return (x * cos_BL12F + x[..., ::-1, :] * sin_BL12F).reshape(b, l, h, d)


def rope(x_BLHD: jax.Array, positions_BL: jax.Array, theta: float, scaling: tuple = ()
         ) -> jax.Array:
  """Rotary position embedding (rotate-half form), computed in float32."""
  cos, sin = rope_tables(positions_BL, x_BLHD.shape[-1], theta, scaling)
  return apply_rope(x_BLHD.astype(jnp.float32), cos, sin).astype(x_BLHD.dtype)


def attention_mask(q_segment_BL, kv_segment_BS, q_positions_BL, kv_positions_BS, causal):
  """Boolean [B, L, S]: same segment, key not padding, and (if causal) key not in the future."""
  mask = (q_segment_BL[:, :, None] == kv_segment_BS[:, None, :]) & (kv_segment_BS[:, None, :] != 0)
  if causal:
    mask &= kv_positions_BS[:, None, :] <= q_positions_BL[:, :, None]
  return mask


_warn_once = attention_backends.warn_once


def _xla_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS, scale):
  """Grouped-query attention with plain einsums (K kv-heads shared by H/K query heads each)."""
  b, l, h, d = q_BLHD.shape
  kh = k_BSKD.shape[2]
  q = q_BLHD.reshape(b, l, kh, h // kh, d)
  logits = jnp.einsum('blkgd,bskd->bkgls', q, k_BSKD, preferred_element_type=jnp.float32)
  logits = logits * scale
  logits = jnp.where(mask_BLS[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKD.dtype)
  out = jnp.einsum('bkgls,bskd->blkgd', probs, v_BSKD)
  return out.reshape(b, l, h, d)


# Shorter blocks are not made: there is little to skip, and every block adds ops to compile.
# Splitting even the test models' 32-token rows into 4 blocks made the test suite (with 7 more
# tests) take 9:52 instead of 7:27 on 2 cores.
MIN_QUERY_BLOCK = 32


def _causal_blocked_attention(q_BLHD, k_BLKD, v_BLKD, mask_BLL, scale, num_blocks):
  """Causal self-attention in `num_blocks` query blocks; block [s, e) sees keys [0, e) only.

  The keys it skips (index >= e > query index) are masked anyway whenever positions increase
  within each segment, so this is the same function with less work: with 4 blocks, 5/8 of the
  score matrix instead of all of it, and smaller score tensors per block.
  """
  length = q_BLHD.shape[1]
  bounds = sorted({round(i * length / num_blocks) for i in range(num_blocks + 1)})
  outs = [_xla_attention(q_BLHD[:, s:e], k_BLKD[:, :e], v_BLKD[:, :e], mask_BLL[:, s:e, :e], scale)
          for s, e in zip(bounds[:-1], bounds[1:])]
  return jnp.concatenate(outs, axis=1)


def attend(q_BLHD, k_BSKD, v_BSKD, *, q_segment_BL, kv_segment_BS, q_positions_BL,
           kv_positions_BS, causal: bool, implementation: str = 'xla',
           packed: bool = True, kv_from_cache: bool = False,
           causal_query_blocks: int = 1, keep_LS: jax.Array | None = None) -> jax.Array:
  """Dispatches to the configured attention backend; returns [B, L, H, D].

  `implementation` names an entry of `attention_backends` (where the kernels are registered). A
  backend that cannot serve a call says why; that reason is warned once and the call runs 'xla'.

  `packed=False` promises that segments are trivial (one document per row, no cache), which lets
  kernels that cannot take segment ids run.

  'xla' causal self-attention (no cache) with `causal_query_blocks` > 1 skips the key blocks
  after each query block (_causal_blocked_attention), using as many blocks as have at least
  MIN_QUERY_BLOCK queries each, when lowered for CPU (where it was measured); a GPU or TPU
  lowering keeps the plain form. Like 'pallas', it relies on positions increasing with the index
  inside each segment, as they do in packed rows.

  The registered kernels ('cpu', 'pallas', 'cudnn') are described in attention_backends.py.

  `keep_LS` (boolean [L, S], by row index) is ANDed with the mask; the kernels take no such mask,
  so a call with one runs 'xla' (attention-mask annealing while a model adapts: train/anneal.py).

  Forward mode (jax.jvp, jax.linearize, Hessian-vector products as jvp of grad) needs 'xla':
  'pallas', 'cudnn' and, on CPU, 'cpu' are kernels with custom VJPs, which JAX cannot
  differentiate forwards.
  """
  scale = q_BLHD.shape[-1] ** -0.5
  self_attention = q_BLHD.shape[1] == k_BSKD.shape[1]
  backend = attention_backends.get(implementation)
  if backend is not None and keep_LS is not None:
    reason = 'the call has an attention keep mask (annealing), which only xla takes'
    _warn_once(f"attention={implementation!r} not taken: {reason}; using 'xla'")
    attention_backends.note(implementation, 'xla', reason)
  elif backend is not None:
    call = attention_backends.AttentionCall(
        q_BLHD, k_BSKD, v_BSKD, q_segment_BL, kv_segment_BS, q_positions_BL, kv_positions_BS,
        causal=causal, scale=scale, packed=packed, kv_from_cache=kv_from_cache)
    try:
      out = backend(call)
    except attention_backends.NotTaken as e:
      _warn_once(f"attention={implementation!r} not taken: {e}; using 'xla'")
      attention_backends.note(implementation, 'xla', str(e).splitlines()[0])
    else:
      attention_backends.note(implementation, implementation)
      return out
  else:
    attention_backends.note('xla', 'xla')
  mask = attention_mask(q_segment_BL, kv_segment_BS, q_positions_BL, kv_positions_BS, causal)
  if keep_LS is not None:
    mask &= keep_LS[None].astype(bool)
  blocks = min(causal_query_blocks, q_BLHD.shape[1] // MIN_QUERY_BLOCK)
  if causal and self_attention and not kv_from_cache and blocks > 1:
    # Skipping masked key blocks was measured on XLA:CPU only (docs/performance.md): a CPU
    # lowering takes the blocked form, chosen when the step is lowered (as `dense` and the RoPE
    # tables do); TPU and GPU keep the one attention XLA fuses.
    return jax.lax.platform_dependent(
        q_BLHD, k_BSKD, v_BSKD, mask,
        cpu=lambda q, k, v, m: _causal_blocked_attention(q, k, v, m, scale, blocks),
        default=lambda q, k, v, m: _xla_attention(q, k, v, m, scale))
  return _xla_attention(q_BLHD, k_BSKD, v_BSKD, mask, scale)
