"""Tokenise and pack a corpus once, into ArrayRecord shards that runs stream from.

    python -m pathways_jax.data.prepare --config=experiments/ar_tiny.py --out=DIR \
        [--config.data.corpus=path --config.data.path=FOLDER] [--workers=8]
    python -m pathways_jax.main --config=experiments/ar_tiny.py --workdir=RUN \
        --config.data.corpus=prepared --config.data.path=DIR

The config's `data` section says what to read (corpus 'path', 'tfds', 'stdlib' or 'synthetic'),
the tokenizer and `seq_len`. The corpus is cut into units, each tokenised and packed by one worker
process into one shard per split (`data/prepared.py` has the format):

  path       one unit per file (a folder's files, sorted)
  tfds       ranges of `--records_per_unit` records of the dataset's splits (tfds.data_source)
  stdlib     groups of 64 files
  synthetic  one unit (the generated world is small)

A document goes to validation when the hash of its text (stdlib: of its file name) is below 2%,
the rule of the in-memory corpora; a TFDS dataset's own validation (or test) split is used where
it has one. Rows pack documents best-fit within a unit, so memory is bounded by the largest unit,
not by the corpus. Prepare is resumable: a unit's shards are renamed into place and then marked
done (`parts/`), a rerun does only the units not marked, and the manifest is written last. A
sentencepiece tokenizer is copied into the dataset (runs load it from there); train one on a
sample first for corpora too large to read at once (`data.tokenizer_path`).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import sys
from typing import Any, Iterator

import numpy as np

from pathways_jax.data import corpora
from pathways_jax.data import prepared as fmt
from pathways_jax.data import splits as splits_lib

_LOG = logging.getLogger(__name__)
SOURCES = ('path', 'tfds', 'stdlib', 'synthetic')
_STDLIB_FILES_PER_UNIT = 64
_SETTINGS = 'prepare.json'


# ----------------------------------------------------------------------------------- the units

def make_units(data_cfg, records_per_unit: int) -> list[tuple]:
  """Picklable descriptions of the corpus' pieces, in a fixed order."""
  corpus = data_cfg.corpus
  if corpus == 'path':
    import pathlib  # pylint: disable=g-import-not-at-top
    folder = pathlib.Path(data_cfg.path).expanduser()
    return [('file', str(f)) for f in corpora.path_files(folder)]
  if corpus == 'stdlib':
    files = [p.as_posix() for p in corpora.stdlib_files()]
    return [('stdlib', tuple(files[i:i + _STDLIB_FILES_PER_UNIT]))
            for i in range(0, len(files), _STDLIB_FILES_PER_UNIT)]
  if corpus == 'synthetic':
    return [('synthetic',)]
  if corpus == 'tfds':
    units = []
    for split in ('train', 'validation'):
      source, by_hash = corpora.tfds_source(data_cfg, split)
      if split == 'validation' and by_hash:
        continue  # no held-out split of its own: the train units split by hash
      for start in range(0, len(source), records_per_unit):
        units.append(('tfds', split, by_hash, start, min(start + records_per_unit, len(source))))
    return units
  raise corpora.DataError(f'prepare reads corpus {SOURCES} (config.data.corpus={corpus!r}); '
                          'chat, preference and prompt data are small: they are read in memory')


def unit_documents(data_cfg, unit: tuple) -> Iterator[tuple[str, str]]:
  """(text, split) of every document of `unit`."""
  kind = unit[0]
  if kind == 'file':
    import pathlib  # pylint: disable=g-import-not-at-top
    for doc in corpora.file_documents(pathlib.Path(unit[1]), data_cfg.get('text_field', 'text'),
                                      data_cfg.get('document_separator', '\n\n')):
      yield doc, splits_lib.split_of(doc)
  elif kind == 'stdlib':
    root = corpora.stdlib_root()
    for rel in unit[1]:
      try:
        yield (root / rel).read_text('utf-8'), splits_lib.split_of(rel)
      except (UnicodeDecodeError, OSError):
        continue  # as corpora's stdlib reader does
  elif kind == 'synthetic':
    from pathways_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    for split in ('train', 'validation'):
      for doc in synthetic.documents(data_cfg.synthetic, corpora.synthetic_seed(data_cfg), split):
        yield doc, split
  elif kind == 'tfds':
    _, split, by_hash, start, end = unit
    source, _ = corpora.tfds_source(data_cfg, split)
    field = data_cfg.get('text_field', 'text')
    for i in range(start, end):
      record = source[i]
      if field not in record:
        raise corpora.DataError(f'TFDS dataset {data_cfg.tfds_name!r} has no feature {field!r} '
                                f'(it has {sorted(record)}; config.data.text_field)')
      value = record[field]
      text = value.decode('utf-8') if isinstance(value, bytes) else str(value)
      yield text, (splits_lib.split_of(text) if by_hash else split)


