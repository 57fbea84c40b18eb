"""Preference data: a JSONL of (prompt, chosen, rejected) -> packed rows of pairs.

    config.data.corpus = 'preference'
    config.data.path = 'pairs.jsonl'

A line is one comparison, in any of TRL's three shapes:

    {"prompt": "Who is Ada?", "chosen": "A painter.", "rejected": "A river."}
    {"prompt": [messages...], "chosen": [assistant messages...], "rejected": [...]}
    {"chosen": [whole conversation...], "rejected": [whole conversation...]}  # implicit prompt

(the implicit prompt is the messages both conversations share before they differ). A response
starts with an assistant message and may go on for several turns, the user's (an environment's)
replies between the assistant's: a multi-turn game, as PAPRIKA compares them. Each side is
rendered with the tokenizer's chat template (data/chat.py) as prompt + response; `loss_mask` is 1
on the response's assistant turns only (the prompt's own assistant turns, in a multi-turn prompt,
and the user turns inside a response are context).

Rows. A pair is two adjacent segments of one row: segment 2k-1 holds prompt + chosen of the row's
k-th pair and segment 2k prompt + rejected (attention never crosses segments, so the two sides are
scored independently, as two sequences would be). Several pairs are packed into a row, best fit
(data/packing.py); `positions` restart per segment. Fields, int32 [R, L]: `tokens`,
`segment_ids`, `positions`, `loss_mask`, `prompt` (1 - loss_mask inside a segment: what LLaDA's
objectives never mask).

A line may carry `"margin": m` (a finite number; TRL's reward-trainer margin column): how far the
chosen reward must exceed the rejected one (`objectives.reward.bradley_terry_loss`, e.g. from a
rated preference strength). When any line of a split has one, its rows carry `margin`, float32
[R, L]: the pair's margin on every token of both its segments (0 where a line gives none, and on
padding); the `reward_model` task reads it, other tasks ignore it.

Bad input, counted and reported (`stats`), never silent:
  * identical: chosen and rejected render to the same tokens (nothing to prefer): dropped;
  * truncated: a pair longer than a row has each side cut to half a row (the start kept, as
    TRL's keep_start), when that leaves each side some response tokens;
  * dropped: a pair whose prompt alone leaves one side no response token in half a row.
A split left with no pair is an error naming the file. The validation split is 2% of the lines
by hash (data.splits), as for chat data, or the file `data.validation_path` names (e.g. pairs on
held-out questions; training then reads every line of data.path).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from pathways_jax.data import chat
from pathways_jax.data import splits as splits_lib
from pathways_jax.data.corpora import DataError, EmptySplitError
from pathways_jax.data.packing import pack as pack_lengths
from pathways_jax.data.sft import jsonl_records

FIELDS = ('tokens', 'segment_ids', 'positions', 'loss_mask', 'prompt')


def _messages(value, where: str, what: str, role: str) -> list[dict]:
  if isinstance(value, str):
    return [{'role': role, 'content': value}]
  if isinstance(value, list) and value:
    return value
  raise DataError(f'{where}: "{what}" must be a string or a non-empty list of messages')


def from_record(record: dict, where: str = 'record') -> tuple[list[dict], list[dict], list[dict]]:
  """(prompt messages, chosen response messages, rejected response messages) of one line."""
  if not isinstance(record, dict) or 'chosen' not in record or 'rejected' not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f'{where}: expected {{"prompt", "chosen", "rejected"}} (or "chosen" and '
                    f'"rejected" conversations), got {keys}')
  chosen = _messages(record['chosen'], where, 'chosen', 'assistant')
  rejected = _messages(record['rejected'], where, 'rejected', 'assistant')
  if 'prompt' in record:
    prompt = _messages(record['prompt'], where, 'prompt', 'user')
  else:  # implicit prompt: the shared leading messages
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
      n += 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
      raise DataError(f'{where}: no "prompt", and the two conversations share no leading '
                      'message to serve as one')
  for side, msgs in (('chosen', chosen), ('rejected', rejected)):
    roles = [m.get('role') if isinstance(m, dict) else None for m in msgs]
    if roles[0] != 'assistant' or any(r not in ('assistant', 'user') for r in roles):
      raise DataError(f'{where}: the {side} response must start with an assistant message and '
                      'hold only assistant messages and the user turns between them')
  chat.check_messages(prompt + chosen, f'{where} (prompt + chosen)')
  chat.check_messages(prompt + rejected, f'{where} (prompt + rejected)')
  return prompt, chosen, rejected


def margin_of(record: dict, where: str = 'record') -> float | None:
  """A line's optional "margin": a finite number, or None when it has none."""
  if 'margin' not in record:
    return None
  m = record['margin']
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not np.isfinite(m):
    raise DataError(f'{where}: "margin" must be a finite number, got {m!r}')
  return float(m)


def read_margins(path: str) -> dict[str, float]:
  """{the line: its margin} of the lines that give one (errors name the file and line)."""
  return {line: m for where, line, record in jsonl_records(path)
          if (m := margin_of(record, where)) is not None}


def read_jsonl(path: str) -> list[tuple[str, tuple[list[dict], list[dict], list[dict]]]]:
  """[(the line, (prompt, chosen, rejected))]; errors name the file and line."""
  out = [(line, from_record(record, where)) for where, line, record in jsonl_records(path)]
  if not out:
    raise DataError(f'{path} holds no preference pairs')
  return out


