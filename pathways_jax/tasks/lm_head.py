"""The language-model head of a task's loss: logits, or per-token losses without them.

`train.cross_entropy` chooses. 'logits' applies the model as usual ([B, L, V] float32 logits,
then the objective's log-softmax). 'fused' applies it up to the final norm and hands the hidden
states and the unembedding to `kernels_pallas.cross_entropy.fused_cross_entropy`, which walks the
vocabulary in chunks of `train.cross_entropy_chunk` columns and never holds [B, L, V]; it
returns the `TokenLosses` the objectives take in place of logits. Its backward recomputes each
chunk's logits (one more [T, D] x [D, V] matmul per step), which buys the memory of the logits
and their gradient: for a 126k vocabulary, 2 GB per 4096 tokens each. 'auto' fuses from a
vocabulary of FUSED_FROM_VOCAB up, where that memory matters. The fused kernel is a custom VJP:
forward mode (jax.jvp, Hessian-vector products) through a loss needs 'logits'.
"""
from __future__ import annotations

import jax

from pathways_jax.config import ConfigError
from pathways_jax.objectives import token_losses

FUSED_FROM_VOCAB = 32768


def fused(cfg, model_cfg) -> bool:
  """Whether this run's losses take the fused path (train.cross_entropy)."""
  mode = cfg.train.get('cross_entropy', 'logits')
  quantized = bool(cfg.model.get('lora_quantize', ''))
  if mode == 'fused' and quantized:
    raise ConfigError("config.train.cross_entropy='fused' reads the unembedding directly; a QLoRA "
                      "base (model.lora_quantize) holds it quantised: use 'logits'")
  if mode == 'auto':
    return model_cfg.vocab_size >= FUSED_FROM_VOCAB and not quantized
  return mode == 'fused'


def outputs(cfg, model, params, inputs_BL: jax.Array, targets_BL: jax.Array, *,
            temperature: float = 1.0, **apply_kwargs):
  """`model.apply(...)`'s logits [B, L, V] (float32 / temperature when it is not 1), or on the
  fused path the TokenLosses of the same positions against `targets_BL`, entropy included. The
  objectives take either (`token_losses.of`). With `with_scalar=True`: (that, the scalar head's
  [B, L])."""
  with_scalar = apply_kwargs.get('with_scalar', False)  # a value head's [B, L] comes along
  if not fused(cfg, model.cfg):
    out = model.apply({'params': params}, inputs_BL, **apply_kwargs)
    logits, scalar_BL = out if with_scalar else (out, None)
    if temperature != 1.0:
      logits = logits.astype(jax.numpy.float32) / temperature
    return (logits, scalar_BL) if with_scalar else logits
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from kernels_pallas import cross_entropy  # pylint: disable=g-import-not-at-top
  from pathways_jax.models import transformer  # pylint: disable=g-import-not-at-top
  out = model.apply({'params': params}, inputs_BL, return_hidden=True, **apply_kwargs)
  h_BLD, scalar_BL = out if with_scalar else (out, None)
  if temperature != 1.0:  # logits / T = (h / T) @ W
    h_BLD = (h_BLD.astype(jax.numpy.float32) / temperature).astype(h_BLD.dtype)
  b, l, d = h_BLD.shape
  ce_T, lse_T, max_T, ent_T = cross_entropy.fused_cross_entropy(
      h_BLD.reshape(b * l, d), transformer.unembedding(nn.unbox(params), model.cfg),
      targets_BL.reshape(b * l), chunk_size=cfg.train.get('cross_entropy_chunk', 4096),
      return_max=True, return_entropy=True)
  # The target is the argmax iff its logit (lse - ce) reaches the largest logit.
  correct_T = lse_T - ce_T >= max_T
  stats = token_losses.TokenLosses(ce_T.reshape(b, l), lse_T.reshape(b, l),
                                   correct_T.reshape(b, l), ent_T.reshape(b, l))
  return (stats, scalar_BL) if with_scalar else stats
