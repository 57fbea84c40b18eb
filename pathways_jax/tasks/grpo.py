"""Reinforcement learning with rollouts inside the training loop ('grpo'): GRPO, DAPO, Dr.GRPO,
RLOO and PPO as settings of one task, for AR models and (diffu-GRPO) LLaDA models.

    config.task = 'grpo'
    config.data.corpus = 'prompts'        # rl/prompts.py: one prompt per JSONL line
    config.data.path = 'train.jsonl'      # data.validation_path: held-out prompts (greedy eval)
    config.data.seq_len = 64              # the prompt budget (left-padded)
    config.data.batch_size = 8            # prompts per rollout; the step trains on B * G rows
    config.train.init_from = 'runs/sft'   # the policy starts here (its reference too)
    config.rl.rewards = 'correct:1,format:0.2'

Every rollout (steps 0, k, 2k, ... with k = rl.minibatches):
  1. the next B prompts from the data iterator (its position is in every checkpoint);
  2. G completions each from the current policy (`sampling.rollout`: KV-cache decoding on the
     run's mesh, temperature / top-k / top-p / min-p, stopping at EOS), keyed by the rollout's
     index, so a resumed run draws what an uninterrupted one would;
  3. rewards on the host (rl/rewards.py: weighted verifiable functions; a failing one scores 0
     and is counted), DAPO's overlong shaping, group advantages (`objectives.rl`);
  4. DAPO's dynamic sampling (optional): groups with all-equal rewards are dropped and more
     prompts are rolled out, up to rl.max_rollouts per step; slots still empty are masked out;
  5. with k > 1, the old policy's log-probs once, by a forward pass; the batch is then k
     optimizer steps of N/k rows each.
PPO (rl.scale='gae', model.scalar_head=True): the policy carries a value head on its own
backbone. Step 3's score goes on each completion's last token (the KL penalty, with
rl.kl_penalty='reward', on every token), the value head's estimates at rollout time give GAE's
per-token advantages (whitened over the batch) and returns, and the loss adds
rl.vf_coef * the clipped value loss (`objectives.rl.value_loss`).
diffu-GRPO (a bidirectional model, model.causal=False; rl/diffusion.py): rollouts from the
masked-diffusion sampler (rl.diffusion_steps, rl.block_length) and d1's one-step log-prob
estimate, on an input with the completion masked and the prompt masked at rl.prompt_mask_p, one
mask per rollout shared by policy, old policy and reference; with
rl.diffusion_estimator='coupled', DiffuCoder's coupled estimate (two more passes with
complementary masks of the completion); with 'elbo', ESPO's sequence ELBO (that complementary
pair alone); with 'trace', TraceRL's passes over the decoding trajectory (each token read from
the state the sampler committed it in). rl.loss='spg': SPG's sandwiched policy gradient (its
own block-wise masks, rl.spg_draws passes; the ELBO of completions with a positive advantage
raised, an upper bound of the others lowered; no ratio, no reference; objectives.rl.spg_loss).
Reflect, Retry, Reward (rl.reflect; rl/reflect.py): the group is G reflections on a failed greedy
first attempt, each rewarded by whether the greedy retry after it succeeds; only the reflections
are trained.
The loss (`objectives.rl.policy_loss`) is the clipped surrogate on log softmax(logits / T) of
the sampled tokens, plus beta * KL to the reference (a frozen model, or for a LoRA policy its own
base with the adapters off) and minus an entropy bonus. rl.loss='gspo' clips one
length-normalised ratio per completion instead (`objectives.rl.sequence_policy_loss`: GSPO, and
with the 'elbo' estimator ESPO); rl.loss='wd1' trains on wd1's weighted likelihood
(`objectives.rl.wd1_loss`: whole completions weighted within their group, no ratio, so no
old-policy pass and no reference). Checkpoints fall only on rollout
boundaries (a SIGTERM mid-batch saves at the batch's end).

Validation: the held-out prompts (data.validation_path) answered greedily every
train.eval_every steps and at the end, scored by every reward but 'random' (`val_<reward>`);
with rl.reflect also RRR's second try (a greedy reflection and retry after each failed first
attempt: `val_first_attempt`, `val_second_attempt`, `val_retry_success`).
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax import parallel
from pathways_jax.config import ConfigError
from pathways_jax.objectives import autoregressive, rl, token_losses
from pathways_jax.rl import batch as batch_lib
from pathways_jax.rl import diffusion as diffusion_lib
from pathways_jax.rl import prompts as prompts_lib
from pathways_jax.rl import reflect as reflect_lib
from pathways_jax.rl import rewards as rewards_lib
from pathways_jax.rl import settings
from pathways_jax.rl.rollouts import TRAIN_FIELDS, WD1_WEIGHT, RolloutBatches
from pathways_jax.tasks.lm_head import outputs as lm_head_outputs
from pathways_jax.tasks.base import COUNT, FrozenInputs, RunContext, Task
from pathways_jax.tasks.reference import ReferenceMixin, base_params
from pathways_jax.tasks.registry import register

PPO_FIELDS = ('old_values', 'returns')  # float32 [N, T] each, rl.scale='gae' only
RESETS = 'reference_resets'  # WORKDIR/reference_resets/<step>: the reference after a ProRL reset
# WORKDIR/prorl_validation.json: [[step, value], ...] of the held-out score that rl.reset_on_stall
# watches, so that a resumed run sees the history the uninterrupted one saw.
STALL_HISTORY = 'prorl_validation.json'


def inputs_shardings(aux_args: tuple):
  """The shardings of the step's `aux` (the frozen reference's params)."""
  return jax.tree_util.tree_map(lambda x: x.sharding, aux_args[0]['aux'])


@register('grpo')
class GrpoTask(RolloutBatches, ReferenceMixin, Task):
  """GRPO / DAPO / Dr.GRPO / RLOO on prompts with verifiable rewards (module docstring)."""
  makes_batches = True

  def __init__(self, cfg, model):
    super().__init__(cfg, model)
    settings.check(cfg, model.cfg)  # every setting this task reads, named when wrong
    r = cfg.rl
    # A bidirectional (LLaDA) model: diffu-GRPO (module docstring).
    self.diffusion = not model.cfg.causal
    # The batch fields the diffusion estimator reads (rl/diffusion.py), drawn at rollout time.
    # ESPO's ELBO (rl/diffusion.py): the coupled passes without d1's.
    self.elbo = self.diffusion and r.diffusion_estimator == 'elbo'
    # SPG (rl.loss='spg'): its own block-wise masks, one bit per draw (rl/diffusion.py).
    self.spg = self.diffusion and r.loss == 'spg'
    # TraceRL: the decoding trajectory's groups, one pass each (rl/diffusion.py).
    self.trace = self.diffusion and r.diffusion_estimator == 'trace'
    if self.trace:
      steps = r.max_new_tokens if r.diffusion_threshold else r.diffusion_steps or r.max_new_tokens
      self.trace_passes = diffusion_lib.num_trace_passes(r.max_new_tokens, steps, r.trace_shrink)
    self.estimator_fields = ({'spg_mask': jnp.int32} if self.spg else
                             {'trace_group': jnp.int32} if self.trace else
                             {'masked_tokens': jnp.int32} if self.diffusion and not self.elbo
                             else {})
    self.coupled = self.diffusion and r.diffusion_estimator in ('coupled', 'elbo')
    if self.coupled:
      self.estimator_fields.update(coupled_mask=jnp.int32, coupled_weight=jnp.float32)
    self.ppo = r.scale == 'gae'
    self.rows = cfg.data.batch_size * r.num_generations
    self.reward_specs = rewards_lib.parse(r.rewards)
    self.needs_ref = r.beta > 0
    self.source, self.ref_key = r.reference or cfg.train.init_from, 'rl.reference'
    self.adapters_off = self.needs_ref and self.is_adapters_off()
    self.kl_in_reward = self.needs_ref and r.kl_penalty == 'reward'
    self.wd1 = r.loss == 'wd1'  # ratio-free: no old-policy log-probs (objectives.rl.wd1_loss)
    # One update per rollout: old = current, ratio exactly 1 (wd1 never reads a ratio).
    self.on_policy = r.minibatches == 1 or self.wd1 or self.spg  # SPG reads no ratio either
    self.ref_model = None
    self._run = self._sampler = self._buffer = None
    self._records = self._messages = self._eval = self._rm = None
    # ProRL on stall: the watched held-out score ('val_' + the first reward that is not
    # 'random'), its history [(step, value)] and the step of the newest reset.
    self.stall_key = settings.watched_score(self.reward_specs)
    self._history: list[tuple[int, float]] = []
    self._last_reset = 0

  def describe(self) -> str:
    r = self.cfg.rl
    ref = ('none' if not self.needs_ref else 'adapters off' if self.adapters_off
           else self.source)
    ppo = (f', PPO value head: gamma={r.gamma}, lam={r.lam}, vf_coef={r.vf_coef}'
           if self.ppo else '')
    loss = r.loss if r.loss != 'clip' else f'agg={r.agg}'
    if self.spg:
      loss = (f'spg(bound={r.spg_bound}, draws={r.spg_draws}, beta={r.spg_beta}'
              f'{f", mix={r.spg_mix}" if r.spg_bound == "mix" else ""})')
    return (f'grpo(G={r.num_generations}, scale={r.scale}, {loss}, rewards={r.rewards}, '
            f'beta={r.beta}, reference={ref}{ppo})')

  # -- the batch the step trains on -----------------------------------------------------------
  def batch_fields(self):
    ppo = {k: jnp.float32 for k in PPO_FIELDS} if self.ppo else {}
    wd1 = {WD1_WEIGHT: jnp.float32} if self.wd1 else {}
    return {**{k: jnp.int32 for k in TRAIN_FIELDS}, 'advantages': jnp.float32,
            'old_logp': jnp.float32, **ppo, **wd1, **self.estimator_fields}

  def batch_spec(self, batch_size: int, seq_len: int, sharding=None) -> dict:
    """One optimizer step's rows: batch_size prompts x G samples / minibatches."""
    n = batch_size * self.cfg.rl.num_generations // self.cfg.rl.minibatches
    length = seq_len + self.cfg.rl.max_new_tokens
    per_row = {WD1_WEIGHT} | ({'advantages'} if not self.ppo else set())
    return {k: jax.ShapeDtypeStruct((n,) if k in per_row else (n, length), dtype,
                                    sharding=sharding)
            for k, dtype in self.batch_fields().items()}

  def check_batch(self, batch: dict) -> None:
    missing = sorted({'tokens', 'segment_ids', prompts_lib.EXAMPLE_ID} - set(batch))
    if missing:
      raise ConfigError(f"task 'grpo' reads prompt batches with {missing}; the batch has "
                        f"{sorted(batch)} (use data.corpus='prompts')")

  def tokens_per_step(self) -> int:
    """The rows one optimizer step trains on (B x G / minibatches), prompt budget + completion
    slots each; the rollouts' own compute is not counted (their time is time_rollout_s)."""
    r = self.cfg.rl
    return (self.rows // r.minibatches) * (self.cfg.data.seq_len + r.max_new_tokens)

  def can_checkpoint(self, step: int) -> bool:
    return step % self.cfg.rl.minibatches == 0

  # -- frozen inputs and the samplers -------------------------------------------------------
  def setup(self, run: RunContext) -> FrozenInputs:
    if jax.process_count() > 1:
      raise ConfigError("task 'grpo' runs in one process for now (rollouts and rewards are "
                        'scored on one host)')
    self._run = run
    read = prompts_lib.read_prompts(self.cfg.data.path)
    self._records, self._messages = [rec for rec, _ in read], [m for _, m in read]
    self._rm = None
    if any(name == 'reward_model' for name, _ in self.reward_specs):
      if not self.cfg.rl.reward_model:
        raise ConfigError("the 'reward_model' reward needs config.rl.reward_model (the run "
                          "directory of a task='reward_model' run)")
      self._rm = rewards_lib.RewardModelScorer(self.cfg.rl.reward_model,
                                               batch_size=self.cfg.rl.eval_batch)
    rewards_lib.check_records(self.reward_specs, self._records, self.cfg.data.path)
    if self.cfg.rl.reflect and any(prompts_lib.is_raw_text(rec) for rec in self._records):
      raise ConfigError(f'config.rl.reflect: {self.cfg.data.path} holds raw-text prompts; '
                        'reflecting and retrying need chat prompts (prompt or messages)')
    r = self.cfg.rl
    self._sampler = self._make_sampler(self.cfg.data.batch_size, r.num_generations,
                                       r.temperature)
    lines = [f'grpo: {len(self._records)} prompts, G={r.num_generations}, '
             f'{self.rows} rollout rows per {r.minibatches} step(s), rewards {r.rewards}']
    if self._rm is not None:
      same = (getattr(self._rm.tokenizer, 'fingerprint', None)
              == getattr(run.tokenizer, 'fingerprint', None))
      lines.append(f'grpo: reward model {r.reward_model} scores each prompt + completion, '
                   + ('with the policy\'s tokenizer' if same else
                      're-tokenised with its own tokenizer (it differs from the policy\'s)'))
    if self.cfg.data.get('validation_path'):
      self._eval = self._eval_set()
      lines.append(f'grpo: {len(self._eval[0])} held-out prompts answered greedily every '
                   f'{self.cfg.train.eval_every} steps')
    if not self.needs_ref:
      return FrozenInputs(describe=tuple(lines))
    if self.adapters_off:
      return FrozenInputs(describe=(*lines, 'grpo: reference = the policy with its LoRA '
                                    f'adapters off (the base from {self.source})'))
    self.ref_model, params, shardings = self._load_reference(run)
    line = f'grpo: frozen reference {self.source}'
    if self.cfg.rl.reset_every or self.cfg.rl.reset_on_stall:
      params, line = self._reset_reference(run, params, shardings, line)
    return FrozenInputs(aux=params, aux_shardings=shardings, describe=(*lines, line))

  def _reset_reference(self, run, params, shardings, line):
    """(the reference a resumed run had, its describe line): the newest reset saved at or
    before the newest checkpoint (WORKDIR/reference_resets/<step>), else the start model."""
    import os  # pylint: disable=g-import-not-at-top
    from pathways_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    saved = ckpt_lib.saved_steps(run.workdir)
    directory = os.path.join(run.workdir, RESETS)
    resets = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(
        directory) else []
    usable = [r for r in resets if saved and r <= saved[-1]]
    self._last_reset = usable[-1] if usable else 0
    self._history = []
    history_file = os.path.join(run.workdir, STALL_HISTORY)
    if self.cfg.rl.reset_on_stall and saved and os.path.exists(history_file):
      with open(history_file) as f:  # evaluations past the checkpoint will be made again
        self._history = [(int(s), float(v)) for s, v in json.load(f) if int(s) <= saved[-1]]
    if not usable:
      r = self.cfg.rl
      when = ' and '.join(([f'every {r.reset_every} steps'] if r.reset_every else []) + (
          [f'when {self.stall_key} has not improved for {r.reset_on_stall} evaluations']
          if r.reset_on_stall else []))
      return params, line + f'; the policy replaces it {when}'
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    params = ckpt_lib.restore_params(os.path.join(directory, str(usable[-1])), abstract,
                                     shardings)
    return params, f'grpo: reference = the policy at step {usable[-1]} (a ProRL reset)'

  def stalled(self, step: int) -> bool:
    """rl.reset_on_stall evaluations of the watched held-out score have come (at steps < `step`,
    after the newest reset) without beating the best so far."""
    n = self.cfg.rl.reset_on_stall
    seen = [(s, v) for s, v in self._history if s < step]
    if not n or not seen:
      return False
    best_step = max(seen, key=lambda sv: (sv[1], -sv[0]))[0]  # the first time the best was seen
    return sum(s > max(best_step, self._last_reset) for s, _ in seen) >= n

  def after_step(self, step, state, aux_args, *, fresh_opt_state, workdir):
    """ProRL's reset every rl.reset_every steps, or at the first rollout boundary after the
    held-out score stalled (rl.reset_on_stall): the policy becomes the reference (a copy, saved
    in WORKDIR/reference_resets/<step> for resuming) and the optimizer starts afresh."""
    every, k = self.cfg.rl.reset_every, self.cfg.rl.minibatches
    scheduled = bool(every) and step % every == 0
    stall = step % k == 0 and self.stalled(step)
    if not (scheduled or stall):
      return state, aux_args, {}
    import os  # pylint: disable=g-import-not-at-top
    from pathways_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    inputs = dict(aux_args[0])
    # A copy: the step donates the state's buffers, the reference must outlive them.
    inputs['aux'] = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p),
                            out_shardings=inputs_shardings(aux_args))(state.params)
    if jax.process_index() == 0:
      ckpt_lib.save_params(os.path.join(workdir, RESETS, str(step)), inputs['aux'])
    state = state.replace(opt_state=fresh_opt_state(state.params))
    self._last_reset = step
    return state, (inputs,), {'reference_reset': float(step), 'reference_reset_stall': float(stall)}

  def abstract_frozen(self, mesh, rules) -> FrozenInputs:
    if not self.needs_ref or self.adapters_off:
      return FrozenInputs()
    return self._abstract_reference(mesh, rules)

  def _make_sampler(self, batch_size, num_samples, temperature):
    from pathways_jax.sampling.rollout import RolloutSampler  # pylint: disable=g-import-not-at-top
    r, tok = self.cfg.rl, self._run.tokenizer
    if self.diffusion:
      from pathways_jax.tasks.pretrain import mask_id  # pylint: disable=g-import-not-at-top
      return diffusion_lib.DiffusionRollouts(
          self.model, self._run.mesh, self._run.rules, batch_size=batch_size,
          prompt_len=self.cfg.data.seq_len, num_samples=num_samples,
          max_new_tokens=r.max_new_tokens, steps=r.diffusion_steps or r.max_new_tokens,
          block_length=r.block_length or r.max_new_tokens, temperature=temperature,
          mask_id=mask_id(self.cfg), eos_id=tok.eos_id, cache=r.diffusion_cache or None,
          threshold=r.diffusion_threshold or None)
    return RolloutSampler(self.model, self._run.mesh, self._run.rules, batch_size=batch_size,
                          prompt_len=self.cfg.data.seq_len, max_new_tokens=r.max_new_tokens,
                          num_samples=num_samples, temperature=temperature,
                          top_k=r.top_k or None, top_p=r.top_p or None, min_p=r.min_p or None,
                          eos_id=tok.eos_id, pad_id=tok.pad_id)

  def _eval_set(self):
    """(records, tokens [E, P], mask [E, P], messages) of the held-out prompts (rl.eval_max)."""
    fields, _ = prompts_lib.load_rows(self.cfg.data, self._run.tokenizer, 'validation')
    read = prompts_lib.read_prompts(self.cfg.data.validation_path)
    ids = fields[prompts_lib.EXAMPLE_ID]
    if self.cfg.rl.eval_max:
      ids = ids[:self.cfg.rl.eval_max]
    rewards_lib.check_records([s for s in self.reward_specs if s[0] != 'random'],
                              [read[i][0] for i in ids], self.cfg.data.validation_path)
    return ([read[i][0] for i in ids], fields['tokens'][:len(ids)],
            fields['segment_ids'][:len(ids)], [read[i][1] for i in ids])

  # -- rollouts -----------------------------------------------------------------------------
  def make_batch(self, train_iter, *, step: int, params, aux=None) -> tuple[dict, dict]:
    """(the global batch of optimizer step `step`, host metrics to log with it)."""
    k = self.cfg.rl.minibatches
    # The previous update was dispatched asynchronously: wait for it here, so that its time is
    # not counted as the rollout's (it is the wait, plus the loop's own work in between).
    t0 = time.perf_counter()
    jax.block_until_ready(params)
    wait = time.perf_counter() - t0
    if step % k == 0 or self._buffer is None or self._buffer[0] != step // k:
      if step % k:
        raise RuntimeError(f'step {step} is inside a rollout batch that was not made here: '
                           'a run resumes only at rollout boundaries')
      self._buffer = (step // k, *self._rollout(train_iter, step // k, params, aux))
    _, rows, metrics = self._buffer
    part = self.rows // k
    i = step % k
    local = {name: v[i * part:(i + 1) * part] for name, v in rows.items()}
    return parallel.global_batch(local, self._run.mesh), {**metrics, 'time_update_s': wait}

  def _greedy_sampler(self, batch_size: int):
    """One greedy sampler per batch size (RRR's attempts and retries, held-out answers)."""
    cache = self.__dict__.setdefault('_greedy_samplers', {})
    if batch_size not in cache:
      cache[batch_size] = self._make_sampler(batch_size, 1, 0.0)
    return cache[batch_size]

  def _reference(self, params, aux):
    """(model, params) of the reference: the policy's base with adapters off, or the frozen one."""
    if self.adapters_off:
      return self._reference_model(), base_params(params)
    return self.ref_model, aux

  def _forward_logps(self, rows, model, params, values: bool = False):
    """float32 [N, T]: log-probs of every token of the rollout rows under `model` (the old
    policy at rollout time, or the reference), in the step's row blocks so it compiles once.
    values=True: (log-probs, the value head's estimates [N, T]) of the policy (PPO)."""
    fns = self.__dict__.setdefault('_logp_fns', {})
    key = (id(model), values)
    if key not in fns:
      if values:
        fn = lambda p, b: self._logps_and_values(model, p, b)
      else:
        fn = lambda p, b: self._token_logps(model, p, b)
      fns[key] = (model, jax.jit(fn, out_shardings=parallel.replicated(self._run.mesh)))
    fn = fns[key][1]
    part = self.rows // self.cfg.rl.minibatches
    out = []
    for s in range(0, self.rows, part):
      b = {k: rows[k][s:s + part] for k in ('tokens', 'segment_ids', 'positions') + tuple(
          self.estimator_fields)}
      b = parallel.global_batch(b, self._run.mesh)
      got = parallel.run_with_rules(self._run.mesh, self._run.rules, fn, params, b)
      out.append(jax.tree_util.tree_map(np.asarray, got))
    if values:
      return tuple(np.concatenate([o[i] for o in out]).astype(np.float32) for i in range(2))
    return np.concatenate(out).astype(np.float32)

  # -- the loss -------------------------------------------------------------------------------
  def _stats(self, model, params, batch, values: bool = False):
    """(log-probs [N, T], entropies [N, T], values [N, T] or None) of the rows' tokens under
    `model` at the sampling temperature: each token's log-prob and the entropy of the
    distribution it was drawn from (AR: position i-1's prediction, 0 at position 0). On large
    vocabularies (train.cross_entropy) without logits.
    values=True: the value of the state each token was drawn from (the head at the position
    before it; 0 at position 0)."""
    # diffu-GRPO reads the estimator's masked passes; the targets stay batch['tokens'].
    tokens = batch['tokens']
    kw = dict(positions_BL=batch['positions'], segment_ids_BL=batch['segment_ids'])
    if self.diffusion:
      from pathways_jax.tasks.pretrain import mask_id  # pylint: disable=g-import-not-at-top
      estimator = self.cfg.rl.diffusion_estimator
      inputs = diffusion_lib.estimator_inputs(estimator, batch, mask_id=mask_id(self.cfg),
                                              trace_passes=getattr(self, 'trace_passes', 0))
      passes = inputs.shape[0] // tokens.shape[0]
      targets = jnp.concatenate([tokens] * passes)
      kw = {k: jnp.concatenate([v] * passes) for k, v in kw.items()}
    else:
      inputs, targets = tokens, autoregressive.next_token_targets(tokens)
    t = self.cfg.rl.temperature
    t = t if t > 0 else 1.0
    out = lm_head_outputs(self.cfg, model, params, inputs, targets, temperature=t,
                          **kw, **({'with_scalar': True} if values else {}))
    out, scalar_BT = out if values else (out, None)
    stats = token_losses.of(out, targets)
    value_BT = None if scalar_BT is None else jnp.pad(scalar_BT[:, :-1], ((0, 0), (1, 0)))
    logp, entropy = -stats.ce_BL, stats.entropy_BL
    if self.diffusion:
      by_pass = lambda x: x.reshape(passes, *tokens.shape)
      logp, entropy = diffusion_lib.combine_passes(estimator, by_pass(logp), by_pass(entropy),
                                                   batch)
    else:  # position i predicts token i+1: align with the tokens
      shift = lambda x: jnp.pad(x[:, :-1], ((0, 0), (1, 0)))
      logp, entropy = shift(logp), shift(entropy)
    return logp, entropy, value_BT

  def _spg_stats(self, params, batch):
    """(ELBO [N], EUBO [N], entropy [N, T]) of the rows' completions under the policy, from
    SPG's masked passes (one forward of draws x N rows); the entropy is each position's mean
    over the passes that masked it."""
    from pathways_jax.tasks.pretrain import mask_id  # pylint: disable=g-import-not-at-top
    r, tokens = self.cfg.rl, batch['tokens']
    D, (N, T) = r.spg_draws, tokens.shape
    inputs = diffusion_lib.spg_inputs(tokens, batch['spg_mask'], draws=D,
                                      mask_id=mask_id(self.cfg))
    rep = lambda x: jnp.concatenate([x] * D)
    t = r.temperature if r.temperature > 0 else 1.0
    out = lm_head_outputs(self.cfg, self.model, params, inputs, rep(tokens), temperature=t,
                          positions_BL=rep(batch['positions']),
                          segment_ids_BL=rep(batch['segment_ids']))
    stats = token_losses.of(out, rep(tokens))
    masked_DNT = jnp.stack([(batch['spg_mask'] >> j) & 1 for j in range(D)])
    elbo, eubo = rl.spg_sequence_logps(-stats.ce_BL.reshape(D, N, T), masked_DNT,
                                       batch['completion_mask'], beta=r.spg_beta)
    entropy = ((stats.entropy_BL.reshape(D, N, T) * masked_DNT).sum(0)
               / jnp.maximum(masked_DNT.sum(0), 1))
    return elbo, eubo, entropy

  def _token_logps(self, model, params, batch):
    return self._stats(model, params, batch)[0]

  def _logps_and_values(self, model, params, batch):
    """(token log-probs [N, T], values [N, T]) of the rows under a model with a value head."""
    logp, _, values_BT = self._stats(model, params, batch, values=True)
    return logp, values_BT

  def loss(self, params, batch, key, aux=None):
    del key
    r = self.cfg.rl
    if self.spg:
      mask = batch['completion_mask']
      elbo, eubo, entropy = self._spg_stats(params, batch)
      loss, metrics = rl.spg_loss(elbo, eubo, batch['advantages'], mask, bound=r.spg_bound,
                                  mix=r.spg_mix)
      valid = mask > 0
      mean_entropy = jnp.where(valid, entropy, 0.0).sum() / jnp.maximum(valid.sum(), 1)
      metrics['entropy'] = jax.lax.stop_gradient(mean_entropy)
      if r.entropy_coef:
        loss = loss - r.entropy_coef * mean_entropy
      # A mean over completion tokens, as 'token-mean': micro-batches weigh theirs by that count.
      return loss, {**metrics, COUNT: mask.sum().astype(jnp.float32)}
    logp, entropy, values = self._stats(self.model, params, batch, values=self.ppo)
    old = jax.lax.stop_gradient(logp) if self.on_policy else batch['old_logp']
    ref = None
    if self.needs_ref and not self.kl_in_reward:
      ref_model, ref_params = self._reference(params, aux)
      ref = jax.lax.stop_gradient(self._token_logps(ref_model, jax.lax.stop_gradient(ref_params),
                                                    batch))
    mask = batch['completion_mask']
    if self.wd1:
      loss, metrics = rl.wd1_loss(logp, batch[WD1_WEIGHT], mask, group_size=r.num_generations,
                                  entropy_BT=entropy)
      if r.entropy_coef:
        loss = loss - r.entropy_coef * metrics['entropy']
      # A mean over groups: micro-batches weigh theirs by their share of the step's groups.
      return loss, {**metrics, COUNT: jnp.asarray(mask.shape[0] / r.num_generations,
                                                  jnp.float32)}
    if r.loss == 'gspo':
      loss, metrics = rl.sequence_policy_loss(
          logp, old, batch['advantages'], mask, ref_logp_BT=ref,
          beta=0.0 if self.kl_in_reward else r.beta, kl=r.kl,
          eps_low=r.eps_low, eps_high=r.eps_high, entropy_BT=entropy)
      if r.entropy_coef:
        loss = loss - r.entropy_coef * metrics['entropy']
      return loss, {**metrics, COUNT: (mask.sum(axis=1) > 0).sum().astype(jnp.float32)}
    loss, metrics = rl.policy_loss(
        logp, old, batch['advantages'], mask, ref_logp_BT=ref,
        beta=0.0 if self.kl_in_reward else r.beta, kl=r.kl,
        eps_low=r.eps_low, eps_high=r.eps_high, agg=r.agg,
        max_len=r.max_new_tokens if r.agg == 'seq-mean-token-sum-norm' else None,
        entropy_BT=entropy)
    if self.ppo:
      vloss, vmetrics = rl.value_loss(values, batch['old_values'], batch['returns'], mask,
                                      clip=r.vf_clip if r.vf_clip > 0 else None)
      loss = loss + r.vf_coef * vloss
      metrics = {**metrics, **vmetrics}
    if r.entropy_coef:
      valid = mask > 0
      loss = loss - r.entropy_coef * (jnp.where(valid, entropy, 0.0).sum()
                                      / jnp.maximum(valid.sum(), 1))
    rows_with_tokens = (mask.sum(axis=1) > 0).sum()
    count = {'token-mean': mask.sum(), 'seq-mean-token-mean': rows_with_tokens,
             'seq-mean-token-sum-norm': mask.shape[0]}[r.agg]
    return loss, {**metrics, COUNT: jnp.asarray(count, jnp.float32)}

  # -- held-out evaluation --------------------------------------------------------------------
  def callbacks(self):
    """[(every, fn(step, params) -> metrics)]: greedy held-out rewards (data.validation_path)."""
    if self._eval is None:
      return []
    return [(self.cfg.train.eval_every, self._evaluate_and_record)]

  def _evaluate_and_record(self, step: int, params) -> dict[str, float]:
    out = self.evaluate(params)
    if self.cfg.rl.reset_on_stall:
      self._history = [(s, v) for s, v in self._history if s < step] + [(step, out[self.stall_key])]
      if jax.process_index() == 0:
        import os  # pylint: disable=g-import-not-at-top
        path = os.path.join(self._run.workdir, STALL_HISTORY)
        with open(path + '.tmp', 'w') as f:
          json.dump(self._history, f)
        os.replace(path + '.tmp', path)
    return out

  def _greedy_texts(self, params, tokens, mask) -> list[str]:
    """The greedy completions of left-padded prompts [N, P], in batches of rl.eval_batch."""
    n = len(tokens)
    width = min(self.cfg.rl.eval_batch, n)
    greedy = self._greedy_sampler(width)
    texts = []
    for s in range(0, n, width):
      idx = np.minimum(np.arange(s, s + width), n - 1)  # the last batch repeats its last prompt
      ro = greedy(params, tokens[idx], mask[idx], key=jax.random.key(0))
      got, _, _ = batch_lib.completion_texts(np.asarray(ro.tokens_BT)[:, tokens.shape[1]:],
                                             np.asarray(ro.completion_mask_BN),
                                             self._run.tokenizer)
      texts += got[:n - s]
    return texts

  def _held_out_totals(self, records, texts, messages) -> np.ndarray:
    """[N] the rollout rewards' weighted totals of held-out answers ('random' scores 0 here)."""
    specs = [(name, w) for name, w in self.reward_specs if name != 'random']
    total, _, _ = rewards_lib.score(specs, records, texts, rng=np.random.default_rng(0),
                                    prompts=messages, reward_model=self._rm,
                                    think_tag=self.cfg.rl.think_tag,
                                    think_malformed=self.cfg.rl.think_malformed)
    return np.asarray(total)

  def evaluate(self, params) -> dict[str, float]:
    """{'val_<reward>': mean over the held-out prompts} of their greedy answers; with rl.reflect
    also the second attempt's (`_evaluate_retries`)."""
    records, tokens, mask, messages = self._eval
    texts = self._greedy_texts(params, tokens, mask)
    specs = [(name, 1.0) for name, _ in self.reward_specs if name != 'random']
    out = {}
    for name, _ in specs:
      _, values, _ = rewards_lib.score([(name, 1.0)], records, texts,
                                       rng=np.random.default_rng(0), prompts=messages,
                                       reward_model=self._rm, think_tag=self.cfg.rl.think_tag)
      out[f'val_{name}'] = float(values[name].mean())
      if 'think_ok' in values:
        out['val_think_ok'] = float(values['think_ok'].mean())
    if self.cfg.rl.reflect:
      out.update(self._evaluate_retries(params, texts))
    return out

  def _evaluate_retries(self, params, first: list[str]) -> dict[str, float]:
    """RRR's held-out measure (its paper's first and second try): after each failed greedy first
    attempt, a greedy reflection then a greedy retry, as in training but greedy throughout.
    `val_first_attempt` and `val_second_attempt` (right on the first try, or on the retry) are
    shares of all held-out prompts; `val_retry_success` of the failed ones."""
    r, P, tok = self.cfg.rl, self.cfg.data.seq_len, self._run.tokenizer
    records, tokens, mask, messages = self._eval
    ok = self._held_out_totals(records, first, messages) >= r.success_at
    failed = np.flatnonzero(~ok)
    out = {'val_first_attempt': float(ok.mean()), 'val_second_attempt': float(ok.mean()),
           'val_retry_success': 0.0, 'val_reflect_too_long': 0.0}
    if not len(failed):
      return out
    pick = lambda xs: [xs[i] for i in failed]
    asks, ask_tokens, ask_mask, ask_fits = reflect_lib.reflection_prompts(
        tok, pick(messages), pick(first), r.reflect_instruction, P, tokens[failed], mask[failed])
    retry_tokens, retry_mask, retry_fits = reflect_lib.retry_prompts(
        tok, asks, self._greedy_texts(params, ask_tokens, ask_mask), r.retry_instruction, P,
        ask_tokens, ask_mask)
    second = self._greedy_texts(params, retry_tokens, retry_mask)
    success = ((self._held_out_totals(pick(records), second, pick(messages)) >= r.success_at)
               & ask_fits & retry_fits)
    out.update(val_second_attempt=float((ok.sum() + success.sum()) / len(ok)),
               val_retry_success=float(success.mean()),
               val_reflect_too_long=float((~ask_fits).sum()))
    return out
