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

`rl.diffusion_estimator='coupled'` adds DiffuCoder's coupled estimate (Gong et al. 2025,
"DiffuCoder: Understanding and Improving Masked Diffusion Models for Code Generation",
coupled-GRPO): two more passes over the row with complementary masks over the completion, drawn
with a ratio t ~ U[rl.coupled_t_min, rl.coupled_t_max] per row. Pass a masks each generated
position with probability t, pass b masks exactly the others (the prompt intact in both), so
every completion token is predicted once with part of the completion visible, and each is
weighted as the ELBO weights a token masked at ratio t: 1/t in pass a, 1/(1 - t) in pass b.
The log-prob of token k is (d1's one-step value + w_k * its value from the pass that masked it)
/ 2, as DiffuCoder combines them. DiffuCoder draws one t per batch; here each row draws its own
(the same estimator per row, less variance across the batch). The three passes are one forward
of 3N rows; the masks travel in the batch (`coupled_mask`, `coupled_weight`), shared by the
policy, the old policy and the reference like d1's.

`rl.diffusion_estimator='elbo'` is ESPO's sequence ELBO (Ou et al. 2025, "Principled RL for
Diffusion LLMs Emerges from a Sequence-Level Perspective"): the same complementary pair of passes
without d1's, and per row a count k of masked generated positions stratified over the rollout's
rows (k_i = floor(v + i (L + 1) / N) mod (L + 1), v ~ U[0, L + 1), L generated positions), k of
them drawn for pass a. Each row's k is then uniform on {0..L}; ESPO rounds a linspace from a
random integer start instead, which favours even counts (round half to even) when (L + 1) / N is
half an integer. A token masked in pass a is weighted 1/p with p = k / (L + 1), one
masked in pass b 1 / (L / (L + 1) - p), as ESPO weights them, and its value is half that weight
times its log-prob in the pass that masked it: the two passes' ELBO estimates averaged, whose
sum over the completion is ESPO's sequence log-likelihood. Pair it with rl.loss='gspo' (one
length-normalised ratio per completion) for ESPO's objective.

`rl.loss='spg'` is SPG's sandwiched policy gradient (Wang et al. 2025, "SPG: Sandwiched Policy
Gradient for Masked Diffusion Language Models"), with its block-wise masks (`spg_masks`): per row
and draw, one block of the completion (blocks of rl.block_length; 0: one block) is chosen
uniformly among those the completion reaches, the blocks before it stay clean, a count m ~
U{max(1, floor(t_min n)) .. min(floor(t_max n), n)} of its n completion tokens is masked at
random (at least one), and every later position (the rest of the completion, the padding past
it) is masked, as the semi-autoregressive sampler leaves a row mid-decoding; each prompt token
is masked with probability rl.prompt_mask_p. The draws travel in the batch as one int32 [N, T]
field, `spg_mask`, bit j set where draw j masks the position;
`objectives.rl.spg_sequence_logps` turns the passes' log-probs into each completion's ELBO and
EUBO estimates.

