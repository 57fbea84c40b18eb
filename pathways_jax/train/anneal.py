"""Attention-mask annealing (DiffuLLaMA: Gong et al. 2025, "Scaling Diffusion Language Models via
Adaptation from Autoregressive Models", ICLR 2025): a bidirectional model adapted from a causal
one is not switched to full attention at once. At train step s (0-based) each query i sees every
key j <= i, as the AR model did, plus each later key with probability

    ratio(s) = min(1, (s + 1) / train.attention_anneal_steps),

one [L, L] Bernoulli draw per forward pass, shared by the rows and heads of the batch (as
DiffuLLaMA's trainer draws it). From step anneal_steps - 1 on the mask is full: the plain
bidirectional model. Evaluation and sampling never see the mask (they call the model itself),
so they measure the model being trained towards, as DiffuLLaMA evaluates at ratio 1.

The mask is by row index: within a packed row's segment, index order is position order, and
the model's own mask keeps segments apart.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# fold_in constant of the annealing stream: independent of the task's draws from the same key.
_ANNEAL_STREAM = 0x616E6E6C  # 'annl'


def keep_ratio(step, anneal_steps: int) -> jax.Array:
  """The probability that a query sees a given later key at (0-based) train step `step`."""
  if anneal_steps <= 0:
    raise ValueError(f'anneal_steps must be positive, got {anneal_steps}')
  return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / anneal_steps)


def keep_mask(key: jax.Array, length: int, ratio) -> jax.Array:
  """Boolean [L, L]: key j <= query i always, a later key with probability `ratio`."""
  causal_LL = jnp.tril(jnp.ones((length, length), bool))
  return causal_LL | jax.random.bernoulli(key, ratio, (length, length))


class AnnealedModel:
  """The model as an annealing train step runs it: every `apply` on tokens [B, L] gets
  `attention_keep_LL = keep_mask(key, L, ratio)` while ratio < 1; everything else is the
  model's own.

  The mask sends attention to 'xla' (the kernels take none), so once the schedule is over
  (ratio = 1, the mask full) `lax.cond` runs the model without it, on its configured backend:
  both branches are compiled, and a long run after a short schedule loses no kernel speed.
  """

  def __init__(self, model, key: jax.Array, ratio):
    self._model, self._key, self._ratio = model, jax.random.fold_in(key, _ANNEAL_STREAM), ratio

  def apply(self, variables, tokens_BL, *args, **kwargs):
    keep = keep_mask(self._key, jnp.shape(tokens_BL)[1], self._ratio)
    return jax.lax.cond(
        jnp.asarray(self._ratio) >= 1.0,
        lambda: self._model.apply(variables, tokens_BL, *args, **kwargs),
        lambda: self._model.apply(variables, tokens_BL, *args, attention_keep_LL=keep, **kwargs))

  def __getattr__(self, name):
    return getattr(self._model, name)
