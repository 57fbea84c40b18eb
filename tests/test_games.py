"""The multi-turn games (pathways_jax.games): rules against plain solvers written here, model play
turn by turn, and PAPRIKA's data selection (experiments/paprika.py)."""
import itertools
import json
import math
import os
import random
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from pathways_jax import games
from pathways_jax.data import chat, synthetic, tokenizers
from pathways_jax.data import preference as pref_data
from pathways_jax.games import play as play_lib
from pathways_jax.games import trajectories as T

BYTES = tokenizers.ByteTokenizer()


def _solve(game, instance, policy):
  """Plays `policy(history) -> move` to the end; (episode, history [(move, reply)])."""
  ep, history = game.episode(instance), []
  while not ep.done:
    move = policy(ep, history)
    history.append((move, ep.step(move)))
  return ep, history


def test_guess_number_binary_search_wins_every_instance_within_log2_turns():
  game = games.make('guess_number', width=32, max_low=5)
  bound = math.ceil(math.log2(33))

  def bisect(ep, history):
    lo, hi = ep.instance['low'], ep.instance['high']
    for move, reply in history:
      n = int(move.split()[-1])
      lo, hi = (n + 1, hi) if reply.text == 'Higher.' else (lo, n - 1)
    return f'Guess: {(lo + hi) // 2}'

  for inst in game.all_instances():
    ep, history = _solve(game, inst, bisect)
    assert ep.success and ep.turns <= bound and ep.illegal == 0
    assert history[-1][1] == games.Reply('Correct!', True, True, True, True)
    assert ep.consistent == ep.turns  # bisection never guesses what an answer ruled out


def test_guess_number_illegal_moves_spend_turns_and_never_end_the_game_early():
  game = games.make('guess_number', width=8, max_low=1, max_turns=4)
  ep = game.episode({'low': 1, 'high': 8, 'secret': 5})
  assert ep.step('what?') == games.Reply('Reply `Guess: <number>`.', False, False, False, False)
  assert ep.step('Guess: 9').legal is False  # out of range
  assert ep.step('guess 3') == ('Higher.', False, False, True, True)  # lenient on the form
  last = ep.step('Guess: 2')  # legal, but 'Higher.' already ruled it out
  assert last.done and not last.success and last.text == 'Higher. No turns left. It was 5.'
  assert last.legal and not last.consistent and ep.consistent == 1
  assert (ep.turns, ep.illegal) == (4, 2)
  with pytest.raises(RuntimeError, match='over'):
    ep.step('Guess: 5')


def _reference_score(code, guess):
  """Exact hits, then near hits by matching each remaining guess peg to an unused code peg."""
  exact = [c == g for c, g in zip(code, guess)]
  free = [c for c, e in zip(code, exact) if not e]
  near = 0
  for g, e in zip(guess, exact):
    if not e and g in free:
      free.remove(g)
      near += 1
  return sum(exact), near


def test_mastermind_scores_match_a_peg_matching_reference_and_a_consistent_solver_wins():
  game = games.make('mastermind')
  codes = [tuple(i['code']) for i in game.all_instances()]
  assert len(codes) == 64
  for code, guess in itertools.product(codes, codes[::5]):
    assert games.mastermind.score(code, guess) == _reference_score(code, guess)

  def consistent(ep, history):  # the first code that agrees with every answer so far
    said = [(tuple(map(int, m[-3:])), tuple(map(int, re.findall(r'\d', r.text))))
            for m, r in history]
    for c in codes:
      if all(games.mastermind.score(c, g) == answer for g, answer in said):
        return 'Guess: ' + ''.join(map(str, c))
    raise AssertionError('no consistent code: the answers contradict each other')

  turns = []
  for inst in game.all_instances():
    ep, _ = _solve(game, inst, consistent)
    assert ep.success and ep.illegal == 0 and ep.consistent == ep.turns
    turns.append(ep.turns)
  assert max(turns) <= 6
  ep = game.episode({'code': [1, 2, 3]})
  assert ep.step('Guess: 1 2 3').success  # spaces allowed
  ep = game.episode({'code': [1, 2, 3]})
  assert ep.step('Guess: 111') == ('1 exact, 0 near.', False, False, True, True)
  assert ep.step('Guess: 111').consistent is False  # its answer is known: not the code
  assert ep.step('Guess: 112').consistent is False  # the code holds one 1, not two
  assert ep.step('Guess: 123').consistent is True
  ep = game.episode({'code': [1, 2, 3]})
  for bad in ('Guess: 12', 'Guess: 125', 'Guess: 1234', 'no'):
    assert ep.step(bad).legal is False


