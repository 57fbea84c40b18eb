"""The fill-in-the-middle demo (`make run`'s third step) on two tiny trained runs."""
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, cli, tiny_config
from pathways_jax import demo
from pathways_jax.data import corpora, pipeline
from pathways_jax.sample import load_run
from pathways_jax.train import loop

SPAN, CONTEXT = 3, 12


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(AR run dir, LLaDA run dir) on a small folder of Python-like files: 60 steps each, enough
  for greedy predictions whose winners stand clear of float32 rounding (checked below)."""
  tmp = tmp_path_factory.mktemp('demo')
  corpus = tmp / 'corpus'
  corpus.mkdir()
  for f in range(6):  # one document per file; the split by hash puts one of them in validation
    (corpus / f'm{f}.txt').write_text(''.join(
        f'def get_{f}_{i}(self, key):\n    return self._data[key] + {i}\n\n' for i in range(30)))
  over = {'data.corpus': 'path', 'data.path': str(corpus), 'data.document_separator': '',
          'train.steps': 60, 'train.lr': 1e-2, 'train.checkpoint_every': 60, 'sample.prompts': ()}
  out = []
  for name, extra in [('ar', {}), ('llada', {'objective': 'diffusion', 'model.causal': False,
                                             'model.num_kv_heads': 2})]:
    loop.train(tiny_config(str(tmp / 'cache'), **over, **extra), str(tmp / name), quiet=True)
    out.append(str(tmp / name))
  return out


def _greedy_margin_ok(logits_V):
  """argmax of logits_V and whether its lead over the runner-up is clear of float noise."""
  l = np.asarray(logits_V, np.float64)
  top2 = np.sort(l)[-2:]
  return int(np.argmax(l)), top2[1] - top2[0] > 1e-4


def test_the_demo_prints_its_table_and_the_accuracies_recomputed_by_hand(runs):
  ar_dir, llada_dir = runs
  out = demo.run(ar_dir, llada_dir, lines=12, span=SPAN, context=CONTEXT, show=3)
  examples, preds = out['examples'], out['preds']
  n = len(examples)
  assert n == 12 and set(preds) == {'llada', 'llada_left', 'ar'}
  assert all(p.shape == (n, SPAN) for p in preds.values())

  # The held-out spans, found again in the documents as the training pipeline tokenizes them.
  lcfg, lmodel, lparams, tok = load_run(llada_dir)
  docs = corpora.load_documents(lcfg.data, 'validation')
  for e, truth in zip(examples, out['truth']):
    lines = docs[e.doc].split('\n')
    assert tok.decode(e.line_T).rstrip('\n') == lines[e.lineno - 1]
    doc_tokens, _ = pipeline.tokenize_documents([docs[e.doc]], tok)
    at = 1 + len(tok.encode(''.join(l + '\n' for l in lines[:e.lineno - 1]))) + e.start  # 1: bos
    assert list(doc_tokens[at - CONTEXT:at + SPAN + CONTEXT]) == list(e.window_W)
    assert list(truth) == list(e.line_T[e.start:e.start + SPAN])
    assert list(e.window_W[CONTEXT:CONTEXT + SPAN]) == list(truth)
    assert e.start > 0 and e.start + SPAN < len(e.line_T) - 1  # inside the line
    assert len(e.window_W) == 2 * CONTEXT + SPAN

  # Accuracy by hand: count equal tokens position by position.
  for name, pred in preds.items():
    hits = sum(int(pred[i][j]) == int(out['truth'][i][j]) for i in range(n) for j in range(SPAN))
    whole = sum(all(int(pred[i][j]) == int(out['truth'][i][j]) for j in range(SPAN))
                for i in range(n))
    assert out['accuracy'][name]['token_accuracy'] == pytest.approx(hits / (n * SPAN))
    assert out['accuracy'][name]['exact_match'] == pytest.approx(whole / n)

  # The predictions, by plain loops over eager forward passes (no jitted sampler); LLaDA's
  # left-only rows are cut after the span instead of padded.
  _, amodel, aparams, _ = load_run(ar_dir)
  checked = 0
  for i, e in enumerate(examples[:4]):
    x = list(e.window_W[:CONTEXT])
    for j in range(SPAN):
      tok_j, clear = _greedy_margin_ok(amodel.apply({'params': aparams}, jnp.asarray([x]))[0, -1])
      if not clear:
        break  # a near-tie that float32 may break the other way: the rest of the row may differ
      assert tok_j == preds['ar'][i][j], (i, j)
      x.append(tok_j)
    checked += len(x) == CONTEXT + SPAN
  assert checked >= 2
  checked = 0
  for i, e in enumerate(examples[:4]):
    for name, row in [('llada', list(e.window_W)), ('llada_left', list(e.window_W[:CONTEXT + SPAN]))]:
      row[CONTEXT:CONTEXT + SPAN] = [tok.mask_id] * SPAN
      clear = True
      for _ in range(SPAN):  # one token per step: the most probable prediction of any masked slot
        logits = np.asarray(lmodel.apply({'params': lparams}, jnp.asarray([row]))[0], np.float64)
        logits[:, tok.mask_id] = -np.inf
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        masked = [k for k in range(len(row)) if row[k] == tok.mask_id]
        conf = sorted(probs[k].max() for k in masked)
        best = max(masked, key=lambda k: probs[k].max())  # ties: the first position, as LLaDA
        best_tok, margin_ok = _greedy_margin_ok(logits[best])
        clear &= margin_ok and (len(conf) < 2 or conf[-1] - conf[-2] > 1e-6)
        row[best] = best_tok
      if clear:  # else a near-tie that float32 may break the other way
        assert row[CONTEXT:CONTEXT + SPAN] == list(preds[name][i]), (name, i)
        checked += 1
  assert checked >= 4

  # The printed text: a header, the table (5 columns) and one summary line per model.
  text = out['text'].split('\n')
  assert text[0].startswith(f'Fill in the middle: {SPAN} tokens masked mid-line in {n} held-out')
  assert text[1].startswith(f'LLaDA sees the {CONTEXT} tokens before the span and the {CONTEXT}')
  head = text.index('') + 1
  assert [c.strip() for c in text[head].split(' | ')] == [
      'masked line', 'LLaDA fills [..]', 'ok', 'AR continues [..]', 'ok']
  assert set(text[head + 1]) <= {'-', '+'}
  rows = text[head + 2:text.index('', head)]
  assert 1 <= len(rows) <= 3
  for r in rows:
    cells = [c.strip() for c in r.split(' | ')]
    assert len(cells) == 5 and '____' in cells[0]
    assert re.fullmatch(rf'\d/{SPAN}', cells[2]) and re.fullmatch(rf'\d/{SPAN}', cells[4])
  summary = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in (
      re.match(r'\s+(LLaDA, both sides|LLaDA, left only|AR, left only)\s+([\d.]+)%\s+([\d.]+)%', l)
      for l in text) if m}
  for label, name in [('LLaDA, both sides', 'llada'), ('LLaDA, left only', 'llada_left'),
                      ('AR, left only', 'ar')]:
    acc = out['accuracy'][name]
    assert summary[label] == pytest.approx((100 * acc['token_accuracy'], 100 * acc['exact_match']),
                                           abs=0.051)

  # The command line prints the same text, given relative run directories as `make run` gives.
  rel = lambda d: os.path.relpath(d, REPO)
  res = cli('pathways_jax.demo', f'--ar={rel(ar_dir)}', f'--llada={rel(llada_dir)}', '--lines=12',
            f'--span={SPAN}', f'--context={CONTEXT}', '--show=3')
  assert res.returncode == 0, res.stderr[-2000:]
  assert out['text'] in res.stdout

  # Runs the wrong way round, and a window longer than the models, are clear errors (one test:
  # the runs are trained once per xdist worker).
  with pytest.raises(ValueError, match='must be a causal'):
    demo.run(llada_dir, ar_dir)
  with pytest.raises(ValueError, match='exceeds the models'):
    demo.run(ar_dir, llada_dir, context=40)
