"""The grain pipeline: documents -> tokens -> packed rows -> shuffle -> batch -> process slice.

Shape of the data (B = cfg.data.batch_size // process_count, L = cfg.data.seq_len), all int32:

  tokens       [B, L]  bos + text + eos of each document, 0 (pad) after the last one
  segment_ids  [B, L]  1, 2, 3, ... per document piece in the row; 0 marks padding
  positions    [B, L]  0, 1, 2, ... restarting at every document piece

Design, chosen by measuring on the 2-core CPU: each split is tokenized once and cached as a flat
token array per (corpus, split, tokenizer) hash — sentencepiece-tokenizing the 12 MB stdlib takes
2-10 s (idle vs. busy machine), loading the cache ~50 ms — then packed once into rows by a
best-fit-decreasing packer (~5 ms for the stdlib's 39k rows of 128). Batches then cost ~3 ms
(~300 batches/s of 16x128 on a busy core), far above what a CPU model consumes. The price is that
every process tokenizes the whole split once (cached): right for corpora up to ~1e8 tokens; web
scale TFDS sets would want lazy per-process tokenization instead. A document
longer than L is cut into L-token pieces; each piece is its own segment (positions restart), so no
attention or position ever spans two rows. The rows are a random-access `grain.MapDataset`, which
makes everything after packing pure index arithmetic:

  * shuffle: grain's index shuffle of the rows, reshuffled every epoch, seeded from cfg.seed;
  * batch k of the global batch is shuffled rows [k*G, (k+1)*G) (G = cfg.data.batch_size) and
    process p gets rows [k*G + p*B, k*G + (p+1)*B): the slices are disjoint, together they are
    exactly the batch a single process would see, and the order does not depend on the number of
    processes (a run can resume on a different host count);
  * the iterator state is the next batch index, so `get_state()/set_state()` (or
    `grain.checkpoint.CheckpointSave/CheckpointRestore` in an orbax Composite) resumes exactly.

Two optional extras, off by default (the three fields above are then all a batch holds):

  noise        [B, L]  int32 1 where `data.noise` overwrote the token with a random one (train split
                       only; `inject_noise`: seeded spans over the flat token array, so the noisy
                       stream is the same in every run and packs like the tokens)
  <row field>  [B, L]  per-row arrays attached by the caller (`row_fields=`), indexed by the packed
                       row, e.g. RHO-1's offline reference losses: shuffling, process slices and
                       resume move them with their rows
"""
from __future__ import annotations

import hashlib
import io
import logging
import sys
from typing import Any, Sequence

import grain
import numpy as np

from pathways_jax.data import corpora
from pathways_jax.data import preference as preference_lib
from pathways_jax.data import prepared as prepared_lib
from pathways_jax.data import rows as rows_lib
from pathways_jax.data import sft as sft_lib
from pathways_jax.data.packing import pack  # pylint: disable=unused-import  (re-exported)
from pathways_jax.data import tokenizers as tokenizers_lib

_TOKEN_CACHE_VERSION = 1


EmptySplitError = corpora.EmptySplitError


def check_token_ids(tokens: Any, vocab_size: int) -> None:
  """Raises ValueError naming the first id outside [0, vocab_size)."""
  tokens = np.asarray(tokens)
  if tokens.size == 0:
    return
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= vocab_size:
    bad = lo if lo < 0 else hi
    where = int(np.argmax(tokens.reshape(-1) == bad))
    raise ValueError(f'token id {bad} (at flat position {where}) is outside the vocabulary '
                     f'[0, {vocab_size}): the tokenizer and the model disagree on vocab_size')


# ------------------------------------------------------------------------------------- tokenize

def tokenize_documents(docs: Sequence[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """All documents as one flat array (bos + text + eos each) and their lengths.

  Returns (tokens [sum(lengths)] int32, lengths [num_docs] int64).
  """
  if tokenizer.eos_id is None:
    from pathways_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'the tokenizer {tokenizer.name} has no eos token, which packing documents '
                      'needs (set eos_token in its tokenizer_config.json)')
  pieces, lengths = [], []
  encode_batch = getattr(tokenizer, 'encode_batch', None) or (
      lambda texts: [np.asarray(tokenizer.encode(t), np.int32) for t in texts])
  for start in range(0, len(docs), 256):  # bounded memory: Python int lists are 8x the bytes
    for ids in encode_batch(docs[start:start + 256]):
      # A tokenizer without bos (Qwen's) starts documents with their first token.
      bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
      pieces.append(np.concatenate([bos, ids, [tokenizer.eos_id]]).astype(np.int32))
      lengths.append(len(bos) + len(ids) + 1)
  tokens = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)
  return tokens, np.asarray(lengths, np.int64)


