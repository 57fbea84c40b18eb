"""A 1B autoregressive model on one 8 x H100 (80 GB) node, FSDP over the 8 GPUs.

    python -m pathways_jax.main --config=experiments/pods/ar_1b_8xh100.py --dry_run
    python -m pathways_jax.main --config=experiments/pods/ar_1b_8xh100.py --workdir=runs/ar_1b

Several nodes under SLURM (one task per node, all GPUs of a node per task): add
`mesh.dcn_data=<nodes>` and launch with `srun` (see docs/scaling.md); JAX reads the SLURM
environment, the batch's data-parallel all-reduce is the only traffic between nodes.

Shape of Llama-3.2-1B (d 2048, 16 layers, 32 heads / 8 KV heads, SwiGLU 8192, tied embeddings)
with a 32k sentencepiece vocabulary: 1.0B params. 64 x 2048 = 131k tokens per step; 150k steps =
~20B tokens (Chinchilla-optimal for 1B).
"""
from pathways_jax.config import base_config


def get_config():
  c = base_config()
  c.name = 'ar_1b_8xh100'
  c.objective = 'autoregressive'
  c.data.corpus = 'tfds'
  c.data.tfds_name = 'c4/en'
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 32768
  c.data.seq_len = 2048
  c.data.batch_size = 64  # 8 rows per GPU
  c.data.eval_batches = 16
  c.model.vocab_size = 32768
  c.model.d_model = 2048
  c.model.num_layers = 16
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 8192
  c.model.max_len = 2048
  c.model.tie_embeddings = True
  c.model.rope_theta = 500_000.0
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = 'dots'
  c.model.scan_layers = True
  c.model.attention = 'cudnn'
  c.train.steps = 150_000
  c.train.lr = 3e-4
  c.train.warmup_steps = 2000
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.peak_flops = 989e12  # H100 SXM bf16 dense
  c.train.progress_bar = False
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.sample.prompts = ('The ',)
  c.pod.name = '8 x H100 80GB'
  c.pod.devices = 8
  c.pod.hbm_gib = 80.0
  c.pod.peak_flops = 989e12
  return c
