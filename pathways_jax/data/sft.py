"""Supervised fine-tuning data: a JSONL of conversations -> rows with per-token loss masks.

    config.data.corpus = 'chat'
    config.data.path = 'train.jsonl'  # {"messages": [...]} or {"prompt": ..., "completion": ...}
                                      # or raw text {"text": ..., "completion": ...} (data.chat)
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

Multi-LoRA runs (model.lora_num_adapters = K > 1) train adapter k on its own conversations:
`data.path` names K files separated by commas (file k: adapter k), or one file whose lines carry
`"adapter": k`. Rows are packed per adapter (a row is one adapter's: the model's ids are per row)
and carry a per-row field `adapter_ids` (int32 [R]; a batch holds it as [B]).
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


def jsonl_records(path: str):
  """(where, the line, its JSON object) of each non-blank line; errors name path and line."""
  if not os.path.isfile(path):
    raise DataError(f'config.data.path={path!r}: no such file')
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
      yield f'{path}:{n}', line, record


def read_jsonl(path: str) -> list[tuple[str, list[dict] | chat.RawText]]:
  """[(the line, its messages or RawText)] of a JSONL file of conversations (or raw-text
  examples); errors name path and line."""
  out = [(line, chat.from_record(record, where)) for where, line, record in jsonl_records(path)]
  if not out:
    raise DataError(f'{path} holds no conversations')
  return out


def read_adapter_jsonl(paths: Sequence[str], num_adapters: int
                       ) -> list[tuple[str, list[dict], int]]:
  """[(the line, its messages, its adapter)] of a multi-LoRA run's data: K files (file k is
  adapter k's) or one whose lines carry "adapter": k in [0, K)."""
  if len(paths) not in (1, num_adapters):
    raise DataError(f'config.data.path names {len(paths)} files for {num_adapters} adapters: '
                    'give one per adapter, or one whose lines carry "adapter": k')
  out = []
  for k, path in enumerate(paths):
    for where, line, record in jsonl_records(path):
      given = record.get('adapter')
      if given is not None and (isinstance(given, bool) or not isinstance(given, int)
                                or not 0 <= given < num_adapters):
        raise DataError(f'{where}: "adapter": {given!r} is not an integer in [0, '
                        f'{num_adapters}) (model.lora_num_adapters)')
      if len(paths) > 1:
        if given is not None and given != k:
          raise DataError(f'{where}: "adapter": {given} in the file of adapter {k} (data.path '
                          'names one file per adapter, in order)')
        given = k
      elif given is None:
        raise DataError(f'{where}: no "adapter" key; a multi-LoRA run '
                        f'(model.lora_num_adapters={num_adapters}) with one data file needs '
                        '"adapter": k on every line (or one file per adapter in data.path)')
      out.append((line, chat.from_record(record, where), given))
  return out


def encode(tokenizer, conversations: Sequence[list[dict] | chat.RawText], *,
           train_on: str = 'assistant') -> list[tuple[np.ndarray, np.ndarray]]:
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


def load_rows(data_cfg, tokenizer, split: str, *, num_adapters: int = 1
              ) -> tuple[dict[str, np.ndarray], dict]:
  """The rows of `split` of the JSONL at data.path (`build_rows` with data.chat's settings);
  with `num_adapters` > 1 packed per adapter, with `adapter_ids` [R]."""
  if num_adapters > 1:
    return _load_adapter_rows(data_cfg, tokenizer, split, num_adapters)
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


def _load_adapter_rows(data_cfg, tokenizer, split: str, num_adapters: int):
  from pathways_jax.config import chat_paths  # pylint: disable=g-import-not-at-top
  c, paths = data_cfg.chat, chat_paths(data_cfg)
  lines = read_adapter_jsonl(paths, num_adapters)
  chosen = splits_lib.split_by_hash(lines, split, key=lambda x: x[0])
  parts, per_adapter = [], []
  for k in range(num_adapters):
    mine = [m for _, m, a in chosen if a == k]
    try:
      if not mine:
        raise EmptySplitError(f'adapter {k} has no conversations in the {split} split')
      fields, stats = build_rows(encode(tokenizer, mine, train_on=c.train_on), data_cfg.seq_len,
                                 pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, pack=c.pack,
                                 truncation=c.truncation, eos_padding=c.eos_padding)
    except EmptySplitError as e:
      if split == 'train':  # an adapter with nothing to learn from would silently stay at init
        raise EmptySplitError(f'{data_cfg.path}: adapter {k} has nothing to train on ({e})'
                              ) from None
      continue  # a small adapter may have no validation conversation
    fields['adapter_ids'] = np.full(len(fields['tokens']), k, np.int32)
    parts.append(fields)
    per_adapter.append({'adapter': k, **stats})
  if not parts:
    raise EmptySplitError(f'the {split} split of {data_cfg.path} is empty')
  fields = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
  stats = {key: sum(s[key] for s in per_adapter)
           for key in ('conversations', 'rows', 'truncated', 'dropped', 'trained_tokens')}
  stats['fill'] = float((fields['segment_ids'] > 0).mean())
  stats['adapters'] = per_adapter
  logging.info('chat data %s (%s), %d adapters: %s', data_cfg.path, split, num_adapters, stats)
  if stats['truncated'] or stats['dropped']:
    logging.warning('%s (%s): %d conversations longer than data.seq_len=%d were %s',
                    data_cfg.path, split, stats['truncated'] or stats['dropped'],
                    data_cfg.seq_len, 'cut' if stats['truncated'] else 'dropped')
  return fields, stats
