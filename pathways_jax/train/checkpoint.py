"""Orbax checkpoints of the train state together with the data-iterator state.

Layout: WORKDIR/checkpoints/<step>/{state,data}. Saves are asynchronous (orbax writes to a temporary
directory and renames it when complete, so a crash mid-save never leaves a half checkpoint that
looks finished). Restoring takes the target shardings, so a checkpoint restores onto any mesh.
"""
from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))
    # An async save is not in all_steps() until it finishes: remember the step asked for.
    self._last_saved = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> None:
    """Saves step `step` (once: a second save of the same step, e.g. SIGTERM right after the
    periodic checkpoint, is a no-op; the state of a step is one state)."""
    if step in self.manager.all_steps() or step == self._last_saved:
      return
    self._last_saved = step
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, shardings, data_iterator=None):
    """Restores `state` (placed with `shardings`) and, if given, the iterator in place."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    items = {'state': ocp.args.StandardRestore(target)}
    other_count = None if data_iterator is None else self._data_state_of_other_count(step)
    if data_iterator is not None and other_count is None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; the user needs the path and step
      raise CheckpointError(
          f'checkpoint {os.path.join(self.directory, str(step))} could not be restored '
          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). It was left '
          'untouched: move it aside to resume from an earlier one, or use a new --workdir.') from e
    if other_count is not None:
      data_iterator.set_state(other_count)
    return restored['state']

  def _data_state_of_other_count(self, step: int):
    """The iterator state saved by a run with another process count, if that is what is there.

    grain names the file by process index and count. Our iterator state (the next global batch
    index) does not depend on either, so any process's file resumes a run on N processes.
    """
    data_dir = os.path.join(self.directory, str(step), 'data')
    mine = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if not os.path.isdir(data_dir) or os.path.exists(os.path.join(data_dir, mine)):
      return None
    saved = sorted(f for f in os.listdir(data_dir) if f.startswith('process_'))
    if not saved:
      return None
    with open(os.path.join(data_dir, saved[0])) as f:
      return json.load(f)

  def restore_params(self, step: int, abstract_state, shardings):
    """Only the params (sampling, evaluation, growth); the data iterator is not needed."""
    return self.restore(step, abstract_state, shardings).params

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_run_params(workdir: str, model, train_cfg, example_BL, mesh, rules,
                       step: int | None = None):
  """(step, params, param shardings) from a run directory's checkpoint `step` (default: the newest).

  For sampling, evaluation and reference models: the params land on `mesh` under `rules`, whatever
  mesh the run was trained on; the optimizer state is only described (by `train_cfg`), never read.
  """
  from pathways_jax.train import optimizer, state as state_lib  # pylint: disable=g-import-not-at-top,multiple-import
  ckpt = Checkpointer(workdir, keep=train_cfg.keep_checkpoints, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt.directory}')
    tx = optimizer.make_optimizer(train_cfg)
    abstract, shardings = state_lib.abstract_state_and_shardings(model, tx, example_BL, mesh, rules)
    params = ckpt.restore_params(step, abstract, shardings)
  finally:
    ckpt.close()
  return int(step), params, shardings.params


FROZEN_PARAMS = 'frozen_params'  # WORKDIR/frozen_params: the params a subset-trained run freezes


def save_frozen_params(workdir: str, params) -> None:
  """Saves the frozen part of a subset-trained run's params, once (train/trainable.py)."""
  save_params(os.path.join(os.path.abspath(workdir), FROZEN_PARAMS), params)


def save_params(path: str, params) -> None:
  """A param tree at `path` (orbax writes a temporary directory and renames it when done)."""
  ocp.PyTreeCheckpointer().save(os.path.abspath(path), params, force=True)


def restore_params(path: str, abstract, shardings):
  """The param tree `save_params` wrote at `path`, placed with `shardings`."""
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  try:
    return ocp.PyTreeCheckpointer().restore(
        os.path.abspath(path), args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  except Exception as e:  # orbax raises many types; the user needs the path
    raise CheckpointError(f'the params in {path} could not be restored ({type(e).__name__}: '
                          f'{e}); the directory is left as it is') from e


def saved_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in WORKDIR/checkpoints (read without orbax)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def restore_frozen_params(workdir: str, abstract, shardings):
  """The frozen params saved by `save_frozen_params`, placed with `shardings`: all of them, or
  the part of them `abstract` names (each param can be read alone)."""
  path = os.path.join(os.path.abspath(workdir), FROZEN_PARAMS)
  if not os.path.isdir(path):
    raise CheckpointError(f'{path} is missing: a run that trains a subset (config.train.trainable)'
                          ' keeps its frozen params there, and its checkpoints cannot resume '
                          'without them')
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  try:
    return ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
  except Exception as e:  # orbax raises many types; the user needs the path
    raise CheckpointError(f'the frozen params in {path} could not be restored '
                          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from e
