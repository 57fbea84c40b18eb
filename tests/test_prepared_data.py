"""Prepared datasets (data/prepare.py, data/prepared.py): the shards hold exactly the corpus'
documents, packed as the pipeline packs; process slices, resume, resumable prepare, bad input."""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from pathways_jax import config as config_lib
from pathways_jax.data import corpora, pipeline, prepare, prepared, tokenizers

from helpers import cli

SEQ_LEN = 48


def _corpus(root, n_files=3, docs_per_file=70):
  """A folder of text files and one JSONL; documents of 5..90 bytes, some longer than a row."""
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'épsilon', 'zeta', '日本', 'eta']
  root.mkdir(parents=True, exist_ok=True)
  for f in range(n_files):
    docs = [' '.join(rng.choice(words, rng.integers(1, 14))) + f' {f}.{i}'
            for i in range(docs_per_file)]
    (root / f'part{f}.txt').write_text('\n\n'.join(docs) + '\n', 'utf-8')
  with open(root / 'extra.jsonl', 'w', encoding='utf-8') as fh:
    for i in range(30):
      fh.write(json.dumps({'text': f'jsonl document {i} ' + 'x' * int(rng.integers(0, 60))}) + '\n')
  return root


def _cfg(tmp_path, corpus_dir, **data):
  cfg = config_lib.base_config()
  cfg.data.cache_dir = str(tmp_path / 'cache')
  cfg.data.corpus = 'path'
  cfg.data.path = str(corpus_dir)
  cfg.data.tokenizer = 'byte'
  cfg.data.seq_len = SEQ_LEN
  cfg.data.batch_size = 4
  cfg.data.eval_batches = 2
  for k, v in data.items():
    cfg.data[k] = v
  return cfg


def _run_cfg(cfg, out):
  run = config_lib.base_config()
  run.data = cfg.data.copy_and_resolve_references()
  run.data.corpus, run.data.path = 'prepared', str(out)
  return run


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('prep')
  cfg = _cfg(tmp, _corpus(tmp / 'corpus'))
  out = tmp / 'ds'
  manifest = prepare.prepare(cfg, str(out), workers=2, progress=False)
  return cfg, out, manifest


def _segments(rows):
  """Every segment of every row as a tuple of ids, and the checks of the row layout."""
  out = []
  for r in range(len(rows)):
    row = rows[r]
    seg, pos, tok = row['segment_ids'], row['positions'], row['tokens']
    used = int((seg > 0).sum())
    assert (seg[:used] > 0).all() and not seg[used:].any() and not tok[used:].any()
    for s in range(1, int(seg.max()) + 1):
      idx = np.nonzero(seg == s)[0]
      assert idx.size and (np.diff(idx) == 1).all()
      assert (pos[idx] == np.arange(idx.size)).all()  # positions restart at every piece
      out.append(tuple(tok[idx].tolist()))
  return out


def _byte_ids(text):  # the byte tokenizer, written out: bos, UTF-8 bytes + 4, eos
  return [1] + [b + 4 for b in text.encode('utf-8')] + [2]


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_the_shards_hold_every_document_of_the_split_once_in_rows_laid_out_as_packed(
    dataset, split):
  cfg, out, manifest = dataset
  docs = corpora.load_documents(cfg.data, split)  # the in-memory reader's split
  assert len(docs) >= (3 if split == 'validation' else 200)
  rows = prepared.PreparedRows(str(out), split)
  assert len(rows) == manifest['splits'][split]['rows'] > 0
  want = [_byte_ids(d) for d in docs]
  # A document longer than a row is cut into row-long pieces: glue each one's pieces back.
  got = collections.Counter()
  pieces = _segments(rows)
  assert max(len(p) for p in pieces) <= SEQ_LEN
  long_docs = [w for w in want if len(w) > SEQ_LEN]
  assert long_docs, 'the corpus should hold documents longer than a row'
  short = collections.Counter(tuple(w) for w in want if len(w) <= SEQ_LEN)
  for p in pieces:
    got[p] += 1
  for w in long_docs:  # each full piece and the tail are segments of their own
    for k in range(0, len(w), SEQ_LEN):
      got[tuple(w[k:k + SEQ_LEN])] -= 1
  got = +got  # drop zero counts (a negative count would mean a missing piece)
  assert got == short
  assert sum(map(len, pieces)) == sum(map(len, want)) == manifest['splits'][split]['tokens']
  assert rows[len(rows)]['segment_ids'].sum() == 0  # past the end: padding


def test_process_slices_are_disjoint_their_union_is_the_batch_and_the_iterator_resumes(dataset):
  cfg, out, _ = dataset
  run = _run_cfg(cfg, out)
  tok = tokenizers.get_tokenizer(run.data)
  one = pipeline.make_train_iterator(run, tok)
  halves = [pipeline.make_train_iterator(run, tok, process_index=p, process_count=2)
            for p in (0, 1)]
  batches = [next(one) for _ in range(5)]
  for want in batches:
    got = [next(h) for h in halves]
    for key in ('tokens', 'segment_ids', 'positions'):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    a, b = (set(map(bytes, g['tokens'])) for g in got)
    assert not a & b
  state = halves[1].get_state()
  expect = [next(halves[1]) for _ in range(3)]
  resumed = pipeline.make_train_iterator(run, tok, process_index=1, process_count=2)
  resumed.set_state(state)
  for want in expect:
    np.testing.assert_array_equal(next(resumed)['tokens'], want['tokens'])
  evals = pipeline.make_eval_batches(run, tok)
  assert len(evals) >= 1 and evals[0]['tokens'].shape == (4, SEQ_LEN)


