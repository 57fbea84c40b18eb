"""A QLoRA run's start (train/loop.py, adapters/qlora.py): `train.init_from`'s base lands
quantised one weight at a time, is saved quantised (4-bit values in bytes), resumes exactly, and
loads as the model it trained; a run saved with a float base (before bases were stored
quantised) still resumes. Skipped where qwix is not installed."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip('qwix', reason='QLoRA needs qwix: pip install -e ".[qlora]"')
# pylint: disable=g-import-not-at-top,multiple-import,wrong-import-position

from flax import traverse_util
import flax.linen as nn
import jax.numpy as jnp

from helpers import REPO, assert_resume_is_exact, logged_losses, run_stopped_at, tiny_config
from pathways_jax import config as config_lib, parallel
from pathways_jax import sample
from pathways_jax.adapters import qlora
from pathways_jax.interop import hf
from pathways_jax.interop.hf import checkpoint as hf_checkpoint
from pathways_jax.models.transformer import Transformer
from pathways_jax.train import checkpoint as ckpt_lib, frozen, loop

QUANT = {'model.lora_rank': 4, 'model.lora_quantize': 'nf4', 'model.lora_quantize_block': 16,
         'train.steps': 8, 'train.checkpoint_every': 2, 'train.lr': 1e-2, 'sample.prompts': ()}


def _byte_tokenizer():
  """The benchmark's byte-level tokenizer.json (no merges): the base directory's tokenizer."""
  import sys
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import qlora_startup
  return qlora_startup.byte_level_tokenizer()


@pytest.fixture(scope='module')
def hf_base(tmp_path_factory):
  """A random base as a HuggingFace directory (float32 safetensors and its tokenizer)."""
  d = tmp_path_factory.mktemp('qlora_base')
  tok = _byte_tokenizer()
  cfg = tiny_config(str(d / 'cache'), **{'model.init_std': 0.2})
  mcfg = config_lib.ModelConfig.from_config(cfg.model,
                                            vocab_size=config_lib.round_vocab(tok.vocab_size))
  params = nn.unbox(jax.jit(Transformer(mcfg).init)(jax.random.key(1),
                                                     jnp.zeros((1, 8), jnp.int32))['params'])
  return hf.save_pretrained(params, mcfg, str(d / 'hf'), tokenizer=tok), params


def _make(tmp_path, base, **fixed):
  return lambda **kw: tiny_config(str(tmp_path / 'cache'),
                                  **{**QUANT, 'train.init_from': base, **fixed, **kw})


def _leaves(tree):
  flat = traverse_util.flatten_dict(tree)
  return {'/'.join(p): x for p, x in flat.items()}


def _metadata(path):
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree


@pytest.mark.parametrize('scan', [False, True])
def test_the_base_lands_and_is_saved_quantised_and_loads_as_trained(tmp_path, hf_base, scan):
  """From a HF directory (unscanned), into an unscanned run or a scan_layers one (its layers
  stacked as they load: the stacked QArrays are the per-layer ones)."""
  base, float_params = hf_base
  make = _make(tmp_path, base, **{'model.scan_layers': scan, 'model.remat': 'full'})
  run = str(tmp_path / 'run')
  res = loop.train(make(**{'train.steps': 2}), run, quiet=True)
  assert res['qlora']['dense_weights'] == (7 if scan else 14)  # a stack is one weight
  # On disk: each dense weight as a QArray (4-bit values in a byte), no float copy of it.
  meta = _leaves(_metadata(os.path.join(run, ckpt_lib.FROZEN_PARAMS)))
  dense = [p for p in meta if p.endswith('/qvalue')]
  assert len(dense) == (7 if scan else 14) and all(meta[p].dtype == np.uint8 for p in dense)
  assert not any(p.endswith(('/wq', '/w_up')) for p in meta)
  # Streamed one weight at a time, the base is the whole float tree quantised in one program.
  want = qlora.quantize_base(float_params, qlora.run_quant_config(make()))
  cfg = make()
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  fm = frozen.load(run, mesh, rules, keep_quantized=True)
  assert fm.model_cfg.scan_layers == scan
  held = hf_checkpoint.unscanned(fm.params, fm.model_cfg)
  got_q, want_q = _leaves(held), _leaves(want)
  assert sorted(qlora.quantized_paths(held)) == sorted(qlora.quantized_paths(want))
  for path in qlora.quantized_paths(want):
    assert got_q[path].qvalue.dtype == jnp.uint4
    np.testing.assert_array_equal(np.asarray(got_q[path].qvalue, np.uint8),
                                  np.asarray(want_q[path].qvalue, np.uint8))
    np.testing.assert_array_equal(np.asarray(got_q[path].scale), np.asarray(want_q[path].scale))
  # Loaded as a plain frozen model: the dequantised base, in the model's param dtype.
  fm = frozen.load(run, mesh, rules)
  plain = _leaves(hf_checkpoint.unscanned(fm.params, fm.model_cfg))
  deq = _leaves(qlora.dequantize_base(want))
  for path in qlora.quantized_paths(want):
    assert plain[path].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(plain[path]), np.asarray(deq[path]))
  np.testing.assert_array_equal(np.asarray(plain['embed']), np.asarray(float_params['embed']))
  # Exported merged: the adapters on the dequantised base (the model the run trained).
  from pathways_jax.adapters import lora
  from pathways_jax.interop.hf import run_dir
  merged = lora.merge(*lora.split(hf_checkpoint.unscanned(fm.params, fm.model_cfg)),
                      lora.LoraConfig.of(fm.model_cfg))
  exported = _leaves(hf.load_pretrained(run_dir.export_run(run, str(tmp_path / 'hf_out')))[0])
  for path, x in _leaves(merged).items():
    np.testing.assert_allclose(np.asarray(exported[path]), np.asarray(x), rtol=0, atol=0)
  # Sampling takes the quantised model the run trained.
  _, model, params, _ = sample.load_run(run)
  assert len(qlora.quantized_paths(params)) == (7 if scan else 14)
  tokens = jnp.arange(16, dtype=jnp.int32)[None] % 200 + 4
  logits = model.apply({'params': params}, tokens)
  assert np.isfinite(np.asarray(logits)).all()
  # A quantised base whose run config no longer says how it was quantised: named, not guessed.
  with open(os.path.join(run, 'config.json')) as f:
    run_cfg = json.load(f)
  run_cfg['model']['lora_quantize'] = ''
  with open(os.path.join(run, 'config.json'), 'w') as f:
    json.dump(run_cfg, f)
  with pytest.raises(ckpt_lib.CheckpointError, match='holds a quantised base, but .*config.json '
                     'sets no model.lora_quantize'):
    frozen.load(run, mesh, rules)


def test_a_qlora_run_resumes_exactly(tmp_path, hf_base):
  """SIGTERM at step 3, a clean stop at 6, the rest: the uninterrupted run's losses."""
  make = _make(tmp_path, hf_base[0])
  assert_resume_is_exact(lambda **kw: make(**kw), tmp_path, sigterm_at=3, stop_at=6)


