"""The base experiment config and its validation.

Every experiment file in `experiments/` starts from `base_config()` and overrides fields. The
ConfigDict is locked and type-safe, so a misspelled key or a wrong type on the command line fails
at once with the key's name (ml_collections raises; `validate` adds the semantic checks).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import ml_collections

from pathways_jax import config_post_training as post_training


class ConfigError(ValueError):
  """A config that cannot run; the message names the offending key."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.name = 'experiment'
  c.objective = 'autoregressive'  # 'autoregressive' | 'diffusion'
  # 'reuse': glibc keeps freed host memory (pathways_jax/host_memory.py), which pays on XLA:CPU
  # only (the quickstart configs set it); 'default': malloc as it is. PATHWAYS_HOST_MALLOC overrides.
  c.host_malloc = 'default'
  # What is trained (pathways_jax.tasks): a registered task name; '' = `objective`, or 'rho1' when
  # selective.enabled. A config file may register a task of its own.
  c.task = ''

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0: take it from the tokenizer (rounded up to a multiple of 8)
  m.d_model = 128
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 4  # < num_heads: grouped-query attention
  m.head_dim = 0  # 0: d_model // num_heads
  m.mlp_dim = 512
  m.max_len = 512
  m.causal = True
  # Bidirectional models only: logits at position i come from the hidden state at i - 1, so a
  # diffusion model initialised from an AR run (train.init_from) keeps its next-token head.
  m.shift_logits = False
  m.tie_embeddings = True
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-5
  m.dtype = 'float32'  # activation / compute dtype: 'float32' | 'bfloat16'
  m.param_dtype = 'float32'
  m.remat = 'none'  # 'none' | 'full' | 'dots' (save matmul outputs)
  m.scan_layers = False
  m.attention = 'xla'  # 'xla' | 'cpu' (fused XLA:CPU kernel) | 'pallas' | 'cudnn'
  # 'xla' causal self-attention in up to this many query blocks (of >= 32 queries each), each
  # attending only to the keys up to its end, so the masked upper triangle is mostly skipped
  # (1: one block, the full [L, L] scores). Taken in a CPU lowering only (measured there);
  # GPU and TPU lowerings keep the plain attention.
  m.causal_query_blocks = 4
  m.init_std = 0.02
  # What imported checkpoints need (pathways_jax.interop.hf); the defaults are the project's model.
  m.qkv_bias = False  # biases on the q/k/v projections (Qwen2/2.5)
  m.qk_norm = False  # RMSNorm over head_dim on each head's q and k, before RoPE (Qwen3)
  m.rope_scaling = ''  # '' | 'llama3' (Llama 3.1+ frequency bands) | 'linear' (positions / factor)
  m.rope_scaling_factor = 1.0
  m.rope_low_freq_factor = 1.0  # llama3
  m.rope_high_freq_factor = 4.0  # llama3
  m.rope_original_max_len = 0  # llama3: the pretraining context the bands are measured against
  # LoRA adapters (pathways_jax.adapters.lora): rank 0 = none. Targets: 'all-linear' or a regular
  # expression searched in each dense weight's path ('attn/w[qkvo]', 'mlp/.*', 'blocks_0/attn/wq').
  m.lora_rank = 0
  m.lora_alpha = 16.0
  m.lora_targets = 'all-linear'
  m.lora_rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank
  # Dropout on each adapter's input while training (as PEFT's lora_dropout); never at eval or
  # sampling. The train step gives the model its 'dropout' rng only when this is > 0.
  m.lora_dropout = 0.0
  # Multi-LoRA (docs/lora.md): K adapters on one base, each row of a batch naming its own
  # (`adapter_ids_B`). 1 = one adapter. A run with K > 1 trains K adapters at once on
  # data.corpus='chat': data.path names K JSONL files (file k trains adapter k), or one whose
  # lines carry "adapter": k. Tasks 'sft' and 'llada_sft'.
  m.lora_num_adapters = 1
  # QLoRA (docs/qlora.md): '' (off) | 'int8' | 'int4' | 'nf4': the frozen base's dense weights
  # held quantised by qwix (adapters.qlora) while the adapters train in model.param_dtype. Needs
  # model.lora_rank > 0 and train.init_from (the base to quantise). Blocks of
  # lora_quantize_block input values share one scale (0: one scale per output channel).
  m.lora_quantize = ''
  m.lora_quantize_block = 64
  # A reward model's head (task 'reward_model', docs/preference.md): param scalar_head (kernel
  # [d_model] + bias, float32) on the final-normed hidden state; apply(..., return_scalar=True)
  # gives float32 [B, L]. A run starting (train.init_from) from a model without one gets it fresh.
  m.scalar_head = False

  c.data = d = ml_collections.ConfigDict()
  # 'stdlib' | 'synthetic' | 'path' | 'tfds' | 'prepared' | 'rows' | 'chat' | 'preference'
  # (data/preference.py) | 'prompts'
  d.corpus = 'stdlib'
  # corpus='path': a text/JSONL file or a folder of them; 'prepared': a folder of packed
  # ArrayRecord shards (python -m pathways_jax.data.prepare); 'rows': a .npz of token rows
  # (pathways_jax.data.rows); 'chat': a JSONL of conversations (pathways_jax.data.sft)
  d.path = ''
  d.tfds_name = ''  # for corpus='tfds', e.g. 'lm1b'
  d.tfds_data_dir = ''
  d.text_field = 'text'  # JSONL / TFDS feature holding the document text
  d.document_separator = '\n\n'  # corpus='path' text files: blank lines; '' = one doc per file
  d.max_documents = 0  # 0: all; else the first N documents (quick runs)
  d.tokenizer = 'sentencepiece'  # 'sentencepiece' | 'byte' | 'hf' (tokenizer.json: tokenizer_path)
  d.vocab_size = 1024  # sentencepiece vocabulary size to train
  d.tokenizer_path = ''  # sentencepiece: a .model file ('' trains one, cached); hf: a directory
  d.cache_dir = ''  # '' -> ~/.cache/pathways_jax
  d.seq_len = 128
  d.batch_size = 16  # global batch (rows), across all processes
  d.eval_batches = 8
  d.shuffle = True
  # corpus='preference': a JSONL of its own for validation ('' = 2% of data.path by hash);
  # corpus='prompts': held-out prompts, answered greedily and scored by the rewards.
  d.validation_path = ''
  # Special token ids: -1 = the tokenizer's (filled in when the run starts; the project's own
  # tokenizers use pad 0, bos 1, eos 2, mask 3). Set one only to give an id the tokenizer lacks.
  d.pad_id = -1
  d.bos_id = -1
  d.eos_id = -1
  d.mask_id = -1
  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.seed = 0  # the world's seed, apart from the training seed: same world across runs
  d.synthetic.num_people = 200
  d.synthetic.num_stories = 200
  d.synthetic.num_arithmetic = 2000
  # Copy documents: a line of made-up words, then the same line again (no facts; the second copy
  # is predictable only by copying the first, the data on which induction heads form).
  d.synthetic.num_copy_documents = 0
  d.chat = ml_collections.ConfigDict()  # corpus='chat' (supervised fine-tuning data)
  d.chat.train_on = 'assistant'  # 'assistant' turns only, or 'all' tokens
  d.chat.pack = True  # several conversations per row (segment ids keep them apart)
  d.chat.truncation = 'cut'  # a conversation longer than a row: 'cut' or 'drop' (both counted)
  d.chat.eos_padding = False  # one conversation per row, eos-padded and trained (LLaDA's SFT)
  # Random-token spans written over the TRAIN split (RHO-1 experiments); batches then carry a
  # per-token `noise` field. fraction 0: off, nothing changes.
  d.noise = ml_collections.ConfigDict()
  d.noise.fraction = 0.0  # expected share of the tokens overwritten
  d.noise.span_min = 4
  d.noise.span_max = 32
  d.noise.seed = 0  # apart from the training seed: the same noisy stream across runs

  c.train = t = ml_collections.ConfigDict()
  t.steps = 300
  t.lr = 3e-3
  t.min_lr_ratio = 0.1
  t.schedule = 'cosine'  # 'cosine' | 'wsd' | 'constant'
  t.warmup_steps = 30
  t.decay_fraction = 0.2  # WSD: fraction of steps spent decaying
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.grad_clip = 1.0
  t.grad_accum = 1
  # A regular expression over param paths ('blocks_0/attn/wq', 'final_norm/scale'): only the params
  # it matches in full are trained; the rest stay frozen, stored once (pathways_jax.train.trainable).
  # '' trains every param.
  t.trainable = ''
  t.z_loss = 0.0
  # The unembedding + cross-entropy (pathways_jax/tasks/lm_head.py): 'logits' holds the [B, L, V]
  # logits; 'fused' walks the vocabulary in chunks of cross_entropy_chunk columns and never does
  # (one more unembedding matmul in the backward); 'auto': fused from a vocabulary of 32768 up.
  t.cross_entropy = 'auto'
  t.cross_entropy_chunk = 4096
  t.log_every = 10
  t.eval_every = 100
  # Evaluate (validation loss and the task's own evaluations) before the first step of a fresh
  # run, logged at step 0: the start model's numbers on the run's own curves (HF's eval_on_start).
  t.eval_on_start = False
  t.checkpoint_every = 100
  t.keep_checkpoints = 2
  t.async_checkpoints = True
  t.peak_flops = 0.0  # per device; 0: measure the matmul peak at start-up (CPU) or look it up
  t.progress_bar = True
  t.stop_at = 0  # stop (with a checkpoint) after this step, keeping the schedule of train.steps
  # A run directory (trained here, or imported: python -m pathways_jax.interop.hf import) or a
  # HuggingFace model directory whose params a fresh run starts from (the optimizer starts fresh).
  # The model section's architecture is taken from it; its runtime fields (dtype, remat,
  # attention, ...) stay this run's; so is its tokenizer unless data.tokenizer_path names one.
  t.init_from = ''
  # DiffuLLaMA's attention-mask annealing while a bidirectional model adapts from a causal one
  # (train.init_from an AR run; pathways_jax/train/anneal.py): at step s each query sees the keys
  # before it plus each later key with probability min(1, (s + 1) / attention_anneal_steps).
  # 0: full bidirectional attention from the first step.
  t.attention_anneal_steps = 0

  c.diffusion = df = ml_collections.ConfigDict()  # LLaDA (objective='diffusion')
  df.eps = 1e-3  # p_mask = (1 - eps) t + eps
  df.random_length_prob = 0.01  # LLaDA: 1% of batches cut to a random length (no recompiles)
  df.eval_draws = 1  # mask draws per validation row, averaged: the bound's variance / draws

  post_training.add_sections(c)  # llada_sft, dpo, vrpo, reward_model, rl

  # RHO-1 selective language modelling (docs/rho1.md): train on the top `ratio` of the targets by
  # score; the base objective stays `objective` (autoregressive or diffusion).
  c.selective = sl = ml_collections.ConfigDict()
  sl.enabled = False
  sl.ratio = 0.6  # fraction of the valid targets kept, in (0, 1]
  sl.per_sequence = False  # rank within each row instead of across the global batch
  sl.score = 'excess'  # 'excess' | 'reference_loss' | 'reference_entropy' | 'random' | 'oracle'
  sl.mode = 'online'  # 'online': reference forward inside the step | 'offline': cached L_ref
  sl.reference = rf = ml_collections.ConfigDict()  # the reference model (a run directory)
  rf.workdir = ''  # its run dir (config.json + checkpoints); '' = WORKDIR/reference
  rf.step = 0  # checkpoint step; 0 = the newest
  rf.steps = 0  # > 0: train it first (ordinary pipeline) when rf.workdir has no checkpoint yet
  rf.corpus = ''  # its high-quality data: '' = data.corpus, always without data.noise
  rf.path = ''  # for rf.corpus='path'
  rf.max_documents = 0  # > 0: only the first N documents (a small clean slice)
  rf.d_model = 0  # 0: the model section's value
  rf.num_layers = 0
  rf.mlp_dim = 0

  c.sample = s = ml_collections.ConfigDict()
  s.prompts = ('def ', 'import ', 'class ')
  s.max_new_tokens = 48
  s.temperature = 0.8
  s.top_k = 0
  s.top_p = 0.0
  s.min_p = 0.1
  # Diffusion (LLaDA) sampling; steps/block_length 0 = one token per step, one block.
  s.steps = 0
  s.block_length = 0
  s.diffusion_temperature = 0.0
  s.cache = ''  # '' | 'prefix' | 'dual' (Fast-dLLM)
  s.threshold = 0.0  # > 0: Fast-dLLM confidence-threshold parallel decoding

  # Mesh axis sizes within a slice (-1: the rest); dcn_*: across slices (see parallel.py).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  c.mesh.rules = ()  # ((logical_name, mesh_axis | (axes, ...) | None), ...) over the defaults
  # The hardware a config is meant for; `--dry_run` compiles for it and checks that it fits.
  c.pod = ml_collections.ConfigDict()
  c.pod.name = ''
  c.pod.devices = 0  # 0: the product of the mesh sizes
  c.pod.hbm_gib = 0.0  # memory per device; 0: not checked
  c.pod.peak_flops = 0.0  # per device, for the time estimate (else train.peak_flops)

  # Growth inside a run (docs/growth.md): config.model trains until growth.at_step (or at_tokens),
  # then grows by depth_factor x width_factor (pathways_jax.growth) and training goes on.
  c.growth = gr = ml_collections.ConfigDict()
  gr.depth_factor = 1  # 1 and width_factor 1: no growth
  gr.width_factor = 1
  gr.at_step = 0  # grow after this many steps (0: grow the initial model before training)
  gr.at_tokens = 0  # > 0: instead of at_step, the first step with >= this many tokens seen
  gr.method = 'stack'  # 'stack' | 'interleave' | 'zero' | 'random'
  gr.width_method = 'direct'  # 'direct' | 'zero'
  gr.optimizer = 'fresh'  # 'fresh' (new AdamW state) | 'map' (moments grown like the params)
  gr.rewarmup_steps = 0  # LR ramp 0 -> the global schedule's value over this many steps
  gr.noise = 0.0  # multiplicative noise on the grown weight matrices
  gr.split_noise = 0.0  # width 'direct': uneven fan-in split (stays function-preserving)
  return c