def unit_name(unit: tuple) -> str:
  if unit[0] == 'file':
    return unit[1]
  if unit[0] == 'stdlib':
    return f'stdlib files {unit[1][0]} .. {unit[1][-1]}'
  if unit[0] == 'tfds':
    return f'TFDS {unit[1]} records [{unit[3]}, {unit[4]})'
  return unit[0]


# --------------------------------------------------------------------------------- one worker

_TOKENIZERS: dict = {}


def _tokenizer(spec: tuple):
  if spec not in _TOKENIZERS:
    from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    if spec[0] == 'byte':
      _TOKENIZERS[spec] = tokenizers.ByteTokenizer()
    elif spec[0] == 'sentencepiece':
      _TOKENIZERS[spec] = tokenizers.SentencePieceTokenizer.from_file(spec[1])
    else:
      from pathways_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
      _TOKENIZERS[spec] = hf_tokenizer.HFTokenizer.from_path(spec[1])
  return _TOKENIZERS[spec]


def write_unit(out: str, index: int, unit: tuple, data_cfg, tokenizer_spec: tuple,
               seq_len: int, dtype: str) -> dict[str, Any]:
  """Tokenises, packs and writes one unit's shards; returns its marker (per-split counts)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  tokenizer = _tokenizer(tokenizer_spec)
  docs = {'train': [], 'validation': []}
  for text, split in unit_documents(data_cfg, unit):
    docs[split].append(text)
  marker = {'unit': unit_name(unit), 'splits': {}}
  for split, texts in docs.items():
    info = {'file': f'{split}-{index:05d}.array_record', 'rows': 0, 'tokens': 0,
            'documents': len(texts), 'max_token_id': -1}
    marker['splits'][split] = info
    if not texts:
      continue
    tokens, lengths = pipeline.tokenize_documents(texts, tokenizer)
    row_ptr, piece_start, piece_len = pipeline.pack(lengths, seq_len)
    final = epath.Path(out) / info['file']
    tmp = epath.Path(out) / f'.{info["file"]}.{os.getpid()}.tmp'
    writer = array_record_module.ArrayRecordWriter(str(tmp), fmt.WRITER_OPTIONS)
    try:
      for r in range(len(row_ptr) - 1):
        lo, hi = row_ptr[r], row_ptr[r + 1]
        ids = np.concatenate([tokens[s:s + n]
                              for s, n in zip(piece_start[lo:hi], piece_len[lo:hi])])
        writer.write(fmt.encode_row(piece_len[lo:hi], ids, np.dtype(dtype)))
    finally:
      writer.close()
    tmp.replace(final)
    info.update(rows=len(row_ptr) - 1, tokens=int(tokens.size), max_token_id=int(tokens.max()))
  part = epath.Path(out) / 'parts' / f'{index:05d}.json'
  _write_text(part, json.dumps(marker))
  return marker


def _write_text(path, text: str) -> None:
  tmp = path.parent / f'.{path.name}.{os.getpid()}.tmp'
  tmp.write_text(text)
  tmp.replace(path)


def _safe_write_unit(*args) -> tuple[dict | None, str | None]:
  try:
    return write_unit(*args), None
  except (corpora.DataError, OSError, ValueError) as e:
    name = unit_name(args[2])
    return None, str(e) if name in str(e) else f'{name}: {e}'


# ----------------------------------------------------------------------------------- prepare

def _tokenizer_spec(tokenizer, data_cfg, out) -> tuple[tuple, dict]:
  from etils import epath  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  info = {'kind': data_cfg.tokenizer, 'name': tokenizer.name,
          'fingerprint': getattr(tokenizer, 'fingerprint', None),
          'vocab_size': int(tokenizer.vocab_size)}
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    return ('byte',), info
  if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    path = epath.Path(out) / fmt.TOKENIZER_FILE
    proto = tokenizer.model_proto()
    if not path.exists() or path.read_bytes() != proto:
      path.write_bytes(proto)
    return ('sentencepiece', str(path)), info
  return ('hf', str(data_cfg.tokenizer_path)), info


def prepare(cfg, out: str, *, workers: int = 0, records_per_unit: int = 100_000,
            progress: bool = True) -> dict[str, Any]:
  """Prepares cfg.data's corpus under `out` (resuming a prepare stopped there); the manifest."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  d = cfg.data
  if workers < 0:
    raise corpora.DataError(f'--workers={workers}: give a number of processes, or 0 for one per '
                            'CPU')
  if records_per_unit < 1:
    raise corpora.DataError(f'--records_per_unit={records_per_unit} must be at least 1')
  if d.corpus not in SOURCES:
    make_units(d, records_per_unit)  # raises the error naming the corpus
  if d.get('max_documents', 0) > 0:
    raise corpora.DataError('config.data.max_documents is not applied by prepare: a prepared '
                            'dataset holds the whole corpus')
  out_path = epath.Path(out)
  out_path.mkdir(parents=True, exist_ok=True)
  (out_path / 'parts').mkdir(exist_ok=True)
  for folder in (out_path, out_path / 'parts'):  # shards of units a stopped prepare left half-done
    for stale in folder.glob('.*.tmp'):
      stale.unlink()
  tokenizer = tokenizers.get_tokenizer(d)
  spec, tok_info = _tokenizer_spec(tokenizer, d, out)
  dtype = fmt.token_dtype(tokenizer.vocab_size).name
  settings = {'seq_len': int(d.seq_len), 'tokenizer': tok_info, 'token_dtype': dtype,
              'source': {'corpus': d.corpus, 'fingerprint': corpora.corpus_fingerprint(d),
                         'path': d.get('path', ''), 'tfds_name': d.get('tfds_name', '')},
              'records_per_unit': records_per_unit}
  settings_file = out_path / _SETTINGS
  if settings_file.exists():
    before = json.loads(settings_file.read_text())
    if before != settings:
      diff = [k for k in settings if before.get(k) != settings[k]]
      raise corpora.DataError(
          f'{out} holds a prepare of other settings ({", ".join(diff)}: '
          f'{[before.get(k) for k in diff]} there, {[settings[k] for k in diff]} now): '
          'prepare into another folder, or delete this one')
  else:
    _write_text(settings_file, json.dumps(settings, sort_keys=True))
  units = make_units(d, records_per_unit)
  if not units:
    raise corpora.DataError(f'corpus {d.corpus!r} has nothing to prepare')
  markers: dict[int, dict] = {}
  for i in range(len(units)):
    part = out_path / 'parts' / f'{i:05d}.json'
    if part.exists():
      markers[i] = json.loads(part.read_text())
  todo = [i for i in range(len(units)) if i not in markers]
  if markers:
    _LOG.info('prepare: %d of %d units already done in %s', len(markers), len(units), out)
  args = [(out, i, units[i], d, spec, int(d.seq_len), dtype) for i in todo]
  workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
  errors: list[str] = []
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=len(units), initial=len(markers), unit='unit', disable=not progress,
             desc='prepare')
  if workers == 1:
    results = (_safe_write_unit(*a) for a in args)
  else:
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn'))
    results = pool.map(_safe_write_unit, *zip(*args)) if args else iter(())
  for i, (marker, error) in zip(todo, results):
    if error:
      errors.append(error)
    else:
      markers[i] = marker
    bar.update(1)
  bar.close()
  if workers > 1:
    pool.shutdown()
  if errors:
    raise corpora.DataError(f'{len(errors)} of {len(units)} units could not be prepared (the '
                            'others are kept; rerun after fixing them):\n  ' + '\n  '.join(errors))
  return _write_manifest(out_path, settings, [markers[i] for i in range(len(units))])