def test_a_run_saved_with_a_float_base_resumes_to_the_same_losses(tmp_path, hf_base):
  """A QLoRA run directory from before bases were saved quantised holds the float base: resumed,
  it quantises it and logs what the uninterrupted run logs."""
  base, float_params = hf_base
  make = _make(tmp_path, base)
  full, old = str(tmp_path / 'full'), str(tmp_path / 'old')
  loop.train(make(**{'train.steps': 4}), full, quiet=True)
  run_stopped_at(full, old, 2)
  shutil.rmtree(os.path.join(old, ckpt_lib.FROZEN_PARAMS))
  ckpt_lib.save_frozen_params(old, float_params)  # the float base, as older runs saved it
  assert not frozen.holds_quantized_base(old) and frozen.holds_quantized_base(full)
  assert loop.train(make(**{'train.steps': 4}), old, quiet=True)['step'] == 4
  want, got = logged_losses(full), logged_losses(old)
  assert sorted(want) == [1, 2, 3, 4] and got == want, (got, want)


def test_a_lora_run_stacks_a_float_base_for_scan_layers(tmp_path, hf_base):
  """The float (LoRA) base stacked as it loads: the scanned run computes the unscanned one's
  losses (the same model and batches; scan only changes how XLA orders the float sums)."""
  make = _make(tmp_path, hf_base[0], **{'model.lora_quantize': '', 'train.steps': 2})
  flat_run, scan_run = str(tmp_path / 'flat'), str(tmp_path / 'scan')
  loop.train(make(), flat_run, quiet=True)
  loop.train(make(**{'model.scan_layers': True}), scan_run, quiet=True)
  want, got = logged_losses(flat_run), logged_losses(scan_run)
  assert sorted(got) == [1, 2] and got == pytest.approx(want, rel=1e-5, abs=0)
  cfg = make(**{'model.scan_layers': True})
  fm = frozen.load(scan_run, parallel.make_mesh(cfg), parallel.logical_rules(cfg))
  assert fm.model_cfg.scan_layers and fm.params['blocks']['attn']['wq'].shape[0] == 2


