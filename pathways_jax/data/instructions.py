"""An instruction set with exact answers, generated from the synthetic world (data.synthetic).

    examples = instructions.from_config(cfg.data)          # {'train': [...], 'heldout': [...]}
    instructions.write_jsonl(examples['train'], 'train.jsonl')   # what data.corpus='chat' reads
    instructions.check(example, 'Answer: 1925')            # {'format_ok': ..., 'correct': ...}

    python -m pathways_jax.data.instructions --out=DIR [--seed=0 --num_people=200 ...]

Every example is one question and one format instruction, e.g.

    prompt  "When was Brylun Ruchefur born? Reply as `Answer: <year>`."
    answer  "Answer: 1925"

Questions (`KINDS`): about the world's people, one kind per fact the world holds (description,
name from the description, occupation, city, birth year, parent, a friend), about the names
themselves (first name, family name: answerable from the prompt alone) and arithmetic problems
of `synthetic.arithmetic`'s kind. Each kind has three question templates; the last one is held
out (it appears only in the held-out split). Formats (`FORMATS`): the bare answer, `Answer: <x>`,
upper case, JSON `{"answer": x}`, square brackets; numbers are never asked in upper case.

The split rule (`split_by`): the unit held out is a question -- its text, i.e. (kind, subject,
template) -- (`'question'`, the default), or every question about one fact, (kind, subject), the
subject being the person's name or the problem `a op b` (`'subject'`: no held-out answer is ever
shown in training either). A unit is held out when the hash of its name falls below
`heldout_fraction` (`data.splits.split_by_hash`); the held-out split asks each of its questions
once, in one format, and training asks every other question of the trained templates in
`variants` formats. Every format of a question lands on the same side, so no held-out question
appears in training. The last template of each kind is never trained on: a held-out question in
it is phrased in a way training never uses. The same (world, arguments) always give the same
examples (each question's formats are seeded by its text) in a fixed, hash-mixed order.

`check` judges an output (the generated text up to eos). `format_ok` is whether the output
follows the asked format, whatever the answer: one line, the wrapper exactly (`Answer: x`, `[x]`,
a JSON object with the one key "answer"), and inside it a plain answer -- a number, or one to
eight words of letters, upper case when asked (a name where a year was asked is a wrong answer in
the right format). `correct` is whether the answer is right, lenient on format: the output is
unwrapped with any known format, or its first line taken, and compared ignoring case, spacing and
a final '.'; so a right answer in the wrong format counts as right.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import sys
from typing import Sequence

from pathways_jax.data import splits as splits_lib
from pathways_jax.data import synthetic
from pathways_jax.data.corpora import DataError

GENERATOR_VERSION = 1
SPLITS = ('train', 'heldout')
SPLIT_BY = ('question', 'subject')


@dataclasses.dataclass(frozen=True)
class Kind:
  templates: tuple[str, ...]  # the last one is never trained on
  noun: str                   # what the format instruction calls the answer
  number: bool = False        # a number: never upper-cased, an int in JSON


KINDS = {
    'description': Kind(('Who is {name}?', 'What is {name} known as?',
                         'How would you describe {name}?'), 'description'),
    'name': Kind(('Who is {description}?', 'What is the name of {description}?',
                  'Which person is {description}?'), 'name'),
    'occupation': Kind(('What does {name} do for a living?', "What is {name}'s occupation?",
                        'What work does {name} do?'), 'occupation'),
    'city': Kind(('Where was {name} born?', 'In which city was {name} born?',
                  'What is the home city of {name}?'), 'city'),
    'birth_year': Kind(('In what year was {name} born?', 'When was {name} born?',
                        'What is the birth year of {name}?'), 'year', number=True),
    'parent': Kind(('Who is the parent of {name}?', "Who is {name}'s parent?",
                    'Name the parent of {name}.'), 'name'),
    'friend': Kind(('Name a friend of {name}.', 'Who is one of the friends of {name}?',
                    'Give the name of someone {name} is friends with.'), 'name'),
    'first_name': Kind(('What is the first name of {name}?', 'Give the given name of {name}.',
                        'Which part of "{name}" is the first name?'), 'name'),
    'last_name': Kind(('What is the family name of {name}?', 'What is the last name of {name}?',
                       'Give the surname of {name}.'), 'name'),
    'arithmetic': Kind(('What is {a} {op} {b}?', 'Compute {a} {op} {b}.',
                        'Calculate {a} {op} {b}.'), 'number', number=True),
}

FORMATS = {
    'bare': 'Answer with the {noun} only.',
    'prefix': 'Reply as `Answer: <{noun}>`.',
    'upper': 'Answer with the {noun} only, in capital letters.',
    'json': 'Reply with JSON: {{"answer": <{noun}>}}.',
    'brackets': 'Answer with the {noun} in square brackets.',
}


@dataclasses.dataclass(frozen=True)
class Example:
  kind: str
  subject: str                 # the person's name or the problem 'a op b'
  template: int
  format: str
  question: str
  prompt: str                  # the question and the format instruction
  answer: str                  # the exact expected output
  accepted: tuple[str, ...]    # plain answers that count as correct (`answer` holds the first)

  @property
  def key(self) -> str:
    """The fact asked about: (kind, subject)."""
    return f'{self.kind}|{self.subject}'

  @property
  def heldout_template(self) -> bool:
    return self.template == len(KINDS[self.kind].templates) - 1


def formats_for(kind: str) -> tuple[str, ...]:
  if kind not in KINDS:
    raise ValueError(f'unknown question kind {kind!r}; kinds: {tuple(KINDS)}')
  return tuple(f for f in FORMATS if not (KINDS[kind].number and f == 'upper'))


def render_answer(kind: str, fmt: str, value: str) -> str:
  """The exact output the format asks for, around the plain answer `value`."""
  if fmt not in formats_for(kind):
    raise ValueError(f'format {fmt!r} is not one of {formats_for(kind)} (kind {kind!r})')
  if fmt == 'prefix':
    return f'Answer: {value}'
  if fmt == 'upper':
    return value.upper()
  if fmt == 'json':
    return json.dumps({'answer': int(value) if KINDS[kind].number else value})
  if fmt == 'brackets':
    return f'[{value}]'
  return value


# A plain answer: a number, or one to eight words of letters (no punctuation, no wrapper).
_PLAIN = re.compile(r'\d{1,6}|[A-Za-z]{1,20}(?: [A-Za-z]{1,20}){0,7}')


def _plain(text: str, upper: bool = False) -> bool:
  """Whether `text` is a plain answer (`upper`: words in upper case)."""
  if upper:
    return text == text.upper() and any(c.isalpha() for c in text) and bool(_PLAIN.fullmatch(text))
  return bool(_PLAIN.fullmatch(text))


def format_ok(kind: str, fmt: str, output: str) -> bool:
  """Whether `output` is exactly in format `fmt` with a plain answer inside (right or wrong)."""
  text = output.strip()
  if fmt not in formats_for(kind):
    raise ValueError(f'format {fmt!r} is not one of {formats_for(kind)} (kind {kind!r})')
  if fmt == 'bare':
    return _plain(text)
  if fmt == 'upper':
    return _plain(text, upper=True)
  if fmt == 'prefix':
    m = re.fullmatch(r'Answer: (.*)', text)
    return bool(m) and _plain(m.group(1))
  if fmt == 'brackets':
    m = re.fullmatch(r'\[(.*)\]', text)
    return bool(m) and _plain(m.group(1))
  try:  # json
    obj = json.loads(text)
  except ValueError:
    return False
  if not isinstance(obj, dict) or set(obj) != {'answer'}:
    return False
  v = obj['answer']
  if isinstance(v, int) and not isinstance(v, bool):
    return v >= 0
  return isinstance(v, str) and _plain(v)


def _candidates(output: str) -> list[str]:
  """Every reading of an output as a plain answer: unwrapped by each format, or its first line."""
  text = output.strip()
  out = [text, text.split('\n')[0]]
  for pattern in (r'Answer:\s*(.*)', r'\[(.*)\]'):
    m = re.fullmatch(pattern, text, flags=re.S)
    if m:
      out.append(m.group(1))
  try:
    obj = json.loads(text)
    if isinstance(obj, dict) and 'answer' in obj:
      out.append(str(obj['answer']))
  except ValueError:
    pass
  return out


def normalise_answer(s: str) -> str:
  """Whitespace collapsed, a final period and case dropped: how answers are compared."""
  return ' '.join(s.split()).rstrip('.').strip().casefold()


def check(example: Example, output: str) -> dict[str, bool]:
  """{'format_ok': strict format match, 'correct': the right answer in any known format}."""
  accepted = {normalise_answer(a) for a in example.accepted}
  return {'format_ok': format_ok(example.kind, example.format, output),
          'correct': any(normalise_answer(c) in accepted for c in _candidates(output))}


# ------------------------------------------------------------------------------------ generation

def _questions(world: synthetic.World, num_arithmetic: int, seed: int):
  """(kind, subject, template fields, accepted answers) of every question the world allows."""
  by_index = world.people
  for p in world.people:
    fields = {'name': p.name, 'description': p.description}
    yield 'description', p.name, fields, (p.description,)
    yield 'name', p.name, fields, (p.name,)
    yield 'occupation', p.name, fields, (p.occupation,)
    yield 'city', p.name, fields, (p.city,)
    yield 'birth_year', p.name, fields, (str(p.birth_year),)
    if p.parent is not None:
      yield 'parent', p.name, fields, (by_index[p.parent].name,)
    if p.friends:  # any friend is right; training shows the first
      yield 'friend', p.name, fields, tuple(by_index[j].name for j in p.friends)
    yield 'first_name', p.name, fields, (p.first_name,)
    yield 'last_name', p.name, fields, (p.last_name,)
  rng = random.Random(f'pathways_jax.instructions/v{GENERATOR_VERSION}/{seed}/arithmetic')
  seen: set[tuple[int, str, int]] = set()
  for _ in range(100 * num_arithmetic):  # far more draws than needed: 15k distinct problems exist
    if len(seen) == num_arithmetic:
      break
    a = synthetic.arithmetic(rng)
    if (a.a, a.op, a.b) in seen:
      continue
    seen.add((a.a, a.op, a.b))
    yield 'arithmetic', f'{a.a} {a.op} {a.b}', {'a': a.a, 'op': a.op, 'b': a.b}, (str(a.result),)


def _example(kind, subject, fields, accepted, template, fmt) -> Example:
  spec = KINDS[kind]
  question = spec.templates[template].format(**fields)
  prompt = f'{question} {FORMATS[fmt].format(noun=spec.noun)}'
  return Example(kind, subject, template, fmt, question, prompt,
                 render_answer(kind, fmt, accepted[0]), tuple(accepted))


def _hash(text: str) -> str:
  return hashlib.blake2b(text.encode('utf-8'), digest_size=8).hexdigest()


def make_examples(world: synthetic.World, *, num_arithmetic: int = 400, variants: int = 2,
                  heldout_fraction: float = 0.2, split_by: str = 'question'
                  ) -> dict[str, list[Example]]:
  """{'train': [...], 'heldout': [...]} of `world` (the rule is in the module docstring)."""
  if split_by not in SPLIT_BY:
    raise ValueError(f'split_by={split_by!r} is not one of {SPLIT_BY}')
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f'heldout_fraction must be in (0, 1), got {heldout_fraction}')
  if variants < 1:
    raise ValueError(f'variants must be >= 1, got {variants}')
  if num_arithmetic < 0:
    raise ValueError(f'num_arithmetic must be >= 0, got {num_arithmetic}')
  asked = []  # (unit, seed text, question tuple, template)
  for q in _questions(world, num_arithmetic, world.seed):
    kind, subject = q[0], q[1]
    for t in range(len(KINDS[kind].templates)):
      text = KINDS[kind].templates[t].format(**q[2])
      asked.append((text if split_by == 'question' else f'{kind}|{subject}', text, q, t))
  heldout_units = {a[0] for a in splits_lib.split_by_hash(asked, 'validation', key=lambda a: a[0],
                                                          fraction=heldout_fraction)}
  out: dict[str, list[Example]] = {'train': [], 'heldout': []}
  for unit, text, q, t in asked:
    rng = random.Random(f'pathways_jax.instructions/v{GENERATOR_VERSION}/{world.seed}/{text}')
    formats = formats_for(q[0])
    if unit in heldout_units:
      out['heldout'].append(_example(*q, t, rng.choice(formats)))
    elif t < len(KINDS[q[0]].templates) - 1:  # the last template is never trained on
      out['train'] += [_example(*q, t, f) for f in rng.sample(formats, min(variants,
                                                                           len(formats)))]
  for split, examples in out.items():
    if not examples:
      raise DataError(f'the {split} split of the instruction set is empty (a world of '
                      f'{len(world.people)} people, heldout_fraction={heldout_fraction})')
    # A fixed order that mixes kinds, so the first N examples are a fair sample of the split.
    examples.sort(key=lambda e: _hash(e.prompt))
  return out


# The kinds that ask a fact the world holds about a person (not the name itself, not arithmetic).
PERSON_KINDS = ('description', 'name', 'occupation', 'city', 'birth_year', 'parent', 'friend')


def person_questions(world: synthetic.World, *, kinds: Sequence[str] = PERSON_KINDS,
                     templates: Sequence[int] = (0, 1), variants: int = 1,
                     people: Sequence[synthetic.Person] | None = None) -> list[Example]:
  """Every question of `kinds` about `people` (default: all of `world`'s) in `templates`, each
  in `variants` formats chosen by its text as `make_examples` chooses them (template 2, the
  last, is the one `make_examples` never trains on). No split: callers split by person."""
  unknown = [k for k in kinds if k not in PERSON_KINDS]
  if unknown:
    raise ValueError(f'kinds {unknown} are not person kinds {PERSON_KINDS}')
  names = None if people is None else {p.name for p in people}
  out = []
  for q in _questions(world, 0, world.seed):
    kind, subject = q[0], q[1]
    if kind not in kinds or (names is not None and subject not in names):
      continue
    for t in templates:
      text = KINDS[kind].templates[t].format(**q[2])
      rng = random.Random(f'pathways_jax.instructions/v{GENERATOR_VERSION}/{world.seed}/{text}')
      formats = formats_for(kind)
      out += [_example(*q, t, f) for f in rng.sample(formats, min(variants, len(formats)))]
  return out


def open_book(example: Example, passages: Sequence[str]) -> Example:
  """`example` with `passages` before its question in the prompt (the reading-comprehension
  form: the answer may be in a passage, or, when none is about the subject, in the model)."""
  context = '\n'.join(f'Passage {i + 1}: {p}' for i, p in enumerate(passages))
  return dataclasses.replace(example, prompt=f'{context}\n\n{example.prompt}')


def from_config(data_cfg, **kwargs) -> dict[str, list[Example]]:
  """The instruction set of the world behind a config's data.synthetic section."""
  return make_examples(synthetic.world_from_config(data_cfg), **kwargs)


# ------------------------------------------------------------------------------------------ files

def to_record(example: Example) -> dict:
  """A chat record (`{"messages": [...]}`, what data.corpus='chat' reads) with the example's
  fields beside it, so a held-out file can be read back and checked."""
  return {'messages': [{'role': 'user', 'content': example.prompt},
                       {'role': 'assistant', 'content': example.answer}],
          **{k: v for k, v in dataclasses.asdict(example).items() if k not in ('prompt', 'answer')}}


def write_jsonl(examples: Sequence[Example], path: str) -> str:
  if not examples:
    raise DataError(f'no examples to write to {path}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for e in examples:
      f.write(json.dumps(to_record(e)) + '\n')
  return path


def read_jsonl(path: str) -> list[Example]:
  """The examples of a file `write_jsonl` wrote (errors name the file and line)."""
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        user, assistant = r['messages']
        out.append(Example(r['kind'], r['subject'], int(r['template']), r['format'],
                           r['question'], user['content'], assistant['content'],
                           tuple(r['accepted'])))
      except (ValueError, KeyError, TypeError) as e:
        raise DataError(f'{path}:{n}: not an instruction example ({e!r})') from None
      if out[-1].kind not in KINDS or out[-1].format not in formats_for(out[-1].kind):
        raise DataError(f'{path}:{n}: unknown kind or format ({out[-1].kind!r}, '
                        f'{out[-1].format!r})')
  if not out:
    raise DataError(f'{path} holds no instruction examples')
  return out


def write_splits(examples: dict[str, list[Example]], out_dir: str) -> dict[str, str]:
  """OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl; returns their paths."""
  return {s: write_jsonl(examples[s], os.path.join(out_dir, f'{s}.jsonl')) for s in SPLITS}


def main(argv) -> int:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    world = synthetic.make_world(f.seed, f.num_people)
    examples = make_examples(world, num_arithmetic=f.num_arithmetic, variants=f.variants,
                             heldout_fraction=f.heldout_fraction, split_by=f.split_by)
    paths = write_splits(examples, f.out)
  except (ValueError, OSError) as e:  # DataError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 1
  for split, path in paths.items():
    print(f'{split}: {len(examples[split])} examples -> {path}')
  return 0


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('out', None, 'output directory (train.jsonl, heldout.jsonl)', required=True)
  flags.DEFINE_integer('seed', 0, "the world's seed (data.synthetic.seed)")
  flags.DEFINE_integer('num_people', 200, 'people in the world (data.synthetic.num_people)')
  flags.DEFINE_integer('num_arithmetic', 400, 'distinct arithmetic problems')
  flags.DEFINE_integer('variants', 2, 'formats per training question')
  flags.DEFINE_float('heldout_fraction', 0.2, 'share of the units held out')
  flags.DEFINE_enum('split_by', 'question', list(SPLIT_BY), 'the unit held out')
  app.run(lambda argv: sys.exit(main(argv)))
