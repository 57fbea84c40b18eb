"""Data layer: tokenizers, corpora, packing, the grain iterator (resume, slices), synthetic world."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pathways_jax import config as config_lib
from pathways_jax.data import corpora, pipeline, synthetic, tokenizers

TEXT = 'héllo wörld — 日本語 ✓\n\tdef f(x):\n        return x  # <mask> stays text\n'


def _cfg(tmp_path, **data):
  cfg = config_lib.base_config()
  cfg.data.cache_dir = str(tmp_path / 'cache')
  cfg.data.corpus = 'synthetic'
  cfg.data.tokenizer = 'byte'
  cfg.data.seq_len = 32
  cfg.data.batch_size = 4
  cfg.data.eval_batches = 2
  cfg.data.synthetic.num_people = 12
  cfg.data.synthetic.num_stories = 6
  cfg.data.synthetic.num_arithmetic = 40
  for k, v in data.items():
    cfg.data[k] = v
  return cfg


@pytest.fixture(scope='module')
def sp_tokenizer(tmp_path_factory):
  texts = synthetic.all_documents(_cfg(tmp_path_factory.mktemp('c')).data.synthetic, 0) + [TEXT]
  return tokenizers.train_sentencepiece(texts, 400, tmp_path_factory.mktemp('sp') / 'tiny')


def test_copy_documents_repeat_a_line_and_add_to_the_corpus_only_when_asked(tmp_path):
  syn = _cfg(tmp_path).data.synthetic
  plain = synthetic.all_documents(syn, 0)
  syn.num_copy_documents = 5
  docs = synthetic.all_documents(syn, 0)
  assert docs[:len(plain)] == plain and len(docs) == len(plain) + 5
  for doc in docs[len(plain):]:
    first, second = doc.split('\n')
    assert first == second and 8 <= len(first.split()) <= 23
  assert synthetic.all_documents(syn, 0) == docs  # deterministic
  syn.num_copy_documents = -1
  with pytest.raises(ValueError, match='num_copy_documents=-1 must be >= 0'):
    synthetic.all_documents(syn, 0)


# ------------------------------------------------------------------------------------ tokenizers

def test_byte_tokenizer_round_trip_and_special_ids():
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(TEXT)
  assert min(ids) >= 4 and max(ids) < tok.vocab_size == 260
  assert tok.decode(ids) == TEXT
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.mask_id]) == TEXT
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
  assert (tokenizers.PAD_ID, tokenizers.BOS_ID, tokenizers.EOS_ID, tokenizers.MASK_ID) == (0, 1, 2, 3)
  cfg = config_lib.base_config()  # -1: the tokenizer's, filled in when a run starts
  assert (cfg.data.pad_id, cfg.data.bos_id, cfg.data.eos_id, cfg.data.mask_id) == (-1,) * 4
  tokenizers.resolve_special_ids(cfg, tok)
  assert (cfg.data.pad_id, cfg.data.bos_id, cfg.data.eos_id, cfg.data.mask_id) == (0, 1, 2, 3)


def test_sentencepiece_round_trip_and_special_ids(sp_tokenizer):
  tok = sp_tokenizer
  for i, piece in enumerate(['<pad>', '<s>', '</s>', '<mask>']):
    assert tok.piece(i) == piece
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
  for text in (TEXT, 'Zyx qwv ǅ 🙂', '  leading and trailing  '):
    ids = tok.encode(text)
    assert not set(ids) & {0, 1, 2, 3}  # a literal '<mask>' in text never becomes the mask id
    assert tok.decode(ids) == text
  assert tok.decode([1] + tok.encode('abc') + [2, 3, 0]) == 'abc'


def test_sentencepiece_training_is_deterministic(tmp_path, sp_tokenizer):
  texts = synthetic.all_documents(_cfg(tmp_path).data.synthetic, 0) + [TEXT]
  again = tokenizers.train_sentencepiece(texts, 400, tmp_path / 'again')
  assert again.fingerprint == sp_tokenizer.fingerprint


def test_get_tokenizer_trains_once_then_reuses_cache(tmp_path, monkeypatch):
  cfg = _cfg(tmp_path, tokenizer='sentencepiece', vocab_size=400)
  first = tokenizers.get_tokenizer(cfg.data)
  models = list((tmp_path / 'cache' / 'tokenizers').glob('*.model'))
  assert len(models) == 1 and first.vocab_size == 400

  def no_training(*a, **k):
    raise AssertionError('the cached model should have been reused')
  monkeypatch.setattr(tokenizers, 'train_sentencepiece', no_training)
  second = tokenizers.get_tokenizer(cfg.data)
  assert second.fingerprint == first.fingerprint
  cfg.data.tokenizer_path = str(models[0])
  assert tokenizers.get_tokenizer(cfg.data).fingerprint == first.fingerprint


def test_tokenizer_path_missing_or_corrupt(tmp_path):
  cfg = _cfg(tmp_path, tokenizer='sentencepiece', tokenizer_path=str(tmp_path / 'nope.model'))
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizers.get_tokenizer(cfg.data)
  (tmp_path / 'bad.model').write_bytes(b'not a model')
  cfg.data.tokenizer_path = str(tmp_path / 'bad.model')
  with pytest.raises(ValueError, match='bad.model'):
    tokenizers.get_tokenizer(cfg.data)


# --------------------------------------------------------------------------------------- packing

def test_packing_isolates_documents():
  rng = np.random.default_rng(0)
  L = 16
  lengths = np.concatenate([rng.integers(2, 12, 50), [16, 17, 40, 2]])
  flat = np.arange(1, lengths.sum() + 1)  # every token unique, so it tells where it came from
  doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]) + 1
  rows = pipeline.PackedRows(flat, lengths, L)
  seen = []
  for r in range(len(rows)):
    row = rows[r]
    seg, pos, tok = row['segment_ids'], row['positions'], row['tokens']
    n = int((seg > 0).sum())
    assert n > 0 and (seg[n:] == 0).all() and (tok[n:] == 0).all()  # padding only at the end
    assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all() and seg[0] == 1
    for s in np.unique(seg[:n]):
      piece, p = tok[seg == s], pos[seg == s]
      assert (p == np.arange(len(piece))).all()  # positions restart per document piece
      assert (np.diff(piece) == 1).all()  # contiguous within one document
      doc = np.searchsorted(doc_start, piece[0], side='right') - 1
      assert piece[-1] < doc_start[doc] + lengths[doc]  # does not run into the next document
      assert (piece[0] - doc_start[doc]) % L == 0  # pieces start at the document or a multiple of L
      seen.append(piece)
  seen = np.sort(np.concatenate(seen))
  assert (seen == flat).all()  # every token exactly once
  assert rows.fill > 0.9


def test_packed_rows_reconstruct_text(tmp_path):
  tok = tokenizers.ByteTokenizer()
  docs = ['alpha', 'beta gamma', 'δέλτα ' * 9, 'e']
  tokens, lengths = pipeline.tokenize_documents(docs, tok)
  rows = pipeline.PackedRows(tokens, lengths, 16)
  pieces = sorted((int(rows.piece_start[j]), rows.tokens[rows.piece_start[j]:][:rows.piece_len[j]])
                  for j in range(len(rows.piece_start)))
  flat = np.concatenate([p for _, p in pieces])
  texts = [tok.decode(d) for d in np.split(flat, np.nonzero(flat == tok.bos_id)[0][1:])]
  assert texts == docs
  for r in range(len(rows)):  # and every segment of every row is a piece of one document
    row = rows[r]
    for s in set(row['segment_ids'].tolist()) - {0}:
      ids = row['tokens'][row['segment_ids'] == s]
      raw = bytes((ids[ids >= 4] - 4).tolist())  # bytes: a piece may cut a character in two
      assert raw in '\n'.join(docs).encode()


# -------------------------------------------------------------------------------------- iterator

def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_batches_shape_dtype_and_epochs(tmp_path):
  cfg = _cfg(tmp_path)
  tok = tokenizers.ByteTokenizer()
  rows = pipeline.load_packed_rows(cfg, tok, 'train')
  batches = _take(pipeline.make_train_iterator(cfg, tok), 2 * len(rows) // 4 + 1)
  for b in batches:
    assert set(b) == {'tokens', 'segment_ids', 'positions'}
    assert all(v.shape == (4, 32) and v.dtype == np.int32 for v in b.values())
  seen = [r.tobytes() for b in batches for r in b['tokens']]
  everything = sorted(rows[r]['tokens'].tobytes() for r in range(len(rows)))
  n = len(rows)
  assert sorted(seen[:n]) == everything and sorted(seen[n:2 * n]) == everything  # whole epochs
  assert seen[:n] != seen[n:2 * n]  # reshuffled each epoch


def test_iterator_resume_is_exact(tmp_path):
  cfg = _cfg(tmp_path)
  tok = tokenizers.ByteTokenizer()
  it = pipeline.make_train_iterator(cfg, tok)
  _take(it, 7)
  state = it.get_state()
  expected = _take(it, 40)  # crosses epoch boundaries
  fresh = pipeline.make_train_iterator(cfg, tok)
  fresh.set_state(state)
  assert _equal(_take(fresh, 40), expected)


def test_iterator_resume_through_orbax(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  cfg = _cfg(tmp_path)
  tok = tokenizers.ByteTokenizer()
  it = pipeline.make_train_iterator(cfg, tok)
  _take(it, 5)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 6)
  fresh = pipeline.make_train_iterator(cfg, tok)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _equal(_take(fresh, 6), expected)


def test_process_slices_are_disjoint_and_make_the_global_batch(tmp_path):
  cfg = _cfg(tmp_path, batch_size=8)
  tok = tokenizers.ByteTokenizer()
  whole = _take(pipeline.make_train_iterator(cfg, tok), 6)
  parts = [_take(pipeline.make_train_iterator(cfg, tok, process_index=p, process_count=2), 6)
           for p in range(2)]
  for k in range(6):
    assert parts[0][k]['tokens'].shape == (4, 32)
    for key in whole[k]:
      assert np.array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])
  eval_whole = pipeline.make_eval_batches(cfg, tok)
  eval_parts = [pipeline.make_eval_batches(cfg, tok, process_index=p, process_count=2)
                for p in range(2)]
  for k, b in enumerate(eval_whole):
    assert np.array_equal(np.concatenate([eval_parts[0][k]['tokens'], eval_parts[1][k]['tokens']]),
                          b['tokens'])
  with pytest.raises(ValueError, match='divisible'):
    pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=3)


def test_determinism_by_seed(tmp_path):
  tok = tokenizers.ByteTokenizer()
  a = _take(pipeline.make_train_iterator(_cfg(tmp_path), tok), 3)
  b = _take(pipeline.make_train_iterator(_cfg(tmp_path), tok), 3)
  cfg = _cfg(tmp_path)
  cfg.seed = 1
  c = _take(pipeline.make_train_iterator(cfg, tok), 3)
  assert _equal(a, b) and not _equal(a, c)
  cfg = _cfg(tmp_path, shuffle=False)
  d = _take(pipeline.make_train_iterator(cfg, tok), 1)[0]
  rows = pipeline.load_packed_rows(cfg, tok, 'train')
  assert np.array_equal(d['tokens'], np.stack([rows[r]['tokens'] for r in range(4)]))


def test_eval_batches(tmp_path):
  cfg = _cfg(tmp_path, eval_batches=50)
  tok = tokenizers.ByteTokenizer()
  batches = pipeline.make_eval_batches(cfg, tok)
  rows = pipeline.load_packed_rows(cfg, tok, 'validation')
  assert len(batches) == -(-len(rows) // 4)
  assert _equal(batches, pipeline.make_eval_batches(cfg, tok))
  last = batches[-1]['segment_ids']
  assert (last[len(rows) % 4 or 4:] == 0).all()  # filled with padding rows, not wrapped
  cfg.data.eval_batches = 0
  assert pipeline.make_eval_batches(cfg, tok) == []


def test_cached_tokens_equal_fresh_tokens(tmp_path):
  cfg = _cfg(tmp_path)
  tok = tokenizers.ByteTokenizer()
  first = pipeline.load_tokens(cfg.data, tok, 'train')
  assert list((tmp_path / 'cache' / 'tokens').glob('*.npz'))
  second = pipeline.load_tokens(cfg.data, tok, 'train')
  fresh = pipeline.tokenize_documents(corpora.load_documents(cfg.data, 'train'), tok)
  for a, b, c in zip(first, second, fresh):
    assert np.array_equal(a, b) and np.array_equal(a, c)


# ----------------------------------------------------------------------------------- bad inputs

def test_bad_corpus_paths(tmp_path):
  cfg = _cfg(tmp_path, corpus='path', path=str(tmp_path / 'missing.txt'))
  with pytest.raises(corpora.DataError, match='missing.txt.*does not exist'):
    corpora.load_documents(cfg.data, 'train')
  (tmp_path / 'empty.txt').write_text('\n  \n\n')
  cfg.data.path = str(tmp_path / 'empty.txt')
  with pytest.raises(corpora.DataError, match='empty.txt.*no documents'):
    corpora.load_documents(cfg.data, 'train')
  (tmp_path / 'latin1.txt').write_bytes('café au lait\n'.encode('latin-1'))
  cfg.data.path = str(tmp_path / 'latin1.txt')
  with pytest.raises(corpora.DataError, match='latin1.txt is not UTF-8'):
    corpora.load_documents(cfg.data, 'train')
  (tmp_path / 'bad.jsonl').write_text('{"text": "ok"}\n{"body": "no text"}\n')
  cfg.data.path = str(tmp_path / 'bad.jsonl')
  with pytest.raises(corpora.DataError, match=r"bad.jsonl:2: no field 'text'"):
    corpora.load_documents(cfg.data, 'train')
  (tmp_path / 'nothing').mkdir()
  cfg.data.path = str(tmp_path / 'nothing')
  with pytest.raises(corpora.DataError, match='nothing has no'):
    corpora.load_documents(cfg.data, 'train')
  assert issubclass(corpora.DataError, ValueError)


def test_out_of_range_token_ids(tmp_path):
  with pytest.raises(ValueError, match='token id 300 .*vocabulary \\[0, 260\\)'):
    pipeline.check_token_ids(np.array([[5, 300], [1, 2]]), 260)
  with pytest.raises(ValueError, match='token id -1'):
    pipeline.check_token_ids([3, -1], 260)
  pipeline.check_token_ids(np.array([0, 259]), 260)
  with pytest.raises(ValueError, match='outside the vocabulary \\[0, 100\\)'):
    pipeline.make_train_iterator(_cfg(tmp_path), tokenizers.ByteTokenizer(), vocab_size=100)


# --------------------------------------------------------------------------------------- corpora

def test_path_corpus_files_and_folders(tmp_path):
  folder = tmp_path / 'corpus'
  (folder / 'sub').mkdir(parents=True)
  (folder / 'a.txt').write_text('first doc\nline two\n\n\nsecond doc\n')
  (folder / 'sub' / 'b.jsonl').write_text(
      '\n'.join(json.dumps({'text': f'json doc {i} ✓'}) for i in range(20)) + '\n')
  (folder / 'ignored.bin').write_bytes(b'\xff\xfe')
  cfg = _cfg(tmp_path, corpus='path', path=str(folder))
  train = corpora.load_documents(cfg.data, 'train')
  val = corpora.load_documents(cfg.data, 'validation')
  assert val and not set(train) & set(val)
  assert sorted(train + val) == sorted(['first doc\nline two', 'second doc']
                                       + [f'json doc {i} ✓' for i in range(20)])
  assert corpora.load_documents(cfg.data, 'train') == train
  cfg.data.document_separator = ''
  cfg.data.path = str(folder / 'a.txt')
  assert corpora.load_documents(cfg.data, 'train') == ['first doc\nline two\n\n\nsecond doc']
  tok = tokenizers.ByteTokenizer()  # one document: it trains, and there is nothing to eval on
  assert next(pipeline.make_train_iterator(cfg, tok))['tokens'].shape == (4, 32)
  assert pipeline.make_eval_batches(cfg, tok) == []
  cfg.data.max_documents = 3
  cfg.data.path = str(folder)
  cfg.data.document_separator = '\n\n'
  assert len(corpora.load_documents(cfg.data, 'train')) == 3


def test_stdlib_split_is_disjoint_and_by_file(tmp_path):
  files = corpora.stdlib_files()
  key = lambda p: p.as_posix()
  train = corpora.split_by_hash(files, 'train', key)
  val = corpora.split_by_hash(files, 'validation', key)
  assert len(files) > 300 and not set(train) & set(val) and len(train) + len(val) == len(files)
  assert 0 < len(val) < 0.06 * len(files)
  assert not any(part in ('test', 'site-packages') for f in files for part in f.parts)
  cfg = _cfg(tmp_path, corpus='stdlib', max_documents=3)
  docs = corpora.load_documents(cfg.data, 'validation')
  assert len(docs) == 3 and all(isinstance(d, str) and d for d in docs)


def test_tfds_offline_source(tmp_path):
  try:
    import importlib_resources  # noqa: F401  (tfds' builders import it; reading does not)
  except ImportError:
    import importlib.resources
    sys.modules['importlib_resources'] = importlib.resources
  tfds = pytest.importorskip('tensorflow_datasets')

  class TinyText(tfds.core.GeneratorBasedBuilder):
    """Three splits of a few strings, written as ArrayRecord without TensorFlow."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples('train', 12), 'test': self._generate_examples('test', 3)}

    def _generate_examples(self, split, n):
      for i in range(n):
        yield i, {'text': f'{split} document {i} ü'}

  data_dir = tmp_path / 'tfds'
  TinyText(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  cfg = _cfg(tmp_path, corpus='tfds', tfds_name='tiny_text', tfds_data_dir=str(data_dir))
  assert corpora.load_documents(cfg.data, 'train') == [f'train document {i} ü' for i in range(12)]
  assert corpora.load_documents(cfg.data, 'validation') == [f'test document {i} ü' for i in range(3)]
  cfg.data.max_documents = 5
  assert len(corpora.load_documents(cfg.data, 'train')) == 5
  batch = next(pipeline.make_train_iterator(cfg, tokenizers.ByteTokenizer()))
  assert batch['tokens'].shape == (4, 32)
  # Prepared: ranges of 5 records per shard, the test split as validation, read back in order.
  from pathways_jax.data import prepare, prepared  # pylint: disable=g-import-not-at-top
  cfg.data.max_documents = 0
  manifest = prepare.prepare(cfg, str(tmp_path / 'ds'), workers=1, records_per_unit=5,
                             progress=False)
  assert [len(manifest['splits'][s]['shards']) for s in ('train', 'validation')] == [3, 1]
  for split, prefix, n in (('train', 'train', 12), ('validation', 'test', 3)):
    rows = prepared.PreparedRows(str(tmp_path / 'ds'), split)
    got = [tokenizers.ByteTokenizer().decode(rows[r]['tokens'][rows[r]['segment_ids'] == s])
           for r in range(len(rows)) for s in range(1, rows[r]['segment_ids'].max() + 1)]
    assert sorted(got) == sorted(f'{prefix} document {i} ü' for i in range(n))
  cfg.data.tfds_name = 'no_such_dataset'
  with pytest.raises(corpora.DataError, match='no_such_dataset'):
    corpora.load_documents(cfg.data, 'train')


# ------------------------------------------------------------------------------------- synthetic

def test_synthetic_world_is_deterministic_and_unique():
  a, b, c = synthetic.make_world(7, 150), synthetic.make_world(7, 150), synthetic.make_world(8, 150)
  assert a == b and a != c
  assert len({p.name for p in a.people}) == 150
  assert len({p.description for p in a.people}) == 150
  for p in a.people:
    assert all(p.index in a.people[f].friends for f in p.friends)  # friendship is symmetric
    if p.parent is not None:
      assert a.people[p.parent].birth_year <= p.birth_year - 20
  assert any(p.parent is not None for p in a.people) and all(p.friends for p in a.people[:5])
  assert a.by_name(a.people[3].name) == a.people[3]


def test_fact_templates():
  person = synthetic.make_world(0, 5).people[2]
  for direction, answer in (('name_first', person.description),
                            ('description_first', person.name)):
    facts = synthetic.fact_sentences(person, direction)
    assert len(facts) == synthetic.NUM_TEMPLATES[direction] >= 4
    assert len({f.text for f in facts}) == len(facts)
    for f in facts:
      assert f.answer == answer and f.prompt + f.answer + '.' == f.text
      assert answer not in f.prompt
    assert synthetic.fact_sentence(person, direction, 1) == facts[1]
  with pytest.raises(ValueError):
    synthetic.fact_sentence(person, 'sideways')
  line = synthetic.arithmetic(__import__('random').Random(3))
  assert eval(line.text.split('=')[0]) == line.result == int(line.text[line.answer_start:])


def test_synthetic_documents(tmp_path):
  cfg = _cfg(tmp_path)
  train = synthetic.documents(cfg.data.synthetic, 0, 'train')
  val = synthetic.documents(cfg.data.synthetic, 0, 'validation')
  assert train == synthetic.documents(cfg.data.synthetic, 0, 'train')
  assert val and not set(train) & set(val)
  assert len(train) + len(val) == 12 + 6 + 40 // synthetic.ARITHMETIC_PER_DOCUMENT
  world = synthetic.world_from_config(cfg.data)
  assert any(p.name in ' '.join(train) for p in world.people)
