"""Trajectories -> PAPRIKA's training data and the numbers reported about play.

    score(traj, max_turns)             success with fewer turns scores higher; a loss scores 0
    sft_records(trajs, max_turns)      stage 1: each instance's best winning games (chat JSONL)
    pair_records(trajs, max_turns)     stage 2: (best, worst) game of each instance (preference
                                       JSONL of whole conversations: the shared intro is the
                                       prompt, the agent's turns are what is trained)
    summarize(trajs)                   per game: success rate, mean turns, illegal and
                                       consistent move rates
    diversity(trajs)                   per game: distinct games and distinct first moves per
                                       instance, over its samples

Trajectories are the dicts of games.play. An instance is identified by (game, its JSON).
"""
from __future__ import annotations

import collections
import json
from typing import Sequence


def score(traj: dict, max_turns: int) -> int:
  """max_turns + 1 - turns for a win (>= 1), 0 for a loss (an overflowed game is a loss)."""
  return max_turns + 1 - traj['turns'] if traj['success'] and not traj['overflow'] else 0


def moves(traj: dict) -> tuple[str, ...]:
  return tuple(m['content'] for m in traj['messages'] if m['role'] == 'assistant')


def by_instance(trajs: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
  groups = collections.defaultdict(list)
  for t in trajs:
    groups[(t['game'], json.dumps(t['instance'], sort_keys=True))].append(t)
  return dict(groups)


def _rank_key(traj: dict, max_turns: int):
  return (score(traj, max_turns), -traj['illegal'])


def sft_records(trajs: Sequence[dict], max_turns: dict[str, int], *, per_instance: int = 1
                ) -> list[dict]:
  """`{"messages": ...}` of each instance's best `per_instance` distinct winning games."""
  out = []
  for (game, _), group in by_instance(trajs).items():
    wins = sorted((t for t in group if score(t, max_turns[game]) > 0),
                  key=lambda t: _rank_key(t, max_turns[game]), reverse=True)
    seen = set()
    for t in wins:
      if moves(t) not in seen and len(seen) < per_instance:
        seen.add(moves(t))
        out.append({'messages': t['messages'], 'game': game})
  return out


def pair_records(trajs: Sequence[dict], max_turns: dict[str, int], *, min_gap: int = 1
                 ) -> list[dict]:
  """`{"chosen": conversation, "rejected": conversation}` per instance: its best winning game
  against its worst game, when their scores differ by at least `min_gap` (PAPRIKA's turn
  threshold; the rejected side is the worst game, its `worst` strategy)."""
  if min_gap < 1:
    raise ValueError(f'min_gap must be >= 1, got {min_gap}')
  out = []
  for (game, _), group in by_instance(trajs).items():
    ranked = sorted(group, key=lambda t: _rank_key(t, max_turns[game]))
    worst, best = ranked[0], ranked[-1]
    gap = score(best, max_turns[game]) - score(worst, max_turns[game])
    if score(best, max_turns[game]) > 0 and gap >= min_gap:
      out.append({'chosen': best['messages'], 'rejected': worst['messages'], 'game': game,
                  'score_gap': gap})
  return out


def summarize(trajs: Sequence[dict]) -> dict[str, dict]:
  """Per game: games, success_rate, mean_turns (all games; a loss counts its turns played),
  mean_turns_won, illegal_rate (illegal moves / moves), consistent_rate (consistent moves /
  moves: games/base.py), overflow."""
  per = collections.defaultdict(list)
  for t in trajs:
    per[t['game']].append(t)
  out = {}
  for game, ts in sorted(per.items()):
    won = [t for t in ts if t['success']]
    n_moves = sum(t['turns'] for t in ts)
    out[game] = {'games': len(ts), 'success_rate': len(won) / len(ts),
                 'mean_turns': sum(t['turns'] for t in ts) / len(ts),
                 'mean_turns_won': (sum(t['turns'] for t in won) / len(won)) if won else None,
                 'illegal_rate': sum(t['illegal'] for t in ts) / max(n_moves, 1),
                 'consistent_rate': sum(t['consistent'] for t in ts) / max(n_moves, 1),
                 'overflow': sum(t['overflow'] for t in ts)}
  return out


def diversity(trajs: Sequence[dict]) -> dict[str, dict]:
  """Per game, means over instances with >= 2 samples: distinct_games (distinct move sequences /
  samples) and distinct_first_moves (distinct first moves / samples)."""
  per = collections.defaultdict(lambda: {'distinct_games': [], 'distinct_first_moves': []})
  for (game, _), group in by_instance(trajs).items():
    if len(group) < 2:
      continue
    seqs = [moves(t) for t in group]
    per[game]['distinct_games'].append(len(set(seqs)) / len(seqs))
    per[game]['distinct_first_moves'].append(len({s[:1] for s in seqs}) / len(seqs))
  return {g: {k: sum(v) / len(v) for k, v in d.items()} | {'instances': len(d['distinct_games'])}
          for g, d in sorted(per.items())}
