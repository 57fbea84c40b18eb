"""Multi-turn games with exact outcomes: what an agent plays, turn by turn, in plain text.

    game = games.make('guess_number')
    instance = game.instances('train', 100, seed=0)[0]   # a JSON-able dict: one secret
    ep = game.episode(instance)
    ep.intro                       # the first user message: rules, move format, turn budget
    reply = ep.step('Guess: 16')   # Reply(text='Higher.', done=False, success=False, legal=True)

An episode is a conversation: the intro as the user's first message, then the agent's moves
(assistant turns) and the game's replies (user turns). A move the game cannot parse, or one its
rules forbid, is *illegal*: the game says so, the turn is spent and counted, and play goes on (an
agent's bad output never ends or crashes a rollout). An episode ends on success or when its turn
budget (`max_turns` moves) is spent. A legal move is also judged *consistent* or not: consistent
with everything the game has said so far -- a guess among the secrets still possible, a question
whose answer is not already known -- the measure of play that luck does not inflate. `ep.random_move(rng)` is a uniformly random legal move: the
random-play transcripts a base model learns the games' formats from.

Instances are split by hash of their key (`data.splits.split_by_hash`): 'heldout' instances are
never trained on; the same (split, n, seed) always gives the same instances.
"""
from __future__ import annotations

import abc
import random
from typing import NamedTuple

from pathways_jax.data import splits as splits_lib

SPLITS = ('train', 'heldout')
HELDOUT_FRACTION = 0.2


class Reply(NamedTuple):
  text: str       # the game's answer to the move (the next user message)
  done: bool      # the episode is over (success, or the turn budget is spent)
  success: bool   # the agent has won
  legal: bool     # the move was understood and allowed
  consistent: bool  # a legal move that agrees with every earlier reply (could win, or informs)


class Episode(abc.ABC):
  """One game being played; `step` keeps the turn count, the illegal count and the outcome."""

  def __init__(self, game: 'Game', instance: dict):
    self.game, self.instance = game, instance
    self.turns = self.illegal = self.consistent = 0
    self.done = self.success = False

  @property
  @abc.abstractmethod
  def intro(self) -> str:
    """The rules, the move format and the turn budget: the conversation's first message."""

  @abc.abstractmethod
  def respond(self, move: str) -> tuple[str, bool, bool, bool]:
    """(reply text, success, legal, consistent) of one move, the episode's record of what is
    still possible updated; called by `step`."""

  @abc.abstractmethod
  def random_move(self, rng: random.Random) -> str:
    """A uniformly random legal move."""

  @abc.abstractmethod
  def answer(self) -> str:
    """The secret, as the game reveals it when the agent runs out of turns."""

  def step(self, move: str) -> Reply:
    if self.done:
      raise RuntimeError('the episode is over: start a new one')
    text, success, legal, consistent = self.respond(move.strip())
    self.turns += 1
    self.illegal += not legal
    self.consistent += consistent
    self.success = success
    self.done = success or self.turns >= self.game.max_turns
    if self.done and not success:
      text = f'{text} No turns left. {self.answer()}'
    return Reply(text, self.done, success, legal, consistent)


class Game(abc.ABC):
  """A game: its instances (secrets) and a fresh `Episode` per instance."""
  name: str = ''
  max_turns: int = 0

  @abc.abstractmethod
  def all_instances(self) -> list[dict]:
    """Every instance of the game, in a fixed order (small games) -- or a large fixed pool."""

  @abc.abstractmethod
  def key(self, instance: dict) -> str:
    """What the split hashes: instances with one key land on one side."""

  @abc.abstractmethod
  def episode(self, instance: dict) -> Episode:
    ...

  def instances(self, split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` instances of `split` (fewer if the split holds fewer), sampled with `seed`."""
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if n < 1:
      raise ValueError(f'n must be >= 1, got {n}')
    side = 'validation' if split == 'heldout' else 'train'
    pool = splits_lib.split_by_hash(self.all_instances(), side,
                                    key=lambda x: f'{self.name}/{self.key(x)}',
                                    fraction=HELDOUT_FRACTION)
    rng = random.Random(f'{self.name}/{split}/{seed}')
    return rng.sample(pool, min(n, len(pool)))
