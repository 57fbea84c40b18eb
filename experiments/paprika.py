"""PAPRIKA on multi-turn games: min-p trajectories -> SFT on the good ones -> RPO on (better,
worse) pairs; success and turns on held-out instances and on a game never trained on.

    python -m pathways_jax.main --config=experiments/paprika.py --workdir=runs/paprika \
        [--config.seed=1 --config.paprika.heldout_game=guess_number ...]

The games are pathways_jax.games (guess the number, twenty questions about the synthetic world's
people, Mastermind); `paprika.heldout_game` is left out of PAPRIKA's data (leave-one-game-out, as
the paper). Stages (each skipped once finished, so the same command resumes):

1. random play: `paprika.random_games` uniformly random legal games of every game, the held-out
   one included, on training instances -> WORKDIR/games/random_play.jsonl; a sentencepiece
   tokenizer trained on their text -> WORKDIR/games/tokenizer.model.
2. base: a tiny AR model trained from scratch on the random-play transcripts (task 'sft', loss on
   the agent's turns): it plays every game, mostly legally, below the chance level of random
   legal moves.
3. trajectories: the base plays `paprika.instances` training instances of each training game
   `paprika.samples` times with min-p sampling (temperature `paprika.temperature`, min-p
   `paprika.min_p`) -> WORKDIR/paprika_data/{trajectories,sft,pairs}.jsonl: each instance's best
   winning game (SFT), and its best winning game against its worst (pairs, when their scores --
   fewer turns is better, a loss is 0 -- differ by `paprika.min_gap`). The diversity check plays
   the first `paprika.diversity_instances` of those instances again at the same temperature
   without min-p.
4. sft: task 'sft' from the base on sft.jsonl (stage 1).
5. rpo: task 'dpo' from the SFT model, its own reference, on pairs.jsonl with
   `dpo.rpo_alpha` = 1 (DPO + the chosen game's NLL: RPO, stage 2); only the agent's turns count.
6. evaluation: base, sft and rpo play `paprika.eval_instances` held-out instances of each
   training game, and as many instances of the held-out game, `paprika.eval_samples` times each
   at `paprika.eval_temperature` (the same instances and random draws for every arm).

WORKDIR/results.json: per arm (and `random`: uniformly random legal moves on the same instances,
the chance level) and game the success rate, mean turns, illegal- and consistent-move rates; the
data counts; the diversity comparison (min-p vs plain sampling: distinct games and first moves
per instance, success, illegal-move rate); wall times; date, device, config. docs/paprika.md.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time

import ml_collections

from pathways_jax import config as config_lib
from pathways_jax.config import base_config


def get_config():
  c = base_config()
  c.name = 'paprika'
  c.seed = 0
  c.objective = 'autoregressive'
  c.task = 'sft'
  c.data.corpus = 'chat'
  c.data.tokenizer = 'sentencepiece'  # trained on the random-play transcripts (stage 1)
  c.data.vocab_size = 512
  c.data.seq_len = 320  # the longest games (twenty questions) are ~300 tokens
  c.data.batch_size = 16
  c.data.eval_batches = 4
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 384
  c.model.max_len = 320
  c.model.attention = 'cpu'  # the fused XLA:CPU kernel; falls back to 'xla' off CPU
  c.train.steps = 1500  # the base, on random play
  c.train.lr = 3e-3
  c.train.warmup_steps = 40
  c.train.log_every = 50
  c.train.eval_every = 1500
  c.train.checkpoint_every = 1500
  c.train.progress_bar = False
  c.sample.prompts = ()
  c.dpo.beta = 0.1
  c.dpo.rpo_alpha = 1.0  # PAPRIKA's stage 2: DPO + the chosen game's NLL
  c.paprika = p = ml_collections.ConfigDict()
  p.games = 'guess_number,twenty_questions,mastermind'
  p.heldout_game = 'mastermind'  # never in PAPRIKA's data ('' : none held out)
  p.world_people = 60  # twenty questions' world (data.synthetic.make_world(0, N))
  p.random_games = 1500  # random-play games per game, for the base
  p.instances = 300  # training instances per training game, for PAPRIKA's data
  p.samples = 8  # games per instance
  p.temperature = 1.5
  p.min_p = 0.3  # PAPRIKA's code default at temperature >= 0.2
  p.min_gap = 1  # pairs: the chosen game's score exceeds the rejected one's by at least this
  p.sft_per_instance = 1
  p.sft_steps = 150
  p.sft_lr = 3e-4
  p.rpo_steps = 150
  p.rpo_lr = 1e-5
  p.rpo_batch_size = 8
  p.eval_instances = 128  # held-out instances per game (fewer if the game has fewer)
  p.eval_samples = 4  # games per evaluation instance
  p.eval_temperature = 0.7  # plain sampling (a random-play base has no meaningful greedy move)
  p.diversity_instances = 40
  p.play_batch = 128
  p.max_move_tokens = 16
  return c


def make_games(cfg) -> dict:
  from pathways_jax import games  # pylint: disable=g-import-not-at-top
  p = cfg.paprika
  names = [n.strip() for n in p.games.split(',') if n.strip()]
  if not names:
    raise config_lib.ConfigError('config.paprika.games names no game')
  for n in names:
    if n not in games.GAMES:
      raise config_lib.ConfigError(f'config.paprika.games: unknown game {n!r}; games: '
                                   f'{sorted(games.GAMES)}')
  if p.heldout_game and p.heldout_game not in names:
    raise config_lib.ConfigError(f'config.paprika.heldout_game={p.heldout_game!r} is not one of '
                                 f'config.paprika.games ({names})')
  if len(names) == 1 and p.heldout_game:
    raise config_lib.ConfigError('config.paprika: holding out the only game leaves nothing to '
                                 'train on')
  kw = {'twenty_questions': {'num_people': p.world_people}}
  return {n: games.make(n, **kw.get(n, {})) for n in names}


def _write_jsonl(records, path):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, path)


def random_play_data(cfg, workdir: str, game_set: dict) -> dict:
  """Stage 1: WORKDIR/games/{random_play.jsonl, tokenizer.model} (written once)."""
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from pathways_jax.games import play  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, 'games')
  paths = {'data': os.path.join(out, 'random_play.jsonl'),
           'tokenizer': os.path.join(out, 'tokenizer.model')}
  if all(os.path.exists(v) for v in paths.values()):
    return paths
  os.makedirs(out, exist_ok=True)
  trajs = []
  for k, game in enumerate(game_set.values()):
    jobs = [(game, inst) for inst in game.instances('train', cfg.paprika.random_games, seed=k)]
    reps = -(-cfg.paprika.random_games // len(jobs))  # small games: several games per instance
    trajs += play.play_random(jobs, samples=reps, seed=cfg.seed * 100 + k)[
        :cfg.paprika.random_games]
  # The tokenizer sees what the model will: every message and the built-in template's markup.
  texts = [f'<{m["role"]}>\n{m["content"]}' for t in trajs for m in t['messages']]
  tokenizers.train_sentencepiece(texts, cfg.data.vocab_size, os.path.join(out, 'tokenizer'))
  _write_jsonl([{'messages': t['messages'], 'game': t['game']} for t in trajs], paths['data'])
  return paths


def stage_config(cfg, name: str, data_path: str, tokenizer_path: str, *, init_from: str = '',
                 steps: int, lr: float):
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-{name}'
  c.data.path = os.path.abspath(data_path)
  c.data.tokenizer_path = os.path.abspath(tokenizer_path)
  c.train.update(steps=steps, lr=lr, eval_every=steps, checkpoint_every=steps)
  if init_from:
    c.train.update(init_from=os.path.abspath(init_from), warmup_steps=min(20, steps // 10))
  return c


def rpo_config_of(cfg, pairs_path: str, tokenizer_path: str, sft_dir: str):
  p = cfg.paprika
  c = stage_config(cfg, 'rpo', pairs_path, tokenizer_path, init_from=sft_dir, steps=p.rpo_steps,
                   lr=p.rpo_lr)
  c.task = 'dpo'
  c.data.corpus = 'preference'
  c.data.batch_size = p.rpo_batch_size
  c.data.seq_len = 2 * cfg.data.seq_len  # both games of a pair in one row
  c.model.max_len = c.data.seq_len
  c.train.update(schedule='constant', weight_decay=0.0)
  return c


def _load(run_dir):
  from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
  _, model, params, tokenizer = load_run(run_dir)
  return model, params, tokenizer


def _play(cfg, run_dir, jobs, *, samples, temperature, min_p, seed):
  from pathways_jax.games import play  # pylint: disable=g-import-not-at-top
  model, params, tokenizer = _load(run_dir)
  return play.play(model, params, tokenizer, jobs, samples=samples, temperature=temperature,
                   min_p=min_p, seed=seed, batch_size=cfg.paprika.play_batch,
                   max_move_tokens=cfg.paprika.max_move_tokens,
                   context=cfg.data.seq_len)


def _generate(cfg, base_dir, jobs):
  """PAPRIKA's data: the base's games at `paprika.temperature` with min-p."""
  p = cfg.paprika
  return _play(cfg, base_dir, jobs, samples=p.samples, temperature=p.temperature, min_p=p.min_p,
               seed=cfg.seed * 1000 + 1)


def paprika_data(cfg, workdir: str, game_set: dict, base_dir: str) -> dict:
  """Stage 3: the base's min-p games on training instances of the training games -> SFT and
  pair files, and the diversity comparison (written once)."""
  from pathways_jax.games import trajectories as T  # pylint: disable=g-import-not-at-top
  p = cfg.paprika
  out = os.path.join(workdir, 'paprika_data')
  counts_path = os.path.join(out, 'counts.json')
  if os.path.exists(counts_path):
    with open(counts_path) as f:
      return json.load(f)
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  train_games = {n: g for n, g in game_set.items() if n != p.heldout_game}
  jobs = [(g, inst) for k, g in enumerate(train_games.values())
          for inst in g.instances('train', p.instances, seed=cfg.seed * 100 + k)]
  trajs = _generate(cfg, base_dir, jobs)
  max_turns = {n: g.max_turns for n, g in game_set.items()}
  sft = T.sft_records(trajs, max_turns, per_instance=p.sft_per_instance)
  pairs = T.pair_records(trajs, max_turns, min_gap=p.min_gap)
  if not sft or not pairs:
    raise RuntimeError(f'the base won {len(sft)} instances and gave {len(pairs)} pairs: nothing '
                       'to train on (more instances or samples, or a longer base stage)')
  _write_jsonl(trajs, os.path.join(out, 'trajectories.jsonl'))
  _write_jsonl(sft, os.path.join(out, 'sft.jsonl'))
  _write_jsonl(pairs, os.path.join(out, 'pairs.jsonl'))
  gen_s = time.perf_counter() - t0
  # Diversity: the same instances, the same temperature, no min-p.
  div_jobs = [(g, inst) for g in train_games.values()
              for inst in [i for gg, i in jobs if gg is g][:p.diversity_instances]]
  keys = {(g.name, json.dumps(i, sort_keys=True)) for g, i in div_jobs}
  minp = [t for t in trajs if (t['game'], json.dumps(t['instance'], sort_keys=True)) in keys]
  plain = _play(cfg, base_dir, div_jobs, samples=p.samples, temperature=p.temperature,
                min_p=None, seed=cfg.seed * 1000 + 2)
  diversity = {name: {'diversity': T.diversity(ts), 'play': T.summarize(ts)}
               for name, ts in (('min_p', minp), ('plain', plain))}
  counts = {'trajectories': len(trajs), 'sft_games': len(sft), 'pairs': len(pairs),
            'per_game': {n: {'sft_games': sum(r['game'] == n for r in sft),
                             'pairs': sum(r['game'] == n for r in pairs)} for n in train_games},
            'sampled_play': T.summarize(trajs), 'diversity': diversity,
            'wall_s': {'generate': gen_s, 'diversity': time.perf_counter() - t0 - gen_s}}
  with open(counts_path, 'w') as f:
    json.dump(counts, f, indent=2)
  return counts


def eval_jobs(cfg, game_set: dict) -> list:
  """`paprika.eval_instances` held-out instances of each training game; of the held-out game
  (never in PAPRIKA's data), as many of all its instances."""
  import random  # pylint: disable=g-import-not-at-top
  p, jobs = cfg.paprika, []
  for name, g in game_set.items():
    if name == p.heldout_game:
      pool = g.all_instances()
      insts = random.Random(f'{name}/eval').sample(pool, min(p.eval_instances, len(pool)))
    else:
      insts = g.instances('heldout', p.eval_instances, seed=0)
    jobs += [(g, inst) for inst in insts]
  return jobs


def evaluate(cfg, run_dir: str, game_set: dict) -> dict:
  """`paprika.eval_samples` games per evaluation instance at `paprika.eval_temperature` (the
  same instances and draws for every arm)."""
  from pathways_jax.games import trajectories as T  # pylint: disable=g-import-not-at-top
  p = cfg.paprika
  return T.summarize(_play(cfg, run_dir, eval_jobs(cfg, game_set), samples=p.eval_samples,
                           temperature=p.eval_temperature, min_p=None, seed=12345))


def device() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
          'count': jax.device_count(), 'cpus': os.cpu_count(), 'machine': platform.machine()}


