"""Preference losses (DPO, cDPO, robust DPO, IPO, hinge, RPO, SimPO, ORPO) and sequence_logps:
against plain numpy (float64) written here from the papers' formulas, closed-form gradients, edge
cases, bad input."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from pathways_jax.objectives import preference
from pathways_jax.objectives.preference import dpo_loss, sequence_logps

B = 16


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
  return np.exp(np_log_sigmoid(x))


def reference_loss(kind, c, r, rc, rr, beta, eps=0.0, nll=None, alpha=0.0, gamma=0.5):
  """numpy float64: the mean per-example loss, written from each paper's formula."""
  c, r = np.float64(c), np.float64(r)
  if kind in ('simpo', 'orpo'):
    delta = c - r
  else:
    delta = (c - np.float64(rc)) - (r - np.float64(rr))
  z = beta * delta
  if kind == 'sigmoid':
    per = -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)
  elif kind == 'robust':
    per = (-(1 - eps) * np_log_sigmoid(z) + eps * np_log_sigmoid(-z)) / (1 - 2 * eps)
  elif kind == 'ipo':
    per = (delta - 1 / (2 * beta)) ** 2
  elif kind == 'hinge':
    per = np.maximum(0.0, 1 - z)
  elif kind == 'simpo':
    s = z - gamma
    per = -(1 - eps) * np_log_sigmoid(s) - eps * np_log_sigmoid(-s)
  elif kind == 'orpo':
    odds = lambda p: np.exp(p) / (1 - np.exp(p))
    log_odds = np.log(odds(c) / odds(r))
    return np.mean(nll) - beta * np.mean(np_log_sigmoid(log_odds))
  loss = np.mean(per)
  if alpha:
    loss += alpha * np.mean(nll)
  return loss


def _inputs(seed, avg=False):
  """Random log-probs: summed (tens of nats) or length-averaged (in (-3, 0))."""
  rng = np.random.default_rng(seed)
  if avg:
    x = -rng.uniform(0.05, 3.0, (4, B))
  else:
    x = -rng.uniform(5.0, 60.0, (4, B))
  nll = rng.uniform(0.2, 3.0, B)
  return [a.astype(np.float32) for a in x] + [nll.astype(np.float32)]


CASES = [  # (loss_type, beta, label_smoothing, rpo_alpha, length-averaged inputs)
    ('sigmoid', 0.1, 0.0, 0.0, False),
    ('sigmoid', 0.1, 0.2, 0.0, False),   # cDPO
    ('sigmoid', 0.3, 0.0, 1.0, False),   # RPO
    ('robust', 0.1, 0.15, 0.0, False),
    ('ipo', 0.1, 0.0, 0.0, True),
    ('ipo', 1.0, 0.0, 0.5, True),
    ('hinge', 0.1, 0.0, 0.0, False),
    ('simpo', 2.5, 0.0, 0.0, True),
    ('simpo', 2.0, 0.1, 0.3, True),
    ('orpo', 0.1, 0.0, 0.0, True),
]


@pytest.mark.parametrize('seed,case', enumerate(CASES))
def test_loss_matches_numpy(seed, case):
  kind, beta, eps, alpha, avg = case
  c, r, rc, rr, nll = _inputs(100 + seed, avg)
  ref_free = kind in ('simpo', 'orpo')
  kw = dict(beta=beta, loss_type=kind, label_smoothing=eps, rpo_alpha=alpha)
  if alpha or kind == 'orpo':
    kw['chosen_nll_B'] = nll
  refs = (None, None) if ref_free else (rc, rr)
  loss, m = dpo_loss(c, r, *refs, **kw)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  want = reference_loss(kind, c, r, rc, rr, beta, eps, nll, alpha)
  # The terms (log-probs of tens of nats, times beta) carry the rounding, not the loss itself.
  assert_close(loss, want, terms=B, scale=max(abs(want), beta * 60), err_msg=kind)
  # TRL's metrics: implicit rewards beta * (logp - ref) (reference-free: beta * logp).
  r_w = beta * (np.float64(c) - (0 if ref_free else rc))
  r_l = beta * (np.float64(r) - (0 if ref_free else rr))
  assert_close(m['rewards/chosen'], r_w.mean(), terms=B, scale=np.abs(r_w).max())
  assert_close(m['rewards/rejected'], r_l.mean(), terms=B, scale=np.abs(r_l).max())
  assert_close(m['rewards/margins'], (r_w - r_l).mean(), terms=B, scale=np.abs(r_w - r_l).max())
  assert float(m['rewards/accuracies']) == np.mean(r_w > r_l)
  assert 0 < np.mean(r_w > r_l) < 1  # the inputs exercise both outcomes
  assert_close(m['logps/chosen'], np.mean(c), terms=B)
  if 'chosen_nll_B' in kw:
    assert_close(m['nll_loss'], np.mean(nll), terms=B)


