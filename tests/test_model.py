"""The transformer: causality, packing isolation, KV cache, layouts and dtypes."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_same_function_on_packed_rows, packed_rows_with_padding, requires_cxx
from numerics import assert_close
from pathways_jax.config import ConfigError, ModelConfig
from pathways_jax.models import attention as attn_lib
from pathways_jax.models.transformer import Transformer, init_cache, unembedding


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


def test_rope_and_its_handwritten_gradient_match_the_rotate_half_formula():
  x = jax.random.normal(jax.random.key(0), (2, 9, 3, 16))
  pos = jnp.array([list(range(9)), [0, 1, 2, 0, 1, 2, 3, 4, 5]])
  w = jax.random.normal(jax.random.key(1), x.shape)
  assert_close(attn_lib.rope(x, pos, 100.0), _rotate_half_reference(x, pos, 100.0), terms=2)
  grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(f(x, pos, 100.0)) * w)))(x)
  assert_close(grad(attn_lib.rope), grad(_rotate_half_reference), terms=2)


@pytest.mark.parametrize('table_batch', [2, 1])
def test_apply_rope_gives_its_tables_their_true_gradient(table_batch):
  # Tables that depend on something differentiable (here a learned angle scale) get a real
  # gradient, summed over the axes they broadcast along (heads; batch when table_batch=1).
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  w = jax.random.normal(jax.random.key(1), x.shape)
  angle = jax.random.uniform(jax.random.key(2), (table_batch, 5, 1, 1, 4))

  def tables(scale):
    a = angle * scale
    return (jnp.concatenate([jnp.cos(a), jnp.cos(a)], axis=-2),
            jnp.concatenate([-jnp.sin(a), jnp.sin(a)], axis=-2))

  def reference(x, cos, sin):  # the same rotation, left to autodiff
    x5 = x.reshape(2, 5, 3, 2, 4)
    return (x5 * cos + x5[..., ::-1, :] * sin).reshape(x.shape)

  def loss(rotate, scale, x):
    return jnp.sum(jnp.tanh(rotate(x, *tables(scale))) * w)

  got = jax.grad(lambda s, x: loss(attn_lib.apply_rope, s, x), argnums=(0, 1))(1.3, x)
  want = jax.grad(lambda s, x: loss(reference, s, x), argnums=(0, 1))(1.3, x)
  assert abs(want[0]) > 1e-2
  assert_close(got[0], want[0], terms=x.size)  # the scale's gradient sums over every element
  assert_close(got[1], want[1], terms=2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_gradients_match_autodiff(dtype):
  """The hand-written backward pass of `dense` (x^T and dW behind barriers on CPU) gives
  autodiff's gradients, in float32 and with bfloat16 inputs: an MLP block, then a tied
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
  """The RoPE tables and `dense`'s weight gradient are materialised behind barriers for XLA:CPU;
  the model's gradient lowered for GPU or TPU (from this CPU process) has none."""
  model, params, tokens = _model()
  grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, tokens) ** 2)))
  counts = {platform: jax.export.export(grad, platforms=[platform])(params).mlir_module().count(
      'stablehlo.optimization_barrier') for platform in ('cpu', 'cuda', 'tpu')}
  assert counts['cpu'] > 0 and counts['cuda'] == counts['tpu'] == 0, counts
