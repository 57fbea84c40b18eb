"""RHO-1 selective language modelling (SLM): train only on the tokens that matter.

RHO-1 (Lin et al., 2024, "Not All Tokens Are What You Need") scores every target token by its
*excess loss* `L_theta - L_ref` (training model minus a reference model trained on clean data),
ranks the valid tokens of the **whole batch** by that score and takes the mean loss over the top
`ratio` of them only. Everything here is a pure function of arrays, jit-able with static shapes,
and correct when the batch is sharded over devices (the ranking is global; see `select_tokens`).

    # AR, online reference: both models see the same batch
    tok_BL, valid_BL = ar_token_losses(logits_BLV, tokens_BL, segment_ids_BL)
    ref_BL, _ = ar_token_losses(ref_logits_BLV, tokens_BL, segment_ids_BL)   # or a cached L_ref
    loss, metrics = selective.loss(tok_BL, ref_BL, valid_BL, ratio=0.6)

    # LLaDA: the same mask and t for both models (see `diffusion_token_losses`)
    ce_BL, w_BL, valid_BL = diffusion_token_losses(logits_BLV, tokens_BL, masked_BL, p_mask_BL)
    ref_ce_BL, _, _ = diffusion_token_losses(ref_logits_BLV, tokens_BL, masked_BL, p_mask_BL)
    loss, metrics = selective.loss(ce_BL, ref_ce_BL, valid_BL, 0.6, weights_BL=w_BL,
                                   normalizer=0.6 * tokens_BL.size)

Choices (documented in docs/rho1.md):
  * k = clip(floor(ratio * n_valid + 0.5), 1, n_valid) tokens are kept (round half up, computed in
    float32; at least one when any token is valid, none when none is). `ratio` must lie in (0, 1]:
    0 is rejected (the mean over no tokens is undefined); 1 keeps every valid token, so the loss
    equals the plain mean loss. `ratio` may also be a traced scalar (a schedule); it is then
    clipped into [0, 1] instead of checked.
  * Ties at the threshold are broken by position: the earlier token in row-major order
    (row, then position) wins. The result is therefore deterministic and identical however the
    batch is sharded.
  * Invalid positions (padding, document ends, unmasked diffusion positions) are never ranked and
    never counted in n_valid. NaN scores of valid tokens rank below every other valid score.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.objectives import autoregressive, token_losses

SCORES = ('excess', 'reference_loss', 'reference_entropy')


def _check_ratio(ratio) -> None:
  if isinstance(ratio, (int, float, np.number)) and not isinstance(ratio, bool):
    if not 0.0 < ratio <= 1.0:
      raise ValueError(f'selective: ratio must be in (0, 1] (the fraction of valid tokens kept), '
                       f'got {ratio}')


def num_kept(num_valid, ratio):
  """The number of tokens kept out of `num_valid`: round half up, at least 1 if any are valid."""
  n = jnp.asarray(num_valid, jnp.int32)
  r = jnp.clip(jnp.asarray(ratio, jnp.float32), 0.0, 1.0)
  k = jnp.floor(r * n.astype(jnp.float32) + 0.5).astype(jnp.int32)
  return jnp.clip(k, jnp.minimum(n, 1), n)


def _select_rows(score_GM: jax.Array, valid_GM: jax.Array, ratio) -> jax.Array:
  """Top-k per row of a [G, M] array (G = 1 for whole-batch selection)."""
  score = score_GM.astype(jnp.float32)
  score = jnp.where(jnp.isnan(score), -jnp.inf, score)
  valid = valid_GM.astype(bool)
  n_G = valid.sum(axis=1, dtype=jnp.int32)
  k_G = num_kept(n_G, ratio)
  # Sorting only the values (descending; invalid -> -inf at the end) gives the k-th largest valid
  # score as the threshold. Everything above it is kept; among the scores equal to it the first
  # (k - #above) in row-major order are kept. Only elementwise ops, reductions and a cumsum follow,
  # so GSPMD partitions it like any other op: the selection is global, with no host round trip.
  ranked = jnp.where(valid, score, -jnp.inf)
  sorted_desc = -jnp.sort(-ranked, axis=1)
  thr_G = jnp.take_along_axis(sorted_desc, jnp.maximum(k_G - 1, 0)[:, None], axis=1)
  above = valid & (score > thr_G)
  tie = valid & (score == thr_G)
  room_G = k_G - above.sum(axis=1, dtype=jnp.int32)
  tie_rank = jnp.cumsum(tie.astype(jnp.int32), axis=1)
  selected = above | (tie & (tie_rank <= room_G[:, None]))
  return selected & (k_G > 0)[:, None]


def select_tokens(excess_BL: jax.Array, valid_BL: jax.Array, ratio, *,
                  per_sequence: bool = False) -> jax.Array:
  """bool [B, L]: the top `ratio` of the valid tokens by score (higher score = kept first).

  Args:
    excess_BL: the score, e.g. the excess loss `L_theta - L_ref`, any float dtype.
    valid_BL: which positions may be ranked (bool or 0/1); the rest are never selected and never
      counted.
    ratio: fraction of the valid tokens to keep, in (0, 1] (python number) or a traced scalar.
    per_sequence: rank within each row instead of across the whole (global) batch; each row keeps
      its own `round(ratio * n_valid_row)`.
  The whole-batch ranking sorts the flattened [B*L] array; under `jax.jit` with a batch sharded
  over devices XLA gathers what it needs, so the selection equals the single-device selection.
  """
  _check_ratio(ratio)
  if excess_BL.shape != valid_BL.shape:
    raise ValueError(f'select_tokens: score shape {excess_BL.shape} != valid shape '
                     f'{valid_BL.shape}')
  shape = excess_BL.shape
  if per_sequence:
    rows = excess_BL.reshape(-1, shape[-1]) if excess_BL.ndim != 1 else excess_BL[None]
    valid_rows = valid_BL.reshape(rows.shape)
  else:
    rows, valid_rows = excess_BL.reshape(1, -1), valid_BL.reshape(1, -1)
  return _select_rows(rows, valid_rows, ratio).reshape(shape)


def token_entropy(logits_BLV: jax.Array) -> jax.Array:
  """Entropy (nats) of each position's predictive distribution, float32 [B, L] (from the logits,
  or a `token_losses.TokenLosses` that carries it)."""
  if isinstance(logits_BLV, token_losses.TokenLosses):
    return logits_BLV.entropy_BL
  logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  return -(jnp.exp(logp) * logp).sum(-1)


def selection_score(token_loss_BL, ref_token_loss_BL, *, score: str = 'excess',
                    ref_entropy_BL=None) -> jax.Array:
  """The ranking score (higher = kept first); gradients are stopped.

  'excess': L_theta - L_ref (the paper's default). 'reference_loss': -L_ref, i.e. keep the tokens the
  reference finds easiest (the paper's self-reference variant, where the reference was trained on
  the noisy corpus itself and high reference loss flags noise). 'reference_entropy': -H_ref, keep the
  tokens the reference is most certain about (needs `ref_entropy_BL`, see `token_entropy`).
  """
  if score == 'excess':
    s = token_loss_BL.astype(jnp.float32) - ref_token_loss_BL.astype(jnp.float32)
  elif score == 'reference_loss':
    s = -ref_token_loss_BL.astype(jnp.float32)
  elif score == 'reference_entropy':
    if ref_entropy_BL is None:
      raise ValueError("selective: score='reference_entropy' needs ref_entropy_BL "
                       '(see selective.token_entropy)')
    s = -ref_entropy_BL.astype(jnp.float32)
  else:
    raise ValueError(f'selective: score={score!r} is not one of {SCORES}')
  return jax.lax.stop_gradient(s)


def _masked_mean(x, mask):
  m = mask.astype(jnp.float32)
  return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def loss(token_loss_BL: jax.Array, ref_token_loss_BL: jax.Array, valid_BL: jax.Array, ratio, *,
         per_sequence: bool = False, score: str = 'excess', ref_entropy_BL=None,
         score_BL=None, weights_BL=None, normalizer=None, noise_BL=None
         ) -> tuple[jax.Array, dict[str, Any]]:
  """The SLM loss: mean of `token_loss_BL` over the selected tokens, and metrics.

  Gradients flow only through `token_loss_BL` (the selection and the reference are
  stop-gradient'ed), and only at the selected tokens.

  Args:
    token_loss_BL: per-token loss of the model being trained (e.g. `ar_token_losses`).
    ref_token_loss_BL: per-token loss of the reference model on the same targets (online forward
      pass or an offline cache aligned to the same packed rows).
    valid_BL: positions that have a target (padding / document ends / unmasked are False).
    ratio: fraction kept, in (0, 1]; 1 gives the plain mean loss.
    per_sequence: rank within rows instead of the whole batch.
    score: 'excess' | 'reference_loss' | 'reference_entropy' (see `selection_score`).
    ref_entropy_BL: the reference's predictive entropy, for score='reference_entropy'.
    score_BL: a custom ranking score (higher kept first); overrides `score`.
    weights_BL: per-token weights of the loss (e.g. 1/p_mask for LLaDA); they do not affect the
      ranking.
    normalizer: the denominator; None = the number of selected tokens (the paper's mean over
      selected tokens). LLaDA's loss divides by B*L: pass `ratio * B * L` so that ratio=1 gives
      exactly `objectives.diffusion.loss`.
    noise_BL: optional bool, which targets are known noise (synthetic corpora); adds
      `noise_share_kept` and `noise_recall_dropped` to the metrics.
  Metrics: selected_fraction, num_selected, num_valid, excess_kept, excess_dropped (means of
  L_theta - L_ref over kept / dropped valid tokens), loss_all (weighted mean token loss over every
  valid token, what uniform training would see), loss_selected (plain mean over selected tokens).
  """
  if score_BL is None:
    s = selection_score(token_loss_BL, ref_token_loss_BL, score=score,
                        ref_entropy_BL=ref_entropy_BL)
  else:
    s = jax.lax.stop_gradient(score_BL.astype(jnp.float32))
  valid = valid_BL.astype(bool)
  sel = jax.lax.stop_gradient(select_tokens(s, valid, ratio, per_sequence=per_sequence))
  tl = token_loss_BL.astype(jnp.float32)
  w = jnp.ones_like(tl) if weights_BL is None else jax.lax.stop_gradient(
      weights_BL.astype(jnp.float32))
  n_sel = sel.astype(jnp.float32).sum()
  n_valid = valid.astype(jnp.float32).sum()
  denom = jnp.maximum(n_sel, 1.0) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
  # where(): an inf/NaN loss at a dropped or invalid position must not poison the sum or the grad.
  total = jnp.where(sel, tl * w, 0.0).sum() / denom

  excess = jax.lax.stop_gradient(tl - ref_token_loss_BL.astype(jnp.float32))
  excess = jnp.where(valid, excess, 0.0)
  dropped = valid & ~sel
  tl_ng = jax.lax.stop_gradient(jnp.where(valid, tl, 0.0))
  metrics = {
      'selected_fraction': n_sel / jnp.maximum(n_valid, 1.0),
      'num_selected': n_sel,
      'num_valid': n_valid,
      'excess_kept': _masked_mean(excess, sel),
      'excess_dropped': _masked_mean(excess, dropped),
      'loss_all': (tl_ng * w * valid).sum() / jnp.maximum((w * valid).sum(), 1e-9),
      'loss_selected': _masked_mean(tl_ng, sel),
  }
  if noise_BL is not None:
    noise = noise_BL.astype(bool) & valid
    metrics['noise_share_kept'] = (sel & noise).sum() / jnp.maximum(n_sel, 1.0)
    metrics['noise_recall_dropped'] = ((dropped & noise).sum()
                                       / jnp.maximum(noise.sum().astype(jnp.float32), 1.0))
  return total, metrics


def ar_token_losses(logits_BLV: jax.Array, tokens_BL: jax.Array,
                    segment_ids_BL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Next-token losses and validity, both [B, L-1] (position i predicts token i+1).

  The same alignment as `objectives.autoregressive.loss`; an offline L_ref cache must be stored in
  this alignment for the same packed rows. `logits_BLV` may be a `token_losses.TokenLosses`
  against `autoregressive.next_token_targets`.
  """
  if isinstance(logits_BLV, token_losses.TokenLosses):
    ce_BL = logits_BLV.ce_BL[:, :-1]
  else:
    ce_BL, _ = autoregressive.token_losses(logits_BLV[:, :-1], tokens_BL[:, 1:])
  return ce_BL, autoregressive.next_token_valid(tokens_BL, segment_ids_BL)


def diffusion_token_losses(logits_BLV: jax.Array, tokens_BL: jax.Array, masked_BL: jax.Array,
                           p_mask_BL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """LLaDA per-token losses for selection: (ce_BL, weight_BL, valid_BL), all [B, L].

  `ce_BL` is the plain cross-entropy of the clean token at every position (float32), `valid_BL`
  the masked positions, `weight_BL` = 1/p_mask at masked positions (0 elsewhere). Call it for the
  trained model and for the reference with the SAME `masked_BL`/`p_mask_BL` (one
  `diffusion.forward_process` draw feeds both forward passes), rank by the unweighted excess CE
  and weight the kept tokens by 1/p_mask (`loss(..., weights_BL=weight_BL,
  normalizer=ratio * B * L)`), which at ratio=1 is exactly LLaDA's pretraining loss
  `sum_masked CE / p_mask / (B*L)`. Ranking the unweighted CE keeps rows with few masks (small t,
  large 1/t) from dominating a whole-batch ranking; per-row ranking is unaffected either way.
  """
  ce_BL = token_losses.of(logits_BLV, tokens_BL).ce_BL  # logits, or TokenLosses against tokens
  valid = masked_BL.astype(bool)
  weight = jnp.where(valid, 1.0 / p_mask_BL.astype(jnp.float32), 0.0)
  return ce_BL, weight, valid
