"""Metrics: metrics.jsonl + TensorBoard writer, FLOPs per token, MFU and the peak it is measured against."""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device, from vendor datasheets (no sparsity).
_PEAKS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'B200': 2250e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (matmul params) + attention scores and values.

  Matmul params exclude the embedding lookup but include the unembedding. Attention costs
  2 matmuls x 2 FLOPs x seq_len x (heads x head_dim) per layer forward, x3 for forward+backward,
  halved for causal models (the masked half is skipped by efficient kernels, as MaxText counts).
  """
  d, hd = cfg.d_model, cfg.dim_per_head
  per_layer = d * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2) + 3 * d * cfg.mlp_dim
  matmul_params = cfg.num_layers * per_layer + d * cfg.vocab_size
  attn = 12 * cfg.num_layers * seq_len * cfg.num_heads * hd
  if cfg.causal:
    attn /= 2
  return 6 * matmul_params + attn


def measure_matmul_peak(n: int = 1024, repeats: int = 30) -> float:
  """Best observed FLOP/s of a float32 n x n matmul on the default device (the CPU 'peak').

  30 repeats (~0.6 s on 2 cores): with 5, a busy moment of a shared machine could pull the best
  down to 112-131 GFLOP/s where 30 found 134-146 in the same process, inflating MFU.
  """
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s, where it came from): config > datasheet table > measured matmul peak."""
  if configured > 0:
    return configured, 'config'
  kind = jax.devices()[0].device_kind
  for name, peak in _PEAKS.items():
    if name.lower() in kind.lower():
      return peak, f'datasheet ({kind})'
  return measure_matmul_peak(), f'measured f32 matmul ({kind})'


class MetricsWriter:
  """Writes one JSON line per logged step and the same scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled or not scalars:  # e.g. validation of a run without a validation split
      return
    clean = {k: _to_float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **clean}) + '\n')
    self._jsonl.flush()
    for k, v in clean.items():
      if isinstance(v, float):
        self._tb.add_scalar(k, v, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def logged(workdir: str, key: str) -> list[tuple[int, float]]:
  """(step, value) of every line of workdir/metrics.jsonl that holds `key`, by step; a step
  logged twice (a resumed run repeats the steps after its last checkpoint) keeps the last."""
  found = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        rec = json.loads(line)
        if key in rec:
          found[rec['step']] = rec[key]
  return sorted(found.items())


def _to_float(v):
  if isinstance(v, (str, bool)) or v is None:
    return v
  return float(np.asarray(v))
