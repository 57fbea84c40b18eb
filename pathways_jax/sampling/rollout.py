"""Rollouts inside training: G samples per prompt from an AR policy, on the run's mesh, with the
log-probability of every sampled token (what RL objectives need).

    ro = rollout(model, params, prompt_BP, prompt_mask_BP, key=key, mesh=mesh, rules=rules,
                 num_samples=4, max_new_tokens=64, temperature=1.0, eos_id=tok.eos_id,
                 pad_id=tok.pad_id)
    ro.tokens_BT           [B*G, P+N] each prompt G times (rows b*G .. b*G+G-1), left-padded,
                           then its completion; pad after EOS
    ro.logprobs_BN         [B*G, N] log softmax(logits / temperature) of each sampled token (the
                           sampling policy before top-k/top-p/min-p filtering; 0 where nothing was
                           generated)
    ro.completion_mask_BN  [B*G, N] True on generated tokens, up to and including EOS
    ro.steps               decoding steps run: the loop stops once every row has emitted EOS

A multi-LoRA policy (model.lora_num_adapters = K > 1) takes `adapter_ids_B` [B], one adapter per
prompt (its G samples share it): one batch samples K fine-tunes at once, row by row what each
adapter's own model gives (tests/test_rollout.py).

One jitted program around `autoregressive.decode` (the KV-cache decoder `autoregressive.generate`
uses too): the prompt forward fills a KV cache, then a `while_loop` decodes one token per step.
The cache lives only inside the program, as a loop carry XLA updates in place (nothing to
donate), sharded by its logical axes (`transformer.CACHE_AXES`: rows over the data axes, KV heads
over `tensor`); prompts, outputs and params carry explicit shardings. Random draws are keyed by
step, and JAX's partitionable threefry makes them independent of the sharding.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pathways_jax import parallel
from pathways_jax.models.transformer import CACHE_AXES, Transformer, check_adapter_ids, init_cache
from pathways_jax.sampling import autoregressive


class Rollout(NamedTuple):
  tokens_BT: jax.Array
  logprobs_BN: jax.Array
  completion_mask_BN: jax.Array
  steps: jax.Array


def cache_shardings(model_cfg, batch_size: int, length: int, mesh, rules):
  """NamedShardings of a KV cache from its logical axes (a dim they do not divide: replicated)."""
  shapes = jax.eval_shape(lambda: init_cache(model_cfg, batch_size, length))
  boxed = {k: nn.LogicallyPartitioned(v, CACHE_AXES[k]) for k, v in shapes.items()}
  return parallel.logical_to_sharding(boxed, mesh, rules)


def _decode(model, params, prompt_BP, prompt_mask_BP, key, adapter_ids_B, cache_sh, *,
            num_samples, **kw):
  """Each prompt `num_samples` times, through autoregressive.decode (the one KV-cache decoder)."""
  prompt_BP = jnp.repeat(prompt_BP, num_samples, axis=0)
  prompt_mask_BP = jnp.repeat(prompt_mask_BP, num_samples, axis=0)
  if adapter_ids_B is not None:
    adapter_ids_B = jnp.repeat(adapter_ids_B, num_samples, axis=0)
  return Rollout(*autoregressive.decode(model, params, prompt_BP, prompt_mask_BP, key,
                                        cache_sharding=cache_sh, adapter_ids_B=adapter_ids_B,
                                        **kw))


class RolloutSampler:
  """A rollout program built once for one batch shape and sampling setup, called every step."""

  def __init__(self, model: Transformer, mesh, rules, *, batch_size: int, prompt_len: int,
               max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               eos_id: int | None = None, pad_id: int = 0, param_shardings=None):
    if not isinstance(model, Transformer) or not model.cfg.causal:
      raise ValueError('rollout needs a causal Transformer (LLaDA models: sampling.diffusion)')
    if max_new_tokens < 1 or num_samples < 1 or temperature < 0 or prompt_len < 1:
      raise ValueError(f'need prompt_len, max_new_tokens, num_samples >= 1 and temperature >= 0, '
                       f'got {prompt_len}, {max_new_tokens}, {num_samples}, {temperature}')
    if prompt_len + max_new_tokens > model.cfg.max_len:
      raise ValueError(f'prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds '
                       f'model.max_len={model.cfg.max_len}')
    dp = parallel.data_parallel_size(mesh)
    if batch_size % dp:
      raise ValueError(f'{batch_size} prompts do not split over the {dp} data-parallel devices: '
                       'give a multiple of it')
    if param_shardings is None:
      from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
      param_shardings = frozen.abstract_params_and_shardings(model, mesh, rules)[1]
    self.mesh, self.rules, self.shape = mesh, rules, (batch_size, prompt_len)
    self.model_cfg = model.cfg
    self.rows = parallel.batch_sharding(mesh)
    cache_sh = cache_shardings(model.cfg, batch_size * num_samples, prompt_len + max_new_tokens,
                               mesh, rules)
    fn = functools.partial(
        _decode, model, cache_sh=cache_sh, num_samples=num_samples,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k or None,
        top_p=top_p or None, min_p=min_p or None, eos_id=eos_id, pad_id=pad_id)
    self._fn = jax.jit(fn, in_shardings=(param_shardings, self.rows, self.rows,
                                         parallel.replicated(mesh), self.rows),
                       out_shardings=Rollout(self.rows, self.rows, self.rows,
                                             parallel.replicated(mesh)))

  def __call__(self, params, prompt_BP, prompt_mask_BP=None, *, key,
               adapter_ids_B=None) -> Rollout:
    prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
    if prompt_BP.shape != self.shape:
      raise ValueError(f'prompt_BP has shape {prompt_BP.shape}, this sampler was built for '
                       f'{self.shape}')
    check_adapter_ids(self.model_cfg, adapter_ids_B, self.shape[0])  # one clear error, eagerly
    mask = (jnp.ones_like(prompt_BP, bool) if prompt_mask_BP is None
            else jnp.asarray(prompt_mask_BP, bool))
    ids = None if adapter_ids_B is None else jax.device_put(
        jnp.asarray(adapter_ids_B, jnp.int32), self.rows)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._fn(params, jax.device_put(prompt_BP, self.rows),
                      jax.device_put(mask, self.rows), key, ids)


@functools.lru_cache(maxsize=16)
def _sampler(model, mesh, rules, **kwargs) -> RolloutSampler:
  return RolloutSampler(model, mesh, rules, **kwargs)


def rollout(model: Transformer, params, prompt_BP, prompt_mask_BP=None, *, key, mesh, rules,
            max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
            top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
            eos_id: int | None = None, pad_id: int = 0, adapter_ids_B=None) -> Rollout:
  """`num_samples` completions of each prompt (see the module docstring); the program is built
  once per model, mesh, shape and setup, and reused. `adapter_ids_B` [B]: each prompt's adapter
  of a multi-LoRA model."""
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  if prompt_BP.ndim != 2:
    raise ValueError(f'prompt_BP must be [batch, length], got shape {prompt_BP.shape}')
  sampler = _sampler(model, mesh, tuple(rules), batch_size=prompt_BP.shape[0],
                     prompt_len=prompt_BP.shape[1], max_new_tokens=max_new_tokens,
                     num_samples=num_samples, temperature=float(temperature), top_k=top_k,
                     top_p=top_p, min_p=min_p, eos_id=eos_id, pad_id=pad_id)
  return sampler(params, prompt_BP, prompt_mask_BP, key=key, adapter_ids_B=adapter_ids_B)
