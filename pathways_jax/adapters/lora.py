"""LoRA: low-rank adapters on the dense weights, W x + (alpha / r) B A x, only A and B trained.

The adapters live in the model (models/transformer.py): with `config.model.lora_rank > 0` every
targeted dense weight `w` gets `w_lora_a` [*in, r] and `w_lora_b` [r, *out] beside it, B starting
at zero so the adapted model equals its base at step 0. Training them is the trainable-subset
seam: the run trains `LORA_PARAMS` (set by the trainer when `train.trainable` is empty), so the
train state, optimizer moments and checkpoints hold only the adapters and the base is stored once.

    lcfg = LoraConfig(rank=8, alpha=16, targets='attn/w[qkvo]')
    adapted_cfg = lcfg.apply_to(model_cfg)                  # the model with adapters
    lora_params = init(key, base_params, lcfg)              # only the A and B matrices
    params = combine(base_params, lora_params)              # what Transformer(adapted_cfg) takes
    merged = merge(base_params, lora_params, lcfg)          # W + scale * A @ B: the base model
    base_params == unmerge(merged, lora_params, lcfg)       # (up to rounding)

`dropout` (config.model.lora_dropout) drops elements of each adapter's input while training:
the train step passes the model a 'dropout' rng (train/step.py); evaluation and sampling pass
none, so they compute the deterministic model. PEFT adapter directories in and out:
`pathways_jax.interop.hf.save_adapter` / `load_adapter`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from pathways_jax.config import ConfigError, ModelConfig
from pathways_jax.models import transformer

LORA_PARAMS = r'.*_lora_[ab]'  # the train.trainable pattern of a LoRA run
DENSE = ('attn/wq', 'attn/wk', 'attn/wv', 'attn/wo', 'mlp/w_gate', 'mlp/w_up', 'mlp/w_down')
# How many leading axes of each dense weight are its input (the rest are its output).
_IN_AXES = {'wq': 1, 'wk': 1, 'wv': 1, 'wo': 2, 'w_gate': 1, 'w_up': 1, 'w_down': 1}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha, targets ('all-linear' or a regex searched in 'blocks_0/attn/wq'-like
  paths), rsLoRA scaling (alpha / sqrt(r)), dropout on the adapter's input while training
  (x -> dropout(x) @ A @ B * scale, as PEFT; the model drops only when given a 'dropout' rng)."""
  rank: int = 8
  alpha: float = 16.0
  targets: str = 'all-linear'
  rslora: bool = False
  dropout: float = 0.0

  def __post_init__(self):
    if self.rank < 1:
      raise ConfigError(f'LoRA rank must be >= 1, got {self.rank}')
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f'LoRA dropout must be in [0, 1), got {self.dropout}')
    if self.targets != 'all-linear':
      try:
        re.compile(self.targets)
      except re.error as e:
        raise ConfigError(f'LoRA targets {self.targets!r} is not a regular expression: {e}') from None

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

  def apply_to(self, model_cfg: ModelConfig) -> ModelConfig:
    return model_cfg.replace(lora_rank=self.rank, lora_alpha=self.alpha,
                             lora_targets=self.targets, lora_rslora=self.rslora,
                             lora_dropout=self.dropout)

  @classmethod
  def of(cls, model_cfg: ModelConfig) -> 'LoraConfig':
    return cls(rank=model_cfg.lora_rank, alpha=model_cfg.lora_alpha,
               targets=model_cfg.lora_targets, rslora=model_cfg.lora_rslora,
               dropout=model_cfg.lora_dropout)