def load_tokens(data_cfg, tokenizer, split: str) -> tuple[np.ndarray, np.ndarray]:
  """`tokenize_documents` of `split`, cached under the cache dir by (corpus, split, tokenizer)."""
  fingerprint = getattr(tokenizer, 'fingerprint', None)
  path = None
  if fingerprint is not None:
    key = hashlib.blake2b(repr((corpora.corpus_fingerprint(data_cfg), split, fingerprint,
                                _TOKEN_CACHE_VERSION)).encode(), digest_size=12).hexdigest()
    path = tokenizers_lib.cache_dir(data_cfg) / 'tokens' / f'{data_cfg.corpus}-{split}-{key}.npz'
    if path.is_file():
      try:
        with np.load(path) as f:
          return f['tokens'].astype(np.int32), f['lengths'].astype(np.int64)
      except Exception:  # a corrupt cache entry is rebuilt, never trusted
        pass
  docs = corpora.load_documents(data_cfg, split)
  if not docs:
    where = data_cfg.get('path') or data_cfg.get('tfds_name') or data_cfg.corpus
    raise EmptySplitError(f'the {split} split of corpus {data_cfg.corpus!r} ({where}) is empty')
  tokens, lengths = tokenize_documents(docs, tokenizer)
  if path is not None:
    buf = io.BytesIO()
    small = tokens.size == 0 or int(tokens.max()) < 2**16
    np.savez(buf, tokens=tokens.astype(np.uint16 if small else np.int32), lengths=lengths)
    tokenizers_lib._atomic_write(path, buf.getvalue())  # pylint: disable=protected-access
  return tokens, lengths


# ----------------------------------------------------------------------------------------- pack

def inject_noise(tokens: np.ndarray, lengths: np.ndarray, *, fraction: float, span_min: int,
                 span_max: int, seed: int, low: int, high: int,
                 exclude: frozenset = frozenset()) -> tuple[np.ndarray, np.ndarray]:
  """Overwrites random spans of the flat token array with random ids in [low, high) but not in
  `exclude` (a tokenizer's special ids among them).

  Spans (lengths uniform in [span_min, span_max]) and the gaps between them (geometric, with the
  mean that makes the spans cover `fraction` of the tokens) are laid over the whole array; each
  document's bos and eos stay intact. Returns (noisy tokens, bool noise mask), same shape.
  """
  tokens = np.asarray(tokens, np.int32)
  n = tokens.size
  noise = np.zeros(n, bool)
  if fraction <= 0 or n == 0:
    return tokens.copy(), noise
  rng = np.random.default_rng([int(seed), 0x5E1EC7])
  mean_span = (span_min + span_max) / 2
  mean_gap = mean_span * (1 - fraction) / fraction
  count = int(n / (mean_span + mean_gap) * 1.2) + 16
  spans = rng.integers(span_min, span_max + 1, count)
  gaps = rng.geometric(1.0 / (1.0 + mean_gap), count) - 1
  starts = np.cumsum(gaps + np.concatenate([[0], spans[:-1]]))
  keep = starts < n
  starts, ends = starts[keep], np.minimum(starts[keep] + spans[keep], n)
  delta = np.zeros(n + 1, np.int64)
  np.add.at(delta, starts, 1)
  np.add.at(delta, ends, -1)
  noise = np.cumsum(delta[:-1]) > 0
  doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  noise[doc_start] = False  # bos
  noise[doc_start + np.asarray(lengths, np.int64) - 1] = False  # eos
  out = tokens.copy()
  count = int(noise.sum())
  holes = sorted(i for i in exclude if low <= i < high)
  if not holes:
    out[noise] = rng.integers(low, high, count, dtype=np.int32)
  else:
    ordinary = np.setdiff1d(np.arange(low, high, dtype=np.int32), np.asarray(holes, np.int32))
    out[noise] = ordinary[rng.integers(0, ordinary.size, count)]
  return out, noise


