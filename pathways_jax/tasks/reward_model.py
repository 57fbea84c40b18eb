"""Reward modelling as a task ('reward_model'): a Bradley-Terry reward model on preference pairs.

    config.task = 'reward_model'
    config.model.scalar_head = True       # the reward: a linear head on the final hidden state
    config.data.corpus = 'preference'     # data/preference.py: pairs packed as segment pairs
    config.train.init_from = 'runs/sft'   # optional: the backbone starts here, the head fresh
    config.reward_model.center_coef = 0.0 # + c * mean((r_w + r_l)^2) (TRL's centering)

The reward of a side is the scalar head at the last token of its segment (segment 2k-1: prompt +
chosen of the row's k-th pair, 2k: prompt + rejected). In a causal model that token has read the
whole sequence, as a HuggingFace sequence-classification model reads its last non-padding token;
a bidirectional (LLaDA, `model.causal=False`) backbone is read at the same position, where every
token of the sequence is visible. The loss is `objectives.reward.bradley_terry_loss` over the
batch's pairs (`valid_B`: the pair slots that hold a pair); a batch's units (`COUNT`) are its
pairs, so accumulation and validation average over pairs however they fall into rows.
Validation reports val_accuracy (share of pairs with r_w > r_l) and val_margin. Lines with a
`"margin"` (data/preference.py) make it `-log σ(r_w - r_l - margin)` for their pairs.

A LoRA reward model (model.lora_rank > 0) trains its adapters and the head (the trainer's default
`train.trainable`). `pathways_jax.eval.reward.score` scores conversations with a trained one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pathways_jax.config import ConfigError
from pathways_jax.objectives import preference
from pathways_jax.objectives import reward
from pathways_jax.tasks.base import COUNT, TOKEN_FIELDS, Task
from pathways_jax.tasks.registry import register


def last_token_mask(segment_ids_BL: jax.Array) -> jax.Array:
  """bool [B, L]: the last token of each segment (segment id > 0; 0 is padding)."""
  seg = segment_ids_BL
  following = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))  # the row's end is followed by "padding"
  return (seg > 0) & (following != seg)


def pair_rewards(scalar_BL: jax.Array, segment_ids_BL: jax.Array) -> dict[str, jax.Array]:
  """{'chosen', 'rejected': float32 [P], 'valid': bool [P]} over the P = B * (L // 2) pair slots
  of packed preference rows (`preference.packed_pair_logps`'s slots): each side's scalar at the
  last token of its segment."""
  out = preference.packed_pair_logps(scalar_BL, last_token_mask(segment_ids_BL), segment_ids_BL)
  return {'chosen': out['chosen'], 'rejected': out['rejected'], 'valid': out['valid']}


def pair_margins(batch: dict) -> jax.Array | None:
  """float32 [P]: each pair slot's margin from the rows' `margin` field (data/preference.py:
  a line's "margin", on every token of its pair), None when the rows carry none."""
  if 'margin' not in batch:
    return None
  seg = batch['segment_ids']
  return preference.packed_pair_logps(batch['margin'].astype(jnp.float32), last_token_mask(seg),
                                      seg)['chosen']


@register('reward_model')
class RewardModelTask(Task):
  """Bradley-Terry on the scalar head's rewards of packed preference pairs."""

  def __init__(self, cfg, model):
    super().__init__(cfg, model)
    if not model.cfg.scalar_head:
      raise ConfigError("task 'reward_model' reads a scalar head: set config.model.scalar_head="
                        'True (a model without one gets it fresh, also from train.init_from)')
    if cfg.data.corpus != 'preference':
      raise ConfigError("task 'reward_model' trains on pairs: set config.data.corpus='preference' "
                        f'(it is {cfg.data.corpus!r})')
    self.center_coef = float(cfg.reward_model.center_coef)
    if not self.center_coef >= 0:
      raise ConfigError('config.reward_model.center_coef must be >= 0, got '
                        f'{cfg.reward_model.center_coef}')

  def batch_fields(self):
    return {k: jnp.int32 for k in TOKEN_FIELDS}

  def describe(self) -> str:
    kind = 'causal' if self.model.cfg.causal else 'bidirectional'
    return f'reward_model({kind}, center_coef={self.center_coef})'

  def rewards(self, params, batch) -> dict[str, jax.Array]:
    """`pair_rewards` of a batch of packed preference rows under `params`."""
    scalar_BL = self.model.apply({'params': params}, batch['tokens'],
                                 positions_BL=batch['positions'],
                                 segment_ids_BL=batch['segment_ids'], return_scalar=True)
    return pair_rewards(scalar_BL, batch['segment_ids'])

  def loss(self, params, batch, key, aux=None):
    del key, aux
    r = self.rewards(params, batch)
    loss, metrics = reward.bradley_terry_loss(r['chosen'], r['rejected'],
                                              margin_B=pair_margins(batch),
                                              center_coef=self.center_coef, valid_B=r['valid'])
    return loss, {**metrics, COUNT: r['valid'].astype(jnp.float32).sum()}

  def eval_loss(self, params, batch, key, aux=None):
    # Validation averages each batch's metrics weighted by its pairs: a batch's min or max
    # reward averaged that way is no extreme of anything, so validation leaves them out.
    loss, metrics = self.loss(params, batch, key, aux)
    return loss, {k: v for k, v in metrics.items() if k not in ('min_reward', 'max_reward')}


__all__ = ('RewardModelTask', 'last_token_mask', 'pair_margins', 'pair_rewards')
