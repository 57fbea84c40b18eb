"""The reversal-curse experiment: a tiny smoke run (fast) and the full run (slow, `make reproduce`)."""
import json
import os

import jax
import pytest

from helpers import REPO, experiment_module
from pathways_jax import config as config_lib
from pathways_jax.data import facts


def _module():
  return experiment_module('reversal')


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
  cfg.train.checkpoint_every = 5
  r = cfg.reversal
  r.num_background, r.num_test = 6, 3
  r.ar_max_steps, r.llada_max_steps, r.check_every = 10, 10, 10
  for k, v in reversal.items():
    setattr(r, k, v)
  cfg.lock()  # as the CLI hands it to run()
  return cfg


RESULT_KEYS = ('ar_forward', 'ar_reverse', 'llada_forward', 'llada_reverse', 'llada_infill_reverse',
               'ar_forward_heldout', 'ar_reverse_heldout', 'llada_forward_heldout',
               'llada_reverse_heldout', 'ar_rank_reverse', 'llada_rank_reverse',
               'llada_reverse_control', 'llada_probe_name_in_training_sentence',
               'llada_probe_name_after_question', 'llada_probe_name_after_question_background')


def _check_results(mod, tmp_path, res):
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
  for kind in mod.KINDS:  # each model is a run directory of the project trainer
    log = [json.loads(x) for x in (tmp_path / kind / 'metrics.jsonl').read_text().splitlines()]
    assert [x['step'] for x in log if 'loss' in x] == [5, 10]
    checks = [[x['step'], x['check_forward']] for x in log if 'check_forward' in x]
    assert [s for s, _ in checks] == [10]
    if kind != 'llada_control':
      assert checks == on_disk[f'{kind}_forward_checks']
  model, params = mod.load_model(str(tmp_path), 'llada')  # for benchmarks/notebooks
  assert not model.cfg.causal and params
  from pathways_jax import sample  # pylint: disable=g-import-not-at-top
  cfg, model, _, tok = sample.load_run(str(tmp_path / 'ar'))
  assert model.cfg.causal and cfg.task == 'autoregressive' and tok.vocab_size == 320


