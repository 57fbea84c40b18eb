"""DPO on the instruction set's verifiable task: the SFT model's own right and wrong answers.

    python -m pathways_jax.main --config=experiments/dpo_instructions.py --workdir=runs/instr \
        [--config.seed=1 --config.dpo_exp.steps=300 ...]

WORKDIR may be an experiments/instruction_sft.py workdir of the same config and seed: its
finished base and sft stages are reused. Stages (each skipped once finished, so the same command
resumes):

1. base, sft: as experiments/instruction_sft.py (the `instructions` section is the same).
2. pairs: the SFT model answers every training question `dpo_exp.samples` times at
   `dpo_exp.temperature`; the instruction set's checker (data.instructions.check) marks each
   answer right or wrong; a question with both gives up to `dpo_exp.pairs_per_question`
   (right, wrong) pairs -> WORKDIR/dpo_pairs/train.jsonl. The same on the held-out questions ->
   heldout.jsonl, which is DPO's validation data only (data.validation_path): never trained on.
3. dpo: task 'dpo' from WORKDIR/sft, the SFT model being its own reference, in WORKDIR/dpo
   (WORKDIR/<dpo_exp.arm>: arms with other dpo.* settings share the base, SFT and pairs).
4. Greedy accuracy of sft and dpo with the evaluator of instruction_sft, on the held-out
   questions and on as many training questions (those the pairs came from).

WORKDIR/<dpo_exp.arm>_results.json (default dpo_results.json): the pair counts, `sft` and `dpo`
held-out evaluations, DPO's validation metrics on the held-out pairs at every evaluation
(rewards/accuracies, rewards/margins, logps/chosen, logps/rejected), wall times, date, device,
config.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import random
import time

import ml_collections

from pathways_jax import config as config_lib
from pathways_jax import config_files

_HERE = os.path.dirname(os.path.abspath(__file__))
instruction_sft = config_files.load_config_module(
    os.path.join(_HERE, 'instruction_sft.py'))


def get_config():
  c = instruction_sft.get_config()
  c.name = 'dpo_instructions'
  c.dpo_exp = e = ml_collections.ConfigDict()
  e.arm = 'dpo'  # the DPO stage's run directory and results name: WORKDIR/<arm>
  e.samples = 8  # answers sampled per question
  e.temperature = 1.0
  e.pairs_per_question = 2
  e.steps = 200
  e.lr = 1e-4
  e.batch_size = 16
  e.eval_every = 50
  c.dpo.beta = 0.1
  c.dpo.loss_type = 'sigmoid'
  return c


def _answers(run_dir, examples, cfg, seed):
  """[[output text] * samples] per example, sampled from the run at dpo_exp.temperature."""
  from pathways_jax.eval import instructions as instr_eval  # pylint: disable=g-import-not-at-top
  from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
  e = cfg.dpo_exp
  _, model, params, tokenizer = load_run(run_dir)
  repeated = [x for x in examples for _ in range(e.samples)]
  outs = instr_eval.generate_outputs(model, params, tokenizer, repeated,
                                     batch_size=cfg.instructions.eval_batch,
                                     temperature=e.temperature, seed=seed)
  return [[o['text'] for o in outs[i * e.samples:(i + 1) * e.samples]]
          for i in range(len(examples))]


def make_pairs(examples, answers, *, per_question: int, seed: int) -> tuple[list[dict], dict]:
  """(preference records, counts): (right, wrong) answer pairs of the questions that got both."""
  from pathways_jax.data import instructions  # pylint: disable=g-import-not-at-top
  rng = random.Random(seed)
  records, right_share, both = [], [], 0
  for ex, outs in zip(examples, answers):
    marks = [instructions.check(ex, o)['correct'] for o in outs]
    right_share.append(sum(marks) / len(marks))
    right = sorted({o for o, m in zip(outs, marks) if m and o.strip()})
    wrong = sorted({o for o, m in zip(outs, marks) if not m and o.strip()})
    if not right or not wrong:
      continue
    both += 1
    for _ in range(per_question):
      records.append({'prompt': ex.prompt, 'chosen': rng.choice(right),
                      'rejected': rng.choice(wrong)})
  unique = {json.dumps(r, sort_keys=True) for r in records}
  records = [json.loads(r) for r in sorted(unique)]
  rng.shuffle(records)
  return records, {'questions': len(examples), 'with_both': both, 'pairs': len(records),
                   'sampled_accuracy': sum(right_share) / max(len(right_share), 1)}


def dpo_config_of(cfg, pairs_dir: str, sft_dir: str):
  c = copy.deepcopy(cfg)
  e = cfg.dpo_exp
  c.name = f'{cfg.name}-dpo'
  c.task = 'dpo'
  c.data.corpus = 'preference'
  c.data.path = os.path.join(pairs_dir, 'train.jsonl')
  c.data.validation_path = os.path.join(pairs_dir, 'heldout.jsonl')
  c.data.batch_size = e.batch_size
  # Two sides of a pair share a row: rows twice the SFT length, so no answer is cut (RoPE has no
  # length-bound params; positions restart per side and stay below the SFT's own max_len).
  c.data.seq_len = 2 * cfg.data.seq_len
  c.model.max_len = max(cfg.model.max_len, c.data.seq_len)
  c.data.eval_batches = 64
  return stage_schedule(c, sft_dir, steps=e.steps, lr=e.lr, eval_every=e.eval_every,
                        checkpoint_every=e.steps)


def stage_schedule(c, sft_dir: str, *, steps: int, lr: float, eval_every: int,
                   checkpoint_every: int):
  """`c` set to start from the SFT model and train `steps` at a constant `lr` after a short
  warmup, without weight decay (the DPO and GRPO stages alike)."""
  c.train.update(init_from=os.path.abspath(sft_dir), steps=steps, lr=lr,
                 warmup_steps=min(10, steps // 10), schedule='constant', weight_decay=0.0,
                 eval_every=eval_every, checkpoint_every=checkpoint_every)
  return c


def _write_jsonl(records, path):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, path)


def check_settings(section, name: str, positive: tuple[str, ...], non_negative=()) -> None:
  """An experiment's own settings, named before any stage runs (not after the SFT stage)."""
  for key in positive:
    if not section[key] > 0:
      raise config_lib.ConfigError(f'config.{name}.{key} must be > 0, got {section[key]}')
  for key in non_negative:
    if not section[key] >= 0:
      raise config_lib.ConfigError(f'config.{name}.{key} must be >= 0, got {section[key]}')


