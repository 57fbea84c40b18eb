"""The embedded instruction set (data.instructions), its evaluation (eval.instructions) and the
instruction-SFT experiment end to end on tiny settings."""
import collections
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_answers_as_alone, cli, experiment_module, tiny_config
from pathways_jax import config as config_lib
from pathways_jax import tasks
from pathways_jax.data import chat, sft, synthetic, tokenizers
from pathways_jax.data import instructions as I
from pathways_jax.data.corpora import DataError
from pathways_jax.eval import instructions as instr_eval


@pytest.fixture(scope='module')
def world():
  return synthetic.make_world(0, 200)


@pytest.fixture(scope='module')
def examples(world):
  return I.make_examples(world, num_arithmetic=300)


def _one(examples, kind, fmt, split='heldout'):
  return next(e for e in examples[split] if e.kind == kind and e.format == fmt)


def test_the_generator_is_deterministic_and_follows_the_world(world, examples):
  again = I.make_examples(synthetic.make_world(0, 200), num_arithmetic=300)
  assert again == examples
  other = I.make_examples(synthetic.make_world(1, 200), num_arithmetic=300)
  assert other['train'] != examples['train']
  cfg = config_lib.base_config()
  cfg.data.synthetic.num_people = 200
  assert I.from_config(cfg.data, num_arithmetic=300) == examples  # data.synthetic's world
  # Every kind and format is on both sides; every expected answer passes its own checker.
  for split in I.SPLITS:
    assert {e.kind for e in examples[split]} == set(I.KINDS)
    assert {e.format for e in examples[split]} == set(I.FORMATS)
    for e in examples[split]:
      assert I.check(e, e.answer) == {'format_ok': True, 'correct': True}, e
  p = world.people[0]
  birth = [e for s in I.SPLITS for e in examples[s] if e.kind == 'birth_year' and
           e.subject == p.name]
  assert birth and all(e.accepted == (str(p.birth_year),) for e in birth)


@pytest.mark.parametrize('split_by', I.SPLIT_BY)
def test_no_heldout_question_appears_in_training(world, examples, split_by):
  ex = examples if split_by == 'question' else I.make_examples(world, num_arithmetic=300,
                                                                split_by='subject')
  train, heldout = ex['train'], ex['heldout']
  assert not {e.question for e in train} & {e.question for e in heldout}
  assert not {e.prompt for e in train} & {e.prompt for e in heldout}
  trained_facts = {e.key for e in train}
  if split_by == 'subject':  # not even the fact is asked in training
    assert not trained_facts & {e.key for e in heldout}
  else:  # most held-out questions ask a trained fact in other words
    assert 0.5 < np.mean([e.key in trained_facts for e in heldout]) < 1
  assert not any(e.heldout_template for e in train)  # the last template is only asked held out
  assert any(e.heldout_template for e in heldout)
  assert len({e.question for e in heldout}) == len(heldout)  # each held-out question once
  counts = collections.Counter(e.question for e in train)
  assert set(counts.values()) == {2}  # `variants` formats per trained question
  units = len(heldout) + len(counts) * 3 / 2  # the untrained last template is asked only held out
  assert 0.1 < len(heldout) / units < 0.3


def test_the_checker_on_hand_written_outputs(examples):
  year = dataclasses.replace(_one(examples, 'birth_year', 'prefix'), accepted=('1925',),
                             answer='Answer: 1925')
  assert I.check(year, 'Answer: 1925') == {'format_ok': True, 'correct': True}
  assert I.check(year, ' Answer: 1925\n') == {'format_ok': True, 'correct': True}
  assert I.check(year, 'Answer: 1926') == {'format_ok': True, 'correct': False}
  assert I.check(year, '1925') == {'format_ok': False, 'correct': True}
  assert I.check(year, 'Answer: 1925.') == {'format_ok': False, 'correct': True}
  assert I.check(year, 'Answer: 1925\nAnswer: 1925') == {'format_ok': False, 'correct': False}
  assert I.check(year, 'answer: nineteen') == {'format_ok': False, 'correct': False}
  job = dataclasses.replace(_one(examples, 'occupation', 'upper'), accepted=('potter',))
  assert I.check(job, 'POTTER') == {'format_ok': True, 'correct': True}
  assert I.check(job, 'potter') == {'format_ok': False, 'correct': True}
  assert I.check(job, 'BAKER') == {'format_ok': True, 'correct': False}
  assert I.check(job, 'THE POTTER OF TOWN') == {'format_ok': True, 'correct': False}
  assert I.check(job, 'POTTER.') == {'format_ok': False, 'correct': True}
  assert I.check(job, 'POTTER, OF COURSE') == {'format_ok': False, 'correct': False}
  num = dataclasses.replace(_one(examples, 'arithmetic', 'json'), accepted=('44',))
  assert I.check(num, '{"answer": 44}') == {'format_ok': True, 'correct': True}
  assert I.check(num, '{"answer": "44"}') == {'format_ok': True, 'correct': True}
  assert I.check(num, '{"answer": 04}') == {'format_ok': False, 'correct': False}  # not JSON
  assert I.check(num, '{"answer": 44, "why": 1}') == {'format_ok': False, 'correct': True}
  assert I.check(num, '{"answer": 45}') == {'format_ok': True, 'correct': False}
  assert I.check(num, '[44]') == {'format_ok': False, 'correct': True}
  friend = dataclasses.replace(_one(examples, 'friend', 'brackets'),
                               accepted=('Vel Thuston', 'Chil Shoudroum'))
  for out in ('[Vel Thuston]', '[Chil Shoudroum]'):  # any friend is right
    assert I.check(friend, out) == {'format_ok': True, 'correct': True}
  assert I.check(friend, '[Ada Lovelace]') == {'format_ok': True, 'correct': False}
  assert I.check(friend, '[vel thuston]') == {'format_ok': True, 'correct': True}
  assert I.check(friend, '[1950]') == {'format_ok': True, 'correct': False}
  assert I.check(friend, '[Vel Thuston]]') == {'format_ok': False, 'correct': False}
  assert I.check(friend, 'rrrrrrrrrrrrrrrrrrrrrrrrrrrrr') == {'format_ok': False, 'correct': False}
  bare = dataclasses.replace(_one(examples, 'description', 'bare'),
                             accepted=('the keeper of the amber lighthouse',))
  assert I.check(bare, 'the keeper of the amber lighthouse') == {'format_ok': True,
                                                                  'correct': True}
  assert I.check(bare, 'The keeper of the amber lighthouse.') == {'format_ok': False,
                                                                   'correct': True}


