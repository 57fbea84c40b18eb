"""RL objectives on whole completions: the sequence-level clipped loss (GSPO, ESPO) and wd1's
weighted likelihood, against Python references written here from the papers' formulas, with
gradients in closed form, edge cases and bad input (the token-level ones:
tests/test_rl_objectives.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from pathways_jax.objectives import rl

# ----------------------------------------------------------------------------- sequence (GSPO)


def ref_sequence_loss(logp, old, adv, mask, *, eps_low, eps_high, ref=None, beta=0.0, kl='k3'):
  """Python floats, row by row, from GSPO's formula: loss, d loss / d logp (closed form)."""
  B, T = len(logp), len(logp[0])
  rows = [b for b in range(B) if sum(mask[b])]
  grad = np.zeros((B, T))
  loss = 0.0
  clipped_rows = 0
  for b in rows:
    n = sum(mask[b])
    toks = [t for t in range(T) if mask[b][t]]
    s = math.exp(sum(float(logp[b][t]) - float(old[b][t]) for t in toks) / n)
    a = float(adv[b])
    took_clipped = (a < 0 and s < 1 - eps_low) or (a > 0 and s > 1 + eps_high)
    clipped_rows += took_clipped
    clip = min(max(s, 1 - eps_low), 1 + eps_high)
    ell = -min(s * a, clip * a)
    dell = 0.0 if took_clipped else -s * a / n  # d(-s a)/d logp_t = -s a / n
    if ref is not None:
      d = sum(float(ref[b][t]) - float(logp[b][t]) for t in toks) / n
      ell += beta * {'k1': -d, 'k2': d * d / 2, 'k3': math.exp(d) - d - 1}[kl]
      dell += beta * {'k1': 1.0, 'k2': -d, 'k3': 1 - math.exp(d)}[kl] / n
    loss += ell / len(rows)
    for t in toks:
      grad[b, t] = dell / len(rows)
  return loss, grad, clipped_rows / len(rows)


@pytest.mark.parametrize('case', [dict(), dict(beta=0.2, kl='k2'), dict(beta=0.1, kl='k3'),
                                  dict(eps_low=0.01, eps_high=0.02)])
def test_sequence_policy_loss_values_gradient_and_clipping(case):
  rng = np.random.default_rng(11)
  B, T = 6, 5
  mask = (rng.random((B, T)) < 0.75).astype(np.int32)
  mask[2] = 0  # a row with no completion token: left out of the mean
  old = rng.uniform(-3, -0.1, size=(B, T)).astype(np.float32)
  logp = (old + rng.normal(scale=0.15, size=(B, T))).astype(np.float32)
  ref = (logp + rng.normal(scale=0.3, size=(B, T))).astype(np.float32)
  adv = np.array([1.0, -0.5, 2.0, -1.5, 0.7, -0.2], np.float32)
  eps = dict(eps_low=case.get('eps_low', 0.2), eps_high=case.get('eps_high', 0.2))
  kw = dict(beta=case.get('beta', 0.0), kl=case.get('kl', 'k3'), **eps)
  pad = mask == 0  # what padding may hold never reaches loss or gradient
  g_logp, g_old, g_ref = (np.where(pad, v, x).astype(np.float32)
                          for x, v in ((logp, 1e4), (old, -np.inf), (ref, np.nan)))
  loss, metrics = rl.sequence_policy_loss(g_logp, g_old, adv, mask, ref_logp_BT=g_ref, **kw)
  grad = jax.grad(lambda lp: rl.sequence_policy_loss(lp, g_old, adv, mask, ref_logp_BT=g_ref,
                                                     **kw)[0])(jnp.asarray(g_logp))
  want, want_grad, clipped = ref_sequence_loss(logp, old, adv, mask.tolist(), ref=ref, **kw)
  assert_close(loss, want, terms=B * T, scale=abs(want) + 1)
  assert_close(np.where(pad, 0.0, grad), want_grad, terms=B * T)
  assert float(metrics['clip_ratio/region_mean']) == pytest.approx(clipped, abs=1e-6)
  if 'eps_low' in case:
    assert 0 < clipped < 1  # both branches exercised
  if case.get('beta'):
    assert float(metrics['kl']) > 0


