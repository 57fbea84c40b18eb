"""Reinforcement Pre-Training prompts (RPT; Dong et al. 2025, "Reinforcement Pre-Training"):
next-token prediction on pretraining text as a rewarded decision, at the positions a small proxy
model finds hard.

    python -m pathways_jax.rl.rpt --proxy=runs/quickstart --out=rpt/train.jsonl \
        [--split=train] [--documents=200] [--per_document=4] [--context=64] [--continuation=4]
        [--min_context=8]

For each document of the proxy run's corpus (`--split`), the proxy scores every position t by the
entropy of its prediction of token t from the tokens before it, and the `--per_document` positions
with the highest entropy (t >= `--min_context`) become prompts:

    {"text": <the <= --context tokens before t, decoded>,
     "continuation": <tokens t .. t + --continuation - 1, decoded>,
     "boundaries": [character length of the continuation after each of its tokens],
     "entropy": <the proxy's entropy at t, nats>, "document": i, "position": t}

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
  return {'text': tokenizer.decode(ctx), 'continuation': full, 'boundaries': boundaries}


def make_records(model, params, tokenizer, documents: Sequence[str], *, per_document: int,
                 context: int, continuation: int, min_context: int, width: int,
                 batch_size: int = 8) -> tuple[list[dict], dict]:
  """(prompt records, counts) of the hardest positions of each document (module docstring).
  Documents are cut to `width` tokens (the proxy's window) and scored `batch_size` at a time."""
  fn = entropy_fn(model)
  docs = [raw_text_ids(tokenizer, d)[:width] for d in documents]
  skip = 0 if tokenizer.bos_id is None else 1
  records, counts = [], {'documents': len(docs), 'positions': 0, 'empty': 0}
  for s in range(0, len(docs), batch_size):
    chunk = docs[s:s + batch_size]
    tokens = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    for i, ids in enumerate(chunk):
      tokens[i, :len(ids)], segments[i, :len(ids)] = ids, 1
    entropy = np.asarray(fn(params, tokens, segments))
    for i, ids in enumerate(chunk):
      for t in hardest_positions(entropy[i], len(ids), k=per_document,
                                 min_context=max(min_context, skip + 1)):
        rec = record_at(ids, t, tokenizer, context=context, continuation=continuation, skip=skip)
        if rec is None:
          counts['empty'] += 1
          continue
        rec.update(entropy=float(entropy[i, t]), document=s + i, position=t)
        records.append(rec)
        counts['positions'] += 1
  return records, counts


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
  args = ap.parse_args(argv)
  for name in ('per_document', 'context', 'continuation', 'min_context'):
    if getattr(args, name) < 1:
      ap.error(f'--{name} must be >= 1')
  if args.documents < 0:
    ap.error('--documents must be >= 0')
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
                                 width=model.cfg.max_len)
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
