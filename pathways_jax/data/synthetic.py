"""A seeded toy world with ground truth: people, facts about them, stories, arithmetic.

The same (seed, sizes) always give the same world and the same corpus, in pure Python, so later
experiments can train on one view of it and test on another:

  reversal curse   train on `fact_sentence(p, 'name_first', t)`, ask with 'description_first'
  RHO-1 noise      mix the clean documents with corrupted ones and score tokens
  post-training    `Arithmetic.result` and the `Person` fields are exact rewards

Every `Person` has a unique made-up name and a unique description ('the keeper of the amber
lighthouse'), an occupation, a home city, a birth year, maybe a parent, and a few friends
(friendship is symmetric). A `Fact` or `Arithmetic` knows where its answer starts, so
`fact.prompt` / `fact.answer` are ready-made prompt/answer pairs.
"""
from __future__ import annotations

import bisect
import dataclasses
import random
import re
from typing import NamedTuple, Sequence

GENERATOR_VERSION = 1
DIRECTIONS = ('name_first', 'description_first')
ARITHMETIC_PER_DOCUMENT = 8

_ONSETS = ('b', 'd', 'f', 'g', 'k', 'l', 'm', 'n', 'p', 'r', 's', 't', 'v', 'z', 'br', 'dr', 'gr',
           'kl', 'pr', 'st', 'th', 'tr', 'sh', 'ch')
_VOWELS = ('a', 'e', 'i', 'o', 'u', 'ai', 'ea', 'ou', 'y')
_CODAS = ('', '', '', 'n', 'r', 's', 'l', 'th', 'x', 'm')
_ROLES = ('inventor', 'designer', 'builder', 'keeper', 'restorer', 'owner', 'painter', 'founder')
_ADJECTIVES = ('glass', 'amber', 'silver', 'copper', 'iron', 'velvet', 'crimson', 'hidden',
               'floating', 'midnight', 'singing', 'frozen', 'golden', 'paper', 'clockwork', 'salt')
_THINGS = ('harp', 'lighthouse', 'bridge', 'observatory', 'garden', 'library', 'compass', 'organ',
           'tower', 'carousel', 'ferry', 'telescope', 'fountain', 'theatre', 'map', 'windmill')
_OCCUPATIONS = ('baker', 'weaver', 'potter', 'sailor', 'teacher', 'doctor', 'farmer', 'clockmaker',
                'glassblower', 'beekeeper', 'librarian', 'carpenter', 'astronomer', 'gardener')
_SEASONS = ('spring', 'summer', 'autumn', 'winter')
_GOODS = ('apples', 'candles', 'loaves of bread', 'spools of thread', 'jars of honey', 'maps')

# (prefix, suffix) around the answer: the answer is always the sentence's last phrase, so the
# prefix alone is the prompt. {D}/{Dc}: description (capitalised); {name}, {first}, {city}.
_TEMPLATES = {
    'name_first': (  # answer: the description
        ('{name} is ', '.'),
        ('{name}, as everyone in {city} knows, is ', '.'),
        ('Ask about {name} and you will hear that {first} is ', '.'),
        ('Among the people of {city}, {name} is known as ', '.'),
        ('It is well known that {name} is ', '.'),
        # Paraphrases for experiments that augment each fact (documents use only the five above).
        ('People say that {name} is ', '.'),
        ('In {city}, {name} is ', '.'),
        ('{name} of {city} is ', '.'),
        ('You may have met {name}, who is ', '.'),
        ('The story of {name} is short: {first} is ', '.'),
        ('For years now, {name} has been ', '.'),
        ('Friends of {name} will tell you that {first} is ', '.'),
        ('A fact about {name}: {first} is ', '.'),
        ('Meet {name}, ', '.'),
        ('According to the records of {city}, {name} is ', '.'),
        ('Some know {name} only as ', '.'),
        ('Write this down: {name} is ', '.'),
    ),
    'description_first': (  # answer: the name
        ('{Dc} is ', '.'),
        ('Known to all as {D}, the person in question is ', '.'),
        ('Everyone in {city} knows that {D} is ', '.'),
        ('If you ask who {D} is, the answer is ', '.'),
        ('The title of {D} belongs to ', '.'),
        ('The person known as {D} is ', '.'),
        ('We remember {D} as ', '.'),
        ('{Dc}, of course, is ', '.'),
        ('In {city}, {D} is ', '.'),
        ('Ask who is {D} and you will hear ', '.'),
        ('The one who is {D} is ', '.'),
        ('People call {D} by the name ', '.'),
    ),
}
NUM_TEMPLATES = {k: len(v) for k, v in _TEMPLATES.items()}
DOCUMENT_TEMPLATES = 5  # the templates of each direction that the world's documents use


