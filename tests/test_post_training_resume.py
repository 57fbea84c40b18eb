"""Resume is exact for SFT and LoRA runs (clean stop and SIGTERM), as tests/test_train.py shows
for pretraining: the data iterator's state over chat rows, the frozen base of a LoRA run and the
LoRA dropout rng (drawn by step) all come back."""
import json

import pytest

from helpers import assert_resume_is_exact, tiny_config


@pytest.fixture(scope='module')
def chat_data(tmp_path_factory):
  path = tmp_path_factory.mktemp('chat') / 'train.jsonl'
  people = [('Ada', 'a painter'), ('Bo', 'a baker'), ('Cy', 'a pilot'), ('Di', 'a poet')]
  with open(path, 'w') as f:
    for i in range(120):
      name, job = people[i % 4]
      f.write(json.dumps({'messages': [{'role': 'user', 'content': f'Who is {name}? #{i}'},
                                       {'role': 'assistant', 'content': f'{name} is {job}.'}]})
              + '\n')
  return str(path)


def _sft(cache, chat_data, **overrides):
  return tiny_config(cache, **{'task': 'sft', 'data.corpus': 'chat', 'data.path': chat_data,
                               'data.seq_len': 64, 'train.steps': 8, 'sample.prompts': (),
                               **overrides})


def test_sft_resume_is_exact(tmp_path, chat_data):
  cache = str(tmp_path / 'cache')
  assert_resume_is_exact(lambda **o: _sft(cache, chat_data, **o), tmp_path)


def test_lora_resume_is_exact(tmp_path, chat_data):
  """A LoRA SFT run (adapters trained, base frozen and stored once) from a pretrained run, with
  LoRA dropout on."""
  from pathways_jax.train import loop
  cache = str(tmp_path / 'cache')
  loop.train(tiny_config(cache, **{'train.steps': 2, 'sample.prompts': ()}),
             str(tmp_path / 'pre'), quiet=True)
  lora = {'train.init_from': str(tmp_path / 'pre'), 'model.lora_rank': 4,
          'model.lora_dropout': 0.1, 'train.lr': 1e-2}
  assert_resume_is_exact(lambda **o: _sft(cache, chat_data, **lora, **o), tmp_path)
  assert (tmp_path / 'part' / 'frozen_params').exists()  # the base is frozen, stored once
