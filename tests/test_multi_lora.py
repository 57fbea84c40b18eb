"""Multi-LoRA: K adapters on one base, each row naming its own. A mixed batch equals K separate
adapted models (checked against merged weights computed here), in the forward pass, in KV-cache
generation and in the gradients (adapter k learns only from its rows)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from pathways_jax.adapters import lora
from pathways_jax.config import ConfigError, ModelConfig, base_config, validate
from pathways_jax.models.transformer import Transformer
from pathways_jax.objectives import autoregressive as ar_loss
from pathways_jax.sampling import autoregressive

BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=48, max_len=64)
TOKENS = jax.random.randint(jax.random.key(5), (6, 16), 0, 64)
IDS = jnp.array([2, 0, 1, 0, 2, 1])
K = 3


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens_BL, ids_B=None):
  """model.apply, compiled once per model (eager op-by-op dispatch is what makes tests slow)."""
  return model.apply({'params': params}, tokens_BL, adapter_ids_B=ids_B)


def _trained(adapters, seed):
  """Adapters as after training: B nonzero, A moved off its init, different for every seed
  (numpy's generator: jax.random would compile a program per leaf shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), adapters)


@functools.lru_cache(maxsize=None)
def _base(cfg):
  return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), TOKENS)['params'])


_init = jax.jit(lora.init, static_argnums=2)


@functools.lru_cache(maxsize=None)
def _setup(targets='all-linear', scan_layers=False, k=K):
  cfg = BASE.replace(scan_layers=scan_layers)
  base = _base(cfg)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
  singles = [_trained(_init(jax.random.key(10 + i), base, lcfg), seed=20 + i) for i in range(k)]
  multi, mcfg = lora.stack(singles, [lcfg] * k)
  return cfg, base, lcfg, singles, multi, Transformer(mcfg.apply_to(cfg, num_adapters=k))


def _merged_by_hand(base, multi, k, scale):
  """W + scale * A_k @ B_k for every adapted weight, in float64 numpy from the multi tree
  (independent of lora.merge / lora.select): [(layers,) K, *in, r] and [(layers,) K, r, *out]."""
  flat = {'/'.join(p): np.asarray(v, np.float64)
          for p, v in jax.tree_util.tree_flatten_with_path(base)[0]
          for p in [tuple(str(e.key) for e in p)]}
  adapters = {'/'.join(str(e.key) for e in p): np.asarray(v, np.float64)
              for p, v in jax.tree_util.tree_flatten_with_path(multi)[0]}
  out = dict(flat)
  for path, a in adapters.items():
    if not path.endswith('_lora_a'):
      continue
    w_path = path[:-len('_lora_a')]
    b = adapters[w_path + '_lora_b']
    w = flat[w_path]
    if w_path.startswith('blocks/'):  # scanned: one merge per layer
      out[w_path] = np.stack([w[l] + scale * (a[l, k].reshape(-1, a.shape[-1]) @
                                              b[l, k].reshape(b.shape[2], -1)).reshape(w[l].shape)
                              for l in range(w.shape[0])])
    else:
      out[w_path] = w + scale * (a[k].reshape(-1, a.shape[-1]) @
                                 b[k].reshape(b.shape[1], -1)).reshape(w.shape)
  nested = {}
  for path, v in out.items():
    node = nested
    *parents, leaf = path.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jnp.asarray(v, jnp.float32)
  return nested


@pytest.mark.parametrize('targets,scan_layers', [('all-linear', False),
                                                 (r'attn/w[qo]|mlp/w_up', True)])
def test_a_mixed_batch_equals_each_adapters_merged_model(targets, scan_layers):
  cfg, base, lcfg, singles, multi, model = _setup(targets, scan_layers)
  # The model declares the layout lora.stack makes: A [(layers,) K, *in, r] and
  # B [(layers,) K, r, *out].
  own = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), TOKENS, adapter_ids_B=IDS))
  own = lora.split(own['params'])[1]
  assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(multi)
  assert [x.shape for x in jax.tree_util.tree_leaves(own)] == [
      x.shape for x in jax.tree_util.tree_leaves(multi)]
  base_logits = _apply(Transformer(cfg), base, TOKENS)
  got = _apply(model, lora.combine(base, multi), TOKENS, IDS)
  assert got.shape == (6, 16, 64)
  per_adapter = []
  for k in range(K):
    rows = np.flatnonzero(np.asarray(IDS) == k)
    by_hand = _merged_by_hand(base, multi, k, lcfg.scale)
    for x, y in zip(jax.tree_util.tree_leaves(lora.merge(base, lora.select(multi, k), lcfg)),
                    jax.tree_util.tree_leaves(by_hand)):  # merge, scanned layers included
      assert_close(x, y, terms=lcfg.rank)
    merged = _apply(Transformer(cfg), by_hand, TOKENS)
    per_adapter.append(merged)
    assert_close(got[rows], merged[rows], terms=cfg.mlp_dim)
    # The single-adapter model with lora.select(multi, k), unmerged: the same rows.
    single = _apply(Transformer(lcfg.apply_to(cfg)), lora.combine(base, lora.select(multi, k)),
                    TOKENS)
    assert_close(got[rows], single[rows], terms=cfg.mlp_dim)
  # It can fail: the adapters move the logits, and each other's rows apart.
  for k in range(K):
    assert float(jnp.abs(per_adapter[k] - base_logits).max()) > 0.05
    for j in range(k):
      assert float(jnp.abs(per_adapter[k] - per_adapter[j]).max()) > 0.05


