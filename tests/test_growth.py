"""Growth operators: function preservation, layer placement, optimizer moments, errors, sharding."""
import functools
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import run_on_fake_devices
from numerics import assert_close, assert_trees_close
from pathways_jax import growth
from pathways_jax.config import ModelConfig
from pathways_jax.models.transformer import Transformer

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 6)), jnp.int32)


def small_cfg(**kw):
  # GQA (4 heads sharing 2 kv heads); a large init_std so the logits are far from trivial.
  base = dict(vocab_size=16, d_model=8, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=12,
              max_len=16, init_std=0.3)
  base.update(kw)
  return ModelConfig(**base)


@functools.lru_cache(maxsize=None)
def init(cfg, seed=0):
  """(unboxed params, the same boxed like model.init's) with N(0, init_std) weights and
  trained-looking norm scales 1 + 0.5 N(0, 1) (all-ones scales would hide a wrong norm mapping).

  Drawn as one flat normal: XLA:CPU compiles the model's own per-leaf init far more slowly.
  """
  abstract = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), TOKENS))['params']
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))
  sizes = [x.size for _, x in leaves]
  flat = np.random.default_rng(seed).standard_normal(sum(sizes)).astype(np.float32)
  out = []
  for (path, x), chunk in zip(leaves, np.split(flat, np.cumsum(sizes)[:-1])):
    chunk = chunk.reshape(x.shape)
    out.append(jnp.asarray(1 + 0.5 * chunk if 'scale' in str(path) else cfg.init_std * chunk))
  params = jax.tree_util.tree_unflatten(treedef, out)
  boxed = jax.tree_util.tree_map(lambda box, v: box.replace_boxed(v), abstract, params,
                                 is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  return params, boxed


# Test programs are tiny; XLA's backend optimisations cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})

_CFG_KEYS = ('depth_factor', 'width_factor', 'heads_factor', 'mlp_factor', 'method',
             'width_method')


def jgrow(params, cfg, key=None, **kw):
  """growth.grow under jit (one compile instead of many eager ops; the code path is the same)."""
  new_cfg = growth.grow_config(cfg, **{k: v for k, v in kw.items() if k in _CFG_KEYS})
  grown = jit(lambda p, k: growth.grow(p, cfg, key=k, **kw)[0])(params, key)
  return grown, new_cfg


def grow_with_logits(params, cfg, key=None, **kw):
  """(small logits, grown params, grown logits, new_cfg), all in one compile."""
  new_cfg = growth.grow_config(cfg, **{k: v for k, v in kw.items() if k in _CFG_KEYS})
  def f(p, k):
    grown = growth.grow(p, cfg, key=k, **kw)[0]
    return (Transformer(cfg).apply({'params': p}, TOKENS), grown,
            Transformer(new_cfg).apply({'params': grown}, TOKENS))
  return (*jit(f)(params, key), new_cfg)


def block(params, cfg, i):
  if cfg.scan_layers:
    return jax.tree_util.tree_map(lambda x: x[i], params['blocks'])
  return params[f'blocks_{i}']


def assert_trees_equal(a, b):
  """Copies are exact: growth moves and tiles values, it does not recompute them."""
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def shapes(tree):
  return jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)


def assert_matches_model(params, cfg):
  want = nn.unbox(jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), TOKENS)))
  assert shapes(params) == shapes(want['params'])


@pytest.mark.parametrize('scan,tied,width_method', [(False, True, 'direct'), (True, False, 'zero')])
def test_zero_depth_and_width_growth_preserve_the_function(scan, tied, width_method):
  cfg = small_cfg(scan_layers=scan, tie_embeddings=tied)
  params, _ = init(cfg)
  ref, grown, out, new_cfg = grow_with_logits(params, cfg, depth_factor=2, width_factor=2,
                                              method='zero', width_method=width_method,
                                              key=jax.random.key(1))
  assert (new_cfg.num_layers, new_cfg.d_model, new_cfg.num_heads, new_cfg.num_kv_heads,
          new_cfg.mlp_dim, new_cfg.dim_per_head) == (4, 16, 8, 4, 24, cfg.dim_per_head)
  assert_matches_model(grown, new_cfg)
  assert_close(out, ref, terms=new_cfg.mlp_dim)  # the widest contraction of the grown model
  assert new_cfg.norm_eps == (cfg.norm_eps / 2 if width_method == 'zero' else cfg.norm_eps)
  for j in (1, 3):  # the identity blocks' output projections
    assert not np.asarray(block(grown, new_cfg, j)['mlp']['w_down']).any()


