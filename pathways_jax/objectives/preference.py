"""Preference optimisation losses (pure functions of arrays): DPO and its variants, SimPO, ORPO.

Inputs are per-example sequence log-probabilities of a chosen response y_w and a rejected response
y_l to the same prompt x, under the model being trained (pi) and, for the reference-based losses,
under a frozen reference (pi_ref). `sequence_logps` makes them from logits. Notation:

    Delta = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    z     = beta * Delta
    log sigma = jax.nn.log_sigmoid (stable for any z)

`dpo_loss` returns the mean over the batch of one of (eps = label_smoothing):

  'sigmoid'  DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
             Secretly a Reward Model"): -log sigma(z). With eps > 0 it is conservative DPO
             (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"), the expected DPO loss
             when each label is flipped with probability eps:
             -(1 - eps) log sigma(z) - eps log sigma(-z), eps in [0, 0.5].
  'robust'   robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), an unbiased estimate of the
             clean loss under label noise eps: (-(1 - eps) log sigma(z) + eps log sigma(-z))
             / (1 - 2 eps). eps in [0, 0.5); eps = 0 is 'sigmoid'.
  'ipo'      IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
             Human Preferences", eq. 17 with tau = beta): (Delta - 1/(2 beta))^2. As the IPO
             authors and TRL do, pass LENGTH-AVERAGED log-probs (`sequence_logps(...,
             average=True)`, for the model and the reference), else the target margin 1/(2 beta)
             scales with length.
  'hinge'    SLiC-style hinge (Zhao et al. 2023, "SLiC-HF"; TRL's 'hinge'): relu(1 - z).
  'simpo'    SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
             Reward"), reference-free, on LENGTH-AVERAGED log-probs of the model only:
             s = beta (log pi(y_w|x)/|y_w| - log pi(y_l|x)/|y_l|) - gamma, loss
             -(1 - eps) log sigma(s) - eps log sigma(-s) (TRL's CPOTrainer, loss_type='simpo';
             gamma = `simpo_gamma`, the target reward margin; princeton-nlp/SimPO's
             gamma_beta_ratio is gamma / beta). The paper uses beta of 2 to 10, not 0.1.
  'orpo'     ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
             Model"), reference-free. With p_w, p_l the LENGTH-AVERAGED log-probs of the model and
             odds(p) = exp(p) / (1 - exp(p)):
             log_odds = (p_w - p_l) - (log(1 - exp(p_w)) - log(1 - exp(p_l)))
             loss = mean(chosen_nll_B) + beta * mean(-log sigma(log_odds))
             (beta is the paper's lambda, TRL's ORPOConfig.beta; the NLL term is part of the method,
             so `chosen_nll_B` is required). log(1 - exp(p)) is evaluated stably (log1p(-exp(p))
             below -ln 2, log(-expm1(p)) above) and p is clipped to at most -1e-6 so the log-odds
             stay finite when a response has probability ~1.

RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's rpo_alpha, now
loss_type=['sigmoid', 'sft']; PAPRIKA's stage 2 with alpha = 1): any loss type but 'orpo' adds
`rpo_alpha * mean(chosen_nll_B)`. CPO (Xu et al. 2024) is 'sigmoid' with zero reference log-probs
plus that NLL term. `chosen_nll_B` is the caller's per-example NLL of the chosen response; the
papers use the length-normalised one, -sequence_logps(..., average=True). (TRL's 'sft' term is a
token mean over the whole batch: pass -sum_logps_B * B / total_chosen_tokens to get it exactly.)

Metrics, named as TRL names them (batch means, gradients stopped):
  rewards/chosen, rewards/rejected  implicit rewards beta (log pi - log pi_ref); for the
                                    reference-free 'simpo' and 'orpo', beta log pi (as TRL's CPO
                                    and ORPO trainers log them)
  rewards/accuracies                share of examples with rewards/chosen > rewards/rejected
  rewards/margins                   mean of rewards/chosen - rewards/rejected
  logps/chosen, logps/rejected      mean of the log-probs passed in
  nll_loss                          mean(chosen_nll_B), when it is given
  log_odds_ratio, log_odds_chosen   ('orpo') mean log sigma(log_odds) and mean log_odds

Everything is computed in float32 whatever the input dtype, and works under jit and grad
(beta may be a traced scalar; it is then not range-checked).

    logps_B = sequence_logps(logits_BLV[:, :-1], tokens_BL[:, 1:], completion_BL[:, 1:])
    loss, metrics = dpo_loss(logps_B[:B], logps_B[B:], ref_B[:B], ref_B[B:], beta=0.1)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.objectives import autoregressive, token_losses

LOSS_TYPES = ('sigmoid', 'robust', 'ipo', 'hinge', 'simpo', 'orpo')
REFERENCE_FREE = ('simpo', 'orpo')
# Largest average log-prob ORPO's log-odds see: log(1 - exp(p)) -> -inf as p -> 0.
ORPO_MAX_LOGP = -1e-6
_LN2 = math.log(2.0)


def sequence_logps(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array, *,
                   average: bool = False) -> jax.Array:
  """Sum (or mean) over the masked positions of log p(target | logits), float32 [B].

  `logits_BLV[:, i]` scores `targets_BL[:, i]` (already aligned: for a causal LM pass
  `logits[:, :-1], tokens[:, 1:], completion_mask[:, 1:]`). Positions where `mask_BL` is 0 (the
  prompt, padding) add nothing, whatever their target id (-100 or out of vocabulary included).
  `average=True` divides by the number of masked positions (at least 1): the length-normalised
  log-prob that IPO, SimPO and ORPO use.
  """
  if logits_BLV.shape[:-1] != targets_BL.shape or targets_BL.shape != mask_BL.shape:
    raise ValueError(f'sequence_logps: logits {logits_BLV.shape}, targets {targets_BL.shape} and '
                     f'mask {mask_BL.shape} must agree as [B, L, V], [B, L], [B, L]')
  mask = mask_BL.astype(bool)
  # A masked-out target may be an ignore id (-100); gather a valid id there and drop it after.
  safe_targets_BL = jnp.where(mask, targets_BL, 0)
  ce_BL, _ = autoregressive.token_losses(logits_BLV, safe_targets_BL)
  logps_B = jnp.where(mask, -ce_BL, 0.0).sum(axis=-1)
  if average:
    logps_B = logps_B / jnp.maximum(mask.sum(axis=-1), 1).astype(jnp.float32)
  return logps_B


def packed_pair_logps(token_logps_BL: jax.Array, loss_mask_BL: jax.Array,
                      segment_ids_BL: jax.Array) -> dict[str, jax.Array]:
  """Per-pair sequence log-probs of rows that pack pairs as segments (data/preference.py: segment
  2k-1 is the k-th pair's prompt + chosen, segment 2k its prompt + rejected).

  `token_logps_BL[b, i]` is log p(token i) (aligned with the tokens: for a causal LM the previous
  position's prediction); it is read only where `loss_mask_BL` is 1 (the responses). Returns
  float32 [P] arrays over P = B * (L // 2) pair slots (row b's k-th pair at b * (L // 2) + k - 1):
  `chosen`, `rejected` (sums), `chosen_tokens`, `rejected_tokens` (counts) and `valid` (bool:
  the slot holds a pair, both sides with response tokens). Slots that hold no pair are 0.
  """
  b, l = segment_ids_BL.shape
  per_row = l // 2
  seg = segment_ids_BL
  trained = loss_mask_BL.astype(bool) & (seg > 0)
  pair_BL = jnp.clip((seg + 1) // 2 - 1, 0, per_row - 1) + per_row * jnp.arange(b)[:, None]
  slot = (pair_BL * 2 + (seg % 2 == 0)).reshape(-1)  # side 0: chosen (odd segment), 1: rejected
  n = b * per_row * 2
  vals = jnp.where(trained, token_logps_BL.astype(jnp.float32), 0.0).reshape(-1)
  sums = jax.ops.segment_sum(vals, slot, num_segments=n).reshape(-1, 2)
  counts = jax.ops.segment_sum(trained.reshape(-1).astype(jnp.float32), slot,
                               num_segments=n).reshape(-1, 2)
  return {'chosen': sums[:, 0], 'rejected': sums[:, 1], 'chosen_tokens': counts[:, 0],
          'rejected_tokens': counts[:, 1], 'valid': (counts[:, 0] > 0) & (counts[:, 1] > 0)}


def causal_token_logps(logits_BLV: jax.Array, tokens_BL: jax.Array) -> jax.Array:
  """float32 [B, L]: log p(token i | tokens < i) at i >= 1 (position 0, which nothing predicts,
  is 0), from a causal LM's logits (or `token_losses.TokenLosses` against
  `autoregressive.next_token_targets`). Aligned with the tokens, for `packed_pair_logps`."""
  ce_BL = token_losses.of(logits_BLV, autoregressive.next_token_targets(tokens_BL)).ce_BL
  return jnp.pad(-ce_BL[:, :-1], ((0, 0), (1, 0)))


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def check_args(loss_type, beta, label_smoothing, rpo_alpha, chosen_nll_B, has_ref) -> None:
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'dpo_loss: loss_type={loss_type!r} is not one of {LOSS_TYPES}')
  if _is_number(beta) and not beta > 0:
    raise ValueError(f'dpo_loss: beta must be > 0, got {beta}')
  eps = label_smoothing
  if loss_type in ('sigmoid', 'simpo') and not 0.0 <= eps <= 0.5:
    raise ValueError(f'dpo_loss: label_smoothing must be in [0, 0.5] for {loss_type!r} (the '
                     f'probability a label is flipped), got {eps}')
  if loss_type == 'robust' and not 0.0 <= eps < 0.5:
    raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5) for 'robust' (it divides by "
                     f'1 - 2 label_smoothing), got {eps}')
  if loss_type in ('ipo', 'hinge', 'orpo') and eps != 0.0:
    raise ValueError(f'dpo_loss: {loss_type!r} takes no label_smoothing, got {eps}')
  if not rpo_alpha >= 0.0:
    raise ValueError(f'dpo_loss: rpo_alpha must be >= 0, got {rpo_alpha}')
  if rpo_alpha > 0.0 and chosen_nll_B is None:
    raise ValueError('dpo_loss: rpo_alpha > 0 needs chosen_nll_B (the NLL of the chosen responses)')
  if loss_type == 'orpo':
    if chosen_nll_B is None:
      raise ValueError("dpo_loss: 'orpo' needs chosen_nll_B (its loss is NLL + beta * odds-ratio "
                       'term)')
    if rpo_alpha > 0.0:
      raise ValueError("dpo_loss: 'orpo' already includes the chosen NLL with weight 1; leave "
                       'rpo_alpha at 0')
  if loss_type in REFERENCE_FREE and has_ref:
    raise ValueError(f'dpo_loss: {loss_type!r} is reference-free; pass ref_chosen_logps_B=None '
                     'and ref_rejected_logps_B=None')
  if loss_type not in REFERENCE_FREE and not has_ref:
    raise ValueError(f'dpo_loss: {loss_type!r} needs ref_chosen_logps_B and ref_rejected_logps_B '
                     '(zeros give the reference-free CPO form)')


def _check_shapes(name: str, **arrays) -> None:
  shapes = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
  if len(set(shapes.values())) > 1:
    raise ValueError(f'{name}: shapes differ: '
                     + ', '.join(f'{k} {s}' for k, s in shapes.items()))


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler 2012, "Accurately
  computing log(1 - exp(-|a|))"): log1p(-exp(x)) below -ln 2, log(-expm1(x)) above.

  Each branch is fed only inputs of its own range (the other gets a harmless constant), so
  neither branch's value nor gradient can be inf/NaN where `where` discards it: a NaN
  gradient of the unused branch would otherwise survive the `where`.
  """
  low = x < -_LN2
  far = jnp.log1p(-jnp.exp(jnp.where(low, x, -1.0)))
  near = jnp.log(-jnp.expm1(jnp.where(low, -0.5, x)))
  return jnp.where(low, far, near)


def dpo_loss(chosen_logps_B: jax.Array, rejected_logps_B: jax.Array,
             ref_chosen_logps_B: jax.Array | None = None,
             ref_rejected_logps_B: jax.Array | None = None, *, beta: float = 0.1,
             loss_type: str = 'sigmoid', label_smoothing: float = 0.0,
             chosen_nll_B: jax.Array | None = None, rpo_alpha: float = 0.0,
             simpo_gamma: float = 0.5, valid_B: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Preference loss (mean over the batch) and metrics; the module docstring gives the formulas.

  Args:
    chosen_logps_B, rejected_logps_B: log pi(y|x) of the model being trained (summed over the
      response tokens for 'sigmoid', 'robust', 'hinge'; length-averaged for 'ipo', 'simpo',
      'orpo').
    ref_chosen_logps_B, ref_rejected_logps_B: the same under the frozen reference, computed the
      same way (gradients are stopped); None for the reference-free 'simpo' and 'orpo', required
      otherwise.
    beta: > 0. DPO's KL strength / IPO's tau / SimPO's reward scale / ORPO's lambda.
    loss_type: one of LOSS_TYPES.
    label_smoothing: eps, the assumed label-flip probability ('sigmoid', 'simpo': [0, 0.5];
      'robust': [0, 0.5)); 0 for the others.
    chosen_nll_B: per-example NLL of the chosen response (required by 'orpo' and rpo_alpha > 0;
      otherwise only logged as `nll_loss`).
    rpo_alpha: weight of mean(chosen_nll_B) added to the loss (RPO / CPO); not with 'orpo'.
    simpo_gamma: SimPO's target reward margin gamma (used by 'simpo' only; TRL's default 0.5).
    valid_B: optional bool [B]: the examples that count (packed pair slots that hold a pair,
      `packed_pair_logps`); the loss and metrics are means over them (0 when there is none), and
      the others get no gradient.
  """
  has_ref = ref_chosen_logps_B is not None or ref_rejected_logps_B is not None
  check_args(loss_type, beta, label_smoothing, rpo_alpha, chosen_nll_B, has_ref)
  if has_ref and (ref_chosen_logps_B is None or ref_rejected_logps_B is None):
    raise ValueError('dpo_loss: pass both ref_chosen_logps_B and ref_rejected_logps_B, or neither')
  _check_shapes('dpo_loss', chosen_logps_B=chosen_logps_B, rejected_logps_B=rejected_logps_B,
                ref_chosen_logps_B=ref_chosen_logps_B, ref_rejected_logps_B=ref_rejected_logps_B,
                chosen_nll_B=chosen_nll_B)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen, rejected = f32(chosen_logps_B), f32(rejected_logps_B)
  beta = f32(beta)
  eps = label_smoothing
  metrics = {}
  if valid_B is None:
    mean = lambda x_B: x_B.mean()
  else:
    _check_shapes('dpo_loss', chosen_logps_B=chosen_logps_B, valid_B=valid_B)
    w_B = valid_B.astype(jnp.float32)
    mean = lambda x_B: jnp.where(valid_B, x_B, 0.0).sum() / jnp.maximum(w_B.sum(), 1.0)

  if loss_type in REFERENCE_FREE:
    chosen_score, rejected_score = chosen, rejected
  else:
    chosen_score = chosen - jax.lax.stop_gradient(f32(ref_chosen_logps_B))
    rejected_score = rejected - jax.lax.stop_gradient(f32(ref_rejected_logps_B))
  delta_B = chosen_score - rejected_score
  z_B = beta * delta_B

  if loss_type == 'sigmoid':
    per_B = -(1.0 - eps) * jax.nn.log_sigmoid(z_B) - eps * jax.nn.log_sigmoid(-z_B)
  elif loss_type == 'robust':
    per_B = ((-(1.0 - eps) * jax.nn.log_sigmoid(z_B) + eps * jax.nn.log_sigmoid(-z_B))
             / (1.0 - 2.0 * eps))
  elif loss_type == 'ipo':
    per_B = (delta_B - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == 'hinge':
    per_B = jax.nn.relu(1.0 - z_B)
  elif loss_type == 'simpo':
    s_B = z_B - simpo_gamma
    per_B = -(1.0 - eps) * jax.nn.log_sigmoid(s_B) - eps * jax.nn.log_sigmoid(-s_B)
  else:  # 'orpo'
    p_w = jnp.minimum(chosen, ORPO_MAX_LOGP)
    p_l = jnp.minimum(rejected, ORPO_MAX_LOGP)
    log_odds_B = (p_w - p_l) - (log1mexp(p_w) - log1mexp(p_l))
    ratio_B = jax.nn.log_sigmoid(log_odds_B)
    per_B = -beta * ratio_B
    metrics['log_odds_ratio'] = jax.lax.stop_gradient(mean(ratio_B))
    metrics['log_odds_chosen'] = jax.lax.stop_gradient(mean(log_odds_B))

  loss = mean(per_B)
  if chosen_nll_B is not None:
    nll = mean(f32(chosen_nll_B))
    metrics['nll_loss'] = jax.lax.stop_gradient(nll)
    if loss_type == 'orpo':
      loss = loss + nll
    elif rpo_alpha > 0.0:
      loss = loss + rpo_alpha * nll

  r_chosen = jax.lax.stop_gradient(beta * chosen_score)
  r_rejected = jax.lax.stop_gradient(beta * rejected_score)
  metrics.update({
      'rewards/chosen': mean(r_chosen),
      'rewards/rejected': mean(r_rejected),
      'rewards/accuracies': mean((r_chosen > r_rejected).astype(jnp.float32)),
      'rewards/margins': mean(r_chosen - r_rejected),
      'logps/chosen': jax.lax.stop_gradient(mean(chosen)),
      'logps/rejected': jax.lax.stop_gradient(mean(rejected)),
  })
  return loss, metrics
