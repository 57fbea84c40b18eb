"""Frozen models: a trained model loaded as an input of another run (a reference, a teacher, the
model to sample from), never trained there.

`load(run_dir, mesh, rules)` reads a run directory's params — only the params: the checkpoint's
optimizer moments, step counters and data-iterator state are never read (orbax partial restore) —
and places them directly in the shardings the logical-axis rules give on `mesh`, whatever mesh the
run was trained on. The model's config comes from the run's config.json, its vocabulary size from
the checkpoint itself (no tokenizer needed), and a run that grew mid-way (config.growth) loads as
the model its checkpoint holds.

Two models in one step are two param trees for the same kind of `apply`:
`frozen.model.apply({'params': frozen.params}, tokens_BL, ...)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pathways_jax import config as config_lib
from pathways_jax import config_files
from pathways_jax import parallel
from pathways_jax.models.transformer import Transformer
from pathways_jax.train import trainable as trainable_lib
from pathways_jax.train.checkpoint import FROZEN_PARAMS, CheckpointError, restore_frozen_params
from pathways_jax.train.state import example_adapter_ids


@dataclasses.dataclass(frozen=True)
class FrozenModel:
  run_dir: str
  step: int
  run_cfg: ml_collections.ConfigDict  # the run's config.json, over base_config()
  model_cfg: config_lib.ModelConfig
  model: Transformer
  params: Any  # placed with `shardings` on the mesh it was loaded for
  shardings: Any


def checkpoint_steps(run_dir: str) -> list[int]:
  """The steps of the complete checkpoints in a run directory, oldest first."""
  ckpt_dir = os.path.join(run_dir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir)
                if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, 'state')))


def _state_dir(run_dir: str, step: int | None) -> tuple[int, str]:
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise CheckpointError(f'{run_dir} holds no checkpoint ({os.path.join(run_dir, "checkpoints")} '
                          'has no step directory with a saved state)')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'{run_dir} has no checkpoint at step {step} (it has {steps})')
  # Absolute: orbax 0.12 reads no item metadata under a relative path (and refuses to restore
  # from one), which broke `--workdir=runs/quickstart`.
  return step, os.path.join(os.path.abspath(run_dir), 'checkpoints', str(step), 'state')


@contextlib.contextmanager
def _no_item_metadata_warning():
  """Reading one item of a step's composite checkpoint, orbax warns that the item has no step
  metadata (it sits one level up, in the step directory): expected here, so not shown."""
  quiet = lambda record: 'Metadata file does not exist' not in record.getMessage()
  absl_log = logging.getLogger('absl')
  absl_log.addFilter(quiet)
  try:
    yield
  finally:
    absl_log.removeFilter(quiet)


def _metadata(path: str):
  try:
    with _no_item_metadata_warning():
      return ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  except Exception as e:  # orbax raises many types; the user needs the path
    raise CheckpointError(f'{path} is not a readable checkpoint ({type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""})') from e


def _shapes(tree) -> dict:
  return _shapes_of_flat(trainable_lib.flat(tree))


def _frozen_shapes(frozen_dir: str | None) -> tuple[dict, bool]:
  """({path: shape} of the weights a frozen base stands for, whether it is held quantised). A
  QLoRA run saves its base quantised (adapters.qlora.for_storage): a weight is then a QArray's
  qvalue (its shape), scale and zero point."""
  if frozen_dir is None:
    return {}, False
  from pathways_jax.adapters import qlora  # pylint: disable=g-import-not-at-top
  flat = {p: m for p, m in trainable_lib.flat(_metadata(frozen_dir)).items() if m is not None}
  if not qlora.stored_quantized(flat):
    return _shapes_of_flat(flat), False
  parts = {p.rsplit('/', 1)[0] for p in flat if p.endswith('/qvalue')}
  shapes = {p: tuple(m.shape) for p, m in flat.items() if p.rsplit('/', 1)[0] not in parts}
  shapes.update({p: tuple(flat[p + '/qvalue'].shape) for p in parts})
  return shapes, True


def holds_quantized_base(run_dir: str) -> bool:
  """Whether a run directory's frozen params are a quantised base (a QLoRA run's)."""
  return _frozen_shapes(_frozen_dir(run_dir))[1]


def _shapes_of_flat(flat: dict) -> dict:
  return {path: tuple(m.shape) for path, m in flat.items()}


def _saved_param_shapes(state_dir: str) -> dict:
  """{path: shape} of the params the checkpoint holds, from its metadata (no array is read)."""
  meta = _metadata(state_dir)
  if not isinstance(meta, dict) or not isinstance(meta.get('params'), dict):
    keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
    raise CheckpointError(f'{state_dir} holds no params (its state has {keys})')
  return _shapes(meta['params'])


def _frozen_dir(run_dir: str) -> str | None:
  """Where a subset-trained run keeps the params it does not train (None for other runs)."""
  path = os.path.join(os.path.abspath(run_dir), FROZEN_PARAMS)  # absolute, as in _state_dir
  return path if os.path.isdir(path) else None


def model_config_of_run(run_cfg, step: int, saved_shapes: dict) -> config_lib.ModelConfig:
  """The ModelConfig of the params a run saved at `step` (the grown one once a growth happened)."""
  from pathways_jax.growth import in_run as growth_phase  # pylint: disable=g-import-not-at-top
  if 'embed' not in saved_shapes:
    raise CheckpointError(f'the checkpoint has no embedding table; params: {sorted(saved_shapes)}')
  vocab = saved_shapes['embed'][0]
  small = config_lib.ModelConfig.from_config(run_cfg.model, vocab_size=vocab)
  return growth_phase.Growth(run_cfg, small).model_cfg_at(step)


def abstract_params_and_shardings(model: Transformer, mesh, rules, example_BL=None):
  """Shapes and NamedShardings of a model's params on `mesh` under `rules` (nothing allocated)."""
  if example_BL is None:  # as many rows as devices: any batch sharding divides it
    example_BL = np.zeros((mesh.size, min(8, model.cfg.max_len)), np.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    ids = example_adapter_ids(model, example_BL)  # a multi-LoRA model needs them
    boxed = jax.eval_shape(lambda k: model.init(k, example_BL, adapter_ids_B=ids)['params'],
                           jax.random.key(0))
    shardings = parallel.logical_to_sharding(boxed, mesh, rules)
  return nn.unbox(boxed), shardings


def restore_params(state_dir: str, abstract_params, shardings):
  """Only the `params` subtree of a saved train state, placed with `shardings` (partial restore:
  no other array of the checkpoint is read)."""
  target = {'params': jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)}
  args = ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  try:
    with _no_item_metadata_warning():
      return ocp.PyTreeCheckpointer().restore(state_dir, args=args)['params']
  except Exception as e:  # orbax raises many types; the user needs the path
    raise CheckpointError(f'the params in {state_dir} could not be restored ({type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""})') from e


