"""VRPO's variance reductions, measured: Var(s_hat) at equal budget under three draw schemes.

    python -m pathways_jax.main --config=experiments/vrpo_variance.py --workdir=runs/vrpo_var \
        [--config.seed=1 --config.vrpo_var.repeats=256 --config.vrpo_var.budget=8 ...]

LLaDA 1.5 (arXiv 2505.19223) bounds the bias and variance of VRPO's loss and gradient by the
variance of the preference score estimate

    s_hat = beta * [(B_hat_pi(y_w) - B_hat_ref(y_w)) - (B_hat_pi(y_l) - B_hat_ref(y_l))]

(objectives/vrpo.py: B_hat is the mean of n = n_t * n_yt draws of LLaDA's per-sequence ELBO
term) and reduces it at no cost by (2) the allocation n_t = n, n_yt = 1 and (3) antithetic
sampling (the reference scores the policy's own timesteps and masks). This experiment measures
Var(s_hat) for a fixed set of pairs, R repeats with different keys, at equal budget n under:

  (a) worst:      n_t = 1, n_yt = n, independent draws for policy and reference
  (b) optimal:    n_t = n, n_yt = 1, independent draws
  (c) optimal + antithetic: n_t = n, n_yt = 1, the reference on the policy's draws

Stages (finished ones are skipped, so the same command resumes):
1. ref: a tiny LLaDA pretrained `vrpo_var.ref_steps` steps on the synthetic corpus (biographies,
   stories, arithmetic; byte tokenizer) in WORKDIR/ref: the reference.
2. policy_<k>: the same model trained k more steps (init_from WORKDIR/ref, new data order) for
   each k in `vrpo_var.policy_steps`: policies near to and farther from the reference.
3. pairs: `vrpo_var.pairs_per_kind` questions of each kind (birthplace, occupation, arithmetic)
   about the same world, chosen = the true answer, rejected = a false one, rendered with the
   byte tokenizer's chat template and packed as data/preference.py packs them.
4. For every policy and scheme: R = `vrpo_var.repeats` estimates of s_hat for every pair, key
   fold_in(key(seed), repeat) (the same keys for every scheme and policy); per pair the variance
   over repeats (ddof 1), averaged over pairs; ratios to (a) with a bootstrap 95% interval over
   repeats; the mean of s_hat over everything (the schemes are unbiased: they must agree) and of
   the loss -log sigmoid(s_hat) (its excess over -log sigmoid(E s_hat) is the bias variance
   causes).
5. Why the allocation helps as much as it does: for the reference and each policy, one draw's
   per-sequence ELBO term's variance split into between timesteps (Var_t E[l|t]) and within a
   timestep (E_t Var(l|t)), from `vrpo_var.split_timesteps` timesteps with two masks each; the
   allocation's gain on one B_hat at budget n is (V_t + W/n) / ((V_t + W)/n) (`timestep_split`).

WORKDIR/results.json: the table per policy, per-pair variances, the splits, the pairs, the
settings, seeds, wall times, date, device and config; the scores themselves in WORKDIR/scores
(keyed by the rows and settings: a rerun reads them back). Ratios do not depend on beta (s_hat
scales with it).
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import platform
import random
import time

import ml_collections

from pathways_jax.config import base_config

SCHEMES = (('a_worst', 'n_t=1, n_yt=n, independent'),
           ('b_optimal', 'n_t=n, n_yt=1, independent'),
           ('c_optimal_antithetic', 'n_t=n, n_yt=1, antithetic'))


def get_config():
  c = base_config()
  c.name = 'vrpo_variance'
  c.seed = 0
  c.objective = 'diffusion'
  c.data.corpus = 'synthetic'
  c.data.tokenizer = 'byte'
  c.data.synthetic.seed = 0
  c.data.synthetic.num_people = 60
  c.data.synthetic.num_stories = 60
  c.data.synthetic.num_arithmetic = 1000
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.data.eval_batches = 2
  c.model.causal = False
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 4  # LLaDA uses MHA
  c.model.mlp_dim = 192
  c.model.attention = 'cpu'  # the fused XLA:CPU kernel; falls back to 'xla' off CPU
  c.model.max_len = 256
  c.train.steps = 600  # overwritten per stage from vrpo_var
  c.train.lr = 3e-3
  c.train.warmup_steps = 30
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.train.progress_bar = False
  c.sample.prompts = ()
  c.vrpo_var = v = ml_collections.ConfigDict()
  v.ref_steps = 600
  v.policy_steps = (50, 300)  # one policy per entry: the reference trained that many more steps
  v.policy_lr = 1e-3
  v.pairs_per_kind = 4  # x 3 kinds (birthplace, occupation, arithmetic)
  v.pair_seq_len = 256  # rows of packed pairs (no pair is cut)
  v.budget = 8  # n = n_t * n_yt, every scheme
  v.repeats = 128  # R, estimates of s_hat per pair and scheme
  v.beta = 0.1
  v.bootstrap = 500  # resamples of the repeats for the ratios' intervals
  v.split_timesteps = 512  # timesteps (2 masks each) for the between/within variance split
  return c


def stage_config(cfg, name: str, steps: int, init_from: str = '', lr: float | None = None):
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-{name}'
  c.train.steps = steps
  c.train.eval_every = steps
  c.train.checkpoint_every = steps
  c.train.init_from = init_from
  if init_from:
    c.seed = cfg.seed + 1000 + steps  # another data order than the reference's
    c.train.warmup_steps = 0
  if lr is not None:
    c.train.lr = lr
  return c


def make_pairs(cfg) -> list[dict]:
  """(prompt, chosen, rejected) records about the config's synthetic world."""
  from pathways_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  world = synthetic.world_from_config(cfg.data)
  rng = random.Random(f'vrpo_variance/{cfg.seed}')
  k = cfg.vrpo_var.pairs_per_kind
  people = rng.sample(list(world.people), 2 * k)
  occupations = sorted({p.occupation for p in world.people})
  records = []
  for p in people[:k]:
    wrong = rng.choice([c for c in world.cities if c != p.city])
    records.append({'prompt': f'Where was {p.name} born?',
                    'chosen': f'{p.first_name} was born in {p.birth_year} in {p.city}.',
                    'rejected': f'{p.first_name} was born in {p.birth_year} in {wrong}.'})
  for p in people[k:]:
    wrong = rng.choice([o for o in occupations if o != p.occupation])
    records.append({'prompt': f'What does {p.name} do?',
                    'chosen': f'{p.first_name} works as a {p.occupation}.',
                    'rejected': f'{p.first_name} works as a {wrong}.'})
  for _ in range(k):
    a, b = rng.randrange(100), rng.randrange(100)
    records.append({'prompt': f'{a} + {b} =', 'chosen': f'{a + b}',
                    'rejected': f'{a + b + rng.choice((-11, -2, -1, 1, 2, 10))}'})
  return records


