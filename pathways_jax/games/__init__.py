"""Multi-turn games with exact outcomes (PAPRIKA's training ground): see games/base.py."""
from __future__ import annotations

from pathways_jax.games.base import Episode, Game, Reply
from pathways_jax.games.guess_number import GuessNumber
from pathways_jax.games.mastermind import Mastermind
from pathways_jax.games.twenty_questions import TwentyQuestions

GAMES = {g.name: g for g in (GuessNumber, TwentyQuestions, Mastermind)}


def make(name: str, **kwargs) -> Game:
  """The game called `name` (one of GAMES), with its keyword settings."""
  if name not in GAMES:
    raise ValueError(f'unknown game {name!r}; games: {sorted(GAMES)}')
  return GAMES[name](**kwargs)
