"""Sharding checks that need 8 devices; tests/test_multihost.py runs this in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before JAX starts).

    python tests/sharding_worker.py OUT.json

Writes its measurements to OUT.json; the test asserts on them. One process for everything, so
the 2-core CI pays JAX's start-up once and each train step is compiled once per strategy.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from pathways_jax import config as config_lib
from pathways_jax import parallel, tasks
from pathways_jax.models.transformer import Transformer
from pathways_jax.train import checkpoint as ckpt_lib
from pathways_jax.train import optimizer, state as state_lib, step as step_lib

STEPS = 3
B, L, V = 8, 32, 64
STRATEGIES = {  # name -> mesh sizes over the 8 devices
    'dp': dict(data=-1),
    'fsdp': dict(data=1, fsdp=-1),
    'tp': dict(data=1, tensor=-1),
    'fsdp_tp': dict(data=1, fsdp=2, tensor=4),
}


def config(**mesh):
  c = config_lib.base_config()
  c.data.seq_len, c.data.batch_size = L, B
  c.model.update(d_model=32, num_layers=2, num_heads=8, num_kv_heads=8, mlp_dim=64, max_len=L,
                 vocab_size=V)
  c.train.update(lr=1e-2, warmup_steps=1, steps=10)
  c.mesh.update(mesh)
  return c


def batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS + 1):
    tokens = rng.integers(4, V, (B, L)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[:, -5:] = 0  # some padding: masks and token counts are part of the check
    out.append({'tokens': tokens, 'segment_ids': segments,
                'positions': np.tile(np.arange(L, dtype=np.int32), (B, 1))})
  return out


class Run:
  """A mesh, the state's shardings and the jitted step of one strategy."""

  def __init__(self, cfg, devices=None):
    self.mesh = parallel.make_mesh(cfg, devices)
    self.rules = parallel.logical_rules(cfg)
    self.model = Transformer(config_lib.ModelConfig.from_config(cfg.model))
    self.tx = optimizer.make_optimizer(cfg.train)
    self.abstract, self.shardings = state_lib.abstract_state_and_shardings(
        self.model, self.tx, np.zeros((B, L), np.int32), self.mesh, self.rules)
    self.fn = step_lib.jit_train_step(cfg, tasks.make(cfg, self.model), self.tx, self.shardings, self.mesh)
    self.state = None

  def init(self):
    self.state = state_lib.init_state(self.model, self.tx, np.zeros((B, L), np.int32),
                                      jax.random.key(0), self.mesh, self.rules)

  def step(self, batch):
    self.state, m = step_lib.run_with_rules(self.mesh, self.rules, self.fn, self.state,
                                            parallel.global_batch(batch, self.mesh))
    return float(m['loss'])

  def state_bytes_compiled(self):
    """Per-device argument bytes of the compiled step less the batch's: params + optimizer."""
    state_in = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract,
        self.shardings)
    batch_in = {k: jax.ShapeDtypeStruct((B, L), np.int32,
                                        sharding=parallel.batch_sharding(self.mesh))
                for k in ('tokens', 'segment_ids', 'positions')}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      compiled = self.fn.lower(state_in, batch_in).compile()
    batch_bytes = parallel.sharded_bytes(list(batch_in.values()),
                                         [v.sharding for v in batch_in.values()])
    return compiled.memory_analysis().argument_size_in_bytes - batch_bytes

  def shard_shape(self, *path):
    x = self.state.params
    for p in path:
      x = x[p]
    return list(x.addressable_shards[0].data.shape)


def max_abs_diff(a, b):
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                                 jax.device_get(a), jax.device_get(b))
  return max(jax.tree_util.tree_leaves(diffs))


def strategies_and_reshard(out):
  data = batches()
  ref = Run(config(), jax.devices()[:1])
  ref.init()
  initial = jax.device_get(ref.state)
  out['one_device'] = [ref.step(b) for b in data[:STEPS]]
  runs = {}
  out.update(losses={}, w_gate_shard={}, wq_shard={}, state_bytes={}, mesh={})
  for name, mesh in STRATEGIES.items():
    run = runs[name] = Run(config(**mesh))
    if name == 'fsdp_tp':  # initialised directly into its shardings, equal to the 1-device init
      run.init()
      out['sharded_init_max_diff'] = max_abs_diff(run.state.params, initial.params)
    else:
      run.state = jax.device_put(initial, run.shardings)
    out['losses'][name] = [run.step(b) for b in data[:STEPS]]
    out['w_gate_shard'][name] = run.shard_shape('blocks_0', 'mlp', 'w_gate')
    out['wq_shard'][name] = run.shard_shape('blocks_0', 'attn', 'wq')
    out['mesh'][name] = dict(run.mesh.shape)
    if name in ('dp', 'fsdp'):
      out['state_bytes'][name] = run.state_bytes_compiled()

  # Resharding restore: the FSDP=8 state after STEPS steps, saved, then restored onto
  # fsdp=2 x tensor=4 and onto one device; each takes the next step on the same batch.
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = ckpt_lib.Checkpointer(tmp, keep=1, async_save=False)
    ckpt.save(STEPS, runs['fsdp'].state)
    ckpt.wait()
    out['reshard'] = {'fsdp8': runs['fsdp'].step(data[STEPS])}
    for name, run in (('fsdp2_tp4', runs['fsdp_tp']), ('one_device', ref)):
      run.state = ckpt.restore(STEPS, run.abstract, run.shardings)
      out['reshard'][name + '_w_gate_shard'] = run.shard_shape('blocks_0', 'mlp', 'w_gate')
      out['reshard'][name + '_step'] = int(run.state.step)
      out['reshard'][name] = run.step(data[STEPS])
    ckpt.close()


def bad_inputs(out):
  """Each bad mesh input, through the real trainer: the ConfigError message (or 'no error')."""
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  cases = {
      'mesh_product': (dict(data=3, fsdp=2), B),
      'batch': (dict(data=1, fsdp=-1), 4),
      'rule_axis': (dict(rules=(('embed', 'model'),)), B),
      'dcn_slices': (dict(dcn_data=3), B),
  }
  out['errors'] = {}
  for name, (mesh, batch_size) in cases.items():
    cfg = config(**mesh)
    cfg.data.update(corpus='synthetic', tokenizer='byte', cache_dir=os.environ['CACHE'],
                    batch_size=batch_size)
    cfg.model.vocab_size = 0
    try:
      with tempfile.TemporaryDirectory() as tmp:
        loop.train(cfg, tmp, quiet=True)
      out['errors'][name] = 'no error'
    except config_lib.ConfigError as e:
      out['errors'][name] = str(e)


if __name__ == '__main__':
  result = {'devices': jax.device_count()}
  bad_inputs(result)
  strategies_and_reshard(result)
  with open(sys.argv[1], 'w') as f:
    json.dump(result, f, indent=1)
