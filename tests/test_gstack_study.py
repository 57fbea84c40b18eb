"""G_stack where growth should matter (experiments/gstack_study.py): arm budgets, the seed
statistics and regime check against hand-computed values, the paper's guideline, bad input, and a
tiny study end to end (two shards, then the summary)."""
import json
import math
import os

import numpy as np
import pytest

from helpers import experiment_module, tiny_config
from pathways_jax.config import ConfigError


def _module():
  return experiment_module('gstack_study')


def _tiny(tmp_path, **study):
  mod = _module()
  cfg = tiny_config(str(tmp_path / 'cache'), **{'model.num_layers': 4, 'sample.prompts': ()})
  cfg.unlock()
  cfg.study = mod.get_config().study
  cfg.lock()
  cfg.study.budget_flops = 30 * mod._experiment('gstack').flops_per_step(
      cfg, mod._experiment('gstack').model_cfgs(mod._with_factor(cfg, 1))[1])
  cfg.study.points = '2:0.2'
  cfg.study.evals = 3
  for k, v in study.items():
    cfg.study[k] = v
  return mod, cfg


def test_arms_spend_the_same_flops_and_grow_after_d_tokens(tmp_path):
  mod, cfg = _tiny(tmp_path, points='4:0.1,2:0.2,2:0.5')
  cfg.seed = 0
  arms = mod.study_arms(cfg)
  assert list(arms) == ['scratch', 'small_g4', 'stack_g4_d0.1', 'small_g2', 'stack_g2_d0.2',
                        'stack_g2_d0.5']
  gs = mod._experiment('gstack')
  target = gs.model_cfgs(mod._with_factor(cfg, 1))[1]
  budget = arms['scratch'].train.steps
  assert budget == 30 and arms['scratch'].model.num_layers == 4
  for name, arm in arms.items():
    layers = arm.model.num_layers
    small_step = gs.flops_per_step(arm, target.replace(num_layers=layers))
    target_step = gs.flops_per_step(arm, target)
    d = arm.growth.at_step if arm.growth.depth_factor > 1 else arm.train.steps
    flops = d * small_step + (arm.train.steps - d) * target_step
    # Every arm spends scratch's FLOPs, to within one target step.
    assert abs(flops - budget * target_step) <= target_step, name
    if name.startswith('stack'):
      g, x = int(name.split('_')[1][1:]), float(name.split('_d')[1])
      assert layers * g == 4 and arm.growth.depth_factor == g
      assert d == round(x * budget)  # d = x * scratch's tokens
      assert arm.growth.optimizer == 'fresh'
      assert arm.growth.rewarmup_steps == arms['scratch'].train.warmup_steps
    elif name.startswith('small'):
      assert arm.growth.depth_factor == 1 and layers == 4 // int(name[-1])


@pytest.mark.parametrize('override, message', [
    ({'points': '3:0.1'}, 'does not divide'),
    ({'points': '4:1.5'}, "not 'g:x'"),
    ({'points': '1:0.1'}, "not 'g:x'"),
    ({'points': 'four'}, "not 'g:x'"),
    ({'points': ' , '}, 'is empty'),
    ({'points': '2:0.001'}, 'no small-model step'),
    ({'budget_flops': 1e3}, 'under 20 steps'),
    ({'evals': 1}, 'evals=1'),
    ({'objective': 'llada'}, "objective='llada' is not one of"),
])
def test_bad_study_configs_are_refused(tmp_path, override, message):
  mod, cfg = _tiny(tmp_path, **override)
  with pytest.raises(ConfigError, match=message):
    mod.study_arms(cfg)


def test_a_llada_study_trains_every_arm_with_the_diffusion_objective(tmp_path):
  mod, cfg = _tiny(tmp_path, objective='diffusion')
  cfg.seed = 0
  arms = mod.study_arms(cfg)
  assert set(arms) == {'scratch', 'small_g2', 'stack_g2_d0.2'}
  for arm in arms.values():
    assert arm.objective == 'diffusion' and not arm.model.causal
  ar = mod.study_arms(_tiny(tmp_path)[1])
  for name, arm in arms.items():  # the same budgets and growth as the AR study
    assert (arm.train.steps, arm.growth.at_step) == (ar[name].train.steps,
                                                     ar[name].growth.at_step)
    assert ar[name].objective == 'autoregressive' and ar[name].model.causal


