"""Reward-model loss (pure functions of arrays): Bradley-Terry on pairs of scalar rewards.

Bradley and Terry (1952), "Rank Analysis of Incomplete Block Designs", as reward modelling uses
it (Ouyang et al. 2022, "Training language models to follow instructions with human feedback"):
P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)). The loss is its negative log-likelihood, with
TRL's RewardTrainer options (Llama 2's margin, Eisenstein et al. 2023's centering):

    loss = mean_B -log sigma(r_w - r_l - m) + center_coef * mean_B (r_w + r_l)^2

The reward of a response is usually a linear head on the hidden state of its last non-padding
token; that belongs to the model and the task, not here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def bradley_terry_loss(r_chosen_B: jax.Array, r_rejected_B: jax.Array, *,
                       margin_B: jax.Array | None = None, center_coef: float = 0.0,
                       valid_B: jax.Array | None = None
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pairwise reward-model loss (module docstring) and metrics, float32.

  Args:
    r_chosen_B, r_rejected_B: scalar rewards of the preferred and the other response.
    margin_B: optional per-pair margin m the chosen reward must exceed the rejected one by (e.g.
      from a preference strength: Llama 2's "significantly better" pairs get a larger m).
    center_coef: >= 0; weight of mean((r_w + r_l)^2), which pins the reward's free offset near 0
      (TRL's center_rewards_coefficient; 1e-2 in its docs).
    valid_B: optional bool [B]: the pairs that count (packed pair slots that hold a pair); the
      loss and every metric are over them only (0 when there is none), and the others get no
      gradient.
  Metrics (as TRL names them): accuracy (share of pairs with r_w > r_l; ties count as wrong),
  margin (mean r_w - r_l), min_reward / mean_reward / max_reward over both responses.
  """
  shapes = {'r_chosen_B': jnp.shape(r_chosen_B), 'r_rejected_B': jnp.shape(r_rejected_B)}
  if margin_B is not None:
    shapes['margin_B'] = jnp.shape(margin_B)
  if valid_B is not None:
    shapes['valid_B'] = jnp.shape(valid_B)
  if len(set(shapes.values())) > 1:
    raise ValueError('bradley_terry_loss: shapes differ: '
                     + ', '.join(f'{k} {s}' for k, s in shapes.items()))
  static_coef = isinstance(center_coef, (int, float, np.number))
  if static_coef and not center_coef >= 0:
    raise ValueError(f'bradley_terry_loss: center_coef must be >= 0, got {center_coef}')
  r_w = jnp.asarray(r_chosen_B, jnp.float32)
  r_l = jnp.asarray(r_rejected_B, jnp.float32)
  if valid_B is None:
    valid_B = jnp.ones(jnp.shape(r_w), bool)
  else:  # invalid slots read 0 before any arithmetic: no inf or NaN reaches their gradient
    valid_B = jnp.asarray(valid_B, bool)
    r_w, r_l = jnp.where(valid_B, r_w, 0.0), jnp.where(valid_B, r_l, 0.0)
  count = jnp.maximum(valid_B.sum(), 1).astype(jnp.float32)
  mean = lambda x_B: jnp.where(valid_B, x_B, 0.0).sum() / count
  diff_B = r_w - r_l
  logits_B = diff_B if margin_B is None else diff_B - jnp.asarray(margin_B, jnp.float32)
  loss = mean(-jax.nn.log_sigmoid(logits_B))
  if not (static_coef and center_coef == 0):  # a traced coefficient always adds the term
    loss = loss + center_coef * mean((r_w + r_l) ** 2)
  diff_B = jax.lax.stop_gradient(diff_B)
  both = jax.lax.stop_gradient(jnp.concatenate([r_w.reshape(-1), r_l.reshape(-1)]))
  valid2 = jnp.concatenate([valid_B.reshape(-1)] * 2)
  any_valid = valid_B.any()
  metrics = {
      'accuracy': mean((diff_B > 0).astype(jnp.float32)),
      'margin': mean(diff_B),
      'min_reward': jnp.where(any_valid, jnp.where(valid2, both, jnp.inf).min(), 0.0),
      'mean_reward': jnp.where(valid2, both, 0.0).sum() / (2 * count),
      'max_reward': jnp.where(any_valid, jnp.where(valid2, both, -jnp.inf).max(), 0.0),
  }
  return loss, metrics
