"""HuggingFace safetensors <-> params: tensor names, layouts, lazy sharded reading, export.

    params, model_cfg, tokenizer = load_pretrained('path/to/Llama-3.2-1B')
    logits_BLV = Transformer(model_cfg).apply({'params': params}, tokens_BL)  # == transformers'
    save_pretrained(params, model_cfg, 'out_dir', tokenizer=tokenizer)        # loads in transformers

Tensors are read one at a time from the (possibly sharded) safetensors files and, with a mesh,
placed slice by slice on the devices that hold them (`jax.make_array_from_callback`), so the host
holds at most one tensor of the checkpoint at a time, never the whole model. The layout:

  HF (Linear weights are [out, in])                   here (see models/transformer.py)
  model.embed_tokens.weight [V, D]                    embed [V, D]
  model.layers.i.self_attn.{q,k,v}_proj.weight         blocks_i/attn/w{q,k,v} [D, heads, head_dim]
  model.layers.i.self_attn.{q,k,v}_proj.bias (Qwen2)   blocks_i/attn/b{q,k,v} [heads, head_dim]
  model.layers.i.self_attn.{q,k}_norm.weight (Qwen3)   blocks_i/attn/{q,k}_norm/scale [head_dim]
  model.layers.i.self_attn.o_proj.weight               blocks_i/attn/wo [heads, head_dim, D]
  model.layers.i.mlp.{gate,up,down}_proj.weight        blocks_i/mlp/w_{gate,up,down}
  model.layers.i.{input,post_attention}_layernorm      blocks_i/{attn,mlp}_norm/scale
  model.norm.weight, lm_head.weight [V, D]             final_norm/scale, unembed [D, V]

A reward model (`model.scalar_head`) is transformers' `{Llama,Qwen2,Qwen3}ForSequenceClassification`
with num_labels=1: `score.weight` [1, D] is scalar_head/kernel [D]; it has no LM head. HF's score
Linear has no bias, so scalar_head/bias is written to config.json as `SCORE_BIAS_KEY` (transformers
keeps the key and ignores it: its rewards are ours minus that constant, the same preferences and
reward differences) and read back from there; an untied model's LM head (`unembed`, which the
reward does not read) is not exported and comes back as zeros.

LLaDA's names (OLMo's): model.transformer.wte, blocks.i.{q,k,v}_proj, attn_out, ff_proj (gate),
up_proj, ff_out (down), attn_norm, ff_norm, ln_f and the untied head model.transformer.ff_out.
Both use rotate-half RoPE on the head dimension as it is stored, so no permutation is needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.config import ModelConfig
import pathways_jax.interop.hf.config as hf_config
from pathways_jax.interop.hf.config import SUPPORTED, UnsupportedModel  # pylint: disable=unused-import
from pathways_jax.train.checkpoint import CheckpointError

# Tensors a checkpoint may carry that the model does not use.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)
# config.json key of a reward model's head bias (HF's score Linear has none): module docstring.
SCORE_BIAS_KEY = 'pathways_jax_score_bias'
# A reward model's params with no HF tensor: the head's bias (config.json) and an untied LM head.
_NOT_IN_SEQUENCE_CLASSIFICATION = (('scalar_head', 'bias'), ('unembed',))


class HFCheckpointError(CheckpointError):
  """A HuggingFace directory that cannot be read as the model its config.json describes."""


@dataclasses.dataclass(frozen=True)
class MappedTensor:
  """One of our params and the HF tensor it comes from, with the maps between the layouts."""
  path: tuple[str, ...]
  name: str
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _copy(path, name, shape):
  return MappedTensor(path, name, tuple(shape), lambda x: x, lambda x: x)


def _linear(path, name, d_in, out_shape):
  """HF Linear [out, in] <-> ours [in, *out_shape] (out_shape e.g. (heads, head_dim))."""
  out = int(np.prod(out_shape))
  return MappedTensor(path, name, (out, d_in), lambda w: w.T.reshape((d_in,) + tuple(out_shape)),
                 lambda w: w.reshape(d_in, out).T)


def _linear_from_heads(path, name, in_shape, d_out):
  """HF Linear [out, in] <-> ours [*in_shape, out] (o_proj: in_shape (heads, head_dim))."""
  n_in = int(np.prod(in_shape))
  return MappedTensor(path, name, (d_out, n_in), lambda w: w.T.reshape(tuple(in_shape) + (d_out,)),
                 lambda w: w.reshape(n_in, d_out).T)


def _bias(path, name, shape):
  n = int(np.prod(shape))
  return MappedTensor(path, name, (n,), lambda b: b.reshape(shape), lambda b: b.reshape(n))


def tensor_map(cfg: ModelConfig, model_type: str) -> list[MappedTensor]:
  """Every param of `Transformer(cfg)` (unscanned layout) and its tensor in a `model_type` file."""
  d, h, kh, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.mlp_dim
  v = cfg.vocab_size
  llada = model_type == 'llada'
  top = 'model.transformer.' if llada else 'model.'
  out = [_copy(('embed',), top + ('wte.weight' if llada else 'embed_tokens.weight'), (v, d)),
         _copy(('final_norm', 'scale'), top + ('ln_f.weight' if llada else 'norm.weight'), (d,))]
  if cfg.scalar_head:
    if llada:
      raise hf_config.UnsupportedModel('a bidirectional reward model has no HuggingFace class '
                                       '(LLaDA checkpoints are language models only)')
    out.append(MappedTensor(('scalar_head', 'kernel'), 'score.weight', (1, d),
                       lambda w: w.reshape(d), lambda k: k.reshape(1, d)))
  elif not cfg.tie_embeddings:
    out.append(_linear(('unembed',), 'model.transformer.ff_out.weight' if llada else
                       'lm_head.weight', d, (v,)))
  for i in range(cfg.num_layers):
    blk = f'blocks_{i}'
    if llada:
      p = f'model.transformer.blocks.{i}.'
      names = dict(q=p + 'q_proj', k=p + 'k_proj', v=p + 'v_proj', o=p + 'attn_out',
                   gate=p + 'ff_proj', up=p + 'up_proj', down=p + 'ff_out',
                   attn_norm=p + 'attn_norm', mlp_norm=p + 'ff_norm')
    else:
      p = f'model.layers.{i}.'
      names = dict(q=p + 'self_attn.q_proj', k=p + 'self_attn.k_proj', v=p + 'self_attn.v_proj',
                   o=p + 'self_attn.o_proj', gate=p + 'mlp.gate_proj', up=p + 'mlp.up_proj',
                   down=p + 'mlp.down_proj', attn_norm=p + 'input_layernorm',
                   mlp_norm=p + 'post_attention_layernorm', q_norm=p + 'self_attn.q_norm',
                   k_norm=p + 'self_attn.k_norm')
    out += [
        _linear((blk, 'attn', 'wq'), names['q'] + '.weight', d, (h, hd)),
        _linear((blk, 'attn', 'wk'), names['k'] + '.weight', d, (kh, hd)),
        _linear((blk, 'attn', 'wv'), names['v'] + '.weight', d, (kh, hd)),
        _linear_from_heads((blk, 'attn', 'wo'), names['o'] + '.weight', (h, hd), d),
        _linear((blk, 'mlp', 'w_gate'), names['gate'] + '.weight', d, (f,)),
        _linear((blk, 'mlp', 'w_up'), names['up'] + '.weight', d, (f,)),
        _linear((blk, 'mlp', 'w_down'), names['down'] + '.weight', f, (d,)),
        _copy((blk, 'attn_norm', 'scale'), names['attn_norm'] + '.weight', (d,)),
        _copy((blk, 'mlp_norm', 'scale'), names['mlp_norm'] + '.weight', (d,)),
    ]
    if cfg.qkv_bias:
      out += [_bias((blk, 'attn', 'bq'), names['q'] + '.bias', (h, hd)),
              _bias((blk, 'attn', 'bk'), names['k'] + '.bias', (kh, hd)),
              _bias((blk, 'attn', 'bv'), names['v'] + '.bias', (kh, hd))]
    if cfg.qk_norm:
      out += [_copy((blk, 'attn', 'q_norm', 'scale'), names['q_norm'] + '.weight', (hd,)),
              _copy((blk, 'attn', 'k_norm', 'scale'), names['k_norm'] + '.weight', (hd,))]
  return out


# ------------------------------------------------------------------------------ reading a directory

def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise HFCheckpointError(f'{hf_dir} is not a HuggingFace model directory (no config.json)')
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise HFCheckpointError(f'{path} is not valid JSON: {e}') from None


class SafetensorsDir:
  """The safetensors files of a directory (one file, or shards with their index).

  Names, shapes and offsets come from the files' headers; `read` reads one tensor at a time.
  """

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, 'model.safetensors.index.json')
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    else:
      files = sorted(n for n in os.listdir(hf_dir) if n.endswith('.safetensors'))
    if not files:
      raise HFCheckpointError(f'{hf_dir} holds no *.safetensors weights (PyTorch .bin files are '
                              'not read: convert them with transformers first)')
    self.hf_dir, self.where, self._shapes, self._entries = hf_dir, {}, {}, {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.isfile(path):
        raise HFCheckpointError(f'{path} is missing (named by model.safetensors.index.json)')
      for key, entry in safetensors_header(path).items():
        self.where[key] = name
        self._shapes[key] = tuple(entry['shape'])
        self._entries[key] = entry

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shapes[key]

  def read(self, keys) -> Iterator[tuple[str, np.ndarray]]:
    """(key, tensor) for `keys`, file by file, each read into its own buffer by its offsets in
    the header (not memory-mapped: a mapped file keeps every page it served resident, which
    would hold a whole shard in host memory while its tensors are placed)."""
    by_file: dict[str, list[str]] = {}
    for key in keys:
      by_file.setdefault(self.where[key], []).append(key)
    for name, names in sorted(by_file.items()):
      path = os.path.join(self.hf_dir, name)
      with open(path, 'rb') as f:
        data_start = 8 + int.from_bytes(f.read(8), 'little')
        for key in names:
          entry = self._entries[key]
          dtype = _DTYPES.get(entry['dtype'])
          if dtype is None:
            raise HFCheckpointError(f'{path}: tensor {key} has dtype {entry["dtype"]}, not one of '
                                    f'{sorted(_DTYPES)}')
          begin, end = entry['data_offsets']
          f.seek(data_start + begin)
          x = np.frombuffer(f.read(end - begin), dtype=dtype)
          yield key, x.reshape(entry['shape'])


def _dtypes() -> dict:
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (a JAX dependency)
  return {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}


_DTYPES = _dtypes()


def safetensors_header(path: str) -> dict:
  """The tensor entries of a safetensors file's header; a file cut short (an interrupted
  download) is named before any tensor is read."""
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise HFCheckpointError(f'{path} is truncated (no safetensors header)')
    n = int.from_bytes(head, 'little')
    try:
      header = json.loads(f.read(n))
    except ValueError:
      raise HFCheckpointError(f'{path} is truncated or not a safetensors file') from None
  entries = {k: v for k, v in header.items() if k != '__metadata__'}
  end = max((v['data_offsets'][1] for v in entries.values()), default=0)
  size = os.path.getsize(path)
  if size < 8 + n + end:
    raise HFCheckpointError(f'{path} is truncated: {size} bytes, its header describes '
                            f'{8 + n + end}')
  return entries


def _check_tensors(tensors: SafetensorsDir, spec: list[MappedTensor],
                   cfg: ModelConfig) -> None:
  want = {t.name: t.hf_shape for t in spec}
  missing = sorted(set(want) - set(tensors.where))
  if missing:
    raise HFCheckpointError(f'missing tensor {missing[0]} (expected shape {want[missing[0]]})'
                            + (f' and {len(missing) - 1} more' if len(missing) > 1 else ''))
  for name, shape in want.items():
    got = tensors.shape(name)
    if got != shape:
      raise HFCheckpointError(f'tensor {name} has shape {got}, the config says {shape}')
  ignored = lambda k: k.endswith(_IGNORED_SUFFIXES) or (
      cfg.tie_embeddings and not cfg.scalar_head and
      k in ('lm_head.weight', 'model.transformer.ff_out.weight'))
  extra = sorted(k for k in set(tensors.where) - set(want) if not ignored(k))
  if extra:
    raise HFCheckpointError(f'unexpected tensor {extra[0]} (shape {tensors.shape(extra[0])}) '
                            'that this model does not have' +
                            (f', and {len(extra) - 1} more' if len(extra) > 1 else ''))


def _place(x: np.ndarray, sharding, dtype) -> jax.Array:
  x = np.asarray(x).astype(dtype, copy=False)  # one tensor at a time: no copy it does not need
  if sharding is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.unflatten_dict(flat)


def load_pretrained(hf_dir: str, *, dtype: str = 'float32', mesh=None, rules=None,
                    tokenizer: bool = True, transform=None):
  """(params, model_cfg, tokenizer or None) of a local HuggingFace model directory.

  `dtype`: the params' dtype (and the model's `param_dtype`). With `mesh` (and `rules`, default
  `parallel.DEFAULT_RULES`) every param lands sharded by its logical axes. `transform(path,
  param)`, if given, is applied to each param as soon as it is placed, before the next tensor is
  read (a QLoRA run quantises its base so: adapters.qlora.LeafQuantizer).
  """
  hf = read_config(hf_dir)
  model_type = hf.get('model_type')
  cfg = hf_config.model_config(hf, param_dtype=dtype)
  tok = _tokenizer(hf_dir, hf, cfg) if tokenizer else None
  tensors = SafetensorsDir(hf_dir)
  spec = tensor_map(cfg, model_type)
  _check_tensors(tensors, spec, cfg)
  shardings = _shardings(cfg, mesh, rules)
  np_dtype = jnp.dtype(dtype)
  by_name = {t.name: t for t in spec}
  flat = {}
  place = lambda path, x, dt: _place(x, shardings.get(path) if shardings else None, dt)
  for name, x in tensors.read(by_name):
    t = by_name[name]
    x = t.to_ours(x)  # the file's layout is dropped before the param is placed
    # The reward head is float32 whatever the params' dtype (models/transformer.py).
    placed = place(t.path, x, np.float32 if t.path[0] == 'scalar_head' else np_dtype)
    del x  # and the host copy as soon as it is
    flat[t.path] = placed if transform is None else transform(t.path, placed)
    del placed
  if cfg.scalar_head:
    bias = hf.get(SCORE_BIAS_KEY, 0.0)
    if not isinstance(bias, (int, float)) or not np.isfinite(bias):
      raise HFCheckpointError(f'{hf_dir}/config.json: {SCORE_BIAS_KEY}={bias!r} is not a finite '
                              'number')
    flat[('scalar_head', 'bias')] = place(('scalar_head', 'bias'), np.float32(bias), np.float32)
    if not cfg.tie_embeddings:  # no LM head in the file; the reward never reads it
      flat[('unembed',)] = place(('unembed',), np.zeros((cfg.d_model, cfg.vocab_size)), np_dtype)
  return _nest(flat), cfg, tok


def _shardings(cfg: ModelConfig, mesh, rules) -> dict | None:
  if mesh is None:
    return None
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from pathways_jax import parallel  # pylint: disable=g-import-not-at-top
  from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
  _, shardings = frozen.abstract_params_and_shardings(Transformer(cfg), mesh,
                                                      rules or parallel.DEFAULT_RULES)
  return traverse_util.flatten_dict(shardings)


def _tokenizer(hf_dir: str, hf: dict, cfg: ModelConfig):
  """The directory's tokenizer (None without tokenizer.json); its specials must match config."""
  if not os.path.isfile(os.path.join(hf_dir, 'tokenizer.json')):
    return None
  from pathways_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
  tok = hf_tokenizer.HFTokenizer.from_path(hf_dir)
  for key, attr in (('bos_token_id', 'bos_id'), ('eos_token_id', 'eos_id'),
                    ('pad_token_id', 'pad_id'), ('mask_token_id', 'mask_id')):
    want = hf.get(key)
    got = getattr(tok, attr, None)
    if isinstance(want, list):  # Llama 3 instruct: several eos ids
      ok = got is None or got in want or got < 0
    else:
      ok = want is None or got is None or got < 0 or got == want
    if not ok:
      raise HFCheckpointError(f'the tokenizer in {hf_dir} has {attr}={got}, config.json says '
                              f'{key}={want}')
  if tok.vocab_size > cfg.vocab_size:
    raise HFCheckpointError(f'the tokenizer has {tok.vocab_size} tokens, the model only '
                            f'{cfg.vocab_size}')
  return tok


