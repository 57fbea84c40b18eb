"""Tiny configs shared by the end-to-end tests (seconds per run on a 2-core CPU)."""
import os
import shutil
import subprocess
import sys

import pytest

from pathways_jax.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_module(name: str):
  """experiments/<name>.py loaded as a module (the experiments are config files, not a package)."""
  from pathways_jax import config_files  # pylint: disable=g-import-not-at-top
  return config_files.load_config_module(os.path.join(REPO, 'experiments', f'{name}.py'))


def has_cxx() -> bool:
  """Whether kernels_cpu can find a C++ compiler to build the CPU attention kernel."""
  return any(name and shutil.which(name) for name in (os.environ.get('CXX'), 'c++', 'g++',
                                                       'clang++'))


# Tests that build and run the CPU attention kernel; without a compiler the model falls back to
# attention='xla' (tested), and these are skipped.
requires_cxx = pytest.mark.skipif(not has_cxx(), reason='no C++ compiler ($CXX, c++, g++, '
                                  'clang++) to build the CPU attention kernel')


def tiny_config(tmp_cache: str, **overrides):
  c = base_config()
  c.data.corpus = 'synthetic'
  c.data.tokenizer = 'byte'
  c.data.cache_dir = tmp_cache
  c.data.synthetic.num_people = 30
  c.data.synthetic.num_stories = 30
  c.data.synthetic.num_arithmetic = 200
  c.data.seq_len = 32
  c.data.batch_size = 4
  c.data.eval_batches = 2
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.mlp_dim = 64
  c.model.max_len = 64
  c.train.steps = 8
  c.train.lr = 3e-3
  c.train.warmup_steps = 2
  c.train.log_every = 1
  c.train.eval_every = 1000
  c.train.checkpoint_every = 4
  c.train.async_checkpoints = False
  c.train.progress_bar = False
  c.train.peak_flops = 1e10  # skip the start-up matmul measurement
  c.sample.prompts = ('Ab',)
  c.sample.max_new_tokens = 8
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def fake_scaling_points(sizes, bases=(('autoregressive', 2.0), ('diffusion', 3.0)),
                        budgets=(1e11, 1e12), task=0.5) -> list[dict]:
  """The points of a two-seed isoFLOP grid on exact laws (experiments/scaling.py's format):
  loss = base * (C / 1e11)^-0.1 + the size's extra, seed 0 at -0.01 and seed 1 at +0.01 (so every
  point's sd is 0.0141); held-out task accuracy `task` with the same offsets.
  sizes: [(name, params, extra)]."""
  points = []
  for o, base in bases:
    for b in budgets:
      for z, n, extra in sizes:
        for seed, d in ((0, -0.01), (1, 0.01)):
          points.append({'objective': o, 'budget': b, 'size': z, 'params': n, 'seed': seed,
                         'val_loss': base * (b / 1e11) ** -0.1 + extra + d,
                         'task': {'accuracy': task + d, 'n': 8, 'by_op': {}}})
  return points


def session_dir(tmp_path_factory, name: str):
  """A directory all xdist workers of this session share (each worker has its own basetemp)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  path = base / name
  path.mkdir(exist_ok=True)
  return path


def xla_flags(devices: int | None = None) -> str:
  """This session's XLA_FLAGS (see conftest.py), with `devices` fake CPU devices if given."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  if devices:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  return ' '.join(flags)


def cli(module: str, *args, timeout=300, env=None, **kw) -> subprocess.CompletedProcess:
  """`python -m module args` in the repository; `env` adds to this process's environment."""
  env = {**os.environ, **(env or {}), 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, **kw)


