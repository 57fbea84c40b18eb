"""PEFT LoRA adapters in and out (`hf.load_adapter` / `hf.save_adapter`), without torch.

tests/golden/hf/peft/ holds adapters made and saved by peft itself on golden base checkpoints,
with the logits the PeftModel computed (`make golden-hf`). PEFT loading our exports is checked by
tests/golden/hf/check_peft_export.py in the golden venv (docs/interop.md has its last result).
"""
import json
import os
import shutil

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import REPO
from pathways_jax.adapters import lora
from pathways_jax.config import ModelConfig
from pathways_jax.interop import hf
from pathways_jax.interop.hf.__main__ import main as hf_main
from pathways_jax.models.transformer import Transformer

GOLDEN = os.path.join(REPO, 'tests', 'golden', 'hf')
PEFT_CASES = {'llama_lora': 'llama', 'qwen3_rslora': 'qwen3'}  # adapter -> its base case
MAX_ABS_LOGIT_ERROR = 1e-4  # as tests/test_hf_golden.py
TINY = dict(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
            max_len=128)
FAMILIES = {'llama': dict(tie_embeddings=False), 'qwen3': dict(qk_norm=True, head_dim=16),
            'llada': dict(causal=False, tie_embeddings=False)}


def _peft(case):
  """(base params, model cfg, adapter dir, golden) of a peft-made golden adapter."""
  params, cfg, _ = hf.load_pretrained(os.path.join(GOLDEN, PEFT_CASES[case]), tokenizer=False)
  src = os.path.join(GOLDEN, 'peft', case)
  return params, cfg, src, dict(np.load(os.path.join(src, 'golden.npz')))


def _peft_selects(target_modules, modules):
  """PEFT's rule for a list of target_modules: a module is adapted if its name equals an entry or
  ends with '.' + the entry (peft.tuners.tuners_utils.check_target_module_exists)."""
  return {m for m in modules if any(m == t or m.endswith('.' + t) for t in target_modules)}


def _linear_modules(cfg, model_type):
  return {t.name[:-len('.weight')] for t in hf.tensor_map(cfg, model_type)
          if len(t.hf_shape) == 2 and t.path != ('embed',)}


def _random_adapters(cfg, lcfg, seed=0):
  """Adapters as the adapted model creates them, A and B random (nonzero B, as after training)."""
  params = nn.unbox(Transformer(lcfg.apply_to(cfg)).init(jax.random.key(seed),
                                                          jnp.zeros((1, 8), jnp.int32))['params'])
  base, adapters = lora.split(params)
  leaves, tree = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return base, jax.tree_util.tree_unflatten(tree, [0.3 * jax.random.normal(k, x.shape)
                                                   for k, x in zip(keys, leaves)])


def _leaves_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('case', sorted(PEFT_CASES))
def test_a_peft_made_adapter_gives_peft_logits(case):
  params, cfg, src, g = _peft(case)
  lora_params, lcfg = hf.load_adapter(src, cfg)
  peft_cfg = json.loads(open(os.path.join(src, 'adapter_config.json')).read())
  assert (lcfg.rank, lcfg.alpha, lcfg.rslora, lcfg.dropout) == (
      peft_cfg['r'], peft_cfg['lora_alpha'], peft_cfg['use_rslora'], peft_cfg['lora_dropout'])
  tokens = jnp.asarray(g['tokens'])
  logits = Transformer(lcfg.apply_to(cfg)).apply({'params': lora.combine(params, lora_params)},
                                                 tokens)
  err = float(jnp.max(jnp.abs(logits - g['logits'])))
  assert err <= MAX_ABS_LOGIT_ERROR, f'{case}: max |logit - peft| = {err:.2e}'
  merged = Transformer(cfg).apply({'params': lora.merge(params, lora_params, lcfg)}, tokens)
  assert float(jnp.max(jnp.abs(merged - g['logits']))) <= MAX_ABS_LOGIT_ERROR
  base = Transformer(cfg).apply({'params': params}, tokens)
  assert float(jnp.max(jnp.abs(base - g['logits']))) > 0.5  # the adapter matters here
  # Its targets select exactly the weights the file adapts (qwen3_rslora: three, layer 1 only).
  paths = traverse_util.flatten_dict(lora_params)
  adapted = sorted('/'.join(p[:-1] + (p[-1][:-len('_lora_a')],)) for p in paths
                   if p[-1].endswith('_lora_a'))
  assert lora.target_paths(params, lcfg) == adapted
  assert len(adapted) == {'llama_lora': 14, 'qwen3_rslora': 3}[case]


