"""Tokenizers: the project's own (a byte-level fallback and sentencepiece) and HuggingFace's
(`data.tokenizer='hf'`, data/hf_tokenizer.py), each with its own special ids.

Code reads special ids from the tokenizer (`tokenizer.eos_id`, `.mask_id`, `.special_ids`) or
from `config.data.*_id`, which `resolve_special_ids` fills in from the tokenizer; never from
constants. The project's own tokenizers reserve the first four ids:

  PAD_ID = 0  (packing padding; `segment_ids == 0` marks it too)
  BOS_ID = 1  (prepended to each document by the pipeline, never by `encode`)
  EOS_ID = 2  (appended to each document by the pipeline)
  MASK_ID = 3 (LLaDA's mask token; `encode` never produces it from text)

`get_tokenizer(cfg.data)` trains a sentencepiece model on the configured corpus the first time and
caches it under `data.cache_dir` (default ~/.cache/pathways_jax), keyed by the corpus identity and
the training settings, so later runs load it in milliseconds.
"""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
import random
import tempfile
from typing import Iterable, Protocol, Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
SPECIAL_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID, MASK_ID))

# Bump when the training recipe changes, so cached models trained the old way are not reused.
_SP_RECIPE_VERSION = 1
# Sentences (lines) fed to the trainer; 100k lines train a 1k vocabulary in ~1 s on one core.
_SP_MAX_SENTENCES = 100_000
_SP_MAX_SENTENCE_BYTES = 4096


class Tokenizer(Protocol):
  """What the pipeline, trainer and samplers need from a tokenizer."""
  name: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  mask_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special ids (pad, bos, eos, mask) are skipped."""

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text as an int32 array [num_tokens] (the fast path of the pipeline)."""


class _Specials:
  """The special ids of the project's own tokenizers."""
  name = 'own'
  pad_id, bos_id, eos_id, mask_id = PAD_ID, BOS_ID, EOS_ID, MASK_ID
  end_of_turn_id = EOS_ID
  special_ids = SPECIAL_IDS
  specials: dict = {}


class ByteTokenizer(_Specials):
  """UTF-8 bytes shifted past the specials: id = byte + 4, vocabulary 260."""
  name = 'byte'
  vocab_size = 256 + NUM_SPECIAL
  fingerprint = 'byte-v1'

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0].tolist()

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode('utf-8'), np.uint8).astype(np.int32) + NUM_SPECIAL
            for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(list(ids), np.int64).reshape(-1)
    ids = ids[(ids >= NUM_SPECIAL) & (ids < self.vocab_size)]
    # A model may emit a cut multi-byte character; show it as U+FFFD rather than fail.
    return (ids - NUM_SPECIAL).astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer(_Specials):
  """A sentencepiece model whose ids 0..3 are pad, bos, eos and the '<mask>' control symbol."""

  path = ''  # the .model file, when loaded from one (a trained model is cached as a file)

  def __init__(self, model_proto: bytes, name: str = 'sentencepiece'):
    import sentencepiece as spm
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
      raise ValueError(f'not a valid sentencepiece model ({name}): {e}') from None
    self.vocab_size = int(self._sp.get_piece_size())
    self.name = name
    self.fingerprint = 'sp-' + hashlib.blake2b(model_proto, digest_size=8).hexdigest()
    expected = {PAD_ID: self._sp.pad_id(), BOS_ID: self._sp.bos_id(), EOS_ID: self._sp.eos_id(),
                MASK_ID: self._sp.piece_to_id('<mask>')}
    if any(k != v for k, v in expected.items()) or self._sp.id_to_piece(MASK_ID) != '<mask>':
      raise ValueError(
          f'sentencepiece model {name} does not use the fixed special ids pad=0, bos=1, eos=2, '
          f"'<mask>'=3 (it has pad={self._sp.pad_id()}, bos={self._sp.bos_id()}, "
          f"eos={self._sp.eos_id()}, id 3={self._sp.id_to_piece(MASK_ID)!r}); train it with "
          'pathways_jax.data.tokenizers.train_sentencepiece')

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> 'SentencePieceTokenizer':
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'tokenizer model not found: {path}')
    tok = cls(path.read_bytes(), name=f'sentencepiece:{path}')
    tok.path = str(path)
    return tok

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ids = self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)
    return [np.asarray(x, np.int32) for x in ids]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    return self._sp.decode([i for i in ids if i not in SPECIAL_IDS and 0 <= i < self.vocab_size])

  def piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def model_proto(self) -> bytes:
    """The serialised model (what `from_file` reads)."""
    return self._sp.serialized_model_proto()


