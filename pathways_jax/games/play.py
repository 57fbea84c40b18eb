"""Playing the games: a model (batched, turn by turn) or uniformly random legal moves.

    trajs = play.play(model, params, tokenizer, [(game, instance), ...], samples=8,
                      temperature=1.5, min_p=0.3, seed=0)
    trajs = play.play_random([(game, instance), ...], samples=4, seed=0)

A trajectory is a dict: `game`, `instance`, `messages` (the conversation: the intro as the user's
first message, then the agent's moves and the game's replies), `success`, `turns`, `illegal`
(moves the game could not accept), `consistent` (moves that agree with every earlier reply:
games/base.py) and `overflow` (the conversation outgrew the model's context
before the game ended: a loss, counted apart).

Model play: every unfinished episode's conversation is rendered with the tokenizer's chat template
up to the next assistant turn (`data.chat.prompt_ids`), left-padded to one width (model.max_len -
max_move_tokens, so the sampler compiles once) and decoded (`sampling.autoregressive.generate`,
KV cache, stopping at eos) with temperature / min-p / top-p; the text up to eos is the move. A
move that is empty is recorded as `EMPTY_MOVE` (a chat turn cannot be empty) and is illegal like
any move the game cannot parse. Draws are keyed by (seed, turn, batch).
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from pathways_jax.data import chat
from pathways_jax.games.base import Game

EMPTY_MOVE = '(no move)'


def _trajectory(game: Game, instance: dict, ep, messages: list[dict], overflow=False) -> dict:
  return {'game': game.name, 'instance': instance, 'messages': messages,
          'success': bool(ep.success), 'turns': ep.turns, 'illegal': ep.illegal,
          'consistent': ep.consistent, 'overflow': overflow}


def play_random(jobs: Sequence[tuple[Game, dict]], *, samples: int = 1, seed: int = 0
                ) -> list[dict]:
  """`samples` games of uniformly random legal moves per (game, instance)."""
  rng = random.Random(seed)
  out = []
  for game, instance in jobs:
    for _ in range(samples):
      ep = game.episode(instance)
      messages = [{'role': 'user', 'content': ep.intro}]
      while not ep.done:
        move = ep.random_move(rng)
        reply = ep.step(move)
        messages += [{'role': 'assistant', 'content': move},
                     {'role': 'user', 'content': reply.text}]
      out.append(_trajectory(game, instance, ep, messages))
  return out


def play(model, params, tokenizer, jobs: Sequence[tuple[Game, dict]], *, samples: int = 1,
         temperature: float = 0.0, min_p: float | None = None, top_p: float | None = None,
         seed: int = 0, batch_size: int = 64, max_move_tokens: int = 16,
         context: int | None = None) -> list[dict]:
  """`samples` games per (game, instance) played by the model (see the module docstring); the
  trajectories in the order of `jobs`, each job's samples together. `context`: the longest
  conversation (prompt and move) played, default model.max_len."""
  import jax  # pylint: disable=g-import-not-at-top
  from pathways_jax.eval.facts import left_pad  # pylint: disable=g-import-not-at-top
  from pathways_jax.sampling import autoregressive  # pylint: disable=g-import-not-at-top
  if samples < 1 or batch_size < 1 or max_move_tokens < 1:
    raise ValueError(f'need samples, batch_size, max_move_tokens >= 1; got {samples}, '
                     f'{batch_size}, {max_move_tokens}')
  context = context or model.cfg.max_len
  if context > model.cfg.max_len:
    raise ValueError(f'context={context} exceeds model.max_len={model.cfg.max_len}')
  width = context - max_move_tokens
  if width < 8:
    raise ValueError(f'a context of {context} tokens leaves no room for a conversation after '
                     f'{max_move_tokens} move tokens')
  eps = [(game, inst, game.episode(inst)) for game, inst in jobs for _ in range(samples)]
  convs = [[{'role': 'user', 'content': ep.intro}] for _, _, ep in eps]
  overflow = [False] * len(eps)
  specials = set(int(i) for i in tokenizer.special_ids)
  active = list(range(len(eps)))
  turn = 0
  while active:
    prompts = {}
    for i in active:
      ids = chat.prompt_ids(tokenizer, convs[i])
      if len(ids) > width:
        overflow[i] = True
        eps[i][2].done = True
      else:
        prompts[i] = list(ids)
    rows = list(prompts)
    bs = min(batch_size, len(eps))  # fixed for the whole call: one compile
    for b, s in enumerate(range(0, len(rows), bs)):
      chunk = rows[s:s + bs]
      seqs = [prompts[i] for i in chunk]
      seqs += [seqs[-1]] * (bs - len(seqs))  # the last batch filled with repeats, not played
      tokens_BP, mask_BP = left_pad(seqs, tokenizer.pad_id, width)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), turn), b)
      tokens_BT = np.asarray(autoregressive.generate(
          model, params, tokens_BP, key=key, max_new_tokens=max_move_tokens,
          temperature=temperature, min_p=min_p, top_p=top_p, prompt_mask_BP=mask_BP,
          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id))
      for i, row in zip(chunk, tokens_BT[:, width:]):
        ids = [int(t) for t in row]
        if tokenizer.eos_id in ids:
          ids = ids[:ids.index(tokenizer.eos_id)]
        move = tokenizer.decode([t for t in ids if t not in specials]).strip() or EMPTY_MOVE
        reply = eps[i][2].step(move)
        convs[i] += [{'role': 'assistant', 'content': move},
                     {'role': 'user', 'content': reply.text}]
    active = [i for i in active if not eps[i][2].done]
    turn += 1
  return [_trajectory(g, inst, ep, convs[i], overflow[i]) for i, (g, inst, ep) in enumerate(eps)]
