"""Multi-LoRA and QLoRA as trainer settings: a run with model.lora_num_adapters = K trains K
adapters on one frozen base, each on its own chat data (rows packed per adapter, a batch naming
each row's adapter); model.lora_quantize holds that base quantised by qwix. Data, the gradient
each adapter gets, an exact resume of a K = 2 QLoRA run, sampling and export of one adapter, and
the settings that cannot run."""
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import logged_losses, run_stopped_at, tiny_config
from numerics import assert_close
from pathways_jax import config as config_lib
from pathways_jax import tasks
from pathways_jax.adapters import lora
from pathways_jax.data import sft, tokenizers
from pathways_jax.data.corpora import DataError
from pathways_jax.models.transformer import Transformer

JOBS = ('painter', 'baker')  # adapter k's answers: what makes its rows recognisable
HAS_QWIX = importlib.util.find_spec('qwix') is not None


def _write(path, records):
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  return str(path)


def _conv(i, job, **extra):
  return {'messages': [{'role': 'user', 'content': f'Who is P{i}?'},
                       {'role': 'assistant', 'content': f'P{i} is a {job}.'}], **extra}


@pytest.fixture(scope='module')
def chat_files(tmp_path_factory):
  """One JSONL per adapter, and the same conversations in one file with "adapter": k."""
  d = tmp_path_factory.mktemp('multi_chat')
  files = [_write(d / f'adapter{k}.jsonl', [_conv(i, job) for i in range(40)])
           for k, job in enumerate(JOBS)]
  one = _write(d / 'both.jsonl', [_conv(i, job, adapter=k) for k, job in enumerate(JOBS)
                                  for i in range(40)])
  return files, one, d


def _cfg(path, cache='/unused', **overrides):
  return tiny_config(cache, **{'task': 'sft', 'data.corpus': 'chat', 'data.path': path,
                               'data.seq_len': 64, 'model.lora_rank': 4,
                               'model.lora_num_adapters': 2, 'sample.prompts': (), **overrides})


def test_rows_are_packed_per_adapter_and_name_it(chat_files):
  files, one, d = chat_files
  tok = tokenizers.ByteTokenizer()
  cfg = _cfg(','.join(files))

  def check(path):
    cfg.data.path = path
    fields, stats = sft.load_rows(cfg.data, tok, 'train', num_adapters=2)
    ids = fields['adapter_ids']
    assert ids.shape == (len(fields['tokens']),) and set(ids.tolist()) == {0, 1}
    assert [s['adapter'] for s in stats['adapters']] == [0, 1]
    assert sum(s['conversations'] for s in stats['adapters']) >= 76  # 2 x 40, 2% validation
    for row, k in zip(fields['tokens'], ids):  # every conversation of a row is its adapter's
      text = tok.decode([t for t in row.tolist() if t > 3])
      assert JOBS[k] in text and JOBS[1 - k] not in text

  check(','.join(files))  # file k: adapter k
  check(one)  # one file, "adapter": k on each line
  # The pipeline serves the per-row field as [B], beside the [B, L] ones.
  from pathways_jax.data import pipeline
  batch = next(pipeline.make_train_iterator(_cfg(one), tok))
  assert batch['adapter_ids'].shape == (4,) and batch['tokens'].shape == (4, 64)
  # Bad data: one clear error each.
  cases = [([_conv(0, 'x')], 'no "adapter" key'),
           ([_conv(0, 'x', adapter=2)], r'"adapter": 2 is not an integer in \[0, 2\)'),
           ([_conv(0, 'x', adapter=True)], 'is not an integer'),
           ([_conv(i, 'x', adapter=0) for i in range(9)], 'adapter 1 has nothing to train on')]
  for n, (records, message) in enumerate(cases):
    cfg.data.path = _write(d / f'bad{n}.jsonl', records)
    with pytest.raises(DataError, match=message):
      sft.load_rows(cfg.data, tok, 'train', num_adapters=2)
  cfg.data.path = f'{files[0]},{_write(d / "bad_mix.jsonl", [_conv(0, "x", adapter=0)])}'
  with pytest.raises(DataError, match='"adapter": 0 in the file of adapter 1'):
    sft.load_rows(cfg.data, tok, 'train', num_adapters=2)


