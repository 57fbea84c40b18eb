"""The TRL side of benchmarks/sft_vs_trl.py: SFTTrainer's own training loop, paused between rounds.

Runs in a venv with torch, transformers and trl (`make golden-hf` makes `.venv-golden`), started
by sft_vs_trl.py, which it answers over stdin/stdout in JSON lines:

    -> {"ready": true, versions, threads, data statistics}       once the trainers are built
    <- {"run": VARIANT, "steps": N}
    -> {"seconds": S, "real_tokens": T, "slots": K, "loss": L}    N optimizer steps of VARIANT
    <- {"quit": true}

Each variant is a `trl.SFTTrainer` on the same model directory and chat JSONL, whose `train()`
runs in its own thread; a callback stops the loop after every N steps until the next command, so
the steps timed are TRL's own (data loader, forward with its fused LM head, backward, clipping,
AdamW, scheduler), rounds of both sides interleaved by the caller. Variants:

  padding_free  SFTConfig(packing=True) as TRL ships it: best-fit-decreasing packing, and then
                padding-free batches, the B packed rows of a step flattened into one [1, B*L]
                sequence whose position_ids restart per conversation (transformers turns them
                into a block-diagonal causal mask for sdpa: [B*L, B*L] attention scores);
  rows          the same trainer and packed dataset, the collator returning the B rows as
                [B, L] with per-row restarting position_ids and no attention_mask (transformers
                builds a per-row block-diagonal causal mask: what pathways_jax computes).

Stdout is kept for the protocol; everything else the libraries print goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time

# This directory's kernels.py (a benchmark) would shadow the `kernels` package transformers imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != _HERE]

# The protocol's own stdout; fd 1 (and sys.stdout) now go to stderr, so whatever transformers,
# datasets or TRL print cannot interleave with the JSON lines.
_PROTO = os.fdopen(os.dup(1), 'w', buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

# ChatML with TRL's generation markers around what the project's chat pipeline trains (the
# assistant's content, <|im_end|> and the newline after it); the markers render no text, so the
# rendering is that of the tokenizer's own template (sft_vs_trl.CHATML).
CHATML_GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _send(obj) -> None:
  _PROTO.write(json.dumps(obj) + '\n')
  _PROTO.flush()


class _Gate:
  """Pauses a trainer's loop: before the first step and after every N-th, until told to go on."""

  def __init__(self):
    self.commands, self.results = queue.Queue(), queue.Queue()
    self.left = self.real = self.slots = 0
    self.loss = float('nan')
    self.t0 = 0.0

  def wait(self) -> bool:
    """Blocks for the next command; False to stop training."""
    steps = self.commands.get()
    if steps is None:
      return False
    self.left, self.real, self.slots = steps, 0, 0
    self.t0 = time.perf_counter()
    return True


def _callback(gate: _Gate):
  from transformers import TrainerCallback  # pylint: disable=g-import-not-at-top

  class Gate(TrainerCallback):

    def on_train_begin(self, args, state, control, **kwargs):
      if not gate.wait():
        control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
      gate.left -= 1
      if gate.left == 0:
        gate.results.put({'seconds': time.perf_counter() - gate.t0, 'real_tokens': gate.real,
                          'slots': gate.slots, 'loss': gate.loss})
        if not gate.wait():
          control.should_training_stop = True

  return Gate()


def _row_collator(pad_id: int, seq_len: int):
  """TRL's collator without padding-free: [B, L] rows, position_ids restarting per conversation
  (from the packed dataset's seq_lengths), and no attention_mask, so that transformers finds the
  conversations from the positions and keeps them apart in each row."""
  # pylint: disable-next=g-import-not-at-top
  from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
  inner = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=False,
                                          return_position_ids=True, pad_to_multiple_of=seq_len)

  def collate(examples):
    out = inner(examples)
    out.pop('attention_mask')
    return out

  return collate


def build(args, variant: str, gate: _Gate):
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from trl import SFTConfig, SFTTrainer  # pylint: disable=g-import-not-at-top

  class Trainer(SFTTrainer):

    def training_step(self, model, inputs, num_items_in_batch=None):
      ids = inputs['input_ids']
      gate.real += int((ids != self.processing_class.pad_token_id).sum())
      gate.slots += ids.numel()
      loss = super().training_step(model, inputs, num_items_in_batch)
      gate.loss = float(loss)
      return loss

  torch.manual_seed(0)
  tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
  tokenizer.chat_template = CHATML_GENERATION
  model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32,
                                               attn_implementation='sdpa')
  dataset = datasets.load_dataset('json', data_files=args.data, split='train')
  config = SFTConfig(
      output_dir=os.path.join(args.workdir, f'trl_{variant}'), max_length=args.seq_len,
      packing=True, assistant_only_loss=True, per_device_train_batch_size=args.batch_size,
      gradient_accumulation_steps=1, learning_rate=args.lr, weight_decay=args.weight_decay,
      adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
      lr_scheduler_type='constant', max_steps=10**9, use_cpu=True, bf16=False, fp16=False,
      # TRL defaults to activation checkpointing; pathways_jax's step has none (model.remat).
      gradient_checkpointing=False, logging_strategy='no', save_strategy='no', report_to='none',
      disable_tqdm=True, dataloader_num_workers=0, seed=0)
  trainer = Trainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                    callbacks=[_callback(gate)])
  if variant == 'rows':
    trainer.data_collator = _row_collator(tokenizer.pad_token_id, args.seq_len)
  return trainer, tokenizer


def data_stats(trainer, tokenizer) -> dict:
  """Of the packed training set: conversations, rows, real and trained tokens."""
  ds = trainer.train_dataset
  lengths = [n for s in ds['seq_lengths'] for n in s]
  trained = sum(sum(1 for t in lab if t != -100) for lab in ds['labels'])
  return {'conversations': len(lengths), 'rows': len(ds), 'tokens': sum(lengths),
          'trained_tokens': trained, 'pad_id': tokenizer.pad_token_id}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--hf_dir', required=True)
  ap.add_argument('--data', required=True)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--seq_len', type=int, required=True)
  ap.add_argument('--batch_size', type=int, required=True)
  ap.add_argument('--lr', type=float, default=1e-4)
  ap.add_argument('--weight_decay', type=float, default=0.1)
  ap.add_argument('--variants', default='padding_free,rows')
  ap.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
  args = ap.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  gates, stats, optim = {}, None, None
  for variant in args.variants.split(','):
    gate = _Gate()
    trainer, tokenizer = build(args, variant, gate)
    stats = stats or data_stats(trainer, tokenizer)
    optim = getattr(trainer.args.optim, 'value', trainer.args.optim)

    def train(trainer=trainer, gate=gate):
      try:
        trainer.train()
      except BaseException as e:  # pylint: disable=broad-except
        gate.results.put({'error': f'{type(e).__name__}: {e}'})

    threading.Thread(target=train, daemon=True).start()
    gates[variant] = gate
  _send({'ready': True, 'torch': torch.__version__, 'transformers': transformers.__version__,
         'trl': trl.__version__, 'threads': torch.get_num_threads(), 'optim': str(optim),
         'attention': 'sdpa', **stats})
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd.get('quit'):
      break
    gate = gates[cmd['run']]
    gate.commands.put(int(cmd['steps']))
    _send(gate.results.get())
  for gate in gates.values():
    gate.commands.put(None)
  return 0


if __name__ == '__main__':
  sys.exit(main())
