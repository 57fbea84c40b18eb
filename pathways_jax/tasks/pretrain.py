"""Pretraining tasks: next-token prediction (AR) and LLaDA's masked diffusion."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pathways_jax.config import ConfigError
from pathways_jax.objectives import autoregressive, diffusion
from pathways_jax.tasks.lm_head import outputs as lm_head_outputs
from pathways_jax.tasks.base import COUNT, Task
from pathways_jax.tasks.registry import register


@register('autoregressive')
class AutoregressiveTask(Task):
  """Mean next-token cross-entropy over the targets inside each packed document (+ z-loss)."""
  perplexity = True

  def loss(self, params, batch, key, aux=None):
    del key, aux
    tokens, segments = batch['tokens'], batch['segment_ids']
    logits = lm_head_outputs(self.cfg, self.model, params, tokens,
                             autoregressive.next_token_targets(tokens),
                             positions_BL=batch['positions'], segment_ids_BL=segments)
    loss, metrics = autoregressive.loss(logits, tokens, segments, z_loss=self.cfg.train.z_loss)
    return loss, {**metrics, COUNT: metrics['num_tokens']}


@register('diffusion')
class DiffusionTask(Task):
  """LLaDA pretraining: a random mask rate per row, CE / p_mask over masked tokens / (B * L)."""
  required_specials = ('mask',)

  def loss(self, params, batch, key, aux=None):
    del aux
    tokens, segments = batch['tokens'], batch['segment_ids']
    noisy, masked, p_mask, valid = self.draws(batch, key)
    logits = lm_head_outputs(self.cfg, self.model, params, noisy, tokens,
                             positions_BL=batch['positions'], segment_ids_BL=segments * valid)
    loss, metrics = diffusion.loss(logits, tokens, masked, p_mask, valid_BL=valid)
    return loss, {**metrics, COUNT: valid.astype(jnp.float32).sum()}

  def eval_loss(self, params, batch, key, aux=None):
    """The diffusion bound on held-out rows: the mean over `diffusion.eval_draws` independent
    mask draws per row (its variance falls as 1 / draws), with no random-length cut."""
    del aux
    c = self.cfg
    tokens, segments = batch['tokens'], batch['segment_ids']
    valid = segments != 0

    def one_draw(key_i):
      noisy, masked, p_mask = diffusion.forward_process(key_i, tokens, mask_id=mask_id(c),
                                                        eps=c.diffusion.eps, valid_BL=valid)
      logits = lm_head_outputs(c, self.model, params, noisy, tokens,
                               positions_BL=batch['positions'], segment_ids_BL=segments)
      return diffusion.loss(logits, tokens, masked, p_mask, valid_BL=valid)

    draws = int(c.diffusion.get('eval_draws', 1))
    losses, metrics = jax.lax.map(one_draw, jax.random.split(key, draws))
    metrics = jax.tree.map(lambda v: v.mean(0), metrics)
    return losses.mean(), {**metrics, COUNT: valid.astype(jnp.float32).sum()}

  def draws(self, batch, key: jax.Array):
    """(noisy, masked, p_mask, valid) of a batch: the mask (and random length) LLaDA draws."""
    c = self.cfg
    return diffusion.pretraining_draws(key, batch['tokens'], batch['segment_ids'],
                                       mask_id=mask_id(c), eps=c.diffusion.eps,
                                       random_length_prob=c.diffusion.random_length_prob)


def mask_id(cfg) -> int:
  """config.data.mask_id, once the run has filled it in from the tokenizer."""
  if cfg.data.mask_id < 0:
    raise ConfigError('config.data.mask_id is not resolved: the trainer takes it from the '
                      'tokenizer (pathways_jax.data.tokenizers.resolve_special_ids)')
  return int(cfg.data.mask_id)
