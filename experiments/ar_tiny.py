"""A tiny Llama-style AR model on the Python standard library (a few minutes on a laptop CPU).

    python -m pathways_jax.main --config=experiments/ar_tiny.py --workdir=runs/ar_tiny
"""
from pathways_jax.config import base_config


def get_config():
  c = base_config()
  c.name = 'ar_tiny'
  c.host_malloc = 'reuse'  # a CPU config: keep freed host memory (pathways_jax/host_memory.py)
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
  # The fused XLA:CPU attention kernel (kernels_cpu); off CPU, or without a C++ compiler, it
  # falls back to 'xla' with a warning.
  c.model.attention = 'cpu'
  c.train.steps = 600
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  return c