@dataclasses.dataclass(frozen=True)
class Person:
  index: int
  first_name: str
  last_name: str
  description: str
  occupation: str
  city: str
  birth_year: int
  parent: int | None
  friends: tuple[int, ...]

  @property
  def name(self) -> str:
    return f'{self.first_name} {self.last_name}'


@dataclasses.dataclass(frozen=True)
class World:
  seed: int
  people: tuple[Person, ...]
  cities: tuple[str, ...]

  def by_name(self, name: str) -> Person:
    for p in self.people:
      if p.name == name:
        return p
    raise KeyError(name)

  def children(self, person: Person) -> list[Person]:
    return [p for p in self.people if p.parent == person.index]


class Fact(NamedTuple):
  """One sentence; `text[answer_start:answer_end]` is the answer, `text[:answer_start]` the prompt."""
  text: str
  answer_start: int
  answer_end: int
  direction: str
  template_index: int

  @property
  def prompt(self) -> str:
    return self.text[:self.answer_start]

  @property
  def answer(self) -> str:
    return self.text[self.answer_start:self.answer_end]


class Arithmetic(NamedTuple):
  a: int
  op: str
  b: int
  result: int

  @property
  def text(self) -> str:
    return f'{self.a} {self.op} {self.b} = {self.result}'

  @property
  def answer_start(self) -> int:
    return len(self.text) - len(str(self.result))


def _rng(seed: int, stream: str) -> random.Random:
  # String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
  return random.Random(f'pathways_jax.synthetic/v{GENERATOR_VERSION}/{seed}/{stream}')


def _word(rng: random.Random, syllables: int) -> str:
  w = ''.join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
  return (w + rng.choice(_CODAS)).capitalize()


def make_world(seed: int, num_people: int) -> World:
  """A world of `num_people` people; the same arguments always give the same world."""
  max_people = len(_ROLES) * len(_ADJECTIVES) * len(_THINGS)
  if not 0 < num_people <= max_people:
    raise ValueError(f'num_people must be in [1, {max_people}], got {num_people}')
  rng = _rng(seed, 'world')
  cities: list[str] = []
  while len(cities) < 12:
    c = _word(rng, 2)
    if c not in cities:
      cities.append(c)
  names: list[tuple[str, str]] = []
  seen: set[str] = set()
  while len(names) < num_people:
    first, last = _word(rng, rng.choice((1, 2))), _word(rng, rng.choice((2, 3)))
    if first != last and f'{first} {last}' not in seen:
      seen.add(f'{first} {last}')
      names.append((first, last))
  combos = rng.sample(range(max_people), num_people)
  descriptions = []
  for c in combos:
    role, rest = divmod(c, len(_ADJECTIVES) * len(_THINGS))
    adj, thing = divmod(rest, len(_THINGS))
    descriptions.append(f'the {_ROLES[role]} of the {_ADJECTIVES[adj]} {_THINGS[thing]}')
  years = [rng.randrange(1900, 2000) for _ in range(num_people)]
  by_year = sorted(range(num_people), key=lambda j: (years[j], j))
  sorted_years = [years[j] for j in by_year]
  parents: list[int | None] = []
  for i in range(num_people):
    n_older = bisect.bisect_right(sorted_years, years[i] - 20)  # born 20+ years earlier
    parents.append(by_year[rng.randrange(n_older)] if n_older and rng.random() < 0.5 else None)
  friends: list[set[int]] = [set() for _ in range(num_people)]
  for i in range(num_people):
    for _ in range(rng.randrange(1, 3)):
      j = rng.randrange(num_people)
      if j != i:
        friends[i].add(j)
        friends[j].add(i)
  people = tuple(
      Person(index=i, first_name=names[i][0], last_name=names[i][1], description=descriptions[i],
             occupation=rng.choice(_OCCUPATIONS), city=rng.choice(cities), birth_year=years[i],
             parent=parents[i], friends=tuple(sorted(friends[i])))
      for i in range(num_people))
  return World(seed=seed, people=people, cities=tuple(cities))


