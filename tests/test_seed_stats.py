"""The seed summary every experiment reports, against the standard library's statistics."""
import statistics

import pytest

from pathways_jax.eval.seed_stats import format_mean_sd, mean_sd


def test_mean_and_sample_sd_match_the_statistics_module():
  vals = [0.89, 0.83, 0.78, None]  # None: a seed with no value (a speedup never reached)
  st = mean_sd(vals)
  assert st['n'] == 3 and (st['min'], st['max']) == (0.78, 0.89)
  assert st['mean'] == pytest.approx(statistics.mean(vals[:3]), abs=1e-12)
  assert st['sd'] == pytest.approx(statistics.stdev(vals[:3]), abs=1e-12)  # ddof=1
  assert format_mean_sd(st) == '0.833 (0.055)'
  assert format_mean_sd(mean_sd([-0.02, 0.01]), 2, signed=True) == '-0.01 (0.02)'


def test_one_seed_has_no_spread_and_no_seed_has_no_mean():
  one = mean_sd([0.5])
  assert one['sd'] is None and one['mean'] == 0.5
  assert format_mean_sd(one) == '0.500 (one seed)'
  none = mean_sd([None, None])
  assert none['mean'] is None and none['n'] == 0 and format_mean_sd(none) == 'never'
