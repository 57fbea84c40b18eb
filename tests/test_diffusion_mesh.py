"""The LLaDA sampler on a mesh (sampling.diffusion.DiffusionSampler / generate(mesh=, rules=)):
explicit shardings, and on 8 devices the tokens one device samples."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_on_fake_devices
from pathways_jax import parallel
from pathways_jax.config import ModelConfig, base_config
from pathways_jax.models.transformer import Transformer
from pathways_jax.sampling import diffusion as sd

MASK = 3
# 8 prompts of 4 tokens (a multiple of every data-parallel size below); every other row
# left-padded to 2 real tokens.
PROMPTS = np.array([[5 + i, 6, 7 + i % 3, 8] for i in range(8)], np.int32)
PROMPTS[1::2, :2] = 0
PROMPT_MASK = np.ones((8, 4), bool)
PROMPT_MASK[1::2, :2] = False
# Two setups, each as LLaDA uses it: sampled with guidance on padded prompts (no cache), and
# Fast-dLLM's dual cache with threshold decoding (greedy).
SETUPS = {
    'sampled_cfg_padded': dict(temperature=1.0, cfg_scale=1.0, prompt_mask_BP=PROMPT_MASK),
    'dual_cache_threshold': dict(cache='dual', threshold=0.6),
}


def _tiny():
  """A bidirectional model; params from numpy (no init compile), weights N(0, .5)."""
  cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                    mlp_dim=64, max_len=32, causal=False)
  model = Transformer(cfg)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                        jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, np.float32) if path[-1].key == 'scale'
                       else (0.5 * rng.standard_normal(x.shape)).astype(np.float32)), shapes)
  return model, params


def _kw(setup):
  return dict(mask_id=MASK, key=jax.random.key(2), gen_length=8, steps=8, block_length=4,
              return_stats=True, **SETUPS[setup])


def test_bad_calls_are_named_before_anything_compiles():
  model, params = _tiny()
  c = base_config()
  mesh, rules = parallel.make_mesh(c), parallel.logical_rules(c)
  sampler = sd.DiffusionSampler(model, mesh, rules, batch_size=8, prompt_len=4, mask_id=MASK,
                                gen_length=8, steps=8, block_length=4)
  with pytest.raises(ValueError, match=r'\(8, 3\), this sampler was built for .*\(8, 4\)'):
    sampler(params, PROMPTS[:, :3], key=jax.random.key(0))
  with pytest.raises(ValueError, match='prompt_mask_BP has shape'):
    sampler(params, PROMPTS, PROMPT_MASK[:, :3], key=jax.random.key(0))
  # generate's own checks hold on a mesh too.
  with pytest.raises(ValueError, match='not a multiple of block_length'):
    sd.generate(model, params, PROMPTS, mask_id=MASK, key=jax.random.key(0), gen_length=6,
                steps=6, block_length=4, mesh=mesh, rules=rules)
  plain = sd.DiffusionSampler(lambda p, t: model.apply({'params': p}, t), mesh, rules,
                              batch_size=8, prompt_len=4, mask_id=MASK, gen_length=8, steps=8,
                              block_length=4)
  with pytest.raises(ValueError, match='needs the Transformer module'):
    plain(params, PROMPTS, PROMPT_MASK, key=jax.random.key(0))


_SHARDED = '''
import json, sys
sys.path.insert(0, 'tests')
import jax, numpy as np
from pathways_jax import config as config_lib, parallel
from pathways_jax.sampling import diffusion as sd
from pathways_jax.train import frozen
import test_diffusion_mesh as t
model, params = t._tiny()
def mesh_and_rules(data, fsdp, tensor):
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return parallel.make_mesh(c), parallel.logical_rules(c)
for shape, setup in (((8, 1, 1), 'sampled_cfg_padded'), ((2, 2, 2), 'dual_cache_threshold')):
  one, one_stats = sd.generate(model, params, t.PROMPTS, **t._kw(setup))  # one device, no mesh
  mesh, rules = mesh_and_rules(*shape)
  # Params placed by the rules, as a training run holds them.
  p = jax.device_put(params, frozen.abstract_params_and_shardings(model, mesh, rules)[1])
  got, stats = sd.generate(model, p, t.PROMPTS, mesh=mesh, rules=rules, **t._kw(setup))
  print('RESULT', json.dumps(dict(
      shape=shape, setup=setup, devices=len(got.sharding.device_set),
      spec=[list(a) if isinstance(a, tuple) else a for a in got.sharding.spec],
      params_split=any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(p)),
      masks_left=int((np.asarray(got) == t.MASK).sum()),
      same_tokens=bool((np.asarray(got) == np.asarray(one)).all()),
      same_stats=all(bool((np.asarray(stats[k]) == np.asarray(one_stats[k])).all())
                     for k in one_stats))))
mesh, rules = mesh_and_rules(8, 1, 1)
try:
  sd.DiffusionSampler(model, mesh, rules, batch_size=4, prompt_len=4, mask_id=t.MASK,
                      gen_length=8, steps=8, block_length=4)
except ValueError as e:
  print('ERROR', e)
'''


def test_on_8_devices_it_samples_what_one_device_samples():
  """Rows split over data (8, 1, 1) and over data x fsdp with tensor-parallel params (2, 2, 2):
  the same tokens and commit steps as one device without a mesh."""
  out = run_on_fake_devices(_SHARDED, devices=8)
  results = [json.loads(line.split('RESULT ', 1)[1]) for line in out.splitlines()
             if line.startswith('RESULT ')]
  assert len(results) == 2, out[-3000:]
  for r in results:
    assert r['devices'] == 8 and r['spec'][0] == ['data', 'fsdp'], r
    assert r['masks_left'] == 0 and r['same_tokens'] and r['same_stats'], r
  assert results[1]['params_split'], results[1]  # fsdp x tensor: params split, not replicated
  assert "ERROR 4 prompts do not split over the 8 devices of the batch axes ('data', 'fsdp')" \
      in out, out[-3000:]
