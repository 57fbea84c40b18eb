"""Device mesh, logical-axis rules and the shardings derived from them.

The model names every parameter and activation axis logically (`embed`, `mlp`, `heads`, `kv`,
`vocab`, `layers`, `activation_batch`, ...); `logical_rules(cfg)` maps those names to the mesh axes
`data`, `fsdp`, `tensor`. Changing the strategy is a config change only:

  data parallel      mesh.data=-1                     params replicated, batch split
  FSDP (ZeRO-3)      mesh.fsdp=-1, mesh.data=1        params + optimizer state split on `embed`
  tensor parallel    mesh.tensor=N                    heads / MLP hidden / vocab split (Megatron)
  FSDP x TP          mesh.fsdp=A, mesh.tensor=B       both

Multi-slice (TPU pods joined over the data-centre network, or GPU hosts): `mesh.dcn_data`,
`mesh.dcn_fsdp`, `mesh.dcn_tensor` split each axis into an outer factor that crosses slices (DCN)
and the inner `mesh.data/fsdp/tensor` factor inside a slice (ICI), as MaxText does; usually only
`dcn_data` is > 1 (the cheapest traffic, one gradient all-reduce per step, crosses the slow links).

`mesh.rules` overrides the default rules by logical name, e.g.
`(('embed', None), ('activation_batch', ('data', 'fsdp', 'tensor')))`.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pathways_jax.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the batch is split over every non-tensor axis

# Logical name -> mesh axis (or axes). FSDP shards the embed dim of every weight (ZeRO-3);
# tensor parallelism splits heads and the MLP hidden dim (Megatron-style).
DEFAULT_RULES = (
    ('activation_batch', BATCH_AXES),
    ('activation_tokens', BATCH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', 'tensor'),
    ('vocab', 'tensor'),
    ('head_dim', None),
    ('layers', None),
)
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)

_LOG = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ mesh

def _mesh_cfg(cfg):
  return cfg.mesh if hasattr(cfg, 'mesh') else cfg


def _resolve(sizes: list[int], total: int, what: str) -> list[int]:
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f'mesh: at most one of {what} may be -1, got {sizes}')
  if any(not isinstance(s, (int, np.integer)) or s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh: {what} must be positive or -1, got {sizes}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ConfigError(f'mesh: {total} devices cannot be split as {what} = {sizes} '
                        f'({total} is not a multiple of {known})')
    sizes = list(sizes)
    sizes[sizes.index(-1)] = total // known
  return list(sizes)


def mesh_shapes(cfg, num_devices: int, num_slices: int | None = None):
  """(ici, dcn) sizes of (data, fsdp, tensor); the mesh axis sizes are their products.

  `num_slices` (granules joined over DCN) resolves a -1 among the dcn sizes; by default the dcn
  sizes must be given explicitly (all 1 on a single slice).
  """
  m = _mesh_cfg(cfg)
  dcn = [m.get('dcn_data', 1), m.get('dcn_fsdp', 1), m.get('dcn_tensor', 1)]
  if -1 in dcn:
    if num_slices is None:
      raise ConfigError('mesh: a dcn size of -1 needs the number of slices; give it explicitly')
    dcn = _resolve(dcn, num_slices, 'dcn_data x dcn_fsdp x dcn_tensor')
  else:
    dcn = _resolve(dcn, math.prod(dcn), 'dcn_data x dcn_fsdp x dcn_tensor')
  slices = math.prod(dcn)
  if num_devices % slices:
    raise ConfigError(f'mesh: dcn_data x dcn_fsdp x dcn_tensor = {dcn} = {slices} slices, but '
                      f'{num_devices} devices do not split into {slices} equal slices')
  per_slice = num_devices // slices
  ici = _resolve([m.data, m.fsdp, m.tensor], per_slice, 'data x fsdp x tensor')
  if math.prod(ici) != per_slice:
    where = f' per slice ({num_devices} devices / {slices} slices)' if slices > 1 else ''
    raise ConfigError(f'mesh: data x fsdp x tensor = {ici} = {math.prod(ici)} devices, but '
                      f'{per_slice} are available{where}. Set the sizes so that their product '
                      'is the device count, or one of them to -1.')
  return tuple(ici), tuple(dcn)


def mesh_shape(cfg, num_devices: int, num_slices: int | None = None) -> tuple[int, ...]:
  """Sizes of the mesh axes (data, fsdp, tensor) for `num_devices` devices."""
  ici, dcn = mesh_shapes(cfg, num_devices, num_slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def _granules(devices) -> tuple[str | None, int]:
  """How devices group into DCN-connected granules: ('slice_index'|'process_index'|None, count)."""
  for attr in ('slice_index', 'process_index'):
    values = {getattr(d, attr, None) for d in devices}
    if None not in values and len(values) > 1:
      return attr, len(values)
  return None, 1


def _emulated_hybrid(ici, dcn, devices) -> np.ndarray:
  """Hybrid layout over contiguous blocks of devices (one process of fake devices: dry runs)."""
  arr = np.asarray(devices, dtype=object).reshape(tuple(dcn) + tuple(ici))
  n = len(ici)
  arr = arr.transpose([k for i in range(n) for k in (i, n + i)])
  return arr.reshape([d * i for d, i in zip(dcn, ici)])


def make_mesh(cfg, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of the config over `devices` (default: all devices).

  Single slice: `jax.make_mesh` (topology-aware device order). Several slices (dcn sizes > 1):
  jax's hybrid mesh, with a slice per TPU slice, or per process where devices have no slice
  index (GPU hosts); one process of fake devices (dry runs) gets contiguous blocks as slices.
  """
  logical_rules(cfg)  # the whole mesh section fails here, before any data or model work
  devices = list(jax.devices() if devices is None else devices)
  attr, granules = _granules(devices)
  ici, dcn = mesh_shapes(cfg, len(devices), granules)
  shape = tuple(i * d for i, d in zip(ici, dcn))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
  if attr is not None:
    if math.prod(dcn) != granules:
      raise ConfigError(f'mesh: dcn_data x dcn_fsdp x dcn_tensor = {list(dcn)} = '
                        f'{math.prod(dcn)}, but the devices form {granules} slices (by {attr})')
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                               process_is_granule=attr == 'process_index')
  else:
    arr = _emulated_hybrid(ici, dcn, devices)
  return jax.sharding.Mesh(arr, MESH_AXES, axis_types=auto)


