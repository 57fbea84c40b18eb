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

Multi-LoRA (docs/lora.md): K adapters on one base, each row of a batch naming its own.

    multi, mcfg = stack([adapters_0, adapters_1, adapters_2], [lcfg_0, lcfg_1, lcfg_2])
    model = Transformer(mcfg.apply_to(model_cfg, num_adapters=3))   # A [K, *in, r], B [K, r, *out]
    logits_BLV = model.apply({'params': combine(base_params, multi)}, tokens_BL,
                             adapter_ids_B=jnp.array([2, 0, 0, 1]))
    select(multi, 1)                                                # adapter 1 alone (with mcfg)
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
_OUT_AXES = {'wq': 2, 'wk': 2, 'wv': 2, 'wo': 1, 'w_gate': 1, 'w_up': 1, 'w_down': 1}


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

  def apply_to(self, model_cfg: ModelConfig, num_adapters: int = 1) -> ModelConfig:
    """The model with these adapters; `num_adapters` > 1: K of them, chosen per row."""
    return model_cfg.replace(lora_rank=self.rank, lora_alpha=self.alpha,
                             lora_targets=self.targets, lora_rslora=self.rslora,
                             lora_dropout=self.dropout, lora_num_adapters=num_adapters)

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
    lead, n_in = _lead(parts), _IN_AXES[parts[-1]]  # a scanned stack's [layers] leads
    layers, in_shape, out_shape = w.shape[:lead], w.shape[lead:lead + n_in], w.shape[lead + n_in:]
    fan_in = 1
    for n in in_shape:
      fan_in *= n
    bound = 1.0 / fan_in ** 0.5
    out[parts[:-1] + (parts[-1] + '_lora_a',)] = jax.random.uniform(
        k, (*layers, *in_shape, lcfg.rank), w.dtype, -bound, bound)
    out[parts[:-1] + (parts[-1] + '_lora_b',)] = jnp.zeros((*layers, lcfg.rank, *out_shape),
                                                           w.dtype)
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
  if num_adapters(lora_params) > 1:
    raise ValueError('merge/unmerge take one adapter; pick one of a multi-adapter tree with '
                     'lora.select(multi, k)')
  flat = _flat(lora_params)
  for p, a in flat.items():
    if not p[-1].endswith('_lora_a'):
      continue
    name = p[-1][:-len('_lora_a')]
    b = flat[p[:-1] + (name + '_lora_b',)]
    r, layers = a.shape[-1], a.shape[:_lead(p)]  # a scanned stack: one product per layer
    delta = (a.reshape(*layers, -1, r).astype(jnp.float32) @
             b.reshape(*layers, r, -1).astype(jnp.float32))
    yield p[:-1] + (name,), lcfg.scale * delta.reshape(a.shape[:-1] + b.shape[len(layers) + 1:])


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


# ------------------------------------------------------------------------------- multi-LoRA

def _lead(path: tuple[str, ...]) -> int:
  """Leading axes before an adapter's own: 1 under a scanned stack ('blocks/...'), else 0."""
  return 1 if path[0] == 'blocks' else 0


def _adapter_ndim(path: tuple[str, ...]) -> int:
  """ndim of one adapter's A or B at `path`: A [*in, r], B [r, *out], after the scan axis."""
  name = path[-1][:-len('_lora_a')]
  return _lead(path) + 1 + (_IN_AXES if path[-1].endswith('_lora_a') else _OUT_AXES)[name]


def num_adapters(lora_params) -> int:
  """K of a multi-adapter tree (A [K, *in, r], B [K, r, *out]); 1 for one adapter's."""
  ks = set()
  for p, x in _flat(lora_params).items():
    if p[-1].endswith(transformer.LORA_SUFFIXES):
      ks.add(x.shape[_lead(p)] if x.ndim == _adapter_ndim(p) + 1 else 1)
  if len(ks) > 1:
    raise ValueError(f'adapter tree mixes adapter counts {sorted(ks)}')
  return ks.pop() if ks else 1


def select(multi, k: int) -> dict:
  """Adapter k of a multi-adapter tree, as one adapter's tree (what merge and save_adapter
  take, with the LoraConfig the multi-adapter model was built with)."""
  n = num_adapters(multi)
  if n == 1:
    raise ValueError('select takes a multi-adapter tree (A [K, *in, r]); this holds one adapter')
  if not 0 <= k < n:
    raise ValueError(f'adapter {k} is not in [0, {n})')
  return traverse_util.unflatten_dict(
      {p: jnp.take(x, k, axis=_lead(p)) for p, x in _flat(multi).items()})