def test_stack_and_select_round_trip_and_mixed_configs():
  _, base, lcfg, singles, multi, _ = _setup()
  assert lora.num_adapters(multi) == K and lora.num_adapters(singles[0]) == 1
  for k in range(K):  # one config: stacked unchanged
    for x, y in zip(jax.tree_util.tree_leaves(lora.select(multi, k)),
                    jax.tree_util.tree_leaves(singles[k])):
      np.testing.assert_array_equal(x, y)
  # Adapters of different rank, scaling and targets (as loaded from different PEFT dirs).
  cfgs = [lora.LoraConfig(rank=4, alpha=8.0, targets='attn/w[qv]'),
          lora.LoraConfig(rank=2, alpha=4.0, targets='mlp/.*', rslora=True),
          lora.LoraConfig(rank=3, alpha=3.0, targets='blocks_1/attn/wo')]
  mixed = [_trained(_init(jax.random.key(30 + i), base, c), seed=40 + i)
           for i, c in enumerate(cfgs)]
  stacked, mcfg = lora.stack(mixed, cfgs)
  assert mcfg.rank == 4 and mcfg.scale == 1.0
  model = Transformer(mcfg.apply_to(BASE, num_adapters=3))
  got = _apply(model, lora.combine(base, stacked), TOKENS, IDS)
  base_logits = _apply(Transformer(BASE), base, TOKENS)
  for k, c in enumerate(cfgs):
    rows = np.flatnonzero(np.asarray(IDS) == k)
    want = _apply(Transformer(BASE), lora.merge(base, mixed[k], c), TOKENS)  # adapter k alone
    assert_close(got[rows], want[rows], terms=BASE.mlp_dim)
    assert float(jnp.abs(want - base_logits).max()) > 0.05


def test_kv_cache_generation_of_a_mixed_batch_equals_each_adapter_alone():
  cfg, base, lcfg, _, multi, model = _setup()
  # One prompt for every row (left-padded on two), so rows differ only by their adapter.
  prompt_BP = jnp.tile(TOKENS[:1, :8], (6, 1))
  mask_BP = jnp.ones((6, 8), bool).at[1, :3].set(False).at[4, :2].set(False)
  kw = dict(key=jax.random.key(3), max_new_tokens=12, temperature=0.0, prompt_mask_BP=mask_BP)
  got = autoregressive.generate(model, lora.combine(base, multi), prompt_BP, adapter_ids_B=IDS,
                                **kw)
  alone = [autoregressive.generate(Transformer(lcfg.apply_to(cfg)),
                                   lora.combine(base, lora.select(multi, k)), prompt_BP, **kw)
           for k in range(K)]
  for k in range(K):
    rows = np.flatnonzero(np.asarray(IDS) == k)
    np.testing.assert_array_equal(got[rows], alone[k][rows])
  # Rows 0, 2 and 3 (adapters 2, 1, 0, unpadded) sample different continuations.
  assert len({tuple(np.asarray(got[r, 8:])) for r in (0, 2, 3)}) == 3


def test_each_adapter_learns_only_from_its_own_rows():
  """The training loss over a mixed batch: adapter k's gradient is the one adapter k's model
  gets from the rows naming k alone (times n_k / B: the loss is a mean over the batch's tokens);
  an adapter no row names gets exactly zero; changing other rows changes nothing of it."""
  cfg, base, lcfg, _, multi4, model = _setup(k=4)  # adapter 3: no row
  ids = IDS

  @functools.partial(jax.jit, static_argnums=0)
  @functools.partial(jax.grad, argnums=1)
  def grad(m, adapters, tokens, ids_B):
    logits = m.apply({'params': lora.combine(base, adapters)}, tokens, adapter_ids_B=ids_B)
    return ar_loss.loss(logits, tokens)[0]

  grads = grad(model, multi4, TOKENS, ids)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(lora.select(grads, 3)))
  other = jnp.where((ids != 1)[:, None], (TOKENS + 7) % 64, TOKENS)  # only adapter 1's rows kept
  grads_other = grad(model, multi4, other, ids)
  single = Transformer(lcfg.apply_to(cfg))
  for k in range(3):
    rows = np.flatnonzero(np.asarray(ids) == k)
    g_k = lora.select(grads, k)
    want = grad(single, lora.select(multi4, k), TOKENS[rows], None)
    for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(g_k), jax.tree_util.tree_leaves(want)):
      assert float(jnp.abs(want_leaf).max()) > 0
      assert_close(got_leaf, want_leaf * len(rows) / len(ids), terms=TOKENS.size)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(g_k), jax.tree_util.tree_leaves(lora.select(grads_other, k))))
    assert (moved == 0.0) == (k == 1), (k, moved)  # only adapter 1's rows were left unchanged


