"""experiments/figures.py: the README's figures redraw from the committed data files."""
import glob
import json
import os

import pytest

from helpers import experiment_module, fake_scaling_points

pytest.importorskip('matplotlib')

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _figures():
  return experiment_module('figures')


def _assert_png(path):
  assert path.read_bytes()[:8] == PNG_MAGIC, path
  assert path.stat().st_size < 200_000, path  # the README's PNGs stay small


def test_draws_every_figure_from_the_committed_data(tmp_path):
  figures = _figures()
  names = sorted(os.path.basename(p)[:-len('.json')]
                 for p in glob.glob(os.path.join(figures.DATA_DIR, '*.json')))
  assert {'rho1', 'gstack'} <= set(names) <= set(figures.EXPERIMENTS)
  assert figures.main(['--out', str(tmp_path)]) == 0
  for name in names:
    _assert_png(tmp_path / f'{name}.png')
    with open(os.path.join(figures.DATA_DIR, f'{name}.json')) as f:
      data = json.load(f)
    assert data['experiment'] == name and data['date'] and data['commit'], name
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f'{n}.png' for n in names)


def _reversal_run(run, seed, value, facts_file=None, changed=None):
  """A fake finished reversal WORKDIR: every metric of every model = `value` + its index / 8."""
  import figure_data  # pylint: disable=g-import-not-at-top
  (run / 'llada_control').mkdir(parents=True)
  res = {'date': '2026-01-01', 'device': 'cpu x1', 'num_test': 4, 'config': {'seed': seed},
         'facts_file': facts_file, 'changed_from_defaults': changed or {}}
  for prefix, suffix, model in (('ar_', '', 'ar'), ('llada_', '', 'llada'),
                                ('llada_', '_control', 'llada_control')):
    for i, k in enumerate(figure_data.REVERSAL_METRICS):
      res[f'{prefix}{k}{suffix}'] = value + i / 8
    res[f'{model}_steps'] = 20
    res[f'{model}_train_seconds'] = 10.0
  res['ar_forward_checks'] = [[10, 0.5], [20, 1.0]]
  res['llada_forward_checks'] = [[10, 0.25], [20, 0.75]]
  (run / 'results.json').write_text(json.dumps(res))
  (run / 'llada_control' / 'metrics.jsonl').write_text(
      '{"step": 10, "loss": 1.0}\n{"step": 10, "check_forward": 0.125}\n')
  return str(run)


def test_reversal_from_run_dirs(tmp_path):
  """Reversal WORKDIRs -> settings (default, facts file, ablation) x seeds, mean and sd -> PNG."""
  figures = _figures()
  runs = [_reversal_run(tmp_path / 's0', 0, 0.0), _reversal_run(tmp_path / 's1', 1, 0.1),
          _reversal_run(tmp_path / 'f0', 0, 0.0, facts_file='/x/people.jsonl'),
          _reversal_run(tmp_path / 'a0', 0, 0.0, changed={'reversal.sft_fraction': 0.25})]
  assert figures.main(['--reversal', ','.join(runs), '--data', str(tmp_path / 'data'),
                       '--out', str(tmp_path / 'out'), '--commit', 'abc1234']) == 0
  _assert_png(tmp_path / 'out' / 'reversal.png')
  data = json.loads((tmp_path / 'data' / 'reversal.json').read_text())
  assert data['commit'] == 'abc1234' and data['seed'] == ['0', '1']
  assert sorted(data['settings']) == ['default', 'facts file people.jsonl', 'sft_fraction=0.25']
  default = data['settings']['default']
  assert default['seeds']['1']['ar']['reverse'] == 0.35  # 0.1 + 2 / 8
  assert default['summary']['ar']['reverse'] == {'mean': 0.3, 'sd': 0.0707, 'n': 2}
  assert default['seeds']['0']['llada_control']['forward_checks'] == [[10, 0.125]]
  assert default['seeds']['0']['llada']['forward_checks'] == [[10, 0.25], [20, 0.75]]
  assert data['settings']['sft_fraction=0.25']['summary']['llada']['forward']['sd'] is None
  table = experiment_module('reversal').markdown_table(data).splitlines()
  assert table[2].startswith('| AR | **0.05** ± 0.07 (0.00 / 0.10) |')  # forward: 0 + 0/8, 0.1
  assert table[3].split(' | ')[3] == '**0.30** ± 0.07 (0.25 / 0.35)'  # LLaDA reverse
  assert experiment_module('reversal').markdown_table(data, 'sft_fraction=0.25').splitlines()[
      3].split(' | ')[1] == '0.00'  # one seed: the value alone
  with pytest.raises(figures.MissingData, match="second run of seed 0 in setting 'default'"):
    figures.extract_reversal(f'{runs[0]},{runs[0]}')


