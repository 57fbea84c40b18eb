"""Growth operators: turn a trained small transformer into a larger one (G_stack and friends).

Du et al. 2024 ("Stacking Your Transformers") study four atomic operators, each in depth (G↑) and
width (G→); depthwise stacking of the whole small model (G_stack) is the one that pays off. This
module implements them as pure functions of the parameter tree of `models.transformer.Transformer`:

    params, new_cfg = grow(params, cfg, depth_factor=4, method='stack')
    params, new_cfg = grow(params, cfg, width_factor=2, width_method='direct')
    opt_state = grow_opt_state(opt_state, cfg, depth_factor=4, method='stack')   # Adam moments
    plan = gstack_plan(7e9, compute_flops=8.4e22)        # the paper's d and the small model size

Depth methods (`method`, new depth = depth_factor * L):
  'stack'       whole-stack copies: layer j <- j % L (the paper's G_stack, [0..L-1] repeated g times).
  'interleave'  each layer repeated in place: layer j <- j // g (0,0,1,1,...).
  'zero'        each source layer followed by g-1 copies of itself whose output projections
                (attn/wo, mlp/w_down) are zero: identity blocks, so the grown model computes exactly
                the small model's function. The copy sits right after its source, so it reads the
                residual stream its weights were trained on.
  'random'      same placement as 'zero', new blocks freshly initialised like the model's own init
                (not function-preserving; MSG-style mask ramps are not implemented).
  ('learn', LiGO's learned maps, is not implemented.)
Width methods (`width_method`, d_model, heads, kv heads and mlp_dim grow by integer factors;
head_dim is unchanged; new units are laid out after the old ones: unit j copies unit j % n):
  'direct'      Net2Net / bert2BERT: fan-out copied, fan-in divided among the copies. Every residual
                unit is duplicated exactly width_factor times, so the mean of squares RMSNorm takes
                over d_model is unchanged and every RMSNorm stays exact; with tied embeddings the
                output side reads the duplicated units too, which final_norm/scale / width_factor
                compensates. Function-preserving (to float rounding). `split_noise` > 0 splits the
                fan-in unevenly (still exact) so copies get different gradients.
  'zero'        old weights top-left; new residual units stay zero (new embedding columns and new
                output columns of wo/w_down are 0), new heads / mlp units are random but their rows
                of wo / w_down are 0; the rest of the new entries are N(0, init_std). RMSNorm then
                averages over d_model' = w*d_model with w-1 zero shares, which scaling the norm
                scales by 1/sqrt(w) and (`exact_norm_eps=True`) norm_eps by 1/w compensates exactly:
                new_cfg.norm_eps = cfg.norm_eps / w.
Width grows first, then depth. `noise` > 0 multiplies every weight matrix by (1 + noise * N(0,1))
(the paper's symmetry-breaking noise; breaks exact function preservation, keeps zeros zero).

Param trees: pass the tree that goes under {'params': ...} (or the whole {'params': ...} dict),
boxed (`nn.LogicallyPartitioned`, as `model.init` returns) or unboxed; the result is unboxed.
Layouts: unscanned `blocks_0..blocks_{L-1}` or scanned `blocks` with a leading layers axis; the
result has the layout of `new_cfg.scan_layers` (= cfg.scan_layers). To grow sharded params
without gathering them, jit it: `jax.jit(lambda p, k: grow(p, cfg, ..., key=k)[0],
out_shardings=new_shardings)` where new_shardings come from `Transformer(new_cfg)`'s abstract init
and `parallel.logical_to_sharding`.
"""
from __future__ import annotations

import collections.abc
import math
import zlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pathways_jax.config import ModelConfig

DEPTH_METHODS = ('stack', 'interleave', 'zero', 'random')
WIDTH_METHODS = ('direct', 'zero')

