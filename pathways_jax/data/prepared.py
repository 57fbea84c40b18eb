"""Prepared datasets: packed rows in ArrayRecord shards, read by random access.

    python -m pathways_jax.data.prepare --config=CFG --out=DIR      # once (data/prepare.py)
    config.data.corpus = 'prepared'; config.data.path = DIR         # every run

For corpora too large to tokenise in memory on every host (`pipeline.load_tokens` holds a whole
split). A prepared dataset is a folder (local, or wherever etils/array_record reach, e.g. gs://):

    manifest.json                  seq_len, tokenizer (kind, fingerprint, vocab), shards and counts
    tokenizer.model                the sentencepiece model that made the ids (if sentencepiece)
    train-00000.array_record ...   one record per packed row of seq_len tokens
    validation-00000.array_record ...

A record is one row: int32 [n] piece lengths, then the row's tokens (`token_dtype`), n pieces of
whole documents or of one long document, exactly as `pipeline.PackedRows` lays them out
(segment ids 1..n, positions restarting at every piece, padding after). Only the rows a process
asks for are read: `PreparedRows` is a random-access source over every shard of a split
(grain's ArrayRecordDataSource with the row counts from the manifest, so opening a dataset opens
no shard), and the pipeline's index shuffle, process slices and checkpointable iterator work on
it unchanged. Memory does not grow with the corpus: the shuffle is an index permutation computed
on the fly, and each shard's reader holds its chunk index only.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from pathways_jax.data.corpora import DataError, EmptySplitError

FORMAT = 'pathways_jax.prepared'
VERSION = 1
MANIFEST = 'manifest.json'
TOKENIZER_FILE = 'tokenizer.model'
# One record per chunk: every row is one seek away (the ArrayRecord setting for random access).
WRITER_OPTIONS = 'group_size:1'


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def encode_row(piece_lens: np.ndarray, tokens: np.ndarray, dtype: np.dtype) -> bytes:
  """One record: int32 piece count, int32 piece lengths, the tokens as `dtype`."""
  piece_lens = np.asarray(piece_lens, np.int32)
  return (np.int32(len(piece_lens)).tobytes() + piece_lens.tobytes()
          + np.asarray(tokens).astype(dtype).tobytes())


def decode_row(record: bytes, seq_len: int, dtype: np.dtype) -> dict[str, np.ndarray]:
  """A record -> tokens, segment_ids, positions, each int32 [seq_len] (0 after the last piece)."""
  n = int(np.frombuffer(record, np.int32, count=1)[0])
  lens = np.frombuffer(record, np.int32, count=n, offset=4)
  ids = np.frombuffer(record, dtype, offset=4 * (n + 1))
  used = int(ids.size)
  if n < 1 or used != int(lens.sum()) or used > seq_len:
    raise DataError(f'a prepared row is corrupt: {n} pieces of {lens.sum()} tokens, {used} token '
                    f'ids, rows of {seq_len}')
  out = {k: np.zeros([seq_len], np.int32) for k in ('tokens', 'segment_ids', 'positions')}
  out['tokens'][:used] = ids
  starts = np.cumsum(lens) - lens
  out['segment_ids'][:used] = np.repeat(np.arange(1, n + 1, dtype=np.int32), lens)
  out['positions'][:used] = np.arange(used, dtype=np.int32) - np.repeat(starts, lens)
  return out


def read_manifest(path: str) -> dict[str, Any]:
  """DIR/manifest.json, checked; a missing or unreachable folder fails here, at start-up."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  where = epath.Path(path) / MANIFEST
  try:
    text = where.read_text()
  except Exception as e:  # epath raises per-backend types (FileNotFoundError, gcs errors, ...)
    raise DataError(f'config.data.path={path!r} is not a prepared dataset: cannot read {where} '
                    f'({type(e).__name__}: {e}); make one with python -m '
                    'pathways_jax.data.prepare') from None
  try:
    manifest = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f'{where} is not valid JSON ({e.msg}): the dataset is corrupt; prepare it '
                    'again') from None
  if manifest.get('format') != FORMAT or manifest.get('version') != VERSION:
    raise DataError(f'{where} is not a {FORMAT} v{VERSION} manifest (format '
                    f'{manifest.get("format")!r}, version {manifest.get("version")!r})')
  return manifest


