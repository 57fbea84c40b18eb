"""LLaDA sampling: semi-autoregressive masked-diffusion decoding, CFG, Fast-dLLM caches.

    tokens = generate(model, params, prompt_BP, mask_id=3, key=key, gen_length=64, steps=64,
                      block_length=16)                                  # plain LLaDA
    tokens = generate(model, params, prompt_BP, ..., cache='dual', threshold=0.9)  # Fast-dLLM

The reverse process starts from `gen_length` mask tokens after the prompt and decodes them block
by block (a block is finished before the next starts). Each step predicts every masked token of
the block (Gumbel-max at `temperature`, greedy at 0), scores them (`low_confidence`: the softmax
probability of the chosen token; `random`: uniform), and commits the best ones: LLaDA's linear
schedule (the block's masked count split evenly over its steps, remainder to the first steps) or,
with `threshold`, Fast-dLLM's parallel decoding (every masked token above the threshold, at least
one per step, until the block is full). Committed tokens are never remasked.

The whole decode is one jitted program (a lax loop over blocks and steps; for `cache='prefix'`
the block loop is unrolled because each block's suffix has its own static length).

Model interface: a plain `apply_fn(params, tokens_BL) -> logits_BLV`, or the `Transformer` module
itself, which additionally enables left-padded batches (`prompt_mask_BP`) and the KV caches.
See docs/llada.md for the choices and references.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pathways_jax import parallel

REMASKING = ('low_confidence', 'random')
CACHES = (None, 'prefix', 'dual')


class _Forward:
  """Hashable static wrapper around a Transformer module or a plain apply_fn."""

  def __init__(self, fn_or_model):
    self.module = fn_or_model if isinstance(fn_or_model, nn.Module) else None
    self.fn = None if self.module is not None else fn_or_model
    if self.module is None and not callable(fn_or_model):
      raise TypeError('expected apply_fn(params, tokens_BL) -> logits_BLV or a Transformer '
                      f'module, got {type(fn_or_model).__name__}')

  def _key(self):
    return ('module', self.module) if self.module is not None else ('fn', self.fn)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, _Forward) and self._key() == other._key()

  def full(self, params, tokens_BS, positions_BS, segments_BS, start, length, *, use_segments,
           with_cache, cache_sharding=None):
    """Logits of positions [start, start+length) from a forward pass over the whole row.

    With `with_cache`, also returns a freshly filled KV cache of the whole row (laid out as
    `cache_sharding` says, when given).
    """
    if self.module is None:
      logits = self.fn(params, tokens_BS)
      return jax.lax.dynamic_slice_in_dim(logits, start, length, axis=1), None
    kw = dict(positions_BL=positions_BS, segment_ids_BL=segments_BS) if use_segments else {}
    if with_cache:
      from pathways_jax.models.transformer import init_cache  # pylint: disable=g-import-not-at-top
      cfg = self.module.cfg
      empty = init_cache(cfg, tokens_BS.shape[0], tokens_BS.shape[1],
                         jnp.bfloat16 if cfg.dtype == 'bfloat16' else jnp.float32)
      if cache_sharding is not None:
        empty = jax.lax.with_sharding_constraint(empty, cache_sharding)
      return self.module.apply({'params': params}, tokens_BS, positions_BL=positions_BS,
                               segment_ids_BL=segments_BS, cache=empty, cache_index=0,
                               logits_window=(start, length))
    # Only the current block's logits are ever used: unembed just those positions.
    return self.module.apply({'params': params}, tokens_BS, logits_window=(start, length),
                             **kw), None

  def cached(self, params, tokens_BS, positions_BS, segments_BS, cache, start, length, *,
             window):
    """Runs only positions [start, start+window) against `cache`; logits of the first `length`."""
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, window, axis=1)
    return self.module.apply({'params': params}, sl(tokens_BS), positions_BL=sl(positions_BS),
                             segment_ids_BL=sl(segments_BS), cache=cache, cache_index=start,
                             logits_window=(0, length))


def num_transfer_tokens(masked_count_B: jax.Array, steps: int) -> jax.Array:
  """LLaDA's linear schedule [B, steps]: floor(M / steps), plus one on the first M % steps."""
  m = masked_count_B.astype(jnp.int32)[:, None]
  i = jnp.arange(steps, dtype=jnp.int32)[None, :]
  return m // steps + (i < m % steps).astype(jnp.int32)


