"""A verifiable downstream check for models pretrained on a corpus with arithmetic lines mixed in:
held-out problems of `data.synthetic.arithmetic`'s kind ('a op b = c'), answered few-shot by
each model with its own sampler, scored by exact match.

    test, train = split_problems(seed, num_test=200)      # disjoint sets of distinct problems
    lines = training_lines(train, num_lines, seed)        # what goes into the training corpus
    res = accuracy(model, params, tok, 'ar' | 'llada', test, pick_shots(train, 4, seed))

The prompt is `shots` lines and the question, one per line (`'57 + 23 = '`), so the model sees
the format the corpus taught it, not the start of an unrelated row. AR decodes greedily with the
KV cache; LLaDA fills `answer_width` masks with the low-confidence sampler, one token per step,
in one block. The answer is the text before the first newline, stripped.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from pathways_jax.data import synthetic

ANSWER_WIDTH = 5  # the longest result (198 or 144: three digits) + newline + one spare


def all_problems() -> list[synthetic.Arithmetic]:
  """Every distinct problem the generator can draw, in a fixed order."""
  out = [synthetic.Arithmetic(a, '+', b, a + b) for a in range(100) for b in range(100)]
  out += [synthetic.Arithmetic(a, '-', b, a - b) for a in range(100) for b in range(a + 1)]
  out += [synthetic.Arithmetic(a, '*', b, a * b) for a in range(13) for b in range(13)]
  return out


def split_problems(seed: int, num_test: int) -> tuple[list, list]:
  """(test, train): `num_test` problems drawn the way the generator draws (each operator a third),
  and every other distinct problem. Disjoint by construction."""
  if num_test < 1:
    raise ValueError(f'num_test={num_test}: the check needs at least one held-out problem')
  rng = random.Random(f'pathways_jax.eval.arithmetic/{seed}/test')
  test, seen = [], set()
  for _ in range(100 * num_test + 1000):
    if len(test) == num_test:
      break
    p = synthetic.arithmetic(rng)
    if p not in seen:
      seen.add(p)
      test.append(p)
  if len(test) < num_test:
    raise ValueError(f'num_test={num_test}: could not draw that many distinct problems')
  return test, [p for p in all_problems() if p not in seen]


def _by_op(problems) -> dict:
  by_op = {}
  for p in problems:
    by_op.setdefault(p.op, []).append(p)
  return by_op


def training_lines(train: Sequence[synthetic.Arithmetic], num_lines: int, seed: int) -> list[str]:
  """`num_lines` lines drawn with the generator's operator mix from the training problems only."""
  by_op = _by_op(train)
  ops = sorted(by_op)
  rng = random.Random(f'pathways_jax.eval.arithmetic/{seed}/train')
  return [rng.choice(by_op[rng.choice(ops)]).text for _ in range(num_lines)]


def pick_shots(train: Sequence[synthetic.Arithmetic], k: int, seed: int) -> list:
  """`k` training problems, one per operator in turn, for the prompt."""
  rng = random.Random(f'pathways_jax.eval.arithmetic/{seed}/shots')
  by_op = _by_op(train)
  ops = sorted(by_op)
  return [rng.choice(by_op[ops[i % len(ops)]]) for i in range(k)]


def prompt_text(problem: synthetic.Arithmetic, shots: Sequence[synthetic.Arithmetic]) -> str:
  return ''.join(s.text + '\n' for s in shots) + f'{problem.a} {problem.op} {problem.b} = '


def longest_prompt(shots: int) -> int:
  """The most tokens (bytes) `prompt_text` can take with `shots` shots: '99 + 99 = 198' lines."""
  return shots * len('99 + 99 = 198\n') + len('99 + 99 = ')


def answers(model, params, tok, kind: str, problems, shots, *, batch: int = 256) -> list[str]:
  """Each problem's generated answer text (before the first newline, stripped)."""
  from pathways_jax.eval.facts import Evaluator
  prompts = [tok.encode(prompt_text(p, shots)) for p in problems]
  ev = Evaluator(tok, model, params, kind, seq_len=max(map(len, prompts)) + ANSWER_WIDTH,
                 gen_length=ANSWER_WIDTH, batch=min(batch, len(prompts)),
                 prompt_width=max(map(len, prompts)))
  out = []
  for ids in ev.generate(prompts):
    ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    out.append(tok.decode(ids).split('\n')[0].strip())
  return out


def accuracy(model, params, tok, kind: str, problems, shots, *, batch: int = 256) -> dict:
  """{'accuracy', 'by_op': {op: accuracy}, 'n'}: exact match of the answers."""
  got = answers(model, params, tok, kind, problems, shots, batch=batch)
  right = np.asarray([g == str(p.result) for g, p in zip(got, problems)])
  ops = np.asarray([p.op for p in problems])
  return {'accuracy': float(right.mean()), 'n': len(problems),
          'by_op': {op: float(right[ops == op].mean()) for op in sorted(set(ops.tolist()))}}
