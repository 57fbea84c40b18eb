"""AR generation of an imported model: pathways_jax's KV-cache sampler vs transformers' `generate`.

    python benchmarks/generation.py [--hf_python=.venv-golden/bin/python] [--size=small]
                                    [--new_tokens=128] [--batches=1,32] [--rounds=3]
                                    [--import_size=1b]

One random Llama checkpoint is built by transformers (in the interpreter `--hf_python`, which has
torch and transformers: `make golden-hf` makes one) and saved as safetensors; both sides decode
greedily from the same prompts for `new_tokens` tokens (EOS off, so every row runs to the end),
in alternating rounds, and the table gives the best round of each side and their ratio. Compile
time (ours) and the first call (theirs) are reported apart. `--import_size` also times
`interop.hf.load_pretrained` of a ~1B-parameter checkpoint (Llama-3.2-1B's shape, random, float32)
in a fresh process and reports its peak host memory: the runtime's before loading, the params'
own (on CPU they live in host memory too) and the transient rest, against the largest tensor file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZES = {  # Llama shapes: hidden, layers, heads, kv heads, intermediate, vocab
    'tiny': (256, 4, 4, 2, 688, 32000),
    'small': (768, 12, 12, 4, 2048, 32000),  # ~150M
    '1b': (2048, 16, 32, 8, 8192, 128256),  # Llama-3.2-1B's shape, 1.24B (untied here)
}

_MAKE = '''
import sys, torch, transformers
h, n, heads, kv, inter, vocab = {shape}
cfg = transformers.LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
    num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, max_position_embeddings=2048,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).eval()
model.save_pretrained({out!r}, safe_serialization=True, max_shard_size='2GB')
'''

_THEIRS = '''
import json, sys, time, numpy as np, torch, transformers
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32).eval()
out = {{}}
for b in {batches}:
  prompt = torch.tensor(np.random.default_rng(b).integers(1, 1000, (b, 16)))
  kw = dict(max_new_tokens={new}, min_new_tokens={new}, do_sample=False, eos_token_id=None,
            pad_token_id=0)
  times = []
  with torch.inference_mode():
    for r in range({rounds} + 1):
      t = time.perf_counter()
      model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
      times.append(time.perf_counter() - t)
  out[b] = {{'first_s': times[0], 'best_s': min(times[1:])}}
print('RESULT', json.dumps(out))
'''

_IMPORT = '''
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
from pathways_jax.interop import hf
import jax
jax.block_until_ready(jax.numpy.zeros(8) + 1)  # the runtime is up: its memory is the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
params, cfg, _ = hf.load_pretrained({path!r})
jax.block_until_ready(params)
secs = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
print('RESULT', json.dumps({{'seconds': secs, 'peak_rss': peak, 'params_bytes': nbytes,
                            'baseline_rss': base}}))
'''


def _run(python: str, code: str) -> dict:
  out = subprocess.run([python, '-c', code], capture_output=True, text=True, check=False)
  for line in out.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  raise RuntimeError(f'{python} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}')


def _ours(path: str, batches, new: int, rounds: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pathways_jax.interop import hf
  from pathways_jax.models.transformer import Transformer
  from pathways_jax.sampling import autoregressive
  params, cfg, _ = hf.load_pretrained(path, tokenizer=False)
  model = Transformer(cfg)
  out = {}
  for b in batches:
    prompt = jnp.asarray(np.random.default_rng(b).integers(1, 1000, (b, 16)), jnp.int32)
    times = []
    for _ in range(rounds + 1):
      t = time.perf_counter()
      jax.block_until_ready(autoregressive.generate(model, params, prompt, key=jax.random.key(0),
                                                    max_new_tokens=new, temperature=0.0))
      times.append(time.perf_counter() - t)
    out[b] = {'first_s': times[0], 'best_s': min(times[1:])}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--hf_python', default=os.path.join(REPO, '.venv-golden', 'bin', 'python'))
  ap.add_argument('--size', default='small', choices=sorted(SIZES))
  ap.add_argument('--new_tokens', type=int, default=128)
  ap.add_argument('--batches', default='1,32')
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--import_size', default='', choices=('',) + tuple(sorted(SIZES)))
  args = ap.parse_args(argv)
  if not os.path.exists(args.hf_python):
    sys.exit(f'--hf_python={args.hf_python} does not exist: `make golden-hf` builds one with '
             'torch and transformers')
  batches = [int(b) for b in args.batches.split(',') if b]
  import jax
  with tempfile.TemporaryDirectory() as tmp:
    if batches:
      _generation(args, batches, tmp, jax)
    if args.import_size:
      _import(args, tmp)


def _generation(args, batches, tmp, jax):
  """The side-by-side table of generation throughput."""
  path = os.path.join(tmp, args.size)
  _run(args.hf_python, _MAKE.format(shape=SIZES[args.size], out=path) + "\nprint('RESULT {}')")
  theirs = _run(args.hf_python, textwrap.dedent(_THEIRS.format(
      path=path, batches=batches, new=args.new_tokens, rounds=args.rounds)))
  ours = _ours(path, batches, args.new_tokens, args.rounds)
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores'
  print(f'\nAR greedy generation, random Llama {args.size} {SIZES[args.size]}, prompt 16, '
        f'{args.new_tokens} new tokens, best of {args.rounds} rounds; {device}')
  print('| batch | pathways_jax tok/s | transformers tok/s | ratio | ours: first call '
        '(compile) s | theirs: first call s |')
  print('|---|---|---|---|---|---|')
  for b in batches:
    o, t = ours[b], theirs[str(b)]
    tok = b * args.new_tokens
    print(f'| {b} | {tok / o["best_s"]:.0f} | {tok / t["best_s"]:.0f} | '
          f'{t["best_s"] / o["best_s"]:.2f}x | {o["first_s"]:.1f} | {t["first_s"]:.1f} |')


def _import(args, tmp):
  """Import time and peak host memory of a big checkpoint, in a fresh process."""
  big = os.path.join(tmp, 'import_' + args.import_size)
  _run(args.hf_python, _MAKE.format(shape=SIZES[args.import_size], out=big)
       + "\nprint('RESULT {}')")
  files = [os.path.join(big, f) for f in os.listdir(big) if f.endswith('.safetensors')]
  largest = max(os.path.getsize(f) for f in files)
  r = _run(sys.executable, _IMPORT.format(repo=REPO, path=big))
  gib = 2.0 ** 30
  transient = r['peak_rss'] - r['baseline_rss'] - r['params_bytes']
  print(f'\nimport of {args.import_size} {SIZES[args.import_size]}: {r["seconds"]:.1f} s; peak '
        f'RSS {r["peak_rss"] / gib:.2f} GiB = runtime before loading {r["baseline_rss"] / gib:.2f}'
        f' + params {r["params_bytes"] / gib:.2f} (on CPU they live in host memory) + '
        f'{transient / gib:.2f} GiB transient, {transient / largest:.2f}x the largest tensor file '
        f'({largest / gib:.2f} GiB, {len(files)} files)')


if __name__ == '__main__':
  main()
