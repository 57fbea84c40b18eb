"""Reward models: the scalar head, task 'reward_model', and the scoring API (eval/reward.py)."""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import logged_losses, tiny_config
from pathways_jax.config import ConfigError, ModelConfig
from pathways_jax.data import chat
from pathways_jax.data import preference as pref_data
from pathways_jax.data import tokenizers
from pathways_jax.eval import reward as reward_eval
from pathways_jax.models.transformer import ScalarHead, Transformer
from pathways_jax.tasks.reward_model import pair_rewards

BYTES = tokenizers.ByteTokenizer()
# Two lengths of side (one compile each for the reference below), chosen and rejected of unequal
# length in one pair; every pair fits half of a 64-token row.
PAIRS = [('2+3=', '5', '7'), ('1+1=', '2', '11'), ('6+2=', '8', '9')]


def _conversations(prompt, chosen, rejected):
  p, c, r = pref_data.from_record({'prompt': prompt, 'chosen': chosen, 'rejected': rejected})
  return p + c, p + r


def _model(**kw):
  cfg = ModelConfig.from_config(tiny_config('/tmp/unused').model, vocab_size=264)
  return Transformer(cfg.replace(scalar_head=True, **kw))


@pytest.mark.parametrize('causal', [True, False])
def test_rewards_of_packed_rows_are_each_sequence_run_alone(causal):
  """The independent reference: each side through the model alone (exact length, no padding, no
  segment ids), read at its last token; the packed rows hold three pairs and padding. A
  bidirectional (LLaDA) backbone too: there, padding or a neighbouring segment would reach every
  token, the last included."""
  model = _model(causal=causal)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))['params'])
  head = params['scalar_head']
  assert head['kernel'].shape == (32,) and head['bias'].shape == ()
  assert head['kernel'].dtype == jnp.float32 and float(jnp.abs(head['kernel']).max()) < 0.2
  fields, _ = pref_data.build_rows([pref_data.render_pair(BYTES, *pref_data.from_record(
      {'prompt': p, 'chosen': c, 'rejected': r})) for p, c, r in PAIRS], 96, pad_id=0)
  assert (fields['segment_ids'] == 0).any()  # padding at the end of a row
  scalar = jax.jit(lambda p, b: model.apply({'params': p}, b['tokens'],
                                            positions_BL=b['positions'],
                                            segment_ids_BL=b['segment_ids'], return_scalar=True))
  got = pair_rewards(scalar(params, fields), jnp.asarray(fields['segment_ids']))
  assert got['chosen'].dtype == jnp.float32
  valid = np.asarray(got['valid'])
  assert valid.sum() == len(PAIRS)
  got_pairs = sorted(zip(np.asarray(got['chosen'])[valid].tolist(),
                         np.asarray(got['rejected'])[valid].tolist()))
  apply = jax.jit(lambda p, t: model.apply({'params': p}, t, return_scalar=True))
  alone = []
  for p, c, r in PAIRS:
    c_conv, r_conv = _conversations(p, c, r)
    pair = []
    for conv in (c_conv, r_conv):
      ids, _ = chat.render(BYTES, conv)
      pair.append(float(apply(params, jnp.asarray(ids)[None])[0, -1]))
    alone.append(tuple(pair))
  np.testing.assert_allclose(got_pairs, sorted(alone), rtol=1e-5, atol=1e-6)
  # The scoring API on the same conversations (one per row, right-padded, batches of 4).
  convs = [conv for p, c, r in PAIRS for conv in _conversations(p, c, r)]
  scored = reward_eval.score(model, params, BYTES, convs, batch_size=4, max_len=48)
  np.testing.assert_allclose(scored, [x for pair in alone for x in pair], rtol=1e-5, atol=1e-6)