def test_twenty_questions_answers_from_the_world_and_halving_wins():
  game = games.make('twenty_questions', num_people=30, candidates=4, max_turns=9)
  world = synthetic.make_world(0, 30)
  truth = {f'{p.first_name} {p.last_name}'.title(): (p.occupation, p.city.title())
           for p in world.people}
  insts = game.instances('train', 50, seed=3)
  for inst in insts:
    for p in inst['candidates']:
      assert truth[p['name']] == (p['occupation'], p['city'])

  def halve(ep, history):
    alive = list(ep.people)
    for move, reply in history:
      yes = reply.text.startswith('Yes')
      if move.startswith('Was the person born in '):
        city = move[len('Was the person born in '):-1]
        alive = [p for p in alive if (p['city'] == city) == yes]
      elif move.startswith('Is the person'):
        occ = move.split()[-1][:-1]
        alive = [p for p in alive if (p['occupation'] == occ) == yes]
      else:
        alive = [p for p in alive if p['name'] != move[len('Is it '):-1]]
    if len(alive) == 1:
      return f'Is it {alive[0]["name"]}?'
    best = None
    for field, ask in (('occupation', 'Is the person a {}?'), ('city', 'Was the person born in {}?')):
      for v in {p[field] for p in alive}:
        k = sum(p[field] == v for p in alive)
        if best is None or abs(2 * k - len(alive)) < best[0]:
          best = (abs(2 * k - len(alive)), ask.format(v))
    return best[1] if best[0] < len(alive) else f'Is it {alive[0]["name"]}?'

  for inst in insts:
    ep, _ = _solve(game, inst, halve)
    assert ep.success and ep.illegal == 0 and ep.turns <= 4 and ep.consistent == ep.turns
  ep = game.episode(insts[0])
  other = next(o for o in truth if o not in {p['name'] for p in ep.people})
  assert ep.step(f'Is it {other}?') == games.Reply('No candidate has that name.', False, False,
                                                   False, False)
  assert ep.step('Is the person a dragon?').legal is False
  assert ep.step('hello').legal is False
  secret = ep.secret
  wrong = next(p for p in ep.people if p['name'] != secret['name'])
  assert ep.step(f'Is it {wrong["name"]}?') == ('No.', False, False, True, True)
  assert ep.step(f'Is it {wrong["name"]}?').consistent is False  # already ruled out
  city = ep.step(f'was the person born in {secret["city"].lower()} ?')
  assert city.text == 'Yes.'
  again = ep.step(f'Was the person born in {secret["city"]}?')
  assert again.legal and not again.consistent  # its answer is known


@pytest.mark.parametrize('name', sorted(games.GAMES))
def test_instance_splits_are_disjoint_deterministic_and_random_play_is_legal(name):
  game = games.make(name)
  train = game.instances('train', 10_000, seed=0)
  heldout = game.instances('heldout', 10_000, seed=0)
  assert len(train) + len(heldout) == len(game.all_instances())
  assert not {game.key(i) for i in train} & {game.key(i) for i in heldout}
  assert game.instances('train', 7, seed=1) == game.instances('train', 7, seed=1)
  trajs = play_lib.play_random([(game, i) for i in train[:40]], samples=2, seed=0)
  assert all(t['illegal'] == 0 and t['turns'] <= game.max_turns for t in trajs)
  assert any(t['success'] for t in trajs) and not all(t['success'] for t in trajs)
  for t in trajs:  # user, then (assistant, user) per turn
    roles = [m['role'] for m in t['messages']]
    assert roles == ['user'] + ['assistant', 'user'] * t['turns']
  with pytest.raises(ValueError, match='split'):
    game.instances('test', 3)


def test_unknown_game_and_bad_settings_are_named():
  with pytest.raises(ValueError, match="unknown game 'chess'"):
    games.make('chess')
  with pytest.raises(ValueError, match='candidates'):
    games.make('twenty_questions', num_people=3, candidates=4)
  with pytest.raises(ValueError, match='width'):
    games.make('guess_number', width=1)


# --------------------------------------------------------------------------------- model play

