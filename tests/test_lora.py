"""LoRA adapters: the adapted model starts as its base, merge == adapted, only adapters train."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from numerics import assert_close
from pathways_jax.adapters import lora
from pathways_jax.config import ConfigError, ModelConfig
from pathways_jax.models.transformer import Transformer

BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=48, max_len=64)
TOKENS = jax.random.randint(jax.random.key(5), (2, 16), 0, 64)


def _base_params():
  return nn.unbox(Transformer(BASE).init(jax.random.key(0), TOKENS)['params'])


def _random_b(adapters, seed=1):
  """Adapters with non-zero B (as after training), so that merge has something to merge."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [0.1 * jax.random.normal(k, x.shape) if 'lora_b' in jax.tree_util.keystr(p) else x
         for k, (p, x) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(tree, out)


@pytest.mark.parametrize('targets', ['all-linear', r'attn/w[qkvo]', r'blocks_1/mlp/w_down'])
def test_the_adapted_model_starts_as_its_base_and_merges_exactly(targets):
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
  base = _base_params()
  adapters = lora.init(jax.random.key(2), base, lcfg)
  adapted = Transformer(lcfg.apply_to(BASE))
  # The model creates the same adapter params, in the same places, as lora.init.
  own = nn.unbox(adapted.init(jax.random.key(0), TOKENS)['params'])
  assert jax.tree_util.tree_structure(lora.split(own)[1]) == jax.tree_util.tree_structure(adapters)
  want = Transformer(BASE).apply({'params': base}, TOKENS)
  got = adapted.apply({'params': lora.combine(base, adapters)}, TOKENS)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # B = 0: exactly the base
  trained = _random_b(adapters)
  got = adapted.apply({'params': lora.combine(base, trained)}, TOKENS)
  merged = Transformer(BASE).apply({'params': lora.merge(base, trained, lcfg)}, TOKENS)
  assert float(jnp.max(jnp.abs(got - want))) > 1e-3  # the adapters do something
  assert float(jnp.max(jnp.abs(merged - got))) <= 1e-5
  back = lora.unmerge(lora.merge(base, trained, lcfg), trained, lcfg)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(base)):
    assert_close(a, b, terms=4)


def test_targets_scale_and_bad_settings():
  base = _base_params()
  assert lora.target_paths(base, lora.LoraConfig(targets='mlp/.*')) == [
      f'blocks_{i}/mlp/{w}' for i in range(2) for w in ('w_down', 'w_gate', 'w_up')]
  assert len(lora.target_paths(base, lora.LoraConfig())) == 14
  assert lora.LoraConfig(rank=4, alpha=8.0).scale == 2.0
  assert lora.LoraConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0
  with pytest.raises(ConfigError, match=r"match no dense weight; candidates: \['blocks_0/attn/wk'"):
    lora.target_paths(base, lora.LoraConfig(targets='attn/wz'))
  with pytest.raises(ConfigError, match='rank'):
    lora.LoraConfig(rank=0)
  # A (A x) B: the adapter on wq is [embed, r] then [r, heads, head_dim].
  a = lora.init(jax.random.key(0), base, lora.LoraConfig(rank=3))['blocks_0']['attn']
  assert a['wq_lora_a'].shape == (32, 3) and a['wq_lora_b'].shape == (3, 4, 8)
  assert a['wo_lora_a'].shape == (4, 8, 3) and a['wo_lora_b'].shape == (3, 32)


def test_a_lora_run_trains_only_the_adapters_from_a_pretrained_run(tmp_path):
  from pathways_jax import sample
  from pathways_jax.train import loop
  cache = str(tmp_path / 'cache')
  loop.train(tiny_config(cache, **{'train.steps': 4, 'sample.prompts': ()}), str(tmp_path / 'pre'),
             quiet=True)
  _, _, pre, _ = sample.load_run(str(tmp_path / 'pre'))
  cfg = tiny_config(cache, **{'train.init_from': str(tmp_path / 'pre'), 'model.lora_rank': 4,
                              'model.lora_targets': 'attn/w[qv]', 'train.steps': 6,
                              'train.lr': 1e-2, 'sample.prompts': ()})
  res = loop.train(cfg, str(tmp_path / 'lora'), quiet=True)
  n = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))
  assert res['trainable_params'] == 2 * 2 * (32 * 4 + 4 * 32) // 2 + 2 * (32 * 4 + 4 * 16)
  assert res['params'] == n(pre) + res['trainable_params']
  _, model, tuned, _ = sample.load_run(str(tmp_path / 'lora'))
  base, adapters = lora.split(tuned)
  for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(pre)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base is untouched
  assert any(float(jnp.abs(x).max()) > 0 for p, x in jax.tree_util.tree_leaves_with_path(adapters)
             if 'lora_b' in jax.tree_util.keystr(p))  # B moved off zero
  saved = json.loads((tmp_path / 'lora' / 'config.json').read_text())
  assert saved['model']['lora_rank'] == 4