def _ranks(conf_BL: jax.Array) -> jax.Array:
  """Rank of each position by descending confidence (0 = best; ties by position)."""
  order = jnp.argsort(-conf_BL, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def _select(logits_BbV, masked_Bb, key, knobs, *, sample, remasking, mask_id, eos_ids):
  """Candidate tokens and their confidences (-inf where the position is not masked)."""
  logits = logits_BbV.astype(jnp.float32)
  logits = logits.at[..., mask_id].set(-jnp.inf)  # the mask token is never an output
  if eos_ids:
    eos = jnp.asarray(eos_ids)
    logits = logits.at[..., eos].set(jnp.where(knobs['forbid_eos'], -jnp.inf, logits[..., eos]))
  temperature = knobs['temperature']
  key_g, key_r = jax.random.split(key)
  if sample:
    # Gumbel-max: argmax(l / tau + g) samples softmax(l / tau). float32 noise (LLaDA uses
    # float64): its largest value, ~16.6, only truncates events of probability < 1e-7.
    g = jax.random.gumbel(key_g, logits.shape, jnp.float32)
    x0 = jnp.argmax(logits / temperature + g, axis=-1)
  else:
    x0 = jnp.argmax(logits, axis=-1)
  if remasking == 'low_confidence':
    lse = jax.nn.logsumexp(logits, axis=-1)
    conf = jnp.exp(jnp.take_along_axis(logits, x0[..., None], axis=-1)[..., 0] - lse)
  else:
    conf = jax.random.uniform(key_r, x0.shape, jnp.float32)
  if eos_ids:
    # Below every real confidence (in [0, 1]) but finite, so EOS still fills the block last.
    conf = jnp.where(knobs['eos_low_confidence'] & jnp.isin(x0, jnp.asarray(eos_ids)), -1.0, conf)
  conf = jnp.where(masked_Bb, conf, -jnp.inf)
  return x0.astype(jnp.int32), conf


_STATIC = ('fwd', 'gen_start', 'cfg_end', 'block_length', 'num_blocks', 'steps_per_block',
           'mask_id', 'sample', 'guided', 'parallel', 'remasking', 'cache', 'eos_ids',
           'use_segments')


def _decode_body(fwd, params, prompt_BP, valid_BP, key, knobs, *, gen_start, cfg_end,
                 block_length, num_blocks, steps_per_block, mask_id, sample, guided, parallel,
                 remasking, cache, eos_ids, use_segments, cache_sharding=None):
  """Decodes the mask tokens of [gen_start, gen_start + num_blocks * block_length) block by block.

  The row is `prompt_BP` followed by mask tokens up to the end of the last block (none when the
  blocks lie inside the given row, as for `infill`).

  `knobs` holds the traced settings (temperature, cfg_scale, threshold, refresh_every, EOS flags),
  so changing their values never recompiles; the static flags say which features are on.
  `cache_sharding` (on a mesh, see DiffusionSampler) lays out the KV cache of every row the model
  sees (2B with guidance).
  """
  cfg_scale = knobs['cfg_scale']
  bl = block_length
  gen_len = num_blocks * bl
  b, p = prompt_BP.shape
  extra = max(gen_start + gen_len - p, 0)
  x_BS = jnp.concatenate([prompt_BP.astype(jnp.int32), jnp.full((b, extra), mask_id, jnp.int32)],
                         axis=1)
  valid_BS = jnp.concatenate([valid_BP.astype(bool), jnp.ones((b, extra), bool)], axis=1)
  s = p + extra
  segments_BS = valid_BS.astype(jnp.int32)
  positions_BS = jnp.maximum(jnp.cumsum(segments_BS, axis=1) - 1, 0).astype(jnp.int32)
  is_prompt_BS = (jnp.arange(s) < cfg_end)[None, :] & valid_BS
  if guided:
    positions_in, segments_in = (jnp.concatenate([a, a], axis=0) for a in (positions_BS, segments_BS))
  else:
    positions_in, segments_in = positions_BS, segments_BS

  def model_input(x):
    if guided:  # unsupervised CFG: the unconditional rows see the prompt as masks
      return jnp.concatenate([x, jnp.where(is_prompt_BS, mask_id, x)], axis=0)
    return x

  def guide(logits):
    if guided:
      cond, uncond = logits[:b].astype(jnp.float32), logits[b:].astype(jnp.float32)
      return uncond + (cfg_scale + 1.0) * (cond - uncond)
    return logits

  def block_logits(x, bs, j, kv):
    """Logits [B, bl, V] for the block starting at bs, at step j of the block."""
    full = lambda: fwd.full(params, model_input(x), positions_in, segments_in, bs, bl,
                            use_segments=use_segments, with_cache=cache is not None,
                            cache_sharding=cache_sharding)
    if cache is None:
      return guide(full()[0]), kv, jnp.int32(1), jnp.int32(0)
    window = bl if cache == 'dual' else s - bs  # prefix: bs is a Python int here
    cached = lambda: fwd.cached(params, model_input(x), positions_in, segments_in, kv, bs, bl,
                                window=window)
    r = knobs['refresh_every']  # 0: only at the block start
    refresh = (j == 0) | ((r > 0) & (j % jnp.maximum(r, 1) == 0))
    logits, kv = jax.lax.cond(refresh, full, cached)
    return guide(logits), kv, refresh.astype(jnp.int32), 1 - refresh.astype(jnp.int32)

  def run_block(bs, carry):
    x0_BS, _, _, _, _ = carry
    block_masked = (jax.lax.dynamic_slice_in_dim(x0_BS, bs, bl, axis=1) == mask_id) & \
        jax.lax.dynamic_slice_in_dim(valid_BS, bs, bl, axis=1)
    counts_BT = (None if parallel
                 else num_transfer_tokens(block_masked.sum(axis=1), steps_per_block))

    def cond(state):
      j, (x, *_) = state
      if not parallel:
        return j < steps_per_block
      blk = jax.lax.dynamic_slice_in_dim(x, bs, bl, axis=1)
      vblk = jax.lax.dynamic_slice_in_dim(valid_BS, bs, bl, axis=1)
      return jnp.any((blk == mask_id) & vblk) & (j < bl)

    def body(state):
      j, (x, kv, stats, step, nfe) = state
      logits, kv, n_full, n_cached = block_logits(x, bs, j, kv)
      blk = jax.lax.dynamic_slice_in_dim(x, bs, bl, axis=1)
      masked = (blk == mask_id) & jax.lax.dynamic_slice_in_dim(valid_BS, bs, bl, axis=1)
      x0, conf = _select(logits, masked, jax.random.fold_in(key, step), knobs, sample=sample,
                         remasking=remasking, mask_id=mask_id, eos_ids=eos_ids)
      rank = _ranks(conf)
      if not parallel:
        k_B = jax.lax.dynamic_index_in_dim(counts_BT, j, axis=1, keepdims=True)
        commit = masked & (rank < k_B)
      else:
        commit = masked & ((rank == 0) | (conf > knobs['threshold']))
      x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(commit, x0, blk), bs, axis=1)
      commit_step, commit_count = stats
      off = bs - gen_start
      cs = jax.lax.dynamic_slice_in_dim(commit_step, off, bl, axis=1)
      cc = jax.lax.dynamic_slice_in_dim(commit_count, off, bl, axis=1)
      commit_step = jax.lax.dynamic_update_slice_in_dim(commit_step, jnp.where(commit, step, cs),
                                                        off, axis=1)
      commit_count = jax.lax.dynamic_update_slice_in_dim(commit_count, cc + commit, off, axis=1)
      nfe = nfe + jnp.stack([n_full, n_cached])
      return j + 1, (x, kv, (commit_step, commit_count), step + 1, nfe)

    _, carry = jax.lax.while_loop(cond, body, (jnp.int32(0), carry))
    return carry

  kv = None
  if cache is not None:
    cfg = fwd.module.cfg
    from pathways_jax.models.transformer import init_cache  # pylint: disable=g-import-not-at-top
    kv = init_cache(cfg, b * (2 if guided else 1), s,
                    jnp.bfloat16 if cfg.dtype == 'bfloat16' else jnp.float32)
    if cache_sharding is not None:
      kv = jax.lax.with_sharding_constraint(kv, cache_sharding)
  stats = (jnp.full((b, gen_len), -1, jnp.int32), jnp.zeros((b, gen_len), jnp.int32))
  carry = (x_BS, kv, stats, jnp.int32(0), jnp.zeros((2,), jnp.int32))
  if cache == 'prefix':  # each block's suffix window has its own static shape: unroll
    for blk_i in range(num_blocks):
      carry = run_block(gen_start + blk_i * bl, carry)
  else:
    carry = jax.lax.fori_loop(0, num_blocks, lambda i, c: run_block(gen_start + i * bl, c), carry)
  x, _, (commit_step, commit_count), steps, nfe = carry
  return x, {'commit_step': commit_step, 'commit_count': commit_count, 'steps': steps,
             'nfe_full': nfe[0], 'nfe_cached': nfe[1]}


