"""Preference steps, pathways_jax vs TRL (PyTorch): DPO vs DPOTrainer, a reward model vs
RewardTrainer, and the DPO step's memory with a frozen vs a precomputed reference.

    python benchmarks/preference_vs_trl.py [--rounds=6] [--steps=1] [--warmup=1] [--seq_len=512]
        [--batch_size=8] [--max_turns=4] [--d_model=256 --num_layers=4 --num_heads=4
        --num_kv_heads=2 --mlp_dim=688 --vocab=8192] [--torch_python=.venv-golden/bin/python]
        [--no_torch] [--no_memory] [--workdir=DIR] [--json]
    make bench-preference

One run, both sides on the same inputs (the setup of benchmarks/sft_vs_trl.py, whose helpers
this imports):
  * preference pairs from the embedded instruction set (pathways_jax.data.instructions, a world
    of `--num_people` people): a system turn, 0 to `--max_turns`-1 earlier question/answer
    turns, a question; chosen = its right answer, rejected = the answer of another question of the
    same kind and format (a wrong answer in the right format);
  * a byte-level BPE tokenizer trained on them with a ChatML template, and a Llama model of the
    given size, randomly initialised and written as a HuggingFace directory; pathways_jax imports
    it (`train.init_from`, as its trainer does), TRL with `from_pretrained`: the same weights.
**The batch.** pathways_jax packs pairs into rows of `--seq_len` (data/preference.py: a pair's
two sides are adjacent segments of a row, best fit); the batch is the longest prefix of the pairs
that fills exactly `--batch_size` rows. TRL gets the same pairs as one batch
(`per_device_train_batch_size` = their number; its collators pad the chosen then the rejected
sequences to the batch's longest, [2P, max length]). Every step of either side trains on that
batch again. Both render the pairs with the template themselves; the script checks they see the
same real tokens (and, for DPO, the same response tokens).
**The steps** (float32, AdamW b1 0.9, b2 0.95, weight decay 0.1, clipping at global norm 1,
constant lr, no activation checkpointing):
  * DPO, loss_type sigmoid, beta 0.1, the reference a frozen copy of the initial model:
    pathways_jax's task 'dpo' (tasks/dpo.py; the reference loaded by the task's own setup and
    passed to every step as `aux`) in the jitted train step the trainer compiles; TRL's
    `DPOTrainer` with `ref_model=None` (TRL loads a second copy) and no precomputation.
    `DPOConfig(padding_free=True)` is requested; TRL 1.16 disables it (after its DPO refactor)
    and pads; the table says what it used.
  * a reward model, Bradley-Terry: task 'reward_model' (model.scalar_head=True, the head new)
    against `RewardTrainer` on `AutoModelForSequenceClassification(num_labels=1)` of the same
    directory (its `score` head new and random). The heads differ; the backbones are the same.
The TRL side runs in the torch venv (benchmarks/preference_vs_trl_torch.py, a subprocess; its
trainers' own loops, paused between rounds). Rounds alternate (every runner once per round, in a
shuffled order, after `--warmup` untimed steps each (1: the first step of either side is the one
that sets things up: XLA's first execution, TRL's optimizer state); _rounds.py). Throughput
counts the real (non-padding) tokens of the chosen and rejected sequences (prompt included); the
ratios are of the best rounds and the median over rounds of each round's own ratio. A third
figure, the same per-round median per slot (padding counted on both sides), separates what
packing rather than padding gains from what the step itself gains.

**Memory** (no torch needed): the DPO step compiled with the frozen reference (the timed program)
and with `dpo.precompute=True` (the reference's per-token log-probs a batch field `ref_logp`, no
reference params in the step), XLA's `memory_analysis()` of each.
Without the torch venv (or with --no_torch) the script reports pathways_jax alone.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pathways_jax import config as config_lib, host_memory, parallel, tasks  # noqa: E402
from pathways_jax.data import instructions, preference, synthetic  # noqa: E402
from pathways_jax.interop.hf import run_dir  # noqa: E402
from pathways_jax.models.transformer import Transformer  # noqa: E402
from pathways_jax.train import optimizer, state as state_lib, step as step_lib  # noqa: E402
from _rounds import Worker, ratio, round_rows, time_rounds, usable_torch_python  # noqa: E402
from train_throughput import paired_ratio  # noqa: E402
from sft_vs_trl import SYSTEM, TORCH_PYTHON, model_config, train_config  # noqa: E402
from sft_vs_trl import add_model_args, write_random_model, train_tokenizer, tree_bytes  # noqa: E402

WORKER = os.path.join(REPO, 'benchmarks', 'preference_vs_trl_torch.py')
PAIRS = (('dpo', 'DPO (sigmoid, frozen reference)'), ('reward', 'reward model (Bradley-Terry)'))


# ------------------------------------------------------------------------------ shared inputs

def make_pairs(*, num_people: int, max_turns: int, seed: int = 0) -> list[dict]:
  """Preference records (TRL's conversational shape) from the instruction set: a system turn,
  0..max_turns-1 earlier turns, a question; chosen its answer, rejected the answer of another
  question of the same kind and format."""
  examples = instructions.make_examples(synthetic.make_world(seed, num_people))['train']
  by_format = collections.defaultdict(list)
  for e in examples:
    by_format[e.kind, e.format].append(e.answer)
  rng, out, i = random.Random(seed), [], 0
  while i < len(examples):
    turns = examples[i:i + rng.randint(1, max_turns)]
    i += len(turns)
    last = turns[-1]
    wrong = [a for a in rng.sample(by_format[last.kind, last.format],
                                   min(8, len(by_format[last.kind, last.format])))
             if a != last.answer]
    if not wrong:
      continue
    prompt = [{'role': 'system', 'content': SYSTEM}]
    for e in turns[:-1]:
      prompt += [{'role': 'user', 'content': e.prompt}, {'role': 'assistant', 'content': e.answer}]
    prompt.append({'role': 'user', 'content': last.prompt})
    out.append({'prompt': prompt, 'chosen': [{'role': 'assistant', 'content': last.answer}],
                'rejected': [{'role': 'assistant', 'content': wrong[0]}]})
  return out


def choose_batch(rendered: list, seq_len: int, rows: int, pad_id: int) -> int:
  """The number of leading pairs whose packed rows are exactly `rows` (the most pairs that fit)."""
  best = 0
  for n in range(1, len(rendered) + 1):
    got = preference.build_rows(rendered[:n], seq_len, pad_id=pad_id)[1]['rows']
    if got > rows:
      break
    if got == rows:
      best = n
  if not best:
    raise SystemExit(f'the pairs do not fill {rows} rows of {seq_len} (more --num_people?)')
  return best


def prepare(args, workdir: str) -> tuple[str, str, dict, dict]:
  """(the batch's preference JSONL, HF model directory, the batch's pathways_jax rows, facts),
  written once for both sides."""
  records = make_pairs(num_people=args.num_people, max_turns=args.max_turns, seed=args.seed)
  tok = train_tokenizer([r['prompt'] + r['chosen'] + r['rejected'] for r in records], args.vocab)
  rendered, kept = [], []
  for r in records[:args.candidates]:
    (c_ids, c_mask), (r_ids, r_mask) = preference.render_pair(
        tok, r['prompt'], r['chosen'], r['rejected'])
    if len(c_ids) + len(r_ids) <= args.seq_len:  # nothing cut: TRL sees the same sequences
      rendered.append(((c_ids, c_mask), (r_ids, r_mask)))
      kept.append(r)
  n = choose_batch(rendered, args.seq_len, args.batch_size, tok.pad_id)
  fields, stats = preference.build_rows(rendered[:n], args.seq_len, pad_id=tok.pad_id)
  assert stats['kept'] == n and not stats['truncated'], stats
  data = os.path.join(workdir, 'pairs.jsonl')
  with open(data, 'w', encoding='utf-8') as f:
    for r in kept[:n]:
      f.write(json.dumps(r) + '\n')
  cfg = model_config(args, args.vocab)
  params, hf_dir = write_random_model(cfg, tok, args.seed, workdir)
  lengths = [len(c[0]) + len(r[0]) for c, r in rendered[:n]]
  facts = {'records': len(records), 'pairs': n, 'tokenizer_vocab': tok.vocab_size,
           'params': int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
           'pair_tokens_min': min(lengths), 'pair_tokens_max': max(lengths),
           'rows': stats['rows'], 'fill': stats['fill'],
           'tokens': int((fields['segment_ids'] > 0).sum()),
           'trained_tokens': stats['trained_tokens']}
  return data, hf_dir, fields, facts


# ------------------------------------------------------------------------------ pathways_jax

def run_config(args, task: str, hf_dir: str, **dpo):
  """The run config of a pathways_jax side (sft_vs_trl's optimizer), starting from hf_dir."""
  cfg = train_config(args)
  cfg.task = task
  cfg.data.corpus = 'preference'
  cfg.train.init_from = hf_dir
  cfg.model.attention, cfg.model.max_len = args.attention, args.seq_len
  cfg.model.scalar_head = task == 'reward_model'
  cfg.dpo.loss_type, cfg.dpo.beta = 'sigmoid', args.beta
  for k, v in dpo.items():
    cfg.dpo[k] = v
  return cfg


def jax_runner(args, task_name: str, hf_dir: str, fields: dict, workdir: str):
  """(run(steps) -> (seconds, real tokens, slots, loss), compiled step, info): the project's
  jitted train step for `task_name` (what the trainer compiles, with the task's frozen inputs from
  its own setup) on the imported model, every step on the same batch."""
  cfg = run_config(args, task_name, hf_dir)
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  model_cfg = run_dir.init_model_config(hf_dir, cfg.model)  # as the trainer's build()
  model = Transformer(model_cfg)
  params = run_dir.load_init_params(hf_dir, model, mesh, rules)  # + a fresh head for the RM
  tx = optimizer.make_optimizer(cfg.train)
  example = np.zeros((args.batch_size, args.seq_len), np.int32)
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, example, mesh, rules)
  state = state_lib.init_split_state(model, tx, example, jax.random.key(0), mesh, rules,
                                     params=params)[0]
  task = tasks.make(cfg, model)
  frozen_in = task.setup(tasks.RunContext(cfg, workdir, None, mesh, rules, model_cfg.vocab_size))
  aux_args, input_shardings = step_lib.step_inputs(frozen_in)
  batch = {k: fields[k] for k in task.batch_fields()}
  fn = step_lib.jit_train_step(cfg, task, tx, shardings, mesh, input_shardings)
  sharding = parallel.batch_sharding(mesh)
  compiled = parallel.run_with_rules(
      mesh, rules, lambda: fn.lower(state, jax.device_put(batch, sharding), *aux_args).compile())
  holder = {'state': state}
  real = int((batch['segment_ids'] > 0).sum())

  def run(steps):
    s, t0 = holder['state'], time.perf_counter()
    for _ in range(steps):
      s, m = compiled(s, jax.device_put(batch, sharding), *aux_args)  # the copy is timed too
    loss = float(m['loss'])  # waits for the last step
    holder['state'] = s
    return time.perf_counter() - t0, steps * real, steps * args.batch_size * args.seq_len, loss

  info = {'task': task.describe(), 'attention': model_cfg.attention,
          'trained_tokens': int(batch['loss_mask'].sum()) if 'loss_mask' in batch else None,
          'aux_bytes': tree_bytes(aux_args[0]['aux']) if aux_args else 0,
          'param_bytes': tree_bytes(state.params)}
  return run, compiled, info


def memory_of(compiled) -> dict:
  ma = compiled.memory_analysis()
  return {'argument_bytes': int(ma.argument_size_in_bytes),
          'output_bytes': int(ma.output_size_in_bytes),
          'alias_bytes': int(ma.alias_size_in_bytes),
          'temp_bytes': int(ma.temp_size_in_bytes)}


def dpo_memory(args, hf_dir: str, frozen_compiled, frozen_info) -> dict:
  """XLA memory analysis of the DPO step with the frozen reference (`frozen_compiled`, the timed
  program) and of the same step with dpo.precompute=True (compiled here from shapes)."""
  cfg = run_config(args, 'dpo', hf_dir, precompute=True)
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  model = Transformer(run_dir.init_model_config(hf_dir, cfg.model))
  tx = optimizer.make_optimizer(cfg.train)
  example = np.zeros((args.batch_size, args.seq_len), np.int32)
  abstract, shardings = state_lib.abstract_state_and_shardings(model, tx, example, mesh, rules)
  task = tasks.make(cfg, model)
  batch = task.batch_spec(args.batch_size, args.seq_len)
  fn = step_lib.jit_train_step(cfg, task, tx, shardings, mesh)
  compiled = parallel.run_with_rules(mesh, rules, lambda: fn.lower(abstract, batch).compile())
  batch_bytes = lambda spec: int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize
                                     for s in spec.values()))
  frozen_task = tasks.make(run_config(args, 'dpo', hf_dir), model)
  return {
      'frozen': {**memory_of(frozen_compiled), 'reference_bytes': frozen_info['aux_bytes'],
                 'state_bytes': tree_bytes(abstract),
                 'batch_bytes': batch_bytes(frozen_task.batch_spec(args.batch_size,
                                                                   args.seq_len)),
                 'batch_fields': sorted(frozen_task.batch_fields())},
      'precomputed': {**memory_of(compiled), 'reference_bytes': 0,
                      'state_bytes': tree_bytes(abstract), 'batch_bytes': batch_bytes(batch),
                      'batch_fields': sorted(task.batch_fields())}}