def _grad(kind, c, r, rc, rr, **kw):
  fn = lambda c, r, rc, rr: dpo_loss(c, r, rc, rr, loss_type=kind, **kw)[0]
  return jax.grad(fn, argnums=(0, 1, 2, 3))(c, r, rc, rr)


def test_sigmoid_gradient_closed_form():
  """dL/dDelta = -beta sigma(-beta Delta) / B; the reference gets no gradient."""
  c, r, rc, rr, _ = _inputs(1)
  beta = 0.1
  g_c, g_r, g_rc, g_rr = _grad('sigmoid', c, r, rc, rr, beta=beta)
  delta = (np.float64(c) - rc) - (np.float64(r) - rr)
  want = -beta * np_sigmoid(-beta * delta) / B
  assert_close(g_c, want, terms=B, scale=beta / B)
  assert_close(g_r, -want, terms=B, scale=beta / B)
  np.testing.assert_array_equal(g_rc, 0.0)
  np.testing.assert_array_equal(g_rr, 0.0)


def test_variant_gradients_closed_form():
  c, r, rc, rr, nll = _inputs(2)
  ca, ra, rca, rra, _ = _inputs(3, avg=True)
  beta, eps = 0.1, 0.2
  # robust: d/dz of (-(1-eps) log s(z) + eps log s(-z)) / (1-2eps)
  #   = -((1-eps) s(-z) + eps s(z)) / (1-2eps)
  delta = (np.float64(c) - rc) - (np.float64(r) - rr)
  z = beta * delta
  want = -beta * ((1 - eps) * np_sigmoid(-z) + eps * np_sigmoid(z)) / (1 - 2 * eps) / B
  g = _grad('robust', c, r, rc, rr, beta=beta, label_smoothing=eps)
  assert_close(g[0], want, terms=B, scale=beta / B)
  # cDPO: -((1-eps) s(-z) - eps s(z)) beta / B
  want = -beta * ((1 - eps) * np_sigmoid(-z) - eps * np_sigmoid(z)) / B
  assert_close(_grad('sigmoid', c, r, rc, rr, beta=beta, label_smoothing=eps)[0], want, terms=B,
               scale=beta / B)
  # hinge: -beta [beta Delta < 1] / B
  want = -beta * (z < 1) / B
  assert_close(_grad('hinge', c, r, rc, rr, beta=beta)[0], want, scale=beta / B)
  # IPO: 2 (Delta - 1/(2 beta)) / B
  beta_ipo = 0.5
  delta_a = (np.float64(ca) - rca) - (np.float64(ra) - rra)
  want = 2 * (delta_a - 1 / (2 * beta_ipo)) / B
  assert_close(_grad('ipo', ca, ra, rca, rra, beta=beta_ipo)[0], want, terms=B)
  # RPO: the NLL term's gradient is alpha / B per example.
  g_nll = jax.grad(lambda n: dpo_loss(c, r, rc, rr, chosen_nll_B=n, rpo_alpha=0.7)[0])(nll)
  assert_close(g_nll, np.full(B, 0.7 / B))


def test_reference_free_gradients_closed_form():
  c, r, _, _, nll = _inputs(4, avg=True)
  beta, gamma = 2.0, 0.8
  # SimPO: s = beta (c - r) - gamma; dL/dc = -beta s(-s) / B
  s = beta * (np.float64(c) - r) - gamma
  g = jax.grad(lambda c, r: dpo_loss(c, r, beta=beta, loss_type='simpo', simpo_gamma=gamma)[0],
               argnums=(0, 1))(c, r)
  assert_close(g[0], -beta * np_sigmoid(-s) / B, terms=B, scale=beta / B)
  assert_close(g[1], beta * np_sigmoid(-s) / B, terms=B, scale=beta / B)
  # ORPO: d log_odds / dp_w = 1 / (1 - e^p_w); dL/dp_w = -lambda s(-log_odds) / (1 - e^p_w) / B
  lam = 0.1
  c64, r64 = np.float64(c), np.float64(r)
  log_odds = (c64 - r64) - (np.log1p(-np.exp(c64)) - np.log1p(-np.exp(r64)))
  orpo = lambda c, r, n: dpo_loss(c, r, beta=lam, loss_type='orpo', chosen_nll_B=n)[0]
  g_c, g_r, g_n = jax.grad(orpo, argnums=(0, 1, 2))(c, r, nll)
  want_c = -lam * np_sigmoid(-log_odds) / (1 - np.exp(c64)) / B
  want_r = lam * np_sigmoid(-log_odds) / (1 - np.exp(r64)) / B
  assert_close(g_c, want_c, terms=B)
  assert_close(g_r, want_r, terms=B)
  assert_close(g_n, np.full(B, 1.0 / B))