_decode = jax.jit(_decode_body, static_argnames=_STATIC)


def _eos_tuple(eos_id) -> tuple[int, ...]:
  if eos_id is None:
    return ()
  if isinstance(eos_id, int):
    return (eos_id,)
  return tuple(int(e) for e in eos_id)


def _knobs(temperature, cfg_scale, threshold, refresh_every, forbid_eos, eos_low_confidence):
  return {'temperature': jnp.float32(temperature), 'cfg_scale': jnp.float32(cfg_scale),
          'threshold': jnp.float32(0.0 if threshold is None else threshold),
          'refresh_every': jnp.int32(refresh_every or 0), 'forbid_eos': jnp.bool_(forbid_eos),
          'eos_low_confidence': jnp.bool_(eos_low_confidence)}


def _check_common(fwd, *, mask_id, temperature, cfg_scale, remasking, threshold, eos, forbid_eos,
                  eos_low_confidence):
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 = greedy)')
  if cfg_scale < 0:
    raise ValueError(f'cfg_scale={cfg_scale} must be >= 0 (0 = no guidance)')
  if remasking not in REMASKING:
    raise ValueError(f'remasking={remasking!r} is not one of {REMASKING}')
  if threshold is not None and not 0.0 <= threshold <= 1.0:
    raise ValueError(f'threshold={threshold} must be in [0, 1] (or None: the step schedule)')
  if (forbid_eos or eos_low_confidence) and not eos:
    raise ValueError('forbid_eos / eos_low_confidence need eos_id')
  if fwd.module is not None:
    v = fwd.module.cfg.vocab_size
    for name, t in [('mask_id', mask_id)] + [('eos_id', e) for e in eos]:
      if not 0 <= t < v:
        raise ValueError(f'{name}={t} is outside the vocabulary [0, {v})')


