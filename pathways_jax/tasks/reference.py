"""A frozen reference model for the tasks that need one (dpo, vrpo, grpo).

The reference is either the model the run starts from, loaded once on the run's mesh and passed
to every step as `aux`, or, for a LoRA (or QLoRA) policy that starts from it, the policy itself
with its adapters off: the same base params, no second copy (`adapters_off`).
"""
from __future__ import annotations

import os

import jax

from pathways_jax.config import ConfigError
from pathways_jax.models.transformer import Transformer
from pathways_jax.tasks.base import FrozenInputs, RunContext


def lora_free(model_cfg):
  return model_cfg.replace(lora_rank=0, lora_num_adapters=1, lora_dropout=0.0)


def base_params(params):
  """The params without their LoRA adapters."""
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  return lora.split(params)[0]


def same_path(a: str, b: str) -> bool:
  return os.path.abspath(a) == os.path.abspath(b)


class ReferenceMixin:
  """For a Task with `self.cfg`, `self.model`, `self.source` (the reference's run or HF
  directory) and `self.ref_key` (the config key naming it, for messages)."""
  source: str = ''
  ref_key: str = ''

  def is_adapters_off(self) -> bool:
    """A LoRA policy whose reference is the model it starts from: its own base."""
    init = self.cfg.train.init_from
    return bool(self.model.cfg.lora_rank > 0 and init and same_path(self.source, init))

  def _load_reference(self, run: RunContext):
    """(model, params, shardings) of the frozen reference at `self.source`, on the run's mesh."""
    from pathways_jax.interop.hf import run_dir  # pylint: disable=g-import-not-at-top
    from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
    ref_cfg = lora_free(run_dir.init_model_config(self.source, self.cfg.model))
    if ref_cfg.vocab_size != self.model.cfg.vocab_size:
      raise ConfigError(f'config.{self.ref_key}={self.source!r} has vocab_size '
                        f'{ref_cfg.vocab_size}, the policy {self.model.cfg.vocab_size}: the '
                        'reference must share the policy\'s tokenizer')
    if not same_path(self.source, self.cfg.train.init_from or '/nonexistent'):
      self._check_tokenizer(run)
    ref_model = Transformer(ref_cfg)
    params = run_dir.load_init_params(self.source, ref_model, run.mesh, run.rules)
    params = base_params(params)  # a LoRA source's adapters are merged by no one: drop them
    _, shardings = frozen.abstract_params_and_shardings(ref_model, run.mesh, run.rules)
    return ref_model, params, shardings

  def _check_tokenizer(self, run: RunContext) -> None:
    from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    from pathways_jax.interop.hf import run_dir  # pylint: disable=g-import-not-at-top
    data = self.cfg.data.copy_and_resolve_references()
    data.unlock()
    data.tokenizer, data.tokenizer_path = run_dir.source_tokenizer(self.source)
    theirs = getattr(tokenizers.get_tokenizer(data), 'fingerprint', None)
    ours = getattr(run.tokenizer, 'fingerprint', None)
    if theirs != ours:
      raise ConfigError(f'config.{self.ref_key}={self.source!r} uses another tokenizer '
                        f'({theirs} vs this run\'s {ours})')

  def _reference_model(self):
    """The adapters-off model: the policy's (a QLoRA policy's reads its quantised base)."""
    from pathways_jax.adapters import qlora  # pylint: disable=g-import-not-at-top
    base = Transformer(lora_free(self.model.cfg))
    return base if qlora.run_quant_config(self.cfg) is None else qlora.quantized_model(base)

  def _abstract_reference(self, mesh, rules) -> FrozenInputs:
    """A frozen reference as shapes (the policy's architecture without adapters), for the dry
    run; nothing is read."""
    from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
    self.ref_model = Transformer(lora_free(self.model.cfg))
    abstract, shardings = frozen.abstract_params_and_shardings(self.ref_model, mesh, rules)
    aux = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 abstract, shardings)
    return FrozenInputs(aux=aux, aux_shardings=shardings)
