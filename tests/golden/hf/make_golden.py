"""Golden files for `pathways_jax.interop.hf`: tiny random HF checkpoints and transformers' outputs.

Runs where torch and transformers are installed (`make golden-hf` makes `.venv-golden` for it); the
tests that read its output need neither. For each case it builds a tiny model from a transformers
config class, re-initialises every weight from a seeded generator, saves it with `save_pretrained`
(safetensors) into `tests/golden/hf/<case>/`, and writes `golden.npz` there:

  tokens         int32   [2, 320]            random ids in [0, vocab)
  logits         float32 [2, 320, vocab]     model(tokens).logits (float32, eval, no attention mask)
  greedy_prompt  int32   [1, 8]
  greedy_tokens  int32   [1, 8 + 24]         generate(prompt, max_new_tokens=24, do_sample=False),
                                             prompt included; plain argmax with EOS off (no stop, no
                                             min_new_tokens masking), so all 24 tokens are there
  greedy_logits  float32 [1, 24, vocab]      the logits each of those 24 greedy steps chose from

The weights are not HF's own init (std 0.02 everywhere gives near-uniform attention, where a wrong
RoPE or q/k mapping barely moves the logits): matrices are N(0, 1/fan_in) (q and k twice that
std, so attention is peaked and RoPE matters), embeddings N(0, 4/hidden), RMSNorm weights
1 + 0.1 N(0, 1), biases 0.1 N(0, 1). The greedy prompt is the one of 16 seeded candidates whose
smallest top-1/top-2 logit gap over the 24 steps is widest, so float noise cannot flip a choice.

Cases: `llama` (GQA, untied, default RoPE), `llama3_tied` (Llama-3.2 style: tied embeddings, the
'llama3' RoPE scaling with original_max_position_embeddings=64 so it matters within 320 tokens),
`qwen2` (q/k/v biases, tied like Qwen2.5-0.5B, saved in several shards with an index) and `qwen3`
(per-head q/k RMSNorm, head_dim 32 != hidden/heads, untied).

`llada` (only with --llada_code=DIR): LLaDA-8B's own remote code (GSAI-ML/LLaDA-8B-Base's
`modeling_llada.py` and `configuration_llada.py`, which transformers does not ship) computes it, so
DIR must hold those two files (not committed here; README.md says where they came from). They are
imported from DIR as a package (they import each other relatively). The config is LLaDA-8B-Base's
config.json with the sizes shrunk (GQA 4/2 heads, which their code repeats like `repeat_kv`) and
mask_token_id 127. Bidirectional attention, no greedy decoding: golden.npz has `tokens` and
`logits` only. Without --llada_code the case is skipped and an existing llada/ is left as it is.

config.json style. transformers >= 5 writes RoPE as one dict, `"rope_parameters": {"rope_type":
..., "rope_theta": ..., <scaling keys>}`, and no top-level `rope_theta`/`rope_scaling`;
transformers 4 writes `"rope_theta": <float>` and `"rope_scaling": null | {"rope_type": ...,
<scaling keys>}` (Hub checkpoints are mostly in that style); 4 also writes `torch_dtype` where 5
writes `dtype`. The committed files were made with transformers 5.25.0, so their config.json has
`rope_parameters` (checked: `make golden-hf` pins that version). For `llama` and `llama3_tied`
this script also writes `config.other_style.json`: the same config in whichever style the
installed transformers did NOT write (here the transformers 4 one), and checks that transformers
parses it to the same RoPE parameters. VERSIONS.json records the style written (`config_style`).

`peft/<case>/` (needs peft): LoRA adapters made by peft itself, written by make_golden_peft.py
(see its docstring).

`llama_rm/`, `qwen2_rm/`: reward models (transformers' ...ForSequenceClassification, num_labels=1)
on the `llama` and `qwen2` backbones; see RM_CASES below for what golden.npz holds.

Usage: python tests/golden/hf/make_golden.py [--out DIR] [--llada_code DIR] [--only CASES]
  (--out default: this file's directory; --only: a comma-separated subset, e.g. llama_rm)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import pathlib
import shutil
import sys
import types

import numpy as np
import safetensors
import torch
import transformers

import make_golden_peft  # beside this file

SEQ = 320
BATCH = 2
PROMPT = 8
NEW_TOKENS = 24
PROMPT_CANDIDATES = 16
TF_MAJOR = int(transformers.__version__.split('.')[0])


def rope_kwargs(theta: float, scaling: dict | None = None) -> dict:
  """Config kwargs for RoPE, in the installed transformers' own convention."""
  if TF_MAJOR >= 5:
    return {'rope_parameters': {'rope_type': 'default', 'rope_theta': theta, **(scaling or {})}}
  return {'rope_theta': theta, 'rope_scaling': scaling}


