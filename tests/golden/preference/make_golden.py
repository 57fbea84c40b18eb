"""Golden values for `pathways_jax.objectives.preference` and `.reward`, computed by TRL's own code.

Runs in `.venv-golden` (torch, transformers, trl; versions go into golden.json):

    .venv-golden/bin/python tests/golden/preference/make_golden.py

and writes `golden.npz` (the inputs) and `golden.json` (TRL's losses and metrics) next to this
file; tests/test_preference.py and tests/test_reward.py read them and need no torch. With trl
1.16.0, torch 2.13.0+cpu and transformers 5.25.0 a rerun rewrites both files byte for byte.

What TRL computes here, without building a trainer (no datasets, tokenizer or Accelerator): each
trainer's loss method is called unbound, with a stand-in `self` holding the attributes it reads.

* DPO (`trl.DPOTrainer._compute_loss`, TRL's current code path): a tiny random
  `LlamaForCausalLM` policy and a second one as the reference, both patched with TRL's
  `add_fused_lm_head` exactly as DPOTrainer patches them, so TRL computes the per-token
  log-probs, sums them over the completion, and computes the loss and its `rewards/*` and `logps/*`
  metrics itself. Batch: B = 8 pairs as TRL lays them out, [chosen; rejected] rows with a prompt,
  a completion and right padding (`completion_mask`, `attention_mask`). Configurations:
  sigmoid (beta 0.1), hinge (0.1), ipo (0.5; TRL length-averages the log-ratios), robust (0.1,
  label_smoothing 0.2) and RPO as TRL 1.x spells it, loss_type ['sigmoid', 'sft'] with
  loss_weights [1, 0.5] ('sft' is the token mean of the chosen NLL over the batch).
  Saved: `input_ids`, `completion_mask`, and the policy's and reference's `logits` (float32, from
  the same models' plain forward), so the test recomputes the log-probs with `sequence_logps`.
* SimPO (`trl.experimental.cpo.CPOTrainer.cpo_loss`, loss_type 'simpo', beta 2.0, simpo_gamma
  0.5, label_smoothing 0.1) and ORPO (`trl.experimental.orpo.ORPOTrainer.odds_ratio_loss`, beta
  0.1, total loss nll - mean(odds-ratio term) as its `get_batch_loss_metrics` forms it), both on
  the policy's length-averaged log-probs from `CPOTrainer.get_batch_logps(average_log_prob=True)`
  (saved too, as `cpo_avg_logps`). ORPO's NLL is the token-mean cross-entropy over the chosen
  completions (TRL's own default includes the prompt tokens; the formula is the same).
* Bradley-Terry (`trl.RewardTrainer.compute_loss`), on a stand-in model that returns saved
  rewards as its logits: without and with margins, center_rewards_coefficient 0.01.
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import types

import numpy as np
import torch

import transformers
import trl

os.environ.setdefault('TRL_EXPERIMENTAL_SILENCE', '1')  # the CPO and ORPO trainers live there
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.utils import add_fused_lm_head

HERE = pathlib.Path(__file__).parent
B, L, V = 8, 12, 32


def tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():  # HF's std 0.02 init gives near-uniform logits; widen them
    for p in model.parameters():
      if p.ndim == 2:
        p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
  return model.float().eval()


def batch(rng: np.random.Generator):
  """[chosen; rejected] rows: prompt (shared per pair), completion, right padding."""
  ids = rng.integers(1, V, (2 * B, L))
  completion = np.zeros((2 * B, L), np.int64)
  attention = np.zeros((2 * B, L), np.int64)
  for i in range(B):
    prompt = int(rng.integers(2, 5))
    for row in (i, B + i):
      ids[row, :prompt] = ids[i, :prompt]
      end = prompt + int(rng.integers(2, L - prompt + 1))
      completion[row, prompt:end] = 1
      attention[row, :end] = 1
  ids = np.where(attention == 1, ids, 0)
  return ids, completion, attention


class _Accelerator:
  device = torch.device('cpu')

  @staticmethod
  def gather(x):
    return x

  gather_for_metrics = gather


def dpo_self(model, ref_model, **cfg):
  defaults = dict(beta=0.1, loss_types=['sigmoid'], loss_weights=[1.0], label_smoothing=0.0,
                  ld_alpha=None, precompute_ref_logps=False, f_divergence_type='reverse_kl',
                  use_weighting=False, aux_loss_enabled=False)
  defaults.update(cfg)
  return types.SimpleNamespace(
      model=model, ref_model=ref_model, accelerator=_Accelerator(), _tp_size=1,
      _total_train_tokens=0, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
      _metrics={'train': collections.defaultdict(list), 'eval': collections.defaultdict(list)},
      **defaults)


def main():
  rng = np.random.default_rng(0)
  policy, ref = tiny_llama(1), tiny_llama(2)
  ids, completion, attention = batch(rng)
  t_ids, t_completion, t_attention = map(torch.as_tensor, (ids, completion, attention))
  with torch.no_grad():
    logits = policy(input_ids=t_ids, attention_mask=t_attention).logits.float()
    ref_logits = ref(input_ids=t_ids, attention_mask=t_attention).logits.float()
  add_fused_lm_head(policy, outputs=('log_probs', 'entropy', 'mean_logits', 'is_top1'))
  add_fused_lm_head(ref)
  # `_compute_loss` logs under 'train' only in training mode; Llama has no dropout (attention
  # dropout 0), so the mode changes nothing else.
  policy.train()
  inputs = {'input_ids': t_ids, 'attention_mask': t_attention, 'completion_mask': t_completion}

  out = {'versions': {'trl': trl.__version__, 'torch': torch.__version__,
                      'transformers': transformers.__version__}, 'dpo': {}}
  dpo_configs = {
      'sigmoid': dict(beta=0.1),
      'hinge': dict(beta=0.1, loss_types=['hinge']),
      'ipo': dict(beta=0.5, loss_types=['ipo']),
      'robust': dict(beta=0.1, loss_types=['robust'], label_smoothing=0.2),
      'rpo': dict(beta=0.1, loss_types=['sigmoid', 'sft'], loss_weights=[1.0, 0.5]),
  }
  for name, cfg in dpo_configs.items():
    fake = dpo_self(policy, ref, **cfg)
    with torch.no_grad():
      loss = trl.DPOTrainer._compute_loss(fake, policy, dict(inputs), False)
    metrics = {k: v[-1] for k, v in fake._metrics['train'].items()
               if k.startswith(('rewards/', 'logps/'))}
    out['dpo'][name] = {'config': cfg, 'loss': float(loss), 'metrics': metrics}

  # CPO/SimPO and ORPO on length-averaged log-probs of the policy's completions.
  labels = torch.where(t_completion == 1, t_ids, -100)
  avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
  chosen_avg, rejected_avg = avg[:B], avg[B:]
  simpo_self = types.SimpleNamespace(alpha=0.0, beta=2.0, loss_type='simpo', simpo_gamma=0.5,
                                     label_smoothing=0.1, accelerator=_Accelerator())
  losses, r_c, r_r = CPOTrainer.cpo_loss(simpo_self, chosen_avg, rejected_avg)
  out['simpo'] = {'config': {'beta': 2.0, 'simpo_gamma': 0.5, 'label_smoothing': 0.1},
                  'loss': float(losses.mean()),
                  'metrics': {'rewards/chosen': float(r_c.mean()),
                              'rewards/rejected': float(r_r.mean())}}
  nll = torch.nn.functional.cross_entropy(logits[:B, :-1].reshape(-1, V),
                                          labels[:B, 1:].reshape(-1), ignore_index=-100)
  orpo_self = types.SimpleNamespace(beta=0.1, accelerator=_Accelerator())
  losses, r_c, r_r, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
      orpo_self, chosen_avg, rejected_avg)
  out['orpo'] = {'config': {'beta': 0.1}, 'loss': float(nll - losses.mean()),
                 'metrics': {'nll_loss': float(nll), 'log_odds_ratio': float(log_odds_ratio),
                             'log_odds_chosen': float(log_odds_chosen),
                             'rewards/chosen': float(r_c.mean()),
                             'rewards/rejected': float(r_r.mean())}}

  # Bradley-Terry through RewardTrainer.compute_loss with a model returning fixed rewards.
  rewards = rng.normal(0.3, 1.5, 2 * B).astype(np.float32)
  margins = rng.uniform(0.0, 1.0, B).astype(np.float32)
  out['reward'] = {}
  for name, margin, center in [('plain', False, None), ('margin_center', True, 0.01)]:
    fake_model = lambda **kw: types.SimpleNamespace(logits=torch.as_tensor(rewards)[:, None])
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), _tp_size=1,
        _total_train_tokens=0, args=types.SimpleNamespace(center_rewards_coefficient=center),
        _metrics={'train': collections.defaultdict(list)})
    rm_inputs = {'attention_mask': t_attention}
    if margin:
      rm_inputs['margin'] = torch.as_tensor(margins)
    loss = trl.RewardTrainer.compute_loss(fake, fake_model, rm_inputs)
    metrics = {k: v[-1] for k, v in fake._metrics['train'].items() if k != 'num_tokens'}
    out['reward'][name] = {'margin': margin, 'center_coef': center or 0.0, 'loss': float(loss),
                           'metrics': metrics}

  np.savez(HERE / 'golden.npz', input_ids=ids.astype(np.int32),
           completion_mask=completion.astype(np.int32),
           attention_mask=attention.astype(np.int32), logits=logits.numpy(),
           ref_logits=ref_logits.numpy(), cpo_avg_logps=avg.numpy(), rewards=rewards,
           margins=margins)
  (HERE / 'golden.json').write_text(json.dumps(out, indent=1, sort_keys=True) + '\n')
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
