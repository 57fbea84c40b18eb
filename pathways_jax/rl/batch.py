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
    advantages       [N]           one per completion (PPO: [N, P+N_new], one per token)

PPO (rl.scale='gae') adds, per token: old_values (the value head at rollout time) and returns
(GAE's value targets); `token_rewards` places each completion's score on its last token.
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


def token_rewards(scores_N: np.ndarray, mask_NT: np.ndarray, kl_NT: np.ndarray | None = None,
                  beta: float = 0.0) -> np.ndarray:
  """float32 [N, T]: PPO's per-token rewards, each row's score on its last valid token and, with
  kl_NT, -beta * kl_NT on every valid token (the KL penalty placed where it was incurred). Rows
  with no valid token get none."""
  mask = np.asarray(mask_NT) > 0
  out = np.zeros(mask.shape, np.float32)
  if kl_NT is not None:
    out -= np.where(mask, beta * np.asarray(kl_NT, np.float32), 0.0)
  has = mask.any(axis=1)
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  rows = np.nonzero(has)[0]
  out[rows, last[rows]] += np.asarray(scores_N, np.float32)[rows]
  return out


def whiten(x_NT: np.ndarray, mask_NT: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  """x centred and scaled to unit variance over the valid tokens (0 elsewhere), as PPO
  implementations normalise advantages per batch."""
  mask = np.asarray(mask_NT) > 0
  if not mask.any():
    return np.zeros_like(x_NT, np.float32)
  vals = np.asarray(x_NT, np.float64)[mask]
  out = (np.asarray(x_NT, np.float64) - vals.mean()) / np.sqrt(vals.var() + eps)
  return np.where(mask, out, 0.0).astype(np.float32)
