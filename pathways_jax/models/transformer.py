"""The Llama-style transformer shared by every model family in the project.

RMSNorm, RoPE, SwiGLU, MHA/GQA, no biases, tied or untied embeddings, and one switch `causal`:
AR models use `causal=True`, LLaDA uses the same network with `causal=False`. What imported
checkpoints need is behind config fields that default off: q/k/v biases (Qwen2), per-head q/k
RMSNorm (Qwen3), long-context RoPE scaling (Llama 3.1+).

    model = Transformer(ModelConfig(...))
    logits_BLV = model.apply({'params': p}, tokens_BL)
    logits_BLV, cache = model.apply({'params': p}, tokens_BL, positions_BL=..., cache=cache,
                                    cache_index=i)   # KV-cache decoding
    logits_BLV = model.apply({'params': p}, tokens_BL, rngs={'dropout': key})  # training a
        # LoRA model with lora_dropout > 0; without a 'dropout' rng its adapters drop nothing
    logits_BLV = model.apply({'params': p}, tokens_BL, adapter_ids_B=ids_B)  # multi-LoRA
        # (lora_num_adapters = K > 1): row b runs adapter ids_B[b] of the K on the one base
    rewards_BL = model.apply({'params': p}, tokens_BL, return_scalar=True)  # model.scalar_head:
        # float32 [B, L], a linear head on the final-normed hidden state at every position
        # (a reward model reads it at a sequence's last token: tasks/reward_model.py)

The dense layers run on a 2-D residual stream [B*L, D]: on CPU, XLA lowers 2-D matmuls markedly
faster than the batched 3-D form (measured in benchmarks/train_throughput.py). `dense` has a
written-out JVP, because XLA:CPU runs autodiff's form of the weight gradient's matmul slowly; it
is a JVP (not a VJP) so that forward mode, and Hessian-vector products, work through the model.

Parameter layout (logical axis names in brackets), the contract that growth, sharding rules and
checkpoints rely on:
  embed [vocab, embed]                      unembed [embed, vocab] (untied only)
  blocks_i/ or blocks/ (scan, leading [layers]):
    attn_norm/scale [embed]  attn/wq [embed, heads, head_dim]  attn/wk, attn/wv [embed, kv, head_dim]
    attn/wo [heads, head_dim, embed]  mlp_norm/scale [embed]
    (qkv_bias) attn/bq [heads, head_dim]  attn/bk, attn/bv [kv, head_dim]
    (qk_norm) attn/q_norm/scale, attn/k_norm/scale [head_dim]
    (lora_rank > 0) <weight>_lora_a [*in, r], <weight>_lora_b [r, *out] beside each targeted
    dense weight, e.g. attn/wq_lora_a [embed, r], attn/wq_lora_b [r, heads, head_dim];
    (lora_num_adapters = K > 1) a leading [K], unnamed (replicated): A [K, *in, r], B [K, r, *out]
    mlp/w_gate, mlp/w_up [embed, mlp]  mlp/w_down [mlp, embed]
  final_norm/scale [embed]
  (scalar_head) scalar_head/kernel [embed], scalar_head/bias [] (float32 whatever param_dtype)
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.config import ModelConfig
from pathways_jax.models import attention as attn_lib

Cache = dict[str, jax.Array]


def _dtype(name: str):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def _param(module, name, shape, axes, std, cfg: ModelConfig):
  init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
  return module.param(name, init, shape, _dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
  cfg: ModelConfig
  axis: str = 'embed'  # the logical axis of the normalised (last) dimension

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
                       (x.shape[-1],), _dtype(self.cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (normed * scale.astype(jnp.float32)).astype(_dtype(self.cfg.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def dense(x_TD: jax.Array, w_DF: jax.Array, out_dtype=None) -> jax.Array:
  """x @ w on the 2-D token stream [T, D] -> [T, F]; on CPU, with a faster weight gradient.

  Autodiff's weight gradient dW = x^T dY is one dot contracting the leading (token) axis of both
  operands, which XLA:CPU runs well below its row-major speed (benchmarks/RESULTS.md). The
  derivative is a custom JVP rather than a custom VJP so that jvp, linearize and Hessian-vector
  products work too: reverse mode transposes the JVP's x dW term, and on CPU that term is written
  (`_tangent_cpu`) so that its transpose is a plain [D, T] @ [T, F] matmul. Other platforms get
  autodiff's form (the CPU form has not been measured there); the choice is made per platform
  when the step is lowered (`jax.lax.platform_dependent`), not by the process's default backend.
  """
  return jnp.dot(x_TD, w_DF, preferred_element_type=out_dtype)


def _tangent(x_TD, w_DF, dx_TD, dw_DF, out_dtype):
  """dx w + x dw (a None tangent is a zero): autodiff's form, for non-CPU platforms."""
  terms = []
  if dx_TD is not None:
    terms.append(jnp.dot(dx_TD, w_DF, preferred_element_type=out_dtype))
  if dw_DF is not None:
    terms.append(jnp.dot(x_TD, dw_DF, preferred_element_type=out_dtype))
  return functools.reduce(jnp.add, terms)


