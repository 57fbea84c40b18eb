"""The train state pytree and its sharded initialisation."""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from pathways_jax import parallel


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. Randomness needs no state: keys are fold_in(root, step)."""
  step: jax.Array  # int32 scalar: number of optimizer updates applied
  params: dict
  opt_state: optax.OptState
  bad_step: jax.Array  # int32 scalar: first step with a non-finite loss/grad, -1 if none


def _boxed_init(model, tx, example_BL, key):
  boxed = model.init(key, example_BL)['params']
  params = nn.unbox(boxed)
  return boxed, params, tx.init(params)


def abstract_state_and_shardings(model, tx, example_BL, mesh, rules):
  """Shapes and NamedShardings of the state, without allocating anything."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed, _, opt_state = jax.eval_shape(lambda k: _boxed_init(model, tx, example_BL, k),
                                         jax.random.key(0))
    param_shardings = parallel.logical_to_sharding(boxed, mesh, rules)
    # Optimizer moments mirror the params; scalars (counts) are replicated.
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, opt_state, param_shardings,
        transform_non_params=lambda _: parallel.replicated(mesh))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=nn.unbox(boxed),
                        opt_state=opt_state, bad_step=jax.ShapeDtypeStruct((), jnp.int32))
  shardings = TrainState(step=parallel.replicated(mesh), params=param_shardings,
                         opt_state=opt_shardings, bad_step=parallel.replicated(mesh))
  return abstract, shardings


def init_state(model, tx, example_BL, key, mesh, rules) -> TrainState:
  """Initialises directly into the target shardings (no full copy on one device)."""
  _, shardings = abstract_state_and_shardings(model, tx, example_BL, mesh, rules)

  def init(k):
    _, params, opt_state = _boxed_init(model, tx, example_BL, k)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      bad_step=jnp.full((), -1, jnp.int32))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(init, out_shardings=shardings)(key)
