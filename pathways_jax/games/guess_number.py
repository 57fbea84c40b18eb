"""Guess the number: a secret integer in [low, high]; each guess is told 'Higher.' or 'Lower.'.

    intro  "Guess my number from 21 to 52 in 7 guesses. Reply `Guess: <number>`."
    move   "Guess: 36"      reply "Lower."

Ranges are `width` wide and start anywhere in 1..`max_low`, so the same strategy (halve the
interval) has to work on numbers the agent has not seen in that place. Binary search wins within
ceil(log2(width + 1)) guesses (6 for width 32); random guessing within 7 guesses about 1 in 5.
A guess outside the range, or not a number, is illegal; a guess outside what the answers so far
leave possible is legal but not consistent.
"""
from __future__ import annotations

import random
import re

from pathways_jax.games.base import Episode, Game

_MOVE = re.compile(r'^guess\s*:?\s*(-?\d+)\s*\.?$', re.IGNORECASE)


class GuessNumberEpisode(Episode):

  def __init__(self, game, instance):
    super().__init__(game, instance)
    self.lo, self.hi = instance['low'], instance['high']  # what is still possible

  @property
  def intro(self) -> str:
    i = self.instance
    return (f'Guess my number from {i["low"]} to {i["high"]} in {self.game.max_turns} guesses. '
            'Reply `Guess: <number>`.')

  def respond(self, move):
    i = self.instance
    m = _MOVE.match(move)
    if not m:
      return 'Reply `Guess: <number>`.', False, False, False
    n = int(m.group(1))
    if not i['low'] <= n <= i['high']:
      return f'{n} is not from {i["low"]} to {i["high"]}.', False, False, False
    consistent = self.lo <= n <= self.hi
    if n == i['secret']:
      return 'Correct!', True, True, True
    if n < i['secret']:
      self.lo = max(self.lo, n + 1)
      return 'Higher.', False, True, consistent
    self.hi = min(self.hi, n - 1)
    return 'Lower.', False, True, consistent

  def random_move(self, rng: random.Random) -> str:
    return f'Guess: {rng.randint(self.instance["low"], self.instance["high"])}'

  def answer(self) -> str:
    return f'It was {self.instance["secret"]}.'


class GuessNumber(Game):
  name = 'guess_number'

  def __init__(self, width: int = 32, max_low: int = 40, max_turns: int = 7):
    if width < 2 or max_low < 1 or max_turns < 1:
      raise ValueError(f'guess_number needs width >= 2, max_low >= 1, max_turns >= 1; got '
                       f'{width}, {max_low}, {max_turns}')
    self.width, self.max_low, self.max_turns = width, max_low, max_turns

  def all_instances(self):
    return [{'low': low, 'high': low + self.width - 1, 'secret': low + s}
            for low in range(1, self.max_low + 1) for s in range(self.width)]

  def key(self, instance):
    return f'{instance["low"]}-{instance["secret"]}'

  def episode(self, instance):
    return GuessNumberEpisode(self, instance)
