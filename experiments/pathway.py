"""The whole post-training pathway in one run, on one verifiable task, for AR and LLaDA.

    python -m pathways_jax.main --config=experiments/pathway.py --workdir=runs/pathway \
        [--config.seed=1 --config.pathway.chains=ar --config.pathway.kinds=arithmetic ...]

Every stage starts from the run directory of the one before it (`train.init_from`):

  AR     base -> sft -> rm (reward model, scored on held-out pairs)
                     -> dpo (RPO: + the chosen NLL) -> grpo      (the checker's verdict)
                                                   -> grpo_random       (control: a coin)
                                                   -> grpo_format_only  (control: format)
  LLaDA  llada_base -> llada_sft -> llada_vrpo -> llada_grpo (diffu-GRPO, the checker's verdict)

The task is the instruction set's questions of `pathway.kinds` (arithmetic by default: a
reward can raise its answers, where most other kinds ask for facts a model that never read them
cannot know, docs/rl.md; a held-out question is a phrasing training never uses, mostly of a
problem that training asks in other words). SFT trains on the
whole instruction set (the answer formats, the chat template); the preference pairs, DPO/VRPO
and GRPO train on the task's training questions; every stage is scored, greedily, on the task's
held-out questions (`pathways_jax.eval.instructions`: accuracy and format compliance), which no
stage trains on. The preference pairs are each chain's own SFT model's sampled answers, marked
right or wrong by the checker (as experiments/dpo_instructions.py makes them).

The settings of each stage are those of the single-stage experiments this one chains:
instruction_sft (`instructions`: the world, base and SFT), dpo_instructions (`dpo_exp`, `dpo`:
pairs and DPO; VRPO uses the same with `vrpo`), reward_instructions (`rm`, `reward_model`) and
grpo_instructions (`grpo_exp`, `rl`). `pathway` holds what is new: the chains, the task, and the
LLaDA chain's own step counts.

`pathway.llada_from_ar`: llada_base adapts the AR chain's base (bidirectional attention, shifted
logits: model.shift_logits) for `pathway.llada_base_steps` instead of training from scratch; the
AR base is trained for it when the AR chain does not run. `pathway.llada_anneal_steps` anneals
its attention from causal to full over that many steps first (train.attention_anneal_steps),
and `pathway.llada_base_lr` gives it its own learning rate. `pathway.stop_after=STAGE` ends the
run after that stage (e.g. `llada_base`: the bases only, for `experiments/arithmetic_recall.py`).

A chain whose SFT model gives no preference pair (every training question answered all right or
all wrong in `dpo_exp.samples` draws) skips its preference stages, says so, and records them as
skipped; its RL stage then starts from the SFT model. Without held-out pairs, they train with
no validation.

Each stage is skipped once finished (a run directory whose results.json says completed; pairs
once written), so the same command resumes. WORKDIR may be an instruction_sft / dpo_instructions
workdir of the same config and seed: base and sft are then reused.

WORKDIR/results.json: per stage, held-out accuracy, format compliance, counts and what it
started from (`stages`); the issue's keys (`sft_accuracy`, `rm_pair_accuracy`, `dpo_accuracy`,
`grpo_accuracy`, `grpo_random_reward_accuracy`, `grpo_format_only_accuracy`,
`llada_sft_accuracy`, `llada_vrpo_accuracy`, `llada_grpo_accuracy`); the GRPO arms' reward
curves; pair counts, wall times, date, device, config.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import time

import ml_collections

from pathways_jax import config as config_lib
from pathways_jax import config_files

_HERE = os.path.dirname(os.path.abspath(__file__))
_load = lambda name: config_files.load_config_module(os.path.join(_HERE, f'{name}.py'))
instruction_sft = _load('instruction_sft')
dpo_instructions = _load('dpo_instructions')
reward_instructions = _load('reward_instructions')
grpo_instructions = _load('grpo_instructions')

CHAINS = ('ar', 'llada')
PREFERENCE_TASKS = ('reward_model', 'dpo', 'vrpo')  # trained on the chain's pairs
GRPO_ARMS = ('grpo', 'grpo_random', 'grpo_format_only')  # grpo_instructions.ARMS' rewards
# results.json's flat keys: held-out accuracy of a stage, by the names.
ACCURACY_KEYS = {'sft': 'sft_accuracy', 'dpo': 'dpo_accuracy', 'grpo': 'grpo_accuracy',
                 'grpo_random': 'grpo_random_reward_accuracy',
                 'grpo_format_only': 'grpo_format_only_accuracy',
                 'llada_sft': 'llada_sft_accuracy', 'llada_vrpo': 'llada_vrpo_accuracy',
                 'llada_grpo': 'llada_grpo_accuracy'}


def get_config():
  c = reward_instructions.get_config()  # instructions, dpo_exp, dpo, rm, reward_model
  c.name = 'pathway'
  c.grpo_exp = grpo_instructions.get_config().grpo_exp
  c.rl.num_generations = 8
  c.rl.max_new_tokens = 24
  c.rl.temperature = 1.0
  c.rl.eval_max = 128
  c.instructions.lora_rank = 0  # the pathway fine-tunes all params (LoRA: instruction_sft)
  # The base pretrains 4x instruction_sft's 400 steps: the SFT model then answers 30-50% of the
  # held-out arithmetic (0.13 after 400 steps, seed 0), where GRPO's gain is asked for.
  c.train.steps = 1600
  c.train.eval_every = c.train.checkpoint_every = 800
  # DPO with the chosen answer's NLL beside it (RPO): plain DPO lowers this model's accuracy and
  # format on every seed, RPO raises them (docs/preference.md); VRPO reads the same setting.
  c.dpo.rpo_alpha = 1.0
  c.pathway = p = ml_collections.ConfigDict()
  p.chains = 'ar,llada'  # which chains run (CHAINS)
  p.kinds = 'arithmetic'  # the task: question kinds of the instruction set ('' = all)
  p.llada_base_steps = 1600  # LLaDA's pretraining, as long as the AR base's
  p.llada_sft_steps = 800
  p.llada_sft_lr = 4e-3
  # The LLaDA base adapts the AR chain's base (model.shift_logits, as Dream-7B and DiffuLLaMA
  # start from AR checkpoints) for llada_base_steps instead of training from scratch; the AR
  # base is trained for it when the AR chain does not run.
  p.llada_from_ar = False
  # With llada_from_ar: DiffuLLaMA's attention-mask annealing over this many of the adaptation's
  # steps (train.attention_anneal_steps; 0: full attention from the first step).
  p.llada_anneal_steps = 0
  # The LLaDA base's peak learning rate (0: train.lr, which the AR base also takes). An adapted
  # base keeps the AR one's memory at 1e-4 and loses it within 25 steps at 3e-3 (docs/rl.md).
  p.llada_base_lr = 0.0
  # Stop after this stage ('' = run every stage): e.g. 'llada_base' trains the bases only. The
  # results file then says status 'stopped' and which stage the run stopped after.
  p.stop_after = ''
  # DPO's and VRPO's steps: this many passes over the chain's own training pairs (dpo_exp.steps
  # is ignored here). The task's few hundred pairs would otherwise be seen ~24 times in
  # dpo_exp.steps=200, which took held-out accuracy from 0.57 to 0.20 (seed 1);
  # dpo_instructions' 200 steps are 2.7 passes over its ~2300 pairs.
  p.preference_epochs = 3.0
  # diffu-GRPO's steps (the AR GRPO takes grpo_exp.steps): each LLaDA rollout decodes its
  # completions with max_new_tokens full-row forward passes (no KV cache); a step took 4-5x an
  # AR GRPO step on the 2-core CPU (docs/rl.md).
  p.llada_grpo_steps = 30
  # Fast-dLLM rollouts for diffu-GRPO (rl.diffusion_cache / rl.diffusion_threshold, in blocks of
  # llada_grpo_block_length; 0 / '' / 0: one block, no cache, the step schedule, as above).
  p.llada_grpo_block_length = 0
  p.llada_grpo_cache = ''
  p.llada_grpo_threshold = 0.0
  # diffu-GRPO's log-prob estimator and loss (rl.diffusion_estimator, rl.loss: e.g. 'trace' for
  # TraceRL, loss 'spg' for SPG, 'elbo' with 'gspo' for ESPO); the AR arms keep rl's own.
  p.llada_grpo_estimator = 'd1'
  p.llada_grpo_loss = 'clip'
  return c


def _chains(cfg) -> tuple[str, ...]:
  chains = tuple(x.strip() for x in cfg.pathway.chains.split(',') if x.strip())
  bad = sorted(set(chains) - set(CHAINS))
  if bad or not chains:
    raise config_lib.ConfigError(f'config.pathway.chains={cfg.pathway.chains!r}: name one or '
                                 f'more of {CHAINS}, comma-separated')
  return chains


def check(cfg) -> tuple[str, ...]:
  """Every setting the stages read, before any stage runs; returns the chains."""
  chains = _chains(cfg)
  dpo_instructions.check_settings(cfg.dpo_exp, 'dpo_exp', (
      'samples', 'pairs_per_question', 'steps', 'lr', 'batch_size', 'eval_every'),
                                  ('temperature',))
  dpo_instructions.check_settings(cfg.rm, 'rm', ('steps', 'lr', 'batch_size', 'eval_every'))
  dpo_instructions.check_settings(cfg.grpo_exp, 'grpo_exp', (
      'steps', 'lr', 'prompts', 'prompt_len', 'eval_every'))
  dpo_instructions.check_settings(cfg.pathway, 'pathway', (
      'llada_base_steps', 'llada_sft_steps', 'llada_sft_lr', 'preference_epochs',
      'llada_grpo_steps'))
  p = cfg.pathway
  if (p.llada_grpo_cache not in ('', 'prefix', 'dual') or not 0 <= p.llada_grpo_threshold < 1
      or p.llada_grpo_block_length < 0):
    raise config_lib.ConfigError(
        "config.pathway: need llada_grpo_cache in ('', 'prefix', 'dual'), 0 <= "
        'llada_grpo_threshold < 1 and llada_grpo_block_length >= 0; got '
        f'{p.llada_grpo_cache!r}, {p.llada_grpo_threshold}, {p.llada_grpo_block_length}')
  from pathways_jax import config_post_training  # pylint: disable=g-import-not-at-top
  estimators, losses = ('d1', 'coupled', 'elbo', 'trace'), config_post_training.CHOICES['rl.loss']
  if p.llada_grpo_estimator not in estimators or p.llada_grpo_loss not in losses:
    raise config_lib.ConfigError(
        f'config.pathway: need llada_grpo_estimator in {estimators} and llada_grpo_loss in '
        f'{losses}; got {p.llada_grpo_estimator!r}, {p.llada_grpo_loss!r}')
  if p.llada_base_lr < 0:
    raise config_lib.ConfigError(f'config.pathway.llada_base_lr must be >= 0 (0: train.lr), got '
                                 f'{p.llada_base_lr}')
  if p.llada_anneal_steps < 0 or (p.llada_anneal_steps and not p.llada_from_ar):
    raise config_lib.ConfigError(
        'config.pathway.llada_anneal_steps anneals the attention of a LLaDA base adapted from '
        f'the AR one: it needs llada_from_ar=True and a value >= 0; got {p.llada_anneal_steps} '
        f'with llada_from_ar={p.llada_from_ar}')
  return chains


def task_examples(cfg, examples: dict) -> dict:
  """The instruction set's splits restricted to `pathway.kinds`, each split non-empty."""
  return grpo_instructions.examples_of_kinds(examples, cfg.pathway.kinds, 'pathway.kinds')[0]


