"""SFT step throughput, pathways_jax vs TRL's SFTTrainer (PyTorch), and LoRA vs full step memory.

    python benchmarks/sft_vs_trl.py [--rounds=10] [--steps=1] [--seq_len=512] [--batch_size=8]
        [--d_model=256 --num_layers=4 --num_heads=4 --num_kv_heads=2 --mlp_dim=688 --vocab=8192]
        [--torch_python=.venv-golden/bin/python] [--no_torch] [--workdir=DIR] [--json]
    make bench-trl

One run, both sides on the same inputs:
  * a chat JSONL: multi-turn conversations (a system turn, then 1-8 question/answer turns) made
    from the embedded instruction set (pathways_jax.data.instructions, a world of 200 people);
  * a byte-level BPE tokenizer trained on it (`--vocab` tokens at most) with a ChatML template;
  * a Llama model of the given size, randomly initialised here and written as a HuggingFace
    directory by `interop.hf.save_pretrained`; pathways_jax imports it with `hf.load_pretrained`,
    TRL with `AutoModelForCausalLM.from_pretrained`: the same weights.
Each side renders the conversations with that template itself, trains the assistant turns only
(content, <|im_end|> and its newline) and packs them best-fit-decreasing into rows of
`--seq_len`, `--batch_size` rows a step, conversations kept apart in attention; float32, AdamW
(b1 0.9, b2 0.95, weight decay 0.1, global-norm clipping at 1), no activation checkpointing.
pathways_jax: the project's jitted train step for task 'sft' (what the trainer compiles) on rows
from its chat pipeline (data.sft.build_rows). TRL: benchmarks/sft_vs_trl_torch.py, a subprocess
in the torch venv, running SFTTrainer.train() and pausing it between rounds; its variants are
described there ('padding_free': TRL's packing as shipped; 'rows': [B, L] rows like ours).

Rounds alternate (every side once per round, in a shuffled order, a short pause between runs so
one side's idle threads are asleep before the other starts), after two warm-up steps each. The
TRL process gets the malloc options this one runs with (pathways_jax.host_memory, as glibc
tunables; `--torch_malloc=default` leaves its malloc alone), as train_throughput.py's PyTorch
side shares its process's.
Throughput counts the real (non-padding) tokens of the steps run; the ratios are of the best
rounds and the median over rounds of each round's own ratio (train_throughput.paired_ratio).

The memory table compiles the same step for full fine-tuning and for LoRA r=8 on every linear
layer (model.lora_rank=8, trainable = the adapters, as the trainer splits them) and reads XLA's
`memory_analysis()` and the optimizer state's size; it needs no torch.
Without the torch venv (or with --no_torch) the script reports pathways_jax alone.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from pathways_jax import config as config_lib, host_memory, parallel, tasks  # noqa: E402
from pathways_jax.adapters.lora import LORA_PARAMS  # noqa: E402
from pathways_jax.data import hf_tokenizer, instructions, sft, synthetic  # noqa: E402
from pathways_jax.interop import hf  # noqa: E402
from pathways_jax.models.transformer import Transformer  # noqa: E402
from pathways_jax.train import optimizer, state as state_lib, step as step_lib  # noqa: E402
# The worker process, the rounds and their summary, shared with preference_vs_trl.py.
from _rounds import Worker, ratio, round_rows, time_rounds, usable_torch_python  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
SYSTEM = 'You are a concise assistant. Answer every question in exactly the format it asks for.'
TORCH_PYTHON = os.path.join(REPO, '.venv-golden', 'bin', 'python')
WORKER = os.path.join(REPO, 'benchmarks', 'sft_vs_trl_torch.py')


# ------------------------------------------------------------------------------ shared inputs

def write_conversations(path: str, *, num_people: int, max_turns: int, limit: int = 0,
                        seed: int = 0) -> int:
  """A JSONL of conversations from the instruction set: a system turn, then 1..max_turns turns
  (at most `limit` conversations, 0: as many as the examples make)."""
  examples = instructions.make_examples(synthetic.make_world(seed, num_people))['train']
  rng, n, i = random.Random(seed), 0, 0
  with open(path, 'w', encoding='utf-8') as f:
    while i < len(examples) and (not limit or n < limit):
      turns = examples[i:i + rng.randint(1, max_turns)]
      i += len(turns)
      messages = [{'role': 'system', 'content': SYSTEM}]
      for e in turns:
        messages += [{'role': 'user', 'content': e.prompt},
                     {'role': 'assistant', 'content': e.answer}]
      f.write(json.dumps({'messages': messages}) + '\n')
      n += 1
  return n


def train_tokenizer(conversations: list[list[dict]], vocab: int) -> hf_tokenizer.HFTokenizer:
  """Byte-level BPE on the conversations' text, the ChatML specials added after it."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  texts = [m['content'] for c in conversations for m in c]
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab - len(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.add_special_tokens(SPECIALS)
  # tokenizer_class: transformers loads tokenizer.json as it is (no model-specific defaults).
  return hf_tokenizer.HFTokenizer(tok.to_str(), {
      'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>', 'chat_template': CHATML,
      'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': 1 << 20})


def write_random_model(cfg, tok, seed: int, workdir: str):
  """(params, WORKDIR/hf_model): a randomly initialised model of `cfg` written as the HF
  directory both sides of a TRL comparison load (a kept --workdir: this run's replaces it)."""
  model = Transformer(cfg)
  params = nn.unbox(jax.jit(lambda k: model.init(k, np.zeros((1, 8), np.int32))['params'])(
      jax.random.key(seed)))
  hf_dir = os.path.join(workdir, 'hf_model')
  shutil.rmtree(hf_dir, ignore_errors=True)
  hf.save_pretrained(params, cfg, hf_dir, tokenizer=tok)
  return params, hf_dir


def model_config(args, vocab: int) -> config_lib.ModelConfig:
  return config_lib.ModelConfig(
      vocab_size=vocab, d_model=args.d_model, num_layers=args.num_layers,
      num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, mlp_dim=args.mlp_dim,
      max_len=args.seq_len, tie_embeddings=False)


def prepare(args, workdir: str) -> tuple[str, str, dict]:
  """(chat JSONL, HF model directory, facts) in workdir, written once for both sides."""
  data = os.path.join(workdir, 'chat.jsonl')
  n = write_conversations(data, num_people=args.num_people, max_turns=args.max_turns,
                          limit=args.conversations)
  tok = train_tokenizer([m for _, m in sft.read_jsonl(data)], args.vocab)
  cfg = model_config(args, args.vocab)
  params, hf_dir = write_random_model(cfg, tok, args.seed, workdir)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  return data, hf_dir, {'conversations': n, 'tokenizer_vocab': tok.vocab_size,
                        'params': int(n_params)}


def train_config(args):
  """The run config of the pathways_jax side (the optimizer both sides use)."""
  cfg = config_lib.base_config()
  cfg.task = 'sft'
  cfg.data.seq_len, cfg.data.batch_size = args.seq_len, args.batch_size
  t = cfg.train
  t.lr, t.schedule, t.warmup_steps = args.lr, 'constant', 0
  t.b1, t.b2, t.eps, t.weight_decay, t.grad_clip = 0.9, 0.95, 1e-8, 0.1, 1.0
  return cfg


# ------------------------------------------------------------------------------ pathways_jax

def jax_rows(data: str, tok, seq_len: int) -> tuple[dict, dict]:
  """The packed rows of every conversation (the chat pipeline's rendering and packing)."""
  examples = sft.encode(tok, [m for _, m in sft.read_jsonl(data)])
  return sft.build_rows(examples, seq_len, pad_id=tok.pad_id, eos_id=tok.eos_id)


def jax_runner(args, hf_dir: str, data: str):
  """(run(steps) -> (seconds, real tokens, slots, loss), data statistics): the project's jitted
  sft train step on the imported model, over its packed rows in order, B rows a step."""
  cfg = train_config(args)
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  params, model_cfg, tok = hf.load_pretrained(hf_dir, mesh=mesh, rules=rules)
  model_cfg = model_cfg.replace(attention=args.attention, max_len=args.seq_len)
  model = Transformer(model_cfg)
  tx = optimizer.make_optimizer(cfg.train)
  example = np.zeros((args.batch_size, args.seq_len), np.int32)
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, example, mesh, rules)
  state = state_lib.init_split_state(model, tx, example, jax.random.key(0), mesh, rules,
                                     params=params)[0]
  task = tasks.make(cfg, model)
  fields, stats = jax_rows(data, tok, args.seq_len)
  names = task.batch_fields()
  b = args.batch_size
  batches = [{k: fields[k][i:i + b] for k in names} for i in range(0, len(fields['tokens']) - b + 1,
                                                                   b)]
  if not batches:
    raise SystemExit(f'the data fills {len(fields["tokens"])} rows, fewer than one batch')
  fn = step_lib.jit_train_step(cfg, task, tx, shardings, mesh)
  sharding = parallel.batch_sharding(mesh)
  compiled = parallel.run_with_rules(
      mesh, rules, lambda: fn.lower(state, jax.device_put(batches[0], sharding)).compile())
  holder = {'state': state, 'next': 0}

  def run(steps):
    s, real, t0 = holder['state'], 0, time.perf_counter()
    for _ in range(steps):
      batch = batches[holder['next'] % len(batches)]
      holder['next'] += 1
      real += int((batch['segment_ids'] > 0).sum())
      s, m = compiled(s, jax.device_put(batch, sharding))  # the host->device copy is timed too
    loss = float(m['loss'])  # waits for the last step
    holder['state'] = s
    return time.perf_counter() - t0, real, steps * b * args.seq_len, loss

  stats = {**stats, 'tokens': int((fields['segment_ids'] > 0).sum()),
           'attention': model_cfg.attention, 'batches': len(batches)}
  return run, stats