def generate(apply_fn, params, prompt_BP, *, mask_id: int, key: jax.Array, gen_length: int,
             steps: int, block_length: int, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = 'low_confidence', threshold: float | None = None,
             cache: str | None = None, prompt_mask_BP: jax.Array | None = None,
             eos_id: int | Sequence[int] | None = None, forbid_eos: bool = False,
             eos_low_confidence: bool = False, refresh_every: int | None = None,
             return_stats: bool = False, mesh=None, rules=None):
  """LLaDA's reverse process (semi-autoregressive), with CFG and Fast-dLLM caching/parallelism.

  Args:
    apply_fn: `apply_fn(params, tokens_BL) -> logits_BLV`, or the `Transformer` module (needed
      for `prompt_mask_BP` and `cache`).
    prompt_BP: int prompts; batched prompts of different lengths are LEFT-padded with a pad id
      distinct from `mask_id`, and `prompt_mask_BP` (True on real tokens) says which are real.
      Mask tokens inside the prompt stay as they are (use `infill` to fill them).
    gen_length, block_length, steps: `gen_length` masks decoded in blocks of `block_length`, each
      block in `steps / num_blocks` steps with LLaDA's linear schedule. With `threshold`, `steps`
      is ignored: each block runs until it is full (at most `block_length` steps).
    temperature: Gumbel-max sampling temperature (float32 noise); 0 = greedy.
    cfg_scale: unsupervised classifier-free guidance, logits = u + (w + 1)(c - u), u from the same
      sequence with the prompt replaced by masks.
    remasking: 'low_confidence' (commit the most probable predictions) or 'random'.
    threshold: Fast-dLLM parallel decoding: commit every masked token of the block whose
      confidence exceeds it, and at least the most confident one per step.
    cache: None, 'prefix' (KV of everything before the block refreshed at each block start; steps
      run the block and the masked suffix) or 'dual' (KV of prefix and suffix refreshed at each
      block start; steps run only the block). Approximate, as in Fast-dLLM.
    eos_id, forbid_eos, eos_low_confidence: EOS (or several ids, e.g. EOS and EoT) logits set to
      -inf, or predicted EOS given the lowest confidence (committed only when nothing else is left).
    refresh_every: with a cache, also refresh it every this many steps inside a block (1 = every
      step, which reproduces the uncached sampler exactly). Default: only at block starts.
    return_stats: also return a dict: `commit_step` [B, G] (global step at which each generated
      position was committed), `commit_count` [B, G] (how often; always 1), `steps`, `nfe_full`,
      `nfe_cached` (forward passes over the whole row / over a cached window).
    mesh, rules: run on this mesh (e.g. the training run's, inside its loop) with explicit
      shardings: see `DiffusionSampler`, which this builds once per model, mesh, shape and setup
      and reuses. The tokens are those `generate` samples without a mesh.

  Returns:
    tokens [B, P + G] (and the stats dict if `return_stats`).
  """
  fwd = _Forward(apply_fn)
  prompt_BP = prompt_BP if isinstance(prompt_BP, jax.Array) else np.asarray(prompt_BP)
  if prompt_BP.ndim != 2 or not jnp.issubdtype(prompt_BP.dtype, jnp.integer):
    raise ValueError(f'prompt_BP must be a 2-D integer array, got {prompt_BP.dtype} '
                     f'{prompt_BP.shape}')
  b, p = prompt_BP.shape
  setup = dict(mask_id=mask_id, gen_length=gen_length, steps=steps, block_length=block_length,
               temperature=temperature, cfg_scale=cfg_scale, remasking=remasking,
               threshold=threshold, cache=cache, eos_id=_eos_tuple(eos_id), forbid_eos=forbid_eos,
               eos_low_confidence=eos_low_confidence, refresh_every=refresh_every)
  if mesh is not None:
    sampler = _sampler(apply_fn, mesh, tuple(rules or parallel.DEFAULT_RULES), batch_size=b,
                       prompt_len=p, return_stats=return_stats, **setup)
    return sampler(params, prompt_BP, prompt_mask_BP, key=key)
  static, knobs = _generate_setup(fwd, p, padded=prompt_mask_BP is not None, **setup)
  valid_BP = _valid(prompt_BP, prompt_mask_BP)
  tokens, stats = _decode(fwd, nn.meta.unbox(params), prompt_BP, valid_BP, key, knobs, **static)
  return (tokens, stats) if return_stats else tokens