def test_sequence_policy_loss_is_one_ratio_per_row_not_per_token():
  """Two rows with the same mean log-ratio but opposite per-token ones: the token-level loss
  clips tokens, the sequence-level one sees a ratio of exactly exp(mean) and clips nothing;
  on-policy (old = logp) the sequence loss is -mean(A) and its gradient -A / (n rows)."""
  logp = np.array([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]], np.float32)
  old = logp - np.array([[0.5, -0.5, 0.0], [0.3, -0.3, 0.0]], np.float32)
  mask = np.ones((2, 3), np.int32)
  adv = np.array([1.0, -1.0], np.float32)
  _, m = rl.sequence_policy_loss(logp, old, adv, mask)
  assert float(m['ratio/mean']) == pytest.approx(1.0, abs=1e-6)
  assert float(m['clip_ratio/region_mean']) == 0.0
  assert float(rl.policy_loss(logp, old, adv, mask)[1]['clip_ratio/region_mean']) > 0
  loss, _ = rl.sequence_policy_loss(logp, logp, adv, mask)
  assert float(loss) == pytest.approx(0.0, abs=1e-6)  # -(1 * 1 + 1 * -1) / 2
  g = jax.grad(lambda lp: rl.sequence_policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask)[0])(
      jnp.asarray(logp))
  np.testing.assert_allclose(g, -adv[:, None] / 3 / 2 * np.ones((2, 3)), atol=1e-6)
  with pytest.raises(ValueError, match=r'advantages_B must have shape \[B\]'):
    rl.sequence_policy_loss(logp, old, np.zeros((2, 3)), mask)
  with pytest.raises(ValueError, match='needs ref_logp_BT'):
    rl.sequence_policy_loss(logp, old, adv, mask, beta=0.1)


# ----------------------------------------------------------------------------- wd1


def ref_wd1(logp, adv, mask, G):
  """Python floats from wd1's formula: per group, w_i = e^{A_i} / sum_j e^{A_j} - e^{-A_i} /
  sum_j e^{-A_j}; loss = -(1/P) sum_i w_i sum_t m logp; d loss / d logp_bt = -(1/P) w_b m_bt."""
  B, T = len(logp), len(logp[0])
  P = B // G
  w = []
  for p in range(P):
    a = [float(x) for x in adv[p * G:(p + 1) * G]]
    pos, neg = [math.exp(x) for x in a], [math.exp(-x) for x in a]
    w += [pos[i] / sum(pos) - neg[i] / sum(neg) for i in range(G)]
  loss = -sum(w[b] * sum(float(logp[b][t]) for t in range(T) if mask[b][t])
              for b in range(B)) / P
  grad = np.array([[-w[b] * mask[b][t] / P for t in range(T)] for b in range(B)])
  return w, loss, grad


def test_wd1_weights_loss_and_gradient():
  rng = np.random.default_rng(5)
  G, P, T = 4, 3, 5
  adv = rng.normal(size=(P, G)).astype(np.float32)
  adv[2] = 0.0  # a group with all-equal rewards: weight 0 for every completion
  logp = rng.normal(-2.0, 1.0, size=(P * G, T)).astype(np.float32)
  mask = (rng.random((P * G, T)) < 0.7).astype(np.int32)
  mask[1] = 0  # a row with no completion token
  w_want, loss_want, grad_want = ref_wd1(logp, adv.reshape(-1), mask, G)
  w = rl.wd1_weights(adv)
  assert_close(w.reshape(-1), np.array(w_want), terms=G)
  np.testing.assert_allclose(np.asarray(w).sum(axis=1), 0.0, atol=1e-6)
  assert np.all(np.asarray(w)[2] == 0)
  best = np.argmax(adv[0])
  assert np.asarray(w)[0, best] > 0 and np.asarray(w)[0, np.argmin(adv[0])] < 0
  logp_pad = np.where(mask == 1, logp, np.nan).astype(np.float32)  # masked entries never read
  entropy = rng.random((P * G, T)).astype(np.float32)
  loss, metrics = rl.wd1_loss(logp_pad, w.reshape(-1), mask, group_size=G, entropy_BT=entropy)
  grad = jax.grad(lambda lp: rl.wd1_loss(lp, w.reshape(-1), mask, group_size=G)[0])(
      jnp.asarray(logp_pad))
  assert_close(loss, loss_want, terms=P * G * T, scale=abs(loss_want) + 1)
  assert_close(grad, grad_want, terms=P * G)
  assert float(metrics['wd1/weight_abs_mean']) == pytest.approx(
      np.mean(np.abs(w_want)), rel=1e-5)
  rows = mask.any(axis=1)
  assert float(metrics['seq_logp/mean']) == pytest.approx(
      (logp * mask).sum(axis=1)[rows].mean(), rel=1e-5)
  assert float(metrics['entropy']) == pytest.approx((entropy * mask).sum() / mask.sum(), rel=1e-5)
  # The weights are constants: no gradient flows into them.
  gw = jax.grad(lambda ww: rl.wd1_loss(logp, ww, mask, group_size=G)[0])(w.reshape(-1))
  assert np.all(np.asarray(gw) == 0)


def test_wd1_refusals():
  logp, mask = np.zeros((4, 3), np.float32), np.ones((4, 3), np.int32)
  with pytest.raises(ValueError, match=r'weights_B must have shape \[B\] = \(4,\)'):
    rl.wd1_loss(logp, np.zeros(3), mask, group_size=2)
  with pytest.raises(ValueError, match='group_size must be an integer >= 1'):
    rl.wd1_loss(logp, np.zeros(4), mask, group_size=0)
  with pytest.raises(ValueError, match='advantages_PG'):
    rl.wd1_weights(np.zeros(4))