def check_matches(manifest: dict, path: str, *, seq_len: int, tokenizer) -> None:
  """Refuses a dataset made for another sequence length or tokenizer, naming both values."""
  if manifest['seq_len'] != seq_len:
    raise DataError(f'prepared dataset {path} has rows of seq_len={manifest["seq_len"]}, the run '
                    f'has config.data.seq_len={seq_len}: prepare it again for this length')
  want = manifest['tokenizer']
  got = getattr(tokenizer, 'fingerprint', None)
  if want['fingerprint'] != got:
    raise DataError(f'prepared dataset {path} was tokenized by {want["name"]} '
                    f'({want["fingerprint"]}), the run\'s tokenizer is {tokenizer.name} ({got}): '
                    'set config.data.tokenizer / tokenizer_path to the dataset\'s')


class PreparedRows:
  """Random-access rows of one split of a prepared dataset: `rows[r]` -> dict of int32 [L].

  Rows past the end are padding (segment_ids 0), as `pipeline.PackedRows` serves them.
  """

  def __init__(self, path: str, split: str, manifest: dict | None = None):
    from etils import epath  # pylint: disable=g-import-not-at-top
    import grain  # pylint: disable=g-import-not-at-top
    self.path = str(path)
    self.manifest = manifest or read_manifest(self.path)
    info = self.manifest['splits'].get(split)
    if not info or not info['rows']:
      raise EmptySplitError(f'the {split} split of prepared dataset {self.path} is empty')
    self.seq_len = int(self.manifest['seq_len'])
    self.dtype = np.dtype(self.manifest['token_dtype'])
    shards = [s for s in info['shards'] if s['rows']]
    # "file[0:n]" tells grain the row count: no shard is opened until a row of it is read.
    self._source = grain.sources.ArrayRecordDataSource(
        [f'{epath.Path(self.path) / s["file"]}[0:{s["rows"]}]' for s in shards])
    self._rows = int(info['rows'])
    if len(self._source) != self._rows:
      raise DataError(f'prepared dataset {self.path}: the {split} shards hold '
                      f'{len(self._source)} rows, the manifest says {self._rows}')
    self.num_tokens = int(info['tokens'])
    self.num_documents = int(info['documents'])
    self.max_token_id = int(info['max_token_id'])
    # The dataset's identity (e.g. RHO-1's cache of reference losses per row is keyed by it).
    self.identity = hashlib.blake2b(json.dumps([self.path, split, info], sort_keys=True).encode(),
                                    digest_size=12).hexdigest()
    self.row_fields: dict[str, np.ndarray] = {}

  def __len__(self) -> int:
    return self._rows

  @property
  def fill(self) -> float:
    """Fraction of row slots holding tokens (the rest is padding)."""
    return self.num_tokens / max(1, len(self) * self.seq_len)

  def attach(self, name: str, values: np.ndarray) -> None:
    """Serves `values[r]` as field `name` of row r (values: [len(rows), seq_len], in memory)."""
    values = np.asarray(values)
    if values.shape != (len(self), self.seq_len):
      raise ValueError(f'row field {name!r} has shape {values.shape}, the prepared rows are '
                       f'{(len(self), self.seq_len)}: it was made for other rows')
    if name in ('tokens', 'segment_ids', 'positions'):
      raise ValueError(f'row field {name!r} would replace a pipeline field')
    self.row_fields[name] = values

  def __getitem__(self, r: int) -> dict[str, np.ndarray]:
    if r < 0 or r >= len(self):
      out = {k: np.zeros([self.seq_len], np.int32) for k in ('tokens', 'segment_ids', 'positions')}
    else:
      out = decode_row(self._source[r], self.seq_len, self.dtype)
    for k, v in self.row_fields.items():
      out[k] = v[r].copy() if 0 <= r < len(self) else np.zeros([self.seq_len], v.dtype)
    return out


def load_rows(data_cfg, tokenizer, split: str, *, vocab_size: int) -> PreparedRows:
  """The `split` rows of the dataset at data_cfg.path, checked against the run's settings."""
  manifest = read_manifest(data_cfg.path)
  check_matches(manifest, data_cfg.path, seq_len=data_cfg.seq_len, tokenizer=tokenizer)
  rows = PreparedRows(data_cfg.path, split, manifest)
  if rows.max_token_id >= vocab_size:
    raise ValueError(f'prepared dataset {data_cfg.path} holds token id {rows.max_token_id}, '
                     f'outside the vocabulary [0, {vocab_size}): the tokenizer and the model '
                     'disagree on vocab_size')
  return rows