LLAMA3_SCALING = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                  'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, hidden_act='silu', max_position_embeddings=512)

CASES = {
    'llama': dict(
        cls='Llama', seed=1, other_style=True,
        config=dict(COMMON, intermediate_size=160, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, **rope_kwargs(10_000.0))),
    'llama3_tied': dict(
        cls='Llama', seed=2, other_style=True,
        config=dict(COMMON, intermediate_size=128, head_dim=16, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=[1, 2],
                    **rope_kwargs(500_000.0, LLAMA3_SCALING))),
    'qwen2': dict(
        cls='Qwen2', seed=3, max_shard_size='100KB',
        config=dict(COMMON, intermediate_size=160, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    bos_token_id=None, eos_token_id=3, use_sliding_window=False,
                    **rope_kwargs(1_000_000.0))),
    'qwen3': dict(
        cls='Qwen3', seed=4,
        config=dict(COMMON, intermediate_size=128, head_dim=32, rms_norm_eps=1e-6,
                    attention_bias=False, tie_word_embeddings=False, bos_token_id=None,
                    eos_token_id=3, use_sliding_window=False, **rope_kwargs(1_000_000.0))),
}


def init_weights(model: torch.nn.Module, seed: int) -> None:
  """Re-initialises every parameter (tied ones once) from a seeded generator; see the docstring."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # a tied lm_head shares embed_tokens' Parameter
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith(('norm.weight', 'ln_f.weight')):  # input/post_attention/final/q/k RMSNorm
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith('.bias'):
        p.copy_(0.1 * noise)
      elif name.endswith(('embed_tokens.weight', 'wte.weight')):  # (LLaDA's is wte)
        # [vocab, hidden]; as a tied lm_head: logits of a few units
        p.copy_(2.0 * noise / p.shape[1] ** 0.5)
      else:  # nn.Linear weight [out, in]
        gain = 2.0 if name.endswith(('q_proj.weight', 'k_proj.weight')) else 1.0
        p.copy_(gain * noise / p.shape[1] ** 0.5)


def build(case: dict, head: str = 'ForCausalLM', **config_extra) -> torch.nn.Module:
  cfg_cls = getattr(transformers, case['cls'] + 'Config')
  model_cls = getattr(transformers, case['cls'] + head)
  config = cfg_cls(**case['config'], **config_extra)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access  (the plain math)
  torch.manual_seed(case['seed'])
  model = model_cls(config).to(torch.float32).eval()
  init_weights(model, case['seed'])
  if config.tie_word_embeddings and head == 'ForCausalLM':
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model


def greedy(model, prompt: torch.Tensor):
  """Plain greedy decoding that never stops early.

  EOS must be off everywhere: min_new_tokens would instead mask the config's EOS id out of the
  choices (not plain greedy), and the model's own generation_config (EOS from config.json) is
  merged with the one passed here, so it goes too while generating.
  """
  saved = model.generation_config
  model.generation_config = transformers.GenerationConfig(
      do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
      bos_token_id=None, return_dict_in_generate=True, output_logits=True)
  try:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt))
  finally:
    model.generation_config = saved
  tokens = out.sequences
  assert tokens.shape == (1, PROMPT + NEW_TOKENS), tokens.shape
  step_logits = torch.stack(out.logits, dim=1).float()  # [1, NEW_TOKENS, vocab]
  return tokens, step_logits


def other_style(cfg: dict) -> dict:
  """config.json in the other transformers major's RoPE convention (see the module docstring)."""
  cfg = dict(cfg)
  if 'rope_parameters' in cfg:  # 5 -> 4
    params = dict(cfg.pop('rope_parameters'))
    cfg['rope_theta'] = params.pop('rope_theta')
    cfg['rope_scaling'] = None if params.get('rope_type', 'default') == 'default' else params
    if 'dtype' in cfg:
      cfg['torch_dtype'] = cfg.pop('dtype')
    cfg['transformers_version'] = '4.57.6'
  else:  # 4 -> 5
    params = dict(cfg.pop('rope_scaling', None) or {'rope_type': 'default'})
    params['rope_theta'] = cfg.pop('rope_theta')
    cfg['rope_parameters'] = params
    if 'torch_dtype' in cfg:
      cfg['dtype'] = cfg.pop('torch_dtype')
    cfg['transformers_version'] = '5.0.0'
  return cfg


