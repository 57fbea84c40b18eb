"""diffu-GRPO for LLaDA (d1: Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion Large Language
Models via Reinforcement Learning"): rollouts from the masked-diffusion sampler and d1's one-step
estimate of per-token log-probabilities.

A masked-diffusion model has no cheap exact log-probability of a sampled completion. d1 estimates
it from one forward pass over the row with

  * every completion token masked, and
  * each real prompt token masked independently with probability p (`rl.prompt_mask_p`, d1: 0.15),

reading log softmax(logits / T)[y_k] at each completion position k. The masked prompt is a
regulariser: each update sees the prompt through a different random mask. One mask serves the
policy, the old policy and the reference of an update (d1 shares the mask seed across them), so
their ratio and KL compare like with like. Here it is drawn on the host at rollout time, from the
run's seed and the rollout's index (a resumed run draws the same), and travels in the batch as
`masked_tokens`.

Rows keep the AR trainer's layout (rl/batch.py) with two differences: every generated position is
part of the sequence (segment id 1: the sampler decoded all `max_new_tokens` of them, EOS padding
included), and the completion mask runs up to and including the first EOS (LLaDA pads answers
with EOS; what follows the first is not the answer).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.sampling.rollout import Rollout


def completion_mask(generated_NC: np.ndarray, eos_id: int | None) -> np.ndarray:
  """bool [N, C]: the generated tokens up to and including the first EOS (all without one)."""
  gen = np.asarray(generated_NC)
  if eos_id is None:
    return np.ones(gen.shape, bool)
  is_eos = gen == eos_id
  before = np.cumsum(is_eos, axis=1) - is_eos  # EOS seen strictly before each position
  return before == 0


def masked_inputs(tokens_NT: np.ndarray, prompt_mask_NP: np.ndarray, *, mask_id: int, p: float,
                  rng: np.random.Generator) -> np.ndarray:
  """int32 [N, T]: the rows with every completion position (past P) masked and each real prompt
  token masked with probability p (d1's estimator input)."""
  tokens = np.array(tokens_NT, np.int32)
  prompt_mask = np.asarray(prompt_mask_NP) > 0
  P = prompt_mask.shape[1]
  hide = prompt_mask & (rng.random(prompt_mask.shape) < p)
  tokens[:, :P] = np.where(hide, mask_id, tokens[:, :P])
  tokens[:, P:] = mask_id
  return tokens


def token_logps(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """float32 [B, T]: log softmax(logits)[token] at each position (a masked model predicts each
  position's own token: no shift)."""
  lsm = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(lsm, tokens_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_entropy(logits_BTV: jax.Array) -> jax.Array:
  """float32 [B, T]: the entropy of each position's own prediction."""
  lsm = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -(jnp.exp(lsm) * lsm).sum(-1)


class DiffusionRollouts:
  """G completions per prompt from `sampling.diffusion.DiffusionSampler` on the run's mesh, as a
  `Rollout` (log-probs 0: the sampler computes none; the estimator gives them)."""

  def __init__(self, model, mesh, rules, *, batch_size: int, prompt_len: int, num_samples: int,
               max_new_tokens: int, steps: int, block_length: int, temperature: float,
               mask_id: int, eos_id: int | None):
    from pathways_jax.sampling.diffusion import DiffusionSampler  # pylint: disable=g-import-not-at-top
    self.num_samples, self.eos_id, self.prompt_len = num_samples, eos_id, prompt_len
    self.sampler = DiffusionSampler(model, mesh, rules, batch_size=batch_size * num_samples,
                                    prompt_len=prompt_len, mask_id=mask_id,
                                    gen_length=max_new_tokens, steps=steps,
                                    block_length=block_length, temperature=temperature)

  def __call__(self, params, prompt_BP, prompt_mask_BP, *, key) -> Rollout:
    G = self.num_samples
    tokens = np.asarray(self.sampler(params, np.repeat(np.asarray(prompt_BP), G, axis=0),
                                     np.repeat(np.asarray(prompt_mask_BP), G, axis=0), key=key))
    cmask = completion_mask(tokens[:, self.prompt_len:], self.eos_id)
    return Rollout(tokens_BT=tokens, logprobs_BN=np.zeros(cmask.shape, np.float32),
                   completion_mask_BN=cmask, steps=np.int32(0))
