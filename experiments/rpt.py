"""Reinforcement Pre-Training's effect (Dong et al. 2025): does RL on the hard next-token
decisions of pretraining text raise next-token accuracy on hard tokens of held-out text, and
against what?

    python -m pathways_jax.main --config=experiments/rpt.py --workdir=runs/rpt \
        [--config.seed=1 --config.rpt_exp.arms=rpt,ntp --config.rpt_exp.steps=600 ...]

Stages (each skipped once finished, so the same command resumes):

1. base: experiments/ar_tiny.py (0.9M parameters, the Python standard library, a sentencepiece
   tokenizer), pretrained for `rpt_exp.base_steps`, in WORKDIR/base.
2. prompts: the base, as RPT's proxy, scores every position of each document, in windows of
   its model.max_len tokens (512 here; its training rows are data.seq_len = 128), by the
   entropy of its next-token prediction (pathways_jax.rl.rpt).
   WORKDIR/prompts/ holds `train.jsonl` (the `rpt_exp.per_window` hardest positions of each
   window of the first `rpt_exp.train_windows` windows of every training document),
   `validation_hard.jsonl` (the same of every window of the validation documents: held-out hard
   tokens) and `validation_random.jsonl` (as many positions per validation window drawn
   uniformly: ordinary held-out tokens).
3. arms (`rpt_exp.arms`), each from the base for `rpt_exp.steps` steps at a constant
   `rpt_exp.lr`, in WORKDIR/<arm>:
     rpt         task 'grpo' on train.jsonl, rl.rewards='next_token': `rl.num_generations`
                 one-token guesses per prompt at `rl.temperature`, reward 1 for the true next
                 token (`rpt_exp.prompts` prompts a step)
     rpt_random  the same with a fair coin as reward (updates that ignore the answer)
     ntp         the same steps spent on ordinary pretraining (next-token loss on every token of
                 the training documents, `rpt_exp.prompts` rows a step)
     sft_hard    the same decisions supervised: task 'sft' on the training prompts as raw-text
                 examples whose completion is the true next token (data/chat.py's RawText;
                 WORKDIR/prompts/train_sft.jsonl), `rpt_exp.prompts` examples a step: the label
                 where RPT has a reward
4. Each arm and the base are scored on the three prompt sets (training prompts: as many as
   validation_hard, evenly spaced) by its greedy next-token decision, two ways: `accuracy`, the
   argmax token earns the training reward (which sets leading whitespace aside, so skipping a
   whitespace token to the word after it counts), and `exact`, the argmax is the true token;
   and by the true token's NLL (rl.rpt.next_token_scores).

WORKDIR/results.json: the counts, each model's scores per set, each arm's training curve and
wall time, date, device, config. `--config.seed` changes the training seeds only (initialisation,
data order, rollouts), not the world.
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
ar_tiny = config_files.load_config_module(os.path.join(_HERE, 'ar_tiny.py'))
dpo_instructions = config_files.load_config_module(os.path.join(_HERE, 'dpo_instructions.py'))

ARMS = ('rpt', 'rpt_random', 'ntp', 'sft_hard')
SETS = ('validation_hard', 'validation_random', 'train')


def get_config():
  c = ar_tiny.get_config()
  c.name = 'rpt'
  c.train.log_every = 20
  c.train.progress_bar = False
  c.sample.prompts = ()
  c.rpt_exp = e = ml_collections.ConfigDict()
  e.arms = ','.join(ARMS)
  e.base_steps = 1000
  e.steps = 300
  e.lr = 2e-4
  e.prompts = 16  # prompts (rpt arms) or pretraining rows (ntp) per step
  e.per_window = 2  # positions per window of model.max_len tokens, in every prompt set
  e.train_windows = 8  # windows read per training document (the validation documents: all)
  e.context = 64  # tokens of context before each position
  e.eval_every = 50
  c.rl.num_generations = 8
  c.rl.max_new_tokens = 1  # the next-token decision itself
  c.rl.temperature = 1.0
  c.rl.eval_max = 128
  return c


def arms_of(cfg) -> tuple[str, ...]:
  arms = tuple(a.strip() for a in cfg.rpt_exp.arms.split(',') if a.strip())
  unknown = sorted(set(arms) - set(ARMS))
  if unknown or not arms:
    raise config_lib.ConfigError(f'config.rpt_exp.arms={cfg.rpt_exp.arms!r}: name one or more '
                                 f'of {ARMS}' + (f' ({unknown} are not)' if unknown else ''))
  dpo_instructions.check_settings(cfg.rpt_exp, 'rpt_exp', ('base_steps', 'steps', 'lr',
                                                           'prompts', 'per_window',
                                                           'train_windows', 'context',
                                                           'eval_every'))
  return arms


def base_config_of(cfg):
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-base'
  c.train.steps = cfg.rpt_exp.base_steps
  return c


def arm_config_of(cfg, arm: str, prompts_dir: str, base_dir: str):
  e = cfg.rpt_exp
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-{arm}'
  if arm == 'ntp':
    c.data.batch_size = e.prompts
  elif arm == 'sft_hard':
    c.task = 'sft'
    c.data.corpus = 'chat'
    c.data.path = os.path.join(prompts_dir, 'train_sft.jsonl')
    c.data.chat.pack = False  # one decision a row: `rpt_exp.prompts` of them a step
    c.data.seq_len = e.context + 8
    c.data.batch_size = e.prompts
  else:
    c.task = 'grpo'
    c.rl.rewards = 'next_token' if arm == 'rpt' else 'random'
    c.data.corpus = 'prompts'
    c.data.path = os.path.join(prompts_dir, 'train.jsonl')
    c.data.validation_path = os.path.join(prompts_dir, 'validation_hard.jsonl')
    # bos + the context, which decoding and encoding again may lengthen by a few tokens.
    c.data.seq_len = e.context + 8
    c.data.batch_size = e.prompts
  return dpo_instructions.stage_schedule(c, base_dir, steps=e.steps, lr=e.lr,
                                         eval_every=e.eval_every, checkpoint_every=e.eval_every)


def write_prompts(cfg, base_dir: str, out_dir: str) -> dict:
  """Stage 2: the three prompt sets (module docstring); returns their sizes (kept if written)."""
  counts_path = os.path.join(out_dir, 'counts.json')
  if os.path.isfile(counts_path):
    with open(counts_path) as f:
      return json.load(f)
  from pathways_jax.data import corpora  # pylint: disable=g-import-not-at-top
  from pathways_jax.rl import rpt  # pylint: disable=g-import-not-at-top
  from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
  _, model, params, tok = load_run(base_dir)
  e = cfg.rpt_exp
  common = dict(per_document=e.per_window, context=e.context, continuation=4, min_context=8,
                width=model.cfg.max_len)
  sets = {}
  for name, split, select, windows in (('train', 'train', 'hardest', e.train_windows),
                                       ('validation_hard', 'validation', 'hardest', 0),
                                       ('validation_random', 'validation', 'random', 0)):
    docs = corpora.load_documents(cfg.data, split)
    sets[name], _ = rpt.make_records(model, params, tok, docs, select=select, seed=cfg.seed,
                                     windows=windows, **common)
  os.makedirs(out_dir, exist_ok=True)
  for name, records in sets.items():
    path = os.path.join(out_dir, f'{name}.jsonl')
    with open(path + '.tmp', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)
    os.replace(path + '.tmp', path)
  counts = {name: len(records) for name, records in sets.items()}
  counts['mean_entropy'] = {name: sum(r['entropy'] for r in rs) / len(rs)
                            for name, rs in sets.items()}
  with open(counts_path, 'w') as f:
    json.dump(counts, f)
  return counts


def write_sft_examples(prompts_dir: str, base_dir: str) -> int:
  """WORKDIR/prompts/train_sft.jsonl: each training prompt as {"text", "completion": its true
  next token, decoded} (kept if written); returns the number of examples."""
  path = os.path.join(prompts_dir, 'train_sft.jsonl')
  if not os.path.isfile(path):
    from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
    tok = load_run(base_dir)[3]
    with open(os.path.join(prompts_dir, 'train.jsonl')) as f:
      records = [json.loads(line) for line in f]
    with open(path + '.tmp', 'w') as f:
      f.writelines(json.dumps({'text': r['text'],
                               'completion': tok.decode(r['continuation_ids'][:1])}) + '\n'
                   for r in records)
    os.replace(path + '.tmp', path)
  with open(path) as f:
    return sum(1 for _ in f)


def read_sets(prompts_dir: str) -> dict[str, list[dict]]:
  """The evaluation sets: both validation sets whole, and as many training prompts as
  validation_hard, evenly spaced."""
  sets = {}
  for name in SETS:
    with open(os.path.join(prompts_dir, f'{name}.jsonl')) as f:
      sets[name] = [json.loads(line) for line in f]
  n = len(sets['validation_hard'])
  sets['train'] = sets['train'][::max(1, len(sets['train']) // n)][:n]
  return sets


def score(run_dir: str, sets: dict[str, list[dict]]) -> dict:
  """{set: {accuracy (the reward's rule), exact (the true token), nll, n}} of the run's newest
  checkpoint (rl.rpt.next_token_scores)."""
  from pathways_jax.rl import rpt  # pylint: disable=g-import-not-at-top
  from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
  _, model, params, tok = load_run(run_dir)
  out = {}
  for name, records in sets.items():
    s = rpt.next_token_scores(model, params, tok, records, width=model.cfg.max_len)
    out[name] = {'accuracy': float(s['correct'].mean()), 'exact': float(s['exact'].mean()),
                 'nll': float(s['nll'].mean()), 'n': len(records)}
  return out


def run(cfg, workdir: str) -> dict:
  from pathways_jax.train import loop, metrics  # pylint: disable=g-import-not-at-top,multiple-import
  start = time.perf_counter()
  arms = arms_of(cfg)  # settings checked before any stage
  os.makedirs(workdir, exist_ok=True)
  dirs = {'base': os.path.join(workdir, 'base')}
  prompts_dir = os.path.join(workdir, 'prompts')
  wall = {'base_train_s': loop.train_stage(base_config_of(cfg), dirs['base']).get('wall_s')}
  t0 = time.perf_counter()
  counts = write_prompts(cfg, dirs['base'], prompts_dir)
  wall['prompts_s'] = time.perf_counter() - t0
  if 'sft_hard' in arms:
    counts = {**counts, 'train_sft': write_sft_examples(prompts_dir, dirs['base'])}
  curves = {}
  for arm in arms:
    dirs[arm] = os.path.join(workdir, arm)
    res = loop.train_stage(arm_config_of(cfg, arm, prompts_dir, dirs['base']), dirs[arm])
    wall[f'{arm}_train_s'] = res.get('wall_s')
    keys = (('loss',) if arm in ('ntp', 'sft_hard') else
            ('reward', 'reward/next_token', 'val_next_token', 'entropy', 'zero_std_groups'))
    curves[arm] = {k: metrics.logged(dirs[arm], k) for k in keys}
  sets = read_sets(prompts_dir)
  scores = {}
  for name, run_dir in dirs.items():
    scores[name] = score(run_dir, sets)
    print(f'{name}: ' + ', '.join(f'{s} {v["accuracy"]:.3f} / exact {v["exact"]:.3f} (nll '
                                  f'{v["nll"]:.2f})'
                                  for s, v in scores[name].items()))
  wall['total_s'] = time.perf_counter() - start
  results = {'status': 'completed', 'seed': cfg.seed, 'arms': list(arms), 'counts': counts,
             'scores': scores, 'curves': curves, 'wall_s': wall,
             'date': datetime.date.today().isoformat(), 'device': dpo_instructions.device(),
             'config': json.loads(cfg.to_json_best_effort())}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  return results
