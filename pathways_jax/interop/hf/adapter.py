"""PEFT LoRA adapter directories <-> the project's adapters (pathways_jax.adapters.lora).

    lora_params, lcfg = load_adapter('path/to/adapter', model_cfg)   # made by peft
    logits = Transformer(lcfg.apply_to(model_cfg)).apply(
        {'params': lora.combine(base_params, lora_params)}, tokens_BL)  # == PeftModel's
    save_adapter(lora_params, lcfg, model_cfg, 'out/adapter')        # PeftModel.from_pretrained

A PEFT adapter directory holds `adapter_config.json` (peft_type 'LORA', r, lora_alpha,
use_rslora, lora_dropout, target_modules, ...) and `adapter_model.safetensors` with two matrices
per adapted nn.Linear `M` of the base model (its HF name, checkpoint.tensor_map):

  PEFT (nn.Linear weights are [out, in])           here (models/transformer.py)
  base_model.model.M.lora_A.weight [r, in]          <w>_lora_a [*in, r]
  base_model.model.M.lora_B.weight [out, r]         <w>_lora_b [r, *out]

PEFT adds scale * B @ A to M's [out, in] weight, the transpose of our scale * A @ B on [in, out];
scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, as LoraConfig.scale. So A and B
are reshaped and transposed, never multiplied: an import -> export round trip is bit-exact.

Which weights carry adapters is read from the tensors themselves; `target_modules` is written
with PEFT's short names ('q_proj') where one selects exactly the adapted modules of that name,
and full module names otherwise (some layers only, or LLaDA's `ff_out`, also its LM head's name).
Only plain LoRA is read: DoRA, biases, per-module ranks, embedding adapters and
modules_to_save are named and refused.

A LoRA reward model's adapters are written with its trained head (`save_adapter(..., head=)`) as
PEFT writes a sequence-classification adapter: task_type 'SEQ_CLS', the head as the saved
module `base_model.model.score.weight` [1, D], to load on the base as
`AutoModelForSequenceClassification`; the head's bias, which PEFT's score has not, in the
safetensors file's metadata as `checkpoint.SCORE_BIAS_KEY` (adapter_config.json would make peft
warn about an unknown key; see checkpoint.py for what the bias means). Such an adapter (ours or
peft's) reads back as its LoRA matrices (`load_adapter`) and its head (`load_adapter_head`).
"""
from __future__ import annotations

import json
import os
import re

import jax
import numpy as np

from pathways_jax.adapters import lora
from pathways_jax.config import ModelConfig
import pathways_jax.interop.hf.checkpoint as checkpoint
import pathways_jax.interop.hf.config as hf_config

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
_PREFIX = 'base_model.model.'  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)
_A, _B = '.lora_A.weight', '.lora_B.weight'
_SCORE = _PREFIX + 'score.weight'  # a SEQ_CLS adapter's head (its modules_to_save)
_SEQ_CLS_MODULES = {'classifier', 'score'}  # what peft saves in full for SEQ_CLS

# adapter_config.json keys whose non-empty value is something other than plain LoRA.
_NOT_PLAIN = (('use_dora', 'DoRA'), ('lora_bias', 'LoRA biases'),
              ('fan_in_fan_out', 'the Conv1D (GPT-2) weight layout'),
              ('modules_to_save', 'fully trained modules (modules_to_save)'),
              ('rank_pattern', 'per-module ranks (rank_pattern)'),
              ('alpha_pattern', 'per-module alphas (alpha_pattern)'),
              ('layer_replication', 'layer replication'),
              ('trainable_token_indices', 'trained token embeddings'),
              ('target_parameters', 'adapters on parameters (target_parameters)'),
              ('use_qalora', 'QALoRA'), ('alora_invocation_tokens', 'activated LoRA'),
              ('use_bdlora', 'BD-LoRA'))