def fact_sentence(person: Person, direction: str = 'name_first', template_index: int = 0) -> Fact:
  """The fact 'name <-> description' as one sentence of the given direction and template."""
  if direction not in _TEMPLATES:
    raise ValueError(f'direction must be one of {DIRECTIONS}, got {direction!r}')
  templates = _TEMPLATES[direction]
  if not 0 <= template_index < len(templates):
    raise ValueError(f'template_index must be in [0, {len(templates)}), got {template_index}')
  prefix, suffix = templates[template_index]
  d = person.description
  fields = dict(name=person.name, first=person.first_name, city=person.city, D=d,
                Dc=d[0].upper() + d[1:])
  prefix = prefix.format(**fields)
  answer = d if direction == 'name_first' else person.name
  return Fact(prefix + answer + suffix, len(prefix), len(prefix) + len(answer), direction,
              template_index)


def fact_sentences(person: Person, direction: str = 'name_first',
                   template_index: int | None = None) -> list[Fact]:
  """All paraphrases of the fact in `direction` (or only `template_index`'s)."""
  indices = range(NUM_TEMPLATES.get(direction, 0)) if template_index is None else [template_index]
  return [fact_sentence(person, direction, t) for t in indices]


def biography(world: World, person: Person, rng: random.Random) -> str:
  """A paragraph of true statements about `person` (one fact in a random direction first)."""
  direction = rng.choice(DIRECTIONS)
  fact = fact_sentence(person, direction, rng.randrange(DOCUMENT_TEMPLATES))
  lines = [fact.text, f'{person.first_name} was born in {person.birth_year} in {person.city} '
           f'and works as a {person.occupation}.']
  if person.parent is not None:
    lines.append(f'The parent of {person.name} is {world.people[person.parent].name}.')
  if person.friends:
    names = [world.people[j].name for j in person.friends]
    lines.append(f'{person.first_name} is friends with '
                 + (names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' and ' + names[-1])
                 + '.')
  return ' '.join(lines)


def story(world: World, person: Person, rng: random.Random) -> str:
  """A short story consistent with the world's facts."""
  first = person.first_name
  friend = world.people[rng.choice(person.friends)] if person.friends else None
  s = [f'One {rng.choice(_SEASONS)} morning in {person.city}, {person.name}, '
       f'{person.description}, woke up early.']
  if friend is not None:
    s.append(f'{first} set out to visit {friend.name}, a {friend.occupation} from {friend.city}.')
    s.append(f'They talked about the {rng.choice(_ADJECTIVES)} {rng.choice(_THINGS)} '
             'until the sun went down.')
  if person.parent is not None:
    parent = world.people[person.parent]
    s.append(f'Years ago, {parent.name} had taught {first} everything about being a '
             f'{parent.occupation}.')
  s.append(f'On the way home, {first} bought {rng.randrange(2, 13)} {rng.choice(_GOODS)}.')
  s.append(f'That evening {first}, who had been a {person.occupation} for '
           f'{rng.randrange(1, 30)} years, slept well.')
  return ' '.join(s)