def test_missing_data_file_says_how_to_make_it(tmp_path, capsys):
  figures = _figures()
  with pytest.raises(figures.MissingData, match=r'rho1\.json not found.*--rho1=runs/rho1'):
    figures.load_data('rho1', str(tmp_path))
  assert figures.main(['--data', str(tmp_path), '--out', str(tmp_path), '--only=gstack']) == 1
  assert '--gstack=runs/gstack' in capsys.readouterr().err
  assert not list(tmp_path.iterdir())  # nothing drawn


def test_a_run_dir_without_results_is_refused(tmp_path, capsys):
  figures = _figures()
  assert figures.main(['--reversal', str(tmp_path), '--data', str(tmp_path / 'data'),
                       '--out', str(tmp_path / 'out')]) == 1
  assert 'finished run directory' in capsys.readouterr().err
  (tmp_path / 'results.json').write_text(json.dumps({'status': 'stopped'}))
  with pytest.raises(figures.MissingData, match='not finished'):
    figures.extract_reversal(str(tmp_path))


def test_instruction_sft_from_run_dirs(tmp_path):
  """Runs of one seed with different LoRA settings merge into one seed (each LoRA arm keyed by its
  instructions.lora_also_train); runs whose base or SFT differ for a seed are refused."""
  figures = _figures()

  def run(name, seed, also, sft_acc=0.5):
    score = lambda acc: {'format_compliance': 0.9, 'accuracy': acc, 'n': 10}
    res = {'status': 'completed', 'seed': seed, 'date': '2026-01-01', 'device': 'cpu x1',
           'base': score(0.0), 'sft': score(sft_acc), 'lora': score(0.25 if also else 0.125),
           'lora_trainable_params': 200 if also else 100, 'sft_trainable_params': 1000,
           'config': {'seed': seed, 'instructions': {'lora_also_train': also}}}
    (tmp_path / name).mkdir()
    (tmp_path / name / 'results.json').write_text(json.dumps(res))
    return str(tmp_path / name)

  dirs = [run('a0', 0, 'embed'), run('p0', 0, ''), run('a1', 1, 'embed')]
  assert figures.main(['--instruction_sft', ','.join(dirs), '--data', str(tmp_path / 'data'),
                       '--out', str(tmp_path / 'out'), '--only', 'instruction_sft']) == 0
  data = figures.load_data('instruction_sft', str(tmp_path / 'data'))
  assert sorted(data['seeds']['0']) == ['base', 'lora[]', 'lora[embed]', 'sft']
  assert data['seeds']['0']['lora[embed]'] == {'format': 0.9, 'accuracy': 0.25, 'trainable': 200}
  assert sorted(data['seeds']['1']) == ['base', 'lora[embed]', 'sft']
  _assert_png(tmp_path / 'out' / 'instruction_sft.png')
  with pytest.raises(figures.MissingData, match='its sft differs from another run of seed 0'):
    figures.extract_instruction_sft(','.join([dirs[0], run('x0', 0, '', sft_acc=0.4)]))


