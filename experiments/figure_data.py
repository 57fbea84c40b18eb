"""The figures' data files: each experiment's numbers copied from its finished run directories
(`extract_<experiment>`) into docs/results/data/<experiment>.json, and read back (`load_data`).
experiments/figures.py draws from them; see its docstring for the command line.

Needs nothing beyond the standard library (not JAX, not matplotlib).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess

EXPERIMENTS = ('rho1', 'gstack', 'reversal', 'instruction_sft', 'dpo_instructions',
               'knowledge_injection', 'grpo_instructions', 'grpo_arithmetic', 'paprika',
               'pathway', 'scaling')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, 'docs', 'results', 'data')


class MissingData(FileNotFoundError):
  """A data file or a run's results.json is not there."""


def _r(x, nd=4):
  """Rounds floats (and nested lists of them) so the data files stay small and diffable."""
  if isinstance(x, float):
    return round(x, nd)
  if isinstance(x, (list, tuple)):
    return [_r(v, nd) for v in x]
  return x


def _load_results(run_dir: str) -> dict:
  path = os.path.join(run_dir, 'results.json')
  if not os.path.isfile(path):
    raise MissingData(f'{path} not found: is {run_dir} a finished run directory?')
  with open(path) as f:
    res = json.load(f)
  if res.get('status', 'completed') != 'completed':
    raise MissingData(f'{path}: the run is not finished (status {res.get("status")!r})')
  return res


def _commit() -> str | None:
  try:
    return subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def _device(dev) -> str:
  if isinstance(dev, dict):  # rho1/gstack write jax's device fields
    return (f'{dev.get("platform")} x{dev.get("count")} ({dev.get("machine")}, '
            f'{dev.get("cpus")} cores)')
  return str(dev)


def _meta(name: str, res: dict, run_dir: str, commit: str | None, wall_s) -> dict:
  return {'experiment': name, 'source': f'experiments/{name}.py', 'run_dir': run_dir,
          'date': res.get('date'), 'device': _device(res.get('device')),
          # Runs do not record their commit: this is --commit, else HEAD when the data was saved.
          'commit': commit or _commit(), 'wall_s': _r(wall_s, 1),
          'seed': (res.get('config') or {}).get('seed')}


# ---------------------------------------------------------------------------- run dir -> data

def extract_rho1(run_dir: str, commit: str | None = None) -> dict:
  res = _load_results(run_dir)

  def family(fam: dict) -> dict:
    arms = {}
    for arm, a in fam['arms'].items():
      arms[arm] = {'final': _r(a['val']), 'curve': _r(a['curve']),
                   'token_savings': _r(a.get('token_savings'), 3),
                   'noise_share_kept': _r(a.get('noise_share_kept'), 3),
                   'noise_dropped': _r(a.get('noise_recall_dropped'), 3)}
    return {'ref_val': _r(fam['ref_val']), 'arms': arms}

  out = _meta('rho1', res, run_dir, commit, res.get('wall_s'))
  noise = ((res.get('config') or {}).get('data') or {}).get('noise') or {}
  out.update(tokens_per_arm=res.get('tokens_per_arm'), noise_fraction=noise.get('fraction'),
             token_savings=_r(res.get('token_savings'), 3),
             autoregressive=family(res['autoregressive']))
  if 'llada' in res:
    out['llada'] = family(res['llada'])
    out['llada_token_savings'] = _r(res.get('llada_token_savings'), 3)
  return out


def extract_gstack(run_dir: str, commit: str | None = None) -> dict:
  res = _load_results(run_dir)

  def family(arms: dict, scratch_name: str) -> dict:
    scratch = arms.get(scratch_name)
    step_flops = scratch['flops'] / scratch['steps'] if scratch else None  # a target-size step
    out = {}
    for name, e in arms.items():
      if not isinstance(e, dict):  # llada's 'speedup' entry
        continue
      entry = {'final': _r(e['final_val']), 'flops': e['flops'], 'steps': e['steps'],
               'speedup': _r(e.get('speedup'), 3), 'curve': _r(e['curve'])}
      g = e.get('growth')
      if g and step_flops:
        # FLOPs spent before the growth: all of the arm's FLOPs but its target-size steps.
        entry['growth'] = {'at_step': g['at_step'],
                           'flops': e['flops'] - step_flops * (e['steps'] - g['at_step']),
                           'val_before': _r(g.get('val_loss_before')),
                           'val_after': _r(g.get('val_loss_after'))}
      out[name] = entry
    return out

  out = _meta('gstack', res, run_dir, commit, res.get('wall_s'))
  out.update(small_layers=res.get('small_layers'), target_layers=res.get('target_layers'),
             scratch_final=_r(res.get('scratch_final_val')), speedup=_r(res.get('speedup'), 3),
             arms=family(res['arms'], 'scratch'))
  if res.get('llada'):
    out['llada'] = family(res['llada'], 'llada_scratch')
    out['llada_speedup'] = _r(res['llada'].get('speedup'), 3)
  return out