def _valid(prompt_BP, prompt_mask_BP):
  if prompt_mask_BP is None:
    return np.ones(prompt_BP.shape, bool)
  if prompt_mask_BP.shape != prompt_BP.shape:
    raise ValueError(f'prompt_mask_BP has shape {prompt_mask_BP.shape}, prompt_BP '
                     f'{prompt_BP.shape}')
  return prompt_mask_BP


def _generate_setup(fwd, prompt_len, *, padded, mask_id, gen_length, steps, block_length,
                    temperature, cfg_scale, remasking, threshold, cache, eos_id, forbid_eos,
                    eos_low_confidence, refresh_every):
  """Checks `generate`'s settings; returns the static arguments of `_decode` and its knobs."""
  if gen_length <= 0 or block_length <= 0:
    raise ValueError(f'gen_length={gen_length} and block_length={block_length} must be positive')
  if gen_length % block_length:
    raise ValueError(f'gen_length={gen_length} is not a multiple of block_length={block_length}')
  num_blocks = gen_length // block_length
  steps_per_block = 0
  if threshold is None:
    if steps <= 0 or steps % num_blocks:
      raise ValueError(f'steps={steps} must be a positive multiple of the number of blocks '
                       f'{num_blocks} (= gen_length / block_length)')
    steps_per_block = steps // num_blocks
    if steps_per_block > block_length:
      raise ValueError(f'steps={steps} gives {steps_per_block} steps per block of only '
                       f'{block_length} tokens (steps must be <= gen_length)')
  if cache not in CACHES:
    raise ValueError(f'cache={cache!r} is not one of {CACHES}')
  if cache is not None and fwd.module is None:
    raise ValueError(f'cache={cache!r} needs the Transformer module (it calls it with a KV cache), '
                     'not a plain apply_fn')
  if padded and fwd.module is None:
    raise ValueError('prompt_mask_BP (padded prompts) needs the Transformer module (it passes '
                     'segment ids), not a plain apply_fn')
  if refresh_every is not None and (cache is None or refresh_every <= 0):
    raise ValueError(f'refresh_every={refresh_every} needs a cache and must be positive')
  eos = _eos_tuple(eos_id)
  _check_common(fwd, mask_id=mask_id, temperature=temperature, cfg_scale=cfg_scale,
                remasking=remasking, threshold=threshold, eos=eos, forbid_eos=forbid_eos,
                eos_low_confidence=eos_low_confidence)
  static = dict(gen_start=prompt_len, cfg_end=prompt_len, block_length=block_length,
                num_blocks=num_blocks, steps_per_block=steps_per_block, mask_id=int(mask_id),
                sample=temperature > 0, guided=cfg_scale > 0, parallel=threshold is not None,
                remasking=remasking, cache=cache, eos_ids=eos,
                use_segments=padded or cache is not None)
  knobs = _knobs(temperature, cfg_scale, threshold, refresh_every, forbid_eos, eos_low_confidence)
  return static, knobs


