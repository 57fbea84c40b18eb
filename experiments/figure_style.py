"""What every figure shares: matplotlib loaded headless, the footer that signs a figure (date,
device, seeds, commit), saving, and bars of seed means with the seeds as dots."""
from __future__ import annotations

import os

DPI = 100

def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only: no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _footer(fig, data: dict):
  fig.text(0.99, 0.01, f'{data.get("date")}, {data.get("device")}, commit {data.get("commit")}',
           ha='right', va='bottom', fontsize=6, color='gray')


def _finish(fig, data: dict, path: str) -> str:
  """Lays out a multi-seed figure, signs it (date, device, seeds, commit) and saves it."""
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _footer(fig, {**data, 'device': f'{data.get("device")}, seeds {", ".join(data["seed"])}'})
  return _save(fig, path)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI)
  _plt().close(fig)
  return path


def _seed_bars(ax, xs, vals, width, color, label, fontsize=6):
  """Bars of the means of `vals` (one list of per-seed values per bar), each labelled, with
  the seeds as dots."""
  means = [sum(v) / len(v) for v in vals]
  bars = ax.bar(xs, means, width, color=color, alpha=0.8, label=label)
  ax.bar_label(bars, labels=[f'{v:.2f}' for v in means], fontsize=fontsize, padding=1)
  for x, v in zip(xs, vals):
    ax.plot([x] * len(v), v, 'k.', ms=3)
