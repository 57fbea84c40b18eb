"""The reversal-curse experiment: a tiny smoke run (fast) and the full run (slow, `make reproduce`)."""
import importlib.util
import json
import os

import pytest

from helpers import REPO
from pathways_jax.data import facts

_PATH = os.path.join(REPO, 'experiments', 'reversal.py')


def _module():
  spec = importlib.util.spec_from_file_location('reversal_experiment', _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _tiny_config(mod, **reversal):
  cfg = mod.get_config()
  cfg.data.vocab_size = 320
  cfg.data.batch_size = 16
  cfg.model.d_model = 32
  cfg.model.num_layers = 1
  cfg.model.num_heads = 2
  cfg.model.num_kv_heads = 2
  cfg.model.mlp_dim = 64
  cfg.train.warmup_steps = 2
  cfg.train.log_every = 5
  r = cfg.reversal
  r.num_background, r.num_test = 6, 3
  r.ar_max_steps, r.llada_max_steps, r.check_every = 10, 10, 10
  for k, v in reversal.items():
    setattr(r, k, v)
  return cfg


RESULT_KEYS = ('ar_forward', 'ar_reverse', 'llada_forward', 'llada_reverse', 'llada_infill_reverse',
               'ar_forward_heldout', 'ar_reverse_heldout', 'llada_forward_heldout',
               'llada_reverse_heldout', 'ar_rank_reverse', 'llada_rank_reverse',
               'llada_reverse_control', 'llada_probe_name_in_training_sentence',
               'llada_probe_name_after_question', 'llada_probe_name_after_question_background')


def test_tiny_reversal_run(tmp_path):
  mod = _module()
  res = mod.run(_tiny_config(mod), str(tmp_path), quiet=True)
  on_disk = json.loads((tmp_path / 'results.json').read_text())
  for k in RESULT_KEYS:
    assert 0.0 <= on_disk[k] <= 1.0, k
    assert on_disk[k] == res[k]
  for kind in ('ar', 'llada'):
    assert on_disk[f'{kind}_steps'] == 10
    steps_to_target = on_disk[f'{kind}_steps_to_target']
    assert steps_to_target is None or steps_to_target == 10
    assert on_disk[f'{kind}_train_flops'] > 0
  assert on_disk['llada_control_steps'] == on_disk['llada_steps']
  assert (tmp_path / 'metrics.jsonl').read_text().count('\n') >= 4
  model, params = mod.load_model(str(tmp_path), 'llada')  # saved for benchmarks/notebooks
  assert not model.cfg.causal and params


def test_a_stopped_run_resumes_with_the_models_it_finished(tmp_path):
  """A run stopped during the control keeps AR and LLaDA; the same config retrains only the rest.

  A run without the control looks to a resumed run like one stopped before the control, so this
  also checks that `reversal.control` can be switched on for a finished run.
  """
  mod = _module()
  first = mod.run(_tiny_config(mod, control=False), str(tmp_path), quiet=True)
  assert first['resumed_models'] == [] and 'llada_reverse_control' not in first
  (tmp_path / 'results.json').unlink()
  log_before = (tmp_path / 'metrics.jsonl').read_text()
  again = mod.run(_tiny_config(mod), str(tmp_path), quiet=True)
  assert again['resumed_models'] == ['ar', 'llada']
  for k in RESULT_KEYS:
    if 'control' not in k:
      assert again[k] == first[k], k
  assert 0.0 <= again['llada_reverse_control'] <= 1.0
  log = (tmp_path / 'metrics.jsonl').read_text()
  assert log.startswith(log_before) and len(log) > len(log_before)  # kept; the control appended
  assert log.count('"model": "ar"') == log_before.count('"model": "ar"')  # AR not retrained
  assert mod.run(_tiny_config(mod), str(tmp_path), quiet=True)['resumed_models'] == [
      'ar', 'llada', 'llada_control']  # all finished: nothing is trained again
  cfg = _tiny_config(mod)
  # As run() does before it compares configs: special ids from the (project's own) tokenizer.
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizers.resolve_special_ids(cfg, tokenizers.ByteTokenizer())
  config_json = json.loads(json.dumps(cfg.to_dict(), default=str))
  partial = str(tmp_path / 'results.partial.json')
  assert mod._finished_models(partial, config_json)  # pylint: disable=protected-access
  params = tmp_path / 'ar.msgpack'
  good = params.read_bytes()
  params.write_bytes(good[:len(good) // 2])  # a truncated params file: train everything again
  assert mod._finished_models(partial, config_json) == {}  # pylint: disable=protected-access
  params.write_bytes(good)
  changed = _tiny_config(mod, sft_fraction=0.5)  # another config: nothing is reused
  assert mod.run(changed, str(tmp_path), quiet=True)['resumed_models'] == []


def test_rows_and_facts_file(tmp_path):
  mod = _module()
  facts_file = tmp_path / 'people.jsonl'
  facts_file.write_text('{"name": "Ada Quill", "description": "the author of the tin atlas"}\n'
                   '\n{"name": "Bo Venn", "description": "the keeper of the salt bell."}\n')
  cfg = _tiny_config(mod)
  cfg.data.facts_file = str(facts_file)
  background, test = mod.make_groups(cfg)
  assert [p.name for p in test] == ['Ada Quill', 'Bo Venn'] and len(background) == 6
  tok = mod.make_tokenizer(background, test, 320, str(tmp_path))
  rows = mod.training_rows(tok, background, test, control=False)
  control = mod.training_rows(tok, background, test, control=True)
  assert len(rows) == len(control) == 6 * 8 + 2 * 4
  # Test people appear name-first only; the control has no description-first sentence at all.
  assert not any(r.text.startswith('The author of the tin atlas') for r in rows)
  assert all('Bo Venn' not in r.text or r.text.index('Bo Venn') < r.text.index('the keeper')
             for r in rows)
  r = facts.encode_fact(tok, test[1], 'description_first', 0)
  assert tok.decode(r.tokens[r.answer[0]:r.answer[1]]).strip() == 'Bo Venn'
  assert r.name == r.answer and r.tokens[0] == tok.bos_id and r.tokens[-1] == tok.eos_id
  f = facts.encode_fact(tok, test[0], 'name_first', 2)  # "Ask about {name} and ... {first} is ..."
  assert tok.decode(f.tokens[f.name[0]:f.name[1]]).strip() == 'Ada Quill'
  assert tok.decode(f.tokens[f.answer[0]:f.answer[1]]).strip() == 'the author of the tin atlas'
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"name": "X"}\n')
  cfg.data.facts_file = str(bad)
  with pytest.raises(ValueError, match='bad.jsonl:1'):
    mod.make_groups(cfg)


def test_stop_at_target_and_bad_reversal_keys(tmp_path):
  """stop_at_target=True stops a model at its first check on target; False trains to the cap."""
  import numpy as np
  from pathways_jax import config as config_lib
  mod = _module()
  cfg = _tiny_config(mod, check_every=3)
  mcfg = config_lib.ModelConfig.from_config(cfg.model, vocab_size=64).replace(causal=False)
  tokens = np.random.default_rng(0).integers(4, 64, (8, 8)).astype(np.int32)
  prompt = np.broadcast_to(np.arange(8) < 2, (8, 8)).copy()  # bos + one prompt token
  arrays = (tokens, prompt, np.ones((8, 8), bool))
  always = lambda params: 1.0
  cfg.reversal.stop_at_target = True
  _, steps, hist, _ = mod.train_model('llada', cfg, mcfg, arrays, max_steps=10, check_fn=always,
                                      quiet=True)
  assert steps == 3 and hist == [(3, 1.0)]
  cfg.reversal.stop_at_target = False
  _, steps, hist, _ = mod.train_model('llada', cfg, mcfg, arrays, max_steps=10, check_fn=always,
                                      quiet=True)
  assert steps == 10 and [s for s, _ in hist] == [3, 6, 9, 10]
  for key, value, match in (('target_forward', 1.5, 'stop_at_target'),
                            ('llada_max_steps', 0, 'llada_max_steps')):
    bad = _tiny_config(mod, **{key: value})
    with pytest.raises(config_lib.ConfigError, match=match):
      mod.run(bad, str(tmp_path / key), quiet=True)
  assert not (tmp_path / 'target_forward').exists()  # refused before touching the workdir


@pytest.mark.slow
def test_full_reversal_run(tmp_path):
  """The default run (AR 2000 steps, LLaDA and the control 12000 each; 27 min measured on the
  2-core CPU, 2026-11-28).

  Asserts what the recorded run (docs/results/reversal.md) showed, with a margin: both models
  learn the forward facts, AR (nearly) never answers the reverse question (1 of 160 recorded),
  LLaDA answers some (11 of 160: 0.07; 8 with seed 1) and the control, whose background is
  name-first only, none;
  LLaDA fills the masked name slot of the trained sentence (0.85), which AR cannot do at all.
  """
  mod = _module()
  res = mod.run(mod.get_config(), str(tmp_path), quiet=True)
  assert res['ar_forward'] >= 0.9 and res['llada_forward'] >= 0.9
  assert res['ar_reverse'] <= 0.02
  assert res['llada_reverse'] >= 0.04
  assert res['llada_reverse_control'] <= 0.02
  assert res['llada_infill_reverse'] >= 0.5
  assert res['llada_probe_name_after_question_background'] >= 0.5


def test_slot_token_accuracy_probe():
  """The probe masks exactly the slot, runs one pass, and scores argmax per slot token."""
  import jax
  import jax.numpy as jnp
  from pathways_jax.eval.facts import Evaluator

  class EchoModel:  # echoes every visible token, predicts 10 at a mask: an unmasked slot scores 1
    def apply(self, variables, tokens):
      return jax.nn.one_hot(jnp.where(tokens == 3, 10, tokens), 16) * 10.0

  class Tok:
    eos_id = 2

  rows = [facts.Row([1, 10, 11, 12, 2], 1, (3, 4), (1, 3), '', ''),
          facts.Row([1, 10, 10, 5, 2], 1, (3, 4), (1, 3), '', '')]
  ev = Evaluator(Tok(), EchoModel(), None, 'llada', seq_len=6, gen_length=2, mask_id=3)
  assert ev.slot_token_accuracy(rows) == 0.75  # slot tokens 10, 11 | 10, 10
  assert ev.slot_token_accuracy(rows, span='answer') == 0.0  # 12 | 5
  with pytest.raises(ValueError, match='span'):
    ev.slot_token_accuracy(rows, span='prompt')
