"""The jitted train and eval steps, and the glue from a batch to an objective's loss.

`batch` is a dict of int32 [B, L] arrays: `tokens`, `segment_ids` (0 = padding), `positions`.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pathways_jax import distributed, parallel
from pathways_jax.objectives import autoregressive
from pathways_jax.train.state import TrainState


def model_loss(cfg, model, params, batch, key, aux=None):
  """Loss and metrics of one (micro)batch under the configured objective.

  `aux` carries whatever else an objective needs inside the jitted step and is not trained
  (e.g. a frozen reference model's params for RHO-1); None for the plain objectives.
  """
  del aux
  tokens, segments, positions = batch['tokens'], batch['segment_ids'], batch['positions']
  if cfg.objective == 'autoregressive':
    logits = model.apply({'params': params}, tokens, positions_BL=positions,
                         segment_ids_BL=segments)
    return autoregressive.loss(logits, tokens, segments, z_loss=cfg.train.z_loss)
  if cfg.objective == 'diffusion':
    from pathways_jax.objectives import diffusion  # pylint: disable=g-import-not-at-top
    noisy, masked, p_mask, valid = diffusion.pretraining_draws(
        key, tokens, segments, mask_id=cfg.data.mask_id, eps=cfg.diffusion.eps,
        random_length_prob=cfg.diffusion.random_length_prob)
    logits = model.apply({'params': params}, noisy, positions_BL=positions,
                         segment_ids_BL=segments * valid)
    return diffusion.loss(logits, tokens, masked, p_mask, valid_BL=valid)
  raise ValueError(f'unknown objective {cfg.objective!r}')


def _split_micro(batch, num_micro):
  # Micro-batch i = rows i, i + M, i + 2M, ...: with the batch split over the data-parallel
  # devices, every device keeps its own rows in every micro-batch (no resharding between them).
  return jax.tree_util.tree_map(
      lambda x: x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1),
      batch)


def train_step(state: TrainState, batch, aux=None, *, cfg, model, tx, loss_fn: Callable) -> tuple:
  """One optimizer update (with gradient accumulation over `train.grad_accum` micro-batches).

  A non-finite loss or gradient leaves params and optimizer state untouched and records the step
  in `bad_step`, so the loop can stop with the last good state intact.
  """
  key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
  grad_fn = jax.value_and_grad(lambda p, b, k: loss_fn(cfg, model, p, b, k, aux), has_aux=True)
  num_micro = cfg.train.grad_accum
  if num_micro == 1:
    (loss, metrics), grads = grad_fn(state.params, batch, key)
  else:
    micro = _split_micro(batch, num_micro)

    def body(carry, xs):
      grads_acc, loss_acc, metrics_acc = carry
      b, i = xs
      (l, m), g = grad_fn(state.params, b, jax.random.fold_in(key, i))
      add = lambda a, x: a + x / num_micro
      return (jax.tree_util.tree_map(add, grads_acc, g), loss_acc + l / num_micro,
              jax.tree_util.tree_map(add, metrics_acc, m)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (_, m0), _ = jax.eval_shape(grad_fn, state.params, jax.tree_util.tree_map(lambda x: x[0], micro),
                                key)
    init = (zeros, jnp.zeros(()), jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), m0))
    (grads, loss, metrics), _ = jax.lax.scan(body, init, (micro, jnp.arange(num_micro)))
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step))
  metrics = {**metrics, 'loss': loss, 'grad_norm': grad_norm}
  return new_state, metrics


def eval_step(params, batch, aux=None, *, cfg, model, loss_fn: Callable):
  key = jax.random.fold_in(jax.random.key(cfg.seed + 1), 0)  # fixed: eval is deterministic
  loss, metrics = loss_fn(cfg, model, params, batch, key, aux)
  return {**metrics, 'loss': loss}


def jit_train_step(cfg, model, tx, state_shardings, mesh, loss_fn=model_loss,
                   aux_shardings=None):
  """jit(train_step) with explicit shardings; takes (state, batch) or, with aux_shardings,
  (state, batch, aux)."""
  batch_sharding = parallel.batch_sharding(mesh)
  fn = functools.partial(train_step, cfg=cfg, model=model, tx=tx, loss_fn=loss_fn)
  in_shardings = (state_shardings, batch_sharding)
  if aux_shardings is not None:
    in_shardings += (aux_shardings,)
  return distributed.compile_then_sync(jax.jit(
      fn, in_shardings=in_shardings, out_shardings=(state_shardings, parallel.replicated(mesh)),
      donate_argnums=0), 'train_step')


def jit_eval_step(cfg, model, param_shardings, mesh, loss_fn=model_loss, aux_shardings=None):
  fn = functools.partial(eval_step, cfg=cfg, model=model, loss_fn=loss_fn)
  in_shardings = (param_shardings, parallel.batch_sharding(mesh))
  if aux_shardings is not None:
    in_shardings += (aux_shardings,)
  return distributed.compile_then_sync(
      jax.jit(fn, in_shardings=in_shardings, out_shardings=parallel.replicated(mesh)), 'eval_step')


def run_with_rules(mesh, rules, fn, *args):
  """Calls (and, the first time, traces) a jitted fn under the mesh and logical-axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return fn(*args)
