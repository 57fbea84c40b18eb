"""Rollouts inside training (pathways_jax.sampling.rollout): G samples per prompt, the sampled
tokens' log-probs, early stop at EOS, and the same result on 8 devices as on one."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_on_fake_devices
from numerics import assert_close
from pathways_jax import parallel
from pathways_jax.config import ModelConfig, base_config
from pathways_jax.models.transformer import Transformer
from pathways_jax.sampling import autoregressive as ar_sampling
from pathways_jax.sampling import rollout as rollout_lib

# Prompts of 6 tokens, the second row left-padded to 4 real ones.
PROMPTS = np.array([[5, 9, 13, 7, 21, 30], [0, 0, 8, 8, 40, 3]], np.int32)
MASK = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], bool)


def _setup():
  cfg = ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=32, init_std=0.3)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(1), PROMPTS)['params'])
  c = base_config()
  return model, params, parallel.make_mesh(c), parallel.logical_rules(c)


def test_log_probs_are_those_of_a_teacher_forced_forward_of_the_same_tokens():
  model, params, mesh, rules = _setup()
  ro = rollout_lib.rollout(model, params, PROMPTS, MASK, key=jax.random.key(0), mesh=mesh,
                           rules=rules, num_samples=3, max_new_tokens=8, temperature=0.7)
  tokens, n = np.asarray(ro.tokens_BT), 8
  assert tokens.shape == (6, 14) and np.asarray(ro.logprobs_BN).shape == (6, 8)
  np.testing.assert_array_equal(tokens[:3, :6], np.repeat(PROMPTS[:1], 3, 0))  # G copies each
  assert len({tuple(r) for r in tokens[:3, 6:]}) > 1  # sampled, not copied
  assert np.asarray(ro.completion_mask_BN).all()  # no EOS given: every token generated
  # Teacher forcing: the whole sequence at once, the same left-pad layout; logits at t score t+1.
  mask = np.concatenate([np.repeat(MASK, 3, 0), np.ones((6, n), bool)], 1)
  seg, pos = ar_sampling.left_pad_layout(jnp.asarray(mask))
  logits = model.apply({'params': params}, jnp.asarray(tokens), positions_BL=pos,
                       segment_ids_BL=seg)
  logp = jax.nn.log_softmax(logits / 0.7)[:, 5:-1]
  want = np.take_along_axis(np.asarray(logp), tokens[:, 6:, None], -1)[..., 0]
  assert_close(ro.logprobs_BN, want, terms=model.cfg.vocab_size)


def test_it_stops_when_every_row_has_emitted_eos():
  """Greedy rows of one prompt are the same: with EOS = the token they emit third, every row is
  done after 3 steps, and the loop ends there instead of running to max_new_tokens."""
  model, params, mesh, rules = _setup()
  prompts = np.tile(PROMPTS[:1], (2, 1))
  kw = dict(key=jax.random.key(0), mesh=mesh, rules=rules, num_samples=2, max_new_tokens=10,
            temperature=0.0)
  greedy = rollout_lib.rollout(model, params, prompts, **kw)
  tokens = np.asarray(greedy.tokens_BT)
  assert int(greedy.steps) == 10 and (tokens == tokens[0]).all()
  eos = int(tokens[0, 8])
  e = int(np.argmax(tokens[0, 6:] == eos))  # its first occurrence (index 2, or earlier)
  stopped = rollout_lib.rollout(model, params, prompts, eos_id=eos, pad_id=0, **kw)
  assert int(stopped.steps) == e + 1 < 10
  got, gen = np.asarray(stopped.tokens_BT), np.asarray(stopped.completion_mask_BN)
  np.testing.assert_array_equal(got[:, :7 + e], tokens[:, :7 + e])  # the same up to EOS
  assert (got[:, 7 + e:] == 0).all() and gen[:, :e + 1].all() and not gen[:, e + 1:].any()
  assert (np.asarray(stopped.logprobs_BN)[:, e + 1:] == 0).all()


def test_bad_shapes_are_named():
  model, params, mesh, rules = _setup()
  with pytest.raises(ValueError, match='exceeds model.max_len=32'):
    rollout_lib.rollout(model, params, PROMPTS, MASK, key=jax.random.key(0), mesh=mesh,
                        rules=rules, max_new_tokens=30)
  sampler = rollout_lib.RolloutSampler(model, mesh, rules, batch_size=2, prompt_len=6,
                                       max_new_tokens=4)
  with pytest.raises(ValueError, match=r'shape \(2, 5\), this sampler was built for \(2, 6\)'):
    sampler(params, PROMPTS[:, :5], key=jax.random.key(0))


def test_a_mixed_adapter_batch_rolls_out_as_each_adapter_alone():
  """Multi-LoRA: prompt b sampled with adapter ids_B[b] (greedy, G = 2) gives the tokens and
  log-probs a rollout of adapter ids_B[b] alone gives it (every prompt on that adapter: the same
  program, so one compilation; that one adapter's rows equal its own one-adapter model's is
  tests/test_multi_lora.py's)."""
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  base_model, base, mesh, rules = _setup()
  cfg = base_model.cfg.replace(lora_rank=4, lora_num_adapters=2)
  ids = np.array([1, 0], np.int32)
  rng = np.random.default_rng(0)  # adapters as after training (B off zero), each its own
  shapes = lora.split(nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), PROMPTS,
                                              adapter_ids_B=ids)['params']))[1]
  adapters = jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
  kw = dict(key=jax.random.key(0), mesh=mesh, rules=rules, num_samples=2, max_new_tokens=6,
            temperature=0.0)
  params = lora.combine(base, adapters)
  mixed = rollout_lib.rollout(Transformer(cfg), params, PROMPTS, MASK, adapter_ids_B=ids, **kw)
  alone = [rollout_lib.rollout(Transformer(cfg), params, PROMPTS, MASK,
                               adapter_ids_B=np.full(2, k, np.int32), **kw) for k in (0, 1)]
  for b, k in enumerate(ids):
    rows = slice(2 * b, 2 * b + 2)  # prompt b's G samples
    np.testing.assert_array_equal(mixed.tokens_BT[rows], alone[k].tokens_BT[rows])
    assert_close(mixed.logprobs_BN[rows], alone[k].logprobs_BN[rows], terms=cfg.vocab_size)
  # It can fail: the adapters give prompt 0 different continuations.
  assert (np.asarray(alone[0].tokens_BT[:2]) != np.asarray(alone[1].tokens_BT[:2])).any()
  with pytest.raises(ValueError, match='lora_num_adapters=2: pass adapter_ids_B'):
    rollout_lib.rollout(Transformer(cfg), params, PROMPTS, MASK, **kw)


