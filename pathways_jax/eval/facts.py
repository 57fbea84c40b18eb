"""Evaluating a model on fact rows (`data.facts`): exact match of greedy answers, LLaDA infilling
of the name slot, and ranking the true name among candidates.

    ev = Evaluator(tok, model, params, 'llada', seq_len, gen_length, prompt_width=P)
    ev.exact_match(rows)                 # fraction of rows whose generated answer is exact
    ev.infill_name(rows)                 # LLaDA: the name slot masked and filled in place
    ev.rank_names(rows, candidate_ids)   # top-1 and MRR of the true name
    ev.slot_token_accuracy(rows)         # LLaDA: name slot masked, one pass, argmax per token

AR decoding uses the KV-cache sampler, LLaDA the low-confidence sampler one token per step in one
block; both greedy, on one fixed (batch, prompt width) shape so each model compiles once. Any object
with `apply({'params': p}, tokens_BL) -> logits_BLV` works too (prompts then go unpadded, grouped by
length): the tests score hand-made models whose answers are known.
"""
from __future__ import annotations

import numpy as np

from pathways_jax.data.facts import Row, to_arrays


def left_pad(seqs, pad_id, width=0):
  """[N, max(width, longest)] int32 rows right-aligned, and the [N, P] bool mask of real tokens."""
  p = max([width] + [len(s) for s in seqs])
  out = np.full((len(seqs), p), pad_id, np.int32)
  mask = np.zeros((len(seqs), p), bool)
  for i, s in enumerate(seqs):
    out[i, p - len(s):] = s
    mask[i, p - len(s):] = True
  return out, mask


def answer_text(tok, ids) -> str:
  """The generated answer phrase: text up to the first eos and the first '.', special ids dropped."""
  ids = [int(i) for i in ids]
  if tok.eos_id in ids:
    ids = ids[:ids.index(tok.eos_id)]
  ids = [i for i in ids if i not in tok.special_ids]
  return tok.decode(ids).split('.')[0].strip()


_LOG_PROBS = {}


def log_probs(model, params, tokens_BL):
  """log_softmax(model(tokens)), jitted once per model."""
  import jax
  if model not in _LOG_PROBS:
    _LOG_PROBS[model] = jax.jit(
        lambda p, t: jax.nn.log_softmax(model.apply({'params': p}, t).astype('float32'), -1))
  return _LOG_PROBS[model](params, tokens_BL)