def test_adapter_k_learns_from_its_own_rows_only(chat_files):
  """Through the sft task on pipeline rows: adapter k's gradient is the gradient adapter k's own
  model gets from the rows naming k alone, times their share of the batch's trained tokens (the
  loss is the mean over all of them); with no row of adapter 1 in the batch, its gradient is 0."""
  files, _, _ = chat_files
  tok = tokenizers.ByteTokenizer()
  cfg = _cfg(','.join(files))
  fields, _ = sft.load_rows(cfg.data, tok, 'train', num_adapters=2)
  ids = fields['adapter_ids']
  rows = np.concatenate([np.flatnonzero(ids == 1)[:2], np.flatnonzero(ids == 0)[:2]])
  batch = {k: jnp.asarray(v[rows]) for k, v in fields.items()}
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=264))
  base, adapters = lora.split(_random_params(model, batch['tokens'], batch['adapter_ids']))
  task = tasks.make(cfg, model)

  @jax.jit  # one program for every batch below: they share a shape
  def grad(adapters, batch):
    loss = lambda a: task.loss(lora.combine(base, a), batch, jax.random.key(0))
    return jax.grad(loss, has_aux=True)(adapters)

  def only(k):
    """The batch with the other adapter's rows made padding (nothing trained there)."""
    pad = np.asarray(batch['adapter_ids']) != k
    return {n: jnp.where(pad[:, None], 0, v) if v.ndim == 2 else v for n, v in batch.items()}

  g, metrics = grad(adapters, batch)
  for k in (0, 1):
    want, own = grad(adapters, only(k))
    share = float(own[tasks.COUNT]) / float(metrics[tasks.COUNT])
    assert 0 < share < 1
    for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(lora.select(g, k)),
                                   jax.tree_util.tree_leaves(lora.select(want, k))):
      assert float(jnp.abs(want_leaf).max()) > 0
      assert_close(got_leaf, want_leaf * share, terms=batch['tokens'].size)
    # No trained row of the other adapter in that batch: its gradient is exactly zero.
    assert all(float(jnp.abs(x).max()) == 0
               for x in jax.tree_util.tree_leaves(lora.select(want, 1 - k)))


@pytest.mark.parametrize('task_name,sft_fraction', [('sft', 1.0), ('llada_sft', 1.0),
                                                     ('llada_sft', 0.5)])