# ------------------------------------------------------------------------------ TRL worker

class TorchWorker(Worker):
  """benchmarks/sft_vs_trl_torch.py in the torch venv, over stdin/stdout JSON lines."""

  def __init__(self, python: str, args, hf_dir: str, data: str, workdir: str, variants: list,
               malloc_reuse: bool):
    cmd = [python, WORKER, f'--hf_dir={hf_dir}', f'--data={data}', f'--workdir={workdir}',
           f'--seq_len={args.seq_len}', f'--batch_size={args.batch_size}', f'--lr={args.lr}',
           f'--variants={",".join(variants)}', f'--threads={args.torch_threads}']
    super().__init__(cmd, workdir, 'trl_worker.log', malloc_reuse)


# ------------------------------------------------------------------------------ memory

def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def step_memory(args, model_cfg: config_lib.ModelConfig, lora_rank: int) -> dict:
  """Params, trainable params, optimizer-state bytes and XLA's memory analysis of the compiled
  sft train step: full fine-tuning (lora_rank 0) or LoRA (the adapters trained, the base frozen
  and passed to the step as the trainer does)."""
  cfg = train_config(args)
  mesh, rules = parallel.make_mesh(cfg), parallel.logical_rules(cfg)
  model_cfg = model_cfg.replace(lora_rank=lora_rank, lora_alpha=16.0, lora_targets='all-linear')
  model = Transformer(model_cfg)
  tx = optimizer.make_optimizer(cfg.train)
  example = np.zeros((args.batch_size, args.seq_len), np.int32)
  trainable = LORA_PARAMS if lora_rank else ''
  abstract, shardings, frozen, frozen_shardings = state_lib.split_state_and_shardings(
      model, tx, example, mesh, rules, trainable)
  task = tasks.make(cfg, model)
  inputs, input_shardings = (({'frozen': frozen},), {'frozen': frozen_shardings}) if frozen else (
      (), None)
  fn = step_lib.jit_train_step(cfg, task, tx, shardings, mesh, input_shardings)
  batch = {k: jax.ShapeDtypeStruct(example.shape, np.int32) for k in task.batch_fields()}
  compiled = parallel.run_with_rules(mesh, rules,
                                     lambda: fn.lower(abstract, batch, *inputs).compile())
  ma = compiled.memory_analysis()
  count = lambda t: int(sum(x.size for x in jax.tree_util.tree_leaves(t)))
  return {'params': count(abstract.params) + count(frozen or {}),
          'trainable': count(abstract.params),
          'param_bytes': tree_bytes(abstract.params) + tree_bytes(frozen or {}),
          'opt_state_bytes': tree_bytes(abstract.opt_state),
          'argument_bytes': int(ma.argument_size_in_bytes),
          'output_bytes': int(ma.output_size_in_bytes),
          'alias_bytes': int(ma.alias_size_in_bytes),
          'temp_bytes': int(ma.temp_size_in_bytes)}


