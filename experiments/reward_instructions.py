"""A Bradley-Terry reward model on the instruction set: right over wrong answers, and a control.

    python -m pathways_jax.main --config=experiments/reward_instructions.py --workdir=runs/instr \
        [--config.seed=1 --config.rm.steps=300 ...]

The same WORKDIR as experiments/dpo_instructions.py (its finished base, SFT and pairs are reused;
missing ones are made the same way): the SFT model's own sampled answers to the training
questions, (right, wrong) pairs by the instruction set's checker. Then

  * rm: task 'reward_model' from WORKDIR/sft (model.scalar_head=True, the head fresh), trained on
    the training pairs, validated on the held-out questions' pairs (data.validation_path);
  * rm_shuffled (the control): the same, on the training pairs with chosen and rejected swapped
    in a random half of them (labels carry no information).

WORKDIR/reward_model_results.json: held-out pairwise accuracy and margin of both at every
evaluation and at the end, the pair counts, wall times, date, device, config.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import random
import time

import ml_collections

from pathways_jax import config_files

_HERE = os.path.dirname(os.path.abspath(__file__))
dpo_instructions = config_files.load_config_module(
    os.path.join(_HERE, 'dpo_instructions.py'))


def get_config():
  c = dpo_instructions.get_config()
  c.name = 'reward_instructions'
  c.rm = r = ml_collections.ConfigDict()
  r.steps = 300
  r.lr = 3e-4
  r.batch_size = 16
  r.eval_every = 100
  c.reward_model.center_coef = 0.01
  return c


def shuffled_labels(src: str, dst: str, seed: int) -> int:
  """Writes `src`'s pairs to `dst` with chosen and rejected swapped in a random half; returns
  how many were swapped."""
  rng = random.Random(seed)
  with open(src) as f:
    records = [json.loads(line) for line in f if line.strip()]
  swapped = 0
  for r in records:
    if rng.random() < 0.5:
      r['chosen'], r['rejected'] = r['rejected'], r['chosen']
      swapped += 1
  tmp = dst + '.tmp'
  with open(tmp, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, dst)
  return swapped


def rm_config_of(cfg, train_path: str, heldout_path: str, sft_dir: str):
  c = dpo_instructions.dpo_config_of(cfg, os.path.dirname(train_path), sft_dir)
  c = copy.deepcopy(c)
  r = cfg.rm
  c.name = f'{cfg.name}-rm'
  c.task = 'reward_model'
  c.model.scalar_head = True
  c.data.path = train_path
  c.data.validation_path = heldout_path
  c.data.batch_size = r.batch_size
  c.train.steps = r.steps
  c.train.lr = r.lr
  c.train.warmup_steps = min(20, r.steps // 10)
  c.train.schedule = 'cosine'
  c.train.eval_every = r.eval_every
  c.train.checkpoint_every = r.steps
  return c


def run(cfg, workdir: str) -> dict:
  from pathways_jax.train import loop, metrics  # pylint: disable=g-import-not-at-top,multiple-import
  start = time.perf_counter()
  prep = dpo_instructions.prepare(cfg, workdir)
  pairs_dir, wall = prep['pairs_dir'], prep['wall']
  train_path = os.path.join(pairs_dir, 'train.jsonl')
  heldout_path = os.path.join(pairs_dir, 'heldout.jsonl')
  shuffled_path = os.path.join(pairs_dir, f'train_shuffled_seed{cfg.seed}.jsonl')
  swapped = shuffled_labels(train_path, shuffled_path, seed=cfg.seed)
  arms = {}
  for arm, path in (('rm', train_path), ('rm_shuffled', shuffled_path)):
    t0 = time.perf_counter()
    res = loop.train_stage(rm_config_of(cfg, path, heldout_path, prep['dirs']['sft']),
                           os.path.join(workdir, arm))
    wall[f'{arm}_train_s'] = time.perf_counter() - t0
    curve = {k: metrics.logged(os.path.join(workdir, arm), k)
             for k in ('val_accuracy', 'val_margin', 'val_loss')}
    arms[arm] = {'heldout_accuracy': res.get('val_accuracy'),
                 'heldout_margin': res.get('val_margin'), 'val_loss': res.get('val_loss'),
                 'train_loss': res.get('train_loss'), 'curve': curve}
    print(f'{arm}: held-out pairwise accuracy {res.get("val_accuracy"):.3f}, margin '
          f'{res.get("val_margin"):.3f}')
  wall['total_s'] = time.perf_counter() - start
  results = {'status': 'completed', 'seed': cfg.seed, 'pairs': prep['counts'],
             'shuffled_swapped': swapped, **arms, 'wall_s': wall,
             'date': datetime.date.today().isoformat(), 'device': dpo_instructions.device(),
             'config': json.loads(cfg.to_json_best_effort())}
  with open(os.path.join(workdir, 'reward_model_results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  return results