def test_direct_width_variants_preserve_the_function():
  # Untied, uneven (noisy) split, width 3 on d_model and mlp, heads kept (allowed: head_dim is
  # explicit).
  cfg = small_cfg(head_dim=4, d_model=8, num_heads=2, num_kv_heads=1, tie_embeddings=False)
  params, _ = init(cfg)
  ref, grown, out, new_cfg = grow_with_logits(params, cfg, width_factor=3, heads_factor=1,
                                              split_noise=0.3, key=jax.random.key(2))
  assert (new_cfg.d_model, new_cfg.num_heads, new_cfg.mlp_dim) == (24, 2, 36)
  assert_close(out, ref, terms=new_cfg.mlp_dim)
  w_down = grown['blocks_0']['mlp']['w_down']
  np.testing.assert_array_equal(w_down[:, :8], w_down[:, 8:16])  # fan-out copies
  wg = grown['blocks_0']['mlp']['w_gate']
  assert not np.allclose(wg[:8], wg[8:16])  # uneven fan-in split, summing to the original
  assert_close(wg[:8] + wg[8:16] + wg[16:], np.tile(params['blocks_0']['mlp']['w_gate'], (1, 3)),
               terms=3)


@pytest.mark.parametrize('scan', [False, True])
def test_stack_and_interleave_place_the_right_layer(scan):
  cfg = small_cfg(scan_layers=scan, num_layers=3)
  params, _ = init(cfg)
  new_cfg = growth.grow_config(cfg, depth_factor=2)
  assert new_cfg.num_layers == 6 and new_cfg.scan_layers == scan
  def f(p, key):
    return ([growth.grow(p, cfg, depth_factor=2, method=m)[0] for m in ('stack', 'interleave')]
            + [growth.grow(p, cfg, depth_factor=2, method='zero', noise=0.2, key=key)[0]])
  stack, interleave, noisy = jit(f)(params, jax.random.key(5))
  for grown, want in zip((stack, interleave), ([0, 1, 2, 0, 1, 2], [0, 0, 1, 1, 2, 2])):
    assert_matches_model(grown, new_cfg)
    for j, i in enumerate(want):
      assert_trees_equal(block(grown, new_cfg, j), block(params, cfg, i))
    for name in ('embed', 'final_norm'):
      assert_trees_equal(grown[name], params[name])
  # Multiplicative noise: relative size ~0.2 on matrices, norms untouched, zeros stay zero.
  assert_trees_equal(block(noisy, new_cfg, 2)['mlp_norm'], block(params, cfg, 1)['mlp_norm'])
  assert not np.asarray(block(noisy, new_cfg, 3)['attn']['wo']).any()
  ratio = block(noisy, new_cfg, 2)['attn']['wq'] / block(params, cfg, 1)['attn']['wq'] - 1
  assert 0.1 < float(jnp.std(ratio)) < 0.3