def test_bad_adapter_ids_and_settings_are_one_clear_error():
  cfg, base, lcfg, singles, multi, model = _setup()
  params = lora.combine(base, multi)
  apply = lambda ids, tokens=TOKENS: model.apply({'params': params}, tokens, adapter_ids_B=ids)
  with pytest.raises(ValueError, match=r'adapter_ids_B must be in \[0, 3\).*got \[-1, 3\]'):
    apply(jnp.array([0, 3, 1, -1, 2, 0]))
  with pytest.raises(ValueError, match=r'shape \[batch\] = \(6,\), got int32 of shape \(4,\)'):
    apply(jnp.array([0, 1, 2, 0]))
  with pytest.raises(ValueError, match='integers'):
    apply(jnp.zeros((6,)))
  with pytest.raises(ValueError, match='lora_num_adapters=3: pass adapter_ids_B'):
    apply(None)
  with pytest.raises(ValueError, match='needs a multi-adapter model'):
    Transformer(lcfg.apply_to(BASE)).apply({'params': lora.combine(base, singles[0])}, TOKENS,
                                           adapter_ids_B=IDS)
  prompt = TOKENS[:, :4]
  with pytest.raises(ValueError, match=r'must be in \[0, 3\)'):
    autoregressive.generate(model, params, prompt, key=jax.random.key(0), max_new_tokens=2,
                            adapter_ids_B=jnp.array([0, 1, 2, 3, 0, 0]))
  with pytest.raises(ValueError, match=r'shape \[batch\] = \(6,\)'):
    autoregressive.generate(model, params, prompt, key=jax.random.key(0), max_new_tokens=2,
                            adapter_ids_B=jnp.array([0, 1]))
  with pytest.raises(ValueError, match='needs the Transformer module'):
    autoregressive.generate(lambda p, t: model.apply({'params': p}, t, adapter_ids_B=IDS), params,
                            prompt, key=jax.random.key(0), max_new_tokens=2, adapter_ids_B=IDS)
  # Under jit, where ids cannot raise: an out-of-range row is NaN, the others are untouched.
  jitted = _apply(model, params, TOKENS, jnp.array([0, 1, 2, 7, 2, 1]))
  want = _apply(model, params, TOKENS, jnp.array([0, 1, 2, 0, 2, 1]))
  assert np.isnan(np.asarray(jitted[3])).all()
  rest = [0, 1, 2, 4, 5]
  assert_close(np.asarray(jitted)[rest], np.asarray(want)[rest], terms=BASE.mlp_dim)
  # Adapter trees and configs.
  with pytest.raises(ValueError, match='take one adapter; pick one .* lora.select'):
    lora.merge(base, multi, lcfg)
  with pytest.raises(ValueError, match=r'adapter 3 is not in \[0, 3\)'):
    lora.select(multi, 3)
  with pytest.raises(ValueError, match='holds one adapter'):
    lora.select(singles[0], 0)
  other = {**singles[1], 'blocks_0': {**singles[1]['blocks_0'], 'mlp': {
      **singles[1]['blocks_0']['mlp'], 'w_down_lora_a': jnp.zeros((40, 4))}}}  # another base
  with pytest.raises(ValueError, match=r'shape on blocks_0/mlp/w_down_lora_a: \[\(48, 4\), \(40'):
    lora.stack([singles[0], other], [lcfg] * 2)
  with pytest.raises(ValueError, match='>= 2 adapters and one LoraConfig each'):
    lora.stack(singles, [lcfg])
  with pytest.raises(ConfigError, match='lora_num_adapters=2 must be 1, or > 1 with model.lora_r'):
    BASE.replace(lora_num_adapters=2)
  run_cfg = base_config()  # a run trains K adapters on chat data (tests/test_multi_lora_training)
  run_cfg.data.vocab_size = 64
  run_cfg.model.lora_rank, run_cfg.model.lora_num_adapters = 4, 2
  with pytest.raises(ConfigError, match="each adapter on its own data: set config.data.corpus='c"):
    validate(run_cfg)