# (dimension kind, role) per axis of each leaf (blocks: without the leading layers axis).
# role: 'in' = fan-in (summed over by the matmul), 'out' = fan-out, 'norm' = an RMSNorm scale.
_IN_E, _OUT_E = ('embed', 'in'), ('embed', 'out')
_BLOCK_SPECS = {
    ('attn', 'wq'): (_IN_E, ('heads', 'out'), None),
    ('attn', 'wk'): (_IN_E, ('kv', 'out'), None),
    ('attn', 'wv'): (_IN_E, ('kv', 'out'), None),
    ('attn', 'wo'): (('heads', 'in'), None, _OUT_E),
    ('mlp', 'w_gate'): (_IN_E, ('mlp', 'out')),
    ('mlp', 'w_up'): (_IN_E, ('mlp', 'out')),
    ('mlp', 'w_down'): (('mlp', 'in'), _OUT_E),
    ('attn_norm', 'scale'): (('embed', 'norm'),),
    ('mlp_norm', 'scale'): (('embed', 'norm'),),
}
_TOP_SPECS = {
    ('embed',): (None, _OUT_E),
    ('unembed',): (_IN_E, None),
    ('final_norm', 'scale'): (('embed', 'final_norm'),),
}
_OUTPUT_PROJECTIONS = (('attn', 'wo'), ('mlp', 'w_down'))


# ----------------------------------------------------------------------------------------------
# Requests and the grown config.

def _factor(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f'growth: {name} must be an integer >= 1, got {value!r}')
  if not math.isfinite(float(value)) or float(value) != math.floor(float(value)):
    raise ValueError(f'growth: {name} must be an integer (non-integer growth cannot copy whole '
                     f'layers / units), got {value}')
  if value < 1:
    raise ValueError(f'growth: {name} must be >= 1 (growth cannot shrink a model), got {value}')
  return int(value)


def _factors(cfg: ModelConfig, depth_factor, width_factor, heads_factor, mlp_factor):
  g = _factor('depth_factor', depth_factor)
  w = _factor('width_factor', width_factor)
  hf = _factor('heads_factor', w if heads_factor is None else heads_factor)
  mf = _factor('mlp_factor', w if mlp_factor is None else mlp_factor)
  if not cfg.head_dim and hf != w:
    raise ValueError(
        f'growth: heads_factor={hf} != width_factor={w} would change head_dim = d_model/num_heads '
        f'from {cfg.d_model // cfg.num_heads} to {cfg.d_model * w / (cfg.num_heads * hf):g}: heads '
        f'grow by whole copies and head_dim cannot change (set cfg.head_dim explicitly to grow '
        f'heads and d_model independently)')
  return g, {'embed': w, 'heads': hf, 'kv': hf, 'mlp': mf}


def _check_methods(method, width_method):
  if method == 'learn':
    raise ValueError("growth: method='learn' (LiGO learned maps) is not implemented; use one of "
                     f'{DEPTH_METHODS}')
  if method not in DEPTH_METHODS:
    raise ValueError(f'growth: method={method!r} is not one of {DEPTH_METHODS}')
  if width_method not in WIDTH_METHODS:
    raise ValueError(f'growth: width_method={width_method!r} is not one of {WIDTH_METHODS}')


def grow_config(cfg: ModelConfig, *, depth_factor=1, width_factor=1, heads_factor=None,
                mlp_factor=None, method: str = 'stack', width_method: str = 'direct',
                exact_norm_eps: bool = True) -> ModelConfig:
  """The config of the grown model (what `grow` returns beside the params)."""
  _check_methods(method, width_method)
  g, f = _factors(cfg, depth_factor, width_factor, heads_factor, mlp_factor)
  new = cfg.replace(num_layers=cfg.num_layers * g, d_model=cfg.d_model * f['embed'],
                    num_heads=cfg.num_heads * f['heads'],
                    num_kv_heads=cfg.num_kv_heads * f['kv'], mlp_dim=cfg.mlp_dim * f['mlp'])
  if width_method == 'zero' and f['embed'] > 1 and exact_norm_eps:
    new = new.replace(norm_eps=cfg.norm_eps / f['embed'])
  if new.dim_per_head != cfg.dim_per_head:  # guarded above; kept as the contract's last line
    raise ValueError(f'growth: head_dim changed {cfg.dim_per_head} -> {new.dim_per_head}')
  return new