def test_a_stopped_prepare_redoes_only_the_unfinished_units(dataset, tmp_path):
  cfg, out, manifest = dataset
  copy = tmp_path / 'ds'
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(out, copy)
  (copy / 'manifest.json').unlink()
  (copy / 'parts' / '00001.json').unlink()  # unit 1 stopped before it was marked done
  (copy / 'train-00001.array_record').unlink()
  kept = (copy / 'train-00000.array_record').stat().st_mtime_ns
  (copy / '.train-00001.array_record.123.tmp').write_bytes(b'half a shard')
  again = prepare.prepare(cfg, str(copy), workers=1, progress=False)
  assert again == manifest
  assert (copy / 'train-00000.array_record').stat().st_mtime_ns == kept  # not rewritten
  assert (copy / 'train-00001.array_record').is_file()
  assert not list(copy.glob('.*.tmp'))
  bigger = cfg.copy_and_resolve_references()
  bigger.data.seq_len = 64
  with pytest.raises(corpora.DataError, match=r'seq_len.*48.*64|other settings'):
    prepare.prepare(bigger, str(copy), workers=1, progress=False)


def test_a_run_refuses_a_dataset_of_another_length_tokenizer_or_vocabulary(dataset, tmp_path):
  cfg, out, _ = dataset
  run = _run_cfg(cfg, out)
  tok = tokenizers.get_tokenizer(run.data)
  run.data.seq_len = 64
  with pytest.raises(corpora.DataError, match=r'seq_len=48.*seq_len=64'):
    pipeline.load_packed_rows(run, tok, 'train')
  run.data.seq_len = SEQ_LEN
  class Other(tokenizers.ByteTokenizer):
    name, fingerprint = 'other', 'other-v1'
  with pytest.raises(corpora.DataError, match=r'byte \(byte-v1\).*other \(other-v1\)'):
    pipeline.load_packed_rows(run, Other(), 'train')
  with pytest.raises(ValueError, match=r'holds token id \d+, outside the vocabulary \[0, 100\)'):
    pipeline.load_packed_rows(run, tok, 'train', vocab_size=100)
  run.data.path = str(tmp_path / 'nowhere')
  with pytest.raises(corpora.DataError, match=r'nowhere.*not a prepared dataset'):
    pipeline.load_packed_rows(run, tok, 'train')
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'manifest.json').write_text('{"format": ')
  run.data.path = str(tmp_path / 'broken')
  with pytest.raises(corpora.DataError, match=r'not valid JSON'):
    pipeline.load_packed_rows(run, tok, 'train')
  run.data.path = str(out)
  run.data.noise.fraction = 0.1
  with pytest.raises(config_lib.ConfigError, match=r'noise'):
    config_lib.validate(run)


def test_prepare_names_undecodable_files_keeps_the_rest_and_refuses_an_empty_folder(tmp_path):
  corpus = _corpus(tmp_path / 'corpus', n_files=2, docs_per_file=10)
  (corpus / 'latin1.txt').write_bytes('caf\xe9 au lait\n'.encode('latin-1'))
  cfg = _cfg(tmp_path, corpus)
  with pytest.raises(corpora.DataError,
                     match=r'(?s)1 of 4 units.*\n  corpus file \S*latin1\.txt is not UTF-8'):
    prepare.prepare(cfg, str(tmp_path / 'ds'), workers=1, progress=False)
  assert len(os.listdir(tmp_path / 'ds' / 'parts')) == 3  # the readable files are done
  assert not (tmp_path / 'ds' / 'manifest.json').exists()
  for kw, message in (({'workers': -1}, 'workers=-1'), ({'records_per_unit': 0}, 'records_per')):
    with pytest.raises(corpora.DataError, match=message):
      prepare.prepare(cfg, str(tmp_path / 'ds3'), progress=False, **kw)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(corpora.DataError, match=r'empty has no .*files'):
    prepare.prepare(_cfg(tmp_path, tmp_path / 'empty'), str(tmp_path / 'ds2'), workers=1,
                    progress=False)


def test_the_prepare_cli_and_a_training_run_from_its_dataset(tmp_path):
  """The two commands docs/data.md gives, with the sentencepiece tokenizer copied along."""
  corpus = _corpus(tmp_path / 'corpus')
  common = ['--config=experiments/quickstart.py', f'--config.data.cache_dir={tmp_path}/cache',
            '--config.data.vocab_size=300', '--config.data.seq_len=32']
  done = cli('pathways_jax.data.prepare', *common, '--config.data.corpus=path',
             f'--config.data.path={corpus}', f'--out={tmp_path}/ds', '--workers=2')
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'train: ' in done.stdout and (tmp_path / 'ds' / 'tokenizer.model').is_file()
  done = cli('pathways_jax.main', *common, '--config.data.corpus=prepared',
             f'--config.data.path={tmp_path}/ds', f'--workdir={tmp_path}/run',
             '--config.train.steps=3', '--config.train.log_every=1', '--config.data.batch_size=4',
             '--config.model.d_model=32', '--config.model.num_layers=1',
             '--config.model.num_heads=2', '--config.model.num_kv_heads=1',
             '--config.model.mlp_dim=64', '--config.train.progress_bar=False',
             '--config.sample.prompts=()', '--config.data.eval_batches=1')
  assert done.returncode == 0, done.stderr[-2000:]
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    losses = [r['loss'] for r in map(json.loads, f) if 'loss' in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert 'val_loss' in (tmp_path / 'run' / 'metrics.jsonl').read_text()
