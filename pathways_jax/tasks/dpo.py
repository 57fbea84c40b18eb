"""Direct preference optimisation as a task ('dpo'): DPO and its family on preference pairs.

    config.task = 'dpo'
    config.data.corpus = 'preference'     # data/preference.py: pairs packed as segment pairs
    config.train.init_from = 'runs/sft'   # the policy starts here (a run or a HF directory)
    config.dpo.loss_type = 'sigmoid'      # objectives.preference.LOSS_TYPES; beta, ...

The loss is `objectives.preference.dpo_loss` over the batch's pairs, with per-pair sequence
log-probs summed over each response's tokens (length-averaged for 'ipo', 'simpo' and 'orpo', as
those methods prescribe); the chosen response's length-normalised NLL feeds RPO (`rpo_alpha`)
and ORPO. A batch's units (`COUNT`) are its pairs, so accumulation and validation average over
pairs however they fall into rows.

The reference (not needed by 'simpo' and 'orpo'), in order of what it costs:
  * precomputed (`dpo.precompute`): the reference scores every training and validation row once
    before training (per-token log-probs cached in WORKDIR/ref_logps, keyed by the rows and the
    reference); batches carry them as the field `ref_logp` and no reference is held in memory.
  * adapters off: a LoRA (or QLoRA) policy whose reference is the model it started from is its
    own reference with the adapters removed: the same base params, no second copy.
  * a frozen model: the start model (`train.init_from`) or `dpo.reference` (a run or HF
    directory), loaded once and passed to every step as `aux`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax import parallel
from pathways_jax.config import ConfigError
from pathways_jax.objectives import autoregressive, preference
from pathways_jax.tasks.lm_head import outputs as lm_head_outputs
from pathways_jax.tasks.base import COUNT, TOKEN_FIELDS, FrozenInputs, RunContext, Task
from pathways_jax.tasks.reference import ReferenceMixin, base_params
from pathways_jax.tasks.registry import register

_LOG = logging.getLogger(__name__)
REF_LOGP = 'ref_logp'  # the batch field of precomputed reference log-probs, float32 [B, L]
AVERAGED = ('ipo', 'simpo', 'orpo')  # losses on length-averaged log-probs


def _rows_key(fields: dict, source: str) -> str:
  h = hashlib.blake2b(digest_size=12)
  for name in ('tokens', 'segment_ids', 'positions'):
    h.update(np.ascontiguousarray(fields[name]).tobytes())
  h.update(os.path.abspath(source).encode())
  return h.hexdigest()


@register('dpo')
class DpoTask(ReferenceMixin, Task):
  """DPO / cDPO / robust / IPO / hinge / RPO / SimPO / ORPO over packed preference pairs."""

  def __init__(self, cfg, model):
    super().__init__(cfg, model)
    self._check_model(model)
    if cfg.data.corpus != 'preference':
      raise ConfigError(f"task {self.name!r} trains on pairs: set config.data.corpus='preference' "
                        f'(it is {cfg.data.corpus!r})')
    d = cfg.dpo
    self.loss_type = d.loss_type
    self.needs_ref = d.loss_type not in preference.REFERENCE_FREE
    try:  # the loss's own argument checks, now rather than at the first step
      preference.check_args(d.loss_type, d.beta, d.label_smoothing, d.rpo_alpha, jnp.zeros(()),
                            self.needs_ref)
    except ValueError as e:
      raise ConfigError(f'config.dpo: {e}') from None
    self.source = d.reference or cfg.train.init_from
    if self.needs_ref and not self.source:
      raise ConfigError(f'task {self.name!r} needs a reference: set config.train.init_from (the '
                        'model the policy starts from, its reference by default) or '
                        'config.dpo.reference')
    # A LoRA policy starting from its reference: the adapters-off model is the reference.
    self.adapters_off = self.needs_ref and not d.precompute and self.is_adapters_off()
    self.ref_key = 'dpo.reference'
    self.ref_model = None  # a frozen reference's model, set by setup

  def _check_model(self, model) -> None:
    """The kind of model the task trains (a hook: 'vrpo', tasks/vrpo.py, trains LLaDA)."""
    if not model.cfg.causal:
      raise ConfigError("task 'dpo' trains a causal model; for LLaDA (model.causal=False) use "
                        "task 'vrpo'")

  def batch_fields(self):
    fields = {**{k: jnp.int32 for k in TOKEN_FIELDS}, 'loss_mask': jnp.int32}
    if self.needs_ref and self.cfg.dpo.precompute:
      fields[REF_LOGP] = jnp.float32
    return fields

  def describe(self) -> str:
    d = self.cfg.dpo
    ref = ('none' if not self.needs_ref else 'precomputed' if d.precompute
           else 'adapters off' if self.adapters_off else self.source)
    return f'dpo({d.loss_type}, beta={d.beta}, reference={ref})'

  # -- the reference ------------------------------------------------------------------------
  def setup(self, run: RunContext) -> FrozenInputs:
    if not self.needs_ref:
      return FrozenInputs(describe=(f'dpo: {self.loss_type} needs no reference',))
    if self.adapters_off:
      return FrozenInputs(describe=('dpo: reference = the policy with its LoRA adapters off '
                                    f'(the base from {self.source}, no second copy)',))
    ref_model, params, shardings = self._load_reference(run)
    if not self.cfg.dpo.precompute:
      self.ref_model = ref_model
      return FrozenInputs(aux=params, aux_shardings=shardings,
                          describe=(f'dpo: frozen reference {self.source}',))
    train_logps = self._precomputed(run, 'train', ref_model, params, shardings)
    eval_logps = self._precomputed(run, 'validation', ref_model, params, shardings)
    return FrozenInputs(row_fields={REF_LOGP: train_logps},
                        eval_row_fields=None if eval_logps is None else {REF_LOGP: eval_logps},
                        describe=(f'dpo: reference {self.source} scored the data once (cached '
                                  f'in {os.path.join(run.workdir, "ref_logps")}); it is not '
                                  'held during training',))

  def _precomputed(self, run: RunContext, split: str, ref_model, params, shardings):
    """float32 [R, L] reference log-probs of `split`'s rows (None if the split is empty)."""
    from pathways_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from pathways_jax.data.corpora import EmptySplitError  # pylint: disable=g-import-not-at-top
    try:
      rows = pipeline.load_packed_rows(self.cfg, run.tokenizer, split, vocab_size=run.vocab_size)
    except EmptySplitError:
      if split == 'train':
        raise
      return None
    name = f'{split}-{_rows_key(rows.fields, self.source)}.npy'
    path = os.path.join(run.workdir, 'ref_logps', name)
    if os.path.exists(path):
      try:
        cached = np.load(path)
        if cached.shape == (len(rows), rows.seq_len):
          return cached
      except (OSError, ValueError):
        pass  # a corrupt cache entry is recomputed, never trusted
    values = score_token_logps(rows, ref_model, params, shardings, run.mesh, run.rules,
                               self.cfg.data.batch_size)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.ref_logps.', suffix='.tmp')
      with os.fdopen(fd, 'wb') as f:
        np.save(f, values)
      os.replace(tmp, path)
    return values

  def abstract_frozen(self, mesh, rules) -> FrozenInputs:
    if not self.needs_ref or self.adapters_off or self.cfg.dpo.precompute:
      return FrozenInputs()
    return self._abstract_reference(mesh, rules)

  # -- the loss -------------------------------------------------------------------------------
  def _pair_logps(self, params, batch, key, aux):
    """(policy, reference or None): `preference.packed_pair_logps` dicts of the batch's pairs,
    the reference's gradients stopped (a hook: 'vrpo' returns ELBO estimates instead)."""
    del key
    tokens, segments, mask = batch['tokens'], batch['segment_ids'], batch['loss_mask']
    kw = dict(positions_BL=batch['positions'], segment_ids_BL=segments)
    targets = autoregressive.next_token_targets(tokens)
    logits = lm_head_outputs(self.cfg, self.model, params, tokens, targets, **kw)
    pol = preference.packed_pair_logps(preference.causal_token_logps(logits, tokens), mask,
                                       segments)
    ref = None
    if self.needs_ref:
      if REF_LOGP in batch:
        ref_tok_BL = batch[REF_LOGP]
      else:
        if self.adapters_off:
          ref_model, ref_params = self._reference_model(), base_params(params)
        else:
          ref_model, ref_params = self.ref_model, aux
        ref_logits = lm_head_outputs(self.cfg, ref_model, jax.lax.stop_gradient(ref_params),
                                     tokens, targets, **kw)
        ref_tok_BL = preference.causal_token_logps(ref_logits, tokens)
      ref = preference.packed_pair_logps(jax.lax.stop_gradient(ref_tok_BL), mask, segments)
    return pol, ref

  def loss(self, params, batch, key, aux=None):
    d = self.cfg.dpo
    pol, ref = self._pair_logps(params, batch, key, aux)
    n_c = jnp.maximum(pol['chosen_tokens'], 1.0)
    n_r = jnp.maximum(pol['rejected_tokens'], 1.0)
    per = (lambda x, n: x / n) if self.loss_type in AVERAGED else (lambda x, n: x)
    loss, metrics = preference.dpo_loss(
        per(pol['chosen'], n_c), per(pol['rejected'], n_r),
        None if ref is None else per(ref['chosen'], n_c),
        None if ref is None else per(ref['rejected'], n_r),
        beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
        chosen_nll_B=-pol['chosen'] / n_c, rpo_alpha=d.rpo_alpha, simpo_gamma=d.simpo_gamma,
        valid_B=pol['valid'])
    return loss, {**metrics, COUNT: pol['valid'].astype(jnp.float32).sum()}