def test_bad_input_is_named(examples, tmp_path):
  with pytest.raises(ValueError, match='format'):
    I.format_ok('arithmetic', 'upper', '12')  # numbers are never asked in upper case
  with pytest.raises(ValueError, match='unknown question kind'):
    I.formats_for('weather')
  with pytest.raises(ValueError, match='split_by'):
    I.make_examples(synthetic.make_world(0, 5), split_by='person')
  with pytest.raises(ValueError, match='heldout_fraction'):
    I.make_examples(synthetic.make_world(0, 5), heldout_fraction=1.0)
  with pytest.raises(DataError, match='no examples'):
    I.write_jsonl([], str(tmp_path / 'x.jsonl'))
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps(I.to_record(examples['heldout'][0])) + '\n{"prompt": 1}\n')
  with pytest.raises(DataError, match=r'bad.jsonl:2'):
    I.read_jsonl(str(bad))
  with pytest.raises(ValueError, match='same'):
    instr_eval.score([], [])
  # The command line: one line on stderr, no traceback, nothing written.
  out = cli('pathways_jax.data.instructions', f'--out={tmp_path / "cli"}', '--num_people=0')
  assert out.returncode == 1 and out.stderr.strip() == 'error: num_people must be in [1, 2048], got 0'
  assert not (tmp_path / 'cli').exists()


def test_the_train_file_is_chat_data_trained_on_the_answers_only(examples, tmp_path):
  """The written JSONL is what data.corpus='chat' reads; the trained tokens are exactly each
  answer and its eos; the evaluation prompt is the training rendering up to the answer; and the
  `sft` loss has zero gradient at every position that predicts a prompt token."""
  paths = I.write_splits(examples, str(tmp_path))
  assert I.read_jsonl(paths['heldout']) == examples['heldout']
  tok = tokenizers.ByteTokenizer()
  for e in examples['train'][:50]:
    ids, mask = chat.render(tok, I.to_record(e)['messages'])
    assert tok.decode(ids[mask == 1][:-1]) == e.answer and ids[mask == 1][-1] == tok.eos_id
    prompt = instr_eval.prompt_tokens(tok, e)
    np.testing.assert_array_equal(ids[:len(prompt)], prompt)
    assert not mask[:len(prompt)].any() and mask[len(prompt):].all()
  cfg = config_lib.base_config()
  cfg.task = 'sft'
  cfg.data.corpus, cfg.data.path, cfg.data.seq_len = 'chat', paths['train'], 192
  fields, stats = sft.load_rows(cfg.data, tok, 'train')
  assert stats['dropped'] == 0 and stats['truncated'] == 0
  assert stats['conversations'] > 0.95 * len(examples['train'])

  class ParamsAreLogits:  # the loss's gradient with respect to the logits themselves
    cfg = config_lib.ModelConfig(vocab_size=264)

    def apply(self, variables, tokens, **kw):
      return variables['params']

  task = tasks.make(cfg, ParamsAreLogits())
  batch = {k: jnp.asarray(v[:4]) for k, v in fields.items()}
  grad = jax.grad(lambda lg: task.loss(lg, batch, jax.random.key(0))[0])(
      jnp.zeros((4, 192, 264)))
  g = np.abs(np.asarray(grad)).sum(-1)[:, :-1]  # position i predicts token i + 1
  seg, m = fields['segment_ids'][:4], fields['loss_mask'][:4]
  trained = (m[:, 1:] == 1) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  assert trained.sum() > 0 and (g[trained] > 0).all()
  assert (g[~trained] == 0).all()  # prompt targets (and padding) never reach the loss