# ----------------------------------------------------------------------------------------------
# Canonical form: top-level leaves + blocks stacked along a leading layers axis.

def _unwrap(tree):
  tree = nn.unbox(tree)
  if isinstance(tree, collections.abc.Mapping) and set(tree) == {'params'}:
    return tree['params'], True
  return tree, False


def _canonical(params, cfg: ModelConfig):
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  top, per_layer, scanned = {}, {}, {}
  for k, v in flat.items():
    if k[0] == 'blocks':
      scanned[k[1:]] = v
    elif k[0].startswith('blocks_'):
      per_layer.setdefault(int(k[0][len('blocks_'):]), {})[k[1:]] = v
    else:
      if k not in _TOP_SPECS:
        raise ValueError(f'growth: unknown parameter {"/".join(k)} (see the layout contract in '
                         'models/transformer.py)')
      top[k] = v
  if cfg.scan_layers:
    if per_layer or not scanned:
      raise ValueError('growth: cfg.scan_layers=True but params are not in the scanned layout '
                       "(expected 'blocks' with a leading layers axis)")
    blocks = scanned
    for k, v in blocks.items():
      if v.shape[0] != cfg.num_layers:
        raise ValueError(f'growth: blocks/{"/".join(k)} has {v.shape[0]} layers, cfg says '
                         f'{cfg.num_layers}')
  else:
    if scanned or sorted(per_layer) != list(range(cfg.num_layers)):
      raise ValueError(f'growth: cfg.scan_layers=False and num_layers={cfg.num_layers} but params '
                       f'hold {"scanned blocks" if scanned else sorted(per_layer)}')
    blocks = {k: jnp.stack([per_layer[i][k] for i in range(cfg.num_layers)])
              for k in per_layer[0]}
  if set(blocks) != set(_BLOCK_SPECS):
    raise ValueError(f'growth: block parameters {sorted(blocks)} do not match the layout contract '
                     f'{sorted(_BLOCK_SPECS)}')
  if (('unembed',) in top) == cfg.tie_embeddings:
    raise ValueError(f'growth: cfg.tie_embeddings={cfg.tie_embeddings} but params '
                     f'{"have" if ("unembed",) in top else "lack"} unembed')
  want = {('embed',): (cfg.vocab_size, cfg.d_model),
          ('attn', 'wq'): (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.dim_per_head),
          ('attn', 'wk'): (cfg.num_layers, cfg.d_model, cfg.num_kv_heads, cfg.dim_per_head),
          ('mlp', 'w_up'): (cfg.num_layers, cfg.d_model, cfg.mlp_dim)}
  for k, shape in want.items():
    leaf = top.get(k, blocks.get(k))
    if leaf is None:
      raise ValueError(f'growth: params lack {"/".join(k)}')
    got = leaf.shape
    if tuple(got) != shape:
      raise ValueError(f'growth: {"/".join(k)} has shape {tuple(got)}, cfg implies {shape}')
  return top, blocks


def _from_canonical(top, blocks, cfg: ModelConfig):
  flat = dict(top)
  for k, v in blocks.items():
    if cfg.scan_layers:
      flat[('blocks',) + k] = v
    else:
      for i in range(cfg.num_layers):
        flat[(f'blocks_{i}',) + k] = v[i]
  return traverse_util.unflatten_dict(flat)


