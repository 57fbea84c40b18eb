"""The transformer: causality, packing isolation, KV cache, layouts and dtypes."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_same_function_on_packed_rows, packed_rows_with_padding, requires_cxx
from numerics import assert_close, assert_trees_close
from pathways_jax.adapters import lora
from pathways_jax.config import ConfigError, ModelConfig
from pathways_jax.models import attention as attn_lib
from pathways_jax.models import transformer
from pathways_jax.models.transformer import Transformer, init_cache, unembedding
from pathways_jax.objectives import autoregressive as ar_objective, diffusion


def _model(**kw):
  cfg = ModelConfig(**{**dict(vocab_size=48, d_model=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, mlp_dim=64, max_len=64), **kw})
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
  params = nn.unbox(model.init(jax.random.key(1), tokens)['params'])
  return model, params, tokens


@pytest.mark.parametrize('causal', [True, False])
def test_future_token_changes_past_logits_only_when_bidirectional(causal):
  model, params, tokens = _model(causal=causal)
  changed = tokens.at[:, 8].set((tokens[:, 8] + 1) % 48)
  a = model.apply({'params': params}, tokens)
  b = model.apply({'params': params}, changed)
  past_diff = float(jnp.abs(a[:, :8] - b[:, :8]).max())
  if causal:
    assert past_diff == 0.0
  else:
    assert past_diff > 1e-4
  assert float(jnp.abs(a[:, 8:] - b[:, 8:]).max()) > 1e-4


@pytest.mark.parametrize('causal', [True, False])
def test_packed_documents_do_not_see_each_other(causal):
  model, params, tokens = _model(causal=causal)
  seg = jnp.array([[1] * 5 + [2] * 7] * 2)
  pos = jnp.array([list(range(5)) + list(range(7))] * 2)
  packed = model.apply({'params': params}, tokens, positions_BL=pos, segment_ids_BL=seg)
  first = model.apply({'params': params}, tokens[:, :5])
  second = model.apply({'params': params}, tokens[:, 5:])
  assert_close(packed[:, :5], first, terms=12)
  assert_close(packed[:, 5:], second, terms=12)


@pytest.mark.parametrize('scan,attention', [
    (False, 'xla'), (True, 'xla'), pytest.param(False, 'cpu', marks=requires_cxx),
    pytest.param(True, 'cpu', marks=requires_cxx)])
def test_kv_cache_decoding_equals_full_recompute(scan, attention):
  model, params, tokens = _model(scan_layers=scan, attention=attention)
  full = model.apply({'params': params}, tokens)
  cache = init_cache(model.cfg, 2, 16)
  logits, cache = model.apply({'params': params}, tokens[:, :7], cache=cache, cache_index=0)
  outs = [logits]
  for i in range(7, 12):
    logits, cache = model.apply({'params': params}, tokens[:, i:i + 1], cache=cache,
                                cache_index=i)
    outs.append(logits)
  assert_close(jnp.concatenate(outs, 1), full, terms=12)


def test_scan_and_unrolled_layouts_compute_the_same_function():
  model_u, params_u, tokens = _model(scan_layers=False)
  model_s, _, _ = _model(scan_layers=True)
  stacked = {k: v for k, v in params_u.items() if not k.startswith('blocks_')}
  stacked['blocks'] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                             *[params_u[f'blocks_{i}'] for i in range(2)])
  assert_close(model_s.apply({'params': stacked}, tokens),
               model_u.apply({'params': params_u}, tokens), terms=12)


def test_remat_and_untied_and_mha_variants_run_and_differentiate():
  for kw in [dict(remat='full'), dict(remat='dots'), dict(tie_embeddings=False),
             dict(num_kv_heads=4)]:
    model, params, tokens = _model(**kw)
    grads = jax.grad(lambda p: model.apply({'params': p}, tokens).sum())(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
  model, params, tokens = _model(tie_embeddings=False)
  assert 'unembed' in params and unembedding(params, model.cfg).shape == (32, 48)


def test_bfloat16_compute_is_close_to_float32():
  model32, params, tokens = _model()
  model16 = Transformer(model32.cfg.replace(dtype='bfloat16'))
  a = model32.apply({'params': params}, tokens)
  b = model16.apply({'params': params}, tokens)
  assert b.dtype == jnp.float32  # logits are float32 whatever the compute dtype
  # Rounding in bfloat16 through two layers: the 64-wide contractions dominate.
  assert_close(b, a, dtype=jnp.bfloat16, terms=64)


def test_return_hidden_times_unembedding_gives_logits():
  model, params, tokens = _model()
  h = model.apply({'params': params}, tokens, return_hidden=True)
  assert_close(h @ unembedding(params, model.cfg), model.apply({'params': params}, tokens),
               terms=32)


@pytest.mark.parametrize('tie', [True, False])
def test_logits_window_is_a_slice_of_the_full_logits(tie):
  model, params, tokens = _model(tie_embeddings=tie, causal=False)
  full = model.apply({'params': params}, tokens)
  window = jax.jit(lambda p, t, s: model.apply({'params': p}, t, logits_window=(s, 4)))
  for start in (0, 5, 8):  # a traced start: one compile for every block
    assert_close(window(params, tokens, start), full[:, start:start + 4], terms=12)


def test_shifted_logits_read_each_token_off_the_previous_position():
  model, params, tokens = _model(causal=False)
  shifted = Transformer(model.cfg.replace(shift_logits=True))
  plain = model.apply({'params': params}, tokens)
  out = shifted.apply({'params': params}, tokens)  # the same parameters: the shift adds none
  np.testing.assert_array_equal(out[:, 1:], plain[:, :-1])
  np.testing.assert_array_equal(out[:, 0], plain[:, 0])
  window = shifted.apply({'params': params}, tokens, logits_window=(5, 4))
  assert_close(window, out[:, 5:9], terms=12)
  with pytest.raises(ConfigError, match='shift_logits=True needs a bidirectional'):
    ModelConfig(vocab_size=64, shift_logits=True)


def test_a_model_config_built_in_code_rejects_zero_query_blocks():
  with pytest.raises(ConfigError, match='causal_query_blocks=0'):
    ModelConfig(vocab_size=64, causal_query_blocks=0)
  with pytest.raises(ConfigError, match='causal_query_blocks=-1'):
    ModelConfig(vocab_size=64).replace(causal_query_blocks=-1)


@pytest.mark.parametrize('blocks', [2, 3, 5])
def test_causal_query_blocks_compute_the_same_function(blocks):
  """Blocked causal attention (keys after each query block skipped) equals the full [L, L]
  scores on packed rows with padding, in the logits and in the gradients. 100 positions make at
  most 3 blocks of >= 32 queries, so 3 and 5 both split them unevenly (34/33/33)."""
  model, params, _ = _model(causal=True, causal_query_blocks=1, max_len=128)
  blocked = Transformer(model.cfg.replace(causal_query_blocks=blocks))
  assert attn_lib.MIN_QUERY_BLOCK * 3 <= 100 < attn_lib.MIN_QUERY_BLOCK * 4

  def score_dots(m):  # the blocked path really runs (in a CPU lowering, as here): two attention
    # matmuls per block and layer
    tokens, pos, seg = packed_rows_with_padding(model.cfg.vocab_size)
    fn = jax.jit(lambda p: m.apply({'params': p}, tokens, positions_BL=pos, segment_ids_BL=seg))
    return jax.export.export(fn, platforms=['cpu'])(params).mlir_module().count(
        'stablehlo.dot_general')

  extra = 2 * (min(blocks, 3) - 1) * model.cfg.num_layers
  assert score_dots(blocked) == score_dots(model) + extra
  assert_same_function_on_packed_rows(model, blocked, params)


def _rotate_half_reference(x_BLHD, positions_BL, theta):
  """RoPE as the papers write it: slices and a concatenation, differentiated by autodiff."""
  d = x_BLHD.shape[-1]
  freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angle = positions_BL[..., None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle)[:, :, None], jnp.cos(angle)[:, :, None]
  x1, x2 = x_BLHD[..., :d // 2], x_BLHD[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_rope_and_its_derivatives_match_the_rotate_half_formula():
  x = jax.random.normal(jax.random.key(0), (2, 9, 3, 16))
  pos = jnp.array([list(range(9)), [0, 1, 2, 0, 1, 2, 3, 4, 5]])
  w = jax.random.normal(jax.random.key(1), x.shape)
  dx = jax.random.normal(jax.random.key(2), x.shape)
  assert_close(attn_lib.rope(x, pos, 100.0), _rotate_half_reference(x, pos, 100.0), terms=2)
  grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(f(x, pos, 100.0)) * w)))(x)
  assert_close(grad(attn_lib.rope), grad(_rotate_half_reference), terms=2)
  jvp = lambda f: jax.jvp(lambda x: f(x, pos, 100.0), (x,), (dx,))[1]
  assert_close(jvp(attn_lib.rope), jvp(_rotate_half_reference), terms=2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_gradients_match_autodiff(dtype):
  """The backward pass reverse mode derives from `dense`'s JVP (x^T and dW behind barriers on
  CPU) gives autodiff's gradients, in float32 and with bfloat16 inputs: an MLP block, then a tied
  unembedding (w = embedding.T, whose transpose must stay out of the weight gradient's dot)."""
  from pathways_jax.models.transformer import dense  # pylint: disable=g-import-not-at-top
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (24, 8)).astype(dtype)
  wg, wu = ((0.5 * jax.random.normal(k, (8, 12))).astype(dtype) for k in ks[1:3])
  wd = (0.5 * jax.random.normal(ks[3], (12, 8))).astype(dtype)
  emb = (0.5 * jax.random.normal(ks[4], (20, 8))).astype(dtype)

  def net(x, wg, wu, wd, emb, dense_fn):
    h = jax.nn.silu(dense_fn(x, wg)) * dense_fn(x, wu)
    return jnp.sum(jnp.sin(dense_fn(dense_fn(h, wd), emb.T, jnp.float32)))

  plain_dense = lambda x, w, out=None: jnp.dot(x, w, preferred_element_type=out)
  grads = jax.jit(jax.grad(net, argnums=(0, 1, 2, 3, 4)), static_argnums=5)
  args = (x, wg, wu, wd, emb)
  got, want = grads(*args, dense), grads(*args, plain_dense)
  exact = grads(*(a.astype(jnp.float32) for a in args), plain_dense)
  for g, w, e in zip(got, want, exact):
    assert g.dtype == w.dtype == dtype
    g, w, e = (np.asarray(a, np.float32) for a in (g, w, e))
    if dtype == jnp.float32:
      assert_close(g, w, terms=24)  # the weight gradients sum over the 24 rows
    else:  # bfloat16 rounds differently inside each: as close to float32's gradient as autodiff
      err, autodiff_err = np.linalg.norm(g - e), np.linalg.norm(w - e)
      assert err <= 1.5 * autodiff_err + 1e-3 * np.linalg.norm(e), (err, autodiff_err)


