"""Reflect, Retry, Reward (Bensal et al. 2025, "Reflect, Retry, Reward: Self-Improving LLMs via
Reinforcement Learning"): on a failed first attempt the model writes a short reflection and
tries again; a reflection is rewarded when the retry that follows it succeeds, and only the
reflection's tokens are trained.

Task 'grpo' with rl.reflect=True runs, per prompt (the conversation C of its messages):

  1. a greedy first attempt a: C -> a, scored by rl.rewards; a success (total >= rl.success_at)
     leaves nothing to learn from, and the prompt is replaced (as dynamic sampling refills);
  2. G reflections r_g sampled from C + [assistant: a, user: rl.reflect_instruction]: the group;
  3. a greedy retry after each: ... + [assistant: r_g, user: rl.retry_instruction] -> a'_g;
  4. reward_g = 1 if a'_g succeeds else 0. The trained rows are the reflection prompts and the
     reflections (the retries' tokens are never trained).

Every prompt is rendered with the chat template and left-padded to data.seq_len, the one prompt
budget of the three samplers; a reflection or retry prompt that does not fit is counted (its
group is replaced, its retry fails).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pathways_jax.data import chat
from pathways_jax.rl.prompts import left_padded


def reflection_messages(prompt: Sequence[dict], attempt: str, instruction: str) -> list[dict]:
  """The conversation that asks for a reflection on a failed attempt."""
  return [*prompt, {'role': 'assistant', 'content': attempt},
          {'role': 'user', 'content': instruction}]


def retry_messages(reflection_prompt: Sequence[dict], reflection: str,
                   instruction: str) -> list[dict]:
  """The conversation that asks for a second attempt after the reflection."""
  return [*reflection_prompt, {'role': 'assistant', 'content': reflection},
          {'role': 'user', 'content': instruction}]


def encode(tokenizer, conversations: Sequence[Sequence[dict]], width: int,
           fallback: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [N, width], mask [N, width], fits [N] bool) of the generation prompts, left-padded;
  a conversation longer than `width` tokens gets `fallback[n]` (a prompt that fits, so the
  sampler's batch stays whole) and fits False."""
  ids_list, fits = [], []
  for n, conversation in enumerate(conversations):
    ids = chat.prompt_ids(tokenizer, conversation)
    fits.append(len(ids) <= width)
    ids_list.append(ids if fits[-1] else np.asarray(fallback[n]))
  tokens, mask = left_padded(ids_list, width, tokenizer.pad_id)
  return tokens, mask, np.asarray(fits, bool)


def unpadded(tokens_NP: np.ndarray, mask_NP: np.ndarray) -> list[np.ndarray]:
  """The real tokens of each left-padded row."""
  return [row[m > 0] for row, m in zip(np.asarray(tokens_NP), np.asarray(mask_NP))]


def reflection_prompts(tokenizer, messages: Sequence[Sequence[dict]], attempts: Sequence[str],
                       instruction: str, width: int, prompts_NP: np.ndarray,
                       prompt_mask_NP: np.ndarray):
  """(conversations, tokens [N, width], mask, fits [N]) asking for a reflection on each attempt;
  one that does not fit falls back to its own prompt (`prompts_NP`, left-padded)."""
  asks = [reflection_messages(m, a, instruction) for m, a in zip(messages, attempts)]
  return (asks, *encode(tokenizer, asks, width, unpadded(prompts_NP, prompt_mask_NP)))


def retry_prompts(tokenizer, asks: Sequence[Sequence[dict]], reflections: Sequence[str],
                  instruction: str, width: int, ask_tokens_NP: np.ndarray,
                  ask_mask_NP: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [N*K, width], mask, fits) asking for a retry after each reflection, K = reflections
  per ask (in ask order); one that does not fit falls back to its reflection prompt."""
  k = len(reflections) // len(asks)
  retries = [retry_messages(asks[n // k], text, instruction) for n, text in enumerate(reflections)]
  fallback = [ids for ids in unpadded(ask_tokens_NP, ask_mask_NP) for _ in range(k)]
  return encode(tokenizer, retries, width, fallback)

