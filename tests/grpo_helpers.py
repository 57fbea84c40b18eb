"""Shared pieces of the grpo tests (tests/test_grpo.py, tests/test_diffu_grpo.py): learnable and
failing rewards registered under test names, a tiny pretrained start model with a prompt file
(the `base` fixture), the task's config on it, and the logged metrics."""
import json
import zlib

import pytest

from helpers import tiny_config
from pathways_jax.data import tokenizers
from pathways_jax.rl import rewards as rewards_lib

BYTES = tokenizers.ByteTokenizer()
NEW = 6  # rl.max_new_tokens


def _spaces(record, text):
  """A reward a few steps can learn: the share of spaces (frequent in the pretraining text)."""
  del record
  return text.count(' ') / NEW


def _flaky(record, text):
  """Raises on odd ids, NaN on even ones: both must score 0 and be counted."""
  del text
  if record['id'] % 2:
    raise KeyError('no such thing')
  return float('nan')


def _half_constant(record, text):
  """Every completion of an even-id prompt gets 1 (a zero-variance group)."""
  return 1.0 if record['id'] % 2 == 0 else _spaces(record, text)


def _hashed(record, text):
  """1 or 0, a fixed pseudo-random function of the text (outcomes that vary from answer to answer)."""
  del record
  return float(zlib.crc32(text.encode()) % 2)


rewards_lib.REWARDS.update(hashed=rewards_lib.Reward(_hashed), spaces=rewards_lib.Reward(_spaces),
                           one=rewards_lib.Reward(lambda record, text: 1.0),
                           flaky=rewards_lib.Reward(_flaky, requires=('id',)),
                           half_constant=rewards_lib.Reward(_half_constant, requires=('id',)))


def _metrics(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def _by_step(workdir, key):
  return {r['step']: r[key] for r in _metrics(workdir) if key in r}


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  from pathways_jax.train import loop
  base = tmp_path_factory.mktemp('grpo')
  loop.train(tiny_config(str(base / 'cache'), **{'train.steps': 30, 'sample.prompts': ()}),
             str(base / 'pre'), quiet=True)
  with open(base / 'prompts.jsonl', 'w') as f:
    for i in range(40):
      f.write(json.dumps({'prompt': f'Tell {i}', 'answer': 'x', 'id': i}) + '\n')
  return base


def _cfg(base, **kw):
  return tiny_config(str(base / 'cache'), **{
      'task': 'grpo', 'data.corpus': 'prompts', 'data.path': str(base / 'prompts.jsonl'),
      'data.seq_len': 48, 'data.batch_size': 4, 'train.init_from': str(base / 'pre'),
      'train.steps': 12, 'train.lr': 1e-2, 'train.warmup_steps': 0,
      'rl.num_generations': 8, 'rl.max_new_tokens': NEW, 'rl.rewards': 'spaces',
      'sample.prompts': (), **kw})
