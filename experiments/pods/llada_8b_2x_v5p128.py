"""The LLaDA-8B run of llada_8b_v5p128.py on two v5p-128 slices joined over DCN (multi-slice).

    python -m pathways_jax.main --config=experiments/pods/llada_8b_2x_v5p128.py --dry_run

Inside each slice, FSDP over its 64 chips (ICI); across the two slices, data parallelism
(`mesh.dcn_data=2`): only the gradient all-reduce crosses the data-centre network. Twice the
batch (512 x 4096 = 2M tokens per step), half the steps. Launch on every host of both slices
(e.g. a queued resource with --node-count=2; JAX reads MEGASCALE_* to find the slices) with
`--multihost`; see docs/scaling.md.
"""
import os

from pathways_jax import config_files


def _single_slice():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'llada_8b_v5p128.py')
  return config_files.config_from_file(path)


def get_config():
  c = _single_slice()
  c.name = 'llada_8b_2x_v5p128'
  c.data.batch_size = 512
  c.train.steps = 50_000
  c.train.warmup_steps = 1000
  c.mesh.dcn_data = 2
  c.pod.name = '2 x TPU v5p-128 (multi-slice)'
  c.pod.devices = 128
  return c