def llada_config_of(cfg):
  """The same world, network and data as the AR chain, as a LLaDA model (bidirectional, MHA as
  LLaDA, its masked-diffusion loss), pretrained for `pathway.llada_base_steps`."""
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-llada'
  c.objective = 'diffusion'
  c.model.causal = False
  c.model.num_kv_heads = c.model.num_heads
  c.train.steps = cfg.pathway.llada_base_steps
  c.train.lr = cfg.pathway.llada_base_lr or cfg.train.lr
  c.train.eval_every = c.train.checkpoint_every = min(cfg.train.eval_every, c.train.steps)
  c.instructions.sft_steps = cfg.pathway.llada_sft_steps
  c.instructions.sft_lr = cfg.pathway.llada_sft_lr
  return c


def make_pairs(cfg, sft_dir: str, task: dict, pairs_dir: str) -> dict:
  """(right, wrong) pairs of the SFT model's own sampled answers to the task's training and
  held-out questions -> pairs_dir/{train,heldout}.jsonl (held-out: validation only; a split
  without a pair has no file); counts. Written once (pairs_dir/counts.json)."""
  counts_path = os.path.join(pairs_dir, 'counts.json')
  if not os.path.exists(counts_path):
    os.makedirs(pairs_dir, exist_ok=True)
    counts, t0 = {}, time.perf_counter()
    for split, salt in (('train', 0), ('heldout', 1)):
      answers = dpo_instructions._answers(sft_dir, task[split], cfg, seed=cfg.seed * 1000 + salt)  # pylint: disable=protected-access
      records, counts[split] = dpo_instructions.make_pairs(
          task[split], answers, per_question=cfg.dpo_exp.pairs_per_question, seed=cfg.seed)
      if records:  # none: no question got both a right and a wrong answer (run() says so)
        dpo_instructions._write_jsonl(records, os.path.join(pairs_dir, f'{split}.jsonl'))  # pylint: disable=protected-access
      print(f'pairs ({split}) from {sft_dir}: {counts[split]}')
    with open(counts_path, 'w') as f:
      json.dump({**counts, 'wall_s': time.perf_counter() - t0}, f, indent=2)
  with open(counts_path) as f:
    return json.load(f)


