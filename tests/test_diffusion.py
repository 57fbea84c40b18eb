"""LLaDA: forward process, losses, likelihood bound, and the (cached / parallel) sampler."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import requires_cxx
from numerics import assert_close
from pathways_jax.config import ModelConfig
from pathways_jax.models.transformer import Transformer
from pathways_jax.objectives import diffusion as obj
from pathways_jax.sampling import diffusion as sd

PAD, BOS, EOS, MASK = 0, 1, 2, 3
V = 16


# ---------------------------------------------------------------------------------------------
# Fixtures and fake models


@pytest.fixture(scope='module')
def tiny():
  cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                    mlp_dim=64, max_len=64, causal=False, init_std=0.5)
  model = Transformer(cfg)
  # Shapes from eval_shape, values from numpy: no init compile (norm scales 1, weights N(0, .5)).
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                        jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, np.float32) if path[-1].key == 'scale'
                       else (0.5 * rng.standard_normal(x.shape)).astype(np.float32)), shapes)
  return model, params


_RNG = np.random.default_rng(0)
_TABLE = (_RNG.standard_normal((64, V)) * 2.0).astype(np.float32)
_MIX = _RNG.standard_normal((V, V)).astype(np.float32)


def fake_apply(params, tokens_BL):
  """A context-dependent toy model: a per-position table plus the mean embedding of the row."""
  del params
  l = tokens_BL.shape[1]
  ctx = jax.nn.one_hot(tokens_BL, V).mean(axis=1) @ _MIX  # [B, V]
  return _TABLE[None, :l] + ctx[:, None, :]


def softmax_np(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_generate(apply_fn, params, prompt, *, gen_length, steps, block_length):
  """LLaDA's greedy low-confidence sampler as a plain Python loop (the specification)."""
  fwd = jax.jit(lambda t: apply_fn(params, t))
  b, p = prompt.shape
  x = np.concatenate([np.asarray(prompt), np.full((b, gen_length), MASK)], axis=1)
  nb = gen_length // block_length
  spb = steps // nb
  for blk in range(nb):
    lo, hi = p + blk * block_length, p + (blk + 1) * block_length
    m = (x[:, lo:hi] == MASK).sum(1)
    for i in range(spb):
      k = m // spb + (i < m % spb)
      logits = np.asarray(fwd(jnp.asarray(x)), np.float64)[:, lo:hi]
      logits[..., MASK] = -np.inf
      x0 = logits.argmax(-1)
      conf = np.take_along_axis(softmax_np(logits), x0[..., None], -1)[..., 0]
      conf = np.where(x[:, lo:hi] == MASK, conf, -np.inf)
      for r in range(b):
        idx = np.argsort(-conf[r], kind='stable')[:k[r]]
        x[r, lo + idx] = x0[r, idx]
  return x


# ---------------------------------------------------------------------------------------------
# Training objectives


def test_forward_process_mask_statistics():
  tokens = np.random.default_rng(0).integers(4, V, (4096, 64))
  valid = np.arange(64)[None, :] < 48
  fp = jax.jit(obj.forward_process, static_argnames=('mask_id', 'eps'))
  noisy, masked, p = fp(jax.random.key(1), tokens, mask_id=MASK,
                        valid_BL=np.broadcast_to(valid, tokens.shape))
  noisy, masked, p = map(np.asarray, (noisy, masked, p))
  assert (p == p[:, :1]).all()  # one t per row
  assert p.min() >= 1e-3 and p.max() <= 1.0
  t = p[:, 0]
  assert abs(t.mean() - 0.5) < 0.02 and abs(t.var() - 1 / 12) < 0.01  # ~uniform
  assert not masked[:, 48:].any()  # invalid positions never masked
  assert (noisy[masked] == MASK).all() and (noisy[~masked] == tokens[~masked]).all()
  # Per-row masked fraction follows p_mask (binomial with n=48): check the regression slope.
  frac = masked[:, :48].mean(1)
  assert abs(np.polyfit(t, frac, 1)[0] - 1.0) < 0.03
  assert np.abs(frac - t).mean() < 0.07
  # eps: with t -> 0 the probability is eps, never 0.
  _, _, p0 = fp(jax.random.key(2), tokens, mask_id=MASK, eps=0.5)
  assert float(p0.min()) >= 0.5