def _training_sentences(texts: Iterable[str], max_sentences: int, seed: int = 0) -> list[str]:
  """Lines of `texts`, subsampled deterministically to at most `max_sentences`.

  Sampling here (not with the trainer's own shuffle) keeps training deterministic: sentencepiece
  seeds its sampler from the clock unless told otherwise.
  """
  lines = [l for t in texts for l in t.split('\n')
           if l.strip() and len(l.encode('utf-8')) <= _SP_MAX_SENTENCE_BYTES]
  if len(lines) > max_sentences:
    lines = random.Random(seed).sample(lines, max_sentences)
  return lines


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_prefix: str | os.PathLike,
                        *, max_sentences: int = _SP_MAX_SENTENCES) -> SentencePieceTokenizer:
  """Trains a BPE sentencepiece model on `texts` and writes `{model_prefix}.model`.

  byte_fallback makes every string encodable (no <unk> for unseen characters), whitespace is kept
  verbatim (code indentation matters) and the same texts always give the same model bytes.
  """
  import sentencepiece as spm
  sentences = _training_sentences(texts, max_sentences)
  if not sentences:
    raise ValueError('cannot train a sentencepiece model on an empty corpus')
  min_vocab = NUM_SPECIAL + 1 + 256  # specials, unk, byte pieces
  if vocab_size < min_vocab + 8:
    raise ValueError(f'sentencepiece vocab_size={vocab_size} is too small; with byte_fallback it '
                     f'needs at least {min_vocab + 8} (or use data.tokenizer="byte")')
  out = io.BytesIO()
  try:
    spm.set_random_generator_seed(0)
  except AttributeError:
    pass
  try:
    _train(spm, sentences, out, vocab_size)
  except RuntimeError as e:  # e.g. fewer slots than distinct characters; say which knob to turn
    raise ValueError(f'sentencepiece training failed for vocab_size={vocab_size}: {e} '
                     '(change config.data.vocab_size, or use config.data.tokenizer="byte")') from None
  proto = out.getvalue()
  path = pathlib.Path(f'{model_prefix}.model')
  _atomic_write(path, proto)
  return SentencePieceTokenizer(proto, name=f'sentencepiece:{path}')