def test_dpo_instructions_from_run_dirs(tmp_path):
  """A dpo_instructions WORKDIR's dpo_results.json and rpo_results.json -> one seed's two arms."""
  figures = _figures()
  run = tmp_path / 'run'
  run.mkdir()
  for arm, after in (('dpo', 0.1), ('rpo', 0.3)):
    score = lambda acc: {'accuracy': acc, 'format_compliance': 0.9}
    res = {'status': 'completed', 'seed': 4, 'date': '2026-01-01', 'device': 'cpu x1',
           'config': {'seed': 4}, 'sft': score(0.2), 'dpo': score(after),
           'sft_train_questions': score(0.6), 'dpo_train_questions': score(after + 0.4),
           'dpo_validation': {'val_logps/chosen': [[10, -2.0], [20, -2.5 - after]]}}
    (run / f'{arm}_results.json').write_text(json.dumps(res))
  data = figures.extract_dpo_instructions(str(run), commit='abc1234')
  assert data['seed'] == ['4'] and sorted(data['seeds']['4']) == ['dpo', 'rpo']
  assert data['seeds']['4']['rpo'] == {
      'sft_heldout': 0.2, 'heldout': 0.3, 'sft_train_questions': 0.6, 'train_questions': 0.7,
      'heldout_format': 0.9, 'logps_chosen': [[10, -2.0], [20, -2.8]]}
  (run / 'rpo_results.json').unlink()
  with pytest.raises(figures.MissingData, match='rpo_results.json not found: run the rpo arm'):
    figures.extract_dpo_instructions(str(run))