def write_case(name: str, case: dict, out: pathlib.Path) -> dict:
  d = out / name
  if d.exists():
    shutil.rmtree(d)
  model = build(case)
  vocab = model.config.vocab_size

  rng = np.random.default_rng(1000 + case['seed'])
  tokens = rng.integers(0, vocab, size=(BATCH, SEQ), dtype=np.int32)
  prompts = rng.integers(0, vocab, size=(PROMPT_CANDIDATES, 1, PROMPT), dtype=np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float()
    runs = [(p, *greedy(model, torch.from_numpy(p).long())) for p in prompts]
    prompt, greedy_tokens, greedy_logits = max(runs, key=lambda r: _min_margin(r[2]))
    # The cached decode agrees with one full forward over the result (teacher forcing).
    full = model(greedy_tokens).logits[:, PROMPT - 1:-1].float()
    assert torch.equal(full.argmax(-1), greedy_tokens[:, PROMPT:]), name
    np.testing.assert_allclose(full.numpy(), greedy_logits.numpy(), atol=1e-4, rtol=1e-4)

  save_kwargs = {'safe_serialization': True} if TF_MAJOR < 5 else {}
  if 'max_shard_size' in case:
    save_kwargs['max_shard_size'] = case['max_shard_size']
  model.save_pretrained(d, **save_kwargs)

  np.savez_compressed(d / 'golden.npz', tokens=tokens, logits=logits.numpy().astype(np.float32),
           greedy_prompt=prompt, greedy_tokens=greedy_tokens.numpy().astype(np.int32),
           greedy_logits=greedy_logits.numpy().astype(np.float32))

  # What was saved reloads into the same logits (checks the files, the tie and the config).
  model_cls = type(model)
  reloaded = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation='eager').eval()
  with torch.no_grad():
    again = reloaded(torch.from_numpy(tokens).long()).logits.float()
  np.testing.assert_array_equal(again.numpy(), logits.numpy())

  config_json = json.loads((d / 'config.json').read_text())
  if case.get('other_style'):
    alt = other_style(config_json)
    (d / 'config.other_style.json').write_text(json.dumps(alt, indent=2, sort_keys=True) + '\n')
    alt_cfg = type(model.config).from_dict(alt)
    assert _rope_of(alt_cfg) == _rope_of(model.config), (_rope_of(alt_cfg), _rope_of(model.config))

  report = {'case': name, 'max_abs_logit': float(logits.abs().max()),
            'greedy_min_margin': _min_margin(greedy_logits), 'files': {}}
  if name == 'llama3_tied':  # the scaling must matter within SEQ tokens, or the case tests nothing
    plain = dict(case, config=dict(case['config'], **rope_kwargs(500_000.0)))
    with torch.no_grad():
      unscaled = build(plain)(torch.from_numpy(tokens).long()).logits.float()
    report['llama3_vs_default_rope_max_diff'] = float((unscaled - logits).abs().max())
    assert report['llama3_vs_default_rope_max_diff'] > 0.1, report
  for f in sorted(d.glob('*.safetensors')):
    with safetensors.safe_open(str(f), framework='np') as sf:
      report['files'][f.name] = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
  return report


def _rope_of(config) -> dict:
  if TF_MAJOR >= 5:
    return dict(config.rope_parameters)
  return {'rope_theta': config.rope_theta, **(config.rope_scaling or {})}


def _min_margin(step_logits: torch.Tensor) -> float:
  top2 = step_logits.topk(2, dim=-1).values
  return float((top2[..., 0] - top2[..., 1]).min())


# ------------------------------------------------------------------------------------------ llada

