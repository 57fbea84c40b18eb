"""QLoRA (adapters/qlora.py): a frozen base quantised by qwix (int8, int4, NF4) under float32 or
bfloat16 LoRA adapters. Skipped where qwix is not installed (it is the `qlora` extra, not in
requirements.lock)."""
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip('qwix', reason='QLoRA needs qwix: pip install -e ".[qlora]" (not in '
                                   'requirements.lock)')

from pathways_jax.adapters import lora, qlora  # pylint: disable=g-import-not-at-top
from pathways_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
from pathways_jax.objectives import autoregressive  # pylint: disable=g-import-not-at-top

BASE = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=128, max_len=64)
TOKENS = jax.random.randint(jax.random.key(5), (2, 16), 0, 64)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)

# The 16 NormalFloat4 levels (Dettmers et al. 2023, QLoRA, appendix E), for the reference below.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])
# Round to nearest with an absmax scale: a weight is off by at most half a step of its block's
# grid. qwix's scale is absmax / B with B = 127.5 (int8), 7.5 (int4), 1 (nf4), so half a step
# is absmax / 255, absmax / 15, and for NF4 half the widest gap between levels, (1 - 0.6962) / 2
# (the levels are denser near 0). The slack (1 + 1e-4) is float32 rounding in w / scale.
HALF_STEP = {'int8': 1 / 255, 'int4': 1 / 15, 'nf4': float(np.max(np.diff(NF4))) / 2}
SCALE_BOUND = {'int8': 127.5, 'int4': 7.5, 'nf4': 1.0}


def _params(cfg=BASE, random_b=False):
  """(base params, adapters) from one (jitted) init of the adapted model."""
  init = jax.jit(Transformer(LCFG.apply_to(cfg)).init)
  base, adapters = lora.split(nn.unbox(init(jax.random.key(0), TOKENS)['params']))
  if random_b:  # as after training, so that the adapters change the output
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(jax.random.key(7), x.shape)
        if 'lora_b' in jax.tree_util.keystr(p) else x, adapters)
  return base, adapters


