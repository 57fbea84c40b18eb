"""LLaDA: the masked-diffusion forward process, its losses and its likelihood bound.

Pure functions of arrays (plus `log_likelihood`, which calls a model). See docs/llada.md.

    noisy_BL, masked_BL, p_mask_BL = forward_process(key, tokens_BL, mask_id=MASK)
    logits_BLV = model.apply({'params': p}, noisy_BL)          # bidirectional, no time input
    loss, metrics = loss(logits_BLV, tokens_BL, masked_BL, p_mask_BL)

Pretraining (LLaDA eq. 3 / GUIDELINES.md): one t ~ U(0, 1) per row, every token masked
independently with p_mask = (1 - eps) t + eps, and the loss is the sum over masked tokens of
CE / p_mask divided by B * L (all positions, not the masked count).

SFT (eq. 5): the prompt is never masked (`sft_forward_process`, or `unmask_prompt` after
`forward_process`); EOS padding of the response is an ordinary response token; each row is
normalised by its answer length, then rows are averaged.

Random length (LLaDA trains 1% of batches at a random length): `random_length_mask` draws it
inside the jitted step and returns a [B, L] validity mask instead of slicing the batch, so no
length ever triggers a recompile. Multiply the model's segment ids by it (the tail becomes
padding, which attention never sees) and pass it as `valid_BL` to `forward_process` and `loss`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.objectives import token_losses as token_losses_lib

Metrics = dict[str, jax.Array]


def _token_ce(logits_BLV, tokens_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token CE [B, L] (float32) and argmax == target [B, L] (bool), from the logits or from a
  `token_losses.TokenLosses` against `tokens_BL`."""
  stats = token_losses_lib.of(logits_BLV, tokens_BL)
  return stats.ce_BL, stats.correct_BL