@pytest.mark.parametrize('case', sorted(PEFT_CASES))
def test_reexporting_a_peft_adapter_writes_peft_tensors_bit_for_bit(tmp_path, case):
  _, cfg, src, _ = _peft(case)
  lora_params, lcfg = hf.load_adapter(src, cfg)
  out = hf.save_adapter(lora_params, lcfg, cfg, str(tmp_path / 'out'))
  theirs, ours = (load_file(os.path.join(d, 'adapter_model.safetensors')) for d in (src, out))
  assert sorted(theirs) == sorted(ours)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  theirs_cfg, ours_cfg = (json.loads(open(os.path.join(d, 'adapter_config.json')).read())
                          for d in (src, out))
  for key in ('peft_type', 'task_type', 'r', 'lora_alpha', 'use_rslora', 'lora_dropout', 'bias'):
    assert ours_cfg[key] == theirs_cfg[key], key
  modules = {k[len('base_model.model.'):-len('.lora_A.weight')] for k in ours if 'lora_A' in k}
  assert _peft_selects(ours_cfg['target_modules'], _linear_modules(cfg, 'llama')) == modules


@pytest.mark.parametrize('family,targets', [
    ('llama', 'all-linear'), ('llama', r'attn/w[qv]|blocks_1/mlp/w_down'),
    ('qwen3', r'attn/wo|mlp/w_up'), ('llada', 'all-linear'), ('llada', r'mlp/w_down')])
def test_save_then_load_is_exact_and_in_peft_layout(tmp_path, family, targets):
  cfg = ModelConfig(**{**TINY, **FAMILIES[family]})
  lcfg = lora.LoraConfig(rank=3, alpha=5.0, targets=targets, rslora=family == 'qwen3',
                         dropout=0.05)
  base, adapters = _random_adapters(cfg, lcfg)
  out = hf.save_adapter(adapters, lcfg, cfg, str(tmp_path / 'adapter'))
  back, lcfg_back = hf.load_adapter(out, cfg)
  _leaves_equal(back, adapters)
  assert (lcfg_back.rank, lcfg_back.alpha, lcfg_back.rslora, lcfg_back.dropout) == (
      3, 5.0, family == 'qwen3', 0.05)
  assert lora.target_paths(base, lcfg_back) == lora.target_paths(base, lcfg)
  # PEFT's layout, checked with plain matrices: the HF tensor of the merged model is the base's
  # plus scale * B @ A, with A [r, in] and B [out, r] as the file holds them.
  model_type = {'llama': 'llama', 'qwen3': 'qwen3', 'llada': 'llada'}[family]
  tensors = load_file(os.path.join(out, 'adapter_model.safetensors'))
  merged = lora.merge(base, adapters, lcfg)
  flat = lambda p: {'/'.join(k): v for k, v in traverse_util.flatten_dict(p).items()}
  base_flat, merged_flat = flat(base), flat(merged)
  modules = set()
  for t in hf.tensor_map(cfg, model_type):
    key = 'base_model.model.' + t.name[:-len('.weight')]
    if key + '.lora_A.weight' not in tensors:
      continue
    modules.add(t.name[:-len('.weight')])
    a, b = tensors[key + '.lora_A.weight'], tensors[key + '.lora_B.weight']
    assert a.shape == (3, t.hf_shape[1]) and b.shape == (t.hf_shape[0], 3)
    path = '/'.join(t.path)
    want = (t.to_hf(np.asarray(base_flat[path], np.float64)) +
            lcfg.scale * b.astype(np.float64) @ a.astype(np.float64))
    np.testing.assert_allclose(t.to_hf(np.asarray(merged_flat[path])), want, atol=1e-5)
  assert len(modules) == len(lora.target_paths(base, lcfg))
  config = json.loads(open(os.path.join(out, 'adapter_config.json')).read())
  assert _peft_selects(config['target_modules'], _linear_modules(cfg, model_type)) == modules
  ff_out = ['model.transformer.blocks.0.ff_out', 'model.transformer.blocks.1.ff_out']
  if family == 'llada':  # 'ff_out' is also LLaDA's LM head: the short name would adapt it too
    assert 'ff_out' not in config['target_modules'] and set(ff_out) <= set(
        config['target_modules'])
  if targets == 'all-linear':  # the short names, but for LLaDA's ff_out
    assert len(config['target_modules']) == (6 + 2 if family == 'llada' else 7)


