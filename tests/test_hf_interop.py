"""HuggingFace import/export (`pathways_jax.interop.hf`): layouts, round trips and bad input.

Logits against transformers itself are checked on golden files in tests/test_hf_golden.py."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from pathways_jax.config import ModelConfig
from pathways_jax.interop import hf
from pathways_jax.interop.hf import config as hf_config
from pathways_jax.interop.hf.__main__ import main as hf_main
from pathways_jax.models import attention
from pathways_jax.models.transformer import Transformer

TINY = dict(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
            max_len=128)
CASES = {
    'llama': dict(tie_embeddings=False),
    'llama3': dict(tie_embeddings=True, rope_theta=500_000.0, rope_scaling='llama3',
                   rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_len=32),
    'qwen2': dict(qkv_bias=True, tie_embeddings=True),
    'qwen3': dict(qk_norm=True, head_dim=16, tie_embeddings=False),
    'llada': dict(causal=False, tie_embeddings=False),
}


def _random_params(cfg, seed=0):
  params = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))['params']
  import flax.linen as nn
  params = nn.unbox(params)
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  # Every leaf random (norm scales and biases too), so a wrong mapping shows in the logits.
  return jax.tree_util.tree_unflatten(tree, [0.5 * jax.random.normal(k, x.shape) for k, x in
                                             zip(keys, leaves)])


@pytest.mark.parametrize('case', sorted(CASES))
def test_export_then_import_gives_the_same_params_and_logits(tmp_path, case):
  cfg = ModelConfig(**{**TINY, **CASES[case]})
  params = _random_params(cfg)
  out = hf.save_pretrained(params, cfg, str(tmp_path / 'hf'))
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['model_type'] == ('llama' if case.startswith('llama') else case)
  back, cfg_back, tok = hf.load_pretrained(out)
  assert tok is None
  assert cfg_back.replace(max_len=cfg.max_len) == cfg
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(back)


def test_the_tensor_names_and_layouts_of_each_family():
  cfg = ModelConfig(**{**TINY, **CASES['qwen2']})
  names = {t.name: t.hf_shape for t in hf.tensor_map(cfg, 'qwen2')}
  assert names['model.layers.0.self_attn.q_proj.weight'] == (32, 32)
  assert names['model.layers.1.self_attn.k_proj.bias'] == (16,)
  assert names['model.layers.0.self_attn.o_proj.weight'] == (32, 32)
  assert names['model.layers.0.mlp.down_proj.weight'] == (32, 48)
  assert 'lm_head.weight' not in names  # tied
  llada = {t.name for t in hf.tensor_map(ModelConfig(**{**TINY, **CASES['llada']}), 'llada')}
  assert {'model.transformer.wte.weight', 'model.transformer.ff_out.weight',
          'model.transformer.blocks.1.attn_out.weight', 'model.transformer.blocks.0.ff_proj.weight',
          'model.transformer.blocks.0.up_proj.weight', 'model.transformer.ln_f.weight'} <= llada
  # HF Linear [out, in]: q = x @ W.T; ours: q = x @ wq.reshape(D, H * hd).
  x = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
  w_hf = np.random.default_rng(1).normal(size=(16, 32)).astype(np.float32)
  t = next(t for t in hf.tensor_map(cfg, 'qwen2') if t.name.endswith('0.self_attn.k_proj.weight'))
  ours = t.to_ours(w_hf)
  assert ours.shape == (32, 2, 8)
  np.testing.assert_allclose(x @ ours.reshape(32, 16), x @ w_hf.T, rtol=1e-6)
  np.testing.assert_array_equal(t.to_hf(ours), w_hf)


def _llama3_reference(head_dim, theta, factor, low, high, old_len):
  """Llama 3.1's frequency bands, written out per frequency (Meta's reference formulation)."""
  out = []
  for i in range(0, head_dim, 2):
    freq = 1.0 / theta ** (i / head_dim)
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high:
      out.append(freq)
    elif wavelen > old_len / low:
      out.append(freq / factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def test_llama3_rope_scaling_against_a_plain_computation():
  got = attention.rope_frequencies(64, 500_000.0, 'llama3', 8.0, 1.0, 4.0, 8192)
  want = _llama3_reference(64, 500_000.0, 8.0, 1.0, 4.0, 8192)
  assert (np.asarray(got) != attention.rope_frequencies(64, 500_000.0)).any()  # bands move
  assert_close(got, want, terms=4)
  assert_close(attention.rope_frequencies(16, 1e4, 'linear', 4.0),
               1.0 / 1e4 ** (np.arange(0, 16, 2) / 16) / 4.0, terms=4)


def test_both_config_styles_give_the_same_model():
  v4 = {'model_type': 'llama', 'vocab_size': 96, 'hidden_size': 32, 'intermediate_size': 48,
        'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
        'rope_theta': 500000.0, 'tie_word_embeddings': True,
        'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                         'high_freq_factor': 4.0, 'original_max_position_embeddings': 32}}
  v5 = {k: v for k, v in v4.items() if k not in ('rope_theta', 'rope_scaling')}
  v5['rope_parameters'] = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
                           'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                           'original_max_position_embeddings': 32}
  a, b = hf_config.model_config(v4), hf_config.model_config(v5)
  assert a == b and a.rope_scaling == 'llama3' and a.rope_original_max_len == 32
  assert a.max_len == 2048 and a.norm_eps == 1e-6  # LlamaConfig's defaults, omitted from the file


def _export(tmp_path, case='qwen2', name='hf'):
  cfg = ModelConfig(**{**TINY, **CASES[case]})
  return hf.save_pretrained(_random_params(cfg), cfg, str(tmp_path / name)), cfg


def test_bad_directories_are_one_clear_line(tmp_path):
  from safetensors.numpy import load_file, save_file
  with pytest.raises(hf.HFCheckpointError, match='no config.json'):
    hf.load_pretrained(str(tmp_path))
  path, _ = _export(tmp_path)
  config = json.loads(open(os.path.join(path, 'config.json')).read())
  bad = dict(config, model_type='gpt2')
  open(os.path.join(path, 'config.json'), 'w').write(json.dumps(bad))
  with pytest.raises(hf.UnsupportedModel, match='gpt2.*llama, qwen2, qwen3, llada'):
    hf.load_pretrained(path)
  open(os.path.join(path, 'config.json'), 'w').write(json.dumps(
      dict(config, rope_scaling={'rope_type': 'yarn', 'factor': 4.0})))
  with pytest.raises(hf.UnsupportedModel, match='yarn'):
    hf.load_pretrained(path)
  open(os.path.join(path, 'config.json'), 'w').write(json.dumps(config))
  weights = os.path.join(path, 'model.safetensors')
  tensors = load_file(weights)
  good = dict(tensors)
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, weights)
  with pytest.raises(hf.HFCheckpointError, match=r'missing tensor model.layers.1.mlp.up_proj.weight '
                     r'\(expected shape \(48, 32\)\)'):
    hf.load_pretrained(path)
  save_file({**good, 'model.layers.0.self_attn.extra.weight': np.zeros((2, 2), np.float32)}, weights)
  with pytest.raises(hf.HFCheckpointError, match='unexpected tensor model.layers.0.self_attn.extra'):
    hf.load_pretrained(path)
  save_file({**good, 'model.norm.weight': np.zeros((31,), np.float32)}, weights)
  with pytest.raises(hf.HFCheckpointError, match=r'model.norm.weight has shape \(31,\), the config '
                     r'says \(32,\)'):
    hf.load_pretrained(path)
  save_file(good, weights)
  data = open(weights, 'rb').read()
  open(weights, 'wb').write(data[:len(data) - 100])
  with pytest.raises(hf.HFCheckpointError, match='truncated'):
    hf.load_pretrained(path)


def test_export_refuses_an_existing_directory_and_leaves_nothing_on_failure(tmp_path):
  path, cfg = _export(tmp_path)
  with pytest.raises(hf.HFCheckpointError, match='exists'):
    hf.save_pretrained(_random_params(cfg), cfg, path)
  wrong = ModelConfig(**{**TINY, **CASES['llama']})
  with pytest.raises(hf.HFCheckpointError, match='do not match'):
    hf.save_pretrained(_random_params(cfg), wrong, str(tmp_path / 'other'))
  assert sorted(os.listdir(tmp_path)) == ['hf']


def test_a_tokenizer_whose_specials_disagree_with_config_is_named(tmp_path):
  import tokenizers
  from pathways_jax.data import hf_tokenizer
  path, _ = _export(tmp_path)
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({'<s>': 0, '</s>': 1, 'a': 2, '[UNK]': 3},
                                                         unk_token='[UNK]'))
  tok.add_special_tokens(['<s>', '</s>'])
  ours = hf_tokenizer.HFTokenizer(tok.to_str(), {'bos_token': '<s>', 'eos_token': '</s>'})
  ours.save(path)
  config = json.loads(open(os.path.join(path, 'config.json')).read())
  open(os.path.join(path, 'config.json'), 'w').write(json.dumps(dict(config, eos_token_id=1)))
  assert hf.load_pretrained(path)[2].eos_id == 1
  open(os.path.join(path, 'config.json'), 'w').write(json.dumps(dict(config, eos_token_id=2)))
  with pytest.raises(hf.HFCheckpointError, match='eos_id=1, config.json says eos_token_id=2'):
    hf.load_pretrained(path)


def _byte_bpe_tokenizer(directory):
  """A small byte-level BPE tokenizer.json (+ tokenizer_config.json) trained here."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<pad>', '<s>', '</s>', '<mask>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(['Ada lives in Paris. 12 + 30 = 42.', 'def f(x):\n  return x'] * 20,
                          trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '<pad>'}, f)
  return tok.get_vocab_size()


