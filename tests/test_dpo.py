"""The 'dpo' task: preference rows, packed per-pair log-probs, the three kinds of reference."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import logged_losses, tiny_config
from pathways_jax.config import ConfigError
from pathways_jax.data import preference as pref_data
from pathways_jax.data import tokenizers
from pathways_jax.data.corpora import DataError, EmptySplitError
from pathways_jax.models.transformer import Transformer
from pathways_jax.objectives import preference

BYTES = tokenizers.ByteTokenizer()


def _pair(prompt, chosen, rejected):
  return pref_data.render_pair(BYTES, *pref_data.from_record(
      {'prompt': prompt, 'chosen': chosen, 'rejected': rejected}))


def test_pairs_become_adjacent_segments_trained_on_the_responses_only():
  pairs = [_pair('2+3=', '5', '7'), _pair('Who is Ada?', 'A painter.', 'A river.'),
           _pair('same', 'x', 'x')]
  fields, stats = pref_data.build_rows(pairs, 160, pad_id=0)
  assert stats['identical'] == 1 and stats['kept'] == 2 and stats['rows'] == 1
  seg, mask, tok = fields['segment_ids'][0], fields['loss_mask'][0], fields['tokens'][0]
  assert sorted(set(seg.tolist())) == [0, 1, 2, 3, 4]
  for s in (1, 2, 3, 4):
    ids = tok[seg == s]
    assert ids[0] == BYTES.bos_id and fields['positions'][0][seg == s].tolist() == list(
        range(len(ids)))
    trained = BYTES.decode([int(t) for t in ids[mask[seg == s] == 1] if t != BYTES.eos_id])
    assert trained in ('5', '7', 'A painter.', 'A river.')
  # Segment 2k-1 is pair k's chosen side, 2k its rejected side, with the same prompt.
  by_seg = {s: tok[seg == s] for s in (1, 2, 3, 4)}
  for c, r in ((1, 2), (3, 4)):
    mc, mr = mask[seg == c], mask[seg == r]
    np.testing.assert_array_equal(by_seg[c][mc == 0][:-1], by_seg[r][mr == 0][:-1])
  np.testing.assert_array_equal(fields['prompt'][0], (1 - mask) * (seg > 0))


def test_record_shapes_multi_turn_prompts_and_bad_pairs():
  conv = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'},
          {'role': 'user', 'content': 'name?'}]
  implicit = pref_data.from_record({'chosen': conv + [{'role': 'assistant', 'content': 'Ada'}],
                                    'rejected': conv + [{'role': 'assistant', 'content': 'no'}]})
  explicit = pref_data.from_record({'prompt': conv, 'chosen': 'Ada', 'rejected': 'no'})
  assert implicit == explicit
  (ids, mask), _ = pref_data.render_pair(BYTES, *explicit)
  # The prompt's own assistant turn ('hello') is context: only 'Ada' and its eos are trained.
  assert BYTES.decode([int(t) for t in ids[mask == 1] if t != BYTES.eos_id]) == 'Ada'
  with pytest.raises(DataError, match='chosen'):
    pref_data.from_record({'prompt': 'x', 'rejected': 'y'})
  with pytest.raises(DataError, match='share no leading'):
    pref_data.from_record({'chosen': [{'role': 'assistant', 'content': 'a'}],
                           'rejected': [{'role': 'assistant', 'content': 'b'}]})
  # Too long: cut to half a row each while a response token is left, else dropped; all: error.
  long_prompt = _pair('p' * 40, 'yes', 'no')
  fields, stats = pref_data.build_rows([_pair('q' * 10, 'yes', 'no'), long_prompt], 64, pad_id=0)
  assert (stats['truncated'], stats['dropped'], stats['kept']) == (1, 1, 1)
  with pytest.raises(EmptySplitError, match='no preference pair'):
    pref_data.build_rows([long_prompt], 64, pad_id=0)


def _tiny_model_cfg():
  cfg = tiny_config('/tmp/unused')
  from pathways_jax.config import ModelConfig
  return ModelConfig.from_config(cfg.model, vocab_size=264)


def test_packed_pair_logps_equal_each_side_scored_alone():
  """Independent reference: each side run through the model as its own unpacked sequence."""
  pairs = [_pair('2+3=', '5', '7'), _pair('Who is Ada?', 'A painter.', 'A river.'),
           _pair('1+1=', '2', '11')]
  fields, _ = pref_data.build_rows(pairs, 96, pad_id=0)
  model = Transformer(_tiny_model_cfg())
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))['params']
  apply = jax.jit(model.apply)
  logits = apply({'params': params}, jnp.asarray(fields['tokens']),
                       positions_BL=jnp.asarray(fields['positions']),
                       segment_ids_BL=jnp.asarray(fields['segment_ids']))
  got = preference.packed_pair_logps(
      preference.causal_token_logps(logits, jnp.asarray(fields['tokens'])),
      jnp.asarray(fields['loss_mask']), jnp.asarray(fields['segment_ids']))
  # Each side alone, right-padded (a causal model's earlier positions never see the padding).
  sides = [side for pair in pairs for side in pair]
  alone = np.zeros((len(sides), 96), np.int32)
  for i, (ids, _) in enumerate(sides):
    alone[i, :len(ids)] = ids
  logp = np.asarray(jax.nn.log_softmax(apply({'params': params}, jnp.asarray(alone)), -1))
  sums = [sum(float(logp[i, t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])
          for i, (ids, mask) in enumerate(sides)]
  want = [sums[2 * k:2 * k + 2] for k in range(len(pairs))]
  valid = np.asarray(got['valid'])
  assert valid.sum() == 3
  got_pairs = np.stack([np.asarray(got['chosen'])[valid], np.asarray(got['rejected'])[valid]], 1)
  # Rows order pairs by packing; compare as sets of (chosen, rejected).
  np.testing.assert_allclose(sorted(got_pairs.tolist()), sorted(want), rtol=1e-5, atol=1e-5)
  assert np.asarray(got['chosen_tokens'])[valid].sum() == sum(int(c[1].sum()) for c, _ in pairs)


def test_dpo_loss_with_a_mask_is_the_loss_of_the_kept_examples():
  rng = np.random.default_rng(0)
  x = [jnp.asarray(rng.normal(size=6), jnp.float32) for _ in range(4)]
  valid = jnp.asarray([1, 0, 1, 1, 0, 1], bool)
  keep = np.asarray(valid)
  for loss_type in ('sigmoid', 'ipo'):
    got, gm = preference.dpo_loss(*x, loss_type=loss_type, valid_B=valid)
    want, wm = preference.dpo_loss(*(a[keep] for a in x), loss_type=loss_type)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for k in wm:
      np.testing.assert_allclose(float(gm[k]), float(wm[k]), rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda c: preference.dpo_loss(c, *x[1:], loss_type=loss_type,
                                                  valid_B=valid)[0])(x[0])
    assert np.all(np.asarray(grad)[~keep] == 0) and np.all(np.asarray(grad)[keep] != 0)


def _write_pairs(path, n=400):
  """A preference a few steps can learn: 'yes' is chosen over 'no', whatever the prompt."""
  rng = np.random.default_rng(0)
  with open(path, 'w') as f:
    for _ in range(n):
      a, b = (int(v) for v in rng.integers(0, 10, 2))
      f.write(json.dumps({'prompt': f'{a}+{b}?', 'chosen': 'yes', 'rejected': 'no'}) + '\n')


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  from pathways_jax.train import loop
  base = tmp_path_factory.mktemp('dpo')
  loop.train(tiny_config(str(base / 'cache'), **{'train.steps': 2, 'sample.prompts': ()}),
             str(base / 'pre'), quiet=True)
  _write_pairs(base / 'pairs.jsonl')
  return base


def _dpo_cfg(base, **kw):
  return tiny_config(str(base / 'cache'), **{
      'task': 'dpo', 'data.corpus': 'preference', 'data.path': str(base / 'pairs.jsonl'),
      'data.seq_len': 64, 'data.batch_size': 8, 'train.init_from': str(base / 'pre'),
      'train.steps': 8, 'train.lr': 1e-2, 'train.warmup_steps': 0, 'train.eval_every': 8,
      'dpo.beta': 0.5,
      'sample.prompts': (), **kw})


def _train_dpo(base, name, **kw):
  from pathways_jax.train import loop
  res = loop.train(_dpo_cfg(base, **kw), str(base / name), quiet=True)
  losses = logged_losses(base / name)
  # Policy == reference at step 0: every pair's loss is -log sigmoid(0) = log 2.
  assert losses[1] == pytest.approx(math.log(2), abs=1e-6)
  assert res['status'] == 'completed' and max(losses[7], losses[8]) < 0.6, losses
  assert res['val_rewards/accuracies'] == 1.0 and res['val_rewards/margins'] > 0
  return losses


def test_dpo_with_a_frozen_or_a_precomputed_reference_trains_the_same(pretrained):
  frozen = _train_dpo(pretrained, 'frozen')
  precomputed = _train_dpo(pretrained, 'precompute', **{'dpo.precompute': True})
  assert list((pretrained / 'precompute' / 'ref_logps').glob('train-*.npy'))
  np.testing.assert_allclose([precomputed[k] for k in sorted(precomputed)],
                             [frozen[k] for k in sorted(frozen)], rtol=1e-4, atol=1e-5)


def test_dpo_of_a_lora_policy_uses_its_base_as_the_reference(pretrained):
  _train_dpo(pretrained, 'lora', **{'model.lora_rank': 4, 'train.lr': 3e-2})


def test_bad_dpo_settings_are_named_before_training(pretrained):
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  model = Transformer(_tiny_model_cfg())
  with pytest.raises(ConfigError, match='needs a reference'):
    tasks.make(_dpo_cfg(pretrained, **{'train.init_from': ''}), model)
  with pytest.raises(ConfigError, match='label_smoothing'):
    tasks.make(_dpo_cfg(pretrained, **{'dpo.label_smoothing': 0.7}), model)
  with pytest.raises(ConfigError, match="corpus='preference'"):
    tasks.make(_dpo_cfg(pretrained, **{'data.corpus': 'chat'}), model)
  llada = Transformer(ModelConfig.from_config(_dpo_cfg(pretrained).model, vocab_size=264)
                      .replace(causal=False))
  with pytest.raises(ConfigError, match='causal'):
    tasks.make(_dpo_cfg(pretrained), llada)
  assert tasks.make(_dpo_cfg(pretrained, **{'dpo.loss_type': 'simpo',
                                           'train.init_from': ''}), model).needs_ref is False


def test_a_validation_file_replaces_the_hash_split(tmp_path):
  import ml_collections
  from pathways_jax import config as config_lib
  _write_pairs(tmp_path / 'train.jsonl', n=50)
  (tmp_path / 'held.jsonl').write_text(json.dumps({'prompt': 'q', 'chosen': 'a', 'rejected': 'b'})
                                       + '\n')
  data = ml_collections.ConfigDict({'path': str(tmp_path / 'train.jsonl'), 'seq_len': 64,
                                    'validation_path': str(tmp_path / 'held.jsonl')})
  assert pref_data.load_rows(data, BYTES, 'validation')[1]['pairs'] == 1
  assert pref_data.load_rows(data, BYTES, 'train')[1]['pairs'] == 50  # every line trains
  cfg = tiny_config(str(tmp_path), **{'data.validation_path': str(tmp_path / 'held.jsonl')})
  with pytest.raises(ConfigError, match='validation_path'):
    config_lib.validate(cfg)
