"""Attention-mask annealing (pathways_jax/train/anneal.py, train.attention_anneal_steps):
DiffuLLaMA's causal-to-full schedule while a bidirectional model adapts from an AR one."""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_same_function_on_packed_rows, tiny_config
from numerics import assert_close
from pathways_jax import config as config_lib
from pathways_jax import tasks
from pathways_jax.config import ConfigError, ModelConfig
from pathways_jax.models import attention, attention_backends
from pathways_jax.models.transformer import Transformer, init_cache
from pathways_jax.train import anneal
from pathways_jax.train import step as step_lib


def test_the_keep_ratio_rises_linearly_to_one_at_the_last_anneal_step():
  got = [float(anneal.keep_ratio(s, 4)) for s in (0, 1, 2, 3, 4, 100)]
  assert got == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
  with pytest.raises(ValueError, match='anneal_steps'):
    anneal.keep_ratio(0, 0)


@pytest.mark.parametrize('ratio', [0.0, 0.3, 1.0])
def test_the_mask_keeps_the_past_and_a_ratio_of_the_future(ratio):
  keep = np.asarray(anneal.keep_mask(jax.random.key(0), 256, ratio))
  past = np.tril(np.ones((256, 256), bool))
  assert keep[past].all()
  future = keep[~past]
  n = future.size
  # Bernoulli(ratio) per entry: within 4 standard deviations of ratio * n.
  assert abs(future.sum() - ratio * n) <= 4 * (n * ratio * (1 - ratio)) ** 0.5
  other = np.asarray(anneal.keep_mask(jax.random.key(1), 256, ratio))
  assert (other != keep).any() == (0 < ratio < 1)  # a fresh draw per key