class Evaluator:
  """Greedy exact match, infilling and ranking of fact rows, for an AR (`kind='ar'`) or LLaDA
  (`kind='llada'`) model."""

  def __init__(self, tok, model, params, kind, seq_len, gen_length, mask_id=None, batch=256,
               prompt_width=0):
    self.tok, self.model, self.params, self.kind = tok, model, params, kind
    self.prompt_width = prompt_width
    self.mask_id = tok.mask_id if mask_id is None else mask_id  # the tokenizer's by default
    self.seq_len, self.gen_length, self.batch = seq_len, gen_length, batch
    from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
    self._padded = isinstance(model, Transformer)  # segment ids: left-padded batches
    self._fn = model if self._padded else (lambda p, t: model.apply({'params': p}, t))

  def generate(self, prompts: list[list[int]]) -> list[list[int]]:
    """The greedy continuation (gen_length tokens) of each prompt."""
    if not self._padded:
      return self._generate_unpadded(prompts)
    outs = []
    for s in range(0, len(prompts), self.batch):
      chunk = prompts[s:s + self.batch]
      # One fixed shape (prompt width, batch rows) per model: a single compile for every query.
      chunk = chunk + [chunk[-1]] * (self.batch - len(chunk))
      x, m = left_pad(chunk, 0, self.prompt_width)
      outs += self._decode(self.model, x, m)
    return outs[:len(prompts)]

  def _generate_unpadded(self, prompts):
    """A plain model (`model.apply(variables, tokens_BL) -> logits_BLV`, no segment ids) cannot
    skip left padding: prompts are decoded in groups of one length instead."""
    outs = [None] * len(prompts)
    by_len = {}
    for i, p in enumerate(prompts):
      by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
      for s in range(0, len(idx), self.batch):
        chunk = idx[s:s + self.batch]
        ys = self._decode(self._fn, np.asarray([prompts[i] for i in chunk]), None)
        for i, y in zip(chunk, ys):
          outs[i] = y
    return outs

  def _decode(self, model, x_BP, mask_BP):
    import jax
    from pathways_jax.sampling import autoregressive as ar_samp
    from pathways_jax.sampling import diffusion as d_samp
    if self.kind == 'ar':
      y = ar_samp.generate(model, self.params, x_BP, key=jax.random.key(0),
                           max_new_tokens=self.gen_length, temperature=0.0, prompt_mask_BP=mask_BP,
                           eos_id=self.tok.eos_id)
    else:
      y = d_samp.generate(model, self.params, x_BP, mask_id=self.mask_id, key=jax.random.key(0),
                          gen_length=self.gen_length, steps=self.gen_length,
                          block_length=self.gen_length, prompt_mask_BP=mask_BP)
    return [list(map(int, row)) for row in np.asarray(y)[:, x_BP.shape[1]:]]

  def exact_match(self, rows: list[Row]) -> float:
    gens = self.generate([r.tokens[:r.prompt_len] for r in rows])
    return float(np.mean([answer_text(self.tok, g) == r.answer_text.strip()
                          for g, r in zip(gens, rows)]))

  def infill_name(self, rows: list[Row]) -> float:
    import jax
    from pathways_jax.sampling import diffusion as d_samp
    tokens, _, _ = to_arrays(rows, self.seq_len, self.tok.eos_id)
    for i, r in enumerate(rows):
      tokens[i, r.name[0]:r.name[1]] = self.mask_id
    steps = max(r.name[1] - r.name[0] for r in rows)
    correct = []
    for s in range(0, len(rows), self.batch):
      y = np.asarray(d_samp.infill(self._fn, self.params, tokens[s:s + self.batch],
                                   mask_id=self.mask_id, key=jax.random.key(0), steps=steps))
      for row, r in zip(y, rows[s:s + self.batch]):
        correct.append(list(row[r.name[0]:r.name[1]]) == r.tokens[r.name[0]:r.name[1]])
    return float(np.mean(correct))

  def slot_token_accuracy(self, rows: list[Row], span: str = 'name') -> float:
    """LLaDA probe: every token of each row's `span` ('name' or 'answer') masked at once, one
    forward pass; the fraction of those tokens whose argmax is right. Unlike `infill_name` it
    needs no decoding order, so it shows what the model stores about the slot before sampling."""
    if span not in ('name', 'answer'):
      raise ValueError(f"span must be 'name' or 'answer', got {span!r}")
    tokens, _, _ = to_arrays(rows, self.seq_len, self.tok.eos_id)
    spans = [getattr(r, span) for r in rows]
    noisy = tokens.copy()
    for i, (a, b) in enumerate(spans):
      noisy[i, a:b] = self.mask_id
    hits = []
    for s in range(0, len(rows), self.batch):
      pred = np.asarray(log_probs(self.model, self.params, noisy[s:s + self.batch])).argmax(-1)
      for j, (a, b) in enumerate(spans[s:s + self.batch]):
        hits += list(pred[j, a:b] == tokens[s + j, a:b])
    return float(np.mean(hits))

  def rank_names(self, rows: list[Row], candidates: list[list[int]]) -> dict:
    """rows: reverse prompts of the test people; candidates[j]: token ids of name j.
    Returns top-1 accuracy and mean reciprocal rank of each row's own name. A tie counts against
    the own name (rank = 1 + the candidates scoring at least as high), so a model that scores
    every name alike ranks last, not first."""
    apply = lambda p, t: log_probs(self.model, p, t)
    kmax = max(len(c) for c in candidates)
    cand_index = {tuple(c): j for j, c in enumerate(candidates)}
    top1, rr = [], []
    for r in rows:
      prompt = r.tokens[:r.prompt_len]
      suffix = r.tokens[r.answer[1]:]  # '.' and eos
      true = tuple(r.tokens[r.answer[0]:r.answer[1]])
      scores = np.zeros(len(candidates))
      if self.kind == 'ar':
        seqs = [prompt + list(c) + suffix[:1] for c in candidates]
        x = np.full((len(seqs), self.seq_len + kmax), self.tok.eos_id, np.int32)
        for j, s in enumerate(seqs):
          x[j, :len(s)] = s
        lp = np.asarray(apply(self.params, x))
        for j, s in enumerate(seqs):
          t = np.arange(len(prompt), len(s))
          scores[j] = lp[j, t - 1, np.asarray(s)[t]].sum()
      else:
        by_len = {}
        for j, c in enumerate(candidates):
          by_len.setdefault(len(c), []).append(j)
        x = np.full((kmax, self.seq_len + kmax), self.tok.eos_id, np.int32)
        for k in range(1, kmax + 1):  # row k - 1: the prompt, k masks, '.', eos padding
          s = prompt + [self.mask_id] * k + suffix
          x[k - 1, :len(s)] = s
        lp = np.asarray(apply(self.params, x))
        for k in by_len:
          i = k - 1
          pos = np.arange(len(prompt), len(prompt) + k)
          for j in by_len[k]:
            scores[j] = lp[i, pos, np.asarray(candidates[j])].sum()
      own_j = cand_index[true]
      rank = 1 + int(np.sum(np.delete(scores, own_j) >= scores[own_j]))
      top1.append(rank == 1)
      rr.append(1.0 / rank)
    return {'top1': float(np.mean(top1)), 'mrr': float(np.mean(rr))}
