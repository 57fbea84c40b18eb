"""The fused unembedding + cross-entropy in the tasks' losses (pathways_jax/tasks/lm_head.py):
the same loss, metrics and gradients as the logits path, for every task that takes it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import packed_rows_with_padding, tiny_config
from pathways_jax import config as config_lib
from pathways_jax import tasks
from pathways_jax.models.transformer import Transformer
from pathways_jax.tasks import lm_head

VOCAB = 261  # 4 chunks of 64 and a tail of 5: both loop paths of the kernel


def _task(name, mode, **overrides):
  causal = name in ('autoregressive', 'sft')
  cfg = tiny_config('/unused', task=name, objective='autoregressive' if causal else 'diffusion',
                    **{'model.causal': causal, 'train.cross_entropy': mode,
                       'train.cross_entropy_chunk': 64, 'data.mask_id': 3, **overrides})
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=VOCAB))
  return tasks.make(cfg, model), model


def _batch():
  tokens, pos, seg = packed_rows_with_padding(VOCAB)
  tokens = jnp.where(tokens == 3, 4, tokens)  # no mask ids in the data
  return {'tokens': tokens, 'positions': pos, 'segment_ids': seg,
          'loss_mask': (pos > 5).astype(jnp.int32), 'prompt': (pos < 8).astype(jnp.int32)}


@pytest.mark.parametrize('name,overrides', [
    ('autoregressive', {'train.z_loss': 1e-3}),
    ('diffusion', {}),
    ('sft', {}),
    ('llada_sft', {'llada_sft.sft_fraction': 0.5}),
])
def test_the_fused_path_gives_the_logits_path_loss_metrics_and_gradients(name, overrides):
  plain, model = _task(name, 'logits', **overrides)
  fused, _ = _task(name, 'fused', **overrides)
  assert not lm_head.fused(plain.cfg, model.cfg) and lm_head.fused(fused.cfg, model.cfg)
  batch = _batch()
  params = model.init(jax.random.key(0), batch['tokens'])['params']
  key = jax.random.key(1)

  def run(task):
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: task.loss(p, batch, key), has_aux=True)(params)
    return loss, metrics, grads

  want, got = run(plain), run(fused)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
  assert set(got[1]) == set(want[1])
  for k in want[1]:
    np.testing.assert_allclose(got[1][k], want[1][k], rtol=2e-6, atol=1e-7, err_msg=k)
  flat_want, flat_got = jax.tree.leaves(want[2]), jax.tree.leaves(got[2])
  for w, g in zip(flat_want, flat_got):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-7)
  assert any(float(jnp.abs(w).max()) > 0 for w in flat_want)


def test_auto_fuses_large_vocabularies_and_a_quantised_base_is_refused():
  cfg = tiny_config('/unused')
  small = config_lib.ModelConfig.from_config(cfg.model, vocab_size=32767)
  large = small.replace(vocab_size=lm_head.FUSED_FROM_VOCAB)
  assert cfg.train.cross_entropy == 'auto'
  assert not lm_head.fused(cfg, small) and lm_head.fused(cfg, large)
  cfg.model.lora_quantize = 'int8'
  assert not lm_head.fused(cfg, large)  # auto: the quantised unembedding stays on the plain path
  cfg.train.cross_entropy = 'fused'
  with pytest.raises(config_lib.ConfigError, match='quantised'):
    lm_head.fused(cfg, large)
  cfg.train.cross_entropy = 'chunked'
  with pytest.raises(config_lib.ConfigError, match=r"train.cross_entropy='chunked'"):
    config_lib.validate(cfg)