class PackedRows:
  """Random-access rows of packed documents: `rows[r]` -> dict of int32 [seq_len] arrays.

  With `noise` (bool, aligned to `tokens`) rows also carry the `noise` field; `attach` adds
  per-row arrays of shape [len(rows), seq_len].
  """

  def __init__(self, tokens: np.ndarray, lengths: np.ndarray, seq_len: int,
               noise: np.ndarray | None = None):
    self.tokens = np.asarray(tokens, np.int32)
    self.seq_len = seq_len
    self.num_documents = len(lengths)
    self.row_ptr, self.piece_start, self.piece_len = pack(lengths, seq_len)
    self.noise = None if noise is None else np.asarray(noise, bool)
    if self.noise is not None and self.noise.shape != self.tokens.shape:
      raise ValueError(f'noise shape {self.noise.shape} != tokens shape {self.tokens.shape}')
    self.row_fields: dict[str, np.ndarray] = {}

  def attach(self, name: str, values: np.ndarray) -> None:
    """Serves `values[r]` as field `name` of row r (values: [len(rows), seq_len])."""
    values = np.asarray(values)
    if values.shape != (len(self), self.seq_len):
      raise ValueError(f'row field {name!r} has shape {values.shape}, the packed rows are '
                       f'{(len(self), self.seq_len)}: it was made for other rows')
    if name in ('tokens', 'segment_ids', 'positions', 'noise'):
      raise ValueError(f'row field {name!r} would replace a pipeline field')
    self.row_fields[name] = values

  def __len__(self) -> int:
    return len(self.row_ptr) - 1

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.size)

  @property
  def fill(self) -> float:
    """Fraction of row slots holding tokens (the rest is padding)."""
    return self.num_tokens / max(1, len(self) * self.seq_len)

  def __getitem__(self, r: int) -> dict[str, np.ndarray]:
    L = self.seq_len
    keys = ('tokens', 'segment_ids', 'positions') + (('noise',) if self.noise is not None else ())
    out = {k: np.zeros([L], np.int32) for k in keys}
    out.update({k: np.zeros([L], v.dtype) for k, v in self.row_fields.items()})
    if r < 0 or r >= len(self):  # rows past the end are padding (eval batches fill up with them)
      return out
    for k, v in self.row_fields.items():
      out[k][:] = v[r]
    pos = 0
    for j in range(self.row_ptr[r], self.row_ptr[r + 1]):
      s, n = self.piece_start[j], self.piece_len[j]
      out['tokens'][pos:pos + n] = self.tokens[s:s + n]
      out['segment_ids'][pos:pos + n] = j - self.row_ptr[r] + 1
      out['positions'][pos:pos + n] = np.arange(n)
      if self.noise is not None:
        out['noise'][pos:pos + n] = self.noise[s:s + n]
      pos += n
    return out


def load_packed_rows(cfg, tokenizer, split: str, *, vocab_size: int | None = None
                     ) -> PackedRows | rows_lib.Rows | prepared_lib.PreparedRows:
  """The packed rows of `split` (for corpus 'rows': the file's rows), ids checked against
  `vocab_size`."""
  if cfg.data.corpus in ('rows', 'chat', 'preference', 'prompts'):
    fields = None
    if cfg.data.corpus == 'chat':  # a multi-LoRA run's rows also carry adapter_ids [R]
      fields = sft_lib.load_rows(cfg.data, tokenizer, split,
                                 num_adapters=cfg.model.get('lora_num_adapters', 1))[0]
    elif cfg.data.corpus == 'preference':  # pairs as adjacent segments (data/preference.py)
      fields = preference_lib.load_rows(cfg.data, tokenizer, split)[0]
    elif cfg.data.corpus == 'prompts':  # one left-padded prompt per row (rl/prompts.py)
      from pathways_jax.rl import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
      fields = prompts_lib.load_rows(cfg.data, tokenizer, split)[0]
    rows = rows_lib.Rows(cfg.data.path, split, fields)
    if rows.seq_len != cfg.data.seq_len:
      raise corpora.DataError(f'rows file {cfg.data.path!r} holds rows of {rows.seq_len} tokens; '
                              f'config.data.seq_len={cfg.data.seq_len}')
    check_token_ids(rows.tokens, vocab_size or tokenizer.vocab_size)
    return rows
  if cfg.data.corpus == 'prepared':  # packed already, read row by row from its shards
    return prepared_lib.load_rows(cfg.data, tokenizer, split,
                                  vocab_size=vocab_size or tokenizer.vocab_size)
  tokens, lengths = load_tokens(cfg.data, tokenizer, split)
  check_token_ids(tokens, vocab_size or tokenizer.vocab_size)
  noise_cfg, noise = cfg.data.get('noise'), None
  if split == 'train' and noise_cfg is not None and noise_cfg.fraction > 0:
    low, high, exclude = tokenizers_lib.ordinary_id_range(tokenizer)
    tokens, noise = inject_noise(tokens, lengths, fraction=noise_cfg.fraction,
                                 span_min=noise_cfg.span_min, span_max=noise_cfg.span_max,
                                 seed=noise_cfg.seed, low=low, high=high, exclude=exclude)
  return PackedRows(tokens, lengths, cfg.data.seq_len, noise=noise)