def test_bad_shard_and_seeds_are_refused(tmp_path):
  mod, cfg = _tiny(tmp_path)
  for text in ('2/2', 'x', '1'):
    with pytest.raises(ConfigError, match='shard'):
      mod.parse_shard(text)
  assert mod.parse_shard('1/2') == (1, 2) and mod.parse_shard('') is None
  cfg.study.seeds = 0
  with pytest.raises(ConfigError, match='seeds=0'):
    mod.run(cfg, str(tmp_path / 'run'))


def test_aggregate_means_spreads_and_the_regime_check():
  mod = _module()
  seeds = {
      0: {'scratch': {'final_val': 1.50, 'flops': 3.0}, 'small_g4': {'final_val': 1.60, 'flops': 3.0},
          'stack_g4_d0.1': {'final_val': 1.40, 'flops': 3.0, 'speedup': 0.5}},
      1: {'scratch': {'final_val': 1.54, 'flops': 3.0}, 'small_g4': {'final_val': 1.52, 'flops': 3.0},
          'stack_g4_d0.1': {'final_val': 1.45, 'flops': 3.0, 'speedup': 0.3}},
      2: {'scratch': {'final_val': 1.46, 'flops': 3.0}, 'small_g4': {'final_val': 1.58, 'flops': 3.0},
          'stack_g4_d0.1': {'final_val': 1.47, 'flops': 3.0, 'speedup': None}},
  }
  out = mod.aggregate(seeds)
  scratch = out['arms']['scratch']['final_val']
  assert scratch['mean'] == pytest.approx(1.50) and scratch['sd'] == pytest.approx(0.04)
  sp = out['arms']['stack_g4_d0.1']
  assert sp['reached'] == 2 and sp['speedup']['n'] == 2
  assert sp['speedup']['mean'] == pytest.approx(0.4)
  assert sp['speedup']['sd'] == pytest.approx(math.sqrt(0.02))
  assert 'speedup' not in out['arms']['small_g4']
  regime = out['regime']['small_g4']
  assert regime['scratch_wins'] == 2 and regime['seeds'] == 3
  assert regime['gap']['mean'] == pytest.approx(np.mean([0.10, -0.02, 0.12]))
  table = mod.markdown_table(out)
  delta = out['arms']['stack_g4_d0.1']['vs_scratch']  # paired: -0.10, -0.09, +0.01
  assert delta['mean'] == pytest.approx(-0.06) and delta['n'] == 3
  assert out['arms']['small_g4']['vs_scratch']['mean'] == pytest.approx(np.mean([0.10, -0.02, 0.12]))
  assert '| stack_g4_d0.1 | 1.440 (0.036) | -0.060 (0.061) | 3 | +0.40 (0.14) | 2/3 |' in table
  assert 'scratch beats small_g4 on 2/3 seeds' in table


def test_guideline_matches_the_papers_formula(tmp_path):
  mod, cfg = _tiny(tmp_path)
  cfg.study.budget_flops = 3e12
  out = mod.guideline(cfg, 47104, 6.95e6)
  # log10 d = 0.88 log10 N + 163.27 / log10 C - 5.74 (Du et al. 2024, Eq. 2), by hand:
  d_here = 10 ** (0.88 * math.log10(47104) + 163.27 / math.log10(3e12) - 5.74)
  assert out['here']['d_tokens'] == pytest.approx(d_here)
  assert out['here']['d_over_budget_tokens'] > 1000  # the fit does not extrapolate to 1e12 FLOPs
  per_param = 6.95e6 / 47104
  for row, n in zip(out['paper_sizes'], mod.PAPER_SIZES):
    tokens = n * per_param
    d = 10 ** (0.88 * math.log10(n) + 163.27 / math.log10(6 * n * tokens) - 5.74)
    assert row['d_fraction'] == pytest.approx(d / tokens)
  fractions = [r['d_fraction'] for r in out['paper_sizes']]
  assert fractions == sorted(fractions, reverse=True)  # larger models stack earlier (d/D)


