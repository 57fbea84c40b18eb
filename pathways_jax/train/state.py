"""The train state pytree and its sharded initialisation."""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from pathways_jax import parallel
from pathways_jax.train import trainable as trainable_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. Randomness needs no state: keys are fold_in(root, step)."""
  step: jax.Array  # int32 scalar: number of optimizer updates applied
  params: dict
  opt_state: optax.OptState
  bad_step: jax.Array  # int32 scalar: first step with a non-finite loss/grad, -1 if none


def example_adapter_ids(model, example_BL):
  """Adapter ids for initialising a multi-LoRA model (it needs them; None for any other)."""
  if model.cfg.lora_num_adapters <= 1:
    return None
  return jnp.zeros((example_BL.shape[0],), jnp.int32)


def _boxed_init(model, example_BL, key):
  return model.init(key, example_BL,
                    adapter_ids_B=example_adapter_ids(model, example_BL))['params']


def split_state_and_shardings(model, tx, example_BL, mesh, rules, trainable: str = ''):
  """(abstract state, state shardings, abstract frozen params, frozen shardings), nothing
  allocated. With a `trainable` pattern (train/trainable.py) the state holds only the params it
  matches and their optimizer state; the frozen ones are returned apart (None without one)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda k: _boxed_init(model, example_BL, k), jax.random.key(0))
    param_shardings = parallel.logical_to_sharding(boxed, mesh, rules)
  params, frozen, frozen_shardings = nn.unbox(boxed), None, None
  if trainable:
    params, frozen = trainable_lib.split(params, trainable)
    param_shardings, frozen_shardings = trainable_lib.split(param_shardings, trainable)
  opt_state = jax.eval_shape(tx.init, params)
  # Optimizer moments mirror the params; scalars (counts) are replicated.
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, opt_state, param_shardings,
      transform_non_params=lambda _: parallel.replicated(mesh))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_state, bad_step=jax.ShapeDtypeStruct((), jnp.int32))
  shardings = TrainState(step=parallel.replicated(mesh), params=param_shardings,
                         opt_state=opt_shardings, bad_step=parallel.replicated(mesh))
  return abstract, shardings, frozen, frozen_shardings


def abstract_state_and_shardings(model, tx, example_BL, mesh, rules):
  """Shapes and NamedShardings of the state (every param trained), without allocating anything."""
  abstract, shardings, _, _ = split_state_and_shardings(model, tx, example_BL, mesh, rules)
  return abstract, shardings


def init_split_state(model, tx, example_BL, key, mesh, rules, trainable: str = '',
                     params=None):
  """(state, frozen params), initialised directly into their shardings (no full copy on one
  device); frozen is None when every param is trained. `params` (already placed, e.g.
  `train.init_from`'s): start from them instead of a random initialisation; their frozen part is
  returned as it is, not copied (a QLoRA run's is held quantised: adapters.qlora)."""
  _, shardings, _, frozen_shardings = split_state_and_shardings(model, tx, example_BL, mesh,
                                                                rules, trainable)
  if params is not None and trainable:
    trained, frozen = trainable_lib.split(params, trainable)
    flat_s = trainable_lib.flat(frozen_shardings)
    frozen = traverse_util.unflatten_dict({  # a float param not in its sharding is moved there
        path: jax.device_put(x, flat_s[path]) if isinstance(x, jax.Array) else x
        for path, x in trainable_lib.flat(frozen).items()}, sep='/')
    make = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                bad_step=jnp.full((), -1, jnp.int32))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jax.jit(make, out_shardings=shardings)(trained), frozen

  def init(k, given):
    params = nn.unbox(_boxed_init(model, example_BL, k)) if given is None else given
    frozen = None
    if trainable:
      params, frozen = trainable_lib.split(params, trainable)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       bad_step=jnp.full((), -1, jnp.int32))
    return state, frozen

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(init, out_shardings=(shardings, frozen_shardings))(key, params)


def init_state(model, tx, example_BL, key, mesh, rules) -> TrainState:
  """Initialises directly into the target shardings (no full copy on one device)."""
  return init_split_state(model, tx, example_BL, key, mesh, rules)[0]