def test_loss_matches_hand_computation():
  logits = np.array([[[2., 0., 0., 1.], [0., 1., 0., 0.], [0., 0., 3., 0.]],
                     [[1., 1., 1., 1.], [0., 2., 0., 0.], [5., 0., 0., 0.]]], np.float32)
  tokens = np.array([[0, 1, 3], [2, 1, 0]])
  masked = np.array([[True, False, True], [False, True, True]])
  p = np.array([[0.5] * 3, [0.25] * 3], np.float32)
  ce = -np.log(np.take_along_axis(softmax_np(logits), tokens[..., None], -1)[..., 0])
  expected = (ce * masked / p).sum() / 6  # B * L, not the masked count
  loss = jax.jit(obj.loss)
  got, metrics = loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(masked),
                          jnp.asarray(p))
  assert_close(got, expected, terms=6)
  assert_close(metrics['ce'], ce[masked].mean(), terms=6)
  assert float(metrics['num_masked']) == 4
  # Padding (valid False) never counts; the denominator is the valid count.
  valid = np.array([[True, True, False], [True, True, True]])
  got, _ = loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(masked),
                jnp.asarray(p), valid_BL=jnp.asarray(valid))
  assert_close(got, (ce * (masked & valid) / p).sum() / 5, terms=6)


