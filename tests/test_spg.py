"""SPG (rl.loss='spg'): its bounds and loss against a plain reference written here, its block-wise
masks, the task's passes against separate forward passes, and a run through the trainer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_helpers import BYTES, _by_step, _cfg, _metrics, base  # pylint: disable=unused-import
from helpers import tiny_config
from pathways_jax.config import ConfigError
from pathways_jax.objectives import rl


def _llada(**kw):
  return {'objective': 'diffusion', 'model.causal': False, **kw}


def _reference_bounds(logp, masked, c, beta):
  """ELBO and EUBO per row, a loop over rows, draws and tokens (SPG's formulas, float64)."""
  D, B, T = logp.shape
  elbo, eubo = np.zeros(B), np.zeros(B)
  for b in range(B):
    n = c[b].sum()
    q = np.zeros(T)
    per_draw = []
    for j in range(D):
      hit = [t for t in range(T) if masked[j, b, t] and c[b, t]]
      per_draw.append(np.mean([logp[j, b, t] for t in hit]) if hit else 0.0)
      for t in hit:
        q[t] += np.exp(beta * logp[j, b, t]) / (len(hit) / n) / D
    elbo[b] = np.mean(per_draw)
    seen = [t for t in range(T) if q[t] > 0]
    eubo[b] = np.mean([np.log(q[t]) for t in seen]) / beta if seen else 0.0
  return elbo, eubo


def _reference_loss(elbo, eubo, adv, c, bound, mix):
  n = c.sum(axis=1)
  neg = {'eubo': eubo, 'mix': mix * eubo + (1 - mix) * elbo, 'elbo': elbo}[bound]
  value = np.where(adv > 0, elbo, neg)
  return -(adv * value * n).sum() / max(n.sum(), 1)


def _problem(seed=0, D=3, B=5, T=7):
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.05, 0.95, size=(D, B, T)))
  masked = rng.random((D, B, T)) < 0.5
  c = (rng.random((B, T)) < 0.8).astype(np.int32)
  c[-1] = 0  # a row without completion tokens
  masked[:, 0, :] = False  # a row no draw masks: ELBO and EUBO 0
  adv = np.array([0.7, -0.4, 0.0, 1.2, -0.9])
  return logp, masked, c, adv


def test_spg_bounds_and_loss_match_a_plain_reference_values_and_gradients():
  logp, masked, c, adv = _problem()
  for beta in (1.0, 1.5, 2.0):
    elbo, eubo = rl.spg_sequence_logps(jnp.asarray(logp, jnp.float32), masked, c, beta=beta)
    want_elbo, want_eubo = _reference_bounds(logp, masked, c, beta)
    np.testing.assert_allclose(elbo, want_elbo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eubo, want_eubo, rtol=1e-5, atol=1e-6)
    for bound in rl.SPG_BOUNDS:
      loss, metrics = rl.spg_loss(elbo, eubo, jnp.asarray(adv, jnp.float32), c, bound=bound,
                                  mix=0.3)
      assert float(loss) == pytest.approx(
          _reference_loss(want_elbo, want_eubo, adv, c, bound, 0.3), rel=1e-5, abs=1e-6)
  assert float(metrics['spg/negative_share']) == pytest.approx(2 / 4)  # rows 1, 2 of 4 valid

  def numpy_loss(x, bound):
    e, u = _reference_bounds(x, masked, c, 1.5)
    return _reference_loss(e, u, adv, c, bound, 0.3)

  for bound in rl.SPG_BOUNDS:
    grad = np.asarray(jax.grad(lambda x: rl.spg_loss(
        *rl.spg_sequence_logps(x, masked, c, beta=1.5), jnp.asarray(adv, jnp.float32), c,
        bound=bound, mix=0.3)[0])(jnp.asarray(logp, jnp.float32)))
    eps = 1e-5
    for idx in np.ndindex(*logp.shape):
      up, down = logp.copy(), logp.copy()
      up[idx] += eps
      down[idx] -= eps
      fd = (numpy_loss(up, bound) - numpy_loss(down, bound)) / (2 * eps)
      assert grad[idx] == pytest.approx(fd, abs=2e-4), (bound, idx)
    # Tokens that no draw masked, or outside the completion, get no gradient.
    assert not grad[~(masked & (c[None] > 0))].any()


