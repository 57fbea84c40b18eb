"""Device mesh, logical-axis rules and the shardings derived from them.

The model names every parameter and activation axis logically (`embed`, `mlp`, `heads`, `kv`,
`vocab`, `layers`, `activation_batch`, ...); `logical_rules(cfg)` maps those names to the mesh axes
`data`, `fsdp`, `tensor`. Changing the strategy (DP, FSDP, TP, FSDP x TP) is a config change only.
"""
from __future__ import annotations

import math

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


def mesh_shape(cfg, num_devices: int) -> tuple[int, ...]:
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f'mesh: at most one of data/fsdp/tensor may be -1, got {sizes}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh: sizes must be positive or -1, got {sizes}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh: {num_devices} devices cannot be split as data x fsdp x tensor '
                        f'= {sizes}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh: data x fsdp x tensor = {sizes} = {math.prod(sizes)} devices, but '
                      f'{num_devices} are available')
  return tuple(sizes)


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_rules(cfg=None):
  return DEFAULT_RULES


def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_sharding(abstract_tree, mesh, rules):
  """Shardings for a pytree whose leaves may be `nn.LogicallyPartitioned` boxes."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)
