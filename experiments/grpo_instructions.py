"""GRPO on the instruction set's verifiable task, from the SFT model, with its two controls.

    python -m pathways_jax.main --config=experiments/grpo_instructions.py --workdir=runs/instr \
        [--config.seed=1 --config.grpo_exp.arm=grpo_random --config.rl.rewards=random ...]

WORKDIR may be an experiments/instruction_sft.py (or dpo_instructions.py) workdir of the same
config and seed: its finished base and sft stages are reused. Stages (each skipped once
finished, so the same command resumes):

1. base, sft: as experiments/instruction_sft.py.
2. grpo: task 'grpo' from WORKDIR/sft on the training questions as prompts (the instruction
   set's train.jsonl is a prompt file as it is), rewarded by config.rl.rewards, in
   WORKDIR/<grpo_exp.arm>. The arms of the README's comparison:
     grpo               rl.rewards='correct'  (the checker's verdict: right answer, any format)
     grpo_random        rl.rewards='random'   (a fair coin: updates that ignore the answer)
     grpo_format_only   rl.rewards='format'   (right format, right or wrong)
3. Greedy accuracy of sft and the arm with the evaluator of instruction_sft, on the held-out
   questions and on as many training questions.

`grpo_exp.kinds` (e.g. 'arithmetic'): the GRPO stage trains on, and both are evaluated on, the
questions of those kinds only (the SFT model is the same); the arm's directory and results are
then WORKDIR/<arm>_<kinds>.

`grpo_exp.failures_only`: the stage trains on the training questions the SFT model answers
wrong (greedy), as Reflect, Retry, Reward trains on its start model's failures (with
--config.rl.reflect=True); the split is written to WORKDIR/instructions[_<kinds>]_failures.

WORKDIR/<arm>_results.json: the `sft` and arm evaluations, the arm's training curve (reward,
KL, entropy, completion length, time split), wall times, date, device, config.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import time

import ml_collections

from pathways_jax import config as config_lib
from pathways_jax import config_files

_HERE = os.path.dirname(os.path.abspath(__file__))
instruction_sft = config_files.load_config_module(
    os.path.join(_HERE, 'instruction_sft.py'))
dpo_instructions = config_files.load_config_module(
    os.path.join(_HERE, 'dpo_instructions.py'))

ARMS = {'grpo': 'correct', 'grpo_random': 'random', 'grpo_format_only': 'format'}


def get_config():
  c = instruction_sft.get_config()
  c.name = 'grpo_instructions'
  c.grpo_exp = e = ml_collections.ConfigDict()
  e.arm = 'grpo'  # the run directory and results name: WORKDIR/<arm>; sets rl.rewards (ARMS)
  e.steps = 150
  e.lr = 2e-4
  e.prompts = 16  # prompts per rollout
  e.prompt_len = 80  # the prompt budget in tokens (a few held-out prompts exceed 64)
  e.eval_every = 50
  e.kinds = ''  # comma-separated question kinds to train and evaluate on ('' = all)
  e.failures_only = False  # train on the questions the SFT model gets wrong (RRR's failure set)
  c.rl.num_generations = 8
  c.rl.max_new_tokens = 24
  c.rl.temperature = 1.0
  c.rl.rewards = ''  # '' = the arm's (ARMS)
  c.rl.eval_max = 128  # held-out prompts scored during training (the final evaluation: all)
  return c


def grpo_config_of(cfg, instructions_dir: str, sft_dir: str):
  e = cfg.grpo_exp
  if e.arm not in ARMS and not cfg.rl.rewards:
    raise config_lib.ConfigError(f'config.grpo_exp.arm={e.arm!r} is not one of {sorted(ARMS)}: '
                                 'name its rewards with config.rl.rewards')
  dpo_instructions.check_settings(e, 'grpo_exp', ('steps', 'lr', 'prompts', 'prompt_len',
                                                  'eval_every'))
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-{e.arm}'
  c.task = 'grpo'
  c.rl.rewards = cfg.rl.rewards or ARMS[e.arm]
  c.data.corpus = 'prompts'
  c.data.path = os.path.join(instructions_dir, 'train.jsonl')
  c.data.validation_path = os.path.join(instructions_dir, 'heldout.jsonl')
  c.data.seq_len = e.prompt_len
  c.data.batch_size = e.prompts
  return dpo_instructions.stage_schedule(c, sft_dir, steps=e.steps, lr=e.lr,
                                         eval_every=e.eval_every, checkpoint_every=e.eval_every)


def examples_of_kinds(examples: dict, kinds: str, setting: str) -> tuple[dict, tuple[str, ...]]:
  """(the splits restricted to the comma-separated question `kinds`, the kinds): every kind one
  of the instruction set's, every split left non-empty, or a ConfigError naming `setting`.
  No kinds: the splits as they are."""
  names = tuple(k.strip() for k in kinds.split(',') if k.strip())
  if not names:
    return examples, names
  have = sorted({e.kind for e in examples['train']})
  unknown = sorted(set(names) - set(have))
  if unknown:
    raise config_lib.ConfigError(f'config.{setting}: {unknown} are not kinds of the instruction '
                                 f'set ({have})')
  out = {split: [e for e in exs if e.kind in names] for split, exs in examples.items()}
  empty = [split for split, exs in out.items() if not exs]
  if empty:
    raise config_lib.ConfigError(f'config.{setting}={kinds!r}: the {empty} split(s) hold no '
                                 'question of those kinds')
  return out, names


def write_failures(cfg, sft_dir: str, examples: dict, out_dir: str) -> dict:
  """Writes OUT_DIR/{train,heldout}.jsonl: the training questions the SFT model answers wrong
  greedily, and the held-out split unchanged; returns the counts (kept if already written)."""
  from pathways_jax.data import instructions  # pylint: disable=g-import-not-at-top
  from pathways_jax.eval import instructions as instr_eval  # pylint: disable=g-import-not-at-top
  from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
  counts_path = os.path.join(out_dir, 'counts.json')
  if os.path.isfile(counts_path):
    with open(counts_path) as f:
      return json.load(f)
  _, model, params, tok = load_run(sft_dir)
  train = examples['train']
  outputs = instr_eval.generate_outputs(model, params, tok, train,
                                        batch_size=cfg.instructions.eval_batch)
  failed = [e for e, o in zip(train, outputs) if not instructions.check(e, o['text'])['correct']]
  if not failed:
    raise config_lib.ConfigError(f'grpo_exp.failures_only: the SFT model in {sft_dir} answers '
                                 f'all {len(train)} training questions right: nothing to train on')
  instructions.write_splits({'train': failed, 'heldout': examples['heldout']}, out_dir)
  counts = {'train_questions': len(train), 'failures': len(failed)}
  print(f'failure set: {len(failed)} of {len(train)} training questions answered wrong')
  with open(counts_path, 'w') as f:
    json.dump(counts, f)
  return counts


def run(cfg, workdir: str) -> dict:
  from pathways_jax.data import instructions  # pylint: disable=g-import-not-at-top
  from pathways_jax.eval import instructions as instr_eval  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop, metrics  # pylint: disable=g-import-not-at-top,multiple-import
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  examples = instruction_sft.instruction_set(cfg)
  inst_dir = os.path.join(workdir, 'instructions')
  paths = instructions.write_splits(examples, inst_dir)
  rl_examples, kinds = examples_of_kinds(examples, cfg.grpo_exp.kinds, 'grpo_exp.kinds')
  rl_dir, tag = inst_dir, ''
  if kinds:
    tag = '_' + '_'.join(kinds)
    rl_dir = os.path.join(workdir, 'instructions' + tag)
    instructions.write_splits(rl_examples, rl_dir)
  train_dir = rl_dir + '_failures' if cfg.grpo_exp.failures_only else rl_dir
  run_cfg = grpo_config_of(cfg, train_dir, os.path.join(workdir, 'sft'))  # settings checked first
  heldout = rl_examples['heldout']
  if cfg.instructions.eval_limit > 0:
    heldout = heldout[:cfg.instructions.eval_limit]
  dirs = {arm: os.path.join(workdir, arm) for arm in ('base', 'sft')}
  wall = {}
  # Each stage's own training time (results.json's wall_s), also when this call found it done.
  wall['base_sft_s'] = sum(loop.train_stage(c, d).get('wall_s') or 0.0 for c, d in (
      (instruction_sft.base_config_of(cfg), dirs['base']),
      (instruction_sft.sft_config_of(cfg, paths['train'], dirs['base']), dirs['sft'])))
  failures = None
  if cfg.grpo_exp.failures_only:
    t0 = time.perf_counter()
    failures = write_failures(cfg, dirs['sft'], rl_examples, train_dir)
    wall['failures_s'] = time.perf_counter() - t0
  arm = cfg.grpo_exp.arm + tag
  dirs[arm] = os.path.join(workdir, arm)
  res = loop.train_stage(run_cfg, dirs[arm])
  wall[f'{arm}_train_s'] = res.get('wall_s')
  keys = ('reward', 'kl', 'entropy', 'completion_length', 'zero_std_groups', 'val_correct',
          'val_format', 'time_rollout_s', 'time_reward_s', 'time_batch_s',
          'reference_reset',  # ProRL (rl.reset_every)
          # Reflect, Retry, Reward (rl.reflect)
          'first_attempt_success', 'retry_success', 'val_first_attempt', 'val_second_attempt',
          'val_retry_success')
  curve = {k: metrics.logged(dirs[arm], k) for k in keys}

  train = rl_examples['train']
  seen = train[::max(1, len(train) // len(heldout))][:len(heldout)]
  evals = {}
  for name in ('sft', arm):
    t0 = time.perf_counter()
    for label, exs in ((name, heldout), (f'{name}_train_questions', seen)):
      evals[label] = instr_eval.evaluate_run(dirs[name], exs,
                                             batch_size=cfg.instructions.eval_batch,
                                             **instruction_sft.provenance(cfg, examples))
      print(f'{label}: format compliance {evals[label]["format_compliance"]:.3f}, accuracy '
            f'{evals[label]["accuracy"]:.3f} ({evals[label]["correct_count"]}/'
            f'{evals[label]["n"]})')
    wall[f'{name}_eval_s'] = time.perf_counter() - t0
  wall['total_s'] = time.perf_counter() - start
  results = {'status': 'completed', 'seed': cfg.seed, 'arm': arm, 'kinds': list(kinds),
             'rewards': run_cfg.rl.rewards, 'failures': failures,
             'evaluated': len(heldout), **evals, 'curve': curve,
             'train_loss': res.get('train_loss'), 'wall_s': wall,
             'date': datetime.date.today().isoformat(), 'device': dpo_instructions.device(),
             'config': json.loads(cfg.to_json_best_effort())}
  with open(os.path.join(workdir, f'{arm}_results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  return results
