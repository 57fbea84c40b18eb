"""The jitted train and eval steps of a task (pathways_jax.tasks): its loss over a batch,
differentiated, accumulated over micro-batches and applied, with explicit shardings.

`batch` is a dict of [B, L] arrays, the fields the task's `batch_fields` names (the token fields
`tokens`, `segment_ids` (0 = padding) and `positions`, and whatever else the task reads).
`inputs` (optional) holds what the step reads but does not train: `aux`, the task's frozen inputs
(e.g. a reference model's params), and `frozen`, the frozen part of the model's own params when
only a subset is trained (`train.trainable`; the state then holds only the trainable part).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pathways_jax import distributed, parallel
from pathways_jax.tasks.base import COUNT, Task
from pathways_jax.train import anneal
from pathways_jax.train import trainable as trainable_lib
from pathways_jax.train.state import TrainState


def _split_micro(batch, num_micro):
  # Micro-batch i = rows i, i + M, i + 2M, ...: with the batch split over the data-parallel
  # devices, every device keeps its own rows in every micro-batch (no resharding between them).
  return jax.tree_util.tree_map(
      lambda x: x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1),
      batch)


def _loss_and_count(task: Task, params, batch, key, aux):
  """The task's (loss, (metrics, count)); count 1 when the task states none."""
  loss, metrics = task.loss(params, batch, key, aux)
  metrics = dict(metrics)
  count = jnp.asarray(metrics.pop(COUNT, 1.0), jnp.float32)
  return loss, (metrics, count)


# fold_in constant of the dropout stream: independent of the task's own draws from the same key.
_DROPOUT_STREAM = 0x64726F70  # 'drop'


class _Training:
  """The task's model as the train step runs it: `apply` gets a 'dropout' rng (LoRA dropout),
  everything else is the model's own. Evaluation and sampling call the model itself, without
  the rng, so they never drop."""

  def __init__(self, model, key: jax.Array):
    self._model, self._rngs = model, {'dropout': key}

  def apply(self, variables, *args, **kwargs):
    return self._model.apply(variables, *args, rngs=self._rngs, **kwargs)

  def __getattr__(self, name):
    return getattr(self._model, name)


def training_task(task: Task, key: jax.Array, keep_ratio=None) -> Task:
  """`task` whose model drops out with rng `key` where its config asks (model.lora_dropout) and,
  given `keep_ratio`, anneals its attention mask (train.attention_anneal_steps: train/anneal.py);
  the task itself otherwise, so a model without either compiles the step it always did."""
  model = task.model
  if getattr(model.cfg, 'lora_dropout', 0.0):
    model = _Training(model, jax.random.fold_in(key, _DROPOUT_STREAM))
  if keep_ratio is not None:
    model = anneal.AnnealedModel(model, key, keep_ratio)
  return task if model is task.model else task.with_model(model)