class AdapterError(checkpoint.HFCheckpointError):
  """A PEFT adapter directory that cannot be read for, or written from, the given model."""


def _dense(model_cfg: ModelConfig, model_type: str) -> list:
  """The adaptable weights (checkpoint.MappedTensor: our path, HF name), in the model's order."""
  return [t for t in checkpoint.tensor_map(model_cfg, model_type)
          if '/'.join(t.path[-2:]) in lora.DENSE]


def _module(t) -> str:
  return t.name[:-len('.weight')]


def _target_modules(adapted: list[str], model_cfg: ModelConfig, model_type: str) -> list[str]:
  """PEFT's target_modules for exactly the `adapted` modules. PEFT adapts a module whose name
  equals an entry or ends with '.' + the entry: a short name ('q_proj') where it selects just
  the adapted modules of that name, else their full names (some layers only; LLaDA's 'ff_out',
  which would also select its LM head)."""
  linear = [_module(t) for t in checkpoint.tensor_map(model_cfg, model_type)
            if len(t.hf_shape) == 2 and t.path != ('embed',)]
  out = []
  for short in dict.fromkeys(m.rsplit('.', 1)[-1] for m in adapted):  # in the model's order
    these = [m for m in adapted if m.rsplit('.', 1)[-1] == short]
    selected = {m for m in linear if m == short or m.endswith('.' + short)}
    out += [short] if selected == set(these) else these
  return out


def _targets_regex(paths: list[str], model_cfg: ModelConfig) -> str:
  """A LoraConfig.targets that selects exactly `paths` ('blocks_0/attn/wq', ...)."""
  every = [f'blocks_{i}/{w}' for i in range(model_cfg.num_layers) for w in lora.DENSE]
  if set(paths) == set(every):
    return 'all-linear'
  per_layer = {w for w in lora.DENSE if f'blocks_0/{w}' in paths}
  if set(paths) == {f'blocks_{i}/{w}' for i in range(model_cfg.num_layers) for w in per_layer}:
    return '|'.join(f'{w}$' for w in sorted(per_layer))
  return '^(' + '|'.join(sorted(paths)) + ')$'


def _selected(model_cfg: ModelConfig, lcfg: lora.LoraConfig) -> list[str]:
  return lora.model_target_paths(lcfg.apply_to(model_cfg).replace(scan_layers=False))


# ------------------------------------------------------------------------------------- export