# ------------------------------------------------------------------------------ TRL worker

class TorchWorker(Worker):
  """benchmarks/preference_vs_trl_torch.py in the torch venv."""

  def __init__(self, python: str, args, hf_dir: str, data: str, pairs: int, workdir: str,
               variants: list, malloc_reuse: bool):
    cmd = [python, WORKER, f'--hf_dir={hf_dir}', f'--data={data}', f'--workdir={workdir}',
           f'--pairs={pairs}', f'--lr={args.lr}', f'--beta={args.beta}',
           f'--padding_free={int(args.trl_padding_free)}', f'--variants={",".join(variants)}',
           f'--threads={args.torch_threads}']
    super().__init__(cmd, workdir, 'trl_preference_worker.log', malloc_reuse)


# ------------------------------------------------------------------------------ main

def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rounds', type=int, default=6)
  ap.add_argument('--steps', type=int, default=1, help='optimizer steps per round')
  ap.add_argument('--warmup', type=int, default=1, help='untimed steps of each runner first')
  ap.add_argument('--seq_len', type=int, default=512)
  ap.add_argument('--batch_size', type=int, default=8, help='pathways_jax rows a step')
  add_model_args(ap)
  ap.add_argument('--max_turns', type=int, default=4, help='turns of a pair, the last compared')
  ap.add_argument('--candidates', type=int, default=400, help='pairs rendered to pick the batch')
  ap.add_argument('--lr', type=float, default=1e-4)
  ap.add_argument('--beta', type=float, default=0.1)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--attention', default='cpu', help="pathways_jax's model.attention")
  ap.add_argument('--tasks', default='dpo,reward', help='which comparisons to time')
  ap.add_argument('--trl_padding_free', type=int, default=1,
                  help='DPOConfig(padding_free=...) requested (TRL 1.16 turns it off)')
  ap.add_argument('--torch_python', default=TORCH_PYTHON)
  ap.add_argument('--torch_threads', type=int, default=0, help='0: torch default')
  ap.add_argument('--torch_malloc', choices=('same', 'default'), default='same',
                  help="'same': the TRL process gets this one's malloc options (host_memory)")
  ap.add_argument('--pause', type=float, default=0.2, help='seconds between runs')
  ap.add_argument('--no_torch', action='store_true')
  ap.add_argument('--no_memory', action='store_true')
  ap.add_argument('--workdir', default='', help='keep the data and model here (default: temp)')
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args()
  try:
    host_malloc = 'reuse' if host_memory.reuse_freed_memory() else 'default'  # before the backend
  except ValueError as e:
    ap.error(str(e))
  if min(args.steps, args.rounds, args.batch_size, args.warmup) < 1:
    ap.error('--steps, --rounds, --batch_size and --warmup must be >= 1')
  if args.attention not in config_lib.choices('model.attention'):
    ap.error(f'--attention={args.attention!r} is not one of '
             f'{config_lib.choices("model.attention")}')
  which = [t for t in args.tasks.split(',') if t]
  if not which or any(t not in dict(PAIRS) for t in which):
    ap.error(f"--tasks={args.tasks!r}: each must be 'dpo' or 'reward'")
  if 'dpo' not in which and not args.no_memory:
    ap.error('the memory table compiles the timed DPO step: keep dpo in --tasks or pass '
             '--no_memory')
  t_start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    os.makedirs(workdir, exist_ok=True)
    data, hf_dir, fields, facts = prepare(args, workdir)
    runners, jinfo, compiled = {}, {}, {}
    for t in which:
      name = 'dpo' if t == 'dpo' else 'reward_model'
      run, compiled[t], jinfo[t] = jax_runner(args, name, hf_dir, fields, workdir)
      runners[f'pathways_jax {t}'] = run
    worker = None
    if not args.no_torch:
      if usable_torch_python(args.torch_python):
        worker = TorchWorker(args.torch_python, args, hf_dir, data, facts['pairs'], workdir,
                             which, host_malloc == 'reuse' and args.torch_malloc == 'same')
        for t in which:
          runners[f'trl {t}'] = worker.runner(t)
      else:
        print(f'({args.torch_python} with torch, transformers and trl not found: pathways_jax '
              'alone; `make golden-hf` makes that venv)')
    order = sorted(runners, key=lambda k: (which.index(k.split()[-1]), k))
    runners = {k: runners[k] for k in order}
    try:
      rounds = time_rounds(runners, args.steps, args.rounds, args.pause, warmup=args.warmup)
    finally:
      if worker:
        worker.close()
    mem = None
    if not args.no_memory:
      mem = dpo_memory(args, hf_dir, compiled['dpo'], jinfo['dpo'])
    tinfo = worker and {**worker.info, 'malloc': 'reuse' if worker.malloc_reuse else 'default'}
    report(args, which, facts, jinfo, tinfo, rounds, mem, host_malloc,
           time.perf_counter() - t_start)


