"""HuggingFace `config.json` <-> `ModelConfig`, for the architectures the project imports.

Llama 2/3.x (`llama`), Qwen2/2.5 (`qwen2`: q/k/v biases), Qwen3 (`qwen3`: per-head q/k RMSNorm)
and LLaDA (`llada`: the OLMo-style config of GSAI-ML's LLaDA-8B checkpoints, bidirectional).
RoPE settings are read as transformers 4 writes them (`rope_theta`, `rope_scaling`) and as
transformers 5 does (`rope_parameters`).
"""
from __future__ import annotations

from typing import Any

from pathways_jax.config import ConfigError, ModelConfig

SUPPORTED = ('llama', 'qwen2', 'qwen3', 'llada')
LLADA_MASK_ID = 126336  # LLaDA-8B's mask token, when its config does not name one


class UnsupportedModel(ConfigError):
  """A config.json this importer cannot map (model type, RoPE variant, activation, ...)."""


def _rope(hf: dict) -> dict:
  """{rope_theta, rope_scaling, rope_scaling_factor, ...} from either transformers' convention."""
  params = hf.get('rope_parameters')
  if params is None:  # transformers 4: top-level theta, optional rope_scaling dict
    params = dict(hf.get('rope_scaling') or {})
    params.setdefault('rope_theta', hf.get('rope_theta', 10_000.0))
  elif 'rope_type' not in params and len(params) and all(isinstance(v, dict)
                                                          for v in params.values()):
    raise UnsupportedModel('rope_parameters per attention type (e.g. sliding/full) are not '
                           'supported')
  kind = params.get('rope_type', params.get('type', 'default')) or 'default'
  out = {'rope_theta': float(params.get('rope_theta', hf.get('rope_theta', 10_000.0)))}
  if kind == 'default':
    return out
  if kind == 'linear':
    return {**out, 'rope_scaling': 'linear', 'rope_scaling_factor': float(params['factor'])}
  if kind == 'llama3':
    return {**out, 'rope_scaling': 'llama3', 'rope_scaling_factor': float(params['factor']),
            'rope_low_freq_factor': float(params['low_freq_factor']),
            'rope_high_freq_factor': float(params['high_freq_factor']),
            'rope_original_max_len': int(params['original_max_position_embeddings'])}
  raise UnsupportedModel(f"RoPE type {kind!r} is not supported (supported: 'default', 'linear', "
                         "'llama3')")


# transformers writes config.json with only the values that differ from its config class's
# defaults (`use_diff`); these are the defaults of the keys read here (transformers 4.5x / 5.x).
_DEFAULTS = {
    'llama': dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                  max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10_000.0,
                  tie_word_embeddings=False, attention_bias=False, head_dim=None),
    'qwen2': dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10_000.0,
                  tie_word_embeddings=False, head_dim=None),
    'qwen3': dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10_000.0,
                  tie_word_embeddings=False, attention_bias=False, head_dim=128),
}


def is_reward_model(hf: dict) -> bool:
  """A `...ForSequenceClassification` config with one label (a reward model); several labels
  (a classifier) are refused."""
  archs = hf.get('architectures') or []
  if not any(a.endswith('ForSequenceClassification') for a in archs):
    return False
  labels = len(hf['id2label']) if hf.get('id2label') else int(hf.get('num_labels', 2))
  if labels != 1:
    raise UnsupportedModel(f'{archs[0]} with {labels} labels is a classifier; only reward models '
                           '(num_labels=1) are supported')
  return True


def model_config(hf: dict, **overrides) -> ModelConfig:
  """The ModelConfig that computes what `hf` (a parsed config.json) describes."""
  model_type = hf.get('model_type')
  if model_type not in SUPPORTED:
    raise UnsupportedModel(f'model_type {model_type!r} is not supported; supported: '
                           f'{", ".join(SUPPORTED)}')
  if model_type == 'llada':
    return _llada_model_config(hf, **overrides)
  overrides = {'scalar_head': is_reward_model(hf), **overrides}
  hf = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or
                                    k not in _DEFAULTS[model_type]}}
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise UnsupportedModel(f'hidden_act {act!r} is not supported (the model is SwiGLU: silu)')
  if hf.get('mlp_bias'):
    raise UnsupportedModel('mlp_bias=True is not supported')
  heads = int(hf['num_attention_heads'])
  d = int(hf['hidden_size'])
  head_dim = int(hf.get('head_dim') or d // heads)
  if model_type != 'qwen2' and hf.get('attention_bias'):
    raise UnsupportedModel(f'{model_type} with attention_bias=True (biases on q/k/v and o) is not '
                           'supported; Qwen2-style q/k/v biases are')
  qkv_bias = model_type == 'qwen2'
  values = dict(
      vocab_size=int(hf['vocab_size']), d_model=d, num_layers=int(hf['num_hidden_layers']),
      num_heads=heads, num_kv_heads=int(hf.get('num_key_value_heads') or heads),
      head_dim=head_dim if head_dim * heads != d else 0, mlp_dim=int(hf['intermediate_size']),
      max_len=int(hf.get('max_position_embeddings', 2048)), causal=True,
      tie_embeddings=bool(hf['tie_word_embeddings']),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), qkv_bias=qkv_bias,
      qk_norm=model_type == 'qwen3', **_rope(hf))
  return ModelConfig(**{**values, **overrides})


