"""Training a subset of the parameters (`train.trainable`): the rest stays frozen, stored once.

A param's path is its keys joined by '/', e.g. 'blocks_0/attn/wq', 'final_norm/scale' (with
`model.scan_layers`: 'blocks/attn/wq'). `train.trainable` is a regular expression; the params
whose path it matches in full (`re.fullmatch`) are trained, the others are frozen:

  * the train state (and so every checkpoint and the optimizer state) holds only the trainable
    subtree;
  * the frozen subtree is an argument of the jitted step, placed once with its shardings, saved
    once in WORKDIR/frozen_params and restored from there on resume;
  * gradients are taken with respect to the trainable subtree only, so XLA never computes the
    frozen weights' gradients (the weight-gradient matmuls of frozen layers are dead code).

Both subtrees are nested dicts with the model's keys; `merge` puts them back together (no copy:
the leaves are the same arrays). Added trees (adapters, a value head) are trainable subtrees too.
"""
from __future__ import annotations

import re

from flax import traverse_util

from pathways_jax.config import ConfigError


def flat(tree) -> dict:
  """{'blocks_0/attn/wq': leaf, ...} of a nested dict (flax.traverse_util)."""
  return traverse_util.flatten_dict(tree, sep='/')


def param_paths(params) -> list[str]:
  return sorted(flat(params))


def split(params, pattern: str) -> tuple[dict, dict]:
  """(trainable, frozen): the leaves whose path `pattern` matches in full, and the others.

  A pattern that matches no param is an error listing the paths it could match.
  """
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f'config.train.trainable={pattern!r} is not a regular expression: {e}') from e
  trainable, frozen = partition(params, lambda path: regex.fullmatch(path) is not None)
  paths = param_paths(params)
  listing = ', '.join(paths[:40]) + (' ...' if len(paths) > 40 else '')
  if not trainable:
    raise ConfigError(f'config.train.trainable={pattern!r} matches no parameter; the paths are: '
                      + listing)
  # A mistyped alternative ('.*_lora_[ab]|embed/embedding') would otherwise freeze silently
  # what it meant to train.
  for alt in alternatives(pattern):
    if not any(re.fullmatch(alt, path) for path in paths):
      raise ConfigError(f'config.train.trainable={pattern!r}: its alternative {alt!r} matches no '
                        f'parameter; the paths are: {listing}')
  return trainable, frozen


def alternatives(pattern: str) -> list[str]:
  """The top-level `|` alternatives of a regular expression (not those inside groups or
  character classes), e.g. 'a|(b|c)|[|]' -> ['a', '(b|c)', '[|]']."""
  out, depth, in_class, start, start_class, i = [], 0, False, 0, -1, 0
  while i < len(pattern):
    ch = pattern[i]
    if ch == '\\':
      i += 2
      continue
    if in_class:  # a ']' right after '[' or '[^' is a literal, not the class's end
      in_class = ch != ']' or i == start_class + 1 or (i == start_class + 2 and
                                                     pattern[start_class + 1] == '^')
    elif ch == '[':
      in_class, start_class = True, i
    elif ch == '(':
      depth += 1
    elif ch == ')':
      depth -= 1
    elif ch == '|' and depth == 0:
      out.append(pattern[start:i])
      start = i + 1
    i += 1
  out.append(pattern[start:])
  return out


def partition(params, keep) -> tuple[dict, dict]:
  """(the leaves whose path `keep(path)` accepts, the others), as two nested dicts."""
  leaves = flat(params)
  kept = {path: leaf for path, leaf in leaves.items() if keep(path)}
  rest = {path: leaf for path, leaf in leaves.items() if path not in kept}
  return (traverse_util.unflatten_dict(kept, sep='/'),
          traverse_util.unflatten_dict(rest, sep='/'))


def merge(trainable: dict, frozen: dict | None) -> dict:
  """The whole param tree from its two parts (the leaves are the same arrays: no copy)."""
  if not frozen:
    return trainable
  return traverse_util.unflatten_dict({**flat(frozen), **flat(trainable)}, sep='/')


def run_pattern(cfg, model_cfg) -> str:
  """What a run trains (its `train.trainable`): the config's, or for a LoRA model (lora_rank > 0)
  its adapters (and a reward model's scalar head); '' (everything) otherwise."""
  if cfg.train.trainable or not model_cfg.lora_rank:
    return cfg.train.trainable
  from pathways_jax.adapters.lora import LORA_PARAMS  # pylint: disable=g-import-not-at-top
  return LORA_PARAMS + ('|scalar_head/.*' if model_cfg.scalar_head else '')


def enabled(cfg) -> bool:
  return bool(cfg.train.get('trainable'))