def print_memory(mem: dict) -> None:
  mib = lambda b: f'{b / 2**20:,.2f}'
  print('\nDPO step memory, frozen reference vs dpo.precompute=True (MiB; XLA memory_analysis of '
        'the compiled train step)')
  print(f"{'reference':<22} {'ref params':>10} {'state':>8} {'batch':>7} {'arguments':>10} "
        f"{'outputs':>9} {'aliased':>9} {'temp':>9}  batch fields")
  for name, key in (('frozen (aux)', 'frozen'), ('precomputed', 'precomputed')):
    m = mem[key]
    print(f"{name:<22} {mib(m['reference_bytes']):>10} {mib(m['state_bytes']):>8} "
          f"{mib(m['batch_bytes']):>7} {mib(m['argument_bytes']):>10} {mib(m['output_bytes']):>9} "
          f"{mib(m['alias_bytes']):>9} {mib(m['temp_bytes']):>9}  {','.join(m['batch_fields'])}")
  f, p = mem['frozen'], mem['precomputed']
  print(f"precomputed - frozen: arguments {mib(p['argument_bytes'] - f['argument_bytes'])} MiB "
        f"(the reference's params: -{mib(f['reference_bytes'])}; the ref_logp field: "
        f"+{mib(p['batch_bytes'] - f['batch_bytes'])}), temp "
        f"{mib(p['temp_bytes'] - f['temp_bytes'])} MiB")