def test_prorl_from_run_dirs(tmp_path):
  """grpo_instructions WORKDIRs holding the grpo_kl and grpo_kl_reset arms -> per seed: the SFT
  start, each arm's final scores and curves; a missing arm is named."""
  figures = _figures()

  def run(seed):
    d = tmp_path / f's{seed}'
    d.mkdir()
    for arm, after, reset in (('grpo_kl', 0.4, 0), ('grpo_kl_reset', 0.5, 50)):
      full = f'{arm}_arithmetic'
      score = lambda acc: {'accuracy': acc, 'n': 61}
      curve = {'val_correct': [[50, after - 0.1], [100, after]], 'kl': [[10, 0.01], [100, 0.02]],
               'reward': [[10, 0.5], [100, 0.7]], 'entropy': [[10, 0.3]]}
      curve['reference_reset'] = [[50, 50.0]] if reset else []
      res = {'status': 'completed', 'seed': seed, 'date': '2026-01-01', 'device': 'cpu x1',
             'sft': score(0.3), 'sft_train_questions': score(0.8), full: score(after),
             f'{full}_train_questions': score(0.9), 'curve': curve,
             'wall_s': {f'{full}_train_s': 12.0},
             'config': {'seed': seed, 'rl': {'beta': 1.0, 'reset_every': reset},
                        'train': {'steps': 800}, 'grpo_exp': {'steps': 100}}}
      (d / f'{full}_results.json').write_text(json.dumps(res))
    return str(d)

  dirs = ','.join(run(s) for s in (0, 1))
  assert figures.main(['--prorl', dirs, '--data', str(tmp_path / 'data'), '--out',
                       str(tmp_path / 'out'), '--only', 'prorl']) == 0
  data = figures.load_data('prorl', str(tmp_path / 'data'))
  assert data['seed'] == ['0', '1'] and data['n'] == 61 and data['grpo_steps'] == 100
  seed = data['seeds']['1']
  assert seed['sft'] == {'heldout': 0.3, 'train_questions': 0.8}
  assert seed['grpo_kl_reset']['heldout'] == 0.5 and seed['grpo_kl']['heldout'] == 0.4
  assert seed['grpo_kl_reset']['reference_reset'] == [[50, 50.0]]
  assert seed['grpo_kl']['reference_reset'] == [] and seed['grpo_kl']['beta'] == 1.0
  assert seed['grpo_kl_reset']['val_correct'] == [[50, 0.4], [100, 0.5]]
  _assert_png(tmp_path / 'out' / 'prorl.png')
  os.remove(os.path.join(dirs.split(',')[0], 'grpo_kl_arithmetic_results.json'))
  with pytest.raises(figures.MissingData, match='run the grpo_kl arm'):
    figures.extract_prorl(dirs)
  # grpo_arithmetic reads the same files: the grpo arm is needed, the others taken if there.
  with pytest.raises(figures.MissingData, match='run the grpo arm'):
    figures.extract_grpo_arithmetic(dirs)
  d1 = dirs.split(',')[1]
  res = json.loads(open(os.path.join(d1, 'grpo_kl_arithmetic_results.json')).read())
  res = {k.replace('grpo_kl_', 'grpo_'): v for k, v in res.items()}
  with open(os.path.join(d1, 'grpo_arithmetic_results.json'), 'w') as f:
    json.dump(res, f)
  data = figures.extract_grpo_arithmetic(d1)
  assert sorted(data['seeds']['1']) == ['grpo', 'sft'] and data['seeds']['1']['grpo']['heldout'] == 0.4

  # Held out by problem: the split is checked, and the corpus groups are carried per arm.
  with pytest.raises(ValueError, match="split_by='subject'"):
    figures.extract_grpo_arithmetic_unseen(d1)
  res['config']['instructions'] = {'split_by': 'subject', 'num_arithmetic': 400}
  with open(os.path.join(d1, 'grpo_arithmetic_results.json'), 'w') as f:
    json.dump(res, f)
  with pytest.raises(figures.MissingData, match='no problem/ groups'):
    figures.extract_grpo_arithmetic_unseen(d1)
  groups = lambda a, b: {'problem/in_corpus': {'correct': a / 4, 'n': 4},
                         'problem/not_in_corpus': {'correct': b / 10, 'n': 10},
                         'kind/arithmetic': {'correct': 0.5, 'n': 14}}
  res['sft']['groups'], res['grpo_arithmetic']['groups'] = groups(1, 2), groups(3, 2)
  with open(os.path.join(d1, 'grpo_arithmetic_results.json'), 'w') as f:
    json.dump(res, f)
  assert figures.main(['--grpo_arithmetic_unseen', d1, '--data', str(tmp_path / 'data'), '--out',
                       str(tmp_path / 'out'), '--only', 'grpo_arithmetic_unseen']) == 0
  data = figures.load_data('grpo_arithmetic_unseen', str(tmp_path / 'data'))
  assert data['num_arithmetic'] == 400
  assert data['seeds']['1']['grpo']['problems'] == {'problem/in_corpus': [3, 4],
                                                    'problem/not_in_corpus': [2, 10]}
  assert data['seeds']['1']['sft']['problems']['problem/in_corpus'] == [1, 4]
  _assert_png(tmp_path / 'out' / 'grpo_arithmetic_unseen.png')


def test_the_scaling_figure_from_a_finished_grid(tmp_path):
  """Two seeds per point: the data file holds their mean and sd; the figure draws all panels."""
  figures = _figures()
  points = fake_scaling_points((('16x2', 6e3, 0.3), ('32x2', 2e4, 0.0), ('48x2', 5e4, 0.2)),
                               bases=(('autoregressive', 2.0), ('diffusion', 2.5)), task=0.25)
  res = {'status': 'completed', 'points': points, 'date': '2026-01-01', 'device': 'cpu x1',
         'wall_s': 10.0, 'config': {'seed': 0, 'scaling': {'seeds': 2, 'task': 'arithmetic'}}}
  analysis = figures.extract_scaling  # the study's own analysis fills minima, laws, multiplier
  res.update(experiment_module('scaling').analyse(points))
  (tmp_path / 'results.json').write_text(json.dumps(res))
  data = analysis(str(tmp_path), commit='abc')
  ar = [p for p in data['points'] if p['objective'] == 'autoregressive' and p['budget'] == 1e11]
  assert [p['loss']['mean'] for p in sorted(ar, key=lambda p: p['params'])] == [2.3, 2.0, 2.2]
  assert all(p['loss']['sd'] == pytest.approx(0.0141, abs=1e-4) and p['seeds'] == 2 for p in ar)
  assert all(p['task']['mean'] == 0.25 for p in ar)
  assert set(data['laws']) == {'autoregressive', 'diffusion'} and len(data['multiplier']) == 2
  assert figures.main(['--scaling', str(tmp_path), '--data', str(tmp_path / 'data'),
                       '--out', str(tmp_path), '--only=scaling']) == 0
  _assert_png(tmp_path / 'scaling.png')