# LLaDA-8B-Base's config.json (GSAI-ML/LLaDA-8B-Base, transformers 4.46.3), less `auto_map` (its
# code is not saved here) and what LLADA_TINY overrides.
LLADA_8B_BASE_CONFIG = dict(
    activation_type='silu', alibi=False, alibi_bias_max=8.0, attention_dropout=0.0,
    attention_layer_norm=False, attention_layer_norm_with_affine=True, bias_for_layer_norm=False,
    block_group_size=1, block_type='llama', embedding_dropout=0.0, flash_attention=False,
    include_bias=False, include_qkv_bias=False, init_cutoff_factor=None, init_device='meta',
    init_fn='mitchell', init_std=0.02, input_emb_norm=False, layer_norm_type='rms',
    layer_norm_with_affine=True, multi_query_attention=None, precision='amp_bf16',
    residual_dropout=0.0, rms_norm_eps=1e-05, rope=True, rope_full_precision=True,
    rope_theta=500000.0, scale_logits=False, use_cache=False, weight_tying=False,
    d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, mlp_ratio=4,
    vocab_size=126464, embedding_size=126464, max_sequence_length=4096, eos_token_id=126081,
    pad_token_id=126081, mask_token_id=126336)
# mlp_ratio stays 4: mlp_hidden_size (160 = 2.5 * d_model) is what the model uses.
LLADA_TINY = dict(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=160,
                  vocab_size=128, embedding_size=128, max_sequence_length=512, eos_token_id=1,
                  pad_token_id=1, mask_token_id=127)
LLADA_SEED = 5
LLADA_FILES = ('configuration_llada.py', 'modeling_llada.py')
# sha256 of the files the committed llada/ was made with (README.md: where they came from).
LLADA_SHA256 = {
    'configuration_llada.py': 'c947a64d8b735affa69d5adeb416c83ce607c8925270884e4471ae11068e2bfe',
    'modeling_llada.py': '1eef56b9917a3283199183a1f969b149276b49bb321a806f7e20dcb52180224c',
}


def load_llada_code(code_dir: pathlib.Path):
  """(LLaDAConfig, LLaDAModelLM) from DIR's two files, imported as a package named llada_remote."""
  missing = [f for f in LLADA_FILES if not (code_dir / f).is_file()]
  if missing:
    raise SystemExit(f'--llada_code={code_dir}: {", ".join(missing)} not there')
  sha = {f: hashlib.sha256((code_dir / f).read_bytes()).hexdigest() for f in LLADA_FILES}
  if sha != LLADA_SHA256:
    print(f'WARNING: the LLaDA code in {code_dir} is not the revision the committed llada/ used: '
          f'{sha}')
  pkg = types.ModuleType('llada_remote')  # modeling_llada does `from .configuration_llada import`
  pkg.__path__ = [str(code_dir)]
  sys.modules['llada_remote'] = pkg
  dont_write = sys.dont_write_bytecode
  sys.dont_write_bytecode = True  # leave DIR as it is
  try:
    config_mod = importlib.import_module('llada_remote.configuration_llada')
    modeling_mod = importlib.import_module('llada_remote.modeling_llada')
  finally:
    sys.dont_write_bytecode = dont_write
  return config_mod.LLaDAConfig, modeling_mod.LLaDAModelLM, sha


def llada_expected_names(n_layers: int) -> set[str]:
  """The tensor names pathways_jax.interop.hf.checkpoint.tensor_map reads for model_type llada."""
  top = 'model.transformer.'
  names = {top + 'wte.weight', top + 'ln_f.weight', top + 'ff_out.weight'}
  for i in range(n_layers):
    names |= {f'{top}blocks.{i}.{m}.weight' for m in (
        'q_proj', 'k_proj', 'v_proj', 'attn_out', 'ff_proj', 'up_proj', 'ff_out', 'attn_norm',
        'ff_norm')}
  return names


def _llada_logits(model, tokens: np.ndarray) -> torch.Tensor:
  # use_cache/return_dict explicit: transformers 5 drops `use_cache` from the config object, and
  # their forward reads config.use_cache when it is not passed.
  out = model(torch.from_numpy(tokens).long(), use_cache=False, return_dict=True)
  return out.logits.float()