REVERSAL_METRICS = ('forward', 'forward_heldout', 'reverse', 'reverse_heldout', 'infill_reverse',
                    'rank_reverse')


def _checks(run_dir: str) -> list:
  """(step, forward exact match) of every check a model's run directory logged."""
  from pathways_jax.train import metrics  # pylint: disable=g-import-not-at-top
  return [[s, _r(a)] for s, a in metrics.logged(run_dir, 'check_forward')]


def _reversal_models(res: dict, run_dir: str) -> dict:
  models = {}
  for model, prefix, suffix in (('ar', 'ar_', ''), ('llada', 'llada_', ''),
                                ('llada_control', 'llada_', '_control')):
    if f'{prefix}forward{suffix}' not in res:
      continue
    m = {k: _r(res.get(f'{prefix}{k}{suffix}')) for k in REVERSAL_METRICS}
    m['steps'] = res.get(f'{model}_steps')
    m['steps_to_target'] = res.get(f'{model}_steps_to_target')
    m['train_seconds'] = res.get(f'{model}_train_seconds')
    # The control's checks are only in its run directory's metrics.jsonl (not in results.json).
    checks = _checks(os.path.join(run_dir, model))
    m['forward_checks'] = checks or _r(res.get(f'{model}_forward_checks') or [])
    models[model] = m
  return models


def reversal_setting(res: dict) -> str:
  """A run's setting: 'default', or what it changed ('facts file people.jsonl',
  'name_first_templates=4', ...), from the keys its results.json records."""
  parts = [f'facts file {os.path.basename(res["facts_file"])}'] if res.get('facts_file') else []
  parts += [f'{k.split(".")[-1]}={v}' for k, v in (res.get('changed_from_defaults') or {}).items()]
  return ', '.join(parts) or 'default'


def _mean_sd(values: list) -> dict:
  vals = [v for v in values if v is not None]
  if not vals:
    return {'mean': None, 'sd': None, 'n': 0}
  sd = statistics.stdev(vals) if len(vals) > 1 else None  # sample sd (ddof=1)
  return {'mean': _r(statistics.mean(vals)), 'sd': _r(sd), 'n': len(vals)}


def extract_reversal(run_dirs: str, commit: str | None = None) -> dict:
  """Comma-separated WORKDIRs of experiments/reversal.py, grouped by setting (the default, a facts
  file, each ablation) and seed; per setting, the mean and spread (sd, ddof=1) over seeds."""
  settings, first, wall = {}, None, 0.0
  for run_dir in [d for d in run_dirs.split(',') if d]:
    res = _load_results(run_dir)
    first = first or (res, run_dir)
    seed = str((res.get('config') or {}).get('seed'))
    setting = settings.setdefault(reversal_setting(res), {'seeds': {}})
    if seed in setting['seeds']:
      raise MissingData(f'{run_dir}: a second run of seed {seed} in setting '
                        f'{reversal_setting(res)!r}')
    setting['seeds'][seed] = _reversal_models(res, run_dir)
    setting['num_test'] = res.get('num_test')
    wall += sum(res.get(f'{k}_train_seconds') or 0.0 for k in ('ar', 'llada', 'llada_control'))
  if first is None:
    raise MissingData('--reversal: no run directory given')
  for setting in settings.values():
    setting['seeds'] = dict(sorted(setting['seeds'].items()))
    models = sorted({m for per in setting['seeds'].values() for m in per},
                    key=('ar', 'llada', 'llada_control').index)
    setting['summary'] = {
        m: {k: _mean_sd([per[m].get(k) for per in setting['seeds'].values() if m in per])
            for k in REVERSAL_METRICS} for m in models}
  res, _ = first
  out = _meta('reversal', res, run_dirs, commit, wall)  # wall: every model's training time
  out.update(seed=sorted({s for st in settings.values() for s in st['seeds']}),
             settings=settings)
  return out


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


ARITH_ARMS = ('grpo', 'grpo_random')


