"""The post-training experiments' data files (instruction SFT, DPO, knowledge injection, GRPO,
PAPRIKA, the whole pathway): their numbers copied from finished run directories. The helpers and
the research experiments' extractors are experiments/figure_data.py.

Needs nothing beyond the standard library (not JAX, not matplotlib).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from figure_data import (MissingData, _load_results, _mean_sd, _meta,  # pylint: disable=wrong-import-position,unused-import
                         _r)


def extract_instruction_sft(run_dirs: str, commit: str | None = None) -> dict:
  """Comma-separated WORKDIRs of experiments/instruction_sft.py: one per seed, and more per seed
  for other LoRA settings on the same base and SFT (each run's `lora` arm is keyed by its
  instructions.lora_also_train, '' = the adapters alone). Held-out format compliance and accuracy
  of base, SFT and every LoRA variant, per seed."""
  seeds, first = {}, None
  for run_dir in [d for d in run_dirs.split(',') if d]:
    res = _load_results(run_dir)
    first = first or (res, run_dir)
    arms = seeds.setdefault(str(res['seed']), {})
    score = lambda r: {'format': _r(r['format_compliance']), 'accuracy': _r(r['accuracy'])}
    for arm in ('base', 'sft'):
      if arm in arms and arms[arm] != score(res[arm]):
        raise MissingData(f'{run_dir}: its {arm} differs from another run of seed {res["seed"]}'
                          ' (not the same base and SFT)')
      arms[arm] = score(res[arm])
    if 'lora' in res:
      also = res['config']['instructions'].get('lora_also_train', '')
      arms[f'lora[{also}]'] = {**score(res['lora']),
                               'trainable': res.get('lora_trainable_params')}
  if first is None:
    raise MissingData('--instruction_sft: no run directory given')
  res, _ = first
  out = _meta('instruction_sft', res, run_dirs, commit, None)
  out.update(n=res['sft']['n'], seed=sorted(seeds), seeds=seeds,
             sft_trainable=res.get('sft_trainable_params'))
  return out


DPO_ARMS = ('dpo', 'rpo')


def _dpo_arm(res: dict) -> dict:
  """One arm of one seed from an experiments/dpo_instructions.py <arm>_results.json."""
  acc = lambda name: _r(res[name]['accuracy'])
  return {'sft_heldout': acc('sft'), 'heldout': acc('dpo'),
          'sft_train_questions': acc('sft_train_questions'),
          'train_questions': acc('dpo_train_questions'),
          'heldout_format': _r(res['dpo']['format_compliance']),
          'logps_chosen': [[s, _r(v)] for s, v in res['dpo_validation']['val_logps/chosen']]}


def extract_dpo_instructions(sources: str, commit: str | None = None) -> dict:
  """Comma-separated WORKDIRs of experiments/dpo_instructions.py (one per seed, holding
  dpo_results.json and rpo_results.json: arms `dpo` and `rpo`, the latter with dpo.rpo_alpha=1),
  or the per-seed summary docs/results/dpo_instructions.json (the same numbers, kept beside the
  results page)."""
  seeds, first = {}, None
  for source in [d for d in sources.split(',') if d]:
    if source.endswith('.json'):
      with open(source) as f:
        summary = json.load(f)
      for arm, per_seed in summary['arms'].items():
        for seed, v in per_seed.items():
          first = first or ({'date': v['date'], 'device': v['device'], 'config': {}}, source)
          seeds.setdefault(seed, {})[arm] = {
              'sft_heldout': _r(v['sft_heldout_accuracy']), 'heldout': _r(v['heldout_accuracy']),
              'sft_train_questions': _r(v['sft_train_q_accuracy']),
              'train_questions': _r(v['train_q_accuracy']),
              'heldout_format': _r(v['heldout_format']),
              'logps_chosen': _r(v['heldout_logps_chosen'])}
      continue
    for arm in DPO_ARMS:
      res = _arm_results(source, arm, f'the {arm} arm')
      first = first or (res, source)
      seeds.setdefault(str(res['seed']), {})[arm] = _dpo_arm(res)
  if first is None:
    raise MissingData('--dpo_instructions: no run directory given')
  res, _ = first
  out = _meta('dpo_instructions', res, sources, commit, None)
  out.update(seed=sorted(seeds), seeds=seeds)
  return out


KI_ARMS = ('prompt', 'static', 'modular', 'dynamic')
KI_MEASURES = ('new_accuracy', 'new_format', 'new_nll', 'old_accuracy', 'old_nll',
               'trainable_params', 'train_wall_s', 'prompt_tokens', 'retrieval_recall')


def extract_knowledge_injection(run_dirs: str, commit: str | None = None) -> dict:
  """Comma-separated run directories of experiments/knowledge_injection.py, one per seed."""
  seeds = {}
  first = None
  for run_dir in [d for d in run_dirs.split(',') if d]:
    res = _load_results(run_dir)
    first = first or (res, run_dir)
    seeds[str(res.get('seed'))] = {
        arm: {m: _r(v) for m, v in (
            ('new_accuracy', a['new']['accuracy']), ('new_format', a['new']['format_compliance']),
            ('new_nll', a['new']['answer_nll']), ('old_accuracy', a['old']['accuracy']),
            ('old_nll', a['old']['answer_nll']), ('trainable_params', a['trainable_params']),
            ('train_wall_s', _r(a['train_wall_s'], 1)),
            ('prompt_tokens', _r(a['new']['prompt_tokens'], 1)),
            ('retrieval_recall', a['retrieval_recall']))}
        for arm, a in res['arms'].items()}
  if first is None:
    raise MissingData('--knowledge_injection: no run directory given')
  res, run_dir = first
  out = _meta('knowledge_injection', res, run_dirs, commit, res.get('wall_s'))
  out.update(seed=sorted(seeds), n_new=res['arms']['prompt']['new']['n'],
             n_old=res['arms']['prompt']['old']['n'], seeds=seeds)
  return out


GRPO_ARMS = ('grpo', 'grpo_random', 'grpo_format_only')


def _arm_results(run_dir: str, name: str, how: str) -> dict:
  """WORKDIR/<name>_results.json of an experiment arm, or MissingData saying how to make it."""
  path = os.path.join(run_dir, f'{name}_results.json')
  if not os.path.isfile(path):
    raise MissingData(f'{path} not found: run {how} in {run_dir} first')
  with open(path) as f:
    return json.load(f)


def extract_grpo_instructions(run_dirs: str, commit: str | None = None) -> dict:
  """Comma-separated WORKDIRs of experiments/grpo_instructions.py, one per seed, each holding
  the <arm>_results.json of every arm in GRPO_ARMS."""
  seeds, first = {}, None
  for run_dir in [d for d in run_dirs.split(',') if d]:
    per_arm = {}
    for arm in GRPO_ARMS:
      res = _arm_results(run_dir, arm, f'the {arm} arm')
      first = first or (res, run_dir)
      per_arm['sft'] = {'heldout': _r(res['sft']['accuracy']),
                        'train_questions': _r(res['sft_train_questions']['accuracy'])}
      per_arm[arm] = {'heldout': _r(res[arm]['accuracy']),
                      'train_questions': _r(res[f'{arm}_train_questions']['accuracy']),
                      'format': _r(res[arm]['format_compliance']),
                      'reward': [[s, _r(v)] for s, v in res['curve']['reward']]}
    seeds[str(res['seed'])] = per_arm
  if first is None:
    raise MissingData('--grpo_instructions: no run directory given')
  res, run_dir = first
  out = _meta('grpo_instructions', res, run_dirs, commit, None)
  out.update(seed=sorted(seeds), n=res['sft']['n'], seeds=seeds)
  return out


ARITH_ARMS = ('grpo', 'grpo_random', 'grpo_wd1')  # grpo_wd1: rl.loss='wd1', the correct reward


def extract_grpo_arithmetic(run_dirs: str, commit: str | None = None,
                            name: str = 'grpo_arithmetic') -> dict:
  """Comma-separated WORKDIRs of experiments/grpo_instructions.py run with
  grpo_exp.kinds='arithmetic', one per seed; each arm of ARITH_ARMS whose
  <arm>_arithmetic_results.json is there is taken (a seed needs the 'grpo' arm)."""
  seeds, (res, _) = _arith_arms(run_dirs, ARITH_ARMS, name, ('reward', 'val_correct'),
                                required=('grpo',))
  config = res.get('config') or {}
  out = _meta(name, res, run_dirs, commit, None)
  out.update(source='experiments/grpo_instructions.py (grpo_exp.kinds=arithmetic)',
             seed=sorted(seeds), n=res['sft']['n'], seeds=seeds,
             base_steps=(config.get('train') or {}).get('steps'),
             grpo_steps=(config.get('grpo_exp') or {}).get('steps'))
  return out


def extract_grpo_arithmetic_long(run_dirs: str, commit: str | None = None) -> dict:
  """The same experiment from a longer-pretrained base (--config.train.steps=800) for 300 GRPO
  steps, with wd1 beside GRPO (docs/rl.md)."""
  return extract_grpo_arithmetic(run_dirs, commit, name='grpo_arithmetic_long')


def extract_grpo_arithmetic_unseen(run_dirs: str, commit: str | None = None) -> dict:
  """GRPO on arithmetic held out by problem (--config.instructions.split_by=subject): no
  held-out problem is asked in training (docs/rl.md); the held-out accuracy split by whether the
  pretraining corpus works the problem out."""
  out = extract_grpo_arithmetic(run_dirs, commit, name='grpo_arithmetic_unseen')
  split = {(d.get('config') or {}).get('instructions', {}).get('split_by')
           for d in [_arith_results(r) for r in run_dirs.split(',') if r]}
  if split != {'subject'}:
    raise ValueError(f'--grpo_arithmetic_unseen: the runs split by {sorted(map(str, split))}; '
                     "this figure is of instructions.split_by='subject' runs")
  for seed in out['seeds'].values():
    for arm in ('sft', 'grpo'):
      if 'problems' not in seed[arm]:
        raise MissingData('--grpo_arithmetic_unseen: the results have no problem/ groups '
                          '(rerun the experiment command: finished stages are only re-evaluated)')
  cfg = _arith_results(run_dirs.split(',')[0]).get('config') or {}
  out['num_arithmetic'] = cfg.get('instructions', {}).get('num_arithmetic')
  return out


def _arith_results(run_dir: str) -> dict:
  with open(os.path.join(run_dir, 'grpo_arithmetic_results.json')) as f:
    return json.load(f)


PAPRIKA_ARMS = ('base', 'sft', 'rpo')
PAPRIKA_KEYS = ('success_rate', 'mean_turns', 'illegal_rate', 'consistent_rate')
PAPRIKA_SHORT = {'guess_number': 'guess no.', 'twenty_questions': '20 questions'}


def extract_paprika(run_dirs: str, commit: str | None = None) -> dict:
  """Comma-separated WORKDIRs of experiments/paprika.py, one per seed (the same held-out game)."""
  seeds, first = {}, None
  for run_dir in [d for d in run_dirs.split(',') if d]:
    res = _load_results(run_dir)
    first = first or (res, run_dir)
    if res['heldout_game'] != first[0]['heldout_game']:
      raise ValueError(f'{run_dir} held out {res["heldout_game"]}, {first[1]} '
                       f'{first[0]["heldout_game"]}: one held-out game per figure')
    data = res['data']
    seeds[str(res['seed'])] = {
        'eval': {arm: {g: {k: _r(v[k]) for k in PAPRIKA_KEYS} | {'games': v['games']}
                       for g, v in res['eval'][arm].items()} for arm in PAPRIKA_ARMS},
        'data': {'sft_games': data['sft_games'], 'pairs': data['pairs'],
                 'trajectories': data['trajectories']},
        'diversity': {mode: {g: {**{k: _r(v) for k, v in d['diversity'][g].items()},
                                 **{k: _r(d['play'][g][k]) for k in PAPRIKA_KEYS}}
                             for g in d['diversity']}
                      for mode, d in data['diversity'].items()}}
  if first is None:
    raise MissingData('--paprika: no run directory given')
  res, run_dir = first
  out = _meta('paprika', res, run_dirs, commit, None)
  pc = res['config']['paprika']
  out.update(source='experiments/paprika.py', heldout_game=res['heldout_game'],
             sampling={k: pc[k] for k in ('temperature', 'min_p', 'eval_temperature')},
             random={g: {k: _r(v[k]) for k in PAPRIKA_KEYS}
                     for g, v in res['eval']['random'].items()},
             seed=sorted(seeds), seeds=seeds)
  return out

PATHWAY_STAGES = ('base', 'sft', 'dpo', 'grpo', 'grpo_random', 'grpo_format_only',
                  'llada_base', 'llada_sft', 'llada_vrpo', 'llada_grpo')


def extract_pathway(run_dirs: str, commit: str | None = None) -> dict:
  """Comma-separated WORKDIRs of experiments/pathway.py, one per seed: each stage's held-out
  accuracy and format compliance, the reward model's held-out pair accuracy, the GRPO arms'
  reward curves."""
  seeds, first = {}, None
  for run_dir in [d for d in run_dirs.split(',') if d]:
    res = _load_results(run_dir)
    first = first or (res, run_dir)
    stages = res['stages']
    seeds[str(res['seed'])] = {
        **{s: {'accuracy': _r(stages[s]['accuracy']),
               'format': _r(stages[s]['format_compliance'])}
           for s in PATHWAY_STAGES if stages.get(s, {}).get('accuracy') is not None},
        'rm_pair_accuracy': _r(res.get('rm_pair_accuracy')),
        'reward': {arm: [[s, _r(v)] for s, v in curve['reward']]
                   for arm, curve in res['grpo_curves'].items()},
        # the stages' own training times (a rerun that finds them finished takes seconds)
        'stage_time_s': _r(sum(e.get('train_wall_s') or 0.0 for e in stages.values()), 1)}
  if first is None:
    raise MissingData('--pathway: no run directory given')
  res, run_dir = first
  out = _meta('pathway', res, run_dirs, commit, seeds[str(res['seed'])]['stage_time_s'])
  out.update(seed=sorted(seeds), n=res['evaluated'], kinds=res['kinds'], seeds=seeds)
  return out


def _problem_groups(evaluation: dict) -> dict:
  """{'problems': {group: [correct, n]}} of the held-out arithmetic split by whether the
  pretraining corpus works the problem out and whether training asks it (results written since
  the evaluator reports the `problem/` groups); {} before."""
  groups = evaluation.get('groups') or {}
  got = {g: [round(v['correct'] * v['n']), v['n']] for g, v in groups.items()
         if g.startswith(('problem/', 'fact/'))}
  return {'problems': got} if any(g.startswith('problem/') for g in got) else {}


def _arith_arms(run_dirs: str, arms: tuple, name: str, keys: tuple,
                required: tuple | None = None) -> tuple[dict, tuple]:
  """{seed: {'sft': ..., arm: {...}}} of experiments/grpo_instructions.py arms run with
  grpo_exp.kinds='arithmetic' (the `required` arms, default all, must be there; the others are
  taken where they are), each with the curves of `keys`; and the first (results, run dir)."""
  seeds, first = {}, None
  for run_dir in [d for d in run_dirs.split(',') if d]:
    per_arm = {}
    for arm in arms:
      path = os.path.join(run_dir, f'{arm}_arithmetic_results.json')
      if not os.path.isfile(path):
        if required is None or arm in required:
          raise MissingData(f'{path} not found: run the {arm} arm with '
                            f'--config.grpo_exp.kinds=arithmetic in {run_dir} first')
        continue
      with open(path) as f:
        res = json.load(f)
      first = first or (res, run_dir)
      full = f'{arm}_arithmetic'
      per_arm['sft'] = {'heldout': _r(res['sft']['accuracy']),
                        'train_questions': _r(res['sft_train_questions']['accuracy']),
                        **_problem_groups(res['sft'])}
      rl = (res.get('config') or {}).get('rl') or {}
      per_arm[arm] = {'heldout': _r(res[full]['accuracy']), **_problem_groups(res[full]),
                      'train_questions': _r(res[f'{full}_train_questions']['accuracy']),
                      'beta': rl.get('beta'), 'reset_every': rl.get('reset_every'),
                      'train_s': _r(res['wall_s'].get(f'{full}_train_s'), 1),
                      **{k: [[st, _r(v)] for st, v in res['curve'].get(k) or []]
                         for k in keys}}
    seeds[str(res['seed'])] = per_arm
  if first is None:
    raise MissingData(f'--{name}: no run directory given')
  return seeds, first


PRORL_ARMS = ('grpo_kl', 'grpo_kl_reset')


def extract_prorl(run_dirs: str, commit: str | None = None) -> dict:
  """ProRL's reference resets against the same KL-regularised GRPO without them: the arms
  grpo_kl and grpo_kl_reset of experiments/grpo_instructions.py on arithmetic, one WORKDIR per
  seed (docs/rl.md)."""
  seeds, (res, _) = _arith_arms(run_dirs, PRORL_ARMS, 'prorl',
                                ('val_correct', 'kl', 'reward', 'entropy', 'reference_reset'))
  config = res.get('config') or {}
  out = _meta('prorl', res, run_dirs, commit, None)
  out.update(source='experiments/grpo_instructions.py (grpo_exp.kinds=arithmetic)',
             seed=sorted(seeds), n=res['sft']['n'], seeds=seeds,
             base_steps=(config.get('train') or {}).get('steps'),
             grpo_steps=(config.get('grpo_exp') or {}).get('steps'))
  return out


RPT_MODELS = ('base', 'rpt', 'rpt_random', 'ntp', 'sft_hard')
RPT_SETS = ('validation_hard', 'validation_random', 'train')


def extract_rpt(run_dirs: str, commit: str | None = None) -> dict:
  """Comma-separated WORKDIRs of experiments/rpt.py, one per seed: each model's greedy
  next-token accuracy and true-token NLL per prompt set, each arm's change from the base (paired
  by seed), the training curves and wall times."""
  seeds, first, wall = {}, None, 0.0
  runs = [_load_results(d) for d in run_dirs.split(',') if d]
  # the models every seed scored (the sft_hard arm came later), in RPT_MODELS' order
  models = [m for m in RPT_MODELS if all(m in res['scores'] for res in runs)]
  for run_dir, res in zip([d for d in run_dirs.split(',') if d], runs):
    first = first or (res, run_dir)
    seed = str(res['seed'])
    if seed in seeds:
      raise MissingData(f'rpt: seed {seed} given twice ({run_dir})')
    seeds[seed] = {'scores': {m: {s: {k: _r(v) for k, v in res['scores'][m][s].items()}
                                  for s in RPT_SETS} for m in models},
                   'counts': {k: v for k, v in res['counts'].items() if k != 'mean_entropy'},
                   'mean_entropy': {k: _r(v) for k, v in res['counts']['mean_entropy'].items()},
                   'curves': {a: {k: [[s, _r(v)] for s, v in c] for k, c in curves.items()}
                              for a, curves in res['curves'].items()},
                   'wall_s': {k: _r(v, 1) for k, v in res['wall_s'].items()}}
    wall += res['wall_s']['total_s']
  if not seeds:
    raise MissingData('rpt: no run directory given')
  res, run_dir = first
  summary = {}
  for m in models:
    for s in RPT_SETS:
      for k in ('accuracy', 'exact', 'nll'):
        if not all(k in v['scores'][m][s] for v in seeds.values()):
          continue  # 'exact' came later
        vals = [v['scores'][m][s][k] for v in seeds.values()]
        summary.setdefault(m, {}).setdefault(s, {})[k] = _mean_sd(vals)
        if m != 'base':
          delta = [v['scores'][m][s][k] - v['scores']['base'][s][k] for v in seeds.values()]
          summary[m][s][f'{k}_change'] = _mean_sd(delta)
  out = _meta('rpt', res, run_dir, commit, wall)
  e = (res.get('config') or {}).get('rpt_exp') or {}
  out.update(seed=sorted(seeds), seeds=seeds, models=models, summary=summary,
             base_steps=e.get('base_steps'), steps=e.get('steps'), lr=e.get('lr'),
             prompts=e.get('prompts'),
             generations=((res.get('config') or {}).get('rl') or {}).get('num_generations'))
  return out
