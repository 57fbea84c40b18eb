"""The fused XLA:CPU attention kernel (kernels_cpu), against the XLA attention it replaces."""
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (REPO, assert_same_function_on_packed_rows, packed_rows_with_padding,
                     requires_cxx, run_on_fake_devices)
from numerics import assert_close, tolerance
from kernels_cpu import attention as cpu_attention
from pathways_jax.config import ModelConfig
from pathways_jax.config_files import config_from_file
from pathways_jax.models import attention as attn_lib
from pathways_jax.models.transformer import Transformer


def _packed_rows(rng, b, length, pad=3):
  """Segment ids and positions of rows packed with 3 documents and a padding tail."""
  seg = np.ones((b, length), np.int32)
  for i in range(b):
    c1, c2 = sorted(rng.choice(np.arange(1, length - pad), 2, replace=False))
    seg[i, c1:], seg[i, c2:], seg[i, length - pad:] = 2, 3, 0
  pos = np.zeros_like(seg)
  for i in range(b):
    for t in range(1, length):
      pos[i, t] = 0 if seg[i, t] != seg[i, t - 1] else pos[i, t - 1] + 1
  return seg, pos


def _case(kind, b, length, s, h, kh, d, seed=0):
  rng = np.random.RandomState(seed)
  q = rng.randn(b, length, h, d).astype(np.float32)
  k, v = (rng.randn(b, s, kh, d).astype(np.float32) for _ in range(2))
  if kind == 'packed':
    q_seg, q_pos = _packed_rows(rng, b, length)
    kv_seg, kv_pos = q_seg, q_pos
  elif kind == 'cache':  # decoding: queries at the end of a cache whose last 2 slots are empty
    kv_seg = np.tile((np.arange(s) < s - 2).astype(np.int32), (b, 1))
    kv_pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    q_seg = np.ones((b, length), np.int32)
    q_pos = np.tile(np.arange(s - 2 - length, s - 2, dtype=np.int32), (b, 1))
  else:  # 'scattered': segments interleaved, positions shuffled (the kernel's key-by-key path)
    q_seg = rng.randint(0, 3, (b, length)).astype(np.int32)
    q_pos = rng.permutation(length * b).reshape(b, length).astype(np.int32) % length
    kv_seg, kv_pos = q_seg, q_pos
  return [jnp.asarray(x) for x in (q, k, v, q_seg, kv_seg, q_pos, kv_pos)]


def _both(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, dtype=jnp.float32):
  scale = q.shape[-1] ** -0.5
  mask = attn_lib.attention_mask(q_seg, kv_seg, q_pos, kv_pos, causal)

  def kernel(q, k, v):
    return cpu_attention.attention(q, k, v, q_segment_BL=q_seg, kv_segment_BS=kv_seg,
                                   q_positions_BL=q_pos, kv_positions_BS=kv_pos, causal=causal,
                                   scale=scale)

  def xla(q, k, v):
    return attn_lib._xla_attention(q, k, v, mask, scale)  # pylint: disable=protected-access

  sees_a_key = np.asarray(mask.any(-1))[:, :, None, None]
  return kernel, xla, sees_a_key


@pytest.mark.parametrize('kind,causal,shape', [
    ('packed', True, (2, 128, 128, 4, 2, 32)),   # the quickstart's attention, two rows
    ('packed', False, (2, 128, 128, 4, 2, 32)),  # LLaDA's (bidirectional)
    ('packed', True, (2, 37, 37, 6, 2, 12)),     # no dimension a multiple of 8 or 16
    ('packed', False, (3, 40, 40, 3, 3, 8)),     # multi-head, no grouping
    ('cache', True, (2, 5, 20, 4, 2, 16)),       # a decoding block against a KV cache
    ('cache', True, (2, 1, 20, 4, 1, 16)),       # one decoded token, multi-query
    ('scattered', True, (2, 24, 24, 4, 2, 8)),
    ('scattered', False, (2, 24, 24, 4, 2, 8)),
])
@requires_cxx
def test_kernel_matches_xla_attention_in_values_and_gradients(kind, causal, shape):
  q, k, v, *masks = _case(kind, *shape)
  kernel, xla, sees = _both(q, k, v, *masks, causal)
  weight = jnp.asarray(np.random.RandomState(1).randn(*q.shape).astype(np.float32)) * sees
  got, want = jax.jit(kernel)(q, k, v), xla(q, k, v)
  terms = max(shape[1:3])  # keys summed per query; queries summed into dk, dv
  assert_close(got, want, terms=terms, where=np.broadcast_to(sees, got.shape))
  g_got = jax.jit(jax.grad(lambda *a: jnp.sum(kernel(*a) * weight), (0, 1, 2)))(q, k, v)
  g_want = jax.grad(lambda *a: jnp.sum(xla(*a) * weight), (0, 1, 2))(q, k, v)
  for name, a, b in zip('qkv', g_got, g_want):
    assert np.abs(b).max() > 1e-2
    assert_close(a, b, terms=terms, err_msg=f'd{name}')


