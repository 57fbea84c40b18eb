"""The host side of task 'grpo' (tasks/grpo.py): from prompts to the rows an RL step trains on.

`RolloutBatches` is a mixin of the task: it reads the task's samplers, rewards, prompts and
reference (`self._sampler`, `self.reward_specs`, `self._records`, `self._forward_logps`, ...)
and builds one rollout batch: sampling (or RRR's attempt / reflect / retry round), rewards,
overlong shaping, dynamic sampling's refills, then group advantages, or PPO's GAE targets, and
the old log-probs. tasks/grpo.py's docstring gives the whole procedure.
"""
from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax.objectives import rl
from pathways_jax.rl import batch as batch_lib
from pathways_jax.rl import diffusion as diffusion_lib
from pathways_jax.rl import prompts as prompts_lib
from pathways_jax.rl import reflect as reflect_lib
from pathways_jax.rl import rewards as rewards_lib

_LOG = logging.getLogger('pathways_jax.tasks.grpo')
_ROLLOUT_STREAM = 0x726F6C6C  # 'roll': rollout keys, apart from the step's own draws
TRAIN_FIELDS = ('tokens', 'segment_ids', 'positions', 'completion_mask')
WD1_WEIGHT = 'wd1_weight'  # float32 [N], rl.loss='wd1' only: objectives.rl.wd1_weights per row


