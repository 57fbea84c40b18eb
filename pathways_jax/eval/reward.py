"""Scoring conversations with a trained reward model (task 'reward_model').

    model, params, tokenizer = reward.load('runs/rm')
    rewards_N = reward.score(model, params, tokenizer, conversations, batch_size=16)
    # conversations: lists of messages ({'role', 'content'}), e.g. prompt + a sampled answer

Each conversation is rendered with the tokenizer's chat template (`data.chat.render`, as the
preference rows the model trained on) and its reward is the scalar head at its last token: the
value the task reads off the side of a pair (tasks/reward_model.py).

Batches have one fixed shape, [batch_size, max_len] (max_len: the argument, default
model.max_len): one conversation per row, right-padded with segment id 0, the last batch padded
with empty rows. So `score` compiles once per (model, batch_size, max_len, mesh) and never per
length, and a compiled program is kept for the next call (what an RL loop does every step). With
a mesh, each batch is placed on its batch sharding (`parallel.batch_sharding`: rows over the data
axes), run under the logical-axis rules, and the rewards come back replicated.

Too long. A conversation longer than max_len tokens is cut from the left (`truncation='left'`,
the default): its first token (bos, when the template starts with one) and its last max_len - 1
tokens are kept, so the response being judged and the token the reward is read at survive and
the prompt loses its start. The cut conversations are counted (the stats of `return_stats=True`,
and a warning). `truncation='error'` refuses them instead, naming the first few. (The training
rows keep the start of a too-long pair instead, as TRL does: data/preference.py.)
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax import parallel
from pathways_jax.data import chat

_LOG = logging.getLogger(__name__)
TRUNCATION = ('left', 'error')


@functools.lru_cache(maxsize=16)
def _compiled(model, mesh, rules):
  """The jitted rewards of one batch: float32 [B], each row's scalar at its index `last_B`."""

  def fn(params, tokens_BL, segment_ids_BL, positions_BL, last_B):
    scalar_BL = model.apply({'params': params}, tokens_BL, positions_BL=positions_BL,
                            segment_ids_BL=segment_ids_BL, return_scalar=True)
    return jnp.take_along_axis(scalar_BL, last_B[:, None], axis=1)[:, 0]

  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=parallel.replicated(mesh))


def _hashable(x):
  """Logical-axis rules (lists or tuples, nested) as nested tuples: a cache key."""
  return tuple(_hashable(v) for v in x) if isinstance(x, (list, tuple)) else x


def _render(tokenizer, conversations, max_len: int, truncation: str):
  """([ids int32 [<= max_len]], number cut)."""
  out, cut, too_long = [], 0, []
  for i, conv in enumerate(conversations):
    ids, _ = chat.render(tokenizer, conv)
    if len(ids) > max_len:
      too_long.append((i, len(ids)))
      keep_first = max_len > 1 and int(ids[0]) == getattr(tokenizer, 'bos_id', None)
      ids = (np.concatenate([ids[:1], ids[len(ids) - max_len + 1:]]) if keep_first
             else ids[len(ids) - max_len:])
      cut += 1
    out.append(ids)
  if too_long and truncation == 'error':
    shown = ', '.join(f'#{i} ({n} tokens)' for i, n in too_long[:5])
    raise ValueError(f'{len(too_long)} of {len(out)} conversations are longer than max_len='
                     f"{max_len}: {shown}{' ...' if len(too_long) > 5 else ''}; raise max_len "
                     "(<= model.max_len) or pass truncation='left' (keeps the first token and "
                     'the last max_len - 1)')
  return out, cut


def score(model, params, tokenizer, conversations: Sequence[Sequence[dict]], *,
          batch_size: int = 16, max_len: int | None = None, truncation: str = 'left',
          mesh=None, rules=None, return_stats: bool = False):
  """float32 [N]: the reward of each conversation (module docstring); with `return_stats`,
  (rewards, stats) where stats = {'conversations', 'truncated', 'batches', 'max_len'}."""
  if not model.cfg.scalar_head:
    raise ValueError('score needs a reward model: this model has no scalar head '
                     '(model.scalar_head=False); train one with task \'reward_model\'')
  if truncation not in TRUNCATION:
    raise ValueError(f'truncation={truncation!r} is not one of {TRUNCATION}')
  max_len = int(max_len or model.cfg.max_len)
  if not 1 <= max_len <= model.cfg.max_len:
    raise ValueError(f'max_len={max_len} is not in [1, model.max_len={model.cfg.max_len}]')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if mesh is not None and batch_size % parallel.data_parallel_size(mesh):
    raise ValueError(f'batch_size={batch_size} is not divisible by the mesh\'s '
                     f'{parallel.data_parallel_size(mesh)} data-parallel shards')
  if model.cfg.lora_num_adapters > 1:
    raise ValueError('score takes a one-adapter model: pick one of a multi-LoRA model first '
                     '(pathways_jax.sample.select_adapter)')
  rows, cut = _render(tokenizer, conversations, max_len, truncation)
  if cut:
    _LOG.warning('reward.score: %d of %d conversations were longer than max_len=%d and were cut '
                 'from the left', cut, len(rows), max_len)
  if mesh is not None and rules is None:
    rules = parallel.DEFAULT_RULES
  fn = _compiled(model, mesh, _hashable(rules))
  sharding = None if mesh is None else parallel.batch_sharding(mesh)
  out = np.zeros(len(rows), np.float32)
  pad = getattr(tokenizer, 'pad_id', None)
  pad = pad if pad is not None and pad >= 0 else 0  # under segment id 0: read by nothing
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    tokens = np.full((batch_size, max_len), pad, np.int32)
    segments = np.zeros((batch_size, max_len), np.int32)
    positions = np.zeros((batch_size, max_len), np.int32)
    last = np.zeros(batch_size, np.int32)
    for i, ids in enumerate(chunk):
      n = len(ids)
      tokens[i, :n], segments[i, :n], positions[i, :n], last[i] = ids, 1, np.arange(n), n - 1
    args = (tokens, segments, positions, last)
    if mesh is None:
      res = fn(params, *args)
    else:
      args = tuple(jax.device_put(a, sharding) for a in args)
      res = parallel.run_with_rules(mesh, rules, fn, params, *args)
    out[start:start + len(chunk)] = np.asarray(res)[:len(chunk)]
  if return_stats:
    return out, {'conversations': len(rows), 'truncated': cut,
                 'batches': -(-len(rows) // batch_size), 'max_len': max_len}
  return out


def load(run_dir: str, step: int | None = None):
  """(model, params, tokenizer) of a reward-model run directory (checkpoint `step`, default the
  newest), params placed on the run's mesh (`sample.load_run`)."""
  from pathways_jax import sample  # pylint: disable=g-import-not-at-top
  _, model, params, tokenizer = sample.load_run(run_dir, step)
  if not getattr(model, 'cfg', None) or not model.cfg.scalar_head:
    raise ValueError(f'{run_dir} is not a reward model (model.scalar_head=False): train one with '
                     "task 'reward_model'")
  return model, params, tokenizer