def _bisecting_generate(model, params, tokens_BP, *, key, max_new_tokens, prompt_mask_BP,
                        eos_id, pad_id, **_):
  """Stands in for the sampler: reads each row's conversation (bytes) and answers by bisection,
  so a game is won only if the conversation reaches the "model" intact, turn after turn."""
  out = np.full((tokens_BP.shape[0], tokens_BP.shape[1] + max_new_tokens), pad_id, np.int32)
  out[:, :tokens_BP.shape[1]] = tokens_BP
  for b, (row, mask) in enumerate(zip(np.asarray(tokens_BP), np.asarray(prompt_mask_BP))):
    ids = [int(t) for t, m in zip(row, mask) if m]
    text = BYTES.decode([i for i in ids if i not in BYTES.special_ids])
    assert ids == list(chat.prompt_ids(BYTES, _messages_of(text)))
    lo, hi = map(int, re.search(r'from (\d+) to (\d+)', text).groups())
    for n, hint in re.findall(r'Guess: (\d+)<user>\n(Higher|Lower)', text):
      lo, hi = (int(n) + 1, hi) if hint == 'Higher' else (lo, int(n) - 1)
    move = BYTES.encode(f'Guess: {(lo + hi) // 2}') + [eos_id]
    out[b, tokens_BP.shape[1]:tokens_BP.shape[1] + len(move)] = move
  return out


def _messages_of(text):
  """The messages of a built-in-template rendering, the trailing assistant prompt dropped."""
  parts = re.split(r'<(user|assistant)>\n', text)[1:]
  msgs = [{'role': r, 'content': c[:-1] if r == 'user' else c}
          for r, c in zip(parts[::2], parts[1::2])]
  return msgs[:-1]


def test_model_play_feeds_each_conversation_back_turn_by_turn(monkeypatch):
  from pathways_jax.sampling import autoregressive
  monkeypatch.setattr(autoregressive, 'generate', _bisecting_generate)
  model, params = _tiny_model(max_len=512)
  game = games.make('guess_number', width=32, max_low=3)
  jobs = [(game, i) for i in game.instances('train', 12, seed=0)]
  trajs = play_lib.play(model, params, BYTES, jobs, samples=2, batch_size=5)
  assert [t['instance'] for t in trajs] == [i for _, i in jobs for _ in range(2)]
  assert all(t['success'] and t['turns'] <= 6 and t['illegal'] == 0 for t in trajs)
  assert T.summarize(trajs)['guess_number']['success_rate'] == 1.0


def _tiny_model(max_len=96):
  from pathways_jax.config import ModelConfig
  from pathways_jax.models.transformer import Transformer
  cfg = ModelConfig(vocab_size=BYTES.vocab_size, d_model=32, num_layers=1, num_heads=2,
                    num_kv_heads=1, mlp_dim=64, max_len=max_len)
  model = Transformer(cfg)
  return model, nn.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32))['params'])


def test_a_model_that_writes_nonsense_loses_legally_counted_and_outgrown_games_overflow():
  model, params = _tiny_model(max_len=256)
  game = games.make('guess_number', width=8, max_low=2, max_turns=3)
  jobs = [(game, i) for i in game.instances('train', 3, seed=0)]
  trajs = play_lib.play(model, params, BYTES, jobs, samples=2, temperature=1.0, seed=1,
                        max_move_tokens=6)
  for t in trajs:  # a random byte model never writes a legal guess
    assert (t['success'], t['turns'], t['illegal'], t['overflow']) == (False, 3, 3, False)
    assert all(m['content'].strip() for m in t['messages'])  # empty moves are EMPTY_MOVE
  again = play_lib.play(model, params, BYTES, jobs, samples=2, temperature=1.0, seed=1,
                        max_move_tokens=6)
  assert again == trajs  # keyed by (seed, turn, batch)
  # A context that holds the intro but not a second turn: the game stops as an overflow.
  intro = len(chat.prompt_ids(BYTES, [{'role': 'user', 'content': game.episode(
      jobs[0][1]).intro}]))
  short = play_lib.play(model, params, BYTES, jobs[:1], max_move_tokens=6, context=intro + 8)
  assert short[0]['overflow'] and short[0]['turns'] == 1 and not short[0]['success']
  with pytest.raises(ValueError, match='exceeds model.max_len'):
    play_lib.play(model, params, BYTES, jobs, context=1024)


