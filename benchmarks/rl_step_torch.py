"""The TRL side of benchmarks/rl_step.py: GRPOTrainer's own training loop, paused between rounds.

Runs in a venv with torch, transformers and trl (`make golden-hf` makes `.venv-golden`), started
by rl_step.py, which it answers over stdin/stdout in JSON lines (the gate and the stdout
redirection are benchmarks/sft_vs_trl_torch.py's, imported):

    -> {"ready": true, versions, threads, the prompts' token ids as TRL renders them, ...}
    <- {"run": "grpo", "steps": N}
    -> {"seconds": S, "completions": C, "generated": T, "loss": L, "generate_s": ...,
        "reward_s": ..., "batch_s": ..., "prompt_width": ..., "completion_width": ...}
    <- {"quit": true}

`trl.GRPOTrainer` on `AutoModelForCausalLM.from_pretrained(hf_dir)` and the prompt JSONL
(`{"prompt": [messages], "answer": ...}`, TRL's conversational shape, rendered by the tokenizer's
chat template with the generation prompt). One optimizer step = one rollout of all P prompts x G:
`per_device_train_batch_size` = P*G, gradient_accumulation_steps 1, so TRL's
steps_per_generation is 1 and generation_batch_size P*G (GRPOConfig's defaults derive them so),
its RepeatSampler draws each of the P prompts G times per step, and with num_iterations 1 no
old-policy forward pass runs (the ratio is exactly 1, as on the pathways_jax side). Generation is
transformers' `generate` (no vLLM, no continuous batching), temperature 1, top_p 1, top_k 0, no
min_p; the prompts are left-padded to the batch's longest, generation stops when every row has
emitted an EOS id (or after max_completion_length tokens). beta 0 (no reference model),
loss_type 'dapo' (tokens averaged over the batch: pathways_jax's agg='token-mean'),
scale_rewards 'group', epsilon 0.2.

The split, per step: `generate_s` is `_generate_single_turn` (padding the prompts, `generate`,
cutting at EOS), `reward_s` is `_calculate_rewards`, `batch_s` is all of
`_generate_and_score_completions` (templating, generation, decoding, rewards, advantages); the
rest of the step (data loader, the loss's forward and backward, clipping, AdamW) is the update.
Stdout is kept for the protocol; everything else the libraries print goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

# Before sft_vs_trl_torch takes this directory off sys.path.
from _rl_reward import space_share  # pylint: disable=g-bad-import-order
# The gate and the redirection of stdout.
from sft_vs_trl_torch import _Gate, _send  # pylint: disable=g-bad-import-order

SPLIT = ('generate_s', 'reward_s', 'batch_s')


class _SplitGate(_Gate):
  """_Gate, also adding up the parts of the steps since the last command."""

  def wait(self) -> bool:
    self.split = dict.fromkeys(SPLIT, 0.0)
    self.completions = self.generated = 0
    self.widths = (0, 0)
    return super().wait()


def _callback(gate: _SplitGate):
  """Pauses the loop before the first step and after every N-th (sft_vs_trl_torch's gate) and
  reports the steps' split with their time."""
  from transformers import TrainerCallback  # pylint: disable=g-import-not-at-top

  class Gate(TrainerCallback):

    def on_train_begin(self, args, state, control, **kwargs):
      if not gate.wait():
        control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
      gate.left -= 1
      if gate.left == 0:
        gate.results.put({'seconds': time.perf_counter() - gate.t0, 'loss': gate.loss,
                          'completions': gate.completions, 'generated': gate.generated,
                          'prompt_width': gate.widths[0], 'completion_width': gate.widths[1],
                          **gate.split})
        if not gate.wait():
          control.should_training_stop = True

  return Gate()


def _reward(completions, **kwargs):
  """rl_step's reward on the text of each (conversational) completion."""
  del kwargs
  return [space_share(c[0]['content'] if isinstance(c, list) else c) for c in completions]


def build(args, gate: _SplitGate):
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from trl import GRPOConfig, GRPOTrainer  # pylint: disable=g-import-not-at-top

  def timed(name, key, count=None):
    def method(self, *a, **k):
      t0 = time.perf_counter()
      out = getattr(super(Trainer, self), name)(*a, **k)
      gate.split[key] += time.perf_counter() - t0
      if count:
        count(out)
      return out
    return method

  def count(out):
    gate.completions += int(out['completion_ids'].shape[0])
    gate.generated += int(out['completion_mask'].sum())
    gate.widths = (int(out['prompt_ids'].shape[1]), int(out['completion_ids'].shape[1]))

  class Trainer(GRPOTrainer):
    _generate_single_turn = timed('_generate_single_turn', 'generate_s')
    _calculate_rewards = timed('_calculate_rewards', 'reward_s')
    _generate_and_score_completions = timed('_generate_and_score_completions', 'batch_s', count)

    def training_step(self, model, inputs, num_items_in_batch=None):
      loss = super().training_step(model, inputs, num_items_in_batch)
      gate.loss = float(loss)
      return loss

  torch.manual_seed(0)
  tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
  dataset = datasets.load_dataset('json', data_files=args.data, split='train')
  if len(dataset) != args.prompts:
    raise ValueError(f'{args.data} holds {len(dataset)} prompts, not --prompts={args.prompts}')
  config = GRPOConfig(
      output_dir=os.path.join(args.workdir, 'trl_grpo'),
      per_device_train_batch_size=args.prompts * args.num_generations,
      gradient_accumulation_steps=1, num_generations=args.num_generations,
      max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
      min_p=None, repetition_penalty=1.0, use_vllm=False, beta=0.0, num_iterations=1,
      loss_type='dapo', scale_rewards='group', epsilon=0.2, mask_truncated_completions=False,
      learning_rate=args.lr, weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.95,
      adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type='constant', max_steps=10**9,
      use_cpu=True, bf16=False, fp16=False,
      # GRPOConfig defaults to activation checkpointing; pathways_jax's step has none.
      gradient_checkpointing=False, logging_strategy='no', save_strategy='no', report_to='none',
      disable_tqdm=True, dataloader_num_workers=0, seed=0, log_completions=False,
      model_init_kwargs={'dtype': 'float32', 'attn_implementation': 'sdpa'})
  trainer = Trainer(model=args.hf_dir, reward_funcs=_reward, args=config, train_dataset=dataset,
                    processing_class=tokenizer, callbacks=[_callback(gate)])
  return trainer, dataset


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--hf_dir', required=True)
  ap.add_argument('--data', required=True)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--prompts', type=int, required=True, help='prompts in the data = a rollout')
  ap.add_argument('--num_generations', type=int, required=True)
  ap.add_argument('--max_new_tokens', type=int, required=True)
  ap.add_argument('--lr', type=float, default=1e-4)
  ap.add_argument('--weight_decay', type=float, default=0.1)
  ap.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
  args = ap.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  gate = _SplitGate()
  try:
    trainer, dataset = build(args, gate)
    prompt_ids = trainer._tokenize_prompts(list(dataset['prompt']))[0]  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    _send({'error': f'{type(e).__name__}: {e}'})
    return 1

  def train():
    try:
      trainer.train()
    except BaseException as e:  # pylint: disable=broad-except
      gate.results.put({'error': f'{type(e).__name__}: {e}'})

  threading.Thread(target=train, daemon=True).start()
  gc = trainer.generation_config
  _send({'ready': True, 'torch': torch.__version__, 'transformers': transformers.__version__,
         'trl': trl.__version__, 'threads': torch.get_num_threads(),
         'optim': str(getattr(trainer.args.optim, 'value', trainer.args.optim)),
         'attention': 'sdpa', 'prompt_ids': [list(map(int, p)) for p in prompt_ids],
         'eos_ids': list(trainer.eos_token_ids), 'pad_id': trainer._tokenizer.pad_token_id,  # pylint: disable=protected-access
         'steps_per_generation': trainer.args.steps_per_generation,
         'generation_batch_size': trainer.args.generation_batch_size,
         'generation': {k: getattr(gc, k, None) for k in ('do_sample', 'temperature', 'top_p',
                                                           'top_k', 'min_p', 'max_new_tokens')}})
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd.get('quit'):
      break
    gate.commands.put(int(cmd['steps']))
    _send(gate.results.get())
  gate.commands.put(None)
  return 0


if __name__ == '__main__':
  sys.exit(main())