class DiffusionSampler:
  """`generate` on a mesh: built once for one batch shape and setup, called every step (e.g.
  inside a training loop, on the run's mesh, with its params as they are sharded there).

      sampler = DiffusionSampler(model, mesh, rules, batch_size=8, prompt_len=16, mask_id=3,
                                 gen_length=32, steps=32, block_length=8)
      tokens_BT = sampler(params, prompt_BP, prompt_mask_BP, key=key)

  One jitted program with explicit shardings: prompts, masks, tokens and the per-token stats are
  split by rows over the mesh axes the rules give `activation_batch` (so `batch_size` must be a
  multiple of their size); params by their logical axes (`param_shardings`, by default the ones
  the rules give the Transformer's params; a plain apply_fn's params are replicated unless given),
  and placed there on each call (a no-op for params already sharded so); a KV cache by
  `transformer.CACHE_AXES`; the key and scalars replicated. Random draws are keyed by step, not
  by device, so the tokens are the ones one device samples.
  """

  def __init__(self, apply_fn, mesh, rules, *, batch_size: int, prompt_len: int, mask_id: int,
               gen_length: int, steps: int, block_length: int, temperature: float = 0.0,
               cfg_scale: float = 0.0, remasking: str = 'low_confidence',
               threshold: float | None = None, cache: str | None = None,
               eos_id: int | Sequence[int] | None = None, forbid_eos: bool = False,
               eos_low_confidence: bool = False, refresh_every: int | None = None,
               return_stats: bool = False, param_shardings=None):
    fwd = _Forward(apply_fn)
    if batch_size < 1 or prompt_len < 1:
      raise ValueError(f'need batch_size, prompt_len >= 1, got {batch_size}, {prompt_len}')
    rows = nn.logical_to_mesh_axes(('activation_batch',), rules)[0]  # None, an axis or axes
    split = int(np.prod([mesh.shape[a] for a in ((rows,) if isinstance(rows, str) else
                                                 tuple(rows or ()))]))
    if batch_size % split:
      raise ValueError(f'{batch_size} prompts do not split over the {split} devices of the batch '
                       f'axes {rows}: give a multiple of it')
    # Both settings (padded prompts or not) are checked here; a call picks one.
    self._static, self._knobs = _generate_setup(
        fwd, prompt_len, padded=fwd.module is not None, mask_id=mask_id, gen_length=gen_length,
        steps=steps, block_length=block_length, temperature=temperature, cfg_scale=cfg_scale,
        remasking=remasking, threshold=threshold, cache=cache, eos_id=eos_id,
        forbid_eos=forbid_eos, eos_low_confidence=eos_low_confidence,
        refresh_every=refresh_every)
    rep = parallel.replicated(mesh)
    if param_shardings is None and fwd.module is not None:
      from pathways_jax.train import frozen  # pylint: disable=g-import-not-at-top
      param_shardings = frozen.abstract_params_and_shardings(fwd.module, mesh, rules)[1]
    self.fwd, self.mesh, self.rules, self.shape = fwd, mesh, rules, (batch_size, prompt_len)
    self.return_stats = return_stats
    self.param_shardings = rep if param_shardings is None else param_shardings
    self.rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(rows))
    cache_sh = None
    if cache is not None:
      from pathways_jax.sampling import rollout  # pylint: disable=g-import-not-at-top
      cache_sh = rollout.cache_shardings(fwd.module.cfg, batch_size * (2 if cfg_scale > 0 else 1),
                                 prompt_len + gen_length, mesh, rules)
    stats_sh = {'commit_step': self.rows, 'commit_count': self.rows, 'steps': rep,
                'nfe_full': rep, 'nfe_cached': rep}
    # One program per use_segments (padded prompts or not; jit takes no static kwargs when it is
    # given shardings), each compiled on its first call.
    self._fns = {
        use: jax.jit(functools.partial(_decode_body, fwd, cache_sharding=cache_sh,
                                       **{**self._static, 'use_segments': use}),
                     in_shardings=(self.param_shardings, self.rows, self.rows, rep, rep),
                     out_shardings=(self.rows, stats_sh))
        for use in (False, True)}

  def __call__(self, params, prompt_BP, prompt_mask_BP=None, *, key):
    """tokens [B, P + G] (with the stats dict if built with `return_stats`), sharded by rows."""
    prompt_BP = prompt_BP if isinstance(prompt_BP, jax.Array) else np.asarray(prompt_BP)
    if prompt_BP.shape != self.shape or not jnp.issubdtype(prompt_BP.dtype, jnp.integer):
      raise ValueError(f'prompt_BP is {prompt_BP.dtype} {prompt_BP.shape}, this sampler was '
                       f'built for integers of shape {self.shape}')
    if prompt_mask_BP is not None and self.fwd.module is None:
      raise ValueError('prompt_mask_BP (padded prompts) needs the Transformer module (it passes '
                       'segment ids), not a plain apply_fn')
    valid_BP = _valid(prompt_BP, prompt_mask_BP)
    params = jax.device_put(nn.meta.unbox(params), self.param_shardings)
    # As `generate`: segment ids only where they are needed, so the tokens are its tokens.
    use_segments = prompt_mask_BP is not None or self._static['cache'] is not None
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      tokens, stats = self._fns[use_segments](params, jax.device_put(prompt_BP, self.rows),
                                              jax.device_put(valid_BP, self.rows), key,
                                              self._knobs)
    return (tokens, stats) if self.return_stats else tokens