def _plain_dense(x_TD, w_DF, out_dtype=None):
  """`transformer.dense` as a bare dot: autodiff's derivatives, the reference."""
  return jnp.dot(x_TD, w_DF, preferred_element_type=out_dtype)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_jvp_matches_autodiff_with_either_tangent_zero(dtype):
  """`dense`'s written-out JVP is autodiff's, with both tangents and with x's or w's alone (the
  other a symbolic zero: a frozen weight costs no x dW matmul), for either out_dtype."""
  from pathways_jax.models.transformer import dense  # pylint: disable=g-import-not-at-top
  x, w, dx, dw = (jax.random.normal(k, s).astype(dtype) for k, s in zip(
      jax.random.split(jax.random.key(0), 4), [(24, 8), (8, 12), (24, 8), (8, 12)]))
  for out in (None, jnp.float32):
    cases = {'both': lambda fn: jax.jvp(lambda x, w: fn(x, w, out), (x, w), (dx, dw)),
             'x': lambda fn: jax.jvp(lambda x: fn(x, w, out), (x,), (dx,)),
             'w': lambda fn: jax.jvp(lambda w: fn(x, w, out), (w,), (dw,))}
    for name, jvp in cases.items():
      (y, dy), (y_ref, dy_ref) = jax.jit(lambda: jvp(dense))(), jvp(_plain_dense)
      assert dy.dtype == dy_ref.dtype == y_ref.dtype, (name, out)
      assert_close(y, y_ref, terms=8, err_msg=f'{name} {out}')
      # bfloat16: the sum of the two terms is rounded once more than autodiff's at most.
      assert_close(dy, dy_ref, terms=16, err_msg=f'{name} {out}')