def _our_adapters(lora_params, lcfg: lora.LoraConfig, model_cfg: ModelConfig) -> dict:
  """{weight path tuple: (A, B)} of unscanned adapters, each checked against the model."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(checkpoint.unscanned(jax.device_get(lora_params), model_cfg))
  shapes = lora.weight_shapes(model_cfg)
  found = {}
  for path in sorted(flat):
    name = '/'.join(path)
    if not path[-1].endswith(('_lora_a', '_lora_b')):
      raise AdapterError(f'{name} is not an adapter param (pass the adapters alone: '
                         'lora.split(params)[1])')
    weight = path[:-1] + (path[-1][:-len('_lora_a')],)
    if (len(weight) != 3 or not re.fullmatch(r'blocks_\d+', weight[0]) or
        int(weight[0][len('blocks_'):]) >= model_cfg.num_layers or
        '/'.join(weight[1:]) not in lora.DENSE):
      raise AdapterError(f'adapter param {name} adapts {"/".join(weight)}, which this model '
                         f'({model_cfg.num_layers} layers) does not have')
    in_shape, out_shape = shapes[weight[-1]]
    want = ((*in_shape, lcfg.rank) if path[-1].endswith('_lora_a') else
            (lcfg.rank, *out_shape))
    x = np.asarray(flat[path])
    if x.shape != want:
      raise AdapterError(f'adapter param {name} has shape {x.shape}; this model at rank '
                         f'{lcfg.rank} needs {want}')
    found.setdefault(weight, {})[path[-1][-1]] = x
  for weight, ab in found.items():
    if set(ab) != {'a', 'b'}:
      raise AdapterError(f'adapter of {"/".join(weight)} has only its '
                         f'{"A" if "a" in ab else "B"} matrix')
  if not found:
    raise AdapterError('no adapter params to save')
  have = sorted('/'.join(w) for w in found)
  chosen = _selected(model_cfg, lcfg)
  if have != sorted(chosen):
    raise AdapterError(f'the adapters cover {have[:4]}... but LoRA targets {lcfg.targets!r} '
                       f'select {sorted(chosen)[:4]}...: they are not the same weights')
  return {w: (ab['a'], ab['b']) for w, ab in found.items()}


def save_adapter(lora_params, lcfg: lora.LoraConfig, model_cfg: ModelConfig, out_dir: str, *,
                 base_model_name_or_path: str = '', model_type: str | None = None,
                 head: dict | None = None) -> str:
  """Writes `lora_params` (adapters of a `model_cfg` model, as lora.init / lora.split give
  them) as a PEFT LoRA adapter directory that `peft.PeftModel.from_pretrained` loads on the
  model `save_pretrained` exports. `head`: a reward model's trained `scalar_head` params
  (kernel [D], bias []), saved as PEFT saves a sequence-classification head (module
  docstring). Checked before anything is written; the directory is built beside `out_dir` and
  moved into place, so a failure leaves nothing behind."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model_type = model_type or hf_config.default_model_type(model_cfg)
  found = _our_adapters(lora_params, lcfg, model_cfg)
  r = lcfg.rank
  tensors, adapted = {}, []
  for t in _dense(model_cfg, model_type):
    if t.path not in found:
      continue
    a, b = found[t.path]
    n_out, n_in = t.hf_shape
    tensors[_PREFIX + _module(t) + _A] = np.ascontiguousarray(a.reshape(n_in, r).T)
    tensors[_PREFIX + _module(t) + _B] = np.ascontiguousarray(b.reshape(r, n_out).T)
    adapted.append(_module(t))
  if head is not None:
    if not model_cfg.causal:  # (a scalar_head model_cfg is refused so by tensor_map already)
      raise hf_config.UnsupportedModel('a bidirectional reward model has no HuggingFace class')
    kernel = np.asarray(head['kernel'], np.float32)
    if kernel.shape != (model_cfg.d_model,):
      raise AdapterError(f'head kernel has shape {kernel.shape}, not ({model_cfg.d_model},)')
    tensors[_PREFIX + 'score.weight'] = kernel.reshape(1, -1)
  alpha = float(lcfg.alpha)
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM' if head is None else 'SEQ_CLS',
      'base_model_name_or_path': base_model_name_or_path or None,
      'r': r, 'lora_alpha': int(alpha) if alpha.is_integer() else alpha,
      'use_rslora': bool(lcfg.rslora), 'lora_dropout': float(lcfg.dropout),
      'target_modules': _target_modules(adapted, model_cfg, model_type),
      'bias': 'none', 'fan_in_fan_out': False, 'use_dora': False, 'init_lora_weights': True,
      'inference_mode': True, 'modules_to_save': None, 'layers_to_transform': None,
      'layers_pattern': None, 'rank_pattern': {}, 'alpha_pattern': {}, 'revision': None}
  if head is not None:  # what peft writes for SEQ_CLS: the head trained in full beside the adapters
    config['modules_to_save'] = ['classifier', 'score']
  metadata = {'format': 'pt'}
  if head is not None:
    metadata[checkpoint.SCORE_BIAS_KEY] = repr(float(np.asarray(head['bias'])))
  with checkpoint.new_directory(out_dir, AdapterError) as tmp:
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata=metadata)
    with open(os.path.join(tmp, ADAPTER_CONFIG), 'w') as f:
      json.dump(config, f, indent=2)
  return os.path.abspath(out_dir)


# ------------------------------------------------------------------------------------- import

