"""The TRL side of benchmarks/preference_vs_trl.py: DPOTrainer's and RewardTrainer's own training
loops, paused between rounds.

Runs in a venv with torch, transformers and trl (`make golden-hf` makes `.venv-golden`), started
by preference_vs_trl.py, which it answers over stdin/stdout in JSON lines (the protocol, the
pausing callback and the stdout redirection are benchmarks/sft_vs_trl_torch.py's, imported):

    -> {"ready": true, versions, threads, per-variant batch statistics}   the trainers built
    <- {"run": VARIANT, "steps": N}
    -> {"seconds": S, "real_tokens": T, "slots": K, "loss": L}    N optimizer steps of VARIANT
    <- {"quit": true}

Both trainers read the same preference JSONL (`{"prompt": [messages], "chosen": [assistant
message], "rejected": [assistant message]}`, TRL's conversational shape) of exactly one batch of
pairs: `per_device_train_batch_size` is the number of pairs, so every optimizer step is one epoch
over the same pairs (shuffled within the batch; the padded shape is the same every step).
Variants:

  dpo     `trl.DPOTrainer`, loss_type sigmoid, beta 0.1, the policy
          `AutoModelForCausalLM.from_pretrained(hf_dir)` and the reference TRL's own frozen copy
          (`ref_model=None`, `precompute_ref_log_probs=False`: TRL loads the same directory again
          and runs it under no_grad every step). `DPOConfig(padding_free=...)` is requested as
          `--padding_free` says; TRL 1.16 turns it off after a refactor ("temporarily
          unavailable", a warning) and pads: the ready line reports what it used.
          Its collator pads the B chosen then the B rejected sequences to the batch's longest:
          [2B, max length], with an attention_mask.
  reward  `trl.RewardTrainer` on the same directory as `AutoModelForSequenceClassification`
          (num_labels=1; the `score` head is new, random from the seed, as TRL documents), the
          Bradley-Terry loss on the reward at each sequence's last non-padding token. TRL's
          reward collator pads too (it has no padding-free mode): [2B, max length].

Stdout is kept for the protocol; everything else the libraries print goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading

# The protocol, the gate and the redirection of stdout (which also takes this directory off
# sys.path, where its kernels.py would shadow the `kernels` package transformers imports).
from sft_vs_trl_torch import _callback, _Gate, _send  # pylint: disable=g-bad-import-order


def _counting(trainer_cls, gate: _Gate, pad_id: int):
  """`trainer_cls` whose training_step adds the batch's real (attention_mask) tokens and slots to
  the gate, and keeps the step's loss."""

  class Trainer(trainer_cls):

    def training_step(self, model, inputs, num_items_in_batch=None):
      ids = inputs['input_ids']
      mask = inputs.get('attention_mask')
      gate.real += int(mask.sum()) if mask is not None else int((ids != pad_id).sum())
      gate.slots += ids.numel()
      loss = super().training_step(model, inputs, num_items_in_batch)
      gate.loss = float(loss)
      return loss

  return Trainer


def _common(args, variant: str) -> dict:
  """The TrainingArguments both trainers share (sft_vs_trl_torch's, the optimizer the pathways_jax
  side uses): AdamW b1 0.9, b2 0.95, clipping at 1, constant lr, no activation checkpointing."""
  return dict(
      output_dir=os.path.join(args.workdir, f'trl_{variant}'),
      per_device_train_batch_size=args.pairs,
      gradient_accumulation_steps=1, learning_rate=args.lr, weight_decay=args.weight_decay,
      adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
      lr_scheduler_type='constant', max_steps=10**9, use_cpu=True, bf16=False, fp16=False,
      # TRL defaults to activation checkpointing; pathways_jax's step has none (model.remat).
      gradient_checkpointing=False, logging_strategy='no', save_strategy='no', report_to='none',
      disable_tqdm=True, dataloader_num_workers=0, seed=0,
      model_init_kwargs={'dtype': 'float32', 'attn_implementation': 'sdpa'})


def build(args, variant: str, gate: _Gate):
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

  torch.manual_seed(0)
  tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
  dataset = datasets.load_dataset('json', data_files=args.data, split='train')
  if len(dataset) != args.pairs:
    raise ValueError(f'{args.data} holds {len(dataset)} pairs, not --pairs={args.pairs}')
  if variant == 'dpo':
    config = DPOConfig(loss_type=['sigmoid'], beta=args.beta, precompute_ref_log_probs=False,
                       padding_free=args.padding_free, max_length=args.max_length,
                       **_common(args, variant))
    cls = DPOTrainer
  elif variant == 'reward':
    config = RewardConfig(max_length=args.max_length, center_rewards_coefficient=None,
                          **_common(args, variant))
    cls = RewardTrainer
  else:
    raise ValueError(f'unknown variant {variant!r}')
  trainer = _counting(cls, gate, tokenizer.pad_token_id)(
      model=args.hf_dir, args=config, train_dataset=dataset, processing_class=tokenizer,
      callbacks=[_callback(gate)])
  return trainer


def batch_stats(trainer, variant: str) -> dict:
  """Of the one batch (all pairs, collated as a step sees them): its padded shape, real tokens
  and, for DPO, completion (trained) tokens; what TRL decided about padding-free."""
  ds = trainer.train_dataset
  batch = trainer.data_collator([ds[i] for i in range(len(ds))])
  out = {'pairs': len(ds), 'shape': list(batch['input_ids'].shape),
         'real_tokens': int(batch['attention_mask'].sum())}
  if 'completion_mask' in batch:
    out['trained_tokens'] = int(batch['completion_mask'].sum())
  if variant == 'dpo':
    out['padding_free'] = bool(trainer.padding_free)
    out['ref_model'] = type(trainer.ref_model).__name__ if trainer.ref_model is not None else None
  out['model'] = type(trainer.model).__name__
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--hf_dir', required=True)
  ap.add_argument('--data', required=True)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--pairs', type=int, required=True, help='pairs in the data = pairs a step')
  ap.add_argument('--max_length', type=int, default=1024)
  ap.add_argument('--lr', type=float, default=1e-4)
  ap.add_argument('--weight_decay', type=float, default=0.1)
  ap.add_argument('--beta', type=float, default=0.1)
  ap.add_argument('--padding_free', type=int, default=1, help='DPOConfig(padding_free=...)')
  ap.add_argument('--variants', default='dpo,reward')
  ap.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
  args = ap.parse_args()
  args.padding_free = bool(args.padding_free)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  gates, stats, optim = {}, {}, None
  try:
    for variant in args.variants.split(','):
      gate = _Gate()
      trainer = build(args, variant, gate)
      stats[variant] = batch_stats(trainer, variant)
      optim = getattr(trainer.args.optim, 'value', trainer.args.optim)

      def train(trainer=trainer, gate=gate):
        try:
          trainer.train()
        except BaseException as e:  # pylint: disable=broad-except
          gate.results.put({'error': f'{type(e).__name__}: {e}'})

      threading.Thread(target=train, daemon=True).start()
      gates[variant] = gate
  except Exception as e:  # pylint: disable=broad-except
    _send({'error': f'{type(e).__name__}: {e}'})
    return 1
  _send({'ready': True, 'torch': torch.__version__, 'transformers': transformers.__version__,
         'trl': trl.__version__, 'threads': torch.get_num_threads(), 'optim': str(optim),
         'attention': 'sdpa', 'padding_free_requested': args.padding_free, 'batches': stats})
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