@pytest.mark.parametrize('qtype', qlora.QTYPES)
def test_the_loader_quantiser_slices_a_weight_and_gives_the_whole_weights_qarray(qtype,
                                                                                 monkeypatch):
  """LeafQuantizer quantises large weights in slices of their output axis (NF4's level search
  would otherwise hold 16 floats a value); slices of 64 values give, bit for bit, what
  quantize_base gives the whole tree at once: unscanned and stacked weights, every kind."""
  monkeypatch.setattr(qlora, '_CHUNK_VALUES', 64)
  qlora._quantize_one.cache_clear()  # pylint: disable=protected-access
  qcfg = qlora.QuantConfig(qtype=qtype, block_size=16)
  for scan in (False, True):
    mcfg = config_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                                  num_kv_heads=1, mlp_dim=48, max_len=16, scan_layers=scan)
    params = nn.unbox(Transformer(mcfg).init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))[
        'params'])
    want, flat = _leaves(qlora.quantize_base(params, qcfg)), _leaves(params)
    quantize = qlora.LeafQuantizer(qcfg)
    got = {p: quantize(tuple(p.split('/')), x) for p, x in flat.items()}
    assert sorted(qlora.quantized_paths(traverse_util.unflatten_dict(
        {tuple(p.split('/')): x for p, x in got.items()}))) == sorted(
            p for p, x in want.items() if qlora.is_quantized(x))
    for path, x in want.items():
      if qlora.is_quantized(x):
        assert got[path].qvalue.dtype == x.qvalue.dtype
        np.testing.assert_array_equal(np.asarray(got[path].qvalue, np.int32),
                                      np.asarray(x.qvalue, np.int32))
        np.testing.assert_array_equal(np.asarray(got[path].scale), np.asarray(x.scale))
      else:
        assert got[path] is flat[path]  # not a target: passed through
  qlora._quantize_one.cache_clear()  # pylint: disable=protected-access


def test_the_dry_run_of_a_qlora_config_takes_the_source_and_holds_the_base_quantised(tmp_path,
                                                                                     hf_base):
  """The dry run reads train.init_from's architecture (metadata only: the config's own model
  section says otherwise), trains the adapters alone (a LoRA run's default) and counts the
  frozen base quantised: NF4 a byte a value plus a float32 scale per 16 values, against float32
  for the plain LoRA dry run of the same base."""
  from helpers import run_on_fake_devices

  def dry(quant):  # a process each: the fake devices are set before JAX starts
    out = run_on_fake_devices(f"""
import json, sys
sys.path.insert(0, 'tests')
from helpers import tiny_config
from pathways_jax import dry_run
cfg = tiny_config({str(tmp_path / 'cache')!r}, **{{
    'train.init_from': {hf_base[0]!r}, 'model.d_model': 8, 'model.num_layers': 5,
    'model.lora_rank': 4, 'model.lora_quantize': {quant!r}, 'model.lora_quantize_block': 16,
    'data.batch_size': 2}})
r = dry_run.run(cfg, num_devices=2, out=lambda line: None)
print('REPORT', json.dumps({{'quant': {quant!r}, 'state': r['state_bytes_per_device'],
                           'params': r['params'], 'd': cfg.model.d_model,
                           'layers': cfg.model.num_layers}}))
""", devices=2)
    lines = [l for l in out.splitlines() if l.startswith('REPORT ')]
    assert lines, out[-3000:]
    return json.loads(lines[0].split('REPORT ', 1)[1])

  reports = {q: dry(q) for q in ('', 'nf4')}
  assert {(r['d'], r['layers']) for r in reports.values()} == {(32, 2)}
  # Adam's two moments for the adapters only: all params trained would be 3x the params' bytes.
  assert reports['']['state'] < 1.5 * 4 * reports['']['params']
  dense = 2 * (3 * 32 * 64 + 2 * 32 * 32 + 2 * 32 * 16)  # w_gate/up/down, wq/wo, wk/wv (kv 1)
  saved = reports['']['state'] - reports['nf4']['state']  # both replicated on the 2 devices
  assert saved == pytest.approx(dense * (4 - 1 - 4 / 16), rel=1e-6)


