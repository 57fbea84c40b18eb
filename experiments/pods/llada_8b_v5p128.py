"""A LLaDA-8B-shaped masked-diffusion model pretrained on a TPU v5p-128 slice (64 chips, 16 hosts).

Check it on a laptop first (compiles the real train step for 64 fake devices, prints memory/FLOPs):

    python -m pathways_jax.main --config=experiments/pods/llada_8b_v5p128.py --dry_run

Launch on every host of the slice at once (see docs/scaling.md):

    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd pathways_jax && \
      .venv/bin/python -m pathways_jax.main --config=experiments/pods/llada_8b_v5p128.py \
      --workdir=gs://$BUCKET/runs/llada_8b --multihost"

Shape of LLaDA 8B (GSAI-ML/LLaDA-8B-Base): d 4096, 32 layers, 32 heads (MHA), SwiGLU 12288,
bidirectional; vocabulary 126464 there, here the tokenizer's (set data.tokenizer_path to a
sentencepiece model with that many pieces). Sharding: FSDP over all 64 chips (params, grads and
AdamW moments split 64 ways, ~1.5 GiB/chip), activations re-materialised per layer (remat=full),
layers scanned (one compiled layer body). 256 x 4096 = 1M tokens per step; 100k steps = 105B tokens.
"""
from pathways_jax.config import base_config


def get_config():
  c = base_config()
  c.name = 'llada_8b_v5p128'
  c.objective = 'diffusion'
  c.data.corpus = 'tfds'
  c.data.tfds_name = 'c4/en'
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 126464
  c.data.seq_len = 4096
  c.data.batch_size = 256  # 4 rows per chip
  c.data.eval_batches = 16
  c.model.vocab_size = 126464
  c.model.causal = False
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.mlp_dim = 12288
  c.model.max_len = 4096
  c.model.tie_embeddings = False
  c.model.rope_theta = 500_000.0
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = 'full'
  c.model.scan_layers = True
  # TPU splash attention (segment ids, a full mask for LLaDA). The dry run compiles on CPU, where
  # it runs 'xla' instead and says so; not yet run on a TPU by this project.
  c.model.attention = 'splash'
  c.train.steps = 100_000
  c.train.lr = 4e-4  # LLaDA's pretraining LR with WSD
  c.train.schedule = 'wsd'
  c.train.warmup_steps = 2000
  c.train.weight_decay = 0.1
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.peak_flops = 459e12  # TPU v5p bf16, per chip
  c.train.progress_bar = False
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.sample.prompts = ()
  c.pod.name = 'TPU v5p-128'
  c.pod.devices = 64
  c.pod.hbm_gib = 95.0
  c.pod.peak_flops = 459e12
  return c
