"""The 'grpo' task: rollouts inside the loop, rewards, advantages, minibatches, references,
dynamic sampling, held-out evaluation, exact resume and bad input (LLaDA policies:
tests/test_diffu_grpo.py)."""
import json
import types
import zlib

import jax
import numpy as np
import pytest

from grpo_helpers import BYTES, NEW, _by_step, _cfg, _hashed, _metrics, base  # pylint: disable=unused-import
from helpers import assert_resume_is_exact, tiny_config
from pathways_jax import config as config_lib
from pathways_jax.config import ConfigError
from pathways_jax.objectives import preference
from pathways_jax.rl import batch as batch_lib
from pathways_jax.rl import prompts as prompts_lib
from pathways_jax.rl import rewards as rewards_lib


def test_training_rows_score_the_tokens_the_sampler_drew(base):
  """Independent reference: the KV-cache sampler's own log-probs of what it drew. The training
  layout (left-padded prompt, segment ids, positions) must give the same numbers."""
  from pathways_jax.sample import load_run
  from pathways_jax.sampling.rollout import rollout
  from pathways_jax import parallel
  cfg, model, params, tok = load_run(str(base / 'pre'))
  fields, counts = prompts_lib.load_rows(_cfg(base).data, tok, 'train')
  assert counts == {'prompts': 40, 'too_long': 0}
  mesh = parallel.make_mesh(cfg)
  prompt, mask = fields['tokens'][:3], fields['segment_ids'][:3]
  ro = rollout(model, params, prompt, mask, key=jax.random.key(1), mesh=mesh,
               rules=parallel.logical_rules(cfg), num_samples=2, max_new_tokens=NEW,
               temperature=0.7, eos_id=tok.eos_id, pad_id=tok.pad_id)
  rows = batch_lib.training_rows(np.repeat(mask, 2, axis=0), np.asarray(ro.tokens_BT),
                                 np.asarray(ro.completion_mask_BN))
  logits = model.apply({'params': params}, rows['tokens'], positions_BL=rows['positions'],
                       segment_ids_BL=rows['segment_ids'])
  logp = np.asarray(preference.causal_token_logps(logits / 0.7, rows['tokens']))[:, 48:]
  cm = np.asarray(ro.completion_mask_BN)
  np.testing.assert_allclose(logp[cm], np.asarray(ro.logprobs_BN)[cm], atol=2e-5)
  assert (rows['completion_mask'][:, 48:] == cm).all() and rows['completion_mask'][:, :48].sum() == 0


def test_grpo_raises_a_learnable_reward(base):
  from pathways_jax.train import loop
  # The prompts are their own held-out set here: answered greedily at the end, every reward
  # but 'random' scored (val_<reward>, in results.json too).
  res = loop.train(_cfg(base, **{'data.validation_path': str(base / 'prompts.jsonl'),
                                 'rl.rewards': 'spaces,correct:0', 'rl.eval_batch': 16}),
                   str(base / 'learn'), quiet=True)
  reward = _by_step(base / 'learn', 'reward')
  assert res['status'] == 'completed' and sorted(reward) == list(range(1, 13))
  assert res['tokens'] == 12 * (4 * 8) * (48 + NEW)  # rollout rows: prompt budget + completion
  assert res['val_correct'] == 0 and res['val_spaces'] > 0.2, res  # no answer is 'x'
  assert _by_step(base / 'learn', 'val_spaces') == {12: res['val_spaces']}
  first, last = np.mean([reward[s] for s in (1, 2, 3)]), np.mean([reward[s] for s in (10, 11, 12)])
  assert last > first + 0.2, reward
  m = _metrics(base / 'learn')[0]
  # On-policy (one update per rollout): the ratio is exactly 1, nothing is clipped.
  assert m['ratio/mean'] == pytest.approx(1.0, abs=1e-6) and m['clip_ratio/region_mean'] == 0
  for key in ('completion_length', 'finished', 'zero_std_groups', 'entropy', 'time_rollout_s',
              'time_reward_s', 'time_update_s', 'reward/spaces', 'reward_failures'):
    assert key in m, key