def prepare(cfg, workdir: str) -> dict:
  """Stages 1-2 (each skipped once finished): the instruction set, base, SFT and the pairs.
  Returns {examples, heldout, dirs (base, sft), pairs_dir, counts, wall}."""
  from pathways_jax.data import instructions  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  check_settings(cfg.dpo_exp, 'dpo_exp', ('samples', 'pairs_per_question', 'steps', 'lr',
                                          'batch_size', 'eval_every'), ('temperature',))
  if cfg.get('rm') is not None:  # reward_instructions' section
    check_settings(cfg.rm, 'rm', ('steps', 'lr', 'batch_size', 'eval_every'))
  os.makedirs(workdir, exist_ok=True)
  examples = instruction_sft.instruction_set(cfg)
  paths = instructions.write_splits(examples, os.path.join(workdir, 'instructions'))
  heldout = examples['heldout']
  if cfg.instructions.eval_limit > 0:
    heldout = heldout[:cfg.instructions.eval_limit]
  dirs = {arm: os.path.join(workdir, arm) for arm in ('base', 'sft')}
  wall = {}
  t0 = time.perf_counter()
  loop.train_stage(instruction_sft.base_config_of(cfg), dirs['base'])
  loop.train_stage(instruction_sft.sft_config_of(cfg, paths['train'], dirs['base']), dirs['sft'])
  wall['base_sft_s'] = time.perf_counter() - t0

  pairs_dir = os.path.join(workdir, 'dpo_pairs')
  counts_path = os.path.join(pairs_dir, 'counts.json')
  if not os.path.exists(counts_path):
    t0 = time.perf_counter()
    os.makedirs(pairs_dir, exist_ok=True)
    counts = {}
    for split, exs, salt in (('train', examples['train'], 0), ('heldout', heldout, 1)):
      answers = _answers(dirs['sft'], exs, cfg, seed=cfg.seed * 1000 + salt)
      records, counts[split] = make_pairs(exs, answers,
                                          per_question=cfg.dpo_exp.pairs_per_question,
                                          seed=cfg.seed)
      _write_jsonl(records, os.path.join(pairs_dir, f'{split}.jsonl'))
      print(f'pairs ({split}): {counts[split]}')
    wall['pairs_s'] = time.perf_counter() - t0
    with open(counts_path, 'w') as f:
      json.dump({**counts, 'wall_s': wall['pairs_s']}, f, indent=2)
  with open(counts_path) as f:
    counts = json.load(f)
  return {'examples': examples, 'heldout': heldout, 'dirs': dirs, 'pairs_dir': pairs_dir,
          'counts': counts, 'wall': wall}