def train_step(state: TrainState, batch, inputs=None, *, cfg, task: Task, tx) -> tuple:
  """One optimizer update (with gradient accumulation over `train.grad_accum` micro-batches).

  Micro-batches are weighted by the number of units their loss averages over (the task's COUNT),
  so the accumulated loss and gradient are those of the mean over the whole batch. A non-finite
  loss or gradient leaves params and optimizer state untouched and records the step in
  `bad_step`, so the loop can stop with the last good state intact.
  """
  key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
  inputs = inputs or {}
  aux, frozen = inputs.get('aux'), inputs.get('frozen')
  anneal_steps = cfg.train.get('attention_anneal_steps', 0)
  ratio = anneal.keep_ratio(state.step, anneal_steps) if anneal_steps else None
  # Differentiated with respect to the state's (trainable) params only.
  grad_fn = jax.value_and_grad(
      lambda p, b, k: _loss_and_count(training_task(task, k, ratio),
                                      trainable_lib.merge(p, frozen), b, k, aux),
      has_aux=True)
  num_micro = cfg.train.grad_accum
  if num_micro == 1:
    (loss, (metrics, _)), grads = grad_fn(state.params, batch, key)
  else:
    micro = _split_micro(batch, num_micro)

    def body(carry, xs):
      grads_acc, loss_acc, metrics_acc, count_acc = carry
      b, i = xs
      (l, (m, c)), g = grad_fn(state.params, b, jax.random.fold_in(key, i))
      add = lambda a, x: a + c * x
      return (jax.tree_util.tree_map(add, grads_acc, g), loss_acc + c * l,
              jax.tree_util.tree_map(add, metrics_acc, m), count_acc + c), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (_, (m0, _)), _ = jax.eval_shape(grad_fn, state.params,
                                     jax.tree_util.tree_map(lambda x: x[0], micro), key)
    init = (zeros, jnp.zeros(()), jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), m0),
            jnp.zeros(()))
    (grads, loss, metrics, count), _ = jax.lax.scan(body, init, (micro, jnp.arange(num_micro)))
    mean = lambda x: x / jnp.maximum(count, 1e-30)
    grads, loss, metrics = (jax.tree_util.tree_map(mean, t) for t in (grads, loss, metrics))
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
  if ratio is not None:
    metrics['attention_keep_ratio'] = ratio
  return new_state, metrics


EVAL_INDEX = 'eval_index'  # a validation batch's number, a [B] field `loop.evaluate` adds


def eval_step(params, batch, inputs=None, *, cfg, task: Task):
  # Fixed, so eval is deterministic, and one key per validation batch (`loop.evaluate` numbers
  # them): the same draws in every batch would leave a diffusion bound B draws, not all rows'.
  batch = dict(batch)
  index = batch.pop(EVAL_INDEX, None)
  key = jax.random.fold_in(jax.random.key(cfg.seed + 1), 0 if index is None else index[0])
  inputs = inputs or {}
  params = trainable_lib.merge(params, inputs.get('frozen'))
  loss, metrics = task.eval_loss(params, batch, key, inputs.get('aux'))
  metrics = dict(metrics)
  # The loop weights each batch by it (a padded last batch counts for the units it holds).
  count = jnp.asarray(metrics.pop(COUNT, 1.0), jnp.float32)
  return {**metrics, 'loss': loss, COUNT: count}


def jit_train_step(cfg, task: Task, tx, state_shardings, mesh, input_shardings=None):
  """jit(train_step) with explicit shardings; takes (state, batch) or, with input_shardings (a
  dict like the step's `inputs`), (state, batch, inputs)."""
  fn = functools.partial(train_step, cfg=cfg, task=task, tx=tx)
  in_shardings = (state_shardings, parallel.batch_sharding(mesh))
  if input_shardings:
    in_shardings += (input_shardings,)
  return distributed.compile_then_sync(jax.jit(
      fn, in_shardings=in_shardings, out_shardings=(state_shardings, parallel.replicated(mesh)),
      donate_argnums=0), 'train_step')


def jit_eval_step(cfg, task: Task, param_shardings, mesh, input_shardings=None):
  fn = functools.partial(eval_step, cfg=cfg, task=task)
  in_shardings = (param_shardings, parallel.batch_sharding(mesh))
  if input_shardings:
    in_shardings += (input_shardings,)
  return distributed.compile_then_sync(
      jax.jit(fn, in_shardings=in_shardings, out_shardings=parallel.replicated(mesh)), 'eval_step')


run_with_rules = parallel.run_with_rules


def step_inputs(frozen_inputs=None, frozen_params=None, frozen_shardings=None):
  """(the step's extra arguments, their shardings) from a task's FrozenInputs and the model's
  frozen params: `()` and None when the step takes neither."""
  inputs, shardings = {}, {}
  if frozen_inputs is not None and frozen_inputs.aux_shardings is not None:
    inputs['aux'], shardings['aux'] = frozen_inputs.aux, frozen_inputs.aux_shardings
  if frozen_params is not None:
    inputs['frozen'], shardings['frozen'] = frozen_params, frozen_shardings
  return ((inputs,) if inputs else ()), (shardings or None)
