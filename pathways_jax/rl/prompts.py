"""Prompt data for RL (`data.corpus='prompts'`): one prompt per line of a JSONL file.

    {"prompt": "What is 3 + 4? Answer with the number only.", "answer": "7"}
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "answer": "..."}
    {"messages": [{"role": "user", ...}, {"role": "assistant", "content": "7"}], ...}
    {"text": "Ada lives in", "continuation": " Paris", ...}   # raw text, no chat template (RPT)

A `prompt` is a user turn or a message list; `messages` is a conversation whose final assistant
turn, if any, is the reference answer (kept as `answer` unless the line has one) and not part of
the prompt. Every other field of the line (`answer`, `accepted`, the instruction set's `kind` and
`format`, ...) stays in the record for the reward functions (rl/rewards.py); the instruction
set's files (`data.instructions.write_jsonl`) are prompt files as they are.

A `text` prompt is raw text (a base model's context, as Reinforcement Pre-Training gives it): bos +
its tokens, no template; a reward model, if any, sees it as a user turn.
Each other prompt is rendered with the chat template up to the assistant's turn (`chat.prompt_ids`) and
left-padded to `data.seq_len` tokens (the prompt budget), so every row ends where generation
starts. A prompt longer than the budget is skipped, counted and logged, never cut.
"""
from __future__ import annotations

import logging

import numpy as np

from pathways_jax.data import chat
from pathways_jax.data.corpora import DataError, EmptySplitError

_LOG = logging.getLogger(__name__)
EXAMPLE_ID = 'example_id'  # the per-row field: the row's line in the prompt file (0-based)


def read_prompts(path: str) -> list[tuple[dict, list[dict]]]:
  """[(record, prompt messages)] of each line; errors name the file and line."""
  from pathways_jax.data import sft  # pylint: disable=g-import-not-at-top
  out = []
  for where, _, record in sft.jsonl_records(path):
    record = dict(record)
    if 'prompt' in record:
      prompt = record['prompt']
      messages = ([{'role': 'user', 'content': prompt}] if isinstance(prompt, str)
                  else chat.check_messages(prompt, where, require_assistant=False))
    elif 'text' in record:
      if not isinstance(record['text'], str) or not record['text']:
        raise DataError(f"{where}: 'text' must be a non-empty string")
      messages = [{'role': 'user', 'content': record['text']}]
    elif 'messages' in record:
      messages = chat.check_messages(record['messages'], where, require_assistant=False)
      if messages and messages[-1]['role'] == 'assistant':
        record.setdefault('answer', messages[-1]['content'])
        messages = messages[:-1]
    else:
      raise DataError(f"{where}: a prompt line needs 'prompt' (a string or messages), "
                      f"'messages' or 'text'; it has {sorted(record)}")
    if not messages:
      raise DataError(f'{where}: the prompt is empty')
    out.append((record, messages))
  if not out:
    raise DataError(f'{path} holds no prompts')
  return out


def is_raw_text(record: dict) -> bool:
  return 'text' in record and 'prompt' not in record and 'messages' not in record


def raw_text_ids(tokenizer, text: str) -> np.ndarray:
  """bos + the tokens of `text` (a tokenizer without bos, Qwen's: the tokens alone), as the
  pretraining pipeline starts a document."""
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  return np.asarray(bos + list(tokenizer.encode(text)), np.int32)


def left_padded(ids_list, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N, width], mask [N, width]) with each sequence at the right end of its row."""
  tokens = np.full((len(ids_list), width), pad_id, np.int32)
  mask = np.zeros((len(ids_list), width), np.int32)
  for i, ids in enumerate(ids_list):
    if len(ids):
      tokens[i, width - len(ids):] = ids
      mask[i, width - len(ids):] = 1
  return tokens, mask


def load_rows(data_cfg, tokenizer, split: str) -> tuple[dict[str, np.ndarray], dict]:
  """(rows fields, counts) of the prompt file of `split` ('train': data.path, 'validation':
  data.validation_path): tokens / segment_ids / positions [R, seq_len] left-padded and
  example_id [R]; counts {'prompts', 'too_long'}."""
  path = data_cfg.path if split == 'train' else data_cfg.get('validation_path', '')
  if not path:
    raise EmptySplitError(f'corpus prompts has no {split} file')
  records = read_prompts(path)
  width = data_cfg.seq_len
  kept, ids_list, too_long = [], [], 0
  for i, (record, messages) in enumerate(records):
    ids = (raw_text_ids(tokenizer, record['text']) if is_raw_text(record)
           else chat.prompt_ids(tokenizer, messages))
    if len(ids) > width:
      too_long += 1
      continue
    kept.append(i)
    ids_list.append(ids)
  if too_long:
    _LOG.warning('%s: %d of %d prompts are longer than data.seq_len=%d tokens: skipped', path,
                 too_long, len(records), width)
  if not kept:
    raise DataError(f'{path}: every prompt is longer than data.seq_len={width} tokens (the '
                    'prompt budget): raise it')
  tokens, mask = left_padded(ids_list, width, tokenizer.pad_id)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  fields = {'tokens': tokens, 'segment_ids': mask, 'positions': positions,
            EXAMPLE_ID: np.asarray(kept, np.int32)}
  return fields, {'prompts': len(records), 'too_long': too_long}