def test_tiny_study_two_shards_then_summary(tmp_path):
  mod, cfg = _tiny(tmp_path, seeds=2)
  work = str(tmp_path / 'run')
  for i in range(2):
    cfg.study.shard = f'{i}/2'
    assert mod.run(cfg, work)['status'] == 'shard done'
  cfg.study.shard = ''
  out = mod.run(cfg, work)
  with open(tmp_path / 'run' / 'results.json') as f:
    saved = json.load(f)
  assert saved['status'] == 'completed' and set(saved['seeds']) == {'0', '1'}
  assert set(out['arms']) == {'scratch', 'small_g2', 'stack_g2_d0.2'}
  for seed in saved['seeds'].values():
    assert seed['stack_g2_d0.2']['growth']['num_layers'] == 4
    assert abs(seed['small_g2']['flops'] - seed['scratch']['flops']) < 0.1 * seed['scratch']['flops']
  # Seeds differ (their own data order and init), and the stats are over both.
  finals = [saved['seeds'][s]['scratch']['final_val'] for s in ('0', '1')]
  assert finals[0] != finals[1]
  assert out['arms']['scratch']['final_val']['mean'] == pytest.approx(np.mean(finals))
  assert out['regime']['small_g2']['seeds'] == 2
  assert out['target_nonembedding_params'] == 4 * (32 * 16 * 2 * (2 + 1) + 3 * 32 * 64)
  # A further summary over the same seeds' arms (as more seeds of one arm are summarised).
  more = tmp_path / 'more'
  more.mkdir()
  for s in ('0', '1'):
    os.symlink(tmp_path / 'run' / f's{s}', more / f's{s}')
  cfg.study.small_only = False
  mod.run(cfg, str(more))
  cfg.study.small_only = True
  # The figure's data file and PNG from the finished study (experiments/figures.py).
  figures = experiment_module('figures')
  paths = figures.make_figures({'gstack_study': f'{work},{more}'}, data_dir=str(tmp_path / 'data'),
                               out_dir=str(tmp_path / 'figs'), only=('gstack_study',))
  assert os.path.getsize(paths[0]) > 10_000
  data = figures.load_data('gstack_study', str(tmp_path / 'data'))
  arm = data['arms']['stack_g2_d0.2']
  assert arm['speedups'] == pytest.approx(
      [saved['seeds'][s]['stack_g2_d0.2']['speedup'] for s in ('0', '1')], abs=1e-3)
  assert arm['growth']['at_step'] == 6 and data['seed'] == ['0', '1']
  extra = data['more_seeds'][0]
  assert set(extra['arms']) == {'scratch', 'stack_g2_d0.2'} and extra['seed'] == ['0', '1']
  assert extra['arms']['stack_g2_d0.2']['vs_scratch'] == arm['vs_scratch']
  curves = [saved['seeds'][s]['scratch']['curve'] for s in ('0', '1')]
  assert data['arms']['scratch']['curve'][-1][1] == pytest.approx(
      (curves[0][-1][1] + curves[1][-1][1]) / 2, abs=1e-4)
  # A rerun reads every arm back instead of training it again.
  with open(tmp_path / 'run' / 'log.txt') as f:
    before = f.read().count('steps ...')
  mod.run(cfg, work)
  with open(tmp_path / 'run' / 'log.txt') as f:
    assert f.read().count('steps ...') == before


@pytest.mark.slow
def test_gstack_study_three_seeds_reproduces(tmp_path):
  """The three-seed study (21 runs; 9536 s of run time measured with two to four runs sharing the
  2-core CPU; one process here). Asserts
  what docs/results/gstack.md states: the target beats its g = 4 small model on every seed by a
  wide margin; the best growth arm (g = 4, d = 10%) ends below scratch on average but nowhere near
  the paper's ~50% speedup; the d sweep peaks in the middle; growth arms vary less over seeds."""
  mod = _module()
  cfg = mod.get_config()
  cfg.study.seeds = 3
  res = mod.run(cfg, str(tmp_path))
  assert res['status'] == 'completed' and len(res['seeds']) == 3
  arms, regime = res['arms'], res['regime']['small_g4']
  assert regime['scratch_wins'] == 3 and regime['gap']['min'] > 0.1
  best = arms['stack_g4_d0.1']
  assert best['final_val']['mean'] < arms['scratch']['final_val']['mean']
  assert -0.1 < best['vs_scratch']['mean'] < 0
  for name in ('stack_g4_d0.025', 'stack_g4_d0.4'):
    assert arms[name]['vs_scratch']['mean'] > best['vs_scratch']['mean'], name
  for name, a in arms.items():
    if name.startswith('stack'):
      # Nowhere near the paper's +49-55%: counting a seed that never reached scratch as 0.
      per_seed = [e[name].get('speedup') or 0.0 for e in res['seeds'].values()]
      assert np.mean(per_seed) < 0.4, name
      assert a['final_val']['sd'] < arms['scratch']['final_val']['sd'], name