def _normal(key, shape):
  """float32 N(0, 1) of `shape`, drawn flat: XLA:CPU compiles a 1-D threefry draw several times
  faster than a multi-dimensional one."""
  return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def _normals(key, shapes):
  """N(0, 1) arrays of the given shapes from ONE flat draw (one threefry call to compile)."""
  sizes = [math.prod(sh) for sh in shapes]
  flat = _normal(key, (sum(sizes),))
  offsets = np.cumsum([0] + sizes)
  return [flat[o:o + n].reshape(sh) for o, n, sh in zip(offsets, sizes, shapes)]


def _leaf_key(key, *names):
  """A key per purpose and leaf: one fold_in of a hash of the names (each threefry call costs
  compile time, so keys are never derived by chains of fold_ins)."""
  return jax.random.fold_in(key, zlib.crc32('/'.join(map(str, names)).encode()) & 0x7FFFFFFF)


# ----------------------------------------------------------------------------------------------
# Width.

def _widen_direct(x, spec, f, kind, *, tied, split_noise, key, path):
  """Tile every grown axis; scale by role. kind: 'param' | 'mu' | 'nu'."""
  power = {'mu': 1, 'nu': 2}.get(kind, 0)
  for ax, item in enumerate(spec):
    if item is None or f[item[0]] == 1:
      continue
    fac = f[item[0]]
    role = item[1]
    reps = [1] * x.ndim
    reps[ax] = fac
    if kind == 'param':
      if role == 'in' and split_noise > 0:
        e = split_noise * _normal(_leaf_key(key, 'split', *path, ax), (fac,) + x.shape)
        e = e - e.mean(0)  # the copies' shares sum to exactly 1
        x = jnp.concatenate([(x * (1.0 + e[c]) / fac).astype(x.dtype) for c in range(fac)], ax)
      elif role == 'in' or (role == 'final_norm' and tied):
        x = jnp.tile(x, reps) / fac
      else:
        x = jnp.tile(x, reps)
    else:
      # Moments follow the gradients: the gradient of a fan-out copy is the small gradient / fac
      # (its readers are split fac ways), of a fan-in copy the full small gradient.
      divided = role in ('out', 'norm') or (role == 'final_norm' and not tied)
      x = jnp.tile(x, reps) / (fac ** power) if divided else jnp.tile(x, reps)
  return x


def _grown_shape(shape, spec, f):
  return tuple(s * (f[item[0]] if item else 1) for s, item in zip(shape, spec))


def _is_norm(spec):
  return any(item and item[1] in ('norm', 'final_norm') for item in spec)


def _widen_zero(x, spec, f, kind, *, init_std, normal):
  new_shape = _grown_shape(x.shape, spec, f)
  if new_shape == x.shape:
    return x
  w = f['embed']
  is_norm = _is_norm(spec)
  old = x
  if kind == 'param':
    if is_norm:
      base = jnp.full(new_shape, 1.0 / math.sqrt(w), x.dtype)
      old = x / math.sqrt(w)
    else:
      base = (init_std * normal).astype(x.dtype)
      zero = np.zeros(new_shape, bool)
      for ax, (s, item) in enumerate(zip(x.shape, spec)):
        if item in (_OUT_E, ('heads', 'in'), ('mlp', 'in')):
          idx = [slice(None)] * len(new_shape)
          idx[ax] = slice(s, None)
          zero[tuple(idx)] = True
      base = jnp.where(zero, jnp.zeros((), x.dtype), base)
  else:
    base = jnp.zeros(new_shape, x.dtype)
    if is_norm:  # the gradient of a norm scale grows by sqrt(w) with the rescaled normalised units
      old = x * (math.sqrt(w) if kind == 'mu' else w)
  return base.at[tuple(slice(0, s) for s in x.shape)].set(old.astype(x.dtype))


