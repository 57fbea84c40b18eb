"""The attention-backend registry (pathways_jax/models/attention_backends.py): the model names
backends, never kernel modules; a backend that cannot serve a call says why and 'xla' runs it."""
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, tiny_config
from pathways_jax import config as config_lib
from pathways_jax.models import attention, attention_backends


def _call_args():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (2, 8, 4, 16))
  k = jax.random.normal(k2, (2, 8, 2, 16))
  v = jax.random.normal(k3, (2, 8, 2, 16))
  seg = jnp.array([[1] * 5 + [2] * 3, [1] * 8])
  pos = jnp.array([list(range(5)) + list(range(3)), list(range(8))])
  return (q, k, v), dict(q_segment_BL=seg, kv_segment_BS=seg, q_positions_BL=pos,
                         kv_positions_BS=pos, causal=True)


@pytest.fixture
def toy_backends():
  seen = []

  @attention_backends.register('toy_taken')
  def toy_taken(call):
    seen.append(call)
    return jnp.zeros_like(call.q_BLHD) + 7.0

  @attention_backends.register('toy_declines')
  def toy_declines(call):
    raise attention_backends.NotTaken(f'it declines rows of {call.q_BLHD.shape[1]}')

  yield seen
  for name in ('toy_taken', 'toy_declines'):
    attention_backends._REGISTRY.pop(name)  # pylint: disable=protected-access


def test_a_registered_backend_serves_the_calls_and_a_declined_one_falls_back_with_the_reason(
    toy_backends, caplog):
  (q, k, v), kw = _call_args()
  with attention_backends.recording() as record:
    out = attention.attend(q, k, v, implementation='toy_taken', **kw)
    np.testing.assert_array_equal(out, 7.0)
    call = toy_backends[0]
    assert call.causal and call.packed and call.self_attention and call.scale == 16 ** -0.5
    with caplog.at_level(logging.WARNING):
      got = attention.attend(q, k, v, implementation='toy_declines', **kw)
    want = attention.attend(q, k, v, implementation='xla', **kw)
  np.testing.assert_array_equal(got, want)
  assert "attention='toy_declines' not taken: it declines rows of 8; using 'xla'" in caplog.text
  assert attention_backends.summarize(record) == [
      'toy_declines -> xla (it declines rows of 8): 1 traced call',
      'toy_taken: 1 traced call', 'xla: 1 traced call']


def test_the_config_accepts_registered_backends_and_names_the_known_ones(toy_backends):
  cfg = tiny_config('/unused', **{'model.attention': 'toy_taken'})
  config_lib.validate(cfg)
  cfg.model.attention = 'flash9'
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.attention='flash9' is not one of \('xla', .*'cpu'.*'toy_taken'"):
    config_lib.validate(cfg)


def test_off_gpu_cudnn_declines_naming_the_platform_and_the_model_imports_no_kernel_module():
  (q, k, v), kw = _call_args()
  with attention_backends.recording() as record:
    attention.attend(q, k, v, implementation='cudnn', **kw)
  assert record == [('cudnn', 'xla', f'it needs a GPU (backend is {jax.default_backend()})')]
  code = ('import sys; from pathways_jax.models import transformer, attention; '
          'print(sorted(m for m in sys.modules if m.startswith("kernels_")))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == '[]'


def _packed_rows(length=128):
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (2, length, 4, 16))
  k, v = (jax.random.normal(x, (2, length, 2, 16)) for x in ks[1:])
  seg = jnp.array([[1] * 50 + [2] * 60 + [0] * (length - 110), [3] * length])
  pos = jnp.array([list(range(50)) + list(range(60)) + list(range(length - 110)),
                   list(range(length))])
  return (q, k, v), seg, pos


@pytest.mark.parametrize('causal', [True, False])
def test_splash_in_the_interpreter_equals_xla_on_packed_rows_with_gradients(monkeypatch, causal):
  monkeypatch.setattr(attention_backends, 'SPLASH_INTERPRET_OFF_TPU', True)
  (q, k, v), seg, pos = _packed_rows()
  kw = dict(q_segment_BL=seg, kv_segment_BS=seg, q_positions_BL=pos, kv_positions_BS=pos,
            causal=causal)
  valid = (seg > 0)[:, :, None, None]  # padding queries: 'xla' averages every value, splash not

  def loss(impl):
    return lambda q, k, v: jnp.sum(
        jnp.where(valid, attention.attend(q, k, v, implementation=impl, **kw), 0.0) ** 2)

  with attention_backends.recording() as record:
    got = jax.value_and_grad(loss('splash'), argnums=(0, 1, 2))(q, k, v)
  assert ('splash', 'splash', '') in record
  want = jax.value_and_grad(loss('xla'), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, atol=3e-5)


def test_splash_declines_off_tpu_and_rows_it_cannot_tile_and_lowers_to_a_tpu_kernel(
    monkeypatch):
  (q, k, v), seg, pos = _packed_rows()
  kw = dict(q_segment_BL=seg, kv_segment_BS=seg, q_positions_BL=pos, kv_positions_BS=pos,
            causal=True)
  with attention_backends.recording() as record:
    attention.attend(q, k, v, implementation='splash', **kw)
    attention.attend(q[:, :100], k[:, :100], v[:, :100], implementation='splash',
                     **{**kw, **{n: a[:, :100] for n, a in kw.items() if n != 'causal'}})
  assert record[0] == ('splash', 'xla', f'it is a TPU kernel (backend is {jax.default_backend()})')
  from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  cfg = tiny_config('/unused', **{'model.attention': 'splash', 'model.max_len': 128})
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=64))
  tokens = jnp.zeros((2, 128), jnp.int32)
  params = model.init(jax.random.key(0), tokens, segment_ids_BL=seg)['params']
  # As if on a TPU: rows that do not tile still decline; the model's gradient lowered for TPU
  # from this CPU runs the attention as the Mosaic kernel.
  monkeypatch.setattr(attention_backends, '_platform', lambda: 'tpu')
  with attention_backends.recording() as record:
    attention.attend(q[:, :100], k[:, :100], v[:, :100], implementation='splash',
                     **{**kw, **{n: a[:, :100] for n, a in kw.items() if n != 'causal'}})
  assert record == [('splash', 'xla', 'rows of 100 tokens: splash tiles rows in blocks of 128')]
  grad = jax.jit(jax.grad(lambda p: model.apply({'params': p}, tokens, positions_BL=pos,
                                                segment_ids_BL=seg).sum()))
  text = jax.export.export(grad, platforms=['tpu'])(params).mlir_module()
  assert 'tpu_custom_call' in text
