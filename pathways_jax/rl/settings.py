"""The checks of the settings task 'grpo' reads (config.rl, and the data, model and train keys it
depends on), run when the task is made, before anything is loaded; each error names its key."""
from __future__ import annotations

from pathways_jax.config import ConfigError
from pathways_jax.rl import rewards as rewards_lib


def watched_score(reward_specs) -> str | None:
  """The held-out metric rl.reset_on_stall watches: 'val_' + the first reward that is not
  'random' (None when there is none)."""
  watched = [name for name, _ in reward_specs if name != 'random']
  return f'val_{watched[0]}' if watched else None


def _in_range(r, checks) -> None:
  for key, ok, want in checks:
    if not ok:
      raise ConfigError(f'config.rl.{key}={r[key]} must be {want}')


def check(cfg, model_cfg) -> None:
  r, d = cfg.rl, cfg.data
  if d.corpus != 'prompts':
    raise ConfigError(f"task 'grpo' rolls out from prompts: set config.data.corpus='prompts' "
                      f'(it is {d.corpus!r})')
  if model_cfg.lora_num_adapters > 1:
    raise ConfigError("task 'grpo' takes a full, LoRA or QLoRA policy; multi-LoRA policies are "
                      'not supported yet')
  if r.num_generations < 1 or r.max_new_tokens < 1 or r.temperature < 0:
    raise ConfigError(f'config.rl: need num_generations >= 1, max_new_tokens >= 1 and '
                      f'temperature >= 0, got {r.num_generations}, {r.max_new_tokens}, '
                      f'{r.temperature}')
  if r.num_generations == 1 and r.scale in ('group', 'rloo'):
    raise ConfigError(f"config.rl.scale={r.scale!r} needs num_generations >= 2 (one sample per "
                      "prompt has no group to compare with); use scale='batch' or 'none'")
  if d.seq_len + r.max_new_tokens > model_cfg.max_len:
    raise ConfigError(f'data.seq_len ({d.seq_len}, the prompt budget) + rl.max_new_tokens '
                      f'({r.max_new_tokens}) exceeds model.max_len={model_cfg.max_len}')
  rows, k = d.batch_size * r.num_generations, r.minibatches
  if k < 1 or rows % k or (rows // k) % cfg.train.grad_accum:
    raise ConfigError(f'config.rl.minibatches={k} must divide the {rows} rows of a rollout '
                      f'(data.batch_size x rl.num_generations) into parts that '
                      f'train.grad_accum={cfg.train.grad_accum} divides')
  for key in ('checkpoint_every', 'steps', 'stop_at'):
    if cfg.train.get(key) and cfg.train[key] % k:
      raise ConfigError(f'config.train.{key}={cfg.train[key]} is not a multiple of '
                        f'rl.minibatches={k}: checkpoints fall on rollout boundaries')
  if r.dynamic_sampling and r.max_rollouts < 1:
    raise ConfigError(f'config.rl.max_rollouts must be >= 1, got {r.max_rollouts}')
  if r.overlong_buffer < 0 or r.overlong_buffer > r.max_new_tokens:
    raise ConfigError(f'config.rl.overlong_buffer={r.overlong_buffer} must be in [0, '
                      f'rl.max_new_tokens={r.max_new_tokens}]')
  if r.eps_low < 0 or r.eps_low >= 1 or r.eps_high < 0 or r.beta < 0:
    raise ConfigError(f'config.rl: need 0 <= eps_low < 1, eps_high >= 0, beta >= 0; got '
                      f'{r.eps_low}, {r.eps_high}, {r.beta}')
  _in_range(r, (('top_p', 0 <= r.top_p <= 1, 'in [0, 1]'),
                ('min_p', 0 <= r.min_p <= 1, 'in [0, 1]'),
                ('top_k', r.top_k >= 0, '>= 0'),
                ('eval_batch', r.eval_batch >= 1, '>= 1'),
                ('eval_max', r.eval_max >= 0, '>= 0'),
                ('overlong_penalty', r.overlong_penalty >= 0, '>= 0')))
  if r.kl_penalty not in ('loss', 'reward'):
    raise ConfigError(f"config.rl.kl_penalty={r.kl_penalty!r} is not 'loss' or 'reward'")
  ppo = r.scale == 'gae'
  if r.loss == 'gspo' and ppo:
    raise ConfigError("config.rl.loss='gspo' takes one advantage per completion: it takes no "
                      "rl.scale='gae' (PPO's per-token advantages)")
  if r.loss == 'wd1' and (ppo or r.beta > 0):
    raise ConfigError("config.rl.loss='wd1' weighs whole completions by their group's "
                      "advantages and holds no reference: it takes no rl.scale='gae' (PPO) and "
                      f'no rl.beta > 0 (got scale={r.scale!r}, beta={r.beta})')
  if r.loss == 'spg':
    if model_cfg.causal:
      raise ConfigError("config.rl.loss='spg' bounds a masked-diffusion policy's likelihood: it "
                        'needs a LLaDA policy (model.causal=False); an AR policy has exact '
                        "log-probs (use rl.loss='clip')")
    if r.beta > 0 or r.diffusion_estimator != 'd1':
      raise ConfigError("config.rl.loss='spg' draws its own block-wise masks and holds no "
                        f'reference: it takes no rl.beta > 0 and leaves rl.diffusion_estimator '
                        f"at 'd1' (got beta={r.beta}, diffusion_estimator="
                        f'{r.diffusion_estimator!r})')
    _in_range(r, (('spg_draws', 1 <= r.spg_draws <= 30, 'in [1, 30]'),
                  ('spg_beta', r.spg_beta >= 1, '>= 1 (the EUBO bounds from above for beta >= 1)'),
                  ('spg_mix', 0 <= r.spg_mix <= 1, 'in [0, 1]'),
                  ('spg_t_max', 0 <= r.spg_t_min <= r.spg_t_max <= 1,
                   'in [spg_t_min, 1] with 0 <= spg_t_min')))
  if not model_cfg.causal:  # diffu-GRPO
    if ppo or r.kl_penalty == 'reward':
      raise ConfigError("diffu-GRPO (a model.causal=False policy) takes no rl.scale='gae' (PPO) "
                        "and no rl.kl_penalty='reward' (the sampler gives no log-probs)")
    if not 0 <= r.prompt_mask_p < 1 or r.diffusion_steps < 0 or r.block_length < 0:
      raise ConfigError(f'config.rl: need 0 <= prompt_mask_p < 1, diffusion_steps >= 0 and '
                        f'block_length >= 0; got {r.prompt_mask_p}, {r.diffusion_steps}, '
                        f'{r.block_length}')
    if r.diffusion_cache not in ('', 'prefix', 'dual') or not 0 <= r.diffusion_threshold < 1:
      raise ConfigError(f"config.rl: need diffusion_cache in ('', 'prefix', 'dual') and 0 <= "
                        f'diffusion_threshold < 1 (0: off); got {r.diffusion_cache!r}, '
                        f'{r.diffusion_threshold}')
    if r.diffusion_estimator not in ('d1', 'coupled', 'elbo', 'trace'):
      hint = {'wd1': " (wd1 is a loss on any estimator: rl.loss='wd1')",
              'espo': " (ESPO is rl.diffusion_estimator='elbo' with rl.loss='gspo')"}.get(
                  r.diffusion_estimator, '')
      raise ConfigError(f"config.rl.diffusion_estimator={r.diffusion_estimator!r} is not 'd1', "
                        f"'coupled', 'elbo' or 'trace'{hint}")
    if r.trace_shrink < 1:
      raise ConfigError(f'config.rl.trace_shrink={r.trace_shrink} must be >= 1 (decoding steps '
                        'per TraceRL pass)')
    if not 0 < r.coupled_t_min <= r.coupled_t_max < 1:
      raise ConfigError(f'config.rl: need 0 < coupled_t_min <= coupled_t_max < 1; got '
                        f'{r.coupled_t_min}, {r.coupled_t_max}')
  elif r.diffusion_cache or r.diffusion_threshold:
    raise ConfigError('config.rl.diffusion_cache / diffusion_threshold apply to LLaDA policies '
                      '(model.causal=False): the KV-cache sampler of an AR policy is exact')
  elif r.diffusion_estimator != 'd1':
    raise ConfigError(f'config.rl.diffusion_estimator={r.diffusion_estimator!r} applies to '
                      'LLaDA policies (model.causal=False); an AR policy has exact log-probs')
  if ppo:
    if not model_cfg.scalar_head:
      raise ConfigError("config.rl.scale='gae' (PPO) reads values off the policy's value head: "
                        'set config.model.scalar_head=True (a fresh head is added to a start '
                        'model that has none)')
    _in_range(r, (('gamma', 0 <= r.gamma <= 1, 'in [0, 1]'), ('lam', 0 <= r.lam <= 1, 'in [0, 1]'),
                  ('vf_coef', r.vf_coef >= 0, '>= 0'), ('vf_clip', r.vf_clip >= 0, '>= 0')))
  specs = rewards_lib.parse(r.rewards)
  if r.reflect and not (r.reflect_instruction.strip() and r.retry_instruction.strip()):
    raise ConfigError('config.rl.reflect needs rl.reflect_instruction and rl.retry_instruction '
                      '(the user turns that ask for a reflection and for a retry)')
  if r.beta > 0 and not (r.reference or cfg.train.init_from):
    raise ConfigError('config.rl.beta > 0 needs a reference: set config.train.init_from (the '
                      'model the policy starts from) or config.rl.reference')
  if r.reset_every and (r.reset_every < 0 or r.reset_every % k):
    raise ConfigError(f'config.rl.reset_every={r.reset_every} must be a positive multiple of '
                      f'rl.minibatches={k}')
  if r.reset_on_stall < 0:
    raise ConfigError(f'config.rl.reset_on_stall={r.reset_on_stall} must be >= 0')
  if r.reset_on_stall and not d.get('validation_path'):
    raise ConfigError('config.rl.reset_on_stall watches the held-out score: set '
                      'config.data.validation_path (held-out prompts)')
  if r.reset_on_stall and watched_score(specs) is None:
    raise ConfigError("config.rl.reset_on_stall watches the held-out score of the first reward "
                      "that is not 'random'; rl.rewards names none")
  if (r.reset_every or r.reset_on_stall) and (
      r.beta <= 0 or model_cfg.lora_rank or cfg.train.get('trainable')):
    raise ConfigError('config.rl.reset_every / reset_on_stall (ProRL reference resets) need '
                      'rl.beta > 0 and a full-parameter policy (no LoRA, no train.trainable)')
