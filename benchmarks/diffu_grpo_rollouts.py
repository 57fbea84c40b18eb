"""diffu-GRPO steps with plain diffusion rollouts against Fast-dLLM rollouts, side by side.

    python benchmarks/diffu_grpo_rollouts.py --run=runs/pathway_s0/llada_grpo \
        [--steps=4 --rounds=2 --block_length=8 --cache=dual --threshold=0.9 --json]

`--run` is a task='grpo' run directory with a LLaDA policy (e.g. the pathway's llada_grpo): its
config is reused as saved (start model, prompts, G, max_new_tokens, temperature, lr), so both
arms roll out the same prompts from the same model. Each arm is a fresh run of `--steps`
optimizer steps in a temporary directory, without held-out evaluation or checkpoints; the arms
alternate over `--rounds` rounds (the order flips every round) and the first step of every run
(compilation) is left out:
  * plain: one block, one token per step (rl.block_length = 0, no cache, no threshold);
  * fast:  blocks of --block_length, rl.diffusion_cache = --cache, rl.diffusion_threshold =
           --threshold (Fast-dLLM: a KV cache refreshed at each block start and parallel
           decoding of every masked token more confident than the threshold).
Printed per arm: the median rollout time (`time_rollout_s`), the median time to make the batch
(rollouts, rewards, estimator inputs: `time_batch_s`), the mean completion length and the mean
reward; and plain / fast for the rollout. The update is the same for both arms.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def arm_settings(args) -> dict:
  return {'plain': {'block_length': 0, 'diffusion_cache': '', 'diffusion_threshold': 0.0},
          'fast': {'block_length': args.block_length, 'diffusion_cache': args.cache,
                   'diffusion_threshold': args.threshold}}


def run_arm(run_dir: str, rl: dict, steps: int, scratch: str) -> list[dict]:
  """The logged rows (after the first step) of a fresh `steps`-step run of `run_dir`'s config
  with `rl` changed."""
  from pathways_jax import config_files  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  cfg = config_files.load_run_config(run_dir)
  cfg.rl.update(**rl)
  cfg.train.update(steps=steps, log_every=1, eval_every=10 ** 9, checkpoint_every=10 ** 9,
                   progress_bar=False)
  cfg.data.validation_path = ''
  workdir = tempfile.mkdtemp(dir=scratch)
  try:
    loop.train(cfg, workdir, quiet=True)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return [r for r in rows if 'time_rollout_s' in r and r['step'] > 1]


def summary(rows: list[dict]) -> dict:
  med = lambda k: statistics.median(r[k] for r in rows)
  mean = lambda k: statistics.mean(r[k] for r in rows)
  return {'rollout_s': med('time_rollout_s'), 'batch_s': med('time_batch_s'),
          'completion_length': mean('completion_length'), 'reward': mean('reward'),
          'steps': len(rows)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--run', required=True, help='a task=grpo run directory with a LLaDA policy')
  ap.add_argument('--steps', type=int, default=4, help='optimizer steps per run (the first untimed)')
  ap.add_argument('--rounds', type=int, default=2)
  ap.add_argument('--block_length', type=int, default=8)
  ap.add_argument('--cache', default='dual', choices=('', 'prefix', 'dual'))
  ap.add_argument('--threshold', type=float, default=0.9)
  ap.add_argument('--json', action='store_true', help='print one JSON line instead of a table')
  args = ap.parse_args(argv)
  if args.steps < 2 or args.rounds < 1:
    ap.error(f'--steps must be >= 2 (the first is not timed) and --rounds >= 1; got '
             f'{args.steps}, {args.rounds}')
  if args.block_length < 1 or not 0 <= args.threshold < 1:
    ap.error(f'--block_length must be >= 1 and --threshold in [0, 1) (0: off); got '
             f'{args.block_length}, {args.threshold}')
  config = os.path.join(args.run, 'config.json')
  if not os.path.isfile(config):
    ap.error(f'--run={args.run}: no config.json there (a task=grpo run directory is needed)')
  with open(config) as f:
    saved = json.load(f)
  if saved.get('task') != 'grpo' or saved.get('model', {}).get('causal', True):
    ap.error(f'--run={args.run} is not a task=grpo run with a LLaDA (model.causal=False) policy')
  arms = arm_settings(args)
  rows = {name: [] for name in arms}
  scratch = tempfile.mkdtemp(prefix='diffu_grpo_rollouts_')
  try:
    for r in range(args.rounds):
      order = list(arms) if r % 2 == 0 else list(reversed(list(arms)))
      for name in order:
        rows[name] += run_arm(args.run, arms[name], args.steps, scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  out = {name: summary(v) for name, v in rows.items()}
  out['rollout_speedup'] = out['plain']['rollout_s'] / out['fast']['rollout_s']
  out['settings'] = arms
  if args.json:
    print(json.dumps(out))
    return 0
  print('| rollouts | rollout s (median) | batch s (median) | completion tokens | reward | timed steps |')
  print('|---|---|---|---|---|---|')
  for name in arms:
    s = out[name]
    print(f'| {name} | {s["rollout_s"]:.2f} | {s["batch_s"]:.2f} | {s["completion_length"]:.1f} | '
          f'{s["reward"]:.3f} | {s["steps"]} |')
  print(f'plain / fast rollout: {out["rollout_speedup"]:.1f}x')
  return 0


if __name__ == '__main__':
  sys.exit(main())
