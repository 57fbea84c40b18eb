"""lm-evaluation-harness model `pathways`: any run directory (trained here or imported from
HuggingFace), AR or LLaDA, on the harness's tasks. See docs/evaluation.md.

    python -m pathways_jax.evaluate --workdir=runs/x --tasks=hellaswag,arc_easy
    lm_eval.simple_evaluate(model='pathways', model_args='workdir=runs/x,batch_size=16', ...)
      (after `import pathways_jax.eval.harness`, which registers the name)

Request types:
  loglikelihood          AR: exact teacher-forced sum of log p(continuation | context) and whether
                         greedy decoding gives the continuation, in batches padded to a few
                         lengths (`buckets`); context + continuation is cut on the left to
                         `max_length` (+1) tokens, as the harness's HF model does.
                         LLaDA: the Monte Carlo bound of objectives.diffusion.log_likelihood
                         (`mc_num` samples, stratified in mini-batches of `mc_batch_size`, the
                         same key for every request) and LLaDA's suffix greedy check.
  loglikelihood_rolling  AR: disjoint windows of `max_length` tokens, summed (the HF model's
                         rolling windows); LLaDA: an error, as LLaDA's own harness code raises.
  generate_until         AR: the KV-cache sampler; LLaDA: the semi-autoregressive sampler. Greedy
                         unless the task asks to sample; the text is cut at EOS / end of turn and
                         at the first stop string, at most `max_gen_toks` tokens.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval import utils as lm_utils
from tqdm import tqdm

from pathways_jax.objectives import diffusion as diffusion_obj

log = logging.getLogger(__name__)

_DEFAULT_MAX_GEN_TOKS = 256  # the harness's HF model default


def _as_bool(value) -> bool:
  if isinstance(value, str):
    return value.strip().lower() in ('1', 'true', 'yes', 'y')
  return bool(value)


def _opt_int(value) -> int | None:
  return None if value is None or value == '' else int(value)


def bucket_lengths(max_length: int, smallest: int = 32) -> tuple[int, ...]:
  """Powers of two from `smallest` up to `max_length`, and `max_length` itself: every row is
  padded to the next one, so a whole evaluation compiles a handful of programs."""
  out, n = [], max(1, smallest)
  while n < max_length:
    out.append(n)
    n *= 2
  return tuple(out) + (max_length,)


# ----------------------------------------------------------------------------------------------
# Jitted scoring (one program per (rows, bucket) shape)


@functools.partial(jax.jit, static_argnames=('model',))
def _target_logprobs(model, params, inputs_BT, targets_BT, segments_BT):
  """log p(targets_BT | inputs_BT) of a causal model per position [B, T] float32, and whether
  the argmax is the target. Right padding has segment 0: causal attention never lets a real
  position see it."""
  logits_BTV = model.apply({'params': params}, inputs_BT,
                           segment_ids_BL=segments_BT).astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return target_BT - lse_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


def _diffusion_logits(model, params, x_BT, prompt_BT, segments_BT, *, mask_id, cfg_scale):
  """Logits of a bidirectional model; with `cfg_scale` LLaDA's unsupervised CFG (the prompt
  replaced by masks): u + (w + 1)(c - u). Padding (segment 0) is never attended to."""
  if cfg_scale > 0:
    uncond_BT = jnp.where(prompt_BT, jnp.asarray(mask_id, x_BT.dtype), x_BT)
    both = model.apply({'params': params}, jnp.concatenate([x_BT, uncond_BT], axis=0),
                       segment_ids_BL=jnp.concatenate([segments_BT, segments_BT], axis=0))
    both = both.astype(jnp.float32)
    cond, uncond = both[:x_BT.shape[0]], both[x_BT.shape[0]:]
    return uncond + (cfg_scale + 1.0) * (cond - uncond)
  return model.apply({'params': params}, x_BT, segment_ids_BL=segments_BT).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('model', 'mask_id', 'cfg_scale'))
def _masked_ce(model, params, noisy_BT, targets_BT, masked_BT, prompt_BT, segments_BT, p_mask_B,
               *, mask_id, cfg_scale):
  """Per row: sum of the masked tokens' CE / p_mask (one Monte Carlo sample of LLaDA's bound,
  computed as diffusion._likelihood_batch computes it)."""
  logits_BTV = _diffusion_logits(model, params, noisy_BT, prompt_BT, segments_BT,
                                 mask_id=mask_id, cfg_scale=cfg_scale)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return ((lse_BT - target_BT) * masked_BT).sum(axis=1) / p_mask_B


@functools.partial(jax.jit, static_argnames=('model', 'mask_id', 'cfg_scale'))
def _suffix_greedy(model, params, seq_BT, prompt_len_B, total_len_B, segments_BT, *, mask_id,
                   cfg_scale):
  """LLaDA's `suffix_greedy_prediction` on a batch: the answer fully masked, then one token per
  step (the most confident masked position takes its argmax) until none is left; True where the
  result is the answer."""
  pos_T = jnp.arange(seq_BT.shape[1])
  answer_BT = (pos_T >= prompt_len_B[:, None]) & (pos_T < total_len_B[:, None])
  prompt_BT = pos_T < prompt_len_B[:, None]
  mask = jnp.asarray(mask_id, seq_BT.dtype)
  x0_BT = jnp.where(answer_BT, mask, seq_BT)

  def step(_, x_BT):
    logits_BTV = _diffusion_logits(model, params, x_BT, prompt_BT, segments_BT, mask_id=mask_id,
                                   cfg_scale=cfg_scale)
    pred_BT = jnp.argmax(logits_BTV, axis=-1).astype(x_BT.dtype)
    conf_BT = jnp.take_along_axis(jax.nn.softmax(logits_BTV, axis=-1), pred_BT[..., None],
                                  axis=-1)[..., 0]
    still_BT = answer_BT & (x_BT == mask)
    best_B = jnp.argmax(jnp.where(still_BT, conf_BT, -1.0), axis=1)
    commit_BT = (pos_T[None] == best_B[:, None]) & still_BT.any(axis=1, keepdims=True)
    return jnp.where(commit_BT, pred_BT, x_BT)

  steps = jnp.max(total_len_B - prompt_len_B)
  x_BT = jax.lax.fori_loop(0, steps, step, x0_BT)
  return jnp.all(jnp.where(answer_BT, x_BT == seq_BT, True), axis=1)


_likelihood_masks = jax.jit(diffusion_obj.likelihood_masks, static_argnums=(2, 3))


# ----------------------------------------------------------------------------------------------


@register_model('pathways')
class PathwaysLM(TemplateLM):
  """The harness's view of a run directory. model_args (all optional but `workdir`):

  workdir, step            the run directory and checkpoint (default: the newest)
  adapter                  a multi-LoRA run's adapter to evaluate (required there: such a run
                           trained model.lora_num_adapters = K > 1 of them); it runs alone
  batch_size               rows per forward pass (default 16); every batch is padded to it
  max_length               context window (default and maximum: the model's max_len)
  max_gen_toks             generation length when a task gives none (256)
  buckets                  padded lengths, '64;128;512' (default: powers of two from 32 and
                           max_length); a longer row uses max_length
  add_bos_token            prepend BOS to every text (default: whether the tokenizer has one, as
                           the training pipeline starts documents with it)
  seed                     PRNG seed of sampling and of the LLaDA estimator (0)
  LLaDA only:
  mc_num, mc_batch_size    Monte Carlo samples of the likelihood bound (default 16; LLaDA's own
                           evaluations use 128) and the mini-batch their mask counts are
                           stratified over (default min(mc_num, 32)); mc_batch_size must divide
                           mc_num
  cfg_scale                unsupervised classifier-free guidance in likelihoods and sampling (0)
  check_greedy             run LLaDA's suffix greedy check for is_greedy (default True; it costs one
                           forward pass per continuation token; False reports is_greedy=False, as
                           LLaDA's is_check_greedy=False)
  steps, block_length      sampler steps (default: one token per step) and block length
                           (default: the whole generation in one block)
  remasking, cache, threshold   the LLaDA sampler's options (sampling.diffusion.generate)
  """

  def __init__(self, workdir: str, step=None, batch_size=16, max_length=None,
               max_gen_toks=_DEFAULT_MAX_GEN_TOKS, buckets=None, add_bos_token=None, seed=0,
               mc_num=16, mc_batch_size=None, cfg_scale=0.0, check_greedy=True, steps=None,
               block_length=None, remasking='low_confidence', cache=None, threshold=None,
               max_batch_size=None, device=None, adapter=None, **kwargs):
    super().__init__()
    del max_batch_size, device  # one jitted program per shape; JAX places it
    if kwargs:
      raise ValueError(f'pathways model: unknown model_args {sorted(kwargs)}')
    from pathways_jax import sample  # pylint: disable=g-import-not-at-top
    from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
    from pathways_jax import config_files  # pylint: disable=g-import-not-at-top
    self.workdir = workdir
    self.adapter = _opt_int(adapter)
    run_model = config_files.load_run_config(workdir).model
    k = run_model.get('lora_num_adapters', 1) if run_model.get('lora_rank') else 1
    if k > 1 and self.adapter is None:
      raise ValueError(f'pathways model: {workdir} trained {k} adapters (model.lora_num_adapters):'
                       f' evaluate one with adapter=k (--adapter=k), k in [0, {k})')
    self.run_cfg, self.model, self.params, self.tokenizer = sample.load_run(
        workdir, _opt_int(step), adapter=self.adapter)
    self.step = _opt_int(step) if _opt_int(step) is not None else frozen.checkpoint_steps(
        workdir)[-1]
    self.causal = bool(self.model.cfg.causal)
    if batch_size in (None, '') or str(batch_size).startswith('auto'):
      if batch_size not in (None, ''):
        log.warning('pathways model: batch_size=%s is not supported; using 16', batch_size)
      batch_size = 16
    self._batch_size = int(batch_size)
    model_max = int(self.model.cfg.max_len)
    self._max_length = model_max if max_length in (None, '') else int(max_length)
    if not 2 <= self._max_length <= model_max:
      raise ValueError(f'pathways model: max_length={self._max_length} must be in [2, the '
                       f'model\'s max_len={model_max}]')
    self._max_gen_toks = int(max_gen_toks)
    if buckets in (None, ''):
      self.buckets = bucket_lengths(self._max_length)
    else:
      given = sorted({int(b) for b in str(buckets).replace(':', ';').split(';') if b.strip()})
      self.buckets = tuple(b for b in given if b < self._max_length) + (self._max_length,)
    tok = self.tokenizer
    self.add_bos = (tok.bos_id is not None) if add_bos_token in (None, '') else _as_bool(
        add_bos_token)
    if self.add_bos and tok.bos_id is None:
      raise ValueError(f'pathways model: add_bos_token=True but the tokenizer {tok.name} has no '
                       'BOS token')
    self.seed = int(seed)
    self.pad_id = int(tok.pad_id if tok.pad_id is not None else tok.eos_id)
    self.stop_ids = frozenset(i for i in (tok.eos_id, getattr(tok, 'end_of_turn_id', None))
                              if i is not None)
    self._sample_calls = 0
    # LLaDA
    self.mc_num = int(mc_num)
    self.mc_batch_size = min(self.mc_num, 32) if mc_batch_size in (None, '') else int(
        mc_batch_size)
    self.cfg_scale = float(cfg_scale)
    self.check_greedy = _as_bool(check_greedy)
    self.steps = _opt_int(steps)
    self.block_length = _opt_int(block_length)
    self.remasking = str(remasking)
    self.cache = cache or None
    self.threshold = None if threshold in (None, '') else float(threshold)
    if not self.causal:
      if tok.mask_id is None:
        raise ValueError(f'pathways model: {workdir} is a LLaDA model but its tokenizer '
                         f'{tok.name} has no mask token')
      self.mask_id = int(tok.mask_id)
      if self.mc_num <= 0 or self.mc_batch_size <= 0 or self.mc_num % self.mc_batch_size:
        raise ValueError(f'pathways model: mc_num={self.mc_num} must be a positive multiple of '
                         f'mc_batch_size={self.mc_batch_size}')

  # -- what the harness asks of a model --------------------------------------------------
  def get_model_info(self) -> dict:
    """Into the results' config (the harness records no model_args for a model object)."""
    info = dict(pathways_workdir=os.path.abspath(self.workdir), pathways_step=self.step,
                pathways_model='AR' if self.causal else 'LLaDA',
                model_num_parameters=int(sum(x.size for x in jax.tree.leaves(self.params))),
                max_length=self._max_length, batch_size=self._batch_size, buckets=self.buckets,
                add_bos_token=self.add_bos, seed=self.seed, pathways_adapter=self.adapter)
    if not self.causal:
      info.update(mc_num=self.mc_num, mc_batch_size=self.mc_batch_size, cfg_scale=self.cfg_scale,
                  check_greedy=self.check_greedy, steps=self.steps,
                  block_length=self.block_length, remasking=self.remasking)
    return info

  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer.eos_id)

  @property
  def prefix_token_id(self) -> int:
    # What an empty context conditions on (and rolling windows start from): BOS, else EOS.
    bos = self.tokenizer.bos_id
    return int(bos if bos is not None and self.add_bos else self.tokenizer.eos_id)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, 'fingerprint', self.tokenizer.name)).replace('/', '__')

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if not chat_template:
      return None
    return getattr(self.tokenizer, 'chat_template', None) or ''

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The conversation by the tokenizer's chat template (HFTokenizer.render_chat). Without a
    generation prompt the last message is continued (transformers' continue_final_message): the
    text stops after its content, before the template's end of turn."""
    render = getattr(self.tokenizer, 'render_chat', None)
    if render is None:
      raise ValueError(f'apply_chat_template: the tokenizer {self.tokenizer.name} has no chat '
                       'template (only HuggingFace tokenizers, config.data.tokenizer=hf, do)')
    from jinja2 import exceptions  # pylint: disable=g-import-not-at-top
    try:
      text = render(chat_history, add_generation_prompt=add_generation_prompt)
    except exceptions.TemplateError:
      # Some templates refuse a system turn; the harness's HF model retries without it.
      log.warning('the chat template failed; retrying without the system message')
      chat_history = [m for m in chat_history if m['role'] != 'system']
      text = render(chat_history, add_generation_prompt=add_generation_prompt)
    if not add_generation_prompt and chat_history:
      final = chat_history[-1]['content']
      at = text.rfind(final.strip())
      if at < 0:
        raise ValueError('apply_chat_template: the final message is not in the rendered chat')
      keep = len(final.lstrip()) if text[at:at + len(final.lstrip())] == final.lstrip() else len(
          final.strip())
      text = text[:at + keep]
    return text

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del kwargs
    ids = list(self.tokenizer.encode(string))
    add = self.add_bos if add_special_tokens is None else (add_special_tokens and self.add_bos)
    # A chat template may already begin with the BOS text, which encodes to the BOS id.
    if add and not (ids and ids[0] == self.tokenizer.bos_id):
      ids = [int(self.tokenizer.bos_id)] + ids
    return ids

  def tok_decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    for j, i in enumerate(ids):
      if i in self.stop_ids:
        ids = ids[:j]
        break
    return self.tokenizer.decode(ids)

  # -- shapes ------------------------------------------------------------------------------
  def _bucket(self, n: int) -> int:
    for b in self.buckets:
      if n <= b:
        return b
    return self._max_length

  def _chunks(self, order: Sequence[int]):
    for i in range(0, len(order), self._batch_size):
      yield order[i:i + self._batch_size]

  # -- loglikelihood -----------------------------------------------------------------------
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    del kwargs
    for _, context_enc, continuation_enc in requests:
      if not continuation_enc:
        raise ValueError('loglikelihood: the continuation encodes to no tokens')
      if len(continuation_enc) > self._max_length:
        raise ValueError(f'loglikelihood: a continuation of {len(continuation_enc)} tokens is '
                         f'longer than max_length={self._max_length}')
      del context_enc
    if self.causal:
      out = self._ar_loglikelihood(requests, disable_tqdm)
    else:
      out = self._llada_loglikelihood(requests, disable_tqdm)
    for (strings, _, _), answer in zip(requests, out):
      if strings is not None:
        self.cache_hook.add_partial('loglikelihood', strings, answer)
    return out

  def _ar_loglikelihood(self, requests, disable_tqdm):
    rows = []
    for _, context_enc, continuation_enc in requests:
      # The last max_length + 1 tokens: max_length inputs, each predicting the next one.
      whole = (list(context_enc) + list(continuation_enc))[-(self._max_length + 1):]
      rows.append((whole[:-1], whole[1:], len(continuation_enc)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # tight buckets
    out: list[Any] = [None] * len(rows)
    b = self._batch_size
    with tqdm(total=len(rows), disable=disable_tqdm, desc='pathways loglikelihood') as bar:
      for chunk in self._chunks(order):
        width = self._bucket(max(len(rows[i][0]) for i in chunk))
        inputs = np.full((b, width), self.pad_id, np.int32)
        targets = np.zeros((b, width), np.int32)
        segments = np.zeros((b, width), np.int32)
        for r, i in enumerate(chunk):
          x, y, _ = rows[i]
          inputs[r, :len(x)], targets[r, :len(y)], segments[r, :len(x)] = x, y, 1
        logp_BT, greedy_BT = jax.device_get(
            _target_logprobs(self.model, self.params, inputs, targets, segments))
        for r, i in enumerate(chunk):
          n_in, n_cont = len(rows[i][0]), rows[i][2]
          span = slice(n_in - n_cont, n_in)
          out[i] = (float(logp_BT[r, span].astype(np.float64).sum()),
                    bool(greedy_BT[r, span].all()))
        bar.update(len(chunk))
    return out

  def _llada_loglikelihood(self, requests, disable_tqdm):
    """LLaDA's bound (diffusion.log_likelihood) with its draws, but every row padded to a
    bucket and rows of several requests in one forward pass, so that a task compiles a few
    programs instead of one per (prompt, answer) length."""
    pairs = []
    for _, context_enc, continuation_enc in requests:
      # The context cut on the left so that context + continuation fit max_length.
      keep = self._max_length - len(continuation_enc)
      pairs.append((list(context_enc)[-keep:] if keep > 0 else [], list(continuation_enc)))
    key = jax.random.key(self.seed)
    # Every Monte Carlo row of every request: (request, tokens, noisy tokens, masked, p_mask).
    rows = []
    for i, (prompt, answer) in enumerate(pairs):
      seq = np.asarray(prompt + answer, np.int32)
      n_ans = len(answer)
      for j in range(self.mc_num // self.mc_batch_size):
        masked_BA, l_B = jax.device_get(_likelihood_masks(key, np.int32(j), n_ans,
                                                          self.mc_batch_size))
        # As the estimator computes it: float32 l / L.
        p_mask_B = np.asarray(l_B, np.float32) / np.float32(n_ans)
        for r in range(self.mc_batch_size):
          masked = np.concatenate([np.zeros(len(prompt), bool), masked_BA[r]])
          rows.append((i, seq, np.where(masked, self.mask_id, seq), masked, p_mask_B[r],
                       len(prompt)))
    sums = np.zeros(len(pairs), np.float64)
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k][1]))
    b = self._batch_size
    with tqdm(total=len(rows), disable=disable_tqdm, desc='pathways LLaDA likelihood rows') as bar:
      for chunk in self._chunks(order):
        width = self._bucket(max(len(rows[k][1]) for k in chunk))
        noisy = np.full((b, width), self.pad_id, np.int32)
        targets = np.zeros((b, width), np.int32)
        masked = np.zeros((b, width), bool)
        prompt = np.zeros((b, width), bool)
        segments = np.zeros((b, width), np.int32)
        p_mask = np.ones((b,), np.float32)
        for r, k in enumerate(chunk):
          _, seq, x, m, p, n_prompt = rows[k]
          n = len(seq)
          noisy[r, :n], targets[r, :n], masked[r, :n], segments[r, :n] = x, seq, m, 1
          prompt[r, :n_prompt] = True
          p_mask[r] = p
        scores = jax.device_get(_masked_ce(self.model, self.params, noisy, targets, masked, prompt,
                                           segments, p_mask, mask_id=self.mask_id,
                                           cfg_scale=self.cfg_scale))
        for r, k in enumerate(chunk):
          sums[rows[k][0]] += float(scores[r])
        bar.update(len(chunk))
    greedy = self._llada_greedy(pairs) if self.check_greedy else [False] * len(pairs)
    return [(-float(s) / self.mc_num, g) for s, g in zip(sums, greedy)]

  def _llada_greedy(self, pairs) -> list[bool]:
    out = [False] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    b = self._batch_size
    for chunk in self._chunks(order):
      width = self._bucket(max(len(pairs[i][0]) + len(pairs[i][1]) for i in chunk))
      seq = np.full((b, width), self.pad_id, np.int32)
      segments = np.zeros((b, width), np.int32)
      prompt_len = np.zeros((b,), np.int32)
      total_len = np.zeros((b,), np.int32)
      for r, i in enumerate(chunk):
        p, a = pairs[i]
        seq[r, :len(p) + len(a)] = p + a
        segments[r, :len(p) + len(a)] = 1
        prompt_len[r], total_len[r] = len(p), len(p) + len(a)
      ok = jax.device_get(_suffix_greedy(self.model, self.params, seq, prompt_len, total_len,
                                         segments, mask_id=self.mask_id,
                                         cfg_scale=self.cfg_scale))
      for r, i in enumerate(chunk):
        out[i] = bool(ok[r])
    return out

  # -- loglikelihood_rolling ---------------------------------------------------------------
  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    if not self.causal:
      raise NotImplementedError(
          'loglikelihood_rolling (perplexity tasks such as wikitext) is not defined for a LLaDA '
          '(masked diffusion) model: it has no per-token conditionals to chain, only a bound on a '
          'whole continuation (loglikelihood); LLaDA\'s own harness model raises here too')
    windows, owner = [], []
    for n, (string,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(string,
                                                                      add_special_tokens=False),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self._max_length, context_len=1)):
        windows.append((None, context, continuation))
        owner.append(n)
    totals = [0.0] * len(requests)
    for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[n] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # -- generate_until ----------------------------------------------------------------------
  def _gen_settings(self, gen_kwargs: dict) -> dict:
    """The task's generation kwargs, as the harness's HF model reads them."""
    kw = dict(gen_kwargs or {})
    until = kw.pop('until', None)
    until = [until] if isinstance(until, str) else list(until or [])
    max_new = None
    for name in ('max_gen_toks', 'max_new_tokens', 'max_tokens', 'max_completion_tokens'):
      if kw.get(name) is not None:
        max_new = int(kw[name])
        break
    temperature = float(kw.get('temperature', 0.0) or 0.0)
    do_sample = kw.get('do_sample')
    if do_sample is None:
      do_sample = temperature > 0
    if not _as_bool(do_sample):
      temperature = 0.0
    return dict(until=until, max_gen_toks=max_new or self._max_gen_toks,
                temperature=temperature, top_k=_opt_int(kw.get('top_k')) or None,
                top_p=kw.get('top_p'))

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups = collections.defaultdict(list)  # one decoding setup per group
    for n, req in enumerate(requests):
      context, gen_kwargs = req.args
      groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append((n, context, gen_kwargs))
    out: list[Any] = [None] * len(requests)
    with tqdm(total=len(requests), disable=disable_tqdm, desc='pathways generate_until') as bar:
      for items in groups.values():
        setting = self._gen_settings(items[0][2])
        encoded = {n: self.tok_encode(context) for n, context, _ in items}
        order = sorted((n for n, _, _ in items), key=lambda n: -len(encoded[n]))
        for chunk in self._chunks(order):
          texts = self._generate([encoded[n] for n in chunk], setting)
          for n, text in zip(chunk, texts):
            for stop in setting['until']:
              if stop:
                text = text.split(stop)[0]
            out[n] = text
            self.cache_hook.add_partial('generate_until', requests[n].args, text)
          bar.update(len(chunk))
    return out

  def _generate(self, prompts: list[list[int]], setting: dict) -> list[str]:
    """Completions (text up to EOS / end of turn) of left-padded prompts, batch padded."""
    max_new = setting['max_gen_toks']
    if self.causal:
      gen_length = max_new
    else:
      block = self.block_length or max_new
      gen_length = math.ceil(max_new / block) * block  # whole blocks; cut back to max_new below
    room = self._max_length - gen_length
    if room < 1:
      raise ValueError(f'generate_until: {gen_length} new tokens leave no room for a prompt '
                       f'within max_length={self._max_length}')
    prompts = [p[-room:] for p in prompts]  # left-truncated, as the harness's HF model does
    width = min(self._bucket(max(len(p) for p in prompts)), room)
    b = self._batch_size
    tokens = np.full((b, width), self.pad_id, np.int32)
    mask = np.zeros((b, width), bool)
    for r in range(b):
      p = prompts[r] if r < len(prompts) else prompts[0]  # filler rows repeat a real prompt
      tokens[r, width - len(p):], mask[r, width - len(p):] = p, True
    key = jax.random.fold_in(jax.random.key(self.seed), self._sample_calls)
    self._sample_calls += 1
    if self.causal:
      from pathways_jax.sampling import autoregressive  # pylint: disable=g-import-not-at-top
      out = autoregressive.generate(self.model, self.params, tokens, key=key,
                                    max_new_tokens=gen_length,
                                    temperature=setting['temperature'], top_k=setting['top_k'],
                                    top_p=setting['top_p'], prompt_mask_BP=mask,
                                    eos_id=self.tokenizer.eos_id, pad_id=self.pad_id)
    else:
      from pathways_jax.sampling import diffusion  # pylint: disable=g-import-not-at-top
      block = self.block_length or gen_length
      blocks = gen_length // block
      steps = min(self.steps or gen_length, gen_length)
      steps = max(blocks, (steps // blocks) * blocks)  # LLaDA needs steps divisible by blocks
      out = diffusion.generate(self.model, self.params, tokens, mask_id=self.mask_id, key=key,
                               gen_length=gen_length, steps=steps, block_length=block,
                               temperature=setting['temperature'], cfg_scale=self.cfg_scale,
                               remasking=self.remasking, threshold=self.threshold,
                               cache=self.cache, prompt_mask_BP=mask)
    new = np.asarray(jax.device_get(out))[:len(prompts), width:width + max_new]
    return [self.tok_decode(row) for row in new]


__all__ = ['PathwaysLM', 'bucket_lengths']