def run_on_fake_devices(code: str, devices: int = 8, timeout=300) -> str:
  """Runs `code` in a fresh Python on `devices` fake CPU devices (the flag must precede JAX's
  start, hence a subprocess); returns its stdout + stderr."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags(devices)}
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=timeout, check=False)
  return out.stdout + out.stderr


def cli_overrides(cfg_path: str, cache: str) -> list[str]:
  """Command-line flags equivalent to tiny_config for experiments/quickstart-like files."""
  return [f'--config={cfg_path}', f'--config.data.cache_dir={cache}',
          '--config.data.corpus=synthetic', '--config.data.tokenizer=byte',
          '--config.data.synthetic.num_people=30', '--config.data.synthetic.num_stories=30',
          '--config.data.synthetic.num_arithmetic=200', '--config.data.seq_len=32',
          '--config.data.batch_size=4', '--config.data.eval_batches=2',
          '--config.model.d_model=32', '--config.model.num_layers=2', '--config.model.num_heads=2',
          '--config.model.num_kv_heads=1', '--config.model.mlp_dim=64',
          '--config.model.max_len=64', '--config.train.lr=0.003', '--config.train.warmup_steps=2',
          '--config.train.log_every=1', '--config.train.eval_every=1000',
          '--config.train.progress_bar=False', '--config.train.peak_flops=1e10',
          "--config.sample.prompts=('Ab',)", '--config.sample.max_new_tokens=8']


def packed_rows_with_padding(vocab_size: int):
  """(tokens, positions, segment ids), [2, 100]: a row of two documents and a padding tail, and
  a row of one document."""
  # JAX is imported inside these helpers: conftest imports this module before JAX may start.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  tokens = jax.random.randint(jax.random.key(2), (2, 100), 0, vocab_size)
  seg = jnp.array([[1] * 40 + [2] * 50 + [0] * 10, [3] * 100])
  pos = jnp.array([list(range(40)) + list(range(50)) + [0] * 10, list(range(100))])
  return tokens, pos, seg


def assert_same_function_on_packed_rows(want_model, got_model, params):
  """Two Transformers with the same params give the same logits (where not padding) and the same
  gradients on packed_rows_with_padding, up to float32 rounding (tests/numerics.py).

  The longest reductions are over the rows' tokens (attention over keys; weight gradients summed
  over every token), so `terms` is the number of tokens. tests/test_numerics.py checks that one
  changed mask entry in one model fails this.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from numerics import assert_close  # pylint: disable=g-import-not-at-top
  tokens, pos, seg = packed_rows_with_padding(want_model.cfg.vocab_size)
  weight = (seg != 0)[..., None]

  def loss(p, m):
    logits = m.apply({'params': p}, tokens, positions_BL=pos, segment_ids_BL=seg)
    return jnp.sum(jnp.sin(logits) * weight), logits

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, want), g_want = grad_fn(params, want_model)
  (_, got), g_got = grad_fn(params, got_model)
  valid = np.asarray(seg != 0)[..., None]
  assert_close(got, want, terms=tokens.size, where=valid, err_msg='logits')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got),
                          jax.tree_util.tree_leaves(g_want)):
    assert np.abs(b).max() > 1e-2  # gradients of a real size, so the tolerance means something
    assert_close(a, b, terms=tokens.size, err_msg=f'gradient {jax.tree_util.keystr(path)}')


def logged_losses(workdir) -> dict:
  """{step: training loss} of a run directory's metrics.jsonl (a resumed step: its last line)."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def run_stopped_at(full: str, out: str, step: int) -> str:
  """A copy of run directory `full` as if it had stopped after `step` (its checkpoint then):
  the later checkpoints and metrics lines dropped, without a second training run."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(full, out)
  ckpts = os.path.join(out, 'checkpoints')
  for name in os.listdir(ckpts):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(ckpts, name))
  with open(os.path.join(out, 'metrics.jsonl')) as f:
    kept = [line for line in f if json.loads(line)['step'] <= step]
  with open(os.path.join(out, 'metrics.jsonl'), 'w') as f:
    f.writelines(kept)
  return out


def assert_resume_is_exact(make_cfg, tmp_path, *, sigterm_at: int = 3, stop_at: int = 6):
  """A run stopped by SIGTERM at `sigterm_at`, resumed to a clean stop (train.stop_at) at
  `stop_at`, then resumed to the end, logs the losses of the uninterrupted run, bit for bit.

  `make_cfg(**overrides)` builds the run's config (train.steps > stop_at). The SIGTERM is a real
  one, sent to this process by a callback at that step and handled by the loop's own handler
  (in-process: no second start-up and compilation, unlike test_train's CLI version)."""
  import signal  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  # Off the main thread the loop installs no handler, and SIGTERM would end pytest itself.
  assert threading.current_thread() is threading.main_thread()
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  steps = make_cfg().train.steps
  assert loop.train(make_cfg(), full, quiet=True)['step'] == steps

  def sigterm(step, params):
    del params
    if step == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)

  res = loop.train(make_cfg(), part, quiet=True, callbacks=[loop.Callback(1, sigterm)])
  assert (res['status'], res['step']) == ('preempted', sigterm_at)
  res = loop.train(make_cfg(**{'train.stop_at': stop_at}), part, quiet=True)
  assert (res['status'], res['step']) == ('completed', stop_at)
  assert loop.train(make_cfg(), part, quiet=True)['step'] == steps
  want, got = logged_losses(full), logged_losses(part)
  assert sorted(want) == list(range(1, steps + 1)) and got == want, (got, want)


def assert_answers_as_alone(model, params, tokenizer, examples, max_new_tokens: int, **kw):
  """Instruction prompts of different lengths share a left-padded batch, and each is answered
  as it is alone (pathways_jax.eval.instructions); returns the outputs alone."""
  from pathways_jax.eval import instructions as instr_eval  # pylint: disable=g-import-not-at-top
  assert len({len(instr_eval.prompt_tokens(tokenizer, e)) for e in examples}) > 1
  together = instr_eval.generate_outputs(model, params, tokenizer, examples,
                                         batch_size=len(examples), max_new_tokens=max_new_tokens,
                                         **kw)
  alone = [instr_eval.generate_outputs(model, params, tokenizer, [e], batch_size=1,
                                       max_new_tokens=max_new_tokens, **kw)[0] for e in examples]
  assert together == alone
  return alone