def _tangent_cpu(x_TD, w_DF, dx_TD, dw_DF, out_dtype):
  """dx w + x dw written for their transposes, which reverse mode computes. x dw's is
  dW = x^T dY: x^T materialised row-major [D, T] (the barrier keeps XLA from folding the
  transpose back into the dot), and dW kept apart from a tied embedding's transpose
  (w = embedding.T) by another. Every dot accumulates in float32 (or wider) and then casts, as
  the custom VJP did: with bfloat16 compute, bf16-output dots made the CPU step 1.14x slower
  (benchmarks/RESULTS.md). Forward mode pays for the x^T on CPU: a copy of x and a dot in the
  slow form (correct, not tuned: training is reverse mode)."""
  out = jnp.result_type(x_TD, w_DF) if out_dtype is None else out_dtype
  dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.promote_types(out, jnp.float32))
  terms = []
  if dx_TD is not None:
    terms.append(dot(dx_TD, w_DF).astype(out))
  if dw_DF is not None:
    x_TD = jax.lax.optimization_barrier(x_TD.T).T
    terms.append(dot(x_TD, jax.lax.optimization_barrier(dw_DF)).astype(out))
  return functools.reduce(jnp.add, terms)


# Symbolic zeros: a weight that is not differentiated (a frozen LoRA base) costs no x dW matmul.
@functools.partial(dense.defjvp, symbolic_zeros=True)
def _dense_jvp(out_dtype, primals, tangents):
  x_TD, w_DF = primals
  dx_TD, dw_DF = (None if isinstance(t, jax.custom_derivatives.SymbolicZero) else t
                  for t in tangents)
  out = jnp.dot(x_TD, w_DF, preferred_element_type=out_dtype)
  if dx_TD is None and dw_DF is None:
    return out, jnp.zeros_like(out)
  return out, jax.lax.platform_dependent(
      x_TD, w_DF, dx_TD, dw_DF, cpu=functools.partial(_tangent_cpu, out_dtype=out_dtype),
      default=functools.partial(_tangent, out_dtype=out_dtype))


LORA_SUFFIXES = ('_lora_a', '_lora_b')


def lora_targets(cfg: ModelConfig, path: str) -> bool:
  """Whether the dense weight at `path` ('blocks_0/attn/wq') carries a LoRA adapter."""
  import re  # pylint: disable=g-import-not-at-top
  if cfg.lora_rank <= 0:
    return False
  return cfg.lora_targets == 'all-linear' or re.search(cfg.lora_targets, path) is not None


def lora_scale(cfg: ModelConfig) -> float:
  return cfg.lora_alpha / (cfg.lora_rank ** 0.5 if cfg.lora_rslora else cfg.lora_rank)


