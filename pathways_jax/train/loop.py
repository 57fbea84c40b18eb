"""The training loop: config -> mesh -> data -> model -> state -> steps, with checkpoints and metrics.

`train(cfg, workdir)` resumes automatically from the newest checkpoint in `workdir`. Everything a
resumed run needs (state, data-iterator position) is in the checkpoint, and randomness is keyed by
step, so a resumed run computes exactly what an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from pathways_jax import config as config_lib
from pathways_jax import host_memory
from pathways_jax import parallel
from pathways_jax import tasks
from pathways_jax.models.transformer import Transformer, count_params
from pathways_jax.train import checkpoint as ckpt_lib
from pathways_jax.train import frozen as frozen_lib
from pathways_jax.growth import in_run as growth_phase
from pathways_jax.train import metrics as metrics_lib
from pathways_jax.train import optimizer as opt_lib
from pathways_jax.train import state as state_lib
from pathways_jax.train import trainable as trainable_lib
from pathways_jax.train import step as step_lib
from pathways_jax.adapters import lora as lora_lib
from pathways_jax.adapters import qlora

_LOG = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); saved work is intact."""


@dataclasses.dataclass(frozen=True)
class Callback:
  """`fn(step, params) -> {name: float} | None`, called every `every` steps and at the last one.

  What it returns is logged with the step's metrics (metrics.jsonl, TensorBoard). `params` are the
  whole model's (trained and frozen parts merged; a QLoRA run's frozen dense weights are qwix
  QArrays, which its model, `qlora.quantized_model`, reads). It may raise `StopTraining` to end
  the run early: the loop saves a checkpoint and finishes as at the last step (status
  'stopped'). An experiment's own evaluation during training goes here, e.g. the reversal
  experiment's checks.
  """
  every: int
  fn: Callable[[int, Any], dict | None]


class StopTraining(Exception):
  """Raised by a `Callback` to end training at this step (a rerun resumes from it); `metrics`
  are logged as a returned dict would be."""

  def __init__(self, metrics: dict | None = None):
    super().__init__('a callback stopped training')
    self.metrics = metrics


def check_workdir(workdir: str) -> None:
  if '://' in str(workdir):
    # os.makedirs would make a local folder named 'gs:' and the run would look fine.
    raise TrainingError(f'workdir {workdir!r} is a remote URL: run directories are local or '
                        'mounted paths for now (mount the bucket, e.g. with gcsfuse, and pass '
                        'the mount point); prepared datasets (data.path) may be remote')
  try:
    os.makedirs(workdir, exist_ok=True)
    # A probe of this process's own: every host of a multi-host run checks the same workdir.
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_probe.') as f:
      f.write(b'ok')
  except OSError as e:
    raise TrainingError(f'workdir {workdir!r} is not writable: {e.strerror or e}') from e


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (then it saves and exits)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if hasattr(signal, 'SIGTERM') and _is_main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _is_main_thread():
  import threading  # pylint: disable=g-import-not-at-top
  return threading.current_thread() is threading.main_thread()


def build(cfg, *, mesh=None):
  """Tokenizer, model config, model, mesh and rules for a config (shared with sampling/eval)."""
  from pathways_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  config_lib.validate(cfg)
  if cfg.train.get('init_from'):  # the architecture (and tokenizer) is the starting model's
    from pathways_jax.interop.hf import run_dir  # pylint: disable=g-import-not-at-top
    run_dir.adopt_init_from(cfg)
  mesh = mesh or parallel.make_mesh(cfg)
  tokenizer = tokenizers.get_tokenizer(cfg.data)
  tokenizers.resolve_special_ids(cfg, tokenizer)  # config.data.*_id -1: the tokenizer's ids
  vocab = cfg.model.vocab_size or config_lib.round_vocab(tokenizer.vocab_size)
  if vocab < tokenizer.vocab_size:
    raise config_lib.ConfigError(f'config.model.vocab_size={vocab} is smaller than the '
                                 f'tokenizer vocabulary ({tokenizer.vocab_size})')
  model_cfg = config_lib.ModelConfig.from_config(cfg.model, vocab_size=vocab)
  lora_lib.model_target_paths(model_cfg)  # LoRA targets that match nothing: the candidates
  return tokenizer, model_cfg, Transformer(model_cfg), mesh, parallel.logical_rules(cfg)


