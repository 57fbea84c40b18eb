"""Training a subset of the params (config.train.trainable, pathways_jax.train.trainable)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import tiny_config
from pathways_jax import config as config_lib
from pathways_jax import config_files
from pathways_jax import parallel, tasks
from pathways_jax.models.transformer import Transformer
from pathways_jax.train import checkpoint as ckpt_lib
from pathways_jax.train import frozen, loop, optimizer, state as state_lib, step as step_lib
from pathways_jax.train import trainable


def _params():
  model = Transformer(config_lib.ModelConfig(vocab_size=48, d_model=16, num_layers=2, num_heads=2,
                                             num_kv_heads=1, mlp_dim=32, max_len=16))
  return nn.unbox(model.init(jax.random.key(0), np.zeros((1, 4), np.int32))['params'])


def test_split_and_merge_by_path_pattern():
  params = _params()
  assert 'blocks_0/attn/wq' in trainable.param_paths(params)
  train, rest = trainable.split(params, r'blocks_\d/attn/w[qv]|final_norm/.*')
  assert trainable.param_paths(train) == ['blocks_0/attn/wq', 'blocks_0/attn/wv',
                                          'blocks_1/attn/wq', 'blocks_1/attn/wv',
                                          'final_norm/scale']
  assert 'blocks_0/attn/wk' in trainable.param_paths(rest)
  merged = trainable.merge(train, rest)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), merged, params)


def test_a_pattern_that_matches_nothing_lists_the_paths():
  with pytest.raises(config_lib.ConfigError, match=r"trainable='lora/.\*' matches no parameter; "
                                                   r"the paths are: .*blocks_0/attn/wk"):
    trainable.split(_params(), 'lora/.*')
  with pytest.raises(config_lib.ConfigError, match='is not a regular expression'):
    trainable.split(_params(), 'attn/(')
  # One mistyped alternative of several is named, not silently left frozen.
  with pytest.raises(config_lib.ConfigError, match=r"its alternative 'embed/embedding' matches no "
                                                   r"parameter; the paths are: .*\bembed\b"):
    trainable.split(_params(), r'final_norm/.*|embed/embedding')
  assert trainable.alternatives(r'a|(b|c)|[|]|x\|y|[]|]') == ['a', '(b|c)', '[|]', r'x\|y', '[]|]']


def _compiled(cfg, model, pattern):
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  tx = optimizer.make_optimizer(cfg.train)
  example = np.zeros((cfg.data.batch_size, cfg.data.seq_len), np.int32)
  abstract, shardings, fa, fsh = state_lib.split_state_and_shardings(model, tx, example, mesh,
                                                                     rules, pattern)
  shapes = lambda t, s: jax.tree_util.tree_map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s)
  args, input_shardings = step_lib.step_inputs(None, None if fa is None else shapes(fa, fsh), fsh)
  fn = step_lib.jit_train_step(cfg, tasks.make(cfg, model), tx, shardings, mesh, input_shardings)
  batch = tasks.make(cfg, model).batch_spec(*example.shape, parallel.batch_sharding(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = fn.lower(shapes(abstract, shardings), batch, *args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  frozen_bytes = 0 if fa is None else sum(x.size * x.dtype.itemsize
                                          for x in jax.tree_util.tree_leaves(fa))
  return compiled.memory_analysis(), float(cost['flops']), frozen_bytes


def test_frozen_params_get_no_optimizer_state_and_no_gradient_in_the_compiled_step():
  """Compiled memory analysis against full training: the frozen params' AdamW moments are not
  arguments, their gradients are never in temporary memory, and the backward pass stops at the
  trained final norm (about the forward's FLOPs)."""
  cfg = tiny_config('/unused', **{'model.d_model': 128, 'model.mlp_dim': 512})
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=264))
  full, full_flops, _ = _compiled(cfg, model, '')
  subset, subset_flops, frozen_bytes = _compiled(cfg, model, 'final_norm/scale')
  assert frozen_bytes > 2e6  # 0.5M frozen params
  # Full training's arguments are params + two moments; the subset's, the frozen params once.
  assert subset.argument_size_in_bytes <= full.argument_size_in_bytes - 2 * frozen_bytes + 1e4
  assert full.temp_size_in_bytes - subset.temp_size_in_bytes >= frozen_bytes
  assert subset_flops < 0.5 * full_flops, (subset_flops, full_flops)


def test_training_only_the_final_norm_changes_nothing_else_bit_for_bit(tmp_path):
  cache, run = str(tmp_path / 'cache'), tmp_path / 'run'
  over = {'train.trainable': 'final_norm/scale', 'train.steps': 4}
  loop.train(tiny_config(cache, **over, **{'train.stop_at': 2}), str(run), quiet=True)
  res = loop.train(tiny_config(cache, **over), str(run), quiet=True)  # resumes: frozen restored
  assert res['step'] == 4 and res['trainable_params'] == 32 < res['params']
  # Checkpoints hold the trained subset only; the frozen params are stored once beside them.
  state_dir = run / 'checkpoints' / '4' / 'state'
  assert frozen._saved_param_shapes(str(state_dir)) == {'final_norm/scale': (32,)}  # pylint: disable=protected-access
  assert (run / ckpt_lib.FROZEN_PARAMS).is_dir()
  cfg = config_files.load_run_config(str(run))
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  trained = frozen.load(str(run), mesh, rules).params
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=264))
  tx = optimizer.make_optimizer(cfg.train)
  example = np.zeros((cfg.data.batch_size, cfg.data.seq_len), np.int32)
  initial = state_lib.init_state(model, tx, example, jax.random.key(cfg.seed), mesh, rules).params
  changed, same = trainable.split(trained, 'final_norm/scale')
  before_changed, before_same = trainable.split(initial, 'final_norm/scale')
  jax.tree_util.tree_map(np.testing.assert_array_equal, same, before_same)
  assert not np.array_equal(changed['final_norm']['scale'], before_changed['final_norm']['scale'])


def test_a_subset_and_growth_together_are_refused():
  cfg = tiny_config('/unused', **{'train.trainable': 'final_norm/scale',
                                  'growth.depth_factor': 2, 'growth.at_step': 2})
  with pytest.raises(config_lib.ConfigError, match='trainable.*growth'):
    config_lib.validate(cfg)
