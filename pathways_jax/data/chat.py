"""Conversations -> token ids with a per-token loss mask (what supervised fine-tuning trains on).

    ids, loss_mask = render(tokenizer, [{'role': 'user', 'content': 'Who is Ada?'},
                                        {'role': 'assistant', 'content': 'A painter.'}])

`loss_mask[i]` is 1 on the tokens of assistant turns (their content and the end of turn the model
must learn to emit), 0 on everything the model is given (system, user, the template's markup).
With `train_on='all'` every token is trained.

Templates. A tokenizer with a chat template (HF tokenizer.json + tokenizer_config.json) renders
the conversation as transformers does; the assistant spans are found by rendering each prefix of
the conversation (the text up to an assistant turn with the generation prompt, and up to its end)
and the text is encoded piece by piece, so every token is on one side of a boundary. The project's
own tokenizers (sentencepiece, bytes) have no template: a built-in one writes

    <bos><system>\n{content}\n<user>\n{content}\n<assistant>\n{content}<eos>...

with the roles as plain text and eos as the end of an assistant turn.

Raw text. A record `{"text": ..., "completion": ...}` (`RawText`) is no conversation: bos + the
tokens of `text` (given), then those of `completion` (trained), no template and no eos: the
completion continues the text as pretraining would. It is how RPT's prompts (rl/rpt.py) become
supervised examples of the same next-token decisions.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from pathways_jax.data.corpora import DataError

ROLES = ('system', 'user', 'assistant')
TRAIN_ON = ('assistant', 'all')


def check_messages(messages, where: str = 'conversation', *, require_assistant: bool = True
                   ) -> list[dict]:
  """The messages as a list of {role, content}; a clear error for anything else. Training data
  needs an assistant turn; a prompt (require_assistant=False) need not have one."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}}')
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
      raise DataError(f'{where}: message {i} is not {{"role": ..., "content": ...}}')
    if m['role'] not in ROLES:
      raise DataError(f'{where}: message {i} has role {m["role"]!r}; roles: {ROLES}')
    if not isinstance(m['content'], str):
      raise DataError(f'{where}: message {i} has non-text content')
    if m['role'] == 'assistant' and not m['content'].strip():
      raise DataError(f'{where}: message {i} is an empty assistant turn')
    out.append({'role': m['role'], 'content': m['content']})
  if require_assistant and not any(m['role'] == 'assistant' for m in out):
    raise DataError(f'{where}: no assistant turn (nothing to train on)')
  return out


class RawText(NamedTuple):
  """A raw-text example (module docstring): `text` given, `completion` trained."""
  text: str
  completion: str


def from_record(record: dict, where: str = 'record') -> list[dict] | RawText:
  """`{"messages": [...]}` or `{"prompt": ..., "completion": ...}` as messages;
  `{"text": ..., "completion": ...}` as RawText."""
  if 'text' in record and 'messages' not in record and 'prompt' not in record:
    text, completion = record['text'], record.get('completion')
    # A completion of whitespace alone is a real target in raw text (a newline in code).
    if not isinstance(text, str) or not isinstance(completion, str) or not completion:
      raise DataError(f'{where}: a raw-text example needs "text" (a string) and "completion" (a '
                      'non-empty string)')
    return RawText(text, completion)
  if 'messages' in record:
    return check_messages(record['messages'], where)
  if 'prompt' in record and 'completion' in record:
    return check_messages([{'role': 'user', 'content': record['prompt']},
                           {'role': 'assistant', 'content': record['completion']}], where)
  raise DataError(f'{where}: expected {{"messages": [...]}}, {{"prompt", "completion"}} or '
                  f'{{"text", "completion"}}, got keys {sorted(record)}')


def has_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, 'chat_template', None))


def _pieces(tokenizer, messages: list[dict]) -> list[tuple[str | int, bool]]:
  """[(text or a special id, is_assistant)] in order: the conversation as the model sees it."""
  if not has_template(tokenizer):
    out: list[tuple[str | int, bool]] = [(tokenizer.bos_id, False)]
    for m in messages:
      if m['role'] == 'assistant':
        out += [('<assistant>\n', False), (m['content'], True), (tokenizer.eos_id, True)]
      else:
        out.append((f"<{m['role']}>\n{m['content']}\n", False))
    return out
  render = tokenizer.render_chat
  full = render(messages)
  out, pos = [], 0
  for k, m in enumerate(messages):
    if m['role'] != 'assistant':
      continue
    start = len(render(messages[:k], add_generation_prompt=True)) if k else 0
    end = len(render(messages[:k + 1]))
    if not full.startswith(render(messages[:k + 1])) or start > end or start < pos:
      raise DataError(f'the chat template of {tokenizer.name} does not render a conversation '
                      'as the concatenation of its prefixes, so the assistant turns cannot be '
                      'located')
    if m['content'] not in full[start:end]:
      raise DataError(f'the chat template of {tokenizer.name} drops the assistant content (turn '
                      f'{k} is not in its rendering)')
    out += [(full[pos:start], False), (full[start:end], True)]
    pos = end
  out.append((full[pos:], False))
  return [(t, a) for t, a in out if t != '']


def render(tokenizer, messages: Sequence[dict] | RawText, *, train_on: str = 'assistant'
           ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [T], loss_mask int32 [T]) of a conversation or a RawText example (see the
  module docstring)."""
  if train_on not in TRAIN_ON:
    raise ValueError(f'train_on={train_on!r} is not one of {TRAIN_ON}')
  if isinstance(messages, RawText):
    given = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + list(
        tokenizer.encode(messages.text))
    trained = list(tokenizer.encode(messages.completion))
    mask = [int(train_on == 'all')] * len(given) + [1] * len(trained)
    return np.asarray(given + trained, np.int32), np.asarray(mask, np.int32)
  messages = check_messages(list(messages))
  ids, mask = [], []
  for piece, trained in _pieces(tokenizer, messages):
    new = [piece] if isinstance(piece, int) else list(tokenizer.encode(piece))
    ids += new
    mask += [int(trained or train_on == 'all')] * len(new)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def prompt_ids(tokenizer, messages: Sequence[dict]) -> np.ndarray:
  """The ids a model is given to write the next assistant turn (the generation prompt)."""
  messages = list(messages)
  if has_template(tokenizer):
    return np.asarray(tokenizer.encode(tokenizer.render_chat(messages,
                                                             add_generation_prompt=True)),
                      np.int32)
  ids = [tokenizer.bos_id]
  for m in messages:
    if m['role'] == 'assistant':
      ids += tokenizer.encode('<assistant>\n') + tokenizer.encode(m['content']) + [
          tokenizer.eos_id]
    else:
      ids += tokenizer.encode(f"<{m['role']}>\n{m['content']}\n")
  return np.asarray(ids + tokenizer.encode('<assistant>\n'), np.int32)