def test_sft_never_masks_prompt_and_loss_by_hand():
  tokens = np.random.default_rng(0).integers(4, V, (64, 10))
  prompt = np.arange(10)[None, :] < np.arange(64)[:, None] % 7 + 1
  sfp = jax.jit(obj.sft_forward_process, static_argnames=('mask_id', 'eps'))
  noisy, masked, p = sfp(jax.random.key(1), tokens, prompt, mask_id=MASK,
                         eps=0.9)  # p >= 0.9: nearly everything masked
  noisy, masked = np.asarray(noisy), np.asarray(masked)
  assert not (masked & prompt).any()
  assert (noisy[prompt] == tokens[prompt]).all()
  assert (noisy == MASK).sum() == masked.sum() > 0
  # sft_loss: per row / answer length (incl. EOS padding), then mean over rows.
  logits = np.random.default_rng(2).standard_normal((2, 5, 6)).astype(np.float32)
  toks = np.array([[4, 5, 1, 2, 2], [4, 1, 3, 0, 2]])
  prm = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
  msk = np.array([[1, 1, 1, 0, 1], [0, 1, 0, 1, 1]], bool)  # row 0 col 1 is prompt: ignored
  pm = np.array([[0.5] * 5, [0.8] * 5], np.float32)
  ce = -np.log(np.take_along_axis(softmax_np(logits), toks[..., None], -1)[..., 0])
  m = msk & ~prm
  rows = (ce * m / pm).sum(1) / (~prm).sum(1)
  got, _ = jax.jit(obj.sft_loss)(logits, jnp.asarray(toks), jnp.asarray(msk), jnp.asarray(pm),
                        jnp.asarray(prm))
  assert_close(got, rows.mean(), terms=10)
  # Packed rows: each segment is an example of its own (row 0: two conversations of lengths 2 and
  # 3; row 1: one conversation then padding), the mean over examples with an answer.
  seg = np.array([[1, 1, 2, 2, 2], [1, 1, 1, 0, 0]])
  prm = np.array([[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  valid = seg > 0
  a = ~prm & valid
  term = ce * (msk & a) / pm
  per_example = [term[r][seg[r] == s].sum() / a[r][seg[r] == s].sum()
                 for r, s in ((0, 1), (0, 2), (1, 1))]
  got, _ = jax.jit(obj.sft_loss)(logits, jnp.asarray(toks), jnp.asarray(msk), jnp.asarray(pm),
                                 jnp.asarray(prm), valid_BL=jnp.asarray(valid),
                                 segment_ids_BL=jnp.asarray(seg))
  assert_close(got, np.mean(per_example), terms=10)


def test_random_length_mask_one_compile():
  fn = jax.jit(lambda k: obj.random_length_mask(k, 3, 32, prob=1.0))
  lengths = set()
  for i in range(20):
    valid = np.asarray(fn(jax.random.key(i)))
    assert (valid == valid[:1]).all()  # one length for the whole batch
    n = int(valid[0].sum())
    assert valid[0, :n].all() and 1 <= n <= 32
    lengths.add(n)
  assert len(lengths) > 5 and fn._cache_size() == 1
  assert np.asarray(obj.random_length_mask(jax.random.key(0), 2, 8, prob=0.0)).all()
  with pytest.raises(ValueError):
    obj.random_length_mask(jax.random.key(0), 2, 8, min_length=9)


# ---------------------------------------------------------------------------------------------
# Likelihood


def test_stratified_counts_cover_every_length():
  counts = jax.jit(obj.stratified_mask_counts, static_argnums=(1, 2))
  for seed in range(5):
    l = np.asarray(counts(jax.random.key(seed), 8, 8))
    assert sorted(l.tolist()) == list(range(1, 9))
  l = np.asarray(counts(jax.random.key(0), 5, 16))
  assert l.min() >= 1 and l.max() <= 5


def test_likelihood_converges_for_context_free_model():
  rng = np.random.default_rng(3)
  table = (rng.standard_normal((10, V)) * 1.5).astype(np.float32)
  table_u = rng.standard_normal((10, V)).astype(np.float32)
  fixed = lambda params, t: jnp.broadcast_to(table[: t.shape[1]], t.shape + (V,))
  prompt = np.array([1, 5, 6, 7])
  answer = np.array([8, 9, 4, 10, 11, 2])
  logp = np.log(softmax_np(table))[np.arange(4, 10), np.asarray(answer)]
  exact = logp.sum()
  est = obj.log_likelihood(fixed, None, prompt, answer, mask_id=MASK, key=jax.random.key(0),
                           mc_num=512, batch_size=64)
  assert abs(est - exact) < 0.03 * abs(exact), (est, exact)
  # Single-token answers are exact with one sample.
  one = obj.log_likelihood(fixed, None, prompt, answer[:1], mask_id=MASK, key=jax.random.key(1),
                           mc_num=4, batch_size=4)
  assert_close(one, logp[0], terms=V)

  # CFG: with a model whose unconditional logits differ, the estimate converges to the exact
  # log-likelihood of the guided logits u + (w + 1)(c - u).
  def guided(params, t):
    del params
    uncond = (t[:, :1] == MASK)[..., None]
    return jnp.where(uncond, table_u[: t.shape[1]], table[: t.shape[1]])

  w = 0.5
  u, c = np.asarray(table_u), np.asarray(table)
  g = u + (w + 1) * (c - u)
  exact_g = np.log(softmax_np(g))[np.arange(4, 10), np.asarray(answer)].sum()
  est_g = obj.log_likelihood(guided, None, prompt, answer, mask_id=MASK, key=jax.random.key(2),
                             mc_num=512, batch_size=64, cfg_scale=w)
  assert abs(est_g - exact_g) < 0.03 * abs(exact_g), (est_g, exact_g)


def test_likelihood_with_module(tiny):
  model, params = tiny
  ll = obj.log_likelihood(model, params, np.array([1, 5, 6]), np.array([7, 8]), mask_id=MASK,
                          key=jax.random.key(0), mc_num=8, batch_size=4)
  assert np.isfinite(ll) and ll < 0
  with pytest.raises(ValueError, match='multiple'):
    obj.log_likelihood(model, params, jnp.array([1]), jnp.array([7]), mask_id=MASK,
                       key=jax.random.key(0), mc_num=10, batch_size=4)


# ---------------------------------------------------------------------------------------------
# Sampling


def test_schedule_counts():
  counts = np.asarray(jax.jit(sd.num_transfer_tokens, static_argnums=1)(np.array([8, 7, 2]), 3))
  np.testing.assert_array_equal(counts, [[3, 3, 2], [3, 2, 2], [1, 1, 0]])


def test_generate_block_order_step_counts_no_remasking():
  prompt = np.array([[1, 5, 6], [1, 7, 8]])
  out, st = sd.generate(fake_apply, None, prompt, mask_id=MASK, key=jax.random.key(0),
                        gen_length=16, steps=6, block_length=8, return_stats=True)
  out, step, count = map(np.asarray, (out, st['commit_step'], st['commit_count']))
  assert (out[:, :3] == np.asarray(prompt)).all() and not (out == MASK).any()
  assert (count == 1).all()  # each position committed exactly once: never remasked
  assert int(st['steps']) == 6 and int(st['nfe_full']) == 6
  for r in range(2):
    # Block order: every token of block 0 before any of block 1.
    assert step[r, :8].max() < step[r, 8:].min()
    # LLaDA's linear schedule: 8 tokens over 3 steps = 3, 3, 2.
    np.testing.assert_array_equal(np.bincount(step[r], minlength=6), [3, 3, 2, 3, 3, 2])
  ref = reference_generate(fake_apply, None, prompt, gen_length=16, steps=6, block_length=8)
  np.testing.assert_array_equal(out, ref)
  # Greedy is deterministic and ignores the key.
  again = sd.generate(fake_apply, None, prompt, mask_id=MASK, key=jax.random.key(99),
                      gen_length=16, steps=6, block_length=8)
  np.testing.assert_array_equal(out, np.asarray(again))


def test_generate_temperature_and_random_remasking():
  prompt = np.array([[1, 5, 6]] * 4)
  kw = dict(mask_id=MASK, gen_length=8, steps=8, block_length=4, temperature=5.0,
            remasking='random')
  a = np.asarray(sd.generate(fake_apply, None, prompt, key=jax.random.key(0), **kw))
  b = np.asarray(sd.generate(fake_apply, None, prompt, key=jax.random.key(0), **kw))
  c = np.asarray(sd.generate(fake_apply, None, prompt, key=jax.random.key(1), **kw))
  np.testing.assert_array_equal(a, b)  # same key, same sample
  assert (a != c).any() and (a[0] != a[1]).any()  # it does sample
  assert not (a == MASK).any()


def test_cfg_formula():
  c = np.zeros(V, np.float32)
  c[4], c[6] = 1.0, 0.8
  u = np.zeros(V, np.float32)
  u[5], u[6] = 1.0, -1.0

  def fn(params, t):  # conditional iff the prompt (position 0) is not masked
    del params
    cond = (t[:, 0] != MASK)[:, None, None]
    return jnp.broadcast_to(jnp.where(cond, c, u), t.shape + (V,))

  prompt = np.array([[1, 9]])
  kw = dict(mask_id=MASK, key=jax.random.key(0), gen_length=4, steps=4, block_length=4)
  plain = np.asarray(sd.generate(fn, None, prompt, **kw))
  guided = np.asarray(sd.generate(fn, None, prompt, cfg_scale=1.0, **kw))
  assert (plain[0, 2:] == 4).all()  # argmax c
  assert (guided[0, 2:] == 6).all()  # argmax of u + 2 (c - u) = 2c - u (and not of c or u)


def test_eos_controls():
  def fn(params, t):  # EOS is the confident choice on odd positions, token 5 (less so) on even
    del params
    pos = np.arange(t.shape[1])
    eos_row, tok_row = np.zeros(V, np.float32), np.zeros(V, np.float32)
    eos_row[EOS], eos_row[7], tok_row[5] = 6.0, 1.0, 2.0
    return jnp.broadcast_to(np.where((pos % 2 == 1)[:, None], eos_row, tok_row), t.shape + (V,))

  prompt = np.array([[1, 9]])  # generated positions 2..9: odd ones prefer EOS
  kw = dict(mask_id=MASK, key=jax.random.key(0), gen_length=8, steps=8, block_length=8,
            return_stats=True)
  kw['eos_id'] = (EOS, 15)  # EOS and an "EoT"; one compile for all three runs
  out, st = sd.generate(fn, None, prompt, **kw)
  odd = np.arange(2, 10) % 2 == 1
  assert (np.asarray(out)[0, 2:][odd] == EOS).all()
  assert np.asarray(st['commit_step'])[0][odd].max() < np.asarray(st['commit_step'])[0][~odd].min()
  out, _ = sd.generate(fn, None, prompt, forbid_eos=True, **kw)
  assert not (np.asarray(out) == EOS).any() and (np.asarray(out)[0, 2:][odd] == 7).all()
  out, st = sd.generate(fn, None, prompt, eos_low_confidence=True, **kw)
  step = np.asarray(st['commit_step'])[0]
  assert (np.asarray(out)[0, 2:][odd] == EOS).all() and step[odd].min() > step[~odd].max()


def test_threshold_decoding_commits_at_least_one_per_step():
  prompt = np.array([[1, 5, 6], [1, 7, 8]])
  kw = dict(mask_id=MASK, key=jax.random.key(0), gen_length=8, steps=8, block_length=4,
            return_stats=True)
  # Nothing exceeds 1.0: exactly the top-1 per step.
  out, st = sd.generate(fake_apply, None, prompt, threshold=1.0, **kw)
  assert int(st['steps']) == 8 and not (np.asarray(out) == MASK).any()
  assert all(sorted(r) == list(range(8)) for r in np.asarray(st['commit_step']).tolist())
  # Everything exceeds 0: one step per block.
  out0, st = sd.generate(fake_apply, None, prompt, threshold=0.0, **kw)
  assert int(st['steps']) == 2 and (np.asarray(st['commit_count']) == 1).all()
  # In between: >= 1 per step per row (while the row's block has masks), never remasked.
  out, st = sd.generate(fake_apply, None, prompt, threshold=0.3, **kw)
  step, count = np.asarray(st['commit_step']), np.asarray(st['commit_count'])
  assert (count == 1).all() and not (np.asarray(out) == MASK).any()
  for r in range(2):
    for blk in (step[r, :4], step[r, 4:]):
      assert set(blk) == set(range(blk.min(), blk.max() + 1))


def test_infill():
  toks = np.array([[1, MASK, MASK, 9, 10, MASK, 2], [1, 8, MASK, 9, 10, 11, 2]])
  out, st = sd.infill(fake_apply, None, toks, mask_id=MASK, key=jax.random.key(0), steps=3,
                      return_stats=True)
  out, step = np.asarray(out), np.asarray(st['commit_step'])
  keep = np.asarray(toks) != MASK
  assert (out[keep] == np.asarray(toks)[keep]).all() and not (out == MASK).any()
  assert sorted(step[0][step[0] >= 0].tolist()) == [0, 1, 2] and (step[1] >= 0).sum() == 1


def test_generate_validation(tiny):
  model, params = tiny
  p = np.array([[1, 5]])
  kw = dict(mask_id=MASK, key=jax.random.key(0))
  with pytest.raises(ValueError, match='multiple of block_length'):
    sd.generate(fake_apply, None, p, gen_length=10, steps=10, block_length=4, **kw)
  with pytest.raises(ValueError, match='number of blocks'):
    sd.generate(fake_apply, None, p, gen_length=8, steps=3, block_length=4, **kw)
  with pytest.raises(ValueError, match='steps must be <= gen_length'):
    sd.generate(fake_apply, None, p, gen_length=8, steps=16, block_length=4, **kw)
  with pytest.raises(ValueError, match='Transformer module'):
    sd.generate(fake_apply, None, p, gen_length=8, steps=8, block_length=4, cache='dual', **kw)
  with pytest.raises(ValueError, match='Transformer module'):
    sd.generate(fake_apply, None, p, gen_length=8, steps=8, block_length=4,
                prompt_mask_BP=np.ones_like(p, bool), **kw)
  with pytest.raises(ValueError, match='remasking'):
    sd.generate(fake_apply, None, p, gen_length=8, steps=8, block_length=4, remasking='x', **kw)
  with pytest.raises(ValueError, match='need eos_id'):
    sd.generate(fake_apply, None, p, gen_length=8, steps=8, block_length=4, forbid_eos=True, **kw)
  with pytest.raises(ValueError, match='cache'):
    sd.generate(model, params, p, gen_length=8, steps=8, block_length=4, cache='full', **kw)
  with pytest.raises(ValueError, match='vocabulary'):
    sd.generate(model, params, p, gen_length=8, steps=8, block_length=4, mask_id=V, key=None)


GEN = dict(mask_id=MASK, gen_length=8, steps=4, block_length=4)


def test_model_matches_reference_and_refreshed_caches(tiny):
  model, params = tiny
  apply = lambda p, t: model.apply({'params': p}, t)
  prompt = np.array([[1, 5, 6, 7, 4], [1, 9, 10, 11, 12]])
  ref = reference_generate(apply, params, prompt, gen_length=8, steps=4, block_length=4)
  out = np.asarray(sd.generate(model, params, prompt, key=jax.random.key(0), **GEN))
  np.testing.assert_array_equal(out, ref)
  # A cache refreshed at every step is the uncached sampler.
  for cache in ('dual', 'prefix'):
    got, st = sd.generate(model, params, prompt, key=jax.random.key(0), cache=cache,
                          refresh_every=1, return_stats=True, **GEN)
    np.testing.assert_array_equal(np.asarray(got), ref, err_msg=cache)
    assert int(st['nfe_cached']) == 0 and int(st['nfe_full']) == 4


@pytest.mark.parametrize('attention', ['xla', pytest.param('cpu', marks=requires_cxx)])
def test_cached_forward_is_exact_when_fresh(tiny, attention):
  """The cached window forward against a just-filled cache equals the full forward's logits."""
  model, params = tiny
  model = Transformer(model.cfg.replace(attention=attention))
  fwd = sd._Forward(model)
  x = np.random.default_rng(3).integers(4, V, (2, 12)).astype(np.int32)
  pos = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
  seg = np.ones((2, 12), np.int32)

  @jax.jit
  def run(params, x):
    full = model.apply({'params': params}, x)
    _, kv = fwd.full(params, x, pos, seg, 4, 4, use_segments=True, with_cache=True)
    dual, _ = fwd.cached(params, x, pos, seg, kv, 4, 4, window=4)
    prefix, _ = fwd.cached(params, x, pos, seg, kv, 4, 4, window=8)
    return full, dual, prefix
  full, dual, prefix = run(params, x)
  assert_close(dual, full[:, 4:8], terms=12)  # the same function over fewer keys
  assert_close(prefix, full[:, 4:8], terms=12)


def test_fast_dllm_caches_and_threshold_run(tiny):
  model, params = tiny
  prompt = np.array([[1, 5, 6, 7, 4], [1, 9, 10, 11, 12]])
  for extra in (dict(cache='dual'), dict(cache='prefix'), dict(cache='dual', threshold=0.5)):
    out, st = sd.generate(model, params, prompt, key=jax.random.key(0), return_stats=True,
                          **GEN, **extra)
    out = np.asarray(out)
    assert (out[:, :5] == np.asarray(prompt)).all(), extra
    assert not (out == MASK).any() and ((out >= 0) & (out < V)).all(), extra
    assert (np.asarray(st['commit_count']) == 1).all(), extra
    assert int(st['nfe_full']) == 2, extra  # one refresh per block
    assert int(st['nfe_cached']) == int(st['steps']) - 2 > 0, extra
    step = np.asarray(st['commit_step'])
    assert (step[:, :4].max(1) < step[:, 4:].min(1)).all(), extra


@requires_cxx
def test_the_cpu_attention_kernel_samples_what_xla_attention_samples(tiny):
  """The Fast-dLLM caches attend over block windows and cached keys: the kernel's general mask
  path. Greedy decoding must pick the same tokens."""
  model, params = tiny
  cpu_model = Transformer(model.cfg.replace(attention='cpu'))
  prompt = np.array([[1, 5, 6, 7, 4], [1, 9, 10, 11, 12]])
  for extra in (dict(), dict(cache='dual'), dict(cache='prefix', threshold=0.5)):
    want = sd.generate(model, params, prompt, key=jax.random.key(0), **GEN, **extra)
    got = sd.generate(cpu_model, params, prompt, key=jax.random.key(0), **GEN, **extra)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(extra))


def test_left_padded_batch_equals_one_at_a_time(tiny):
  model, params = tiny
  long_p = np.array([[1, 5, 6, 7, 4]])
  short_p = np.array([[1, 9, 10]])
  batch = np.array([[1, 5, 6, 7, 4], [PAD, PAD, 1, 9, 10]])
  mask = batch != PAD
  kw = dict(GEN, cfg_scale=0.5)
  out = np.asarray(sd.generate(model, params, batch, key=jax.random.key(0), prompt_mask_BP=mask,
                               **kw))
  a = np.asarray(sd.generate(model, params, long_p, key=jax.random.key(0), **kw))
  b = np.asarray(sd.generate(model, params, short_p, key=jax.random.key(0), **kw))
  np.testing.assert_array_equal(out[0], a[0])
  np.testing.assert_array_equal(out[1, 2:], b[0])
  assert (out[1, :2] == PAD).all()


def test_the_validation_bound_averages_its_draws_and_draws_anew_per_batch(tmp_path):
  """`diffusion.eval_draws` K: the mean of K independent one-draw bounds (a plain numpy mean of
  per-key losses); no random-length cut in validation; each validation batch its own draws."""
  from helpers import tiny_config
  from pathways_jax import tasks
  from pathways_jax.train import loop, step as step_lib
  cfg = tiny_config(str(tmp_path), objective='diffusion', **{'model.causal': False,
                                                            'diffusion.random_length_prob': 1.0,
                                                            'diffusion.eval_draws': 3})
  tok, _, model, mesh, rules = loop.build(cfg)
  task = tasks.make(cfg, model)
  rng = np.random.default_rng(0)
  batch = {'tokens': jnp.asarray(rng.integers(4, 200, (4, 32)), jnp.int32),
           'segment_ids': jnp.ones((4, 32), jnp.int32),
           'positions': jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (4, 32))}
  params = model.init(jax.random.key(0), batch['tokens'])['params']
  key = jax.random.key(7)
  got, _ = task.eval_loss(params, batch, key)
  want = []
  for k in jax.random.split(key, 3):  # one draw each, every position valid (no length cut)
    noisy, masked, p_mask = obj.forward_process(k, batch['tokens'], mask_id=tok.mask_id,
                                                eps=cfg.diffusion.eps)
    logits = model.apply({'params': params}, noisy, positions_BL=batch['positions'],
                         segment_ids_BL=batch['segment_ids'])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
    ce = -np.take_along_axis(np.asarray(logp), np.asarray(batch['tokens'])[..., None], -1)[..., 0]
    want.append((ce * np.asarray(masked) / np.asarray(p_mask)).sum() / batch['tokens'].size)
  assert float(got) == pytest.approx(np.mean(want), rel=1e-4)
  assert np.std(want) > 0  # the draws differ: an average, not one draw three times
  # Through the loop's evaluation: two copies of one batch are drawn differently.
  eval_fn = step_lib.jit_eval_step(cfg, task, jax.tree.map(lambda _: None, params), mesh)
  host = {k: np.asarray(v) for k, v in batch.items()}
  one = loop.evaluate(eval_fn, params, [host], mesh, rules)['val_loss']
  two = loop.evaluate(eval_fn, params, [host, host], mesh, rules)['val_loss']
  assert one != two and loop.evaluate(eval_fn, params, [host, host], mesh, rules)['val_loss'] == two
