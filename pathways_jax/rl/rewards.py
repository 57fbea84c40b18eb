"""Reward functions over a prompt's record and a completion's text, composable with weights.

    config.rl.rewards = 'correct:1,format:0.2'   # sum of weight * reward over the named ones

Built in (`REWARDS`):
  correct  1 if the completion is a right answer. Instruction-set records (`kind`, `format`,
           `accepted`) use its checker (`data.instructions.check`: any known format counts);
           other records compare the normalised text with `accepted` or `answer`.
  format   1 if the completion is exactly in the record's requested format (instruction-set
           records; `data.instructions.format_ok`), right or wrong.
  random   a fair coin per completion, independent of the text: the control arm that shows what
           reward-independent updates do (seeded by run seed, rollout and row).
  next_token  RPT's prefix match (Reinforcement Pre-Training): 1 if the completion is a prefix
           of the record's `continuation` (the text that followed the prompt) ending on one of
           its token boundaries (`boundaries`: character lengths; the space a word-initial
           first token carries aside, whitespace tokens of their own not); records from
           `pathways_jax.rl.rpt`.
  reward_model  a trained reward model's score (task 'reward_model', `rl.reward_model` names its
           run directory) of the prompt's messages followed by the completion as the assistant's
           turn. The texts are re-tokenised with the reward model's own tokenizer and chat
           template, so its tokenizer may differ from the policy's (the run says so at start).
A function of your own: `REWARDS['name'] = Reward(fn, requires=('field', ...))`, fn(record, text)
-> float.

Think, then answer (RLMT; `rl.think_tag`, e.g. '</think>'): each completion is a thinking trace,
the tag, then the response. Every reward scores the response alone (a reward model never sees
the trace), and a completion without the tag scores `rl.think_malformed` in total instead;
`values['think_ok']` says which completions had it.

A reward that raises or returns a non-finite value scores 0 for that completion; `score` counts
the failures per reward and keeps the first message, and the run logs them and goes on.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Callable, Sequence

import numpy as np

from pathways_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Reward:
  fn: Callable[[dict, str], float] | None  # None: drawn by `score` (random) or a batch scorer
  requires: tuple[str, ...] = ()  # record fields it reads (one of each '|'-joined alternative)


class RewardModelScorer:
  """The 'reward_model' reward: `scorer(prompts_messages, texts) -> float32 [N]`."""

  def __init__(self, run_dir: str, *, batch_size: int = 64, mesh=None, rules=None):
    from pathways_jax.eval import reward  # pylint: disable=g-import-not-at-top
    try:
      self.model, self.params, self.tokenizer = reward.load(run_dir)
    except (ValueError, FileNotFoundError, OSError) as e:
      raise ConfigError(f'config.rl.reward_model={run_dir!r}: {e}') from None
    self.run_dir, self.batch_size = run_dir, batch_size

  def __call__(self, prompts: Sequence[Sequence[dict]], texts: Sequence[str]) -> np.ndarray:
    """Scores [N]; NaN for an empty text (no assistant turn to score), which `score` counts."""
    from pathways_jax.eval import reward  # pylint: disable=g-import-not-at-top
    keep = [i for i, t in enumerate(texts) if t.strip()]
    out = np.full(len(texts), np.nan, np.float32)
    if keep:
      conversations = [list(prompts[i]) + [{'role': 'assistant', 'content': texts[i]}]
                       for i in keep]
      out[keep] = reward.score(self.model, self.params, self.tokenizer, conversations,
                               batch_size=self.batch_size)
    return out


def _is_instruction(record: dict) -> bool:
  return all(k in record for k in ('kind', 'format', 'accepted'))


def correct(record: dict, text: str) -> float:
  from pathways_jax.data import instructions  # pylint: disable=g-import-not-at-top
  if _is_instruction(record):
    example = types.SimpleNamespace(kind=record['kind'], format=record['format'],
                                    accepted=tuple(record['accepted']))
    return float(instructions.check(example, text)['correct'])
  accepted = record.get('accepted') or [record['answer']]
  norm = instructions.normalise_answer
  return float(norm(text) in {norm(str(a)) for a in accepted})


def format_ok(record: dict, text: str) -> float:
  from pathways_jax.data import instructions  # pylint: disable=g-import-not-at-top
  return float(instructions.format_ok(record['kind'], record['format'], text))


def next_token(record: dict, text: str) -> float:
  """RPT's reward (module docstring): 1 when `text` is a prefix of the continuation that ends on
  a token boundary. Decoding a lone word-initial piece may drop the space it carries, so when
  the continuation's leading whitespace lies inside its first token, that whitespace is set
  aside on both sides; whitespace that is a token of its own must be predicted (a guess that
  skips it to the word after is no prefix, and earns nothing)."""
  continuation = record['continuation']
  bounds = [int(b) for b in record['boundaries']]
  if text and continuation.startswith(text) and len(text) in bounds:
    return 1.0
  lead = len(continuation) - len(continuation.lstrip())
  if not lead or not bounds or lead >= bounds[0]:
    return 0.0
  target, guess = continuation.lstrip(), text.lstrip()
  return float(bool(guess) and target.startswith(guess) and len(guess) in {b - lead
                                                                          for b in bounds})


REWARDS: dict[str, Reward] = {
    'correct': Reward(correct, requires=('answer|accepted',)),
    'format': Reward(format_ok, requires=('kind', 'format')),
    'next_token': Reward(next_token, requires=('continuation', 'boundaries')),
    'random': Reward(None),
    'reward_model': Reward(None),
}


def parse(spec: str) -> list[tuple[str, float]]:
  """'correct:1,format:0.2' -> [('correct', 1.0), ('format', 0.2)] (weight 1 when omitted)."""
  out = []
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    name, _, weight = part.partition(':')
    name = name.strip()
    if name not in REWARDS:
      raise ConfigError(f'config.rl.rewards: {name!r} is not a reward; known: {sorted(REWARDS)}')
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      raise ConfigError(f'config.rl.rewards: weight {weight!r} of {name!r} is not a number'
                        ) from None
    if not math.isfinite(w):
      raise ConfigError(f'config.rl.rewards: weight of {name!r} must be finite, got {w}')
    out.append((name, w))
  if not out:
    raise ConfigError("config.rl.rewards names no reward (e.g. 'correct' or 'correct:1,format:0.2')")
  if len({n for n, _ in out}) != len(out):
    raise ConfigError(f'config.rl.rewards names a reward twice: {spec!r}')
  return out


def check_records(specs: Sequence[tuple[str, float]], records: Sequence[dict], where: str) -> None:
  """Every record has the fields the named rewards read (else a ConfigError naming the first)."""
  for name, _ in specs:
    for need in REWARDS[name].requires:
      options = need.split('|')
      for i, r in enumerate(records):
        if not any(o in r for o in options):
          raise ConfigError(f'reward {name!r} reads the field {" or ".join(options)!r}, which '
                            f'line {i + 1} of {where} lacks')


def split_thinking(texts: Sequence[str], tag: str) -> tuple[list[str], np.ndarray]:
  """(responses, ok [N] bool) of think-then-answer completions: the text after the first `tag`,
  stripped; '' and ok False where the tag is missing."""
  responses, ok = [], []
  for text in texts:
    _, found, response = text.partition(tag)
    responses.append(response.strip() if found else '')
    ok.append(bool(found))
  return responses, np.asarray(ok, bool)


def score(specs: Sequence[tuple[str, float]], records: Sequence[dict], texts: Sequence[str], *,
          rng: np.random.Generator, prompts: Sequence[Sequence[dict]] | None = None,
          reward_model: RewardModelScorer | None = None, think_tag: str = '',
          think_malformed: float = -1.0
          ) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
  """(total [N] float32, {name: [N] values}, {name: (failures, first message)} for rewards that
  failed): the weighted sum of the rewards of each (record, text). 'reward_model' needs the
  `prompts` (messages) and the `reward_model` scorer. With `think_tag`, the rewards score the
  responses after it and a completion without it totals `think_malformed` (module docstring)."""
  ok = None
  if think_tag:
    texts, ok = split_thinking(texts, think_tag)
  n = len(texts)
  if len(records) != n:
    raise ValueError(f'{len(records)} records for {n} texts')
  total = np.zeros(n, np.float64)
  values, failures = {}, {}
  for name, weight in specs:
    fn = REWARDS[name].fn
    if name == 'reward_model':
      if reward_model is None or prompts is None:
        raise ValueError("reward 'reward_model' needs the prompts and a RewardModelScorer")
      vals = np.asarray(reward_model(prompts, texts), np.float64)
      bad = ~np.isfinite(vals)
      if bad.any():
        failures[name] = (int(bad.sum()), 'no finite reward-model score (an empty completion '
                                          'has none)')
        vals = np.where(bad, 0.0, vals)
    elif fn is None:  # random
      vals = rng.integers(0, 2, size=n).astype(np.float64)
    else:
      vals = np.zeros(n, np.float64)
      for i, (record, text) in enumerate(zip(records, texts)):
        try:
          v = float(fn(record, text))
          if not math.isfinite(v):
            raise ValueError(f'returned {v}')
        except Exception as e:  # pylint: disable=broad-except  (a user function: scored 0, counted)
          count, first = failures.get(name, (0, f'{type(e).__name__}: {e}'))
          failures[name] = (count + 1, first)
          v = 0.0
        vals[i] = v
    values[name] = vals.astype(np.float32)
    total += weight * vals
  if ok is not None:
    total = np.where(ok, total, think_malformed)
    values['think_ok'] = ok.astype(np.float32)
  return total.astype(np.float32), values, failures


def overlong_penalty(lengths_N: np.ndarray, *, max_new_tokens: int, buffer: int) -> np.ndarray:
  """DAPO's soft overlong punishment, in [-1, 0]: 0 up to max_new_tokens - buffer tokens, then
  falling linearly to -1 at max_new_tokens (a completion the budget cut off)."""
  start = max_new_tokens - buffer
  return np.clip((start - np.asarray(lengths_N, np.float64)) / buffer, -1.0, 0.0).astype(
      np.float32)