# --------------------------------------------------------------------------- PAPRIKA's data

def _traj(game, inst, turns, success, illegal=0, first='Guess: 1'):
  msgs = [{'role': 'user', 'content': 'intro'}]
  for k in range(turns):
    msgs += [{'role': 'assistant', 'content': first if k == 0 else f'Guess: {k + 10}'},
             {'role': 'user', 'content': 'Lower.'}]
  return {'game': game, 'instance': inst, 'messages': msgs, 'success': success, 'turns': turns,
          'illegal': illegal, 'consistent': turns - illegal, 'overflow': False}


def test_sft_takes_each_instances_best_win_and_pairs_need_a_score_gap():
  a, b, c = {'secret': 1}, {'secret': 2}, {'secret': 3}
  trajs = [_traj('g', a, 5, True), _traj('g', a, 2, True, first='Guess: 2'),
           _traj('g', a, 7, False, illegal=3), _traj('g', a, 7, False),
           _traj('g', b, 7, False), _traj('g', b, 7, False),  # never won: nothing
           _traj('g', c, 3, True), _traj('g', c, 3, True)]  # equal scores: SFT, no pair
  max_turns = {'g': 7}
  assert [T.score(t, 7) for t in trajs[:3]] == [3, 6, 0]
  sft = T.sft_records(trajs, max_turns)
  assert [r['messages'] for r in sft] == [trajs[1]['messages'], trajs[6]['messages']]
  pairs = T.pair_records(trajs, max_turns)
  assert len(pairs) == 1 and pairs[0]['score_gap'] == 6
  assert pairs[0]['chosen'] == trajs[1]['messages']
  assert pairs[0]['rejected'] == trajs[2]['messages']  # the worst: a loss with more illegal moves
  assert T.pair_records(trajs, max_turns, min_gap=7) == []
  assert len(T.sft_records(trajs, max_turns, per_instance=3)) == 3  # a: two wins; c: one distinct
  div = T.diversity(trajs)['g']
  assert div['instances'] == 3
  assert div['distinct_first_moves'] == pytest.approx((2 / 4 + 1 / 2 + 1 / 2) / 3)


def test_a_multi_turn_pair_trains_only_the_agents_turns_after_the_shared_prompt():
  intro = {'role': 'user', 'content': 'Guess my number from 1 to 8.'}
  chosen = [intro, {'role': 'assistant', 'content': 'Guess: 4'},
            {'role': 'user', 'content': 'Higher.'}, {'role': 'assistant', 'content': 'Guess: 6'},
            {'role': 'user', 'content': 'Correct!'}]
  rejected = [intro, {'role': 'assistant', 'content': 'Guess: 1'},
              {'role': 'user', 'content': 'Higher.'}, {'role': 'assistant', 'content': 'Guess: 2'},
              {'role': 'user', 'content': 'Higher.'}]
  prompt, c, r = pref_data.from_record({'chosen': chosen, 'rejected': rejected})
  assert prompt == [intro] and c == chosen[1:] and r == rejected[1:]
  (c_ids, c_mask), _ = pref_data.render_pair(BYTES, prompt, c, r)
  trained = BYTES.decode([int(i) for i, m in zip(c_ids, c_mask) if m and i != BYTES.eos_id])
  assert trained == 'Guess: 4Guess: 6'  # the agent's turns; the game's replies are context
  assert int(c_mask.sum()) == len('Guess: 4Guess: 6') + 2  # and each turn's eos
  # A prompt with an assistant turn of its own (shared moves before the games differ): context,
  # not trained, however many user turns the responses hold.
  shared = [intro, {'role': 'assistant', 'content': 'Guess: 8'}, {'role': 'user', 'content': 'Lower.'}]
  (c_ids, c_mask), _ = pref_data.render_pair(BYTES, shared, c, r)
  trained = BYTES.decode([int(i) for i, m in zip(c_ids, c_mask) if m and i != BYTES.eos_id])
  assert trained == 'Guess: 4Guess: 6'
  with pytest.raises(Exception, match='must start with an assistant message'):
    pref_data.from_record({'prompt': 'hi', 'chosen': [{'role': 'user', 'content': 'x'}],
                           'rejected': 'y'})


# ------------------------------------------------------------------- experiments/paprika.py

def _paprika():
  from pathways_jax import config_files
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return config_files.load_config_module(os.path.join(repo, 'experiments', 'paprika.py'))