def test_scan_layers_adapters_stack_and_export_like_unscanned(tmp_path):
  _, cfg, src, _ = _peft('llama_lora')
  flat, _ = hf.load_adapter(src, cfg)
  stacked, lcfg = hf.load_adapter(src, cfg.replace(scan_layers=True))
  for i in range(2):
    _leaves_equal(jax.tree_util.tree_map(lambda x, i=i: x[i], stacked['blocks']),
                  flat[f'blocks_{i}'])
  out = hf.save_adapter(stacked, lcfg, cfg.replace(scan_layers=True), str(tmp_path / 'a'))
  theirs, ours = (load_file(os.path.join(d, 'adapter_model.safetensors')) for d in (src, out))
  assert sorted(theirs) == sorted(ours) and all((theirs[k] == ours[k]).all() for k in theirs)
  _, cfg3, src3, _ = _peft('qwen3_rslora')
  with pytest.raises(hf.AdapterError, match='same adapters in every layer'):
    hf.load_adapter(src3, cfg3.replace(scan_layers=True))


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert '\n' not in msg
  return msg


def test_an_adapter_for_another_base_is_named_by_its_first_mismatching_tensor(tmp_path):
  _, qwen3, _, _ = _peft('qwen3_rslora')
  _, llama, src, _ = _peft('llama_lora')
  with pytest.raises(hf.AdapterError) as e:
    hf.load_adapter(src, qwen3)  # its q_proj outputs 4 x 32, llama's 4 x 16
  assert ('adapter tensor base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight has '
          'shape [64, 4]' in _one_line(e)) and '[128, 4]' in str(e.value)
  with pytest.raises(hf.AdapterError) as e:
    hf.load_adapter(src, llama.replace(num_layers=1))
  assert 'base_model.model.model.layers.1.mlp.down_proj.lora_A.weight adapts' in _one_line(e)
  with pytest.raises(hf.AdapterError) as e:
    hf.load_adapter(src, llama, model_type='llada')  # other module names altogether
  assert 'made for another base model' in _one_line(e)
  # The CLI: one line on stderr, no run directory (nor a partial one) left behind.
  run = tmp_path / 'run'
  assert hf_main(['import', f'--hf_dir={os.path.join(GOLDEN, "qwen3")}',
                  f'--adapter_dir={src}', f'--workdir={run}']) == 1
  assert not run.exists() and not (tmp_path / 'run.partial').exists()