def _normal_like(tree, key):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])


def _direction(params, key):
  """A random direction, each leaf at its own root-mean-square size (1 for the norms' scales,
  about init_std for the weights), so that a finite-difference step moves every leaf alike."""
  return jax.tree_util.tree_map(lambda p, n: jnp.sqrt(jnp.mean(p * p)) * n, params,
                                _normal_like(params, key))


def _derivative_case(variant):
  """(logits(p), loss(p), p, a direction in p's space) for the AR model, the LLaDA (bidirectional,
  shifted logits, its masked-diffusion loss) or LoRA. For LoRA p is the adapters only, the base
  closed over as a frozen base is in training (its weights' tangents are symbolic zeros); the
  adapters are moved off their zero-B start so that every term is exercised."""
  kw = {'ar': {}, 'llada': dict(causal=False, shift_logits=True),
        'lora': dict(lora_rank=2, lora_alpha=2.0)}  # scale 1: the default's 8 curves the
  # loss too much for float32 central differences (their error was 5% at a 3e-3 step)
  model, params, tokens = _model(**kw[variant])
  inputs, loss_of = tokens, lambda logits: ar_objective.loss(logits, tokens)[0]
  if variant == 'llada':
    inputs, masked, p_mask = diffusion.forward_process(jax.random.key(2), tokens, mask_id=47)
    loss_of = lambda logits: diffusion.loss(logits, tokens, masked, p_mask)[0]
  full = lambda p: p
  if variant == 'lora':
    base, adapters = lora.split(params)
    params = jax.tree_util.tree_map(lambda a, n: a + 0.05 * n, adapters,
                                    _normal_like(adapters, jax.random.key(4)))
    full = lambda p: lora.combine(base, p)
  logits = lambda p: model.apply({'params': full(p)}, inputs)
  return logits, lambda p: loss_of(logits(p)), params, _direction(params, jax.random.key(3))


