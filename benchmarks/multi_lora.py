"""Multi-LoRA sampling: K adapters mixed in one batch vs one merged model, greedy KV-cache decoding.

    python benchmarks/multi_lora.py [--config=experiments/ar_tiny.py] [--batch=32]
        [--new_tokens=64] [--adapters=8] [--rank=8] [--repeats=7]

Side by side in one process, same batch size, prompts and token count (EOS off, so every row
decodes to the end): (a) one merged model (W + scale * A @ B: the plain base's cost), (b) the
multi-LoRA model with `--adapters` adapters, row b running adapter b mod K, (c) one unmerged
adapter (the single-adapter LoRA model). Each runs once to compile, then `--repeats` rounds, every
variant once per round in a shuffled order (a slow spell hits one round, not one variant); the
table gives each variant's median and the median over rounds of its time / the merged model's in
that round. The model is the config's (the quickstart's by default), random weights and adapters
(B nonzero, as after training): speed does not depend on what was learnt.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp

from pathways_jax.adapters import lora
from pathways_jax.config import ModelConfig, round_vocab
from pathways_jax.config_files import config_from_file
from pathways_jax.models.transformer import Transformer
from pathways_jax.sampling import autoregressive


def _trained(adapters, key):
  """Adapters with nonzero B (a fresh one has B = 0)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      0.05 * jax.random.normal(k, x.shape, x.dtype) if 'lora_b' in jax.tree_util.keystr(p) else x
      for k, (p, x) in zip(keys, leaves)])


def variants(model_cfg: ModelConfig, *, batch: int, adapters: int, rank: int, targets: str):
  """name -> (model, params, adapter_ids_B or None)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  base = nn.unbox(Transformer(model_cfg).init(jax.random.key(0), tokens)['params'])
  lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
  singles = [_trained(lora.init(jax.random.key(1 + k), base, lcfg), jax.random.key(100 + k))
             for k in range(adapters)]
  multi, mcfg = lora.stack(singles, [lcfg] * adapters)
  ids_B = jnp.arange(batch, dtype=jnp.int32) % adapters
  return {
      'merged (one model)': (Transformer(model_cfg), lora.merge(base, singles[0], lcfg), None),
      f'multi-LoRA, {adapters} adapters mixed': (
          Transformer(mcfg.apply_to(model_cfg, num_adapters=adapters)),
          lora.combine(base, multi), ids_B),
      'one unmerged adapter': (Transformer(lcfg.apply_to(model_cfg)),
                               lora.combine(base, singles[0]), None),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default=os.path.join(REPO, 'experiments', 'ar_tiny.py'))
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--prompt_len', type=int, default=16)
  ap.add_argument('--new_tokens', type=int, default=64)
  ap.add_argument('--adapters', type=int, default=8)
  ap.add_argument('--rank', type=int, default=8)
  ap.add_argument('--targets', default='all-linear')
  ap.add_argument('--repeats', type=int, default=7)
  args = ap.parse_args(argv)

  cfg = config_from_file(args.config)
  model_cfg = ModelConfig.from_config(cfg.model, round_vocab(cfg.data.vocab_size or 1024))
  model_cfg = model_cfg.replace(max_len=max(model_cfg.max_len, args.prompt_len + args.new_tokens))
  runs = variants(model_cfg, batch=args.batch, adapters=args.adapters, rank=args.rank,
                  targets=args.targets)
  prompt_BP = jax.random.randint(jax.random.key(7), (args.batch, args.prompt_len), 4,
                                 model_cfg.vocab_size)

  def run(name):
    model, params, ids = runs[name]
    t = time.perf_counter()
    out = autoregressive.generate(model, params, prompt_BP, key=jax.random.key(0),
                                  max_new_tokens=args.new_tokens, temperature=0.0,
                                  adapter_ids_B=ids)
    jax.block_until_ready(out)
    return time.perf_counter() - t

  compile_s = {name: run(name) for name in runs}
  seconds = {name: [] for name in runs}
  order = list(runs)
  rng = random.Random(0)
  for _ in range(args.repeats):
    rng.shuffle(order)
    for name in order:
      seconds[name].append(run(name))

  merged = next(iter(runs))
  tokens = args.batch * args.new_tokens
  print(f'model: d={model_cfg.d_model}, {model_cfg.num_layers} layers, {model_cfg.num_heads} '
        f'heads ({model_cfg.num_kv_heads} kv), mlp {model_cfg.mlp_dim}, vocab '
        f'{model_cfg.vocab_size}, attention={model_cfg.attention}; LoRA rank {args.rank} on '
        f'{args.targets}; batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new '
        f'tokens greedy; {args.repeats} rounds; jax {jax.__version__} on '
        f'{jax.devices()[0].platform}')
  print()
  print('| variant | median s | tokens/s | tokens/s vs merged: median of per-round ratios '
        '(quartiles) | first call s |')
  print('|---|---|---|---|---|')
  for name, times in seconds.items():
    med = statistics.median(times)
    ratios = [m / t for m, t in zip(seconds[merged], times)]
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    print(f'| {name} | {med:.3f} | {tokens / med:.0f} | {statistics.median(ratios):.2f}x '
          f'({q1:.2f}-{q3:.2f}) | {compile_s[name]:.1f} |')


if __name__ == '__main__':
  main()