@functools.lru_cache(maxsize=16)
def _sampler(apply_fn, mesh, rules, **kwargs) -> DiffusionSampler:
  return DiffusionSampler(apply_fn, mesh, rules, **kwargs)


def infill(apply_fn, params, tokens_BL, *, mask_id: int, key: jax.Array, steps: int,
           temperature: float = 0.0, remasking: str = 'low_confidence',
           threshold: float | None = None, valid_BL: jax.Array | None = None,
           eos_id: int | Sequence[int] | None = None, forbid_eos: bool = False,
           eos_low_confidence: bool = False, return_stats: bool = False):
  """Fills every mask token of `tokens_BL` (anywhere in the row) as one block in `steps` steps.

  The same reverse process as `generate` (linear schedule over each row's mask count, or
  `threshold` decoding), for templates with blanks, e.g. the name slot of "[M][M] wrote X".
  `valid_BL` marks real tokens of padded rows (needs the Transformer module).
  """
  fwd = _Forward(apply_fn)
  tokens_BL = tokens_BL if isinstance(tokens_BL, jax.Array) else np.asarray(tokens_BL)
  if tokens_BL.ndim != 2 or not jnp.issubdtype(tokens_BL.dtype, jnp.integer):
    raise ValueError(f'tokens_BL must be a 2-D integer array, got {tokens_BL.dtype} '
                     f'{tokens_BL.shape}')
  b, l = tokens_BL.shape
  if threshold is None and not 0 < steps <= l:
    raise ValueError(f'steps={steps} must be in [1, {l}] (the row length)')
  if valid_BL is not None and fwd.module is None:
    raise ValueError('valid_BL (padded rows) needs the Transformer module, not a plain apply_fn')
  eos = _eos_tuple(eos_id)
  _check_common(fwd, mask_id=mask_id, temperature=temperature, cfg_scale=0.0,
                remasking=remasking, threshold=threshold, eos=eos, forbid_eos=forbid_eos,
                eos_low_confidence=eos_low_confidence)
  valid = np.ones((b, l), bool) if valid_BL is None else valid_BL
  out, stats = _decode(
      fwd, nn.meta.unbox(params), tokens_BL, valid, key,
      _knobs(temperature, 0.0, threshold, None, forbid_eos, eos_low_confidence),
      gen_start=0, cfg_end=0, block_length=l, num_blocks=1,
      steps_per_block=0 if threshold is not None else steps, mask_id=int(mask_id),
      sample=temperature > 0, guided=False, parallel=threshold is not None, remasking=remasking,
      cache=None, eos_ids=eos, use_segments=valid_BL is not None)
  return (out, stats) if return_stats else out
