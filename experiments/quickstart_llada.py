"""The second half of `make run`: the quickstart model as LLaDA (masked diffusion), then samples.

    python -m pathways_jax.main --config=experiments/quickstart_llada.py --workdir=runs/quickstart_llada

Same data, size and step count as experiments/quickstart.py, bidirectional, LLaDA's loss; samples
come from the semi-autoregressive low-confidence sampler (blocks of 8 tokens).
"""
from pathways_jax.config import base_config


def get_config():
  c = base_config()
  c.name = 'quickstart_llada'
  c.objective = 'diffusion'
  c.data.corpus = 'stdlib'
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 1024
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.model.causal = False
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 384
  c.train.steps = 300
  c.train.lr = 3e-3
  c.train.schedule = 'wsd'
  c.train.warmup_steps = 50
  c.train.eval_every = 150
  c.train.checkpoint_every = 150
  c.sample.prompts = ('def ', 'import os\n', 'class ')
  c.sample.max_new_tokens = 32
  c.sample.steps = 32
  c.sample.block_length = 8
  return c
