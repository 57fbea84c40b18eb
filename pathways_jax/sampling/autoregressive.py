"""Autoregressive sampling: KV-cache prefill + a jitted decode loop, with the usual filters.

    tokens_BT = generate(model, params, prompt_BP, key=key, max_new_tokens=64,
                         temperature=0.8, top_p=0.9)

Given the `Transformer` module, decoding uses its KV cache (one forward over the prompt, then one
token per step, stopping once every row has emitted EOS); `decode` is that decoder, which
sampling.rollout also runs on a mesh. Given any other `apply_fn(params, tokens_BL) ->
logits_BLV`, it recomputes the whole fixed-size buffer each step (slower, same result for causal
models).
Prompts of different lengths are left-padded; pass `prompt_mask_BP` (True = real token).
A multi-LoRA model (`model.lora_num_adapters` = K > 1, docs/lora.md) samples K fine-tunes in one
batch: `adapter_ids_B` names each row's adapter, and every forward (prefill and each step) gets it.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pathways_jax.models.transformer import Transformer, check_adapter_ids, init_cache

_NEG = -1e30


def filter_logits(logits_BV: jax.Array, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None) -> jax.Array:
  """Temperature, then top-k, top-p (nucleus) and min-p; removed tokens get -inf-like logits.

  top-p keeps the smallest set of most likely tokens whose probability reaches top_p; min-p keeps
  tokens with p >= min_p * p_max. The most likely token always survives.
  """
  logits = logits_BV.astype(jnp.float32) / max(temperature, 1e-6)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, _NEG, logits)
  if top_p is not None and 0.0 < top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    # The threshold is the smallest kept logit; ties with it are kept too.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, _NEG, logits)
  if min_p is not None and min_p > 0.0:
    probs = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(probs < min_p * probs.max(axis=-1, keepdims=True), _NEG, logits)
  return logits


def sample_token(key, logits_BV, *, temperature, top_k=None, top_p=None, min_p=None):
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def left_pad_layout(prompt_mask_BP):
  """Segment ids (1 real, 0 pad) and positions that start at 0 on each row's first real token."""
  mask = prompt_mask_BP.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  return mask, positions


class Decoded(NamedTuple):
  """What `decode` returns (N = max_new_tokens)."""
  tokens_BT: jax.Array           # [B, P+N] the prompts, then the completions; pad after EOS
  logprobs_BN: jax.Array         # [B, N] log softmax(logits / temperature) of each sampled token
  completion_mask_BN: jax.Array  # [B, N] True on generated tokens, up to and including EOS
  steps: jax.Array               # [] decoding steps run (fewer than N once every row hit EOS)


def decode(model, params, prompt_BP, prompt_mask_BP, key, *, max_new_tokens, temperature, top_k,
           top_p, min_p, eos_id, pad_id, cache_sharding=None, adapter_ids_B=None) -> Decoded:
  """The KV-cache decoder (traced; callers jit it): a prompt forward fills the cache, then a
  `while_loop` samples one token per step until `max_new_tokens` or every row has emitted EOS.

  The token of step i is drawn with `fold_in(key, i)`, so stopping early changes nothing before
  the stop, and what it skips is pad anyway. `cache_sharding` (a NamedSharding per cache entry)
  pins the cache's layout when this runs on a mesh (see sampling.rollout). `adapter_ids_B` [B]:
  each row's adapter of a multi-LoRA model.
  The log-probs are of the sampling policy before top-k/top-p/min-p filtering, 0 where nothing was
  generated.
  """
  b, p = prompt_BP.shape
  n = max_new_tokens
  cache = init_cache(model.cfg, b, p + n, dtype=jnp.dtype(model.cfg.dtype))
  if cache_sharding is not None:
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
  segments, positions = left_pad_layout(prompt_mask_BP)
  logits, cache = model.apply({'params': params}, prompt_BP, positions_BL=positions,
                              segment_ids_BL=segments, cache=cache, cache_index=0,
                              adapter_ids_B=adapter_ids_B)
  next_pos = positions[:, -1] + 1  # [B]
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  scale = temperature if temperature > 0 else 1.0

  def pick(i, logits_BV, done):
    token = sample_token(jax.random.fold_in(key, i), logits_BV, **sampling)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits_BV.astype(jnp.float32) / scale),
                               token[:, None], axis=-1)[:, 0]
    return jnp.where(done, pad_id, token), jnp.where(done, 0.0, logp)

  done = jnp.zeros((b,), bool)
  first, first_lp = pick(0, logits[:, -1], done)
  new = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
  logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(first_lp)
  generated = jnp.zeros((b, n), bool).at[:, 0].set(True)
  if eos_id is not None:
    done = first == eos_id

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < n - 1) & ~jnp.all(done)

  def body(carry):
    i, new, logprobs, generated, cache, done = carry
    token = jax.lax.dynamic_slice_in_dim(new, i, 1, axis=1)
    logits, cache = model.apply({'params': params}, token, positions_BL=(next_pos + i)[:, None],
                                segment_ids_BL=jnp.ones((b, 1), jnp.int32), cache=cache,
                                cache_index=p + i, adapter_ids_B=adapter_ids_B)
    nxt, lp = pick(i + 1, logits[:, 0], done)
    new = jax.lax.dynamic_update_slice_in_dim(new, nxt[:, None], i + 1, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, lp[:, None], i + 1, axis=1)
    generated = jax.lax.dynamic_update_slice_in_dim(generated, ~done[:, None], i + 1, axis=1)
    if eos_id is not None:
      done = done | (nxt == eos_id)
    return i + 1, new, logprobs, generated, cache, done

  steps, new, logprobs, generated, _, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), new, logprobs, generated, cache, done))
  tokens = jnp.concatenate([prompt_BP.astype(jnp.int32), new], axis=1)
  return Decoded(tokens, logprobs, generated, steps + 1)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p', 'min_p', 'eos_id', 'pad_id'))
