"""Fact sentences as token rows whose prompt, answer and name spans are exact.

A fact is "name <-> description" about a person of the synthetic world (`data.synthetic`) or of a
user's facts file, written in one of `synthetic.fact_sentence`'s templates. Experiments that train
on some views of a fact and test on others (the reversal curse; later, rewards for post-training)
need to know exactly which tokens are the prompt, the answer and the name: `encode_fact` gives
that, `to_arrays` turns rows into padded training arrays.
"""
from __future__ import annotations

import dataclasses
import json
import random

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entity:
  """What a fact sentence needs of a person (synthetic.Person or a line of the facts file)."""
  name: str
  first_name: str
  description: str
  city: str


def entity_of(p) -> Entity:
  """The fields of a `synthetic.Person` that a fact sentence uses."""
  return Entity(p.name, p.first_name, p.description, p.city)


def load_facts_file(path: str, cities) -> list[Entity]:
  """JSONL lines `{"name": ..., "description": ...}` as entities; a bad line is refused naming it:
  not JSON, a missing or empty field, a name or description that an earlier line already has, or
  a description that holds another line's name (it would state that fact the other way round)."""
  from pathways_jax.data.corpora import DataError  # pylint: disable=g-import-not-at-top
  out, lines, seen_name, seen_desc = [], [], {}, {}
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{lineno}: invalid JSON ({e.msg})') from None
      if not isinstance(rec, dict) or not isinstance(rec.get('name'), str) or not isinstance(
          rec.get('description'), str) or not rec['name'].strip() or not rec['description'].strip():
        raise DataError(f'{path}:{lineno}: needs non-empty string fields "name" and "description"')
      name, desc = ' '.join(rec['name'].split()), ' '.join(rec['description'].split()).rstrip('.')
      if not desc:
        raise DataError(f'{path}:{lineno}: the description of {name!r} is empty')
      for key, seen, what in ((name, seen_name, 'name'), (desc.lower(), seen_desc, 'description')):
        if key in seen:
          raise DataError(f'{path}:{lineno}: the {what} {key!r} is already on line {seen[key]}')
        seen[key] = lineno
      city = random.Random(f'reversal/{name}').choice(cities)
      out.append(Entity(name, name.split()[0], desc, city))
      lines.append(lineno)
  if not out:
    raise DataError(f'{path}: no facts')
  owner = find_names_in_descriptions(out)
  if owner:
    i, j = owner
    raise DataError(f'{path}:{lines[i]}: the description {out[i].description!r} holds the name '
                    f'{out[j].name!r} of line {lines[j]}')
  return out


def find_names_in_descriptions(people: list[Entity]) -> tuple[int, int] | None:
  """(i, j) for the first description i that holds the name of person j as whole words, else
  None. Scans each description's word spans against the set of names (linear, not pairwise)."""
  by_words = {tuple(p.name.lower().split()): j for j, p in enumerate(people)}
  longest = max(len(k) for k in by_words)
  for i, p in enumerate(people):
    words = [w.strip('.,;:!?"\'()') for w in p.description.lower().split()]
    for a in range(len(words)):
      for b in range(a + 1, min(len(words), a + longest) + 1):
        j = by_words.get(tuple(words[a:b]))
        if j is not None:
          return i, j
  return None


@dataclasses.dataclass
class Row:
  tokens: list[int]  # bos + sentence + eos (no padding)
  prompt_len: int  # tokens before the answer (bos included)
  answer: tuple[int, int]  # token range of the answer phrase
  name: tuple[int, int]  # token range of the (first) full name
  text: str
  answer_text: str


def encode_fact(tok, person: Entity, direction: str, template: int) -> Row:
  """The fact as tokens, pieces tokenized separately so the name and answer spans are exact.

  Cuts are made before the space that starts the name / answer (and before the final '.'), so
  every prompt ends on a word and every answer starts with its own leading-space token.
  """
  from pathways_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  f = synthetic.fact_sentence(person, direction, template)
  text = f.text
  ns = text.find(person.name)
  spans = {'answer': (f.answer_start, f.answer_end), 'name': (ns, ns + len(person.name))}
  cuts = {0, len(text)}
  for s, e in spans.values():
    cuts |= {s - 1 if s > 0 and text[s - 1] == ' ' else s, e}
  cuts = sorted(cuts)
  ids, starts = [tok.bos_id], {}
  for a, b in zip(cuts[:-1], cuts[1:]):
    starts[a] = len(ids)
    ids += list(tok.encode(text[a:b]))
  starts[len(text)] = len(ids)

  def rng(s, e):
    s = s - 1 if s > 0 and text[s - 1] == ' ' else s
    return starts[s], starts[e]

  ids.append(tok.eos_id)
  a = rng(*spans['answer'])
  return Row(ids, a[0], a, rng(*spans['name']), text, f.answer)


def to_arrays(rows: list[Row], seq_len: int, eos_id: int):
  """tokens [N, L] (eos-padded), prompt [N, L] bool (bos + prompt), real [N, L] bool (not padding)."""
  n = len(rows)
  tokens = np.full((n, seq_len), eos_id, np.int32)
  prompt = np.zeros((n, seq_len), bool)
  real = np.zeros((n, seq_len), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r.tokens)] = r.tokens
    prompt[i, :r.prompt_len] = True
    real[i, :len(r.tokens)] = True
  return tokens, prompt, real
