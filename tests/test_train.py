"""The trainer end to end: learning, exact resume, preemption, NaN handling, bad input, sweeps."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathways_jax import config as config_lib
from pathways_jax import config_files
from pathways_jax import parallel, sweep, tasks
from pathways_jax.models.transformer import Transformer
from pathways_jax.train import frozen, loop, optimizer, state as state_lib, step as step_lib

from helpers import REPO, cli, cli_overrides, tiny_config
from numerics import assert_close, assert_trees_close


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
  cfg = tiny_config('/unused', **{'train.steps': 20, 'train.lr': 1e-2})
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=64))
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules()
  tx = optimizer.make_optimizer(cfg.train)
  tokens = np.random.default_rng(0).integers(4, 64, (4, 32)).astype(np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones_like(tokens),
           'positions': np.tile(np.arange(32, dtype=np.int32), (4, 1))}
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, tokens, mesh, rules)
  state = state_lib.init_state(model, tx, tokens, jax.random.key(0), mesh, rules)
  fn = step_lib.jit_train_step(cfg, tasks.make(cfg, model), tx, shardings, mesh)
  losses = []
  for _ in range(20):
    state, m = step_lib.run_with_rules(mesh, rules, fn, state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] - 0.5, losses
  assert int(state.step) == 20 and int(state.bad_step) == -1


@pytest.mark.parametrize('padded', [False, True])
def test_gradient_accumulation_matches_the_full_batch(padded):
  """With `padded`, the two micro-batches hold very different numbers of target tokens (rows 1
  and 3, micro-batch 2 in step._split_micro, are mostly padding): the accumulated loss and update
  are still those of the token mean over the whole batch, not the mean of two micro-batch means."""
  cfg = tiny_config('/unused')
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=64))
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules()
  tx = optimizer.make_optimizer(cfg.train)
  tokens = np.random.default_rng(0).integers(4, 64, (4, 32)).astype(np.int32)
  seg = np.ones_like(tokens)
  if padded:
    seg[1, 4:], seg[3, 6:] = 0, 0
  batch = {'tokens': tokens, 'segment_ids': seg,
           'positions': np.tile(np.arange(32, dtype=np.int32), (4, 1))}
  outs = []
  for accum in (1, 2):
    cfg.train.grad_accum = accum
    _, shardings = state_lib.abstract_state_and_shardings(model, tx, tokens, mesh, rules)
    state = state_lib.init_state(model, tx, tokens, jax.random.key(0), mesh, rules)
    fn = step_lib.jit_train_step(cfg, tasks.make(cfg, model), tx, shardings, mesh)
    state, m = step_lib.run_with_rules(mesh, rules, fn, state, batch)
    outs.append((float(m['loss']), state.params))
  # Two micro-batches sum the same per-token gradients in another order.
  assert_close(outs[1][0], outs[0][0], terms=tokens.size)
  assert_trees_close(outs[1][1], outs[0][1], terms=tokens.size)


def test_non_finite_step_keeps_the_last_good_state():
  cfg = tiny_config('/unused')
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=64))
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules()
  tx = optimizer.make_optimizer(cfg.train)
  tokens = np.ones((4, 32), np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones_like(tokens),
           'positions': np.tile(np.arange(32, dtype=np.int32), (4, 1))}
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, tokens, mesh, rules)
  state = state_lib.init_state(model, tx, tokens, jax.random.key(0), mesh, rules)
  poisoned = state.replace(params={**state.params, 'embed': state.params['embed'] * jnp.nan})
  fn = step_lib.jit_train_step(cfg, tasks.make(cfg, model), tx, shardings, mesh)
  before = jax.device_get(poisoned.params['final_norm']['scale'])
  after, _ = step_lib.run_with_rules(mesh, rules, fn, poisoned, batch)
  assert int(after.bad_step) == 0
  np.testing.assert_array_equal(jax.device_get(after.params['final_norm']['scale']), before)


def test_run_writes_the_run_directory_and_samples(tmp_path):
  cfg = tiny_config(str(tmp_path / 'cache'))
  results = loop.train(cfg, str(tmp_path / 'run'), quiet=True)
  run = tmp_path / 'run'
  for name in ('metrics.jsonl', 'results.json', 'config.json', 'tensorboard', 'checkpoints'):
    assert (run / name).exists(), name
  row = json.loads((run / 'metrics.jsonl').read_text().splitlines()[0])
  for key in ('step', 'loss', 'lr', 'tokens_per_s', 'mfu'):
    assert key in row
  assert results['status'] == 'completed' and results['step'] == 8
  assert np.isfinite(results['val_loss']) and results['samples'][0].startswith('Ab')
  assert sorted(int(p.name) for p in (run / 'checkpoints').iterdir() if p.name.isdigit()) == [4, 8]
  # Sampling from the run directory (what `python -m pathways_jax.sample` does).
  from pathways_jax import sample  # pylint: disable=g-import-not-at-top
  c2, model, params, tok = sample.load_run(str(run))
  texts = sample.sample_texts(c2, model, params, tok, key=jax.random.key(0), prompts=['Q'],
                              temperature=0.0)
  assert texts[0].startswith('Q')


def test_eval_on_start_logs_the_start_models_validation_at_step_zero(tmp_path):
  """train.eval_on_start: the fresh model's validation loss at step 0 (near ln V, the loss of
  uniform predictions from a small init), once: a resumed run does not log step 0 again."""
  from pathways_jax.data import tokenizers
  cfg = tiny_config(str(tmp_path / 'cache'), **{'train.eval_on_start': True, 'train.stop_at': 4})
  loop.train(cfg, str(tmp_path / 'run'), quiet=True)
  results = loop.train(tiny_config(str(tmp_path / 'cache'), **{'train.eval_on_start': True}),
                       str(tmp_path / 'run'), quiet=True)
  rows = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  start = [r for r in rows if r['step'] == 0]
  assert len(start) == 1 and 'loss' not in start[0], start
  vocab = tokenizers.ByteTokenizer().vocab_size
  assert start[0]['val_loss'] == pytest.approx(np.log(vocab), rel=0.05)
  assert results['val_loss'] < start[0]['val_loss'] - 0.5


@pytest.mark.parametrize('attention', ['xla', 'cpu'])
def test_resume_after_a_clean_stop_is_bit_identical(tmp_path, attention):
  cache = str(tmp_path / 'cache')
  full = tmp_path / 'full'
  over = {'model.attention': attention}
  loop.train(tiny_config(cache, **over), str(full), quiet=True)
  part = tmp_path / 'part'
  loop.train(tiny_config(cache, **over, **{'train.stop_at': 4}), str(part), quiet=True)
  assert max(_losses(part)) == 4
  loop.train(tiny_config(cache, **over), str(part), quiet=True)
  assert _losses(part) == _losses(full)


def test_sigterm_saves_and_the_resumed_run_is_bit_identical(tmp_path):
  cache = str(tmp_path / 'cache')
  flags_ = cli_overrides('experiments/quickstart.py', cache) + ['--config.train.steps=60',
                                                                '--config.train.checkpoint_every=1000']
  ref = tmp_path / 'ref'
  done = cli('pathways_jax.main', *flags_, f'--workdir={ref}')
  assert done.returncode == 0, done.stderr[-2000:]
  run = tmp_path / 'run'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  proc = subprocess.Popen([sys.executable, '-m', 'pathways_jax.main', *flags_, f'--workdir={run}'],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  metrics = run / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  assert 'SIGTERM: saved checkpoint' in out
  stopped = max(_losses(run))
  assert 5 <= stopped < 60
  again = cli('pathways_jax.main', *flags_, f'--workdir={run}')
  assert again.returncode == 0, again.stderr[-2000:]
  assert _losses(run) == _losses(ref)


@pytest.mark.parametrize('flag,message', [
    ('--config.train.no_such_key=1', 'no_such_key'),
    ('--config.train.steps=abc', 'steps'),
    ('--config.model.num_kv_heads=3', 'num_kv_heads'),
    ('--config.objective=magic', 'objective'),
    ('--config.model.causal_query_blocks=0', 'causal_query_blocks must be >= 1'),
])
def test_bad_config_fails_at_once_naming_the_key(tmp_path, flag, message):
  out = cli('pathways_jax.main', '--config=experiments/quickstart.py', f'--workdir={tmp_path}/r',
            flag)
  assert out.returncode != 0
  assert message in out.stderr + out.stdout
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]


def test_a_bug_inside_a_config_file_is_not_reported_as_a_missing_key(tmp_path):
  buggy = tmp_path / 'buggy.py'
  buggy.write_text('import ml_collections\n\ndef get_config():\n'
                   '  return ml_collections.ConfigDict().not_there\n')
  out = cli('pathways_jax.main', f'--config={buggy}', f'--workdir={tmp_path}/r')
  assert out.returncode != 0
  assert 'no key' not in out.stderr and 'not_there' in out.stderr
  assert 'Traceback' in out.stderr  # the config's own bug, with where it happened


def test_bad_inputs_give_one_line_errors(tmp_path):
  cache = str(tmp_path / 'cache')
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(loop.TrainingError, match='not writable'):
    loop.train(tiny_config(cache), str(blocker / 'run'), quiet=True)
  from pathways_jax.data import corpora  # pylint: disable=g-import-not-at-top
  with pytest.raises(corpora.DataError, match='nope'):
    loop.train(tiny_config(cache, **{'data.corpus': 'path', 'data.path': str(tmp_path / 'nope')}),
               str(tmp_path / 'r1'), quiet=True)
  with pytest.raises(config_lib.ConfigError, match='vocab_size'):
    loop.train(tiny_config(cache, **{'model.vocab_size': 100}), str(tmp_path / 'r2'), quiet=True)
  out = cli('pathways_jax.main', *cli_overrides('experiments/quickstart.py', cache),
            '--config.data.corpus=path', f'--config.data.path={tmp_path}/missing.txt',
            f'--workdir={tmp_path}/r3')
  assert out.returncode == 1 and out.stderr.strip().startswith('error:')
  assert len(out.stderr.strip().splitlines()) == 1


def test_a_remote_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(loop.TrainingError, match=r"workdir 'gs://bucket/run' is a remote URL"):
    loop.check_workdir('gs://bucket/run')
  assert not os.listdir(tmp_path)  # no local 'gs:' folder


def test_processes_sharing_a_workdir_all_pass_its_writability_check(tmp_path):
  # Every host of a multi-host run checks the same workdir on a shared filesystem at once; a
  # probe file they shared was removed by one under another, which then failed as "not writable".
  code = ('import sys; from pathways_jax.train import loop\n'
          'for _ in range(300): loop.check_workdir(sys.argv[1])\n')
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'run')], cwd=REPO,
                            stderr=subprocess.PIPE, text=True) for _ in range(4)]
  errors = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [0] * 4, '\n'.join(errors)[-3000:]
  assert os.listdir(tmp_path / 'run') == []  # no probe left behind


def _tree_digest(directory) -> dict:
  """{relative path: bytes} of every file under a directory."""
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def test_exploding_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
  """The README's promise: the run stops naming the first non-finite step, no checkpoint holds
  an update from that step on, and the last good checkpoint is never overwritten."""
  run = tmp_path / 'run'
  loop.train(tiny_config(str(tmp_path / 'cache'), **{'train.steps': 1}), str(run), quiet=True)
  good = run / 'checkpoints' / '1'
  good_files = _tree_digest(good)
  cfg = tiny_config(str(tmp_path / 'cache'), **{
      'train.lr': 1e30, 'train.grad_clip': 0.0, 'train.warmup_steps': 0, 'train.steps': 30,
      'train.schedule': 'constant', 'train.checkpoint_every': 1, 'train.keep_checkpoints': 100})
  with pytest.raises(loop.TrainingError, match=r'non-finite loss or gradient at step (\d+)') as e:
    loop.train(cfg, str(run), quiet=True)
  bad = int(re.search(r'at step (\d+)', str(e.value)).group(1))
  assert 1 <= bad < 30  # resumed at step 1, and lr 1e30 blows up within the run
  steps = frozen.checkpoint_steps(str(run))
  # A checkpoint at step s holds updates 0..s-1: none may include update `bad` or a later one.
  assert steps[0] == 1 and max(steps) <= bad, (steps, bad)
  assert _tree_digest(good) == good_files  # the last good checkpoint before the run: untouched
  cfg_saved = config_files.load_run_config(str(run))
  newest = frozen.load(str(run), parallel.make_mesh(cfg_saved), parallel.logical_rules(cfg_saved))
  assert newest.step == max(steps)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(newest.params))


def test_sweep_runs_every_combination_and_skips_finished_runs(tmp_path):
  cfg = tiny_config(str(tmp_path / 'cache'), **{'train.steps': 3})
  calls = []

  def runner(c, wd):
    calls.append(wd)
    return loop.train(c, wd, quiet=True)

  rows = sweep.run_sweep(cfg, str(tmp_path / 'sw'), 'train.lr=1e-3,3e-3;model.num_layers=1,2',
                         ['val_loss', 'step'], runner=runner)
  assert len(rows) == 4 and len(calls) == 4
  assert {(r['train.lr'], r['model.num_layers']) for r in rows} == {
      ('1e-3', '1'), ('1e-3', '2'), ('3e-3', '1'), ('3e-3', '2')}
  assert all(r['step'] == 3 for r in rows)
  assert (tmp_path / 'sw' / 'sweep.csv').exists() and (tmp_path / 'sw' / 'sweep.md').exists()
  sweep.run_sweep(cfg, str(tmp_path / 'sw'), 'train.lr=1e-3,3e-3;model.num_layers=1,2',
                  ['val_loss'], runner=runner)
  assert len(calls) == 4  # all finished: nothing re-run
  with pytest.raises(config_lib.ConfigError, match="^--grid key 'train.nope': the config has no"):
    sweep.run_sweep(cfg, str(tmp_path / 'sw2'), 'train.nope=1', [], runner=runner)
  with pytest.raises(config_lib.ConfigError, match='^--grid train.steps=x: '):
    sweep.run_sweep(cfg, str(tmp_path / 'sw3'), 'train.steps=x', [], runner=runner)


def test_corrupt_checkpoint_is_a_clear_error_and_is_left_in_place(tmp_path):
  from pathways_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  cache, run = str(tmp_path / 'cache'), tmp_path / 'run'
  loop.train(tiny_config(cache, **{'train.steps': 4}), str(run), quiet=True)
  state_dir = run / 'checkpoints' / '4' / 'state'
  files = [p for p in state_dir.rglob('*') if p.is_file() and p.stat().st_size > 0]
  for p in files:
    p.write_bytes(b'garbage')
  with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/4'):
    loop.train(tiny_config(cache, **{'train.steps': 8}), str(run), quiet=True)
  assert state_dir.exists()


def test_sample_cli_prints_continuations(tmp_path):
  run = tmp_path / 'run'
  loop.train(tiny_config(str(tmp_path / 'cache'), **{'train.steps': 2}), str(run), quiet=True)
  out = cli('pathways_jax.sample', f'--workdir={run}', '--prompt=Ab', '--prompt=Cd',
            '--max_new_tokens=4', '--temperature=0')
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.count('-' * 40) == 2 and out.stdout.startswith('Ab')
  bad = cli('pathways_jax.sample', f'--workdir={tmp_path}/none')
  assert bad.returncode == 1 and bad.stderr.strip().startswith('error:')
  assert 'not a run directory' in bad.stderr


def test_a_second_save_of_the_same_step_is_a_no_op(tmp_path):
  """SIGTERM right after the periodic checkpoint saves the step again: that must not fail."""
  import jax.numpy as jnp
  from pathways_jax.train import checkpoint
  for async_save in (False, True):
    ckpt = checkpoint.Checkpointer(str(tmp_path / str(async_save)), keep=2, async_save=async_save)
    state = {'w': jnp.arange(4.0)}
    ckpt.save(500, state)
    ckpt.save(500, state, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 500
    ckpt.close()
