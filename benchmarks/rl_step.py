"""A GRPO step, rollouts included: pathways_jax's task 'grpo' vs TRL's GRPOTrainer (PyTorch).

    python benchmarks/rl_step.py [--rounds=5] [--steps=1] [--warmup=1] [--prompts=8]
        [--num_generations=8] [--max_new_tokens=64] [--d_model=256 --num_layers=4 --num_heads=4
        --num_kv_heads=2 --mlp_dim=688 --vocab=8192] [--torch_python=.venv-golden/bin/python]
        [--no_torch] [--workdir=DIR] [--json]
    make bench-rl

One run, both sides on the same inputs (the setup of benchmarks/sft_vs_trl.py, whose helpers
this imports):
  * `--prompts` P questions of the embedded instruction set (pathways_jax.data.instructions), each
    a system turn and a user turn, written as a prompt JSONL (`{"prompt": [messages], "answer"}`);
  * a byte-level BPE tokenizer trained on the instruction set with a ChatML template (EOS
    <|im_end|>), and a Llama model of the given size, randomly initialised and written as a
    HuggingFace directory; pathways_jax imports it (`train.init_from`, as its trainer does), TRL
    with `from_pretrained`: the same weights. Both render the prompts with that template up to the
    assistant's turn; the script checks they give the same token ids.
**A step** is one rollout of the P prompts x G completions (`--num_generations`), at most
`--max_new_tokens` new tokens each, temperature 1 (no top-k/top-p/min-p), the reward, group
advantages (mean and std over the G completions of a prompt), and one optimizer step on the
P*G rows (float32, AdamW b1 0.9, b2 0.95, weight decay 0.1, clipping at global norm 1, constant
lr; on-policy: ratio 1, clip band 0.2, tokens averaged over the batch; beta 0: no reference).
The reward is `_rl_reward.space_share` (the share of spaces in the completion's text) on both
sides: registered in `pathways_jax.rl.rewards.REWARDS` here, a `reward_funcs` function there.
  * pathways_jax: `task.make_batch` (the KV-cache `RolloutSampler`, decoding, rewards,
    advantages; the prompts from the trainer's own `data.corpus='prompts'` iterator) and the
    jitted train step, called as train/loop.py calls them. The prompts are left-padded to
    `data.seq_len` = the longest prompt's length, the width TRL pads them to.
  * TRL: benchmarks/rl_step_torch.py, a subprocess in the torch venv running GRPOTrainer.train()
    (transformers' `generate`, no vLLM) and pausing it between rounds; per_device_train_batch_size
    = P*G with no accumulation, so one optimizer step = one rollout of the same P prompts x G
    (its docstring says how TRL counts that).
**Equal work.** The two samplers draw different tokens, so completion lengths may differ. Both
stop a row at EOS and a batch when every row has stopped; on this random model EOS is one token
of `--vocab`, so nearly every completion runs to `--max_new_tokens` on both sides. Nothing forces
it: the table reports the tokens generated per step on each side, and the ratio per generated
token next to the ratio per completion. The pathways_jax step trains on its fixed [P*G, prompt +
max_new_tokens] rows whatever the lengths; TRL's on [P*G, prompt + the batch's longest].
**The split** (median seconds per step over the rounds): `generate` (pathways_jax: the sampler
call, `time_rollout_s`; TRL: `_generate_single_turn`), `reward` (pathways_jax: decoding and
scoring, `time_reward_s`; TRL: `_calculate_rewards`, decoding not included), `batch` (everything
before the update: pathways_jax `time_batch_s`, TRL `_generate_and_score_completions`) and
`update` (the rest of the step: the loss's forward and backward and AdamW; for pathways_jax the
wait for the asynchronous step, `time_update_s` included).
**What differs.** pathways_jax's loss computes the logits (and the entropy it logs) at every
position of its rows, prompt included; TRL's only at the completion's (`logits_to_keep`). TRL
trains on [P*G, prompt + longest completion] with an attention mask, pathways_jax on its fixed
rows with segment ids. The model's vocabulary (`--vocab`) is larger than what the tokenizer
learnt, so most sampled ids decode to nothing on both sides; the reward sees the same kind of
text, not the same text. pathways_jax reads the prompts as `{"messages": [system, user,
assistant answer]}` (rl/prompts.py refuses a message-list `prompt` without an assistant turn),
TRL as `{"prompt": [system, user], "answer"}`: the same prompts, checked by their token ids.
Rounds alternate (every side once per round, in a shuffled order, after `--warmup` untimed steps
each; _rounds.py). Samples/s counts completions; the ratios are of the best rounds and the median
over rounds of each round's own ratio.
Without the torch venv (or with --no_torch) the script reports pathways_jax alone.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pathways_jax import config as config_lib, host_memory, tasks  # noqa: E402
from pathways_jax.data import chat, instructions, pipeline, synthetic  # noqa: E402
from pathways_jax.interop.hf import run_dir  # noqa: E402
from pathways_jax.rl import rewards as rewards_lib  # noqa: E402
from pathways_jax.train import loop, optimizer, state as state_lib, step as step_lib  # noqa: E402
from _rl_reward import space_share  # noqa: E402
from _rounds import Worker, ratio, round_rows, time_rounds, usable_torch_python  # noqa: E402
from train_throughput import paired_ratio  # noqa: E402
from sft_vs_trl import SYSTEM, TORCH_PYTHON, model_config, train_config  # noqa: E402
from sft_vs_trl import add_model_args, write_random_model, train_tokenizer  # noqa: E402

WORKER = os.path.join(REPO, 'benchmarks', 'rl_step_torch.py')
REWARD = 'bench_space_share'  # this script's entry in pathways_jax.rl.rewards.REWARDS
SPLIT = ('generate_s', 'reward_s', 'batch_s')


# ------------------------------------------------------------------------------ shared inputs

def make_prompts(*, num_people: int, count: int, seed: int = 0) -> tuple[list[dict], list]:
  """(`count` prompt records {"prompt": [system, user], "answer"}, every conversation of the
  instruction set, for the tokenizer)."""
  examples = instructions.make_examples(synthetic.make_world(seed, num_people))['train']
  if count > len(examples):
    raise ValueError(f'--prompts={count}: the instruction set of --num_people={num_people} '
                     f'has {len(examples)} questions')
  conversations = [[{'role': 'system', 'content': SYSTEM}, {'role': 'user', 'content': e.prompt},
                    {'role': 'assistant', 'content': e.answer}] for e in examples]
  picked = random.Random(seed).sample(range(len(examples)), count)
  return ([{'prompt': conversations[i][:2], 'answer': examples[i].answer} for i in picked],
          conversations)


def prepare(args, workdir: str) -> tuple[dict, str, dict]:
  """({'trl', 'jax'}: the prompt JSONL each side reads, HF model directory, facts), written
  once for both sides."""
  records, conversations = make_prompts(num_people=args.num_people, count=args.prompts,
                                        seed=args.seed)
  tok = train_tokenizer(conversations, args.vocab)
  prompt_ids = [chat.prompt_ids(tok, r['prompt']).tolist() for r in records]
  width = max(len(p) for p in prompt_ids)
  data = {'trl': os.path.join(workdir, 'prompts_trl.jsonl'),
          'jax': os.path.join(workdir, 'prompts_jax.jsonl')}
  with open(data['trl'], 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  # The same prompts as {"messages": [system, user, assistant answer]}: a "messages" line's final
  # assistant turn becomes the record's answer and leaves the prompt (rl/prompts.py).
  with open(data['jax'], 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps({'messages': r['prompt'] + [
          {'role': 'assistant', 'content': r['answer']}]}) + '\n')
  cfg = model_config(argparse.Namespace(**{**vars(args), 'seq_len': width + args.max_new_tokens}),
                     args.vocab)
  params, hf_dir = write_random_model(cfg, tok, args.seed, workdir)
  facts = {'prompts': len(records), 'prompt_width': width,
           'prompt_tokens': [len(p) for p in prompt_ids], 'prompt_ids': prompt_ids,
           'tokenizer_vocab': tok.vocab_size, 'eos_id': tok.eos_id,
           'params': int(sum(x.size for x in jax.tree_util.tree_leaves(params)))}
  return data, hf_dir, facts


# ------------------------------------------------------------------------------ pathways_jax

def run_config(args, hf_dir: str, data: str, prompt_width: int):
  """The run config of the pathways_jax side: task 'grpo' on the prompts, from hf_dir."""
  cfg = train_config(argparse.Namespace(**{**vars(args), 'seq_len': prompt_width,
                                          'batch_size': args.prompts}))
  cfg.task = 'grpo'
  cfg.data.corpus, cfg.data.path = 'prompts', data
  cfg.train.init_from = hf_dir
  cfg.model.attention = args.attention
  cfg.model.max_len = prompt_width + args.max_new_tokens
  r = cfg.rl
  r.num_generations, r.max_new_tokens, r.temperature = args.num_generations, args.max_new_tokens, 1.0
  r.rewards, r.scale, r.agg, r.beta, r.minibatches = REWARD, 'group', 'token-mean', 0.0, 1
  r.eps_low = r.eps_high = 0.2
  return cfg


def jax_runner(args, hf_dir: str, data: str, prompt_width: int, workdir: str, splits: list):
  """(run(steps) -> (seconds, completions, generated tokens, loss), info): task 'grpo''s
  make_batch and jitted train step as train/loop.py calls them; each run appends its summed
  split {generate_s, reward_s, batch_s} to `splits`."""
  rewards_lib.REWARDS[REWARD] = rewards_lib.Reward(lambda record, text: space_share(text))
  cfg = run_config(args, hf_dir, data, prompt_width)
  tokenizer, model_cfg, model, mesh, rules = loop.build(cfg)
  tx = optimizer.make_optimizer(cfg.train)
  example = np.zeros((args.prompts * args.num_generations, cfg.model.max_len), np.int32)
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, example, mesh, rules)
  params = run_dir.load_init_params(hf_dir, model, mesh, rules)
  state = state_lib.init_split_state(model, tx, example, jax.random.key(0), mesh, rules,
                                     params=params)[0]
  task = tasks.make(cfg, model)
  frozen_in = task.setup(tasks.RunContext(cfg, workdir, tokenizer, mesh, rules,
                                          model_cfg.vocab_size))
  aux_args, input_shardings = step_lib.step_inputs(frozen_in)
  train_iter = pipeline.make_train_iterator(cfg, tokenizer, vocab_size=model_cfg.vocab_size,
                                            row_fields=frozen_in.row_fields)
  fn = step_lib.jit_train_step(cfg, task, tx, shardings, mesh, input_shardings)
  holder = {'state': state, 'step': 0}
  rows = args.prompts * args.num_generations

  def run(steps):
    s, t0 = holder['state'], time.perf_counter()
    split, generated = dict.fromkeys(SPLIT, 0.0), 0
    for _ in range(steps):
      batch, hm = task.make_batch(train_iter, step=holder['step'], params=s.params,
                                  aux=aux_args[0].get('aux') if aux_args else None)
      s, out = step_lib.run_with_rules(mesh, rules, fn, s, batch, *aux_args)
      holder['step'] += 1
      for k, name in zip(SPLIT, ('time_rollout_s', 'time_reward_s', 'time_batch_s')):
        split[k] += hm[name]
      generated += round(hm['completion_length'] * rows)
    loss = float(out['loss'])  # waits for the last step
    holder['state'] = s
    splits.append(split)
    return time.perf_counter() - t0, steps * rows, generated, loss

  info = {'task': task.describe(), 'attention': model_cfg.attention, 'eos_id': tokenizer.eos_id,
          'rows_shape': [rows, cfg.model.max_len]}
  return run, info


# ------------------------------------------------------------------------------ TRL worker

class TorchWorker(Worker):
  """benchmarks/rl_step_torch.py in the torch venv."""

  def __init__(self, python: str, args, hf_dir: str, data: str, workdir: str,
               malloc_reuse: bool):
    cmd = [python, WORKER, f'--hf_dir={hf_dir}', f'--data={data}', f'--workdir={workdir}',
           f'--prompts={args.prompts}', f'--num_generations={args.num_generations}',
           f'--max_new_tokens={args.max_new_tokens}', f'--lr={args.lr}',
           f'--threads={args.torch_threads}']
    super().__init__(cmd, workdir, 'trl_grpo_worker.log', malloc_reuse)

  def grpo_runner(self, splits: list, widths: list):
    """run(steps) -> (seconds, completions, generated tokens, loss); the split to `splits`."""
    def run(steps):
      self.proc.stdin.write(json.dumps({'run': 'grpo', 'steps': steps}) + '\n')
      self.proc.stdin.flush()
      r = self._read()
      splits.append({k: r[k] for k in SPLIT})
      widths.append((r['prompt_width'], r['completion_width']))
      return r['seconds'], r['completions'], r['generated'], r['loss']
    return run


# ------------------------------------------------------------------------------ main

def check_args(ap, args) -> None:
  """Every bad argument, in one line and exit code 2, before anything is built or compiled."""
  if min(args.steps, args.rounds, args.warmup, args.prompts, args.max_new_tokens) < 1:
    ap.error('--steps, --rounds, --warmup, --prompts and --max_new_tokens must be >= 1')
  if args.num_generations < 2:
    ap.error(f'--num_generations={args.num_generations}: GRPO compares the completions of a '
             'prompt, it needs >= 2')
  if args.attention not in config_lib.choices('model.attention'):
    ap.error(f'--attention={args.attention!r} is not one of '
             f'{config_lib.choices("model.attention")}')
  if min(args.d_model, args.num_layers, args.num_heads, args.num_kv_heads, args.mlp_dim) < 1:
    ap.error('--d_model, --num_layers, --num_heads, --num_kv_heads and --mlp_dim must be >= 1')
  if args.d_model % args.num_heads or args.num_heads % args.num_kv_heads:
    ap.error(f'--d_model={args.d_model} must be a multiple of --num_heads={args.num_heads}, and '
             f'that of --num_kv_heads={args.num_kv_heads}')
  if args.vocab < 300:
    ap.error(f'--vocab={args.vocab}: the byte-level tokenizer needs >= 300 (256 bytes, the '
             'specials and some merges)')
  if args.torch_threads < 0 or args.pause < 0:
    ap.error('--torch_threads and --pause must be >= 0')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--steps', type=int, default=1, help='optimizer steps (rollouts) per round')
  ap.add_argument('--warmup', type=int, default=1, help='untimed steps of each side first')
  ap.add_argument('--prompts', type=int, default=8, help='prompts per rollout (P)')
  ap.add_argument('--num_generations', type=int, default=8, help='completions per prompt (G)')
  ap.add_argument('--max_new_tokens', type=int, default=64)
  add_model_args(ap)
  ap.add_argument('--lr', type=float, default=1e-4)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--attention', default='cpu', help="pathways_jax's model.attention")
  ap.add_argument('--torch_python', default=TORCH_PYTHON)
  ap.add_argument('--torch_threads', type=int, default=0, help='0: torch default')
  ap.add_argument('--torch_malloc', choices=('same', 'default'), default='same',
                  help="'same': the TRL process gets this one's malloc options (host_memory)")
  ap.add_argument('--pause', type=float, default=0.2, help='seconds between runs')
  ap.add_argument('--no_torch', action='store_true')
  ap.add_argument('--workdir', default='', help='keep the data and model here (default: temp)')
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args()
  check_args(ap, args)
  try:
    host_malloc = 'reuse' if host_memory.reuse_freed_memory() else 'default'  # before the backend
  except ValueError as e:
    ap.error(str(e))
  t_start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    os.makedirs(workdir, exist_ok=True)
    try:
      data, hf_dir, facts = prepare(args, workdir)
    except ValueError as e:
      ap.error(str(e))
    splits = {'pathways_jax': [], 'trl': []}
    run, jinfo = jax_runner(args, hf_dir, data['jax'], facts['prompt_width'], workdir,
                            splits['pathways_jax'])
    runners, worker, trl_widths = {'pathways_jax': run}, None, []
    if not args.no_torch:
      if usable_torch_python(args.torch_python):
        worker = TorchWorker(args.torch_python, args, hf_dir, data['trl'], workdir,
                             host_malloc == 'reuse' and args.torch_malloc == 'same')
        runners['trl'] = worker.grpo_runner(splits['trl'], trl_widths)
      else:
        print(f'({args.torch_python} with torch, transformers and trl not found: pathways_jax '
              'alone; `make golden-hf` makes that venv)')
    try:
      rounds = time_rounds(runners, args.steps, args.rounds, args.pause, warmup=args.warmup)
    finally:
      if worker:
        worker.close()
    # The warm-up runs appended their splits first: keep the timed rounds'.
    splits = {k: v[-args.rounds:] for k, v in splits.items() if k in rounds}
    tinfo = worker and {**worker.info, 'malloc': 'reuse' if worker.malloc_reuse else 'default',
                        'widths': trl_widths[-args.rounds:]}
    report(args, facts, jinfo, tinfo, rounds, splits, host_malloc,
           time.perf_counter() - t_start)


def summarise(args, rounds: dict, splits: dict) -> tuple[dict, dict, dict]:
  """(rows {side: samples/s best and median, s/step, the split, tokens generated, loss}, seconds
  per completion of every round, seconds per generated token of every round)."""
  per_sample, base = round_rows(rounds, args.steps)
  per_token = {k: [s / t for s, _, t, _ in v] for k, v in rounds.items()}
  rows = {}
  for k, b in base.items():
    med = lambda f: statistics.median(f(x) / args.steps for x in splits[k])
    split = {key: med(lambda x, key=key: x[key]) for key in SPLIT}
    step_s = b['step_s']
    rows[k] = {'samples_per_s': b['tokens_per_s'], 'median_samples_per_s': b['median_tokens_per_s'],
               'step_s': step_s, 'samples_per_step': b['real_per_step'],
               'generated_per_step': b['slots_per_step'],
               'generated_tokens_per_s': 1 / statistics.median(per_token[k]),
               **split, 'update_s': statistics.median(
                   (s - x['batch_s']) / args.steps for (s, _, _, _), x in zip(rounds[k], splits[k])),
               'loss': b['loss']}
  return rows, per_sample, per_token


def report(args, facts, jinfo, tinfo, rounds, splits, host_malloc, seconds) -> None:
  rows, per_sample, per_token = summarise(args, rounds, splits)
  P, G, N = args.prompts, args.num_generations, args.max_new_tokens
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()} (jax {jax.__version__}, '
        f'host malloc: {host_malloc}); pathways_jax attention={jinfo["attention"]}')
  print(f'model: Llama, {args.num_layers} layers, d={args.d_model}, {args.num_heads} heads / '
        f'{args.num_kv_heads} kv, mlp {args.mlp_dim}, vocab {args.vocab} (tokenizer '
        f'{facts["tokenizer_vocab"]}), untied, {facts["params"] / 1e6:.2f}M params, float32')
  print(f'a step: {P} prompts ({min(facts["prompt_tokens"])}-{facts["prompt_width"]} tokens, '
        f'left-padded to {facts["prompt_width"]}) x G={G} completions of <= {N} new tokens, '
        f'temperature 1, reward {REWARD}, group advantages, beta 0, one AdamW step')
  print(f'pathways_jax: {jinfo["task"]}; trains on rows {jinfo["rows_shape"]}')
  ratios = {}
  if tinfo:
    print(f'TRL {tinfo["trl"]} GRPOTrainer, transformers {tinfo["transformers"]}, torch '
          f'{tinfo["torch"]} ({tinfo["threads"]} threads, optim {tinfo["optim"]}, attention '
          f'{tinfo["attention"]}, host malloc {tinfo["malloc"]}); steps_per_generation '
          f'{tinfo["steps_per_generation"]}, generation batch {tinfo["generation_batch_size"]}, '
          f'eos ids {tinfo["eos_ids"]}; sampling {tinfo["generation"]}')
    widths = sorted(set(w[1] for w in tinfo['widths']))
    print(f'trl: trains on rows [{P * G}, {facts["prompt_width"]} + the longest completion '
          f'({"/".join(map(str, widths))} in the timed rounds)]')
    if tinfo['prompt_ids'] != facts['prompt_ids']:
      print('WARNING: the two sides render the prompts to different token ids')
  print(f'median of {args.rounds} rounds (shuffled order) of {args.steps} step(s), after '
        f'{args.warmup} warm-up step(s) each; samples = completions; split in s/step')
  print(f"{'implementation':<14} {'samples/s':>9} {'median':>7} {'s/step':>7} {'generate':>8} "
        f"{'reward':>7} {'batch':>7} {'update':>7} {'gen tok/step':>12} {'gen tok/s':>9} "
        f"{'loss':>8}")
  for k, r in rows.items():
    print(f"{k:<14} {r['samples_per_s']:>9.2f} {r['median_samples_per_s']:>7.2f} "
          f"{r['step_s']:>7.3f} {r['generate_s']:>8.3f} {r['reward_s']:>7.4f} "
          f"{r['batch_s']:>7.3f} {r['update_s']:>7.3f} {r['generated_per_step']:>12,.0f} "
          f"{r['generated_tokens_per_s']:>9,.0f} {r['loss']:>8.4f}")
  if 'trl' in rows:
    base = {k: {'tokens_per_s': v['samples_per_s']} for k, v in rows.items()}
    r = ratios['grpo'] = ratio(per_sample, base, 'pathways_jax', 'trl')
    r['per_token_paired_median'] = paired_ratio(per_token, 'trl', 'pathways_jax')[0]
    q = r['quartiles']
    print(f'ratio pathways_jax / trl in samples/s: {r["best"]:.2f}x of the best rounds; per round '
          f'{r["paired_median"]:.2f}x median (quartiles {q[0]:.2f}-{q[1]:.2f}); per generated '
          f'token {r["per_token_paired_median"]:.2f}x per-round median')
  print(f'(the whole run took {seconds:.0f} s)')
  if args.json:
    print(json.dumps({'rows': rows, 'ratios': ratios,
                      'facts': {k: v for k, v in facts.items() if k != 'prompt_ids'},
                      'jax': {**jinfo, 'version': jax.__version__},
                      'trl': tinfo and {k: v for k, v in tinfo.items() if k != 'prompt_ids'},
                      'device': jax.devices()[0].device_kind, 'rounds': rounds,
                      'splits': splits, 'seconds': seconds}))


if __name__ == '__main__':
  main()
