"""The fused unembedding + cross-entropy in the tasks' losses (pathways_jax/tasks/lm_head.py):
the same loss, metrics and gradients as the logits path, for every task that takes it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import packed_rows_with_padding, tiny_config
from pathways_jax import config as config_lib
from pathways_jax import tasks
from pathways_jax.models.transformer import Transformer
from pathways_jax.tasks import lm_head

VOCAB = 261  # 4 chunks of 64 and a tail of 5: both loop paths of the kernel


def _task(name, mode, **overrides):
  causal = name in ('autoregressive', 'sft')
  cfg = tiny_config('/unused', **{'task': name, 'model.causal': causal,
                                  'objective': 'autoregressive' if causal else 'diffusion',
                                  'train.cross_entropy': mode, 'train.cross_entropy_chunk': 64,
                                  'data.mask_id': 3, **overrides})
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=VOCAB))
  return tasks.make(cfg, model), model


def _batch():
  tokens, pos, seg = packed_rows_with_padding(VOCAB)
  tokens = jnp.where(tokens == 3, 4, tokens)  # no mask ids in the data
  return {'tokens': tokens, 'positions': pos, 'segment_ids': seg,
          'loss_mask': (pos > 5).astype(jnp.int32), 'prompt': (pos < 8).astype(jnp.int32)}


@pytest.mark.parametrize('name,overrides', [
    ('autoregressive', {'train.z_loss': 1e-3}),
    ('diffusion', {}),
    ('sft', {}),
    ('llada_sft', {'llada_sft.sft_fraction': 0.5}),
])
def test_the_fused_path_gives_the_logits_path_loss_metrics_and_gradients(name, overrides):
  plain, model = _task(name, 'logits', **overrides)
  fused, _ = _task(name, 'fused', **overrides)
  assert not lm_head.fused(plain.cfg, model.cfg) and lm_head.fused(fused.cfg, model.cfg)
  batch = _batch()
  params = model.init(jax.random.key(0), batch['tokens'])['params']
  key = jax.random.key(1)

  def run(task):
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: task.loss(p, batch, key), has_aux=True)(params)
    return loss, metrics, grads

  want, got = run(plain), run(fused)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
  assert set(got[1]) == set(want[1])
  for k in want[1]:
    np.testing.assert_allclose(got[1][k], want[1][k], rtol=2e-6, atol=1e-7, err_msg=k)
  flat_want, flat_got = jax.tree.leaves(want[2]), jax.tree.leaves(got[2])
  for w, g in zip(flat_want, flat_got):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-7)
  assert any(float(jnp.abs(w).max()) > 0 for w in flat_want)


def test_auto_fuses_large_vocabularies_and_a_quantised_base_is_refused():
  cfg = tiny_config('/unused')
  small = config_lib.ModelConfig.from_config(cfg.model, vocab_size=32767)
  large = small.replace(vocab_size=lm_head.FUSED_FROM_VOCAB)
  assert cfg.train.cross_entropy == 'auto'
  assert not lm_head.fused(cfg, small) and lm_head.fused(cfg, large)
  cfg.model.lora_quantize = 'int8'
  assert not lm_head.fused(cfg, large)  # auto: the quantised unembedding stays on the plain path
  cfg.train.cross_entropy = 'fused'
  with pytest.raises(config_lib.ConfigError, match='quantised'):
    lm_head.fused(cfg, large)
  with pytest.raises(config_lib.ConfigError, match='quantised'):  # before anything compiles
    config_lib.validate(cfg)
  cfg.train.cross_entropy, cfg.model.lora_quantize, cfg.train.cross_entropy_chunk = 'auto', '', 0
  with pytest.raises(config_lib.ConfigError, match='cross_entropy_chunk=0'):
    config_lib.validate(cfg)
  cfg.train.cross_entropy_chunk = 4096
  cfg.train.cross_entropy = 'chunked'
  with pytest.raises(config_lib.ConfigError, match=r"train.cross_entropy='chunked'"):
    config_lib.validate(cfg)


def _grads_equal(fn_plain, fn_fused, params, metric_atol=1e-7):
  want = jax.value_and_grad(fn_plain, has_aux=True)(params)
  got = jax.value_and_grad(fn_fused, has_aux=True)(params)
  np.testing.assert_allclose(got[0][0], want[0][0], rtol=2e-6)
  for k in want[0][1]:
    np.testing.assert_allclose(got[0][1][k], want[0][1][k], rtol=2e-6, atol=metric_atol,
                               err_msg=k)
  for w, g in zip(jax.tree.leaves(want[1]), jax.tree.leaves(got[1])):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-7)


def _pair_task_matches(name, **over):
  """A preference task (pairs as adjacent segments, a frozen reference) on both paths."""
  (plain, model), (fused, _) = (_task(name, m, **{'train.init_from': '/unused',
                                                  'data.corpus': 'preference', **over})
                                for m in ('logits', 'fused'))
  for task in (plain, fused):
    task.ref_model = model  # what setup() sets from the reference run
  tokens, _, _ = packed_rows_with_padding(VOCAB)
  tokens = jnp.where(tokens == 3, 4, tokens)  # no mask ids in the data
  seg = jnp.array([[1] * 30 + [2] * 30 + [3] * 20 + [4] * 20, [1] * 50 + [2] * 50])
  pos = jnp.concatenate([jnp.arange(n) for n in (30, 30, 20, 20, 50, 50)]).reshape(2, 100)
  batch = {'tokens': tokens, 'positions': pos, 'segment_ids': seg,
           'loss_mask': (pos > 6).astype(jnp.int32)}
  init = lambda k: model.init(jax.random.key(k), tokens)['params']
  params, ref = init(0), init(5)
  key = jax.random.key(1)
  # The implicit rewards are beta times differences of sums of ~50 log-probs of ~5.5 each.
  _grads_equal(lambda p: plain.loss(p, batch, key, ref), lambda p: fused.loss(p, batch, key, ref),
               params, metric_atol=1e-5)


def test_dpo_takes_the_fused_log_probs_for_the_policy_and_its_reference():
  _pair_task_matches('autoregressive', task='dpo')


def test_vrpo_takes_fused_elbo_terms_for_the_policy_and_its_reference():
  _pair_task_matches('diffusion', **{'task': 'vrpo', 'vrpo.n_t': 2, 'vrpo.n_yt': 2})


@pytest.mark.parametrize('objective', ['autoregressive', 'diffusion'])
@pytest.mark.parametrize('score', ['excess', 'reference_entropy'])
def test_rho1_selects_and_trains_on_the_fused_losses_of_the_model_and_its_reference(objective,
                                                                                    score):
  from pathways_jax.tasks import rho1  # pylint: disable=g-import-not-at-top
  name = 'autoregressive' if objective == 'autoregressive' else 'diffusion'
  (plain, model), (fused, _) = (_task(name, m, **{'selective.enabled': True, 'task': 'rho1',
                                                  'selective.ratio': 0.6,
                                                  'selective.score': score})
                                for m in ('logits', 'fused'))
  batch = _batch()
  init = lambda k: model.init(jax.random.key(k), batch['tokens'])['params']
  # A sharper reference than a random init: its entropies must spread far beyond float error, or
  # the entropy ranking flips between near-equal positions.
  params, ref = init(0), jax.tree.map(lambda x: 6.0 * x, init(5))
  key = jax.random.key(1)
  loss = lambda task: lambda p: rho1.selective_loss(task.cfg, model, p, batch, key, ref,
                                                    ref_model=model)
  _grads_equal(loss(plain), loss(fused), params)


def test_the_fused_kernel_entropy_and_its_gradient_match_the_softmax():
  from kernels_pallas import cross_entropy  # pylint: disable=g-import-not-at-top
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  h = jax.random.normal(k1, (24, 16))
  w = jax.random.normal(k2, (16, VOCAB)) * 0.5
  y = jax.random.randint(k3, (24,), 0, VOCAB)

  def fused(h, w):
    ce, lse, ent = cross_entropy.fused_cross_entropy(h, w, y, chunk_size=64, return_entropy=True)
    return (ce + 0.3 * ent + 0.1 * lse).sum(), ent

  def plain(h, w):  # the softmax written out
    logp = jax.nn.log_softmax(h @ w, axis=-1)
    ent = -(jnp.exp(logp) * logp).sum(-1)
    lse = jax.nn.logsumexp(h @ w, axis=-1)
    return (-logp[jnp.arange(24), y] + 0.3 * ent + 0.1 * lse).sum(), ent

  (got, got_ent), got_g = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(h, w)
  (want, want_ent), want_g = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(h, w)
  np.testing.assert_allclose(got_ent, want_ent, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, want_grad in zip(got_g, want_g):
    np.testing.assert_allclose(g, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name,ppo', [('autoregressive', False), ('diffusion', False),
                                      ('autoregressive', True)])
def test_grpo_takes_fused_log_probs_and_entropies_at_its_temperature(name, ppo):
  over = {'task': 'grpo', 'data.corpus': 'prompts', 'data.path': '/unused',
          'train.init_from': '/unused', 'rl.temperature': 0.7, 'rl.entropy_coef': 0.05,
          'rl.beta': 0.1, 'rl.minibatches': 2, 'rl.num_generations': 2}
  if ppo:  # the value head's estimates come with the fused losses
    over.update({'rl.scale': 'gae', 'model.scalar_head': True})
  (plain, model), (fused, _) = (_task(name, m, **over) for m in ('logits', 'fused'))
  for task in (plain, fused):
    task.ref_model = model
  batch = _batch()
  n, t = batch['tokens'].shape
  batch.update(completion_mask=(batch['positions'] > 10).astype(jnp.int32) * (
      batch['segment_ids'] > 0), advantages=jnp.array([0.7, -0.4]),
      old_logp=-3.0 + 0.1 * jax.random.normal(jax.random.key(7), (n, t)))
  if ppo:
    batch.update(old_values=0.1 * jax.random.normal(jax.random.key(9), (n, t)),
                 returns=jax.random.normal(jax.random.key(10), (n, t)),
                 advantages=jax.random.normal(jax.random.key(11), (n, t)))
  if name == 'diffusion':
    masked = jax.random.uniform(jax.random.key(8), (n, t)) < 0.5
    batch['masked_tokens'] = jnp.where(masked, 3, batch['tokens'])
  init = lambda k: model.init(jax.random.key(k), batch['tokens'])['params']
  params, ref = init(0), init(5)
  key = jax.random.key(1)
  _grads_equal(lambda p: plain.loss(p, batch, key, ref), lambda p: fused.loss(p, batch, key, ref),
               params, metric_atol=1e-6)

