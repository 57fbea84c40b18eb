"""Twenty questions about the synthetic world's people: find the one the game has in mind among a
few candidates, with yes/no questions answered from the world's ground truth.

    intro  "Guess who I am thinking of in 6 turns: Brylun Ruchefur (baker, Tanor); Ko Vesh
            (sailor, Drim); ... Ask `Is the person a <occupation>?` or `Was the person born in
            <city>?`, or guess `Is it <name>?`."
    move   "Was the person born in Drim?"   reply "No."
    move   "Is it Brylun Ruchefur?"         reply "Yes!"  (success)

The world is `data.synthetic.make_world(world_seed, num_people)` (the people of the instruction
set and of the synthetic corpus). An instance is `candidates` people and the secret one. A wrong
guess is a legal move answered "No."; a question the game cannot parse, or about an occupation,
city or name that no candidate has, is illegal; a legal question whose answer the earlier
answers already give, or a guess they rule out, is not consistent. Asking about attributes that split the
candidates, then guessing, wins in about log2(candidates) + 1 turns; random play within 6 turns
about 2 in 5 (4 candidates).
"""
from __future__ import annotations

import random
import re

from pathways_jax.data import synthetic
from pathways_jax.games.base import Episode, Game

_OCCUPATION = re.compile(r'^is the person an? ([a-z ]+?)\s*\??$', re.IGNORECASE)
_CITY = re.compile(r'^was the person born in ([a-z ]+?)\s*\??$', re.IGNORECASE)
_GUESS = re.compile(r'^is it ([a-z ]+?)\s*\??$', re.IGNORECASE)


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


class TwentyQuestionsEpisode(Episode):

  def __init__(self, game, instance):
    super().__init__(game, instance)
    self.alive = list(range(len(instance['candidates'])))  # agree with every answer so far

  @property
  def people(self) -> list[dict]:
    return self.instance['candidates']

  @property
  def secret(self) -> dict:
    return self.people[self.instance['secret']]

  @property
  def intro(self) -> str:
    listed = '; '.join(f'{p["name"]} ({p["occupation"]}, {p["city"]})' for p in self.people)
    return (f'Guess who I am thinking of in {self.game.max_turns} turns: {listed}. Ask `Is the '
            'person a <occupation>?` or `Was the person born in <city>?`, or guess `Is it '
            '<name>?`.')

  def respond(self, move):
    for pattern, field in ((_OCCUPATION, 'occupation'), (_CITY, 'city'), (_GUESS, 'name')):
      m = pattern.match(move)
      if not m:
        continue
      value = ' '.join(m.group(1).lower().split())
      if value not in {p[field].lower() for p in self.people}:
        return f'No candidate has that {field}.', False, False, False
      has = {j for j in self.alive if self.people[j][field].lower() == value}
      yes = value == self.secret[field].lower()
      # A question is consistent when its answer is not yet known; a guess, when it could win.
      consistent = bool(has) if field == 'name' else 0 < len(has) < len(self.alive)
      self.alive = [j for j in self.alive if (j in has) == yes]
      if field == 'name':
        return ('Yes!', True, True, True) if yes else ('No.', False, True, consistent)
      return ('Yes.' if yes else 'No.'), False, True, consistent
    return 'Ask about an occupation or a city, or guess a name.', False, False, False

  def random_move(self, rng: random.Random) -> str:
    moves = sorted({f'Is the person {_article(p["occupation"])} {p["occupation"]}?'
                    for p in self.people} |
                   {f'Was the person born in {p["city"]}?' for p in self.people} |
                   {f'Is it {p["name"]}?' for p in self.people})
    return rng.choice(moves)

  def answer(self) -> str:
    return f'It was {self.secret["name"]}.'


class TwentyQuestions(Game):
  name = 'twenty_questions'

  def __init__(self, world_seed: int = 0, num_people: int = 60, candidates: int = 4,
               max_turns: int = 6, pool: int = 2000):
    if candidates < 2 or max_turns < 1 or pool < 1:
      raise ValueError(f'twenty_questions needs candidates >= 2, max_turns >= 1, pool >= 1; got '
                       f'{candidates}, {max_turns}, {pool}')
    if candidates > num_people:
      raise ValueError(f'{candidates} candidates from a world of {num_people} people')
    self.world_seed, self.num_people = world_seed, num_people
    self.candidates, self.max_turns, self.pool = candidates, max_turns, pool

  def all_instances(self):
    world = synthetic.make_world(self.world_seed, self.num_people)
    people = [{'name': f'{p.first_name} {p.last_name}'.title(), 'occupation': p.occupation,
               'city': p.city.title()} for p in world.people]
    rng = random.Random(f'twenty_questions/{self.world_seed}/{self.num_people}/{self.candidates}')
    out, seen = [], set()
    for _ in range(self.pool):
      group = rng.sample(range(len(people)), self.candidates)
      secret = rng.randrange(self.candidates)
      key = (tuple(sorted(group)), group[secret])
      if key not in seen:
        seen.add(key)
        out.append({'candidates': [people[j] for j in group], 'secret': secret})
    return out

  def key(self, instance):
    names = sorted(p['name'] for p in instance['candidates'])
    return '|'.join(names) + '>' + instance['candidates'][instance['secret']]['name']

  def episode(self, instance):
    return TwentyQuestionsEpisode(self, instance)