def _reference_dequant(q) -> np.ndarray:
  """The float weight a QArray stands for, written out: level(qvalue) * its block's scale."""
  qv = np.asarray(q.qvalue).astype(np.int64)
  levels = NF4[qv] if str(q.qvalue.dtype) == 'uint4' else qv.astype(np.float64)
  scale = np.asarray(q.scale, np.float64)
  for axis, (n, s) in enumerate(zip(qv.shape, scale.shape)):
    scale = np.repeat(scale, n // s, axis=axis)
  return levels * scale


def _flat(tree):
  return {jax.tree_util.keystr(p): x for p, x in
          jax.tree_util.tree_leaves_with_path(tree, is_leaf=qlora.is_quantized)}


def _rel_rms(got, want):
  return float(jnp.sqrt(jnp.mean((got - want) ** 2) / jnp.mean(want ** 2)))


# Relative RMS error of the logits, quantised base against float base, measured on this model
# (block 32, seeds as below): int8 0.0040, int4 0.065, nf4 0.064. Asserted with margin; the exact
# check is the weight bound (HALF_STEP) and the forward on the test's own dequantised weights.
LOGIT_REL_RMS = {'int8': 0.01, 'int4': 0.1, 'nf4': 0.1}


@pytest.mark.parametrize('qtype', qlora.QTYPES)
def test_quantised_forward_is_the_dequantised_model_and_close_to_the_float_one(qtype):
  base, adapters = _params(random_b=True)
  qcfg = qlora.QuantConfig(qtype=qtype, block_size=32)
  qbase = qlora.quantize_base(base, qcfg)
  assert qlora.quantized_paths(qbase) == lora.dense_paths(base)  # all 14, nothing else
  float_w, q_w = _flat(base), _flat(qbase)
  ref_base = dict(float_w)
  for k, q in q_w.items():
    if not qlora.is_quantized(q):
      continue
    ref = _reference_dequant(q)
    w = np.asarray(float_w[k], np.float64)
    # The weight bound: |w - ref| <= half a step of the block's grid (block absmax * HALF_STEP);
    # qwix's scale is absmax / B.
    absmax = np.asarray(q.scale, np.float64) * SCALE_BOUND[qtype]
    for axis, (n, s) in enumerate(zip(w.shape, absmax.shape)):
      absmax = np.repeat(absmax, n // s, axis=axis)
    assert np.all(np.abs(w - ref) <= absmax * HALF_STEP[qtype] * (1 + 1e-4)), k
    np.testing.assert_allclose(np.asarray(qlora.dequantize_base({'w': q})['w']), ref,
                               rtol=1e-6, atol=1e-7)
    ref_base[k] = jnp.asarray(ref, jnp.float32)
  ref_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base),
                                          [ref_base[k] for k in _flat(base)])
  model = qlora.quantized_model(Transformer(LCFG.apply_to(BASE)))
  got = model.apply({'params': lora.combine(qbase, adapters)}, TOKENS)
  # Exactly the plain model on the test's own dequantised weights (up to float rounding) ...
  want_ref = Transformer(LCFG.apply_to(BASE)).apply({'params': lora.combine(ref_tree, adapters)},
                                                    TOKENS)
  assert float(jnp.max(jnp.abs(got - want_ref))) <= 1e-5
  # ... and close to the float base with the same adapters.
  want = Transformer(LCFG.apply_to(BASE)).apply({'params': lora.combine(base, adapters)}, TOKENS)
  assert 0 < _rel_rms(got, want) <= LOGIT_REL_RMS[qtype]
  # The wrapped model still runs an unquantised tree as the plain model does.
  np.testing.assert_array_equal(
      np.asarray(model.apply({'params': lora.combine(base, adapters)}, TOKENS)), np.asarray(want))


def test_quantised_base_bytes():
  # head_dim 64, so every weight's blocks (wo's run along head_dim) hold 64 values.
  base, _ = _params(BASE.replace(d_model=128, num_heads=2, num_kv_heads=2, mlp_dim=256))
  for qtype, stored_max, packed_max in (('int8', 0.27, 0.27), ('nf4', 0.27, 0.141),
                                        ('int4', 0.27, 0.141)):
    b = qlora.dense_bytes(qlora.quantize_base(base, qlora.QuantConfig(qtype=qtype,
                                                                      block_size=64)))
    dense = set(lora.dense_paths(base))
    assert b.float32 == 4 * sum(x.size for p, x in traverse_util.flatten_dict(base).items()
                                if '/'.join(p) in dense)
    # Values at 1 byte (int8) or 4 bits, plus one float32 scale per 64 values (1/16 byte).
    want = {'int8': 1 + 4 / 64, 'nf4': 0.5 + 4 / 64, 'int4': 0.5 + 4 / 64}[qtype] / 4
    assert b.packed_ratio == pytest.approx(want) and b.packed_ratio <= packed_max
    # What the buffers occupy here: XLA:CPU stores an int4/uint4 value in a whole byte.
    assert b.stored_ratio <= stored_max
    if jax.default_backend() == 'cpu':
      assert b.stored_ratio == pytest.approx((1 + 4 / 64) / 4)


