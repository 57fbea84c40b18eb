"""Imported HF checkpoints compute what `transformers` computes (golden files, no torch needed).

tests/golden/hf/ holds tiny random Llama / Llama-3 (tied, llama3 RoPE scaling) / Qwen2 (biases,
sharded files) / Qwen3 (q/k norms) checkpoints saved by transformers, and the logits and greedy
tokens transformers produced for them, a LLaDA checkpoint with the logits of LLaDA-8B's own
modeling code, and two reward models (...ForSequenceClassification, num_labels=1) with the
rewards transformers read (`make golden-hf` regenerates them; see its README)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, run_on_fake_devices
from pathways_jax.interop import hf
from pathways_jax.models.transformer import Transformer

GOLDEN = os.path.join(REPO, 'tests', 'golden', 'hf')
CASES = ('llama', 'llama3_tied', 'qwen2', 'qwen3', 'llada')  # llada: from LLaDA's own code
GENERATE = ('llama', 'llama3_tied', 'qwen2', 'qwen3')
REWARD_MODELS = ('llama_rm', 'qwen2_rm')  # untied Llama; tied Qwen2 with q/k/v biases
MAX_ABS_LOGIT_ERROR = 1e-4  # float32, 320 positions: what the interop promises


def _golden(case):
  return dict(np.load(os.path.join(GOLDEN, case, 'golden.npz')))


@pytest.mark.parametrize('case', CASES)
def test_logits_equal_transformers(case):
  params, cfg, _ = hf.load_pretrained(os.path.join(GOLDEN, case))
  g = _golden(case)
  logits = Transformer(cfg).apply({'params': params}, jnp.asarray(g['tokens']))
  err = float(jnp.max(jnp.abs(logits - g['logits'])))
  assert err <= MAX_ABS_LOGIT_ERROR, f'{case}: max |logit - transformers| = {err:.2e}'
  assert {'llama3_tied': cfg.rope_scaling == 'llama3' and cfg.tie_embeddings,
          'qwen2': cfg.qkv_bias, 'qwen3': cfg.qk_norm, 'llama': not cfg.tie_embeddings,
          'llada': not cfg.causal and not cfg.tie_embeddings}[case]


@pytest.mark.parametrize('case', GENERATE)
def test_greedy_decoding_equals_transformers_generate(case):
  from pathways_jax.sampling import autoregressive
  params, cfg, _ = hf.load_pretrained(os.path.join(GOLDEN, case))
  g = _golden(case)
  prompt = g['greedy_prompt']
  new = g['greedy_tokens'].shape[1] - prompt.shape[1]
  out = autoregressive.generate(Transformer(cfg), params, jnp.asarray(prompt),
                                key=jax.random.key(0), max_new_tokens=new, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out), g['greedy_tokens'])


@pytest.mark.parametrize('case', ['llama', 'llama3_tied'])
def test_the_other_transformers_config_style_reads_the_same(tmp_path, case):
  """transformers 5 writes `rope_parameters`; 4 wrote `rope_theta` + `rope_scaling`."""
  src = os.path.join(GOLDEN, case)
  shutil.copytree(src, tmp_path / case)
  shutil.copy(os.path.join(src, 'config.other_style.json'), tmp_path / case / 'config.json')
  assert json.loads((tmp_path / case / 'config.json').read_text()).keys() != json.loads(
      open(os.path.join(src, 'config.json')).read()).keys()
  assert hf.load_pretrained(str(tmp_path / case))[1] == hf.load_pretrained(src)[1]


@pytest.mark.parametrize('case', CASES)
def test_import_then_export_writes_the_same_tensors(tmp_path, case):
  """The round trip import -> export gives transformers the very tensors and model it saved."""
  src = os.path.join(GOLDEN, case)
  params, cfg, _ = hf.load_pretrained(src)
  out = hf.save_pretrained(params, cfg, str(tmp_path / 'out'))
  _assert_same_tensors(src, out)
  assert hf.load_pretrained(out)[1].replace(max_len=cfg.max_len) == cfg


def _tensors(d):
  from safetensors import safe_open
  found = {}
  for name in os.listdir(d):
    if name.endswith('.safetensors'):
      with safe_open(os.path.join(d, name), framework='numpy') as f:
        found.update({k: f.get_tensor(k) for k in f.keys()})
  return found


def _assert_same_tensors(src, out):
  a, b = _tensors(src), _tensors(out)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize('case', REWARD_MODELS)
def test_reward_models_score_what_transformers_scores(case):
  params, cfg, _ = hf.load_pretrained(os.path.join(GOLDEN, case))
  g = _golden(case)
  assert cfg.scalar_head and float(params['scalar_head']['bias']) == 0.0  # HF's score: no bias
  assert params['scalar_head']['kernel'].dtype == jnp.float32
  scores = Transformer(cfg).apply({'params': params}, jnp.asarray(g['tokens']), return_scalar=True)
  err = float(jnp.max(jnp.abs(scores - g['position_scores'])))
  assert err <= MAX_ABS_LOGIT_ERROR, f'{case}: max |score - transformers| = {err:.2e}'
  # transformers reads the reward at each row's last non-pad token; row 1 is right-padded.
  rewards = np.asarray(scores)[np.arange(2), g['lengths'] - 1]
  np.testing.assert_allclose(rewards, g['rewards'], atol=MAX_ABS_LOGIT_ERROR)
  if case == 'llama_rm':  # untied: the file has no LM head; the reward never reads it
    assert not cfg.tie_embeddings and not np.asarray(params['unembed']).any()


@pytest.mark.parametrize('case', REWARD_MODELS)
def test_a_reward_model_exports_as_sequence_classification_and_keeps_its_bias(tmp_path, case):
  """Our head has a bias, HF's score Linear none: the export writes HF's very tensors and keeps
  the bias in config.json, so the import gives back the same rewards, bias included."""
  src = os.path.join(GOLDEN, case)
  params, cfg, _ = hf.load_pretrained(src)
  params['scalar_head']['bias'] = jnp.float32(0.75)  # a trained head has one
  out = hf.save_pretrained(params, cfg, str(tmp_path / 'out'))
  _assert_same_tensors(src, out)  # score.weight, no lm_head
  config = hf.read_config(out)
  assert config['architectures'] == [hf.read_config(src)['architectures'][0]]
  assert config['architectures'][0].endswith('ForSequenceClassification')
  assert config['id2label'] == {'0': 'LABEL_0'} and config[hf.SCORE_BIAS_KEY] == 0.75
  back, back_cfg, _ = hf.load_pretrained(out)
  assert back_cfg.replace(max_len=cfg.max_len) == cfg
  tokens = jnp.asarray(_golden(case)['tokens'])
  score = lambda p: Transformer(cfg).apply({'params': p}, tokens, return_scalar=True)
  np.testing.assert_allclose(score(back), score(params), atol=1e-6)
  np.testing.assert_allclose(score(back) - 0.75, _golden(case)['position_scores'], atol=1e-4)


def test_an_imported_reward_model_run_scores_with_the_reward_api(tmp_path):
  """`python -m pathways_jax.interop.hf import` of a HF reward model gives a run directory that
  `eval.reward.load` (what RL's reward-model stages use) reads as a reward model."""
  from pathways_jax.eval import reward
  from pathways_jax.interop.hf import run_dir
  run_dir.import_to_run(os.path.join(GOLDEN, 'qwen2_rm'), str(tmp_path / 'rm'))
  model, params, _ = reward.load(str(tmp_path / 'rm'))
  g = _golden('qwen2_rm')
  scores = model.apply({'params': params}, jnp.asarray(g['tokens']), return_scalar=True)
  np.testing.assert_allclose(np.asarray(scores), g['position_scores'], atol=MAX_ABS_LOGIT_ERROR)


def test_a_classifier_and_a_bidirectional_reward_model_are_refused(tmp_path):
  shutil.copytree(os.path.join(GOLDEN, 'llama_rm'), tmp_path / 'clf')
  config = json.loads((tmp_path / 'clf' / 'config.json').read_text())
  config['id2label'] = {'0': 'NEGATIVE', '1': 'POSITIVE'}
  (tmp_path / 'clf' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(hf.UnsupportedModel, match='2 labels is a classifier'):
    hf.load_pretrained(str(tmp_path / 'clf'))
  config['id2label'] = {'0': 'LABEL_0'}
  config[hf.SCORE_BIAS_KEY] = float('nan')
  (tmp_path / 'clf' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(hf.HFCheckpointError, match='pathways_jax_score_bias'):
    hf.load_pretrained(str(tmp_path / 'clf'))
  params, cfg, _ = hf.load_pretrained(os.path.join(GOLDEN, 'llama_rm'))
  with pytest.raises(hf.HFCheckpointError, match='pad_token_id=128 is not a token id'):
    hf.save_pretrained(params, cfg, str(tmp_path / 'bad_pad'), pad_token_id=cfg.vocab_size)
  assert not os.path.exists(tmp_path / 'bad_pad')
  with pytest.raises(hf.UnsupportedModel, match='bidirectional reward model'):
    hf.save_pretrained(params, cfg.replace(causal=False), str(tmp_path / 'llada_rm'))
  assert not os.path.exists(tmp_path / 'llada_rm')


def test_loaded_sharded_on_8_devices_equals_one_device():
  out = run_on_fake_devices(f'''
import jax, jax.numpy as jnp, numpy as np
from pathways_jax import parallel
from pathways_jax.interop import hf
from pathways_jax.models.transformer import Transformer
path = {os.path.join(GOLDEN, 'qwen2')!r}
mesh = jax.make_mesh((2, 2, 2), parallel.MESH_AXES,
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
sharded, cfg, _ = hf.load_pretrained(path, mesh=mesh, rules=parallel.DEFAULT_RULES)
plain, _, _ = hf.load_pretrained(path)
wq = sharded['blocks_0']['attn']['wq']
assert len(wq.sharding.device_set) == 8, wq.sharding
assert not wq.sharding.is_fully_replicated
for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(plain)):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print('OK', wq.sharding.spec)
''')
  assert 'OK' in out
