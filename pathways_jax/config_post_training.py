"""The post-training sections of the base config (`config.base_config` adds them): SFT for LLaDA,
DPO and its family, VRPO, reward models and RL with rollouts. Their semantic checks live with the
tasks that read them (pathways_jax/tasks/*.py), which name the offending key.
"""
from __future__ import annotations

import ml_collections

# Allowed values, checked by `config.validate` with the base config's own.
CHOICES = {
    'dpo.loss_type': ('sigmoid', 'robust', 'ipo', 'hinge', 'simpo', 'orpo'),
    'rl.scale': ('group', 'batch', 'none', 'rloo', 'gae'),
    'rl.kl': ('k1', 'k2', 'k3'),
    'rl.agg': ('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'),
    'rl.loss': ('clip', 'gspo', 'wd1', 'spg'),
    'rl.spg_bound': ('mix', 'eubo', 'elbo'),
}


def add_sections(c: ml_collections.ConfigDict) -> None:
  """Adds c.llada_sft, c.dpo, c.vrpo, c.reward_model and c.rl with their defaults."""
  # task 'llada_sft' (pathways_jax/tasks/sft.py): the share of rows trained with the prompt kept;
  # the other rows get LLaDA's pretraining loss (any token may be masked).
  c.llada_sft = ml_collections.ConfigDict()
  c.llada_sft.sft_fraction = 1.0

  # task 'dpo' (pathways_jax/tasks/dpo.py, docs/preference.md) over data.corpus='preference'.
  c.dpo = dp = ml_collections.ConfigDict()
  dp.beta = 0.1
  dp.loss_type = 'sigmoid'  # objectives.preference.LOSS_TYPES
  dp.label_smoothing = 0.0  # cDPO / robust DPO's label-flip rate
  dp.rpo_alpha = 0.0  # + alpha * the chosen response's length-normalised NLL (RPO)
  dp.simpo_gamma = 0.5
  # The frozen reference: '' = the model the run starts from (train.init_from; for a LoRA policy
  # that is the same params with the adapters off, no second copy), or a run / HF directory.
  dp.reference = ''
  # Score the data with the reference once, before training (cached in WORKDIR/ref_logps): the
  # reference is then not held during training.
  dp.precompute = False

  # task 'vrpo' (pathways_jax/tasks/vrpo.py, docs/preference.md): DPO for LLaDA (model.causal=False)
  # on Monte Carlo ELBO estimates (LLaDA 1.5); loss, beta and reference are config.dpo's
  # (dpo.precompute is refused). Each step runs n = n_t * n_yt forwards per model per row.
  c.vrpo = vr = ml_collections.ConfigDict()
  vr.n_t = 8  # timesteps per response (VRPO's optimal allocation: n_t = n, n_yt = 1)
  vr.n_yt = 1  # masks per timestep
  vr.antithetic = True  # the reference scores the policy's own timesteps and masks

  # task 'reward_model' (pathways_jax/tasks/reward_model.py, docs/preference.md): a Bradley-Terry
  # reward model over data.corpus='preference' pairs; needs model.scalar_head=True.
  c.reward_model = rm = ml_collections.ConfigDict()
  # + center_coef * mean((r_chosen + r_rejected)^2): pins the reward's free offset near 0
  # (TRL's center_rewards_coefficient; its docs suggest 1e-2).
  rm.center_coef = 0.0

  # task 'grpo' (pathways_jax/tasks/grpo.py, docs/rl.md): RL with rollouts over data.corpus='prompts'
  # (data.path: a JSONL of prompts; data.seq_len: the prompt budget; data.batch_size: prompts per
  # rollout). GRPO by default; DAPO, Dr.GRPO and RLOO are settings of this section.
  c.rl = r = ml_collections.ConfigDict()
  r.num_generations = 8  # G completions per prompt (a group)
  r.max_new_tokens = 32
  r.temperature = 1.0
  r.top_k = 0
  r.top_p = 0.0
  r.min_p = 0.0
  # 'name[:weight],...' from pathways_jax.rl.rewards.REWARDS, summed with their weights.
  r.rewards = 'correct'
  r.reward_model = ''  # the run directory of a task='reward_model' run, for the 'reward_model' reward
  # advantages: 'group' | 'batch' | 'none' (Dr.GRPO) | 'rloo' | 'gae' (PPO: per-token GAE from a
  # value head on the policy's backbone; needs model.scalar_head=True, any G >= 1)
  r.scale = 'group'
  r.gamma = 1.0  # PPO's discount and GAE's lambda
  r.lam = 0.95
  r.vf_coef = 0.1  # PPO: + vf_coef * the value loss (TRL's default)
  r.vf_clip = 0.2  # PPO: values clipped to old +- vf_clip in the value loss (0: unclipped)
  r.whiten = True  # PPO: advantages centred and scaled over the batch's completion tokens
  r.beta = 0.0  # KL to the reference as a loss term (0: no reference is held)
  r.kl = 'k3'  # 'k1' | 'k2' | 'k3'
  # 'loss': beta * KL per token in the loss; 'reward': beta * the completion's summed log-ratio
  # to the reference (k1) is subtracted from its reward, before the advantages.
  r.kl_penalty = 'loss'
  r.eps_low = 0.2
  r.eps_high = 0.2  # DAPO's clip-higher: 0.28
  r.agg = 'token-mean'  # 'token-mean' | 'seq-mean-token-mean' | 'seq-mean-token-sum-norm'
  # 'clip': the clipped surrogate (objectives.rl.policy_loss); 'gspo': the same on one
  # length-normalised ratio per completion (objectives.rl.sequence_policy_loss; GSPO, and ESPO
  # with diffusion_estimator='elbo'); 'wd1': wd1's ratio-free weighted likelihood
  # (objectives.rl.wd1_loss: no old-policy or reference log-probs, so no rl.beta); 'spg': SPG's
  # sandwiched policy gradient for a LLaDA policy (objectives.rl.spg_loss, rl/diffusion.py: the
  # ELBO of completions with a positive advantage raised, an upper bound of the others lowered;
  # its own block-wise masks, no ratio, no reference).
  r.loss = 'clip'
  # SPG (rl.loss='spg'): masked passes per row, the bound of the non-positive completions
  # ('mix': spg_mix * EUBO + (1 - spg_mix) * ELBO, 'eubo' or 'elbo'), the EUBO's beta (>= 1), and
  # the range of the share of the chosen block masked; SPG's defaults.
  r.spg_draws = 2
  r.spg_bound = 'mix'
  r.spg_beta = 1.5
  r.spg_mix = 0.5
  r.spg_t_min = 0.0
  r.spg_t_max = 1.0
  r.entropy_coef = 0.0  # + entropy bonus (the loss subtracts coef * mean token entropy)
  # Optimizer steps per rollout batch, each on 1/minibatches of its rows (> 1: the old policy's
  # log-probs are computed once at rollout time and the ratio leaves 1).
  r.minibatches = 1
  # DAPO's dynamic sampling: groups whose rewards are all equal are dropped and the batch refilled
  # from up to max_rollouts rollouts per step (slots still empty are masked out).
  r.dynamic_sampling = False
  r.max_rollouts = 3
  # DAPO's soft overlong punishment: completions within the last overlong_buffer tokens of
  # max_new_tokens lose up to overlong_penalty, linearly (0: off).
  r.overlong_buffer = 0
  r.overlong_penalty = 1.0
  # RLMT's think, then answer: the rewards (a reward model too) score only the text after the first
  # think_tag, e.g. '</think>'; a completion without it totals think_malformed ('': off).
  r.think_tag = ''
  r.think_malformed = -1.0
  # diffu-GRPO (a model.causal=False policy): the diffusion sampler's steps and block length
  # (0: max_new_tokens, one token per step, one block) and d1's prompt masking probability.
  r.diffusion_steps = 0
  r.block_length = 0
  r.prompt_mask_p = 0.15
  # Fast-dLLM rollouts for a LLaDA policy (sampling/diffusion.py): a KV cache ('' none, 'prefix'
  # or 'dual', refreshed at each block start; needs block_length < max_new_tokens to pay) and
  # parallel decoding of every masked token whose confidence exceeds diffusion_threshold (0: off,
  # the step schedule). Both approximate the plain sampler; the estimator scores what was drawn.
  r.diffusion_cache = ''
  r.diffusion_threshold = 0.0
  # The log-prob estimator (rl/diffusion.py): 'd1' (one pass, the completion fully masked) or
  # 'coupled' (DiffuCoder's coupled-GRPO: d1's pass plus two complementary masks of the
  # completion at a ratio t ~ U[coupled_t_min, coupled_t_max] per row; three passes) or 'elbo'
  # (ESPO's sequence ELBO: the complementary pair alone, mask counts stratified over the rows) or
  # 'trace' (TraceRL: each token read from the state the sampler committed it in, the row's
  # decoding steps grouped trace_shrink at a time; ceil(min(max_new_tokens, steps) / shrink)
  # passes; TraceRL's LLaDA setting is 8).
  r.diffusion_estimator = 'd1'
  r.trace_shrink = 8
  r.coupled_t_min = 0.2
  r.coupled_t_max = 0.8
  # Reflect, Retry, Reward (pathways_jax/rl/reflect.py): G reflections after a failed greedy first
  # attempt, each rewarded 1 if the greedy retry after it succeeds (total reward >= success_at).
  r.reflect = False
  r.reflect_instruction = 'That answer is wrong. In one or two sentences, say what went wrong.'
  r.retry_instruction = 'Now answer the question again.'
  r.success_at = 1.0
  r.reference = ''  # '' = train.init_from (a LoRA policy: its own base, adapters off)
  # ProRL: every reset_every steps the policy becomes the reference and the optimizer state
  # starts afresh (needs beta > 0 and a full-parameter policy; 0: never).
  r.reset_every = 0
  # ProRL on stall: a reset at the first rollout boundary after reset_on_stall held-out evaluations
  # (data.validation_path, every train.eval_every) of the first non-random reward brought no new
  # best since the best or the last reset (0: never). Combines with reset_every.
  r.reset_on_stall = 0
  r.eval_batch = 64  # held-out prompts (data.validation_path) decoded per greedy batch
  r.eval_max = 0  # > 0: only the first N held-out prompts