def _global_batch(batch, mesh):
  return parallel.global_batch(batch, mesh)


def evaluate(eval_fn, params, batches, mesh, rules, *, perplexity: bool = True,
             aux_args: tuple = ()) -> dict:
  """Validation metrics: each batch's means weighted by the units it holds (the task's COUNT, or a
  metric's own `tasks.OWN_COUNT`), so they are the means over the whole validation set, however
  full its last batch is."""
  totals, units, own = {}, {}, {}
  for i, batch in enumerate(batches):
    rows = len(next(iter(batch.values())))
    batch = {**batch, step_lib.EVAL_INDEX: np.full((rows,), i, np.int32)}
    m = jax.device_get(step_lib.run_with_rules(mesh, rules, eval_fn, params,
                                               _global_batch(batch, mesh), *aux_args))
    count = float(m.pop(tasks.COUNT))
    own = {k[:-len(tasks.OWN_COUNT)]: float(m.pop(k)) for k in list(m)
           if k.endswith(tasks.OWN_COUNT)}
    for k, v in m.items():
      c = own.get(k, count)
      totals[k] = totals.get(k, 0.0) + (c * float(v) if c else 0.0)
      units[k] = units.get(k, 0.0) + c
  # An own-count metric none of whose units were in the validation set (an adapter without
  # validation rows) is left out.
  out = {f'val_{k}': v / max(units[k], 1e-30) for k, v in totals.items()
         if k != 'num_tokens' and (units[k] > 0 or k not in own)}
  if perplexity and 'val_ce' in out:  # for diffusion, ce is over masked tokens: no perplexity
    out['val_ppl'] = float(np.exp(min(out['val_ce'], 50.0)))
  return out


def frozen_validation_loss(cfg, frozen_model, tokenizer, mesh, rules) -> float:
  """A frozen model's (`train.frozen.load`) validation loss under cfg's task, on cfg's validation
  batches: the number the trainer would log for it."""
  from pathways_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  eval_fn = step_lib.jit_eval_step(cfg, tasks.make(cfg, frozen_model.model),
                                   frozen_model.shardings, mesh)
  return float(evaluate(eval_fn, frozen_model.params, pipeline.make_eval_batches(cfg, tokenizer),
                        mesh, rules)['val_loss'])


@dataclasses.dataclass
class _Model:
  """The model being trained and what is compiled for it (all replaced when it grows)."""
  cfg: config_lib.ModelConfig
  module: Transformer
  task: tasks.Task
  tx: Any
  shardings: Any  # of the train state
  train_fn: Callable
  eval_fn: Callable
  flops_per_token: float


def _compile(cfg, model_cfg, module, task, tx, shardings, mesh, input_shardings) -> _Model:
  return _Model(model_cfg, module, task, tx, shardings,
                step_lib.jit_train_step(cfg, task, tx, shardings, mesh, input_shardings),
                step_lib.jit_eval_step(cfg, task, shardings.params, mesh, input_shardings),
                metrics_lib.flops_per_token(model_cfg, cfg.data.seq_len))


def _versions() -> dict:
  import flax, optax, orbax.checkpoint, grain  # pylint: disable=g-import-not-at-top,multiple-import
  return {'python': platform.python_version(), 'jax': jax.__version__, 'flax': flax.__version__,
          'optax': optax.__version__, 'orbax': orbax.checkpoint.__version__,
          'grain': getattr(grain, '__version__', 'unknown')}