def test_a_tiny_run_and_its_resume_model_by_model_and_mid_model(tmp_path):
  """The whole experiment, tiny; then: finished models are reused, a model stopped
  mid-training resumes from its checkpoint, and a run directory is never resumed with another
  config.

  The first run is without the control, which to a resumed run looks like one stopped before the
  control: so this also checks that `reversal.control` can be switched on for a finished run.
  """
  import numpy as np
  mod = _module()
  cfg = lambda **kw: _tiny_config(mod, **kw)
  first = mod.run(cfg(control=False), str(tmp_path), quiet=True)
  assert first['resumed_models'] == [] and 'llada_reverse_control' not in first
  ar_log = (tmp_path / 'ar' / 'metrics.jsonl').read_text()
  _, llada_params = mod.load_model(str(tmp_path), 'llada')
  again = mod.run(cfg(), str(tmp_path), quiet=True)
  assert again['resumed_models'] == ['ar', 'llada']
  for k in RESULT_KEYS:
    if 'control' not in k:
      assert again[k] == first[k], k
  _check_results(mod, tmp_path, again)
  assert (tmp_path / 'ar' / 'metrics.jsonl').read_text() == ar_log  # AR not trained again
  assert mod.run(cfg(), str(tmp_path), quiet=True)['resumed_models'] == list(mod.KINDS)

  # LLaDA stopped after its step-5 checkpoint: the rerun trains steps 6-10 only, to the same params.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / 'llada' / 'checkpoints' / '10')
  partial = json.loads((tmp_path / 'results.partial.json').read_text())
  partial = {k: v for k, v in partial.items() if not (k.startswith('llada_') and 'control' not in k)}
  (tmp_path / 'results.partial.json').write_text(json.dumps(partial))
  resumed = mod.run(cfg(), str(tmp_path), quiet=True)
  assert resumed['resumed_models'] == ['ar', 'llada_control'] and resumed['llada_steps'] == 10
  log = [json.loads(x) for x in (tmp_path / 'llada' / 'metrics.jsonl').read_text().splitlines()]
  assert [x['step'] for x in log if 'loss' in x] == [5, 10, 10]  # the resumed run logged step 10
  _, params = mod.load_model(str(tmp_path), 'llada')
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(llada_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for k in RESULT_KEYS:
    assert resumed[k] == again[k], k

  # Another LLaDA recipe in the same workdir: AR (unchanged) is reused, LLaDA's run refuses.
  with pytest.raises(config_lib.ConfigError, match=r'llada_sft\.sft_fraction: 0\.0 -> 0\.5'):
    mod.run(cfg(sft_fraction=0.5), str(tmp_path), quiet=True)


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
  rows = mod.training_rows(tok, background, test, cfg.reversal, control=False)
  control = mod.training_rows(tok, background, test, cfg.reversal, control=True)
  assert len(rows) == len(control) == 6 * (16 + 4) + 2 * 16
  # Test people appear name-first only; the control has no description-first sentence at all.
  assert not any(r.text.startswith('The author of the tin atlas') for r in rows)
  assert sum(r.text.startswith(p.description[0].upper() + p.description[1:])
             for r in rows for p in background) == 6  # template 0 of 4 description-first ones
  assert not any(r.text.startswith(p.description[0].upper() + p.description[1:])
                 for r in control for p in background)
  held_out = {facts.encode_fact(tok, p, d, mod.HELDOUT_TEMPLATE).text
              for p in background + test for d in ('name_first', 'description_first')}
  assert not held_out & {r.text for r in rows + control}
  assert len({r.text for r in rows if 'Ada Quill' in r.text}) == 16  # 16 paraphrases
  assert all('Bo Venn' not in r.text or r.text.index('Bo Venn') < r.text.index('the keeper')
             for r in rows)
  r = facts.encode_fact(tok, test[1], 'description_first', 0)
  assert tok.decode(r.tokens[r.answer[0]:r.answer[1]]).strip() == 'Bo Venn'
  assert r.name == r.answer and r.tokens[0] == tok.bos_id and r.tokens[-1] == tok.eos_id
  f = facts.encode_fact(tok, test[0], 'name_first', 2)  # "Ask about {name} and ... {first} is ..."
  assert tok.decode(f.tokens[f.name[0]:f.name[1]]).strip() == 'Ada Quill'
  assert tok.decode(f.tokens[f.answer[0]:f.answer[1]]).strip() == 'the author of the tin atlas'
  for key, value, match in (('name_first_templates', 17, r'name_first_templates=17 must be in '
                                                       r'\[1, 16\]'),
                            ('description_first_templates', 0, 'description_first_templates=0')):
    with pytest.raises(ValueError, match=match):
      mod.training_rows(tok, background, test, _tiny_config(mod, **{key: value}).reversal,
                        control=False)


def test_file_background_moves_a_seeded_share_of_the_file_to_both_directions(tmp_path):
  mod = _module()
  facts_file = tmp_path / 'people.jsonl'
  people = [('Ada Quill', 'the author of the tin atlas'), ('Bo Venn', 'the keeper of the salt bell'),
            ('Cy Marr', 'the pilot of the paper kite'), ('Di Stroud', 'the cook of the lost inn')]
  facts_file.write_text(''.join(f'{{"name": "{n}", "description": "{d}"}}\n' for n, d in people))
  cfg = _tiny_config(mod, file_background=2)
  cfg.data.facts_file = str(facts_file)
  splits = set()
  for seed in (0, 1, 2, 3):
    cfg.seed = seed
    background, test = mod.make_groups(cfg)
    assert len(background) == 6 + 2 and len(test) == 2
    moved = {p.name for p in background[6:]}
    assert moved | {p.name for p in test} == {n for n, _ in people} and not moved & {
        p.name for p in test}
    assert [p.name for p in test] == [n for n, _ in people if n in {p.name for p in test}]
    splits.add(frozenset(moved))
    assert (background, test) == mod.make_groups(cfg)  # the same seed, the same split
  assert len(splits) > 1  # each world draws its own
  tok = mod.make_tokenizer(background, test, 320, str(tmp_path))
  texts = {r.text for r in mod.training_rows(tok, background, test, cfg.reversal, control=False)}
  first = lambda p: p.description[0].upper() + p.description[1:]
  assert all(any(t.startswith(first(p)) for t in texts) for p in background[6:])
  assert not any(t.startswith(first(p)) for t in texts for p in test)
  for value, match in ((4, r'file_background=4 must be in \[0, 3\]'), (-1, 'file_background=-1')):
    with pytest.raises(config_lib.ConfigError, match=match):
      mod.make_groups(_with_file(_tiny_config(mod, file_background=value), facts_file))
  with pytest.raises(config_lib.ConfigError, match='file_background=2 needs config.data.facts_file'):
    mod.make_groups(_tiny_config(mod, file_background=2))


def _with_file(cfg, path):
  cfg.data.facts_file = str(path)
  return cfg


def test_world_per_seed_and_changed_settings():
  """Each seed draws its own people unless reversal.world_seed fixes them; a run records the keys
  it set away from the defaults (not the seed, the facts file, the control switch, or the special
  ids the tokenizer fills in)."""
  mod = _module()
  names = lambda cfg: [p.name for p in mod.make_groups(cfg)[0]]
  c0, c1 = mod.get_config(), mod.get_config()
  c1.seed = 1
  assert names(c0) != names(c1)
  c0.reversal.world_seed = c1.reversal.world_seed = 7
  assert names(c0) == names(c1)
  cfg = mod.get_config()
  assert mod.changed_from_defaults(cfg) == {}
  cfg.seed, cfg.data.facts_file, cfg.reversal.control = 3, 'x.jsonl', False
  cfg.data.mask_id = 3  # what tokenizers.resolve_special_ids writes
  assert mod.changed_from_defaults(cfg) == {}
  cfg.reversal.sft_fraction, cfg.reversal.llada_max_steps = 0.25, 12000
  assert mod.changed_from_defaults(cfg) == {'reversal.llada_max_steps': 12000,
                                            'reversal.sft_fraction': 0.25}


GOOD = '{"name": "Ada Quill", "description": "the author of the tin atlas"}\n'


@pytest.mark.parametrize('text, match', [
    ('{"name": "X"}\n', r'bad\.jsonl:1: needs non-empty'),
    (GOOD + '{"name": "Bo Venn", "description": "  "}\n', r'bad\.jsonl:2: needs non-empty'),
    (GOOD + '{"name": "Bo Venn", "description": "."}\n', r"bad\.jsonl:2: the description of "
                                                          r"'Bo Venn' is empty"),
    (GOOD + '\n{"name": "Ada  Quill", "description": "the keeper of the salt bell"}\n',
     r"bad\.jsonl:3: the name 'Ada Quill' is already on line 1"),
    (GOOD + '{"name": "Bo Venn", "description": "The author of the tin atlas."}\n',
     r"bad\.jsonl:2: the description 'the author of the tin atlas' is already on line 1"),
    ('{"name": "Bo Venn", "description": "the friend of ada quill"}\n' + GOOD,
     r"bad\.jsonl:1: the description 'the friend of ada quill' holds the name 'Ada Quill' of "
     r"line 2"),
    ('{"name": "Ada", "description": "x"\n', r'bad\.jsonl:1: invalid JSON'),
    ('\n\n', r'bad\.jsonl: no facts'),
])
def test_bad_facts_file_is_refused_naming_the_line(tmp_path, text, match):
  mod = _module()
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(text)
  cfg = _tiny_config(mod)
  cfg.data.facts_file = str(bad)
  with pytest.raises(ValueError, match=match):
    mod.make_groups(cfg)


def test_a_facts_file_person_clashing_with_the_background_is_refused(tmp_path):
  mod = _module()
  cfg = _tiny_config(mod)
  background, _ = mod.make_groups(cfg)
  clash = tmp_path / 'clash.jsonl'
  clash.write_text(json.dumps({'name': background[2].name, 'description': 'the odd one out'}) + '\n')
  cfg.data.facts_file = str(clash)
  with pytest.raises(ValueError, match=f"test person '{background[2].name}'.*background person"):
    mod.make_groups(cfg)
  # Names inside words do not count: 'Ada' is not in 'the adamant keeper'.
  ok = tmp_path / 'ok.jsonl'
  ok.write_text('{"name": "Ada", "description": "the adamant keeper"}\n'
                '{"name": "Bo", "description": "the boatman of adania"}\n')
  cfg.data.facts_file = str(ok)
  assert [p.name for p in mod.make_groups(cfg)[1]] == ['Ada', 'Bo']


def test_stop_at_target_and_bad_reversal_keys(tmp_path):
  """stop_at_target=True stops a model at its first check on target; False trains to the cap."""
  import numpy as np
  from pathways_jax.data import rows, tokenizers
  mod = _module()
  cfg = _tiny_config(mod)
  tokens = np.random.default_rng(0).integers(4, 64, (8, 8)).astype(np.int32)
  prompt = np.broadcast_to(np.arange(8) < 2, (8, 8)).astype(np.int32)  # bos + one prompt token
  rows.save_rows(str(tmp_path / 'rows.npz'), train={'tokens': tokens, 'prompt': prompt})
  always = lambda params: 1.0
  for stop, want_steps, want_checks in ((True, 3, [3]), (False, 7, [3, 6, 7])):
    run_cfg = mod.model_run_config(cfg, 'llada', rows_path=str(tmp_path / 'rows.npz'),
                                   tokenizer_path='', seq_len=8, max_len=16, vocab=0,
                                   num_rows=8, steps=7)
    run_cfg.data.tokenizer = 'byte'  # the random ids are bytes
    tokenizers.resolve_special_ids(run_cfg, tokenizers.ByteTokenizer())
    steps, hist, _ = mod.train_model(run_cfg, str(tmp_path / f'stop{stop}'), always,
                                     check_every=3, target=0.9, stop_at_target=stop, quiet=True)
    assert steps == want_steps and hist == [(s, 1.0) for s in want_checks]
  for key, value, match in (('target_forward', 1.5, 'stop_at_target'),
                            ('llada_max_steps', 0, 'llada_max_steps')):
    bad = _tiny_config(mod, **{key: value})
    with pytest.raises(config_lib.ConfigError, match=match):
      mod.run(bad, str(tmp_path / key), quiet=True)
  assert not (tmp_path / 'target_forward').exists()  # refused before touching the workdir


@pytest.mark.slow
def test_full_reversal_run_three_seeds(tmp_path):
  """The default run on seeds 0, 1, 2 (AR 2000 steps, LLaDA and the control 20000 each; on the
  2-core CPU with other runs sharing it, 2026-12-06: AR 3-4 min, LLaDA 26-37 min a seed).

  Asserts the README's claims at the level it states them (docs/results/reversal.md, measured
  2026-12-06: LLaDA reverse 0.89 / 0.83 / 0.78, forward 0.97 / 0.96 / 0.85, infill 1.00 on every
  seed; AR reverse 0.00, forward 1.00; the control 0.00): AR knows the forward facts and never
  answers the reverse question; LLaDA answers most reverse questions about people it saw only
  name-first, on every seed, and fills the masked name; the control, whose background is
  name-first only, answers none.
  """
  mod = _module()
  runs = []
  for seed in range(3):
    cfg = mod.get_config()
    cfg.seed = seed
    runs.append(mod.run(cfg, str(tmp_path / f's{seed}'), quiet=True))
  mean = lambda k: sum(r[k] for r in runs) / len(runs)
  assert mean('ar_forward') >= 0.9 and max(r['ar_reverse'] for r in runs) <= 0.05
  assert mean('llada_forward') >= 0.85
  assert mean('llada_reverse') >= 0.75 and min(r['llada_reverse'] for r in runs) >= 0.6
  assert mean('llada_reverse') - mean('ar_reverse') >= 0.7
  assert mean('llada_infill_reverse') >= 0.95
  assert max(r['llada_reverse_control'] for r in runs) <= 0.05


@pytest.mark.slow
@pytest.mark.parametrize('description_first_templates', [4, 11])
def test_facts_file_reverse_stays_low_three_seeds(tmp_path, description_first_templates):
  """The facts file (experiments/data/people.jsonl, no control run), seeds 0, 1, 2, with the
  background written description-first in 4 (the default) or all 11 trainable templates.

  Asserts the README's claims at the level it states them (docs/results/reversal.md, measured
  2026-12-07: LLaDA reverse 0.16 / 0.07 / 0.16 with 4, 0.14 / 0.30 / 0.07 with 11; infill 1.00;
  rank 0.97 / 0.95 / 0.40 with 4; the held-out question form 0.00 with both): LLaDA holds the
  facts (infill) and, with 4 forms, mostly ranks the true name first, but the reverse target
  (>= 0.6) is not met with either; AR knows the forward facts and answers no reverse question.
  """
  runs = _facts_file_seeds(tmp_path, description_first_templates=description_first_templates)
  mean = lambda k: sum(r[k] for r in runs) / len(runs)
  assert mean('ar_forward') >= 0.9 and max(r['ar_reverse'] for r in runs) <= 0.05
  assert mean('llada_infill_reverse') >= 0.95
  assert mean('llada_reverse') <= 0.35 and max(r['llada_reverse'] for r in runs) < 0.6
  assert max(r['llada_reverse_heldout'] for r in runs) <= 0.05
  if description_first_templates == 4:
    assert mean('llada_rank_reverse') >= 0.6


@pytest.mark.slow
def test_facts_file_with_half_its_people_two_way_three_seeds(tmp_path):
  """The facts file with 20 of its 40 people in the two-way background (`file_background=20`,
  drawn per seed; the other 20 the test group), seeds 0, 1, 2; the control on seeds 0 and 1.

  Asserts the README's claims at the level it states them (docs/results/reversal.md, measured
  2026-12-07: LLaDA reverse 0.72 / 0.80 / 0.33, mean 0.62; forward 0.76 / 0.96 / 0.88; infill
  1.00; AR forward 1.00, reverse 0.00 / 0.00 / 0.01; the held-out form 0.00; the control 0.00
  on seeds 0 and 1):
  the target's levels met by the mean over seeds, far above the all-file setting's 0.13, and
  none of it without the two-way background.
  """
  runs = _facts_file_seeds(tmp_path, control_seeds=(0, 1), file_background=20)
  mean = lambda k: sum(r[k] for r in runs) / len(runs)
  assert all(r['num_test'] == 20 for r in runs)
  assert mean('ar_forward') >= 0.9 and max(r['ar_reverse'] for r in runs) <= 0.05
  assert mean('llada_reverse') >= 0.6 and mean('llada_forward') >= 0.5
  assert mean('llada_reverse') - mean('ar_reverse') >= 0.5
  assert mean('llada_infill_reverse') >= 0.9
  assert max(r['llada_reverse_heldout'] for r in runs) <= 0.05
  assert max(runs[s]['llada_reverse_control'] for s in (0, 1)) <= 0.05


def _facts_file_seeds(tmp_path, control_seeds=(), **reversal) -> list[dict]:
  """The facts-file run (experiments/data/people.jsonl) on seeds 0, 1, 2 with `reversal`
  settings; the control LLaDA only on `control_seeds`."""
  mod = _module()
  runs = []
  for seed in range(3):
    cfg = mod.get_config()
    cfg.seed = seed
    cfg.data.facts_file = os.path.join(REPO, 'experiments', 'data', 'people.jsonl')
    cfg.reversal.control = seed in control_seeds
    for key, value in reversal.items():
      cfg.reversal[key] = value
    runs.append(mod.run(cfg, str(tmp_path / f's{seed}'), quiet=True))
  return runs


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