`rl.diffusion_estimator='trace'` is TraceRL's trajectory-aware estimate (Wang et al. 2025,
"Revolutionizing Reinforcement Learning Framework for Diffusion Large Language Models", TraDo):
the policy is trained on the steps it actually decoded. The sampler records the step at which
each generated position was committed; per row, its distinct steps in order are grouped s at a
time (rl.trace_shrink, TraceRL's shrinkage: `trace_groups`), and pass g shows the prompt and the
tokens of groups before g and masks the rest, so each token's log-prob is read from the state
the sampler was in when it committed it (exactly, for s = 1 and no cache). The groups travel in
the batch as `trace_group` (int32 [N, T], -1 over the prompt); K = ceil(min(C, sampler steps) /
s) passes of N rows, one forward. TraceRL's optional value model is not built: advantages are
the group's, as for the other estimators.

Rows keep the AR trainer's layout (rl/batch.py) with two differences: every generated position is
part of the sequence (segment id 1: the sampler decoded all `max_new_tokens` of them, EOS padding
included), and the completion mask runs up to and including the first EOS (LLaDA pads answers
with EOS; what follows the first is not the answer).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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


def coupled_masks(prompt_len: int, shape: tuple[int, int], *, t_min: float, t_max: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(int32 [N, T]: 1 where pass a masks the position, float32 [N, T]: the weight of the pass
  that masks it, 1/t (a) or 1/(1 - t) (b), 0 over the prompt) for rows of `shape` whose
  generated positions start at `prompt_len`; t ~ U[t_min, t_max] per row."""
  n, total = shape
  t_N1 = rng.uniform(t_min, t_max, size=(n, 1))
  generated = np.arange(total)[None, :] >= prompt_len
  in_a = generated & (rng.random((n, total)) < t_N1)
  weight = np.where(in_a, 1.0 / t_N1, np.where(generated, 1.0 / (1.0 - t_N1), 0.0))
  return in_a.astype(np.int32), weight.astype(np.float32)


def elbo_masks(prompt_len: int, shape: tuple[int, int], *, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
  """ESPO's masks in `coupled_masks`' layout (module docstring): (int32 [N, T]: 1 where pass a
  masks the position, float32 [N, T]: (L + 1) / k in pass a, (L + 1) / (L - k) in pass b, 0 over
  the prompt), with k stratified over the N rows."""
  n, total = shape
  length = total - prompt_len
  v = rng.uniform(0, length + 1)
  k_N = np.floor(v + np.arange(n) * (length + 1) / n).astype(np.int64) % (length + 1)
  ranks = np.argsort(rng.random((n, length)), axis=1).argsort(axis=1)  # a random order per row
  in_a = np.zeros((n, total), bool)
  in_a[:, prompt_len:] = ranks < k_N[:, None]
  k = k_N[:, None].astype(np.float64)
  generated = np.arange(total)[None, :] >= prompt_len
  with np.errstate(divide='ignore'):  # k = 0 or L: that pass masks nothing, its weight unused
    weight = np.where(in_a, (length + 1) / k, np.where(generated, (length + 1) / (length - k), 0.0))
  return in_a.astype(np.int32), weight.astype(np.float32)


def spg_masks(prompt_len: int, completion_mask_NC: np.ndarray, prompt_mask_NP: np.ndarray, *,
              draws: int, block_length: int, t_min: float, t_max: float, p: float,
              rng: np.random.Generator) -> np.ndarray:
  """int32 [N, P + C]: SPG's block-wise masks (module docstring), bit j set where draw j masks
  the position, for rows whose C generated positions start at `prompt_len` = P."""
  cmask = np.asarray(completion_mask_NC) > 0
  prompt_real = np.asarray(prompt_mask_NP) > 0
  n, c = cmask.shape
  block = block_length if 0 < block_length < c else c
  lengths = cmask.sum(axis=1)
  out = np.zeros((n, prompt_len + c), np.int64)
  for j in range(draws):
    hide = np.zeros((n, prompt_len + c), bool)
    for i in range(n):
      gen = np.ones(c, bool)  # a row without completion tokens: everything masked
      if lengths[i]:
        k = rng.integers(0, (lengths[i] - 1) // block + 1)  # a block the completion reaches
        lo, n_k = k * block, min(block, lengths[i] - k * block)
        lo_m = max(1, int(n_k * t_min))  # at least one (SPG asserts its range is not empty)
        m = rng.integers(lo_m, max(lo_m, min(int(n_k * t_max), n_k)) + 1)
        gen[:lo] = False
        gen[lo:lo + n_k] = rng.permutation(n_k) < m
      hide[i, prompt_len:] = gen
    hide[:, :prompt_len] = prompt_real & (rng.random((n, prompt_len)) < p)
    out |= hide.astype(np.int64) << j
  return out.astype(np.int32)


def spg_inputs(tokens_NT: jax.Array, spg_mask_NT: jax.Array, *, draws: int,
               mask_id: int) -> jax.Array:
  """[draws * N, T]: the rows of each draw (draw-major), masked where its bit of `spg_mask` is
  set."""
  return jnp.concatenate([jnp.where((spg_mask_NT >> j) & 1 > 0, mask_id, tokens_NT)
                          for j in range(draws)]).astype(tokens_NT.dtype)


def trace_groups(commit_step_NC: np.ndarray, shrink: int) -> np.ndarray:
  """int32 [N, C]: each generated position's group: the rank of its commit step among its row's
  distinct commit steps, integer-divided by `shrink` (TraceRL's collapse of s neighbouring
  steps)."""
  steps = np.asarray(commit_step_NC)
  out = np.zeros(steps.shape, np.int32)
  for i, row in enumerate(steps):
    _, rank = np.unique(row, return_inverse=True)
    out[i] = rank.reshape(-1) // shrink
  return out


def num_trace_passes(max_new_tokens: int, sampler_steps: int, shrink: int) -> int:
  """K: the most groups a row can have (a sampler step commits at least one token)."""
  return -(-min(max_new_tokens, sampler_steps) // shrink)


def trace_inputs(tokens_NT: jax.Array, trace_group_NT: jax.Array, *, passes: int,
                 mask_id: int) -> jax.Array:
  """[passes * N, T] (pass-major): pass g masks the generated positions of group g and later."""
  return jnp.concatenate([jnp.where(trace_group_NT >= g, mask_id, tokens_NT)
                          for g in range(passes)]).astype(tokens_NT.dtype)


def trace_select(values_KNT: jax.Array, trace_group_NT: jax.Array) -> jax.Array:
  """[N, T]: each generated position's value from the pass of its group (0 over the prompt)."""
  picks = trace_group_NT[None] == jnp.arange(values_KNT.shape[0])[:, None, None]
  return jnp.where(picks, values_KNT, 0.0).sum(axis=0)


def coupled_inputs(tokens_NT: jax.Array, coupled_mask_NT: jax.Array, weight_NT: jax.Array, *,
                   mask_id: int) -> tuple[jax.Array, jax.Array]:
  """The rows of passes a and b: the completion positions of pass a masked, then the others
  (a generated position is one whose weight is > 0)."""
  in_a = coupled_mask_NT > 0
  in_b = (weight_NT > 0) & ~in_a
  return (jnp.where(in_a, mask_id, tokens_NT).astype(tokens_NT.dtype),
          jnp.where(in_b, mask_id, tokens_NT).astype(tokens_NT.dtype))


def coupled_logps(one_step_NT: jax.Array, a_NT: jax.Array, b_NT: jax.Array,
                  coupled_mask_NT: jax.Array, weight_NT: jax.Array) -> jax.Array:
  """float32 [N, T]: (d1's one-step log-prob + weight * the log-prob from the pass that masked
  the token) / 2 at every generated position (the prompt's values are not used)."""
  masked_pass = jnp.where(coupled_mask_NT > 0, a_NT, b_NT)
  return 0.5 * (one_step_NT + weight_NT * masked_pass)


def elbo_logps(a_NT: jax.Array, b_NT: jax.Array, coupled_mask_NT: jax.Array,
               weight_NT: jax.Array) -> jax.Array:
  """float32 [N, T]: half the weight times each token's log-prob in the pass that masked it
  (`elbo_masks`): summed over a completion, the two passes' ELBO estimates averaged."""
  return 0.5 * weight_NT * jnp.where(coupled_mask_NT > 0, a_NT, b_NT)


def estimator_inputs(estimator: str, batch: dict, *, mask_id: int,
                     trace_passes: int = 0) -> jax.Array:
  """[passes * N, T] (pass-major): the masked rows every pass of `estimator` reads ('d1': d1's
  input; 'coupled': d1's and the complementary pair; 'elbo': the pair; 'trace': TraceRL's)."""
  if estimator == 'trace':
    return trace_inputs(batch['tokens'], batch['trace_group'], passes=trace_passes,
                        mask_id=mask_id)
  if estimator == 'd1':
    return batch['masked_tokens']
  a, b = coupled_inputs(batch['tokens'], batch['coupled_mask'], batch['coupled_weight'],
                        mask_id=mask_id)
  return jnp.concatenate([a, b] if estimator == 'elbo' else [batch['masked_tokens'], a, b])


def combine_passes(estimator: str, logp_KNT: jax.Array, entropy_KNT: jax.Array,
                   batch: dict) -> tuple[jax.Array, jax.Array]:
  """(log-probs [N, T], entropies [N, T]) of the tokens from the passes' values [K, N, T]: the
  estimate of each token (module docstring) and the entropy of the pass it is read from (d1's
  for 'coupled')."""
  if estimator == 'd1':
    return logp_KNT[0], entropy_KNT[0]
  if estimator == 'trace':
    return (trace_select(logp_KNT, batch['trace_group']),
            trace_select(entropy_KNT, batch['trace_group']))
  mask, weight = batch['coupled_mask'], batch['coupled_weight']
  if estimator == 'coupled':
    return coupled_logps(*logp_KNT, mask, weight), entropy_KNT[0]
  return elbo_logps(*logp_KNT, mask, weight), jnp.where(mask > 0, *entropy_KNT)


def token_logps(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """float32 [B, T]: log softmax(logits)[token] at each position (a masked model predicts each
  position's own token: no shift)."""
  lsm = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(lsm, tokens_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_entropy(logits_BTV: jax.Array) -> jax.Array:
  """float32 [B, T]: the entropy of each position's own prediction."""
  lsm = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -(jnp.exp(lsm) * lsm).sum(-1)


class DiffusionRollout(NamedTuple):
  """`sampling.rollout.Rollout`'s fields and the step each generated position was committed at."""
  tokens_BT: np.ndarray
  logprobs_BN: np.ndarray
  completion_mask_BN: np.ndarray
  steps: np.ndarray
  commit_step_BN: np.ndarray


class DiffusionRollouts:
  """G completions per prompt from `sampling.diffusion.DiffusionSampler` on the run's mesh, as a
  `DiffusionRollout` (log-probs 0: the sampler computes none; the estimator gives them); `cache`
  and `threshold` as the sampler's (Fast-dLLM)."""

  def __init__(self, model, mesh, rules, *, batch_size: int, prompt_len: int, num_samples: int,
               max_new_tokens: int, steps: int, block_length: int, temperature: float,
               mask_id: int, eos_id: int | None, cache: str | None = None,
               threshold: float | None = None):
    from pathways_jax.sampling.diffusion import DiffusionSampler  # pylint: disable=g-import-not-at-top
    self.num_samples, self.eos_id, self.prompt_len = num_samples, eos_id, prompt_len
    self.sampler = DiffusionSampler(model, mesh, rules, batch_size=batch_size * num_samples,
                                    prompt_len=prompt_len, mask_id=mask_id,
                                    gen_length=max_new_tokens, steps=steps,
                                    block_length=block_length, temperature=temperature,
                                    cache=cache, threshold=threshold, return_stats=True)

  def __call__(self, params, prompt_BP, prompt_mask_BP, *, key) -> DiffusionRollout:
    G = self.num_samples
    tokens, stats = self.sampler(params, np.repeat(np.asarray(prompt_BP), G, axis=0),
                                 np.repeat(np.asarray(prompt_mask_BP), G, axis=0), key=key)
    tokens = np.asarray(tokens)
    cmask = completion_mask(tokens[:, self.prompt_len:], self.eos_id)
    return DiffusionRollout(tokens_BT=tokens, logprobs_BN=np.zeros(cmask.shape, np.float32),
                            completion_mask_BN=cmask, steps=np.int32(0),
                            commit_step_BN=np.asarray(stats['commit_step']))