def test_validation_reports_each_adapters_own_loss(chat_files, task_name, sft_fraction):
  """The eval loss's `loss/adapter_k` is the task's loss of the batch with the other adapter's
  rows made padding, with its units (trained tokens; examples) as its own count; and
  `loop.evaluate` weights it across batches by that count, leaving out an adapter that has no
  validation rows."""
  from pathways_jax import parallel
  from pathways_jax.train import loop
  files, _, _ = chat_files
  tok = tokenizers.ByteTokenizer()
  llada = task_name == 'llada_sft'
  cfg = _cfg(','.join(files), task=task_name,
             **({'model.causal': False, 'data.chat.pack': False, 'data.chat.eos_padding': True,
                 'llada_sft.sft_fraction': sft_fraction} if llada else {}))
  tokenizers.resolve_special_ids(cfg, tok)
  fields, _ = sft.load_rows(cfg.data, tok, 'train', num_adapters=2)
  ids = fields['adapter_ids']
  rows = np.concatenate([np.flatnonzero(ids == 1)[:2], np.flatnonzero(ids == 0)[:2]])
  batch = {k: jnp.asarray(v[rows]) for k, v in fields.items()}
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=264))
  params = _random_params(model, batch['tokens'], batch['adapter_ids'])
  task = tasks.make(cfg, model)
  eval_loss = jax.jit(lambda b: task.eval_loss(params, b, jax.random.key(3)))

  def only(k):
    pad = np.asarray(batch['adapter_ids']) != k
    return {n: jnp.where(pad[:, None], 0, v) if v.ndim == 2 else v for n, v in batch.items()}

  loss, metrics = eval_loss(batch)
  counts = []
  for k in (0, 1):
    want, own = eval_loss(only(k))
    assert_close(metrics[f'loss/adapter_{k}'], want, terms=batch['tokens'].size)
    assert float(metrics[f'loss/adapter_{k}{tasks.OWN_COUNT}']) == float(own[tasks.COUNT]) > 0
    counts.append(float(own[tasks.COUNT]))
  assert sum(counts) == float(metrics[tasks.COUNT])
  # The batch's loss is the count-weighted mean of the adapters' (sft: over tokens; llada_sft:
  # over examples; not so for llada_sft's mixture, whose two terms are means over other units).
  if sft_fraction == 1.0:
    assert_close(loss, sum(c * metrics[f'loss/adapter_{k}'] for k, c in enumerate(counts))
                 / sum(counts), terms=batch['tokens'].size)
  # Across batches: adapter 1 has units in the first batch only, adapter 2 in none.
  per_batch = [{'loss': 2.0, tasks.COUNT: 3.0, 'loss/adapter_1': 1.0,
                f'loss/adapter_1{tasks.OWN_COUNT}': 1.0, 'loss/adapter_2': 0.0,
                f'loss/adapter_2{tasks.OWN_COUNT}': 0.0},
               {'loss': 4.0, tasks.COUNT: 1.0, 'loss/adapter_1': 0.0,
                f'loss/adapter_1{tasks.OWN_COUNT}': 0.0, 'loss/adapter_2': 0.0,
                f'loss/adapter_2{tasks.OWN_COUNT}': 0.0}]
  mesh = parallel.make_mesh(cfg, jax.devices()[:1])
  got = loop.evaluate(lambda p, b: per_batch[int(b['i'][0])], None,
                      [{'i': np.array([i])} for i in range(2)], mesh, (), perplexity=False)
  assert got == {'val_loss': (2.0 * 3 + 4.0 * 1) / 4, 'val_loss/adapter_1': 1.0}


def _random_params(model, tokens_BL, ids_B=None, scale=0.1):
  """Params of `model` drawn by numpy at their init shapes (no init program to compile); the
  adapters' B off zero, as after training, so that A gets a gradient."""
  rng = np.random.default_rng(0)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens_BL,
                                   adapter_ids_B=ids_B)['params'])
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def _base_run(path, cache):
  """A run directory holding a random base model (what `interop.hf import` writes): config.json
  and the params as checkpoint 0, without training one."""
  cfg = tiny_config(cache, **{'model.init_std': 0.2})
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=264))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))['params'])
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(cfg.to_json_best_effort())
  ocp.PyTreeCheckpointer().save(os.path.join(path, 'checkpoints', '0', 'state'),
                                {'params': params})
  return str(path)


