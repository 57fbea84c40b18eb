"""Mean and spread of a result over seeds, the one summary every experiment reports.

    seed_stats.mean_sd([0.83, 0.89, 0.78])  # {'mean': 0.833, 'sd': 0.055, 'n': 3, 'min': .., 'max': ..}

The spread is the sample standard deviation (ddof=1). With one value it is None, not 0: one
seed says nothing about the spread, and a table should not print it as if it did.
"""
from __future__ import annotations

import math


def mean_sd(values) -> dict:
  """{'mean', 'sd', 'n', 'min', 'max'} over the values that are not None; mean None when none
  are left (a speedup no seed reached, say)."""
  vals = [float(v) for v in values if v is not None]
  n = len(vals)
  if not n:
    return {'mean': None, 'sd': None, 'n': 0, 'min': None, 'max': None}
  mean = math.fsum(vals) / n
  sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
  return {'mean': mean, 'sd': sd, 'n': n, 'min': min(vals), 'max': max(vals)}


def format_mean_sd(st: dict, digits: int = 3, signed: bool = False) -> str:
  """'0.833 (0.055)'; '0.833 (one seed)' without a spread; 'never' without values."""
  if st['mean'] is None:
    return 'never'
  mean = f'{st["mean"]:{"+" if signed else ""}.{digits}f}'
  return f'{mean} ({st["sd"]:.{digits}f})' if st['sd'] is not None else f'{mean} (one seed)'
