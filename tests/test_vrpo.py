"""VRPO (objectives/vrpo.py, task 'vrpo'): draws, the ELBO estimate, antithetic sampling."""
import functools
import json
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
import numpy as np
import pytest

from helpers import logged_losses, tiny_config
from pathways_jax import tasks
from pathways_jax.config import ConfigError, ModelConfig
from pathways_jax.data import preference as pref_data
from pathways_jax.data import tokenizers
from pathways_jax.models.transformer import Transformer
from pathways_jax.objectives import preference, vrpo
from pathways_jax.tasks.vrpo import draw_token_terms

BYTES = tokenizers.ByteTokenizer()
MASK = BYTES.mask_id
EPS = 1e-3
LN2_F32 = float(-jax.nn.log_sigmoid(jnp.float32(0.0)))  # log 2 as float32 computes it


def _pair(prompt, chosen, rejected):
  return pref_data.render_pair(BYTES, *pref_data.from_record(
      {'prompt': prompt, 'chosen': chosen, 'rejected': rejected}))


def _rows(pairs, seq_len):
  fields, _ = pref_data.build_rows(pairs, seq_len, pad_id=BYTES.pad_id)
  return {k: jnp.asarray(v) for k, v in fields.items()}


PAIRS = [_pair('2+3=', '5', '7'), _pair('1+1=', '2', '11')]
ROW = 112  # both pairs fill one row


@functools.lru_cache(maxsize=None)
def _llada(seed=1, lora_rank=0):
  """A tiny LLaDA and random params: normal(0, 0.2) weights, unit norm scales, LoRA B = 0 (the
  adapters start as no change). Drawn with numpy: compiling model.init costs seconds."""
  cfg = ModelConfig.from_config(tiny_config('/tmp/unused').model, vocab_size=264)
  model = Transformer(cfg.replace(causal=False, lora_rank=lora_rank))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.ones(a.shape, a.dtype)
    if name.endswith("_lora_b']"):
      return jnp.zeros(a.shape, a.dtype)
    return jnp.asarray(rng.normal(0.0, 0.2, a.shape), a.dtype)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


# Compiled once per model and shapes (the tests share them; eager dispatch costs seconds).
_terms = jax.jit(draw_token_terms, static_argnums=0)
_DRAW_ARGS = ('n_t', 'n_yt', 'mask_id', 'eps')
_draw = jax.jit(vrpo.draw, static_argnames=_DRAW_ARGS)
_both = jax.jit(vrpo.policy_and_reference_draws, static_argnames=_DRAW_ARGS + ('antithetic',))


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(model, params, tokens_BL, positions_BL, segment_ids_BL):
  logits = model.apply({'params': params}, tokens_BL, positions_BL=positions_BL,
                       segment_ids_BL=segment_ids_BL)
  return jax.nn.log_softmax(logits, -1)


_SCORED_ROWS, _WIDTH = 24, ROW  # the plain implementations' batches: one shape, one compile


def _plain_log_probs(model, params, tokens, positions, segments):
  """float64 [R, W, V] log-probs of R <= 24 rows of width ROW (padded to one shape)."""
  r = tokens.shape[0]
  pad = lambda x: np.concatenate([x, np.repeat(x[:1], _SCORED_ROWS - r, 0)]).astype(np.int32)
  out = _log_probs(model, params, pad(tokens), pad(positions), pad(segments))
  return np.asarray(out, np.float64)[:r]


def test_draws_mask_only_responses_with_a_timestep_per_side_and_draw():
  rows = _rows(PAIRS, ROW)
  tok, seg, resp = rows['tokens'], rows['segment_ids'], rows['loss_mask']
  n_t, n_yt = 3, 4
  d = _draw(jax.random.key(0), tok, seg, resp, n_t=n_t, n_yt=n_yt, mask_id=MASK, eps=EPS)
  b, l = tok.shape
  assert d.noisy_NBL.shape == d.masked_NBL.shape == d.p_mask_NBL.shape == (n_t * n_yt, b, l)
  masked, p = np.asarray(d.masked_NBL), np.asarray(d.p_mask_NBL)
  # Only response tokens are ever masked (never the prompt, bos or padding); noisy = mask there.
  assert masked.any() and not (masked & ~np.asarray(resp, bool)[None]).any()
  assert not (masked & np.asarray(rows['prompt'], bool)[None]).any()
  np.testing.assert_array_equal(np.asarray(d.noisy_NBL), np.where(masked, MASK, np.asarray(tok)))
  # Allocation: draw n = j * n_yt + k. One p per (timestep, segment): shared by its n_yt masks
  # and its positions; every segment (each side of each pair) and every timestep its own.
  p_TKBL = p.reshape(n_t, n_yt, b, l)
  assert (p_TKBL == p_TKBL[:, :1]).all()
  per_side = {}
  for r in range(b):
    for s in set(np.asarray(seg[r]).tolist()) - {0}:
      vals = p_TKBL[:, 0, r][:, np.asarray(seg[r]) == s]
      assert (vals == vals[:, :1]).all() and ((EPS <= vals) & (vals < 1)).all()
      per_side[(r, s)] = vals[:, 0]
  sides = np.stack(list(per_side.values()))  # [sides, n_t]
  assert len(np.unique(sides)) == sides.size  # all distinct: no shared timestep anywhere
  # The masks of one timestep differ (n_yt independent draws).
  m_TKBL = masked.reshape(n_t, n_yt, b, l)
  assert not all((m_TKBL[j] == m_TKBL[j, :1]).all() for j in range(n_t))
  with pytest.raises(ValueError, match='n_t'):
    _draw(jax.random.key(0), tok, seg, resp, n_t=0, n_yt=1, mask_id=MASK)


