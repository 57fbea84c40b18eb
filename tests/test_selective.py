"""RHO-1 selection and loss: against a plain numpy sort, edge cases, gradients, sharding."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_on_fake_devices
from numerics import assert_close
from pathways_jax.objectives import autoregressive, selective


def reference_select(score, valid, ratio, per_sequence=False):
  """Plain numpy: stable sort of the valid tokens by descending score, keep the first k."""
  score, valid = np.asarray(score, np.float32), np.asarray(valid, bool)
  rows = [(score.reshape(-1), valid.reshape(-1))] if not per_sequence else list(zip(score, valid))
  out = []
  for s, v in rows:
    n = int(v.sum())
    k = int(np.floor(np.float32(ratio) * np.float32(n) + np.float32(0.5)))
    k = min(max(k, min(n, 1)), n)
    idx = np.flatnonzero(v)
    order = idx[np.argsort(-s[idx], kind='stable')]
    sel = np.zeros_like(v)
    sel[order[:k]] = True
    out.append(sel)
  return np.stack(out).reshape(score.shape)


def _random_case(seed, b=6, l=23, ties=False):
  rng = np.random.default_rng(seed)
  score = (rng.integers(0, 4, (b, l)).astype(np.float32) if ties
           else rng.normal(size=(b, l)).astype(np.float32))
  lengths = rng.integers(0, l + 1, b)
  valid = np.arange(l)[None, :] < lengths[:, None]  # right padding, including an empty row
  valid[0, :] = False
  return score, valid


# Test programs are tiny; XLA's backend optimisations cost more compile time than they save.
_select = jax.jit(selective.select_tokens, static_argnames=('per_sequence',),
                  compiler_options={'xla_backend_optimization_level': 0})


@pytest.mark.parametrize('per_sequence', [False, True])
@pytest.mark.parametrize('ties', [False, True])
def test_select_matches_numpy_sort(per_sequence, ties):
  for seed, ratio in [(0, 0.6), (1, 0.3), (2, 0.75), (3, 1.0), (4, 0.05)]:
    score, valid = _random_case(seed, ties=ties)
    got = np.asarray(_select(score, valid, ratio, per_sequence=per_sequence))
    want = reference_select(score, valid, ratio, per_sequence)
    np.testing.assert_array_equal(got, want, err_msg=f'seed={seed} ratio={ratio}')
    assert not (got & ~valid).any()


def test_ratio_edge_cases():
  score, valid = _random_case(5)
  np.testing.assert_array_equal(_select(score, valid, 1.0), valid)  # 1 keeps every valid token
  for bad in (0, 0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match='ratio'):
      selective.select_tokens(score, valid, bad)
  tiny = np.asarray(_select(score, valid, 1e-6))
  assert tiny.sum() == 1 and tiny[np.unravel_index(np.argmax(np.where(valid, score, -np.inf)),
                                                   score.shape)]
  assert not np.asarray(_select(score, np.zeros_like(valid), 0.5)).any()  # nothing valid
  # A traced ratio (e.g. a schedule) selects the same tokens as the static one.
  traced = jax.jit(lambda s, v, r: selective.select_tokens(s, v, r))(score, valid, 0.6)
  np.testing.assert_array_equal(traced, _select(score, valid, 0.6))
  # All-equal scores: ties go to the earliest positions in row-major order.
  flat = np.asarray(_select(np.zeros((2, 5), np.float32), np.ones((2, 5), bool), 0.5)).reshape(-1)
  np.testing.assert_array_equal(flat, np.arange(10) < 5)


def test_rounding_rule():
  valid = np.ones((1, 10), bool)
  score = np.arange(10, dtype=np.float32)[None]
  assert int(_select(score, valid, 0.6).sum()) == 6
  assert int(_select(score, valid, 0.25).sum()) == 3  # 2.5 rounds half up
  assert int(_select(score, valid, 0.24).sum()) == 2


def test_loss_and_gradient_only_through_selected_tokens():
  rng = np.random.default_rng(0)
  tl = jnp.asarray(rng.uniform(0, 5, (4, 9)), jnp.float32)
  ref = jnp.asarray(rng.uniform(0, 5, (4, 9)), jnp.float32)
  valid = jnp.asarray(rng.uniform(size=(4, 9)) < 0.8)
  sel = selective.select_tokens(tl - ref, valid, 0.6)
  k = float(sel.sum())
  value, metrics = selective.loss(tl, ref, valid, 0.6)
  assert_close(value, float((tl * sel).sum()) / k, terms=tl.size)
  g_tl, g_ref = jax.grad(lambda a, b: selective.loss(a, b, valid, 0.6)[0], argnums=(0, 1))(tl, ref)
  assert_close(g_tl, np.asarray(sel, np.float32) / k)
  assert not np.asarray(g_ref).any()
  assert metrics['num_selected'] == k
  assert_close(metrics['selected_fraction'], k / float(valid.sum()))
  assert metrics['excess_kept'] > metrics['excess_dropped']
  # An inf loss at a dropped position does not poison the value or the gradient.
  tl_inf = jnp.where(valid, tl, jnp.inf)
  v2, _ = selective.loss(tl_inf, ref, valid, 0.6)
  assert_close(v2, value, terms=tl.size)


def test_ratio_one_is_the_ar_loss_and_noise_metrics():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 8, 11)), jnp.float32)
  ref_logits = jnp.asarray(rng.normal(size=(3, 8, 11)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 11, (3, 8)))
  seg = jnp.asarray([[1] * 8, [1] * 5 + [2] * 3, [1] * 6 + [0] * 2])
  tl, valid = selective.ar_token_losses(logits, tokens, seg)
  ref, _ = selective.ar_token_losses(ref_logits, tokens, seg)
  value, _ = selective.loss(tl, ref, valid, 1.0)
  want, _ = autoregressive.loss(logits, tokens, seg)
  assert_close(value, want, terms=logits.size)
  # Noise made obvious: noisy tokens get a large excess, so a ratio that keeps the clean ones drops
  # every noisy one.
  noise = jnp.asarray(rng.uniform(size=tl.shape) < 0.3) & valid
  clean_frac = float((valid & ~noise).sum()) / float(valid.sum())
  _, m = selective.loss(tl, ref, valid, clean_frac, score_BL=jnp.where(noise, -10.0, 0.0),
                        noise_BL=noise)
  assert float(m['noise_share_kept']) == 0.0 and float(m['noise_recall_dropped']) == 1.0


def test_alternative_scores():
  rng = np.random.default_rng(2)
  tl, ref, ent = (jnp.asarray(rng.uniform(0, 3, (2, 7)), jnp.float32) for _ in range(3))
  valid = jnp.ones((2, 7), bool)
  for score, s in [('reference_loss', -ref), ('reference_entropy', -ent)]:
    _, m = selective.loss(tl, ref, valid, 0.5, score=score, ref_entropy_BL=ent)
    sel = reference_select(np.asarray(s), np.asarray(valid), 0.5)
    assert m['num_selected'] == sel.sum()
    v, _ = selective.loss(tl, ref, valid, 0.5, score=score, ref_entropy_BL=ent)
    assert_close(v, float((tl * sel).sum() / sel.sum()), terms=tl.size)
  with pytest.raises(ValueError, match='ref_entropy_BL'):
    selective.loss(tl, ref, valid, 0.5, score='reference_entropy')
  with pytest.raises(ValueError, match='score'):
    selective.loss(tl, ref, valid, 0.5, score='nope')


def test_diffusion_helper_ratio_one_is_the_llada_loss():
  rng = np.random.default_rng(3)
  b, l, v = 3, 10, 13
  logits = jnp.asarray(rng.normal(size=(b, l, v)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, (b, l)))
  t = rng.uniform(0.1, 1.0, (b, 1))
  p_mask = jnp.asarray(np.broadcast_to(t, (b, l)), jnp.float32)
  masked = jnp.asarray(rng.uniform(size=(b, l)) < t)
  ce, w, valid = selective.diffusion_token_losses(logits, tokens, masked, p_mask)
  ref_ce, _, _ = selective.diffusion_token_losses(logits * 0.5, tokens, masked, p_mask)
  value, _ = selective.loss(ce, ref_ce, valid, 1.0, weights_BL=w, normalizer=1.0 * b * l)
  logp = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  want = float((jnp.where(masked, nll / p_mask, 0.0)).sum()) / (b * l)
  assert_close(value, want, terms=logits.size)
  # Ranking ignores the 1/p_mask weights: the selection is the one of the plain excess CE.
  _, m = selective.loss(ce, ref_ce, valid, 0.5, weights_BL=w, normalizer=0.5 * b * l)
  assert m['num_selected'] == reference_select(np.asarray(ce - ref_ce), np.asarray(valid), 0.5).sum()


_SHARDED = textwrap.dedent('''
  import sys; sys.path.insert(0, 'tests')
  import numpy as np, jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from numerics import assert_close
  from pathways_jax.objectives import selective
  assert len(jax.devices()) == 8, jax.devices()
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  score = rng.integers(0, 5, (8, 16)).astype(np.float32)  # many ties across shards
  score[::2] += rng.normal(size=(4, 16)).astype(np.float32)
  valid = rng.uniform(size=(8, 16)) < 0.7
  def f(a, b, per_seq):
    sel = selective.select_tokens(a, b, 0.6, per_sequence=per_seq)
    return sel, selective.loss(a, a * 0.5, b, 0.6, per_sequence=per_seq)[0]
  for per_seq in (False, True):
    want_sel, want_loss = jax.jit(f, static_argnums=2)(score, valid, per_seq)  # one device
    for spec in (P('data'), P('data', 'tensor')):
      sh = NamedSharding(mesh, spec)
      s, v = jax.device_put(score, sh), jax.device_put(valid, sh)
      got_sel, got_loss = jax.jit(f, static_argnums=2, out_shardings=(sh, None))(s, v, per_seq)
      assert len(got_sel.sharding.device_set) == 8
      np.testing.assert_array_equal(np.asarray(got_sel), np.asarray(want_sel))
      assert_close(got_loss, want_loss, terms=score.size)
  print('SHARDED_OK')
''')


def test_sharded_selection_equals_single_device():
  out = run_on_fake_devices(_SHARDED)
  assert 'SHARDED_OK' in out, out