# ------------------------------------------------------------------------------------ writing

def unscanned(params, cfg: ModelConfig) -> dict:
  """`blocks_i/...` layout of params saved with scan_layers (a leading [layers] axis)."""
  if 'blocks' not in params:
    return params
  out = {k: v for k, v in params.items() if k != 'blocks'}
  for i in range(cfg.num_layers):
    out[f'blocks_{i}'] = jax.tree_util.tree_map(lambda x, i=i: x[i], params['blocks'])
  return out


def save_pretrained(params, model_cfg: ModelConfig, out_dir: str, *, tokenizer=None,
                    model_type: str | None = None, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30, pad_token_id: int | None = None) -> str:
  """Writes a HuggingFace directory (config.json, safetensors shards + index, tokenizer files).

  `model_type` defaults to what the model is: 'llada' if bidirectional, else 'qwen3' (q/k
  norms), 'qwen2' (q/k/v biases) or 'llama'. The directory is written beside `out_dir` and moved
  into place at the end, so a failure leaves nothing behind. `pad_token_id` (default: the
  tokenizer's) matters to a reward model: transformers finds each row's last token by it, and
  scores one row at a time without it.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if model_cfg.scalar_head != ('scalar_head' in params):
    raise HFCheckpointError(f'model.scalar_head={model_cfg.scalar_head} but the params '
                            f'{"lack" if model_cfg.scalar_head else "have"} a scalar_head')
  model_type = model_type or hf_config.default_model_type(model_cfg)
  extra = {}
  if tokenizer is not None:
    for key, attr in (('bos_token_id', 'bos_id'), ('eos_token_id', 'eos_id'),
                      ('pad_token_id', 'pad_id'), ('mask_token_id', 'mask_id')):
      value = getattr(tokenizer, attr, None)
      if value is not None and value >= 0 and (key != 'mask_token_id' or model_type == 'llada'):
        extra[key] = int(value)
  if pad_token_id is not None:
    if not 0 <= int(pad_token_id) < model_cfg.vocab_size:
      raise HFCheckpointError(f'pad_token_id={pad_token_id} is not a token id of this model '
                              f'(vocab {model_cfg.vocab_size})')
    extra['pad_token_id'] = int(pad_token_id)
  if model_cfg.scalar_head and 'pad_token_id' not in extra:
    logging.warning('exporting a reward model without a pad_token_id: transformers will score '
                    'one sequence at a time (pass pad_token_id= or a tokenizer that has one)')
  config = hf_config.hf_config(model_cfg, model_type, **extra)
  if dtype:
    config['torch_dtype'] = dtype
  flat = traverse_util.flatten_dict(unscanned(jax.device_get(params), model_cfg))
  spec = tensor_map(model_cfg, model_type)
  if model_cfg.scalar_head:  # module docstring: the bias goes to config.json, the LM head nowhere
    config[SCORE_BIAS_KEY] = float(np.asarray(flat[('scalar_head', 'bias')]))
    for path in _NOT_IN_SEQUENCE_CLASSIFICATION:
      flat.pop(path, None)
  if set(flat) != {t.path for t in spec}:
    diff = sorted(set(flat) ^ {t.path for t in spec})[:4]
    raise HFCheckpointError(f'the params do not match the model config (first differences: '
                            f'{["/".join(p) for p in diff]})')
  with new_directory(out_dir, HFCheckpointError) as tmp:
    np_dtype = jnp.dtype(dtype) if dtype else None
    shards, current, size = [], {}, 0
    for t in spec:
      x = np.ascontiguousarray(t.to_hf(np.asarray(flat[t.path])))
      if np_dtype is not None:
        x = x.astype(np_dtype)
      if current and size + x.nbytes > max_shard_bytes:
        shards.append(current)
        current, size = {}, 0
      current[t.name] = x
      size += x.nbytes
    shards.append(current)
    if len(shards) == 1:
      save_file(shards[0], os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    else:
      weight_map, total = {}, 0
      for k, shard in enumerate(shards):
        name = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
        save_file(shard, os.path.join(tmp, name), metadata={'format': 'pt'})
        for key, x in shard.items():
          weight_map[key] = name
          total += x.nbytes
      with open(os.path.join(tmp, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    if tokenizer is not None and hasattr(tokenizer, 'save'):
      tokenizer.save(tmp)
  return os.path.abspath(out_dir)


@contextlib.contextmanager
def new_directory(out_dir: str, error_cls: type[Exception]):
  """Yields OUT_DIR.partial to write into; renamed to `out_dir` when the block succeeds, removed
  when it fails, so an export is never half written. `out_dir` must not exist."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise error_cls(f'{out_dir} exists; export into a new directory')
  tmp = out_dir + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
