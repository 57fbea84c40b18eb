"""Supervised fine-tuning: conversations -> ids + loss masks, SFT rows, and the `sft` task."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from numerics import assert_close
from pathways_jax import config as config_lib
from pathways_jax import tasks
from pathways_jax.data import chat, sft, tokenizers
from pathways_jax.data.corpora import DataError

CONV = [{'role': 'system', 'content': 'Be brief.'},
        {'role': 'user', 'content': 'Who is Ada?'},
        {'role': 'assistant', 'content': 'A painter.'},
        {'role': 'user', 'content': 'Where?'},
        {'role': 'assistant', 'content': 'In Oslo.'}]


def test_the_built_in_template_trains_assistant_content_and_its_eos():
  tok = tokenizers.ByteTokenizer()
  ids, mask = chat.render(tok, CONV)
  enc = lambda s: list(tok.encode(s))
  want = ([tok.bos_id] + enc('<system>\nBe brief.\n') + enc('<user>\nWho is Ada?\n') +
          enc('<assistant>\n') + enc('A painter.') + [tok.eos_id] + enc('<user>\nWhere?\n') +
          enc('<assistant>\n') + enc('In Oslo.') + [tok.eos_id])
  assert ids.tolist() == want
  trained = [i for i, m in zip(ids.tolist(), mask.tolist()) if m]
  assert trained == enc('A painter.') + [tok.eos_id] + enc('In Oslo.') + [tok.eos_id]
  assert chat.render(tok, CONV, train_on='all')[1].all()
  prompt = chat.prompt_ids(tok, CONV[:2])
  assert prompt.tolist() == want[:len(prompt)]  # what generation is given: up to "<assistant>\n"


def test_raw_text_examples_train_the_completion_after_the_text_untemplated(tmp_path):
  """{"text", "completion"}: bos + the text's tokens, untrained, then the completion's, trained,
  with no template and no eos; through read_jsonl and build_rows beside a conversation."""
  tok = tokenizers.ByteTokenizer()
  enc = lambda s: list(tok.encode(s))
  raw = chat.from_record({'text': 'def f(x):\n    return', 'completion': ' x'})
  assert raw == chat.RawText('def f(x):\n    return', ' x')
  ids, mask = chat.render(tok, raw)
  assert ids.tolist() == [tok.bos_id] + enc('def f(x):\n    return') + enc(' x')
  assert mask.tolist() == [0] * (1 + len(enc('def f(x):\n    return'))) + [1, 1]
  assert chat.render(tok, raw, train_on='all')[1].all()
  path = tmp_path / 'mixed.jsonl'
  path.write_text(json.dumps({'text': 'ab', 'completion': 'c'}) + '\n' +
                  json.dumps({'prompt': 'q', 'completion': 'a'}) + '\n')
  (_, first), (_, second) = sft.read_jsonl(str(path))
  assert first == chat.RawText('ab', 'c') and second[1] == {'role': 'assistant', 'content': 'a'}
  fields, stats = sft.build_rows(sft.encode(tok, [first, second]), 32, pad_id=tok.pad_id,
                                 eos_id=tok.eos_id)
  assert stats['trained_tokens'] == 1 + len(enc('a')) + 1  # 'c'; the answer and its eos
  row = fields['tokens'][0]
  assert row[:4].tolist() == [tok.bos_id] + enc('abc') and fields['loss_mask'][0, :4].tolist() == [
      0, 0, 0, 1]
  assert chat.from_record({'text': 'ab', 'completion': '\n'}) == chat.RawText('ab', '\n')
  for record, match in (({'text': 'ab', 'completion': ''}, 'raw-text example'),
                        ({'text': 3, 'completion': 'x'}, 'raw-text example'),
                        ({'text': 'ab'}, 'raw-text example')):
    with pytest.raises(DataError, match=match):
      chat.from_record(record, 'f.jsonl:1')


def _chatml_tokenizer(template=None):
  import tokenizers as hf_tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from pathways_jax.data import hf_tokenizer
  tok = hf_tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=['<|endoftext|>', '<|im_start|>',
                                                                '<|im_end|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([m['content'] for m in CONV] * 5, trainer)
  template = template or (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  return hf_tokenizer.HFTokenizer(tok.to_str(), {'eos_token': '<|im_end|>',
                                                 'pad_token': '<|endoftext|>',
                                                 'chat_template': template})


def test_a_hf_chat_template_trains_each_assistant_turn_and_its_end_of_turn():
  tok = _chatml_tokenizer()
  ids, mask = chat.render(tok, CONV)
  assert tok.decode(ids) == tok.render_chat(CONV).replace('<|im_start|>', '').replace(
      '<|im_end|>', '')  # the specials are dropped by decode
  spans, current = [], []
  for i, m in zip(ids.tolist(), mask.tolist()):
    if m:
      current.append(i)
    elif current:
      spans.append(current)
      current = []
  spans.append(current) if current else None
  im_end = tok.specials['<|im_end|>']
  assert [tok.decode(s) for s in spans] == ['A painter.\n', 'In Oslo.\n']
  assert all(im_end in s for s in spans) and mask.sum() < len(ids) / 2


def test_bad_conversations_and_templates_are_named():
  tok = tokenizers.ByteTokenizer()
  cases = [([{'role': 'bot', 'content': 'x'}], "role 'bot'"),
           ([{'role': 'user', 'content': 'x'}], 'no assistant turn'),
           ([{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': ' '}],
            'empty assistant turn'),
           ([], 'non-empty list')]
  for messages, match in cases:
    with pytest.raises(DataError, match=match):
      chat.render(tok, messages)
  dropping = _chatml_tokenizer(
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
      "{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  with pytest.raises(DataError, match='drops the assistant content'):
    chat.render(dropping, CONV)


def test_rows_pack_conversations_apart_and_count_truncation():
  ex = [(np.arange(1, 6, dtype=np.int32), np.array([0, 0, 1, 1, 1], np.int32)),
        (np.arange(10, 13, dtype=np.int32), np.array([0, 1, 1], np.int32)),
        (np.arange(20, 30, dtype=np.int32), np.array([0] * 8 + [1, 1], np.int32)),  # cut: no answer
        (np.arange(40, 50, dtype=np.int32), np.array([0, 1] + [1] * 8, np.int32))]  # cut, kept
  fields, stats = sft.build_rows(ex, 8, pad_id=0, eos_id=2)
  assert stats == {'conversations': 4, 'rows': 2, 'truncated': 1, 'dropped': 1,
                   'trained_tokens': 12, 'fill': 1.0}
  assert fields['tokens'][0].tolist() == [1, 2, 3, 4, 5, 10, 11, 12]
  assert fields['segment_ids'][0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
  assert fields['positions'][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
  assert fields['loss_mask'][0].tolist() == [0, 0, 1, 1, 1, 0, 1, 1]
  assert fields['prompt'][0].tolist() == [1, 1, 0, 0, 0, 1, 0, 0]
  assert fields['tokens'][1].tolist() == list(range(40, 48))
  assert sft.build_rows(ex, 8, pad_id=0, eos_id=2, truncation='drop')[1]['dropped'] == 2
  # One conversation per row, eos-padded and trained (LLaDA's SFT format).
  fields, stats = sft.build_rows(ex[:2], 8, pad_id=0, eos_id=2, pack=False, eos_padding=True)
  assert fields['tokens'][1].tolist() == [10, 11, 12, 2, 2, 2, 2, 2]
  assert fields['segment_ids'][1].tolist() == [1] * 8
  assert fields['loss_mask'][1].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
  assert fields['prompt'][1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
  padded, _ = sft.build_rows(ex[:2], 8, pad_id=0, eos_id=2, pack=False)
  assert padded['segment_ids'][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


class _FixedLogits:
  def __init__(self, logits):
    self.logits = logits
    self.cfg = config_lib.ModelConfig(vocab_size=logits.shape[-1])

  def apply(self, variables, tokens, **kw):
    return self.logits


def test_the_sft_loss_counts_only_trained_targets():
  rng = np.random.default_rng(0)
  fields, _ = sft.build_rows(
      [(rng.integers(4, 30, 6).astype(np.int32), np.array([0, 0, 0, 1, 1, 1], np.int32)),
       (rng.integers(4, 30, 5).astype(np.int32), np.array([0, 0, 1, 1, 1], np.int32))],
      12, pad_id=0, eos_id=2)
  logits = rng.normal(size=(1, 12, 32)).astype(np.float32)
  cfg = config_lib.base_config()
  cfg.task = 'sft'
  task = tasks.make(cfg, _FixedLogits(jnp.asarray(logits)))
  batch = {k: jnp.asarray(v) for k, v in fields.items()}
  loss, metrics = task.loss(None, batch, jax.random.key(0))
  lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  t, m, seg = fields['tokens'][0], fields['loss_mask'][0], fields['segment_ids'][0]
  terms = [-lp[0, i, t[i + 1]] for i in range(11) if m[i + 1] and seg[i + 1] == seg[i] > 0]
  assert len(terms) == 6 and float(metrics[tasks.COUNT]) == 6
  assert_close(loss, np.mean(terms), terms=32)
  # Other prompt tokens (untrained targets) leave the loss as it was; another answer token not.
  changed = dict(batch, tokens=jnp.where(batch['loss_mask'] == 0, 7, batch['tokens']))
  assert float(task.loss(None, changed, jax.random.key(0))[0]) == float(loss)
  answer = int(np.argmax(fields['loss_mask'][0]))
  flipped = dict(batch, tokens=batch['tokens'].at[0, answer].set(8 if t[answer] != 8 else 9))
  assert float(task.loss(None, flipped, jax.random.key(0))[0]) != float(loss)


@pytest.mark.parametrize('task_name', ['sft', 'llada_sft'])
def test_chat_data_trains_through_the_trainer(tmp_path, task_name):
  from pathways_jax.train import loop
  path = tmp_path / 'train.jsonl'
  people = [('Ada', 'a painter'), ('Bo', 'a baker'), ('Cy', 'a pilot'), ('Di', 'a poet')]
  with open(path, 'w') as f:
    for i in range(200):
      name, job = people[i % 4]
      record = ({'messages': [{'role': 'user', 'content': f'Who is {name}? #{i}'},
                              {'role': 'assistant', 'content': f'{name} is {job}.'}]}
                if i % 3 == 1 else
                {'prompt': f'Who is {name}? #{i}', 'completion': f'{name} is {job}.'} if i % 3
                else {'text': f'Who is {name}? #{i} ', 'completion': f'{name} is {job}.'})
      f.write(json.dumps(record) + '\n')
  llada = task_name == 'llada_sft'
  cfg = tiny_config(str(tmp_path / 'cache'), **{
      'task': task_name, 'objective': 'diffusion' if llada else 'autoregressive',
      'model.causal': not llada, 'data.corpus': 'chat', 'data.path': str(path),
      'data.seq_len': 64, 'data.batch_size': 8, 'data.chat.pack': not llada,
      'data.chat.eos_padding': llada, 'train.steps': 40, 'train.lr': 1e-2, 'train.log_every': 10,
      'sample.prompts': ()})
  res = loop.train(cfg, str(tmp_path / 'run'), quiet=True)
  log = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  losses = [x['loss'] for x in log if 'loss' in x]
  assert res['status'] == 'completed' and losses[-1] < 0.6 * losses[0], losses
  assert 'val_loss' in res  # 2% of the conversations, by hash


def test_init_from_a_run_brings_its_model_and_tokenizer(tmp_path):
  """SFT from a pretrained run: its architecture and (trained, cached) tokenizer come along."""
  from pathways_jax.train import loop
  cache = str(tmp_path / 'cache')
  pre = tiny_config(cache, **{'data.tokenizer': 'sentencepiece', 'data.vocab_size': 320,
                              'train.steps': 2, 'model.num_layers': 1, 'sample.prompts': ()})
  loop.train(pre, str(tmp_path / 'pre'), quiet=True)
  path = tmp_path / 'train.jsonl'
  path.write_text('\n'.join(json.dumps({'prompt': f'Who is {n}?', 'completion': f'{n} is here.'})
                            for n in ('Ada', 'Bo', 'Cy', 'Di') * 20) + '\n')
  ft = tiny_config(cache, **{'task': 'sft', 'data.corpus': 'chat', 'data.path': str(path),
                             'data.tokenizer': 'sentencepiece', 'train.steps': 2,
                             'train.init_from': str(tmp_path / 'pre'), 'sample.prompts': ()})
  assert ft.model.num_layers == 2  # the config's own; the run takes the source's
  res = loop.train(ft, str(tmp_path / 'ft'), quiet=True)
  saved = json.loads((tmp_path / 'ft' / 'config.json').read_text())
  assert saved['model']['num_layers'] == 1 and res['status'] == 'completed'
  assert saved['data']['tokenizer_path'].endswith('.model')
