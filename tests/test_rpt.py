"""Reinforcement Pre-Training: the prompts (pathways_jax.rl.rpt), its reward, its evaluation, and
experiments/rpt.py end to end."""
import json
import os

import numpy as np
import pytest

from grpo_helpers import _cfg, _metrics, base  # pylint: disable=unused-import
from pathways_jax.config import ConfigError
from pathways_jax.rl import prompts as prompts_lib
from pathways_jax.rl import rewards as rewards_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def _log_softmax(logits):
  logp = np.asarray(logits, np.float64)
  logp = logp - logp.max(-1, keepdims=True)
  return logp - np.log(np.exp(logp).sum(-1, keepdims=True))


def _entropies(model, params, ids):
  """Entry t: the entropy of the prediction of ids[t] from ids[:t] alone (plain forward, numpy);
  0 at t = 0."""
  logp = _log_softmax(model.apply({'params': params}, np.asarray(ids)[None])[0])
  return np.concatenate([[0.0], -(np.exp(logp) * logp).sum(-1)[:-1]])


def test_rpt_next_token_reward_is_a_prefix_match_on_token_boundaries():
  rec = {'continuation': ' the cat sat', 'boundaries': [4, 8, 12]}  # ' the', ' cat', ' sat'
  got = {t: rewards_lib.next_token(rec, t)
         for t in ('the', ' the', 'the cat', 'the c', 'the dog', '', 'the cat sat', 'cat')}
  assert got == {'the': 1, ' the': 1, 'the cat': 1, 'the c': 0, 'the dog': 0, '': 0,
                 'the cat sat': 1, 'cat': 0}
  # Whitespace that is a token of its own is part of the decision: predicting it earns the
  # reward, skipping it to the word after does not (that is no prefix of the continuation).
  code = {'continuation': '\n    return x', 'boundaries': [1, 5, 11, 13]}
  got = {t: rewards_lib.next_token(code, t)
         for t in ('\n', '\n    ', '\n    return', 'return', '    return', '\n  ', ' ')}
  assert got == {'\n': 1, '\n    ': 1, '\n    return': 1, 'return': 0, '    return': 0,
                 '\n  ': 0, ' ': 0}