def test_random_depth_keeps_sources_and_initialises_new_blocks():
  cfg = small_cfg(init_std=0.02)
  params, _ = init(cfg)
  grown, new_cfg = jgrow(params, cfg, depth_factor=3, method='random', key=jax.random.key(3))
  assert_matches_model(grown, new_cfg)
  for j in range(6):
    b = block(grown, new_cfg, j)
    if j % 3 == 0:
      assert_trees_equal(b, block(params, cfg, j // 3))
    else:
      np.testing.assert_array_equal(b['attn_norm']['scale'], 1.0)
      std_out = 0.02 / (2 * 6) ** 0.5
      assert 0.5 * std_out < float(jnp.std(b['mlp']['w_down'])) < 2 * std_out
      assert 0.01 < float(jnp.std(b['attn']['wq'])) < 0.04


def _loss(cfg, p):
  lg = Transformer(cfg).apply({'params': p}, TOKENS)
  return optax.softmax_cross_entropy_with_integer_labels(lg[:, :-1], TOKENS[:, 1:]).mean()


def test_width_moments_follow_the_grown_models_gradients():
  """Small grads mapped as Adam moments = the grown model's grads ('direct': everywhere;
  'zero': on the old entries; the new entries' moments are 0). Tied: the final norm takes the 1/w
  and its gradient is not divided. Scanned, 1 layer: a small program to compile."""
  cfg = small_cfg(scan_layers=True, num_layers=1)
  params, _ = init(cfg)
  methods = ('direct', 'zero')
  new_cfg = growth.grow_config(cfg, width_factor=2)

  def f(p, key):
    loss_small, g_small = jax.value_and_grad(lambda q: _loss(cfg, q))(p)
    state = (optax.ScaleByAdamState(count=jnp.asarray(7), mu=g_small,
                                    nu=jax.tree_util.tree_map(jnp.square, g_small)),
             optax.EmptyState())
    out = []
    for m in methods:
      grown, c = growth.grow(p, cfg, width_factor=2, width_method=m, key=key)
      loss_big, g_big = jax.value_and_grad(lambda q: _loss(c, q))(grown)
      out.append((loss_big, g_big, growth.grow_opt_state(state, cfg, width_factor=2,
                                                         width_method=m)[0]))
    return loss_small, g_small, out

  loss_small, g_small, out = jit(f)(params, jax.random.key(4))
  (loss_d, g_d, mapped_d), (loss_z, g_z, mapped_z) = out
  # The grown model sums over twice the width: its contractions are the longest reductions.
  terms = 2 * max(cfg.d_model, cfg.mlp_dim, TOKENS.size)
  assert_close(loss_d, loss_small, terms=terms)
  assert_close(loss_z, loss_small, terms=terms)
  assert int(mapped_d.count) == int(mapped_z.count) == 7
  # Gradients on the scale of the largest one: some leaves are near zero in this tiny model.
  scale = max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(g_d))
  assert_trees_close(mapped_d.mu, g_d, terms=terms, scale=scale)
  # |g^2 - h^2| = |g - h| |g + h| <= |g - h| 2 scale.
  assert_trees_close(mapped_d.nu, jax.tree_util.tree_map(jnp.square, g_d), terms=terms,
                     scale=2 * scale ** 2)

  def check_zero(mu, nu, gb, gs):
    old = tuple(slice(0, s) for s in gs.shape)
    assert_close(mu[old], gb[old], terms=terms, scale=scale)
    assert_close(nu[old], np.square(gb[old]), terms=terms, scale=2 * scale ** 2)
    assert np.count_nonzero(mu) <= gs.size
  jax.tree_util.tree_map(check_zero, mapped_z.mu, mapped_z.nu, g_z, g_small)
  assert new_cfg.d_model == 16


def test_grown_adam_state():
  cfg = small_cfg(scan_layers=True)
  params, _ = init(cfg)
  opt = optax.adamw(1e-3)
  kw = dict(depth_factor=2, width_factor=2)
  def f(p):
    # Any gradient will do (the model is not needed): one Adam step on grads = 0.1 * params.
    _, state = opt.update(jax.tree_util.tree_map(lambda x: 0.1 * x, p), opt.init(p), p)
    return state, [growth.grow_opt_state(state, cfg, method=m, **kw) for m in ('stack', 'zero')]
  state, grown_states = jit(f)(params)
  grown = jax.eval_shape(lambda p: growth.grow(p, cfg, **kw)[0], params)
  want = jax.eval_shape(opt.init, grown)
  adam_old = state[0]
  for method, new_state in zip(('stack', 'zero'), grown_states):
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(want)
    assert shapes(new_state) == shapes(want)
    adam = new_state[0]
    assert int(adam.count) == int(adam_old.count) == 1
    # Fan-out copies: mu / 2, nu / 4 (w = 2); layers as the params; new 'zero' blocks fresh.
    mu, old_mu = adam.mu['blocks']['mlp']['w_down'], adam_old.mu['blocks']['mlp']['w_down']
    nu, old_nu = adam.nu['blocks']['mlp']['w_down'], adam_old.nu['blocks']['mlp']['w_down']
    src = [0, 1, 0, 1] if method == 'stack' else [0, 0, 1, 1]
    for j, i in enumerate(src):
      if method == 'zero' and j % 2:
        assert not np.asarray(mu[j]).any() and not np.asarray(nu[j]).any()
        continue
      # Halving and quartering are exact in floating point.
      np.testing.assert_array_equal(mu[j], np.tile(old_mu[i], (2, 2)) / 2)
      np.testing.assert_array_equal(nu[j], np.tile(old_nu[i], (2, 2)) / 4)
  fresh = jax.eval_shape(lambda s, g: growth.grow_opt_state(s, cfg, mode='fresh', optimizer=opt,
                                                            new_params=g), state, grown)
  assert shapes(fresh) == shapes(want)
  with pytest.raises(ValueError, match='optimizer'):
    growth.grow_opt_state(state, cfg, mode='fresh')


def test_bad_requests_give_clear_errors():
  cfg = small_cfg()
  params, boxed = init(cfg)
  # Traced only (eval_shape): the errors come before any computation.
  trace = lambda c, **kw: jax.eval_shape(lambda p: growth.grow(p, c, **kw)[0], params)
  cases = [
      (dict(depth_factor=0), 'depth_factor must be >= 1'),
      (dict(width_factor=1.5), 'width_factor must be an integer'),
      (dict(depth_factor=True), 'depth_factor must be an integer'),
      (dict(width_factor=2, heads_factor=1), 'head_dim'),
      (dict(method='learn', depth_factor=2), 'not implemented'),
      (dict(method='nope'), 'not one of'),
      (dict(width_method='nope'), 'not one of'),
      (dict(depth_factor=2, method='random'), 'key='),
      (dict(width_factor=2, width_method='zero'), 'key='),
  ]
  for kwargs, msg in cases:
    with pytest.raises(ValueError, match=msg):
      trace(cfg, **kwargs)
  with pytest.raises(ValueError, match='scan'):
    trace(cfg.replace(scan_layers=True), depth_factor=2)
  with pytest.raises(ValueError, match='tie_embeddings'):
    trace(cfg.replace(tie_embeddings=False), depth_factor=2)
  with pytest.raises(ValueError, match='shape'):
    trace(cfg.replace(d_model=16, num_heads=8, num_kv_heads=4), depth_factor=2)
  # Integral floats are fine; boxed params wrapped in {'params': ...} come back wrapped, unboxed.
  out = jit(lambda p: growth.grow(p, cfg, depth_factor=2.0)[0])({'params': boxed})
  assert growth.grow_config(cfg, depth_factor=2.0).num_layers == 4
  assert_trees_equal(out['params']['blocks_2'], params['blocks_0'])


def test_gstack_plan_matches_the_paper():
  llama2 = growth.gstack_plan(7e9, target_tokens=2e12)
  assert abs(llama2['small_tokens'] / 11.11e9 - 1) < 0.01
  llama3 = growth.gstack_plan(8e9, 6 * 8e9 * 15e12, target_layers=32)
  assert abs(llama3['small_tokens'] / 6.58e9 - 1) < 0.01
  assert llama3['small_params'] == 2e9 and llama3['small_layers'] == 8
  with pytest.raises(ValueError, match='growth_factor'):
    growth.gstack_plan(7e9, 1e22, growth_factor=0)
  with pytest.raises(ValueError, match='divisible'):
    growth.gstack_plan(7e9, 1e22, target_layers=30)


_SHARDED = textwrap.dedent('''
  import numpy as np, jax, jax.numpy as jnp, flax.linen as nn
  from pathways_jax import growth, parallel
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  import functools
  jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
  assert len(jax.devices()) == 8
  # The project's default logical-axis rules on a data x fsdp x tensor = 2 x 2 x 2 mesh.
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = parallel.DEFAULT_RULES
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (4, 6)), jnp.int32)
  cfg = ModelConfig(vocab_size=16, d_model=8, num_layers=2, num_heads=2, num_kv_heads=2,
                    mlp_dim=8, max_len=16, init_std=0.3, tie_embeddings=False)
  abstract = lambda c: jax.eval_shape(lambda: Transformer(c).init(jax.random.key(0), tokens))['params']
  shardings = lambda c: nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract(c)), mesh, rules)
  rng = np.random.default_rng(0)  # norms ~ 1 + N(0, .3^2), weights ~ N(0, .3^2), placed sharded
  params = jax.tree_util.tree_map(
      lambda a, s: jax.device_put(rng.normal(a.ndim == 1, 0.3, a.shape).astype(np.float32), s),
      nn.unbox(abstract(cfg)), shardings(cfg))
  assert params['blocks_0']['mlp']['w_up'].sharding.shard_shape((8, 8)) == (4, 4)
  def apply(c, p):
    with nn.logical_axis_rules(rules):
      return jit(lambda p: Transformer(c).apply({'params': p}, tokens))(p)
  ref = apply(cfg, params)
  new_cfg = growth.grow_config(cfg, depth_factor=2, width_factor=2, method='zero')
  new_sh = shardings(new_cfg)
  grown = jit(lambda p: growth.grow(p, cfg, depth_factor=2, width_factor=2, method='zero')[0],
              out_shardings=new_sh)(params)
  wq = grown['blocks_3']['attn']['wq']
  assert wq.sharding.spec == new_sh['blocks_3']['attn']['wq'].spec, wq.sharding
  assert len(wq.sharding.device_set) == 8 and wq.sharding.shard_shape(wq.shape) == (8, 2, 4)
  import sys; sys.path.insert(0, 'tests')
  from numerics import assert_close
  assert_close(apply(new_cfg, grown), ref, terms=new_cfg.mlp_dim)
  print('SHARDED_OK')
''')


def test_growth_under_fsdp_and_tensor_sharding():
  out = run_on_fake_devices(_SHARDED)
  assert 'SHARDED_OK' in out, out