def set_epochs(stage_cfg, start_dir: str, epochs: float) -> None:
  """Sets a preference stage's steps to `epochs` passes over its training rows (pairs packed as
  the task packs them, with the start model's tokenizer)."""
  from pathways_jax.data import preference, tokenizers  # pylint: disable=g-import-not-at-top,multiple-import
  data = copy.deepcopy(config_files.load_run_config(start_dir).data)
  data.update(path=stage_cfg.data.path, validation_path=stage_cfg.data.validation_path,
              seq_len=stage_cfg.data.seq_len)
  _, stats = preference.load_rows(data, tokenizers.get_tokenizer(data), 'train')
  steps = max(1, math.ceil(epochs * stats['rows'] / stage_cfg.data.batch_size))
  stage_cfg.train.update(steps=steps, warmup_steps=min(10, steps // 10),
                         eval_every=min(stage_cfg.train.eval_every, steps), checkpoint_every=steps)


def grpo_config_of(cfg, arm: str, task_dir: str, start_dir: str):
  c = copy.deepcopy(cfg)
  c.grpo_exp.arm = arm
  c.rl.rewards = ''  # the arm's own (grpo_instructions.ARMS)
  return grpo_instructions.grpo_config_of(c, task_dir, start_dir)


def ar_stages(cfg, workdir: str, paths: dict, task_dir: str) -> list[tuple[str, str, object]]:
  """[(stage, start stage, config)] of the AR chain after sft, in order."""
  pairs_dir = os.path.join(workdir, 'pairs')
  d = lambda name: os.path.join(workdir, name)
  stages = [('base', '', instruction_sft.base_config_of(cfg)),
            ('sft', 'base', instruction_sft.sft_config_of(cfg, paths['train'], d('base'))),
            ('pairs', 'sft', None),
            ('rm', 'sft', reward_instructions.rm_config_of(
                cfg, os.path.join(pairs_dir, 'train.jsonl'),
                os.path.join(pairs_dir, 'heldout.jsonl'), d('sft'))),
            ('dpo', 'sft', dpo_instructions.dpo_config_of(cfg, pairs_dir, d('sft')))]
  stages += [(arm, 'dpo', grpo_config_of(cfg, arm, task_dir, d('dpo'))) for arm in GRPO_ARMS]
  return stages


def llada_stages(cfg, workdir: str, paths: dict, task_dir: str) -> list[tuple[str, str, object]]:
  """[(stage, start stage, config)] of the LLaDA chain, in order."""
  lc = llada_config_of(cfg)
  pairs_dir = os.path.join(workdir, 'llada_pairs')
  d = lambda name: os.path.join(workdir, name)
  base = instruction_sft.base_config_of(lc)
  if cfg.pathway.llada_from_ar:
    base.name = f'{lc.name}-from-ar'
    base.train.init_from = os.path.abspath(d('base'))
    base.model.shift_logits = True
    base.train.attention_anneal_steps = cfg.pathway.llada_anneal_steps
  sft = instruction_sft.sft_config_of(lc, paths['train'], d('llada_base'))
  sft.task = 'llada_sft'
  # LLaDA's SFT: one conversation per row, eos-padded, the padding trained like the answer (how
  # the model learns where an answer ends: the sampler fills every generated position).
  sft.data.chat.update(pack=False, eos_padding=True)
  vrpo = dpo_instructions.dpo_config_of(lc, pairs_dir, d('llada_sft'))
  vrpo.name = f'{lc.name}-vrpo'
  vrpo.task = 'vrpo'
  grpo = grpo_config_of(lc, 'grpo', task_dir, d('llada_vrpo'))
  steps = cfg.pathway.llada_grpo_steps
  grpo.rl.update(block_length=cfg.pathway.llada_grpo_block_length,
                 diffusion_cache=cfg.pathway.llada_grpo_cache,
                 diffusion_threshold=cfg.pathway.llada_grpo_threshold,
                 diffusion_estimator=cfg.pathway.llada_grpo_estimator,
                 loss=cfg.pathway.llada_grpo_loss)
  grpo.train.update(steps=steps, eval_every=min(grpo.train.eval_every, steps),
                    checkpoint_every=min(grpo.train.checkpoint_every, steps),
                    warmup_steps=min(grpo.train.warmup_steps, steps // 10))
  return [('llada_base', '', base), ('llada_sft', 'llada_base', sft),
          ('llada_pairs', 'llada_sft', None), ('llada_vrpo', 'llada_sft', vrpo),
          ('llada_grpo', 'llada_vrpo', grpo)]


def run(cfg, workdir: str) -> dict:
  from pathways_jax.data import instructions  # pylint: disable=g-import-not-at-top
  from pathways_jax.eval import instructions as instr_eval  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop, metrics  # pylint: disable=g-import-not-at-top,multiple-import
  start = time.perf_counter()
  chains = check(cfg)
  os.makedirs(workdir, exist_ok=True)
  examples = instruction_sft.instruction_set(cfg)
  task = task_examples(cfg, examples)
  paths = instructions.write_splits(examples, os.path.join(workdir, 'instructions'))
  task_dir = os.path.join(workdir, 'instructions_task')
  instructions.write_splits(task, task_dir)
  heldout = task['heldout']
  if cfg.instructions.eval_limit > 0:
    heldout = heldout[:cfg.instructions.eval_limit]
  provenance = instruction_sft.provenance(cfg, examples)  # the evaluation's groups

  plan = []  # every stage's config is built (and so checked) before the first one trains
  if 'ar' in chains:
    plan += ar_stages(cfg, workdir, paths, task_dir)
  if 'llada' in chains:
    if cfg.pathway.llada_from_ar and 'ar' not in chains:
      plan.append(ar_stages(cfg, workdir, paths, task_dir)[0])  # the AR base it adapts
    plan += llada_stages(cfg, workdir, paths, task_dir)
  names = [name for name, _, _ in plan]
  if cfg.pathway.stop_after and cfg.pathway.stop_after not in names:
    raise config_lib.ConfigError(f'config.pathway.stop_after={cfg.pathway.stop_after!r} is not a '
                                 f'stage of this run: {names}')
  if cfg.pathway.stop_after:
    plan = plan[:names.index(cfg.pathway.stop_after) + 1]
  stages, pairs, curves, wall = {}, {}, {}, {}
  skipped = {}  # stage -> the stage the next one starts from instead
  for name, parent, stage_cfg in plan:
    run_dir = os.path.join(workdir, name)
    t0 = time.perf_counter()
    if stage_cfg is None:  # the preference pairs of the chain's SFT model
      pairs[name] = make_pairs(cfg, os.path.join(workdir, parent), task, run_dir)
      wall[f'{name}_s'] = time.perf_counter() - t0
      continue
    while parent in skipped:  # start from the stage before a skipped one
      parent = skipped[parent]
      stage_cfg.train.init_from = os.path.abspath(os.path.join(workdir, parent))
    if stage_cfg.task in PREFERENCE_TASKS:
      got = pairs['llada_pairs' if name.startswith('llada') else 'pairs']
      if not got['train']['pairs']:
        # A model that answers every training question all right or all wrong in
        # dpo_exp.samples draws gives no pair: the stage is skipped, said, and recorded.
        print(f'{name}: skipped, no preference pair ({got["train"]}); the next stage starts '
              f'from {parent}')
        stages[name] = {'start': parent, 'task': stage_cfg.task, 'skipped': 'no preference pair'}
        skipped[name] = parent
        continue
      if not got['heldout']['pairs']:
        stage_cfg.data.validation_path = ''
      if stage_cfg.task != 'reward_model':
        set_epochs(stage_cfg, os.path.join(workdir, parent), cfg.pathway.preference_epochs)
    res = loop.train_stage(stage_cfg, run_dir)
    wall[f'{name}_train_s'] = time.perf_counter() - t0
    # The stage's own training time, also when this call found it finished.
    entry = {'start': parent, 'task': stage_cfg.task, 'train_wall_s': res.get('wall_s')}
    if stage_cfg.task == 'reward_model':
      entry['pair_accuracy'] = res.get('val_accuracy')
      entry['pair_margin'] = res.get('val_margin')
      print(f'{name}: held-out pair accuracy {entry["pair_accuracy"]:.3f}')
    else:
      t0 = time.perf_counter()
      ev = instr_eval.evaluate_run(run_dir, heldout, batch_size=cfg.instructions.eval_batch,
                                   **provenance)
      wall[f'{name}_eval_s'] = time.perf_counter() - t0
      entry.update({k: ev[k] for k in ('accuracy', 'format_compliance', 'strict_accuracy',
                                       'correct_count', 'format_ok_count', 'n', 'groups',
                                       'samples')})
      print(f'{name}: held-out accuracy {ev["accuracy"]:.3f} ({ev["correct_count"]}/{ev["n"]}), '
            f'format {ev["format_compliance"]:.3f}')
    if stage_cfg.task == 'grpo':
      curves[name] = {k: metrics.logged(run_dir, k)
                      for k in ('reward', 'val_correct', 'kl', 'entropy', 'completion_length')}
    stages[name] = entry
  wall['total_s'] = time.perf_counter() - start
  stopped = cfg.pathway.stop_after and cfg.pathway.stop_after != names[-1]
  results = {'status': 'stopped' if stopped else 'completed',
             **({'stopped_after': cfg.pathway.stop_after} if stopped else {}),
             'seed': cfg.seed, 'chains': list(chains),
             'kinds': cfg.pathway.kinds, 'evaluated': len(heldout),
             **{key: stages[s].get('accuracy') for s, key in ACCURACY_KEYS.items() if s in stages},
             **({'rm_pair_accuracy': stages['rm'].get('pair_accuracy')} if 'rm' in stages else {}),
             'stages': stages, 'pairs': pairs, 'grpo_curves': curves, 'wall_s': wall,
             'date': datetime.date.today().isoformat(), 'device': dpo_instructions.device(),
             'config': json.loads(cfg.to_json_best_effort())}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  return results


def markdown_table(data: dict) -> str:
  """The stages' held-out accuracy and format compliance, mean ± sample std over the seeds of a
  figure data file (experiments/figure_data.py: extract_pathway) and each seed's value."""
  import statistics  # pylint: disable=g-import-not-at-top
  seeds = data['seeds']
  stat = lambda v: (f'{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}' if len(v) > 1
                    else f'{v[0]:.3f}')
  lines = ['| chain | stage | held-out accuracy | per seed | format compliance |',
           '|---|---|---|---|---|']
  order = ('base', 'sft', 'dpo', 'grpo', 'grpo_random', 'grpo_format_only', 'llada_base',
           'llada_sft', 'llada_vrpo', 'llada_grpo')
  for stage in order:
    vals = [s[stage] for s in seeds.values() if stage in s]
    if not vals:
      continue
    acc = [v['accuracy'] for v in vals]
    chain = 'LLaDA' if stage.startswith('llada') else 'AR'
    lines.append(f'| {chain} | {stage.removeprefix("llada_")} | {stat(acc)} | '
                 f'{" / ".join(f"{a:.3f}" for a in acc)} | '
                 f'{stat([v["format"] for v in vals])} |')
  rm = [s['rm_pair_accuracy'] for s in seeds.values() if s.get('rm_pair_accuracy') is not None]
  if rm:
    lines.append(f'| AR | reward model (held-out pair accuracy) | {stat(rm)} | '
                 f'{" / ".join(f"{a:.3f}" for a in rm)} | |')
  return '\n'.join(lines)