def test_scalar_head_refusals_and_truncation():
  plain = Transformer(_model().cfg.replace(scalar_head=False))
  params = jax.eval_shape(plain.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  assert 'scalar_head' not in params
  with pytest.raises(ValueError, match='model.scalar_head'):
    jax.eval_shape(lambda p: plain.apply({'params': p}, jnp.zeros((1, 8), jnp.int32),
                                         return_scalar=True), params)
  with pytest.raises(ValueError, match='scalar head'):
    reward_eval.score(plain, params, BYTES, [[{'role': 'user', 'content': 'hi'}]])
  model = _model()
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  from pathways_jax.interop import hf  # pylint: disable=g-import-not-at-top
  with pytest.raises(hf.HFCheckpointError, match='scalar_head=False but the params have'):
    hf.save_pretrained(params, model.cfg.replace(scalar_head=False), '/tmp/never_written')
  # Too long: refused with truncation='error'; by default cut from the left (first token kept),
  # counted, and the reward is that of the cut sequence.
  long = [{'role': 'user', 'content': 'x' * 40}, {'role': 'assistant', 'content': 'yes'}]
  short = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'no'}]
  with pytest.raises(ValueError, match=r'1 of 2 conversations are longer than max_len=32: #0'):
    reward_eval.score(model, params, BYTES, [long, short], max_len=32, truncation='error')
  got, stats = reward_eval.score(model, params, BYTES, [long, short], batch_size=2, max_len=32,
                                 return_stats=True)
  assert stats == {'conversations': 2, 'truncated': 1, 'batches': 1, 'max_len': 32}
  ids, _ = chat.render(BYTES, long)
  cut = np.concatenate([ids[:1], ids[-31:]])
  assert cut[0] == BYTES.bos_id
  want = jax.jit(lambda p, t: model.apply({'params': p}, t, return_scalar=True))(
      params, jnp.asarray(cut)[None])[0, -1]
  np.testing.assert_allclose(got[0], float(want), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- training

def _write_pairs(path, n=400, shuffled=False):
  """'yes' chosen over 'no' whatever the prompt; `shuffled`: the two swapped at random (labels
  that carry no preference)."""
  rng = np.random.default_rng(0)
  with open(path, 'w') as f:
    for _ in range(n):
      a, b = (int(v) for v in rng.integers(0, 10, 2))
      chosen, rejected = ('no', 'yes') if shuffled and rng.random() < 0.5 else ('yes', 'no')
      f.write(json.dumps({'prompt': f'{a}+{b}?', 'chosen': chosen, 'rejected': rejected}) + '\n')


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A causal LM without a head (the reward models' train.init_from), and the pairs. The run
  directory is written as `interop.hf` imports one (config.json, the params as the checkpoint of
  step 0): a freshly initialised model, which is all a reward model's start needs here, without
  the seconds of compiling a pretraining run."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp('rm')
  cfg = tiny_config(str(base / 'cache'))
  model = Transformer(ModelConfig.from_config(cfg.model, vocab_size=264))  # the run's: 260 -> x8
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  (base / 'pre').mkdir()
  (base / 'pre' / 'config.json').write_text(cfg.to_json_best_effort())
  ocp.PyTreeCheckpointer().save(str(base / 'pre' / 'checkpoints' / '0' / 'state'), params)
  _write_pairs(base / 'pairs.jsonl')
  _write_pairs(base / 'shuffled.jsonl', shuffled=True)
  return base


def _rm_cfg(base, **kw):
  return tiny_config(str(base / 'cache'), **{
      'task': 'reward_model', 'model.scalar_head': True, 'data.corpus': 'preference',
      'data.path': str(base / 'pairs.jsonl'), 'data.seq_len': 64, 'data.batch_size': 8,
      'train.init_from': str(base / 'pre'), 'train.steps': 8, 'train.lr': 1e-2,
      'train.warmup_steps': 0, 'train.eval_every': 8, 'train.checkpoint_every': 1000,
      'sample.prompts': (), **kw})


def _train(base, name, **kw):
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  res = loop.train(_rm_cfg(base, **kw), str(base / name), quiet=True)
  assert res['status'] == 'completed'
  return res, logged_losses(base / name)


def test_a_reward_model_learns_a_preference_and_scores_as_it_trained(pretrained):
  res, losses = _train(pretrained, 'rm')
  # The head starts fresh and small on the pretrained backbone: rewards near 0, loss near log 2.
  assert losses[1] == pytest.approx(math.log(2), abs=0.05)
  assert res['val_accuracy'] == 1.0 and res['val_margin'] > 0, res
  assert losses[8] < 0.6 and res['val_loss'] < 0.6, (losses, res)
  # score (the API) == the task's rewards of the same sequences, under the trained params.
  from pathways_jax import tasks  # pylint: disable=g-import-not-at-top
  model, params, tok = reward_eval.load(str(pretrained / 'rm'))
  task = tasks.make(_rm_cfg(pretrained), model)
  fields, _ = pref_data.build_rows([pref_data.render_pair(tok, *pref_data.from_record(
      {'prompt': p, 'chosen': c, 'rejected': r})) for p, c, r in PAIRS], 64, pad_id=tok.pad_id)
  r = jax.jit(task.rewards)(params, {k: jnp.asarray(v) for k, v in fields.items()})
  valid = np.asarray(r['valid'])
  from_task = sorted(zip(np.asarray(r['chosen'])[valid].tolist(),
                         np.asarray(r['rejected'])[valid].tolist()))
  convs = [conv for p, c, r_ in PAIRS for conv in _conversations(p, c, r_)]
  yes_no = [[{'role': 'user', 'content': '4+4?'}, {'role': 'assistant', 'content': a}]
            for a in ('yes', 'no')]
  scored = reward_eval.score(model, params, tok, convs + yes_no, batch_size=4, max_len=32)
  np.testing.assert_allclose(sorted(zip(scored[:6:2], scored[1:6:2])), from_task, rtol=1e-5,
                             atol=1e-5)
  assert scored[6] > scored[7]  # what it learnt: 'yes' over 'no'
  # Exported as a HuggingFace reward model (bias in config.json) and imported back: the same.
  from pathways_jax.interop import hf  # pylint: disable=g-import-not-at-top
  from pathways_jax.interop.hf import run_dir as hf_run_dir  # pylint: disable=g-import-not-at-top
  out = hf_run_dir.export_run(str(pretrained / 'rm'), str(pretrained / 'rm_hf'))
  assert hf.read_config(out)['architectures'] == ['LlamaForSequenceClassification']
  assert hf.read_config(out)[hf.SCORE_BIAS_KEY] == float(params['scalar_head']['bias'])
  assert hf.read_config(out)['pad_token_id'] == tok.pad_id  # how transformers finds the last token
  hf_params, hf_cfg, _ = hf.load_pretrained(out)
  again = reward_eval.score(Transformer(hf_cfg), hf_params, tok, convs + yes_no, batch_size=4,
                            max_len=32)
  np.testing.assert_allclose(again, scored, rtol=1e-5, atol=1e-5)


def test_shuffled_labels_teach_no_preference(pretrained):
  """The same run as the one above, with chosen and rejected swapped at random: the training loss
  stays at log 2 (the learnable run's falls to about 0.5 by step 8)."""
  res, losses = _train(pretrained, 'shuffled', **{'data.path': str(pretrained / 'shuffled.jsonl')})
  late = np.mean([losses[k] for k in (5, 6, 7, 8)])
  assert abs(late - math.log(2)) < 0.03, losses
  assert res['val_loss'] == pytest.approx(math.log(2), abs=0.03)


def test_per_pair_margins_reach_the_loss(pretrained, tmp_path):
  """A line's "margin" is on every token of its pair's two segments (0 for a line without one),
  the task reads it per pair slot, and the loss is -log sigmoid(r_w - r_l - margin) of each pair's
  rewards, computed here in numpy; a training run on such a file works through the pipeline."""
  from pathways_jax import tasks  # pylint: disable=g-import-not-at-top
  from pathways_jax.data.corpora import DataError  # pylint: disable=g-import-not-at-top
  from pathways_jax.tasks.reward_model import pair_margins  # pylint: disable=g-import-not-at-top
  margin_of = {'2+3=': 0.5, '1+1=': 2.0, '6+2=': None}  # the last line gives none
  path = tmp_path / 'margins.jsonl'
  path.write_text(''.join(json.dumps({'prompt': p, 'chosen': c, 'rejected': r,
                                      **({} if margin_of[p] is None else {'margin': margin_of[p]})})
                          + '\n' for p, c, r in PAIRS))
  cfg = _rm_cfg(pretrained, **{'data.path': str(path), 'data.validation_path': str(path)})
  fields, stats = pref_data.load_rows(cfg.data, BYTES, 'train')
  assert fields['margin'].dtype == np.float32 and stats['with_margin'] == 2
  for row in range(len(fields['tokens'])):
    for seg in set(fields['segment_ids'][row].tolist()) - {0}:
      at = fields['segment_ids'][row] == seg
      prompt = next(p for p in margin_of if p in BYTES.decode(fields['tokens'][row][at].tolist()))
      assert (fields['margin'][row][at] == (margin_of[prompt] or 0.0)).all()
  assert (fields['margin'][fields['segment_ids'] == 0] == 0).all()
  batch = {k: jnp.asarray(v) for k, v in fields.items()}
  model = _model()
  params = nn.unbox(jax.jit(model.init)(jax.random.key(2), jnp.zeros((1, 8), jnp.int32))['params'])
  task = tasks.make(cfg, model)
  r = task.rewards(params, batch)
  valid = np.asarray(r['valid'])
  m = np.asarray(pair_margins(batch))[valid]
  assert sorted(m.tolist()) == [0.0, 0.5, 2.0]
  diff = np.asarray(r['chosen'])[valid] - np.asarray(r['rejected'])[valid]
  want = np.mean(np.logaddexp(0.0, -(diff.astype(np.float64) - m)))  # -log sigmoid(d - m)
  loss, _ = task.loss(params, batch, jax.random.key(0))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  plain, _ = task.loss(params, {k: v for k, v in batch.items() if k != 'margin'},
                       jax.random.key(0))
  assert float(loss) > float(plain)  # positive margins ask more of every pair
  # Through the trainer (the float row field in the pipeline's batches).
  res, _ = _train(pretrained, 'rm_margin', **{'data.path': str(path),
                                              'data.validation_path': str(path),
                                              'train.steps': 2, 'train.eval_every': 2})
  assert np.isfinite(res['val_loss'])
  for bad in ('"big"', 'NaN', 'true'):
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": %s}\n' % bad)
    with pytest.raises(DataError, match=r'margins.jsonl:1: "margin" must be a finite number'):
      pref_data.load_rows(cfg.data, BYTES, 'train')


def test_a_lora_reward_model_on_a_bidirectional_backbone_trains_adapters_and_head(pretrained):
  """LoRA, a bidirectional (LLaDA-style) backbone adapted from the causal base, and a fresh head,
  in one run (CI time): it learns the preference, and what it trains is the adapters and the
  head (d_model + 1 values), the base frozen."""
  res, losses = _train(pretrained, 'lora', **{'model.lora_rank': 4, 'model.causal': False,
                                              'train.lr': 3e-2})
  assert res['val_accuracy'] == 1.0 and res['val_margin'] > 0, (res, losses)
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  model, params, _ = reward_eval.load(str(pretrained / 'lora'))
  assert not model.cfg.causal
  adapters = sum(x.size for x in jax.tree_util.tree_leaves(lora.split(params)[1]))
  assert res['trainable_params'] == adapters + model.cfg.d_model + 1
  # The head init_from gave it (interop/hf/run_dir.py: the model's init, key 0) has moved.
  fresh = nn.unbox(ScalarHead(model.cfg).init(jax.random.key(0), jnp.zeros((1, 32))))['params']
  assert np.abs(np.asarray(params['scalar_head']['kernel']) - fresh['kernel']).max() > 1e-2
  from pathways_jax.interop import hf  # pylint: disable=g-import-not-at-top
  from pathways_jax.interop.hf import run_dir as hf_run_dir  # pylint: disable=g-import-not-at-top
  for export in (hf_run_dir.export_run, hf_run_dir.export_adapter):  # no HF class to load it
    with pytest.raises(hf.UnsupportedModel, match='bidirectional reward model'):
      export(str(pretrained / 'lora'), str(pretrained / 'lora_hf'))


def test_a_causal_lora_reward_model_exports_its_adapters_with_the_head(pretrained):
  """`export-adapter` of a LoRA reward model: the adapters and the trained head in PEFT's
  sequence-classification layout (peft loads such a file: tests/golden/hf/check_peft_export.py)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  from pathways_jax.interop import hf  # pylint: disable=g-import-not-at-top
  from pathways_jax.interop.hf import run_dir as hf_run_dir  # pylint: disable=g-import-not-at-top
  _train(pretrained, 'lora_causal', **{'model.lora_rank': 4, 'train.lr': 3e-2})
  out = hf_run_dir.export_adapter(str(pretrained / 'lora_causal'), str(pretrained / 'lora_peft'))
  _, params, _ = reward_eval.load(str(pretrained / 'lora_causal'))
  config = json.loads(open(f'{out}/adapter_config.json').read())
  assert config['task_type'] == 'SEQ_CLS' and config['base_model_name_or_path'] == str(
      pretrained / 'pre')
  with safe_open(f'{out}/adapter_model.safetensors', 'np') as f:
    np.testing.assert_array_equal(f.get_tensor('base_model.model.score.weight')[0],
                                  np.asarray(params['scalar_head']['kernel']))
    assert float(f.metadata()[hf.SCORE_BIAS_KEY]) == float(params['scalar_head']['bias'])
    assert sum(k.endswith('lora_A.weight') for k in f.keys()) == len(
        jax.tree_util.tree_leaves(lora.split(params)[1])) // 2


def test_bad_reward_model_settings_are_named(pretrained):
  from pathways_jax import tasks  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match='model.scalar_head=True'):
    tasks.make(_rm_cfg(pretrained), Transformer(_model().cfg.replace(scalar_head=False)))
  with pytest.raises(ConfigError, match="corpus='preference'"):
    tasks.make(_rm_cfg(pretrained, **{'data.corpus': 'chat'}), _model())
  with pytest.raises(ConfigError, match='center_coef'):
    tasks.make(_rm_cfg(pretrained, **{'reward_model.center_coef': -1.0}), _model())
  with pytest.raises(ValueError, match='not a reward model'):
    reward_eval.load(str(pretrained / 'pre'))