def test_rpt_prompts_are_the_proxys_hardest_positions_and_train(base, tmp_path):
  """pathways_jax.rl.rpt: the proxy's entropies against a plain forward pass and numpy, the
  chosen positions the top ones, the records' texts the document's; then a 2-step RL run."""
  from pathways_jax.rl import rpt
  from pathways_jax.sample import load_run
  _, model, params, tok = load_run(str(base / 'pre'))
  docs = ['Ada lives in Paris. She likes tea and long walks.', 'Bob met Ada in Rome.']
  records, counts = rpt.make_records(model, params, tok, docs, per_document=2, context=16,
                                     continuation=3, min_context=4, width=48, batch_size=4)
  assert counts['documents'] == 2 and len(records) + counts['empty'] == 4
  assert counts['empty'] <= 1, counts
  for d, doc in enumerate(docs):
    ids = prompts_lib.raw_text_ids(tok, doc)
    logits = np.asarray(model.apply({'params': params}, ids[None]), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    h = np.concatenate([[0.0], -(np.exp(logp) * logp).sum(-1)[:-1]])
    want = sorted(sorted(range(4, len(ids)), key=lambda t: (-h[t], t))[:2])
    mine = [r for r in records if r['document'] == d]
    # every chosen position is one of the top two (a position whose continuation decodes to
    # nothing is skipped and counted)
    assert mine and set(r['position'] for r in mine) <= set(want)
    for r in mine:
      t = r['position']
      assert r['entropy'] == pytest.approx(h[t], rel=1e-4, abs=1e-5)
      assert r['text'] == tok.decode(ids[max(1, t - 16):t])
      assert r['continuation'] == tok.decode(ids[t:t + 3])
      assert rewards_lib.next_token(r, r['continuation']) == 1.0
  # The command writes the file a run trains on (one new token: the next-token decision).
  out = tmp_path / 'rpt.jsonl'
  assert rpt.main([f'--proxy={base / "pre"}', f'--out={out}', '--documents=6', '--context=24',
                   '--per_document=3']) == 0
  from pathways_jax.train import loop
  res = loop.train(_cfg(base, **{'data.path': str(out), 'rl.rewards': 'next_token',
                                 'rl.max_new_tokens': 1, 'train.steps': 2}),
                   str(tmp_path / 'rl'), quiet=True)
  m = _metrics(tmp_path / 'rl')
  assert res['status'] == 'completed' and 0 <= m[0]['reward/next_token'] <= 1
  assert m[0]['completion_length'] == 1


def test_long_documents_are_read_in_windows_each_scored_on_its_own(base):
  """windows=0: every `width`-token window of a document is scored by a forward pass of that
  window alone (entropies from numpy, independent of the batching); per_document positions per
  window, each record's continuation ids the document's."""
  from pathways_jax.rl import rpt
  from pathways_jax.sample import load_run
  _, model, params, tok = load_run(str(base / 'pre'))
  doc = 'Ada lives in Paris. She likes tea and long walks by the river at night. ' * 2
  ids = prompts_lib.raw_text_ids(tok, doc)
  width = 40
  assert len(ids) > 3 * width  # the byte tokenizer: four windows, the last one short
  records, counts = rpt.make_records(model, params, tok, [doc], per_document=2, context=16,
                                     continuation=3, min_context=4, width=width, batch_size=3,
                                     windows=0)
  starts = list(range(0, len(ids), width))
  assert counts['windows'] == len(starts) and len(records) + counts['empty'] == 2 * len(starts)
  for start in starts:
    window = ids[start:start + width]
    h = _entropies(model, params, window)
    lo = 4  # min_context (>= 1 past bos in the first window)
    want = sorted(sorted(range(lo, len(window)), key=lambda t: (-h[t], t))[:2])
    mine = [r for r in records if start <= r['position'] < start + width]
    assert {r['position'] - start for r in mine} <= set(want) and mine
    for r in mine:
      t = r['position']
      assert r['entropy'] == pytest.approx(h[t - start], rel=1e-4, abs=1e-5)
      assert r['continuation_ids'] == [int(i) for i in ids[t:t + 3]]
      assert r['text'] == tok.decode(ids[max(1, t - 16):t])
  # windows=1 (the default) reads the first window only.
  first, counts1 = rpt.make_records(model, params, tok, [doc], per_document=2, context=16,
                                    continuation=3, min_context=4, width=width)
  assert counts1['windows'] == 1 and all(r['position'] < width for r in first)
  for bad in ('--windows=-1', '--select=easiest'):
    with pytest.raises(SystemExit):  # argparse's one-line error
      rpt.main([f'--proxy={base / "pre"}', '--out=/nonexistent/x.jsonl', bad])


def test_random_positions_are_uniform_over_each_window_and_seeded(base):
  from pathways_jax.rl import rpt
  from pathways_jax.sample import load_run
  _, model, params, tok = load_run(str(base / 'pre'))
  docs = ['Bob met Ada in Rome and they spoke of the old city walls for hours.'] * 3
  kw = dict(per_document=3, context=8, continuation=2, min_context=5, width=48, select='random',
            windows=0)
  a, _ = rpt.make_records(model, params, tok, docs, seed=1, **kw)
  b, _ = rpt.make_records(model, params, tok, docs, seed=1, **kw)
  c, _ = rpt.make_records(model, params, tok, docs, seed=2, **kw)
  assert a == b and [r['position'] for r in a] != [r['position'] for r in c]
  assert all(r['position'] % 48 >= 5 for r in a)
  # Over many draws every allowed position of a window turns up, none outside it.
  rng = np.random.default_rng(0)
  seen = {t for _ in range(300) for t in rpt.random_positions(12, k=3, min_context=5, rng=rng)}
  assert seen == set(range(5, 12))
  with pytest.raises(ValueError, match='select'):
    rpt.make_records(model, params, tok, docs, **{**kw, 'select': 'easiest'})


class _Bigram:
  """A stand-in model whose logits at each position are a fixed random row per input token, so
  the reference for any prompt is the row of its last token."""

  def __init__(self, vocab: int):
    self.table_VV = np.random.default_rng(0).normal(size=(vocab, vocab)).astype(np.float32) * 3

  def apply(self, variables, tokens_BL, segment_ids_BL=None):
    del segment_ids_BL
    return variables['params']['table'][tokens_BL]


def test_next_token_scores_are_the_greedy_decision_and_the_true_tokens_nll(base):
  """Right-padded batches against each prompt's last-token row (numpy log-softmax): a record
  made to continue with the argmax scores 1, one with the runner-up 0, and the NLL is the
  target's. The real model runs through it in the experiment's test below."""
  from pathways_jax.rl import rpt
  from pathways_jax.sample import load_run
  _, _, _, tok = load_run(str(base / 'pre'))
  model = _Bigram(tok.vocab_size)
  params = {'table': model.table_VV}
  line = 'Ada lives in Paris. She likes tea and long walks by the river. Tell me 3 things.'
  records = []
  for text in (line[:n] for n in range(4, len(line), 3)):
    ids = prompts_lib.raw_text_ids(tok, text)
    logp = _log_softmax(model.table_VV[ids[-1]])
    best, other = (int(i) for i in np.argsort(logp)[::-1][:2])
    pieces = tok.decode([best]), tok.decode([other])
    if not all(p.strip() for p in pieces) or pieces[0].strip() == pieces[1].strip():
      continue  # the reward sets leading whitespace aside: a blank guess earns nothing
    for target, want in ((best, 1.0), (other, 0.0)):
      piece = tok.decode([target])
      records.append({'text': text, 'continuation': piece, 'continuation_ids': [target],
                      'boundaries': [len(piece)], 'want_nll': -logp[target], 'want': want,
                      'want_exact': want})
    # The true token a newline, the argmax the word after it: neither rule counts it; the
    # newline as the truth for a record of the argmax itself: both do.
    newline = int(tok.encode('\n')[0])
    records.append({'text': text, 'continuation': '\n' + pieces[0], 'continuation_ids':
                    [newline, best], 'boundaries': [1, 1 + len(pieces[0])],
                    'want_nll': -logp[newline], 'want': 0.0, 'want_exact': 0.0})
  assert len(records) >= 12, 'too few prompts whose greedy token is printable'
  got = rpt.next_token_scores(model, params, tok, records, width=96, batch_size=3)
  np.testing.assert_allclose(got['nll'], [r['want_nll'] for r in records], rtol=1e-5)
  assert list(got['correct']) == [r['want'] for r in records]
  assert list(got['exact']) == [r['want_exact'] for r in records]
  with pytest.raises(ValueError, match='prompt is'):
    rpt.next_token_scores(model, params, tok, records[-1:], width=4)


def test_the_rpt_experiment_trains_its_four_arms_from_one_base_and_scores_them(tmp_path):
  """experiments/rpt.py end to end at toy size: the prompt sets from the base as proxy, each RL
  arm started from the base with its reward, the supervised arm's examples the prompts' true
  next tokens, the scores per set, and a second call that trains nothing."""
  from pathways_jax import config_files
  from pathways_jax.train import loop
  exp = config_files.load_config_module(os.path.join(_HERE, '..', 'experiments', 'rpt.py'))
  cfg = exp.get_config()
  cfg.model.attention = 'xla'
  cfg.data.max_documents = 6
  cfg.rpt_exp.update(base_steps=6, steps=2, eval_every=2, train_windows=1, prompts=4)
  cfg.rl.update(num_generations=2, eval_max=8)
  cfg.data.update(tokenizer='byte', cache_dir=str(tmp_path / 'cache'))
  cfg.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64)
  res = exp.run(cfg, str(tmp_path / 'w'))
  assert res['status'] == 'completed' and res['arms'] == ['rpt', 'rpt_random', 'ntp', 'sft_hard']
  counts = res['counts']
  # as many positions drawn per window; those whose continuation is blank are skipped in both
  assert min(counts['validation_hard'], counts['validation_random'], counts['train']) > 0
  for name in ('base', 'rpt', 'rpt_random', 'ntp', 'sft_hard'):
    for s in ('validation_hard', 'validation_random', 'train'):
      v = res['scores'][name][s]
      assert 0 <= v['accuracy'] <= 1 and v['nll'] > 0
      assert v['n'] == (counts[s] if s != 'train' else
                        min(counts['train'], counts['validation_hard']))
  for arm in ('rpt', 'rpt_random'):
    run_cfg = json.load(open(tmp_path / 'w' / arm / 'config.json'))
    assert run_cfg['train']['init_from'] == str(tmp_path / 'w' / 'base')
    assert run_cfg['rl']['rewards'] == ('next_token' if arm == 'rpt' else 'random')
    assert _metrics(tmp_path / 'w' / arm)[0]['completion_length'] == 1
  assert res['curves']['rpt']['reward/next_token'] and res['curves']['ntp']['loss']
  # sft_hard: the training prompts as raw-text examples whose completion is the true next token
  assert counts['train_sft'] == counts['train'] and res['curves']['sft_hard']['loss']
  run_cfg = json.load(open(tmp_path / 'w' / 'sft_hard' / 'config.json'))
  assert run_cfg['task'] == 'sft' and run_cfg['data']['path'].endswith('train_sft.jsonl')
  from pathways_jax.sample import load_run
  tok = load_run(str(tmp_path / 'w' / 'base'))[3]
  with open(tmp_path / 'w' / 'prompts' / 'train.jsonl') as f:
    prompts = [json.loads(line) for line in f]
  with open(tmp_path / 'w' / 'prompts' / 'train_sft.jsonl') as f:
    examples = [json.loads(line) for line in f]
  for p, e in zip(prompts, examples):
    assert e == {'text': p['text'], 'completion': tok.decode(p['continuation_ids'][:1])}
    assert p['continuation'].startswith(e['completion'])
  with open(tmp_path / 'w' / 'prompts' / 'validation_hard.jsonl') as f:
    hard = [json.loads(line) for line in f]
  with open(tmp_path / 'w' / 'prompts' / 'validation_random.jsonl') as f:
    rand = [json.loads(line) for line in f]
  assert np.mean([r['entropy'] for r in hard]) > np.mean([r['entropy'] for r in rand])
  # Every stage is done: a second call trains nothing and gives the same scores.
  trained = []
  real = loop.train
  try:
    loop.train = lambda *a, **k: trained.append(1) or real(*a, **k)
    again = exp.run(cfg, str(tmp_path / 'w'))
  finally:
    loop.train = real
  assert not trained and again['scores'] == res['scores']