def _generate_cached(model, params, prompt_BP, prompt_mask_BP, key, adapter_ids_B, **kw):
  return decode(model, params, prompt_BP, prompt_mask_BP, key, adapter_ids_B=adapter_ids_B,
                **kw).tokens_BT


@functools.partial(jax.jit, static_argnames=('apply_fn', 'max_new_tokens', 'temperature',
                                             'top_k', 'top_p', 'min_p', 'eos_id', 'pad_id'))
def _generate_recompute(apply_fn, params, prompt_BP, key, *, max_new_tokens, temperature, top_k,
                        top_p, min_p, eos_id, pad_id):
  b, p = prompt_BP.shape
  out = jnp.concatenate([prompt_BP, jnp.full((b, max_new_tokens), pad_id, prompt_BP.dtype)], 1)
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)

  def body(i, carry):
    out, done = carry
    logits = jax.lax.dynamic_slice_in_dim(apply_fn(params, out), p + i - 1, 1, axis=1)[:, 0]
    nxt = jnp.where(done, pad_id, sample_token(jax.random.fold_in(key, i), logits, **sampling))
    if eos_id is not None:
      done = done | (nxt == eos_id)
    return jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None].astype(out.dtype), p + i, 1), done

  out, _ = jax.lax.fori_loop(0, max_new_tokens, body, (out, jnp.zeros((b,), bool)))
  return out


def generate(apply_fn_or_model, params, prompt_BP, *, key, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, prompt_mask_BP=None, eos_id: int | None = None,
             pad_id: int = 0, adapter_ids_B=None) -> jax.Array:
  """Returns [B, P + max_new_tokens]: the prompts followed by sampled tokens.

  `temperature=0` is greedy. After a row emits `eos_id`, the rest of the row is `pad_id`.
  `adapter_ids_B` [B] (a multi-LoRA Transformer only): row b samples from adapter
  adapter_ids_B[b], the tokens that adapter's model alone gives the row (same key, same place).
  """
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  if prompt_BP.ndim != 2 or prompt_BP.shape[1] == 0:
    raise ValueError(f'prompt_BP must be [batch, length>0], got shape {prompt_BP.shape}')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  kw = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k or None,
            top_p=top_p or None, min_p=min_p or None, eos_id=eos_id, pad_id=pad_id)
  if isinstance(apply_fn_or_model, Transformer):
    model = apply_fn_or_model
    if not model.cfg.causal:
      raise ValueError('autoregressive generate needs a causal model; use sampling.diffusion for '
                       'LLaDA models')
    if prompt_BP.shape[1] + max_new_tokens > model.cfg.max_len:
      raise ValueError(f'prompt ({prompt_BP.shape[1]}) + max_new_tokens ({max_new_tokens}) '
                       f'exceeds model.max_len={model.cfg.max_len}')
    check_adapter_ids(model.cfg, adapter_ids_B, prompt_BP.shape[0])
    if adapter_ids_B is not None:
      adapter_ids_B = jnp.asarray(adapter_ids_B, jnp.int32)
    mask = (jnp.ones_like(prompt_BP, bool) if prompt_mask_BP is None
            else jnp.asarray(prompt_mask_BP, bool))
    return _generate_cached(model, params, prompt_BP, mask, key, adapter_ids_B, **kw)
  if adapter_ids_B is not None:
    raise ValueError('adapter_ids_B needs the Transformer module (a plain apply_fn takes no ids)')
  if prompt_mask_BP is not None:
    raise ValueError('left-padded prompts need the Transformer module (for segment ids), not a '
                     'plain apply_fn')
  return _generate_recompute(apply_fn_or_model, params, prompt_BP, key, **kw)
