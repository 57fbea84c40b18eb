"""Training throughput of the tiny config: pathways_jax vs the same model in PyTorch eager.

    python benchmarks/train_throughput.py [--config=experiments/quickstart.py] [--steps=2]
                                          [--rounds=30] [--json]

Both sides run the same architecture (Llama-style, GQA, SwiGLU, RoPE, tied embeddings), batch
and AdamW update in the same process, in short rounds (both sides once per round, in a shuffled
order) so machine noise hits both alike.
The ratio is printed two ways: of the best round times, and the median over rounds of each
round's own ratio (the steadier figure on a shared machine). MFU is of the best round, against
the f32 matmul peak measured at start-up (pathways_jax.train.metrics).
The PyTorch column needs the `bench` extra (torch); without it the script reports JAX alone.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pathways_jax import config as config_lib, config_files, host_memory, parallel, tasks  # noqa: E402
from pathways_jax.models.transformer import Transformer  # noqa: E402
from pathways_jax.train import metrics, optimizer, state as state_lib, step as step_lib  # noqa: E402


def jax_step(cfg, model_cfg):
  """The project's jitted train step on a fixed random batch: (step_fn, state, batch, mesh, rules)."""
  model = Transformer(model_cfg)
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules()
  tx = optimizer.make_optimizer(cfg.train)
  b, l = cfg.data.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  batch = {'tokens': rng.integers(4, model_cfg.vocab_size, (b, l)).astype(np.int32),
           'segment_ids': np.ones((b, l), np.int32),
           'positions': np.tile(np.arange(l, dtype=np.int32), (b, 1))}
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, batch['tokens'], mesh, rules)
  state = state_lib.init_state(model, tx, batch['tokens'], jax.random.key(0), mesh, rules)
  fn = step_lib.jit_train_step(cfg, tasks.make(cfg, model), tx, shardings, mesh)
  batch = jax.device_put(batch, parallel.batch_sharding(mesh))
  return fn, state, batch, mesh, rules


def compiled_runner(cfg, model_cfg, compiler_options: dict | None = None):
  """(run(steps), compiled): jax_step's function compiled ahead of time, with XLA's
  `compiler_options`, on its own state. The executable is fixed here, so whatever the model code
  is while this is called (benchmarks/step_parts.py swaps parts in) is what every run times."""
  fn, state, batch, mesh, rules = jax_step(cfg, model_cfg)
  compiled = step_lib.run_with_rules(
      mesh, rules, lambda: fn.lower(state, batch).compile(compiler_options=compiler_options))
  holder = {'state': state}

  def run(steps):
    s = holder['state']
    for _ in range(steps):
      s, m = compiled(s, batch)
    jax.block_until_ready(m['loss'])
    holder['state'] = s

  return run, compiled


