"""The README's `make run`: a tiny AR model on the Python standard library, then samples.

    python -m pathways_jax.main --config=experiments/quickstart.py --workdir=runs/quickstart

Sized to finish in about 2-3 minutes on a 2-core laptop CPU.
"""
from pathways_jax.config import base_config


def get_config():
  c = base_config()
  c.name = 'quickstart'
  c.objective = 'autoregressive'
  c.data.corpus = 'stdlib'
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 1024
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 384
  c.train.steps = 300
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.log_every = 10
  c.train.eval_every = 150
  c.train.checkpoint_every = 150
  c.sample.prompts = ('def ', 'import os\n', 'class ')
  return c