class RolloutBatches:
  """Rollout batches for the grpo task (module docstring)."""

  def _rollout(self, train_iter, index: int, params, aux):
    r, B, G = self.cfg.rl, self.cfg.data.batch_size, self.cfg.rl.num_generations
    tok = self._run.tokenizer
    t0 = time.perf_counter()
    t_sample = t_reward = 0.0
    kept, dropped = [], []  # groups: dicts of [G, ...] arrays
    all_rewards, all_lengths, all_finished, values_by_name = [], [], [], {}
    fails: dict[str, list] = {}
    kl_rewards = []
    # Dynamic sampling and RRR (whose prompts answered right at once teach nothing) refill.
    attempts = r.max_rollouts if r.dynamic_sampling or r.reflect else 1
    reflect_stats = []
    made = 0
    for attempt in range(attempts):
      prompts = next(train_iter)
      if index == 0 and attempt == 0:
        self.check_batch(prompts)
      key = jax.random.fold_in(jax.random.fold_in(
          jax.random.fold_in(jax.random.key(self.cfg.seed), _ROLLOUT_STREAM), index), attempt)
      ts = time.perf_counter()
      rng = np.random.default_rng([self.cfg.seed, index, attempt])
      skip = np.zeros(B, bool)  # groups that teach nothing (RRR: right at the first attempt)
      if r.reflect:
        ro, prompt_mask, rewards, values, failures, skip, stats = self._reflect_round(
            params, prompts, key, rng)
        reflect_stats.append(stats)
        prompt_mask = np.asarray(prompt_mask)
      else:
        ro = self._sampler(params, prompts['tokens'], prompts['segment_ids'], key=key)
        prompt_mask = np.repeat(prompts['segment_ids'], G, axis=0)
      tokens, cmask = np.asarray(ro.tokens_BT), np.asarray(ro.completion_mask_BN)
      t_sample += time.perf_counter() - ts
      made += 1
      tr = time.perf_counter()
      P = prompts['tokens'].shape[1]
      texts, lengths, finished = batch_lib.completion_texts(tokens[:, P:], cmask, tok)
      if not r.reflect:
        ids = [int(e) for e in np.repeat(prompts[prompts_lib.EXAMPLE_ID], G)]
        rewards, values, failures = rewards_lib.score(
            self.reward_specs, [self._records[e] for e in ids], texts, rng=rng,
            prompts=[self._messages[e] for e in ids], reward_model=self._rm,
            think_tag=r.think_tag, think_malformed=r.think_malformed)
      if r.overlong_buffer:
        rewards = rewards + r.overlong_penalty * rewards_lib.overlong_penalty(
            lengths, max_new_tokens=r.max_new_tokens, buffer=r.overlong_buffer)
      rows = batch_lib.training_rows(prompt_mask, tokens, cmask)
      if self.diffusion:
        rows.update(self._diffusion_rows(rows, prompt_mask, cmask, index, attempt,
                                         commit_step=getattr(ro, 'commit_step_BN', None)))
      kl_NT = None
      if self.kl_in_reward:  # the KL estimate (k1, summed over the sequence) is a reward penalty
        ref = self._forward_logps(rows, *self._reference(params, aux))
        kl_NT = np.zeros(tokens.shape, np.float32)
        kl_NT[:, P:] = (np.asarray(ro.logprobs_BN) - ref[:, P:]) * cmask
        kl_N = kl_NT.sum(axis=1)
        if not self.ppo:  # PPO charges each token's share on that token (batch.token_rewards)
          rewards = rewards - r.beta * kl_N
        kl_rewards.append(kl_N)
      t_reward += time.perf_counter() - tr
      for name, (n, first) in failures.items():
        fails.setdefault(name, [0, first])[0] += n
      all_rewards.append(rewards)
      all_lengths.append(lengths)
      all_finished.append(finished)
      for name, v in values.items():
        values_by_name.setdefault(name, []).append(v)
      flat = lambda x: x.reshape((B, G) + x.shape[1:])
      zero = batch_lib.zero_variance(rewards.reshape(B, G))
      for b in range(B):
        group = {name: flat(v)[b] for name, v in rows.items()}
        group['rewards'] = rewards.reshape(B, G)[b]
        if kl_NT is not None:
          group['kl'] = flat(kl_NT)[b]
        (dropped if (r.dynamic_sampling and zero[b]) or skip[b] else kept).append(group)
      if len(kept) >= B:
        break
    for name, (n, first) in fails.items():
      _LOG.warning('reward %r failed on %d completions at rollout %d (scored 0): %s', name, n,
                   index, first)
    kept, slots_masked = kept[:B], max(0, B - len(kept))
    groups = kept + dropped[:slots_masked]
    stack = lambda name: np.concatenate([g[name] for g in groups])
    rows = {name: stack(name) for name in TRAIN_FIELDS + tuple(self.estimator_fields)}
    rewards_PG = np.stack([g['rewards'] for g in groups])
    live = np.repeat(np.arange(B) < len(kept), G)
    rows['completion_mask'] = rows['completion_mask'] * live[:, None].astype(np.int32)
    ppo_metrics = {}
    if self.ppo:
      old_logp, ppo_metrics = self._ppo_targets(
          rows, rewards_PG.reshape(-1), stack('kl') if self.kl_in_reward else None, params)
    else:
      adv_PG = rl.group_advantages(jnp.asarray(rewards_PG), scale=r.scale)
      adv = np.asarray(adv_PG).reshape(-1)
      rows['advantages'] = np.where(live, adv, 0.0).astype(np.float32)
      if self.wd1:  # each group's weights from its whole group, before minibatches split rows
        weights = np.asarray(rl.wd1_weights(adv_PG)).reshape(-1)
        rows[WD1_WEIGHT] = np.where(live, weights, 0.0).astype(np.float32)
      old_logp = None if self.on_policy else self._forward_logps(rows, self.model, params)
    rows['old_logp'] = (np.zeros(rows['tokens'].shape, np.float32) if self.on_policy
                        else old_logp)
    rewards_all, lengths_all = np.concatenate(all_rewards), np.concatenate(all_lengths)
    first = all_rewards[0].reshape(B, G)
    metrics = {'reward': float(rewards_all.mean()), 'reward_std': float(rewards_all.std()),
               'completion_length': float(lengths_all.mean()),
               'finished': float(np.concatenate(all_finished).mean()),
               'zero_std_groups': float(batch_lib.zero_variance(first).mean()),
               'rollouts': float(made), 'masked_groups': float(slots_masked),
               'reward_failures': float(sum(n for n, _ in fails.values())),
               'time_rollout_s': t_sample, 'time_reward_s': t_reward,
               'time_batch_s': time.perf_counter() - t0, **ppo_metrics}
    for name, vals in values_by_name.items():
      metrics[f'reward/{name}'] = float(np.concatenate(vals).mean())
    if reflect_stats:
      for key in reflect_stats[0]:
        metrics[key] = float(np.mean([s[key] for s in reflect_stats]))
    if kl_rewards:
      metrics['kl_sequence'] = float(np.concatenate(kl_rewards).mean())
    return rows, metrics

  def _reflect_round(self, params, prompts, key, rng):
    """Reflect, Retry, Reward on one batch of prompts (rl/reflect.py): (the reflections as a
    rollout, their prompts' mask [B*G, P], rewards [B*G] = retry success, the retries' reward
    values, failures, skip [B]: groups with nothing to learn, stats)."""
    r, G, tok, P = self.cfg.rl, self.cfg.rl.num_generations, self._run.tokenizer, self.cfg.data.seq_len
    ids = [int(e) for e in prompts[prompts_lib.EXAMPLE_ID]]
    B = len(ids)
    greedy = lambda batch: self._greedy_sampler(batch)
    k_attempt, k_reflect, k_retry = jax.random.split(key, 3)
    score = lambda recs, texts, msgs: rewards_lib.score(
        self.reward_specs, recs, texts, rng=rng, prompts=msgs, reward_model=self._rm,
        think_tag=r.think_tag, think_malformed=r.think_malformed)
    texts_of = lambda ro: batch_lib.completion_texts(np.asarray(ro.tokens_BT)[:, P:],
                                                     np.asarray(ro.completion_mask_BN), tok)[0]
    messages = [self._messages[e] for e in ids]
    records = [self._records[e] for e in ids]
    first = texts_of(greedy(B)(params, prompts['tokens'], prompts['segment_ids'],
                               key=k_attempt))
    first_score, _, _ = score(records, first, messages)
    failed = first_score < r.success_at
    asks, ask_tokens, ask_mask, ask_fits = reflect_lib.reflection_prompts(
        tok, messages, first, r.reflect_instruction, P, prompts['tokens'], prompts['segment_ids'])
    ro = self._sampler(params, ask_tokens, ask_mask, key=k_reflect)
    retry_tokens, retry_mask, retry_fits = reflect_lib.retry_prompts(
        tok, asks, texts_of(ro), r.retry_instruction, P, ask_tokens, ask_mask)
    second = texts_of(greedy(B * G)(params, retry_tokens, retry_mask, key=k_retry))
    rep = lambda xs: [x for x in xs for _ in range(G)]
    retry_score, values, failures = score(rep(records), second, rep(messages))
    success = (retry_score >= r.success_at) & retry_fits
    tried = np.repeat(failed & ask_fits, G)
    stats = {'first_attempt_success': float((~failed).mean()),
             'retry_success': float(success[tried].mean()) if tried.any() else 0.0,
             'reflect_too_long': float((failed & ~ask_fits).sum()),
             'retry_too_long': float((tried & ~retry_fits).sum())}
    return (ro, np.repeat(ask_mask, G, axis=0), success.astype(np.float32), values, failures,
            ~(failed & ask_fits), stats)

  def _diffusion_rows(self, rows, prompt_mask, cmask, index, attempt, commit_step=None):
    """diffu-GRPO's row fields: every generated position in the sequence (the sampler decoded
    them all) and the estimator's masked input, drawn from (seed, rollout, attempt); TraceRL's
    groups from `commit_step` [N, C], the step the sampler committed each position at."""
    from pathways_jax.tasks.pretrain import mask_id  # pylint: disable=g-import-not-at-top
    segment_ids = np.concatenate([prompt_mask.astype(np.int32),
                                  np.ones(cmask.shape, np.int32)], axis=1)
    rng = np.random.default_rng([self.cfg.seed, 0x6431, index, attempt])  # 'd1'
    out = {'segment_ids': segment_ids,
           'positions': np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)}
    if self.trace:  # TraceRL: the groups of the steps the sampler committed each token at
      groups = diffusion_lib.trace_groups(commit_step, self.cfg.rl.trace_shrink)
      if groups.max(initial=0) >= self.trace_passes:  # a sampler taking more steps than counted
        raise RuntimeError(f'TraceRL: a rollout has {groups.max() + 1} step groups, more than the '
                           f'{self.trace_passes} passes the step was built for')
      out['trace_group'] = np.concatenate(
          [np.full(prompt_mask.shape, -1, np.int32), groups], axis=1)
      return out
    if self.spg:  # SPG: its block-wise masks alone
      r = self.cfg.rl
      out['spg_mask'] = diffusion_lib.spg_masks(
          prompt_mask.shape[1], cmask, prompt_mask, draws=r.spg_draws, block_length=r.block_length,
          t_min=r.spg_t_min, t_max=r.spg_t_max, p=r.prompt_mask_p, rng=rng)
      return out
    if self.elbo:  # ESPO: the complementary pair only
      out['coupled_mask'], out['coupled_weight'] = diffusion_lib.elbo_masks(
          prompt_mask.shape[1], rows['tokens'].shape, rng=rng)
      return out
    out['masked_tokens'] = diffusion_lib.masked_inputs(
        rows['tokens'], prompt_mask, mask_id=mask_id(self.cfg), p=self.cfg.rl.prompt_mask_p,
        rng=rng)
    if self.coupled:  # drawn after d1's mask: a d1 run's masks are unchanged
      r = self.cfg.rl
      out['coupled_mask'], out['coupled_weight'] = diffusion_lib.coupled_masks(
          prompt_mask.shape[1], rows['tokens'].shape, t_min=r.coupled_t_min,
          t_max=r.coupled_t_max, rng=rng)
    return out

  def _ppo_targets(self, rows, scores_N, kl_NT, params):
    """Fills rows' advantages [N, T] (GAE, whitened with rl.whiten), old_values and returns from
    one forward pass of the policy; (its log-probs [N, T], metrics)."""
    r, mask = self.cfg.rl, rows['completion_mask']
    logp, values = self._forward_logps(rows, self.model, params, values=True)
    values = np.where(mask > 0, values, 0.0).astype(np.float32)
    per_token = batch_lib.token_rewards(scores_N, mask, kl_NT, r.beta)
    adv, returns = (np.asarray(x) for x in rl.gae(per_token, values, mask, gamma=r.gamma,
                                                  lam=r.lam))
    rows['advantages'] = batch_lib.whiten(adv, mask) if r.whiten else adv.astype(np.float32)
    rows['old_values'], rows['returns'] = values, returns.astype(np.float32)
    valid = mask > 0
    explained = (1.0 - np.var(returns[valid] - values[valid]) / max(np.var(returns[valid]), 1e-8)
                 if valid.any() else 0.0)
    return logp, {'return_mean': float(returns[valid].mean()) if valid.any() else 0.0,
                  'value_explained_var': float(explained)}
