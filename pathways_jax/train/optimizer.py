"""Learning-rate schedules and the AdamW optimizer (optax)."""
from __future__ import annotations

import jax.numpy as jnp
import optax


def schedule(train_cfg) -> optax.Schedule:
  """warmup + cosine, warmup + stable + decay (WSD, LLaDA's recipe), or warmup + constant."""
  t = train_cfg
  steps = max(t.steps, 1)
  warmup = min(t.warmup_steps, steps)
  peak, floor = t.lr, t.lr * t.min_lr_ratio
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if t.schedule == 'cosine':
    rest = optax.cosine_decay_schedule(peak, max(steps - warmup, 1), alpha=t.min_lr_ratio)
  elif t.schedule == 'wsd':
    decay = max(int(round(steps * t.decay_fraction)), 1)
    stable = max(steps - warmup - decay, 0)
    rest = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])
  elif t.schedule == 'constant':
    rest = optax.constant_schedule(peak)
  else:
    raise ValueError(f'unknown train.schedule {t.schedule!r}')
  return optax.join_schedules([warm, rest], [warmup])


def _decay_mask(params):
  # Norm scales are not decayed (the usual Llama recipe); matrices and embeddings are.
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, 'key', None) == 'scale' for k in path), params)


def make_optimizer(train_cfg, lr_schedule: optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
  """AdamW on `schedule(train_cfg)`, or on `lr_schedule` (e.g. the post-growth schedule)."""
  t = train_cfg
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(lr_schedule or schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                  weight_decay=t.weight_decay, mask=_decay_mask),
  )


def lr_at(train_cfg, step) -> float:
  return float(schedule(train_cfg)(jnp.asarray(step)))