def device() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
          'count': jax.device_count(), 'cpus': os.cpu_count(), 'machine': platform.machine()}


def run(cfg, workdir: str) -> dict:
  from pathways_jax.eval import instructions as instr_eval  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop, metrics  # pylint: disable=g-import-not-at-top,multiple-import
  start = time.perf_counter()
  prep = prepare(cfg, workdir)
  examples, heldout, counts, wall = prep['examples'], prep['heldout'], prep['counts'], prep['wall']
  dirs, pairs_dir = prep['dirs'], prep['pairs_dir']
  dirs['dpo'] = os.path.join(workdir, cfg.dpo_exp.arm)
  t0 = time.perf_counter()
  dpo_res = loop.train_stage(dpo_config_of(cfg, pairs_dir, dirs['sft']), dirs['dpo'])
  wall['dpo_train_s'] = time.perf_counter() - t0
  keys = ('val_loss', 'val_rewards/accuracies', 'val_rewards/margins', 'val_logps/chosen',
          'val_logps/rejected')
  curve = {k: metrics.logged(dirs['dpo'], k) for k in keys}

  # Held-out questions (the claim), and as many training questions (what the pairs asked).
  seen = examples['train'][::max(1, len(examples['train']) // len(heldout))][:len(heldout)]
  evals = {}
  for arm in ('sft', 'dpo'):
    t0 = time.perf_counter()
    for name, exs in ((arm, heldout), (f'{arm}_train_questions', seen)):
      evals[name] = instr_eval.evaluate_run(dirs[arm], exs, batch_size=cfg.instructions.eval_batch,
                                            **instruction_sft.provenance(cfg, examples))
      print(f'{name}: format compliance {evals[name]["format_compliance"]:.3f}, accuracy '
            f'{evals[name]["accuracy"]:.3f} ({evals[name]["correct_count"]}/{evals[name]["n"]})')
    wall[f'{arm}_eval_s'] = time.perf_counter() - t0
  wall['total_s'] = time.perf_counter() - start
  results = {
      'status': 'completed', 'seed': cfg.seed, 'pairs': counts, 'evaluated': len(heldout),
      **evals, 'dpo_validation': curve,
      'dpo_train_loss': dpo_res.get('train_loss'), 'wall_s': wall,
      'date': datetime.date.today().isoformat(),
      'device': device(),
      'config': json.loads(cfg.to_json_best_effort())}
  with open(os.path.join(workdir, f'{cfg.dpo_exp.arm}_results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  return results