@pytest.mark.parametrize('key,value,match', [
    ('paprika.samples', 1, 'samples must be >= 2'), ('paprika.sft_steps', 0, 'sft_steps'),
    ('paprika.games', 'guess_number,chess', "unknown game 'chess'"),
    ('paprika.heldout_game', 'chess', 'heldout_game'),
    ('paprika.games', 'mastermind', 'only game'),
    ('paprika.temperature', 0.0, r'temperature=0\.0 must be > 0'),
    ('paprika.min_p', 1.0, r'min_p=1\.0 must be in \[0, 1\)'),
    ('paprika.eval_temperature', -0.5, 'eval_temperature')])
def test_paprika_settings_are_checked_before_any_stage(tmp_path, key, value, match):
  from pathways_jax import config as config_lib
  paprika = _paprika()
  cfg = paprika.get_config()
  section, leaf = key.split('.')
  cfg[section][leaf] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    paprika.run(cfg, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_paprika_end_to_end_on_tiny_settings(tmp_path, monkeypatch):
  """Every stage on a tiny model. PAPRIKA's data is stood in for by random play (a 4-step base
  wins nothing, so it would give no pair); evaluation plays the trained models themselves."""
  paprika = _paprika()
  monkeypatch.setattr(paprika, '_generate', lambda cfg, base_dir, jobs: play_lib.play_random(
      jobs, samples=cfg.paprika.samples, seed=0))
  cfg = paprika.get_config()
  cfg.data.cache_dir = str(tmp_path / 'cache')
  cfg.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64,
                   attention='xla')
  cfg.data.update(batch_size=4, eval_batches=1, vocab_size=400)
  cfg.train.update(steps=4, warmup_steps=1, log_every=2, async_checkpoints=False,
                   peak_flops=1e10)
  cfg.paprika.update(random_games=40, instances=6, samples=4, sft_steps=2, rpo_steps=2,
                     rpo_batch_size=2, eval_instances=2, eval_samples=2, diversity_instances=2,
                     play_batch=16, max_move_tokens=8)
  workdir = tmp_path / 'run'
  res = paprika.run(cfg, str(workdir))
  held = cfg.paprika.heldout_game
  assert res['status'] == 'completed' and res['heldout_game'] == held
  for arm in ('base', 'sft', 'rpo'):
    assert set(res['eval'][arm]) == set(games.GAMES)
    for s in res['eval'][arm].values():
      assert s['games'] == 4 and 0 <= s['success_rate'] <= 1
  assert res['data']['sft_games'] > 0 and res['data']['pairs'] > 0
  assert set(res['data']['diversity']) == {'min_p', 'plain'}
  for name in ('sft.jsonl', 'pairs.jsonl'):  # the held-out game is never in PAPRIKA's data
    lines = (workdir / 'paprika_data' / name).read_text().splitlines()
    assert lines and all(json.loads(l)['game'] != held for l in lines)
  rpo = json.loads((workdir / 'rpo' / 'config.json').read_text())
  assert rpo['task'] == 'dpo' and rpo['dpo']['rpo_alpha'] == 1.0
  assert rpo['train']['init_from'] == str(workdir / 'sft')
  random_play = (workdir / 'games' / 'random_play.jsonl').read_text().splitlines()
  assert {json.loads(l)['game'] for l in random_play} == set(games.GAMES)  # held-out one too
  # Its numbers as the README's figure and the notebook's table take them.
  from pathways_jax import config_files
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  figures = config_files.load_config_module(os.path.join(repo, 'experiments', 'figures.py'))
  data = figures.extract_paprika(str(workdir), commit='abc')
  assert data['heldout_game'] == held and data['seed'] == ['0']
  assert data['random'] == {g: {k: pytest.approx(v[k], abs=1e-4) for k in figures.PAPRIKA_KEYS}
                            for g, v in res['eval']['random'].items()}
  assert os.path.getsize(figures.draw_paprika(data, str(tmp_path / 'p.png'))) > 10_000
  table = paprika.markdown_table(data).splitlines()
  assert len(table) == 6 and table[2].startswith('| random legal moves')
  # The same command again: every stage is found finished, only the evaluation reruns.
  monkeypatch.setattr(paprika, '_generate', None)
  again = paprika.run(cfg, str(workdir))
  assert again['eval'] == res['eval'] and again['data'] == res['data']