def print_memory(mem: dict) -> None:
  mib = lambda b: f'{b / 2**20:,.2f}'
  full, lora = mem['full'], mem['lora_r8']
  print('\nLoRA r=8 (all linear layers) vs full fine-tuning: the compiled sft train step '
        '(MiB; XLA memory_analysis)')
  print(f"{'':<22} {'params':>11} {'trainable':>11} {'opt state':>10} {'arguments':>10} "
        f"{'outputs':>9} {'aliased':>9} {'temp':>9}")
  for name, m in (('full fine-tuning', full), ('LoRA r=8', lora)):
    print(f"{name:<22} {m['params']:>11,} {m['trainable']:>11,} {mib(m['opt_state_bytes']):>10} "
          f"{mib(m['argument_bytes']):>10} {mib(m['output_bytes']):>9} "
          f"{mib(m['alias_bytes']):>9} {mib(m['temp_bytes']):>9}")
  print(f"LoRA / full: trainable {lora['trainable'] / full['trainable']:.4f}, optimizer state "
        f"{lora['opt_state_bytes'] / full['opt_state_bytes']:.4f}, temp "
        f"{lora['temp_bytes'] / full['temp_bytes']:.3f}, arguments "
        f"{lora['argument_bytes'] / full['argument_bytes']:.3f}")