def test_a_two_adapter_qlora_run_resumes_exactly_and_serves_each_adapter(tmp_path, chat_files):
  """K = 2 adapters on an int8 base (qwix; a float base where qwix is missing), from a base run:
  resumed from its step-2 checkpoint, the run logs the uninterrupted run's losses bit for bit
  (the data iterator over per-adapter rows, the base quantised again). Then adapter 1 alone, as
  sampling, evaluation and export take it, computes row k of the two-adapter model."""
  from pathways_jax import sample
  from pathways_jax.adapters import qlora
  from pathways_jax.interop.hf import adapter as hf_adapter, run_dir
  from pathways_jax.train import loop
  files, _, _ = chat_files
  cache = str(tmp_path / 'cache')
  quant = {'model.lora_quantize': 'int8', 'model.lora_quantize_block': 16} if HAS_QWIX else {}
  base = _base_run(tmp_path / 'base', cache)
  make = lambda: _cfg(','.join(files), cache, **{
      'train.init_from': base, 'train.steps': 4, 'train.checkpoint_every': 2, 'train.lr': 1e-2,
      **quant})
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  res = loop.train(make(), full, quiet=True)
  # Validation reports each adapter's loss beside the one over all rows: each adapter that has
  # validation rows (the 2% split by hash gives adapter 0 one conversation here, adapter 1 none).
  val_ids = sft.load_rows(make().data, tokenizers.ByteTokenizer(), 'validation',
                          num_adapters=2)[0]['adapter_ids']
  assert sorted(k for k in res if k.startswith('val_loss/')) == [
      f'val_loss/adapter_{k}' for k in sorted(set(val_ids.tolist()))] == ['val_loss/adapter_0']
  assert np.isfinite(res['val_loss/adapter_0'])
  if HAS_QWIX:  # the frozen base held quantised: int8 plus a float32 scale per 16 values
    assert res['qlora']['dense_bytes_stored'] / res['qlora']['dense_bytes_float32'] == (
        pytest.approx((1 + 4 / 16) / 4))
  run_stopped_at(full, part, 2)
  assert loop.train(make(), part, quiet=True)['step'] == 4
  want, got = logged_losses(full), logged_losses(part)
  assert sorted(want) == [1, 2, 3, 4] and got == want, (got, want)

  _, model, params, _ = sample.load_run(part)
  _, one_model, one, _ = sample.load_run(part, adapter=1)
  assert (model.cfg.lora_num_adapters, one_model.cfg.lora_num_adapters) == (2, 1)
  if HAS_QWIX:  # the model it trained: the base quantised, read dequantised
    assert len(qlora.quantized_paths(params)) == 14 == len(qlora.quantized_paths(one))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 4, 200)
  both = jax.jit(lambda p: model.apply({'params': p}, tokens, adapter_ids_B=jnp.array([1, 0])))(
      params)
  alone = jax.jit(lambda p: one_model.apply({'params': p}, tokens))(one)
  assert_close(alone[0], both[0], terms=64)
  assert float(jnp.abs(alone[1] - both[1]).max()) > 1e-4  # row 1 ran adapter 0: it differs
  out = run_dir.export_adapter(part, str(tmp_path / 'adapter1'), adapter_index=1)
  back, _ = hf_adapter.load_adapter(out, one_model.cfg.replace(lora_rank=0))
  for x, y in zip(jax.tree_util.tree_leaves(back),
                  jax.tree_util.tree_leaves(lora.split(one)[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(config_lib.ConfigError, match='trained 2 adapters.*--adapter=k'):
    run_dir.export_adapter(part, str(tmp_path / 'x'))
  # The harness model (`evaluate --adapter=1`, model_args adapter=1) runs the same adapter alone.
  from pathways_jax.eval import harness
  lm = harness.PathwaysLM(workdir=part, adapter='1', batch_size=2)
  assert lm.model.cfg.lora_num_adapters == 1 and lm.get_model_info()['pathways_adapter'] == 1
  for x, y in zip(jax.tree_util.tree_leaves(lm.params), jax.tree_util.tree_leaves(one)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match=r'trained 2 adapters.*adapter=k.*k in \[0, 2\)'):
    harness.PathwaysLM(workdir=part)
  with pytest.raises(ValueError, match=r'adapter 2 is not in \[0, 2\)'):
    sample.load_run(part, adapter=2)


def test_settings_that_cannot_run_are_one_clear_error(chat_files, tmp_path):
  files, one, _ = chat_files
  cases = [({'model.lora_rank': 0}, 'lora_num_adapters=2 needs config.model.lora_rank > 0'),
           ({'data.corpus': 'synthetic'}, "trains each adapter on its own data: set "
                                          "config.data.corpus='chat'"),
           ({'data.path': ','.join(files + [one])}, 'names 3 files for config.model.lora_num_a'),
           ({'model.lora_quantize': 'int3'}, r"lora_quantize='int3' is not one of \('', 'int8'"),
           ({'model.lora_quantize': 'nf4'}, 'needs the base to quantise: set config.train.init_f'),
           ({'model.lora_quantize': 'int8', 'model.lora_rank': 0, 'model.lora_num_adapters': 1,
             'train.init_from': '/x'}, 'set config.model.lora_rank > 0')]
  for overrides, message in cases:
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(_cfg(one, **overrides))
  from pathways_jax.train import loop
  with pytest.raises(config_lib.ConfigError, match="task 'autoregressive' does not pass per-row "
                                                   'adapter ids'):
    loop.train(_cfg(one, task='autoregressive'), str(tmp_path / 'run'), quiet=True)