def test_import_makes_a_run_directory_that_samples_trains_from_and_exports(tmp_path):
  from helpers import tiny_config
  from pathways_jax import sample
  from pathways_jax.data import hf_tokenizer
  from pathways_jax.train import loop
  from safetensors.numpy import load_file
  vocab = _byte_bpe_tokenizer(str(tmp_path / 'tok'))
  cfg = ModelConfig(**{**TINY, **CASES['qwen2'], 'vocab_size': vocab})
  params = _random_params(cfg)
  src = hf.save_pretrained(params, cfg, str(tmp_path / 'src'),
                           tokenizer=hf_tokenizer.HFTokenizer.from_path(str(tmp_path / 'tok')))
  assert hf_main(['import', f'--hf_dir={src}', f'--workdir={tmp_path / "run"}']) == 0
  assert hf_main(['import', f'--hf_dir={src}', f'--workdir={tmp_path / "run"}']) == 1  # not empty
  run_cfg, model, loaded, tok = sample.load_run(str(tmp_path / 'run'))
  assert model.cfg.qkv_bias and tok.eos_id == 2 and run_cfg.data.tokenizer == 'hf'
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert sample.sample_texts(run_cfg, model, loaded, tok, key=jax.random.key(0),
                             prompts=['Ada'], max_new_tokens=4)[0].startswith('Ada')

  # A fresh run starts from the import: with lr 0 its params stay the imported ones.
  train_cfg = tiny_config(str(tmp_path / 'cache'), **{
      'train.init_from': str(tmp_path / 'run'), 'train.lr': 0.0, 'train.weight_decay': 0.0,
      'train.steps': 2, 'data.tokenizer': 'hf', 'data.tokenizer_path': str(tmp_path / 'tok'),
      'sample.prompts': ()})
  res = loop.train(train_cfg, str(tmp_path / 'ft'), quiet=True)
  assert res['params'] == sum(x.size for x in jax.tree_util.tree_leaves(params))
  _, _, tuned, _ = sample.load_run(str(tmp_path / 'ft'))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(tuned)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert json.loads((tmp_path / 'ft' / 'config.json').read_text())['model']['qkv_bias']

  # Export of the run: the same tensors and model as the source directory.
  assert hf_main(['export', f'--workdir={tmp_path / "run"}', f'--out={tmp_path / "out"}']) == 0
  a, b = load_file(str(tmp_path / 'src' / 'model.safetensors')), load_file(
      str(tmp_path / 'out' / 'model.safetensors'))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert hf.load_pretrained(str(tmp_path / 'out'))[1] == hf.load_pretrained(src)[1]
  assert os.path.isfile(tmp_path / 'out' / 'tokenizer.json')