def _restore_frozen(workdir: str, abstract, shardings, qcfg, float_frozen):
  """A resumed run's frozen params: as saved; a QLoRA run's quantised base (`abstract` and
  `shardings` are then its storage target, adapters.qlora), or, saved in float by a run from
  before QLoRA bases were stored quantised, that float base quantised here."""
  if qcfg is None:
    return ckpt_lib.restore_frozen_params(workdir, abstract, shardings)
  if frozen_lib.holds_quantized_base(workdir):
    return qlora.from_storage(ckpt_lib.restore_frozen_params(workdir, abstract, shardings), qcfg)
  base = ckpt_lib.restore_frozen_params(workdir, *float_frozen)
  return qlora.quantize_placed(base, float_frozen[1], qcfg)[0]


def train(cfg, workdir: str, *, quiet: bool = False, callbacks: Sequence[Callback] = ()) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final results dict."""
  from pathways_jax.data import pipeline, tokenizers  # pylint: disable=g-import-not-at-top,multiple-import
  # A no-op if the CLI already did it; before the backend starts (config.host_malloc).
  host_memory.reuse_freed_memory(cfg.get('host_malloc', 'default'))
  check_workdir(workdir)
  tokenizer, model_cfg, model, mesh, rules = build(cfg)
  is_lead = jax.process_index() == 0
  parallel.check_batch(cfg, mesh)
  if is_lead:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))

  tx = opt_lib.make_optimizer(cfg.train)
  # model.lora_quantize (QLoRA): the frozen base is held quantised and read dequantised by
  # `run_model`; `model` (plain) still describes the params' shapes and shardings.
  qcfg = qlora.run_quant_config(cfg)
  run_model = model if qcfg is None else qlora.quantized_model(model)
  task = tasks.make(cfg, run_model)  # config.task: what is trained, its loss and frozen inputs
  tokenizers.require_special_ids(cfg, task.required_specials, f'task {task.name!r}')
  if model_cfg.lora_num_adapters > 1 and tasks.ADAPTER_IDS not in task.batch_fields():
    raise config_lib.ConfigError(
        f'task {task.name!r} does not pass per-row adapter ids: a multi-LoRA run '
        f'(model.lora_num_adapters={model_cfg.lora_num_adapters}) trains with task \'sft\' or '
        "'llada_sft'")
  growth = growth_phase.Growth(cfg, model_cfg)  # config.growth: the model grows mid-run
  example = np.zeros((cfg.data.batch_size, cfg.data.seq_len), np.int32)
  # train.trainable: the state holds only the trained params; the frozen ones are stored once.
  # A LoRA model (model.lora_rank > 0) trains its adapters (and a reward model's scalar head)
  # unless the config says otherwise.
  trainable = trainable_lib.run_pattern(cfg, model_cfg)
  abstract, shardings, frozen_abstract, frozen_shardings = state_lib.split_state_and_shardings(
      model, tx, example, mesh, rules, trainable)
  pindex, pcount = parallel.process_batch_slice(mesh)  # this process's rows of each batch
  # The task's frozen inputs: e.g. RHO-1's reference params (the step's aux) or cached L_ref rows.
  frozen_in = task.setup(tasks.RunContext(cfg, workdir, tokenizer, mesh, rules,
                                          model_cfg.vocab_size, train=train))
  train_iter = pipeline.make_train_iterator(cfg, tokenizer, process_index=pindex,
                                            process_count=pcount,
                                            vocab_size=model_cfg.vocab_size,
                                            row_fields=frozen_in.row_fields)
  eval_batches = pipeline.make_eval_batches(cfg, tokenizer, process_index=pindex,
                                            process_count=pcount,
                                            row_fields=frozen_in.eval_row_fields)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_checkpoints,
                               async_save=cfg.train.async_checkpoints)
  start = ckpt.latest_step()
  if start is not None and growth.grown_by(start):  # checkpoints from growth.at_step on are grown
    model_cfg, model, tx, abstract, shardings = growth.parts(start, example, mesh, rules)
    task = task.with_model(model)
  # QLoRA: the frozen base lands quantised, one weight at a time, and is saved so (docs/qlora.md):
  # its float copy is never whole on the device.
  n_frozen = count_params(frozen_abstract) if frozen_abstract is not None else 0
  quantizer = None
  if qcfg is not None:
    quantizer = qlora.LeafQuantizer(qcfg)
    float_frozen = (frozen_abstract, frozen_shardings)
    frozen_abstract, frozen_shardings = qlora.storage_target(*float_frozen, qcfg)
  frozen_params = None
  if start is not None:
    state = ckpt.restore(start, abstract, shardings, train_iter)
    if frozen_abstract is not None:
      frozen_params = _restore_frozen(workdir, frozen_abstract, frozen_shardings, qcfg,
                                      float_frozen if qcfg is not None else None)
    _LOG.info('resumed from step %d', start)
  else:
    init_params = None
    if cfg.train.init_from:
      from pathways_jax.interop.hf import run_dir  # pylint: disable=g-import-not-at-top
      init_params = run_dir.load_init_params(cfg.train.init_from, model, mesh, rules,
                                             transform=quantizer)
    state, frozen_params = state_lib.init_split_state(model, tx, example, jax.random.key(cfg.seed),
                                                      mesh, rules, trainable, params=init_params)
    init_params = None  # the frozen part lives on in frozen_params (not copied)
    if frozen_params is not None:
      ckpt_lib.save_frozen_params(
          workdir, frozen_params if qcfg is None else qlora.for_storage(frozen_params))
      host_memory.trim_after_bulk_io()  # else the save's freed buffers add to the step's peak
    start = 0
  qlora_bytes = None
  if qcfg is not None:
    qlora_bytes, qlora_line = qlora.describe_bytes(frozen_params, qcfg)
    _LOG.info(qlora_line)
  aux_args, input_shardings = step_lib.step_inputs(frozen_in, frozen_params, frozen_shardings)

  m = _compile(cfg, model_cfg, run_model, task, tx, shardings, mesh, input_shardings)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_lead)
  peak, peak_source = metrics_lib.peak_flops_per_device(cfg.train.peak_flops)
  tokens_per_step = m.task.tokens_per_step()
  validate = lambda params: evaluate(m.eval_fn, params, eval_batches, mesh, rules,
                                     perplexity=m.task.perplexity, aux_args=aux_args)

  def grow(state):
    """growth.at_step: the grown state, and the model, optimizer and steps compiled for it."""
    nonlocal m
    before = validate(state.params)['val_loss']
    state, model_cfg, model, tx, shardings = growth.grow_state(state, example, mesh, rules)
    m = _compile(cfg, model_cfg, model, m.task.with_model(model), tx, shardings, mesh,
                 input_shardings)
    after = validate(state.params)['val_loss']
    writer.write(step, {'growth_val_loss_before': before, 'growth_val_loss_after': after})
    last.update(growth_val_loss_before=before, growth_val_loss_after=after)
    if is_lead and not quiet:
      print(f'step {step}: grew to {model_cfg.num_layers} layers, d={model_cfg.d_model}, '
            f'{count_params(state.params) / 1e6:.2f}M params; val loss {before:.4f} -> {after:.4f}')
    return state

  n_params = count_params(state.params) + n_frozen
  stop = min(cfg.train.stop_at or cfg.train.steps, cfg.train.steps)
  if is_lead and not quiet:
    print(f'model: {n_params / 1e6:.2f}M params, {model_cfg.num_layers} layers, d={model_cfg.d_model}, '
          f'vocab={model_cfg.vocab_size} ({tokenizer.name}); task={task.describe()}; '
          f'mesh={dict(mesh.shape)}; peak={peak / 1e9:.1f} GFLOP/s/device ({peak_source})')
    if frozen_params is not None:
      print(f'training {count_params(state.params):,} of {n_params:,} params '
            f'(train.trainable={trainable!r}); the rest are frozen')
    for line in (*frozen_in.describe, *growth.describe()):
      print(line)
    if qlora_bytes is not None:
      print(qlora_line)

  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=stop, initial=start, disable=quiet or not is_lead or not cfg.train.progress_bar,
             dynamic_ncols=True, desc='train')
  last = {'step': start}
  pending, t_last, step = [], time.perf_counter(), start
  trimmed_after = None  # the train_fn / eval_fn whose compilation garbage was handed back
  trimmed_eval_after = None
  if growth.due(step, m.cfg):  # growth.at_step=0: grow the initial model
    state = grow(state)
  status = 'completed'

  def check_finite():
    bad = int(state.bad_step)
    if bad >= 0:
      raise TrainingError(
          f'non-finite loss or gradient at step {bad}: stopped without saving; the last good '
          f'checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is intact. Lower train.lr, '
          'raise train.warmup_steps or check the data.')

  task_results = {}  # the newest metrics of the task's own evaluations, for results.json

  def task_callback(fn):
    def run(step, params):
      out = fn(step, params)
      task_results.update(out or {})
      return out
    return run

  def fresh_opt_state(params):
    """The optimizer's initial state for `params`, placed as the state's (a new buffer)."""
    return jax.jit(m.tx.init, out_shardings=m.shardings.opt_state)(params)

  all_callbacks = (*callbacks,
                   *(Callback(every, task_callback(fn)) for every, fn in task.callbacks()))
  if cfg.train.eval_on_start and step == 0:
    val = validate(state.params)
    for cb in all_callbacks:
      try:
        val.update(cb.fn(0, trainable_lib.merge(state.params, frozen_params)) or {})
      except StopTraining as e:  # nothing trained yet: its numbers are kept, the run goes on
        val.update(e.metrics or {})
    writer.write(0, val)
    t_last = time.perf_counter()
  with _Preemption() as preempt:
    try:
      while step < stop:
        host_metrics = {}
        if m.task.makes_batches:  # e.g. RL: rollouts from the current policy
          batch, host_metrics = m.task.make_batch(
              train_iter, step=step, params=trainable_lib.merge(state.params, frozen_params),
              aux=aux_args[0].get('aux') if aux_args else None)
        else:
          host_batch = next(train_iter)
          if step == start:
            m.task.check_batch(host_batch)  # a missing field is named before the step compiles
          batch = _global_batch(host_batch, mesh)
        state, out = step_lib.run_with_rules(mesh, rules, m.train_fn, state, batch, *aux_args)
        out = {**out, **host_metrics}
        if trimmed_after is not m.train_fn:  # its first call compiled it
          host_memory.release_free_memory()
          trimmed_after = m.train_fn
        step += 1
        pending.append(out)
        state, aux_args, reset = m.task.after_step(step, state, aux_args, workdir=workdir,
                                                   fresh_opt_state=fresh_opt_state)
        if reset:
          writer.write(step, reset)
          last.update(reset)
        if growth.due(step, m.cfg):  # before this step's eval and checkpoint
          state = grow(state)
        if step % cfg.train.log_every == 0 or step == stop:
          fetched = jax.device_get(pending)
          check_finite()
          now = time.perf_counter()
          tps = len(pending) * tokens_per_step / (now - t_last)
          scalars = {k: float(np.mean([p[k] for p in fetched])) for k in fetched[0]}
          scalars.update(lr=growth.lr_at(step - 1), flops=growth.flops(step), tokens_per_s=tps,
                         mfu=tps * m.flops_per_token / (peak * jax.device_count()),
                         tokens=step * tokens_per_step)
          writer.write(step, scalars)
          last.update(scalars, step=step)
          bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f'{tps:,.0f}', refresh=False)
          pending, t_last = [], time.perf_counter()
        bar.update(1)
        stop_now = False
        for cb in all_callbacks:
          if step % cb.every == 0 or step == stop:
            try:
              logged = cb.fn(step, trainable_lib.merge(state.params, frozen_params))
            except StopTraining as e:
              logged, stop_now = e.metrics, True
            if logged:
              writer.write(step, logged)
              last.update(logged)
            t_last = time.perf_counter()  # a callback's time is not training throughput
        if stop_now:
          check_finite()
          ckpt.save(step, state, train_iter, force=True)
          status = 'stopped'
          break
        if step % cfg.train.eval_every == 0 and step != stop:
          val = validate(state.params)
          writer.write(step, val)
          if trimmed_eval_after is not m.eval_fn:  # its first call compiled it
            host_memory.release_free_memory()
            trimmed_eval_after = m.eval_fn
          t_last = time.perf_counter()  # eval time is not training throughput
        if step % cfg.train.checkpoint_every == 0 and step != stop:
          check_finite()
          ckpt.save(step, state, train_iter)
        if preempt.requested and m.task.can_checkpoint(step):
          check_finite()
          ckpt.save(step, state, train_iter, force=True)
          status = 'preempted'
          if is_lead:
            print(f'SIGTERM: saved checkpoint at step {step}; rerun the same command to resume.')
          break
      else:
        check_finite()
        if ckpt.latest_step() != step:
          ckpt.save(step, state, train_iter, force=True)
    finally:
      bar.close()
      ckpt.wait()

  results = {'status': status, 'step': step, 'train_loss': last.get('loss'),
             'tokens': step * tokens_per_step, 'params': count_params(state.params) + n_frozen,
             'trainable_params': count_params(state.params),
             'flops_per_token': m.flops_per_token, 'total_flops': growth.flops(step),
             'tokens_per_s': last.get('tokens_per_s'), 'mfu': last.get('mfu')}
  if qlora_bytes is not None:
    results['qlora'] = qlora_bytes
  if growth.enabled:
    results['growth'] = {'at_step': growth.at_step, 'num_layers': m.cfg.num_layers,
                         'd_model': m.cfg.d_model,
                         'val_loss_before': last.get('growth_val_loss_before'),
                         'val_loss_after': last.get('growth_val_loss_after')}
  if status in ('completed', 'stopped'):
    val = validate(state.params)
    writer.write(step, val)
    val.update(task_results)  # evaluated at this last step by the task's callbacks
    results.update(val)
    if is_lead and not quiet:
      print('validation: ' + ', '.join(f'{k}={v:.4f}' for k, v in sorted(val.items())))
    from pathways_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
    samples = sample_lib.sample_texts(cfg, m.module, trainable_lib.merge(state.params, frozen_params),
                                      tokenizer, key=jax.random.key(cfg.seed + 2))
    results['samples'] = samples
    if is_lead:
      writer.write_text(step, 'samples', '\n\n'.join(samples))
      if not quiet:
        print('samples:')
        for s in samples:
          print('  ' + s.replace('\n', '\n  '))
  writer.close()
  ckpt.close()
  results.update(config=json.loads(cfg.to_json_best_effort()), versions=_versions(),
                 device={'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
                         'count': jax.device_count(), 'processes': jax.process_count(),
                         'peak_flops_per_device': peak, 'peak_source': peak_source,
                         'host_malloc': 'reuse' if host_memory.enabled() else 'default'},
                 argv=sys.argv)
  if is_lead:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2, default=str)
  return results


def train_stage(cfg, workdir: str) -> dict:
  """One stage of a multi-run experiment: `train`, or the saved results of a stage that already
  completed (so rerunning the experiment resumes it); a stage that stops early is an error
  (`wall_s`, this call's wall time, is added to results.json)."""
  path = os.path.join(workdir, 'results.json')
  if os.path.exists(path):
    with open(path) as f:
      res = json.load(f)
    if res.get('status') == 'completed':
      return res
  t0 = time.perf_counter()
  res = train(cfg, workdir, quiet=True)
  if res.get('status') != 'completed':
    raise TrainingError(f'{workdir} stopped ({res.get("status")}); rerun the same command to '
                        'resume (finished stages are skipped)')
  res['wall_s'] = time.perf_counter() - t0
  with open(path, 'w') as f:
    json.dump(res, f, indent=2, default=str)
  return res
