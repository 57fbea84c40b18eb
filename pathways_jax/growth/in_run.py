"""Growth inside one run: the glue between `config.growth` and the training loop.

A run with `growth.depth_factor > 1` (or `width_factor > 1`) trains `config.model` (the small
model) for `growth.at_step` steps, grows params and optimizer state with `pathways_jax.growth`,
and trains the grown model from there on. The growth happens right after update `at_step`, before
that step's eval and checkpoint, so **every checkpoint at step >= at_step holds the grown model and
every earlier one the small model**: `Growth.model_cfg_at(step)` tells resume which model to build.

The learning rate after growth. The global schedule (`train.*`) keeps its step: the post-growth
LR at step t is `schedule(t) * min(1, (t - at_step) / growth.rewarmup_steps)` (no ramp when
rewarmup_steps is 0). With `growth.optimizer='fresh'` the new AdamW state counts from 0, so its
schedule is offset by at_step; with 'map' the moments and the step count carry over.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pathways_jax import config as config_lib
from pathways_jax.growth import operators as growth_lib
from pathways_jax.models.transformer import Transformer
from pathways_jax.train import metrics as metrics_lib
from pathways_jax.train import optimizer as opt_lib
from pathways_jax.train import state as state_lib

_GROW_KEY = 0x67726F77  # fold_in tag of the growth key ('grow')


def is_configured(cfg) -> bool:
  gr = cfg.get('growth')
  return gr is not None and (gr.depth_factor > 1 or gr.width_factor > 1)


def tokens_per_step(cfg) -> int:
  return cfg.data.batch_size * cfg.data.seq_len


def growth_step(cfg) -> int | None:
  """The step after which the model grows (None: no growth)."""
  if not is_configured(cfg):
    return None
  if cfg.growth.at_tokens:
    return math.ceil(cfg.growth.at_tokens / tokens_per_step(cfg))
  return int(cfg.growth.at_step)


@dataclasses.dataclass
class Growth:
  """Which model trains at each step, the optimizers on both sides, the growth itself, FLOPs."""
  cfg: object
  small_cfg: config_lib.ModelConfig

  def __post_init__(self):
    self.at_step = growth_step(self.cfg)
    self.enabled = self.at_step is not None
    self.grown_cfg = self.small_cfg
    if self.enabled:
      if self.at_step > self.cfg.train.steps:
        raise config_lib.ConfigError(
            f'config.growth: the growth step {self.at_step} is after the last step '
            f'(config.train.steps={self.cfg.train.steps})')
      try:
        self.grown_cfg = growth_lib.grow_config(self.small_cfg, **self._kwargs())
      except ValueError as e:
        raise config_lib.ConfigError(f'config.growth: {e}') from e

  def _kwargs(self) -> dict:
    gr = self.cfg.growth
    return dict(depth_factor=gr.depth_factor, width_factor=gr.width_factor, method=gr.method,
                width_method=gr.width_method)

  # -- which model, which optimizer ---------------------------------------------------------
  def grown_by(self, step: int) -> bool:
    """True if the state at `step` (e.g. a checkpoint) holds the grown model."""
    return self.enabled and step >= self.at_step

  def model_cfg_at(self, step: int) -> config_lib.ModelConfig:
    return self.grown_cfg if self.grown_by(step) else self.small_cfg

  def due(self, step: int, model_cfg) -> bool:
    """Grow now? (the state at `step` still holds the small model and growth is at `step`)."""
    return self.enabled and step == self.at_step and model_cfg == self.small_cfg

  def schedule(self, grown: bool):
    """The LR as a function of the optimizer's own count, before or after the growth."""
    base = opt_lib.schedule(self.cfg.train)
    if not grown:
      return base
    gr, at = self.cfg.growth, self.at_step
    offset = at if gr.optimizer == 'fresh' else 0  # a fresh AdamW counts from 0 at the growth
    ramp = gr.rewarmup_steps

    def post(count):
      t = count + offset
      lr = base(t)
      if ramp > 0:
        lr = lr * jnp.clip((t - at) / ramp, 0.0, 1.0)
      return lr
    return post

  def optimizer(self, grown: bool):
    return opt_lib.make_optimizer(self.cfg.train, self.schedule(grown) if grown else None)

  def lr_at(self, step: int) -> float:
    """The LR used by update `step` (0-based), for logs."""
    grown = self.grown_by(step)
    offset = self.at_step if grown and self.cfg.growth.optimizer == 'fresh' else 0
    return float(self.schedule(grown)(jnp.asarray(step - offset)))

  def parts(self, step: int, example_BL, mesh, rules):
    """(model_cfg, model, tx, abstract state, shardings) for the state at `step`."""
    model_cfg = self.model_cfg_at(step)
    model = Transformer(model_cfg)
    tx = self.optimizer(self.grown_by(step))
    abstract, shardings = state_lib.abstract_state_and_shardings(model, tx, example_BL, mesh,
                                                                 rules)
    return model_cfg, model, tx, abstract, shardings

  # -- FLOPs ---------------------------------------------------------------------------------
  def flops(self, step: int) -> float:
    """Training FLOPs of updates 0..step-1: small-model steps at the small model's cost."""
    L, n = self.cfg.data.seq_len, tokens_per_step(self.cfg)
    small = metrics_lib.flops_per_token(self.small_cfg, L) * n
    if not self.enabled:
      return small * step
    big = metrics_lib.flops_per_token(self.grown_cfg, L) * n
    return small * min(step, self.at_step) + big * max(step - self.at_step, 0)

  # -- the growth ----------------------------------------------------------------------------
  def grow_state(self, state, example_BL, mesh, rules):
    """Grows a small-model TrainState into the grown model's shardings.

    Returns (state, model_cfg, model, tx, shardings). One jitted program: params (and, for
    'map', the optimizer moments) go from the old shardings straight into the new ones.
    """
    gr = self.cfg.growth
    model_cfg, model, tx, _, shardings = self.parts(self.at_step, example_BL, mesh, rules)
    key = jax.random.fold_in(jax.random.key(self.cfg.seed), _GROW_KEY)
    kw = self._kwargs()

    def fn(st, k):
      params, _ = growth_lib.grow(st.params, self.small_cfg, key=k, noise=gr.noise,
                                  split_noise=gr.split_noise, **kw)
      if gr.optimizer == 'map':
        opt_state = growth_lib.grow_opt_state(st.opt_state, self.small_cfg, mode='map', **kw)
      else:
        opt_state = tx.init(params)
      return state_lib.TrainState(step=st.step, params=params, opt_state=opt_state,
                                  bad_step=st.bad_step)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      new_state = jax.jit(fn, out_shardings=shardings)(state, key)
    return new_state, model_cfg, model, tx, shardings

  # -- what users see ------------------------------------------------------------------------
  def describe(self) -> list[str]:
    """Lines for start-up and the dry run: the growth, and the paper's G_stack guideline."""
    if not self.enabled:
      return []
    gr, s, b = self.cfg.growth, self.small_cfg, self.grown_cfg
    n = tokens_per_step(self.cfg)
    src, _ = growth_lib.depth_sources(s.num_layers, gr.depth_factor, gr.method)
    lines = [
        f'growth: after step {self.at_step} ({self.at_step * n:,} tokens) '
        f'{s.num_layers}L d={s.d_model} -> {b.num_layers}L d={b.d_model} '
        f'(depth {gr.method} x{gr.depth_factor}, width {gr.width_method} x{gr.width_factor}); '
        f'layer sources {list(map(int, src))}; optimizer {gr.optimizer}, '
        f're-warmup {gr.rewarmup_steps} steps']
    target_params = _param_count(b)
    total_tokens = self.cfg.train.steps * n
    try:
      plan = growth_lib.gstack_plan(target_params, target_tokens=total_tokens,
                                    growth_factor=gr.depth_factor,
                                    target_layers=b.num_layers)
    except ValueError as e:
      return lines + [f'G_stack guideline: not available ({e})']
    d = plan['small_tokens']
    note = ('' if d <= total_tokens else
            ' -- beyond the whole run: the fit (7B-scale, 1e20+ FLOPs) does not extrapolate to '
            'this size; pick d by a timing sweep')
    lines.append(
        f'G_stack guideline (Du et al. 2024: log10 d = 0.88 log10 N + 163.27/log10 C - 5.74, '
        f'N={target_params / 1e6:.2f}M, C={plan["compute_flops"]:.3g}): small model for '
        f'd={d:.3g} tokens (~{d / n:.3g} steps), g=4 recommended; configured: '
        f'{self.at_step * n:,} tokens, g={gr.depth_factor}{note}')
    return lines


def _param_count(model_cfg) -> int:
  from pathways_jax.models.transformer import count_params  # pylint: disable=g-import-not-at-top
  tokens = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(lambda: Transformer(model_cfg).init(jax.random.key(0), tokens))
  return count_params(nn.unbox(abstract['params']))


def describe(cfg, model_cfg) -> list[str]:
  """The growth plan lines for a config (empty if it does not grow); for the dry run."""
  if not is_configured(cfg):
    return []
  return Growth(cfg, model_cfg).describe()