def test_masking_rate_is_p():
  """Each response token is masked with probability p given p (the forward process)."""
  rows = _rows(PAIRS, ROW)
  d = _draw(jax.random.key(3), rows['tokens'], rows['segment_ids'], rows['loss_mask'],
            n_t=2000, n_yt=1, mask_id=MASK)
  resp = np.asarray(rows['loss_mask'], bool)
  m, p = np.asarray(d.masked_NBL)[:, resp], np.asarray(d.p_mask_NBL)[:, resp]
  for lo, hi in ((0.0, 0.3), (0.3, 0.7), (0.7, 1.0)):
    sel = (p >= lo) & (p < hi)
    assert abs(m[sel].mean() - p[sel].mean()) < 0.02


N_DRAWS = 128  # the estimator tests share one set of draws: one compile of the model on them
# Their eps: any eps gives an unbiased estimate of its own bound; a larger one than LLaDA's 1e-3
# caps the 1/p weights at 1/eps, so that N_DRAWS draws pin the mean down.
EPS_EST = 0.05


@functools.lru_cache(maxsize=None)
def _estimate():
  """(rows of PAIRS, one row; N_DRAWS draws; their token terms [N, 1, L]) under `_llada()`."""
  rows = _rows(PAIRS, ROW)
  model, params = _llada()
  d = _draw(jax.random.key(5), rows['tokens'], rows['segment_ids'], rows['loss_mask'],
            n_t=N_DRAWS, n_yt=1, mask_id=MASK, eps=EPS_EST)
  return rows, d, _terms(model, params, rows, d)