def _llada_model_config(hf: dict, **overrides) -> ModelConfig:
  if hf.get('block_type', 'llama') != 'llama':
    raise UnsupportedModel(f"LLaDA block_type {hf.get('block_type')!r} is not supported "
                           "(supported: 'llama')")
  if hf.get('include_bias') or hf.get('include_qkv_bias'):
    raise UnsupportedModel('LLaDA with biases is not supported')
  if hf.get('activation_type', 'silu') not in ('silu', 'swiglu'):
    raise UnsupportedModel(f"LLaDA activation_type {hf.get('activation_type')!r} is not supported")
  heads = int(hf['n_heads'])
  values = dict(
      vocab_size=int(hf.get('embedding_size') or hf['vocab_size']), d_model=int(hf['d_model']),
      num_layers=int(hf['n_layers']), num_heads=heads,
      num_kv_heads=int(hf.get('n_kv_heads') or heads), mlp_dim=int(hf['mlp_hidden_size']),
      max_len=int(hf.get('max_sequence_length', 4096)), causal=False,
      tie_embeddings=bool(hf.get('weight_tying', False)),
      norm_eps=float(hf.get('rms_norm_eps', 1e-5)), rope_theta=float(hf.get('rope_theta', 10_000.0)))
  return ModelConfig(**{**values, **overrides})


def hf_config(cfg: ModelConfig, model_type: str = 'llama', **extra: Any) -> dict:
  """A config.json (transformers 4 style, which transformers 5 reads too) for `cfg`."""
  if model_type not in SUPPORTED:
    raise UnsupportedModel(f'model_type {model_type!r} is not supported; supported: '
                           f'{", ".join(SUPPORTED)}')
  if cfg.shift_logits:
    raise UnsupportedModel('a model with shifted logits (an AR model adapted to diffusion, '
                           'model.shift_logits) has no HF format here: LLaDA reads each '
                           "position's own token")
  if model_type == 'llada':
    if cfg.qkv_bias or cfg.qk_norm or cfg.rope_scaling:
      raise UnsupportedModel('LLaDA checkpoints have no q/k/v biases, q/k norms or RoPE scaling')
    return {'model_type': 'llada', 'architectures': ['LLaDAModelLM'], 'block_type': 'llama',
            'd_model': cfg.d_model, 'n_heads': cfg.num_heads, 'n_kv_heads': cfg.num_kv_heads,
            'n_layers': cfg.num_layers, 'mlp_hidden_size': cfg.mlp_dim,
            'mlp_ratio': cfg.mlp_dim // cfg.d_model, 'vocab_size': cfg.vocab_size,
            'embedding_size': cfg.vocab_size, 'max_sequence_length': cfg.max_len,
            'rope': True, 'rope_theta': cfg.rope_theta, 'rms_norm_eps': cfg.norm_eps,
            'layer_norm_type': 'rms', 'activation_type': 'silu', 'weight_tying': cfg.tie_embeddings,
            'include_bias': False, 'include_qkv_bias': False, 'attention_layer_norm': False,
            'input_emb_norm': False, 'scale_logits': False, 'alibi': False, 'flash_attention': False,
            'use_cache': False, **extra}
  if not cfg.causal:
    raise UnsupportedModel(f"a bidirectional model exports as model_type 'llada', not "
                           f'{model_type!r}')
  if model_type == 'qwen3' and not cfg.qk_norm or model_type != 'qwen3' and cfg.qk_norm:
    raise UnsupportedModel("q/k norms are Qwen3's: export a qk_norm model as 'qwen3' (and only it)")
  arch = {'llama': 'Llama', 'qwen2': 'Qwen2', 'qwen3': 'Qwen3'}[model_type] + (
      'ForSequenceClassification' if cfg.scalar_head else 'ForCausalLM')
  out = {'model_type': model_type, 'architectures': [arch],
         'vocab_size': cfg.vocab_size, 'hidden_size': cfg.d_model,
         'num_hidden_layers': cfg.num_layers, 'num_attention_heads': cfg.num_heads,
         'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.dim_per_head,
         'intermediate_size': cfg.mlp_dim, 'max_position_embeddings': cfg.max_len,
         'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta,
         'tie_word_embeddings': cfg.tie_embeddings, 'torch_dtype': cfg.param_dtype,
         'use_cache': True, 'initializer_range': cfg.init_std}
  if (model_type == 'qwen2') != cfg.qkv_bias:
    raise UnsupportedModel("q/k/v biases are Qwen2's: export a qkv_bias model as 'qwen2' (and only "
                           'it)')
  if model_type != 'qwen2':
    out.update(attention_bias=False, mlp_bias=False)
  if cfg.scalar_head:  # one label: the reward
    out.update(id2label={'0': 'LABEL_0'}, label2id={'LABEL_0': 0})
  if cfg.rope_scaling == 'linear':
    out['rope_scaling'] = {'rope_type': 'linear', 'factor': cfg.rope_scaling_factor}
  elif cfg.rope_scaling == 'llama3':
    out['rope_scaling'] = {'rope_type': 'llama3', 'factor': cfg.rope_scaling_factor,
                           'low_freq_factor': cfg.rope_low_freq_factor,
                           'high_freq_factor': cfg.rope_high_freq_factor,
                           'original_max_position_embeddings': cfg.rope_original_max_len}
  else:
    out['rope_scaling'] = None
  out.update(extra)
  return out


def default_model_type(cfg: ModelConfig) -> str:
  """What a project model exports as: LLaDA if bidirectional, else Qwen3/Qwen2/Llama by features."""
  if not cfg.causal:
    return 'llada'
  if cfg.qk_norm:
    return 'qwen3'
  return 'qwen2' if cfg.qkv_bias else 'llama'