def run(cfg, workdir: str) -> dict:
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  p = cfg.paprika
  for key in ('random_games', 'instances', 'samples', 'sft_steps', 'sft_lr', 'rpo_steps',
              'rpo_lr', 'rpo_batch_size', 'eval_instances', 'diversity_instances', 'play_batch',
              'max_move_tokens', 'sft_per_instance', 'min_gap', 'eval_samples'):
    if not p[key] > 0:
      raise config_lib.ConfigError(f'config.paprika.{key} must be > 0, got {p[key]}')
  for key, ok, want in (('temperature', p.temperature > 0, '> 0 (the games are sampled)'),
                        ('min_p', 0 <= p.min_p < 1, 'in [0, 1)'),
                        ('eval_temperature', p.eval_temperature >= 0, '>= 0 (0: greedy)')):
    if not ok:
      raise config_lib.ConfigError(f'config.paprika.{key}={p[key]} must be {want}')
  if p.samples < 2:
    raise config_lib.ConfigError('config.paprika.samples must be >= 2: pairs and diversity '
                                 'compare games of one instance')
  game_set = make_games(cfg)
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  wall = {}
  paths = random_play_data(cfg, workdir, game_set)
  dirs = {arm: os.path.join(workdir, arm) for arm in ('base', 'sft', 'rpo')}
  t0 = time.perf_counter()
  loop.train_stage(stage_config(cfg, 'base', paths['data'], paths['tokenizer'],
                                steps=cfg.train.steps, lr=cfg.train.lr), dirs['base'])
  wall['base_train_s'] = time.perf_counter() - t0
  counts = paprika_data(cfg, workdir, game_set, dirs['base'])
  data_dir = os.path.join(workdir, 'paprika_data')
  t0 = time.perf_counter()
  loop.train_stage(stage_config(cfg, 'sft', os.path.join(data_dir, 'sft.jsonl'),
                                paths['tokenizer'], init_from=dirs['base'], steps=p.sft_steps,
                                lr=p.sft_lr), dirs['sft'])
  wall['sft_train_s'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  loop.train_stage(rpo_config_of(cfg, os.path.join(data_dir, 'pairs.jsonl'), paths['tokenizer'],
                                 dirs['sft']), dirs['rpo'])
  wall['rpo_train_s'] = time.perf_counter() - t0
  from pathways_jax.games import play, trajectories  # pylint: disable=g-import-not-at-top
  evals = {'random': trajectories.summarize(play.play_random(  # the chance level, same games
      eval_jobs(cfg, game_set), samples=p.eval_samples, seed=12345))}
  for arm, run_dir in dirs.items():
    t0 = time.perf_counter()
    evals[arm] = evaluate(cfg, run_dir, game_set)
    wall[f'{arm}_eval_s'] = time.perf_counter() - t0
    for game, s in evals[arm].items():
      tag = ' (held-out game)' if game == p.heldout_game else ''
      print(f'{arm:5s} {game:17s}{tag}: success {s["success_rate"]:.3f} of {s["games"]}, mean '
            f'turns {s["mean_turns"]:.2f}, illegal {s["illegal_rate"]:.3f}')
  wall['total_s'] = time.perf_counter() - start
  results = {'status': 'completed', 'seed': cfg.seed, 'heldout_game': p.heldout_game,
             'eval': evals, 'data': counts, 'wall_s': wall,
             'date': datetime.date.today().isoformat(), 'device': device(),
             'config': json.loads(cfg.to_json_best_effort())}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  return results


def markdown_table(data: dict, key: str = 'success_rate') -> str:
  """A markdown table of `key` per arm and game, mean ± sample std over the seeds of a figures
  data file (experiments/figures.py extract_paprika); the chance level as its first row."""
  import statistics  # pylint: disable=g-import-not-at-top
  seeds = list(data['seeds'].values())
  held = data['heldout_game']
  games = sorted(seeds[0]['eval']['base'], key=lambda g: (g == held, g))
  head = [f'{g} (held out)' if g == held else g for g in games]
  lines = ['| arm | ' + ' | '.join(head) + ' |', '|---|' + '---|' * len(games),
           '| random legal moves | ' + ' | '.join(f'{data["random"][g][key]:.3f}'
                                                  for g in games) + ' |']
  names = {'base': 'base (random-play SFT)', 'sft': 'PAPRIKA stage 1 (SFT)',
           'rpo': 'PAPRIKA stage 2 (SFT + RPO)'}
  for arm in ('base', 'sft', 'rpo'):
    cells = []
    for g in games:
      vals = [s['eval'][arm][g][key] for s in seeds]
      sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
      cells.append(f'{statistics.mean(vals):.3f} ± {sd:.3f}')
    lines.append(f'| {names[arm]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
