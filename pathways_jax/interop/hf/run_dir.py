"""HuggingFace directories <-> the project's run directories.

An imported model is a run directory like any trained one (config.json, the params as the
checkpoint of step 0, the tokenizer under WORKDIR/tokenizer), so sampling, evaluation, frozen
models and `train.init_from` take it as they take a run:

    python -m pathways_jax.interop.hf import --hf_dir=Llama-3.2-1B --workdir=runs/llama1b
    python -m pathways_jax.sample --workdir=runs/llama1b --prompt='The capital of France is'
    python -m pathways_jax.interop.hf export --workdir=runs/quickstart --out=hf/quickstart
    # PEFT LoRA adapters: on a base model as a LoRA run, and a LoRA run's adapters out.
    python -m pathways_jax.interop.hf import --hf_dir=Llama-3.2-1B --adapter_dir=my_adapter \
        --workdir=runs/llama1b_tuned
    python -m pathways_jax.interop.hf export-adapter --workdir=runs/lora --out=hf/lora_adapter
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp

from pathways_jax import config as config_lib
from pathways_jax import config_files
from pathways_jax import parallel
from pathways_jax.interop.hf import adapter
import pathways_jax.interop.hf.checkpoint as hf
import pathways_jax.interop.hf.config as hf_config

# What a run may choose for itself when it starts from another model: how it computes, not what.
# scan_layers too: the layers are stacked (or unstacked) as they load (load_init_params).
RUNTIME_FIELDS = ('dtype', 'param_dtype', 'remat', 'scan_layers', 'attention',
                  'causal_query_blocks', 'max_len', 'init_std', 'lora_rank', 'lora_alpha',
                  'lora_targets', 'lora_rslora', 'lora_dropout', 'lora_num_adapters')
# What a run may add to (or drop from) the model it starts from: a reward model's scalar head
# starts fresh on a source without one (load_init_params).
HEAD_FIELDS = ('scalar_head',)


def run_config(model_cfg: config_lib.ModelConfig, *, name: str, tokenizer_path: str = ''):
  """A run config (base_config) for `model_cfg`, with the HF tokenizer at `tokenizer_path`."""
  cfg = config_lib.base_config()
  cfg.name = name
  for k, v in dataclasses.asdict(model_cfg).items():
    cfg.model[k] = v
  cfg.objective = 'autoregressive' if model_cfg.causal else 'diffusion'
  if tokenizer_path:
    cfg.data.tokenizer = 'hf'
    cfg.data.tokenizer_path = tokenizer_path
  return cfg


def import_to_run(hf_dir: str, workdir: str, *, dtype: str = 'float32',
                  adapter_dir: str = '') -> str:
  """Writes `workdir`: config.json, checkpoints/0/state (params only), tokenizer/. With
  `adapter_dir` (a PEFT LoRA adapter of that model) the run is the LoRA model: its config has
  the adapter's model.lora_* and its params the adapters beside the base weights. Nothing is
  left behind if any step fails (the directory is built beside it and moved into place)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and os.listdir(workdir):
    raise hf.HFCheckpointError(f'{workdir} exists and is not empty; import into a new directory')
  params, model_cfg, tok = hf.load_pretrained(hf_dir, dtype=dtype)
  if adapter_dir:
    from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
    lora_params, lcfg = adapter.load_adapter(adapter_dir, model_cfg,
                                             model_type=hf.read_config(hf_dir).get('model_type'))
    params, model_cfg = lora.combine(params, lora_params), lcfg.apply_to(model_cfg)
    head = adapter.load_adapter_head(adapter_dir, model_cfg)
    if head is not None:  # a reward model's adapter: its head replaces the base's (or is added)
      params = dict(params, scalar_head={k: jax.numpy.asarray(v) for k, v in head.items()})
      model_cfg = model_cfg.replace(scalar_head=True)
  tmp = workdir + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    tokenizer_path = ''
    if tok is not None:
      os.makedirs(os.path.join(tmp, 'tokenizer'))
      tok.save(os.path.join(tmp, 'tokenizer'))
      for name in ('config.json', 'generation_config.json'):  # mask id, eos lists
        if os.path.isfile(os.path.join(hf_dir, name)):
          shutil.copy(os.path.join(hf_dir, name), os.path.join(tmp, 'tokenizer', name))
      tokenizer_path = os.path.join(workdir, 'tokenizer')
    cfg = run_config(model_cfg, name=f'import:{os.path.abspath(hf_dir)}',
                     tokenizer_path=tokenizer_path)
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))
    with open(os.path.join(tmp, 'imported_from.json'), 'w') as f:
      json.dump({'hf_dir': os.path.abspath(hf_dir), 'model_type': hf.read_config(hf_dir).get(
          'model_type'), 'dtype': dtype,
                 'adapter_dir': os.path.abspath(adapter_dir) if adapter_dir else None}, f, indent=2)
    state_dir = os.path.join(tmp, 'checkpoints', '0', 'state')
    ocp.PyTreeCheckpointer().save(state_dir, {'params': params})
    if os.path.exists(workdir):
      os.rmdir(workdir)  # empty (checked above)
    os.replace(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return workdir


def export_run(workdir: str, out_dir: str, *, step: int | None = None,
               model_type: str | None = None, dtype: str | None = None,
               adapter_index: int | None = None) -> str:
  """A run directory's params (checkpoint `step`, default the newest) as a HF directory (a reward
  model as `...ForSequenceClassification`: checkpoint.py's docstring). A LoRA
  run is written merged (W + scale * A @ B): the model it computes, without PEFT
  (`export_adapter` writes its adapters alone); a multi-LoRA run's adapter `adapter_index`. A
  QLoRA run's adapters are merged into the base it trained against, dequantised (as PEFT's
  merge_and_unload does on a 4-bit model); a run saved before QLoRA bases were stored
  quantised holds its float base, and merges into that."""
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  run_cfg = config_files.load_run_config(workdir)
  _check_adapter_index(workdir, run_cfg, adapter_index)
  fm = _load_run(workdir, step)
  params, model_cfg = fm.params, fm.model_cfg
  if model_cfg.lora_rank:
    base, adapters = lora.split(hf.unscanned(params, model_cfg))
    if adapter_index is not None:
      adapters, model_cfg = lora.select(adapters, adapter_index), model_cfg.replace(
          lora_num_adapters=1)
    params = lora.merge(base, adapters, lora.LoraConfig.of(model_cfg))
    model_cfg = model_cfg.replace(lora_rank=0)
  tok, pad = None, None
  if run_cfg.data.tokenizer == 'hf':
    tok = tokenizers.get_tokenizer(run_cfg.data)
  elif model_cfg.scalar_head:  # transformers finds a reward's last token by the pad id
    pad = getattr(tokenizers.get_tokenizer(run_cfg.data), 'pad_id', None)
    pad = pad if pad is not None and pad >= 0 else None
  return hf.save_pretrained(params, model_cfg, out_dir, tokenizer=tok,
                            model_type=model_type, dtype=dtype, pad_token_id=pad)


def export_adapter(workdir: str, out_dir: str, *, step: int | None = None,
                   base_model_name_or_path: str | None = None,
                   model_type: str | None = None, adapter_index: int | None = None) -> str:
  """A LoRA run's adapters (checkpoint `step`, default the newest) as a PEFT adapter directory.
  Its base_model_name_or_path: the argument, else the run's train.init_from. A multi-LoRA run
  (model.lora_num_adapters = K > 1) exports one adapter, `adapter_index` in [0, K)."""
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  run_cfg = config_files.load_run_config(workdir)
  if not run_cfg.model.get('lora_rank'):
    raise config_lib.ConfigError(f'{workdir} is not a LoRA run (model.lora_rank is 0): export '
                                 'its model with `export`')
  _check_adapter_index(workdir, run_cfg, adapter_index)
  fm = _load_run(workdir, step)
  _check_only_adapters_trained(workdir, run_cfg, fm.params)
  base, adapters = lora.split(fm.params)
  head = base.get('scalar_head')  # a reward model: written as PEFT's SEQ_CLS head
  model_cfg = fm.model_cfg
  if adapter_index is not None:
    adapters, model_cfg = lora.select(adapters, adapter_index), model_cfg.replace(
        lora_num_adapters=1)
  if base_model_name_or_path is None:
    base_model_name_or_path = run_cfg.train.get('init_from', '')
  return adapter.save_adapter(adapters, lora.LoraConfig.of(model_cfg), model_cfg, out_dir,
                              base_model_name_or_path=base_model_name_or_path,
                              model_type=model_type, head=head)


def _check_only_adapters_trained(workdir: str, run_cfg, params) -> None:
  """A LoRA run whose train.trainable also trained other params (the embedding, norm scales:
  docs/sft.md) would lose them in a PEFT adapter directory: refused, naming them."""
  import re  # pylint: disable=g-import-not-at-top
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import trainable  # pylint: disable=g-import-not-at-top
  pattern = run_cfg.train.get('trainable', '') or lora.LORA_PARAMS
  regex, adapters = re.compile(pattern), re.compile(lora.LORA_PARAMS)
  exported = lambda p: adapters.fullmatch(p) or p.startswith('scalar_head/')  # the head goes too
  others = [p for p in trainable.param_paths(params) if regex.fullmatch(p) and not exported(p)]
  if others:
    raise config_lib.ConfigError(
        f'{workdir} trained {", ".join(others[:6])}{" ..." if len(others) > 6 else ""} beside '
        f'its adapters (train.trainable={pattern!r}); a PEFT adapter directory here carries the '
        'adapters only: export the merged model with `export` instead')


def _check_adapter_index(workdir: str, run_cfg, adapter_index: int | None) -> None:
  """A multi-LoRA run (model.lora_num_adapters = K > 1) exports one adapter, named by index."""
  k = run_cfg.model.get('lora_num_adapters', 1) if run_cfg.model.get('lora_rank') else 1
  if k > 1 and adapter_index is None:
    raise config_lib.ConfigError(f'{workdir} trained {k} adapters (model.lora_num_adapters): '
                                 f'choose one with --adapter=k, k in [0, {k})')
  if k == 1 and adapter_index is not None:
    raise config_lib.ConfigError(f'--adapter={adapter_index}: {workdir} is not a multi-LoRA run '
                                 '(model.lora_num_adapters=1); leave --adapter out')
  if k > 1 and not 0 <= adapter_index < k:
    raise config_lib.ConfigError(f'--adapter={adapter_index} is not in [0, {k}) '
                                 f'({workdir} trained {k} adapters)')


def _load_run(workdir: str, step: int | None):
  from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((1,) * len(parallel.MESH_AXES), parallel.MESH_AXES,
                       devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(parallel.MESH_AXES))
  return frozen.load(workdir, mesh, parallel.DEFAULT_RULES, step=step)


def adopt_init_from(cfg) -> None:
  """Sets `cfg.model` to the architecture `train.init_from` holds (the run's runtime choices
  kept: init_model_config) and, unless `data.tokenizer_path` names one, the data section to
  that model's tokenizer: what a run starting from it trains. Only metadata is read."""
  start_cfg = init_model_config(cfg.train.init_from, cfg.model)
  for k, v in dataclasses.asdict(start_cfg).items():
    cfg.model[k] = v
  if not cfg.data.tokenizer_path:
    cfg.data.tokenizer, cfg.data.tokenizer_path = source_tokenizer(cfg.train.init_from)


def init_model_config(source: str, cfg_model) -> config_lib.ModelConfig:
  """The ModelConfig of `train.init_from` (a run directory or a HF directory), keeping the
  runtime choices (dtype, remat, attention backend, ...) of the run that starts from it."""
  if os.path.isfile(os.path.join(source, 'config.json')) and not os.path.isdir(
      os.path.join(source, 'checkpoints')):
    model_cfg = hf_config.model_config(hf.read_config(source))
  else:
    from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
    model_cfg = frozen.describe_model(source)
  keep = {k: cfg_model[k] for k in RUNTIME_FIELDS + HEAD_FIELDS if k in cfg_model}
  if not keep.get('max_len'):
    keep.pop('max_len', None)
  if model_cfg.causal and not cfg_model.causal:
    # AR -> diffusion adaptation: the run's attention, and whether it keeps the AR's next-token
    # head (model.shift_logits, as Dream and DiffuLLaMA do).
    keep.update(causal=False, shift_logits=bool(cfg_model.get('shift_logits', False)))
  elif not model_cfg.causal and cfg_model.causal:
    raise config_lib.ConfigError(
        f'train.init_from={source!r} holds a bidirectional (LLaDA) model but this run is causal: '
        'set config.model.causal=False to train it as a diffusion model')
  return model_cfg.replace(**keep)


def load_init_params(source: str, model, mesh, rules, *, transform=None):
  """`train.init_from`'s params for `model`, placed with the model's shardings on `mesh`.

  `transform(path, param)`, if given, is applied to each param as it is read, one at a time (a
  QLoRA run passes `qlora.LeafQuantizer`: its base lands quantised, never whole in float).
  """
  from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(source, 'checkpoints')):
    fm = frozen.load(source, mesh, rules, transform=transform)
    params, loaded_cfg = fm.params, fm.model_cfg
  else:
    params, loaded_cfg, _ = hf.load_pretrained(source, dtype=model.cfg.param_dtype, mesh=mesh,
                                               rules=rules, tokenizer=False, transform=transform)
  # Attention direction and logit shift change no parameter (init_model_config decides them).
  own = RUNTIME_FIELDS + HEAD_FIELDS
  arch = lambda c: dataclasses.replace(c, **{k: getattr(model.cfg, k)
                                             for k in own + ('causal', 'shift_logits')})
  if arch(loaded_cfg) != arch(model.cfg):
    diff = [f.name for f in dataclasses.fields(loaded_cfg)
            if getattr(loaded_cfg, f.name) != getattr(model.cfg, f.name)
            and f.name not in own]
    raise config_lib.ConfigError(f'train.init_from={source!r} holds another model (differs in '
                                 f'{diff})')
  params = _in_layer_layout(params, loaded_cfg, model, mesh, rules)
  params = _with_scalar_head(params, model, mesh, rules)
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  base, adapters = lora.split(params)
  if not model.cfg.lora_rank:
    return params
  lcfg, k = lora.LoraConfig.of(model.cfg), model.cfg.lora_num_adapters
  if not jax.tree_util.tree_leaves(adapters):
    # A LoRA run from a plain model: fresh adapters (B = 0: it starts as the source model);
    # K of them (multi-LoRA), each its own A.
    shapes = base
    if transform is not None:  # a quantised weight's adapters take the model's param dtype
      from pathways_jax.adapters import qlora  # pylint: disable=g-import-not-at-top
      shapes = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, model.cfg.param_dtype)
          if qlora.is_quantized(x) else x, base, is_leaf=qlora.is_quantized)
    if k == 1:
      adapters = lora.init(jax.random.key(0), shapes, lcfg)
    else:
      adapters = lora.stack([lora.init(jax.random.fold_in(jax.random.key(0), i), shapes, lcfg)
                             for i in range(k)], [lcfg] * k)[0]
    params = lora.combine(base, adapters)
  elif k > 1 and lora.num_adapters(adapters) == 1:
    # K adapters from a one-adapter LoRA run: each starts as its adapter.
    params = lora.combine(base, lora.stack([adapters] * k, [lcfg] * k)[0])
  return params


