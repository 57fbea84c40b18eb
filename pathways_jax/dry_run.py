"""Check a pod config on a laptop: mesh, sharded state, compiled train step, memory and FLOPs.

    python -m pathways_jax.main --config=experiments/pods/llada_8b_v5p128.py --dry_run \
        [--dry_run_devices=64] [--config.pod.hbm_gib=95]

Builds the config's mesh over N fake CPU devices (N: --dry_run_devices, else `config.pod.devices`,
else the product of the mesh sizes), compiles the real train step ahead of time on abstract
inputs (`jax.jit(...).lower(ShapeDtypeStructs).compile()`: nothing is allocated, no data is read)
and prints the per-device memory from `compiled.memory_analysis()`, the FLOPs per step (the
compiler's count and the 6ND formula) and the expected step count, tokens and time.

The memory figures are what XLA's CPU compiler assigns for the same sharded program; a TPU or
GPU compiler fuses and lays out differently, so treat temp memory as an estimate (the state
figure — params + optimizer per device — is exact). With `config.pod.hbm_gib` set, an estimated
peak over the device memory is an error (exit status 1).
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np

ASSUMED_MFU = 0.4  # for the time estimate only


def prepare_devices(n: int) -> None:
  """Makes JAX see `n` CPU devices. Must run before JAX initialises a backend."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])
  if 'jax' in sys.modules:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', n)


def devices_for(cfg, requested: int | None = None) -> int:
  from pathways_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  if requested:
    return requested
  pod = cfg.get('pod')
  if pod is not None and pod.get('devices'):
    return int(pod.devices)
  m = cfg.mesh
  sizes = [m.data, m.fsdp, m.tensor, m.get('dcn_data', 1), m.get('dcn_fsdp', 1),
           m.get('dcn_tensor', 1)]
  if -1 in sizes:
    raise ConfigError('dry run: the mesh has a -1 size; give --dry_run_devices=N (or config.pod.'
                      'devices)')
  return math.prod(sizes)


def _gib(b: float) -> str:
  return f'{b / 2**30:,.2f} GiB'


def _model(cfg):
  from pathways_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  # A sentencepiece model is not trained in a dry run; the project's own tokenizers all have the
  # byte tokenizer's special ids. Byte and HF tokenizers cost nothing to load.
  if cfg.train.get('init_from'):  # the architecture (and tokenizer) of the model it starts from
    from pathways_jax.interop.hf import run_dir  # pylint: disable=g-import-not-at-top
    run_dir.adopt_init_from(cfg)
  own = cfg.data.tokenizer == 'sentencepiece' and not cfg.data.tokenizer_path
  tokenizer = None if own else tokenizers.get_tokenizer(cfg.data)
  tokenizers.resolve_special_ids(cfg, tokenizer or tokenizers.ByteTokenizer())
  vocab = cfg.model.vocab_size
  if not vocab:
    if tokenizer is None:
      raise config_lib.ConfigError('dry run: set config.model.vocab_size (the sentencepiece '
                                   'tokenizer is not built in a dry run)')
    vocab = config_lib.round_vocab(tokenizer.vocab_size)
  model_cfg = config_lib.ModelConfig.from_config(cfg.model, vocab_size=vocab)
  return model_cfg, Transformer(model_cfg)


