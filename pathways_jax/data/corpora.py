"""Document sources: the embedded corpora (stdlib, synthetic), files by path, and TFDS.

`load_documents(cfg.data, split)` returns the documents of one split as a list of strings, in a
deterministic order. Each corpus splits train/validation deterministically by a hash, never by
position, so adding or removing one document moves no other document across the split:

  stdlib     the running interpreter's standard library *.py files (no site-packages, no test
             suites: those are half the bytes and mostly repetitive fixtures); split by the hash of
             the file's relative path. ~730 files, ~12 MB on CPython 3.11.
  synthetic  the seeded world of `pathways_jax.data.synthetic` (split by document hash).
  path       a .txt/.md file, a .jsonl file (field `data.text_field`), or a folder of them
             (recursive, sorted). Text files are cut into documents at `data.document_separator`
             (default: a blank line); an empty separator makes each file one document. Split by
             the hash of the document text, so duplicates never straddle the split.
  tfds       `tfds.data_source(data.tfds_name)` (ArrayRecord, random access, no TensorFlow at
             read time). 'validation' reads the dataset's 'validation' or else 'test' split; a
             dataset with neither is split by document hash from 'train'.

A split that would come out empty while the corpus has two or more documents takes the one
document with the smallest hash, so small corpora still have a validation set.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import sysconfig
from typing import Iterable

from pathways_jax.data.splits import SPLITS, VALIDATION_FRACTION, split_by_hash

TEXT_SUFFIXES = ('.txt', '.md', '.text')
JSONL_SUFFIXES = ('.jsonl',)
_STDLIB_SKIP_DIRS = frozenset(('site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
                               '__pycache__'))


class DataError(ValueError):
  """A corpus that cannot be read; the message names the path (and line) at fault."""


class EmptySplitError(DataError):
  """A split without documents (e.g. the validation split of a one-document corpus)."""


# ---------------------------------------------------------------------------------------- stdlib

def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stdlib_files() -> list[pathlib.Path]:
  root = stdlib_root()
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel = pathlib.Path(dirpath).relative_to(root)
    # config-3.X-<platform>/ holds build helpers, not library code.
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _STDLIB_SKIP_DIRS and not d.startswith('config-'))
    for name in sorted(filenames):
      # _sysconfigdata_* is generated per machine; keep the corpus the same across builds.
      if name.endswith('.py') and not name.startswith('_sysconfigdata'):
        files.append(rel / name)
  return sorted(files, key=lambda p: p.as_posix())


def _stdlib_documents(split: str) -> list[str]:
  root = stdlib_root()
  docs = []
  for rel in split_by_hash(stdlib_files(), split, key=lambda p: p.as_posix()):
    try:
      docs.append((root / rel).read_text('utf-8'))
    except (UnicodeDecodeError, OSError):
      continue  # a few legacy-encoded or unreadable files: skipping them keeps the corpus usable
  return docs


# ------------------------------------------------------------------------------------------ path

def _read_utf8(path: pathlib.Path) -> str:
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f'cannot read corpus file {path}: {e.strerror or e}') from None
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'corpus file {path} is not UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r});'
                    ' convert it, e.g. iconv -t UTF-8') from None


def path_files(path: pathlib.Path) -> list[pathlib.Path]:
  if not path.exists():
    raise DataError(f'corpus path {path} does not exist (config.data.path)')
  if path.is_file():
    return [path]
  files = sorted((p for p in path.rglob('*') if p.is_file()
                  and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                  and not any(part.startswith('.') for part in p.relative_to(path).parts)),
                 key=lambda p: p.as_posix())
  if not files:
    raise DataError(f'corpus folder {path} has no {"/".join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files')
  return files


def file_documents(path: pathlib.Path, text_field: str, separator: str) -> Iterable[str]:
  text = _read_utf8(path)
  if path.suffix.lower() in JSONL_SUFFIXES:
    for lineno, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{lineno}: invalid JSON ({e.msg})') from None
      if not isinstance(record, dict) or text_field not in record:
        raise DataError(f'{path}:{lineno}: no field {text_field!r} (config.data.text_field)')
      value = record[text_field]
      if not isinstance(value, str):
        raise DataError(f'{path}:{lineno}: field {text_field!r} is {type(value).__name__}, not text')
      if value.strip():
        yield value
    return
  text = text.replace('\r\n', '\n')
  pieces = _split_paragraphs(text) if separator == '\n\n' else (
      text.split(separator) if separator else [text])
  for piece in pieces:
    if piece.strip():
      yield piece.strip('\n')


def _split_paragraphs(text: str) -> list[str]:
  """Splits at runs of blank lines (lines holding only whitespace count as blank)."""
  docs, cur = [], []
  for line in text.split('\n'):
    if line.strip():
      cur.append(line)
    elif cur:
      docs.append('\n'.join(cur))
      cur = []
  if cur:
    docs.append('\n'.join(cur))
  return docs


def _path_documents(data_cfg, split: str) -> list[str]:
  path = pathlib.Path(data_cfg.path).expanduser()
  separator = data_cfg.get('document_separator', '\n\n')
  docs = [d for f in path_files(path)
          for d in file_documents(f, data_cfg.get('text_field', 'text'), separator)]
  if not docs:
    raise DataError(f'corpus path {path} holds no documents (empty or only whitespace)')
  return split_by_hash(docs, split, key=lambda d: d)


# ------------------------------------------------------------------------------------------ tfds

def tfds_source(data_cfg, split: str):
  import tensorflow_datasets as tfds
  name, data_dir = data_cfg.tfds_name, data_cfg.get('tfds_data_dir') or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    available = list(builder.info.splits.keys())
  except Exception as e:  # tfds raises a zoo of types for "not found"
    raise DataError(f'TFDS dataset {name!r} is not available in data_dir={data_dir!r}: {e}') from None
  if not available:
    raise DataError(f'TFDS dataset {name!r} in data_dir={data_dir!r} is not prepared '
                    '(run `tfds build` where it can download, then copy the data_dir)')
  if split == 'train':
    tfds_split, by_hash = 'train', not ({'validation', 'test'} & set(available))
  else:
    tfds_split = next((s for s in ('validation', 'test') if s in available), 'train')
    by_hash = tfds_split == 'train'
  if tfds_split not in available:
    raise DataError(f'TFDS dataset {name!r} has no split {tfds_split!r} (it has {available})')
  source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
  return source, by_hash


def _tfds_documents(data_cfg, split: str) -> list[str]:
  source, by_hash = tfds_source(data_cfg, split)
  field = data_cfg.get('text_field', 'text')
  limit = data_cfg.get('max_documents', 0)
  n = len(source) if (by_hash or not limit) else min(limit, len(source))
  docs = []
  for i in range(n):
    record = source[i]
    if field not in record:
      raise DataError(f'TFDS dataset {data_cfg.tfds_name!r} has no feature {field!r} '
                      f'(it has {sorted(record)}; config.data.text_field)')
    value = record[field]
    docs.append(value.decode('utf-8') if isinstance(value, bytes) else str(value))
  return split_by_hash(docs, split, key=lambda d: d) if by_hash else docs


# ---------------------------------------------------------------------------------------- public

def load_documents(data_cfg, split: str) -> list[str]:
  """The documents of `split` ('train' | 'validation') of the configured corpus, in fixed order.

  `data_cfg.max_documents` > 0 keeps only the first N documents of each split.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  corpus = data_cfg.corpus
  if corpus == 'stdlib':
    docs = _stdlib_documents(split)
  elif corpus == 'synthetic':
    from pathways_jax.data import synthetic
    docs = synthetic.documents(data_cfg.synthetic, synthetic_seed(data_cfg), split)
  elif corpus == 'path':
    docs = _path_documents(data_cfg, split)
  elif corpus == 'tfds':
    docs = _tfds_documents(data_cfg, split)
  elif corpus in ('rows', 'prepared'):
    raise ValueError(f"config.data.corpus={corpus!r} holds token rows, not documents "
                     '(pathways_jax.data.rows, pathways_jax.data.prepared)')
  elif corpus == 'chat':
    raise ValueError("config.data.corpus='chat' holds conversations, not documents: the "
                     'tokenizer must be given (config.data.tokenizer_path, or bytes)')
  else:
    raise ValueError(f"config.data.corpus={corpus!r} is not one of "
                     "('stdlib', 'synthetic', 'path', 'tfds', 'prepared', 'rows', 'chat')")
  if data_cfg.get('max_documents', 0) > 0:
    docs = docs[:data_cfg.max_documents]
  return docs