def test_edges():
  c, r, rc, rr, nll = _inputs(5)
  # pi = pi_ref: Delta = 0 and every logistic loss is log 2 (DPO's step-0 sanity check).
  for kind, eps in [('sigmoid', 0.0), ('sigmoid', 0.3), ('robust', 0.3)]:
    loss, m = dpo_loss(c, r, c, r, loss_type=kind, label_smoothing=eps)
    assert_close(loss, np.log(2.0), err_msg=kind)
    assert float(m['rewards/margins']) == 0 and float(m['rewards/accuracies']) == 0
  # IPO's minimum: Delta = 1/(2 beta) gives loss 0 and gradient 0.
  beta = 0.25
  shifted = np.float32(rc - rr + r + 1 / (2 * beta))  # chosen with Delta = 2 exactly-ish
  loss = dpo_loss(shifted, r, rc, rr, beta=beta, loss_type='ipo')[0]
  assert float(loss) < 1e-8
  g = jax.grad(lambda x: dpo_loss(x, r, rc, rr, beta=beta, loss_type='ipo')[0])(shifted)
  assert np.abs(g).max() < 1e-5
  # eps = 0: cDPO is DPO, robust is DPO; rpo_alpha = 0 ignores the NLL (only logs it).
  plain = dpo_loss(c, r, rc, rr)[0]
  assert float(dpo_loss(c, r, rc, rr, label_smoothing=0.0)[0]) == float(plain)
  assert_close(dpo_loss(c, r, rc, rr, loss_type='robust')[0], plain)
  assert float(dpo_loss(c, r, rc, rr, chosen_nll_B=nll)[0]) == float(plain)
  # CPO: 'sigmoid' with zero references equals SimPO with gamma = 0 on the same inputs.
  zeros = np.zeros(B, np.float32)
  assert_close(dpo_loss(c, r, zeros, zeros, beta=2.0)[0],
               dpo_loss(c, r, beta=2.0, loss_type='simpo', simpo_gamma=0.0)[0])


def test_stable_at_extremes_and_under_jit():
  big = np.array([1e4, -1e4, 0.0, 3e3], np.float32)
  zeros = np.zeros(4, np.float32)
  kinds = ('sigmoid', 'robust', 'hinge', 'ipo')

  @jax.jit  # one program for the four (op-by-op dispatch of each costs more than compiling)
  def values_and_grads(x):
    return [jax.value_and_grad(lambda x: dpo_loss(
        x, zeros, zeros, zeros, beta=0.1, loss_type=kind,
        label_smoothing=0.2 if kind == 'robust' else 0.0)[0])(x) for kind in kinds]
  for kind, (loss, g) in zip(kinds, values_and_grads(big)):
    assert np.isfinite(loss) and np.isfinite(g).all(), kind
  # sigmoid: Delta = -1e4 costs 1e3 nats (beta 0.1), not inf.
  assert_close(dpo_loss(big[1:2], zeros[:1], zeros[:1], zeros[:1])[0], 1e3)
  # ORPO: log-probs at 0 (clipped), just below -ln 2 and above it, and very small.
  p = np.array([0.0, -1e-30, -0.6931, -0.6932, -50.0, -1e-3], np.float32)
  q = p[::-1].copy()
  nll = np.ones(6, np.float32)
  loss, g = jax.value_and_grad(
      lambda a, b: dpo_loss(a, b, loss_type='orpo', chosen_nll_B=nll)[0], argnums=(0, 1))(p, q)
  assert np.isfinite(loss) and all(np.isfinite(x).all() for x in g)
  # log1mexp against float64 on both sides of the branch point.
  x = np.array([-1e-6, -1e-3, -0.5, -0.69, -0.7, -1.0, -5.0, -30.0], np.float32)
  assert_close(preference.log1mexp(x), np.log1p(-np.exp(np.float64(x))), slack=4)
  assert np.isfinite(jax.grad(lambda v: preference.log1mexp(v).sum())(x)).all()
  # jit gives what eager gives.
  c, r, rc, rr, nll = _inputs(6, avg=True)
  for kind in ('sigmoid', 'orpo'):
    refs = (None, None) if kind in ('simpo', 'orpo') else (rc, rr)
    kw = dict(loss_type=kind, chosen_nll_B=nll)
    f = jax.jit(functools.partial(dpo_loss, **kw))
    eager = dpo_loss(c, r, *refs, **kw)
    jitted = f(c, r, *refs)
    assert_close(jitted[0], eager[0], err_msg=kind)
    assert set(jitted[1]) == set(eager[1])
  # bfloat16 inputs are upcast: the loss is float32.
  assert dpo_loss(*(jnp.asarray(a, jnp.bfloat16) for a in (c, r, rc, rr)))[0].dtype == jnp.float32


