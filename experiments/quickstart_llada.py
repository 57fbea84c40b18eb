"""The second step of `make run`: experiments/llada_tiny.py (the quickstart model as LLaDA, masked
diffusion) for 180 steps, then samples. The third step (pathways_jax/demo.py) sets it against the
AR quickstart at filling a span in the middle of held-out lines.

    python -m pathways_jax.main --config=experiments/quickstart_llada.py --workdir=runs/quickstart_llada

Same data and size as experiments/quickstart.py, bidirectional, LLaDA's loss; samples
come from the semi-autoregressive low-confidence sampler (blocks of 8 tokens), at temperature 1.
"""
import os

from pathways_jax.config import config_from_file


def get_config():
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'llada_tiny.py'))
  c.name = 'quickstart_llada'
  c.train.steps = 180
  c.train.log_every = 10
  c.train.eval_every = 90
  c.train.checkpoint_every = 90
  c.sample.prompts = ('def ', 'import os\n', 'class ')
  # Greedy decoding of a model this young fills every block with newlines, its most frequent
  # token; sampling (Gumbel temperature 1, as the AR quickstart samples at 0.8) shows what it
  # has learned (measured on this run's checkpoint: code-like fragments). No other setting reads
  # better (2026-12-05, this checkpoint, sampling.diffusion.generate, 16 samples x 2 seeds; share
  # of whitespace characters / the AR quickstart's NLL of the text, here 0.87 / 4.5 nats):
  # temperature 1.5 (0.60 / 6.5) or random remasking at 1.0 (0.40 / 7.0) trade newlines for
  # noise like 'thcalre ZisX[pe(mple'; one block of 32 gives more newlines (0.96 / 3.2);
  # forbid_eos changes nothing (no EOS is drawn). At 180 steps the model is near-unigram
  # (masked-token accuracy 0.10): no sampler setting can fix that.
  c.sample.diffusion_temperature = 1.0
  return c