def forward_process(key: jax.Array, tokens_BL: jax.Array, *, mask_id: int, eps: float = 1e-3,
                    valid_BL: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """LLaDA's forward process: mask each token independently with a per-row probability.

  t ~ U(0, 1) per row and p_mask = (1 - eps) t + eps, so p_mask is in [eps, 1). Positions with
  `valid_BL` False (packing padding, the random-length tail) are never masked.
  Returns (noisy_BL, masked_BL bool, p_mask_BL float32 broadcast over the row).
  """
  b, l = tokens_BL.shape
  key_t, key_m = jax.random.split(key)
  t_B = jax.random.uniform(key_t, (b,), jnp.float32)
  p_mask_BL = jnp.broadcast_to(((1.0 - eps) * t_B + eps)[:, None], (b, l))
  masked_BL = jax.random.uniform(key_m, (b, l), jnp.float32) < p_mask_BL
  if valid_BL is not None:
    masked_BL &= valid_BL.astype(bool)
  noisy_BL = jnp.where(masked_BL, jnp.asarray(mask_id, tokens_BL.dtype), tokens_BL)
  return noisy_BL, masked_BL, p_mask_BL


def unmask_prompt(noisy_BL: jax.Array, masked_BL: jax.Array, tokens_BL: jax.Array,
                  prompt_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Restores the prompt after `forward_process` (SFT): returns (noisy_BL, masked_BL)."""
  prompt_BL = prompt_BL.astype(bool)
  return jnp.where(prompt_BL, tokens_BL, noisy_BL), masked_BL & ~prompt_BL


def sft_forward_process(key: jax.Array, tokens_BL: jax.Array, prompt_BL: jax.Array, *,
                        mask_id: int, eps: float = 1e-3, valid_BL: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`forward_process` with the prompt never masked (LLaDA SFT). Same outputs."""
  noisy_BL, masked_BL, p_mask_BL = forward_process(key, tokens_BL, mask_id=mask_id, eps=eps,
                                                   valid_BL=valid_BL)
  noisy_BL, masked_BL = unmask_prompt(noisy_BL, masked_BL, tokens_BL, prompt_BL)
  return noisy_BL, masked_BL, p_mask_BL


def random_length_mask(key: jax.Array, batch_size: int, seq_len: int, *, prob: float = 0.01,
                       min_length: int = 1, max_length: int | None = None) -> jax.Array:
  """LLaDA's random-length trick as a [B, L] bool validity mask (one length for the batch).

  With probability `prob` the whole batch is cut to a length uniform in
  [min_length, max_length or seq_len]; otherwise every position is valid. Shapes never change,
  so a jitted train step compiles once. Apply it as `segment_ids_BL * valid` for the model (the
  tail is then padding: attention never sees it) and as `valid_BL` for `forward_process`/`loss`
  (which then normalises by B * length, as LLaDA does on the truncated batch).
  """
  hi = seq_len if max_length is None else max_length
  if not 1 <= min_length <= hi <= seq_len:
    raise ValueError(f'need 1 <= min_length={min_length} <= max_length={hi} <= seq_len={seq_len}')
  key_p, key_l = jax.random.split(key)
  cut = jax.random.uniform(key_p, ()) < prob
  length = jnp.where(cut, jax.random.randint(key_l, (), min_length, hi + 1), seq_len)
  return jnp.broadcast_to(jnp.arange(seq_len) < length, (batch_size, seq_len))


def pretraining_draws(key: jax.Array, tokens_BL: jax.Array, segment_ids_BL: jax.Array, *,
                      mask_id: int, eps: float = 1e-3, random_length_prob: float = 0.0):
  """One batch's pretraining randomness: (noisy_BL, masked_BL, p_mask_BL, valid_BL).

  The random-length cut (with probability `random_length_prob`), then the forward process on the
  valid positions. The train step and the selective (RHO-1) loss both draw through this, so that
  for the same key a uniform and a selective arm see the same masks.
  """
  key_length, key_mask = jax.random.split(key)
  valid_BL = segment_ids_BL != 0
  if random_length_prob > 0:
    valid_BL &= random_length_mask(key_length, *tokens_BL.shape, prob=random_length_prob)
  noisy_BL, masked_BL, p_mask_BL = forward_process(key_mask, tokens_BL, mask_id=mask_id, eps=eps,
                                                   valid_BL=valid_BL)
  return noisy_BL, masked_BL, p_mask_BL, valid_BL


def loss(logits_BLV: jax.Array, tokens_BL: jax.Array, masked_BL: jax.Array, p_mask_BL: jax.Array,
         *, valid_BL: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """LLaDA pretraining loss: sum over masked tokens of CE / p_mask, divided by B * L.

  `logits_BLV` (here and in `sft_loss`) may be a `token_losses.TokenLosses` against `tokens_BL`.

  With `valid_BL` (packing padding, random-length tail) invalid positions never count and the
  denominator is the number of valid positions (B * L when all are valid). Metrics: `ce` (mean
  unweighted CE over masked tokens), `accuracy` (argmax on masked tokens), `num_masked`,
  `mask_ratio`.
  """
  ce_BL, correct_BL = _token_ce(logits_BLV, tokens_BL)
  m_BL = masked_BL.astype(jnp.float32)
  if valid_BL is None:
    denom = jnp.float32(tokens_BL.size)
  else:
    m_BL = m_BL * valid_BL.astype(jnp.float32)
    denom = jnp.maximum(valid_BL.astype(jnp.float32).sum(), 1.0)
  total = (ce_BL * m_BL / p_mask_BL.astype(jnp.float32)).sum() / denom
  return total, _metrics(ce_BL, correct_BL, m_BL, denom)


def _metrics(ce_BL, correct_BL, m_BL, denom) -> Metrics:
  n = m_BL.sum()
  safe = jnp.maximum(n, 1.0)
  return {'ce': (ce_BL * m_BL).sum() / safe, 'accuracy': (correct_BL * m_BL).sum() / safe,
          'num_masked': n, 'mask_ratio': n / denom}


def sft_loss(logits_BLV: jax.Array, tokens_BL: jax.Array, masked_BL: jax.Array,
             p_mask_BL: jax.Array, prompt_BL: jax.Array, *, valid_BL: jax.Array | None = None,
             segment_ids_BL: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """LLaDA SFT loss: response tokens only; per example / answer length (incl. EOS padding); mean.

  An example is a row, or with `segment_ids_BL` (packed rows) one segment of a row, so a packed
  conversation weighs what it would alone in a row. Prompt positions never count even if
  `masked_BL` marks them. An example's answer length is its number of non-prompt valid
  positions; examples without any (all padding) are left out of the mean (with none of them, the
  mean is over all B rows, as in LLaDA).
  """
  ce_BL, correct_BL = _token_ce(logits_BLV, tokens_BL)
  answer_BL = ~prompt_BL.astype(bool)
  if valid_BL is not None:
    answer_BL &= valid_BL.astype(bool)
  a_BL = answer_BL.astype(jnp.float32)
  m_BL = masked_BL.astype(jnp.float32) * a_BL
  term_BL = ce_BL * m_BL / p_mask_BL.astype(jnp.float32)
  if segment_ids_BL is None:
    num_E, answer_len_E = term_BL.sum(axis=1), a_BL.sum(axis=1)
  else:  # one slot per (row, segment id): segment ids are < L
    b, l = tokens_BL.shape
    slot_BL = jnp.arange(b, dtype=jnp.int32)[:, None] * l + jnp.clip(segment_ids_BL, 0, l - 1)
    num_E = jax.ops.segment_sum(term_BL.reshape(-1), slot_BL.reshape(-1), num_segments=b * l)
    answer_len_E = jax.ops.segment_sum(a_BL.reshape(-1), slot_BL.reshape(-1), num_segments=b * l)
  examples = jnp.maximum((answer_len_E > 0).sum(), 1).astype(jnp.float32)
  total = (num_E / jnp.maximum(answer_len_E, 1.)).sum() / examples
  return total, _metrics(ce_BL, correct_BL, m_BL, jnp.maximum(a_BL.sum(), 1.0))


# ----------------------------------------------------------------------------------------------
# Likelihood (LLaDA eq. 6, get_log_likelihood.py)


def as_apply_fn(apply_fn_or_model: Any) -> Callable[[Any, jax.Array], jax.Array]:
  """`apply_fn(params, tokens_BL) -> logits_BLV` from either a plain function or a Linen module."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if isinstance(apply_fn_or_model, nn.Module):
    return _ModuleApply(apply_fn_or_model)
  if not callable(apply_fn_or_model):
    raise TypeError(f'expected apply_fn(params, tokens_BL) or a Linen module, got '
                    f'{type(apply_fn_or_model).__name__}')
  return apply_fn_or_model


class _ModuleApply:
  """Hashable (by module value) wrapper, so jitted callers can take it as a static argument."""

  def __init__(self, module):
    self.module = module

  def __call__(self, params, tokens_BL):
    return self.module.apply({'params': params}, tokens_BL)

  def __hash__(self):
    return hash(self.module)

  def __eq__(self, other):
    return isinstance(other, _ModuleApply) and other.module == self.module


def stratified_mask_counts(key: jax.Array, answer_len: int, batch_size: int) -> jax.Array:
  """[batch_size] int32 counts l in 1..L, stratified: k ~ U{1..L}, l_j = round(k + j L / B) mod L."""
  k = jax.random.randint(key, (), 1, answer_len + 1).astype(jnp.float32)
  l_B = jnp.round(k + jnp.arange(batch_size, dtype=jnp.float32) * (answer_len / batch_size))
  l_B = l_B.astype(jnp.int32)
  return (l_B - 1) % answer_len + 1


def likelihood_masks(key: jax.Array, index, answer_len: int, batch_size: int
                     ) -> tuple[jax.Array, jax.Array]:
  """The draws of `log_likelihood`'s mini-batch `index`: (masked_BA bool, l_B int32).

  Row j masks exactly l_j of the `answer_len` answer positions (l stratified over the rows).
  Callers that score the rows themselves (eval.harness, which pads rows to a few lengths) draw
  through this, so that they reproduce `log_likelihood` for the same key.
  """
  key = jax.random.fold_in(key, index)
  key_l, key_p = jax.random.split(key)
  l_B = stratified_mask_counts(key_l, answer_len, batch_size)
  # Exactly l_j answer positions per row, chosen uniformly without replacement: the positions
  # whose rank in a random permutation is below l_j.
  rank_BA = jnp.argsort(jax.random.uniform(key_p, (batch_size, answer_len)), axis=-1)
  return rank_BA < l_B[:, None], l_B


@functools.partial(jax.jit, static_argnames=('apply_fn', 'prompt_len', 'batch_size', 'mask_id',
                                             'cfg_scale'))
def _likelihood_batch(apply_fn, params, seq_L, key, index, *, prompt_len, batch_size, mask_id,
                      cfg_scale):
  """Sum over the mini-batch rows of (L / l) * sum of CE over the l masked answer tokens."""
  total = seq_L.shape[0]
  answer_len = total - prompt_len
  masked_BA, l_B = likelihood_masks(key, index, answer_len, batch_size)
  masked_BL = jnp.concatenate([jnp.zeros((batch_size, prompt_len), bool), masked_BA], axis=1)
  seq_BL = jnp.broadcast_to(seq_L, (batch_size, total))
  noisy_BL = jnp.where(masked_BL, jnp.asarray(mask_id, seq_BL.dtype), seq_BL)
  if cfg_scale > 0:
    uncond_BL = noisy_BL.at[:, :prompt_len].set(mask_id)
    logits = apply_fn(params, jnp.concatenate([noisy_BL, uncond_BL], axis=0)).astype(jnp.float32)
    cond, uncond = logits[:batch_size], logits[batch_size:]
    logits_BLV = uncond + (cfg_scale + 1.0) * (cond - uncond)
  else:
    logits_BLV = apply_fn(params, noisy_BL)
  ce_BL, _ = _token_ce(logits_BLV, seq_BL)
  p_mask_B = l_B.astype(jnp.float32) / answer_len
  return ((ce_BL * masked_BL).sum(axis=1) / p_mask_B).sum()


def log_likelihood(apply_fn, params, prompt_P, answer_A, *, mask_id: int, key: jax.Array,
                   mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.0) -> float:
  """LLaDA's Monte Carlo lower bound of log p(answer | prompt) (paper eq. 6).

  Each sample masks exactly l of the L answer tokens (uniformly chosen; the prompt never) with l
  stratified across each mini-batch of `batch_size` rows, and scores (L / l) * sum of the masked
  tokens' CE; the result is minus the mean over `mc_num` samples. `apply_fn` is
  `apply_fn(params, tokens_BL) -> logits_BLV` or the Transformer module. `cfg_scale > 0` adds
  unsupervised classifier-free guidance (prompt replaced by masks): u + (w + 1)(c - u).
  One jitted call per mini-batch (compiled once per prompt/answer length).
  """
  prompt_P = np.asarray(prompt_P)
  answer_A = np.asarray(answer_A)
  if prompt_P.ndim != 1 or answer_A.ndim != 1:
    raise ValueError(f'prompt_P and answer_A must be 1-D token arrays, got shapes '
                     f'{prompt_P.shape} and {answer_A.shape}')
  if answer_A.shape[0] == 0:
    raise ValueError('answer_A is empty')
  if mc_num <= 0 or batch_size <= 0 or mc_num % batch_size:
    raise ValueError(f'mc_num={mc_num} must be a positive multiple of batch_size={batch_size}')
  if cfg_scale < 0:
    raise ValueError(f'cfg_scale={cfg_scale} must be >= 0')
  fn = as_apply_fn(apply_fn)
  seq_L = np.concatenate([prompt_P, answer_A]).astype(np.int32)
  sums = [_likelihood_batch(fn, params, seq_L, key, np.int32(i),
                            prompt_len=int(prompt_P.shape[0]), batch_size=batch_size,
                            mask_id=int(mask_id), cfg_scale=float(cfg_scale))
          for i in range(mc_num // batch_size)]  # dispatched asynchronously, summed once
  return -float(sum(float(s) for s in jax.device_get(sums))) / mc_num


__all__ = ['forward_process', 'unmask_prompt', 'sft_forward_process', 'random_length_mask',
           'loss', 'sft_loss', 'log_likelihood', 'likelihood_masks', 'stratified_mask_counts',
           'as_apply_fn']