@requires_cxx
def test_a_query_that_sees_no_key_gets_zero_output_and_passes_no_gradient():
  q, k, v, *masks = _case('packed', 2, 32, 32, 2, 1, 8)
  kernel, _, sees = _both(q, k, v, *masks, causal=True)
  assert not sees.all()  # the padding tail sees nothing
  out = kernel(q, k, v)
  assert np.all(np.asarray(out)[~np.broadcast_to(sees, out.shape)] == 0)
  dq, dk, dv = jax.grad(lambda *a: jnp.sum(kernel(*a)), (0, 1, 2))(q, k, v)
  padding = ~np.asarray(sees[:, :, 0, 0])
  assert np.all(np.asarray(dq)[padding] == 0)
  assert np.all(np.asarray(dk)[padding] == 0) and np.all(np.asarray(dv)[padding] == 0)


@requires_cxx
def test_kernel_is_deterministic_bit_for_bit():
  """Resume-exactness needs it: the threads split (batch row, kv head) tasks, never a sum."""
  q, k, v, *masks = _case('packed', 4, 64, 64, 4, 2, 16)
  kernel, _, _ = _both(q, k, v, *masks, causal=True)
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(kernel(*a))), (0, 1, 2)))
  first = grad(q, k, v)
  for _ in range(3):
    for a, b in zip(grad(q, k, v), first):
      np.testing.assert_array_equal(a, b)


@requires_cxx
def test_bfloat16_inputs_are_computed_in_float32_and_returned_in_bfloat16():
  q, k, v, *masks = _case('packed', 2, 32, 32, 2, 1, 16)
  kernel, xla, sees = _both(q, k, v, *masks, causal=True)
  out = kernel(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  # The sums run in float32: only rounding q, k, v and the output to bfloat16 counts, a few
  # eps(bfloat16) of the values' scale, whatever the number of keys.
  assert_close(out, xla(q, k, v), dtype=jnp.bfloat16, slack=4,
               where=np.broadcast_to(sees, out.shape))


def _model(attention, **kw):
  cfg = ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=128, attention=attention, **kw)
  return Transformer(cfg)


@requires_cxx
@pytest.mark.parametrize('causal', [True, False])
def test_transformer_with_cpu_attention_matches_xla_attention(causal):
  xla_model, cpu_model = _model('xla', causal=causal), _model('cpu', causal=causal)
  tokens, pos, seg = packed_rows_with_padding(48)
  params = nn.unbox(xla_model.init(jax.random.key(1), tokens)['params'])
  assert_same_function_on_packed_rows(xla_model, cpu_model, params)
  hlo = jax.jit(lambda p: cpu_model.apply({'params': p}, tokens, positions_BL=pos,
                                          segment_ids_BL=seg)).lower(params).as_text()
  assert 'pathways_attention_fwd' in hlo  # the kernel really runs


@requires_cxx
def test_on_a_multi_device_mesh_the_kernel_runs_per_batch_shard_without_gathers():
  out = run_on_fake_devices('''
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from pathways_jax.models import attention as A
mesh = jax.make_mesh((2, 1), ('data', 'tensor'))
r = np.random.RandomState(0)
q, k, v = (jnp.asarray(r.randn(4, 32, 4 if i == 0 else 2, 8), jnp.float32) for i in range(3))
seg = jnp.ones((4, 32), jnp.int32); pos = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (4, 32))
sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
args = [jax.device_put(x, sh) for x in (q, k, v, seg, pos)]
def loss(impl):
  return lambda q, k, v, s, p: jnp.sum(A.attend(q, k, v, q_segment_BL=s, kv_segment_BS=s,
      q_positions_BL=p, kv_positions_BS=p, causal=True, implementation=impl) ** 2)
with jax.set_mesh(mesh), nn.logical_axis_rules((('activation_batch', ('data',)),)):
  g = jax.jit(jax.value_and_grad(loss('cpu'), (0, 1, 2)))
  print('GATHERS', g.lower(*args).compile().as_text().count('all-gather'))
  (val, grads), (ref, ref_grads) = g(*args), jax.value_and_grad(loss('xla'), (0, 1, 2))(*args)
print('DIFF', abs(float(val) - float(ref)) / float(ref),
      max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(grads, ref_grads)))
print('SPEC', grads[0].sharding.spec)
''', devices=2)
  assert 'GATHERS 0' in out, out
  value_diff, grad_diff = map(float, out.split('DIFF ')[1].split()[:2])
  # Relative to the reference's scale: the loss sums 4 * 32 * 4 * 8 squares, a gradient 32 keys.
  assert value_diff <= tolerance(1.0, terms=4 * 32 * 4 * 8), out
  assert grad_diff <= tolerance(1.0, terms=32), out
  assert "SPEC P('data'," in out, out


