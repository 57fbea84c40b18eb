"""Pallas kernels, run in interpret mode on CPU: flash attention and the fused cross-entropy.

Interpret mode costs seconds of compilation per kernel configuration, so each case jits one
function that returns the kernel's and the references' outputs and gradients together.

Tolerances (documented in docs/kernels.md):
- float32: outputs and gradients within 2e-5 (abs + rel) of the float32 references.
- bfloat16 inputs: the kernel's max abs error against the float32 reference (on the same bf16
  inputs) is at most 2x XLA's own bf16 attention error + 1e-3, and below 4e-2 absolute.
"""
from __future__ import annotations

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import cross_entropy as ce
from kernels_pallas import flash_attention as fa
from numerics import assert_close, assert_trees_close


def _segments(key, b, l):
  """Random packed rows: contiguous documents with ids 1..3 and a padding tail (id 0); the last
  batch row is entirely padding, so its queries see no key at all."""
  cuts = jnp.sort(jax.random.randint(key, (b, 3), 0, l), axis=1)
  pos = jnp.arange(l)
  seg = 1 + (pos[None, :] >= cuts[:, :1]).astype(jnp.int32) + (pos[None, :] >= cuts[:, 1:2])
  seg = jnp.where(pos[None, :] >= cuts[:, 2:3] + l // 4, 0, seg)
  if b > 1:
    seg = seg.at[-1].set(0)
  return seg


def _attention_case(b, l, h, kh, d, *, causal, segments, dtype, block_sizes=None, seed=0):
  """(ours, reference on the inputs' dtype, reference in float32, XLA), each (out, dq, dk, dv)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (b, l, h, d), dtype)
  k = jax.random.normal(ks[1], (b, l, kh, d), dtype)
  v = jax.random.normal(ks[2], (b, l, kh, d), dtype)
  seg = _segments(ks[3], b, l) if segments else None
  do = jax.random.normal(ks[4], (b, l, h, d), jnp.float32)
  # Rows that see no key differ by convention between implementations (0 here, a uniform
  # average in XLA): give them no cotangent, and compare their outputs only against ours.
  row_ok = jnp.ones((b, l), bool) if seg is None else seg != 0
  do = do * row_ok[:, :, None, None]

  def outputs_and_grads(attn):
    def f(q, k, v):
      return attn(q, k, v).astype(jnp.float32)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(do)

  mask = None
  if seg is not None:
    mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))[:, None]

  @jax.jit
  def run(q, k, v):
    ours = outputs_and_grads(functools.partial(
        fa.flash_attention, causal=causal, segment_ids_BL=seg, block_sizes=block_sizes))
    ref = outputs_and_grads(functools.partial(
        fa.reference_attention, causal=causal, segment_ids_BL=seg))
    exact = ref
    if dtype != jnp.float32:
      exact = jax.vjp(lambda q, k, v: fa.reference_attention(
          q, k, v, causal=causal, segment_ids_BL=seg), *(x.astype(jnp.float32) for x in (q, k, v)))
      exact = (exact[0],) + exact[1](do)
    xla = outputs_and_grads(functools.partial(
        jax.nn.dot_product_attention, is_causal=causal, mask=mask, implementation='xla'))
    return ours, ref, exact, xla

  return run(q, k, v), row_ok


ATTENTION_CASES = [
    # (b, l, h, kh, d, causal, segments, block_sizes, layout): odd lengths, GQA 1/2/4, both
    # masks, default blocks (clamped to the length) and mixed small blocks, with and without
    # packing; the GPU layout ([B, L, H, D] tiles) and, once, the TPU one (head-major).
    # Bidirectional without segments (LLaDA) is also covered by the Transformer test below.
    pytest.param(1, 37, 4, 2, 16, True, False, None, 'BLHD', id='causal-gqa2-L37'),
    pytest.param(2, 50, 2, 2, 32, False, True, fa.BlockSizes(16, 32, 16, 32, 32, 16), 'BLHD',
                 id='bidir-segments-L50-blocks16/32'),
    pytest.param(2, 64, 4, 1, 16, True, True, fa.BlockSizes(32, 16, 16, 16, 16, 32), 'BLHD',
                 id='causal-segments-mqa-L64-blocks32/16'),
    pytest.param(2, 45, 4, 2, 16, True, True, fa.BlockSizes(16, 16, 32, 16, 16, 32), 'BHLD',
                 id='causal-segments-gqa2-L45-blocks16/32-headmajor'),
]


@pytest.mark.parametrize('b,l,h,kh,d,causal,segments,block_sizes,layout', ATTENTION_CASES)
def test_flash_attention_float32(b, l, h, kh, d, causal, segments, block_sizes, layout):
  with mock.patch.object(fa, '_layout_for', lambda lowering: layout):
    (ours, ref, _, xla), row_ok = _attention_case(b, l, h, kh, d, causal=causal,
                                                  segments=segments, dtype=jnp.float32,
                                                  block_sizes=block_sizes)
  # Keys summed per query, queries summed into dk and dv: reductions of length l.
  for name, a, r in zip(('out', 'dq', 'dk', 'dv'), ours, ref):
    assert np.all(np.isfinite(a)), name
    assert_close(a, r, terms=l, err_msg=f'{name} vs reference_attention')
  keep = np.asarray(row_ok)[:, :, None, None]
  assert_close(ours[0], xla[0], terms=l, where=np.broadcast_to(keep, ours[0].shape),
               err_msg='out vs jax.nn.dot_product_attention')
  for name, a, x in zip(('dq', 'dk', 'dv'), ours[1:], xla[1:]):
    assert_close(a, x, terms=l, err_msg=f'{name} vs jax.nn.dot_product_attention')
  if segments:  # rows without any visible key: exactly zero output, no NaN
    assert np.all(np.where(keep, 0, ours[0]) == 0)


def test_flash_attention_bfloat16():
  (ours, _, exact, xla), row_ok = _attention_case(2, 40, 4, 2, 32, causal=True, segments=True,
                                                  dtype=jnp.bfloat16)
  keep = np.asarray(row_ok)[:, :, None, None]
  for name, a, e, x in zip(('out', 'dq', 'dk', 'dv'), ours, exact, xla):
    sel = keep if name in ('out', 'dq') else True
    err = np.max(np.abs(np.where(sel, a - e, 0)))
    xla_err = np.max(np.abs(np.where(sel, x - e, 0)))
    assert err <= 2 * xla_err + 1e-3 and err < 4e-2, (name, err, xla_err)


def test_flash_attention_rejects_bad_shapes():
  q = jnp.zeros((1, 8, 3, 16))
  with pytest.raises(ValueError, match='multiple of kv heads'):
    fa.flash_attention(q, jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)))


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_flash_attention_lowers_for_accelerators(platform):
  """The kernels lower through Pallas to Triton (GPU) and Mosaic (TPU) from this CPU machine.

  This checks every primitive and BlockSpec against the lowering rules; it does not run them.
  """
  from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top
  b, l, h, kh, d = 2, 300, 4, 2, 64
  q = jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, l, kh, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, l), jnp.int32)

  def f(q, k, v, seg):
    def loss(q, k, v):
      return fa.flash_attention(q, k, v, causal=True, segment_ids_BL=seg).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  backend = {'cuda': 'gpu', 'tpu': 'tpu'}[platform]
  with mock.patch.object(jax, 'default_backend', lambda: backend), \
       mock.patch.object(tpu_info, 'get_device_kind', lambda: 'TPU v5e'), \
       mock.patch.object(tpu_info, 'get_num_device_cores', lambda: 1):
    exported = jax.export.export(
        jax.jit(f), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton'),
                         jax.export.DisabledSafetyCheck.custom_call('tpu_custom_call')])(
                             q, k, k, seg)
  text = exported.mlir_module()
  target = {'cuda': '__gpu$xla.gpu.triton', 'tpu': 'tpu_custom_call'}[platform]
  assert text.count(f'custom_call @{target}') == 3  # forward, dq, dkv


@pytest.mark.parametrize('causal', [True, False], ids=['causal-packed', 'bidirectional'])
def test_transformer_pallas_matches_xla(causal):
  from pathways_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  b, l, vocab = 2, 21, 64
  # One layer: the kernel's interpret-mode compile is paid per layer call site.
  cfg = ModelConfig(vocab_size=vocab, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=32, causal=causal)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (b, l), 0, vocab)
  # Causal: packed rows with a padding tail; bidirectional: plain rows (the LLaDA setting).
  seg = jnp.array([[1] * 8 + [2] * 10 + [0] * 3, [1] * 21]) if causal else None
  valid = jnp.ones((b, l), bool) if seg is None else seg != 0
  params = Transformer(cfg).init(jax.random.PRNGKey(0), tokens, segment_ids_BL=seg)['params']

  def logits_and_grads(attention):
    model = Transformer(cfg.replace(attention=attention))

    def loss(p):
      logits = model.apply({'params': p}, tokens, segment_ids_BL=seg)
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
      return (nll * valid).sum() / valid.sum(), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads

  (ours, ours_g), (xla, xla_g) = jax.jit(
      lambda: (logits_and_grads('pallas'), logits_and_grads('xla')))()
  keep = np.broadcast_to(np.asarray(valid)[..., None], ours.shape)
  assert_close(ours, xla, terms=b * l, where=keep, err_msg='logits')
  assert_trees_close(ours_g, xla_g, terms=b * l, err_msg='gradient ')


# ------------------------------------------------------------------------------------------------
# Fused cross-entropy.


def _ce_case(dtype, *, t=37, d=16, v=1000, chunk=128, z_loss=0.1):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  h = jax.random.normal(ks[0], (t, d), jnp.float32)
  w = jax.random.normal(ks[1], (d, v), jnp.float32) * 0.5
  targets = jax.random.randint(ks[2], (t,), 0, v)
  valid = jax.random.bernoulli(ks[3], 0.8, (t,))

  def objective(fn):
    def f(h, w):
      loss_T, lse_T = fn(h.astype(dtype), w.astype(dtype), targets, valid_T=valid)
      return loss_T.sum() + z_loss * (lse_T ** 2 * valid).sum(), (loss_T, lse_T)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)

  return jax.jit(lambda h, w: (
      objective(functools.partial(ce.fused_cross_entropy, chunk_size=chunk)),
      objective(ce.cross_entropy_reference)))(h, w), valid


def test_fused_cross_entropy_float32():
  # V = 1000 with chunks of 128: 7 full chunks and a 104-wide tail.
  (((_, (loss, lse)), (dh, dw)), ((_, (rloss, rlse)), (rdh, rdw))), valid = _ce_case(jnp.float32)
  v = 1000  # log-sum-exp and dh sum over the vocabulary
  assert_close(loss, rloss, terms=v)
  assert_close(lse, rlse, terms=v)
  assert np.all(np.asarray(loss)[~np.asarray(valid)] == 0)
  assert_close(dh, rdh, terms=v)
  assert_close(dw, rdw, terms=v)


def test_fused_cross_entropy_bfloat16():
  # Same bf16 inputs, f32 logits on both sides; the difference is the bf16 rounding of the
  # per-chunk dlogits before the backward matmuls (the naive path rounds the full one alike).
  (((_, (loss, lse)), (dh, dw)), ((_, (rloss, rlse)), (rdh, rdw))), _ = _ce_case(jnp.bfloat16)
  v = 1000
  assert_close(loss, rloss, terms=v, dtype=jnp.float32)  # float32 logits on both sides
  assert_close(lse, rlse, terms=v, dtype=jnp.float32)
  # One bfloat16 rounding of each dlogit (2^-8 relative), summed in float32 with random signs:
  # a few eps(bfloat16) of the gradient's scale, whatever the length of the sum.
  for name, a, r in (('dh', dh, rdh), ('dw', dw, rdw)):
    assert_close(a, r, dtype=jnp.bfloat16, slack=4, err_msg=name)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_fused_cross_entropy_memory(dtype):
  """Compiled temp memory, fwd+bwd, at V=128k, T=8192, D=2048: at most 10% of the naive path.

  Abstract shapes only: XLA's buffer assignment is read from the compiled executable, nothing is
  allocated. (bf16 on CPU includes a float32 copy of the unembedding and of dW that the CPU
  backend inserts because it has no native bf16 matmul; a GPU/TPU build has neither.)
  """
  t, d, v = 8192, 2048, 131072
  dt = jnp.dtype(dtype)
  args = (jax.ShapeDtypeStruct((t, d), dt), jax.ShapeDtypeStruct((d, v), dt),
          jax.ShapeDtypeStruct((t,), jnp.int32))

  def temp_bytes(fn):
    def f(h, w, targets):
      loss_T, lse_T = fn(h, w, targets)
      return loss_T.mean() + 1e-4 * (lse_T ** 2).mean()
    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  naive = temp_bytes(ce.cross_entropy_reference)
  fused = temp_bytes(ce.fused_cross_entropy)
  assert naive >= 2 * t * v * 4  # sanity: the naive path really holds [T, V] float32 twice
  assert fused <= 0.10 * naive, f'fused {fused / 2**20:.0f} MiB vs naive {naive / 2**20:.0f} MiB'
