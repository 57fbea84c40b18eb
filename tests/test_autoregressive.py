"""The AR loss and the AR sampler."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from pathways_jax.config import ModelConfig
from pathways_jax.models.transformer import Transformer
from pathways_jax.objectives import autoregressive
from pathways_jax.sampling import autoregressive as ar_sampling


def test_loss_matches_hand_computation_and_ignores_document_boundaries():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
  tokens = jnp.array([[0, 1, 2]])
  loss, m = autoregressive.loss(logits, tokens)
  assert_close(loss, -(np.log(0.25) + np.log(0.1)) / 2, terms=3)
  assert float(m['num_tokens']) == 2
  # Token 2 starts a new document: position 1 has no target.
  loss, m = autoregressive.loss(logits, tokens, jnp.array([[1, 1, 2]]))
  assert_close(loss, -np.log(0.25), terms=3)
  # Shifting logits changes no probability, only log Z (= 1 here), which the z-loss penalises.
  loss_z, m = autoregressive.loss(logits + 1.0, tokens, z_loss=1e-2)
  assert_close(m['ce'], -(np.log(0.25) + np.log(0.1)) / 2, terms=3)
  assert_close(loss_z, float(m['ce']) + 1e-2, terms=3)
  # The last position predicts nothing (its target wraps round to token 0 and is masked out).
  grad = jax.grad(lambda lg: autoregressive.loss(lg, tokens, z_loss=1e-2)[0])(logits)
  assert np.all(np.asarray(grad[0, -1]) == 0) and np.all(np.abs(np.asarray(grad[0, :-1])) > 0)


def test_min_p_keeps_tokens_above_the_fraction_of_the_max():
  probs = jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]])
  kept = autoregressive_keep(probs, min_p=0.15)  # threshold 0.075
  assert kept.tolist() == [[True, True, True, False, False]]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
  probs = jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]])
  assert autoregressive_keep(probs, top_p=0.75).tolist() == [[True, True, False, False, False]]
  assert autoregressive_keep(probs, top_p=0.5).tolist() == [[True, False, False, False, False]]
  assert autoregressive_keep(probs, top_p=0.85).tolist() == [[True, True, True, False, False]]
  assert autoregressive_keep(probs, top_k=2).tolist() == [[True, True, False, False, False]]


def autoregressive_keep(probs, **kw):
  return ar_sampling.filter_logits(jnp.log(probs), **kw) > -1e29


def _tiny():
  cfg = ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=32)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])
  return model, params


def test_cached_greedy_decoding_equals_full_recompute():
  model, params = _tiny()
  prompt = jax.random.randint(jax.random.key(1), (3, 5), 4, 40)
  apply_fn = lambda p, t: model.apply({'params': p}, t)
  cached = ar_sampling.generate(model, params, prompt, key=jax.random.key(2), max_new_tokens=8,
                                temperature=0.0)
  recomputed = ar_sampling.generate(apply_fn, params, prompt, key=jax.random.key(2),
                                    max_new_tokens=8, temperature=0.0)
  np.testing.assert_array_equal(cached, recomputed)
  sampled = ar_sampling.generate(model, params, prompt, key=jax.random.key(3), max_new_tokens=8,
                                 temperature=1.0, top_p=0.9)
  assert sampled.shape == (3, 13) and (np.asarray(sampled[:, :5]) == np.asarray(prompt)).all()


def test_left_padded_batch_equals_one_at_a_time():
  model, params = _tiny()
  short, long = [7, 8, 9], [5, 6, 7, 8, 9, 10]
  batch = jnp.array([[0, 0, 0] + short, long])
  mask = jnp.array([[False] * 3 + [True] * 3, [True] * 6])
  out = ar_sampling.generate(model, params, batch, key=jax.random.key(0), max_new_tokens=6,
                             temperature=0.0, prompt_mask_BP=mask)
  one = ar_sampling.generate(model, params, jnp.array([short]), key=jax.random.key(0),
                             max_new_tokens=6, temperature=0.0)
  np.testing.assert_array_equal(out[0, 6:], one[0, 3:])


def test_generate_rejects_bad_arguments():
  model, params = _tiny()
  with pytest.raises(ValueError, match='max_len'):
    ar_sampling.generate(model, params, jnp.ones((1, 30), jnp.int32), key=jax.random.key(0),
                         max_new_tokens=10)
  with pytest.raises(ValueError, match='max_new_tokens'):
    ar_sampling.generate(model, params, jnp.ones((1, 3), jnp.int32), key=jax.random.key(0),
                         max_new_tokens=0)
