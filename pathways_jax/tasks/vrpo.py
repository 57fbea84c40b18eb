"""VRPO as a task ('vrpo'): DPO for LLaDA on ELBO estimates (LLaDA 1.5, arXiv 2505.19223).

    config.task = 'vrpo'
    config.model.causal = False            # a LLaDA policy (objective 'diffusion')
    config.data.corpus = 'preference'      # data/preference.py: pairs packed as segment pairs
    config.train.init_from = 'runs/llada_sft'
    config.dpo.beta = 0.1                  # the loss, beta, reference: as task 'dpo'
    config.vrpo.n_t, config.vrpo.n_yt = 8, 1   # budget n = n_t * n_yt; n_yt = 1 is optimal
    config.vrpo.antithetic = True          # the reference scores the policy's draws

The 'dpo' task (tasks/dpo.py) with each side's log-prob replaced by the Monte Carlo ELBO estimate
B_hat(y|x) of `objectives.vrpo` (formulas and citations there): n_t timesteps x n_yt masks per
response, only response tokens masked (the prompt never, as in LLaDA's SFT), each side of a pair
its own draws. With `antithetic` the reference is applied to exactly the policy's noisy tokens;
otherwise it gets draws of its own. The loss is `preference.dpo_loss` of config.dpo on the
B_hat's (length-averaged for 'ipo', 'simpo', 'orpo', as 'dpo' does); the chosen side's
-B_hat / |y_w| (LLaDA's SFT loss of that response, estimated) is the NLL term of RPO / ORPO.

The reference is the frozen start model (train.init_from or dpo.reference, loaded once and passed
as `aux`) or, for a LoRA policy starting from it, the policy with its adapters off. Precomputing
it (dpo.precompute) is refused: antithetic sampling needs the reference's estimate on the
policy's draws, which change every step.

The n draws are one forward per model: the batch's B rows are repeated n times along the batch
axis (row b's draws at rows b * n .. b * n + n - 1, so a batch sharded over devices stays sharded
the same way) and the [B * n, L] noisy rows go through the model at once. A Python loop would
unroll n forwards into the step (compile time growing with n), and a scan over draws keeps the
backward pass's residuals of every draw anyway; one wide forward compiles once and keeps the
accelerator busy. Memory is n times a DPO step's activations: trade it with train.grad_accum.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pathways_jax.config import ConfigError
from pathways_jax.objectives import token_losses, vrpo
from pathways_jax.tasks.dpo import DpoTask
from pathways_jax.tasks.lm_head import outputs as lm_head_outputs
from pathways_jax.tasks.reference import base_params
from pathways_jax.tasks.pretrain import mask_id
from pathways_jax.tasks.registry import register


def draw_token_terms(model, params, batch: dict, draws: vrpo.Draws, *, cfg=None) -> jax.Array:
  """float32 [N, B, L]: `vrpo.token_terms` of `model` on every draw, one forward of B * N rows
  (with a run's `cfg`, through the fused cross-entropy where train.cross_entropy takes it)."""
  n, b, l = draws.noisy_NBL.shape
  rows = lambda x_NBL: jnp.swapaxes(x_NBL, 0, 1).reshape(b * n, l)
  rep = lambda x_BL: jnp.repeat(x_BL, n, axis=0)
  kw = dict(positions_BL=rep(batch['positions']), segment_ids_BL=rep(batch['segment_ids']))
  if cfg is None:
    out = model.apply({'params': params}, rows(draws.noisy_NBL), **kw)
  else:
    out = lm_head_outputs(cfg, model, params, rows(draws.noisy_NBL), rep(batch['tokens']), **kw)
  if isinstance(out, token_losses.TokenLosses):
    out = token_losses.TokenLosses(*(None if x is None else x.reshape(b, n, l) for x in out))
  else:
    out = out.reshape(b, n, l, -1)
  terms_BNL = vrpo.token_terms(out, batch['tokens'][:, None],
                               jnp.swapaxes(draws.masked_NBL, 0, 1),
                               jnp.swapaxes(draws.p_mask_NBL, 0, 1))
  return jnp.swapaxes(terms_BNL, 0, 1)


def settings(cfg) -> tuple[int, int, bool]:
  """(n_t, n_yt, antithetic) of config.vrpo, checked."""
  v = cfg.get('vrpo')
  if v is None:
    raise ConfigError("task 'vrpo' needs the config section `vrpo` (n_t, n_yt, antithetic)")
  n_t, n_yt = v.get('n_t', 8), v.get('n_yt', 1)
  for name, value in (('n_t', n_t), ('n_yt', n_yt)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f'config.vrpo.{name}={value!r} must be an integer >= 1')
  return n_t, n_yt, bool(v.get('antithetic', True))


@register('vrpo')
class VrpoTask(DpoTask):
  """DPO family on LLaDA's ELBO estimates with VRPO's variance reductions."""
  required_specials = ('mask',)

  def __init__(self, cfg, model):
    super().__init__(cfg, model)
    self.n_t, self.n_yt, self.antithetic = settings(cfg)
    if cfg.dpo.precompute:
      raise ConfigError("task 'vrpo' cannot precompute the reference (config.dpo.precompute): "
                        "the reference's ELBO estimate must use the policy's timesteps and masks "
                        '(antithetic sampling), drawn anew every step')

  def _check_model(self, model) -> None:
    if model.cfg.causal:
      raise ConfigError("task 'vrpo' trains a bidirectional LLaDA model (config.model.causal="
                        "False); for a causal model use task 'dpo'")

  def describe(self) -> str:
    d = self.cfg.dpo
    ref = ('none' if not self.needs_ref else 'adapters off' if self.adapters_off
           else self.source)
    return (f'vrpo({d.loss_type}, beta={d.beta}, n_t={self.n_t}, n_yt={self.n_yt}, '
            f'antithetic={self.antithetic}, reference={ref})')

  def setup(self, run):
    frozen_inputs = super().setup(run)
    if self.ref_model is not None and self.ref_model.cfg.causal:
      raise ConfigError(f'the reference {self.source!r} is a causal model; VRPO needs LLaDA '
                        'ELBOs of a bidirectional one')
    return frozen_inputs

  def draws(self, batch: dict, key: jax.Array) -> tuple[vrpo.Draws, vrpo.Draws]:
    """(policy draws, reference draws) of a batch (the same object when antithetic)."""
    return vrpo.policy_and_reference_draws(
        key, batch['tokens'], batch['segment_ids'], batch['loss_mask'], n_t=self.n_t,
        n_yt=self.n_yt, mask_id=mask_id(self.cfg), eps=self.cfg.diffusion.eps,
        antithetic=self.antithetic)

  def _pair_logps(self, params, batch, key, aux):
    response, segments = batch['loss_mask'], batch['segment_ids']
    pol_draws, ref_draws = self.draws(batch, key)
    pol = vrpo.pair_elbos(draw_token_terms(self.model, params, batch, pol_draws, cfg=self.cfg),
                          response, segments)
    ref = None
    if self.needs_ref:
      if self.adapters_off:
        ref_model, ref_params = self._reference_model(), base_params(params)
      else:
        ref_model, ref_params = self.ref_model, aux
      terms = draw_token_terms(ref_model, jax.lax.stop_gradient(ref_params), batch, ref_draws,
                               cfg=self.cfg)
      ref = vrpo.pair_elbos(jax.lax.stop_gradient(terms), response, segments)
    return pol, ref


__all__ = ('VrpoTask', 'draw_token_terms', 'settings')