# ------------------------------------------------------------------------------ main

def add_model_args(ap) -> None:
  """The flags of the Llama both sides train and of its instruction-set data (the TRL
  comparisons share them: sft_vs_trl, preference_vs_trl, rl_step)."""
  ap.add_argument('--d_model', type=int, default=256)
  ap.add_argument('--num_layers', type=int, default=4)
  ap.add_argument('--num_heads', type=int, default=4)
  ap.add_argument('--num_kv_heads', type=int, default=2)
  ap.add_argument('--mlp_dim', type=int, default=688)
  ap.add_argument('--vocab', type=int, default=8192, help='model vocabulary (tokenizer: at most)')
  ap.add_argument('--num_people', type=int, default=200, help='of the instruction set world')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rounds', type=int, default=10)
  ap.add_argument('--steps', type=int, default=1, help='optimizer steps per round')
  ap.add_argument('--seq_len', type=int, default=512)
  ap.add_argument('--batch_size', type=int, default=8)
  add_model_args(ap)
  ap.add_argument('--max_turns', type=int, default=8)
  ap.add_argument('--conversations', type=int, default=0, help='at most this many (0: all)')
  ap.add_argument('--lr', type=float, default=1e-4)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--attention', default='cpu', help="pathways_jax's model.attention")
  ap.add_argument('--trl_variants', default='padding_free,rows')
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
  if args.steps < 1 or args.rounds < 1:
    ap.error('--steps and --rounds must be >= 1')
  if args.attention not in config_lib.choices('model.attention'):
    ap.error(f'--attention={args.attention!r} is not one of '
             f'{config_lib.choices("model.attention")}')
  variants = [v for v in args.trl_variants.split(',') if v]
  if any(v not in ('padding_free', 'rows') for v in variants):
    ap.error(f"--trl_variants={args.trl_variants!r}: each must be 'padding_free' or 'rows'")
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    os.makedirs(workdir, exist_ok=True)
    data, hf_dir, facts = prepare(args, workdir)
    run_jax, jstats = jax_runner(args, hf_dir, data)
    runners = {'pathways_jax': run_jax}
    worker = None
    if not args.no_torch and variants:
      if usable_torch_python(args.torch_python):
        worker = TorchWorker(args.torch_python, args, hf_dir, data, workdir, variants,
                             host_malloc == 'reuse' and args.torch_malloc == 'same')
        for v in variants:
          runners[f'trl {v}'] = worker.runner(v)
      else:
        print(f'({args.torch_python} with torch, transformers and trl not found: pathways_jax '
              'alone; `make golden-hf` makes that venv)')
    try:
      rounds = time_rounds(runners, args.steps, args.rounds, args.pause)
    finally:
      if worker:
        worker.close()
    mem = None
    if not args.no_memory:
      model_cfg = hf.load_pretrained(hf_dir, tokenizer=False)[1].replace(
          attention=args.attention, max_len=args.seq_len)
      mem = {'full': step_memory(args, model_cfg, 0), 'lora_r8': step_memory(args, model_cfg, 8)}
    tinfo = worker and {**worker.info, 'malloc': 'reuse' if worker.malloc_reuse else 'default'}
    report(args, facts, jstats, tinfo, rounds, mem, host_malloc)