def test_saving_adapters_that_do_not_fit_the_model_writes_nothing(tmp_path):
  cfg = ModelConfig(**TINY)
  lcfg = lora.LoraConfig(rank=2, targets='attn/wq')
  _, adapters = _random_adapters(cfg, lcfg)
  wider = cfg.replace(d_model=64)
  cases = [((adapters, lcfg, wider), r'blocks_0/attn/wq_lora_a has shape \(32, 2\).*\(64, 2\)'),
           ((adapters, lora.LoraConfig(rank=2, targets='attn/wk'), cfg), 'select'),
           ((adapters, lcfg, cfg.replace(num_layers=1)), 'blocks_1/attn/wq.*does not have'),
           ((lora.combine(*_random_adapters(cfg, lcfg)), lcfg, cfg), 'not an adapter param')]
  for args, match in cases:
    with pytest.raises(hf.AdapterError, match=match) as e:
      hf.save_adapter(*args, str(tmp_path / 'out'))
    _one_line(e)
    assert not os.listdir(tmp_path), os.listdir(tmp_path)
  hf.save_adapter(adapters, lcfg, cfg, str(tmp_path / 'out'))
  with pytest.raises(hf.AdapterError, match='exists'):
    hf.save_adapter(adapters, lcfg, cfg, str(tmp_path / 'out'))


@pytest.mark.parametrize('change,match', [
    ({'use_dora': True}, 'DoRA'), ({'bias': 'all'}, "bias='all'"),
    ({'rank_pattern': {'q_proj': 8}}, 'per-module ranks'), ({'peft_type': 'IA3'}, "'IA3'"),
    ({'modules_to_save': ['lm_head']}, 'modules_to_save'), ({'r': 0}, 'r=0'),
    ('no config', 'not a PEFT adapter directory'), ('no weights', 'no adapter_model.safetensors'),
    ('extra tensor', 'lora_magnitude_vector is not the LoRA A or B matrix'),
    ('truncated', 'truncated')])
def test_unsupported_or_broken_adapters_are_one_clear_line(tmp_path, change, match):
  _, cfg, src, _ = _peft('llama_lora')
  d = tmp_path / 'adapter'
  shutil.copytree(src, d)
  config = json.loads((d / 'adapter_config.json').read_text())
  weights = d / 'adapter_model.safetensors'
  if change == 'no config':
    (d / 'adapter_config.json').unlink()
  elif change == 'no weights':
    weights.unlink()
  elif change == 'extra tensor':
    tensors = load_file(str(weights))
    tensors['base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector'] = np.ones(
        64, np.float32)
    save_file(tensors, str(weights))
  elif change == 'truncated':
    weights.write_bytes(weights.read_bytes()[:-100])
  else:
    (d / 'adapter_config.json').write_text(json.dumps({**config, **change}))
  with pytest.raises(hf.HFCheckpointError, match=match) as e:  # AdapterError is one
    hf.load_adapter(str(d), cfg)
  _one_line(e)