def test_the_estimate_is_the_mean_of_each_side_scored_alone_per_draw():
  """Independent plain implementation: every side of each draw through the model by itself (its
  own row, positions from 0), sum over its masked response tokens of log p / p_mask; mean over
  the draws."""
  rows, d, terms = _estimate()
  model, params = _llada()
  tok, seg, resp = (np.asarray(rows[k][0]) for k in ('tokens', 'segment_ids', 'loss_mask'))
  n = 6  # the first draws: 6 x 4 sides in one batch
  got = vrpo.pair_elbos(terms[:n], rows['loss_mask'], rows['segment_ids'])
  noisy, masked, p = (np.asarray(x)[:n, 0] for x in d)
  sides = sorted(set(seg.tolist()) - {0})
  assert len(sides) == 2 * len(PAIRS)  # all pairs in one row
  # Every (draw, side) alone in a row of its own; the padding after it is another segment (0).
  alone = np.zeros((n, len(sides), _WIDTH), np.int32)
  alone_seg = np.zeros_like(alone)
  for i, s in enumerate(sides):
    at = seg == s
    alone[:, i, :at.sum()] = noisy[:, at]
    alone_seg[:, i, :at.sum()] = 1
  positions = np.broadcast_to(np.arange(_WIDTH), (n * len(sides), _WIDTH))
  lp = _plain_log_probs(model, params, alone.reshape(-1, _WIDTH), positions,
                        alone_seg.reshape(-1, _WIDTH)).reshape(n, len(sides), _WIDTH, -1)
  want = {}  # segment -> mean over the draws of the side's sum
  for i, s in enumerate(sides):
    at = seg == s
    ids, m, pm = tok[at], masked[:, at], p[:, at]
    assert not m[:, ~resp[at].astype(bool)].any()  # the prompt is never masked
    want[s] = np.mean([sum(lp[k, i, j, ids[j]] / pm[k, j] for j in range(len(ids)) if m[k, j])
                       for k in range(n)])
  valid = np.asarray(got['valid'])
  assert valid.sum() == len(PAIRS)
  for k, slot in enumerate(np.flatnonzero(valid)):  # pair k + 1: segments 2k + 1, 2k + 2
    np.testing.assert_allclose(float(got['chosen'][slot]), want[2 * k + 1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(got['rejected'][slot]), want[2 * k + 2], rtol=1e-4,
                               atol=1e-4)
    assert float(got['chosen_tokens'][slot]) == resp[seg == 2 * k + 1].sum()


def _exact_elbos(model, params, rows, segments):
  """{segment: E_t E_mask[(1/p) sum_masked log p(y_i | y_t, x)]} of row 0's `segments`, by
  enumerating every mask M of a side's A response positions (nothing else masked; the other
  segments cannot see it): sum_M sum_{i in M} log p_i(M) * E_t[p^(|M|-1) (1-p)^(A-|M|)] with
  p = (1-eps) t + eps (eps = EPS_EST), the expectation over t exact (a polynomial's integral)."""
  ids, seg = np.asarray(rows['tokens'][0]), np.asarray(rows['segment_ids'][0])
  resp = np.asarray(rows['loss_mask'][0], bool)
  cases = []  # (segment, masked positions)
  for s in segments:
    pos = np.flatnonzero(resp & (seg == s))
    cases += [(s, pos[[i for i in range(len(pos)) if bits >> i & 1]])
              for bits in range(1, 2 ** len(pos))]
  noisy = np.repeat(ids[None], len(cases), 0)
  for row, (_, masked) in zip(noisy, cases):
    row[masked] = MASK
  rep = lambda x: np.repeat(np.asarray(x[:1]), len(cases), 0)
  lp = _plain_log_probs(model, params, noisy, rep(rows['positions']), rep(rows['segment_ids']))
  exact = dict.fromkeys(segments, 0.0)
  for c, (s, masked) in enumerate(cases):
    a, k = int((resp & (seg == s)).sum()), len(masked)
    poly = (np.polynomial.Polynomial([0] * (k - 1) + [1])
            * np.polynomial.Polynomial([1, -1]) ** (a - k)).integ()
    exact[s] += (poly(1.0) - poly(EPS_EST)) / (1.0 - EPS_EST) * sum(lp[c, i, ids[i]]
                                                                   for i in masked)
  return exact


def test_the_estimator_is_unbiased_for_the_enumerated_elbo():
  rows, _, terms = _estimate()
  model, params = _llada()
  seg, resp = rows['segment_ids'], rows['loss_mask']
  lengths = {s: int(np.asarray(resp[0])[np.asarray(seg[0]) == s].sum()) for s in range(1, 5)}
  short = [s for s in lengths if 0 < lengths[s] <= 3]  # every side: 2 or 3 response tokens
  assert len(short) == 4
  exact = _exact_elbos(model, params, rows, short)
  per_draw = jax.vmap(lambda t: preference.packed_pair_logps(t, resp, seg))(terms)
  mean = vrpo.pair_elbos(terms, resp, seg)
  for s in short:
    side, slot = ('chosen' if s % 2 else 'rejected'), (s - 1) // 2
    x = np.asarray(per_draw[side][:, slot], np.float64)
    se = x.std() / math.sqrt(N_DRAWS)
    assert abs(x.mean() - exact[s]) < 4 * se, (s, x.mean(), exact[s], se)
    assert se < 0.15 * abs(exact[s]), (s, se, exact[s])  # the test has power
    np.testing.assert_allclose(float(mean[side][slot]), x.mean(), rtol=1e-5)  # pair_elbos: mean


def test_antithetic_draws_with_the_reference_equal_to_the_policy_give_zero_and_log2():
  rows, _, _ = _estimate()
  model, params = _llada()
  tok, seg, resp = rows['tokens'], rows['segment_ids'], rows['loss_mask']
  scores = {}
  kw = dict(n_t=N_DRAWS, n_yt=1, mask_id=MASK, eps=EPS_EST)
  for antithetic in (True, False):
    pol_d, ref_d = _both(jax.random.key(9), tok, seg, resp, antithetic=antithetic, **kw)
    # Antithetic: the very same draws (timesteps and masks) for the reference; else independent.
    own = _draw(jax.random.key(9), tok, seg, resp, **kw)
    for x, y, z in zip(pol_d, ref_d, own):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
      assert np.array_equal(np.asarray(y), np.asarray(z)) == antithetic
    pol = vrpo.pair_elbos(_terms(model, params, rows, pol_d), resp, seg)
    ref = vrpo.pair_elbos(_terms(model, params, rows, ref_d), resp, seg)
    scores[antithetic] = np.asarray(vrpo.preference_scores(pol, ref, beta=0.5))
    loss, _ = preference.dpo_loss(pol['chosen'], pol['rejected'], ref['chosen'], ref['rejected'],
                                  beta=0.5, valid_B=pol['valid'])
    if antithetic:
      assert (scores[True] == 0.0).all() and float(loss) == LN2_F32
  assert np.abs(scores[False]).max() > 0.01  # independent draws: noise that does not cancel


# -- the task -------------------------------------------------------------------------------


def _write_pairs(path, n=200):
  """A preference a few steps can learn: 'yes' is chosen over 'no', whatever the prompt."""
  rng = np.random.default_rng(0)
  with open(path, 'w') as f:
    for _ in range(n):
      a, b = (int(v) for v in rng.integers(0, 10, 2))
      f.write(json.dumps({'prompt': f'{a}+{b}?', 'chosen': 'yes', 'rejected': 'no'}) + '\n')


def _llada_cfg(cache, **kw):
  return tiny_config(cache, **{'objective': 'diffusion', 'model.causal': False,
                               'sample.prompts': (), **kw})


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A tiny LLaDA run to start from (its initial weights: no step is needed) and the pairs."""
  from pathways_jax.train import loop
  base = tmp_path_factory.mktemp('vrpo')
  loop.train(_llada_cfg(str(base / 'cache'), **{'train.steps': 0, 'data.eval_batches': 0}),
             str(base / 'pre'), quiet=True)
  _write_pairs(base / 'pairs.jsonl')
  return base


def _vrpo_cfg(base, **kw):
  return _llada_cfg(str(base / 'cache'), **{
      'task': 'vrpo', 'data.corpus': 'preference', 'data.path': str(base / 'pairs.jsonl'),
      'data.seq_len': 64, 'data.batch_size': 4, 'train.init_from': str(base / 'pre'),
      'train.steps': 6, 'train.lr': 1e-2, 'train.warmup_steps': 0, 'train.checkpoint_every': 100,
      'data.eval_batches': 0,  # validation runs the same loss (fixed key): not compiled here
      'dpo.beta': 0.5, 'vrpo.n_t': 2, **kw})


def test_vrpo_trains_through_the_trainer_from_log2(pretrained):
  from pathways_jax.train import loop
  res = loop.train(_vrpo_cfg(pretrained), str(pretrained / 'vrpo'), quiet=True)
  losses = logged_losses(pretrained / 'vrpo')
  # Policy == reference at step 0 and antithetic draws: every pair's loss is log 2.
  assert losses[1] == pytest.approx(math.log(2), abs=1e-6)
  assert res['status'] == 'completed' and all(math.isfinite(v) for v in losses.values())
  assert max(losses[5], losses[6]) < 0.5, losses  # the preference is being learnt


def test_a_lora_policy_is_scored_against_its_adapters_off_base(pretrained):
  """Adapters off: at init (LoRA B = 0) the policy is its base, so the loss is log 2 exactly;
  after the adapters move it is not."""
  from pathways_jax.adapters import lora
  cfg = _vrpo_cfg(pretrained, **{'model.lora_rank': 4})
  cfg.data.mask_id = MASK
  model, params = _llada(lora_rank=4)
  task = tasks.make(cfg, model)
  assert task.adapters_off and 'adapters off' in task.describe()
  rows = _rows(PAIRS, ROW)
  loss_fn = jax.jit(lambda p: task.loss(p, rows, jax.random.key(0), None))
  assert float(loss_fn(params)[0]) == LN2_F32
  base, adapters = lora.split(params)
  moved = lora.combine(base, jax.tree_util.tree_map(lambda x: x + 0.05, adapters))
  assert float(loss_fn(moved)[0]) != LN2_F32


def test_bad_vrpo_settings_are_named_before_training(pretrained):
  model, _ = _llada()
  with pytest.raises(ConfigError, match='precompute'):
    tasks.make(_vrpo_cfg(pretrained, **{'dpo.precompute': True}), model)
  with pytest.raises(ConfigError, match='n_yt'):
    tasks.make(_vrpo_cfg(pretrained, **{'vrpo.n_yt': 0}), model)
  ar = Transformer(model.cfg.replace(causal=True))
  with pytest.raises(ConfigError, match="task 'dpo'"):
    tasks.make(_vrpo_cfg(pretrained), ar)
  with pytest.raises(ConfigError, match="task 'vrpo'"):
    tasks.make(_vrpo_cfg(pretrained, task='dpo'), model)
  assert 'n_t=2' in tasks.make(_vrpo_cfg(pretrained), model).describe()
