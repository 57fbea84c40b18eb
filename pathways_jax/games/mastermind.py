"""Mastermind: a hidden code of `length` digits from 1..`colors`; each guess is scored with the
number of digits in the right place (exact) and of right digits in a wrong place (near).

    intro  "Find my code of 3 digits from 1 to 4 in 8 guesses. Reply `Guess: ddd`. I say how
            many digits are in place (exact) and how many are right but misplaced (near)."
    move   "Guess: 112"   reply "1 exact, 1 near."

With 3 digits of 4 colours there are 64 codes; guessing only codes consistent with every answer
so far wins within 6 guesses; random guessing within 8, about 1 in 10. Digits may be separated by
spaces or not ('112', '1 1 2'); any other shape, or a digit out of range, is illegal; a code
that an earlier answer already rules out is legal but not consistent.
"""
from __future__ import annotations

import itertools
import random
import re

from pathways_jax.games.base import Episode, Game


def score(code: tuple[int, ...], guess: tuple[int, ...]) -> tuple[int, int]:
  """(exact, near) of `guess` against `code` (the classic rule: near counts colour matches beyond
  the exact ones)."""
  exact = sum(c == g for c, g in zip(code, guess))
  common = sum(min(code.count(v), guess.count(v)) for v in set(guess))
  return exact, common - exact


class MastermindEpisode(Episode):

  def __init__(self, game, instance):
    super().__init__(game, instance)
    self.possible = [tuple(c['code']) for c in game.all_instances()]  # agree with every answer

  @property
  def intro(self) -> str:
    g = self.game
    return (f'Find my code of {g.length} digits from 1 to {g.colors} in {g.max_turns} guesses. '
            f'Reply `Guess: {"d" * g.length}`. I say how many digits are in place (exact) and how '
            'many are right but misplaced (near).')

  def respond(self, move):
    g = self.game
    m = re.match(r'^guess\s*:?\s*([\d ]+?)\s*\.?$', move, re.IGNORECASE)
    digits = [int(d) for d in m.group(1) if d != ' '] if m else []
    if len(digits) != g.length or not all(1 <= d <= g.colors for d in digits):
      return (f'Reply `Guess: ` and {g.length} digits from 1 to {g.colors}.', False, False,
              False)
    guess = tuple(digits)
    consistent = guess in self.possible
    exact, near = score(tuple(self.instance['code']), guess)
    self.possible = [c for c in self.possible if score(c, guess) == (exact, near)]
    if exact == g.length:
      return 'Correct!', True, True, True
    return f'{exact} exact, {near} near.', False, True, consistent

  def random_move(self, rng: random.Random) -> str:
    return 'Guess: ' + ''.join(str(rng.randint(1, self.game.colors))
                               for _ in range(self.game.length))

  def answer(self) -> str:
    return 'The code was ' + ' '.join(map(str, self.instance['code'])) + '.'


class Mastermind(Game):
  name = 'mastermind'

  def __init__(self, length: int = 3, colors: int = 4, max_turns: int = 8):
    if not 1 <= length <= 6 or not 2 <= colors <= 9 or max_turns < 1:
      raise ValueError(f'mastermind needs length in 1..6, colors in 2..9, max_turns >= 1; got '
                       f'{length}, {colors}, {max_turns}')
    self.length, self.colors, self.max_turns = length, colors, max_turns

  def all_instances(self):
    return [{'code': list(c)}
            for c in itertools.product(range(1, self.colors + 1), repeat=self.length)]

  def key(self, instance):
    return ''.join(map(str, instance['code']))

  def episode(self, instance):
    return MastermindEpisode(self, instance)