def check_adapter_ids(cfg: ModelConfig, adapter_ids_B, batch_size: int) -> None:
  """One clear error for adapter ids that do not fit the model or the batch. Values are checked
  where they are concrete; under `jit` a row whose id is out of range gets NaN (`_multi_lora`)."""
  k = cfg.lora_num_adapters
  if adapter_ids_B is None:
    if k > 1:
      raise ValueError(f'model.lora_num_adapters={k}: pass adapter_ids_B [batch] (the adapter '
                       'each row runs)')
    return
  if k <= 1:
    raise ValueError('adapter_ids_B needs a multi-adapter model (model.lora_num_adapters > 1); '
                     f'this one has {k}')
  shape, dtype = jnp.shape(adapter_ids_B), jnp.result_type(adapter_ids_B)
  if shape != (batch_size,) or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f'adapter_ids_B must be integers of shape [batch] = ({batch_size},), got '
                     f'{dtype} of shape {shape}')
  if not isinstance(adapter_ids_B, jax.core.Tracer):
    ids = np.asarray(adapter_ids_B)
    bad = np.unique(ids[(ids < 0) | (ids >= k)])
    if bad.size:
      raise ValueError(f'adapter_ids_B must be in [0, {k}) (model.lora_num_adapters), got '
                       f'{bad.tolist()}')


def _multi_lora(x_TI, a_KIR, b_KRO, ids_B):
  """(x @ A[ids_B[b]]) @ B[ids_B[b]] row by row: each row's adapter gathered, then batched
  matmuls (S-LoRA/Punica's "BGMV").

  Why this form: its FLOPs are one adapter's whatever K is; in KV-cache decoding the gathers are
  loop-invariant and XLA hoists them out of the decode loop, and a training row amortises them
  over its L tokens. Every adapter on every token, then masked, costs K times the adapter FLOPs
  (and measured slower on CPU: benchmarks/RESULTS.md); rows sorted by adapter into a grouped
  matmul (ragged_dot) add a sort and an unsort of the activations (not measured here).
  Out-of-range ids gather NaN (mode='fill'): under jit, where they cannot raise, such a row's
  logits are NaN rather than another adapter's; gradients reach only the rows' own adapters."""
  b = ids_B.shape[0]
  x_BLI = x_TI.reshape(b, -1, x_TI.shape[-1])
  a_BIR = jnp.take(a_KIR, ids_B, axis=0, mode='fill', fill_value=jnp.nan)
  b_BRO = jnp.take(b_KRO, ids_B, axis=0, mode='fill', fill_value=jnp.nan)
  h_BLR = jnp.einsum('bli,bir->blr', x_BLI, a_BIR)
  return jnp.einsum('blr,bro->blo', h_BLR, b_BRO).reshape(x_TI.shape[0], -1)


def _lora_delta(module, name: str, x_TI, in_shape, out_shape, in_axes, out_axes, cfg,
                adapter_ids_B=None):
  """scale * (x @ A) @ B of the adapter on weight `name` (0 if it has none): A [*in, r] starts
  uniform(+-1/sqrt(fan_in)), B [r, *out] at zero, so an adapted model starts as its base. With
  K = lora_num_adapters > 1, A [K, *in, r] and B [K, r, *out], row b using adapter
  adapter_ids_B[b]."""
  path = '/'.join((*module.scope.path, name))
  if not lora_targets(cfg, path):
    return None
  r, fan_in = cfg.lora_rank, int(math.prod(in_shape))
  fan_out = int(math.prod(out_shape))
  k = cfg.lora_num_adapters
  lead, lead_axes = ((k,), (None,)) if k > 1 else ((), ())
  bound = 1.0 / fan_in ** 0.5
  a = module.param(f'{name}_lora_a', nn.with_logical_partitioning(
      lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound), (*lead_axes, *in_axes, None)),
      (*lead, *in_shape, r), _dtype(cfg.param_dtype))
  b = module.param(f'{name}_lora_b', nn.with_logical_partitioning(
      nn.initializers.zeros, (*lead_axes, None, *out_axes)),
      (*lead, r, *out_shape), _dtype(cfg.param_dtype))
  dt = _dtype(cfg.dtype)
  if cfg.lora_dropout > 0 and module.has_rng('dropout'):
    # Training only: the train step passes a 'dropout' rng, evaluation and sampling do not.
    # Each adapter draws its own mask (make_rng folds in the module path and a call counter).
    x_TI = _dropout(module.make_rng('dropout'), x_TI, cfg.lora_dropout)
  if k > 1:
    return lora_scale(cfg) * _multi_lora(x_TI, a.astype(dt).reshape(k, fan_in, r),
                                         b.astype(dt).reshape(k, r, fan_out), adapter_ids_B)
  h = dense(x_TI, a.astype(dt).reshape(fan_in, r))
  return lora_scale(cfg) * dense(h, b.astype(dt).reshape(r, fan_out))