def test_a_sharded_qlora_start_computes_the_one_device_run(tmp_path, hf_base):
  """On 2 fake devices with fsdp=2, each QArray's qvalue is sharded as its weight is (its scale
  too, but along the blocked axis), and the run logs the one-device run's losses."""
  from helpers import run_on_fake_devices
  make = _make(tmp_path, hf_base[0], **{'model.lora_quantize': 'int8', 'train.steps': 2})
  one = str(tmp_path / 'one')
  loop.train(make(), one, quiet=True)
  out = run_on_fake_devices(f"""
import json, sys
sys.path.insert(0, 'tests')
from helpers import tiny_config
from pathways_jax.train import loop
cfg = tiny_config({str(tmp_path / 'cache')!r}, **{json.dumps(
    {**QUANT, 'train.init_from': hf_base[0], 'model.lora_quantize': 'int8', 'train.steps': 2,
     'mesh.fsdp': 2, 'mesh.data': 1, 'sample.prompts': []})})
loop.train(cfg, {str(tmp_path / 'two')!r}, quiet=True)
from pathways_jax import parallel
from pathways_jax.train import frozen
fm = frozen.load({str(tmp_path / 'two')!r}, parallel.make_mesh(cfg), parallel.logical_rules(cfg),
                 keep_quantized=True)
q = fm.params['blocks_0']['mlp']['w_up']
print('SPECS', json.dumps([str(q.qvalue.sharding.spec), str(q.scale.sharding.spec)]))
""", devices=2)
  specs = [l for l in out.splitlines() if l.startswith('SPECS ')]
  assert specs, out[-3000:]
  qvalue_spec, scale_spec = json.loads(specs[0].split(' ', 1)[1])
  assert 'fsdp' in qvalue_spec, (qvalue_spec, scale_spec)
  want, got = logged_losses(one), logged_losses(str(tmp_path / 'two'))
  assert sorted(got) == [1, 2] and got == pytest.approx(want, rel=1e-5, abs=0)


def test_a_block_size_that_does_not_divide_a_weight_is_named_before_anything_is_saved(
    tmp_path, hf_base):
  make = _make(tmp_path, hf_base[0], **{'model.lora_quantize_block': 24})
  with pytest.raises(config_lib.ConfigError,
                     match=r'block_size=24 does not divide the input axis \(32\) of blocks_0/'):
    loop.train(make(), str(tmp_path / 'run'), quiet=True)
  assert not os.path.exists(os.path.join(tmp_path, 'run', ckpt_lib.FROZEN_PARAMS))


@pytest.mark.parametrize('quantize', ['nf4', ''])
def test_the_heap_is_trimmed_once_the_frozen_base_is_saved(tmp_path, hf_base, monkeypatch,
                                                            quantize):
  """orbax's save of the frozen base leaves its freed write buffers in other threads' malloc
  arenas; the trainer hands them back before the first step compiles (LoRA and QLoRA starts;
  the peak it saves is in benchmarks/RESULTS.md), and not on resume, which saves nothing."""
  from pathways_jax import host_memory
  run = str(tmp_path / 'run')
  seen = []
  monkeypatch.setattr(host_memory, 'trim_after_bulk_io', lambda: seen.append(
      os.path.isdir(os.path.join(run, ckpt_lib.FROZEN_PARAMS))))
  make = _make(tmp_path, hf_base[0], **{'model.lora_quantize': quantize})
  loop.train(make(**{'train.stop_at': 2}), run, quiet=True)
  assert seen == [True]  # once, after the save finished
  loop.train(make(**{'train.stop_at': 4}), run, quiet=True)
  assert seen == [True]


def test_the_startup_benchmark_refuses_an_unknown_qtype_before_measuring():
  """A typo in --qtypes is named at once, not after the minutes the other arms take."""
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'qlora_startup.py'),
                         '--qtypes=int8,fp4'], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "--qtypes='int8,fp4': each must be one of int8, int4, nf4" in proc.stderr
