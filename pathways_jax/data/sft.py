"""Supervised fine-tuning data: a JSONL of conversations -> rows with per-token loss masks.

    config.data.corpus = 'chat'
    config.data.path = 'train.jsonl'  # {"messages": [...]} or {"prompt": ..., "completion": ...}
    config.data.chat.train_on = 'assistant'  # or 'all'
    config.data.chat.pack = True  # several conversations per row (segment ids keep them apart)
    config.data.chat.truncation = 'cut'  # a conversation longer than a row: 'cut' or 'drop'

A row's fields (all int32 [L]): `tokens`, `segment_ids` (1, 2, ... per conversation, 0 padding),
`positions` (restarting per conversation), `loss_mask` (1 on the trained tokens: assistant turns
by default, see `data.chat`) and `prompt` (1 on a conversation's untrained tokens: what LLaDA's
SFT never masks). `pack=False` puts one conversation per row; with `eos_padding` (LLaDA's SFT
format) the rest of the row is eos, part of that conversation and trained, so the model learns
where an answer ends; otherwise it is padding (segment 0). Truncation is counted and logged.
The validation split is 2% of the conversations by hash of their line (data.splits).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np

from pathways_jax.data import chat
from pathways_jax.data import splits as splits_lib
from pathways_jax.data.corpora import DataError, EmptySplitError
from pathways_jax.data.packing import pack as pack_lengths

TRUNCATION = ('cut', 'drop')


def read_jsonl(path: str) -> list[tuple[str, list[dict]]]:
  """[(the line, its messages)] of a JSONL file of conversations; errors name path and line."""
  if not os.path.isfile(path):
    raise DataError(f'config.data.path={path!r}: no such file')
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise DataError(f'{path}:{n}: not JSON ({e})') from None
      if not isinstance(record, dict):
        raise DataError(f'{path}:{n}: expected a JSON object')
      out.append((line, chat.from_record(record, f'{path}:{n}')))
  if not out:
    raise DataError(f'{path} holds no conversations')
  return out


def encode(tokenizer, conversations: Sequence[list[dict]], *, train_on: str = 'assistant'
           ) -> list[tuple[np.ndarray, np.ndarray]]:
  return [chat.render(tokenizer, c, train_on=train_on) for c in conversations]


def build_rows(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, *, pad_id: int,
               eos_id: int, pack: bool = True, truncation: str = 'cut',
               eos_padding: bool = False) -> tuple[dict[str, np.ndarray], dict]:
  """(fields {name: int32 [R, L]}, stats) of rows holding `examples` (ids, loss_mask).

  stats: conversations, rows, truncated (cut to the row, kept), dropped (longer than a row with
  truncation 'drop', or cut before their first trained token), trained_tokens, fill (share of
  row slots holding tokens).
  """
  if truncation not in TRUNCATION:
    raise DataError(f'config.data.chat.truncation={truncation!r} is not one of {TRUNCATION}')
  if pack and eos_padding:
    raise DataError('config.data.chat.eos_padding pads one conversation per row: set '
                    'config.data.chat.pack=False')
  kept, truncated, dropped = [], 0, 0
  for ids, mask in examples:
    cut = len(ids) > seq_len
    if cut and truncation == 'drop':
      dropped += 1
      continue
    ids, mask = ids[:seq_len], mask[:seq_len]
    if mask.sum() == 0:  # cut before its first trained token: nothing to learn from it
      dropped += 1
      continue
    truncated += cut
    kept.append((ids, mask))
  if not kept:
    raise EmptySplitError('no conversation is left to train on (all dropped or cut before their '
                          'first assistant token; raise data.seq_len)')
  lengths = np.asarray([len(i) for i, _ in kept])
  flat_ids = np.concatenate([i for i, _ in kept])
  flat_mask = np.concatenate([m for _, m in kept])
  if pack:
    row_ptr, piece_start, piece_len = pack_lengths(lengths, seq_len)
  else:
    row_ptr = np.arange(len(kept) + 1)
    piece_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    piece_len = lengths
  n = len(row_ptr) - 1
  fields = {'tokens': np.full((n, seq_len), pad_id, np.int32),
            'segment_ids': np.zeros((n, seq_len), np.int32),
            'positions': np.zeros((n, seq_len), np.int32),
            'loss_mask': np.zeros((n, seq_len), np.int32),
            'prompt': np.zeros((n, seq_len), np.int32)}
  for r in range(n):
    pos = 0
    for seg, j in enumerate(range(row_ptr[r], row_ptr[r + 1]), 1):
      s, k = int(piece_start[j]), int(piece_len[j])
      fields['tokens'][r, pos:pos + k] = flat_ids[s:s + k]
      fields['segment_ids'][r, pos:pos + k] = seg
      fields['positions'][r, pos:pos + k] = np.arange(k)
      fields['loss_mask'][r, pos:pos + k] = flat_mask[s:s + k]
      fields['prompt'][r, pos:pos + k] = 1 - flat_mask[s:s + k]
      pos += k
    if eos_padding and pos < seq_len:  # LLaDA: the eos padding is the answer's end, trained
      fields['tokens'][r, pos:] = eos_id
      fields['segment_ids'][r, pos:] = 1
      fields['positions'][r, pos:] = np.arange(pos, seq_len)
      fields['loss_mask'][r, pos:] = 1
  stats = {'conversations': len(examples), 'rows': n, 'truncated': truncated, 'dropped': dropped,
           'trained_tokens': int(fields['loss_mask'].sum()),
           'fill': float((fields['segment_ids'] > 0).mean())}
  return fields, stats


def load_rows(data_cfg, tokenizer, split: str) -> tuple[dict[str, np.ndarray], dict]:
  """The rows of `split` of the JSONL at data.path (`build_rows` with data.chat's settings)."""
  c = data_cfg.chat
  lines = read_jsonl(data_cfg.path)
  chosen = splits_lib.split_by_hash(lines, split, key=lambda x: x[0])
  if not chosen:
    raise EmptySplitError(f'the {split} split of {data_cfg.path} is empty')
  examples = encode(tokenizer, [m for _, m in chosen], train_on=c.train_on)
  fields, stats = build_rows(examples, data_cfg.seq_len, pad_id=tokenizer.pad_id,
                             eos_id=tokenizer.eos_id, pack=c.pack, truncation=c.truncation,
                             eos_padding=c.eos_padding)
  logging.info('chat data %s (%s): %s', data_cfg.path, split, stats)
  if stats['truncated'] or stats['dropped']:
    logging.warning('%s (%s): %d conversations longer than data.seq_len=%d were %s',
                    data_cfg.path, split, stats['truncated'] or stats['dropped'],
                    data_cfg.seq_len, 'cut' if stats['truncated'] else 'dropped')
  return fields, stats