def _in_layer_layout(params, loaded_cfg, model, mesh, rules):
  """`params` in `model`'s layer layout: one stack under 'blocks' (scan_layers) or `blocks_i`.
  Stacked one weight at a time, each stack placed in the model's sharding of it, and `params`
  is emptied of the layers as they go (it is consumed), so the params are never held twice
  over (a QLoRA base's QArrays stack as they are: their per-layer scales are the stacked
  weight's)."""
  if loaded_cfg.scan_layers == model.cfg.scan_layers:
    return params
  if loaded_cfg.scan_layers:  # a scanned source, an unscanned run
    return hf.unscanned(params, loaded_cfg)
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
  _, shardings = frozen.abstract_params_and_shardings(model, mesh, rules)
  layers_spec = lambda path: traverse_util.flatten_dict(shardings['blocks'])[path].spec[0]
  layers = [traverse_util.flatten_dict(params.pop(f'blocks_{i}'))
            for i in range(loaded_cfg.num_layers)]
  stacked = {}
  for path in list(layers[0]):
    parts = [layer.pop(path) for layer in layers]

    def place(x, head=layers_spec(path)):  # the [layers] axis as the model shards it
      spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
      return NamedSharding(mesh, P(head, *spec))

    shard = jax.tree_util.tree_map(place, parts[0])
    stacked[path] = jax.jit(lambda *xs: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs),
                            out_shardings=shard)(*parts)
    del parts
  params['blocks'] = traverse_util.unflatten_dict(stacked)
  return params


