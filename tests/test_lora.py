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


# ---------------------------------------------------------------------------------- dropout

def _with_b(cfg, seed=1):
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), TOKENS)['params'])
  base, adapters = lora.split(params)
  return lora.combine(base, _random_b(adapters, seed))


def test_dropout_only_where_a_dropout_rng_is_given():
  cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.3).apply_to(BASE)
  params = _with_b(cfg)
  no_dropout = Transformer(cfg.replace(lora_dropout=0.0))
  det = no_dropout.apply({'params': params}, TOKENS)
  rngs = lambda seed: {'dropout': jax.random.key(seed)}
  # Dropout 0: an rng changes nothing.
  np.testing.assert_array_equal(no_dropout.apply({'params': params}, TOKENS, rngs=rngs(1)), det)
  model = Transformer(cfg)
  # Without the rng (evaluation, sampling): the model without dropout, bit for bit.
  np.testing.assert_array_equal(model.apply({'params': params}, TOKENS), det)
  one, two = (model.apply({'params': params}, TOKENS, rngs=rngs(s)) for s in (1, 2))
  assert float(jnp.abs(one - det).max()) > 1e-2 and float(jnp.abs(one - two).max()) > 1e-2
  np.testing.assert_array_equal(model.apply({'params': params}, TOKENS, rngs=rngs(1)), one)
  scanned = Transformer(cfg.replace(scan_layers=True))  # each layer its own mask
  p_scan = nn.unbox(scanned.init(jax.random.key(0), TOKENS)['params'])
  a, b = (scanned.apply({'params': _random_b(p_scan)}, TOKENS, rngs=rngs(s)) for s in (1, 2))
  assert float(jnp.abs(a - b).max()) > 1e-2


def test_dropout_is_on_the_adapter_input_in_closed_form():
  """A = B = identity on one MLP's down projection (rank = its width, scale 1): its output is
  hidden @ W_down + mask * hidden / (1 - p), the mask recovered element by element."""
  p = 0.25
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    mlp_dim=32, max_len=64, lora_rank=32, lora_alpha=32.0,
                    lora_targets='mlp/w_down', lora_dropout=p)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), TOKENS)['params'])
  mlp = dict(params['blocks_0']['mlp'], w_down_lora_a=jnp.eye(32), w_down_lora_b=jnp.eye(32))
  params = {**params, 'blocks_0': {**params['blocks_0'], 'mlp': mlp}}

  def parts(rngs):
    _, state = model.apply({'params': params}, TOKENS, rngs=rngs, capture_intermediates=True,
                           mutable=['intermediates'])
    inter = state['intermediates']['blocks_0']
    h = np.asarray(inter['mlp_norm']['__call__'][0], np.float64)
    hidden = (lambda g: g / (1 + np.exp(-g)))(h @ mlp['w_gate']) * (h @ mlp['w_up'])
    out = np.asarray(inter['mlp']['__call__'][0], np.float64)
    return hidden, out - hidden @ np.asarray(mlp['w_down'], np.float64)

  hidden, delta = parts({})
  np.testing.assert_allclose(delta, hidden, atol=1e-5)  # no rng: x @ A @ B, nothing dropped
  masks = []
  for seed in (1, 2):
    hidden, delta = parts({'dropout': jax.random.key(seed)})
    big = np.abs(hidden) > 1e-2
    ratio = (delta * (1 - p) / np.where(big, hidden, 1))[big]
    mask = np.round(ratio)
    assert set(np.unique(mask)) == {0.0, 1.0} and np.abs(ratio - mask).max() < 1e-3
    masks.append(mask)
    n, dropped = mask.size, float((mask == 0).sum())
    assert abs(dropped - p * n) < 4 * (n * p * (1 - p)) ** 0.5, (dropped, n)
  assert (masks[0] != masks[1]).any()


def test_the_train_step_drops_and_evaluation_does_not():
  from helpers import tiny_config
  from pathways_jax import tasks
  from pathways_jax.train import step as step_lib
  run_cfg = tiny_config('/unused', **{'model.lora_rank': 4, 'model.lora_dropout': 0.5})
  cfg = ModelConfig.from_config(run_cfg.model, vocab_size=64)
  assert lora.LoraConfig.of(cfg).dropout == 0.5
  params = _with_b(cfg)
  tokens = np.asarray(TOKENS)
  batch = {'tokens': tokens, 'segment_ids': np.ones_like(tokens),
           'positions': np.tile(np.arange(16, dtype=np.int32), (2, 1))}
  task, plain = (tasks.make(run_cfg, Transformer(c)) for c in (cfg, cfg.replace(lora_dropout=0)))
  assert step_lib.training_task(plain, jax.random.key(0)) is plain  # same step as before
  key = jax.random.key(3)
  want = float(plain.loss(params, batch, key)[0])
  train = lambda k: float(step_lib.training_task(task, k).loss(params, batch, key)[0])
  assert len({want, train(jax.random.key(1)), train(jax.random.key(2))}) == 3
  assert train(jax.random.key(1)) == train(jax.random.key(1))
  run_cfg.model.lora_dropout = 0.5
  got = step_lib.eval_step(params, batch, cfg=run_cfg, task=task)['loss']
  assert float(got) == float(step_lib.eval_step(params, batch, cfg=run_cfg, task=plain)['loss'])
  with pytest.raises(ConfigError, match='dropout'):
    lora.LoraConfig(dropout=1.0)
  with pytest.raises(ConfigError, match='lora_dropout'):
    BASE.replace(lora_dropout=-0.1)


def test_lora_targets_that_match_nothing_list_the_candidates_before_a_run_starts():
  from helpers import tiny_config
  from pathways_jax.train import loop
  cfg = BASE.replace(lora_rank=4, lora_targets='attn/wz')
  with pytest.raises(ConfigError, match=r"lora_targets='attn/wz' matches no dense weight; "
                     r"candidates: \['blocks_0/attn/wq'"):
    lora.model_target_paths(cfg)
  assert lora.model_target_paths(cfg.replace(lora_targets='mlp/w_up', scan_layers=True)) == [
      'blocks/mlp/w_up']
  run = tiny_config('/unused', **{'model.lora_rank': 4, 'model.lora_targets': 'ffn/.*',
                                  'data.tokenizer': 'byte'})
  with pytest.raises(ConfigError, match='model.lora_targets'):  # not train.trainable's message
    loop.build(run)