def synthetic_seed(data_cfg) -> int:
  """The world's seed: `data.synthetic.seed`, fixed apart from the training seed on purpose."""
  return int(data_cfg.synthetic.get('seed', 0))


def corpus_fingerprint(data_cfg) -> str:
  """A cheap identity of the corpus `data_cfg` selects (no document is read).

  It changes when the documents could: file names, sizes and modification times for stdlib and
  path corpora, the generator settings for synthetic, the dataset name/dir for tfds.
  """
  corpus = data_cfg.corpus
  parts: list = [corpus, data_cfg.get('max_documents', 0), VALIDATION_FRACTION]
  if corpus == 'stdlib':
    root = stdlib_root()
    parts += [sys.version, str(root)]
    for rel in stdlib_files():
      st = (root / rel).stat()
      parts.append((rel.as_posix(), st.st_size, st.st_mtime_ns))
  elif corpus == 'synthetic':
    from pathways_jax.data import synthetic
    parts += [synthetic.GENERATOR_VERSION, synthetic_seed(data_cfg),
              sorted(data_cfg.synthetic.to_dict().items())
              if hasattr(data_cfg.synthetic, 'to_dict') else sorted(dict(data_cfg.synthetic).items())]
  elif corpus == 'path':
    path = pathlib.Path(data_cfg.path).expanduser().resolve()
    parts += [str(path), data_cfg.get('text_field', 'text'),
              data_cfg.get('document_separator', '\n\n')]
    for f in path_files(path):
      st = f.stat()
      parts.append((str(f), st.st_size, st.st_mtime_ns))
  elif corpus == 'tfds':
    data_dir = pathlib.Path(data_cfg.get('tfds_data_dir') or os.environ.get('TFDS_DATA_DIR')
                            or '~/tensorflow_datasets').expanduser().resolve()
    parts += [data_cfg.tfds_name, str(data_dir), data_cfg.get('text_field', 'text')]
    # The prepared files themselves, so a re-prepared dataset is not served from a stale cache.
    base = data_dir / data_cfg.tfds_name.split(':')[0].split('/')[0]
    for dirpath, dirnames, filenames in os.walk(base):
      dirnames.sort()
      for name in sorted(filenames):
        st = os.stat(os.path.join(dirpath, name))
        parts.append((os.path.join(dirpath, name), st.st_size, st.st_mtime_ns))
  else:
    raise ValueError(f'config.data.corpus={corpus!r} is unknown')
  return hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()
