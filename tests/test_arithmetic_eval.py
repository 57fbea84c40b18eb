"""The arithmetic downstream check (eval.arithmetic): its problem split, and its exact match
against hand-made byte models whose answers are known, decoded through the real samplers."""
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathways_jax.data import synthetic
from pathways_jax.data.tokenizers import ByteTokenizer
from pathways_jax.eval import arithmetic

TOK = ByteTokenizer()
QUESTION = re.compile(r'^(\d+) ([-+*]) (\d+) = (\d*)$')
QUESTION_ANYWHERE = re.compile(r'(\d+) ([-+*]) (\d+) = ')


def test_the_split_covers_the_generator_and_is_disjoint():
  everything = arithmetic.all_problems()
  assert len(everything) == len(set(everything)) == 10000 + 5050 + 169
  rng = random.Random(0)
  assert {synthetic.arithmetic(rng) for _ in range(20000)} <= set(everything)
  test, train = arithmetic.split_problems(3, 200)
  assert len(test) == len(set(test)) == 200
  assert not set(test) & set(train) and len(test) + len(train) == len(everything)
  assert arithmetic.split_problems(3, 200) == (test, train)  # seeded
  assert arithmetic.split_problems(4, 200)[0] != test
  with pytest.raises(ValueError, match='at least one held-out problem'):
    arithmetic.split_problems(3, 0)
  lines = arithmetic.training_lines(train, 3000, 0)
  train_text = {p.text for p in train}
  assert set(lines) <= train_text and not set(lines) & {p.text for p in test}
  ops = [line.split()[1] for line in lines]
  for op in '+-*':  # the generator's mix: each operator a third
    assert abs(ops.count(op) / len(ops) - 1 / 3) < 0.05
  shots = arithmetic.pick_shots(train, 4, 0)
  assert [s.op for s in shots] == ['*', '+', '-', '*'] and set(shots) <= set(train)
  text = arithmetic.prompt_text(test[0], shots)
  assert len(text) <= arithmetic.longest_prompt(4)
  assert text.endswith(f'{test[0].a} {test[0].op} {test[0].b} = ')


def _answer_of(line: str, knows: str, wrong: str):
  """The answer the model gives to the question on `line`: right for ops in `knows`, off by
  one for ops in `wrong`, None (junk) otherwise."""
  m = QUESTION.match(line)
  if not m:
    return None, ''
  a, op, b, partial = int(m[1]), m[2], int(m[3]), m[4]
  result = {'+': a + b, '-': a - b, '*': a * b}[op]
  if op in knows:
    return f'{result}\n', partial
  if op in wrong:
    return f'{result + 1}\n', partial
  return None, partial


def _byte(ch):
  return ord(ch) + 4  # the byte tokenizer's id


class ArithmeticModel:
  """`apply({'params': p}, tokens_BL) -> logits_BLV`: AR predicts the next byte of its answer to
  the last line's question; LLaDA fills the masks after the question with its answer and then
  newlines. Junk ('x') where it knows nothing."""

  def __init__(self, causal, knows='+', wrong='-'):
    self.causal, self.knows, self.wrong = causal, knows, wrong

  def _predict(self, tokens_BL):
    tokens_BL = np.asarray(tokens_BL)
    pred = np.full(tokens_BL.shape, _byte('x'), np.int32)
    for r, row in enumerate(tokens_BL):
      if self.causal:
        for i in range(len(row)):
          line = TOK.decode(row[:i + 1]).split('\n')[-1]
          ans, partial = _answer_of(line, self.knows, self.wrong)
          if ans and ans.startswith(partial) and len(partial) < len(ans):
            pred[r, i] = _byte(ans[len(partial)])
        continue
      pred[r] = row
      # One character per token (the prompts are ASCII), masks as '?': the question is the last
      # 'a op b = ' in the row, its answer region everything after it.
      text = ''.join('?' if t == TOK.mask_id else chr(t - 4) if t >= 4 else '\0' for t in row)
      q = list(QUESTION_ANYWHERE.finditer(text))
      if not q:
        continue
      ans, _ = _answer_of(q[-1][0], self.knows, self.wrong)
      for j in np.flatnonzero(row == TOK.mask_id):
        pred[r, j] = _byte('x') if ans is None else _byte((ans + '\n' * 8)[j - q[-1].end()])
    return (np.eye(TOK.vocab_size, dtype=np.float32)[pred] * 20.0).astype(np.float32)

  def apply(self, variables, tokens_BL):
    del variables
    shape = jax.ShapeDtypeStruct(tokens_BL.shape + (TOK.vocab_size,), jnp.float32)
    return jax.pure_callback(self._predict, shape, tokens_BL)


@pytest.mark.parametrize('kind', ['ar', 'llada'])
def test_accuracy_has_the_known_values(kind):
  test, train = arithmetic.split_problems(0, 24)
  shots = arithmetic.pick_shots(train, 2, 0)
  model = ArithmeticModel(causal=kind == 'ar', knows='+*', wrong='-')
  res = arithmetic.accuracy(model, {}, TOK, kind, test, shots, batch=8)
  by_op = {op: sum(p.op == op for p in test) for op in '+-*'}
  assert all(by_op.values())  # every operator is in the test set
  assert res['by_op'] == {'*': 1.0, '+': 1.0, '-': 0.0}  # '-' answered off by one: wrong
  assert res['accuracy'] == pytest.approx((by_op['+'] + by_op['*']) / 24)
  assert res['n'] == 24
  got = arithmetic.answers(ArithmeticModel(kind == 'ar', knows='', wrong=''), {}, TOK, kind,
                           test[:3], shots)
  assert all(g == 'x' * len(g) and g for g in got)  # junk is read back as junk, never a number