def _dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout: each element zeroed with probability `rate`, the rest / (1 - rate)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _adapted(module, name, x_TI, w, in_shape, out_shape, in_axes, out_axes, cfg,
             adapter_ids_B=None):
  """x @ w (w reshaped to [prod(in), prod(out)]) plus the LoRA term where `name` is a target."""
  dt = _dtype(cfg.dtype)
  out = dense(x_TI, w.astype(dt).reshape(int(math.prod(in_shape)), int(math.prod(out_shape))))
  delta = _lora_delta(module, name, x_TI, in_shape, out_shape, in_axes, out_axes, cfg,
                      adapter_ids_B)
  return out if delta is None else out + delta.astype(out.dtype)


class Attention(nn.Module):
  cfg: ModelConfig
  packed: bool = True

  @nn.compact
  def __call__(self, x_TD, batch, positions_BL, segment_BL, kv_segment_BS, kv_positions_BS,
               layer_cache, cache_index, adapter_ids_B=None, keep_LS=None):
    cfg = self.cfg
    dt = _dtype(cfg.dtype)
    d, h, kh, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    std_out = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    wq = _param(self, 'wq', (d, h, hd), ('embed', 'heads', 'head_dim'), cfg.init_std, cfg)
    wk = _param(self, 'wk', (d, kh, hd), ('embed', 'kv', 'head_dim'), cfg.init_std, cfg)
    wv = _param(self, 'wv', (d, kh, hd), ('embed', 'kv', 'head_dim'), cfg.init_std, cfg)
    wo = _param(self, 'wo', (h, hd, d), ('heads', 'head_dim', 'embed'), std_out, cfg)
    b, l = batch
    proj = lambda name, w, n, axis: _adapted(self, name, x_TD, w, (d,), (n, hd), ('embed',),
                                             (axis, 'head_dim'), cfg, adapter_ids_B)
    q = proj('wq', wq, h, 'heads').reshape(b, l, h, hd)
    k = proj('wk', wk, kh, 'kv').reshape(b, l, kh, hd)
    v = proj('wv', wv, kh, 'kv').reshape(b, l, kh, hd)
    if cfg.qkv_bias:  # Qwen2
      zeros = nn.with_logical_partitioning(nn.initializers.zeros, ('heads', 'head_dim'))
      zeros_kv = nn.with_logical_partitioning(nn.initializers.zeros, ('kv', 'head_dim'))
      pdt = _dtype(cfg.param_dtype)
      q = q + self.param('bq', zeros, (h, hd), pdt).astype(dt)
      k = k + self.param('bk', zeros_kv, (kh, hd), pdt).astype(dt)
      v = v + self.param('bv', zeros_kv, (kh, hd), pdt).astype(dt)
    if cfg.qk_norm:  # Qwen3: each head's q and k normalised over head_dim, before RoPE
      q = RMSNorm(cfg, 'head_dim', name='q_norm')(q)
      k = RMSNorm(cfg, 'head_dim', name='k_norm')(k)
    q = nn.with_logical_constraint(q, ('activation_batch', 'activation_length', 'activation_heads', None))
    q = attn_lib.rope(q, positions_BL, cfg.rope_theta, cfg.rope[1:])
    k = attn_lib.rope(k, positions_BL, cfg.rope_theta, cfg.rope[1:])
    new_cache = None
    if layer_cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(layer_cache['k'], k.astype(layer_cache['k'].dtype),
                                              cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(layer_cache['v'], v.astype(layer_cache['v'].dtype),
                                              cache_index, axis=1)
      new_cache = {'k': k, 'v': v}
    out = attn_lib.attend(q, k.astype(dt), v.astype(dt), q_segment_BL=segment_BL,
                          kv_segment_BS=kv_segment_BS, q_positions_BL=positions_BL,
                          kv_positions_BS=kv_positions_BS, causal=cfg.causal,
                          implementation=cfg.attention,
                          packed=self.packed or layer_cache is not None,
                          kv_from_cache=layer_cache is not None,
                          causal_query_blocks=cfg.causal_query_blocks, keep_LS=keep_LS)
    out_TD = _adapted(self, 'wo', out.reshape(b * l, h * hd), wo, (h, hd), (d,),
                      ('heads', 'head_dim'), ('embed',), cfg, adapter_ids_B)
    return out_TD, new_cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_TD, adapter_ids_B=None):
    cfg = self.cfg
    std_out = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    w_gate = _param(self, 'w_gate', (cfg.d_model, cfg.mlp_dim), ('embed', 'mlp'), cfg.init_std, cfg)
    w_up = _param(self, 'w_up', (cfg.d_model, cfg.mlp_dim), ('embed', 'mlp'), cfg.init_std, cfg)
    w_down = _param(self, 'w_down', (cfg.mlp_dim, cfg.d_model), ('mlp', 'embed'), std_out, cfg)
    up = lambda name, w: _adapted(self, name, x_TD, w, (cfg.d_model,), (cfg.mlp_dim,), ('embed',),
                                  ('mlp',), cfg, adapter_ids_B)
    hidden = nn.silu(up('w_gate', w_gate)) * up('w_up', w_up)
    hidden = nn.with_logical_constraint(hidden, ('activation_tokens', 'activation_mlp'))
    return _adapted(self, 'w_down', hidden, w_down, (cfg.mlp_dim,), (cfg.d_model,), ('mlp',),
                    ('embed',), cfg, adapter_ids_B)