def _plain_attention(q, k, v, allowed_BLS):
  """Grouped-query softmax attention written out in numpy, for the test."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('blhd,bshd->bhls', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(allowed_BLS[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhls,bshd->blhd', probs, v)


def test_attention_with_a_keep_mask_matches_plain_attention_and_declines_the_kernels(caplog):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(k1, (2, 8, 4, 16))
  k = jax.random.normal(k2, (2, 8, 2, 16))
  v = jax.random.normal(k3, (2, 8, 2, 16))
  seg = jnp.array([[1] * 5 + [2] * 3, [1] * 8])
  pos = jnp.array([list(range(5)) + list(range(3)), list(range(8))])
  keep = anneal.keep_mask(k4, 8, 0.5)
  kw = dict(q_segment_BL=seg, kv_segment_BS=seg, q_positions_BL=pos, kv_positions_BS=pos,
            causal=False, keep_LS=keep)
  with attention_backends.recording() as record, caplog.at_level(logging.WARNING):
    got = attention.attend(q, k, v, implementation='xla', **kw)
    declined = attention.attend(q, k, v, implementation='cpu', **kw)
  same_doc = np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]
  want = _plain_attention(q, k, v, same_doc & np.asarray(keep)[None])
  assert_close(got, want, terms=8)
  np.testing.assert_array_equal(declined, got)
  assert "attention='cpu' not taken: the call has an attention keep mask" in caplog.text
  assert [c.taken for c in record] == ['xla', 'xla']


def _models():
  cfg = ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=128, causal=False)
  bidirectional, causal = Transformer(cfg), Transformer(cfg.replace(causal=True))
  params = nn.unbox(bidirectional.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))['params'])
  return bidirectional, causal, params


def test_at_ratio_zero_the_model_is_the_causal_model_and_at_one_the_bidirectional_one():
  """The annealed model at ratio 0 computes the AR model (same params) on packed rows, logits
  and gradients; at ratio 1 the plain bidirectional model."""
  bidirectional, causal, params = _models()
  assert_same_function_on_packed_rows(
      causal, anneal.AnnealedModel(bidirectional, jax.random.key(0), 0.0), params)
  assert_same_function_on_packed_rows(
      bidirectional, anneal.AnnealedModel(bidirectional, jax.random.key(0), 1.0), params)


def test_the_model_refuses_a_keep_mask_of_the_wrong_shape_or_with_a_cache():
  bidirectional, _, params = _models()
  tokens = jnp.zeros((2, 8), jnp.int32)
  with pytest.raises(ValueError, match=r'attention_keep_LL must be a \[L, L\] = \(8, 8\)'):
    bidirectional.apply({'params': params}, tokens, attention_keep_LL=jnp.ones((8, 9), bool))
  cache = init_cache(bidirectional.cfg, 2, 16)
  with pytest.raises(ValueError, match='without a cache; got shape .* and a cache'):
    bidirectional.apply({'params': params}, tokens, cache=cache,
                        attention_keep_LL=jnp.ones((8, 8), bool))


def _diffusion_setup(anneal_steps):
  run_cfg = tiny_config('/unused', **{'objective': 'diffusion', 'model.causal': False,
                                      'model.num_kv_heads': 2,
                                      'train.attention_anneal_steps': anneal_steps})
  run_cfg.data.mask_id = 3
  config_lib.validate(run_cfg)
  cfg = ModelConfig.from_config(run_cfg.model, vocab_size=64)
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(5), (4, 32), 4, 64)
  params = nn.unbox(model.init(jax.random.key(1), tokens)['params'])
  batch = {'tokens': tokens, 'segment_ids': jnp.ones_like(tokens),
           'positions': jnp.tile(jnp.arange(32, dtype=jnp.int32), (4, 1))}
  return run_cfg, cfg, params, batch


def test_the_train_step_anneals_and_logs_the_ratio_and_evaluation_does_not():
  """With a schedule far longer than the run, the first step's loss is the causal model's
  (the step's own key and draws); without one, the bidirectional model's; evaluation always
  sees full attention."""
  import optax  # pylint: disable=g-import-not-at-top
  from pathways_jax.train.state import TrainState  # pylint: disable=g-import-not-at-top
  losses, evals = {}, {}
  for anneal_steps in (0, 10 ** 9):
    run_cfg, cfg, params, batch = _diffusion_setup(anneal_steps)
    tx = optax.sgd(0.0)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       bad_step=jnp.int32(-1))
    task = tasks.make(run_cfg, Transformer(cfg))
    _, metrics = step_lib.train_step(state, batch, cfg=run_cfg, task=task, tx=tx)
    losses[anneal_steps] = float(metrics['loss'])
    assert ('attention_keep_ratio' in metrics) == bool(anneal_steps)
    key = jax.random.fold_in(jax.random.key(run_cfg.seed), 0)
    for model_cfg, want in ((cfg.replace(causal=True), bool(anneal_steps)), (cfg, not anneal_steps)):
      direct = float(tasks.make(run_cfg, Transformer(model_cfg)).loss(params, batch, key)[0])
      assert (abs(direct - losses[anneal_steps]) < 1e-5) == want, (anneal_steps, model_cfg.causal)
    evals[anneal_steps] = float(step_lib.eval_step(params, batch, cfg=run_cfg, task=task)['loss'])
  assert losses[0] != losses[10 ** 9]
  assert evals[0] == evals[10 ** 9]


def test_the_config_refuses_annealing_a_causal_model_or_a_negative_schedule():
  with pytest.raises(ConfigError, match='this model is causal'):
    config_lib.validate(tiny_config('/unused', **{'train.attention_anneal_steps': 10}))
  with pytest.raises(ConfigError, match='attention_anneal_steps must be >= 0'):
    config_lib.validate(tiny_config('/unused', **{'model.causal': False,
                                                  'train.attention_anneal_steps': -1}))


def test_after_the_schedule_the_configured_backend_runs_again():
  """While the ratio is below 1 the masked call runs 'xla'; at 1 the model's own backend (a toy
  one here, returning 7s) serves every call: the step compiles both and picks at run time."""

  @attention_backends.register('toy_sevens')
  def toy_sevens(call):
    return jnp.zeros_like(call.q_BLHD) + 7.0

  try:
    bidirectional, _, params = _models()
    toy = Transformer(bidirectional.cfg.replace(attention='toy_sevens'))
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 48)
    run = jax.jit(lambda r: anneal.AnnealedModel(toy, jax.random.key(0), r).apply(
        {'params': params}, tokens))
    with attention_backends.recording() as record:
      full, annealed = run(jnp.float32(1.0)), run(jnp.float32(0.0))
    assert {(c.requested, c.taken) for c in record} == {('toy_sevens', 'toy_sevens'),
                                                         ('toy_sevens', 'xla')}
    assert_close(full, toy.apply({'params': params}, tokens), terms=16)
    causal = Transformer(bidirectional.cfg.replace(causal=True))
    assert_close(annealed, causal.apply({'params': params}, tokens), terms=16)
  finally:
    attention_backends._REGISTRY.pop('toy_sevens')  # pylint: disable=protected-access