def _with_scalar_head(params, model, mesh, rules):
  """`params` with the scalar head `model` has: a source's own head kept; none in the source:
  a fresh one (the model's init, key 0), placed with its sharding; a model without a head drops
  the source's."""
  params = dict(params)
  if not model.cfg.scalar_head:
    params.pop('scalar_head', None)
    return params
  if 'scalar_head' in params:
    return params
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pathways_jax.models.transformer import ScalarHead  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
  _, shardings = frozen.abstract_params_and_shardings(model, mesh, rules)
  head = nn.unbox(ScalarHead(model.cfg).init(jax.random.key(0),
                                             jnp.zeros((1, model.cfg.d_model)))['params'])
  params['scalar_head'] = jax.device_put(head, shardings['scalar_head'])
  return params


def source_tokenizer(source: str) -> tuple[str, str]:
  """(data.tokenizer, data.tokenizer_path) of the model `train.init_from` names: a HF directory's
  own tokenizer, or the tokenizer the source run used (a trained sentencepiece model: its
  cached file)."""
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(source, 'checkpoints')):
    return 'hf', source
  src = config_files.load_run_config(source)
  if src.data.tokenizer_path or src.data.tokenizer == 'byte':
    return src.data.tokenizer, src.data.tokenizer_path
  tok = tokenizers.get_tokenizer(src.data)
  return src.data.tokenizer, getattr(tok, 'path', '')