def report(args, facts, jstats, tinfo, rounds, mem, host_malloc) -> None:
  per_token, rows = round_rows(rounds, args.steps)  # per_token: seconds per token
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()} (jax {jax.__version__}, '
        f'host malloc: {host_malloc}); pathways_jax attention={jstats["attention"]}')
  print(f'model: Llama, {args.num_layers} layers, d={args.d_model}, {args.num_heads} heads / '
        f'{args.num_kv_heads} kv, mlp {args.mlp_dim}, vocab {args.vocab} (tokenizer '
        f'{facts["tokenizer_vocab"]}), untied, {facts["params"] / 1e6:.2f}M params, float32; '
        f'rows of {args.seq_len}, batch {args.batch_size}')
  print(f'data: {facts["conversations"]} conversations; pathways_jax packs {jstats["tokens"]:,} '
        f'tokens ({jstats["trained_tokens"]:,} trained) into {jstats["rows"]} rows, fill '
        f'{jstats["fill"]:.3f}')
  if tinfo:
    print(f'TRL {tinfo["trl"]}, transformers {tinfo["transformers"]}, torch {tinfo["torch"]} '
          f'({tinfo["threads"]} threads, optim {tinfo["optim"]}, attention {tinfo["attention"]}, '
          f'host malloc {tinfo["malloc"]}): '
          f'packs {tinfo["tokens"]:,} tokens ({tinfo["trained_tokens"]:,} trained) into '
          f'{tinfo["rows"]} rows')
    if (tinfo['tokens'], tinfo['trained_tokens']) != (jstats['tokens'], jstats['trained_tokens']):
      print('WARNING: the two sides tokenized the data differently (conversations cut at '
            '--seq_len are kept by TRL, dropped by pathways_jax when cut before their answer)')
  print(f'best and median of {args.rounds} rounds (shuffled order) of {args.steps} step(s); '
        'tokens = real (non-padding) tokens')
  print(f"{'implementation':<18} {'tokens/s':>9} {'median':>9} {'s/step':>7} {'real/step':>10} "
        f"{'slots/step':>10} {'loss':>7}")
  for k, r in rows.items():
    print(f"{k:<18} {r['tokens_per_s']:>9,.0f} {r['median_tokens_per_s']:>9,.0f} "
          f"{r['step_s']:>7.3f} {r['real_per_step']:>10,.0f} {r['slots_per_step']:>10,.0f} "
          f"{r['loss']:>7.3f}")
  ratios = {}
  for k in rows:
    if k.startswith('trl '):
      ratios[k] = ratio(per_token, rows, 'pathways_jax', k)
      q = ratios[k]['quartiles']
      print(f'ratio pathways_jax / {k}: {ratios[k]["best"]:.2f}x of the best rounds; per round '
            f'{ratios[k]["paired_median"]:.2f}x median (quartiles {q[0]:.2f}-{q[1]:.2f})')
  if mem:
    print_memory(mem)
  if args.json:
    print(json.dumps({'rows': rows, 'ratios': ratios, 'memory': mem, 'facts': facts,
                      'jax_data': jstats, 'trl': tinfo, 'jax': jax.__version__,
                      'rounds': rounds}))


if __name__ == '__main__':
  main()