def _train(spm, sentences: list[str], out: io.BytesIO, vocab_size: int) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=out, vocab_size=vocab_size,
      model_type='bpe', byte_fallback=True, character_coverage=0.9995,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=NUM_SPECIAL,
      control_symbols=['<mask>'],  # control: never produced from text, even literal '<mask>'
      add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name='identity',
      split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=_SP_MAX_SENTENCE_BYTES,
      input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
      hard_vocab_limit=False, minloglevel=2)


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  """Writes via a temp file and rename, so concurrent writers never expose a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def cache_dir(data_cfg) -> pathlib.Path:
  return pathlib.Path(data_cfg.get('cache_dir') or '~/.cache/pathways_jax').expanduser()


def get_tokenizer(data_cfg):
  """The tokenizer `data_cfg` asks for: loaded, cached, or trained on the TRAIN split and cached."""
  kind = data_cfg.tokenizer
  if kind == 'byte':
    if data_cfg.get('tokenizer_path'):
      raise ValueError('config.data.tokenizer_path is for sentencepiece models; it is set while '
                       "config.data.tokenizer='byte'")
    return ByteTokenizer()
  if kind == 'hf':
    if not data_cfg.get('tokenizer_path'):
      raise ValueError("config.data.tokenizer='hf' needs config.data.tokenizer_path: a model "
                       'directory with tokenizer.json, or the tokenizer.json itself')
    from pathways_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
    return hf_tokenizer.HFTokenizer.from_path(data_cfg.tokenizer_path)
  if kind != 'sentencepiece':
    raise ValueError(f"config.data.tokenizer={kind!r} is not one of ('sentencepiece', 'byte', "
                     "'hf')")
  if data_cfg.get('corpus') == 'prepared' and not data_cfg.get('tokenizer_path'):
    return _prepared_tokenizer(data_cfg.path)  # the one the dataset was tokenised with
  if data_cfg.get('tokenizer_path'):
    path = pathlib.Path(data_cfg.tokenizer_path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'config.data.tokenizer_path={str(path)!r} does not exist')
    try:
      return SentencePieceTokenizer.from_file(path)
    except ValueError as e:
      raise ValueError(f'config.data.tokenizer_path={str(path)!r}: {e}') from None

  from pathways_jax.data import corpora  # corpora does not import us; avoid a cycle anyway
  key = hashlib.blake2b(repr((corpora.corpus_fingerprint(data_cfg), int(data_cfg.vocab_size),
                              _SP_MAX_SENTENCES, _SP_RECIPE_VERSION)).encode(),
                        digest_size=10).hexdigest()
  prefix = cache_dir(data_cfg) / 'tokenizers' / f'sp{data_cfg.vocab_size}-{key}'
  model = pathlib.Path(f'{prefix}.model')
  if model.is_file():
    try:
      return SentencePieceTokenizer.from_file(model)
    except ValueError:
      pass  # a corrupt cache entry is retrained, never trusted
  tok = train_sentencepiece(corpora.load_documents(data_cfg, 'train'), data_cfg.vocab_size, prefix)
  if model.is_file():
    tok.path = str(model)
  return tok


def _prepared_tokenizer(path: str) -> SentencePieceTokenizer:
  from etils import epath  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import prepared  # pylint: disable=g-import-not-at-top
  model = epath.Path(path) / prepared.TOKENIZER_FILE
  if not model.exists():
    raise FileNotFoundError(f"prepared dataset {path} holds no {prepared.TOKENIZER_FILE} (it was "
                            'not made with a sentencepiece tokenizer): set config.data.tokenizer '
                            "(and tokenizer_path) to the dataset's, manifest.json names it")
  tok = SentencePieceTokenizer(model.read_bytes(), name=f'sentencepiece:{model}')
  tok.path = str(model)
  return tok


SPECIAL_NAMES = ('pad', 'bos', 'eos', 'mask')


def resolve_special_ids(cfg, tokenizer) -> None:
  """Fills config.data.{pad,bos,eos,mask}_id from the tokenizer where they are -1 (the default).

  An id the config sets is kept when the tokenizer has none (e.g. a mask id a model's docs give),
  and is an error when the tokenizer has another."""
  from pathways_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  for name in SPECIAL_NAMES:
    key, own = f'{name}_id', getattr(tokenizer, f'{name}_id', None)
    value = cfg.data.get(key, -1)
    if value is None or value < 0:
      cfg.data[key] = -1 if own is None else int(own)
    elif own is not None and int(own) != value:
      raise ConfigError(f'config.data.{key}={value} but the tokenizer {tokenizer.name} has '
                        f'{name} id {own}: leave config.data.{key} at -1 to take the tokenizer\'s')


def require_special_ids(cfg, names, who: str) -> None:
  """One line naming the special ids `who` needs and neither the tokenizer nor the config gives."""
  from pathways_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  missing = [n for n in names if cfg.data.get(f'{n}_id', -1) < 0]
  if missing:
    raise ConfigError(f'{who} needs the special token(s) {missing}, which the tokenizer '
                      f'({cfg.data.tokenizer}) does not define: add them to it, or set '
                      + ', '.join(f'config.data.{n}_id' for n in missing))


def ordinary_id_range(tokenizer) -> tuple[int, int, frozenset]:
  """(low, high, special ids inside [low, high)): the ids text encodes to, for random tokens.

  low is the first id that is not special, so the project's own tokenizers give (4, vocab, {})."""
  specials = frozenset(int(i) for i in getattr(tokenizer, 'special_ids', SPECIAL_IDS))
  low = 0
  while low in specials:
    low += 1
  return low, int(tokenizer.vocab_size), frozenset(i for i in specials if i >= low)
