"""Supervised fine-tuning tasks: `sft` (AR) and `llada_sft` (LLaDA's SFT loss).

`sft`: next-token cross-entropy over the tokens `loss_mask` marks (assistant turns, from
`data.corpus='chat'`, pathways_jax/data/sft.py), a mean over the trained tokens of the whole batch.

Both take a multi-LoRA model (model.lora_num_adapters = K > 1): the batch then carries
`adapter_ids` [B] and row b runs adapter adapter_ids[b]. The loss stays the mean over the
batch's trained tokens (all adapters' together), so adapter k's gradient is its own rows'
gradient times their share of the batch's trained tokens (docs/lora.md).

`llada_sft`: a batch holds, beside `tokens/segment_ids/positions`, `prompt` [B, L] (1 on the
prompt's tokens, bos included). The prompt is never masked; CE / p_mask over the masked answer
tokens, per row / answer length, mean over rows. Each row is one example: the prompt, the answer,
then eos padding up to L (`data.chat.eos_padding`), with `segment_ids` 1 on the whole row —
LLaDA trains the padding eos like answer tokens, which is how the model learns where an answer
ends. The first token of every segment (bos) is never masked.

`config.llada_sft.sft_fraction` < 1 mixes in LLaDA's pretraining loss: each row is drawn to be an
SFT row (prompt kept) with that probability, else any token of it may be masked, and the loss is
`(1 - f) * pretraining loss over those rows + f * SFT loss over the SFT rows`. The reversal
experiment trains this way: the pretraining rows teach description -> name, the SFT rows the
forward question's format.
"""
from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

from pathways_jax.config import ConfigError
from pathways_jax.objectives import autoregressive, diffusion
from pathways_jax.tasks.lm_head import outputs as lm_head_outputs
from pathways_jax.tasks.base import (ADAPTER_IDS, COUNT, TOKEN_FIELDS, Task, adapter_fields,
                                     per_adapter_losses)
from pathways_jax.tasks.pretrain import mask_id
from pathways_jax.tasks.registry import register


def _fraction(cfg) -> float:
  section = cfg.get('llada_sft')
  f = 1.0 if section is None else float(section.get('sft_fraction', 1.0))
  if not 0.0 <= f <= 1.0:
    raise ConfigError(f'config.llada_sft.sft_fraction={f} is not in [0, 1]')
  return f


@register('sft')
class SftTask(Task):
  """AR fine-tuning: mean cross-entropy of the trained tokens (`loss_mask`), packed rows."""
  perplexity = True

  def __init__(self, cfg, model):
    super().__init__(cfg, model)
    if not model.cfg.causal:
      raise ConfigError("task 'sft' trains a causal model; for LLaDA use task 'llada_sft'")

  def batch_fields(self):
    return {**{k: jnp.int32 for k in TOKEN_FIELDS}, 'loss_mask': jnp.int32,
            **adapter_fields(self.model)}

  def loss(self, params, batch, key, aux=None):
    del key, aux
    loss, metrics, _ = self._loss(params, batch)
    return loss, metrics

  def eval_loss(self, params, batch, key, aux=None):
    del key, aux
    loss, metrics, loss_of_rows = self._loss(params, batch)
    return loss, {**metrics, **per_adapter_losses(self.model, batch, loss_of_rows)}

  def _loss(self, params, batch):
    tokens, segments = batch['tokens'], batch['segment_ids']
    logits = lm_head_outputs(self.cfg, self.model, params, tokens,
                             autoregressive.next_token_targets(tokens),
                             positions_BL=batch['positions'], segment_ids_BL=segments,
                             adapter_ids_B=batch.get(ADAPTER_IDS))

    def loss_of_rows(rows_B):
      mask_BL = batch['loss_mask'] if rows_B is None else batch['loss_mask'] * rows_B[:, None]
      loss, metrics = autoregressive.loss(logits, tokens, segments, z_loss=self.cfg.train.z_loss,
                                          target_mask_BL=mask_BL)
      return loss, metrics['num_tokens'], metrics

    loss, count, metrics = loss_of_rows(None)
    return loss, {**metrics, COUNT: count}, lambda rows_B: loss_of_rows(rows_B)[:2]


