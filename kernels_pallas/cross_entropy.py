"""Fused unembedding + cross-entropy that never holds the [T, V] logits.

    loss_T, lse_T = fused_cross_entropy(hidden_TD, unembed_DV, targets_T, valid_T=valid_T)
    loss = loss_T.sum() / valid_T.sum() + z_loss * ((lse_T ** 2) * valid_T).sum() / valid_T.sum()

The idea of Cut Cross-Entropy / Levanter's blockwise loss: walk the vocabulary in chunks of
`chunk_size` columns, keep a running max and sum per token (online log-sum-exp) and pick the target
logit out of whichever chunk holds it. The backward recomputes each chunk's logits from the saved
lse, so the only vocabulary-sized buffers are the parameter gradient itself and one [T, chunk]
tile at a time.

Why the vocabulary axis and not the token axis: a token chunk still needs a full [D, V] partial
dW per step (and a [chunk, V] logits tile), so token chunking bottoms out at ~12% of the naive
path's temporaries at LLM shapes; vocabulary chunks make every temporary O(T * chunk + D * chunk).

The backward needs every chunk's logits again (4 matmuls of 2*T*D*V FLOPs instead of the naive
3): that is the price of not storing [T, V]. Both derivatives wrt the two outputs are linear in the
per-token cotangents, so one backward sweep serves loss, z-loss, or any mix of the two.

This is plain JAX (a fori_loop over chunks): XLA's own matmuls are what every backend runs best,
and the fusion around them (exp, compare, select, row sums) is elementwise on a [T, chunk] tile.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_CHUNK_SIZE = 4096


def _chunk_starts(v: int, chunk: int):
  """(number of full chunks, start of the tail, tail width): V need not divide into chunks, and
  padding the unembedding to a multiple would copy the whole [D, V] matrix."""
  n = v // chunk
  return n, n * chunk, v - n * chunk


def _chunk_logits(hidden_TD, unembed_DV, start, width: int):
  w_DC = lax.dynamic_slice_in_dim(unembed_DV, start, width, axis=1)
  return jnp.dot(hidden_TD, w_DC.astype(hidden_TD.dtype), preferred_element_type=jnp.float32), w_DC


def _is_target(targets_T, start, width: int):
  return lax.broadcasted_iota(jnp.int32, (targets_T.shape[0], width), 1) == (
      targets_T - start)[:, None]


def _forward(hidden_TD, unembed_DV, targets_T, chunk: int):
  t = hidden_TD.shape[0]
  n, tail_start, tail = _chunk_starts(unembed_DV.shape[1], chunk)

  def step(start, width, carry):
    m_T, s_T, u_T, tgt_T = carry
    z_TC, _ = _chunk_logits(hidden_TD, unembed_DV, start, width)
    m_new = jnp.maximum(m_T, jnp.max(z_TC, axis=1))
    e_TC = jnp.exp(z_TC - m_new[:, None])
    rescale = jnp.exp(m_T - m_new)
    s_T = s_T * rescale + jnp.sum(e_TC, axis=1)
    u_T = u_T * rescale + jnp.sum(e_TC * z_TC, axis=1)  # for E_p[z], the entropy's mean logit
    tgt_T = tgt_T + jnp.sum(jnp.where(_is_target(targets_T, start, width), z_TC, 0.0), axis=1)
    return m_new, s_T, u_T, tgt_T

  zeros = jnp.zeros((t,), jnp.float32)
  carry = (jnp.full((t,), -jnp.inf, jnp.float32), zeros, zeros, zeros)
  carry = lax.fori_loop(0, n, lambda i, c: step(i * chunk, chunk, c), carry)
  if tail:
    carry = step(tail_start, tail, carry)
  m_T, s_T, u_T, tgt_T = carry
  lse_T = m_T + jnp.log(s_T)
  mean_T = u_T / s_T
  return lse_T - tgt_T, lse_T, m_T, lse_T - mean_T, mean_T


def _backward(hidden_TD, unembed_DV, targets_T, lse_T, mean_T, g_loss_T, g_lse_T, g_ent_T,
              chunk: int):
  """dlogits = softmax * (g_loss + g_lse) - onehot(target) * g_loss
  - g_ent * softmax * (logit - E_softmax[logit]), one chunk at a time."""
  n, tail_start, tail = _chunk_starts(unembed_DV.shape[1], chunk)
  g_all_T = g_loss_T + g_lse_T

  def step(start, width, carry):
    dh_TD, dw_DV = carry
    z_TC, w_DC = _chunk_logits(hidden_TD, unembed_DV, start, width)
    p_TC = jnp.exp(z_TC - lse_T[:, None])
    dz_TC = p_TC * g_all_T[:, None] - jnp.where(_is_target(targets_T, start, width),
                                                g_loss_T[:, None], 0.0)
    # The entropy lse - E_p[z]: its derivative wrt z_k is -p_k (z_k - E_p[z]).
    dz_TC = dz_TC - (g_ent_T[:, None] * p_TC) * (z_TC - mean_T[:, None])
    dz_TC = dz_TC.astype(hidden_TD.dtype)
    dh_TD = dh_TD + jnp.dot(dz_TC, w_DC.astype(hidden_TD.dtype).T,
                            preferred_element_type=jnp.float32)
    dw_DC = jnp.dot(hidden_TD.T, dz_TC, preferred_element_type=jnp.float32)
    dw_DV = lax.dynamic_update_slice_in_dim(dw_DV, dw_DC.astype(dw_DV.dtype), start, axis=1)
    return dh_TD, dw_DV

  carry = (jnp.zeros(hidden_TD.shape, jnp.float32), jnp.zeros(unembed_DV.shape, unembed_DV.dtype))
  carry = lax.fori_loop(0, n, lambda i, c: step(i * chunk, chunk, c), carry)
  if tail:
    carry = step(tail_start, tail, carry)
  dh_TD, dw_DV = carry
  return dh_TD.astype(hidden_TD.dtype), dw_DV


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hidden_TD, unembed_DV, targets_T, valid_T, chunk: int):
  return _fused_fwd(hidden_TD, unembed_DV, targets_T, valid_T, chunk)[0]


def _fused_fwd(hidden_TD, unembed_DV, targets_T, valid_T, chunk: int):
  loss_T, lse_T, max_T, ent_T, mean_T = _forward(hidden_TD, unembed_DV, targets_T, chunk)
  loss_T = jnp.where(valid_T, loss_T, 0.0)
  return (loss_T, lse_T, max_T, ent_T), (hidden_TD, unembed_DV, targets_T, valid_T, lse_T,
                                         mean_T)


def _fused_bwd(chunk: int, res, g):
  hidden_TD, unembed_DV, targets_T, valid_T, lse_T, mean_T = res
  g_loss_T, g_lse_T, _, g_ent_T = g  # the max logit feeds a metric (argmax accuracy): no gradient
  g_loss_T = jnp.where(valid_T, g_loss_T, 0.0)
  dh, dw = _backward(hidden_TD, unembed_DV, targets_T, lse_T, mean_T, g_loss_T, g_lse_T, g_ent_T,
                     chunk)
  return dh, dw, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy(hidden_TD: jax.Array, unembed_DV: jax.Array, targets_T: jax.Array, *,
                        valid_T: jax.Array | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        return_max: bool = False, return_entropy: bool = False
                        ) -> tuple[jax.Array, ...]:
  """Per-token cross-entropy of softmax(hidden @ unembed) against integer targets.

  Args:
    hidden_TD: final hidden states, [T, D] (flatten [B, L, D] first); any float dtype — the
      logits are accumulated in float32.
    unembed_DV: the output matrix [D, V] (for tied embeddings, `embedding.T`).
    targets_T: int target ids in [0, V) for valid tokens (anything for invalid ones).
    valid_T: optional bool mask; invalid tokens get loss 0 and no gradient through `loss_T`.
    chunk_size: vocabulary columns per step. Peak temporary memory is about
      3 * T * chunk_size * 4 bytes; larger chunks mean fewer, larger matmuls.
    return_max: also return each token's largest logit (float32 [T], no gradient), e.g. for
      argmax accuracy: the target is the argmax iff lse - loss >= max.
    return_entropy: also return the entropy of each token's distribution (float32 [T],
      differentiable: RL's entropy bonus), accumulated as lse - E_p[logit] over the chunks.

  Returns:
    (loss_T, logsumexp_T), float32 [T] each. `logsumexp_T` is differentiable (z-loss) and is
    returned for every token, valid or not: weight it by `valid_T` yourself. `return_max` and
    `return_entropy` append max_T and entropy_T, in that order.
  """
  t, d = hidden_TD.shape
  if unembed_DV.ndim != 2 or unembed_DV.shape[0] != d:
    raise ValueError(f'unembed_DV must be [{d}, V], got {unembed_DV.shape}')
  if targets_T.shape != (t,):
    raise ValueError(f'targets_T must be [{t}], got {targets_T.shape}')
  if chunk_size <= 0:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}')
  valid_T = jnp.ones((t,), bool) if valid_T is None else valid_T.astype(bool)
  chunk = min(int(chunk_size), unembed_DV.shape[1])
  loss_T, lse_T, max_T, ent_T = _fused(hidden_TD, unembed_DV, targets_T.astype(jnp.int32),
                                       valid_T, chunk)
  return (loss_T, lse_T) + ((max_T,) if return_max else ()) + ((ent_T,) if return_entropy else ())


def cross_entropy_reference(hidden_TD, unembed_DV, targets_T, *, valid_T=None):
  """The naive path: [T, V] float32 logits, a full log-softmax, a gather. For tests/benchmarks."""
  logits_TV = jnp.dot(hidden_TD, unembed_DV.astype(hidden_TD.dtype),
                      preferred_element_type=jnp.float32)
  logp_TV = jax.nn.log_softmax(logits_TV, axis=-1)
  loss_T = -jnp.take_along_axis(logp_TV, targets_T[:, None].astype(jnp.int32), axis=-1)[:, 0]
  lse_T = jax.nn.logsumexp(logits_TV, axis=-1)
  if valid_T is not None:
    loss_T = jnp.where(valid_T, loss_T, 0.0)
  return loss_T, lse_T
