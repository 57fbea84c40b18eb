"""The README's `make run`: experiments/ar_tiny.py for 240 steps on the Python standard library,
then samples.

    python -m pathways_jax.main --config=experiments/quickstart.py --workdir=runs/quickstart

Sized to finish in about 2-3 minutes on a 2-core laptop CPU.
"""
import os

from pathways_jax.config_files import config_from_file


def get_config():
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ar_tiny.py'))
  c.name = 'quickstart'
  c.train.steps = 240
  c.train.log_every = 10
  c.train.eval_every = 120
  c.train.checkpoint_every = 120
  c.sample.prompts = ('def ', 'import os\n', 'class ')
  return c