# ---------------------------------------------------------------------------------------- rules

def _as_axes(value) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  return tuple(value)


def check_rules(rules, mesh_axes: Sequence[str] = MESH_AXES) -> None:
  """ConfigError for a rule that is not (logical name, mesh axis | axes | None) over `mesh_axes`."""
  for rule in rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)):
      raise ConfigError(f'mesh.rules: {rule!r} is not a (logical_name, mesh_axes) pair')
    name, target = rule
    try:
      axes = _as_axes(target)
    except TypeError:
      axes = (target,)
    for axis in axes:
      if not isinstance(axis, str) or axis not in mesh_axes:
        raise ConfigError(f'mesh.rules: the rule for {name!r} names mesh axis {axis!r}, which is '
                          f'not one of the mesh axes {tuple(mesh_axes)}')
    if len(set(axes)) != len(axes):
      raise ConfigError(f'mesh.rules: the rule for {name!r} names a mesh axis twice: {target!r}')


def logical_rules(cfg=None) -> tuple:
  """DEFAULT_RULES with `cfg.mesh.rules` overriding them by logical name (validated)."""
  overrides = tuple(_mesh_cfg(cfg).get('rules', ()) or ()) if cfg is not None else ()
  if not overrides:
    return DEFAULT_RULES
  check_rules(overrides)
  for name, _ in overrides:
    if name not in LOGICAL_AXES:
      raise ConfigError(f'mesh.rules: unknown logical axis {name!r}; the model names '
                        f'{LOGICAL_AXES}')
  new = {name: (tuple(t) if isinstance(t, list) else t) for name, t in overrides}
  return tuple((name, new.get(name, target)) for name, target in DEFAULT_RULES)


def describe_rules(rules) -> str:
  return ', '.join(f'{n}->{"+".join(_as_axes(t)) or "-"}' for n, t in rules)