def test_rpt_from_run_dirs(tmp_path):
  """experiments/rpt.py WORKDIRs, one per seed -> each model's scores per set, and each arm's
  change from its own seed's base (paired), mean and sd over seeds; a seed given twice is
  refused."""
  figures = _figures()
  models, sets = ('base', 'rpt', 'rpt_random', 'ntp'), ('validation_hard', 'validation_random',
                                                        'train')

  def run(seed, rpt_gain):
    d = tmp_path / f's{seed}'
    d.mkdir()
    base_acc = 0.1 + 0.1 * seed
    acc = {'base': base_acc, 'rpt': base_acc + rpt_gain, 'rpt_random': base_acc - 0.05,
           'ntp': base_acc + 0.01}
    scores = {m: {s: {'accuracy': acc[m], 'nll': 3.0 - acc[m], 'n': 100} for s in sets}
              for m in models}
    res = {'status': 'completed', 'seed': seed, 'date': '2026-01-01', 'device': 'cpu x1',
           'arms': ['rpt', 'rpt_random', 'ntp'], 'scores': scores,
           'counts': {'train': 500, 'validation_hard': 100, 'validation_random': 100,
                      'mean_entropy': {'train': 3.0, 'validation_hard': 3.1,
                                       'validation_random': 1.0}},
           'curves': {'rpt': {'reward': [[10, 0.2]], 'val_next_token': [[50, 0.3]]},
                      'ntp': {'loss': [[10, 2.0]]}},
           'wall_s': {'total_s': 60.0, 'rpt_train_s': 20.0},
           'config': {'seed': seed, 'rpt_exp': {'steps': 300, 'base_steps': 1000, 'lr': 2e-4,
                                                'prompts': 16}, 'rl': {'num_generations': 8}}}
    (d / 'results.json').write_text(json.dumps(res))
    return str(d)

  dirs = ','.join(run(s, g) for s, g in ((0, 0.02), (1, 0.04), (2, 0.06)))
  assert figures.main(['--rpt', dirs, '--data', str(tmp_path / 'data'), '--out',
                       str(tmp_path / 'out'), '--only', 'rpt']) == 0
  data = figures.load_data('rpt', str(tmp_path / 'data'))
  assert data['seed'] == ['0', '1', '2'] and data['steps'] == 300 and data['generations'] == 8
  assert data['models'] == ['base', 'rpt', 'rpt_random', 'ntp']  # no seed ran sft_hard
  assert data['seeds']['2']['scores']['rpt']['validation_hard']['accuracy'] == 0.36
  change = data['summary']['rpt']['validation_hard']['accuracy_change']
  assert change['mean'] == pytest.approx(0.04) and change['sd'] == pytest.approx(0.02)
  assert change['n'] == 3
  base = data['summary']['base']['validation_hard']['accuracy']
  assert base['mean'] == pytest.approx(0.2) and 'accuracy_change' not in data['summary']['base'][
      'validation_hard']
  assert data['summary']['ntp']['train']['nll_change']['mean'] == pytest.approx(-0.01)
  _assert_png(tmp_path / 'out' / 'rpt.png')
  with pytest.raises(figures.MissingData, match='seed 0 given twice'):
    figures.extract_rpt(dirs + ',' + dirs.split(',')[0])