# ---------------------------------------------------------------------------------------- batch

class _ProcessBatches(grain.MapDataset):
  """Batch k = rows [k*G + p*B, k*G + (p+1)*B) of the (shuffled, endless) row order."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local

  def __len__(self) -> int:
    return sys.maxsize  # endless: epochs follow each other, each with its own permutation

  def __str__(self) -> str:
    return f'ProcessBatches(global={self._global}, local={self._local}, offset={self._offset})'

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    first = k * self._global + self._offset
    return _stack([self._parent[first + i] for i in range(self._local)])


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _check_processes(cfg, process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count})')
  if cfg.data.batch_size % process_count:
    raise ValueError(f'config.data.batch_size={cfg.data.batch_size} is not divisible by the '
                     f'{process_count} processes')


def data_seed(seed: int) -> int:
  # Hashing keeps grain's per-epoch seeds (seed + epoch) of nearby run seeds from coinciding.
  return int.from_bytes(hashlib.blake2b(f'data/{seed}'.encode(), digest_size=4).digest(), 'big')


def make_train_dataset(cfg, tokenizer, *, process_index: int = 0, process_count: int = 1,
                       vocab_size: int | None = None, row_fields: dict | None = None
                       ) -> grain.MapDataset:
  """The endless `grain.MapDataset` of this process's training batches (index k = step k).

  `row_fields` {name: [num_rows, L] array} ride along with their packed rows (see `PackedRows`).
  """
  _check_processes(cfg, process_index, process_count)
  rows = load_packed_rows(cfg, tokenizer, 'train', vocab_size=vocab_size)
  for name, values in (row_fields or {}).items():
    rows.attach(name, values)
  ds = grain.MapDataset.source(rows)
  if cfg.data.shuffle:
    ds = ds.shuffle(seed=data_seed(cfg.seed))  # indices past one epoch draw a fresh permutation
  return _ProcessBatches(ds, cfg.data.batch_size, process_index, process_count)


def make_train_iterator(cfg, tokenizer, *, process_index: int = 0, process_count: int = 1,
                        vocab_size: int | None = None, row_fields: dict | None = None
                        ) -> grain.DatasetIterator:
  """A checkpointable iterator of dicts `tokens/segment_ids/positions`, each int32 [B, L].

  B = cfg.data.batch_size // process_count. `vocab_size` (default: the tokenizer's) bounds the
  token ids; pass the model's. State: `it.get_state()` / `it.set_state(state)`, or
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` in an orbax Composite.
  """
  ds = make_train_dataset(cfg, tokenizer, process_index=process_index,
                          process_count=process_count, vocab_size=vocab_size,
                          row_fields=row_fields)
  # Rows are in memory and cheap; worker threads would only fight over the GIL (2 cores).
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def make_eval_batches(cfg, tokenizer, *, process_index: int = 0, process_count: int = 1,
                      vocab_size: int | None = None, row_fields: dict | None = None
                      ) -> list[dict[str, np.ndarray]]:
  """The first `cfg.data.eval_batches` batches of the validation split, unshuffled.

  Same format as training batches. The last batch is filled up with all-padding rows
  (segment_ids 0) when the split runs out, so every batch has the full shape. A corpus without
  validation documents (one document in all) gives [] and a warning. `row_fields` ride along
  with the validation rows, as in `make_train_dataset`.
  """
  _check_processes(cfg, process_index, process_count)
  if cfg.data.eval_batches <= 0 or cfg.data.corpus == 'prompts':
    return []  # prompts have no loss to validate: task 'grpo' evaluates its held-out answers
  try:
    rows = load_packed_rows(cfg, tokenizer, 'validation', vocab_size=vocab_size)
  except EmptySplitError:
    logging.warning('corpus %r has no validation documents: no eval batches', cfg.data.corpus)
    return []
  for name, values in (row_fields or {}).items():
    rows.attach(name, values)
  G, B = cfg.data.batch_size, cfg.data.batch_size // process_count
  n = min(cfg.data.eval_batches, -(-len(rows) // G))
  # PackedRows returns padding past its end, so the last batch is filled, never wrapped.
  return [_stack([rows[k * G + process_index * B + i] for i in range(B)]) for k in range(n)]