def pair_rows(cfg, records):
  from pathways_jax.data import preference as pref_data  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.get_tokenizer(cfg.data)
  pairs = [pref_data.render_pair(tok, *pref_data.from_record(r)) for r in records]
  fields, stats = pref_data.build_rows(pairs, cfg.vrpo_var.pair_seq_len, pad_id=tok.pad_id)
  if stats['kept'] != len(records) or stats['truncated']:
    raise ValueError(f'pairs were cut or lost packing them (vrpo_var.pair_seq_len): {stats}')
  return fields, stats, tok


def estimate_scores(policy, reference, fields, *, n_t: int, n_yt: int, antithetic: bool,
                    repeats: int, seed: int, beta: float, mask_id: int, eps: float,
                    chunk: int = 4):
  """float64 [repeats, P]: s_hat of every pair (the valid slots, in slot order) per repeat;
  repeat r draws with key fold_in(key(seed), r)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pathways_jax.objectives import vrpo  # pylint: disable=g-import-not-at-top
  from pathways_jax.tasks.vrpo import draw_token_terms  # pylint: disable=g-import-not-at-top
  batch = {k: jnp.asarray(fields[k]) for k in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
  resp, seg = batch['loss_mask'], batch['segment_ids']

  def one(pol_params, ref_params, key):
    pol_d, ref_d = vrpo.policy_and_reference_draws(
        key, batch['tokens'], seg, resp, n_t=n_t, n_yt=n_yt, mask_id=mask_id, eps=eps,
        antithetic=antithetic)
    pol = vrpo.pair_elbos(draw_token_terms(policy.model, pol_params, batch, pol_d), resp, seg)
    ref = vrpo.pair_elbos(draw_token_terms(reference.model, ref_params, batch, ref_d), resp, seg)
    return vrpo.preference_scores(pol, ref, beta=beta), pol['valid']

  # `chunk` repeats per call (vmapped: wider matmuls than one repeat's on a CPU).
  scores = jax.jit(jax.vmap(one, in_axes=(None, None, 0)))
  root = jax.random.key(seed)
  out = []
  for start in range(0, repeats, chunk):
    keys = jnp.stack([jax.random.fold_in(root, r) for r in range(start, start + chunk)])
    s, valid = scores(policy.params, reference.params, keys)
    out += [np.asarray(s[i], np.float64)[np.asarray(valid[i])] for i in range(chunk)]
  return np.stack(out[:repeats])


def timestep_split(model, params, fields, *, draws: int, seed: int, mask_id: int, eps: float,
                   chunk: int = 32) -> dict:
  """Where the per-draw ELBO term's variance comes from, per side under `model`: with l the
  per-sequence term of one draw (objectives/vrpo.py), mu(t) = E[l | t] and s2(t) = Var(l | t),

      Var(l) = Var_t mu(t) + E_t s2(t)           (between timesteps + within a timestep)

  estimated from `draws` timesteps with 2 masks each: E s2 = E (l1 - l2)^2 / 2, and Var_t mu =
  Var((l1 + l2) / 2) - E s2 / 2. For one ELBO estimate at budget n the allocation's gain is then
  Var(n_t=1, n_yt=n) / Var(n_t=n, n_yt=1) = (Var_t mu + E s2 / n) / ((Var_t mu + E s2) / n).
  Returns the two components averaged over the sides, the gain they predict at each budget
  asked, and the between share averaged over sides."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pathways_jax.objectives import preference, vrpo  # pylint: disable=g-import-not-at-top
  from pathways_jax.tasks.vrpo import draw_token_terms  # pylint: disable=g-import-not-at-top
  batch = {k: jnp.asarray(fields[k]) for k in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
  resp, seg = batch['loss_mask'], batch['segment_ids']

  @jax.jit
  def sides(p, key):  # [chunk, 2 masks, 2 * P] per-draw per-sequence terms
    d = vrpo.draw(key, batch['tokens'], seg, resp, n_t=chunk, n_yt=2, mask_id=mask_id, eps=eps)
    terms = draw_token_terms(model, p, batch, d)
    per = jax.vmap(lambda t: preference.packed_pair_logps(t, resp, seg))(terms)
    both = jnp.concatenate([per['chosen'], per['rejected']], axis=-1)
    valid = jnp.concatenate([per['valid'][0], per['valid'][0]])
    return both.reshape(chunk, 2, -1), valid

  root = jax.random.fold_in(jax.random.key(seed), 10**6)  # not the score repeats' keys
  out = []
  for start in range(0, draws, chunk):
    x, valid = sides(params, jax.random.fold_in(root, start))
    out.append(np.asarray(x, np.float64)[..., np.asarray(valid)])
  x = np.concatenate(out)[:draws]  # [T, 2, sides]
  within = ((x[:, 0] - x[:, 1]) ** 2 / 2).mean(axis=0)
  between = np.maximum(x.mean(axis=1).var(axis=0, ddof=1) - within / 2, 0.0)
  return {'between_t_var': float(between.mean()), 'within_t_var': float(within.mean()),
          'between_share_mean_over_sides': float((between / (between + within)).mean()),
          'mean_elbo_term': float(x.mean()), 'timesteps': int(x.shape[0])}


def allocation_gain(split: dict, n: int) -> float:
  v, w = split['between_t_var'], split['within_t_var']
  return (v + w / n) / ((v + w) / n)


def summarise(scores_by_scheme: dict, *, bootstrap: int, seed: int) -> dict:
  """Var(s_hat) per pair and averaged, ratios to (a) and between schemes with bootstrap
  intervals over the repeats, means of s_hat and of the loss."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = {}
  var = {k: s.var(axis=0, ddof=1) for k, s in scores_by_scheme.items()}
  boot = {}
  for k, s in scores_by_scheme.items():
    idx = rng.integers(0, s.shape[0], (bootstrap, s.shape[0]))
    boot[k] = np.stack([s[i].var(axis=0, ddof=1).mean() for i in idx])
  base = 'a_worst'
  for k, s in scores_by_scheme.items():
    loss = np.logaddexp(0.0, -s)  # -log sigmoid(s)
    row = {'var_mean_over_pairs': float(var[k].mean()),
           'var_median_over_pairs': float(np.median(var[k])),
           'mean_s': float(s.mean()),
           # Monte Carlo standard error of mean_s (pairs independent): the schemes must agree.
           'mean_s_se': float(np.sqrt(var[k].mean() / s.size)),
           'mean_loss': float(loss.mean()),
           'loss_at_mean_s': float(np.logaddexp(0.0, -s.mean(axis=0)).mean()),
           'var_per_pair': var[k].tolist()}
    ratio = boot[base] / boot[k]
    row['reduction_vs_a'] = float(var[base].mean() / var[k].mean())
    row['reduction_vs_a_ci95'] = [float(np.percentile(ratio, 2.5)),
                                  float(np.percentile(ratio, 97.5))]
    out[k] = row
  if 'b_optimal' in out and 'c_optimal_antithetic' in out:
    ratio = boot['b_optimal'] / boot['c_optimal_antithetic']
    out['c_optimal_antithetic']['reduction_vs_b'] = float(
        var['b_optimal'].mean() / var['c_optimal_antithetic'].mean())
    out['c_optimal_antithetic']['reduction_vs_b_ci95'] = [float(np.percentile(ratio, 2.5)),
                                                          float(np.percentile(ratio, 97.5))]
  return out


def table(name: str, summary: dict, budget: int, split: dict, ref_split: dict) -> str:
  lines = [f'{name}: Var(s_hat) at budget n = {budget}, averaged over pairs',
           f'  {"scheme":<34} {"Var(s_hat)":>11} {"vs (a)":>8} {"95% CI":>15} {"E s_hat":>9} '
           f'{"E loss":>8}']
  for key, label in SCHEMES:
    r = summary[key]
    lo, hi = r['reduction_vs_a_ci95']
    lines.append(f'  ({key[0]}) {label:<30} {r["var_mean_over_pairs"]:>11.4g} '
                 f'{r["reduction_vs_a"]:>7.2f}x {f"[{lo:.2f}, {hi:.2f}]":>15} '
                 f'{r["mean_s"]:>9.4f} {r["mean_loss"]:>8.4f}')
  c = summary['c_optimal_antithetic']
  lo, hi = c['reduction_vs_b_ci95']
  lines.append(f'  antithetic alone, (b) / (c): {c["reduction_vs_b"]:.2f}x [{lo:.2f}, {hi:.2f}]; '
               f'E s_hat Monte Carlo s.e. (a, b, c): '
               + ', '.join(f'{summary[k]["mean_s_se"]:.3g}' for k, _ in SCHEMES))
  for who, x in (('policy', split), ('reference', ref_split)):
    lines.append(f'  {who}: one draw\'s ELBO term, variance between timesteps '
                 f'{x["between_t_var"]:.4g}, within {x["within_t_var"]:.4g} (between share '
                 f'{x["between_share_mean_over_sides"]:.1%}); allocation gain this predicts for '
                 f'one B_hat at n = {budget}: {allocation_gain(x, budget):.2f}x')
  return '\n'.join(lines)


def run(cfg, workdir: str) -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from pathways_jax import parallel  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import frozen, loop  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  v = cfg.vrpo_var
  wall = {}
  t0 = time.perf_counter()
  ref_dir = os.path.join(workdir, 'ref')
  ref_res = loop.train_stage(stage_config(cfg, 'ref', v.ref_steps), ref_dir)
  wall['ref_train_s'] = time.perf_counter() - t0
  policy_dirs = {}
  for k in v.policy_steps:
    t0 = time.perf_counter()
    policy_dirs[k] = os.path.join(workdir, f'policy_{k}')
    loop.train_stage(stage_config(cfg, f'policy_{k}', k, init_from=os.path.abspath(ref_dir),
                                  lr=v.policy_lr), policy_dirs[k])
    wall[f'policy_{k}_train_s'] = time.perf_counter() - t0

  records = make_pairs(cfg)
  fields, stats, tok = pair_rows(cfg, records)
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  reference = frozen.load(ref_dir, mesh, rules)
  n = v.budget
  schemes = {'a_worst': (1, n, False), 'b_optimal': (n, 1, False),
             'c_optimal_antithetic': (n, 1, True)}
  # What the scores depend on beside the models: the rows and the settings (the cache key).
  h = hashlib.blake2b(digest_size=8)
  h.update(np.ascontiguousarray(fields['tokens']).tobytes())
  h.update(repr((n, v.repeats, v.beta, cfg.seed, cfg.diffusion.eps)).encode())
  key = h.hexdigest()
  summaries, tables, splits = {}, [], {}
  kw = dict(mask_id=tok.mask_id, eps=cfg.diffusion.eps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    t0 = time.perf_counter()
    splits['reference'] = timestep_split(reference.model, reference.params, fields,
                                         draws=v.split_timesteps, seed=cfg.seed, **kw)
    wall['reference_split_s'] = time.perf_counter() - t0
  for k, pdir in policy_dirs.items():
    policy = frozen.load(pdir, mesh, rules)
    by_scheme = {}
    for name, (n_t, n_yt, anti) in schemes.items():
      # Scores are kept in WORKDIR/scores (a rerun with the same settings reads them back).
      path = os.path.join(workdir, 'scores', f'policy_{k}-{name}-{key}.npy')
      if os.path.exists(path):
        by_scheme[name] = np.load(path)
        continue
      t0 = time.perf_counter()
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        by_scheme[name] = estimate_scores(
            policy, reference, fields, n_t=n_t, n_yt=n_yt, antithetic=anti, repeats=v.repeats,
            seed=cfg.seed, beta=v.beta, **kw)
      wall[f'policy_{k}_{name}_s'] = time.perf_counter() - t0
      os.makedirs(os.path.dirname(path), exist_ok=True)
      np.save(path, by_scheme[name])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      t0 = time.perf_counter()
      splits[f'policy_{k}'] = timestep_split(policy.model, policy.params, fields,
                                             draws=v.split_timesteps, seed=cfg.seed, **kw)
      wall[f'policy_{k}_split_s'] = time.perf_counter() - t0
    summaries[f'policy_{k}'] = summarise(by_scheme, bootstrap=v.bootstrap, seed=cfg.seed)
    tables.append(table(f'policy = reference + {k} steps', summaries[f'policy_{k}'], n,
                        splits[f'policy_{k}'], splits['reference']))
    print(tables[-1], flush=True)
  wall['total_s'] = time.perf_counter() - start
  results = {
      'status': 'completed', 'seed': cfg.seed, 'budget': n, 'repeats': v.repeats,
      'beta': v.beta, 'eps': cfg.diffusion.eps, 'pairs': len(records), 'pair_rows': stats,
      'ref_val_loss': ref_res.get('val_loss'), 'summary': summaries, 'table': tables,
      'timestep_split': {k: {**x, 'predicted_allocation_gain': allocation_gain(x, n)}
                         for k, x in splits.items()},
      'pair_records': records, 'wall_s': wall,
      'date': datetime.date.today().isoformat(),
      'versions': {'jax': jax.__version__, 'flax': flax.__version__},
      'device': {'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
                 'count': jax.device_count(), 'cpus': os.cpu_count(),
                 'machine': platform.machine()},
      'config': json.loads(cfg.to_json_best_effort())}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  return results
