"""BM25 retrieval over a list of passages, through the `bm25s` library.

    index = BM25Index(passages)
    ids_QK, scores_QK = index.search(['Where was Traith Triba born?'], k=2)

The retrieval ("dynamic") arm of experiments/knowledge_injection.py: the new facts are indexed,
and the top passages for a question go into its prompt. Words are lower-cased runs of two or more
letters or digits, English stop words removed, no stemming (the synthetic world's names and
description words are matched as they are). Needs the `retrieval` extra (`pip install
'pathways_jax[retrieval]'`; in requirements.lock).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _bm25s():
  try:
    import bm25s  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("BM25 retrieval needs the bm25s library: pip install "
                      "'pathways_jax[retrieval]' (or pip install bm25s)") from None
  return bm25s


class BM25Index:
  """BM25 over `passages` as Lucene scores it (bm25s's default method; k1 = 1.5, b = 0.75):
  the sum over query words of idf * tf / (tf + k1 (1 - b + b |d| / avg|d|)), with
  idf = log(1 + (N - n + 0.5) / (n + 0.5)) (tests/test_knowledge_injection.py checks it
  against a plain implementation)."""

  def __init__(self, passages: Sequence[str]):
    passages = list(passages)
    if not passages:
      raise ValueError('no passages to index')
    if not all(isinstance(p, str) and p.strip() for p in passages):
      raise ValueError('every passage must be a non-empty string')
    bm25s = _bm25s()
    self.passages = passages
    self._tokenize = lambda texts, **kw: bm25s.tokenize(texts, stopwords='en', show_progress=False,
                                                       **kw)
    self._index = bm25s.BM25()
    self._index.index(self._tokenize(passages), show_progress=False)

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_QK, scores_QK): the `k` best passages for each query, best first. A query that
    shares no word with any passage gets scores of 0 (and arbitrary ids)."""
    if not 1 <= k <= len(self.passages):
      raise ValueError(f'k={k} must be in [1, {len(self.passages)}] (the number of passages)')
    queries = list(queries)
    if not queries:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    tokens = self._tokenize(queries, return_ids=False)
    ids_QK, scores_QK = self._index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
    return np.asarray(ids_QK, np.int64), np.asarray(scores_QK, np.float32)

  def top_passages(self, query: str, k: int) -> list[str]:
    ids_QK, _ = self.search([query], k)
    return [self.passages[i] for i in ids_QK[0]]
