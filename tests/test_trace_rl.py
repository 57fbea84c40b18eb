"""TraceRL (rl.diffusion_estimator='trace'): the step groups against a plain reference, each pass
reproducing the sampler's state (greedy decoding commits the argmax of its group's pass), the
task's log-probs against separate forward passes, and a run through the trainer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_helpers import BYTES, _by_step, _cfg, base  # pylint: disable=unused-import
from helpers import tiny_config
from pathways_jax.config import ConfigError


def _llada(**kw):
  return {'objective': 'diffusion', 'model.causal': False, **kw}


def test_trace_groups_collapse_each_rows_distinct_steps():
  from pathways_jax.rl import diffusion as dl
  steps = np.array([[4, 0, 0, 9, 2, 7], [5, 5, 5, 5, 5, 5], [0, 1, 2, 3, 4, 5]])
  for shrink in (1, 2, 4):
    want = []
    for row in steps:
      distinct = sorted(set(row.tolist()))
      want.append([distinct.index(v) // shrink for v in row])
    np.testing.assert_array_equal(dl.trace_groups(steps, shrink), want)
  assert dl.num_trace_passes(24, 24, 8) == 3 and dl.num_trace_passes(24, 6, 4) == 2
  assert dl.num_trace_passes(5, 24, 2) == 3


@pytest.fixture(scope='module')
def llada(base):
  from pathways_jax.sample import load_run
  from pathways_jax.train import loop
  loop.train(tiny_config(str(base / 'cache'), **_llada(**{'train.steps': 30,
                                                           'sample.prompts': ()})),
             str(base / 'trace_pre'), quiet=True)
  return str(base / 'trace_pre'), load_run(str(base / 'trace_pre'))


def test_each_pass_is_the_state_the_greedy_sampler_committed_from(base, llada):
  """shrink 1, one token per step, no cache: pass g shows exactly what the sampler saw at step g,
  so greedy decoding's token at every position is the argmax of its own pass, in every block."""
  from pathways_jax import parallel
  from pathways_jax.rl import diffusion as dl
  from pathways_jax.tasks.pretrain import mask_id
  _, (cfg, model, params, tok) = llada
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  prompt = np.asarray([BYTES.encode('Tell 1')[-6:], BYTES.encode('Tix 22')[-6:]], np.int32)
  valid = np.ones(prompt.shape, bool)
  valid[1, :2] = False  # a left-padded prompt
  C = 6
  ro = dl.DiffusionRollouts(model, mesh, rules, batch_size=2, prompt_len=6, num_samples=1,
                            max_new_tokens=C, steps=C, block_length=3, temperature=0.0,
                            mask_id=mask_id(cfg), eos_id=tok.eos_id)(params, prompt, valid,
                                                                      key=jax.random.key(0))
  tokens = np.asarray(ro.tokens_BT)
  steps = np.asarray(ro.commit_step_BN)
  assert sorted(steps[0].tolist()) == list(range(C))  # one commit per step
  groups = dl.trace_groups(steps, 1)
  group_NT = np.concatenate([np.full((2, 6), -1, np.int32), groups], axis=1)
  seg = np.concatenate([valid.astype(np.int32), np.ones((2, C), np.int32)], axis=1)
  pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
  inputs = np.asarray(dl.trace_inputs(jnp.asarray(tokens), jnp.asarray(group_NT), passes=C,
                                      mask_id=mask_id(cfg))).reshape(C, 2, 6 + C)
  for g in range(C):
    logits = np.asarray(model.apply({'params': params}, jnp.asarray(inputs[g]),
                                    positions_BL=jnp.asarray(pos), segment_ids_BL=jnp.asarray(seg)))
    at = group_NT == g
    assert at.sum() == 2  # one token of each row
    np.testing.assert_array_equal(logits.argmax(-1)[at], tokens[at])
    assert (inputs[g][:, 6:][groups >= g] == mask_id(cfg)).all()
    assert (inputs[g][:, 6:][groups < g] == tokens[:, 6:][groups < g]).all()


def test_the_tasks_trace_log_probs_are_separate_forward_passes(base):
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  cfg = _cfg(base, **_llada(**{'rl.diffusion_estimator': 'trace', 'rl.trace_shrink': 2,
                               'rl.temperature': 0.7}))
  cfg.data.mask_id = BYTES.mask_id
  model = Transformer(ModelConfig.from_config(cfg.model, vocab_size=264))
  task = tasks.make(cfg, model)
  assert set(task.estimator_fields) == {'trace_group'} and task.trace_passes == 3  # 6 tokens / 2
  rng = np.random.default_rng(0)
  P, N = 4, 3
  T = P + cfg.rl.max_new_tokens
  tokens = rng.integers(3, 200, size=(N, T)).astype(np.int32)
  steps = np.stack([rng.permutation(6) for _ in range(N)])
  group = np.concatenate([np.full((N, P), -1), task_groups := (steps // 2)], axis=1)
  assert task_groups.max() == 2
  batch = {'tokens': tokens, 'segment_ids': np.ones((N, T), np.int32),
           'positions': np.tile(np.arange(T, dtype=np.int32), (N, 1)),
           'trace_group': group.astype(np.int32)}
  params = model.init(jax.random.key(0), jnp.asarray(tokens))['params']
  got = np.asarray(task._token_logps(model, params, {k: jnp.asarray(v) for k, v in batch.items()}))
  want = np.zeros((N, T))
  for g in range(3):
    masked = np.where(group >= g, BYTES.mask_id, tokens)
    logits = np.asarray(model.apply({'params': params}, jnp.asarray(masked)), np.float64) / 0.7
    top = logits.max(-1, keepdims=True)
    lsm = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    lp = np.take_along_axis(lsm, tokens[..., None], -1)[..., 0]
    want = np.where(group == g, lp, want)
  np.testing.assert_allclose(got[:, P:], want[:, P:], atol=2e-4)


def test_tracerl_raises_a_learnable_reward_and_its_settings_are_checked(base, llada, tmp_path):
  """Through the trainer: the learnable reward rises, the reference reads the same passes (KL 0
  at step 1); shrink 0 and an AR policy are refused."""
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.train import loop
  run, _ = llada
  res = loop.train(_cfg(base, **_llada(**{
      'train.init_from': run, 'rl.beta': 0.01, 'rl.diffusion_steps': 3,
      'rl.diffusion_estimator': 'trace', 'rl.trace_shrink': 1, 'train.steps': 12})),
      str(tmp_path / 'rl'), quiet=True)
  reward, kl = _by_step(tmp_path / 'rl', 'reward'), _by_step(tmp_path / 'rl', 'kl')
  assert res['status'] == 'completed' and kl[1] < 1e-12 and kl[12] > 1e-4, kl
  first, last = np.mean([reward[s] for s in (1, 2, 3)]), np.mean([reward[s] for s in (10, 11, 12)])
  assert last > first + 0.1, reward
  lmodel = Transformer(ModelConfig.from_config(_cfg(base, **_llada()).model, vocab_size=264))
  with pytest.raises(ConfigError, match='trace_shrink=0 must be >= 1'):
    tasks.make(_cfg(base, **_llada(**{'rl.diffusion_estimator': 'trace',
                                      'rl.trace_shrink': 0})), lmodel)
  armodel = Transformer(ModelConfig.from_config(_cfg(base).model, vocab_size=264))
  with pytest.raises(ConfigError, match='applies to LLaDA policies'):
    tasks.make(_cfg(base, **{'rl.diffusion_estimator': 'trace'}), armodel)