def test_the_bounds_meet_where_the_whole_completion_is_masked_once():
  """One draw masking every completion token (t = 1): the EUBO's mean of log p^beta / beta is the
  ELBO's per-token mean, for any beta. With several such draws the EUBO, a log of means, is at
  least the ELBO, a mean of logs (Jensen)."""
  rng = np.random.default_rng(3)
  logp = np.log(rng.uniform(0.05, 0.95, size=(1, 4, 6)))
  c = np.ones((4, 6), np.int32)
  full = np.ones((1, 4, 6), bool)
  for beta in (1.0, 2.5):
    elbo, eubo = rl.spg_sequence_logps(logp, full, c, beta=beta)
    np.testing.assert_allclose(eubo, elbo, rtol=1e-5)
  logp4 = np.log(rng.uniform(0.05, 0.95, size=(4, 4, 6)))
  elbo, eubo = rl.spg_sequence_logps(logp4, np.ones((4, 4, 6), bool), c, beta=1.0)
  assert (np.asarray(eubo) >= np.asarray(elbo) - 1e-6).all()


def test_spg_objective_arguments_are_checked():
  logp, masked, c, adv = _problem()
  with pytest.raises(ValueError, match='beta must be a number >= 1'):
    rl.spg_sequence_logps(logp, masked, c, beta=0.5)
  with pytest.raises(ValueError, match='logp_DBT'):
    rl.spg_sequence_logps(logp[0], masked[0], c)
  with pytest.raises(ValueError, match='bound must be one of'):
    rl.spg_loss(adv, adv, adv, c, bound='upper')
  with pytest.raises(ValueError, match='advantages_B must have shape'):
    rl.spg_loss(adv, adv, adv[:3], c)