def test_the_experiment_end_to_end_on_tiny_settings(tmp_path):
  """Base pretraining, SFT and LoRA on the written train split through the trainer (init_from
  the base), and the held-out evaluation of all three: numbers in [0, 1] and a complete results.json."""
  module = experiment_module('instruction_sft')
  cfg = tiny_config(str(tmp_path / 'cache'), **{
      'data.seq_len': 192, 'model.max_len': 192, 'train.steps': 3, 'train.log_every': 1,
      'model.attention': 'xla', 'sample.prompts': ()})
  cfg.instructions = module.get_config().instructions
  cfg.instructions.sft_steps = 3
  cfg.instructions.sft_warmup_steps = 1
  cfg.instructions.num_arithmetic = 20
  cfg.instructions.eval_limit = 12
  cfg.instructions.eval_batch = 8
  res = module.run(cfg, str(tmp_path / 'run'))
  saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
  sft_cfg = json.loads((tmp_path / 'run' / 'sft' / 'config.json').read_text())
  assert sft_cfg['task'] == 'sft' and sft_cfg['data']['corpus'] == 'chat'
  assert sft_cfg['train']['init_from'] == str(tmp_path / 'run' / 'base')
  lora_cfg = json.loads((tmp_path / 'run' / 'lora' / 'config.json').read_text())
  assert lora_cfg['model']['lora_rank'] == 8 and lora_cfg['train']['init_from'] == sft_cfg[
      'train']['init_from']
  # The adapters train, and beside them the embedding and the norm scales
  # (instructions.lora_also_train): the LoRA model is the base's parameters plus the adapters.
  assert lora_cfg['train']['trainable'] == r'.*_lora_[ab]|embed|.*scale'
  m = lora_cfg['model']
  embed = 264 * m['d_model']  # the byte tokenizer's vocabulary x d_model
  norms = (2 * m['num_layers'] + 1) * m['d_model']  # two per block and the final one
  adapters = saved['lora_params'] - saved['sft_params']
  assert adapters > 0 and saved['lora_trainable_params'] == adapters + embed + norms
  assert saved['sft_trainable_params'] == saved['sft_params']
  for name in ('base', 'sft', 'lora'):
    r = saved[name]
    assert r['n'] == 12 and 0 <= r['format_compliance'] <= 1 and 0 <= r['accuracy'] <= 1
    assert r['format_ok_count'] == round(12 * r['format_compliance'])
    assert len(r['samples']) == 8 and sum(g['n'] for k, g in r['groups'].items()
                                          if k.startswith('kind/')) == 12
  assert res['sft']['accuracy'] == saved['sft']['accuracy']
  assert saved['examples']['heldout'] > 12 and saved['date']
  # Prompts of different lengths share a left-padded batch: each is answered as it is alone.
  from pathways_jax.sample import load_run
  _, model, params, tok = load_run(str(tmp_path / 'run' / 'sft'))
  heldout = I.read_jsonl(str(tmp_path / 'run' / 'instructions' / 'heldout.jsonl'))[:5]
  assert_answers_as_alone(model, params, tok, heldout, max_new_tokens=6)


def test_held_out_arithmetic_is_grouped_by_whether_the_corpus_works_the_problem_out():
  """`synthetic.arithmetic_problems` is what a model pretrained on the split read, and `score`
  splits the arithmetic questions by it (the other kinds get no such group)."""
  cfg = config_lib.base_config().data.synthetic
  cfg.num_people, cfg.num_stories, cfg.num_arithmetic = 4, 2, 300
  read = synthetic.arithmetic_problems(cfg, 0, 'train')
  train_lines = set('\n'.join(synthetic.documents(cfg, 0, 'train')).split('\n'))
  assert read and all(f'{p} = {eval(p)}' in train_lines for p in read)  # pylint: disable=eval-used
  unread = synthetic.arithmetic_problems(cfg, 0, 'validation') - read
  assert unread and not any(line.startswith(f'{p} = ') for p in unread for line in train_lines)
  a, b = sorted(read)[0], sorted(unread)[0]
  make = lambda subject, kind='arithmetic': I.Example(
      kind=kind, subject=subject, template=0, format='bare', question='q', prompt='q',
      answer=str(eval(subject)) if kind == 'arithmetic' else 'x',  # pylint: disable=eval-used
      accepted=(str(eval(subject)),) if kind == 'arithmetic' else ('x',))  # pylint: disable=eval-used
  exs = [make(a), make(b), make(b), make('Ann Bo', 'first_name')]
  outs = [{'text': e.answer, 'finished': True} for e in exs[:2]] + [
      {'text': '-1', 'finished': True}, {'text': 'x', 'finished': True}]
  groups = instr_eval.score(exs, outs, corpus_problems=read)['groups']
  assert groups['problem/in_corpus'] == {'n': 1, 'format_ok': 1.0, 'correct': 1.0, 'strict': 1.0,
                                         'finished': 1.0}
  assert (groups['problem/not_in_corpus']['n'], groups['problem/not_in_corpus']['correct']) == (2, 0.5)
  assert 'problem/in_corpus' not in instr_eval.score(exs, outs)['groups']
