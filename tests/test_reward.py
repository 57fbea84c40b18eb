"""Bradley-Terry reward-model loss: against plain numpy (float64), its closed-form gradient, edge
cases, bad input."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from pathways_jax.objectives.reward import bradley_terry_loss

B = 32


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _rewards(seed):
  rng = np.random.default_rng(seed)
  r_w, r_l = rng.normal(0.5, 2.0, B), rng.normal(0.0, 2.0, B)
  margin = rng.uniform(0.0, 1.5, B)
  return [x.astype(np.float32) for x in (r_w, r_l, margin)]


@pytest.mark.parametrize('use_margin,center', [(False, 0.0), (True, 0.0), (True, 0.01),
                                               (False, 0.5)])
def test_matches_numpy(use_margin, center):
  r_w, r_l, margin = _rewards(int(use_margin) + 2 * int(center * 100))
  m = np.float64(margin) if use_margin else 0.0
  w, l = np.float64(r_w), np.float64(r_l)
  want = np.mean(-np_log_sigmoid(w - l - m)) + center * np.mean((w + l) ** 2)
  loss, metrics = bradley_terry_loss(r_w, r_l, margin_B=margin if use_margin else None,
                                     center_coef=center)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert_close(loss, want, terms=B, scale=max(want, np.abs(w - l).max()))
  assert float(metrics['accuracy']) == np.mean(w > l)
  assert 0 < np.mean(w > l) < 1
  assert_close(metrics['margin'], np.mean(w - l), terms=B, scale=np.abs(w - l).max())
  both = np.concatenate([w, l])
  assert float(metrics['min_reward']) == both.min() and float(metrics['max_reward']) == both.max()
  assert_close(metrics['mean_reward'], both.mean(), terms=2 * B, scale=np.abs(both).max())

  # Closed form: dL/dr_w = -sigma(-(r_w - r_l - m)) / B + 2 c (r_w + r_l) / B, and the negative
  # of the first term for r_l.
  fn = lambda a, b: bradley_terry_loss(a, b, margin_B=margin if use_margin else None,
                                       center_coef=center)[0]
  g_w, g_l = jax.grad(fn, argnums=(0, 1))(r_w, r_l)
  s = np.exp(np_log_sigmoid(-(w - l - m)))
  center_g = 2 * center * (w + l) / B
  assert_close(g_w, -s / B + center_g, scale=1 / B + np.abs(center_g).max())
  assert_close(g_l, s / B + center_g, scale=1 / B + np.abs(center_g).max())


def test_edges():
  r = np.linspace(-3, 3, B).astype(np.float32)
  loss, metrics = bradley_terry_loss(r, r)  # ties: P = 1/2, and a tie is not a correct ranking
  assert_close(loss, np.log(2.0))
  assert float(metrics['accuracy']) == 0.0 and float(metrics['margin']) == 0.0
  # A margin is the same as lowering the chosen reward by it.
  r_w, r_l, margin = _rewards(7)
  assert_close(bradley_terry_loss(r_w, r_l, margin_B=margin)[0],
               bradley_terry_loss(r_w - margin, r_l)[0])
  # Huge gaps: finite loss and gradient (log_sigmoid, not log(sigmoid)).
  big = np.array([1e4, -1e4], np.float32)
  loss, g = jax.value_and_grad(lambda a: bradley_terry_loss(a, np.zeros(2, np.float32))[0])(big)
  assert_close(loss, 1e4 / 2)
  assert np.isfinite(g).all()
  # jit, a traced centering coefficient, bfloat16 rewards upcast to float32.
  jitted = jax.jit(lambda a, b, c: bradley_terry_loss(a, b, center_coef=c))(r_w, r_l, 0.01)
  assert_close(jitted[0], bradley_terry_loss(r_w, r_l, center_coef=0.01)[0])
  low = bradley_terry_loss(jnp.asarray(r_w, jnp.bfloat16), jnp.asarray(r_l, jnp.bfloat16))[0]
  assert low.dtype == jnp.float32


def test_bad_input():
  r_w, r_l, margin = _rewards(8)
  with pytest.raises(ValueError, match=r'shapes differ: r_chosen_B \(32,\), r_rejected_B \(31,\)'):
    bradley_terry_loss(r_w, r_l[:-1])
  with pytest.raises(ValueError, match='margin_B'):
    bradley_terry_loss(r_w, r_l, margin_B=margin[:3])
  with pytest.raises(ValueError, match='center_coef must be >= 0'):
    bradley_terry_loss(r_w, r_l, center_coef=-0.1)


def test_matches_trl_golden():
  """TRL's RewardTrainer.compute_loss on fixed rewards (tests/golden/preference/make_golden.py)."""
  golden_dir = pathlib.Path(__file__).parent / 'golden' / 'preference'
  golden = json.loads((golden_dir / 'golden.json').read_text())['reward']
  data = np.load(golden_dir / 'golden.npz')
  r_w, r_l = np.split(data['rewards'], 2)  # TRL's rows are [chosen; rejected]
  for name, want in golden.items():
    margin = data['margins'] if want['margin'] else None
    loss, metrics = bradley_terry_loss(r_w, r_l, margin_B=margin, center_coef=want['center_coef'])
    scale = np.abs(data['rewards']).max() * 2
    assert_close(loss, want['loss'], terms=r_w.size, scale=scale, err_msg=name)
    for key, value in want['metrics'].items():
      assert_close(metrics[key], value, terms=r_w.size, scale=scale, err_msg=f'{name} {key}')


def test_a_mask_gives_the_loss_of_the_kept_pairs():
  """valid_B (packed pair slots): loss and metrics equal those of the kept pairs alone; the
  others get no gradient, even when they hold huge or non-finite values."""
  r_w, r_l, margin = _rewards(9)
  keep = np.arange(B) % 3 != 1
  r_w_bad = np.where(keep, r_w, np.float32(np.inf))  # padding slots may hold anything
  for kw, kw_kept in (({}, {}), ({'margin_B': margin, 'center_coef': 0.05},
                                 {'margin_B': margin[keep], 'center_coef': 0.05})):
    got, gm = bradley_terry_loss(r_w_bad, r_l, valid_B=keep, **kw)
    want, wm = bradley_terry_loss(r_w[keep], r_l[keep], **kw_kept)
    assert_close(got, want, terms=B, scale=float(want) + 10)
    assert gm.keys() == wm.keys()
    for k in wm:
      assert_close(gm[k], wm[k], terms=2 * B, scale=np.abs(r_w).max() + 1, err_msg=k)
    g_w, g_l = jax.grad(lambda a, b: bradley_terry_loss(a, b, valid_B=keep, **kw)[0],
                        argnums=(0, 1))(r_w_bad, r_l)
    for g in (g_w, g_l):
      assert np.all(np.asarray(g)[~keep] == 0) and np.all(np.asarray(g)[keep] != 0)
  # No valid pair: 0 loss and metrics, zero gradient.
  none = np.zeros(B, bool)
  loss, metrics = bradley_terry_loss(r_w, r_l, valid_B=none)
  assert float(loss) == 0 and all(float(v) == 0 for v in metrics.values())
  with pytest.raises(ValueError, match='valid_B'):
    bradley_terry_loss(r_w, r_l, valid_B=keep[:-1])