def _widen(top, blocks, cfg, f, width_method, kind, *, split_noise, key):
  if all(v == 1 for v in f.values()):
    return top, blocks
  leaves = [(out, k, x, prefix + specs[k])
            for group, specs, out, prefix in ((top, _TOP_SPECS, 'top', ()),
                                              (blocks, _BLOCK_SPECS, 'blocks', (None,)))
            for k, x in sorted(group.items())]
  normals = {}
  if width_method == 'zero' and kind == 'param':
    drawn = [(o, k, _grown_shape(x.shape, spec, f)) for o, k, x, spec in leaves
             if not _is_norm(spec)]
    normals = dict(zip([(o, k) for o, k, _ in drawn],
                       _normals(_leaf_key(key, 'width'), [sh for _, _, sh in drawn])))
  new = {'top': {}, 'blocks': {}}
  for o, k, x, spec in leaves:
    if width_method == 'direct':
      new[o][k] = _widen_direct(x, spec, f, kind, tied=cfg.tie_embeddings,
                                split_noise=split_noise, key=key, path=k)
    else:
      new[o][k] = _widen_zero(x, spec, f, kind, init_std=cfg.init_std,
                              normal=normals.get((o, k)))
  return new['top'], new['blocks']


# ----------------------------------------------------------------------------------------------
# Depth.

def depth_sources(num_layers: int, depth_factor: int, method: str) -> tuple[np.ndarray, np.ndarray]:
  """(source layer of each new layer, whether each new layer is a new block) for a depth method."""
  g = _factor('depth_factor', depth_factor)
  j = np.arange(num_layers * g)
  if method == 'stack':
    return j % num_layers, np.zeros(j.shape, bool)
  if method == 'interleave':
    return j // g, np.zeros(j.shape, bool)
  if method in ('zero', 'random'):
    return j // g, (j % g) != 0
  _check_methods(method, 'direct')
  raise AssertionError(method)


def _fresh_blocks(blocks, idx, new_cfg, key):
  """New blocks at layers `idx` initialised as Transformer.init would (normal / ones)."""
  std_out = new_cfg.init_std / (2 * new_cfg.num_layers) ** 0.5
  names = sorted(k for k in blocks if k[-1] != 'scale')
  drawn = dict(zip(names, _normals(_leaf_key(key, 'depth'),
                                   [(len(idx),) + blocks[k].shape[1:] for k in names])))
  out = {}
  for k, x in blocks.items():
    if k[-1] == 'scale':
      fresh = jnp.ones((len(idx),) + x.shape[1:], x.dtype)
    else:
      std = std_out if k in _OUTPUT_PROJECTIONS else new_cfg.init_std
      fresh = (std * drawn[k]).astype(x.dtype)
    out[k] = x.at[idx].set(fresh)
  return out


def _deepen(blocks, cfg, new_cfg, g, method, kind, *, key):
  if g == 1:
    return blocks
  src, is_new = depth_sources(cfg.num_layers, g, method)
  blocks = {k: v[src] for k, v in blocks.items()}
  new_idx = np.flatnonzero(is_new)
  if not len(new_idx):
    return blocks
  if kind != 'param':  # new blocks start with fresh (zero) moments
    return {k: v.at[new_idx].set(0) for k, v in blocks.items()}
  if method == 'zero':
    return {k: v.at[new_idx].set(0) if k in _OUTPUT_PROJECTIONS else v for k, v in blocks.items()}
  return _fresh_blocks(blocks, new_idx, new_cfg, key)


# ----------------------------------------------------------------------------------------------
# Public API.