def _describe(run_dir: str, mesh, rules, step: int | None):
  run_cfg = config_files.load_run_config(run_dir)
  step, state_dir = _state_dir(run_dir, step)
  saved = _saved_param_shapes(state_dir)
  frozen_dir = _frozen_dir(run_dir)
  frozen_saved, _ = _frozen_shapes(frozen_dir)
  model_cfg = model_config_of_run(run_cfg, step, {**saved, **frozen_saved})
  model = Transformer(model_cfg)
  abstract, shardings = abstract_params_and_shardings(model, mesh, rules)
  want = _shapes(abstract)
  if want != {**saved, **frozen_saved}:
    diff = sorted(set(want.items()) ^ set({**saved, **frozen_saved}.items()))[:6]
    raise CheckpointError(f'the params in {state_dir} do not match the model its config.json '
                          f'describes (first differences, path and shape: {diff})')
  return run_cfg, step, state_dir, frozen_dir, set(saved), model_cfg, model, abstract, shardings


def describe_model(run_dir: str, step: int | None = None) -> config_lib.ModelConfig:
  """The ModelConfig of the params a run directory saved at `step` (default the newest); nothing
  but checkpoint metadata is read."""
  run_cfg = config_files.load_run_config(run_dir)
  step, state_dir = _state_dir(run_dir, step)
  frozen_dir = _frozen_dir(run_dir)
  saved = {**_saved_param_shapes(state_dir), **_frozen_shapes(frozen_dir)[0]}
  return model_config_of_run(run_cfg, step, saved)