def torch_runner(cfg, model_cfg, attention: bool = True, mlp: bool = True):
  """(run, torch version, threads); `attention=False` / `mlp=False` leave that part out of every
  block (benchmarks/step_parts.py times the step without them)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  d, h, kh = model_cfg.d_model, model_cfg.num_heads, model_cfg.num_kv_heads
  hd, f, v = model_cfg.dim_per_head, model_cfg.mlp_dim, model_cfg.vocab_size
  b, l = cfg.data.batch_size, cfg.data.seq_len

  class Block(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.n1, self.n2 = torch.nn.RMSNorm(d, eps=1e-5), torch.nn.RMSNorm(d, eps=1e-5)
      self.wq = torch.nn.Linear(d, h * hd, bias=False)
      self.wkv = torch.nn.Linear(d, 2 * kh * hd, bias=False)
      self.wo = torch.nn.Linear(h * hd, d, bias=False)
      self.gate_up = torch.nn.Linear(d, 2 * f, bias=False)
      self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin):
      y = self.n1(x)
      q = self.wq(y).view(b, l, h, hd).transpose(1, 2)
      k, val = self.wkv(y).view(b, l, 2, kh, hd).permute(2, 0, 3, 1, 4)
      q, k = rope(q, cos, sin), rope(k, cos, sin)
      a = (F.scaled_dot_product_attention(q, k, val, is_causal=model_cfg.causal,
                                          enable_gqa=kh != h)
           if attention else q)
      x = x + self.wo(a.transpose(1, 2).reshape(b, l, h * hd))
      if not mlp:
        return x
      g, u = self.gate_up(self.n2(x)).chunk(2, dim=-1)
      return x + self.down(F.silu(g) * u)

  def rope(x, cos, sin):
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  class Model(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = torch.nn.Embedding(v, d)
      self.blocks = torch.nn.ModuleList([Block() for _ in range(model_cfg.num_layers)])
      self.norm = torch.nn.RMSNorm(d, eps=1e-5)

    def forward(self, tokens):
      freq = model_cfg.rope_theta ** (-torch.arange(0, hd, 2).float() / hd)
      ang = torch.arange(l).float()[:, None] * freq
      cos, sin = ang.cos(), ang.sin()
      x = self.embed(tokens)
      for blk in self.blocks:
        x = blk(x, cos, sin)
      return self.norm(x) @ self.embed.weight.T

  model = Model()
  opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.b1, cfg.train.b2),
                          weight_decay=cfg.train.weight_decay)
  tokens = torch.randint(4, v, (b, l))

  def run(steps):
    for _ in range(steps):
      logits = model(tokens)
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
      opt.step()

  return run, torch.__version__, torch.get_num_threads()


def time_rounds(runners: dict, steps: int, rounds: int, seed: int = 0) -> dict:
  """Seconds per step of every round, {runner: [round 1, round 2, ...]}: every runner once per
  round, so that a slow spell of the machine hits all of them alike, in an order shuffled each
  round. A fixed order would bias the pairs: whatever runs after PyTorch starts with XLA's
  thread pool idle (about 1.5 ms slower on this VM, benchmarks/RESULTS.md), always the same one."""
  seconds = {k: [] for k in runners}
  for r in runners.values():
    r(2)  # compile / warm up
  order, rng = list(runners), random.Random(seed)
  for _ in range(rounds):
    rng.shuffle(order)
    for k in order:
      t0 = time.perf_counter()
      runners[k](steps)
      seconds[k].append((time.perf_counter() - t0) / steps)
  return seconds


def paired_ratio(seconds: dict, numerator: str, denominator: str) -> tuple[float, float, float]:
  """(median, lower quartile, upper quartile) over rounds of numerator's time / denominator's.

  Each round's two timings are taken moments apart, so their ratio is far steadier on a shared
  machine than the ratio of two best times, which may come from different quiet spells.
  """
  ratios = sorted(a / b for a, b in zip(seconds[numerator], seconds[denominator]))
  q = len(ratios) // 4
  return statistics.median(ratios), ratios[q], ratios[-1 - q]


def model_config(cfg) -> config_lib.ModelConfig:
  """The ModelConfig of a run config (vocabulary: the config's, or the data's rounded up)."""
  vocab = cfg.model.vocab_size or config_lib.round_vocab(cfg.data.vocab_size)
  return config_lib.ModelConfig.from_config(cfg.model, vocab_size=vocab)


def load_config(path: str):
  cfg = config_files.config_from_file(path)
  if cfg.data.tokenizer in ('sentencepiece', 'byte'):
    # The project's own tokenizers fix their special ids (LLaDA's task needs the mask id); no
    # tokenizer is trained for a benchmark on random tokens.
    from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    tokenizers.resolve_special_ids(cfg, tokenizers.ByteTokenizer())
  return cfg, model_config(cfg)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='experiments/quickstart.py')
  ap.add_argument('--steps', type=int, default=2)
  ap.add_argument('--rounds', type=int, default=30)
  ap.add_argument('--no_torch', action='store_true')
  ap.add_argument('--json', action='store_true')
  ap.add_argument('--also_query_blocks', default='',
                  help='comma-separated model.causal_query_blocks values to time as extra JAX '
                       'rows in the same run, e.g. 1 (the full [L, L] scores)')
  ap.add_argument('--also_attention', default='',
                  help="comma-separated model.attention values to time as extra JAX rows in the "
                       "same run, e.g. xla (the quickstart's default is the 'cpu' kernel)")
  args = ap.parse_args()
  try:
    host_malloc = 'reuse' if host_memory.reuse_freed_memory() else 'default'  # before the backend
  except ValueError as e:
    ap.error(str(e))
  if args.steps < 1 or args.rounds < 1:
    ap.error('--steps and --rounds must be >= 1')
  try:
    cfg, model_cfg = load_config(args.config)
  except config_lib.ConfigError as e:
    ap.error(str(e))
  # Every argument is checked before anything is measured or compiled.
  try:
    extra_blocks = [int(b) for b in args.also_query_blocks.split(',') if b.strip()]
  except ValueError:
    ap.error(f'--also_query_blocks={args.also_query_blocks!r} is not a comma-separated list of '
             'ints')
  if any(b < 1 for b in extra_blocks):
    ap.error('--also_query_blocks values must be >= 1')
  choices = config_lib.choices('model.attention')
  extra_attention = [a.strip() for a in args.also_attention.split(',') if a.strip()]
  for impl in extra_attention:
    if impl not in choices:
      ap.error(f'--also_attention: {impl!r} is not one of {choices}')
  peak = metrics.measure_matmul_peak()
  fpt = metrics.flops_per_token(model_cfg, cfg.data.seq_len)
  tokens = cfg.data.batch_size * cfg.data.seq_len

  runners = {'pathways_jax': compiled_runner(cfg, model_cfg)[0]}
  for b in extra_blocks:
    runners[f'pathways_jax qb={b}'] = compiled_runner(
        cfg, model_cfg.replace(causal_query_blocks=b))[0]
  for impl in extra_attention:
    runners[f'pathways_jax {impl}'] = compiled_runner(cfg, model_cfg.replace(attention=impl))[0]
  torch_info = None
  if not args.no_torch:
    try:
      run, version, threads = torch_runner(cfg, model_cfg)
      runners['pytorch_eager'] = run
      torch_info = {'version': version, 'threads': threads}
    except ImportError:
      print('(torch not installed: install the `bench` extra for the PyTorch column)')
  seconds = time_rounds(runners, args.steps, args.rounds)
  best = {k: min(v) for k, v in seconds.items()}

  rows = {k: {'tokens_per_s': tokens / s, 'mfu': tokens / s * fpt / peak,
              'median_tokens_per_s': tokens / statistics.median(seconds[k])}
          for k, s in best.items()}
  dims = {k: getattr(model_cfg, k) for k in ('num_layers', 'd_model', 'num_heads', 'num_kv_heads',
                                              'mlp_dim', 'vocab_size')}
  dims.update(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size)
  ratio = paired = None
  if 'pytorch_eager' in rows:
    ratio = rows['pathways_jax']['tokens_per_s'] / rows['pytorch_eager']['tokens_per_s']
    paired = paired_ratio(seconds, 'pytorch_eager', 'pathways_jax')
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()}, measured f32 matmul peak '
        f'{peak / 1e9:.1f} GFLOP/s; model {dims}; {fpt / 1e6:.2f} MFLOP/token; host malloc: '
        f'{host_malloc}')
  print(f'best and median of {args.rounds} rounds (shuffled order) of {args.steps} steps; MFU of the '
        f'best (pathways_jax: attention={model_cfg.attention}, '
        f'causal_query_blocks={model_cfg.causal_query_blocks})')
  print(f"{'implementation':<20} {'tokens/s':>10} {'median':>10} {'MFU':>7}")
  for k, r in rows.items():
    print(f"{k:<20} {r['tokens_per_s']:>10,.0f} {r['median_tokens_per_s']:>10,.0f} "
          f"{r['mfu']:>7.1%}")
  if ratio:
    print(f'ratio pathways_jax / pytorch_eager: {ratio:.2f}x of the best times; per round '
          f'{paired[0]:.2f}x median (quartiles {paired[1]:.2f}-{paired[2]:.2f})')
  if args.json:
    print(json.dumps({**dims, 'tokens_per_s': rows['pathways_jax']['tokens_per_s'],
                      'mfu': rows['pathways_jax']['mfu'], 'matmul_peak_flops': peak,
                      'pytorch_tokens_per_s': rows.get('pytorch_eager', {}).get('tokens_per_s'),
                      'ratio_vs_pytorch': ratio,
                      'ratio_vs_pytorch_paired_median': paired and paired[0],
                      'median_tokens_per_s': rows['pathways_jax']['median_tokens_per_s'],
                      'attention': model_cfg.attention, 'torch': torch_info,
                      'device': jax.devices()[0].device_kind, 'host_malloc': host_malloc}))


if __name__ == '__main__':
  main()
