"""Policy-gradient objectives for RL post-training (pure functions of arrays): group advantages
(GRPO, Dr.GRPO, RLOO), per-token KL estimators, the clipped PPO/GRPO/DAPO policy loss, and GAE.

Shapes: P prompts with G sampled completions each (rewards_PG); B completions (B = P * G for the
group methods) of T tokens (logp_BT: per-token log-probabilities of the sampled tokens, mask_BT:
1 on completion tokens that are trained on, 0 on prompt and padding).

`group_advantages(rewards_PG, scale=...)`, with mean_g and std_g over the G samples of a prompt
(std with ddof=1, the sample standard deviation), eps added to the std:

  'group'  GRPO (Shao et al. 2024, "DeepSeekMath", the outcome-supervision advantage):
           (r - mean_g r) / (std_g r + eps). Needs G >= 2.
  'batch'  (r - mean_g r) / (std r + eps), std over all P * G rewards (TRL's
           scale_rewards='batch'). Needs P * G >= 2.
  'none'   r - mean_g r: Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A
           Critical Perspective") drops the std division, which up-weights prompts that are
           almost always solved or failed. G = 1 gives all zeros.
  'rloo'   RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization
           for Learning from Human Feedback in LLMs"; Kool et al. 2019): leave-one-out baseline
           r_i - (1/(G-1)) sum_{j != i} r_j  =  G/(G-1) (r_i - mean_g r). Needs G >= 2.

A group whose rewards are all equal gets advantage 0 under 'group' (0 / eps); its gradient is
finite too (the std is taken as 0 there without differentiating sqrt at 0).

`kl_estimate(logp_BT, ref_logp_BT, kind=...)`: per-token estimates of KL(pi_theta || pi_ref) from
tokens sampled from pi_theta (Schulman 2020, "Approximating KL Divergence"), d = log pi_ref -
log pi_theta:

  'k1'  -d                 unbiased, high variance, can be negative
  'k2'  d^2 / 2            biased (low bias when the policies are close), >= 0
  'k3'  exp(d) - d - 1     unbiased and >= 0 (GRPO's estimator; verl's 'low_var_kl',
                           computed as expm1(d) - d, unclamped)

The reference log-probs are treated as constants (gradients stopped).

`policy_loss(...)`: per valid token, with rho = exp(logp - old_logp) and advantage A (one per
sequence [B] for GRPO / RLOO, or one per token [B, T] for PPO with GAE),

  l_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)  +  beta * KL_t

(PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; GRPO adds the k3 KL term
to the loss instead of the reward; DAPO, Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
Learning System at Scale": eps_high > eps_low ("clip-higher"), beta = 0, 'token-mean').
The clipped term is the one taken exactly where

  low clip:  A < 0 and rho < 1 - eps_low      high clip:  A > 0 and rho > 1 + eps_high

(TRL's definition); there l_t does not depend on logp (its policy gradient is exactly 0) and
elsewhere l_t = -rho A. Aggregation over the batch (n_b = valid tokens of row b):

  'token-mean'               sum_{b,t} l m / sum_{b,t} m     (DAPO; TRL's 'dapo' / 'bnpo')
  'seq-mean-token-mean'      mean over rows with n_b > 0 of sum_t l m / n_b   (GRPO's paper form)
  'seq-mean-token-sum-norm'  sum_{b,t} l m / (B * max_len), max_len defaulting to T (Dr.GRPO;
                             TRL's 'dr_grpo' with max_len = max_completion_length)

A batch with no valid token gives loss 0. old_logp and the advantages are constants (gradients
stopped). Values at masked positions never reach the loss or its gradient, even inf or NaN.

Metrics (gradients stopped; token means over all valid tokens of the batch, Sigma x m / Sigma m):
  clip_ratio/low_mean, clip_ratio/high_mean  share of valid tokens low- / high-clipped (above)
  clip_ratio/region_mean                     share clipped either way (their sum)
  ratio/mean                                 mean rho
  kl                                         mean KL_t (kind `kl`), when ref_logp_BT is given
  entropy                                    mean of the caller's entropy_BT, when given

`gae(rewards_BT, values_BT, mask_BT, gamma, lam)` (Schulman et al. 2016, "High-Dimensional
Continuous Control Using Generalized Advantage Estimation"):

  delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t

computed by a reverse `jax.lax.scan` over T. The one assumption about the mask: V and A are 0
where the mask is 0 (rewards and values there are ignored). For the usual right-padded rows that
means V = A = 0 past the last valid token (the episode ends there). A 0 inside a row therefore
also ends bootstrapping: the token before it sees V_{t+1} = A_{t+1} = 0 (it does NOT skip over
the gap as verl's multi-turn GAE does). A_t and R_t are 0 where the mask is 0. gae does not stop
gradients (advantages are stopped inside policy_loss; stop the returns yourself when they are
value targets).

`value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip)`: PPO's value-function loss
with the value clipped around the values at rollout time (PPO2's form, as TRL's PPOTrainer and
OpenAI's baselines write it), a token mean over valid tokens:

  0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2)      (clip=None: (V - R)^2 / 2)

Metrics: `value_loss`, `value_clipfrac` (share of valid tokens where the clipped term is the
larger, i.e. its gradient is 0), `value_mean`. Returns and old values are constants.

`sequence_policy_loss(...)`: the clipped surrogate with one ratio per completion, the geometric
mean of its tokens' ratios (GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization"; ESPO:
Ou et al. 2025, "Principled RL for Diffusion LLMs Emerges from a Sequence-Level Perspective",
where the sequence log-prob is a masked-diffusion model's ELBO). With S_b = sum_t m logp, n_b = sum_t m and A_b per row:

  s_b = exp((S_b - S_old_b) / n_b),   l_b = -min(s_b A_b, clip(s_b, 1 - eps_low, 1 + eps_high) A_b)
        + beta * KL(d_b),   d_b = (S_ref_b - S_b) / n_b   (the per-token mean log-ratio)

a mean over the rows with n_b > 0 (clipping decided per row as in `policy_loss`). ESPO's KL is
k2 of the un-normalised difference over its fixed length L, beta (S - S_ref)^2 / (2 L) = beta L
k2(d) when n = L: pass beta * L and kl='k2' to match it. Metrics as `policy_loss`'s, the clip
shares and mean ratio over rows.

`wd1_weights(advantages_PG)` and `wd1_loss(logp_BT, weights_B, mask_BT, group_size=G)`: wd1
(Tang et al. 2025, "wd1: Weighted Policy Optimization for Reasoning in Diffusion Language
Models"), a ratio-free objective that needs neither the old policy's nor a reference's
log-probs. Within each group, with the completion's sequence log-prob S_i = sum_t m logp:

  w_i = softmax_g(A)_i - softmax_g(-A)_i          (raises the best, lowers the worst; sum_i w_i = 0)
  loss = -(1 / P) sum_i w_i S_i                   (P = B / G groups: a mean over groups)

as wd1's trainer computes it (plain softmax of the advantages, sequence log-probs summed over
the completion's tokens). A group with all-equal advantages gets w = 0. The weights are
constants. Metrics: `wd1/weight_abs_mean` (mean |w|), `seq_logp/mean` (mean S over rows with a
valid token) and `entropy` when entropy_BT is given.

`spg_sequence_logps(logp_DBT, masked_DBT, mask_BT, beta)` and `spg_loss(...)`: SPG (Wang et al.
2025, "SPG: Sandwiched Policy Gradient for Masked Diffusion Language Models"), for a
masked-diffusion policy whose log-likelihood has no closed form: a completion with a positive
advantage raises a lower bound of it, one with a non-positive advantage lowers an upper bound,
so neither update is driven by the gap between bound and likelihood. From D passes over each row
(draw j masks m_jt; p_jt = exp(logp_jt) at the masked completion tokens, t_j = the share of the
completion's n tokens draw j masks):

  ELBO_b = (1/D) sum_j  sum_t m_jt c_t logp_jt / sum_t m_jt c_t          (per-token mean)
  EUBO_b = (1 / beta) mean over {t : q_t > 0} of log q_t,
           q_t = (1/D) sum_j p_jt^beta m_jt c_t / t_j

(SPG's Renyi-style upper bound, beta >= 1; c: mask_BT). `spg_loss(elbo_B, eubo_B, advantages_B,
mask_BT, bound, mix)` takes v_b = ELBO_b where A_b > 0, and where A_b <= 0 the EUBO ('eubo'), mix
* EUBO + (1 - mix) * ELBO ('mix', SPG's default with mix 0.5) or the ELBO ('elbo', the plain
lower-bound policy gradient): loss = -sum_b A_b v_b n_b / sum_b n_b (no ratio, no clipping: one
on-policy update per rollout as SPG's trainer). Metrics: `spg/elbo_mean`, `spg/eubo_mean` (over
rows with a valid token), `spg/negative_share` (rows with A <= 0).

Everything is computed in float32 whatever the input dtype and works under jit and grad; names,
shapes and (concrete) hyper-parameters are checked and a ValueError names the argument.

    adv_PG = group_advantages(rewards_PG, scale='group')
    loss, metrics = policy_loss(logp_BT, old_logp_BT, adv_PG.reshape(-1), mask_BT,
                                ref_logp_BT=ref_BT, beta=0.04, eps_high=0.28)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCALES = ('group', 'batch', 'none', 'rloo')
KL_KINDS = ('k1', 'k2', 'k3')
AGGREGATIONS = ('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm')


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _check_same_shape(name: str, **arrays) -> None:
  shapes = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
  if len(set(shapes.values())) > 1:
    raise ValueError(f'{name}: shapes differ: '
                     + ', '.join(f'{k} {s}' for k, s in shapes.items()))


def _check_rank(name: str, arg: str, x, rank: int) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f'{name}: {arg} must have {rank} dimensions, got shape {jnp.shape(x)}')


def _check_clip_and_kl(name: str, *, kl: str, beta, has_ref: bool, eps_low, eps_high) -> None:
  """The clip band and KL settings of the clipped losses (concrete values only)."""
  if kl not in KL_KINDS:
    raise ValueError(f'{name}: kl={kl!r} is not one of {KL_KINDS}')
  if _is_number(beta) and not beta >= 0:
    raise ValueError(f'{name}: beta must be >= 0, got {beta}')
  if not has_ref and not (_is_number(beta) and beta == 0):
    raise ValueError(f'{name}: beta={beta} > 0 adds a KL term and needs ref_logp_BT (the '
                     'reference log-probs); pass it, or beta=0')
  if _is_number(eps_low) and not 0 <= eps_low < 1:
    raise ValueError(f'{name}: eps_low must be in [0, 1), got {eps_low}')
  if _is_number(eps_high) and not eps_high >= 0:
    raise ValueError(f'{name}: eps_high must be >= 0, got {eps_high}')


def _safe_std(x_centred, axis, n: int) -> jax.Array:
  """Sample std (ddof=1) of already-centred values; sqrt is not differentiated at variance 0."""
  var = jnp.sum(x_centred * x_centred, axis=axis, keepdims=True) / (n - 1)
  positive = var > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


def group_advantages(rewards_PG: jax.Array, *, scale: str = 'group',
                     eps: float = 1e-6) -> jax.Array:
  """Advantages [P, G] from the rewards of G samples per prompt; module docstring for `scale`."""
  _check_rank('group_advantages', 'rewards_PG', rewards_PG, 2)
  if scale not in SCALES:
    raise ValueError(f'group_advantages: scale={scale!r} is not one of {SCALES}')
  if _is_number(eps) and not eps >= 0:
    raise ValueError(f'group_advantages: eps must be >= 0, got {eps}')
  P, G = jnp.shape(rewards_PG)
  if scale in ('group', 'rloo') and G < 2:
    raise ValueError(f"group_advantages: scale={scale!r} needs at least 2 samples per prompt "
                     f"(the {'std' if scale == 'group' else 'leave-one-out mean'} of a group of "
                     f'{G} is undefined); rewards_PG has shape {(P, G)}')
  if scale == 'batch' and P * G < 2:
    raise ValueError(f"group_advantages: scale='batch' needs at least 2 rewards in all (the std "
                     f'of one reward is undefined); rewards_PG has shape {(P, G)}')
  r = _f32(rewards_PG)
  centred = r - r.mean(axis=1, keepdims=True)
  if scale == 'none':
    return centred
  if scale == 'rloo':
    return centred * (G / (G - 1))
  if scale == 'group':
    std = _safe_std(centred, axis=1, n=G)
  else:  # 'batch'
    std = _safe_std(r - r.mean(), axis=None, n=P * G)
  return centred / (std + eps)


def kl_estimate(logp_BT: jax.Array, ref_logp_BT: jax.Array, kind: str = 'k3') -> jax.Array:
  """Per-token estimate of KL(pi_theta || pi_ref), float32, same shape as the inputs."""
  if kind not in KL_KINDS:
    raise ValueError(f'kl_estimate: kind={kind!r} is not one of {KL_KINDS}')
  _check_same_shape('kl_estimate', logp_BT=logp_BT, ref_logp_BT=ref_logp_BT)
  d = jax.lax.stop_gradient(_f32(ref_logp_BT)) - _f32(logp_BT)
  return _kl_of_d(d, kind)


def _kl_of_d(d, kind):
  if kind == 'k1':
    return -d
  if kind == 'k2':
    return 0.5 * d * d
  return jnp.expm1(d) - d  # 'k3': exp(d) - 1 - d, without cancellation for small d


def _masked_token_mean(x_BT, valid_BT):
  n = jnp.maximum(valid_BT.sum(), 1).astype(jnp.float32)
  return jnp.where(valid_BT, x_BT, 0.0).sum() / n


def policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, advantages_B: jax.Array,
                mask_BT: jax.Array, *, ref_logp_BT: jax.Array | None = None, beta: float = 0.0,
                kl: str = 'k3', eps_low: float = 0.2, eps_high: float = 0.2,
                agg: str = 'token-mean', max_len: int | None = None,
                entropy_BT: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped policy-gradient loss and metrics; the module docstring gives the formulas.

  Args:
    logp_BT: log pi_theta of the sampled tokens (differentiated).
    old_logp_BT: log pi_old of the same tokens (the sampling policy; constant).
    advantages_B: one advantage per sequence [B], or per token [B, T] (PPO with GAE); constant.
    mask_BT: nonzero on the tokens that count.
    ref_logp_BT: log pi_ref of the same tokens (constant); required when beta > 0 (or traced),
      otherwise only used for the `kl` metric.
    beta: weight of the per-token KL term added to the loss.
    kl: the KL estimator, one of KL_KINDS.
    eps_low, eps_high: the clip band [1 - eps_low, 1 + eps_high] of the ratio.
    agg: one of AGGREGATIONS.
    max_len: the divisor length of 'seq-mean-token-sum-norm' (default T); only with that agg.
    entropy_BT: per-token policy entropy, only averaged into metrics['entropy'].
  """
  name = 'policy_loss'
  _check_rank(name, 'logp_BT', logp_BT, 2)
  _check_same_shape(name, logp_BT=logp_BT, old_logp_BT=old_logp_BT, mask_BT=mask_BT,
                    ref_logp_BT=ref_logp_BT, entropy_BT=entropy_BT)
  B, T = jnp.shape(logp_BT)
  if jnp.shape(advantages_B) not in ((B,), (B, T)):
    raise ValueError(f'{name}: advantages_B must have shape [B] = {(B,)} or [B, T] = {(B, T)}, '
                     f'got {jnp.shape(advantages_B)}')
  if agg not in AGGREGATIONS:
    raise ValueError(f'{name}: agg={agg!r} is not one of {AGGREGATIONS}')
  _check_clip_and_kl(name, kl=kl, beta=beta, has_ref=ref_logp_BT is not None, eps_low=eps_low,
                     eps_high=eps_high)
  if max_len is not None:
    if agg != 'seq-mean-token-sum-norm':
      raise ValueError(f"{name}: max_len is used only by agg='seq-mean-token-sum-norm', not "
                       f'{agg!r}')
    if _is_number(max_len) and not max_len > 0:
      raise ValueError(f'{name}: max_len must be > 0, got {max_len}')

  valid = jnp.asarray(mask_BT).astype(bool)
  adv = jax.lax.stop_gradient(_f32(advantages_B))
  adv_BT = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, (B, T))
  # Masked positions get log-ratio 0 (and d = 0 below): whatever is stored there (inf, NaN),
  # neither the loss nor its gradient can see it.
  log_ratio = jnp.where(valid, _f32(logp_BT) - jax.lax.stop_gradient(_f32(old_logp_BT)), 0.0)
  ratio = jnp.exp(log_ratio)
  low_clipped = (adv_BT < 0) & (ratio < 1.0 - eps_low)
  high_clipped = (adv_BT > 0) & (ratio > 1.0 + eps_high)
  clipped = low_clipped | high_clipped
  bound = jnp.where(low_clipped, 1.0 - eps_low, 1.0 + eps_high)
  # Equal to -min(rho A, clip(rho) A); written as a choice so the clipped tokens' gradient is
  # exactly 0 (their term is a constant) and ties at the band's edges take the unclipped branch.
  per_token = -jnp.where(clipped, bound, ratio) * adv_BT

  metrics = {}
  if ref_logp_BT is not None:
    d = jnp.where(valid, jax.lax.stop_gradient(_f32(ref_logp_BT)) - _f32(logp_BT), 0.0)
    kl_BT = _kl_of_d(d, kl)
    if not (_is_number(beta) and beta == 0):
      per_token = per_token + _f32(beta) * kl_BT
    metrics['kl'] = jax.lax.stop_gradient(_masked_token_mean(kl_BT, valid))

  per_token = jnp.where(valid, per_token, 0.0)
  if agg == 'token-mean':
    loss = per_token.sum() / jnp.maximum(valid.sum(), 1).astype(jnp.float32)
  elif agg == 'seq-mean-token-mean':
    n_B = valid.sum(axis=1)
    row_mean_B = per_token.sum(axis=1) / jnp.maximum(n_B, 1).astype(jnp.float32)
    rows = n_B > 0
    loss = (jnp.where(rows, row_mean_B, 0.0).sum()
            / jnp.maximum(rows.sum(), 1).astype(jnp.float32))
  else:  # 'seq-mean-token-sum-norm'
    length = T if max_len is None else max_len
    loss = per_token.sum() / (B * _f32(length))

  stop = jax.lax.stop_gradient
  metrics.update({
      'clip_ratio/low_mean': stop(_masked_token_mean(low_clipped.astype(jnp.float32), valid)),
      'clip_ratio/high_mean': stop(_masked_token_mean(high_clipped.astype(jnp.float32), valid)),
      'clip_ratio/region_mean': stop(_masked_token_mean(clipped.astype(jnp.float32), valid)),
      'ratio/mean': stop(_masked_token_mean(ratio, valid)),
  })
  if entropy_BT is not None:
    metrics['entropy'] = stop(_masked_token_mean(_f32(entropy_BT), valid))
  return loss, metrics


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimates and returns, float32 [B, T] each, 0 where the mask is 0.

  Module docstring for the recursion and the mask assumption (V and A are 0 where mask is 0).
  """
  name = 'gae'
  _check_rank(name, 'rewards_BT', rewards_BT, 2)
  _check_same_shape(name, rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
  for arg, v in (('gamma', gamma), ('lam', lam)):
    if _is_number(v) and not 0 <= v <= 1:
      raise ValueError(f'{name}: {arg} must be in [0, 1], got {v}')
  valid = jnp.asarray(mask_BT).astype(bool)
  r = jnp.where(valid, _f32(rewards_BT), 0.0)
  v = jnp.where(valid, _f32(values_BT), 0.0)
  gamma, lam = _f32(gamma), _f32(lam)

  def step(carry, xs):
    next_value_B, next_adv_B = carry
    r_B, v_B, valid_B = xs
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = jnp.where(valid_B, delta_B + gamma * lam * next_adv_B, 0.0)
    return (v_B, adv_B), adv_B

  B = jnp.shape(rewards_BT)[0]
  zeros_B = jnp.zeros((B,), jnp.float32)
  _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), (r.T, v.T, valid.T), reverse=True)
  adv_BT = adv_TB.T
  returns_BT = jnp.where(valid, adv_BT + v, 0.0)
  return adv_BT, returns_BT


def value_loss(values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array,
               mask_BT: jax.Array, *, clip: float | None = 0.2
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped value loss and metrics (module docstring); 0 on a batch with no valid token."""
  name = 'value_loss'
  _check_rank(name, 'values_BT', values_BT, 2)
  _check_same_shape(name, values_BT=values_BT, old_values_BT=old_values_BT,
                    returns_BT=returns_BT, mask_BT=mask_BT)
  if clip is not None and _is_number(clip) and not clip >= 0:
    raise ValueError(f'{name}: clip must be >= 0 or None, got {clip}')
  valid = jnp.asarray(mask_BT).astype(bool)
  stop = jax.lax.stop_gradient
  v = jnp.where(valid, _f32(values_BT), 0.0)
  ret = stop(jnp.where(valid, _f32(returns_BT), 0.0))
  unclipped = jnp.square(v - ret)
  if clip is None:
    per_token, clipped = unclipped, jnp.zeros_like(valid)
  else:
    old = stop(jnp.where(valid, _f32(old_values_BT), 0.0))
    v_clipped = old + jnp.clip(v - old, -_f32(clip), _f32(clip))
    clipped_sq = jnp.square(v_clipped - ret)
    clipped = clipped_sq > unclipped
    per_token = jnp.maximum(unclipped, clipped_sq)
  loss = 0.5 * _masked_token_mean(per_token, valid)
  return loss, {'value_loss': stop(loss),
                'value_clipfrac': stop(_masked_token_mean(clipped.astype(jnp.float32), valid)),
                'value_mean': stop(_masked_token_mean(v, valid))}


