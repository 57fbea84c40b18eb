"""Tiny configs shared by the end-to-end tests (seconds per run on a 2-core CPU)."""
import os
import subprocess
import sys

from pathways_jax.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def cli(module: str, *args, timeout=300, **kw) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
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