def weight_shapes(model_cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """(input shape, output shape) of each dense weight ('wq', ..., 'w_down') of a block: the
  weight is [*in, *out], its adapter A [*in, r] and B [r, *out]."""
  d, h, kh = model_cfg.d_model, model_cfg.num_heads, model_cfg.num_kv_heads
  hd, f = model_cfg.dim_per_head, model_cfg.mlp_dim
  return {'wq': ((d,), (h, hd)), 'wk': ((d,), (kh, hd)), 'wv': ((d,), (kh, hd)),
          'wo': ((h, hd), (d,)), 'w_gate': ((d,), (f,)), 'w_up': ((d,), (f,)),
          'w_down': ((f,), (d,))}


def _flat(params) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(params)


def dense_paths(params) -> list[str]:
  """The dense weights of a (base) param tree, as 'blocks_0/attn/wq' paths."""
  return sorted('/'.join(p) for p in _flat(params)
                if len(p) >= 2 and '/'.join(p[-2:]) in DENSE)


def target_paths(params, lcfg: LoraConfig) -> list[str]:
  """The dense weights `lcfg.targets` selects; none is an error listing the candidates."""
  paths = dense_paths(params)
  if lcfg.targets == 'all-linear':
    return paths
  chosen = [p for p in paths if re.search(lcfg.targets, p)]
  if not chosen:
    raise ConfigError(f'LoRA targets {lcfg.targets!r} match no dense weight; candidates: '
                      f'{paths[:8]}' + (f' (and {len(paths) - 8} more)' if len(paths) > 8 else ''))
  return chosen


def model_target_paths(model_cfg: ModelConfig) -> list[str]:
  """The dense weights a LoRA model (model_cfg.lora_*) adapts, as the model names them
  ('blocks_0/attn/wq', or 'blocks/attn/wq' with scan_layers); none is an error listing the
  candidates, before any param exists."""
  layers = ['blocks'] if model_cfg.scan_layers else [f'blocks_{i}'
                                                      for i in range(model_cfg.num_layers)]
  paths = [f'{layer}/{w}' for layer in layers for w in DENSE]
  chosen = [p for p in paths if transformer.lora_targets(model_cfg, p)]
  if model_cfg.lora_rank and not chosen:
    raise ConfigError(f'model.lora_targets={model_cfg.lora_targets!r} matches no dense weight; '
                      f'candidates: {paths[:8]}' +
                      (f' (and {len(paths) - 8} more)' if len(paths) > 8 else ''))
  return chosen


def init(key: jax.Array, params, lcfg: LoraConfig) -> dict:
  """The adapters (A and B of every target, nested like `params`) for base `params`, as the
  adapted model initialises them: A uniform(+-1/sqrt(fan_in)), B zero."""
  flat = _flat(params)
  out = {}
  targets = target_paths(params, lcfg)
  for k, path in zip(jax.random.split(key, max(len(targets), 1)), targets):
    parts = tuple(path.split('/'))
    w = flat[parts]
    n_in = _IN_AXES[parts[-1]]
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    fan_in = 1
    for n in in_shape:
      fan_in *= n
    bound = 1.0 / fan_in ** 0.5
    out[parts[:-1] + (parts[-1] + '_lora_a',)] = jax.random.uniform(
        k, (*in_shape, lcfg.rank), w.dtype, -bound, bound)
    out[parts[:-1] + (parts[-1] + '_lora_b',)] = jnp.zeros((lcfg.rank, *out_shape), w.dtype)
  return traverse_util.unflatten_dict(out)


def combine(params, lora_params) -> dict:
  """One tree: the base params with the adapters beside their weights."""
  return traverse_util.unflatten_dict({**_flat(params), **_flat(lora_params)})


def split(params) -> tuple[dict, dict]:
  """(base params, adapters) of an adapted model's params."""
  flat = _flat(params)
  is_lora = lambda p: p[-1].endswith(transformer.LORA_SUFFIXES)
  return (traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_lora(p)}),
          traverse_util.unflatten_dict({p: v for p, v in flat.items() if is_lora(p)}))


def _deltas(lora_params, lcfg: LoraConfig):
  flat = _flat(lora_params)
  for p, a in flat.items():
    if not p[-1].endswith('_lora_a'):
      continue
    name = p[-1][:-len('_lora_a')]
    b = flat[p[:-1] + (name + '_lora_b',)]
    r = a.shape[-1]
    delta = a.reshape(-1, r).astype(jnp.float32) @ b.reshape(r, -1).astype(jnp.float32)
    yield p[:-1] + (name,), lcfg.scale * delta.reshape(a.shape[:-1] + b.shape[1:])


def merge(params, lora_params, lcfg: LoraConfig) -> dict:
  """The base params with W <- W + scale * A @ B: the plain model computing the adapted one."""
  flat = dict(_flat(params))
  for p, delta in _deltas(lora_params, lcfg):
    flat[p] = (flat[p].astype(jnp.float32) + delta).astype(flat[p].dtype)
  return traverse_util.unflatten_dict(flat)


def unmerge(params, lora_params, lcfg: LoraConfig) -> dict:
  """`merge` undone: W <- W - scale * A @ B."""
  flat = dict(_flat(params))
  for p, delta in _deltas(lora_params, lcfg):
    flat[p] = (flat[p].astype(jnp.float32) - delta).astype(flat[p].dtype)
  return traverse_util.unflatten_dict(flat)


def trainable_share(params) -> float:
  """Adapter params / all params of an adapted model's tree."""
  base, adapters = split(params)
  n = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))
  return n(adapters) / max(n(base) + n(adapters), 1)
