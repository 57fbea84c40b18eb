"""The `llada_sft` task and the pre-tokenised rows it trains on (`data.corpus='rows'`).

Both train through the trainer in tests/test_sft.py (chat data) and tests/test_reversal.py (rows).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from numerics import assert_close
from pathways_jax import config as config_lib
from pathways_jax import tasks
from pathways_jax.data import pipeline, rows, tokenizers

MASK = 3
V = 16


class _SpyModel:
  """Fixed logits whatever the input; records the (noisy) input it was given."""

  def __init__(self, logits_BLV):
    self.logits = logits_BLV
    self.seen = []
    self.cfg = config_lib.ModelConfig(vocab_size=V, causal=False)

  def apply(self, variables, tokens_BL, **kwargs):
    del variables, kwargs
    self.seen.append(np.asarray(tokens_BL))
    return self.logits


def _batch():
  """Two one-example rows (bos, prompt, answer, eos padding) and a packed row of two examples."""
  tokens = np.array([[1, 5, 6, 7, 8, 2, 2, 2],
                     [1, 9, 10, 11, 2, 2, 2, 2],
                     [1, 5, 12, 2, 1, 6, 13, 2]], np.int32)
  prompt = np.array([[1, 1, 0, 0, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 1, 1, 0, 0]], np.int32)
  segments = np.array([[1] * 8, [1] * 8, [1, 1, 1, 1, 2, 2, 2, 2]], np.int32)
  positions = np.array([list(range(8)), list(range(8)), [0, 1, 2, 3, 0, 1, 2, 3]], np.int32)
  return {'tokens': tokens, 'prompt': prompt, 'segment_ids': segments, 'positions': positions}


def _task(sft_fraction, logits):
  cfg = config_lib.base_config()
  cfg.task = 'llada_sft'
  cfg.data.mask_id = MASK
  cfg.diffusion.eps = 1.0  # p_mask = 1: every token that may be masked is, so the loss is closed-form
  cfg.llada_sft.sft_fraction = sft_fraction
  model = _SpyModel(logits)
  return tasks.make(cfg, model), model


def _ce(logits_BLV, tokens_BL):
  lp = logits_BLV - np.log(np.exp(logits_BLV).sum(-1, keepdims=True))
  return -np.take_along_axis(lp, tokens_BL[..., None], -1)[..., 0]


@pytest.mark.parametrize('sft_fraction', [1.0, 0.0, 0.5])
def test_the_loss_against_a_plain_computation(sft_fraction):
  b = _batch()
  logits = np.random.default_rng(0).normal(size=(3, 8, V)).astype(np.float32)
  task, spy = _task(sft_fraction, jnp.asarray(logits))
  loss, metrics = task.loss(None, {k: jnp.asarray(v) for k, v in b.items()}, jax.random.key(3))
  noisy = spy.seen[-1]
  bos = b['positions'] == 0
  prompt = b['prompt'].astype(bool)
  # A row is an SFT row iff its prompt came through unmasked (every other maskable token is masked).
  sft_row = np.array([not (noisy[i][prompt[i] & ~bos[i]] == MASK).any() for i in range(3)])
  if sft_fraction == 1.0:
    assert sft_row.all()
  if sft_fraction == 0.0:
    assert not sft_row.any()
  want_input = np.where(bos | (prompt & sft_row[:, None]), b['tokens'], MASK)
  np.testing.assert_array_equal(noisy, want_input)
  ce = _ce(logits, b['tokens'])
  seg = b['segment_ids']
  # Each example (a row, or a segment of the packed row) is its own answer-length mean.
  sft_rows = [ce[i][~prompt[i] & (seg[i] == s)].sum() / (~prompt[i] & (seg[i] == s)).sum()
              for i in range(3) if sft_row[i] for s in np.unique(seg[i])]
  pt_rows = [i for i in range(3) if not sft_row[i]]
  pt_num = sum(ce[i][~bos[i]].sum() for i in pt_rows)
  pt_den = sum((~bos[i]).sum() for i in pt_rows)
  sft = np.mean(sft_rows) if sft_rows else 0.0
  pt = pt_num / pt_den if pt_rows else 0.0
  want = sft if sft_fraction == 1.0 else (1 - sft_fraction) * pt + sft_fraction * sft
  assert_close(loss, want, terms=8 * V)
  # Its units: examples with an answer (4) for pure SFT, else rows (3).
  assert float(metrics[tasks.COUNT]) == (4 if sft_fraction == 1.0 else 3)


def test_a_causal_model_and_a_bad_fraction_are_refused():
  cfg = config_lib.base_config()
  cfg.task = 'llada_sft'
  model = _SpyModel(None)
  model.cfg = model.cfg.replace(causal=True)
  with pytest.raises(config_lib.ConfigError, match='bidirectional'):
    tasks.make(cfg, model)
  cfg.llada_sft.sft_fraction = 1.5
  with pytest.raises(config_lib.ConfigError, match='sft_fraction'):
    tasks.make(cfg, _SpyModel(None))


def _rows_config(tmp_path, path):
  c = tiny_config(str(tmp_path / 'cache'), **{'data.corpus': 'rows', 'data.path': str(path),
                                              'data.seq_len': 8, 'data.batch_size': 2})
  return c


def test_rows_are_served_once_per_epoch_with_their_fields_and_resume(tmp_path):
  path = tmp_path / 'rows.npz'
  tokens = np.arange(6 * 8, dtype=np.int32).reshape(6, 8) % 200 + 4
  prompt = (np.arange(8) < 3).astype(np.int32)[None].repeat(6, 0)
  rows.save_rows(str(path), train={'tokens': tokens, 'prompt': prompt})
  cfg = _rows_config(tmp_path, path)
  config_lib.validate(cfg)
  tok = tokenizers.ByteTokenizer()
  it = pipeline.make_train_iterator(cfg, tok)
  epoch = [next(it) for _ in range(3)]
  assert set(epoch[0]) == {'tokens', 'prompt', 'segment_ids', 'positions'}
  seen = np.concatenate([x['tokens'] for x in epoch])
  np.testing.assert_array_equal(np.sort(seen[:, 0]), np.sort(tokens[:, 0]))  # each row once
  for x in epoch:
    np.testing.assert_array_equal(x['segment_ids'], 1)
    np.testing.assert_array_equal(x['positions'], np.tile(np.arange(8), (2, 1)))
    np.testing.assert_array_equal(x['prompt'], prompt[:2])
  state = it.get_state()
  after = [next(it)['tokens'] for _ in range(2)]
  it2 = pipeline.make_train_iterator(cfg, tok)
  it2.set_state(state)
  for want in after:
    np.testing.assert_array_equal(next(it2)['tokens'], want)
  assert pipeline.make_eval_batches(cfg, tok) == []  # no validation split in the file


def test_bad_rows_files_are_named(tmp_path):
  tok = tokenizers.ByteTokenizer()
  good = np.full((4, 8), 5, np.int32)
  cases = {
      'missing.npz': (None, 'not a readable rows file'),
      'too_long.npz': ({'tokens': np.full((4, 9), 5, np.int32)}, 'rows of 9 tokens'),
      'out_of_range.npz': ({'tokens': np.full((4, 8), 10_000, np.int32)}, 'token id 10000'),
      'ragged.npz': ({'tokens': good, 'prompt': np.zeros((4, 7), np.int32)}, 'train/prompt'),
      'empty.npz': ({'tokens': np.zeros((0, 8), np.int32)}, 'empty'),
  }
  for name, (fields, match) in cases.items():
    path = tmp_path / name
    if fields is not None:
      rows.save_rows(str(path), train=fields)
    with pytest.raises(ValueError, match=match):
      pipeline.make_train_iterator(_rows_config(tmp_path, path), tok)
  cfg = _rows_config(tmp_path, tmp_path / 'x.npz')
  cfg.data.tokenizer = 'sentencepiece'
  with pytest.raises(config_lib.ConfigError, match='tokenizer_path'):
    config_lib.validate(cfg)


def test_packed_chat_rows_are_warned_about(tmp_path, caplog):
  """LLaDA learns where an answer ends from trained eos padding; packed chat rows have none."""
  model = _SpyModel(np.zeros((1, 4, V), np.float32))
  for pack, eos_padding, warned in ((True, False, True), (False, True, False)):
    caplog.clear()
    cfg = tiny_config(str(tmp_path), **{'task': 'llada_sft', 'objective': 'diffusion',
                                         'model.causal': False, 'data.corpus': 'chat',
                                         'data.chat.pack': pack,
                                         'data.chat.eos_padding': eos_padding})
    with caplog.at_level('WARNING'):
      tasks.make(cfg, model)
    assert ('eos_padding=True' in caplog.text) == warned, caplog.text
