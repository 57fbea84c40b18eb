"""The streaming reader of prepared datasets: throughput and memory against corpus size.

    python benchmarks/data_pipeline.py [--sizes=1e7,1e8] [--dir=/tmp/pathways_jax_data_bench]
                                       [--batches=3000] [--json]

For each size, a corpus of that many byte tokens is written on the spot (text files of random
words, documents of 10 to 400 words), prepared (`python -m pathways_jax.data.prepare`'s function,
one worker per CPU) into rows of the quickstart's shape (16 x 128), and read back through the
training iterator (`corpus='prepared'`: index shuffle, process slice, row decoding) in a fresh
process, which reports its tokens/s and resident memory: after the first 100 batches and at the
end. The in-memory pipeline (`corpus='path'`, which tokenises and packs a whole split in every
process) is read the same way as the control. The train step of the quickstart model (its
jitted step on a fixed batch, as benchmarks/train_throughput.py times it) is timed in the same
run for the consumption side. Corpora and datasets are kept in --dir for reruns.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

_WORDS = ('the of and to in is for on that with as by this from be are or an it at which data '
          'model train token layer value return import class def self none true false while '
          'gradient attention diffusion mask sample step loss batch shard mesh device').split()


def _rss_mib(key: str = 'VmRSS') -> float:
  """Resident memory now, or its peak (VmHWM: unlike getrusage's ru_maxrss, it is not carried
  over from the parent that forked this process)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(key + ':'):
        return int(line.split()[1]) / 1024
  return float('nan')


def make_corpus(folder: str, tokens: int, seed: int = 0) -> None:
  """Text files of ~4 MB whose byte count (+2 per document: bos/eos) reaches `tokens`."""
  done = os.path.join(folder, '.done')
  if os.path.exists(done):
    return
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  words = np.asarray(_WORDS)
  written, k = 0, 0
  while written < tokens:
    docs, size = [], 0
    while size < 4_000_000 and written + size < tokens:
      doc = ' '.join(words[rng.integers(0, len(words), rng.integers(10, 400))])
      docs.append(doc)
      size += len(doc) + 2
    with open(os.path.join(folder, f'part{k:04d}.txt'), 'w') as f:
      f.write('\n\n'.join(docs) + '\n')
    written += size
    k += 1
  open(done, 'w').close()


def _cfg(corpus: str, path: str, cache: str):
  from pathways_jax import config_files  # pylint: disable=g-import-not-at-top
  cfg = config_files.config_from_file(os.path.join(os.path.dirname(__file__), '..', 'experiments',
                                                 'quickstart.py'))
  cfg.data.corpus, cfg.data.path, cfg.data.tokenizer = corpus, path, 'byte'
  cfg.data.cache_dir = cache
  return cfg


def read(corpus: str, path: str, cache: str, batches: int) -> dict:
  """In this (fresh) process: tokens/s of the training iterator and its resident memory."""
  from pathways_jax.data import pipeline, tokenizers  # pylint: disable=g-import-not-at-top
  cfg = _cfg(corpus, path, cache)
  base = _rss_mib()
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(cfg, tokenizers.get_tokenizer(cfg.data))
  for _ in range(100):
    next(it)
  start_s = time.perf_counter() - t0
  warm = _rss_mib()
  t0 = time.perf_counter()
  n = 0
  for _ in range(batches):
    n += int((next(it)['segment_ids'] > 0).sum())
  dt = time.perf_counter() - t0
  return {'tokens_per_s': n / dt, 'rows_per_s': batches * cfg.data.batch_size / dt,
          'start_s': start_s, 'rss_import_mib': base, 'rss_warm_mib': warm,
          'rss_end_mib': _rss_mib(), 'peak_rss_mib': _rss_mib('VmHWM')}


def _read_in_subprocess(corpus, path, cache, batches) -> dict:
  out = subprocess.run([sys.executable, __file__, '--_read', corpus, path, cache, str(batches)],
                       capture_output=True, text=True, check=False,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  if out.returncode:
    raise SystemExit(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def step_tokens_per_s(rounds: int = 20) -> float:
  """The quickstart model's compiled train step on a fixed batch: tokens/s (median of rounds)."""
  from benchmarks import train_throughput  # pylint: disable=g-import-not-at-top
  cfg, model_cfg = train_throughput.load_config(
      os.path.join(os.path.dirname(__file__), '..', 'experiments', 'quickstart.py'))
  run, _ = train_throughput.compiled_runner(cfg, model_cfg)
  run(3)
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    run(2)
    times.append((time.perf_counter() - t0) / 2)
  return cfg.data.batch_size * cfg.data.seq_len / statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--sizes', default='1e7,1e8')
  ap.add_argument('--dir', default='/tmp/pathways_jax_data_bench')
  ap.add_argument('--batches', type=int, default=3000)
  ap.add_argument('--workers', type=int, default=0)
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args()
  from pathways_jax.data import prepare  # pylint: disable=g-import-not-at-top
  results = []
  cache = os.path.join(args.dir, 'cache')
  for size in [int(float(s)) for s in args.sizes.split(',')]:
    corpus = os.path.join(args.dir, f'corpus_{size:.0e}')
    ds = os.path.join(args.dir, f'prepared_{size:.0e}')
    make_corpus(corpus, size)
    cfg = _cfg('path', corpus, cache)
    t0 = time.perf_counter()
    manifest = prepare.prepare(cfg, ds, workers=args.workers, progress=False)
    prep_s = time.perf_counter() - t0
    train = manifest['splits']['train']
    row = {'size': size, 'tokens': train['tokens'], 'rows': train['rows'],
           'shards': len(train['shards']), 'prepare_s': prep_s,
           'prepared': _read_in_subprocess('prepared', ds, cache, args.batches),
           'in_memory': _read_in_subprocess('path', corpus, cache, args.batches)}
    results.append(row)
  step = step_tokens_per_s()
  load = os.getloadavg()
  if args.json:
    print(json.dumps({'results': results, 'step_tokens_per_s': step, 'load': load}))
    return
  print(f'prepared vs in-memory reading, rows of 128 x 16 (quickstart), {os.cpu_count()} CPUs, '
        f'load {load[0]:.1f}')
  print('| corpus tokens | prepare s | shards | reader tokens/s | RSS warm / end / '
        'peak MiB | in-memory tokens/s | in-memory start s | in-memory RSS end / peak MiB |')
  print('|---|---|---|---|---|---|---|---|')
  for r in results:
    p, m = r['prepared'], r['in_memory']
    print(f'| {r["tokens"]:.2e} | {r["prepare_s"]:.1f} | {r["shards"]} | '
          f'{p["tokens_per_s"]:,.0f} | {p["rss_warm_mib"]:.0f} / {p["rss_end_mib"]:.0f} / '
          f'{p["peak_rss_mib"]:.0f} | {m["tokens_per_s"]:,.0f} | {m["start_s"]:.1f} | '
          f'{m["rss_end_mib"]:.0f} / {m["peak_rss_mib"]:.0f} |')
  if len(results) >= 2:
    a, b = results[0]['prepared'], results[-1]['prepared']
    print(f'reader peak RSS growth {results[0]["tokens"]:.1e} -> {results[-1]["tokens"]:.1e} '
          f'tokens: {100 * (b["peak_rss_mib"] / a["peak_rss_mib"] - 1):+.1f}%')
  slowest = min(r['prepared']['tokens_per_s'] for r in results)
  print(f'quickstart train step consumes {step:,.0f} tokens/s; the slowest reader is '
        f'{slowest / step:.0f}x that')


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--_read':
    print(json.dumps(read(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
  else:
    main()