@pytest.mark.parametrize('qtype,adapter_dtype', [('int8', 'float32'), ('nf4', 'bfloat16')])
def test_only_the_adapters_train_and_the_quantised_base_is_unchanged(qtype, adapter_dtype):
  cfg = BASE.replace(scan_layers=True, remat='full')  # dequantised inside nn.scan and nn.remat
  base, adapters = _params(cfg)
  qbase = qlora.quantize_base(base, qlora.QuantConfig(qtype=qtype, block_size=32))
  before = jax.tree_util.tree_map(np.array, qbase)
  adapters = qlora.adapters_like(adapters, adapter_dtype)
  model = qlora.quantized_model(Transformer(LCFG.apply_to(cfg)))
  tx = optax.adam(1e-2)
  targets = jax.random.randint(jax.random.key(9), TOKENS.shape, 0, 64)

  @jax.jit
  def step(adapters, opt_state, qbase):
    def loss_fn(ad):
      logits = model.apply({'params': lora.combine(qbase, ad)}, targets)
      return autoregressive.loss(logits, targets)[0]
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  opt_state = tx.init(adapters)
  losses = []
  for _ in range(20):
    adapters, opt_state, loss = step(adapters, opt_state, qbase)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses
  assert all(x.dtype == jnp.dtype(adapter_dtype) for x in jax.tree_util.tree_leaves(adapters))
  after, was = jax.tree_util.tree_leaves(qbase), jax.tree_util.tree_leaves(before)
  assert len(after) == len(was)
  for a, b in zip(after, was):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), b)  # bit for bit


def test_dequantisation_happens_per_layer_inside_scan():
  """Peak memory: under scan_layers + remat the step holds one layer's dequantised weights, not
  a float copy of the whole base (which dequantising the tree up front would, costing more
  than the float model). Compile-time buffer sizes from XLA's memory analysis."""
  cfg = ModelConfig(vocab_size=64, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4,
                    mlp_dim=256, max_len=64, scan_layers=True, remat='full')
  tokens = jnp.zeros((2, 32), jnp.int32)
  adapted = Transformer(LCFG.apply_to(cfg))
  abstract = jax.eval_shape(lambda: nn.unbox(adapted.init(jax.random.key(0), tokens)['params']))
  base_abs, adapters_abs = lora.split(abstract)
  base = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), base_abs)
  adapters = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), adapters_abs)
  qbase = qlora.quantize_base(base, qlora.QuantConfig(qtype='int8'))
  model = qlora.quantized_model(adapted)

  def temp_bytes(apply, prepare):
    def grads(qb, ad):
      return jax.grad(lambda a: autoregressive.loss(apply({'params': lora.combine(prepare(qb), a)},
                                                          tokens), tokens)[0])(ad)
    return jax.jit(grads).lower(qbase, adapters).compile().memory_analysis().temp_size_in_bytes

  on_read = temp_bytes(model.apply, lambda qb: qb)
  up_front = temp_bytes(adapted.apply, qlora.dequantize_base)
  float_dense = qlora.dense_bytes(qbase).float32
  assert up_front >= float_dense  # a whole float copy of the dense weights
  assert on_read < up_front - 0.6 * float_dense, (on_read, up_front, float_dense)


def test_kv_cache_sampling_runs_on_the_quantised_base():
  from pathways_jax.sampling import autoregressive as ar  # pylint: disable=g-import-not-at-top
  base, adapters = _params(random_b=True)
  qbase = qlora.quantize_base(base, qlora.QuantConfig(qtype='nf4', block_size=32))
  prompt, kw = TOKENS[:, :4], dict(key=jax.random.key(0), max_new_tokens=6, temperature=0.0)
  got = ar.generate(qlora.quantized_model(Transformer(LCFG.apply_to(BASE))),
                    lora.combine(qbase, adapters), prompt, **kw)
  want = ar.generate(Transformer(LCFG.apply_to(BASE)),
                     lora.combine(qlora.dequantize_base(qbase), adapters), prompt, **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_settings():
  with pytest.raises(Exception, match='qtype'):
    qlora.QuantConfig(qtype='int3')
  with pytest.raises(Exception, match='does not divide'):
    qlora.quantize_base(_params()[0], qlora.QuantConfig(block_size=48))
  only_mlp = qlora.quantize_base(_params()[0], qlora.QuantConfig(targets='mlp/'))
  assert qlora.quantized_paths(only_mlp) == [f'blocks_{i}/mlp/{w}' for i in range(2)
                                             for w in ('w_down', 'w_gate', 'w_up')]