def _response_mask(mask: np.ndarray, num_turns: int) -> np.ndarray:
  """`mask` (1 on every assistant turn) kept on its last `num_turns` runs of 1s only."""
  starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
  out = mask.copy()
  if len(starts) > num_turns:
    out[:starts[len(starts) - num_turns]] = 0
  return out


def render_pair(tokenizer, prompt: Sequence[dict], chosen: Sequence[dict],
                rejected: Sequence[dict]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """((chosen ids, chosen response mask), (rejected ids, rejected response mask))."""
  out = []
  for response in (chosen, rejected):
    ids, mask = chat.render(tokenizer, list(prompt) + list(response))
    turns = sum(m['role'] == 'assistant' for m in response)
    out.append((ids, _response_mask(mask, turns)))
  return tuple(out)


def build_rows(pairs: Sequence[tuple[tuple[np.ndarray, np.ndarray], ...]], seq_len: int, *,
               pad_id: int, margins: Sequence[float] | None = None
               ) -> tuple[dict[str, np.ndarray], dict]:
  """(fields {name: int32 [R, L]}, stats) of rows holding `pairs` (see the module docstring);
  with `margins` (one per pair), also `margin`, float32 [R, L].

  stats: pairs (given), kept, identical, truncated, dropped, rows, fill (share of row slots
  holding tokens), trained_tokens.
  """
  if seq_len < 4:
    raise DataError(f'config.data.seq_len={seq_len} cannot hold a pair')
  half = seq_len // 2
  kept, kept_margins, identical, truncated, dropped = [], [], 0, 0, 0
  if margins is not None and len(margins) != len(pairs):
    raise ValueError(f'{len(margins)} margins for {len(pairs)} pairs')
  for i, ((c_ids, c_mask), (r_ids, r_mask)) in enumerate(pairs):
    if np.array_equal(c_ids, r_ids):
      identical += 1
      continue
    if len(c_ids) + len(r_ids) > seq_len:
      c_ids, c_mask, r_ids, r_mask = c_ids[:half], c_mask[:half], r_ids[:half], r_mask[:half]
      if not (c_mask.any() and r_mask.any()):
        dropped += 1
        continue
      truncated += 1
    kept.append(((c_ids, c_mask), (r_ids, r_mask)))
    kept_margins.append(0.0 if margins is None else margins[i])
  stats = {'pairs': len(pairs), 'kept': len(kept), 'identical': identical,
           'truncated': truncated, 'dropped': dropped}
  if not kept:
    raise EmptySplitError(f'no preference pair is left ({stats}): identical sides, or prompts '
                          f'that leave no response token in half of data.seq_len={seq_len}')
  lengths = np.asarray([len(c[0]) + len(r[0]) for c, r in kept])
  row_ptr, piece_start, _ = pack_lengths(lengths, seq_len)
  # Pairs are never longer than a row, so each piece is one whole pair; map piece -> pair.
  pair_of_start = {int(s): i for i, s in enumerate(np.concatenate([[0], np.cumsum(lengths)[:-1]]))}
  n = len(row_ptr) - 1
  fields = {'tokens': np.full((n, seq_len), pad_id, np.int32),
            **{k: np.zeros((n, seq_len), np.int32) for k in FIELDS if k != 'tokens'}}
  if margins is not None:
    fields['margin'] = np.zeros((n, seq_len), np.float32)
  for r in range(n):
    pos, seg = 0, 0
    for j in range(row_ptr[r], row_ptr[r + 1]):
      pair = pair_of_start[int(piece_start[j])]
      for ids, mask in kept[pair]:
        seg, k = seg + 1, len(ids)
        if margins is not None:
          fields['margin'][r, pos:pos + k] = kept_margins[pair]
        fields['tokens'][r, pos:pos + k] = ids
        fields['segment_ids'][r, pos:pos + k] = seg
        fields['positions'][r, pos:pos + k] = np.arange(k)
        fields['loss_mask'][r, pos:pos + k] = mask
        fields['prompt'][r, pos:pos + k] = 1 - mask
        pos += k
  stats.update(rows=n, fill=float((fields['segment_ids'] > 0).mean()),
               trained_tokens=int(fields['loss_mask'].sum()))
  return fields, stats


def load_rows(data_cfg, tokenizer, split: str) -> tuple[dict[str, np.ndarray], dict]:
  """The rows of `split` of the preference JSONL at data.path (with `data.validation_path`, the
  validation split is that file and training uses every line of data.path)."""
  path = data_cfg.path
  if data_cfg.get('validation_path'):
    path = data_cfg.validation_path if split == 'validation' else path
    chosen = read_jsonl(path)
  else:
    chosen = splits_lib.split_by_hash(read_jsonl(path), split, key=lambda x: x[0])
  if not chosen:
    raise EmptySplitError(f'the {split} split of {path} is empty')
  pairs = [render_pair(tokenizer, *p) for _, p in chosen]
  given = read_margins(path)
  margins = [given.get(line, 0.0) for line, _ in chosen] if given else None
  fields, stats = build_rows(pairs, data_cfg.seq_len, pad_id=tokenizer.pad_id, margins=margins)
  if margins is not None:
    stats['with_margin'] = sum(line in given for line, _ in chosen)
  logging.info('preference data %s (%s): %s', path, split, stats)
  if stats['identical'] or stats['truncated'] or stats['dropped']:
    logging.warning('%s (%s): of %d pairs, %d had identical sides (dropped), %d were cut to half '
                    'of data.seq_len=%d each, %d dropped (prompt too long)', path, split,
                    stats['pairs'], stats['identical'], stats['truncated'], data_cfg.seq_len,
                    stats['dropped'])
  return fields, stats

