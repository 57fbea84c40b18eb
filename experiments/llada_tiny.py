"""A tiny LLaDA (masked-diffusion) model on the Python standard library.

    python -m pathways_jax.main --config=experiments/llada_tiny.py --workdir=runs/llada_tiny

The same network as experiments/ar_tiny.py without the causal mask, trained with LLaDA's loss
(random masking ratio per row, CE on masked tokens / p_mask, 1% random-length batches) and the
WSD schedule LLaDA used; sampled with the semi-autoregressive low-confidence sampler.
"""
from pathways_jax.config import base_config


def get_config():
  c = base_config()
  c.name = 'llada_tiny'
  c.host_malloc = 'reuse'  # a CPU config: keep freed host memory (pathways_jax/host_memory.py)
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
  c.model.num_kv_heads = 4  # LLaDA uses MHA
  c.model.mlp_dim = 384
  # The fused XLA:CPU attention kernel (kernels_cpu); off CPU, or without a C++ compiler, it
  # falls back to 'xla' with a warning.
  c.model.attention = 'cpu'
  c.train.steps = 600
  c.train.lr = 3e-3
  c.train.schedule = 'wsd'
  c.train.warmup_steps = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.sample.prompts = ('def ', 'import ', 'class ')
  c.sample.max_new_tokens = 32
  c.sample.steps = 32
  c.sample.block_length = 8
  return c