def write_llada(out: pathlib.Path, code_dir: pathlib.Path) -> dict:
  config_cls, model_cls, sha = load_llada_code(code_dir)
  d = out / 'llada'
  if d.exists():
    shutil.rmtree(d)
  config = config_cls(**dict(LLADA_8B_BASE_CONFIG, **LLADA_TINY))
  torch.manual_seed(LLADA_SEED)
  model = model_cls(config).to(torch.float32).eval()
  init_weights(model, LLADA_SEED)
  vocab = config.embedding_size

  rng = np.random.default_rng(1000 + LLADA_SEED)
  tokens = rng.integers(0, vocab, size=(BATCH, SEQ), dtype=np.int32)
  with torch.no_grad():
    logits = _llada_logits(model, tokens)
    # Bidirectional: changing the last token moves the logits at position 0.
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % vocab
    first_moved = float((_llada_logits(model, changed)[:, 0] - logits[:, 0]).abs().max())
  assert logits.shape == (BATCH, SEQ, vocab), logits.shape
  assert first_moved > 1e-3, first_moved

  model.save_pretrained(d, **({'safe_serialization': True} if TF_MAJOR < 5 else {}))
  np.savez_compressed(d / 'golden.npz', tokens=tokens, logits=logits.numpy().astype(np.float32))
  (d / 'llada_code.json').write_text(json.dumps(
      {'sha256': sha, 'transformers_version': transformers.__version__,
       'torch_version': torch.__version__}, indent=2, sort_keys=True) + '\n')

  # What was saved reloads into the same logits. Not via model_cls.from_pretrained: their class
  # never calls post_init(), which transformers 5's from_pretrained needs (all_tied_weights_keys).
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  reloaded = model_cls(config_cls.from_pretrained(d)).to(torch.float32).eval()
  reloaded.load_state_dict(load_file(str(d / 'model.safetensors')), strict=True)
  with torch.no_grad():
    again = _llada_logits(reloaded, tokens)
  np.testing.assert_array_equal(again.numpy(), logits.numpy())

  report = {'case': 'llada', 'max_abs_logit': float(logits.abs().max()),
            'first_position_moved_by_last_token': first_moved, 'files': {}}
  saved = set()
  for f in sorted(d.glob('*.safetensors')):
    with safetensors.safe_open(str(f), framework='np') as sf:
      report['files'][f.name] = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
      saved |= set(sf.keys())
  expected = llada_expected_names(config.n_layers)
  assert saved == expected, ('tensor names differ from what pathways_jax reads: saved only '
                             f'{sorted(saved - expected)}, read only {sorted(expected - saved)}')
  config_json = json.loads((d / 'config.json').read_text())
  assert config_json['mask_token_id'] == LLADA_TINY['mask_token_id'], config_json
  return report


# ------------------------------------------------------------------------------------------- peft


# Reward models: transformers' sequence-classification model (num_labels=1: a `score` Linear
# [1, hidden] without bias, no LM head) on two of the cases' backbones, `llama` (untied) and
# `qwen2` (tied, q/k/v biases). golden.npz: tokens int32 [2, RM_TOKENS] (ids never the pad id;
# row 1 ends in RM_PADDING pad ids), lengths int32 [2], rewards float32 [2] (the model's logits,
# read by transformers at each row's last non-pad token) and position_scores float32
# [2, RM_TOKENS] (the score Linear on the final-normed hidden state at every position).
RM_CASES = {'llama_rm': ('llama', 0), 'qwen2_rm': ('qwen2', 0)}  # case -> (backbone, pad id)
RM_TOKENS = 48
RM_PADDING = 12


