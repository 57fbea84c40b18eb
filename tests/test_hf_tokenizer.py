"""Tokenizers with their own special ids: a HuggingFace tokenizer.json built here (specials at the
end of the vocabulary, not 0-3), its chat template, and training with it end to end."""
import json

import numpy as np
import pytest

from helpers import tiny_config
from pathways_jax import config as config_lib
from pathways_jax.data import hf_tokenizer, pipeline, tokenizers
from pathways_jax.data import synthetic
from pathways_jax.train import loop

# ChatML, as Qwen's tokenizer_config.json spells it.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ['<s>', '</s>', '<pad>', '<|mask|>', '<|im_start|>', '<|im_end|>']


def build_tokenizer(directory, *, mask=True, texts=None):
  """A byte-level BPE trained on the synthetic world, its specials added after the vocabulary."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  cfg = tiny_config('/unused')
  texts = texts or synthetic.all_documents(cfg.data.synthetic, 0)
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  specials = SPECIALS if mask else [s for s in SPECIALS if s != '<|mask|>']
  tok.add_special_tokens(specials)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / 'tokenizer.json'))
  config = {'bos_token': '<s>', 'eos_token': {'content': '</s>'}, 'pad_token': '<pad>',
            'chat_template': CHATML}
  if mask:
    config['mask_token'] = '<|mask|>'
  (directory / 'tokenizer_config.json').write_text(json.dumps(config))
  return directory


def test_special_ids_come_from_the_tokenizer(tmp_path):
  tok = hf_tokenizer.HFTokenizer.from_path(build_tokenizer(tmp_path / 'tok'))
  base = tok.vocab_size - len(SPECIALS)
  assert base > 250 and (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (
      base, base + 1, base + 2, base + 3)
  assert tok.end_of_turn_id == tok.specials['<|im_end|>'] == base + 5
  assert tok.special_ids == frozenset(range(base, base + 6))
  text = 'Ada Lovelace was born in 1815.\n  x = [1, 2]'
  ids = tok.encode(text)
  assert tok.decode(ids) == text and not set(ids) & tok.special_ids
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
  # The config's ids are filled in from the tokenizer; a conflicting one is named.
  cfg = tiny_config('/unused', **{'data.tokenizer': 'hf', 'data.tokenizer_path': str(tmp_path / 'tok')})
  tokenizers.resolve_special_ids(cfg, tok)
  assert (cfg.data.pad_id, cfg.data.bos_id, cfg.data.eos_id, cfg.data.mask_id) == (
      base + 2, base, base + 1, base + 3)
  cfg.data.mask_id = 3
  with pytest.raises(config_lib.ConfigError, match=rf'mask_id=3 but the tokenizer .* has mask id '
                                                   rf'{base + 3}'):
    tokenizers.resolve_special_ids(cfg, tok)
  # The project's own tokenizers keep 0-3.
  cfg = tiny_config('/unused')
  tokenizers.resolve_special_ids(cfg, tokenizers.ByteTokenizer())
  assert (cfg.data.pad_id, cfg.data.bos_id, cfg.data.eos_id, cfg.data.mask_id) == (0, 1, 2, 3)


def test_the_chat_template_renders_as_transformers_renders_it(tmp_path):
  tok = hf_tokenizer.HFTokenizer.from_path(build_tokenizer(tmp_path / 'tok'))
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  text = tok.render_chat(messages, add_generation_prompt=True)
  assert text == ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
                  '<|im_start|>assistant\n')
  ids = tok.encode(text)
  assert ids.count(tok.specials['<|im_start|>']) == 3 and ids.count(tok.end_of_turn_id) == 2
  bad = hf_tokenizer.HFTokenizer(tok._tok.to_str(), {'chat_template': "{{ raise_exception('no') }}"})  # pylint: disable=protected-access
  with pytest.raises(Exception, match='no'):
    bad.render_chat(messages)
  with pytest.raises(config_lib.ConfigError, match='no chat_template'):
    hf_tokenizer.HFTokenizer(tok._tok.to_str(), {}).render_chat(messages)  # pylint: disable=protected-access


def test_noise_never_draws_a_special_id_inside_the_vocabulary():
  class Tok:  # specials scattered through the ids, as in real HF vocabularies
    vocab_size, special_ids = 50, frozenset({0, 1, 7, 20, 49})
  low, high, exclude = tokenizers.ordinary_id_range(Tok())
  assert (low, high, exclude) == (2, 50, frozenset({7, 20, 49}))
  tokens = np.full(4000, 5, np.int32)
  out, noise = pipeline.inject_noise(tokens, np.array([4000]), fraction=0.5, span_min=4,
                                     span_max=8, seed=0, low=low, high=high, exclude=exclude)
  drawn = set(out[noise].tolist())
  assert noise.mean() > 0.3 and not drawn & Tok.special_ids and len(drawn) > 40
  own = tokenizers.ordinary_id_range(tokenizers.ByteTokenizer())
  assert own == (4, 260, frozenset())  # the project's own tokenizers: the draws of before


@pytest.mark.parametrize('objective', ['autoregressive', 'diffusion'])
def test_training_with_a_hf_tokenizer(tmp_path, objective):
  path = build_tokenizer(tmp_path / 'tok')
  over = {'data.tokenizer': 'hf', 'data.tokenizer_path': str(path), 'train.steps': 3,
          'objective': objective, 'model.causal': objective == 'autoregressive'}
  res = loop.train(tiny_config(str(tmp_path / 'cache'), **over), str(tmp_path / 'run'), quiet=True)
  assert res['status'] == 'completed' and np.isfinite(res['val_loss'])
  tok = hf_tokenizer.HFTokenizer.from_path(path)
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['data']['mask_id'] == tok.mask_id and saved['data']['eos_id'] == tok.eos_id
  assert res['config']['model']['vocab_size'] == 0  # from the tokenizer, rounded up
  assert all(isinstance(s, str) for s in res['samples'])


def test_a_tokenizer_without_the_specials_a_task_needs_is_named(tmp_path):
  path = build_tokenizer(tmp_path / 'tok', mask=False)
  over = {'data.tokenizer': 'hf', 'data.tokenizer_path': str(path), 'objective': 'diffusion',
          'model.causal': False}
  with pytest.raises(config_lib.ConfigError, match=r"task 'diffusion' needs the special token\(s\) "
                                                   r"\['mask'\]"):
    loop.train(tiny_config(str(tmp_path / 'cache'), **over), str(tmp_path / 'run'), quiet=True)
  with pytest.raises(ValueError, match="needs config.data.tokenizer_path"):
    tokenizers.get_tokenizer(tiny_config('/unused', **{'data.tokenizer': 'hf'}).data)
