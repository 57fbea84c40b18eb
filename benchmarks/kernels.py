"""Kernel benchmarks: flash attention and the fused cross-entropy against their alternatives.

    python benchmarks/kernels.py                  # everything the backend allows
    python benchmarks/kernels.py --only=ce --quick

On a GPU: forward+backward time, TFLOP/s and compiled temp memory for attention at S = 1k..8k,
D = 128, bf16, causal and not, for kernels_pallas.flash_attention, XLA attention, cuDNN
(`jax.nn.dot_product_attention(implementation='cudnn')`) and jax's own Pallas Triton `mha`; then
the fused cross-entropy vs the naive logits + log-softmax path (T=8192, D=2048, V=128k, bf16).
On a TPU: ours (Mosaic) vs XLA. On CPU: the compiled memory analysis of every row (abstract
shapes: nothing is allocated) and a small CPU timing of the cross-entropy; attention timings are
skipped (the Pallas interpreter is a test vehicle, not a competitor).

TFLOP/s follow the FlashAttention-2 convention: forward 4*B*H*S^2*D, backward 2.5x that, halved
for causal masks. Times are medians over --iters runs after one warm-up, with block_until_ready.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels_pallas import cross_entropy as ce  # noqa: E402
from kernels_pallas import flash_attention as fa  # noqa: E402

NOT_MEASURED = 'not yet measured'


def _median_seconds(fn, args, iters: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _temp_mib(fn, args) -> float:
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  analysis = fn.lower(*specs).compile().memory_analysis()
  return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float('nan')


# ------------------------------------------------------------------------------------------------
# Attention.


def _attention_impls(backend: str):
  """name -> f(q, k, v, causal) in [B, L, H, D], or None where the backend lacks it."""
  impls = {
      'pallas (ours)': lambda q, k, v, causal: fa.flash_attention(q, k, v, causal=causal),
      'xla': lambda q, k, v, causal: jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, implementation='xla'),
      'cudnn': None,
      'jax pallas mha': None,
  }
  if backend == 'gpu':
    from jax.experimental.pallas.ops.gpu import attention as jax_mha  # pylint: disable=g-import-not-at-top
    impls['cudnn'] = lambda q, k, v, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation='cudnn')
    impls['jax pallas mha'] = lambda q, k, v, causal: jax_mha.mha(
        q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal)
  return impls


def _fwd_bwd(attn, causal):
  def loss(q, k, v):
    return jnp.sum(attn(q, k, v, causal).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def bench_attention(args, backend: str):
  lengths = [1024, 2048] if args.quick else [1024, 2048, 4096, 8192]
  h, d, tokens = 16, 128, 16384  # B * S fixed, so every row moves the same number of tokens
  print(f'\n## Flash attention, fwd+bwd, bf16, H={h}, D={d}, B*S={tokens} '
        f'({jax.devices()[0].device_kind})\n')
  print('| S | causal | implementation | time (ms) | TFLOP/s | temp memory (MiB) |')
  print('|---|---|---|---|---|---|')
  timed = backend in ('gpu', 'tpu')
  for s in lengths:
    b = max(1, tokens // s)
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    shape = (b, s, h, d)
    q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in key) if timed else (
        jax.ShapeDtypeStruct(shape, jnp.bfloat16),) * 3
    for causal in (False, True):
      flops = 3.5 * 4 * b * h * s * s * d * (0.5 if causal else 1.0)
      for name, attn in _attention_impls(backend).items():
        if attn is None:
          print(f'| {s} | {causal} | {name} | {NOT_MEASURED} (needs a GPU) | | |')
          continue
        fn = _fwd_bwd(attn, causal)
        try:
          mem = f'{_temp_mib(fn, (q, k, v)):.0f}'
        except Exception as e:  # pylint: disable=broad-except
          mem = f'failed: {type(e).__name__}'
        if timed:
          try:
            sec = _median_seconds(fn, (q, k, v), args.iters)
            print(f'| {s} | {causal} | {name} | {sec * 1e3:.2f} | {flops / sec / 1e12:.1f} | {mem} |')
          except Exception as e:  # pylint: disable=broad-except
            print(f'| {s} | {causal} | {name} | failed: {type(e).__name__}: {str(e)[:80]} | | |')
        else:
          note = ' (interpret)' if name.startswith('pallas') else ''
          print(f'| {s} | {causal} | {name}{note} | {NOT_MEASURED} (no GPU) | | {mem} |')


# ------------------------------------------------------------------------------------------------
# Cross-entropy.


def _ce_fwd_bwd(fn):
  def loss(h, w, t):
    loss_T, lse_T = fn(h, w, t)
    return loss_T.mean() + 1e-4 * (lse_T ** 2).mean()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bench_cross_entropy(args, backend: str):
  impls = {'naive (logits + log_softmax)': ce.cross_entropy_reference,
           'fused, chunk 4096': functools.partial(ce.fused_cross_entropy, chunk_size=4096),
           'fused, chunk 8192': functools.partial(ce.fused_cross_entropy, chunk_size=8192)}
  timed = backend in ('gpu', 'tpu')
  shapes = [(8192, 2048, 131072, jnp.bfloat16), (8192, 2048, 131072, jnp.float32)]
  if not timed:
    shapes.append((512, 256, 32768, jnp.float32))  # small enough to time on a CPU
  print(f'\n## Fused cross-entropy, fwd+bwd ({jax.devices()[0].device_kind})\n')
  print('| T | D | V | dtype | implementation | time (ms) | temp memory (MiB) | vs naive |')
  print('|---|---|---|---|---|---|---|---|')
  for t, d, v, dt in shapes:
    run_here = timed or t * v <= 512 * 32768
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    if run_here:
      arrs = (jax.random.normal(key[0], (t, d), dt), jax.random.normal(key[1], (d, v), dt) * 0.02,
              jax.random.randint(key[2], (t,), 0, v))
    else:
      arrs = (jax.ShapeDtypeStruct((t, d), dt), jax.ShapeDtypeStruct((d, v), dt),
              jax.ShapeDtypeStruct((t,), jnp.int32))
    base = None
    for name, fn in impls.items():
      step = _ce_fwd_bwd(fn)
      mem = _temp_mib(step, arrs)
      if run_here:
        sec = _median_seconds(step, arrs, args.iters)
        base = base or (sec, mem)
        ratio = f'{sec / base[0]:.2f}x time, {mem / base[1]:.1%} memory'
        print(f'| {t} | {d} | {v} | {jnp.dtype(dt).name} | {name} | {sec * 1e3:.1f} | {mem:.0f} '
              f'| {ratio} |')
      else:
        base = base or (None, mem)
        print(f'| {t} | {d} | {v} | {jnp.dtype(dt).name} | {name} | {NOT_MEASURED} (no GPU) '
              f'| {mem:.0f} | {mem / base[1]:.1%} memory |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', choices=['attention', 'ce'], default=None)
  parser.add_argument('--quick', action='store_true', help='fewer sequence lengths')
  parser.add_argument('--iters', type=int, default=10)
  args = parser.parse_args()
  backend = jax.default_backend()
  print(f'backend: {backend}, device: {jax.devices()[0].device_kind}, jax {jax.__version__}')
  if args.only in (None, 'attention'):
    bench_attention(args, backend)
  if args.only in (None, 'ce'):
    bench_cross_entropy(args, backend)


if __name__ == '__main__':
  main()
