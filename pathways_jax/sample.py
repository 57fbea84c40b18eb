"""Sample from a trained run directory.

    python -m pathways_jax.sample --workdir=runs/quickstart --prompt='def ' [--prompt=...]
        [--max_new_tokens=64 --temperature=0.8 --top_p=0.9 --min_p=0.05 --step=N] [--adapter=K]

AR runs decode with the KV cache; diffusion (LLaDA) runs use the diffusion sampler. A multi-LoRA
run (model.lora_num_adapters = K > 1) samples from adapter `--adapter`, or from every adapter
(each prompt K times in one batch, labelled) without it. A QLoRA run (model.lora_quantize)
samples from the model it trained: its base quantised again, read dequantised.
"""
from __future__ import annotations

import logging
import sys

import jax
import numpy as np
from absl import app, flags

_ARGS = flags


def _encode_prompts(tokenizer, prompts):
  """Left-padded [B, P] prompt ids (BOS + text) and the mask of real tokens."""
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  width = max(len(x) for x in ids)
  tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(ids), width), bool)
  for i, x in enumerate(ids):
    tokens[i, width - len(x):] = x
    mask[i, width - len(x):] = True
  return tokens, mask


def sample_texts(cfg, model, params, tokenizer, *, key, prompts=None, adapter: int | None = None,
                 **overrides) -> list[str]:
  """Prompt + continuation strings for `prompts` (default: config.sample.prompts). A multi-LoRA
  model samples each prompt from adapter `adapter`, or (None) from every adapter in one batch,
  each text then starting '[adapter k] '."""
  s = dict(cfg.sample)
  s.update({k: v for k, v in overrides.items() if v is not None})
  prompts = list(prompts if prompts is not None else s['prompts'])
  if not prompts:
    return []
  num_adapters = model.cfg.lora_num_adapters
  if adapter is not None and not 0 <= adapter < num_adapters:
    raise ValueError(f'adapter {adapter} is not in [0, {num_adapters}) '
                     '(model.lora_num_adapters)' if num_adapters > 1 else
                     f'adapter {adapter}: this is not a multi-LoRA model '
                     '(model.lora_num_adapters=1)')
  ids, labels = None, [''] * len(prompts)
  if num_adapters > 1:
    which = [adapter] if adapter is not None else list(range(num_adapters))
    ids = np.repeat(np.asarray(which, np.int32), len(prompts))
    labels = [f'[adapter {k}] ' if adapter is None else '' for k in which for _ in prompts]
    prompts = prompts * len(which)
  tokens, mask = _encode_prompts(tokenizer, prompts)
  new = min(s['max_new_tokens'], model.cfg.max_len - tokens.shape[1])
  if new < 1:
    raise ValueError(f'prompts of {tokens.shape[1]} tokens leave no room within model.max_len='
                     f'{model.cfg.max_len}')
  if model.cfg.causal:
    from pathways_jax.sampling import autoregressive  # pylint: disable=g-import-not-at-top
    out = autoregressive.generate(model, params, tokens, key=key, max_new_tokens=new,
                                  temperature=s['temperature'], top_k=s['top_k'],
                                  top_p=s['top_p'], min_p=s['min_p'], prompt_mask_BP=mask,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                  adapter_ids_B=ids)
  else:
    if ids is not None:
      raise ValueError('the diffusion sampler passes no adapter ids: sample one adapter of a '
                       'multi-LoRA LLaDA model (load_run(adapter=k), sample --adapter=k)')
    from pathways_jax.sampling import diffusion  # pylint: disable=g-import-not-at-top
    block = min(s.get('block_length') or new, new)
    new = (new // block) * block
    blocks = new // block
    steps = min(s.get('steps') or new, new)
    steps = max(blocks, (steps // blocks) * blocks)  # LLaDA needs steps divisible by blocks
    out = diffusion.generate(model, params, tokens, mask_id=tokenizer.mask_id, key=key,
                             gen_length=new, steps=steps, block_length=block,
                             temperature=s.get('diffusion_temperature', 0.0),
                             cache=s.get('cache') or None, threshold=s.get('threshold') or None,
                             prompt_mask_BP=mask, eos_id=tokenizer.eos_id,
                             eos_low_confidence=True)
  out = np.asarray(out)
  texts = []
  for i, prompt in enumerate(prompts):
    gen = [int(t) for t in out[i, tokens.shape[1]:]]
    if tokenizer.eos_id in gen:
      gen = gen[:gen.index(tokenizer.eos_id)]
    texts.append(labels[i] + prompt + tokenizer.decode(gen))
  return texts


def load_run(workdir: str, step: int | None = None, adapter: int | None = None):
  """(cfg, model, params, tokenizer) from a run directory's config.json and checkpoint `step`
  (default: the newest); only the params are read (train.frozen). A QLoRA run's model is the
  one it trained (its base quantised, read dequantised: adapters.qlora). `adapter` (a multi-LoRA
  run's): that adapter alone, as a one-adapter model."""
  from pathways_jax import config as config_lib, parallel  # pylint: disable=g-import-not-at-top,multiple-import
  from pathways_jax import config_files  # pylint: disable=g-import-not-at-top
  from pathways_jax.adapters import qlora  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
  cfg = config_files.load_run_config(workdir)
  config_lib.validate(cfg)
  fm = frozen.load(workdir, parallel.make_mesh(cfg), parallel.logical_rules(cfg), step=step,
                   keep_quantized=qlora.run_quant_config(cfg) is not None)
  model, params = fm.model, fm.params
  if adapter is not None:
    model, params = select_adapter(model, params, adapter)
  model, params = qlora.run_model_and_params(model, params, cfg)
  return cfg, model, params, tokenizers.get_tokenizer(cfg.data)


def select_adapter(model, params, k: int):
  """(model, params) of adapter k of a multi-LoRA model alone (model.lora_num_adapters=1)."""
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  n = model.cfg.lora_num_adapters
  if n == 1:
    raise ValueError(f'adapter {k}: this run trained one adapter (model.lora_num_adapters=1); '
                     'leave the adapter out')
  if not 0 <= k < n:
    raise ValueError(f'adapter {k} is not in [0, {n}) (this run trained {n} adapters)')
  base, adapters = lora.split(params)
  return (model.clone(cfg=model.cfg.replace(lora_num_adapters=1)),
          lora.combine(base, lora.select(adapters, k)))


def main(argv):
  del argv
  f = flags.FLAGS
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's INFO lines would bury the text
  logging.getLogger('jax').setLevel(logging.WARNING)
  from pathways_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    # --adapter: that adapter alone, a one-adapter model (which the LLaDA sampler takes too).
    cfg, model, params, tokenizer = load_run(f.workdir, f.step, adapter=f.adapter)
    texts = sample_texts(cfg, model, params, tokenizer, key=jax.random.key(f.seed),
                         prompts=f.prompt or None, max_new_tokens=f.max_new_tokens,
                         temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, min_p=f.min_p)
  except (FileNotFoundError, CheckpointError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for t in texts:
    print(t)
    print('-' * 40)
  return 0


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'run directory', required=True)
  flags.DEFINE_multi_string('prompt', [], 'prompt(s); default: the config\'s sample.prompts')
  flags.DEFINE_integer('step', None, 'checkpoint step (default: newest)')
  flags.DEFINE_integer('max_new_tokens', None, 'tokens to generate')
  flags.DEFINE_float('temperature', None, '0 = greedy')
  flags.DEFINE_integer('top_k', None, 'keep the k most likely tokens')
  flags.DEFINE_float('top_p', None, 'nucleus sampling mass')
  flags.DEFINE_float('min_p', None, 'keep tokens with p >= min_p * p_max')
  flags.DEFINE_integer('seed', 0, 'sampling seed')
  flags.DEFINE_integer('adapter', None, 'a multi-LoRA run: sample from this adapter (default: '
                       'from each)')
  app.run(lambda argv: sys.exit(main(argv)))
