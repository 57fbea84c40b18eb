"""diffu-GRPO: the 'grpo' task with a LLaDA (bidirectional) policy, d1's one-step estimator and
DiffuCoder's coupled one, ESPO's sequence ELBO with the sequence-level loss (and GSPO on an AR
policy), and wd1's loss on d1's estimate."""
import jax
import numpy as np
import pytest

from grpo_helpers import BYTES, _by_step, _cfg, _metrics, base  # pylint: disable=unused-import
from helpers import tiny_config
from pathways_jax.config import ConfigError


def _llada(**kw):
  return {'objective': 'diffusion', 'model.causal': False, **kw}


@pytest.fixture(scope='module')
def llada_base(base):
  """A tiny LLaDA model (30 pretraining steps) the diffu-GRPO tests start from."""
  from pathways_jax.train import loop
  loop.train(tiny_config(str(base / 'cache'), **_llada(**{'train.steps': 30,
                                                           'sample.prompts': ()})),
             str(base / 'llada_pre'), quiet=True)
  return str(base / 'llada_pre')


def test_diffusion_estimator_inputs_and_completion_masks():
  from pathways_jax.rl import diffusion as dl
  gen = np.array([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9, 2, 9]])
  np.testing.assert_array_equal(dl.completion_mask(gen, eos_id=2),
                                [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
  tokens = np.arange(1, 1 + 3 * 7).reshape(3, 7)
  prompt_mask = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
  masked = dl.masked_inputs(tokens, prompt_mask, mask_id=99, p=0.5, rng=np.random.default_rng(0))
  assert (masked[:, 3:] == 99).all()  # the completion: always masked
  hidden = masked[:, :3] == 99
  assert not hidden[prompt_mask == 0].any() and hidden[prompt_mask == 1].any()
  np.testing.assert_array_equal(masked[:, :3][~hidden], tokens[:, :3][~hidden])
  assert not (dl.masked_inputs(tokens, prompt_mask, mask_id=99, p=0.0,
                               rng=np.random.default_rng(0))[:, :3] == 99).any()
  logits = np.random.default_rng(1).normal(size=(3, 7, 11)).astype(np.float32)
  ids = np.random.default_rng(2).integers(0, 11, size=(3, 7))
  lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(dl.token_logps(logits, ids),
                             np.take_along_axis(lsm, ids[..., None], -1)[..., 0], atol=1e-5)


def test_diffu_grpo_raises_a_learnable_reward_with_the_reference_on_the_same_mask(base, llada_base,
                                                                                tmp_path):
  """A LLaDA policy: rollouts from the diffusion sampler, d1's estimate. With beta > 0 the
  reference (the start model) reads the same masked input, so at step 1 the KL is 0."""
  from pathways_jax.train import loop
  llada = _llada
  res = loop.train(_cfg(base, **llada(**{
      'train.init_from': llada_base, 'rl.beta': 0.01, 'rl.diffusion_steps': 3,
      'train.steps': 12, 'data.validation_path': str(base / 'prompts.jsonl'), 'rl.eval_max': 8,
      'rl.eval_batch': 8})), str(tmp_path / 'rl'), quiet=True)
  reward, kl = _by_step(tmp_path / 'rl', 'reward'), _by_step(tmp_path / 'rl', 'kl')
  assert res['status'] == 'completed' and 0 <= res['val_spaces'] <= 1
  assert kl[1] < 1e-12 and kl[12] > 1e-3, kl  # 0 to rounding (1e-16 seen)
  first, last = np.mean([reward[s] for s in (1, 2, 3)]), np.mean([reward[s] for s in (10, 11, 12)])
  assert last > first + 0.1, reward
  m = _metrics(tmp_path / 'rl')[0]
  assert m['ratio/mean'] == pytest.approx(1.0, abs=1e-6)
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  model = Transformer(ModelConfig.from_config(_cfg(base, **llada()).model, vocab_size=264))
  with pytest.raises(ConfigError, match='diffu-GRPO'):
    tasks.make(_cfg(base, **llada(**{'rl.scale': 'gae', 'model.scalar_head': True})), model)


def test_coupled_masks_are_complementary_and_weighted_by_their_ratio():
  """DiffuCoder's coupled estimate: every generated position masked in exactly one of the two
  passes, weighted 1/t there (pass a) or 1/(1 - t) (pass b); the prompt in neither."""
  from pathways_jax.rl import diffusion as dl
  in_a, weight = dl.coupled_masks(3, (4000, 8), t_min=0.2, t_max=0.8,
                                  rng=np.random.default_rng(0))
  assert not in_a[:, :3].any() and (weight[:, :3] == 0).all()
  gen_a, gen_w = in_a[:, 3:] > 0, weight[:, 3:]
  t = np.array([1 / w[a][0] if a.any() else 1 - 1 / w[0] for a, w in zip(gen_a, gen_w)])
  assert t.min() >= 0.2 and t.max() <= 0.8 and abs(t.mean() - 0.5) < 0.02
  np.testing.assert_allclose(gen_w, np.where(gen_a, 1 / t[:, None], 1 / (1 - t[:, None])),
                             rtol=1e-5)
  # the share of a row's generated positions in pass a follows its own t
  assert np.corrcoef(t, gen_a.mean(1))[0, 1] > 0.5
  tokens = np.arange(10, 10 + 2 * 8, dtype=np.int32).reshape(2, 8)
  a, b = dl.coupled_inputs(tokens, in_a[:2], weight[:2], mask_id=99)
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_array_equal(a[:, :3], tokens[:, :3])
  np.testing.assert_array_equal(b[:, :3], tokens[:, :3])
  assert ((a[:, 3:] == 99) ^ (b[:, 3:] == 99)).all()  # each generated token masked once
  np.testing.assert_array_equal(a[:, 3:] == 99, in_a[:2, 3:] > 0)


def test_coupled_log_probs_are_the_three_passes_combined(base):
  """The task's coupled estimate against three separate forward passes of the model and a numpy
  log-softmax: (one-step + w * the masking pass) / 2 per generated token."""
  import jax.numpy as jnp
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.rl import diffusion as dl
  cfg = _cfg(base, **{'objective': 'diffusion', 'model.causal': False,
                      'rl.diffusion_estimator': 'coupled', 'rl.temperature': 0.7})
  cfg.data.mask_id = BYTES.mask_id
  model = Transformer(ModelConfig.from_config(cfg.model, vocab_size=264))
  task = tasks.make(cfg, model)
  rng = np.random.default_rng(0)
  P, N, T = 5, 3, 9
  tokens = rng.integers(3, 200, size=(N, T)).astype(np.int32)
  prompt_mask = np.ones((N, P), np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones((N, T), np.int32),
           'positions': np.tile(np.arange(T, dtype=np.int32), (N, 1)),
           'masked_tokens': dl.masked_inputs(tokens, prompt_mask, mask_id=BYTES.mask_id, p=0.3,
                                             rng=rng)}
  batch['coupled_mask'], batch['coupled_weight'] = dl.coupled_masks(P, (N, T), t_min=0.2,
                                                                    t_max=0.8, rng=rng)
  params = model.init(jax.random.key(0), jnp.asarray(tokens))['params']
  got = np.asarray(task._token_logps(model, params, {k: jnp.asarray(v) for k, v in batch.items()}))

  def logp(inputs):
    logits = np.asarray(model.apply({'params': params}, jnp.asarray(inputs)), np.float64) / 0.7
    lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return np.take_along_axis(lsm, tokens[..., None], -1)[..., 0]

  in_a = batch['coupled_mask'] > 0
  pass_a = np.where(in_a, BYTES.mask_id, tokens)
  pass_b = np.where((batch['coupled_weight'] > 0) & ~in_a, BYTES.mask_id, tokens)
  want = 0.5 * (logp(batch['masked_tokens']) +
                batch['coupled_weight'] * np.where(in_a, logp(pass_a), logp(pass_b)))
  np.testing.assert_allclose(got[:, P:], want[:, P:], atol=2e-4)


def test_elbo_masks_stratify_the_mask_counts_and_weight_them_as_espo():
  """ESPO's masks: per row k masked generated positions in pass a (the rest in pass b), the k's
  spread evenly over {0..L} across the rows; weights (L + 1) / k and (L + 1) / (L - k)."""
  from pathways_jax.rl import diffusion as dl
  P, L, N = 3, 7, 16
  in_a, weight = dl.elbo_masks(P, (N, P + L), rng=np.random.default_rng(4))
  assert not in_a[:, :P].any() and (weight[:, :P] == 0).all()
  k = in_a[:, P:].sum(axis=1)
  # 16 rows over the 8 counts {0..7}: every count twice, where independent draws would leave
  # some out
  assert sorted(np.bincount(k, minlength=L + 1)) == [2] * (L + 1)
  gen_a = in_a[:, P:] > 0
  want = np.where(gen_a, (L + 1) / np.maximum(k, 1)[:, None],
                  (L + 1) / np.maximum(L - k, 1)[:, None])
  np.testing.assert_allclose(weight[:, P:], want, rtol=1e-6)
  # Each weighted pass counts the L positions without bias: (L + 1) / k over k masked tokens,
  # nothing at k = 0, is L (L + 1) / (L + 1) = L on average over k uniform on {0..L}; so a
  # log-prob of -1 everywhere gives an ELBO of -L per pass on average.
  draws = [dl.elbo_masks(P, (N, P + L), rng=np.random.default_rng(i)) for i in range(300)]
  for pass_a in (True, False):
    sums = [np.where((a[:, P:] > 0) == pass_a, w[:, P:], 0).sum(1).mean() for a, w in draws]
    assert np.mean(sums) == pytest.approx(L, rel=0.03)


def test_elbo_log_probs_are_the_two_passes_combined(base):
  """The task's ESPO estimate against two separate forward passes and a numpy log-softmax:
  half the weight times the log-prob from the pass that masked the token."""
  import jax.numpy as jnp
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.rl import diffusion as dl
  cfg = _cfg(base, **{'objective': 'diffusion', 'model.causal': False,
                      'rl.diffusion_estimator': 'elbo', 'rl.temperature': 0.7})
  cfg.data.mask_id = BYTES.mask_id
  model = Transformer(ModelConfig.from_config(cfg.model, vocab_size=264))
  task = tasks.make(cfg, model)
  assert 'masked_tokens' not in task.batch_fields()  # no d1 pass
  rng = np.random.default_rng(0)
  P, N, T = 5, 4, 9
  tokens = rng.integers(3, 200, size=(N, T)).astype(np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones((N, T), np.int32),
           'positions': np.tile(np.arange(T, dtype=np.int32), (N, 1))}
  batch['coupled_mask'], batch['coupled_weight'] = dl.elbo_masks(P, (N, T), rng=rng)
  params = model.init(jax.random.key(0), jnp.asarray(tokens))['params']
  got = np.asarray(task._token_logps(model, params, {k: jnp.asarray(v) for k, v in batch.items()}))

  def logp(inputs):
    logits = np.asarray(model.apply({'params': params}, jnp.asarray(inputs)), np.float64) / 0.7
    top = logits.max(-1, keepdims=True)
    lsm = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return np.take_along_axis(lsm, tokens[..., None], -1)[..., 0]

  in_a = batch['coupled_mask'] > 0
  pass_a = np.where(in_a, BYTES.mask_id, tokens)
  pass_b = np.where((batch['coupled_weight'] > 0) & ~in_a, BYTES.mask_id, tokens)
  want = 0.5 * batch['coupled_weight'] * np.where(in_a, logp(pass_a), logp(pass_b))
  np.testing.assert_allclose(got[:, P:], want[:, P:], atol=2e-4)


def test_espo_and_gspo_raise_a_learnable_reward(base, llada_base, tmp_path):
  """ESPO (a LLaDA policy, the sequence ELBO, one length-normalised ratio per completion, k2 KL
  to the start model on the same masks: 0 at step 1) and GSPO (an AR policy, two minibatches
  per rollout so the ratio leaves 1) through the trainer; each setting checked."""
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.train import loop
  for name, kw in (('espo', _llada(**{'train.init_from': llada_base, 'rl.diffusion_steps': 3,
                                      'rl.diffusion_estimator': 'elbo', 'rl.loss': 'gspo',
                                      'rl.beta': 0.01, 'rl.kl': 'k2', 'train.steps': 12})),
                   ('gspo', {'rl.loss': 'gspo', 'rl.minibatches': 2, 'train.steps': 24})):
    res = loop.train(_cfg(base, **kw), str(tmp_path / name), quiet=True)
    reward = _by_step(tmp_path / name, 'reward')
    last_step = max(reward)
    first = np.mean([reward[s] for s in sorted(reward)[:3]])
    last = np.mean([reward[s] for s in sorted(reward)[-3:]])
    assert res['status'] == 'completed' and last > first + 0.1, (name, reward)
    m = _by_step(tmp_path / name, 'ratio/mean')
    if name == 'espo':
      assert _by_step(tmp_path / name, 'kl')[1] < 1e-10
    else:  # the second minibatch of a rollout is off-policy
      assert m[1] == pytest.approx(1.0, abs=1e-6) and m[2] != pytest.approx(1.0, abs=1e-6)
    assert last_step == kw['train.steps']
  lmodel = Transformer(ModelConfig.from_config(_cfg(base, **_llada()).model, vocab_size=264))
  with pytest.raises(ConfigError, match="'elbo'.*rl.loss='gspo'"):
    tasks.make(_cfg(base, **_llada(**{'rl.diffusion_estimator': 'espo'})), lmodel)
  model = Transformer(ModelConfig.from_config(_cfg(base).model, vocab_size=264))
  with pytest.raises(ConfigError, match="applies to LLaDA policies"):
    tasks.make(_cfg(base, **{'rl.diffusion_estimator': 'elbo'}), model)


def test_coupled_diffu_grpo_trains_and_is_refused_for_ar_policies(base, llada_base, tmp_path):
  """The coupled estimator through the trainer: the reward rises, the KL to the start model is 0
  at step 1 (the reference reads the same three passes), and the setting is checked."""
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.train import loop
  llada = _llada
  res = loop.train(_cfg(base, **llada(**{
      'train.init_from': llada_base, 'rl.beta': 0.01, 'rl.diffusion_steps': 3,
      'rl.diffusion_estimator': 'coupled', 'train.steps': 12})), str(tmp_path / 'rl'),
      quiet=True)
  reward, kl = _by_step(tmp_path / 'rl', 'reward'), _by_step(tmp_path / 'rl', 'kl')
  assert res['status'] == 'completed' and kl[1] < 1e-12 and kl[12] > 1e-3, kl
  first, last = np.mean([reward[s] for s in (1, 2, 3)]), np.mean([reward[s] for s in (10, 11, 12)])
  assert last > first + 0.1, reward
  model = Transformer(ModelConfig.from_config(_cfg(base).model, vocab_size=264))
  with pytest.raises(ConfigError, match='applies to LLaDA policies'):
    tasks.make(_cfg(base, **{'rl.diffusion_estimator': 'coupled'}), model)
  lmodel = Transformer(ModelConfig.from_config(_cfg(base, **llada()).model, vocab_size=264))
  for key, value, match in (('rl.diffusion_estimator', 'wd1', "'elbo' .*rl.loss='wd1'"),
                            ('rl.coupled_t_max', 1.0, 'coupled_t_min <= coupled_t_max < 1')):
    with pytest.raises(ConfigError, match=match):
      tasks.make(_cfg(base, **llada(**{key: value})), lmodel)


def test_wd1_on_d1_estimates_raises_a_learnable_reward(base, llada_base, tmp_path):
  """wd1 as its paper runs it: a LLaDA policy, d1's one-step log-prob estimate, the ratio-free
  weighted likelihood (rl.loss='wd1'), no reference."""
  from pathways_jax.train import loop
  res = loop.train(_cfg(base, **_llada(**{
      'train.init_from': llada_base, 'rl.loss': 'wd1', 'rl.diffusion_steps': 3,
      'train.steps': 12})), str(tmp_path / 'rl'), quiet=True)
  reward = _by_step(tmp_path / 'rl', 'reward')
  assert res['status'] == 'completed'
  first, last = np.mean([reward[s] for s in (1, 2, 3)]), np.mean([reward[s] for s in (10, 11, 12)])
  assert last > first + 0.1, reward
  assert _metrics(tmp_path / 'rl')[0]['wd1/weight_abs_mean'] > 0


def test_fast_dllm_rollouts_are_the_samplers_and_train(base, llada_base, tmp_path):
  """rl.diffusion_cache / rl.diffusion_threshold: the rollouts are what `sampling.diffusion.
  generate` (no mesh) draws with the same cache, threshold, blocks and key; a run trains with
  them; the settings are checked (and refused for an AR policy)."""
  from pathways_jax import parallel, tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.rl import diffusion as dl
  from pathways_jax.sample import load_run
  from pathways_jax.sampling import diffusion as sd
  from pathways_jax.tasks.pretrain import mask_id
  from pathways_jax.train import loop
  cfg, model, params, tok = load_run(llada_base)
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  prompt = np.asarray([BYTES.encode('Tell 1')[-6:], BYTES.encode('Tell 22')[-6:]], np.int32)
  valid = np.ones(prompt.shape, bool)
  key = jax.random.key(3)
  drawn = {}
  # A low threshold commits a whole block at its first step: other tokens than the schedule's.
  for cache, threshold in ((None, None), ('dual', 1e-6), ('prefix', None), (None, 1e-6)):
    ro = dl.DiffusionRollouts(model, mesh, rules, batch_size=2, prompt_len=6, num_samples=2,
                              max_new_tokens=6, steps=6, block_length=2, temperature=1.0,
                              mask_id=mask_id(cfg), eos_id=tok.eos_id, cache=cache,
                              threshold=threshold)(params, prompt, valid, key=key)
    ref = sd.generate(model, params, np.repeat(prompt, 2, axis=0), mask_id=mask_id(cfg),
                      key=key, gen_length=6, steps=6, block_length=2, temperature=1.0,
                      cache=cache, threshold=threshold, prompt_mask_BP=np.repeat(valid, 2, 0))
    np.testing.assert_array_equal(np.asarray(ro.tokens_BT), np.asarray(ref))
    drawn[cache, threshold] = np.asarray(ref)
  assert (drawn[None, 1e-6] != drawn[None, None]).any()  # the setting reaches the sampler
  res = loop.train(_cfg(base, **_llada(**{
      'train.init_from': llada_base, 'rl.block_length': 2, 'rl.diffusion_cache': 'dual',
      'rl.diffusion_threshold': 0.5, 'train.steps': 2})), str(tmp_path / 'rl'), quiet=True)
  assert res['status'] == 'completed' and np.isfinite(res['train_loss'])
  lmodel = Transformer(ModelConfig.from_config(_cfg(base, **_llada()).model, vocab_size=264))
  for key_, value in (('rl.diffusion_cache', 'full'), ('rl.diffusion_threshold', 1.0)):
    with pytest.raises(ConfigError, match='diffusion_cache in'):
      tasks.make(_cfg(base, **_llada(**{key_: value})), lmodel)
  armodel = Transformer(ModelConfig.from_config(_cfg(base).model, vocab_size=264))
  with pytest.raises(ConfigError, match='apply to LLaDA policies'):
    tasks.make(_cfg(base, **{'rl.diffusion_cache': 'dual'}), armodel)


def test_the_rollout_benchmark_times_plain_against_fast_rollouts(base, llada_base, tmp_path,
                                                                 capsys):
  """benchmarks/diffu_grpo_rollouts.py on a finished diffu-GRPO run: both arms run its saved
  config (the fast one with the cache and threshold), the table prints; a run directory that is
  not a LLaDA grpo run is refused in one line."""
  import importlib.util
  import os
  from helpers import REPO
  from pathways_jax.train import loop
  spec = importlib.util.spec_from_file_location(
      'diffu_grpo_rollouts', os.path.join(REPO, 'benchmarks', 'diffu_grpo_rollouts.py'))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  run = str(tmp_path / 'rl')
  loop.train(_cfg(base, **_llada(**{'train.init_from': llada_base, 'train.steps': 1,
                                    'rl.rewards': 'correct'})), run, quiet=True)
  seen = []
  real = bench.run_arm
  bench.run_arm = lambda run_dir, rl, steps, scratch: seen.append(rl) or real(run_dir, rl, steps,
                                                                              scratch)
  assert bench.main(['--run', run, '--steps=2', '--rounds=1', '--block_length=3']) == 0
  assert seen == [{'block_length': 0, 'diffusion_cache': '', 'diffusion_threshold': 0.0},
                  {'block_length': 3, 'diffusion_cache': 'dual', 'diffusion_threshold': 0.9}]
  out = capsys.readouterr().out
  assert '| plain |' in out and '| fast |' in out and 'plain / fast rollout:' in out
  for bad, message in ((['--run', llada_base], 'is not a task=grpo run'),
                       (['--run', run, '--threshold=1.5'], '--threshold in [0, 1)')):
    with pytest.raises(SystemExit):
      bench.main(bad)
    assert message in capsys.readouterr().err