def test_mismatched_shapes_are_named_before_the_kernel_runs():
  q, k, v, *masks = _case('packed', 2, 16, 16, 4, 2, 8)
  kw = dict(q_segment_BL=masks[0], kv_segment_BS=masks[1], q_positions_BL=masks[2],
            kv_positions_BS=masks[3], causal=True, scale=1.0)
  with pytest.raises(ValueError, match='4 query heads do not divide into 3 kv heads'):
    cpu_attention.attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), **kw)
  with pytest.raises(ValueError, match='got q .* k .* v'):
    cpu_attention.attention(q, k[..., :4], v[..., :4], **kw)
  with pytest.raises(ValueError, match=r'q_segment_BL has shape \(2, 15\), want \(2, 16\)'):
    cpu_attention.attention(q, k, v, **{**kw, 'q_segment_BL': masks[0][:, :15]})


def test_without_a_compiler_the_build_says_so(monkeypatch, tmp_path):
  monkeypatch.setenv('PATHWAYS_KERNEL_CACHE', str(tmp_path / 'kernels'))
  monkeypatch.delenv('CXX', raising=False)
  monkeypatch.setenv('PATH', str(tmp_path))  # no compiler on it
  with pytest.raises(cpu_attention.KernelBuildError, match="C\\+\\+ compiler.*model.attention='xla'"):
    cpu_attention.build()


@requires_cxx  # the compiler is looked for first
def test_an_unwritable_kernel_cache_is_named(monkeypatch, tmp_path):
  cache = tmp_path / 'kernels'
  cache.mkdir()
  cache.chmod(0o500)
  monkeypatch.setenv('PATHWAYS_KERNEL_CACHE', str(cache))
  try:
    if os.access(cache, os.W_OK):  # root ignores the mode bits; a file in the way does not
      cache.chmod(0o700)
      cache.rmdir()
      cache.write_text('a file, not a directory')
    with pytest.raises(cpu_attention.KernelBuildError,
                       match='is not writable.*set PATHWAYS_KERNEL_CACHE'):
      cpu_attention.build()
  finally:
    if cache.is_dir():
      cache.chmod(0o700)


@requires_cxx
def test_a_failed_compilation_names_the_command_and_leaves_no_library(monkeypatch, tmp_path):
  bad = tmp_path / 'attention.cc'
  bad.write_text('this is not C++\n')
  monkeypatch.setenv('PATHWAYS_KERNEL_CACHE', str(tmp_path / 'kernels'))
  monkeypatch.setattr(cpu_attention, '_SOURCE', str(bad))
  with pytest.raises(cpu_attention.KernelBuildError, match='building the CPU attention kernel failed'):
    cpu_attention.build()
  assert os.listdir(tmp_path / 'kernels') == []


@requires_cxx
def test_the_build_is_cached_by_source_and_rebuilt_for_a_new_source(monkeypatch, tmp_path):
  monkeypatch.setenv('PATHWAYS_KERNEL_CACHE', str(tmp_path))
  first = cpu_attention.build()
  mtime = os.path.getmtime(first)
  assert cpu_attention.build() == first and os.path.getmtime(first) == mtime
  changed = tmp_path / 'attention.cc'
  with open(cpu_attention._SOURCE, encoding='utf-8') as f:  # pylint: disable=protected-access
    changed.write_text(f.read() + '\n// changed\n')
  monkeypatch.setattr(cpu_attention, '_SOURCE', str(changed))
  assert cpu_attention.build() != first


@requires_cxx
def test_a_corrupt_cached_library_is_rebuilt(monkeypatch, tmp_path):
  monkeypatch.setenv('PATHWAYS_KERNEL_CACHE', str(tmp_path))
  path = cpu_attention.build()
  with open(path, 'r+b') as f:
    f.truncate(100)
  lib = cpu_attention.load_library()
  assert lib.PathwaysAttentionFwd and os.path.getsize(path) > 100


def test_attention_cpu_falls_back_to_xla_with_a_warning_when_the_kernel_cannot_build(
    monkeypatch, caplog):
  def fail():
    raise cpu_attention.KernelBuildError('no compiler here')

  monkeypatch.setattr(cpu_attention, 'ensure_built', fail)
  attn_lib._warn_once.cache_clear()  # pylint: disable=protected-access
  q, k, v, *masks = _case('packed', 2, 32, 32, 2, 1, 8)
  kw = dict(q_segment_BL=masks[0], kv_segment_BS=masks[1], q_positions_BL=masks[2],
            kv_positions_BS=masks[3], causal=True)
  with caplog.at_level(logging.WARNING):
    out = attn_lib.attend(q, k, v, implementation='cpu', **kw)
  assert "attention='cpu' not taken: no compiler here; using 'xla'" in caplog.text
  np.testing.assert_array_equal(out, attn_lib.attend(q, k, v, implementation='xla', **kw))


def test_the_tiny_configs_use_the_cpu_kernel():
  for name in ('ar_tiny', 'llada_tiny', 'quickstart', 'quickstart_llada'):
    cfg = config_from_file(os.path.join(REPO, 'experiments', f'{name}.py'))
    assert cfg.model.attention == 'cpu', name