def read_adapter_config(adapter_dir: str) -> dict:
  """adapter_config.json of a plain PEFT LoRA adapter; anything else is named and refused."""
  path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise AdapterError(f'{adapter_dir} is not a PEFT adapter directory (no {ADAPTER_CONFIG})')
  try:
    with open(path) as f:
      config = json.load(f)
  except ValueError as e:
    raise AdapterError(f'{path} is not valid JSON: {e}') from None
  if config.get('peft_type') != 'LORA':
    raise AdapterError(f'{path}: peft_type {config.get("peft_type")!r} is not supported (only '
                       "'LORA')")
  seq_cls = config.get('task_type') == 'SEQ_CLS'
  for key, what in _NOT_PLAIN:
    if key == 'modules_to_save' and seq_cls and set(config.get(key) or ()) <= _SEQ_CLS_MODULES:
      continue  # a reward model's head: load_adapter_head
    if config.get(key):
      raise AdapterError(f'{path}: {what} ({key}={config[key]!r}) is not supported; only plain '
                         'LoRA adapters are read')
  if config.get('bias', 'none') != 'none':
    raise AdapterError(f'{path}: trained biases (bias={config["bias"]!r}) are not supported; '
                       "only plain LoRA adapters (bias 'none') are read")
  for key in ('r', 'lora_alpha'):
    if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
      raise AdapterError(f'{path}: {key}={config.get(key)!r} is not a positive number')
  return config


def load_adapter(adapter_dir: str, model_cfg: ModelConfig, *,
                 model_type: str | None = None) -> tuple[dict, lora.LoraConfig]:
  """(lora_params, lcfg) of a PEFT LoRA adapter directory for base model `model_cfg` (as
  `load_pretrained` gives it): `Transformer(lcfg.apply_to(model_cfg))` with
  `lora.combine(base_params, lora_params)` computes what PeftModel computes. An adapter made
  for another base model is named by its first tensor that does not fit this one."""
  config = read_adapter_config(adapter_dir)
  model_type = model_type or hf_config.default_model_type(model_cfg)
  path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  if not os.path.isfile(path):
    bin_note = (' (adapter_model.bin is not read: save it as safetensors)'
                if os.path.isfile(os.path.join(adapter_dir, 'adapter_model.bin')) else '')
    raise AdapterError(f'{adapter_dir} has no {ADAPTER_WEIGHTS}{bin_note}')
  entries = checkpoint.safetensors_header(path)
  shape = lambda key: tuple(entries[key]['shape'])
  r = int(config['r'])
  dense = _dense(model_cfg, model_type)
  by_module = {_module(t): t for t in dense}
  for key in sorted(entries):
    if key == _SCORE and config.get('task_type') == 'SEQ_CLS':
      continue  # the head: load_adapter_head
    if not (key.startswith(_PREFIX) and key.endswith((_A, _B))):
      raise AdapterError(f'{path}: tensor {key} is not the LoRA A or B matrix of a linear layer '
                         '(only plain LoRA is read)')
    module = key[len(_PREFIX):-len(_A)]
    if module not in by_module:
      raise AdapterError(f'adapter tensor {key} adapts {module}, which this model ({model_type}, '
                         f'{model_cfg.num_layers} layers) does not have: the adapter was made for '
                         'another base model')
  shapes = lora.weight_shapes(model_cfg)
  wanted, paths = {}, []
  for t in dense:  # the model's order: the first tensor that does not fit is named
    a_key, b_key = _PREFIX + _module(t) + _A, _PREFIX + _module(t) + _B
    if a_key not in entries and b_key not in entries:
      continue
    n_out, n_in = t.hf_shape
    for key, want in ((a_key, (r, n_in)), (b_key, (n_out, r))):
      if key not in entries:
        raise AdapterError(f'{path}: tensor {key} is missing (its pair is there)')
      if shape(key) != want:
        raise AdapterError(f'adapter tensor {key} has shape {list(shape(key))}; this model\'s '
                           f'{_module(t)} ({n_out} x {n_in}) at r={r} needs {list(want)}: the '
                           'adapter was made for another base model')
    wanted[a_key], wanted[b_key] = t, t
    paths.append('/'.join(t.path))
  if not paths:
    raise AdapterError(f'{path} holds no LoRA tensors')
  lcfg = lora.LoraConfig(rank=r, alpha=float(config['lora_alpha']),
                         targets=_targets_regex(paths, model_cfg),
                         rslora=bool(config.get('use_rslora', False)),
                         dropout=float(config.get('lora_dropout') or 0.0))
  assert sorted(_selected(model_cfg, lcfg)) == sorted(paths), lcfg.targets
  np_dtype = np.dtype(jax.numpy.dtype(model_cfg.param_dtype))
  tensors = checkpoint.SafetensorsDir(adapter_dir)
  flat = {}
  for key, x in tensors.read([k for k in entries if k in wanted]):
    t = wanted[key]
    in_shape, out_shape = shapes[t.path[-1]]
    if key.endswith(_A):  # [r, in] -> [*in, r]
      flat[t.path[:-1] + (t.path[-1] + '_lora_a',)] = x.T.reshape(*in_shape, r).astype(np_dtype)
    else:  # [out, r] -> [r, *out]
      flat[t.path[:-1] + (t.path[-1] + '_lora_b',)] = x.T.reshape(r, *out_shape).astype(np_dtype)
  return _layout(flat, model_cfg), lcfg


