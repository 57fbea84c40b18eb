"""The fact evaluator's metrics against hand-made models whose answers are known.

The model is a lookup table over a handful of sentences it "knows": at each position it puts all
its probability on the token its memory has there (AR: the sentence whose prefix matches; LLaDA:
the sentence that agrees with every visible token), and on a junk token where memory has nothing.
So every metric's value is known in advance, decoded through the real samplers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathways_jax.data.facts import Row
from pathways_jax.eval.facts import Evaluator

WORDS = ['<pad>', '<bos>', '<eos>', '<mask>', '.', 'is', 'junk', 'ada', 'quill', 'bo', 'venn',
         'cy', 'moss', 'the', 'tin', 'atlas', 'salt', 'bell', 'red', 'kite']
ID = {w: i for i, w in enumerate(WORDS)}
BOS, EOS, MASK, JUNK = ID['<bos>'], ID['<eos>'], ID['<mask>'], ID['junk']
NAMES = [('ada', 'quill'), ('bo', 'venn'), ('cy', 'moss')]
DESCS = [('the', 'tin', 'atlas'), ('the', 'salt', 'bell'), ('the', 'red', 'kite')]
SEQ_LEN = 12


class WordTok:
  bos_id, eos_id, mask_id = BOS, EOS, MASK
  special_ids = frozenset({0, BOS, EOS, MASK})

  def decode(self, ids):
    return ' '.join(WORDS[i] for i in ids).replace(' .', '.')


def forward_row(i, desc=None):
  n, d = NAMES[i], DESCS[i if desc is None else desc]
  toks = [BOS, *(ID[w] for w in n), ID['is'], *(ID[w] for w in d), ID['.'], EOS]
  return Row(toks, 4, (4, 7), (1, 3), '', ' '.join(d))


def reverse_row(i, name=None):
  n, d = NAMES[i if name is None else name], DESCS[i]
  toks = [BOS, *(ID[w] for w in d), ID['is'], *(ID[w] for w in n), ID['.'], EOS]
  return Row(toks, 5, (5, 7), (5, 7), '', ' '.join(n))


# What the model knows: Ada and Bo forward, Cy forward with Ada's description (a confident wrong
# answer); Bo in reverse, Cy's description answered with Ada's name; nothing about Ada in reverse.
MEMORY = [forward_row(0).tokens, forward_row(1).tokens, forward_row(2, desc=0).tokens,
          reverse_row(1).tokens, reverse_row(2, name=0).tokens]


def _lookup(tokens_BL, causal):
  tokens_BL = np.asarray(tokens_BL)
  mem = np.full((len(MEMORY), tokens_BL.shape[1] + 1), EOS, np.int32)  # eos-padded sentences
  for j, m in enumerate(MEMORY):
    mem[j, :len(m)] = m
  pred = np.full(tokens_BL.shape, JUNK, np.int32)
  for b, row in enumerate(tokens_BL):
    for i in range(len(row)):
      if causal:  # the next token after row[:i + 1]
        hits = [m for m in mem if np.array_equal(m[:i + 1], row[:i + 1])]
        pred[b, i] = hits[0][i + 1] if hits else JUNK
      elif row[i] == MASK:  # the masked token of the sentence agreeing with every visible one
        visible = row != MASK
        hits = [m for m in mem if np.array_equal(m[:len(row)][visible], row[visible])]
        pred[b, i] = hits[0][i] if hits else JUNK
      else:
        pred[b, i] = row[i]
  return (np.eye(len(WORDS), dtype=np.float32)[pred] * 20.0).astype(np.float32)


class LookupModel:
  """`apply({'params': p}, tokens_BL) -> logits_BLV` of the lookup table above."""

  def __init__(self, causal):
    self.causal = causal

  def apply(self, variables, tokens_BL):
    del variables
    shape = jax.ShapeDtypeStruct(tokens_BL.shape + (len(WORDS),), jnp.float32)
    return jax.pure_callback(lambda t: _lookup(t, self.causal), shape, tokens_BL)


@pytest.mark.parametrize('kind', ['ar', 'llada'])
def test_exact_match_and_rank_have_the_known_values(kind):
  ev = Evaluator(WordTok(), LookupModel(kind == 'ar'), {}, kind, SEQ_LEN, gen_length=4, batch=2)
  fwd = [forward_row(i) for i in range(3)]
  rev = [reverse_row(i) for i in range(3)]
  assert ev.exact_match(fwd) == pytest.approx(2 / 3)  # Cy's answer is Ada's description
  assert ev.exact_match(rev) == pytest.approx(1 / 3)  # only Bo
  assert ev.exact_match([fwd[1], rev[1], rev[0]]) == pytest.approx(2 / 3)  # mixed lengths
  cands = [[ID[w] for w in n] for n in NAMES]
  rank = ev.rank_names(rev, cands)
  # Bo: first. Cy: Ada's name scores higher, Bo's ties Cy's (a tie counts against): third. Ada:
  # the model knows nothing, every name scores alike: third, not first.
  assert rank['top1'] == pytest.approx(1 / 3)
  assert rank['mrr'] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)


def test_infill_fills_the_name_slot_from_the_description():
  ev = Evaluator(WordTok(), LookupModel(False), {}, 'llada', SEQ_LEN, gen_length=4, batch=2)
  # Ada and Bo: the trained sentence with the name masked is theirs. Cy: the model's only
  # sentence with Cy's name has Ada's description, so Cy's description matches nothing.
  assert ev.infill_name([forward_row(i) for i in range(3)]) == pytest.approx(2 / 3)
  # "_ _ is the tin atlas": Ada's sentence comes first in memory, so Cy's (its twin) is wrong.
  assert ev.infill_name([forward_row(0), forward_row(2, desc=0)]) == 0.5
