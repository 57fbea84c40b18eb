"""Packing documents into fixed-length rows (best-fit decreasing), shared by the pretraining
pipeline and the SFT rows."""
from __future__ import annotations

import numpy as np


def pack(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Packs documents of `lengths` tokens into rows of `seq_len`.

  Pieces: every document is cut into seq_len-token pieces plus a shorter tail. Full pieces fill a
  row alone; tails are packed best-fit-decreasing: rows are ~100% full on the stdlib, less where
  most documents are just over half a row (synthetic at seq_len 128: ~70%; at 256: ~98%).
  Rows are ordered by their first document, so an unshuffled pass reads the corpus in order.

  Returns (row_ptr [R+1], piece_start [P], piece_len [P]): row r holds the pieces
  row_ptr[r]:row_ptr[r+1], piece i being tokens[piece_start[i] : piece_start[i] + piece_len[i]]
  of the flat token array.
  """
  lengths = np.asarray(lengths, np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  full = lengths // seq_len
  tail = lengths - full * seq_len
  # Full pieces: one row each, vectorised (they are most rows of a code corpus).
  full_doc = np.repeat(np.arange(len(lengths)), full)
  k = np.arange(len(full_doc)) - np.repeat(np.cumsum(full) - full, full)
  full_start = starts[full_doc] + k * seq_len
  # Tails: best fit decreasing. open_rows[c] lists rows with c free tokens; `free_mask` has bit c
  # set when that list is non-empty, so the best fit is the lowest set bit at or above the size.
  rows: list[list[int]] = []  # documents of each tail row
  open_rows: list[list[int]] = [[] for _ in range(seq_len + 1)]
  free_mask = 0
  tail_docs = np.nonzero(tail)[0]
  for d in tail_docs[np.lexsort((tail_docs, -tail[tail_docs]))].tolist():
    size = int(tail[d])
    fit = free_mask >> size
    if fit:
      cap = size + ((fit & -fit).bit_length() - 1)
      r = open_rows[cap].pop()
      if not open_rows[cap]:
        free_mask &= ~(1 << cap)
      rows[r].append(d)
    else:
      r, cap = len(rows), seq_len
      rows.append([d])
    if cap > size:
      open_rows[cap - size].append(r)
      free_mask |= 1 << (cap - size)
  for r in rows:
    r.sort()
  tail_row_doc = np.asarray([d for r in rows for d in r], np.int64)
  # All rows, unsorted: full-piece rows first, then tail rows; then order by (first doc, start).
  counts = np.concatenate([np.ones(len(full_doc), np.int64),
                           np.asarray([len(r) for r in rows], np.int64)])
  p_start = np.concatenate([full_start, starts[tail_row_doc] + full[tail_row_doc] * seq_len])
  p_len = np.concatenate([np.full(len(full_doc), seq_len, np.int64), tail[tail_row_doc]])
  ptr = np.concatenate([[0], np.cumsum(counts)])
  first = p_start[ptr[:-1]]
  perm = np.lexsort((first, np.searchsorted(starts, first, side='right')))
  c = counts[perm]
  idx = np.repeat(ptr[:-1][perm] - (np.cumsum(c) - c), c) + np.arange(int(c.sum()))
  row_ptr = np.concatenate([[0], np.cumsum(c)]).astype(np.int64)
  piece_start, piece_len = p_start[idx], p_len[idx]
  return row_ptr, piece_start, piece_len
