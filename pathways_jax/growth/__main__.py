"""Grow a run's checkpoint into a new run directory (offline G_stack and friends).

    python -m pathways_jax.growth --from=runs/small --workdir=runs/grown --depth_factor=4 \
        --method=stack [--width_factor=1 --width_method=direct --optimizer=fresh \
        --rewarmup_steps=0 --step=N --set=train.steps=2000 ...]
    python -m pathways_jax.main --workdir=runs/grown        # continues training the grown model

The new run directory is the in-run growth (`config.growth`, docs/growth.md) materialised at the
checkpoint's step N: its config.json is the source run's config with `growth.at_step=N` and the
requested factors, and its checkpoint N holds the grown params, optimizer state (fresh or mapped)
and the source's data-iterator position. Training it therefore continues exactly as a run with
that growth configured would (same schedule, same data order), and `pathways_jax.main` without
--config picks up the saved config. `--set=key=value` changes fields of the new config (e.g.
train.steps to train longer).
"""
from __future__ import annotations

import copy
import json
import os
import sys

from absl import app, flags


def grow_run(src: str, dst: str, *, depth_factor: int = 1, width_factor: int = 1,
             method: str = 'stack', width_method: str = 'direct', optimizer: str = 'fresh',
             rewarmup_steps: int = 0, noise: float = 0.0, step: int | None = None,
             overrides: tuple[str, ...] = (), quiet: bool = False) -> dict:
  """Writes the grown run directory `dst` from run `src`'s checkpoint; returns a summary."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pathways_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax import config_files  # pylint: disable=g-import-not-at-top
  from pathways_jax import parallel  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax.growth import in_run as growth_phase  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top

  if os.path.abspath(src) == os.path.abspath(dst):
    raise config_lib.ConfigError('--workdir must differ from --from (the source run is kept)')
  cfg = config_files.load_run_config(src)
  tokenizer, model_cfg, _, mesh, rules = loop.build(cfg)
  source = growth_phase.Growth(cfg, model_cfg)
  ckpt = ckpt_lib.Checkpointer(src, keep=cfg.train.keep_checkpoints, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt.directory}')
  if source.grown_by(step):
    raise config_lib.ConfigError(
        f'{src} grew in-run at step {source.at_step}; its checkpoint {step} already holds the '
        'grown model. Grow from a checkpoint before the growth, or train the grown run as is.')
  if os.path.exists(os.path.join(dst, 'checkpoints')) and os.listdir(
      os.path.join(dst, 'checkpoints')):
    raise config_lib.ConfigError(f'{dst} already holds checkpoints: use a new --workdir')

  new = copy.deepcopy(cfg)
  gr = new.growth
  gr.depth_factor, gr.width_factor = int(depth_factor), int(width_factor)
  gr.method, gr.width_method, gr.optimizer = method, width_method, optimizer
  gr.rewarmup_steps, gr.noise = int(rewarmup_steps), float(noise)
  gr.at_step, gr.at_tokens = int(step), 0
  new.train.stop_at = 0  # the source's stop (e.g. a stop_at at N) is not the grown run's
  for item in overrides:
    if '=' not in item:
      raise config_lib.ConfigError(f'--set {item!r} is not of the form key=value')
    key, value = item.split('=', 1)
    _override(new, key.strip(), value.strip())
  config_lib.validate(new)
  growth = growth_phase.Growth(new, model_cfg)
  if not growth.enabled:
    raise config_lib.ConfigError('nothing to grow: give --depth_factor or --width_factor > 1')

  example = np.zeros((cfg.data.batch_size, cfg.data.seq_len), np.int32)
  _, _, _, abstract, shardings = source.parts(step, example, mesh, rules)
  pindex, pcount = parallel.process_batch_slice(mesh)
  train_iter = pipeline.make_train_iterator(cfg, tokenizer, process_index=pindex,
                                            process_count=pcount,
                                            vocab_size=model_cfg.vocab_size)
  state = ckpt.restore(step, abstract, shardings, train_iter)
  ckpt.close()
  grown, grown_cfg, _, _, _ = growth.grow_state(state, example, mesh, rules)

  loop.check_workdir(dst)
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    f.write(new.to_json_best_effort(indent=2))
  out = ckpt_lib.Checkpointer(dst, keep=new.train.keep_checkpoints, async_save=False)
  out.save(step, grown, train_iter, force=True)
  out.close()
  summary = {'from': os.path.abspath(src), 'step': step, 'layers': grown_cfg.num_layers,
             'd_model': grown_cfg.d_model, 'method': method, 'width_method': width_method,
             'optimizer': optimizer}
  with open(os.path.join(dst, 'grown_from.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  if not quiet:
    for line in growth.describe():
      print(line)
    print(f'grew {src} step {step} ({model_cfg.num_layers}L d={model_cfg.d_model}) into {dst} '
          f'({grown_cfg.num_layers}L d={grown_cfg.d_model}); continue training with:\n'
          f'  python -m pathways_jax.main --workdir={dst}')
  return summary


def _override(cfg, key: str, text: str) -> None:
  """cfg[key] = text, parsed as the field's type (importing the sweep module would clash with
  these flags: both define --workdir)."""
  from pathways_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  node, *parents = cfg, *key.split('.')[:-1]
  for p in parents:
    if p not in node:
      raise ConfigError(f'--set {key}: config has no field {p!r}')
    node = node[p]
  leaf = key.split('.')[-1]
  if leaf not in node:
    raise ConfigError(f'--set {key}: config has no field {leaf!r}')
  old = node[leaf]
  try:
    if isinstance(old, bool):
      value = text.lower() in ('true', '1')
    elif isinstance(old, (int, float, str)):
      value = type(old)(float(text)) if isinstance(old, int) else type(old)(text)
    else:
      raise ConfigError(f'--set {key}: only bool, int, float and str fields')
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f'--set {key}={text}: {e}') from e


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  from pathways_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from pathways_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    grow_run(f['from'].value, f.workdir, depth_factor=f.depth_factor,
             width_factor=f.width_factor, method=f.method, width_method=f.width_method,
             optimizer=f.optimizer, rewarmup_steps=f.rewarmup_steps, noise=f.noise, step=f.step,
             overrides=tuple(f.set))
  except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  flags.DEFINE_string('from', None, 'source run directory', required=True)
  flags.DEFINE_string('workdir', None, 'new run directory', required=True)
  flags.DEFINE_integer('depth_factor', 1, 'depth growth factor g')
  flags.DEFINE_integer('width_factor', 1, 'width growth factor')
  flags.DEFINE_enum('method', 'stack', ['stack', 'interleave', 'zero', 'random'], 'depth operator')
  flags.DEFINE_enum('width_method', 'direct', ['direct', 'zero'], 'width operator')
  flags.DEFINE_enum('optimizer', 'fresh', ['fresh', 'map'], 'optimizer state after growth')
  flags.DEFINE_integer('rewarmup_steps', 0, 'LR re-warmup after growth')
  flags.DEFINE_float('noise', 0.0, 'multiplicative noise on the grown weights')
  flags.DEFINE_integer('step', None, 'source checkpoint (default: newest)')
  flags.DEFINE_multi_string('set', [], 'key=value: change a field of the new config')
  app.run(lambda argv: sys.exit(main(argv)))