def _grow_tree(tree, cfg, new_cfg, *, g, f, method, width_method, kind, split_noise=0.0,
               noise=0.0, key=None):
  top, blocks = _canonical(tree, cfg)
  top, blocks = _widen(top, blocks, cfg, f, width_method, kind, split_noise=split_noise, key=key)
  blocks = _deepen(blocks, cfg, new_cfg, g, method, kind, key=key)
  if kind == 'param' and noise > 0:
    # Weight matrices only (a block leaf has a leading layers axis); one draw for all of them.
    mats = [('top', k) for k, x in sorted(top.items()) if x.ndim >= 2]
    mats += [('blocks', k) for k, x in sorted(blocks.items()) if x.ndim >= 3]
    groups = {'top': top, 'blocks': blocks}
    drawn = _normals(_leaf_key(key, 'noise'), [groups[grp][k].shape for grp, k in mats])
    for (grp, k), e in zip(mats, drawn):
      x = groups[grp][k]
      groups[grp][k] = (x * (1.0 + noise * e)).astype(x.dtype)
  return _from_canonical(top, blocks, new_cfg)


def grow(params, cfg: ModelConfig, *, depth_factor=1, width_factor=1, method: str = 'stack',
         key: jax.Array | None = None, width_method: str = 'direct', heads_factor=None,
         mlp_factor=None, split_noise: float = 0.0, noise: float = 0.0,
         exact_norm_eps: bool = True) -> tuple[Any, ModelConfig]:
  """Grows a transformer's params; returns (unboxed params, new_cfg).

  Args:
    params: the model's params (boxed or not; optionally wrapped as {'params': ...}).
    cfg: the small model's ModelConfig (its layout, tying and sizes must match `params`).
    depth_factor: integer g >= 1; the grown model has g * num_layers layers.
    width_factor: integer w >= 1 for d_model (and, by default, heads, kv heads and mlp_dim).
    method: depth operator, 'stack' | 'interleave' | 'zero' | 'random' (see the module doc).
    key: PRNG key; needed by method='random', width_method='zero', split_noise and noise.
    width_method: 'direct' | 'zero'.
    heads_factor, mlp_factor: grow num_heads/num_kv_heads and mlp_dim by other integer factors
      (heads_factor != width_factor needs an explicit cfg.head_dim).
    split_noise: 'direct' only: relative noise of the uneven fan-in split (stays exact).
    noise: multiplicative noise on every weight matrix after growth (breaks exactness).
    exact_norm_eps: width 'zero' only: divide norm_eps by w so RMSNorm is exactly preserved.
  Raises ValueError for factors < 1 or non-integer, unknown methods, head/d_model growth that
  would change head_dim, a missing key, or params that do not match cfg.
  """
  new_cfg = grow_config(cfg, depth_factor=depth_factor, width_factor=width_factor,
                        heads_factor=heads_factor, mlp_factor=mlp_factor, method=method,
                        width_method=width_method, exact_norm_eps=exact_norm_eps)
  g, f = _factors(cfg, depth_factor, width_factor, heads_factor, mlp_factor)
  needs_key = ((method == 'random' and g > 1) or (width_method == 'zero' and max(f.values()) > 1)
               or split_noise > 0 or noise > 0)
  if needs_key and key is None:
    raise ValueError(f'growth: method={method!r}, width_method={width_method!r}, '
                     f'split_noise={split_noise}, noise={noise} draw random numbers: pass key=')
  if split_noise and width_method != 'direct':
    raise ValueError("growth: split_noise applies to width_method='direct' only")
  tree, wrapped = _unwrap(params)
  out = _grow_tree(tree, cfg, new_cfg, g=g, f=f, method=method, width_method=width_method,
                   kind='param', split_noise=split_noise, noise=noise, key=key)
  return ({'params': out} if wrapped else out), new_cfg


def _is_param_tree(x) -> bool:
  return isinstance(x, collections.abc.Mapping) and 'embed' in x and 'final_norm' in x


def _map_state(state, fn, kind='mu'):
  if _is_param_tree(state):
    return fn(state, kind)
  if isinstance(state, tuple) and hasattr(state, '_fields'):  # namedtuple, e.g. ScaleByAdamState
    return type(state)(*[_map_state(v, fn, 'nu' if name == 'nu' else 'mu')
                         for name, v in zip(state._fields, state)])
  if isinstance(state, (tuple, list)):
    return type(state)(_map_state(v, fn, kind) for v in state)
  if isinstance(state, collections.abc.Mapping):
    return type(state)({k: _map_state(v, fn, kind) for k, v in state.items()})
  return state


