"""LLaDA sampling speed and accuracy: plain, Fast-dLLM caches, threshold decoding, and AR for reference.

    python benchmarks/diffusion_sampling.py [--run_dir=runs/reversal] [--repeats=3]

Uses the AR and LLaDA models of a reversal-curse run (`experiments/reversal.py` saves both in its
workdir); without --run_dir, or if the directory has no models, it first trains a small pair
(the reversal experiment with a reduced config, a few minutes). The task has checkable answers:
the facts of the synthetic world that the models were trained on (name -> description for every
person, description -> name for the background people who were seen both ways), greedy decoding,
exact match of the answer phrase. All variants decode the same prompts, in one batch, side by side
in one process; each is compiled first and then timed over --repeats runs (the best is kept).
tokens/s counts the generated positions (batch x gen_length) per second of wall time.
"""
import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _reversal():
  spec = importlib.util.spec_from_file_location('reversal_experiment',
                                                os.path.join(REPO, 'experiments', 'reversal.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _ensure_run(rev, run_dir, *, train_seq_len=0, sft_fraction=None):
  if run_dir and all(os.path.exists(os.path.join(run_dir, f)) for f in
                     ('ar/checkpoints', 'llada/checkpoints', 'results.json')):
    return run_dir
  run_dir = run_dir or tempfile.mkdtemp(prefix='diffusion_bench_')
  cfg = rev.get_config()
  cfg.reversal.num_background, cfg.reversal.num_test = 40, 20
  cfg.reversal.control = False
  # A pair for timing, not the reversal result: stop each model once it knows the forward facts.
  cfg.reversal.stop_at_target, cfg.reversal.llada_max_steps = True, 6000
  cfg.data.seq_len = train_seq_len  # rows eos-padded to this length (0: the longest sentence)
  if sft_fraction is not None:
    cfg.reversal.sft_fraction = sft_fraction
  print(f'training a small AR/LLaDA pair in {run_dir} (no models given) ...', flush=True)
  rev.run(cfg, run_dir, quiet=True)
  return run_dir


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--run_dir', default=os.path.join(REPO, 'runs', 'reversal'))
  ap.add_argument('--gen_length', type=int, default=16)
  ap.add_argument('--block_length', type=int, default=4)
  ap.add_argument('--threshold', type=float, default=0.9)
  ap.add_argument('--max_prompts', type=int, default=256)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--json_out', default='')
  ap.add_argument('--attention', default='',
                  help="model.attention for both models (e.g. cpu, the fused XLA:CPU kernel); "
                       "default: what the run was trained with")
  ap.add_argument('--train_seq_len', type=int, default=0,
                  help='only when the pair is trained here: training rows eos-padded to this length, '
                       'so that prompt + gen_length stays within the lengths the model was trained on')
  ap.add_argument('--sft_fraction', type=float, default=None,
                  help="only when the pair is trained here: LLaDA's SFT share (experiment default if unset)")
  args = ap.parse_args(argv)
  from pathways_jax.config import choices
  if args.attention and args.attention not in choices('model.attention'):
    ap.error(f"--attention={args.attention!r} is not one of {choices('model.attention')}")

  import jax
  import ml_collections
  from pathways_jax.data import facts
  from pathways_jax.eval import facts as facts_eval
  from pathways_jax.sampling import autoregressive as ar_samp
  from pathways_jax.sampling import diffusion as d_samp

  rev = _reversal()
  run_dir = _ensure_run(rev, args.run_dir, train_seq_len=args.train_seq_len,
                        sft_fraction=args.sft_fraction)
  with open(os.path.join(run_dir, 'results.json')) as f:
    run_res = json.load(f)
  cfg = ml_collections.ConfigDict(run_res['config'])
  background, test = rev.make_groups(cfg)
  tok = rev.load_tokenizer(run_dir)
  ar_model, ar_params = rev.load_model(run_dir, 'ar')
  ll_model, ll_params = rev.load_model(run_dir, 'llada')
  if args.attention:
    from pathways_jax.models.transformer import Transformer
    ar_model = Transformer(ar_model.cfg.replace(attention=args.attention))
    ll_model = Transformer(ll_model.cfg.replace(attention=args.attention))

  rows = [facts.encode_fact(tok, p, 'name_first', 0) for p in background + test]
  rows += [facts.encode_fact(tok, p, 'description_first', 0) for p in background]
  rng = np.random.default_rng(0)
  rows = [rows[i] for i in rng.permutation(len(rows))[:args.max_prompts]]
  prompt, pmask = facts_eval.left_pad([r.tokens[:r.prompt_len] for r in rows], 0)
  B, G = len(rows), args.gen_length
  answers = [r.answer_text.strip() for r in rows]

  def accuracy(out):
    gen = np.asarray(out)[:, prompt.shape[1]:]
    return float(np.mean([facts_eval.answer_text(tok, g) == a for g, a in zip(gen, answers)]))

  key = jax.random.key(0)
  common = dict(mask_id=tok.mask_id, key=key, gen_length=G, steps=G,
                block_length=args.block_length, prompt_mask_BP=pmask, return_stats=True)
  variants = [
      ('LLaDA plain', dict()),
      ('+ prefix cache', dict(cache='prefix')),
      ('+ dual cache', dict(cache='dual')),
      (f'+ threshold {args.threshold}', dict(threshold=args.threshold)),
      (f'+ dual cache + threshold {args.threshold}', dict(cache='dual', threshold=args.threshold)),
      (f'+ prefix cache + threshold {args.threshold}',
       dict(cache='prefix', threshold=args.threshold)),
  ]
  table = []

  def timed(fn):
    out = fn()
    jax.block_until_ready(out)  # compile + first run
    best = float('inf')
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      out = fn()
      jax.block_until_ready(out)
      best = min(best, time.perf_counter() - t0)
    return out, best

  for name, kw in variants:
    (out, stats), secs = timed(lambda kw=kw: d_samp.generate(ll_model, ll_params, prompt,
                                                             **common, **kw))
    steps = float(np.mean(np.asarray(stats['steps'])))
    table.append(dict(method=name, seconds=secs, tokens_per_s=B * G / secs,
                      accuracy=accuracy(out), steps=steps))
  out, secs = timed(lambda: ar_samp.generate(ar_model, ar_params, prompt, key=key,
                                             max_new_tokens=G, temperature=0.0,
                                             prompt_mask_BP=pmask, eos_id=tok.eos_id))
  table.append(dict(method='AR, KV cache (same size)', seconds=secs, tokens_per_s=B * G / secs,
                    accuracy=accuracy(out), steps=float(G)))

  plain = table[0]
  n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(ll_params))
  print(f'\n{B} prompts (synthetic facts), gen_length {G}, block {args.block_length}, greedy; '
        f'models from {run_dir} ({n_params} params each, attention '
        f'{ll_model.cfg.attention}); device: '
        f'{jax.devices()[0].platform}, {os.cpu_count()} cores ({platform.machine()}); '
        f'{time.strftime("%Y-%m-%d")}\n')
  print('| method | accuracy | steps / block row | seconds | tokens/s | speed-up vs plain |')
  print('|---|---|---|---|---|---|')
  for r in table:
    print(f'| {r["method"]} | {r["accuracy"]:.3f} | {r["steps"]:.1f} | {r["seconds"]:.3f} | '
          f'{r["tokens_per_s"]:.0f} | {plain["seconds"] / r["seconds"]:.1f}x |')
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump({'rows': table, 'batch': B, 'gen_length': G, 'block_length': args.block_length,
                 'run_dir': run_dir}, f, indent=2)
  return table


if __name__ == '__main__':
  main()