def test_wd1_raises_a_learnable_reward_without_old_policy_log_probs(base, tmp_path, monkeypatch):
  """rl.loss='wd1' (objectives.rl.wd1_loss): two minibatches per rollout, so each step sees half
  the groups, with the weights made from whole groups before the split; no forward pass for old
  log-probs is made (wd1 reads no ratio). The reward rises as GRPO's does."""
  from pathways_jax.tasks import grpo
  from pathways_jax.train import loop
  calls = []
  real = grpo.GrpoTask._forward_logps
  monkeypatch.setattr(grpo.GrpoTask, '_forward_logps',
                      lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
  res = loop.train(_cfg(base, **{'rl.loss': 'wd1', 'rl.minibatches': 2, 'train.steps': 24}),
                   str(tmp_path / 'wd1'), quiet=True)
  assert res['status'] == 'completed' and not calls
  reward = _by_step(tmp_path / 'wd1', 'reward')
  first = np.mean([reward[s] for s in (1, 3, 5)])
  last = np.mean([reward[s] for s in (19, 21, 23)])
  assert last > first + 0.2, reward
  m = _metrics(tmp_path / 'wd1')[0]
  assert 0 < m['wd1/weight_abs_mean'] and 'seq_logp/mean' in m and 'ratio/mean' not in m


def test_minibatches_and_prorl_resets_resume_exactly_on_rollout_boundaries(base, tmp_path):
  """Two optimizer steps per rollout; ProRL resets every 4 steps and whenever the held-out score
  (val_one, the first reward's: constant, so never a new best) has not improved for one
  evaluation since the best or the last reset; interrupted and resumed."""
  make = lambda **kw: _cfg(base, **{
      'train.steps': 8, 'rl.minibatches': 2, 'rl.beta': 0.5, 'rl.reset_every': 4,
      'rl.reset_on_stall': 1, 'rl.rewards': 'one:0,spaces', 'train.eval_every': 1,
      'data.validation_path': str(base / 'prompts.jsonl'), 'rl.eval_max': 2, 'rl.eval_batch': 2,
      'train.checkpoint_every': 2, **kw})
  assert_resume_is_exact(make, tmp_path, sigterm_at=4, stop_at=6)
  full, part = tmp_path / 'full', tmp_path / 'part'
  ratio, kl = _by_step(full, 'ratio/mean'), _by_step(full, 'kl')
  # The first part of each rollout is trained by the policy that sampled it: ratio 1; the
  # second by the updated one.
  assert ratio[1] == pytest.approx(1.0, abs=1e-5) and ratio[3] == pytest.approx(1.0, abs=1e-5)
  assert abs(ratio[2] - 1.0) > 1e-4
  # Resets: at 4 (scheduled; stalled too: evals 2, 3 after the best at 1), at 6 (stalled: eval 5
  # after the reset at 4; the run resumed at 6 must still know it) and at 8. The step after a
  # reset scores the policy against itself: KL 0; it grows between.
  assert _by_step(full, 'reference_reset') == {4: 4.0, 6: 6.0, 8: 8.0}
  assert _by_step(full, 'reference_reset_stall') == {4: 1.0, 6: 1.0, 8: 1.0}
  # (0 to rounding: the two forward passes of the same params may round apart, 1e-15 seen)
  assert max(kl[1], kl[5], kl[7]) < 1e-12 and min(kl[4], kl[6]) > 1e-4, kl
  assert sorted(p.name for p in (part / 'reference_resets').iterdir()) == ['4', '6', '8']
  for key in ('reward', 'kl', 'val_spaces'):
    assert _by_step(part, key) == _by_step(full, key), key
  from pathways_jax.train import loop
  with pytest.raises(ConfigError, match='rollout boundaries'):
    loop.train(make(**{'train.checkpoint_every': 3}), str(tmp_path / 'bad'), quiet=True)
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  model = Transformer(ModelConfig.from_config(_cfg(base).model, vocab_size=264))
  with pytest.raises(ConfigError, match='beta > 0'):
    tasks.make(_cfg(base, **{'rl.reset_every': 4}), model)
  with pytest.raises(ConfigError, match='validation_path'):
    tasks.make(_cfg(base, **{'rl.reset_on_stall': 2, 'rl.beta': 0.1}), model)


@pytest.mark.parametrize('quantize', ['', 'nf4'])
def test_a_lora_policy_is_held_to_its_own_base(base, tmp_path, quantize):
  """A LoRA policy's reference is its own base with the adapters off; a QLoRA policy's is its
  quantised base, which the loss, the sampler and the reference all read: the KL is 0 at the
  first step both in the loss and as a reward penalty from the sampler's own log-probs."""
  from pathways_jax.train import loop
  lora = {'model.lora_rank': 4, 'rl.beta': 0.1, 'train.steps': 4, 'train.lr': 3e-2,
          'model.lora_quantize': quantize, 'model.lora_quantize_block': 16}
  res = loop.train(_cfg(base, **lora), str(tmp_path / 'lora'), quiet=True)
  kl = _by_step(tmp_path / 'lora', 'kl')
  assert kl[1] == pytest.approx(0.0, abs=1e-7) and kl[4] > 1e-6, kl
  assert res['trainable_params'] < res['params'] // 4
  assert (res.get('qlora') or {}).get('qtype') == (quantize or None)
  # The same KL as a reward penalty: the completions' summed log-ratio, 0 at the start.
  loop.train(_cfg(base, **lora, **{'rl.kl_penalty': 'reward'}), str(tmp_path / 'kl_reward'),
             quiet=True)
  seq = _by_step(tmp_path / 'kl_reward', 'kl_sequence')
  assert abs(seq[1]) < 1e-5 and max(seq[2], seq[3], seq[4]) > 1e-2, seq
  assert 'kl' not in _metrics(tmp_path / 'kl_reward')[0]  # not in the loss


def test_ppo_value_head_learns_the_returns_while_the_reward_rises(base):
  """PPO (rl.scale='gae'): a value head on the policy's backbone, added fresh to a start model
  without one; two minibatches per rollout and the per-token KL penalty in the reward. The
  constant reward 'one' puts the returns near 1, far from the fresh head's values."""
  from pathways_jax.train import loop
  res = loop.train(_cfg(base, **{'rl.scale': 'gae', 'model.scalar_head': True,
                                 'rl.minibatches': 2, 'rl.beta': 0.02,
                                 'rl.kl_penalty': 'reward', 'train.steps': 16,
                                 'rl.rewards': 'spaces,one'}),
                   str(base / 'ppo'), quiet=True)
  assert res['status'] == 'completed'
  got = {k: _by_step(base / 'ppo', k) for k in ('reward', 'value_loss', 'value_mean',
                                                   'return_mean', 'ratio/mean')}
  reward, vloss, value, returns = (got[k] for k in ('reward', 'value_loss', 'value_mean',
                                                    'return_mean'))
  assert reward[1] == reward[2] and reward[3] == reward[4]  # a rollout feeds two steps
  first, last = np.mean([reward[s] for s in (1, 3, 5)]), np.mean([reward[s] for s in (11, 13, 15)])
  assert last > first + 0.1, got
  # The value head learns the returns: far at step 1, close at the end; its loss falls 5x.
  assert abs(value[1] - returns[1]) > 0.5 and abs(value[16] - returns[16]) < 0.25, got
  assert np.mean([vloss[s] for s in (14, 15, 16)]) < 0.2 * np.mean([vloss[s] for s in (1, 2, 3)])
  ratio = got['ratio/mean']
  assert ratio[1] == pytest.approx(1.0, abs=1e-5) and abs(ratio[2] - 1.0) > 1e-4
  m = _metrics(base / 'ppo')[0]
  assert 'value_clipfrac' in m and 'value_explained_var' in m and abs(m['kl_sequence']) < 1e-5
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  model = Transformer(ModelConfig.from_config(_cfg(base).model, vocab_size=264))
  with pytest.raises(ConfigError, match='model.scalar_head=True'):
    tasks.make(_cfg(base, **{'rl.scale': 'gae'}), model)


def test_ppo_token_rewards_put_the_score_last_and_the_kl_where_it_was_incurred():
  """With gamma = lam = 1, GAE's return at a token is the score minus beta times the KL still
  to come (closed form); whitening leaves mean 0 and variance 1 over the valid tokens."""
  from pathways_jax.objectives import rl
  mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
  kl = np.arange(15, dtype=np.float32).reshape(3, 5) / 10
  scores = np.array([1.0, -2.0, 5.0])
  per_token = batch_lib.token_rewards(scores, mask, kl, beta=0.5)
  _, returns = rl.gae(per_token, np.zeros(mask.shape), mask, gamma=1.0, lam=1.0)
  for b, t in zip(*np.nonzero(mask)):
    want = scores[b] - 0.5 * sum(kl[b, s] for s in range(t, 5) if mask[b, s])
    assert float(returns[b, t]) == pytest.approx(want, abs=1e-5)
  assert not per_token[2].any() and not per_token[0, 4] and not per_token[0, 0]
  white = batch_lib.whiten(np.asarray(returns), mask)
  assert white[mask > 0].mean() == pytest.approx(0, abs=1e-6)
  assert white[mask > 0].std() == pytest.approx(1, abs=1e-4) and not white[mask == 0].any()


def test_dynamic_sampling_refills_zero_variance_groups_and_failing_rewards_count(base):
  from pathways_jax.train import loop
  # 'flaky' adds 0 to every reward: it raises or returns NaN, is counted, and the run goes on.
  res = loop.train(_cfg(base, **{'rl.rewards': 'half_constant,flaky', 'rl.dynamic_sampling': True,
                                 'rl.max_rollouts': 3, 'train.steps': 3}), str(base / 'dyn'),
                   quiet=True)
  ms = _metrics(base / 'dyn')
  rows = [m for m in ms if 'rollouts' in m]
  assert res['status'] == 'completed'
  assert all(m['reward_failures'] == 4 * 8 * m['rollouts'] for m in rows), rows
  # Half the prompts are constant: the first rollout keeps about half its groups, so more follow.
  assert all(m['zero_std_groups'] >= 0.25 for m in rows)
  assert all(m['rollouts'] >= 2 for m in rows), rows
  assert all(m['masked_groups'] <= 1 for m in rows)


def test_bad_rewards_prompts_and_settings_are_named(base, tmp_path):
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.train import loop
  model = Transformer(ModelConfig.from_config(_cfg(base).model, vocab_size=264))
  with pytest.raises(ConfigError, match='num_generations >= 2'):
    tasks.make(_cfg(base, **{'rl.num_generations': 1}), model)
  tasks.make(_cfg(base, **{'rl.num_generations': 1, 'rl.scale': 'batch'}), model)
  for key, value in (('rl.top_p', 1.5), ('rl.min_p', -0.1), ('rl.eval_batch', 0)):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
      tasks.make(_cfg(base, **{key: value}), model)
  # PPO's, diffu-GRPO's and RRR's own settings (settings.check: named before anything loads).
  from pathways_jax.rl import settings
  ppo = {'rl.scale': 'gae', 'model.scalar_head': True}
  diffu = ModelConfig.from_config(_cfg(base, **{'model.causal': False}).model, vocab_size=264)
  for kw, model_cfg, match in (
      ({**ppo, 'rl.gamma': 1.5}, None, r'rl\.gamma=1\.5 must be in \[0, 1\]'),
      ({**ppo, 'rl.lam': -0.1}, None, r'rl\.lam=-0\.1'),
      ({**ppo, 'rl.vf_coef': -1.0}, None, r'rl\.vf_coef=-1\.0 must be >= 0'),
      ({**ppo, 'rl.vf_clip': -1.0}, None, r'rl\.vf_clip'),
      ({'rl.prompt_mask_p': 1.0}, diffu, 'prompt_mask_p < 1'),
      ({'rl.diffusion_steps': -1}, diffu, 'diffusion_steps >= 0'),
      ({'rl.scale': 'gae'}, diffu, 'diffu-GRPO'),
      ({'rl.reflect': True, 'rl.reflect_instruction': ' '}, None, 'reflect_instruction'),
      ({'rl.reflect': True, 'rl.retry_instruction': ''}, None, 'retry_instruction'),
      ({'rl.loss': 'wd1', 'rl.beta': 0.1}, None, r"loss='wd1' .* no rl\.beta > 0"),
      ({**ppo, 'rl.loss': 'wd1'}, None, r"loss='wd1' .* no rl\.scale='gae'"),
      ({**ppo, 'rl.loss': 'gspo'}, None, r"loss='gspo' takes one advantage per completion")):
    cfg = _cfg(base, **kw)
    with pytest.raises(ConfigError, match=match):
      settings.check(cfg, model_cfg or ModelConfig.from_config(cfg.model, vocab_size=264))
  with pytest.raises(ConfigError,
                     match=r"rl\.loss='ppo' is not one of \('clip', 'gspo', 'wd1', 'spg'\)"):
    config_lib.validate(_cfg(base, **{'rl.loss': 'ppo'}))
  with pytest.raises(ConfigError, match="'nope' is not a reward"):
    tasks.make(_cfg(base, **{'rl.rewards': 'correct,nope'}), model)
  with pytest.raises(ConfigError, match='exceeds model.max_len'):
    tasks.make(_cfg(base, **{'rl.max_new_tokens': 32}), model)
  with pytest.raises(ConfigError, match='needs a reference'):
    tasks.make(_cfg(base, **{'rl.beta': 0.1, 'train.init_from': ''}), model)
  with pytest.raises(ConfigError, match='format'):  # the prompts lack the fields it reads
    loop.train(_cfg(base, **{'rl.rewards': 'format'}), str(tmp_path / 'fmt'), quiet=True)
  # Prompts longer than the budget are skipped and counted; none left is an error.
  with open(tmp_path / 'long.jsonl', 'w') as f:
    f.write(json.dumps({'prompt': 'x' * 100, 'answer': 'y'}) + '\n')
    f.write(json.dumps({'prompt': 'short', 'answer': 'y'}) + '\n')
  data = _cfg(base, **{'data.path': str(tmp_path / 'long.jsonl')}).data
  fields, counts = prompts_lib.load_rows(data, BYTES, 'train')
  assert counts == {'prompts': 2, 'too_long': 1} and fields['example_id'].tolist() == [1]
  with open(tmp_path / 'bad.jsonl', 'w') as f:
    f.write(json.dumps({'question': 'x'}) + '\n')
  with pytest.raises(Exception, match="needs 'prompt'"):
    prompts_lib.read_prompts(str(tmp_path / 'bad.jsonl'))
  # Message-list prompts need no assistant turn; a final one is the reference answer.
  system = {'role': 'system', 'content': 'Be brief.'}
  with open(tmp_path / 'msgs.jsonl', 'w') as f:
    f.write(json.dumps({'prompt': [system, {'role': 'user', 'content': 'Hi?'}], 'answer': 'x'})
            + '\n')
    f.write(json.dumps({'messages': [{'role': 'user', 'content': 'Q'},
                                     {'role': 'assistant', 'content': 'A'}]}) + '\n')
    f.write(json.dumps({'messages': [{'role': 'user', 'content': 'Q2'}]}) + '\n')
  read = prompts_lib.read_prompts(str(tmp_path / 'msgs.jsonl'))
  assert [len(m) for _, m in read] == [2, 1, 1] and read[1][0]['answer'] == 'A'
  assert 'answer' not in read[2][0]


def test_reflect_retry_reward_trains_reflections_on_failed_first_attempts(base):
  """RRR's control flow, on rewards whose outcome is known: 'one:0' never succeeds (every first
  attempt fails, every retry fails: all groups kept, rewards 0); 'one' always does (every prompt
  is answered at once: nothing to reflect on, all groups replaced, then masked)."""
  from pathways_jax.rl import reflect
  from pathways_jax.train import loop
  msgs = reflect.retry_messages(reflect.reflection_messages(
      [{'role': 'user', 'content': 'Q'}], 'A1', 'Why?'), 'Because.', 'Again.')
  assert [(m['role'], m['content']) for m in msgs] == [
      ('user', 'Q'), ('assistant', 'A1'), ('user', 'Why?'), ('assistant', 'Because.'),
      ('user', 'Again.')]
  kw = {'rl.reflect': True, 'rl.reflect_instruction': 'Why?', 'rl.retry_instruction': 'Again.',
        'data.seq_len': 120, 'model.max_len': 128, 'rl.max_new_tokens': 4, 'train.steps': 1,
        'rl.max_rollouts': 2}
  loop.train(_cfg(base, **kw, **{'rl.rewards': 'one:0'}), str(base / 'rrr_fail'), quiet=True)
  m = _metrics(base / 'rrr_fail')[0]
  assert m['first_attempt_success'] == 0 and m['retry_success'] == 0 and m['reward'] == 0
  assert m['masked_groups'] == 0 and m['rollouts'] == 1
  assert m['reflect_too_long'] == m['retry_too_long'] == 0
  loop.train(_cfg(base, **kw, **{'rl.rewards': 'one'}), str(base / 'rrr_pass'), quiet=True)
  m = _metrics(base / 'rrr_pass')[0]
  assert m['first_attempt_success'] == 1 and m['rollouts'] == 2 and m['masked_groups'] == 4


def test_reflect_retry_reward_trains_the_reflection_tokens_only(base, monkeypatch):
  """The rows RRR trains: each is the reflection prompt (the question, the failed attempt, the
  reflection instruction) followed by the sampled reflection; the loss mask covers the
  reflection and nothing before it, and no retry (its instruction or answer) is in any row."""
  from pathways_jax.train import loop
  seen = []
  real = batch_lib.training_rows
  monkeypatch.setattr(batch_lib, 'training_rows',
                      lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
  kw = {'rl.reflect': True, 'rl.reflect_instruction': 'Why?', 'rl.retry_instruction': 'Again.',
        'data.seq_len': 120, 'model.max_len': 128, 'rl.max_new_tokens': 4, 'train.steps': 1,
        'rl.max_rollouts': 1, 'rl.rewards': 'one:0'}
  loop.train(_cfg(base, **kw), str(base / 'rrr_rows'), quiet=True)
  assert len(seen) == 1
  rows, tok = seen[0], BYTES
  P = 120
  for tokens, mask, seg in zip(rows['tokens'], rows['completion_mask'], rows['segment_ids']):
    assert mask[:P].sum() == 0 and mask[P:].sum() > 0  # trained: generated tokens only
    context = tok.decode([int(t) for t, s in zip(tokens[:P], seg[:P]) if s and t not in
                          tok.special_ids])
    assert context.startswith('<user>\nTell ') and context.endswith('<user>\nWhy?\n<assistant>\n')
    text = tok.decode([int(t) for t in tokens if t not in tok.special_ids])
    assert 'Again.' not in text


def _fake_answer(ids) -> list[int]:
  """A stand-in 'greedy model': NEW letters or spaces, a fixed pseudo-random function of the
  whole prompt (so answers differ between prompts, reflections and retries)."""
  h = zlib.crc32(np.asarray(ids, np.int32).tobytes())
  return [BYTES.encode('ab c'[(h >> (2 * k)) % 4])[0] for k in range(NEW)]


class _FakeGreedy:
  """The sampler interface (params, tokens [N, P], mask [N, P], key) -> tokens_BT, mask_BN."""

  def __call__(self, params, tokens, mask, key):
    del params, key
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    new = np.asarray([_fake_answer(t[m > 0]) for t, m in zip(tokens, mask)], np.int32)
    return types.SimpleNamespace(tokens_BT=np.concatenate([tokens, new], axis=1),
                                 completion_mask_BN=np.ones(new.shape, bool))


def test_reflect_evaluation_scores_a_second_try_after_each_failed_first(base, monkeypatch):
  """RRR's held-out measure (val_first_attempt, val_second_attempt, val_retry_success) against
  a plain reference: with a stand-in greedy decoder, each held-out prompt is answered; after a
  failed answer the reference builds the reflection and retry conversations itself, one prompt
  at a time, and scores them; the task's shares (in batches of rl.eval_batch) must be its."""
  from pathways_jax.data import chat
  from pathways_jax.tasks import grpo
  from pathways_jax.train import loop
  monkeypatch.setattr(grpo.GrpoTask, '_greedy_sampler', lambda self, batch_size: _FakeGreedy())
  kw = {'rl.reflect': True, 'rl.reflect_instruction': 'Why?', 'rl.retry_instruction': 'Again.',
        'data.seq_len': 120, 'model.max_len': 128, 'rl.max_new_tokens': NEW, 'train.steps': 1,
        'rl.max_rollouts': 1, 'rl.rewards': 'hashed', 'rl.eval_max': 12, 'rl.eval_batch': 5,
        'data.validation_path': str(base / 'prompts.jsonl'), 'train.eval_on_start': True}
  res = loop.train(_cfg(base, **kw), str(base / 'rrr_eval'), quiet=True)
  answer = lambda msgs: BYTES.decode(_fake_answer(chat.prompt_ids(BYTES, msgs)))
  first_ok, retry_ok = [], []
  for i in range(12):
    prompt = [{'role': 'user', 'content': f'Tell {i}'}]
    first = answer(prompt)
    first_ok.append(_hashed(None, first) == 1)
    if not first_ok[-1]:
      ask = prompt + [{'role': 'assistant', 'content': first}, {'role': 'user', 'content': 'Why?'}]
      retry = ask + [{'role': 'assistant', 'content': answer(ask)},
                     {'role': 'user', 'content': 'Again.'}]
      retry_ok.append(_hashed(None, answer(retry)) == 1)
  assert 0 < len(retry_ok) < 12 and 0 < sum(retry_ok) < len(retry_ok), (first_ok, retry_ok)
  assert res['val_first_attempt'] == pytest.approx(np.mean(first_ok))
  assert res['val_hashed'] == pytest.approx(np.mean(first_ok))
  assert res['val_retry_success'] == pytest.approx(np.mean(retry_ok))
  assert res['val_second_attempt'] == pytest.approx((sum(first_ok) + sum(retry_ok)) / 12)
  assert res['val_reflect_too_long'] == 0
  # train.eval_on_start: the start model's too (the stand-in decoder ignores the params).
  assert _by_step(base / 'rrr_eval', 'val_retry_success') == {0: res['val_retry_success'],
                                                              1: res['val_retry_success']}


def test_rewards_compose_with_weights_and_shape_overlong_completions():
  rec = {'answer': 'Ada'}
  total, values, failures = rewards_lib.score(rewards_lib.parse('correct:2,random:0.5'),
                                              [rec] * 4, ['ada.', 'Bob', ' Ada ', ''],
                                              rng=np.random.default_rng(0))
  coin = values['random']
  np.testing.assert_allclose(total, 2 * np.asarray([1, 0, 1, 0]) + 0.5 * coin)
  assert set(coin.tolist()) <= {0.0, 1.0} and not failures
  np.testing.assert_allclose(
      rewards_lib.overlong_penalty(np.asarray([4, 6, 7, 8]), max_new_tokens=8, buffer=4),
      [0.0, -0.5, -0.75, -1.0])
  assert batch_lib.zero_variance(np.asarray([[1, 1], [0, 1]])).tolist() == [True, False]


def test_think_then_answer_scores_the_response_alone():
  """RLMT: every reward, a reward model's too, sees only the text after the think tag; a
  completion without the tag totals rl.think_malformed."""
  seen = []

  def fake_rm(prompts, texts):
    seen.extend(texts)
    return np.asarray([len(t) for t in texts], np.float32)

  texts = ['hmm, Bob? no. </think> Ada', 'Ada is it</think>Bob', 'no tag: Ada']
  total, values, _ = rewards_lib.score(
      [('correct', 1.0), ('reward_model', 0.5)], [{'answer': 'Ada'}] * 3, texts,
      rng=np.random.default_rng(0), prompts=[[]] * 3, reward_model=fake_rm,
      think_tag='</think>', think_malformed=-2.0)
  assert seen == ['Ada', 'Bob', '']
  np.testing.assert_allclose(values['correct'], [1, 0, 0])
  np.testing.assert_allclose(total, [1 + 0.5 * 3, 0.5 * 3, -2.0])
  np.testing.assert_allclose(values['think_ok'], [1, 1, 0])
  assert rewards_lib.split_thinking(['a</t>b</t>c'], '</t>') == (['b</t>c'], np.asarray([True]))


def test_a_reward_model_scores_prompt_and_completion(base, tmp_path):
  """The 'reward_model' reward is the RM's score of the prompt's messages + the completion as
  the assistant's turn (eval.reward.score, the RM's own scoring API)."""
  from pathways_jax.eval import reward
  from pathways_jax.train import loop
  with open(tmp_path / 'pairs.jsonl', 'w') as f:
    for i in range(16):
      f.write(json.dumps({'prompt': f'Tell {i}', 'chosen': 'a b c', 'rejected': 'abc'}) + '\n')
  loop.train(tiny_config(str(base / 'cache'), **{
      'task': 'reward_model', 'model.scalar_head': True, 'data.corpus': 'preference',
      'data.path': str(tmp_path / 'pairs.jsonl'), 'data.seq_len': 64, 'data.batch_size': 8,
      'train.init_from': str(base / 'pre'), 'train.steps': 2, 'train.eval_every': 1000,
      'sample.prompts': ()}), str(tmp_path / 'rm'), quiet=True)
  scorer = rewards_lib.RewardModelScorer(str(tmp_path / 'rm'), batch_size=4)
  prompts = [[{'role': 'user', 'content': 'Tell 1'}], [{'role': 'user', 'content': 'Tell 2'}]]
  total, values, _ = rewards_lib.score([('reward_model', 2.0)], [{}, {}], ['a b', 'xyz'],
                                       rng=np.random.default_rng(0), prompts=prompts,
                                       reward_model=scorer)
  want = reward.score(scorer.model, scorer.params, scorer.tokenizer,
                      [prompts[0] + [{'role': 'assistant', 'content': 'a b'}],
                       prompts[1] + [{'role': 'assistant', 'content': 'xyz'}]])
  np.testing.assert_allclose(values['reward_model'], want, rtol=1e-6)
  np.testing.assert_allclose(total, 2 * want, rtol=1e-6)
  # RLMT's shape: the reward model scores the response after the think tag (here a space).
  res = loop.train(_cfg(base, **{'rl.rewards': 'reward_model,spaces:0.1', 'train.steps': 1,
                                 'rl.reward_model': str(tmp_path / 'rm'), 'rl.think_tag': ' '}),
                   str(tmp_path / 'rl'), quiet=True)
  m = _metrics(tmp_path / 'rl')[0]
  assert res['status'] == 'completed' and np.isfinite(m['reward/reward_model'])
  assert 0 <= m['reward/think_ok'] <= 1
  with pytest.raises(ConfigError, match='rl.reward_model'):
    loop.train(_cfg(base, **{'rl.rewards': 'reward_model'}), str(tmp_path / 'no_rm'), quiet=True)
