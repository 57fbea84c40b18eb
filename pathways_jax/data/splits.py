"""Train/validation splits by hash: an item's split depends on its own key only, so adding or
removing one document moves no other document across the split."""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

VALIDATION_FRACTION = 0.02
SPLITS = ('train', 'validation')


def _hash01(key: str) -> float:
  return int.from_bytes(hashlib.blake2b(key.encode('utf-8'), digest_size=8).digest(), 'big') / 2**64


def split_of(key: str, fraction: float = VALIDATION_FRACTION) -> str:
  """One item's split by `split_by_hash`'s rule, without its fallback for an empty validation."""
  return 'validation' if _hash01(key) < fraction else 'train'


def split_by_hash(items: Sequence, split: str, key: Callable[[object], str],
                  fraction: float = VALIDATION_FRACTION) -> list:
  """The items of `split`, order preserved: validation gets those whose key hashes below `fraction`."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  h = [_hash01(key(x)) for x in items]
  val = [v < fraction for v in h]
  if not any(val) and len(items) >= 2:
    val[min(range(len(items)), key=h.__getitem__)] = True
  want = split == 'validation'
  return [x for x, v in zip(items, val) if v == want]