def test_spg_masks_follow_the_block_rule():
  """Per row and draw: the blocks before the chosen one clean, a count in SPG's range masked in
  it, every later position masked; prompt padding never masked; each block the completion reaches
  chosen; draws in their own bits; the same generator gives the same masks."""
  from pathways_jax.rl import diffusion as dl
  P, C, block, D = 3, 12, 4, 3
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, C + 1, size=400)
  lengths[:3] = (1, 4, 5)
  cmask = np.arange(C)[None, :] < lengths[:, None]
  prompt_mask = np.ones((400, P), np.int32)
  prompt_mask[:, 0] = 0  # left padding
  bits = dl.spg_masks(P, cmask, prompt_mask, draws=D, block_length=block, t_min=0.25, t_max=0.75,
                      p=0.3, rng=np.random.default_rng(1))
  assert bits.shape == (400, P + C) and bits.dtype == np.int32 and bits.max() < 2 ** D
  chosen = np.zeros((400, C // block), int)
  for j in range(D):
    m = (bits >> j) & 1 > 0
    assert not m[:, 0].any() and m[:, 1:P].any()  # padding never; real prompt tokens sometimes
    for i in range(400):
      gen, n = m[i, P:], lengths[i]
      k = np.argmax(gen) // block  # the first masked position is in the chosen block
      lo, n_k = k * block, min(block, n - k * block)
      assert n_k > 0 and not gen[:lo].any() and gen[lo + n_k:].all()
      least = max(1, int(n_k * 0.25))
      assert least <= gen[lo:lo + n_k].sum() <= max(least, min(int(n_k * 0.75), n_k))
      chosen[i, k] += 1
  reach = (lengths[:, None] - 1) // block >= np.arange(C // block)[None, :]
  assert not chosen[~reach].any()
  full = reach.all(axis=1)  # rows reaching all three blocks: each chosen about a third of the time
  share = chosen[full].sum(axis=0) / chosen[full].sum()
  np.testing.assert_allclose(share, 1 / 3, atol=0.06)
  again = dl.spg_masks(P, cmask, prompt_mask, draws=D, block_length=block, t_min=0.25,
                       t_max=0.75, p=0.3, rng=np.random.default_rng(1))
  np.testing.assert_array_equal(bits, again)
  # block_length 0: the completion is one block (SPG's 'random' masks); t 1..1 masks all of it.
  whole = dl.spg_masks(P, cmask, prompt_mask, draws=1, block_length=0, t_min=1.0, t_max=1.0,
                       p=0.0, rng=np.random.default_rng(2))
  np.testing.assert_array_equal(whole[:, P:] > 0, np.ones((400, C), bool))
  assert not whole[:, :P].any()


def test_the_tasks_spg_passes_are_separate_forward_passes(base):
  """The task's ELBO / EUBO / entropy against one forward pass per draw (a numpy log-softmax at
  the sampling temperature) and the plain reference above."""
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.rl import diffusion as dl
  cfg = _cfg(base, **_llada(**{'rl.loss': 'spg', 'rl.spg_draws': 2, 'rl.temperature': 0.7,
                               'rl.block_length': 2}))
  cfg.data.mask_id = BYTES.mask_id
  model = Transformer(ModelConfig.from_config(cfg.model, vocab_size=264))
  task = tasks.make(cfg, model)
  assert set(task.estimator_fields) == {'spg_mask'} and 'spg(bound=mix' in task.describe()
  rng = np.random.default_rng(0)
  P, N, T = 4, 3, 10
  tokens = rng.integers(3, 200, size=(N, T)).astype(np.int32)
  cmask = np.array([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0]], np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones((N, T), np.int32),
           'positions': np.tile(np.arange(T, dtype=np.int32), (N, 1)),
           'completion_mask': np.concatenate([np.zeros((N, P), np.int32), cmask], axis=1)}
  batch['spg_mask'] = dl.spg_masks(P, cmask, np.ones((N, P)), draws=2, block_length=2,
                                   t_min=0.0, t_max=1.0, p=0.2, rng=rng)
  params = model.init(jax.random.key(0), jnp.asarray(tokens))['params']
  elbo, eubo, _ = task._spg_stats(params, {k: jnp.asarray(v) for k, v in batch.items()})

  logps, masks = [], []
  for j in range(2):
    m = (batch['spg_mask'] >> j) & 1 > 0
    logits = np.asarray(model.apply({'params': params},
                                    jnp.asarray(np.where(m, BYTES.mask_id, tokens))),
                        np.float64) / 0.7
    top = logits.max(-1, keepdims=True)
    lsm = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    logps.append(np.take_along_axis(lsm, tokens[..., None], -1)[..., 0])
    masks.append(m)
  want_elbo, want_eubo = _reference_bounds(np.stack(logps), np.stack(masks),
                                           batch['completion_mask'], 1.5)
  np.testing.assert_allclose(elbo, want_elbo, atol=2e-4)
  np.testing.assert_allclose(eubo, want_eubo, atol=2e-4)


def test_spg_raises_a_learnable_reward_and_its_settings_are_checked(base, tmp_path):
  """SPG through the trainer from a tiny LLaDA model: the reward rises, the bounds are logged;
  an AR policy, a reference, another estimator and an EUBO beta below 1 are refused."""
  from pathways_jax import tasks
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.train import loop
  loop.train(tiny_config(str(base / 'cache'), **_llada(**{'train.steps': 30,
                                                           'sample.prompts': ()})),
             str(tmp_path / 'llada_pre'), quiet=True)
  res = loop.train(_cfg(base, **_llada(**{
      'train.init_from': str(tmp_path / 'llada_pre'), 'rl.loss': 'spg', 'rl.scale': 'none',
      'rl.diffusion_steps': 3, 'train.steps': 12})), str(tmp_path / 'rl'), quiet=True)
  reward = _by_step(tmp_path / 'rl', 'reward')
  assert res['status'] == 'completed'
  first, last = np.mean([reward[s] for s in (1, 2, 3)]), np.mean([reward[s] for s in (10, 11, 12)])
  assert last > first + 0.1, reward
  m = _metrics(tmp_path / 'rl')[0]
  assert m['spg/eubo_mean'] != m['spg/elbo_mean'] and 0 <= m['spg/negative_share'] <= 1
  ar = Transformer(ModelConfig.from_config(_cfg(base).model, vocab_size=264))
  with pytest.raises(ConfigError, match='needs a LLaDA policy'):
    tasks.make(_cfg(base, **{'rl.loss': 'spg'}), ar)
  llada = Transformer(ModelConfig.from_config(_cfg(base, **_llada()).model, vocab_size=264))
  for kw, match in (({'rl.beta': 0.01}, 'no rl.beta > 0'),
                    ({'rl.diffusion_estimator': 'coupled'}, "diffusion_estimator at 'd1'"),
                    ({'rl.spg_beta': 0.5}, 'spg_beta=0.5 must be >= 1'),
                    ({'rl.spg_t_min': 0.8, 'rl.spg_t_max': 0.5}, 'spg_t_max=0.5')):
    with pytest.raises(ConfigError, match=match):
      tasks.make(_cfg(base, **_llada(**{'rl.loss': 'spg', **kw})), llada)
