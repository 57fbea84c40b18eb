"""RL objectives (group advantages incl. RLOO, KL estimators, the clipped policy loss and its
aggregations, GAE): against plain numpy / python-float implementations written here from the
papers' formulas, with gradients from finite differences or closed forms, edge cases, bad input.
The whole-completion objectives (GSPO/ESPO, wd1): tests/test_rl_sequence_objectives.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from pathways_jax.objectives import rl

# ----------------------------------------------------------------------------- references


def ref_group_advantages(r, scale, eps=1e-6):
  """float64 loops: one prompt (row) at a time."""
  r = np.asarray(r, np.float64)
  P, G = r.shape
  out = np.zeros_like(r)
  flat = [x for row in r for x in row]
  batch_mean = sum(flat) / len(flat)
  batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in flat) / (len(flat) - 1)) \
      if len(flat) > 1 else float('nan')
  for p in range(P):
    row = list(r[p])
    mean = sum(row) / G
    for i in range(G):
      if scale == 'rloo':
        others = row[:i] + row[i + 1:]
        out[p, i] = row[i] - sum(others) / len(others)
      elif scale == 'none':
        out[p, i] = row[i] - mean
      elif scale == 'group':
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (G - 1))
        out[p, i] = (row[i] - mean) / (std + eps)
      elif scale == 'batch':
        out[p, i] = (row[i] - mean) / (batch_std + eps)
  return out


def ref_kl(d, kind):
  d = np.asarray(d, np.float64)
  return {'k1': -d, 'k2': d * d / 2, 'k3': np.exp(d) - d - 1}[kind]


def ref_policy_loss(logp, old, adv, mask, *, eps_low, eps_high, agg, ref=None, beta=0.0,
                    kl='k3', max_len=None):
  """Python floats, token by token: loss, its gradient w.r.t. logp (closed form) and metrics."""
  B, T = len(logp), len(logp[0])
  per = [[0.0] * T for _ in range(B)]
  dper = [[0.0] * T for _ in range(B)]   # d l_t / d logp_t
  low = high = n = 0
  ratios, kls = [], []
  for b in range(B):
    for t in range(T):
      if not mask[b][t]:
        continue
      a = float(adv[b][t]) if np.ndim(adv) == 2 else float(adv[b])
      rho = math.exp(float(logp[b][t]) - float(old[b][t]))
      clip = min(max(rho, 1 - eps_low), 1 + eps_high)
      per[b][t] = -min(rho * a, clip * a)
      took_clipped = (a < 0 and rho < 1 - eps_low) or (a > 0 and rho > 1 + eps_high)
      dper[b][t] = 0.0 if took_clipped else -rho * a
      low += a < 0 and rho < 1 - eps_low
      high += a > 0 and rho > 1 + eps_high
      n += 1
      ratios.append(rho)
      if ref is not None:
        d = float(ref[b][t]) - float(logp[b][t])
        k = {'k1': -d, 'k2': d * d / 2, 'k3': math.exp(d) - d - 1}[kl]
        dk = {'k1': 1.0, 'k2': -d, 'k3': 1 - math.exp(d)}[kl]
        kls.append(k)
        per[b][t] += beta * k
        dper[b][t] += beta * dk
  weight = [[0.0] * T for _ in range(B)]
  if agg == 'token-mean':
    for b in range(B):
      for t in range(T):
        weight[b][t] = mask[b][t] / max(n, 1)
  elif agg == 'seq-mean-token-mean':
    rows = [b for b in range(B) if sum(mask[b]) > 0]
    for b in rows:
      for t in range(T):
        weight[b][t] = mask[b][t] / (sum(mask[b]) * len(rows))
  elif agg == 'seq-mean-token-sum-norm':
    L = T if max_len is None else max_len
    for b in range(B):
      for t in range(T):
        weight[b][t] = mask[b][t] / (B * L)
  loss = sum(weight[b][t] * per[b][t] for b in range(B) for t in range(T))
  grad = np.array([[weight[b][t] * dper[b][t] for t in range(T)] for b in range(B)])
  metrics = {'clip_ratio/low_mean': low / max(n, 1), 'clip_ratio/high_mean': high / max(n, 1),
             'clip_ratio/region_mean': (low + high) / max(n, 1),
             'ratio/mean': sum(ratios) / max(n, 1)}
  if ref is not None:
    metrics['kl'] = sum(kls) / max(n, 1)
  return loss, grad, metrics


def ref_gae(r, v, mask, gamma, lam):
  """Python double loop, forward sums: A_t = sum_k (gamma lam)^k delta_{t+k} along the run of
  valid tokens starting at t; V past the run is 0."""
  B, T = len(r), len(r[0])
  adv = np.zeros((B, T))
  for b in range(B):
    def delta(s):
      nxt = float(v[b][s + 1]) if s + 1 < T and mask[b][s + 1] else 0.0
      return float(r[b][s]) + gamma * nxt - float(v[b][s])
    for t in range(T):
      if not mask[b][t]:
        continue
      total, k = 0.0, 0
      while t + k < T and mask[b][t + k]:
        total += (gamma * lam) ** k * delta(t + k)
        k += 1
      adv[b, t] = total
  ret = np.where(np.asarray(mask, bool), adv + np.asarray(v, np.float64), 0.0)
  return adv, ret


# ----------------------------------------------------------------------------- group_advantages

REWARDS = np.array([[1.0, 0.0, 0.5, 2.0], [0.3, 0.3, 1.7, -1.0], [0.0, 1.0, 1.0, 0.0]])


@pytest.mark.parametrize('scale', rl.SCALES)
def test_group_advantages_values_and_gradient(scale):
  # Value and gradient of a weighted sum (one jitted program: faster than op-by-op here).
  w = np.random.default_rng(0).normal(size=REWARDS.shape)
  adv = lambda x: rl.group_advantages(x, scale=scale)
  got, grad = jax.jit(lambda x: (adv(x), jax.grad(lambda y: jnp.sum(w * adv(y)))(x)))(
      jnp.asarray(REWARDS, jnp.float32))
  assert got.dtype == jnp.float32 and got.shape == REWARDS.shape
  want = ref_group_advantages(REWARDS, scale)
  assert_close(got, want, terms=4, err_msg=scale)
  # The gradient against central differences of the float64 reference.
  h, fd = 1e-6, np.zeros_like(REWARDS)
  for idx in np.ndindex(*REWARDS.shape):
    up, down = REWARDS.copy(), REWARDS.copy()
    up[idx] += h
    down[idx] -= h
    fd[idx] = (np.sum(w * ref_group_advantages(up, scale))
               - np.sum(w * ref_group_advantages(down, scale))) / (2 * h)
  assert_close(grad, fd, terms=12, err_msg=f'{scale} gradient')


def test_group_advantages_scales_differ_and_rloo_identity():
  """The four scales are distinct on this data; RLOO is G/(G-1) times the centred rewards."""
  outs = {s: np.asarray(rl.group_advantages(jnp.asarray(REWARDS), scale=s)) for s in rl.SCALES}
  for a in rl.SCALES:
    for b in rl.SCALES:
      if a < b:
        assert np.max(np.abs(outs[a] - outs[b])) > 0.1, (a, b)
  assert_close(outs['rloo'], outs['none'] * 4 / 3)
  # Each group's advantages sum to 0 under every scale.
  for s in rl.SCALES:
    assert np.max(np.abs(outs[s].sum(axis=1))) < 1e-5, s


def test_group_advantages_constant_group_is_zero_with_finite_gradient():
  r = jnp.asarray([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
  adv, grad = jax.jit(lambda x: (rl.group_advantages(x),
                                 jax.grad(lambda y: rl.group_advantages(y)[:, 1].sum())(x)))(r)
  np.testing.assert_array_equal(np.asarray(adv[0]), 0.0)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_group_advantages_refusals():
  one = jnp.ones((5, 1))
  with pytest.raises(ValueError, match="scale='group' needs at least 2"):
    rl.group_advantages(one)
  with pytest.raises(ValueError, match="scale='rloo' needs at least 2"):
    rl.group_advantages(one, scale='rloo')
  with pytest.raises(ValueError, match="scale='batch' needs at least 2"):
    rl.group_advantages(jnp.ones((1, 1)), scale='batch')
  # Defined cases with groups of 1: the batch std over 5 rewards, and plain centring (zeros).
  assert rl.group_advantages(jnp.arange(5.0)[:, None], scale='batch').shape == (5, 1)
  np.testing.assert_array_equal(np.asarray(rl.group_advantages(one, scale='none')), 0.0)
  with pytest.raises(ValueError, match="scale='std'"):
    rl.group_advantages(jnp.ones((2, 2)), scale='std')
  with pytest.raises(ValueError, match='rewards_PG must have 2 dimensions'):
    rl.group_advantages(jnp.ones(4))
  with pytest.raises(ValueError, match='eps'):
    rl.group_advantages(jnp.ones((2, 2)), eps=-1.0)


# ----------------------------------------------------------------------------- kl_estimate


@pytest.mark.parametrize('kind', rl.KL_KINDS)
def test_kl_estimate_values_and_gradient(kind):
  rng = np.random.default_rng(1)
  logp = rng.uniform(-4, 0, size=(3, 5))
  ref = logp + rng.normal(scale=0.7, size=(3, 5))
  got = rl.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), kind=kind)
  assert got.dtype == jnp.float32
  # float32 rounds the inputs; the reference takes the same rounded inputs.
  l32, r32 = np.float32(logp).astype(np.float64), np.float32(ref).astype(np.float64)
  d = r32 - l32
  assert_close(got, ref_kl(d, kind), scale=np.max(np.abs(ref_kl(d, kind))) + 1, err_msg=kind)
  grad_logp, grad_ref = jax.grad(lambda a, b: rl.kl_estimate(a, b, kind).sum(), argnums=(0, 1))(
      jnp.asarray(l32, jnp.float32), jnp.asarray(r32, jnp.float32))
  want = {'k1': np.ones_like(d), 'k2': -d, 'k3': 1 - np.exp(d)}[kind]   # d KL / d logp
  assert_close(grad_logp, want, scale=np.max(np.abs(want)) + 1, err_msg=kind)
  np.testing.assert_array_equal(np.asarray(grad_ref), 0.0)   # the reference is a constant


def test_kl_k3_nonnegative_and_estimators_agree_to_second_order():
  d = np.concatenate([np.linspace(-20, 20, 401), np.geomspace(1e-9, 1e-1, 50),
                      -np.geomspace(1e-9, 1e-1, 50), [0.0]])
  k3 = np.asarray(rl.kl_estimate(jnp.zeros(d.shape), jnp.asarray(d), kind='k3'))
  assert np.all(k3 >= 0)
  # Per token, k3 = d^2/2 + d^3/6 + ...: k2 and k3 differ at third order.
  small = np.linspace(-0.05, 0.05, 11)
  k2 = np.asarray(rl.kl_estimate(jnp.zeros(11), jnp.asarray(small), kind='k2'))
  k3 = np.asarray(rl.kl_estimate(jnp.zeros(11), jnp.asarray(small), kind='k3'))
  assert np.all(np.abs(k3 - k2) <= np.abs(small) ** 3 / 6 * 1.1 + 1e-9)
  # In expectation over tokens drawn from pi (categorical p, reference q = p perturbed by size e):
  # E[k1] = E[k3] = KL(p||q) exactly, E[k2] = KL + O(e^3), so E[k2]/KL - 1 = O(e).
  rng = np.random.default_rng(2)
  a, u = rng.normal(size=6), rng.normal(size=6)
  rel_k2 = []
  for e in (0.2, 0.1, 0.05):
    logp = a - np.log(np.sum(np.exp(a)))
    logq = (a + e * u) - np.log(np.sum(np.exp(a + e * u)))
    p = np.exp(logp)
    kl_exact = float(np.sum(p * (logp - logq)))
    expect = {k: float(np.sum(p * np.asarray(
        rl.kl_estimate(jnp.asarray(logp), jnp.asarray(logq), kind=k), np.float64)))
        for k in rl.KL_KINDS}
    assert abs(expect['k1'] - kl_exact) < 1e-3 * kl_exact + 1e-7, (e, expect, kl_exact)
    assert abs(expect['k3'] - kl_exact) < 1e-3 * kl_exact + 1e-7, (e, expect, kl_exact)
    rel_k2.append(abs(expect['k2'] / kl_exact - 1))
  assert rel_k2[0] < 0.2
  assert 1.5 < rel_k2[0] / rel_k2[1] < 2.5 and 1.5 < rel_k2[1] / rel_k2[2] < 2.5, rel_k2


def test_kl_estimate_refusals():
  with pytest.raises(ValueError, match="kind='k4'"):
    rl.kl_estimate(jnp.zeros(3), jnp.zeros(3), kind='k4')
  with pytest.raises(ValueError, match='shapes differ'):
    rl.kl_estimate(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


# ----------------------------------------------------------------------------- policy_loss

EPS_LOW, EPS_HIGH = 0.2, 0.28
# Ratios chosen around the band [0.8, 1.28]: inside, outside in the direction that clips, outside
# in the direction that does not. Row 2 is all padding; row 3 is short.
RATIOS = np.array([
    [1.00, 1.25, 1.40, 0.70, 1.10, 9.99],   # A > 0: 1.25 inside (outside with eps_high=0.2),
                                            # 1.40 high-clipped, 0.70 not clipped (A > 0)
    [0.70, 0.85, 1.50, 0.75, 1.00, 1.20],   # A < 0: 0.70 and 0.75 low-clipped, 1.50 unclipped
    [1.00, 2.00, 0.10, 1.00, 1.00, 1.00],   # all padding
    [1.05, 0.50, 1.00, 1.00, 1.00, 1.00],   # A < 0: 0.50 low-clipped
])
MASK = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
ADV_B = np.array([1.5, -0.8, 0.3, -2.0])


def _policy_inputs(garbage=True):
  rng = np.random.default_rng(3)
  old = rng.uniform(-3, -0.1, size=RATIOS.shape).astype(np.float32)
  logp = (old + np.log(RATIOS)).astype(np.float32)
  ref = (logp + rng.normal(scale=0.3, size=RATIOS.shape)).astype(np.float32)
  entropy = rng.uniform(0, 2, size=RATIOS.shape).astype(np.float32)
  if garbage:   # what padding may hold: nothing of it may reach loss, gradient or metrics
    pad = MASK == 0
    logp[pad], old[pad], ref[pad], entropy[pad] = 1e4, -np.inf, np.nan, np.nan
  return logp, old, ref, entropy


CASES = [dict(agg=a) for a in rl.AGGREGATIONS] + [
    dict(agg='seq-mean-token-sum-norm', max_len=10),
    dict(agg='token-mean', beta=0.1, kl='k3'),
    dict(agg='seq-mean-token-mean', beta=0.05, kl='k2'),
    dict(agg='seq-mean-token-sum-norm', beta=0.3, kl='k1', max_len=8),
    dict(agg='token-mean', per_token_adv=True),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_policy_loss_values_gradient_metrics(case):
  case = dict(case)
  per_token_adv = case.pop('per_token_adv', False)
  beta = case.get('beta', 0.0)
  logp, old, ref, entropy = _policy_inputs()
  adv = (np.random.default_rng(4).normal(size=RATIOS.shape).astype(np.float32) if per_token_adv
         else ADV_B.astype(np.float32))
  pass_ref = beta > 0
  kw = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, **case)

  def f(lp):
    return rl.policy_loss(lp, old, adv, MASK, ref_logp_BT=ref if pass_ref else None,
                          entropy_BT=entropy, **kw)

  (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(logp))
  want_loss, want_grad, want_metrics = ref_policy_loss(
      logp, old, adv, MASK.tolist(), ref=ref if pass_ref else None, **kw)
  assert loss.dtype == jnp.float32
  assert_close(loss, want_loss, terms=24, scale=2.0, err_msg='loss')
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  assert_close(grad, want_grad, terms=1, scale=float(np.max(np.abs(want_grad))), err_msg='grad')
  # Exact zeros: padding, and (without the KL term) every token where the clipped branch is taken.
  np.testing.assert_array_equal(grad[MASK == 0], 0.0)
  if not per_token_adv:
    clipped = (((ADV_B[:, None] > 0) & (RATIOS > 1 + EPS_HIGH))
               | ((ADV_B[:, None] < 0) & (RATIOS < 1 - EPS_LOW))) & (MASK == 1)
    assert clipped.sum() == 4   # 1.40 in row 0; 0.70, 0.75 in row 1; 0.50 in row 3
    if beta == 0:
      np.testing.assert_array_equal(grad[clipped], 0.0)
      assert np.all(grad[~clipped & (MASK == 1)] != 0)
  for k, v in want_metrics.items():
    assert_close(metrics[k], v, terms=12, scale=max(abs(v), 1.0), err_msg=k)
  ent = entropy.astype(np.float64)[MASK == 1].mean()
  assert_close(metrics['entropy'], ent, terms=12, err_msg='entropy')
  assert ('kl' in metrics) == pass_ref
  # The (stop-gradient) old log-probs, reference and advantages get no gradient.
  g_old = jax.jit(jax.grad(lambda o: rl.policy_loss(
      jnp.asarray(logp), o, adv, MASK, ref_logp_BT=ref if pass_ref else None, **kw)[0]))(
          jnp.asarray(np.where(MASK == 1, old, 0.0)))
  np.testing.assert_array_equal(np.asarray(g_old), 0.0)


def test_policy_loss_clip_metrics_by_hand():
  """The fractions on the fixture, counted by hand: 13 valid tokens; high-clipped: row 0's 1.40;
  low-clipped: row 1's 0.70, 0.75 and row 3's 0.50."""
  logp, old, _, _ = _policy_inputs()
  _, m = rl.policy_loss(logp, old, ADV_B, MASK, eps_low=EPS_LOW, eps_high=EPS_HIGH)
  assert abs(float(m['clip_ratio/high_mean']) - 1 / 13) < 1e-6
  assert abs(float(m['clip_ratio/low_mean']) - 3 / 13) < 1e-6
  assert abs(float(m['clip_ratio/region_mean']) - 4 / 13) < 1e-6
  # Symmetric eps 0.2 also clips row 0's 1.25 (DAPO's clip-higher is what keeps it).
  _, m = rl.policy_loss(logp, old, ADV_B, MASK, eps_low=0.2, eps_high=0.2)
  assert abs(float(m['clip_ratio/high_mean']) - 2 / 13) < 1e-6
  # A zero advantage is clipped in neither direction (ratios 0.50 to 1.50 in the band's both sides).
  loss, m = rl.policy_loss(logp, old, np.zeros(4), MASK, eps_low=EPS_LOW, eps_high=EPS_HIGH)
  assert float(loss) == 0.0 and float(m['clip_ratio/region_mean']) == 0.0


def test_policy_loss_aggregations_are_distinct_and_padding_is_inert():
  """A wrong aggregation (or a mask ignored) would be caught: on this ragged batch every pair of
  aggregations differs by far more than rounding, and garbage in the padding changes nothing."""
  logp, old, ref, _ = _policy_inputs(garbage=True)
  clean = _policy_inputs(garbage=False)
  losses = {}
  for agg in rl.AGGREGATIONS:
    kw = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, agg=agg, ref_logp_BT=None)
    losses[agg] = float(rl.policy_loss(logp, old, ADV_B, MASK, **kw)[0])
    assert losses[agg] == float(rl.policy_loss(clean[0], clean[1], ADV_B, MASK, **kw)[0])
    for other in rl.AGGREGATIONS:
      if other != agg:
        wrong, _, _ = ref_policy_loss(logp, old, ADV_B, MASK.tolist(), eps_low=EPS_LOW,
                                      eps_high=EPS_HIGH, agg=other)
        assert abs(losses[agg] - wrong) > 1e-2, (agg, other)
  # All-masked row excluded from the row mean: with it counted as a zero row, the loss would be
  # 3/4 of ours.
  rows = ref_policy_loss(logp, old, ADV_B, MASK.tolist(), eps_low=EPS_LOW, eps_high=EPS_HIGH,
                         agg='seq-mean-token-mean')[0]
  assert abs(losses['seq-mean-token-mean'] - rows) < 1e-6
  assert abs(losses['seq-mean-token-mean'] - 0.75 * rows) > 1e-2
  # Ignoring the mask would change the loss.
  unmasked = float(rl.policy_loss(clean[0], clean[1], ADV_B, np.ones_like(MASK),
                                  eps_low=EPS_LOW, eps_high=EPS_HIGH)[0])
  assert abs(unmasked - losses['token-mean']) > 1e-2
  # Nothing valid at all: loss 0, zero gradient, for every aggregation (one jitted program).
  none = np.zeros_like(MASK)

  def all_aggs(lp):
    return [jax.value_and_grad(lambda x: rl.policy_loss(x, old, ADV_B, none, agg=agg)[0])(lp)
            for agg in rl.AGGREGATIONS]

  for value, g in jax.jit(all_aggs)(jnp.asarray(logp)):
    assert float(value) == 0.0
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  assert float(rl.policy_loss(logp, old, ADV_B, none)[1]['ratio/mean']) == 0.0


def test_policy_loss_refusals():
  logp, old, ref, _ = _policy_inputs(garbage=False)
  call = lambda **kw: rl.policy_loss(logp, old, kw.pop('adv', ADV_B), kw.pop('mask', MASK), **kw)
  with pytest.raises(ValueError, match='needs ref_logp_BT'):
    call(beta=0.1)
  with pytest.raises(ValueError, match="kl='k5'"):
    call(kl='k5')
  with pytest.raises(ValueError, match="agg='seq-mean'"):
    call(agg='seq-mean')
  with pytest.raises(ValueError, match='advantages_B must have shape'):
    call(adv=ADV_B[:3])
  with pytest.raises(ValueError, match='mask_BT'):
    call(mask=MASK[:, :3])
  with pytest.raises(ValueError, match='ref_logp_BT'):
    call(ref_logp_BT=ref[:2])
  with pytest.raises(ValueError, match='max_len is used only by'):
    call(max_len=8)
  with pytest.raises(ValueError, match='max_len must be > 0'):
    call(agg='seq-mean-token-sum-norm', max_len=0)
  with pytest.raises(ValueError, match='beta must be >= 0'):
    call(beta=-1.0, ref_logp_BT=ref)
  with pytest.raises(ValueError, match='eps_low'):
    call(eps_low=1.0)
  with pytest.raises(ValueError, match='logp_BT must have 2 dimensions'):
    rl.policy_loss(logp[0], old[0], ADV_B[:1], MASK[0])


# ----------------------------------------------------------------------------- gae

GAE_MASK = np.array([[1, 1, 1, 1, 1, 1, 1],    # full
                     [1, 1, 1, 0, 0, 0, 0],    # right-padded
                     [0, 0, 0, 0, 0, 0, 0],    # empty
                     [1, 1, 0, 1, 1, 0, 0]])   # an interior gap: ends the bootstrapping


def _gae_inputs():
  rng = np.random.default_rng(5)
  r = rng.normal(size=GAE_MASK.shape).astype(np.float32)
  v = rng.normal(size=GAE_MASK.shape).astype(np.float32)
  return r, v


@pytest.mark.parametrize('gamma,lam', [(0.9, 0.8), (1.0, 1.0), (0.97, 0.0)])
def test_gae_values_and_gradient(gamma, lam):
  r, v = _gae_inputs()
  r_pad, v_pad = r.copy(), v.copy()
  r_pad[GAE_MASK == 0], v_pad[GAE_MASK == 0] = 50.0, -50.0   # ignored
  adv, ret = rl.gae(r_pad, v_pad, GAE_MASK, gamma=gamma, lam=lam)
  assert adv.dtype == ret.dtype == jnp.float32
  want_adv, want_ret = ref_gae(r, v, GAE_MASK.tolist(), gamma, lam)
  assert_close(adv, want_adv, terms=7, scale=np.max(np.abs(want_adv)) + 1, err_msg='advantages')
  assert_close(ret, want_ret, terms=7, scale=np.max(np.abs(want_ret)) + 1, err_msg='returns')
  np.testing.assert_array_equal(np.asarray(adv)[GAE_MASK == 0], 0.0)
  np.testing.assert_array_equal(np.asarray(ret)[GAE_MASK == 0], 0.0)
  if gamma == lam == 1.0:   # Monte Carlo: A_t = (sum of the run's rewards from t) - V_t
    for b, t in zip(*np.nonzero(GAE_MASK)):
      end = t
      while end < GAE_MASK.shape[1] and GAE_MASK[b, end]:
        end += 1
      assert abs(float(adv[b, t]) - (r[b, t:end].astype(np.float64).sum() - v[b, t])) < 1e-5
  if lam == 0.0:   # one-step TD error
    nxt = np.where(np.roll(GAE_MASK, -1, axis=1) * (np.arange(7) < 6), np.roll(v, -1, axis=1), 0)
    assert_close(adv, np.where(GAE_MASK == 1, r + gamma * nxt - v, 0.0), terms=2, scale=5.0)
  # Gradients: the map (r, v) -> (A, R) is linear, so a unit finite difference of the reference
  # is its exact derivative.
  rng = np.random.default_rng(6)
  wa, wr = rng.normal(size=r.shape), rng.normal(size=r.shape)
  f = lambda rr, vv: sum(float(np.sum(w * o)) for w, o in
                         zip((wa, wr), ref_gae(rr, vv, GAE_MASK.tolist(), gamma, lam)))
  gr, gv = jax.jit(jax.grad(lambda rr, vv: sum(jnp.sum(w * o) for w, o in zip(
      (wa, wr), rl.gae(rr, vv, GAE_MASK, gamma=gamma, lam=lam))), argnums=(0, 1)))(
          jnp.asarray(r), jnp.asarray(v))
  r64, v64 = r.astype(np.float64), v.astype(np.float64)
  base = f(r64, v64)
  fd_r, fd_v = np.zeros(r.shape), np.zeros(r.shape)
  for idx in np.ndindex(*r.shape):
    e = np.zeros(r.shape)
    e[idx] = 1.0
    fd_r[idx] = f(r64 + e, v64) - base
    fd_v[idx] = f(r64, v64 + e) - base
  assert_close(gr, fd_r, terms=14, scale=np.max(np.abs(fd_r)) + 1, err_msg='d/d rewards')
  assert_close(gv, fd_v, terms=14, scale=np.max(np.abs(fd_v)) + 1, err_msg='d/d values')


def test_gae_refusals():
  r, v = _gae_inputs()
  with pytest.raises(ValueError, match='values_BT'):
    rl.gae(r, v[:, :3], GAE_MASK)
  with pytest.raises(ValueError, match='rewards_BT must have 2 dimensions'):
    rl.gae(r[0], v[0], GAE_MASK[0])
  with pytest.raises(ValueError, match='lam must be in'):
    rl.gae(r, v, GAE_MASK, lam=1.5)
  with pytest.raises(ValueError, match='gamma must be in'):
    rl.gae(r, v, GAE_MASK, gamma=-0.1)


# ----------------------------------------------------------------------------- value loss


def ref_value_loss(v, old, ret, mask, clip):
  """PPO2's clipped value loss token by token in plain Python floats, with its gradient d/dv
  (the larger square's derivative; 0 where the clipped one is larger)."""
  total, n, grad, clipped = 0.0, 0, np.zeros(np.shape(v)), 0
  for b, t in zip(*np.nonzero(mask)):
    vv, oo, rr = float(v[b, t]), float(old[b, t]), float(ret[b, t])
    un = (vv - rr) ** 2
    if clip is None:
      total, g = total + un, 2 * (vv - rr)
    else:
      vc = oo + min(max(vv - oo, -clip), clip)
      cl = (vc - rr) ** 2
      inside = -clip < vv - oo < clip
      if cl > un:
        total, g, clipped = total + cl, (2 * (vc - rr) if inside else 0.0), clipped + 1
      else:
        total, g = total + un, 2 * (vv - rr)
    grad[b, t] = g
    n += 1
  n = max(n, 1)
  return 0.5 * total / n, 0.5 * grad / n, clipped / n


@pytest.mark.parametrize('clip', [0.2, None])
def test_value_loss_values_gradient_and_clip_fraction(clip):
  rng = np.random.default_rng(8)
  mask = GAE_MASK
  ret = rng.normal(size=mask.shape).astype(np.float32)
  old = rng.normal(size=mask.shape).astype(np.float32)
  v = (old + rng.normal(scale=0.4, size=mask.shape)).astype(np.float32)
  v_pad = np.where(mask == 1, v, np.nan).astype(np.float32)  # masked entries are never read
  loss, metrics = rl.value_loss(v_pad, old, ret, mask, clip=clip)
  grad = jax.grad(lambda x: rl.value_loss(x, old, ret, mask, clip=clip)[0])(jnp.asarray(v_pad))
  want, want_grad, frac = ref_value_loss(v, old, ret, mask, clip)
  assert_close(loss, want, terms=8, scale=want + 1)
  assert_close(grad, want_grad, terms=8)
  assert float(metrics['value_clipfrac']) == pytest.approx(frac, abs=1e-6)
  if clip is not None:
    assert 0 < frac < 1  # both branches are exercised
  assert float(rl.value_loss(v, old, ret, np.zeros_like(mask), clip=clip)[0]) == 0.0
  with pytest.raises(ValueError, match='clip must be >= 0'):
    rl.value_loss(v, old, ret, mask, clip=-1.0)


# ----------------------------------------------------------------------------- jit


def test_under_jit():
  """One jitted program: PPO on GAE advantages (per token) plus GRPO-style sequence advantages,
  with a traced beta; value and gradient against the references."""
  r, v = _gae_inputs()
  r, v = r[:, :6], v[:, :6]
  logp, old, ref, _ = _policy_inputs(garbage=False)
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0]])
  rewards_PG = np.array([[1.0, 0.0], [0.2, 0.9]])

  def total(lp, beta, rewards):
    adv_BT, _ = rl.gae(r, v, mask, gamma=0.99, lam=0.95)
    a, _ = rl.policy_loss(lp, old, adv_BT, mask, ref_logp_BT=ref, beta=beta, eps_high=0.28)
    adv_B = rl.group_advantages(rewards).reshape(-1)
    b, _ = rl.policy_loss(lp, old, adv_B, mask, agg='seq-mean-token-mean')
    return a + b

  value, grad = jax.jit(jax.value_and_grad(total))(
      jnp.asarray(logp), jnp.float32(0.04), jnp.asarray(rewards_PG))
  adv_BT, _ = ref_gae(r, v, mask.tolist(), 0.99, 0.95)
  la, ga, _ = ref_policy_loss(logp, old, adv_BT, mask.tolist(), ref=ref, beta=0.04, eps_low=0.2,
                              eps_high=0.28, agg='token-mean')
  lb, gb, _ = ref_policy_loss(logp, old, ref_group_advantages(rewards_PG, 'group').reshape(-1),
                              mask.tolist(), eps_low=0.2, eps_high=0.2, agg='seq-mean-token-mean')
  assert_close(value, la + lb, terms=24, scale=abs(la + lb) + 1)
  assert_close(grad, ga + gb, terms=24)
