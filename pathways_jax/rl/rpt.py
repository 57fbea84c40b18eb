"""Reinforcement Pre-Training prompts (RPT; Dong et al. 2025, "Reinforcement Pre-Training"):
next-token prediction on pretraining text as a rewarded decision, at the positions a small proxy
model finds hard.

    python -m pathways_jax.rl.rpt --proxy=runs/quickstart --out=rpt/train.jsonl \
        [--split=train] [--documents=200] [--per_document=4] [--context=64] [--continuation=4]
        [--min_context=8] [--select=hardest|random] [--seed=0] [--windows=1]

For each document of the proxy run's corpus (`--split`), read in windows of the proxy's context
(the first `--windows` of them; 0: all), the proxy scores every position t by the entropy of its
prediction of token t from the window's tokens before it, and the `--per_document` positions of
each window with the highest entropy (from the window's `--min_context`-th token on) become
prompts (`--select=random`: positions drawn uniformly instead, the control set of ordinary
tokens):

    {"text": <the <= --context tokens before t, decoded>,
     "continuation": <tokens t .. t + --continuation - 1, decoded>,
     "continuation_ids": [those tokens' ids], "boundaries": [character length of the
     continuation after each of its tokens], "entropy": <the proxy's entropy at t, nats>,
     "document": i, "position": t}

Train on them with task 'grpo', `rl.rewards='next_token'` (rl/rewards.py: 1 for a completion that
is a prefix of the continuation ending on a token boundary) and either `rl.max_new_tokens` = the
tokens to predict, or RPT's reason-then-predict form with `rl.think_tag` (the prediction is the text
after the tag). `data.seq_len` must hold --context tokens plus bos.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.rl.prompts import raw_text_ids


SELECT = ('hardest', 'random')


def entropy_fn(model):
  """jit(params, tokens [B, L], segment_ids [B, L]) -> float32 [B, L]: entry t is the entropy of
  the model's prediction of token t (from position t - 1's logits); 0 at t = 0."""
  def fn(params, tokens_BL, segment_ids_BL):
    logits = model.apply({'params': params}, tokens_BL, segment_ids_BL=segment_ids_BL)
    lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    h_BL = -(jnp.exp(lsm) * lsm).sum(-1)
    return jnp.pad(h_BL[:, :-1], ((0, 0), (1, 0)))
  return jax.jit(fn)


def hardest_positions(entropy_L: np.ndarray, length: int, *, k: int, min_context: int
                      ) -> list[int]:
  """The k positions t in [min_context, length) with the highest entropy, ascending (ties: the
  earlier position)."""
  candidates = np.arange(min_context, length)
  if not len(candidates):
    return []
  order = sorted(candidates, key=lambda t: (-float(entropy_L[t]), int(t)))
  return sorted(int(t) for t in order[:k])


def random_positions(length: int, *, k: int, min_context: int, rng: np.random.Generator
                     ) -> list[int]:
  """k positions t in [min_context, length) drawn without replacement, ascending."""
  candidates = np.arange(min_context, length)
  return sorted(int(t) for t in rng.choice(candidates, size=min(k, len(candidates)),
                                           replace=False)) if len(candidates) else []


def record_at(ids: Sequence[int], t: int, tokenizer, *, context: int, continuation: int,
              skip: int = 0) -> dict | None:
  """The prompt record of target position t of a document's ids (ids[:skip] are bos, never in
  the text); None when the decoded continuation is empty or not extended by its tokens."""
  ctx = [int(i) for i in ids[max(skip, t - context):t]]
  target = [int(i) for i in ids[t:t + continuation]]
  full = tokenizer.decode(target)
  boundaries = []
  for j in range(1, len(target) + 1):
    piece = tokenizer.decode(target[:j])
    if piece and full.startswith(piece) and (not boundaries or len(piece) > boundaries[-1]):
      boundaries.append(len(piece))
  if not full.strip() or not boundaries or not ctx:
    return None
  return {'text': tokenizer.decode(ctx), 'continuation': full, 'continuation_ids': target,
          'boundaries': boundaries}


def make_records(model, params, tokenizer, documents: Sequence[str], *, per_document: int,
                 context: int, continuation: int, min_context: int, width: int,
                 batch_size: int = 8, select: str = 'hardest', seed: int = 0, windows: int = 1
                 ) -> tuple[list[dict], dict]:
  """(prompt records, counts) of the hardest positions of each document (module docstring), or
  with select='random' of positions drawn uniformly (numpy seed `seed`).

  A document is read in consecutive windows of `width` tokens (the proxy's context), the first
  `windows` of them (0: all), each scored on its own, `batch_size` windows at a time;
  `per_document` positions are taken from each window, from its `min_context`-th token on. A
  record's context may reach back into the window before its own."""
  if select not in SELECT:
    raise ValueError(f'select={select!r}: one of {SELECT}')
  rng = np.random.default_rng(seed)
  fn = entropy_fn(model)
  skip = 0 if tokenizer.bos_id is None else 1
  docs = [raw_text_ids(tokenizer, d) for d in documents]
  spans = [(i, start) for i, ids in enumerate(docs) for start in range(0, len(ids), width)
           [:windows or None]]
  records, counts = [], {'documents': len(docs), 'windows': len(spans), 'positions': 0,
                         'empty': 0}
  for s in range(0, len(spans), batch_size):
    chunk = spans[s:s + batch_size]
    tokens = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    for j, (i, start) in enumerate(chunk):
      piece = docs[i][start:start + width]
      tokens[j, :len(piece)], segments[j, :len(piece)] = piece, 1
    entropy = np.asarray(fn(params, tokens, segments))
    for j, (i, start) in enumerate(chunk):
      n = min(width, len(docs[i]) - start)
      lo = max(min_context, skip + 1) if start == 0 else min_context
      chosen = (hardest_positions(entropy[j], n, k=per_document, min_context=lo)
                if select == 'hardest' else
                random_positions(n, k=per_document, min_context=lo, rng=rng))
      for t in chosen:
        rec = record_at(docs[i], start + t, tokenizer, context=context,
                        continuation=continuation, skip=skip)
        if rec is None:
          counts['empty'] += 1
          continue
        rec.update(entropy=float(entropy[j, t]), document=i, position=start + t)
        records.append(rec)
        counts['positions'] += 1
  return records, counts


def next_token_scores(model, params, tokenizer, records: Sequence[dict], *, width: int,
                      batch_size: int = 64) -> dict[str, np.ndarray]:
  """The greedy next-token decision at each record's position: {'correct': 1.0 where the
  argmax token, decoded, earns rl.rewards.next_token (the training reward with one new token,
  which sets leading whitespace aside, so a guess that skips a whitespace token to the word
  after it also earns it), 'exact': 1.0 where the argmax is the true token continuation_ids[0],
  'nll': -log p(continuation_ids[0]) (nats)}, float64 [N] each. Each prompt is bos + the
  record's text (as the RL prompts), right-padded to `width`."""
  from pathways_jax.rl import rewards  # pylint: disable=g-import-not-at-top
  fn = jax.jit(lambda p, t, s: jax.nn.log_softmax(
      model.apply({'params': p}, t, segment_ids_BL=s).astype(jnp.float32), axis=-1))
  correct, exact, nll = (np.zeros(len(records)) for _ in range(3))
  for s in range(0, len(records), batch_size):
    chunk = records[s:s + batch_size]
    tokens = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    last = np.zeros(batch_size, np.int32)
    for i, r in enumerate(chunk):
      ids = raw_text_ids(tokenizer, r['text'])
      if len(ids) > width:
        raise ValueError(f'record {s + i}: its prompt is {len(ids)} tokens, the model holds '
                         f'{width}')
      tokens[i, :len(ids)], segments[i, :len(ids)], last[i] = ids, 1, len(ids) - 1
    lsm_BV = np.asarray(fn(params, tokens, segments))[np.arange(batch_size), last]
    for i, r in enumerate(chunk):
      best, true = int(np.argmax(lsm_BV[i])), r['continuation_ids'][0]
      correct[s + i] = rewards.next_token(r, tokenizer.decode([best]))
      exact[s + i] = float(best == true)
      nll[s + i] = -float(lsm_BV[i, true])
  return {'correct': correct, 'exact': exact, 'nll': nll}


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog='python -m pathways_jax.rl.rpt',
                               description=__doc__.split('\n')[0])
  ap.add_argument('--proxy', required=True, help='the run directory of the small proxy model')
  ap.add_argument('--out', required=True, help='the JSONL file to write')
  ap.add_argument('--split', default='train', choices=('train', 'validation'))
  ap.add_argument('--documents', type=int, default=200, help='the first N documents (0: all)')
  ap.add_argument('--per_document', type=int, default=4)
  ap.add_argument('--context', type=int, default=64, help='context tokens before the target')
  ap.add_argument('--continuation', type=int, default=4, help='tokens of the continuation')
  ap.add_argument('--min_context', type=int, default=8, help='targets start at this position')
  ap.add_argument('--select', default='hardest', choices=SELECT,
                  help="'hardest': the proxy's highest-entropy positions; 'random': uniform")
  ap.add_argument('--seed', type=int, default=0, help="--select=random's draw")
  ap.add_argument('--windows', type=int, default=1,
                  help="windows of the proxy's context read per document (0: all)")
  args = ap.parse_args(argv)
  for name in ('per_document', 'context', 'continuation', 'min_context'):
    if getattr(args, name) < 1:
      ap.error(f'--{name} must be >= 1')
  for name in ('documents', 'windows'):
    if getattr(args, name) < 0:
      ap.error(f'--{name} must be >= 0')
  from pathways_jax import sample  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import corpora  # pylint: disable=g-import-not-at-top
  try:
    cfg, model, params, tokenizer = sample.load_run(args.proxy)
  except (FileNotFoundError, ValueError) as e:
    ap.error(f'--proxy={args.proxy}: {e}')
  if not model.cfg.causal:
    ap.error(f'--proxy={args.proxy} is not a causal model: RPT scores next-token predictions')
  documents = corpora.load_documents(cfg.data, args.split)
  if args.documents:
    documents = documents[:args.documents]
  records, counts = make_records(model, params, tokenizer, documents,
                                 per_document=args.per_document, context=args.context,
                                 continuation=args.continuation, min_context=args.min_context,
                                 width=model.cfg.max_len, select=args.select, seed=args.seed,
                                 windows=args.windows)
  if not records:
    print(f'error: no position of the {len(documents)} documents made a prompt', file=sys.stderr)
    return 1
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + '.tmp', 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  os.replace(args.out + '.tmp', args.out)
  mean_h = float(np.mean([r['entropy'] for r in records]))
  print(f'{len(records)} prompts from {counts["documents"]} documents '
        f'({counts["empty"]} positions without a continuation skipped), mean proxy entropy '
        f'{mean_h:.2f} nats -> {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
