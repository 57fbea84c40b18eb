"""Pre-tokenised rows: a `.npz` file of [N, L] arrays per split, served one example per row.

    config.data.corpus = 'rows'
    config.data.path = 'rows.npz'           # written by `save_rows`
    config.data.tokenizer_path = 'sp.model'  # the tokenizer that made the ids (named, not trained)

For data that is already in the shape a task trains on — a fact sentence with its prompt marked,
an SFT example with its loss mask — rather than documents to pack. The file holds, for each split
(`train`, optionally `validation`), `tokens` plus any per-token fields a task reads (`prompt`,
`loss_mask`, ...), all [N, L], and per-row fields of shape [N] (a multi-LoRA row's
`adapter_ids`: a batch holds them as [B]); `segment_ids` and `positions` default to one segment
spanning the row (1s and 0..L-1). A row's `segment_ids` 0 marks padding, as in packed rows: the
autoregressive task takes no target there. Rows go through the same grain shuffle, process
slicing and checkpointable iterator as packed corpora (`pipeline.make_train_dataset`).
"""
from __future__ import annotations

import os

import numpy as np

from pathways_jax.data.corpora import DataError, EmptySplitError

SPLITS = ('train', 'validation')


def save_rows(path: str, **splits: dict[str, np.ndarray]) -> None:
  """Writes `save_rows(path, train={'tokens': ..., 'prompt': ...}, validation={...})`."""
  flat = {}
  for split, fields in splits.items():
    if split not in SPLITS:
      raise ValueError(f'split {split!r} is not one of {SPLITS}')
    if 'tokens' not in fields:
      raise ValueError(f'the {split} split needs a tokens array')
    for name, values in fields.items():
      flat[f'{split}/{name}'] = np.asarray(values)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **flat)
  os.replace(tmp, path)  # a reader never sees a half-written file


class Rows:
  """Random-access rows of one split: `rows[r]` -> dict of [L] arrays (int32, bools as int32;
  float fields as float32).

  Rows past the end are padding (segment_ids 0), as `pipeline.PackedRows` serves them.
  """

  def __init__(self, path: str, split: str, fields: dict[str, np.ndarray] | None = None):
    """The rows of `split` in the .npz at `path`, or (`fields` given) those arrays."""
    if fields is None:
      try:
        with np.load(path) as f:
          fields = {k.split('/', 1)[1]: f[k] for k in f.files if k.startswith(split + '/')}
      except (OSError, ValueError) as e:
        raise DataError(f'config.data.path={path!r} is not a readable rows file (.npz written by '
                        f'pathways_jax.data.rows.save_rows): {e}') from None
    fields = dict(fields)
    if 'tokens' not in fields:
      raise EmptySplitError(f'rows file {path!r} has no {split} split')
    n, seq_len = fields['tokens'].shape
    for name, values in fields.items():
      if values.shape not in ((n, seq_len), (n,)):
        raise DataError(f'rows file {path!r}: {split}/{name} has shape {values.shape}, '
                        f'{split}/tokens has {(n, seq_len)} (a per-row field: ({n},))')
    if n == 0:
      raise EmptySplitError(f'the {split} split of rows file {path!r} is empty')
    fields.setdefault('segment_ids', np.ones((n, seq_len), np.int32))
    fields.setdefault('positions', np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                   (n, seq_len)))
    # Float fields (a preference pair's margin) stay float32; the rest are ids and masks.
    self.fields = {k: np.asarray(v).astype(
        np.float32 if np.issubdtype(np.asarray(v).dtype, np.floating) else np.int32)
                   for k, v in fields.items()}
    self.tokens = self.fields['tokens']
    self.seq_len = seq_len
    self.row_fields: dict[str, np.ndarray] = {}

  def attach(self, name: str, values: np.ndarray) -> None:
    """Serves `values[r]` as field `name` of row r (values: [len(rows), seq_len])."""
    values = np.asarray(values)
    if values.shape != (len(self), self.seq_len):
      raise ValueError(f'row field {name!r} has shape {values.shape}, the rows are '
                       f'{(len(self), self.seq_len)}: it was made for other rows')
    if name in self.fields:
      raise ValueError(f'row field {name!r} would replace a field of the rows file')
    self.row_fields[name] = values

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def num_tokens(self) -> int:
    return int((self.fields['segment_ids'] > 0).sum())

  def __getitem__(self, r: int) -> dict[str, np.ndarray]:
    if r < 0 or r >= len(self):
      out = {k: np.zeros(v.shape[1:], v.dtype) for k, v in self.fields.items()}
      out.update({k: np.zeros([self.seq_len], v.dtype) for k, v in self.row_fields.items()})
      return out
    out = {k: v[r].copy() for k, v in self.fields.items()}
    out.update({k: v[r].copy() for k, v in self.row_fields.items()})
    return out