_CHOICES = {
    'objective': ('autoregressive', 'diffusion'),
    'host_malloc': ('default', 'reuse'),
    'model.dtype': ('float32', 'bfloat16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.remat': ('none', 'full', 'dots'),
    'model.lora_quantize': ('', 'int8', 'int4', 'nf4'),  # adapters.qlora.QTYPES
    'data.corpus': ('stdlib', 'synthetic', 'path', 'tfds', 'prepared', 'rows', 'chat',
                    'preference', 'prompts'),
    'data.chat.train_on': ('assistant', 'all'),
    'data.chat.truncation': ('cut', 'drop'),
    'data.tokenizer': ('sentencepiece', 'byte', 'hf'),
    'train.schedule': ('cosine', 'wsd', 'constant'),
    'train.cross_entropy': ('auto', 'fused', 'logits'),
    'selective.score': ('excess', 'reference_loss', 'reference_entropy', 'random', 'oracle'),
    'selective.mode': ('online', 'offline'),
    'growth.method': ('stack', 'interleave', 'zero', 'random'),
    'growth.width_method': ('direct', 'zero'),
    'growth.optimizer': ('fresh', 'map'),
    **post_training.CHOICES,
}


def _get(cfg, dotted):
  node = cfg
  for part in dotted.split('.'):
    if part not in node:
      return None
    node = node[part]
  return node


def choices(key: str) -> tuple[str, ...]:
  """The values a string-valued key such as 'model.attention' may take."""
  if key == 'model.attention':  # a registry: config files may add backends
    from pathways_jax.models import attention_backends  # pylint: disable=g-import-not-at-top
    return attention_backends.names()
  return _CHOICES[key]


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Semantic checks that ml_collections' type safety cannot express."""
  for key, choices in _CHOICES.items():
    value = _get(cfg, key)
    if value is not None and value not in choices:
      raise ConfigError(f'config.{key}={value!r} is not one of {choices}')
  m, d, t = cfg.model, cfg.data, cfg.train
  from pathways_jax.models import attention_backends  # pylint: disable=g-import-not-at-top
  if m.attention not in attention_backends.names():  # a config file may register its own
    raise ConfigError(f'config.model.attention={m.attention!r} is not one of '
                      f'{attention_backends.names()}')
  positive = {'model.d_model': m.d_model, 'model.num_layers': m.num_layers,
              'model.num_heads': m.num_heads, 'model.num_kv_heads': m.num_kv_heads,
              'model.mlp_dim': m.mlp_dim, 'data.seq_len': d.seq_len,
              'data.batch_size': d.batch_size, 'train.grad_accum': t.grad_accum,
              'train.log_every': t.log_every, 'train.eval_every': t.eval_every,
              'train.checkpoint_every': t.checkpoint_every,
              'diffusion.eval_draws': (cfg.get('diffusion') or {}).get('eval_draws', 1)}
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f'config.{key} must be positive, got {value}')
  if t.steps < 0:
    raise ConfigError(f'config.train.steps must be >= 0, got {t.steps}')
  anneal_steps = t.get('attention_anneal_steps', 0)
  if anneal_steps < 0:
    raise ConfigError(f'config.train.attention_anneal_steps must be >= 0, got {anneal_steps}')
  if anneal_steps and m.causal:
    raise ConfigError('config.train.attention_anneal_steps anneals a bidirectional model\'s '
                      'attention from causal to full; this model is causal (set '
                      'config.model.causal=False to adapt it into a diffusion model)')
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f'config.model.num_heads={m.num_heads} is not a multiple of '
                      f'config.model.num_kv_heads={m.num_kv_heads}')
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f'config.model.d_model={m.d_model} is not divisible by '
                      f'config.model.num_heads={m.num_heads} (or set model.head_dim)')
  if (m.head_dim or m.d_model // m.num_heads) % 2:
    raise ConfigError('the head dimension must be even for RoPE')
  if d.seq_len > m.max_len:
    raise ConfigError(f'config.data.seq_len={d.seq_len} exceeds config.model.max_len={m.max_len}')
  if d.batch_size % t.grad_accum:
    raise ConfigError(f'config.data.batch_size={d.batch_size} is not divisible by '
                      f'config.train.grad_accum={t.grad_accum}')
  if d.corpus in ('path', 'prepared', 'rows', 'chat', 'preference', 'prompts') and not d.path:
    raise ConfigError(f"config.data.corpus={d.corpus!r} needs config.data.path")
  if d.corpus == 'rows' and d.tokenizer == 'sentencepiece' and not d.tokenizer_path:
    raise ConfigError("config.data.corpus='rows' holds token ids: name the tokenizer that made "
                      'them (config.data.tokenizer_path; there is no text to train one on)')
  if d.get('validation_path') and d.corpus not in ('preference', 'prompts'):
    raise ConfigError(f"config.data.validation_path is read for corpus='preference' or 'prompts' "
                      f'only (the corpus is {d.corpus!r})')
  if d.corpus == 'prepared' and d.get('noise') is not None and d.noise.fraction > 0:
    raise ConfigError("config.data.noise is applied when a corpus is packed in memory; "
                      "corpus='prepared' rows are packed already")
  if d.corpus == 'tfds' and not d.tfds_name:
    raise ConfigError("config.data.corpus='tfds' needs config.data.tfds_name")
  if not 0.0 <= t.min_lr_ratio <= 1.0:
    raise ConfigError(f'config.train.min_lr_ratio={t.min_lr_ratio} is not in [0, 1]')
  if t.warmup_steps < 0:
    raise ConfigError(f'config.train.warmup_steps must be >= 0, got {t.warmup_steps}')
  if cfg.objective == 'diffusion' and m.causal:
    raise ConfigError("config.objective='diffusion' needs config.model.causal=False")
  _validate_adapters(cfg)
  if m.get('shift_logits') and m.causal:
    raise ConfigError('config.model.shift_logits=True is for bidirectional models '
                      '(config.model.causal=False); a causal model already predicts the next token')
  if m.get('causal_query_blocks', 1) < 1:
    raise ConfigError(f'config.model.causal_query_blocks must be >= 1, got {m.causal_query_blocks}')
  gr = cfg.get('growth')
  if gr is not None:
    for key in ('depth_factor', 'width_factor'):
      if gr[key] < 1:
        raise ConfigError(f'config.growth.{key} must be >= 1 (growth cannot shrink a model), '
                          f'got {gr[key]}')
    for key in ('at_step', 'at_tokens', 'rewarmup_steps'):
      if gr[key] < 0:
        raise ConfigError(f'config.growth.{key} must be >= 0, got {gr[key]}')
    if gr.at_step and gr.at_tokens:
      raise ConfigError('config.growth.at_step and config.growth.at_tokens are both set: '
                        'give one')
    if t.get('trainable') and (gr.depth_factor > 1 or gr.width_factor > 1):
      raise ConfigError('config.train.trainable (training a subset) and config.growth cannot be '
                        'combined yet: the grown model would need its own split')
  _validate_selective(cfg)


def chat_paths(data_cfg) -> list[str]:
  """The JSONL files data.path names for corpus 'chat': one, or K comma-separated (multi-LoRA:
  file k trains adapter k)."""
  return [p.strip() for p in str(data_cfg.path).split(',') if p.strip()]


def _validate_adapters(cfg) -> None:
  """Multi-LoRA (model.lora_num_adapters) and QLoRA (model.lora_quantize) runs."""
  m, d, t = cfg.model, cfg.data, cfg.train
  k, rank = m.get('lora_num_adapters', 1), m.get('lora_rank', 0)
  if k < 1:
    raise ConfigError(f'config.model.lora_num_adapters must be >= 1, got {k}')
  if t.get('cross_entropy_chunk', 1) < 1:
    raise ConfigError(f'config.train.cross_entropy_chunk={t.cross_entropy_chunk} must be a '
                      'positive number of vocabulary columns')
  if t.get('cross_entropy') == 'fused' and m.get('lora_quantize'):
    raise ConfigError("config.train.cross_entropy='fused' reads the unembedding directly; a QLoRA "
                      "base (model.lora_quantize) holds it quantised: use 'auto' or 'logits'")
  if k > 1 and rank < 1:
    raise ConfigError(f'config.model.lora_num_adapters={k} needs config.model.lora_rank > 0 '
                      '(K adapters of that rank)')
  if k > 1 and d.corpus != 'chat':
    raise ConfigError(f'config.model.lora_num_adapters={k} trains each adapter on its own data: '
                      "set config.data.corpus='chat' with data.path naming K JSONL files "
                      '(comma-separated) or one whose lines carry "adapter": k')
  if d.corpus == 'chat':
    n = len(chat_paths(d))
    if n > 1 and n != k:
      raise ConfigError(f'config.data.path names {n} files for config.model.lora_num_adapters='
                        f'{k}: give one file per adapter, or one file whose lines carry '
                        '"adapter": k')
  quantize = m.get('lora_quantize', '')
  if quantize:
    if rank < 1:
      raise ConfigError(f'config.model.lora_quantize={quantize!r} quantises the frozen base '
                        'under LoRA adapters: set config.model.lora_rank > 0')
    if not t.get('init_from'):
      raise ConfigError(f'config.model.lora_quantize={quantize!r} needs the base to quantise: '
                        'set config.train.init_from (a run or HF directory); a random base is '
                        'not worth fine-tuning')
    if m.get('lora_quantize_block', 64) < 0:
      raise ConfigError('config.model.lora_quantize_block must be >= 0, got '
                        f'{m.lora_quantize_block}')
    if importlib.util.find_spec('qwix') is None:
      raise ConfigError(f'config.model.lora_quantize={quantize!r} quantises with qwix, which is '
                        'not installed: pip install -e ".[qlora]"')


def _validate_selective(cfg) -> None:
  noise = cfg.data.get('noise')
  if noise is not None:
    if not 0.0 <= noise.fraction < 1.0:
      raise ConfigError(f'config.data.noise.fraction={noise.fraction} is not in [0, 1)')
    if not 1 <= noise.span_min <= noise.span_max:
      raise ConfigError('config.data.noise needs 1 <= span_min <= span_max, got '
                        f'{noise.span_min}, {noise.span_max}')
  sl = cfg.get('selective')
  if sl is None or not sl.enabled:
    return
  if not 0.0 < sl.ratio <= 1.0:
    raise ConfigError(f'config.selective.ratio={sl.ratio} is not in (0, 1]')
  if sl.mode == 'offline' and cfg.objective == 'diffusion':
    raise ConfigError("config.selective.mode='offline' is for objective='autoregressive': LLaDA's "
                      "reference loss depends on the mask drawn at each step (use 'online')")
  if sl.mode == 'offline' and sl.score == 'reference_entropy':
    raise ConfigError("config.selective.score='reference_entropy' needs mode='online' (the cache "
                      'holds losses only)')
  if sl.score == 'oracle' and not (noise is not None and noise.fraction > 0):
    raise ConfigError("config.selective.score='oracle' needs known noise "
                      '(config.data.noise.fraction > 0)')
  if cfg.train.z_loss:
    raise ConfigError('config.selective.enabled does not support config.train.z_loss')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model section as a hashable dataclass (Linen module attributes must be hashable)."""
  vocab_size: int
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0
  mlp_dim: int = 512
  max_len: int = 512
  causal: bool = True
  shift_logits: bool = False
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  scan_layers: bool = False
  attention: str = 'xla'
  causal_query_blocks: int = 4
  init_std: float = 0.02
  qkv_bias: bool = False
  qk_norm: bool = False
  rope_scaling: str = ''
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 0
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: str = 'all-linear'
  lora_rslora: bool = False
  lora_dropout: float = 0.0
  lora_num_adapters: int = 1
  scalar_head: bool = False

  def __post_init__(self):
    # config.validate() names the key for configs; this catches a ModelConfig built in code.
    if self.causal_query_blocks < 1:
      raise ConfigError(f'model.causal_query_blocks={self.causal_query_blocks} must be >= 1 '
                        '(1: one block, the full [L, L] scores)')
    if self.shift_logits and self.causal:
      raise ConfigError('model.shift_logits=True needs a bidirectional model (causal=False)')
    if self.rope_scaling not in ('', 'llama3', 'linear'):
      raise ConfigError(f"model.rope_scaling={self.rope_scaling!r} is not one of ('', 'llama3', "
                        "'linear')")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ConfigError(f'model.lora_dropout={self.lora_dropout} is not in [0, 1)')
    if self.lora_num_adapters < 1 or (self.lora_num_adapters > 1 and self.lora_rank < 1):
      raise ConfigError(f'model.lora_num_adapters={self.lora_num_adapters} must be 1, or > 1 '
                        f'with model.lora_rank > 0 (got lora_rank={self.lora_rank})')
    if self.rope_scaling == 'llama3' and self.rope_original_max_len <= 0:
      raise ConfigError("model.rope_scaling='llama3' needs model.rope_original_max_len > 0")

  @property
  def rope(self) -> tuple:
    """What the rotary frequencies depend on (hashable): (theta, scaling, its parameters)."""
    return (self.rope_theta, self.rope_scaling, self.rope_scaling_factor,
            self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_len)

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @classmethod
  def from_config(cls, model_cfg: Any, vocab_size: int | None = None) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(model_cfg).items() if k in fields}
    if vocab_size is not None and not values.get('vocab_size'):
      values['vocab_size'] = vocab_size
    if not values.get('vocab_size'):
      raise ConfigError('model.vocab_size is unknown: set it or let the tokenizer provide it')
    return cls(**values)

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)


def round_vocab(n: int, multiple: int = 8) -> int:
  return -(-n // multiple) * multiple