_SHARDED = '''
import json, sys
sys.path.insert(0, 'tests')
import jax, numpy as np
from pathways_jax import config as config_lib, parallel
from pathways_jax.sampling import rollout as rollout_lib
import test_rollout as t
model, params, _, _ = t._setup()
def run(data, fsdp, tensor):
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  rules = parallel.logical_rules(c)
  if data * fsdp * tensor == 1:  # one of the 8 devices
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ('data', 'fsdp', 'tensor'))
  else:
    mesh = parallel.make_mesh(c)
  if data * fsdp * tensor > 1:  # params placed by the rules, as a training run holds them
    from pathways_jax.train import frozen
    _, sh = frozen.abstract_params_and_shardings(model, mesh, rules)
    p = jax.device_put(params, sh)
  else:
    p = params
  ro = rollout_lib.rollout(model, p, np.tile(t.PROMPTS, (4, 1)), np.tile(t.MASK, (4, 1)),
                           key=jax.random.key(3), mesh=mesh, rules=rules, num_samples=2,
                           max_new_tokens=8, temperature=1.0, top_k=20)
  k = ro.tokens_BT
  return ro, len(k.sharding.device_set), str(k.sharding.spec)
one, _, _ = run(1, 1, 1)
for shape in ((8, 1, 1), (2, 2, 2)):
  ro, devices, spec = run(*shape)
  print('RESULT', json.dumps(dict(shape=shape, devices=devices, spec=spec,
        same_tokens=bool((np.asarray(ro.tokens_BT) == np.asarray(one.tokens_BT)).all()),
        logprob_diff=float(np.abs(np.asarray(ro.logprobs_BN) - np.asarray(one.logprobs_BN)).max()),
        logprob_scale=float(np.abs(np.asarray(one.logprobs_BN)).max()))))
'''


def test_on_8_devices_it_samples_what_one_device_samples():
  from numerics import tolerance  # pylint: disable=g-import-not-at-top
  out = run_on_fake_devices(_SHARDED, devices=8)
  results = [json.loads(line.split('RESULT ', 1)[1]) for line in out.splitlines()
             if line.startswith('RESULT ')]
  assert len(results) == 2, out[-3000:]
  for r in results:
    assert r['devices'] == 8 and r['same_tokens'], r
    assert r['logprob_diff'] <= tolerance(r['logprob_scale'], terms=48), r