# Central differences in float32 along _direction, with a step per variant where truncation and
# rounding about balance. Measured against the exact derivatives, their error was at most 4e-5 of
# the largest value (logits' JVP) and 2e-4 of each leaf's largest (Hessian-vector products; LoRA
# at 1e-2, the others 9e-5 at 3e-3). FD_TOLERANCE leaves 10x of that; a dropped or wrong term
# moves the values by a sizeable fraction of their scale.
FD_STEP = {'ar': 3e-3, 'llada': 3e-3, 'lora': 1e-2}
FD_TOLERANCE = 2e-3


def _central_difference(fn, params, direction, step):
  """(fn(params + step d) - fn(params - step d)) / 2 step, each output of fn leaf by leaf."""
  move = lambda sign: jax.tree_util.tree_map(lambda p, d: p + sign * step * d, params, direction)
  return jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * step), fn(move(1)), fn(move(-1)))


def _assert_fd_close(got, fd, what):
  for (path, g), f in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(fd)):
    scale = float(np.max(np.abs(f)))
    assert scale > 0, (what, jax.tree_util.keystr(path))
    err = float(np.max(np.abs(np.asarray(g) - np.asarray(f))))
    assert err <= FD_TOLERANCE * scale, (what, jax.tree_util.keystr(path), err / scale)


@pytest.mark.parametrize('variant', ['ar', 'llada', 'lora'])
def test_jvp_and_linearize_through_the_model_match_autodiff_and_finite_differences(
    variant, monkeypatch):
  logits, _, params, direction = _derivative_case(variant)

  def derivatives(p, d):  # (logits, their JVP, the same by jax.linearize)
    return *jax.jvp(logits, (p,), (d,)), jax.linearize(logits, p)[1](d)

  run = jax.jit(derivatives)
  _, got, linearized = run(params, direction)
  with monkeypatch.context() as m:
    m.setattr(transformer, 'dense', _plain_dense)
    _, want, _ = jax.jit(derivatives)(params, direction)
  assert_close(got, want, terms=64)  # the longest contraction: mlp_dim
  assert_close(linearized, want, terms=64)
  fd = _central_difference(lambda p: run(p, direction)[0], params, direction, FD_STEP[variant])
  _assert_fd_close(got, fd, 'jvp')


@pytest.mark.parametrize('variant', ['ar', 'llada', 'lora'])
def test_hessian_vector_products_through_the_model_match_autodiff_and_finite_differences(
    variant, monkeypatch):
  """Forward over reverse (jvp of grad, the cheap Hessian-vector product) and reverse over
  forward, against the plain-dot model's and central differences of the gradient; the gradient
  itself against the plain-dot model's."""
  _, loss, params, direction = _derivative_case(variant)

  def derivatives(p, d):  # (gradient, forward-over-reverse HVP, reverse-over-forward HVP)
    return (jax.grad(loss)(p), jax.jvp(jax.grad(loss), (p,), (d,))[1],
            jax.grad(lambda p: jax.jvp(loss, (p,), (d,))[1])(p))

  run = jax.jit(derivatives)
  grad, hvp, rev_fwd = run(params, direction)
  with monkeypatch.context() as m:
    m.setattr(transformer, 'dense', _plain_dense)
    want_grad, want_hvp, _ = jax.jit(derivatives)(params, direction)
  # Each leaf on its own scale; its gradient sums over 24 tokens, through 64-wide contractions.
  assert_trees_close(grad, want_grad, terms=64)
  assert_trees_close(hvp, want_hvp, terms=64)
  assert_trees_close(rev_fwd, want_hvp, terms=64)
  fd = _central_difference(lambda p: run(p, direction)[0], params, direction, FD_STEP[variant])
  _assert_fd_close(hvp, fd, 'hvp')


