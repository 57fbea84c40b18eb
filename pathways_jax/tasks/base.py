"""What a training kind is, as the trainer sees it: a Task.

A task says what a batch holds (`batch_fields`, for shardings, the data pipeline and the dry run),
what frozen inputs it needs (`setup`: frozen models' params passed to every step as `aux`, per-row
fields served beside the tokens), and its loss over a batch — a pure function the train step
differentiates and the eval step calls with a fixed key:

    loss, metrics = task.loss(params, batch, key, aux)

`metrics[COUNT]` (optional) is how many units (tokens, positions) the loss is a mean over. With
gradient accumulation the step weights each micro-batch by it, so the loss stays the exact mean
over the whole batch's units however they fall into micro-batches and packed rows; the step
removes it from the metrics it logs. Tasks are registered by name (`pathways_jax.tasks.register`)
and chosen by `config.task`; the trainer never branches on the name.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.config import ConfigError

COUNT = 'loss_count'
TOKEN_FIELDS = ('tokens', 'segment_ids', 'positions')
# Per-row batch fields, [B] rather than [B, L]: a multi-LoRA row's adapter (data/sft.py).
ADAPTER_IDS = 'adapter_ids'
ROW_FIELDS = (ADAPTER_IDS,)
# A validation metric that is a mean over its own units rather than the batch's COUNT: the eval
# step returns metric `k` beside `k + OWN_COUNT`, and the loop weights each batch's `k` by it
# (multi-LoRA's per-adapter losses: an adapter's share of each batch varies).
OWN_COUNT = '@count'


def adapter_fields(model) -> dict:
  """{'adapter_ids': int32} for a multi-LoRA model (model.lora_num_adapters > 1), else {}."""
  return {ADAPTER_IDS: jnp.int32} if model.cfg.lora_num_adapters > 1 else {}


def per_adapter_losses(model, batch: dict, loss_of_rows: Callable) -> dict:
  """`loss/adapter_k` and its OWN_COUNT for each adapter k of a multi-LoRA model ({} for one
  adapter): `loss_of_rows(rows_B)` -> (the task's loss over the rows where `rows_B` is True, how
  many units it is a mean over), so adapter k's value is what a run of it alone would report."""
  k_adapters = model.cfg.lora_num_adapters
  if k_adapters <= 1:
    return {}
  out = {}
  for k in range(k_adapters):
    loss, count = loss_of_rows(batch[ADAPTER_IDS] == k)
    out[f'loss/adapter_{k}'] = loss
    out[f'loss/adapter_{k}{OWN_COUNT}'] = jnp.asarray(count, jnp.float32)
  return out


@dataclasses.dataclass
class RunContext:
  """What a task's setup may use: the run's config and directory, tokenizer, mesh and rules, and
  the trainer itself (to train a missing frozen input, e.g. RHO-1's reference)."""
  cfg: Any
  workdir: str
  tokenizer: Any
  mesh: Any
  rules: Any
  vocab_size: int
  train: Callable | None = None


@dataclasses.dataclass
class FrozenInputs:
  """A task's inputs that are not trained: `aux` (a pytree, e.g. a reference's params, placed
  with `aux_shardings`) is an argument of every train and eval step; `row_fields` are per-row
  arrays [num_rows, L] the pipeline serves beside each row's tokens."""
  aux: Any = None
  aux_shardings: Any = None
  row_fields: dict[str, np.ndarray] | None = None
  eval_row_fields: dict[str, np.ndarray] | None = None  # the same for the validation rows
  describe: tuple[str, ...] = ()  # lines the trainer prints at the start


class Task:
  """A training kind. Subclasses set `name` (by `register`) and implement `loss`."""
  name: ClassVar[str] = ''
  perplexity: ClassVar[bool] = False  # validation reports exp(val_ce)
  # The task makes each step's batch itself from the data iterator and the current params
  # (`make_batch`; RL: rollouts), rather than training on the iterator's rows as they are.
  makes_batches: ClassVar[bool] = False
  required_specials: tuple[str, ...] = ()  # special tokens the loss uses ('mask', ...)

  def __init__(self, cfg, model):
    self.cfg, self.model = cfg, model

  def with_model(self, model) -> 'Task':
    """The same task for another model (after growth)."""
    task = copy.copy(self)
    task.model = model
    return task

  # -- the batch ------------------------------------------------------------------------------
  def batch_fields(self) -> dict[str, Any]:
    """Field name -> dtype of the [B, L] arrays (the ROW_FIELDS: [B]) a batch holds."""
    return {k: jnp.int32 for k in TOKEN_FIELDS}

  def batch_spec(self, batch_size: int, seq_len: int, sharding=None) -> dict:
    shape = lambda k: (batch_size,) if k in ROW_FIELDS else (batch_size, seq_len)
    return {k: jax.ShapeDtypeStruct(shape(k), dtype, sharding=sharding)
            for k, dtype in self.batch_fields().items()}

  def check_batch(self, batch: dict) -> None:
    """A batch without a field the task needs is named before anything compiles."""
    missing = sorted(set(self.batch_fields()) - set(batch))
    if missing:
      raise ConfigError(f'task {self.name!r} needs batch fields {missing}; the batch has '
                        f'{sorted(batch)}')

  def make_batch(self, train_iter, *, step: int, params, aux=None) -> tuple[dict, dict]:
    """(the global batch of step `step`, host metrics to log with it), for `makes_batches`
    tasks; `params` are the whole model's (trained and frozen parts merged)."""
    raise NotImplementedError

  def tokens_per_step(self) -> int:
    """Tokens one optimizer step trains on (the loop's tokens/s and MFU): the batch's rows x
    their length unless the task's rows differ (RL: rollout rows of prompt + completion)."""
    return self.cfg.data.batch_size * self.cfg.data.seq_len

  def can_checkpoint(self, step: int) -> bool:
    """Whether the run may be saved after `step` (RL: only between rollout batches)."""
    del step
    return True

  def after_step(self, step: int, state, aux_args: tuple, *, fresh_opt_state: Callable,
                 workdir: str) -> tuple[Any, tuple, dict]:
    """(state, aux_args, metrics to log) after optimizer step `step`: a task may replace its
    frozen inputs and re-initialise the optimizer (`fresh_opt_state(params)`; ProRL's reference
    resets). Unchanged by default."""
    del step, fresh_opt_state, workdir
    return state, aux_args, {}

  def callbacks(self) -> list[tuple[int, Callable]]:
    """[(every, fn(step, params) -> metrics)]: the task's own evaluations during training,
    run by the loop as its `Callback`s (after `setup`)."""
    return []

  # -- frozen inputs ------------------------------------------------------------------------
  def setup(self, run: RunContext) -> FrozenInputs:
    del run
    return FrozenInputs()

  def abstract_frozen(self, mesh, rules) -> FrozenInputs:
    """The frozen inputs as shapes with shardings, for the dry run (nothing is read)."""
    del mesh, rules
    return FrozenInputs()

  # -- the loss -------------------------------------------------------------------------------
  def loss(self, params, batch: dict, key: jax.Array, aux: Any = None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError

  def eval_loss(self, params, batch: dict, key: jax.Array, aux: Any = None):
    """What validation measures; the training loss unless a task says otherwise."""
    return self.loss(params, batch, key, aux)

  def describe(self) -> str:
    return self.name
