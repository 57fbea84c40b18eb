"""VRPO (LLaDA 1.5): DPO for masked-diffusion models on Monte Carlo ELBO estimates.

Pure functions of arrays and keys. Zhu et al. 2025, "LLaDA 1.5: Variance-Reduced Preference
Optimization for Large Language Diffusion Models" (arXiv 2505.19223); the bound is LLaDA's (Nie et
al. 2025, arXiv 2502.09992, eq. 3 / 5 / 6).

The bound. For a prompt x and a response y of L_y tokens (the prompt is never masked, as LLaDA's
SFT),

    B(y|x) = E_{t ~ U(0,1)} E_{y_t ~ q(.|t, y)} l(y_t, t, y|x) <= log pi(y|x),
    l(y_t, t, y|x) = (1/p) * sum_i 1[y_t^i = M] * log p_theta(y^i | y_t, x),   p = (1 - eps) t + eps

with q masking every response token independently with probability p (`p_mask`, LLaDA's
forward process: eps keeps 1/p finite; LLaDA 1.5's paper writes 1/t, i.e. eps = 0). One draw's
l is minus the numerator of LLaDA's SFT loss for that sequence (`diffusion.sft_loss` sums
CE / p_mask over the masked answer tokens, then divides by the answer length; the bound is that
sum itself: per sequence, NOT a per-token mean).

The estimate with budget n = n_t * n_yt (paper eq. 6):

    B_hat(y|x) = (1/n_t) sum_{j=1..n_t} (1/n_yt) sum_{k=1..n_yt} l(y_t^(j,k), t^(j), y|x)

t^(j) iid U(0, 1), y_t^(j,k) ~ q(.|t^(j), y) independently. VRPO's score and loss:

    s_hat = beta * [(B_hat_theta(y_w|x) - B_hat_ref(y_w|x))
                    - (B_hat_theta(y_l|x) - B_hat_ref(y_l|x))]
    L     = -log sigma(s_hat)      (any `preference.dpo_loss` type on the B_hat's)

The bias and variance of L and of its gradient are bounded by Var(s_hat) (the paper's Thm 1-2).
Its three unbiased reductions: a larger n; the optimal allocation n_t = n, n_yt = 1 (one mask
per timestep: the variance over t, large because of the 1/t weight, is averaged n times instead
of once); antithetic sampling, the SAME timesteps and masks for pi_theta and pi_ref on the same
y, so that noise common to both estimates cancels in B_hat_theta - B_hat_ref (with
pi_theta = pi_ref, s_hat = 0 exactly).

Rows are packed preference pairs (data/preference.py): segment 2k-1 is the k-th pair's
prompt + chosen, segment 2k its prompt + rejected, and the responses are where `loss_mask`
(response_BL) is 1. Every segment (each side of each pair) gets its own timesteps, and every
position its own mask draws, so the two sides (and the pairs) are estimated independently.

    pol, ref = policy_and_reference_draws(key, tokens_BL, segment_ids_BL, response_BL, n_t=8,
                                          n_yt=1, mask_id=MASK, antithetic=True)
    logits_NBLV = apply(params, pol.noisy_NBL)                     # one forward per draw
    terms_NBL = token_terms(logits_NBLV, tokens_BL, pol.masked_NBL, pol.p_mask_NBL)
    b_hat = pair_elbos(terms_NBL, response_BL, segment_ids_BL)     # chosen/rejected [P], ...

Draw index n = j * n_yt + k (timestep j, mask k): `Draws` arrays are [N, B, L], N = n_t * n_yt.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pathways_jax.objectives import preference, token_losses

# The key of the reference's own draws when they are not antithetic (fold_in of the caller's key).
_REFERENCE_STREAM = 1


class Draws(NamedTuple):
  """N = n_t * n_yt draws of the forward process on a batch of rows, draw n = j * n_yt + k."""
  noisy_NBL: jax.Array   # the tokens, masked positions replaced by the mask id
  masked_NBL: jax.Array  # bool: masked (only ever a response token)
  p_mask_NBL: jax.Array  # float32: the masking probability p of the position's (draw, segment)


def draw(key: jax.Array, tokens_BL: jax.Array, segment_ids_BL: jax.Array, response_BL: jax.Array,
         *, n_t: int, n_yt: int, mask_id: int, eps: float = 1e-3) -> Draws:
  """n_t timesteps x n_yt masks per timestep for every segment of every row.

  For timestep j, segment s of row b: t ~ U(0, 1), p = (1 - eps) t + eps (LLaDA's forward
  process); for mask k each response position of that segment is masked independently with
  probability p. Positions where `response_BL` is 0 (prompts, bos, padding between segments) are
  never masked: noisy == tokens there in every draw.
  """
  if n_t < 1 or n_yt < 1:
    raise ValueError(f'vrpo.draw: n_t={n_t} and n_yt={n_yt} must be >= 1')
  b, l = tokens_BL.shape
  key_t, key_m = jax.random.split(key)
  # One timestep per (draw j, row, segment id); segment ids are in [0, L].
  t_TBS = jax.random.uniform(key_t, (n_t, b, l + 1), jnp.float32)
  seg_BL = jnp.clip(segment_ids_BL, 0, l).astype(jnp.int32)
  t_TBL = jnp.take_along_axis(t_TBS, jnp.broadcast_to(seg_BL, (n_t, b, l)), axis=-1)
  p_TBL = (1.0 - eps) * t_TBL + eps
  u_TKBL = jax.random.uniform(key_m, (n_t, n_yt, b, l), jnp.float32)
  masked_TKBL = (u_TKBL < p_TBL[:, None]) & response_BL.astype(bool) & (segment_ids_BL > 0)
  n = n_t * n_yt
  masked_NBL = masked_TKBL.reshape(n, b, l)
  p_mask_NBL = jnp.broadcast_to(p_TBL[:, None], (n_t, n_yt, b, l)).reshape(n, b, l)
  noisy_NBL = jnp.where(masked_NBL, jnp.asarray(mask_id, tokens_BL.dtype), tokens_BL[None])
  return Draws(noisy_NBL, masked_NBL, p_mask_NBL)


def policy_and_reference_draws(key: jax.Array, tokens_BL: jax.Array, segment_ids_BL: jax.Array,
                               response_BL: jax.Array, *, n_t: int, n_yt: int, mask_id: int,
                               eps: float = 1e-3, antithetic: bool = True
                               ) -> tuple[Draws, Draws]:
  """(policy draws, reference draws). `antithetic=True`: the same draws (timesteps and masks)
  for both, the caller applying both models to the same noisy tokens (VRPO's antithetic
  sampling); otherwise the reference's are independent of the policy's."""
  kw = dict(n_t=n_t, n_yt=n_yt, mask_id=mask_id, eps=eps)
  pol = draw(key, tokens_BL, segment_ids_BL, response_BL, **kw)
  if antithetic:
    return pol, pol
  ref_key = jax.random.fold_in(key, _REFERENCE_STREAM)
  return pol, draw(ref_key, tokens_BL, segment_ids_BL, response_BL, **kw)


def token_terms(logits_BLV: jax.Array, tokens_BL: jax.Array, masked_BL: jax.Array,
                p_mask_BL: jax.Array) -> jax.Array:
  """float32 [..., L]: 1[masked] * log p_theta(token | noisy) / p_mask at every position (0 where
  not masked). Any leading axes (draws, rows) as long as the four agree; `tokens_BL` broadcasts.
  A sequence's sum of these is one draw's l(y_t, t, y|x). `logits_BLV` may be a
  `token_losses.TokenLosses` (of the same leading shape) against the tokens."""
  if isinstance(logits_BLV, token_losses.TokenLosses):
    logp = -logits_BLV.ce_BL
  else:
    logits = logits_BLV.astype(jnp.float32)
    tokens = jnp.broadcast_to(tokens_BL, logits.shape[:-1])
    logp = -token_losses.from_logits(logits, tokens).ce_BL
  return jnp.where(masked_BL, logp / p_mask_BL.astype(jnp.float32), 0.0)


def pair_elbos(terms_NBL: jax.Array, response_BL: jax.Array, segment_ids_BL: jax.Array
               ) -> dict[str, jax.Array]:
  """Per-pair ELBO estimates B_hat from the draws' token terms ([N, B, L], `token_terms`).

  The mean over the N draws of each side's per-sequence sum (= the sum of the per-position
  means: the segment sum is linear), as `preference.packed_pair_logps` returns it, float32 [P]
  over P = B * (L // 2) pair slots: `chosen`, `rejected` (B_hat(y_w|x), B_hat(y_l|x)),
  `chosen_tokens`, `rejected_tokens` (response lengths) and `valid`.
  """
  return preference.packed_pair_logps(terms_NBL.mean(axis=0), response_BL, segment_ids_BL)


def preference_scores(policy: dict[str, jax.Array], reference: dict[str, jax.Array], *,
                      beta: float) -> jax.Array:
  """s_hat [P] = beta * [(B_hat_theta(y_w) - B_hat_ref(y_w)) - (B_hat_theta(y_l) - B_hat_ref(y_l))]
  from two `pair_elbos` results (0 on slots holding no pair)."""
  s = beta * ((policy['chosen'] - reference['chosen'])
              - (policy['rejected'] - reference['rejected']))
  return jnp.where(policy['valid'], s, 0.0)


__all__ = ('Draws', 'draw', 'policy_and_reference_draws', 'token_terms', 'pair_elbos',
           'preference_scores')
