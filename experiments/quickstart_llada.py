"""The second step of `make run`: the AR quickstart model (runs/quickstart) adapted into a LLaDA
(masked-diffusion) model in 120 steps, then samples. The third step (pathways_jax/demo.py) sets the
two against each other at filling a span in the middle of held-out lines.

    python -m pathways_jax.main --config=experiments/quickstart_llada.py --workdir=runs/quickstart_llada

Adaptation, as Dream-7B and DiffuLLaMA start from Qwen2.5 and Llama: the AR run's weights
(`train.init_from`), its attention made bidirectional, trained with LLaDA's loss; the logits are
shifted (`model.shift_logits`: position i reads its token off the hidden state at i - 1), so the
AR's next-token head carries over. From scratch, the same model needs far more steps than a
newcomer waits for: at 180 steps it is near-unigram (masked-token accuracy 0.10) and fills every
span with newlines (1.5% of the demo's span tokens); adapted, it reaches 0.17 in 120 steps and
fills 11.0% (2026-12-05, docs/llada.md).
"""
import os

from pathways_jax.config_files import config_from_file


def get_config():
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'llada_tiny.py'))
  c.name = 'quickstart_llada'
  c.train.init_from = 'runs/quickstart'  # make run's first step; the architecture comes from it
  c.model.shift_logits = True
  c.train.steps = 120
  c.train.log_every = 10
  c.train.eval_every = 60
  c.train.checkpoint_every = 60
  c.sample.prompts = ('def ', 'import os\n', 'class ')
  # Gumbel temperature 1, as the AR quickstart samples at 0.8: greedy decoding of a model this
  # young repeats one fragment for every prompt.
  c.sample.diffusion_temperature = 1.0
  return c