def test_the_cli_imports_an_adapter_as_a_lora_run_and_exports_it_again(tmp_path, capsys):
  from pathways_jax import sample
  _, _, src, g = _peft('llama_lora')
  run, out, merged = tmp_path / 'run', tmp_path / 'adapter', tmp_path / 'merged'
  assert hf_main(['import', f'--hf_dir={os.path.join(GOLDEN, "llama")}', f'--adapter_dir={src}',
                  f'--workdir={run}']) == 0
  _, model, params, _ = sample.load_run(str(run))
  assert model.cfg.lora_rank == 4 and lora.split(params)[1]
  logits = model.apply({'params': params}, jnp.asarray(g['tokens']))
  assert float(jnp.max(jnp.abs(logits - g['logits']))) <= MAX_ABS_LOGIT_ERROR
  assert hf_main(['export-adapter', f'--workdir={run}', f'--out={out}',
                  '--base=tests/golden/hf/llama']) == 0
  theirs, ours = (load_file(os.path.join(d, 'adapter_model.safetensors')) for d in (src, out))
  assert sorted(theirs) == sorted(ours) and all((theirs[k] == ours[k]).all() for k in theirs)
  assert json.loads((out / 'adapter_config.json').read_text())['base_model_name_or_path'] == (
      'tests/golden/hf/llama')
  # `export` of a LoRA run writes the model it computes, merged: transformers needs no peft.
  assert hf_main(['export', f'--workdir={run}', f'--out={merged}']) == 0
  params_m, cfg_m, _ = hf.load_pretrained(str(merged))
  assert cfg_m.lora_rank == 0
  logits = Transformer(cfg_m).apply({'params': params_m}, jnp.asarray(g['tokens']))
  assert float(jnp.max(jnp.abs(logits - g['logits']))) <= MAX_ABS_LOGIT_ERROR
  # A run without adapters has none to export.
  plain = tmp_path / 'plain'
  assert hf_main(['import', f'--hf_dir={os.path.join(GOLDEN, "llama")}',
                  f'--workdir={plain}']) == 0
  capsys.readouterr()
  assert hf_main(['export-adapter', f'--workdir={plain}', f'--out={tmp_path / "x"}']) == 1
  err = capsys.readouterr().err
  assert 'is not a LoRA run' in err and err.count('\n') == 1 and not (tmp_path / 'x').exists()
  # A LoRA run that also trained the embedding (train.trainable): a PEFT adapter would drop it.
  cfg_path = run / 'config.json'
  run_cfg = json.loads(cfg_path.read_text())
  run_cfg['train']['trainable'] = lora.LORA_PARAMS + '|embed|.*scale'
  cfg_path.write_text(json.dumps(run_cfg))
  assert hf_main(['export-adapter', f'--workdir={run}', f'--out={tmp_path / "y"}']) == 1
  err = capsys.readouterr().err
  assert "trained blocks_0/attn_norm/scale, blocks_0/mlp_norm/scale" in err and 'embed' in err
  assert '`export` instead' in err and err.count('\n') == 1 and not (tmp_path / 'y').exists()


def test_a_lora_reward_model_saves_its_head_as_peft_writes_a_seq_cls_adapter(tmp_path):
  """The adapters plus the trained head as PEFT saves a sequence-classification adapter
  (task_type SEQ_CLS, `score` a saved module; checked by peft itself in
  tests/golden/hf/check_peft_export.py), the head's bias in the file's metadata; saved modules
  other than the head are refused by name on reading."""
  from safetensors import safe_open
  params, cfg, _ = hf.load_pretrained(os.path.join(REPO, 'tests', 'golden', 'hf', 'llama_rm'))
  lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=r'attn/w[qv]')
  adapters = lora.init(jax.random.key(0), params, lcfg)
  head = {'kernel': np.arange(cfg.d_model, dtype=np.float32) / 10, 'bias': np.float32(-1.25)}
  out = hf.save_adapter(adapters, lcfg, cfg, str(tmp_path / 'rm'), head=head,
                        base_model_name_or_path='base')
  config = json.loads((tmp_path / 'rm' / 'adapter_config.json').read_text())
  assert config['task_type'] == 'SEQ_CLS' and config['modules_to_save'] == ['classifier', 'score']
  with safe_open(os.path.join(out, 'adapter_model.safetensors'), 'np') as f:
    np.testing.assert_array_equal(f.get_tensor('base_model.model.score.weight'),
                                  head['kernel'][None])
    assert float(f.metadata()[hf.SCORE_BIAS_KEY]) == -1.25
    assert sum(k.endswith('lora_A.weight') for k in f.keys()) == 2 * cfg.num_layers
  config['modules_to_save'] = ['score', 'lm_head']  # more than a reward head: refused
  (tmp_path / 'rm' / 'adapter_config.json').write_text(json.dumps(config))
  with pytest.raises(hf.AdapterError, match='modules_to_save'):
    hf.load_adapter(out, cfg)
  for bidirectional in (cfg.replace(causal=False), cfg.replace(causal=False, scalar_head=False)):
    with pytest.raises(hf.UnsupportedModel, match='bidirectional reward model'):
      hf.save_adapter(adapters, lcfg, bidirectional, str(tmp_path / 'bi'), head=head)
  assert not os.path.exists(tmp_path / 'bi')