def _write_manifest(out_path, settings: dict, markers: list[dict]) -> dict[str, Any]:
  splits = {}
  for split in ('train', 'validation'):
    shards = [m['splits'][split] for m in markers if m['splits'][split]['rows']]
    splits[split] = {'shards': shards, 'rows': sum(s['rows'] for s in shards),
                     'tokens': sum(s['tokens'] for s in shards),
                     'documents': sum(s['documents'] for s in shards),
                     'max_token_id': max([s['max_token_id'] for s in shards], default=-1)}
  if not splits['train']['rows']:
    raise corpora.DataError(f'corpus {settings["source"]} holds no training documents '
                            f'({len(markers)} units read, all empty)')
  manifest = {'format': fmt.FORMAT, 'version': fmt.VERSION, 'seq_len': settings['seq_len'],
              'token_dtype': settings['token_dtype'], 'tokenizer': settings['tokenizer'],
              'source': settings['source'], 'splits': splits}
  _write_text(out_path / fmt.MANIFEST, json.dumps(manifest, indent=1))
  return manifest


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from pathways_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments: {argv[1:]}')
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  cfg = flags.FLAGS.config
  try:
    config_lib.validate(cfg)
    manifest = prepare(cfg, flags.FLAGS.out, workers=flags.FLAGS.workers,
                       records_per_unit=flags.FLAGS.records_per_unit)
  except (config_lib.ConfigError, corpora.DataError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for split, info in manifest['splits'].items():
    print(f'{split}: {info["rows"]} rows of {manifest["seq_len"]}, {info["tokens"]} tokens, '
          f'{info["documents"]} documents, {len(info["shards"])} shards')
  print(f'train with --config.data.corpus=prepared --config.data.path={flags.FLAGS.out}')
  return 0


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top,ungrouped-imports
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from pathways_jax.config_files import parse_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'experiment config file (.py)', lock_config=True)
  flags.DEFINE_string('out', None, 'the prepared dataset\'s folder (created; resumed)',
                      required=True)
  flags.DEFINE_integer('workers', 0, 'worker processes (0: one per CPU)')
  flags.DEFINE_integer('records_per_unit', 100_000, 'TFDS records per unit (one shard each)')
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