def load(run_dir: str, mesh, rules, *, step: int | None = None, transform=None,
         keep_quantized: bool = False) -> FrozenModel:
  """The params of `run_dir`'s checkpoint `step` (default: the newest), sharded on `mesh`.

  A run that trained a subset (config.train.trainable) checkpoints only that subset; the params
  it froze come from its WORKDIR/frozen_params, and the two are merged. A QLoRA run saved its
  base quantised: it loads dequantised, in the model's param dtype (the weights that run trained
  against), or as the QArrays themselves with `keep_quantized` (for `qlora.quantized_model`).
  `transform(path, param)`, if given, is applied to each param as it is read, one at a time (a
  QLoRA run's `train.init_from`: the float base is never whole on the device).
  """
  (run_cfg, step, state_dir, frozen_dir, in_state, model_cfg, model, abstract,
   shardings) = _describe(run_dir, mesh, rules, step)
  qcfg = _stored_quant_config(run_dir, run_cfg, frozen_dir)
  keep = (lambda path: True) if frozen_dir is None else (lambda path: path in in_state)
  (trained, frozen), (trained_sh, frozen_sh) = (trainable_lib.partition(t, keep)
                                                for t in (abstract, shardings))
  target, target_sh = frozen, frozen_sh
  if qcfg is not None:
    from pathways_jax.adapters import qlora  # pylint: disable=g-import-not-at-top
    target, target_sh = qlora.storage_target(frozen, frozen_sh, qcfg)

  def held(part):  # a restored part of the frozen base as the caller wants it
    if qcfg is None:
      return part
    part = qlora.from_storage(part, qcfg)
    if keep_quantized:
      return part
    flat_a, flat_s = trainable_lib.flat(frozen), trainable_lib.flat(frozen_sh)
    keys = trainable_lib.flat(part)
    want = traverse_util.unflatten_dict({k: flat_a[k] for k in keys}, sep='/')
    want_sh = traverse_util.unflatten_dict({k: flat_s[k] for k in keys}, sep='/')
    return jax.jit(lambda q: jax.tree_util.tree_map(lambda x, a: x.astype(a.dtype),
                                                    qlora.dequantize_base(q), want),
                   out_shardings=want_sh)(part)

  if transform is None:
    params = restore_params(state_dir, trained, trained_sh)
    if frozen_dir is not None:
      params = trainable_lib.merge(params, held(restore_frozen_params(run_dir, target, target_sh)))
  else:
    out = {}
    for path, (restore, tree, sh) in _one_by_one(
        (lambda t, s: restore_params(state_dir, t, s), trained, trained_sh),
        (lambda t, s: held(restore_frozen_params(run_dir, t, s)), target, target_sh)):
      out[path] = transform(tuple(path.split('/')), trainable_lib.flat(restore(tree, sh))[path])
    params = traverse_util.unflatten_dict(out, sep='/')
  return FrozenModel(os.path.abspath(run_dir), step, run_cfg, model_cfg, model, params, shardings)


def _one_by_one(*parts):
  """(path, (restore, one-leaf tree, its shardings)) for every leaf of each (restore, tree,
  shardings) part: each param restored alone."""
  for restore, tree, sh in parts:
    flat_t, flat_s = trainable_lib.flat(tree), trainable_lib.flat(sh)
    for path in flat_t:
      one = lambda flat: traverse_util.unflatten_dict({path: flat[path]}, sep='/')
      yield path, (restore, one(flat_t), one(flat_s))


def _stored_quant_config(run_dir: str, run_cfg, frozen_dir: str | None):
  """The QuantConfig of a QLoRA run whose frozen base is saved quantised, else None (a run saved
  before QLoRA runs stored it so holds it in float, and is quantised where it is used)."""
  if not _frozen_shapes(frozen_dir)[1]:
    return None
  from pathways_jax.adapters import qlora  # pylint: disable=g-import-not-at-top
  qcfg = qlora.run_quant_config(run_cfg)
  if qcfg is None:
    raise CheckpointError(f'{frozen_dir} holds a quantised base, but {run_dir}/config.json sets '
                          'no model.lora_quantize to read it with')
  return qcfg


def load_abstract(run_dir: str, mesh, rules, *, step: int | None = None) -> FrozenModel:
  """`load` without reading any array: params are ShapeDtypeStructs carrying their shardings
  (for the dry run, and for compiling a step ahead of loading)."""
  run_cfg, step, _, _, _, model_cfg, model, abstract, shardings = _describe(run_dir, mesh, rules,
                                                                             step)
  params = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return FrozenModel(os.path.abspath(run_dir), step, run_cfg, model_cfg, model, params, shardings)