def grow_opt_state(opt_state, cfg: ModelConfig, *, depth_factor=1, width_factor=1,
                   method: str = 'stack', width_method: str = 'direct', heads_factor=None,
                   mlp_factor=None, mode: str = 'map', optimizer=None, new_params=None):
  """The optimizer state for the grown params.

  mode='fresh': `optimizer.init(new_params)` (what the paper's code does; pair it with an LR
  re-warmup). mode='map': every param-shaped tree in the state (Adam's mu and nu, any other
  param-shaped trace) is grown like the gradients of the grown model would be: depth copies for
  'stack'/'interleave', zero moments for the new blocks of 'zero'/'random'; width 'direct' tiles
  mu with the gradient's scaling (fan-out copies / w, fan-in copies unscaled) and nu with its
  square, so that, for an even split, mapped moments equal the moments the grown model would have
  accumulated on the same batches; width 'zero' keeps the old moments top-left and zeros the new
  entries. Scalars (Adam's step count) are kept, so bias correction carries on. Other arguments as
  in `grow` (noise is not applied to moments).
  """
  if mode == 'fresh':
    if optimizer is None or new_params is None:
      raise ValueError("grow_opt_state(mode='fresh') needs optimizer= and new_params=")
    return optimizer.init(new_params)
  if mode != 'map':
    raise ValueError(f"grow_opt_state: mode={mode!r} is not 'map' or 'fresh'")
  new_cfg = grow_config(cfg, depth_factor=depth_factor, width_factor=width_factor,
                        heads_factor=heads_factor, mlp_factor=mlp_factor, method=method,
                        width_method=width_method)
  g, f = _factors(cfg, depth_factor, width_factor, heads_factor, mlp_factor)

  def fn(tree, kind):
    return _grow_tree(tree, cfg, new_cfg, g=g, f=f, method=method, width_method=width_method,
                      kind=kind)
  return _map_state(nn.unbox(opt_state), fn)


def gstack_plan(target_params: float, compute_flops: float | None = None,
                growth_factor: int = 4, *, target_tokens: float | None = None,
                target_layers: int | None = None) -> dict[str, float]:
  """Du et al.'s G_stack guideline: how long to train the small model, and how big it is.

  log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74 with N the target's parameters, C the total
  training FLOPs (give C, or target_tokens D for C = 6 N D) and d the tokens the small model sees
  before stacking; the small model has N / g parameters (the paper's g counts non-embedding
  params), g = 4 recommended. Example: Llama2-7B on 2T tokens gives d ~ 11.1B tokens.
  """
  g = _factor('growth_factor', growth_factor)
  if target_params <= 0:
    raise ValueError(f'gstack_plan: target_params must be positive, got {target_params}')
  if compute_flops is None:
    if target_tokens is None:
      raise ValueError('gstack_plan: give compute_flops or target_tokens')
    compute_flops = 6.0 * target_params * target_tokens
  if compute_flops <= 10:
    raise ValueError(f'gstack_plan: compute_flops must be > 10, got {compute_flops}')
  log_d = 0.88 * math.log10(target_params) + 163.27 / math.log10(compute_flops) - 5.74
  d = 10.0 ** log_d
  small = target_params / g
  plan = {'growth_factor': g, 'target_params': float(target_params),
          'compute_flops': float(compute_flops), 'small_tokens': d, 'small_params': small,
          'small_flops': 6.0 * small * d,
          'small_flops_fraction': 6.0 * small * d / compute_flops}
  if target_layers is not None:
    if target_layers % g:
      raise ValueError(f'gstack_plan: target_layers={target_layers} is not divisible by '
                       f'growth_factor={g}')
    plan['small_layers'] = target_layers // g
  return plan