def wd1_weights(advantages_PG: jax.Array) -> jax.Array:
  """wd1's per-completion weights [P, G]: softmax over each group of the advantages minus the
  softmax of their negatives (module docstring)."""
  _check_rank('wd1_weights', 'advantages_PG', advantages_PG, 2)
  adv = _f32(advantages_PG)
  return jax.nn.softmax(adv, axis=1) - jax.nn.softmax(-adv, axis=1)


def wd1_loss(logp_BT: jax.Array, weights_B: jax.Array, mask_BT: jax.Array, *, group_size: int,
             entropy_BT: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """wd1's weighted-likelihood loss and metrics (module docstring): -(G / B) sum_b w_b S_b.

  Args:
    logp_BT: log pi_theta of the sampled tokens (differentiated; for a LLaDA policy an estimate).
    weights_B: `wd1_weights` of the rows' groups, flattened [B] (constant).
    mask_BT: nonzero on the completion tokens that count.
    group_size: G, completions per prompt (B / G is the number of groups the loss averages).
    entropy_BT: per-token policy entropy, only averaged into metrics['entropy'].
  """
  name = 'wd1_loss'
  _check_rank(name, 'logp_BT', logp_BT, 2)
  _check_same_shape(name, logp_BT=logp_BT, mask_BT=mask_BT, entropy_BT=entropy_BT)
  B = jnp.shape(logp_BT)[0]
  if jnp.shape(weights_B) != (B,):
    raise ValueError(f'{name}: weights_B must have shape [B] = {(B,)}, got '
                     f'{jnp.shape(weights_B)}')
  if not (isinstance(group_size, (int, np.integer)) and group_size >= 1):
    raise ValueError(f'{name}: group_size must be an integer >= 1, got {group_size!r}')
  valid = jnp.asarray(mask_BT).astype(bool)
  stop = jax.lax.stop_gradient
  w = stop(_f32(weights_B))
  # Masked positions contribute 0 whatever is stored there (inf, NaN), to the loss and gradient.
  seq_logp_B = jnp.where(valid, _f32(logp_BT), 0.0).sum(axis=1)
  loss = -(w * seq_logp_B).sum() * group_size / B
  rows = valid.any(axis=1)
  metrics = {'wd1/weight_abs_mean': stop(jnp.abs(w).mean()),
             'seq_logp/mean': stop(jnp.where(rows, seq_logp_B, 0.0).sum()
                                   / jnp.maximum(rows.sum(), 1).astype(jnp.float32))}
  if entropy_BT is not None:
    metrics['entropy'] = stop(_masked_token_mean(_f32(entropy_BT), valid))
  return loss, metrics


def sequence_policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, advantages_B: jax.Array,
                         mask_BT: jax.Array, *, ref_logp_BT: jax.Array | None = None,
                         beta: float = 0.0, kl: str = 'k3', eps_low: float = 0.2,
                         eps_high: float = 0.2, entropy_BT: jax.Array | None = None
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GSPO's / ESPO's clipped surrogate on one length-normalised ratio per completion (module
  docstring); the arguments are `policy_loss`'s, per token, with one advantage per row [B]."""
  name = 'sequence_policy_loss'
  _check_rank(name, 'logp_BT', logp_BT, 2)
  _check_same_shape(name, logp_BT=logp_BT, old_logp_BT=old_logp_BT, mask_BT=mask_BT,
                    ref_logp_BT=ref_logp_BT, entropy_BT=entropy_BT)
  B = jnp.shape(logp_BT)[0]
  if jnp.shape(advantages_B) != (B,):
    raise ValueError(f'{name}: advantages_B must have shape [B] = {(B,)} (one per completion), '
                     f'got {jnp.shape(advantages_B)}')
  _check_clip_and_kl(name, kl=kl, beta=beta, has_ref=ref_logp_BT is not None, eps_low=eps_low,
                     eps_high=eps_high)

  stop = jax.lax.stop_gradient
  valid = jnp.asarray(mask_BT).astype(bool)
  n_B = valid.sum(axis=1).astype(jnp.float32)
  rows = n_B > 0
  per_token_n = jnp.maximum(n_B, 1.0)
  # Masked positions are 0 before any sum: whatever is stored there never reaches the loss.
  seq = lambda x: jnp.where(valid, _f32(x), 0.0).sum(axis=1)
  seq_logp = seq(logp_BT)
  log_ratio = (seq_logp - stop(seq(old_logp_BT))) / per_token_n
  ratio = jnp.exp(log_ratio)
  adv = stop(_f32(advantages_B))
  low_clipped = rows & (adv < 0) & (ratio < 1.0 - eps_low)
  high_clipped = rows & (adv > 0) & (ratio > 1.0 + eps_high)
  clipped = low_clipped | high_clipped
  bound = jnp.where(low_clipped, 1.0 - eps_low, 1.0 + eps_high)
  per_row = -jnp.where(clipped, bound, ratio) * adv  # clipped rows: a constant, no gradient
  metrics = {}
  if ref_logp_BT is not None:
    kl_B = _kl_of_d((stop(seq(ref_logp_BT)) - seq_logp) / per_token_n, kl)
    if not (_is_number(beta) and beta == 0):
      per_row = per_row + _f32(beta) * kl_B
    metrics['kl'] = stop(jnp.where(rows, kl_B, 0.0).sum() / jnp.maximum(rows.sum(), 1))
  count = jnp.maximum(rows.sum(), 1).astype(jnp.float32)
  loss = jnp.where(rows, per_row, 0.0).sum() / count
  row_mean = lambda x: stop(jnp.where(rows, x.astype(jnp.float32), 0.0).sum() / count)
  metrics.update({'clip_ratio/low_mean': row_mean(low_clipped),
                  'clip_ratio/high_mean': row_mean(high_clipped),
                  'clip_ratio/region_mean': row_mean(clipped),
                  'ratio/mean': row_mean(ratio)})
  if entropy_BT is not None:
    metrics['entropy'] = stop(_masked_token_mean(_f32(entropy_BT), valid))
  return loss, metrics


SPG_BOUNDS = ('mix', 'eubo', 'elbo')


def spg_sequence_logps(logp_DBT: jax.Array, masked_DBT: jax.Array, mask_BT: jax.Array, *,
                       beta: float = 1.5) -> tuple[jax.Array, jax.Array]:
  """(ELBO [B], EUBO [B]) of each completion from D masked passes (module docstring).

  Args:
    logp_DBT: log-probs of the rows' own tokens in each pass (differentiated).
    masked_DBT: nonzero where pass j masked the position (its input was the mask token).
    mask_BT: nonzero on the completion tokens that count (c).
    beta: the EUBO's exponent, >= 1.
  """
  name = 'spg_sequence_logps'
  _check_rank(name, 'logp_DBT', logp_DBT, 3)
  _check_rank(name, 'mask_BT', mask_BT, 2)
  _check_same_shape(name, logp_DBT=logp_DBT, masked_DBT=masked_DBT)
  if jnp.shape(logp_DBT)[1:] != jnp.shape(mask_BT):
    raise ValueError(f'{name}: logp_DBT {jnp.shape(logp_DBT)} must be [D, *mask_BT.shape] = '
                     f'[D, *{jnp.shape(mask_BT)}]')
  if not (_is_number(beta) and beta >= 1):
    raise ValueError(f'{name}: beta must be a number >= 1 (the EUBO is an upper bound for '
                     f'beta >= 1), got {beta!r}')
  valid = jnp.asarray(mask_BT).astype(bool)[None]
  hit = jnp.asarray(masked_DBT).astype(bool) & valid  # masked completion tokens
  logp = jnp.where(hit, _f32(logp_DBT), 0.0)  # nothing else reaches the sums or the gradient
  n_hit = hit.sum(axis=2).astype(jnp.float32)  # [D, B]
  elbo_B = (logp.sum(axis=2) / jnp.maximum(n_hit, 1.0)).mean(axis=0)
  t_DB = n_hit / jnp.maximum(valid.sum(axis=2).astype(jnp.float32), 1.0)
  q_BT = jnp.where(hit, jnp.exp(_f32(beta) * logp) / jnp.maximum(t_DB, 1e-8)[..., None],
                   0.0).mean(axis=0)
  seen = q_BT > 0
  eubo_B = (jnp.where(seen, jnp.log(jnp.where(seen, q_BT, 1.0)), 0.0).sum(axis=1)
            / jnp.maximum(seen.sum(axis=1), 1).astype(jnp.float32) / _f32(beta))
  return elbo_B, eubo_B


def spg_loss(elbo_B: jax.Array, eubo_B: jax.Array, advantages_B: jax.Array, mask_BT: jax.Array,
             *, bound: str = 'mix', mix: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SPG's sandwiched policy-gradient loss and metrics (module docstring)."""
  name = 'spg_loss'
  _check_rank(name, 'mask_BT', mask_BT, 2)
  B = jnp.shape(mask_BT)[0]
  for arg, x in (('elbo_B', elbo_B), ('eubo_B', eubo_B), ('advantages_B', advantages_B)):
    if jnp.shape(x) != (B,):
      raise ValueError(f'{name}: {arg} must have shape [B] = {(B,)}, got {jnp.shape(x)}')
  if bound not in SPG_BOUNDS:
    raise ValueError(f'{name}: bound must be one of {SPG_BOUNDS}, got {bound!r}')
  if not (_is_number(mix) and 0 <= mix <= 1):
    raise ValueError(f'{name}: mix must be a number in [0, 1], got {mix!r}')
  stop = jax.lax.stop_gradient
  n_B = jnp.asarray(mask_BT).astype(bool).sum(axis=1).astype(jnp.float32)
  adv = stop(_f32(advantages_B))
  elbo, eubo = _f32(elbo_B), _f32(eubo_B)
  negative = {'eubo': eubo, 'mix': mix * eubo + (1.0 - mix) * elbo, 'elbo': elbo}[bound]
  value = jnp.where(adv > 0, elbo, negative)
  total = jnp.maximum(n_B.sum(), 1.0)
  loss = -(adv * value * n_B).sum() / total
  rows = n_B > 0
  row_mean = lambda x: stop(jnp.where(rows, x, 0.0).sum() / jnp.maximum(rows.sum(), 1))
  return loss, {'spg/elbo_mean': row_mean(elbo), 'spg/eubo_mean': row_mean(eubo),
                'spg/negative_share': row_mean((adv <= 0).astype(jnp.float32))}
