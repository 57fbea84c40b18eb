"""Golden PEFT adapters for `pathways_jax.interop.hf`, made by peft itself (called by make_golden.py,
which writes the base checkpoints they adapt; needs torch, transformers and peft).

`peft/<case>/`: a PEFT LoRA adapter made and saved by peft itself on one of make_golden.py's
cases, its A and B re-initialised from a seeded generator (nonzero, so the adapter moves
the logits by O(1)), and `golden.npz` with `tokens` int32 [2, 64] and `logits` float32 [2, 64,
vocab], the PeftModel's eval logits (peft's own README.md model card is not kept; target_modules,
a set in peft, sorted). Cases:
`llama_lora` (all seven linear layers of both blocks, lora_alpha / r) and `qwen3_rslora` (rsLoRA,
q_proj/o_proj/up_proj of the second block only, on qwen3 whose q/o projections are not square;
lora_dropout 0.1, which eval ignores).

`peft/llama_rm_lora` (`--only peft_rm`): a SEQ_CLS adapter of the `llama_rm` reward model, its
adapters and saved `score` head re-initialised; golden.npz holds rewards (write_peft_reward_model).
"""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import safetensors
import torch
import transformers

PEFT_TOKENS = 64
ALL_LINEAR = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
PEFT_CASES = {
    'llama_lora': dict(base='llama', seed=11, config=dict(
        r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0)),
    'qwen3_rslora': dict(base='qwen3', seed=12, config=dict(
        r=8, lora_alpha=4, use_rslora=True, target_modules=['q_proj', 'o_proj', 'up_proj'],
        layers_to_transform=[1], lora_dropout=0.1)),
}


def init_lora(model: torch.nn.Module, seed: int) -> None:
  """Seeded nonzero A and B: A N(0, 1/in), B N(0, 0.25/r), so scale * B @ A is of the size of the
  base weights and a wrong layout moves the logits by O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if '.lora_A.' in name:  # [r, in]
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
      elif '.lora_B.' in name:  # [out, r]
        p.copy_(0.5 * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def write_peft(out: pathlib.Path, batch: int) -> list[dict]:
  import peft  # pylint: disable=g-import-not-at-top
  reports = []
  for name, case in PEFT_CASES.items():
    d = out / 'peft' / name
    if d.exists():
      shutil.rmtree(d)
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(
        out / case['base'], dtype=torch.float32, attn_implementation='eager').eval()
    base = load()
    rng = np.random.default_rng(2000 + case['seed'])
    tokens = rng.integers(0, base.config.vocab_size, size=(batch, PEFT_TOKENS), dtype=np.int32)
    ids = torch.from_numpy(tokens).long()
    with torch.no_grad():
      base_logits = base(ids).logits.float()
    model = peft.get_peft_model(base, peft.LoraConfig(task_type='CAUSAL_LM', **case['config']))
    model.peft_config['default'].base_model_name_or_path = f'tests/golden/hf/{case["base"]}'
    init_lora(model, case['seed'])
    model.eval()
    with torch.no_grad():
      logits = model(ids).logits.float()
    moved = float((logits - base_logits).abs().max())
    assert moved > 0.5, (name, moved)  # the adapter matters
    model.save_pretrained(d)
    (d / 'README.md').unlink(missing_ok=True)  # peft's model card template
    # peft keeps target_modules as a set, so their order in the file follows the hash seed:
    # sorted, the file is the same on every run (what it selects is unchanged).
    config_path = d / 'adapter_config.json'
    written = json.loads(config_path.read_text())
    written['target_modules'] = sorted(written['target_modules'])
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True))
    np.savez_compressed(d / 'golden.npz', tokens=tokens, logits=logits.numpy().astype(np.float32))
    # What was saved loads into the same logits on a fresh base.
    reloaded = peft.PeftModel.from_pretrained(load(), d).eval()
    with torch.no_grad():
      again = reloaded(ids).logits.float()
    np.testing.assert_array_equal(again.numpy(), logits.numpy())
    report = {'case': f'peft/{name}', 'max_abs_logit': float(logits.abs().max()),
              'moved_from_base': moved, 'files': {}}
    with safetensors.safe_open(str(d / 'adapter_model.safetensors'), framework='np') as sf:
      report['files']['adapter_model.safetensors'] = {
          k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
    reports.append(report)
  return reports


def write_peft_reward_model(out: pathlib.Path) -> dict:
  """`peft/llama_rm_lora`: a SEQ_CLS LoRA adapter made by peft on the `llama_rm` reward model
  (r 4, alpha 8, q/v of both blocks), A, B and the saved `score` head re-initialised from a
  seeded generator; golden.npz: llama_rm's tokens and lengths and this model's rewards."""
  import peft  # pylint: disable=g-import-not-at-top
  d = out / 'peft' / 'llama_rm_lora'
  if d.exists():
    shutil.rmtree(d)
  load = lambda: transformers.AutoModelForSequenceClassification.from_pretrained(
      out / 'llama_rm', dtype=torch.float32, attn_implementation='eager').eval()
  golden = np.load(out / 'llama_rm' / 'golden.npz')
  ids = torch.from_numpy(golden['tokens']).long()
  model = peft.get_peft_model(load(), peft.LoraConfig(
      task_type='SEQ_CLS', r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj']))
  model.peft_config['default'].base_model_name_or_path = 'tests/golden/hf/llama_rm'
  init_lora(model, 13)
  gen = torch.Generator().manual_seed(14)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'score' in name and 'modules_to_save' in name:  # the trained head peft saves
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
  model.eval()
  with torch.no_grad():
    rewards = model(ids).logits[:, 0].float().numpy()
  assert float(np.abs(rewards - golden['rewards']).max()) > 0.1  # adapters and head matter
  model.save_pretrained(d)
  (d / 'README.md').unlink(missing_ok=True)
  config_path = d / 'adapter_config.json'
  written = json.loads(config_path.read_text())
  written['target_modules'] = sorted(written['target_modules'])
  written['modules_to_save'] = sorted(written['modules_to_save'] or [])
  config_path.write_text(json.dumps(written, indent=2, sort_keys=True))
  np.savez_compressed(d / 'golden.npz', tokens=golden['tokens'], lengths=golden['lengths'],
                      rewards=rewards.astype(np.float32))
  reloaded = peft.PeftModel.from_pretrained(load(), d).eval()
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(ids).logits[:, 0].float().numpy(), rewards)
  report = {'case': 'peft/llama_rm_lora', 'rewards': [float(r) for r in rewards], 'files': {}}
  with safetensors.safe_open(str(d / 'adapter_model.safetensors'), framework='np') as sf:
    report['files']['adapter_model.safetensors'] = {
        k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
  return report