def run(cfg, *, num_devices: int | None = None, out=print) -> dict:
  """Compiles the train step of `cfg` for its mesh over fake devices; returns the report dict."""
  n = devices_for(cfg, num_devices)
  prepare_devices(n)
  import jax  # pylint: disable=g-import-not-at-top
  from pathways_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax import parallel  # pylint: disable=g-import-not-at-top
  from pathways_jax.models.transformer import count_params  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import optimizer as opt_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from pathways_jax import tasks  # pylint: disable=g-import-not-at-top

  if jax.device_count() != n:
    raise config_lib.ConfigError(f'dry run: wanted {n} fake devices but JAX has '
                                 f'{jax.device_count()} (was a JAX backend started before?)')
  config_lib.validate(cfg)
  mesh = parallel.make_mesh(cfg)
  rules = parallel.logical_rules(cfg)
  parallel.check_batch(cfg, mesh)
  model_cfg, model = _model(cfg)
  tx = opt_lib.make_optimizer(cfg.train)
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  B, L = cfg.data.batch_size, cfg.data.seq_len
  example = np.zeros((B, L), np.int32)  # traced only (eval_shape): nothing runs
  from pathways_jax.train import trainable as trainable_lib  # pylint: disable=g-import-not-at-top
  abstract, shardings, frozen_abstract, frozen_shardings = state_lib.split_state_and_shardings(
      model, tx, example, mesh, rules, trainable_lib.run_pattern(cfg, model_cfg))
  state_in = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  run_model, n_params = model, count_params(trainable_lib.merge(abstract.params, frozen_abstract))
  if cfg.model.get('lora_quantize'):  # QLoRA: the frozen base held as the run holds it
    from pathways_jax.adapters import qlora  # pylint: disable=g-import-not-at-top
    qcfg = qlora.run_quant_config(cfg)
    frozen_abstract = jax.eval_shape(lambda p: qlora.quantize_base(p, qcfg), frozen_abstract)
    frozen_shardings = qlora.quantized_shardings(frozen_abstract, frozen_shardings, qcfg)
    run_model = qlora.quantized_model(model)
  task = tasks.make(cfg, run_model)
  tokenizers.require_special_ids(cfg, task.required_specials, f'task {task.name!r}')
  frozen_in = task.abstract_frozen(mesh, rules)  # e.g. a reference's params, as shapes
  batch_in = task.batch_spec(B, L, sharding=parallel.batch_sharding(mesh))
  frozen_in_shapes = None if frozen_abstract is None else jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), frozen_abstract,
      frozen_shardings)
  step_args, input_shardings = step_lib.step_inputs(frozen_in, frozen_in_shapes, frozen_shardings)
  train_fn = step_lib.jit_train_step(cfg, task, tx, shardings, mesh, input_shardings)
  from pathways_jax.models import attention_backends  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(mesh), attention_backends.recording() as attention_choices:
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    with nn.logical_axis_rules(rules):
      compiled = train_fn.lower(state_in, batch_in, *step_args).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  frozen_bytes = (0 if frozen_abstract is None
                  else parallel.sharded_bytes(frozen_abstract, frozen_shardings))
  state_bytes = parallel.sharded_bytes(abstract, shardings) + frozen_bytes  # + frozen params
  param_bytes = parallel.sharded_bytes(abstract.params, shardings.params) + frozen_bytes
  args = getattr(mem, 'argument_size_in_bytes', 0)
  outs = getattr(mem, 'output_size_in_bytes', 0)
  alias = getattr(mem, 'alias_size_in_bytes', 0)
  temp = getattr(mem, 'temp_size_in_bytes', 0)
  code = getattr(mem, 'generated_code_size_in_bytes', 0)
  peak = args + outs - alias + temp
  tokens_per_step = B * L
  fpt = metrics_lib.flops_per_token(model_cfg, L)
  model_flops = fpt * tokens_per_step
  compiled_flops = float(cost.get('flops', 0.0)) * n if cost else 0.0
  steps = min(cfg.train.stop_at or cfg.train.steps, cfg.train.steps)
  pod = cfg.get('pod') or {}
  peak_flops = cfg.train.peak_flops or pod.get('peak_flops', 0.0)
  hbm = pod.get('hbm_gib', 0.0)
  report = {
      'devices': n, 'mesh': dict(mesh.shape), 'params': n_params,
      'state_bytes_per_device': state_bytes, 'param_bytes_per_device': param_bytes,
      'argument_bytes': args, 'output_bytes': outs, 'alias_bytes': alias, 'temp_bytes': temp,
      'generated_code_bytes': code, 'peak_bytes_per_device': peak,
      'model_flops_per_step': model_flops, 'compiled_flops_per_step': compiled_flops,
      'flops_per_token': fpt, 'tokens_per_step': tokens_per_step, 'steps': steps,
      'total_tokens': steps * tokens_per_step, 'hbm_gib': hbm,
  }
  name = pod.get('name') or f'{n} devices'
  out(f'dry run: {cfg.name} on {name} ({n} fake CPU devices), mesh {dict(mesh.shape)}')
  out(f'  model: {n_params / 1e9:.3f}B params, {model_cfg.num_layers} layers, '
      f'd={model_cfg.d_model}, heads={model_cfg.num_heads}/{model_cfg.num_kv_heads}, '
      f'mlp={model_cfg.mlp_dim}, vocab={model_cfg.vocab_size}, task {task.describe()}, '
      f'param {model_cfg.param_dtype} / compute {model_cfg.dtype}, remat={model_cfg.remat}')
  out(f'  rules: {parallel.describe_rules(rules)}')
  out(f'  batch: {B} x {L} = {tokens_per_step:,} tokens/step, {B // parallel.data_parallel_size(mesh)}'
      f' rows per data-parallel shard, grad_accum={cfg.train.grad_accum}')
  out('  per-device memory (compiled memory analysis):')
  out(f'    params + optimizer state  {_gib(state_bytes)}  (params {_gib(param_bytes)})')
  out(f'    arguments {_gib(args)}, outputs {_gib(outs)}, aliased (donated) {_gib(alias)}, '
      f'temp {_gib(temp)}, code {_gib(code)}')
  fits = ''
  if hbm:
    fits = 'fits' if peak <= hbm * 2**30 else 'DOES NOT FIT'
    fits = f' of {hbm:g} GiB HBM: {fits}'
  out(f'    estimated peak            {_gib(peak)}{fits}')
  # Chosen when tracing for the fake CPU devices: on the target platform a GPU/TPU kernel
  # that the CPU cannot take here may be taken (the line gives the reason it was not).
  report['attention'] = attention_backends.summarize(attention_choices)
  out(f'  attention (as compiled here, on CPU): {"; ".join(report["attention"])}')
  from pathways_jax.tasks import lm_head  # pylint: disable=g-import-not-at-top
  fused = lm_head.fused(cfg, model_cfg)
  report['cross_entropy'] = 'fused' if fused else 'logits'
  out(f'  cross-entropy: {report["cross_entropy"]} (train.cross_entropy='
      f'{cfg.train.get("cross_entropy", "logits")!r}; rerun with --config.train.cross_entropy='
      f'{"logits" if fused else "fused"} for the other path\'s temp memory)')
  if model_cfg.scan_layers:
    counted = "the compiler's count is not shown: XLA counts a scanned layer stack once"
  else:
    counted = f'the compiler counts {compiled_flops:.3e} on all devices, incl. recompute'
  out(f'  FLOPs per step: {model_flops:.3e} (6ND + attention, the MFU numerator); {counted}')
  line = f'  steps: {steps:,} -> {steps * tokens_per_step:,.0f} tokens'
  if n_params:
    line += f' ({steps * tokens_per_step / n_params:.1f} tokens/param)'
  if peak_flops:
    t_step = model_flops / (n * peak_flops * ASSUMED_MFU)
    report.update(step_seconds_at_assumed_mfu=t_step)
    line += (f'; at {ASSUMED_MFU:.0%} MFU of {peak_flops / 1e12:g} TFLOP/s/device: '
             f'{t_step:.2f} s/step, {t_step * steps / 3600:,.1f} h')
  out(line)
  from pathways_jax.growth import in_run as growth_phase  # pylint: disable=g-import-not-at-top
  for growth_line in growth_phase.describe(cfg, model_cfg):  # config.growth: plan + G_stack guideline
    out('  ' + growth_line)
  if hbm and peak > hbm * 2**30:
    raise config_lib.ConfigError(
        f'dry run: estimated peak {_gib(peak)} per device exceeds {hbm:g} GiB: raise mesh.fsdp, '
        'use model.remat, lower data.batch_size (or raise train.grad_accum)')
  return report
