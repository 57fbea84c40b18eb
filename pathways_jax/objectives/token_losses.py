"""Per-position losses against a target: what a loss needs of the logits.

An objective that only reads each position's cross-entropy, log-sum-exp and argmax-correctness
takes either the logits [B, L, V] or a `TokenLosses` computed without them (the fused unembedding
+ cross-entropy of `pathways_jax/tasks/lm_head.py`, which never holds [B, L, V]).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenLosses(NamedTuple):
  """Against each position's target: cross-entropy, log-sum-exp (float32) and whether the target
  is the argmax (bool), each [B, L]; and the entropy of the position's distribution (float32
  [B, L]) where it was asked for."""
  ce_BL: jax.Array
  lse_BL: jax.Array
  correct_BL: jax.Array
  entropy_BL: jax.Array | None = None


def from_logits(logits_BLV: jax.Array, targets_BL: jax.Array) -> TokenLosses:
  logits = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits, axis=-1)
  target_BL = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
  logp = logits - lse_BL[..., None]  # the entropy is dropped by XLA wherever it is not read
  return TokenLosses(lse_BL - target_BL, lse_BL, jnp.argmax(logits, axis=-1) == targets_BL,
                     -(jnp.exp(logp) * logp).sum(-1))


def of(logits_or_losses, targets_BL: jax.Array) -> TokenLosses:
  """`logits_or_losses` as TokenLosses (a TokenLosses must be against the same targets)."""
  if isinstance(logits_or_losses, TokenLosses):
    return logits_or_losses
  return from_logits(logits_or_losses, targets_BL)