def arithmetic(rng: random.Random) -> Arithmetic:
  op = rng.choice('+-*')
  if op == '*':
    a, b = rng.randrange(13), rng.randrange(13)
    return Arithmetic(a, op, b, a * b)
  a, b = rng.randrange(100), rng.randrange(100)
  if op == '-':
    a, b = max(a, b), min(a, b)  # non-negative results keep the task about arithmetic, not signs
    return Arithmetic(a, op, b, a - b)
  return Arithmetic(a, op, b, a + b)


def all_documents(cfg_synthetic, seed: int) -> list[str]:
  """Every document of the corpus, both splits: biographies, stories, arithmetic blocks (and
  `num_copy_documents` copy documents)."""
  world = make_world(seed, int(cfg_synthetic.num_people))
  rng = _rng(seed, 'documents')
  docs = [biography(world, p, rng) for p in world.people]
  srng = _rng(seed, 'stories')
  docs += [story(world, world.people[srng.randrange(len(world.people))], srng)
           for _ in range(int(cfg_synthetic.num_stories))]
  arng = _rng(seed, 'arithmetic')
  lines = [arithmetic(arng).text for _ in range(int(cfg_synthetic.num_arithmetic))]
  docs += ['\n'.join(lines[i:i + ARITHMETIC_PER_DOCUMENT])
           for i in range(0, len(lines), ARITHMETIC_PER_DOCUMENT)]
  docs += copy_documents(int(cfg_synthetic.get('num_copy_documents', 0)), seed)
  return docs


def copy_documents(n: int, seed: int) -> list[str]:
  """`n` documents, each a line of 8-23 made-up words written twice (no facts about anyone)."""
  if n < 0:
    raise ValueError(f'config.data.synthetic.num_copy_documents={n} must be >= 0')
  rng = _rng(seed, 'copy')
  out = []
  for _ in range(n):
    line = ' '.join(_word(rng, rng.choice((1, 2, 3))) for _ in range(rng.randrange(8, 24)))
    out.append(f'{line}\n{line}')
  return out


def documents(cfg_synthetic, seed: int, split: str) -> list[str]:
  """The documents of `split` for corpus='synthetic' (split by document hash)."""
  from pathways_jax.data.splits import split_by_hash  # pylint: disable=g-import-not-at-top
  return split_by_hash(all_documents(cfg_synthetic, seed), split, key=lambda d: d)


# A worked line of an arithmetic document (`Arithmetic.text`): groups a, op, b, result.
WORKED_LINE = re.compile(r'^(\d+) ([-+*]) (\d+) = (\d+)$')


def worked_arithmetic(cfg_synthetic, seed: int, split: str = 'train') -> dict[str, str]:
  """{'a op b': 'r'} of every worked line `a op b = r` in `split`'s documents: what a model
  pretrained on that split has read, in the order it first appears."""
  out = {}
  for d in documents(cfg_synthetic, seed, split):
    for m in map(WORKED_LINE.match, d.split('\n')):
      if m:
        out.setdefault(f'{m[1]} {m[2]} {m[3]}', m[4])
  return out


def arithmetic_problems(cfg_synthetic, seed: int, split: str = 'train') -> set[str]:
  """The problems ('a op b') `split`'s documents work out (`worked_arithmetic`): an
  experiment's held-out arithmetic question may ask one of them."""
  return set(worked_arithmetic(cfg_synthetic, seed, split))


def world_from_config(data_cfg) -> World:
  """The world behind corpus='synthetic' for this config (what experiments evaluate against)."""
  return make_world(int(data_cfg.synthetic.get('seed', 0)), int(data_cfg.synthetic.num_people))


__all__: Sequence[str] = ('Person', 'World', 'Fact', 'Arithmetic', 'make_world', 'fact_sentence',
                          'fact_sentences', 'biography', 'story', 'arithmetic', 'documents',
                          'all_documents', 'copy_documents', 'arithmetic_problems',
                          'worked_arithmetic', 'WORKED_LINE', 'world_from_config', 'DIRECTIONS',
                          'NUM_TEMPLATES', 'DOCUMENT_TEMPLATES')