def write_reward_model(name: str, out: pathlib.Path) -> dict:
  base, pad = RM_CASES[name]
  case = CASES[base]
  d = out / name
  if d.exists():
    shutil.rmtree(d)
  model = build(case, 'ForSequenceClassification', num_labels=1, pad_token_id=pad)
  assert not hasattr(model, 'lm_head') and tuple(model.score.weight.shape) == (
      1, model.config.hidden_size) and model.score.bias is None, model
  rng = np.random.default_rng(2000 + case['seed'])
  tokens = rng.integers(pad + 1, model.config.vocab_size, size=(2, RM_TOKENS), dtype=np.int32)
  lengths = np.array([RM_TOKENS, RM_TOKENS - RM_PADDING], np.int32)
  tokens[1, lengths[1]:] = pad
  with torch.no_grad():
    ids = torch.from_numpy(tokens).long()
    rewards = model(ids).logits[:, 0].float().numpy()
    hidden = model.model(ids).last_hidden_state.float()
    position_scores = (hidden @ model.score.weight.float().T)[..., 0].numpy()
  np.testing.assert_allclose(position_scores[np.arange(2), lengths - 1], rewards, atol=1e-5)
  model.save_pretrained(d, **({'safe_serialization': True} if TF_MAJOR < 5 else {}))
  np.savez_compressed(d / 'golden.npz', tokens=tokens, lengths=lengths,
                      rewards=rewards.astype(np.float32),
                      position_scores=position_scores.astype(np.float32))
  reloaded = type(model).from_pretrained(d, dtype=torch.float32, attn_implementation='eager')
  with torch.no_grad():
    again = reloaded.eval()(torch.from_numpy(tokens).long()).logits[:, 0].float().numpy()
  np.testing.assert_array_equal(again, rewards)
  report = {'case': name, 'rewards': [float(r) for r in rewards], 'files': {}}
  for f in sorted(d.glob('*.safetensors')):
    with safetensors.safe_open(str(f), framework='np') as sf:
      report['files'][f.name] = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
  return report


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=str(pathlib.Path(__file__).resolve().parent))
  parser.add_argument('--llada_code', default='',
                      help="directory with LLaDA-8B's modeling_llada.py and "
                      'configuration_llada.py; unset: the llada case is skipped (an existing '
                      'llada/ is kept)')
  parser.add_argument('--only', default='',
                      help="comma-separated cases to (re)write, e.g. 'llama_rm,qwen2_rm'; "
                      'unset: every case')
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  torch.use_deterministic_algorithms(True)
  only = {c for c in args.only.split(',') if c}
  unknown = only - set(CASES) - set(RM_CASES) - {'peft', 'peft_rm', 'llada'}
  if unknown:
    parser.error(f'--only: unknown cases {sorted(unknown)}')
  wanted = lambda case: not only or case in only

  reports = [write_case(name, case, out) for name, case in CASES.items() if wanted(name)]
  reports += [write_reward_model(name, out) for name in RM_CASES if wanted(name)]
  reports += make_golden_peft.write_peft(out, BATCH) if wanted('peft') else []
  reports += [make_golden_peft.write_peft_reward_model(out)] if wanted('peft_rm') else []
  if args.llada_code and wanted('llada'):
    reports.append(write_llada(out, pathlib.Path(args.llada_code).resolve()))
  else:
    print('llada: skipped (no --llada_code=DIR with LLaDA-8B\'s modeling_llada.py and '
          'configuration_llada.py); ' + ('kept the existing llada/' if (out / 'llada').exists()
                                         else 'there is no llada/'))
  style = ('rope_parameters (transformers 5)' if TF_MAJOR >= 5
           else 'rope_theta + rope_scaling (transformers 4)')
  versions = {'transformers_version': transformers.__version__,
              'torch_version': torch.__version__,
              'safetensors_version': safetensors.__version__,
              'numpy_version': np.__version__,
              'peft_version': importlib.import_module('peft').__version__,
              'config_style': style}
  (out / 'VERSIONS.json').write_text(json.dumps(versions, indent=2) + '\n')
  for r in reports:
    if 'rewards' in r:
      print(f"== {r['case']}: rewards {r['rewards']}")
    elif r['case'].startswith('peft/'):
      print(f"== {r['case']}: max |logit| {r['max_abs_logit']:.3f}, moved from the base by "
            f"{r['moved_from_base']:.3f}")
    elif r['case'] == 'llada':
      print(f"== llada: max |logit| {r['max_abs_logit']:.3f}, position 0 moved by the last token "
            f"{r['first_position_moved_by_last_token']:.4f}")
    else:
      print(f"== {r['case']}: max |logit| {r['max_abs_logit']:.3f}, smallest greedy margin "
            f"{r['greedy_min_margin']:.4f}" + (f", llama3 vs default RoPE max diff "
            f"{r['llama3_vs_default_rope_max_diff']:.3f}" if 'llama3_vs_default_rope_max_diff' in r
            else ''))
    for fname, keys in r['files'].items():
      print(f'   {fname}')
      for k, shape in keys.items():
        print(f'     {k:45s} {shape}')
  print(json.dumps(versions))


if __name__ == '__main__':
  main()
