"""A float64 numpy forward of the golden checkpoints, written from README.md's formulas alone.

No torch, no transformers, no JAX: it reads config.json (either transformers style) and the
safetensors files (sharded or not), and checks its logits and teacher-forced greedy choices against
golden.npz. It is the check that README.md states transformers' conventions correctly; run it with
the project's .venv (numpy + safetensors):  python tests/golden/hf/reference.py
Last run (transformers 5.25.0 goldens): max |logits - golden| <= 6.3e-5 for every case and style.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file

HERE = pathlib.Path(__file__).resolve().parent
CASES = ('llama', 'llama3_tied', 'qwen2', 'qwen3')


def load_weights(d: pathlib.Path) -> dict[str, np.ndarray]:
  index = d / 'model.safetensors.index.json'
  if index.exists():
    files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
  else:
    files = ['model.safetensors']
  weights = {}
  for f in files:
    weights.update(load_file(str(d / f)))
  return {k: v.astype(np.float64) for k, v in weights.items()}


def rope_parameters(config: dict) -> dict:
  if 'rope_parameters' in config:  # transformers 5
    return dict(config['rope_parameters'])
  params = dict(config.get('rope_scaling') or {'rope_type': 'default'})  # transformers 4
  params['rope_theta'] = config['rope_theta']
  return params


def inv_freq(config: dict, head_dim: int) -> np.ndarray:
  p = rope_parameters(config)
  inv = 1.0 / p['rope_theta'] ** (np.arange(0, head_dim, 2) / head_dim)
  rope_type = p.get('rope_type', p.get('type', 'default'))
  if rope_type == 'llama3':
    factor, low, high = p['factor'], p['low_freq_factor'], p['high_freq_factor']
    old = p['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv = np.where(medium, smoothed, scaled)
  elif rope_type != 'default':
    raise NotImplementedError(rope_type)
  return inv


def rms_norm(x, weight, eps):
  return weight * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def rotate_half(x):  # halves, not interleaved pairs
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(config: dict, w: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
  """Logits [B, T, vocab] of a causal LM over `tokens` [B, T] at positions 0..T-1."""
  hidden, heads, kv_heads = (config['hidden_size'], config['num_attention_heads'],
                             config['num_key_value_heads'])
  head_dim = config.get('head_dim') or hidden // heads
  eps = config['rms_norm_eps']
  batch, length = tokens.shape

  def linear(x, name):
    y = x @ w[name + '.weight'].T  # HF stores nn.Linear weights as [out, in]
    return y + w[name + '.bias'] if name + '.bias' in w else y

  angles = np.arange(length)[:, None] * inv_freq(config, head_dim)[None]  # [T, head_dim/2]
  emb = np.concatenate([angles, angles], axis=-1)[None, :, None]  # [1, T, 1, head_dim]
  cos, sin = np.cos(emb), np.sin(emb)
  causal = np.tril(np.ones((length, length), bool))

  x = w['model.embed_tokens.weight'][tokens]
  for layer in range(config['num_hidden_layers']):
    p = f'model.layers.{layer}.'
    h = rms_norm(x, w[p + 'input_layernorm.weight'], eps)
    q = linear(h, p + 'self_attn.q_proj').reshape(batch, length, heads, head_dim)
    k = linear(h, p + 'self_attn.k_proj').reshape(batch, length, kv_heads, head_dim)
    v = linear(h, p + 'self_attn.v_proj').reshape(batch, length, kv_heads, head_dim)
    if p + 'self_attn.q_norm.weight' in w:  # Qwen3: per head over head_dim, before RoPE
      q = rms_norm(q, w[p + 'self_attn.q_norm.weight'], eps)
      k = rms_norm(k, w[p + 'self_attn.k_norm.weight'], eps)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    group = heads // kv_heads  # query head j reads kv head j // group
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(head_dim)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum('bhqk,bkhd->bqhd', probs, v).reshape(batch, length, heads * head_dim)
    x = x + linear(out, p + 'self_attn.o_proj')
    h = rms_norm(x, w[p + 'post_attention_layernorm.weight'], eps)
    gate = linear(h, p + 'mlp.gate_proj')
    x = x + linear(gate / (1 + np.exp(-gate)) * linear(h, p + 'mlp.up_proj'), p + 'mlp.down_proj')
  x = rms_norm(x, w['model.norm.weight'], eps)
  tied = config.get('tie_word_embeddings')
  head = w['model.embed_tokens.weight'] if tied else w['lm_head.weight']
  return x @ head.T


def main() -> int:
  worst = 0.0
  for case in CASES:
    d = HERE / case
    golden = np.load(d / 'golden.npz')
    weights = load_weights(d)
    prompt_len = golden['greedy_prompt'].shape[1]
    for name in ('config.json', 'config.other_style.json'):
      if not (d / name).exists():
        continue
      config = json.loads((d / name).read_text())
      err = float(np.abs(forward(config, weights, golden['tokens']) - golden['logits']).max())
      seq = golden['greedy_tokens']
      step_logits = forward(config, weights, seq)[:, prompt_len - 1:-1]
      greedy_ok = bool((step_logits.argmax(-1) == seq[:, prompt_len:]).all())
      step_err = float(np.abs(step_logits - golden['greedy_logits']).max())
      worst = max(worst, err, step_err)
      print(f'{case:12s} {name:24s} max|logits err| {err:.2e}  greedy '
            f'{"same" if greedy_ok else "DIFFERENT"} (step logits err {step_err:.2e})')
      if not greedy_ok:
        return 1
  return 0 if worst < 1e-3 else 1


if __name__ == '__main__':
  sys.exit(main())