def test_init_from_a_different_model_is_named(tmp_path):
  from helpers import tiny_config
  from pathways_jax.config import ConfigError
  from pathways_jax.interop.hf import run_dir
  cfg = ModelConfig(**{**TINY, **CASES['llama']})
  src = hf.save_pretrained(_random_params(cfg), cfg, str(tmp_path / 'src'))
  model = Transformer(cfg.replace(num_layers=3))
  from pathways_jax import parallel
  mesh = jax.make_mesh((1, 1, 1), parallel.MESH_AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with pytest.raises(ConfigError, match=r"holds another model \(differs in \['num_layers'\]\)"):
    run_dir.load_init_params(src, model, mesh, parallel.DEFAULT_RULES)
  # The config's architecture is taken from the source; its runtime choices are kept.
  c = tiny_config(str(tmp_path), **{'model.attention': 'xla', 'model.remat': 'full'})
  got = run_dir.init_model_config(src, c.model)
  assert got.num_layers == 2 and got.remat == 'full' and got.vocab_size == 96
  # An AR source and a bidirectional run: adaptation to diffusion, with the run's logit shift.
  c.model.causal, c.model.shift_logits = False, True
  got = run_dir.init_model_config(src, c.model)
  assert not got.causal and got.shift_logits and got.num_layers == 2
  run_dir.load_init_params(src, Transformer(got), mesh, parallel.DEFAULT_RULES)
  with pytest.raises(hf.UnsupportedModel, match='shifted logits'):
    hf_config.hf_config(got, 'llada')
  # A bidirectional source and a causal run: named, not silently made causal.
  llada = ModelConfig(**{**TINY, 'causal': False})
  lsrc = hf.save_pretrained(_random_params(llada), llada, str(tmp_path / 'llada'))
  with pytest.raises(ConfigError, match='bidirectional .* set config.model.causal=False'):
    run_dir.init_model_config(lsrc, tiny_config(str(tmp_path)).model)


def test_bfloat16_checkpoints_round_trip(tmp_path):
  import ml_dtypes
  from safetensors import safe_open
  cfg = ModelConfig(**{**TINY, **CASES['llama']})
  params = _random_params(cfg)
  out = hf.save_pretrained(params, cfg, str(tmp_path / 'bf16'), dtype='bfloat16')
  with safe_open(os.path.join(out, 'model.safetensors'), framework='numpy') as f:
    assert f.get_tensor('model.norm.weight').dtype == ml_dtypes.bfloat16
  back, cfg_back, _ = hf.load_pretrained(out, dtype='bfloat16')
  assert cfg_back.param_dtype == 'bfloat16'
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


def test_an_export_is_written_whole_or_not_at_all(tmp_path):
  from pathways_jax.interop.hf.checkpoint import new_directory
  out = tmp_path / 'out'
  with pytest.raises(RuntimeError, match='midway'):
    with new_directory(str(out), hf.HFCheckpointError) as tmp:
      (tmp_path / 'out.partial' / 'model.safetensors').write_text('half')
      raise RuntimeError('midway')
  assert not out.exists() and not (tmp_path / 'out.partial').exists()
  with new_directory(str(out), hf.HFCheckpointError) as tmp:
    (tmp_path / 'out.partial' / 'config.json').write_text('{}')
  assert (out / 'config.json').exists()
  with pytest.raises(hf.HFCheckpointError, match='exists; export into a new directory'):
    with new_directory(str(out), hf.HFCheckpointError):
      pass
