"""Evaluate a run directory on lm-evaluation-harness tasks (the optional extra `.[eval]`).

    python -m pathways_jax.evaluate --workdir=runs/x --tasks=hellaswag,arc_easy
    python -m pathways_jax.evaluate --workdir=runs/x --tasks=my_task --include_path=my_tasks/ \
        [--limit=N] [--batch_size=16] [--num_fewshot=K] [--output=results.json] \
        [--model_args=mc_num=128,check_greedy=false] [--apply_chat_template] [--log_samples]
        [--adapter=K]   # a multi-LoRA run (model.lora_num_adapters = K > 1): which adapter

Prints the harness's results table and writes its results as JSON (default
WORKDIR/lm_eval/results.json). Standard tasks need their datasets (downloaded by `datasets`
where the network allows); tasks under --include_path whose data is local need nothing. When
every task asked for is under --include_path, the harness's own task index (~15k tasks, slow to
build) is not read. The model is pathways_jax.eval.harness (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys

_USAGE = """python -m pathways_jax.evaluate --workdir=W --tasks=t1,t2 [--include_path=DIR]
    [--limit=N] [--batch_size=B] [--num_fewshot=K] [--output=path.json] [--model_args=k=v,...]
    [--step=N] [--seed=S] [--gen_kwargs=k=v,...] [--apply_chat_template] [--log_samples]
    [--adapter=K]"""


def _task_manager(tasks: list[str], include_path: str | None):
  """The harness's TaskManager; only the local tasks when they are all that is asked for."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  if include_path:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
      return local
  manager = TaskManager(include_path=include_path or None)
  unknown = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
  if unknown:
    hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
    raise ValueError('unknown task(s): ' + '; '.join(
        f'{t}' + (f' (did you mean {", ".join(h)}?)' if h else '') for t, h in hints.items())
        + (f' (looked in the harness and in {include_path})' if include_path else
           ' (local task YAMLs need --include_path=DIR)'))
  return manager


def _limit(value: str | None):
  if value is None:
    return None
  number = float(value)
  return int(number) if number >= 1 and number == int(number) else number  # < 1: a fraction


def evaluate(workdir: str, tasks: list[str], *, include_path: str | None = None, limit=None,
             batch_size: int = 16, num_fewshot: int | None = None, model_args: str = '',
             step: int | None = None, seed: int = 0, gen_kwargs: str | None = None,
             apply_chat_template: bool = False, log_samples: bool = False,
             bootstrap_iters: int = 100000, adapter: int | None = None) -> dict:
  """lm_eval.simple_evaluate with the `pathways` model on the run directory `workdir` (a
  multi-LoRA run's adapter `adapter`)."""
  import lm_eval  # pylint: disable=g-import-not-at-top
  from pathways_jax.eval import harness  # pylint: disable=g-import-not-at-top  (registers it)
  args = dict(workdir=workdir, step=step, batch_size=batch_size, seed=seed, adapter=adapter)
  for kv in filter(None, model_args.split(',')):
    if '=' not in kv:
      raise ValueError(f'--model_args: {kv!r} is not key=value')
    key, value = kv.split('=', 1)
    args[key.strip()] = value.strip()
  task_manager = _task_manager(tasks, include_path)  # unknown tasks fail before the model loads
  lm = harness.PathwaysLM(**args)
  return lm_eval.simple_evaluate(
      model=lm, tasks=tasks, task_manager=task_manager, limit=limit,
      num_fewshot=num_fewshot, gen_kwargs=gen_kwargs, apply_chat_template=apply_chat_template,
      log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=seed,
      numpy_random_seed=seed, fewshot_random_seed=seed)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m pathways_jax.evaluate', usage=_USAGE)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--tasks', required=True, help='comma-separated task names')
  parser.add_argument('--include_path', default=None, help='a folder of local task YAMLs')
  parser.add_argument('--limit', default=None, help='examples per task (< 1: a fraction)')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--num_fewshot', type=int, default=None)
  parser.add_argument('--output', default=None,
                      help='results JSON (default WORKDIR/lm_eval/results.json)')
  parser.add_argument('--model_args', default='', help='more model_args, e.g. mc_num=128')
  parser.add_argument('--step', type=int, default=None, help='checkpoint (default: newest)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--gen_kwargs', default=None, help='override the tasks\' generation')
  parser.add_argument('--apply_chat_template', action='store_true')
  parser.add_argument('--log_samples', action='store_true', help='per-sample outputs in the JSON')
  parser.add_argument('--bootstrap_iters', type=int, default=100000)
  parser.add_argument('--adapter', type=int, default=None,
                      help='a multi-LoRA run: the adapter to evaluate')
  args = parser.parse_args(argv)
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's INFO lines would bury the table
  tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  if not tasks:
    parser.error('--tasks is empty')
  if not os.path.isfile(os.path.join(args.workdir, 'config.json')):
    # Before the harness's imports (seconds): a mistyped path fails at once.
    print(f'error: {args.workdir} is not a run directory (it has no config.json)', file=sys.stderr)
    return 1
  from pathways_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from pathways_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    results = evaluate(args.workdir, tasks, include_path=args.include_path,
                       limit=_limit(args.limit), batch_size=args.batch_size,
                       num_fewshot=args.num_fewshot, model_args=args.model_args, step=args.step,
                       seed=args.seed, gen_kwargs=args.gen_kwargs,
                       apply_chat_template=args.apply_chat_template,
                       log_samples=args.log_samples, bootstrap_iters=args.bootstrap_iters,
                       adapter=args.adapter)
  except (FileNotFoundError, CheckpointError, ConfigError, ValueError, NotImplementedError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  from lm_eval import utils as lm_utils  # pylint: disable=g-import-not-at-top
  print(lm_utils.make_table(results))
  if results.get('groups'):
    print(lm_utils.make_table(results, 'groups'))
  output = args.output or os.path.join(args.workdir, 'lm_eval', 'results.json')
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False)
  print(f'wrote {output}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