@pytest.mark.parametrize('override, message', [
    ({'rpt_exp.arms': 'rpt,sft'}, 'rpt_exp.arms'),
    ({'rpt_exp.arms': ''}, 'rpt_exp.arms'),
    ({'rpt_exp.per_window': 0}, 'rpt_exp.per_window'),
])
def test_the_rpt_experiment_refuses_bad_settings_before_any_stage(tmp_path, override, message):
  from pathways_jax import config_files
  exp = config_files.load_config_module(os.path.join(_HERE, '..', 'experiments', 'rpt.py'))
  cfg = exp.get_config()
  for k, v in override.items():
    section, key = k.split('.')
    cfg[section][key] = v
  with pytest.raises(ConfigError, match=message):
    exp.run(cfg, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'base')


@pytest.mark.slow
def test_rpt_does_not_beat_the_label_on_the_same_hard_tokens_three_seeds(tmp_path):
  """experiments/rpt.py at its defaults, seeds 0-2 (1000-step base, 300 steps per arm).

  Asserts the claims at the level docs/rl.md and the README state them (measured 2026-12-08,
  exact accuracy on held-out hard tokens: RPT 0 / -2.5 / -1.8 points, supervised on the same
  tokens +6.5 / +8.3 / +2.2, continued pretraining +4.3 / +3.3 / +3.2, the coin -17 to -21;
  RPT's true-token NLL +0.8 to +1.1 nats; its training prompts +2.2 to +4.3): on every seed RPT
  gains less than a point on the hard tokens (if anything), both label-trained arms gain 2
  points or more and lower the NLL that RPT raises by half a nat or more, RPT learns its
  training prompts, and the coin loses 10 points or more.
  """
  from pathways_jax import config_files
  exp = config_files.load_config_module(os.path.join(_HERE, '..', 'experiments', 'rpt.py'))
  for seed in range(3):
    cfg = exp.get_config()
    cfg.seed = seed
    sc = exp.run(cfg, str(tmp_path / f's{seed}'))['scores']
    change = lambda m, s, k='exact': sc[m][s][k] - sc['base'][s][k]  # pylint: disable=cell-var-from-loop
    assert change('rpt', 'validation_hard') < 0.01, sc
    for arm in ('ntp', 'sft_hard'):
      assert change(arm, 'validation_hard') >= 0.02, (arm, sc)
      assert change(arm, 'validation_hard', 'nll') < 0, (arm, sc)
    assert change('rpt', 'validation_hard', 'nll') >= 0.5, sc
    assert change('rpt', 'train') > 0, sc
    assert change('rpt_random', 'validation_hard') <= -0.10, sc
