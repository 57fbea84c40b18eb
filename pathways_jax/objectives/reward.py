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
                       margin_B: jax.Array | None = None, center_coef: float = 0.0
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pairwise reward-model loss (module docstring) and metrics, float32.

  Args:
    r_chosen_B, r_rejected_B: scalar rewards of the preferred and the other response.
    margin_B: optional per-pair margin m the chosen reward must exceed the rejected one by (e.g.
      from a preference strength: Llama 2's "significantly better" pairs get a larger m).
    center_coef: >= 0; weight of mean((r_w + r_l)^2), which pins the reward's free offset near 0
      (TRL's center_rewards_coefficient; 1e-2 in its docs).
  Metrics (as TRL names them): accuracy (share of pairs with r_w > r_l; ties count as wrong),
  margin (mean r_w - r_l), min_reward / mean_reward / max_reward over both responses.
  """
  shapes = {'r_chosen_B': jnp.shape(r_chosen_B), 'r_rejected_B': jnp.shape(r_rejected_B)}
  if margin_B is not None:
    shapes['margin_B'] = jnp.shape(margin_B)
  if len(set(shapes.values())) > 1:
    raise ValueError('bradley_terry_loss: shapes differ: '
                     + ', '.join(f'{k} {s}' for k, s in shapes.items()))
  static_coef = isinstance(center_coef, (int, float, np.number))
  if static_coef and not center_coef >= 0:
    raise ValueError(f'bradley_terry_loss: center_coef must be >= 0, got {center_coef}')
  r_w = jnp.asarray(r_chosen_B, jnp.float32)
  r_l = jnp.asarray(r_rejected_B, jnp.float32)
  diff_B = r_w - r_l
  logits_B = diff_B if margin_B is None else diff_B - jnp.asarray(margin_B, jnp.float32)
  loss = -jax.nn.log_sigmoid(logits_B).mean()
  if not (static_coef and center_coef == 0):  # a traced coefficient always adds the term
    loss = loss + center_coef * ((r_w + r_l) ** 2).mean()
  diff_B = jax.lax.stop_gradient(diff_B)
  both = jax.lax.stop_gradient(jnp.concatenate([r_w.reshape(-1), r_l.reshape(-1)]))
  metrics = {
      'accuracy': (diff_B > 0).astype(jnp.float32).mean(),
      'margin': diff_B.mean(),
      'min_reward': both.min(),
      'mean_reward': both.mean(),
      'max_reward': both.max(),
  }
  return loss, metrics