def stack(adapters, lcfgs) -> tuple[dict, LoraConfig]:
  """K single adapters (trees of `init`, `split`, `hf.load_adapter`) and their LoraConfigs ->
  (the multi-adapter tree, the LoraConfig to build its model with: `apply_to(model_cfg,
  num_adapters=K)`). Row k of the multi-adapter model computes adapter k's model.

  Adapters with one config stack unchanged. Others are brought to one: rank the largest (A's
  extra columns and B's extra rows zero, which adds nothing), scale 1 with each B multiplied by
  its own scale (one rounding), targets the union (an adapter without a weight gets zeros there).
  Their dropouts, which only training reads, become 0 if they differ.
  """
  adapters, lcfgs = list(adapters), list(lcfgs)
  if len(adapters) < 2 or len(lcfgs) != len(adapters):
    raise ValueError(f'stack takes >= 2 adapters and one LoraConfig each, got {len(adapters)} '
                     f'adapters and {len(lcfgs)} configs')
  for i, a in enumerate(adapters):
    if num_adapters(a) != 1:
      raise ValueError(f'adapter {i} is already a multi-adapter tree')
  flats = [dict(_flat(a)) for a in adapters]
  paths = sorted(set().union(*flats))
  weights = sorted({p[:-1] + (p[-1][:-len('_lora_a')],) for p in paths if p[-1].endswith('_a')})
  for w in weights:
    for i, f in enumerate(flats):
      if (w[:-1] + (w[-1] + '_lora_a',) in f) != (w[:-1] + (w[-1] + '_lora_b',) in f):
        raise ValueError(f'adapter {i} has only one of A and B on {"/".join(w)}')
  same = all(l == lcfgs[0] for l in lcfgs) and all(f.keys() == flats[0].keys() for f in flats)
  if same:
    for w in weights:  # one config, yet shapes may differ: adapters of another base
      for ab in ('_lora_a', '_lora_b'):
        p = w[:-1] + (w[-1] + ab,)
        shapes = [f[p].shape for f in flats]
        if len(set(shapes)) > 1:
          raise ValueError(f'adapters differ in shape on {"/".join(p)}: {shapes}')
    return (traverse_util.unflatten_dict(
        {p: jnp.stack([f[p] for f in flats], axis=_lead(p)) for p in paths}), lcfgs[0])
  rank = max(l.rank for l in lcfgs)
  out = {}
  for w in weights:
    pa, pb = w[:-1] + (w[-1] + '_lora_a',), w[:-1] + (w[-1] + '_lora_b',)
    have = [(f[pa], f[pb], l) for f, l in zip(flats, lcfgs) if pa in f]
    a0, b0, _ = have[0]
    lead = _lead(pa)
    a_shape, b_shape = a0.shape[:-1], b0.shape[:lead] + b0.shape[lead + 1:]
    a_list, b_list = [], []
    for f, l in zip(flats, lcfgs):
      if pa not in f:
        a, b = jnp.zeros((*a_shape, rank), a0.dtype), jnp.zeros((*b_shape[:lead], rank,
                                                                  *b_shape[lead:]), b0.dtype)
      else:
        a, b = f[pa], f[pb]
        if a.shape[:-1] != a_shape or b.shape[:lead] + b.shape[lead + 1:] != b_shape:
          raise ValueError(f'adapters differ in shape on {"/".join(w)}: {a.shape} / {b.shape} '
                           f'vs {a0.shape} / {b0.shape}')
        pad = rank - a.shape[-1]
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        b = jnp.pad((b.astype(jnp.float32) * l.scale).astype(b.dtype),
                    [(0, 0)] * lead + [(0, pad)] + [(0, 0)] * (b.ndim - lead - 1))
      a_list.append(a)
      b_list.append(b)
    out[pa] = jnp.stack(a_list, axis=lead)
    out[pb] = jnp.stack(b_list, axis=lead)
  targets = (lcfgs[0].targets if all(l.targets == lcfgs[0].targets for l in lcfgs) else
             '^(' + '|'.join('/'.join(w) for w in weights) + ')$')
  dropouts = {l.dropout for l in lcfgs}
  mcfg = LoraConfig(rank=rank, alpha=float(rank), targets=targets, rslora=False,
                    dropout=dropouts.pop() if len(dropouts) == 1 else 0.0)
  return traverse_util.unflatten_dict(out), mcfg
