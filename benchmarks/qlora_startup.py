"""Host/device memory at the start of a LoRA and a QLoRA run from a HuggingFace base.

    python benchmarks/qlora_startup.py [--layers=8] [--d_model=1536] [--mlp_dim=6144]
        [--qtypes=int8,nf4] [--steps=1]

Writes a random base of the given size as a HuggingFace directory (float32 safetensors), then
trains each arm for `--steps` steps from it (`train.init_from`) in a fresh process of its own:
LoRA (the base held in float) and QLoRA with each of `--qtypes`. A process's peak resident
memory (the kernel's ru_maxrss from `os.wait4`) is where XLA:CPU keeps its buffers, so on CPU
it measures what a GPU run would need on the device at its start (the float base loaded,
split, saved and quantised) plus the host runtime. The same process first starts the backend
and runs a one-layer run the same way (the `floor`: imports, compilers, the data pipeline), and
the table gives each arm's peak above that floor in units of the float base's bytes.

glibc keeps freed buffers in its heap, where later allocations fragment it, so with its own
(dynamic) mmap threshold the peak RSS of a run that frees many weight-sized buffers counts
memory no array holds (measured: a 16-layer QLoRA start held 1792 MiB, 982 after
`malloc_trim(0)`). The runs therefore set MALLOC_MMAP_THRESHOLD_=131072 by default, so a freed
buffer of 128 KiB or more goes back to the OS at once and the peak RSS follows the live arrays
(`--mmap_threshold=0`: glibc's own behaviour). GPU and TPU memory is XLA's own allocator's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position


def run_config(work: str, *, layers: int, d_model: int, mlp_dim: int, init_from: str = '',
               qtype: str = '', steps: int = 1):
  """A run on the synthetic world's text (the base's byte-level tokenizer), one LoRA adapter of
  rank 8 when it starts from a base."""
  from pathways_jax.config import base_config
  c = base_config()
  c.data.corpus = 'synthetic'
  c.data.tokenizer = 'byte'  # the floor's; a run from the base takes the base's tokenizer
  c.data.cache_dir = os.path.join(work, 'cache')
  c.data.seq_len = 64
  c.data.batch_size = 2
  c.data.eval_batches = 0
  c.model.d_model = d_model
  c.model.num_layers = layers
  c.model.num_heads = max(1, d_model // 128)
  c.model.num_kv_heads = max(1, d_model // 128)
  c.model.mlp_dim = mlp_dim
  c.model.max_len = 64
  # One layer's weights dequantised at a time, forward and backward (docs/qlora.md): unscanned,
  # XLA:CPU dequantises every layer's up front whatever the remat policy.
  c.model.scan_layers = True
  c.model.remat = 'full'
  c.model.lora_rank = 8 if init_from else 0
  c.model.lora_quantize = qtype
  c.train.init_from = init_from
  c.train.steps = steps
  c.train.warmup_steps = 1
  c.train.log_every = 1
  c.train.eval_every = 10**9
  c.train.checkpoint_every = 10**9
  c.train.async_checkpoints = False
  c.train.progress_bar = False
  c.train.peak_flops = 1e10  # no start-up matmul measurement
  c.sample.prompts = ()
  return c


def byte_level_tokenizer():
  """A byte-level tokenizer.json without merges (256 bytes and 3 specials): the runs' tokens."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from pathways_jax.data import hf_tokenizer
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(['a'], trainers.BpeTrainer(
      vocab_size=259, special_tokens=['<pad>', '<s>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return hf_tokenizer.HFTokenizer(tok.to_str(), {'bos_token': '<s>', 'eos_token': '</s>',
                                                 'pad_token': '<pad>'})


def make_base(work: str, **dims) -> tuple[str, int]:
  """(HF directory, float32 bytes of its params) of a random base of the given size."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from pathways_jax import config as config_lib
  from pathways_jax.interop import hf
  from pathways_jax.models.transformer import Transformer
  cfg = run_config(work, **dims)
  tok = byte_level_tokenizer()
  mcfg = config_lib.ModelConfig.from_config(cfg.model,
                                            vocab_size=config_lib.round_vocab(tok.vocab_size))
  params = nn.unbox(jax.jit(Transformer(mcfg).init)(jax.random.key(0),
                                                    jnp.zeros((1, 8), jnp.int32))['params'])
  out = os.path.join(work, 'base_hf')
  hf.save_pretrained(params, mcfg, out, dtype='float32', tokenizer=tok)
  return out, sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))


def child(args) -> None:
  """One arm: the run (or, as --arm=base, writing the base), its numbers as stdout's last line."""
  import resource
  if args.arm == 'base':
    base, base_bytes = make_base(args.work, layers=args.layers, d_model=args.d_model,
                                 mlp_dim=args.mlp_dim)
    print(json.dumps({'base': base, 'base_bytes': base_bytes}))
    return
  from pathways_jax.train import loop
  cfg = run_config(args.work, layers=args.layers, d_model=args.d_model, mlp_dim=args.mlp_dim,
                   init_from=args.init_from, qtype=args.qtype, steps=args.steps)
  res = loop.train(cfg, os.path.join(args.work, f'run_{args.arm}'), quiet=True)
  print(json.dumps({'peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    'qlora': res.get('qlora')}))


def measure(argv: list[str], mmap_threshold: int = 0) -> dict:
  """Runs `child` in a fresh process; its peak RSS by os.wait4 and its printed numbers. Linux
  carries a process's peak RSS across exec, so this parent stays small (no JAX imported here):
  a child forked from a large parent would report the parent's size."""
  env = dict(os.environ)
  if mmap_threshold:
    env['MALLOC_MMAP_THRESHOLD_'] = str(mmap_threshold)
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--_child', *argv],
                          stdout=subprocess.PIPE, text=True, env=env)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit(f'arm {argv} failed ({proc.returncode}); its output:\n{out[-3000:]}')
  numbers = json.loads(out.strip().splitlines()[-1])
  numbers['peak_mib'] = usage.ru_maxrss / 1024
  return numbers


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--d_model', type=int, default=1536)
  p.add_argument('--mlp_dim', type=int, default=6144)
  p.add_argument('--qtypes', default='int8,nf4')
  p.add_argument('--steps', type=int, default=1)
  p.add_argument('--mmap_threshold', type=int, default=131072,
                 help="glibc's MALLOC_MMAP_THRESHOLD_ for the runs (0: glibc's own, dynamic)")
  p.add_argument('--_child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--work', help=argparse.SUPPRESS)
  p.add_argument('--arm', help=argparse.SUPPRESS)
  p.add_argument('--init_from', default='', help=argparse.SUPPRESS)
  p.add_argument('--qtype', default='', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._child:  # pylint: disable=protected-access
    return child(args)
  from pathways_jax.adapters.qlora import QTYPES  # pylint: disable=g-import-not-at-top
  qtypes = [q.strip() for q in args.qtypes.split(',') if q.strip()]
  unknown = [q for q in qtypes if q not in QTYPES]
  if unknown or not qtypes:
    p.error(f'--qtypes={args.qtypes!r}: each must be one of {", ".join(QTYPES)}')
  dims_argv = ['--layers', str(args.layers), '--d_model', str(args.d_model),
               '--mlp_dim', str(args.mlp_dim)]
  with tempfile.TemporaryDirectory(prefix='qlora_startup_') as work:
    common = ['--work', work, '--steps', str(args.steps)]
    made = measure(['--arm', 'base', *dims_argv, *common])
    base, base_bytes = made['base'], made['base_bytes']
    floor = measure(['--arm', 'floor', '--layers', '1', '--d_model', '128', '--mlp_dim', '256',
                     *common], args.mmap_threshold)['peak_mib']
    rows = []
    for arm, qtype in [('lora', '')] + [(f'qlora_{q}', q) for q in qtypes]:
      r = measure(['--arm', arm, '--init_from', base, '--qtype', qtype, *dims_argv, *common],
                  args.mmap_threshold)
      rows.append((arm, r))
  base_mib = base_bytes / 2**20
  print(f'\nbase: {args.layers} layers, d={args.d_model}, mlp {args.mlp_dim}: '
        f'{base_mib:.0f} MiB in float32; floor (a 1-layer d=128 run): {floor:.0f} MiB peak RSS; '
        f'MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or "glibc default"}')
  print('| arm | dense weights held (MiB) | peak RSS (MiB) | above the floor (MiB) | '
        'above the floor / float base |')
  print('|---|---|---|---|---|')
  for arm, r in rows:
    held = (r['qlora']['dense_bytes_stored'] if r.get('qlora')
            else None)
    held = f'{held / 2**20:.0f}' if held is not None else 'float'
    above = r['peak_mib'] - floor
    print(f'| {arm} | {held} | {r["peak_mib"]:.0f} | {above:.0f} | {above / base_mib:.2f} |')


if __name__ == '__main__':
  main()