@register('llada_sft')
class LladaSftTask(Task):
  """LLaDA SFT: CE / p_mask over the masked answer tokens, per row / answer length, mean."""
  required_specials = ('mask',)

  def __init__(self, cfg, model):
    super().__init__(cfg, model)
    if model.cfg.causal:
      raise ConfigError("task 'llada_sft' needs a bidirectional model (config.model.causal=False)")
    self.sft_fraction = _fraction(cfg)
    chat = cfg.data.get('chat')
    if cfg.data.corpus == 'chat' and chat is not None and not chat.get('eos_padding', False):
      # Packed rows train one eos per answer; the diffusion sampler fills every generated
      # position, so such a model never learns to stop (seen: held-out answers all garbage).
      logging.warning("task 'llada_sft' on packed chat rows: the model never sees an answer "
                      'followed by eos padding, so its sampled answers run to the end of the '
                      'generation window; LLaDA pads: set config.data.chat.pack=False and '
                      'config.data.chat.eos_padding=True')

  def batch_fields(self):
    return {**{k: jnp.int32 for k in TOKEN_FIELDS}, 'prompt': jnp.int32,
            **adapter_fields(self.model)}

  def loss(self, params, batch, key, aux=None):
    del aux
    loss, metrics, _ = self._loss(params, batch, key)
    return loss, metrics

  def eval_loss(self, params, batch, key, aux=None):
    del aux
    loss, metrics, loss_of_rows = self._loss(params, batch, key)
    return loss, {**metrics, **per_adapter_losses(self.model, batch, loss_of_rows)}

  def _loss(self, params, batch, key):
    """(loss, metrics, loss_of_rows): the batch's loss, and the same loss over a subset of its
    rows (-> (loss, units)) from the same masks and logits."""
    tokens, segments, positions = batch['tokens'], batch['segment_ids'], batch['positions']
    f = self.sft_fraction
    b, _ = tokens.shape
    k_row, k_mask = jax.random.split(key)
    sft_row_B = jax.random.uniform(k_row, (b,)) < f
    maskable_BL = (segments > 0) & (positions > 0)  # never bos, never padding between examples
    noisy, masked, p_mask = diffusion.forward_process(k_mask, tokens, mask_id=mask_id(self.cfg),
                                                      eps=self.cfg.diffusion.eps,
                                                      valid_BL=maskable_BL)
    prompt_BL = batch['prompt'].astype(bool)
    noisy, masked = diffusion.unmask_prompt(noisy, masked, tokens, prompt_BL & sft_row_B[:, None])
    logits = lm_head_outputs(self.cfg, self.model, params, noisy, tokens, positions_BL=positions,
                             segment_ids_BL=segments, adapter_ids_B=batch.get(ADAPTER_IDS))

    def loss_of_rows(rows_B):
      rows_BL = jnp.ones_like(maskable_BL) if rows_B is None else rows_B[:, None]
      valid_BL = maskable_BL & rows_BL
      sft, m = diffusion.sft_loss(logits, tokens, masked, p_mask, prompt_BL | ~maskable_BL,
                                  valid_BL=valid_BL & sft_row_B[:, None], segment_ids_BL=segments)
      metrics = {'ce': m['ce'], 'accuracy': m['accuracy']}
      if f == 1.0:
        # A mean over examples (each its answer's token mean): examples with an answer are its
        # units.
        return sft, _examples_with_answer(segments, valid_BL & ~prompt_BL), metrics
      pt, pm = diffusion.loss(logits, tokens, masked, p_mask,
                              valid_BL=valid_BL & ~sft_row_B[:, None])
      rows_pt, rows_sft = rows_BL[:, 0] & ~sft_row_B, rows_BL[:, 0] & sft_row_B
      has_pt, has_sft = jnp.any(rows_pt), jnp.any(rows_sft)
      total = jnp.where(has_pt, pt, 0.0) * (1.0 - f) + jnp.where(has_sft, sft, 0.0) * f
      # Metrics over the masked tokens of both kinds of row, each weighted by its masked count.
      n_sft, n_pt = m['num_masked'], pm['num_masked']
      n = jnp.maximum(n_sft + n_pt, 1.0)
      metrics = {'ce': (m['ce'] * n_sft + pm['ce'] * n_pt) / n,
                 'accuracy': (m['accuracy'] * n_sft + pm['accuracy'] * n_pt) / n,
                 'sft_ce': m['ce'], 'pretrain_ce': pm['ce']}
      return total, jnp.any(valid_BL, axis=1).astype(jnp.float32).sum(), metrics

    loss, count, metrics = loss_of_rows(None)
    return loss, {**metrics, COUNT: count}, lambda rows_B: loss_of_rows(rows_B)[:2]


def _examples_with_answer(segments_BL, answer_BL):
  """How many (row, segment) pairs hold at least one answer position."""
  b, l = segments_BL.shape
  slot_BL = jnp.arange(b, dtype=jnp.int32)[:, None] * l + jnp.clip(segments_BL, 0, l - 1)
  has_E = jax.ops.segment_max(answer_BL.reshape(-1).astype(jnp.int32), slot_BL.reshape(-1),
                              num_segments=b * l)
  return (has_E > 0).sum().astype(jnp.float32)