def extract_grpo_arithmetic(run_dirs: str, commit: str | None = None) -> dict:
  """Comma-separated WORKDIRs of experiments/grpo_instructions.py run with
  grpo_exp.kinds='arithmetic', one per seed; each arm of ARITH_ARMS whose
  <arm>_arithmetic_results.json is there is taken (a seed needs the 'grpo' arm)."""
  seeds, first = {}, None
  for run_dir in [d for d in run_dirs.split(',') if d]:
    per_arm = {}
    for arm in ARITH_ARMS:
      path = os.path.join(run_dir, f'{arm}_arithmetic_results.json')
      if not os.path.isfile(path):
        if arm == 'grpo':
          raise MissingData(f'{path} not found: run the grpo arm with '
                            f'--config.grpo_exp.kinds=arithmetic in {run_dir} first')
        continue
      with open(path) as f:
        res = json.load(f)
      first = first or (res, run_dir)
      name = f'{arm}_arithmetic'
      per_arm['sft'] = {'heldout': _r(res['sft']['accuracy']),
                        'train_questions': _r(res['sft_train_questions']['accuracy'])}
      per_arm[arm] = {'heldout': _r(res[name]['accuracy']),
                      'train_questions': _r(res[f'{name}_train_questions']['accuracy']),
                      'reward': [[s, _r(v)] for s, v in res['curve']['reward']],
                      'val_correct': [[s, _r(v)] for s, v in res['curve'].get('val_correct') or []]}
    seeds[str(res['seed'])] = per_arm
  if first is None:
    raise MissingData('--grpo_arithmetic: no run directory given')
  res, run_dir = first
  out = _meta('grpo_arithmetic', res, run_dirs, commit, None)
  out.update(source='experiments/grpo_instructions.py (grpo_exp.kinds=arithmetic)',
             seed=sorted(seeds), n=res['sft']['n'], seeds=seeds)
  return out


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


def extract_scaling(run_dir: str, commit: str | None = None) -> dict:
  """The isoFLOP study's points (mean and sd over seeds), minima, laws, multipliers and task."""
  res = _load_results(run_dir)
  groups = {}
  for p in res['points']:
    key = (p['objective'], p['budget'], p['size'])
    groups.setdefault(key, {'params': p['params'], 'loss': [], 'task': []})
    groups[key]['loss'].append(p['val_loss'])
    if 'task' in p:
      groups[key]['task'].append(p['task']['accuracy'])
  points = [{'objective': o, 'budget': b, 'size': z, 'params': g['params'],
             'seeds': len(g['loss']), 'loss': _mean_sd(g['loss']),
             'task': _mean_sd(g['task']) if g['task'] else None}
            for (o, b, z), g in groups.items()]
  # The study's compute is its runs' (sharded runs overlap; the final analysis run is seconds).
  out = _meta('scaling', res, run_dir, commit, sum(p.get('wall_s', 0) for p in res['points']))
  out.update(seeds=res['config']['scaling']['seeds'], points=points,
             minima={o: [{k: _r(v) for k, v in m.items()} for m in ms]
                     for o, ms in res['minima'].items()},
             laws={o: {'a': _r(law['a']), 'b': _r(law['b'])} for o, law in res['laws'].items()},
             multiplier=[{k: _r(v) for k, v in m.items()} for m in res['multiplier']],
             task=res['config']['scaling'].get('task') or None)
  return out


EXTRACT = {'rho1': extract_rho1, 'gstack': extract_gstack, 'reversal': extract_reversal,
           'instruction_sft': extract_instruction_sft,
           'dpo_instructions': extract_dpo_instructions,
           'knowledge_injection': extract_knowledge_injection,
           'grpo_instructions': extract_grpo_instructions,
           'grpo_arithmetic': extract_grpo_arithmetic, 'paprika': extract_paprika,
           'pathway': extract_pathway, 'scaling': extract_scaling}


def save_data(name: str, data: dict, data_dir: str = DATA_DIR) -> str:
  os.makedirs(data_dir, exist_ok=True)
  path = os.path.join(data_dir, f'{name}.json')
  with open(path, 'w') as f:
    f.write(_dumps(data) + '\n')
  return path


def _dumps(x, indent: str = '') -> str:
  """JSON with one key per line and each list on one line (a curve is one line to diff)."""
  if isinstance(x, dict) and x:
    inner = indent + '  '
    items = [f'{inner}{json.dumps(k)}: {_dumps(v, inner)}' for k, v in x.items()]
    return '{\n' + ',\n'.join(items) + f'\n{indent}}}'
  return json.dumps(x, separators=(', ', ': '))


def load_data(name: str, data_dir: str = DATA_DIR) -> dict:
  path = os.path.join(data_dir, f'{name}.json')
  if not os.path.isfile(path):
    raise MissingData(f'{path} not found: make it from a finished run with '
                      f'`python experiments/figures.py --{name}=runs/{name}`')
  with open(path) as f:
    return json.load(f)
