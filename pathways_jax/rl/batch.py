"""From a rollout to the rows a policy-gradient step trains on (host side, numpy).

A rollout of B prompts x G samples gives N = B*G rows of P prompt tokens (left-padded) followed
by N_new generated tokens (pad after EOS). The training rows keep that layout:

    tokens           [N, P+N_new]  the rollout's tokens as sampled
    segment_ids      [N, P+N_new]  1 on the prompt's real tokens and on the completion up to
                                   and including EOS, 0 on padding (so attention sees what the
                                   sampler saw)
    positions        [N, P+N_new]  0 at each row's first real token, as the sampler counted
    completion_mask  [N, P+N_new]  1 on the generated tokens that count (0 on the prompt, on
                                   padding, and on every row of a group that is masked out)
    advantages       [N]           one per completion
"""
from __future__ import annotations

import numpy as np


def training_rows(prompt_mask_NP: np.ndarray, tokens_NT: np.ndarray,
                  completion_mask_NC: np.ndarray) -> dict[str, np.ndarray]:
  """tokens / segment_ids / positions / completion_mask (int32) of rollout rows."""
  prompt_mask = np.asarray(prompt_mask_NP).astype(np.int32)
  completion = np.asarray(completion_mask_NC).astype(np.int32)
  segment_ids = np.concatenate([prompt_mask, completion], axis=1)
  positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
  return {'tokens': np.asarray(tokens_NT, np.int32), 'segment_ids': segment_ids,
          'positions': positions,
          'completion_mask': np.concatenate([np.zeros_like(prompt_mask), completion], axis=1)}


def completion_texts(tokens_NC: np.ndarray, completion_mask_NC: np.ndarray, tokenizer
                     ) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(texts up to EOS without special tokens, lengths in tokens incl. EOS, finished = emitted
  EOS) of the generated part of rollout rows."""
  specials = {int(i) for i in tokenizer.special_ids}
  eos = tokenizer.eos_id
  texts, lengths, finished = [], [], []
  for row, mask in zip(np.asarray(tokens_NC), np.asarray(completion_mask_NC)):
    ids = [int(t) for t, m in zip(row, mask) if m]
    lengths.append(len(ids))
    done = eos is not None and eos in ids
    finished.append(done)
    if done:
      ids = ids[:ids.index(eos)]
    texts.append(tokenizer.decode([i for i in ids if i not in specials]))
  return texts, np.asarray(lengths, np.int32), np.asarray(finished, bool)


def zero_variance(rewards_PG: np.ndarray) -> np.ndarray:
  """[P] bool: groups whose rewards are all equal (no learning signal under group centring)."""
  r = np.asarray(rewards_PG)
  return np.all(r == r[:, :1], axis=1)