@pytest.mark.parametrize('kwargs,match', [
    (dict(loss_type='kto'), r"not one of \('sigmoid', 'robust', 'ipo', 'hinge', 'simpo', 'orpo'\)"),
    (dict(beta=0.0), 'beta must be > 0'),
    (dict(beta=-0.1), 'beta must be > 0'),
    (dict(loss_type='robust', label_smoothing=0.5), r'\[0, 0.5\) for .robust.'),
    (dict(label_smoothing=-0.1), r'\[0, 0.5\]'),
    (dict(label_smoothing=0.7), r'\[0, 0.5\]'),
    (dict(loss_type='ipo', label_smoothing=0.1), 'takes no label_smoothing'),
    (dict(rpo_alpha=1.0), 'needs chosen_nll_B'),
    (dict(rpo_alpha=-1.0), 'rpo_alpha must be >= 0'),
])
def test_bad_arguments(kwargs, match):
  c, r, rc, rr, _ = _inputs(7)
  with pytest.raises(ValueError, match=match):
    dpo_loss(c, r, rc, rr, **kwargs)


def test_bad_inputs():
  c, r, rc, rr, nll = _inputs(8)
  with pytest.raises(ValueError, match=r'shapes differ: .*rejected_logps_B \(15,\)'):
    dpo_loss(c, r[:-1], rc, rr)
  with pytest.raises(ValueError, match='shapes differ'):
    dpo_loss(c, r, rc, rr, chosen_nll_B=nll[:3], rpo_alpha=1.0)
  with pytest.raises(ValueError, match='needs ref_chosen_logps_B'):
    dpo_loss(c, r)
  with pytest.raises(ValueError, match='both'):
    dpo_loss(c, r, rc, None)
  with pytest.raises(ValueError, match='reference-free'):
    dpo_loss(c, r, rc, rr, loss_type='simpo')
  with pytest.raises(ValueError, match="'orpo' needs chosen_nll_B"):
    dpo_loss(c, r, loss_type='orpo')
  with pytest.raises(ValueError, match='already includes the chosen NLL'):
    dpo_loss(c, r, loss_type='orpo', chosen_nll_B=nll, rpo_alpha=1.0)


def test_sequence_logps_matches_numpy():
  rng = np.random.default_rng(9)
  b, l, v = 3, 7, 11
  logits = rng.normal(size=(b, l, v)).astype(np.float32) * 3
  targets = rng.integers(0, v, (b, l)).astype(np.int32)
  mask = np.zeros((b, l), bool)
  mask[0, 2:] = True
  mask[1, :5] = True  # row 2 has no target at all
  targets[~mask] = -100  # TRL's ignore id: must not matter
  lp = np.float64(logits) - np.logaddexp.reduce(np.float64(logits), axis=-1, keepdims=True)
  tok = np.take_along_axis(lp, np.where(mask, targets, 0)[..., None], -1)[..., 0]
  want_sum = np.where(mask, tok, 0.0).sum(-1)
  want_avg = want_sum / np.maximum(mask.sum(-1), 1)
  got_sum = sequence_logps(logits, targets, mask)
  assert got_sum.dtype == jnp.float32 and got_sum.shape == (b,)
  assert_close(got_sum, want_sum, terms=l * v)
  assert_close(sequence_logps(logits, targets, mask, average=True), want_avg, terms=l * v)
  assert float(got_sum[2]) == 0.0
  # bfloat16 logits: float32 out, within bfloat16 rounding of the float64 answer.
  got_bf16 = sequence_logps(jnp.asarray(logits, jnp.bfloat16), targets, mask)
  assert got_bf16.dtype == jnp.float32
  assert_close(got_bf16, want_sum, terms=l * v, dtype=jnp.bfloat16)
  # The gradient reaches only masked positions: softmax - onehot there, 0 elsewhere.
  g = jax.grad(lambda x: sequence_logps(x, targets, mask).sum())(logits)
  onehot = np.eye(v)[np.where(mask, targets, 0)]
  want_g = np.where(mask[..., None], onehot - np.exp(lp), 0.0)
  assert_close(g, want_g)
  with pytest.raises(ValueError, match='must agree'):
    sequence_logps(logits, targets[:, :-1], mask[:, :-1].T)


GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'preference'


def _golden_logps():
  """The golden batch's log-probs, recomputed here with sequence_logps from the saved logits."""
  data = np.load(GOLDEN / 'golden.npz')
  targets, mask = data['input_ids'][:, 1:], data['completion_mask'][:, 1:]
  out = {}
  for name in ('logits', 'ref_logits'):
    for avg in (False, True):
      logps = np.asarray(sequence_logps(data[name][:, :-1], targets, mask, average=avg))
      out[name, avg] = np.split(logps, 2)  # TRL's rows are [chosen; rejected]
  return data, mask, out


def test_matches_trl_golden():
  """TRL's own DPOTrainer / CPOTrainer / ORPOTrainer losses (tests/golden/preference/
  make_golden.py) on a tiny random Llama's logits."""
  golden = json.loads((GOLDEN / 'golden.json').read_text())
  data, mask, logps = _golden_logps()
  (c, r), (rc, rr) = logps['logits', False], logps['ref_logits', False]
  (ca, ra), (rca, rra) = logps['logits', True], logps['ref_logits', True]
  # The longest reductions behind a loss: the log-softmax over V, the sum over the completion.
  b, length = c.shape[0], mask.shape[1] + data['logits'].shape[-1]
  # TRL's RPO term ('sft') is the token mean of the chosen NLL over the batch.
  token_mean_nll_B = -c * b / mask[:b].sum()
  ours = {
      'sigmoid': dpo_loss(c, r, rc, rr, beta=0.1),
      'hinge': dpo_loss(c, r, rc, rr, beta=0.1, loss_type='hinge'),
      'robust': dpo_loss(c, r, rc, rr, beta=0.1, loss_type='robust', label_smoothing=0.2),
      'rpo': dpo_loss(c, r, rc, rr, beta=0.1, chosen_nll_B=token_mean_nll_B, rpo_alpha=0.5),
      'ipo': dpo_loss(ca, ra, rca, rra, beta=0.5, loss_type='ipo'),
  }
  assert set(ours) == set(golden['dpo'])
  for name, (loss, metrics) in ours.items():
    want = golden['dpo'][name]
    # The rounding is relative to beta * the log-probs the loss is made of, not to the loss.
    scale = want['config']['beta'] * np.abs(np.concatenate([c, r, rc, rr])).max()
    assert_close(loss, want['loss'], terms=length, scale=max(abs(want['loss']), scale),
                 err_msg=name)
    if name == 'ipo':
      continue  # TRL logs beta * the summed (not length-averaged) log-ratios for IPO too
    for key, value in want['metrics'].items():
      assert_close(metrics[key], value, terms=length, scale=max(abs(value), scale),
                   err_msg=f'{name} {key}')
  # SimPO and ORPO on TRL's own length-averaged log-probs (CPOTrainer.get_batch_logps).
  assert_close(np.concatenate([ca, ra]), data['cpo_avg_logps'], terms=length)
  want = golden['simpo']
  loss, metrics = dpo_loss(ca, ra, loss_type='simpo', **want['config'])
  assert_close(loss, want['loss'], terms=length, scale=2.0 * np.abs(ca).max())
  for key, value in want['metrics'].items():
    assert_close(metrics[key], value, terms=length, err_msg=f'simpo {key}')
  want = golden['orpo']
  loss, metrics = dpo_loss(ca, ra, loss_type='orpo', chosen_nll_B=token_mean_nll_B,
                           **want['config'])
  assert_close(loss, want['loss'], terms=length)
  for key, value in want['metrics'].items():
    assert_close(metrics[key], value, terms=length, scale=max(abs(value), 1.0),
                 err_msg=f'orpo {key}')