def score_token_logps(rows, ref_model, params, shardings, mesh, rules, batch_size: int
                      ) -> np.ndarray:
  """float32 [len(rows), L]: log p(token i | tokens < i, same segment) under `ref_model` at every
  position of every row (0 at each segment's first token and on padding), in batches of
  `batch_size` rows (the train step's shapes)."""
  if jax.process_count() > 1:
    raise ConfigError('dpo.precompute scores on one process; score once with a single process '
                      '(the cache in WORKDIR/ref_logps is then read by every one)')
  from pathways_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  def fn(p, batch):
    logits = ref_model.apply({'params': p}, batch['tokens'], positions_BL=batch['positions'],
                             segment_ids_BL=batch['segment_ids'])
    out = preference.causal_token_logps(logits, batch['tokens'])
    seg = batch['segment_ids']
    same = jnp.pad((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), ((0, 0), (1, 0)))
    return jnp.where(same, out, 0.0)

  sharding = parallel.batch_sharding(mesh)
  jitted = jax.jit(fn, in_shardings=(shardings, sharding), out_shardings=parallel.replicated(mesh))
  out = np.zeros((len(rows), rows.seq_len), np.float32)
  for start in range(0, len(rows), batch_size):
    batch = pipeline._stack([rows[start + i] for i in range(batch_size)])  # pylint: disable=protected-access
    batch = {k: batch[k] for k in TOKEN_FIELDS}
    res = np.asarray(parallel.run_with_rules(mesh, rules, jitted, params,
                                             jax.device_put(batch, sharding)))
    n = min(batch_size, len(rows) - start)
    out[start:start + n] = res[:n]
  return out


__all__ = ('DpoTask', 'score_token_logps', 'REF_LOGP')