def test_a_seq_cls_adapter_imports_as_a_lora_reward_model_run(tmp_path):
  """Ours exported, then `import --adapter_dir` on the causal base: a LoRA reward-model run whose
  adapters and head are the ones saved (bias included), read by eval.reward.load."""
  from pathways_jax.eval import reward
  from pathways_jax.interop.hf import run_dir
  golden = os.path.join(REPO, 'tests', 'golden', 'hf')
  params, cfg, _ = hf.load_pretrained(os.path.join(golden, 'llama_rm'))
  lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=r'attn/w[qv]')
  adapters = jax.tree_util.tree_map(lambda x: x + 0.01, lora.init(jax.random.key(0), params, lcfg))
  head = {'kernel': np.linspace(-1, 1, cfg.d_model, dtype=np.float32), 'bias': np.float32(0.5)}
  hf.save_adapter(adapters, lcfg, cfg, str(tmp_path / 'rm'), head=head)
  got, got_lcfg = hf.load_adapter(str(tmp_path / 'rm'), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, adapters)
  got_head = hf.load_adapter_head(str(tmp_path / 'rm'), cfg)
  np.testing.assert_array_equal(got_head['kernel'], head['kernel'])
  assert got_head['bias'] == 0.5 and got_lcfg.rank == 2
  assert hf.load_adapter_head(os.path.join(golden, 'peft', 'llama_lora'), cfg) is None
  # On the causal base (no head of its own): the run is a LoRA reward model.
  run_dir.import_to_run(os.path.join(golden, 'llama'), str(tmp_path / 'run'),
                        adapter_dir=str(tmp_path / 'rm'))
  model, run_params, _ = reward.load(str(tmp_path / 'run'))
  assert model.cfg.scalar_head and model.cfg.lora_rank == 2
  np.testing.assert_array_equal(run_params['scalar_head']['kernel'], head['kernel'])
  assert float(run_params['scalar_head']['bias']) == 0.5
  tokens = jnp.asarray(np.load(os.path.join(golden, 'llama_rm', 'golden.npz'))['tokens'])
  want = Transformer(lcfg.apply_to(cfg)).apply(
      {'params': lora.combine(dict(params, scalar_head=head), adapters)}, tokens,
      return_scalar=True)
  np.testing.assert_allclose(model.apply({'params': run_params}, tokens, return_scalar=True),
                             want, atol=1e-5)


def test_a_peft_made_seq_cls_adapter_gives_peft_rewards():
  """peft's own SEQ_CLS LoRA adapter (tests/golden/hf/peft/llama_rm_lora: q/v adapters and the
  trained score head) on the golden reward model: our rewards are peft's."""
  params, cfg, _ = hf.load_pretrained(os.path.join(GOLDEN, 'llama_rm'))
  src = os.path.join(GOLDEN, 'peft', 'llama_rm_lora')
  g = np.load(os.path.join(src, 'golden.npz'))
  lora_params, lcfg = hf.load_adapter(src, cfg)
  head = hf.load_adapter_head(src, cfg)
  assert head['bias'] == 0.0  # peft's score has none
  scores = Transformer(lcfg.apply_to(cfg)).apply(
      {'params': lora.combine(dict(params, scalar_head=head), lora_params)},
      jnp.asarray(g['tokens']), return_scalar=True)
  rewards = np.asarray(scores)[np.arange(2), g['lengths'] - 1]
  np.testing.assert_allclose(rewards, g['rewards'], atol=MAX_ABS_LOGIT_ERROR)
  # Without the adapter's head (the base's own score) the rewards are not peft's.
  base_head = Transformer(lcfg.apply_to(cfg)).apply(
      {'params': lora.combine(params, lora_params)}, jnp.asarray(g['tokens']), return_scalar=True)
  assert np.abs(np.asarray(base_head)[np.arange(2), g['lengths'] - 1] - g['rewards']).max() > 0.1