def test_no_weight_gradient_contracts_the_token_axis_of_both_operands_on_cpu():
  """The point of `dense`: in the compiled gradient of a tied model, every dot is row-major
  (contracting dim 1 of the left operand, or the head_dim of the batched attention dots), none
  in the [T, D]^T @ [T, F] form autodiff writes, which XLA:CPU runs at about half speed."""
  model, params, tokens = _model(tie_embeddings=True)
  loss = lambda p: jnp.sum(model.apply({'params': p}, tokens) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  dims = re.findall(r' dot\([^)]*\), (?:lhs_batch_dims=\{[\d,]*\}, )?lhs_contracting_dims=\{(\d+)\}',
                    hlo)
  assert len(dims) >= 7 * model.cfg.num_layers  # the weight gradients are among them
  assert '0' not in dims, dims


def test_dense_picks_its_weight_gradient_by_the_platform_it_is_lowered_for():
  """The CPU form (x^T and dW behind optimization barriers) only in a CPU lowering; a GPU or TPU
  lowering from this same CPU process keeps autodiff's form, with no barrier."""
  from pathways_jax.models.transformer import dense  # pylint: disable=g-import-not-at-top
  x, w = jnp.ones((16, 8)), jnp.ones((8, 4))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(dense(x, w) ** 2), argnums=1))
  for platform, barriers in (('cpu', 2), ('cuda', 0), ('tpu', 0)):
    text = jax.export.export(grad, platforms=[platform])(x, w).mlir_module()
    assert text.count('stablehlo.optimization_barrier') == barriers, (platform, text)


def test_causal_query_blocks_are_taken_only_when_lowered_for_cpu():
  """The blocked causal attention (one score matmul per query block) in a CPU lowering only; a
  GPU or TPU lowering from this CPU process has the one plain attention, forward and backward."""
  from pathways_jax.models import attention  # pylint: disable=g-import-not-at-top
  L = 4 * attention.MIN_QUERY_BLOCK
  q = jnp.ones((1, L, 2, 8))
  seg, pos = jnp.ones((1, L), jnp.int32), jnp.arange(L)[None]
  f = lambda q, k, v: jnp.sum(attention.attend(
      q, k, v, q_segment_BL=seg, kv_segment_BS=seg, q_positions_BL=pos, kv_positions_BS=pos,
      causal=True, causal_query_blocks=4) ** 2)
  counts = {}
  for platform in ('cpu', 'cuda', 'tpu'):
    for name, fn in (('fwd', f), ('grad', jax.grad(f, argnums=(0, 1, 2)))):
      text = jax.export.export(jax.jit(fn), platforms=[platform])(q, q, q).mlir_module()
      counts[platform, name] = text.count('stablehlo.dot_general')
  assert counts['cpu', 'fwd'] == 2 * 4 and counts['cuda', 'fwd'] == counts['tpu', 'fwd'] == 2
  assert counts['cuda', 'grad'] == counts['tpu', 'grad'] < counts['cpu', 'grad'], counts


def test_the_model_carries_optimization_barriers_only_when_lowered_for_cpu():
  """The RoPE tables (one pair per rope call, two per block) and `dense`'s x^T and dW (two per
  dense layer: seven per block and the unembedding) are materialised behind barriers for XLA:CPU;
  the model's gradient, JVP and Hessian-vector product lowered for GPU or TPU (from this CPU
  process) have none."""
  model, params, tokens = _model()
  loss = lambda p: jnp.sum(model.apply({'params': p}, tokens) ** 2)
  fns = {'grad': jax.grad(loss), 'jvp': lambda p: jax.jvp(loss, (p,), (p,)),
         'hvp': lambda p: jax.jvp(jax.grad(loss), (p,), (p,))}
  counts = {(name, platform): jax.export.export(jax.jit(fn), platforms=[platform])(params)
            .mlir_module().count('stablehlo.optimization_barrier')
            for name, fn in fns.items() for platform in ('cpu', 'cuda', 'tpu')}
  layers = model.cfg.num_layers
  assert counts['grad', 'cpu'] == 2 * (7 * layers + 1) + 2 * layers, counts
  assert counts['jvp', 'cpu'] > 0 and counts['hvp', 'cpu'] > 0, counts
  assert all(counts[name, platform] == 0 for name in fns for platform in ('cuda', 'tpu')), counts