def report(args, which, facts, jinfo, tinfo, rounds, mem, host_malloc, seconds) -> None:
  per_token, rows = round_rows(rounds, args.steps)
  per_slot = {k: [sec / n for sec, _, n, _ in v] for k, v in rounds.items()}
  any_info = next(iter(jinfo.values()))
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()} (jax {jax.__version__}, '
        f'host malloc: {host_malloc}); pathways_jax attention={any_info["attention"]}')
  print(f'model: Llama, {args.num_layers} layers, d={args.d_model}, {args.num_heads} heads / '
        f'{args.num_kv_heads} kv, mlp {args.mlp_dim}, vocab {args.vocab} (tokenizer '
        f'{facts["tokenizer_vocab"]}), untied, {facts["params"] / 1e6:.2f}M params, float32')
  print(f'batch: {facts["pairs"]} pairs ({facts["pair_tokens_min"]}-{facts["pair_tokens_max"]} '
        f'tokens a pair), {facts["tokens"]:,} real tokens ({facts["trained_tokens"]:,} response); '
        f'pathways_jax packs them into {facts["rows"]} rows of {args.seq_len}, fill '
        f'{facts["fill"]:.3f}')
  for t in which:
    print(f'pathways_jax {t}: {jinfo[t]["task"]}')
  if tinfo:
    print(f'TRL {tinfo["trl"]}, transformers {tinfo["transformers"]}, torch {tinfo["torch"]} '
          f'({tinfo["threads"]} threads, optim {tinfo["optim"]}, attention {tinfo["attention"]}, '
          f'host malloc {tinfo["malloc"]})')
    for t in which:
      b = tinfo['batches'][t]
      slots = b['shape'][0] * b['shape'][1]
      extra = ''
      if t == 'dpo':
        extra = (f'; padding_free requested {tinfo["padding_free_requested"]}, used '
                 f'{b["padding_free"]}; reference {b["ref_model"]} (a frozen copy)')
      print(f'trl {t}: {b["model"]}, batch {b["shape"]} padded, {b["real_tokens"]:,} real tokens '
            f'(fill {b["real_tokens"] / slots:.3f})' + extra)
      mismatch = b['real_tokens'] != facts['tokens'] or (
          'trained_tokens' in b and b['trained_tokens'] != facts['trained_tokens'])
      if mismatch:
        print(f'WARNING: the two sides tokenized the pairs differently for {t} (TRL: '
              f'{b["real_tokens"]} real, {b.get("trained_tokens")} response tokens)')
  print(f'best and median of {args.rounds} rounds (shuffled order) of {args.steps} step(s), after '
        f'{args.warmup} warm-up step(s) each; tokens = real (non-padding) tokens of chosen + '
        'rejected')
  print(f"{'implementation':<20} {'tokens/s':>9} {'median':>9} {'s/step':>7} {'real/step':>10} "
        f"{'slots/step':>10} {'loss':>7}")
  for k, r in rows.items():
    print(f"{k:<20} {r['tokens_per_s']:>9,.0f} {r['median_tokens_per_s']:>9,.0f} "
          f"{r['step_s']:>7.3f} {r['real_per_step']:>10,.0f} {r['slots_per_step']:>10,.0f} "
          f"{r['loss']:>7.3f}")
  ratios = {}
  for t in which:
    if f'trl {t}' in rows:
      r = ratios[t] = ratio(per_token, rows, f'pathways_jax {t}', f'trl {t}')
      # The same per slot (padding included): how much of the ratio is packing vs padding.
      r['per_slot_paired_median'] = paired_ratio(per_slot, f'trl {t}', f'pathways_jax {t}')[0]
      q = r['quartiles']
      print(f'ratio {dict(PAIRS)[t]}, pathways_jax / trl: {r["best"]:.2f}x of the best rounds; '
            f'per round {r["paired_median"]:.2f}x median (quartiles {q[0]:.2f}-{q[1]:.2f}); '
            f'per slot (padding counted) {r["per_slot_paired_median"]:.2f}x per-round median')
  if mem:
    print_memory(mem)
  print(f'(the whole run took {seconds:.0f} s)')
  if args.json:
    print(json.dumps({'rows': rows, 'ratios': ratios, 'memory': mem, 'facts': facts,
                      'jax': {**jinfo, 'version': jax.__version__}, 'trl': tinfo,
                      'device': jax.devices()[0].device_kind, 'rounds': rounds,
                      'seconds': seconds}))


if __name__ == '__main__':
  main()