class Block(nn.Module):
  """Pre-norm residual block. Signature doubles as the nn.scan body: (carry, per-layer) -> ..."""
  cfg: ModelConfig
  batch: tuple[int, int]
  packed: bool = True

  @nn.compact
  def __call__(self, x_TD, layer_cache, positions_BL, segment_BL, kv_segment_BS, kv_positions_BS,
               cache_index, adapter_ids_B=None, keep_LS=None):
    attn_out, new_cache = Attention(self.cfg, self.packed, name='attn')(
        RMSNorm(self.cfg, name='attn_norm')(x_TD), self.batch, positions_BL, segment_BL,
        kv_segment_BS, kv_positions_BS, layer_cache, cache_index, adapter_ids_B, keep_LS)
    x_TD = x_TD + attn_out
    x_TD = x_TD + MLP(self.cfg, name='mlp')(RMSNorm(self.cfg, name='mlp_norm')(x_TD),
                                            adapter_ids_B)
    x_TD = nn.with_logical_constraint(x_TD, ('activation_tokens', 'activation_embed'))
    return x_TD, new_cache


class ScalarHead(nn.Module):
  """r = h . kernel + bias, float32, at every position of the final-normed hidden state h.

  The kernel starts as N(0, init_std^2) (as transformers initialises a sequence-classification
  `score` layer) and the bias at 0; both are float32 whatever model.param_dtype, so a small
  reward difference is not rounded away.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_TD):
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(self.cfg.init_std), ('embed',)), (self.cfg.d_model,), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                      jnp.float32)
    return jnp.dot(h_TD.astype(jnp.float32), kernel) + bias


def _remat(block_cls, policy: str):
  if policy == 'none':
    return block_cls
  jax_policy = {'full': None,
                'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}[policy]
  return nn.remat(block_cls, policy=jax_policy, prevent_cse=True)


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BL: jax.Array, *, positions_BL: jax.Array | None = None,
               segment_ids_BL: jax.Array | None = None, cache: Cache | None = None,
               cache_index: Any = 0, return_hidden: bool = False,
               logits_window: tuple[Any, int] | None = None,
               adapter_ids_B: jax.Array | None = None, return_scalar: bool = False,
               with_scalar: bool = False, attention_keep_LL: jax.Array | None = None):
    """Logits [B, L, V] (or hidden states [B, L, D] with `return_hidden`, or the scalar head's
    float32 [B, L] with `return_scalar`: a model.scalar_head model only). `with_scalar`: both,
    (logits [B, L, V], scalar [B, L]), from one pass (PPO's policy and value head).

    `adapter_ids_B` [B] (a multi-LoRA model, `lora_num_adapters` = K > 1, needs it; any other
    refuses it): row b runs adapter adapter_ids_B[b] in [0, K). A packed row is one adapter's.

    `logits_window=(start, length)`: logits of positions [start, start + length) only, [B, length,
    V] (`start` may be traced): a sampler that reads one block of a long row skips the rest of the
    unembedding, the largest matmul of a small model.

    `attention_keep_LL`: boolean [L, L] over row indices, ANDed with the model's own mask: query
    i sees key j only where it is True (DiffuLLaMA's attention-mask annealing draws it while a
    bidirectional model adapts from a causal one: train.attention_anneal_steps). Not with a
    cache; the attention runs 'xla' where it is given (the kernels take no free-form mask).
    """
    cfg = self.cfg
    b, l = tokens_BL.shape
    if return_scalar and not cfg.scalar_head:
      raise ValueError('return_scalar=True needs a scalar head: this model has none (set '
                       'model.scalar_head=True)')
    if return_scalar and (return_hidden or logits_window is not None):
      raise ValueError('return_scalar=True returns the head\'s [B, L] only: drop return_hidden '
                       'and logits_window')
    if with_scalar and (not cfg.scalar_head or return_scalar or logits_window is not None or
                        cache is not None):
      raise ValueError('with_scalar=True returns (logits or hidden states, scalar [B, L]) of a '
                       'model.scalar_head model, without a cache, return_scalar or logits_window')
    check_adapter_ids(cfg, adapter_ids_B, b)
    if attention_keep_LL is not None and (cache is not None or
                                          jnp.shape(attention_keep_LL) != (l, l)):
      raise ValueError(f'attention_keep_LL must be a [L, L] = {(l, l)} mask over the row, without a '
                       f'cache; got shape {jnp.shape(attention_keep_LL)}'
                       f'{" and a cache" if cache is not None else ""}')
    if adapter_ids_B is not None:
      adapter_ids_B = jnp.asarray(adapter_ids_B, jnp.int32)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32) + cache_index, (b, l))
    packed = segment_ids_BL is not None or cache is not None
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones((b, l), jnp.int32)
    kv_segment, kv_positions = segment_ids_BL, positions_BL
    if cache is not None:
      kv_segment = jax.lax.dynamic_update_slice_in_dim(cache['segment_ids'], segment_ids_BL,
                                                       cache_index, axis=1)
      kv_positions = jax.lax.dynamic_update_slice_in_dim(cache['positions'], positions_BL,
                                                         cache_index, axis=1)

    embedding = self.param(
        'embed', nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                              ('vocab', 'embed')),
        (cfg.vocab_size, cfg.d_model), _dtype(cfg.param_dtype))
    x_TD = jnp.take(embedding, tokens_BL.reshape(-1), axis=0).astype(_dtype(cfg.dtype))
    x_TD = _lookup_layout(x_TD)
    x_TD = nn.with_logical_constraint(x_TD, ('activation_tokens', 'activation_embed'))

    block_cls = _remat(Block, cfg.remat)
    shared = (positions_BL, segment_ids_BL, kv_segment, kv_positions, cache_index, adapter_ids_B,
              attention_keep_LL)
    new_layer_caches = None
    if cfg.scan_layers:
      layer_caches = None if cache is None else {'k': cache['k'], 'v': cache['v']}
      scanned = nn.scan(block_cls, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                        in_axes=(0,) + (nn.broadcast,) * len(shared), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      x_TD, new_layer_caches = scanned(cfg, (b, l), packed, name='blocks')(x_TD, layer_caches, *shared)
    else:
      outs = []
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else {'k': cache['k'][i], 'v': cache['v'][i]}
        x_TD, c = block_cls(cfg, (b, l), packed, name=f'blocks_{i}')(x_TD, layer_cache, *shared)
        outs.append(c)
      if cache is not None:
        new_layer_caches = {'k': jnp.stack([c['k'] for c in outs]),
                            'v': jnp.stack([c['v'] for c in outs])}

    h_TD = RMSNorm(cfg, name='final_norm')(x_TD)
    scalar_BL = None
    if cfg.scalar_head and (return_scalar or with_scalar or self.is_initializing()):
      # Read off each position's own hidden state (model.shift_logits moves only the LM head).
      scalar_BL = ScalarHead(cfg, name='scalar_head')(h_TD).reshape(b, l)
    if cfg.shift_logits:
      # Position i reads token i off the hidden state at i - 1, as the AR model it was adapted
      # from predicted it (Dream / DiffuLLaMA); position 0, with nothing before it, reads its own.
      h_BLD = h_TD.reshape(b, l, cfg.d_model)
      h_TD = jnp.concatenate([h_BLD[:, :1], h_BLD[:, :-1]], axis=1).reshape(b * l, cfg.d_model)
    if return_scalar:
      out = scalar_BL
    elif return_hidden:
      out = h_TD.reshape(b, l, cfg.d_model)
    else:
      if cfg.tie_embeddings:
        unembed_DV = embedding.T
      else:
        unembed_DV = self.param(
            'unembed', nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                    ('embed', 'vocab')),
            (cfg.d_model, cfg.vocab_size), _dtype(cfg.param_dtype))
      rows = l
      if logits_window is not None:
        start, rows = logits_window
        h_TD = jax.lax.dynamic_slice_in_dim(h_TD.reshape(b, l, cfg.d_model), start, rows,
                                            axis=1).reshape(b * rows, cfg.d_model)
      logits = dense(h_TD, unembed_DV.astype(h_TD.dtype), jnp.float32)
      out = logits.reshape(b, rows, cfg.vocab_size)
    if with_scalar:
      return out, scalar_BL
    if cache is None:
      return out
    return out, {**new_layer_caches, 'segment_ids': kv_segment, 'positions': kv_positions}


def _lookup_layout(x_TD: jax.Array) -> jax.Array:
  """The embedding lookup's output laid out as the table is: embed over the axes that shard the
  table's embed dim, tokens over the other batch axes.

  When the tokens' axes include the table's embed axes (data > 1 and fsdp > 1 under the default
  rules, e.g. multi-slice), XLA's partitioner cannot move the lookup (tokens over data, embed
  over fsdp) to the residual stream's layout (tokens over data x fsdp) directly: it warns
  "Involuntary full rematerialization" and all-gathers a [tokens, d_model / fsdp] tensor each
  step. Stating this intermediate layout makes that an all-to-all. Other meshes are untouched.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x_TD
  # One name at a time: a spec resolving both would drop the mesh axis they share.
  tokens_axes, embed_axes = (_as_tuple(nn.logical_to_mesh_axes((name,))[0])
                             for name in ('activation_tokens', 'embed'))
  size = lambda axes: int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))
  overlap = tuple(a for a in tokens_axes if a in embed_axes)
  rest = tuple(a for a in tokens_axes if a not in embed_axes)
  if not overlap or size(overlap) == 1 or size(rest) == 1:
    return x_TD
  spec = jax.sharding.PartitionSpec(rest, embed_axes)
  return jax.lax.with_sharding_constraint(x_TD, spec)


def _as_tuple(axes) -> tuple:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def unembedding(params, cfg: ModelConfig) -> jax.Array:
  """The [D, V] output matrix (for losses that take hidden states, e.g. the fused cross-entropy)."""
  return params['embed'].T if cfg.tie_embeddings else params['unembed']


# Logical axes of the KV cache's arrays (parallel.DEFAULT_RULES maps them to mesh axes): rows over
# the data-parallel axes, KV heads over `tensor`.
CACHE_AXES = {
    'k': ('layers', 'activation_batch', 'activation_length', 'activation_heads', 'head_dim'),
    'v': ('layers', 'activation_batch', 'activation_length', 'activation_heads', 'head_dim'),
    'segment_ids': ('activation_batch', 'activation_length'),
    'positions': ('activation_batch', 'activation_length'),
}


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> Cache:
  """An empty KV cache: every slot has segment 0, so nothing attends to it until written."""
  shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.dim_per_head)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
          'segment_ids': jnp.zeros((batch_size, max_len), jnp.int32),
          'positions': jnp.zeros((batch_size, max_len), jnp.int32)}


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
