"""What the benchmarks against TRL share: the torch worker process, the interleaved rounds and
their summary (benchmarks/sft_vs_trl.py, benchmarks/preference_vs_trl.py).

A worker is a script run in the torch venv (`.venv-golden`) that answers JSON lines on its
stdout: a first line once it is ready (`{"ready": true, ...}` or `{"error": ...}`), then one line
per `{"run": VARIANT, "steps": N}` command: `{"seconds", "real_tokens", "slots", "loss"}` of N
optimizer steps it timed itself (the pipe's round trip is not in the time).
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import time

from train_throughput import paired_ratio

# pathways_jax.host_memory's mallopt settings as glibc tunables, for the torch process.
REUSE_TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                  'glibc.malloc.trim_threshold=2147483647')


def usable_torch_python(path: str) -> bool:
  """Whether `path` is a Python with torch, transformers and trl."""
  if not os.path.isfile(path):
    return False
  probe = subprocess.run([path, '-c', 'import torch, transformers, trl'], capture_output=True,
                         check=False, timeout=300)
  return probe.returncode == 0


class Worker:
  """A worker script (`cmd`) in the torch venv, over stdin/stdout JSON lines; its stderr goes to
  WORKDIR/`log_name`. `info` is its ready line."""

  def __init__(self, cmd: list, workdir: str, log_name: str, malloc_reuse: bool):
    # pylint: disable-next=consider-using-with
    self.log = open(os.path.join(workdir, log_name), 'w')
    env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1',
           'TOKENIZERS_PARALLELISM': 'false', 'HF_HOME': os.path.join(workdir, 'hf_home')}
    if malloc_reuse:  # torch under the malloc options this process runs with (host_memory.py)
      env['GLIBC_TUNABLES'] = REUSE_TUNABLES
    # pylint: disable-next=consider-using-with
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True, env=env,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.malloc_reuse = malloc_reuse
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.log.flush()
      with open(self.log.name) as f:
        tail = f.read()[-3000:]
      raise RuntimeError(f'the TRL worker exited ({self.proc.returncode}); its log ends:\n{tail}')
    out = json.loads(line)
    if 'error' in out:
      raise RuntimeError(f'the TRL worker failed: {out["error"]}')
    return out

  def runner(self, variant: str):
    """run(steps) -> (seconds, real tokens, slots, loss) of `variant` in the worker."""
    def run(steps):
      self.proc.stdin.write(json.dumps({'run': variant, 'steps': steps}) + '\n')
      self.proc.stdin.flush()
      r = self._read()
      return r['seconds'], r['real_tokens'], r['slots'], r['loss']
    return run

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({'quit': True}) + '\n')
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
      except (BrokenPipeError, subprocess.TimeoutExpired):
        self.proc.kill()
    self.log.close()


def time_rounds(runners: dict, steps: int, rounds: int, pause: float, seed: int = 0,
                warmup: int = 2) -> dict:
  """{runner: [(seconds, real tokens, slots, loss) of each round]}: `warmup` steps each, then
  every runner once per round in a shuffled order (train_throughput.time_rounds, with the
  runners timing themselves: the TRL worker's round excludes the pipe's round trip)."""
  for r in runners.values():
    r(warmup)
  out = {k: [] for k in runners}
  order, rng = list(runners), random.Random(seed)
  for _ in range(rounds):
    rng.shuffle(order)
    for k in order:
      time.sleep(pause)  # the previous runner's spinning threads go idle first
      out[k].append(runners[k](steps))
  return out


def round_rows(rounds: dict, steps: int) -> tuple[dict, dict]:
  """(seconds per real token of every round {runner: [...]}, a summary row per runner): the best
  round's and the median tokens/s, median seconds per step, real tokens and slots per step, and
  the last round's loss."""
  per_token = {k: [s / t for s, t, _, _ in v] for k, v in rounds.items()}
  rows = {}
  for k, v in rounds.items():
    best = min(range(len(v)), key=lambda i: per_token[k][i])
    rows[k] = {'tokens_per_s': 1 / per_token[k][best],
               'median_tokens_per_s': 1 / statistics.median(per_token[k]),
               'step_s': statistics.median(s / steps for s, _, _, _ in v),
               'real_per_step': statistics.mean(t / steps for _, t, _, _ in v),
               'slots_per_step': statistics.mean(n / steps for _, _, n, _ in v),
               'loss': v[-1][3]}
  return per_token, rows


def ratio(per_token: dict, rows: dict, ours: str, theirs: str) -> dict:
  """`ours` / `theirs` in tokens/s: of the best rounds, and the median (and quartiles) over
  rounds of each round's own ratio (train_throughput.paired_ratio)."""
  paired = paired_ratio(per_token, theirs, ours)
  return {'best': rows[ours]['tokens_per_s'] / rows[theirs]['tokens_per_s'],
          'paired_median': paired[0], 'quartiles': paired[1:]}
