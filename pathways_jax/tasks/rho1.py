"""RHO-1 as a task ('rho1'): the reference model, online/offline scoring, the selective loss.

The pure selection and loss live in `pathways_jax.objectives.selective`; this module connects them
to the trainer (config section `selective`, see docs/rho1.md):

  * `reference_config(cfg)` / `ensure_reference(cfg, workdir)`: the reference is an ordinary run
    (its own run dir, config.json and checkpoints) on the high-quality data that
    `selective.reference` names (the corpus without `data.noise`, optionally only its first N
    documents); `selective.reference.steps > 0` trains it first when its run dir has no checkpoint.
    Any compatible run dir (same tokenizer, same model family) works as well.
  * `load_reference(...)`: the reference as a frozen model (`train.frozen`): its own ModelConfig
    and its params only, placed on the training mesh by the same logical-axis rules as the model.
  * online scoring: the frozen reference params are the train step's `aux` argument and the
    reference forward runs inside the jitted step (`Rho1Task.loss`). For LLaDA both models see
    the same noisy batch (one mask and one t).
  * offline scoring (autoregressive only): `score_rows` runs the reference once over every packed
    training row and caches L_ref as a [num_rows, seq_len] array (`ref_loss[r, i]` = loss of
    predicting token i+1 of row r; last column 0), keyed by a hash of the packed rows and the
    reference checkpoint. The pipeline serves it beside the tokens as the per-row field
    `ref_loss`, so shuffling, process slices and resume stay aligned by construction.
  * scores 'random' (a uniformly random `ratio` of the targets: the control) and 'oracle' (every
    target that is not known noise: the upper bound) need no reference.

`Rho1Task.setup` loads (or trains) the reference and returns the step's frozen inputs; validation
measures the base objective's plain loss, so every arm is compared on the same quantity.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax import config as config_lib
from pathways_jax import parallel
from pathways_jax.objectives import autoregressive, selective
from pathways_jax.tasks.lm_head import outputs as lm_head_outputs
from pathways_jax.tasks.registry import get as get_task, register
from pathways_jax.tasks.pretrain import mask_id as resolved_mask_id
from pathways_jax.tasks.base import COUNT, FrozenInputs, RunContext, Task
from pathways_jax.train import frozen as frozen_lib

_LOG = logging.getLogger(__name__)
NEEDS_REFERENCE = ('excess', 'reference_loss', 'reference_entropy')
REF_LOSS = 'ref_loss'  # the batch field of offline reference losses


def enabled(cfg) -> bool:
  sl = cfg.get('selective')
  return bool(sl is not None and sl.enabled)


def needs_reference(cfg) -> bool:
  return enabled(cfg) and cfg.selective.score in NEEDS_REFERENCE


# ------------------------------------------------------------------------------------ reference

def reference_workdir(cfg, workdir: str) -> str:
  return cfg.selective.reference.workdir or os.path.join(workdir, 'reference')


def reference_config(cfg):
  """The config of the reference run: the same run on the high-quality data, no selection.

  `selective.reference` names the data (corpus/path/max_documents; `data.noise` is always off)
  and the size (d_model/num_layers/mlp_dim, 0 = the model's) and `steps`. The tokenizer is the
  training run's: a sentencepiece model is pinned by its file so a smaller corpus cannot retrain it.
  """
  rf = cfg.selective.reference
  ref = copy.deepcopy(cfg)
  ref.unlock()
  ref.name = f'{cfg.name}-reference'
  ref.selective.enabled = False
  ref.data.noise.fraction = 0.0
  if rf.corpus:
    ref.data.corpus = rf.corpus
  if rf.path:
    ref.data.path = rf.path
  if rf.max_documents:
    ref.data.max_documents = rf.max_documents
  for key in ('d_model', 'num_layers', 'mlp_dim'):
    if rf[key]:
      ref.model[key] = rf[key]
  if rf.steps:
    ref.train.steps = rf.steps
  ref.train.stop_at = 0
  if cfg.data.tokenizer == 'sentencepiece' and not cfg.data.tokenizer_path:
    from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    name = getattr(tokenizers.get_tokenizer(cfg.data), 'name', '')
    if name.startswith('sentencepiece:'):  # loaded from (or trained into) a cached model file
      ref.data.tokenizer_path = name.split(':', 1)[1]
  ref.lock()
  return ref


def ensure_reference(cfg, workdir: str, *, train: Callable, quiet: bool = True) -> str:
  """The reference run dir; trains it first with `train` (the trainer, `train.loop.train`) when
  `selective.reference.steps` > 0 and the run dir has no checkpoint."""
  ref_dir = reference_workdir(cfg, workdir)
  if frozen_lib.checkpoint_steps(ref_dir):
    return ref_dir
  if cfg.selective.reference.steps <= 0:
    raise FileNotFoundError(
        f'selective: no reference checkpoint in {ref_dir}; set config.selective.reference.workdir '
        'to a trained run dir, or config.selective.reference.steps > 0 to train one there')
  _LOG.info('selective: training the reference in %s', ref_dir)
  train(reference_config(cfg), ref_dir, quiet=quiet)
  return ref_dir


# The reference is a frozen model: its own ModelConfig (from its config.json) and its params only,
# placed on the training mesh under the training rules.
Reference = frozen_lib.FrozenModel


def load_reference(cfg, ref_dir: str, tokenizer, mesh, rules) -> Reference:
  """The reference's model and params from its run dir, checked against the training run."""
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  ref = frozen_lib.load(ref_dir, mesh, rules, step=cfg.selective.reference.step or None)
  ref_tok = tokenizers.get_tokenizer(ref.run_cfg.data)
  if getattr(ref_tok, 'fingerprint', None) != getattr(tokenizer, 'fingerprint', None):
    raise config_lib.ConfigError(
        f'selective: the reference in {ref_dir} uses another tokenizer '
        f'({getattr(ref_tok, "fingerprint", "?")} vs {getattr(tokenizer, "fingerprint", "?")})')
  causal = cfg.objective == 'autoregressive'
  if ref.model_cfg.causal != causal:
    raise config_lib.ConfigError(
        f'selective: the reference in {ref_dir} is '
        f'{"causal" if ref.model_cfg.causal else "bidirectional"}, the objective '
        f'{cfg.objective!r} needs a {"causal" if causal else "bidirectional"} one')
  if ref.model_cfg.max_len < cfg.data.seq_len:
    raise config_lib.ConfigError(f'selective: the reference max_len={ref.model_cfg.max_len} < '
                                 f'data.seq_len={cfg.data.seq_len}')
  return ref


# ------------------------------------------------------------------------------------- the loss

def _ar_reference(cfg, ref_model, ref_params, batch, with_entropy: bool):
  tokens, segments = batch['tokens'], batch['segment_ids']
  kw = dict(positions_BL=batch['positions'], segment_ids_BL=segments)
  ref_params = jax.lax.stop_gradient(ref_params)
  logits = lm_head_outputs(cfg, ref_model, ref_params, tokens,
                           autoregressive.next_token_targets(tokens), **kw)
  ref, _ = selective.ar_token_losses(logits, tokens, segments)
  ent = None
  if with_entropy:
    ent = selective.token_entropy(logits)[:, :-1]
  return jax.lax.stop_gradient(ref), ent


def selective_loss(cfg, model, params, batch, key, ref_params=None, *, ref_model=None,
                   return_selected: bool = False):
  """(loss, metrics) of one batch under `cfg.selective` for the configured base objective.

  The reference loss comes from `batch['ref_loss']` (offline) or from `ref_model` applied with
  `ref_params` (online). With `return_selected`, also the bool selection (AR: [B, L-1]).
  """
  sl = cfg.selective
  tokens, segments, positions = batch['tokens'], batch['segment_ids'], batch['positions']
  noise = batch.get('noise')
  score = sl.score
  if score == 'oracle' and noise is None:
    raise config_lib.ConfigError("selective.score='oracle' needs batches with a `noise` field "
                                 '(config.data.noise.fraction > 0)')
  need_ref = score in NEEDS_REFERENCE
  if cfg.objective == 'autoregressive':
    logits = lm_head_outputs(cfg, model, params, tokens, autoregressive.next_token_targets(tokens),
                             positions_BL=positions, segment_ids_BL=segments)
    tok, valid = selective.ar_token_losses(logits, tokens, segments)
    noise_t = None if noise is None else noise[:, 1:].astype(bool)
    ent = None
    if not need_ref:
      ref = jnp.zeros_like(tok)
    elif REF_LOSS in batch:
      ref = batch[REF_LOSS][:, :-1].astype(jnp.float32)
    else:
      ref, ent = _ar_reference(cfg, ref_model, ref_params, batch, score == 'reference_entropy')
    weights, n_positions = None, None
  elif cfg.objective == 'diffusion':
    from pathways_jax.objectives import diffusion  # pylint: disable=g-import-not-at-top
    # The draws of the 'diffusion' task, so the uniform and selective arms see the same masks.
    noisy, masked, p_mask, in_row = diffusion.pretraining_draws(
        key, tokens, segments, mask_id=resolved_mask_id(cfg), eps=cfg.diffusion.eps,
        random_length_prob=cfg.diffusion.random_length_prob)
    kw = dict(positions_BL=positions, segment_ids_BL=segments * in_row)
    logits = lm_head_outputs(cfg, model, params, noisy, tokens, **kw)
    tok, weights, valid = selective.diffusion_token_losses(logits, tokens, masked & in_row,
                                                               p_mask)
    noise_t = None if noise is None else noise.astype(bool)
    ent = None
    if need_ref:
      frozen = jax.lax.stop_gradient(ref_params)
      ref_logits = lm_head_outputs(cfg, ref_model, frozen, noisy, tokens, **kw)
      ref, _, _ = selective.diffusion_token_losses(ref_logits, tokens, masked & in_row, p_mask)
      ref = jax.lax.stop_gradient(ref)
      if score == 'reference_entropy':
        ent = selective.token_entropy(ref_logits)
    else:
      ref = jnp.zeros_like(tok)
    n_positions = in_row.astype(jnp.float32).sum()  # LLaDA's denominator (B*L without padding)
  else:
    raise ValueError(f'unknown objective {cfg.objective!r}')

  ratio, score_BL, kind = sl.ratio, None, score
  if score == 'random':
    score_BL, kind = jax.random.uniform(jax.random.fold_in(key, 0x5E1), tok.shape), 'excess'
  elif score == 'oracle':  # keep exactly the clean targets: rank clean above noise, k = #clean
    clean = valid & ~noise_t
    score_BL, kind = clean.astype(jnp.float32), 'excess'
    ratio = clean.sum() / jnp.maximum(valid.sum(), 1)  # traced: num_kept rounds it to #clean
  normalizer = None
  if n_positions is not None:  # LLaDA: sum of CE/p_mask over kept tokens / (ratio * positions)
    normalizer = ((in_row & ~noise_t).astype(jnp.float32).sum() if score == 'oracle'
                  else ratio * n_positions)
  loss, metrics = selective.loss(tok, ref, valid, ratio, per_sequence=sl.per_sequence,
                                     score=kind, ref_entropy_BL=ent, score_BL=score_BL,
                                     weights_BL=weights, normalizer=normalizer, noise_BL=noise_t)
  if return_selected:
    s = score_BL if score_BL is not None else selective.selection_score(
        tok, ref, score=kind, ref_entropy_BL=ent)
    return loss, metrics, selective.select_tokens(s, valid, ratio,
                                                      per_sequence=sl.per_sequence)
  return loss, metrics


# ------------------------------------------------------------------------------ offline scoring

def rows_key(rows, ref: Reference) -> str:
  """Identity of (the packed rows, the reference checkpoint): the cache is valid iff both match."""
  h = hashlib.blake2b(digest_size=12)
  if hasattr(rows, 'identity'):  # a prepared dataset's rows, named by its manifest
    h.update(rows.identity.encode())
  else:
    for a in (rows.tokens, rows.row_ptr, rows.piece_start, rows.piece_len):
      h.update(np.ascontiguousarray(a).tobytes())
  h.update(repr((rows.seq_len, os.path.abspath(ref.run_dir), ref.step)).encode())
  return h.hexdigest()


def score_rows(cfg, rows, ref: Reference, mesh, rules) -> np.ndarray:
  """float32 [len(rows), L]: the reference's next-token loss at every position of every row.

  Column i of row r is the loss of predicting token i+1 (0 where there is no valid target and in
  the last column). Runs in batches of `data.batch_size` rows: the same shapes as the train step.
  """
  if jax.process_count() > 1:
    raise config_lib.ConfigError('selective: offline scoring runs on one process; score once '
                                 'with a single process (the cache is then read by every one)')
  from pathways_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  B, L = cfg.data.batch_size, rows.seq_len

  def fn(params, batch):
    ref_BL, _ = _ar_reference(cfg, ref.model, params, batch, False)
    valid = selective.ar_token_losses(jnp.zeros(batch['tokens'].shape + (1,)),
                                          batch['tokens'], batch['segment_ids'])[1]
    ref_BL = jnp.where(valid, ref_BL, 0.0)
    return jnp.pad(ref_BL, ((0, 0), (0, 1)))

  jitted = jax.jit(fn, in_shardings=(ref.shardings, parallel.batch_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))
  out = np.zeros((len(rows), L), np.float32)
  for start in range(0, len(rows), B):
    batch = pipeline._stack([rows[start + i] for i in range(B)])  # pylint: disable=protected-access
    batch = {k: batch[k] for k in ('tokens', 'segment_ids', 'positions')}
    res = np.asarray(parallel.run_with_rules(mesh, rules, jitted, ref.params,
                                             jax.device_put(batch, parallel.batch_sharding(mesh))))
    n = min(B, len(rows) - start)
    out[start:start + n] = res[:n]
  return out


def offline_ref_losses(cfg, tokenizer, ref: Reference, mesh, rules, *, vocab_size=None
                       ) -> np.ndarray:
  """The cached L_ref of the training rows (computed and saved under the reference run dir)."""
  from pathways_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  rows = pipeline.load_packed_rows(cfg, tokenizer, 'train', vocab_size=vocab_size)
  path = os.path.join(ref.run_dir, 'ref_loss', f'{rows_key(rows, ref)}.npy')
  if os.path.exists(path):
    try:
      cached = np.load(path)
      if cached.shape == (len(rows), rows.seq_len):
        return cached
    except (OSError, ValueError):
      pass  # a corrupt cache entry is recomputed, never trusted
  _LOG.info('selective: scoring %d rows with the reference -> %s', len(rows), path)
  values = score_rows(cfg, rows, ref, mesh, rules)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # A temp name of this process's own (pids can repeat across hosts that share the filesystem).
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.ref_loss.', suffix='.tmp')
  with os.fdopen(fd, 'wb') as f:
    np.save(f, values)
  os.replace(tmp, path)
  return values


# ------------------------------------------------------------------------------------- the task

@register('rho1')
class Rho1Task(Task):
  """Selective language modelling over the base objective `config.objective` (AR or LLaDA)."""

  def __init__(self, cfg, model):
    super().__init__(cfg, model)
    self.base = get_task(cfg.objective)(cfg, model)
    self.perplexity = self.base.perplexity
    self.required_specials = self.base.required_specials
    self.ref_model = None  # set by setup when a reference scores online or offline

  def with_model(self, model):
    task = super().with_model(model)
    task.base = self.base.with_model(model)
    return task

  def batch_fields(self):
    fields = self.base.batch_fields()
    if needs_reference(self.cfg) and self.cfg.selective.mode == 'offline':
      fields[REF_LOSS] = jnp.float32
    if self.cfg.selective.score == 'oracle':
      fields['noise'] = jnp.int32
    return fields

  def setup(self, run: RunContext) -> FrozenInputs:
    cfg = self.cfg
    if not needs_reference(cfg):
      return FrozenInputs()
    ref = load_reference(cfg, ensure_reference(cfg, run.workdir, train=run.train), run.tokenizer,
                         run.mesh, run.rules)
    self.ref_model = ref.model
    about = (f'rho1: reference {ref.run_dir} (step {ref.step}), {cfg.selective.mode} scoring',)
    if cfg.selective.mode == 'offline':
      values = offline_ref_losses(cfg, run.tokenizer, ref, run.mesh, run.rules,
                                  vocab_size=run.vocab_size)
      return FrozenInputs(row_fields={REF_LOSS: values}, describe=about)
    return FrozenInputs(aux=ref.params, aux_shardings=ref.shardings, describe=about)

  def abstract_frozen(self, mesh, rules) -> FrozenInputs:
    """Online scoring's reference params as shapes: the model with `selective.reference`'s sizes
    (its run directory is not read in a dry run)."""
    if not needs_reference(self.cfg) or self.cfg.selective.mode == 'offline':
      return FrozenInputs()
    from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
    rf = self.cfg.selective.reference
    sizes = {k: rf[k] for k in ('d_model', 'num_layers', 'mlp_dim') if rf[k]}
    ref_model = Transformer(self.model.cfg.replace(**sizes))
    self.ref_model = ref_model
    abstract, shardings = frozen_lib.abstract_params_and_shardings(ref_model, mesh, rules)
    aux = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 abstract, shardings)
    return FrozenInputs(aux=aux, aux_shardings=shardings)

  def loss(self, params, batch, key, aux=None):
    loss, metrics = selective_loss(self.cfg, self.model, params, batch, key, aux,
                                   ref_model=self.ref_model)
    return loss, {**metrics, COUNT: metrics['num_selected']}

  def eval_loss(self, params, batch, key, aux=None):
    return self.base.loss(params, batch, key)


__all__ = ('Rho1Task', 'selective_loss', 'reference_config', 'ensure_reference', 'load_reference',
           'score_rows', 'offline_ref_losses', 'Reference', 'REF_LOSS')