def load_adapter_head(adapter_dir: str, model_cfg: ModelConfig) -> dict | None:
  """A SEQ_CLS adapter's reward head as `scalar_head` params ({'kernel': [D], 'bias': []},
  float32; the bias from the file's metadata, 0 without it), or None for a plain adapter."""
  config = read_adapter_config(adapter_dir)
  path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  if config.get('task_type') != 'SEQ_CLS':
    return None
  entries = checkpoint.safetensors_header(path)
  if _SCORE not in entries:
    raise AdapterError(f'{path}: a SEQ_CLS adapter without {_SCORE} (its head); only reward '
                       'models (one label) are read')
  if tuple(entries[_SCORE]['shape']) != (1, model_cfg.d_model):
    raise AdapterError(f'{path}: {_SCORE} has shape {entries[_SCORE]["shape"]}, a reward head of '
                       f'this model is [1, {model_cfg.d_model}]')
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, 'np') as f:
    bias = (f.metadata() or {}).get(checkpoint.SCORE_BIAS_KEY, '0')
  try:
    bias = float(bias)
  except ValueError:
    bias = float('nan')
  if not np.isfinite(bias):
    raise AdapterError(f'{path}: metadata {checkpoint.SCORE_BIAS_KEY} is not a finite number')
  (_, kernel), = checkpoint.SafetensorsDir(adapter_dir).read([_SCORE])
  return {'kernel': np.asarray(kernel, np.float32).reshape(-1), 'bias': np.float32(bias)}


def _layout(flat: dict, model_cfg: ModelConfig) -> dict:
  """The nested adapters, stacked under 'blocks' for a scan_layers model (every layer must then
  carry the same adapters)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  if not model_cfg.scan_layers:
    return traverse_util.unflatten_dict(flat)
  per_layer = [{p[1:]: x for p, x in flat.items() if p[0] == f'blocks_{i}'}
               for i in range(model_cfg.num_layers)]
  if any(set(layer) != set(per_layer[0]) for layer in per_layer):
    raise AdapterError('a scan_layers model needs the same adapters in every layer; this adapter '
                       'adapts some layers only (load it with model.scan_layers=False)')
  stacked = {('blocks',) + p: np.stack([layer[p] for layer in per_layer]) for p in per_layer[0]}
  return traverse_util.unflatten_dict(stacked)