# ----------------------------------------------------------------------------------- shardings

def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fit_spec(spec: P, shape: tuple[int, ...], mesh, where: str) -> P:
  """Drops mesh axes from dims they do not divide (e.g. 2 KV heads on tensor=4: replicated)."""
  out = []
  for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = _as_axes(axes)
    size = math.prod(mesh.shape[a] for a in names)
    if names and shape[dim] % size:
      _LOG.info('%s: dim %d (%d) is not divisible by %s (%d): replicated along it', where, dim,
                shape[dim], '+'.join(names), size)
      axes = None
    out.append(axes)
  return P(*out)


def logical_to_sharding(abstract_tree, mesh, rules):
  """Shardings for a pytree whose leaves may be `nn.LogicallyPartitioned` boxes.

  A dimension its mesh axes do not divide is replicated rather than failing (e.g. fewer KV heads
  than the tensor axis, as Megatron/MaxText replicate KV heads).
  """
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)

  def one(path, leaf):
    where = jax.tree_util.keystr(path)
    if is_box(leaf):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      shape = leaf.value.shape
    else:
      spec, shape = P(), getattr(leaf, 'shape', ())
    return NamedSharding(mesh, _fit_spec(spec, tuple(shape), mesh, where))

  return jax.tree_util.tree_map_with_path(one, abstract_tree, is_leaf=is_box)


def process_batch_slice(mesh) -> tuple[int, int]:
  """(index, count): this process feeds rows [index*G/count, (index+1)*G/count) of each batch.

  `count` is the number of distinct row blocks the processes hold; processes whose devices differ
  only along `tensor` hold the same rows (count < process_count). A mesh whose devices give a
  process anything but one aligned block of rows is a ConfigError.
  """
  if jax.process_count() == 1:
    return 0, 1
  return _process_batch_slice(mesh, jax.process_index())


@functools.lru_cache(maxsize=16)
def _process_batch_slice(mesh, process_index: int) -> tuple[int, int]:
  dp = data_parallel_size(mesh)
  # Batch-shard index of each device: its flat position over the (data, fsdp) mesh axes.
  order = [MESH_AXES.index(a) for a in BATCH_AXES] + [MESH_AXES.index('tensor')]
  devs = np.asarray(mesh.devices).transpose(order).reshape(dp, -1)
  mine = sorted({i for i in range(dp) for d in devs[i] if d.process_index == process_index})
  k = len(mine)
  if not mine or dp % k or mine != list(range(mine[0], mine[0] + k)) or mine[0] % k:
    raise ConfigError(f'mesh {dict(mesh.shape)}: process {process_index} holds batch '
                      f'shards {mine} of {dp}, not one aligned contiguous block; order the '
                      'mesh so that each process owns whole data/fsdp blocks')
  return mine[0] // k, dp // k


def global_batch(local_batch: dict, mesh) -> dict:
  """Global [G, ...] arrays from this process's rows (see `process_batch_slice`)."""
  sharding = batch_sharding(mesh)
  _, count = process_batch_slice(mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v,
                                                    (v.shape[0] * count,) + v.shape[1:])
  return out


def check_batch(cfg, mesh) -> None:
  """ConfigError unless the (micro-)batch splits evenly over the data-parallel devices."""
  dp = data_parallel_size(mesh)
  b, accum = cfg.data.batch_size, cfg.train.grad_accum
  if b % dp or (b // accum) % dp:
    raise ConfigError(
        f'config.data.batch_size={b} (per micro-batch {b // accum}) is not divisible by the '
        f'{dp} data-parallel devices (mesh data x fsdp = {mesh.shape["data"]} x '
        f'{mesh.shape["fsdp"]})')


def sharded_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs placed with `shardings`."""
  total = 0
  for a, s in zip(jax.tree_util.tree_leaves(abstract_tree), jax.tree_util.tree_leaves(shardings)):
    shard = s.shard_shape(a.shape)
    total += math.prod(shard) * np.dtype(a.dtype).itemsize
  return total


def run_with_rules(mesh, rules, fn, *args):
  """Calls (and, the first time, traces) a jitted fn under the mesh and logical-axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return fn(*args)
