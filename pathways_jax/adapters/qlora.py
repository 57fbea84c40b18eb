"""QLoRA: LoRA adapters (float32 or bfloat16) on a frozen base whose dense weights are held
quantised to int8, int4 or NF4 by qwix (google/qwix, `pip install -e .[qlora]`).

    qcfg = QuantConfig(qtype='nf4', block_size=64)
    qbase = quantize_base(base_params, qcfg)               # dense weights -> qwix.QArray
    model = quantized_model(Transformer(lcfg.apply_to(model_cfg)))
    adapters = lora.init(key, base_params, lcfg)           # float32 (or cast to bfloat16)
    logits = model.apply({'params': lora.combine(qbase, adapters)}, tokens_BL)
    grads = jax.grad(lambda ad: loss(model.apply({'params': lora.combine(qbase, ad)}, ...)))(
        adapters)                                          # only the adapters are differentiated

What qwix does and what this module does. The quantiser is qwix's (`qwix.quantize`: absmax
scales per block, round-to-nearest for int8/int4, nearest of the 16 NormalFloat levels of the
QLoRA paper for 'nf4', stored as uint4; `qwix.dequantize`). This module only chooses the blocks
and where the weights are dequantised: the frozen base is stored as QArrays, and each dense
weight is dequantised when its module reads it (`Module.param`), inside the layer, so under
`scan_layers` (and `remat`) only the layer being computed has a float copy of its weights; the
matmul itself is the model's ordinary float `dense` on the dequantised weight (as in QLoRA,
where NF4 is a storage type and the compute dtype is bfloat16). A run's base is quantised one
weight at a time as `train.init_from` loads it (`LeafQuantizer`) and saved so (`for_storage`):
its float copy is never whole in memory.

Why not qwix's own PTQ/QLoRA providers (`qwix.PtqProvider`, `qwix.LoraProvider`): they
quantise the weight operand of intercepted `dot_general`/`einsum`/`jnp.dot` calls, finding the
param by object identity, by walking a tracer's parents, or by shape. Our dense layers are
`transformer.dense`, a custom-derivative function around `jnp.dot` (a `jax.custom_vjp` when
this was measured, a `jax.custom_jvp` since) whose inputs reach the dot as fresh tracers, and
the attention weights are reshaped from [embed, heads, head_dim] to 2-D first, so on this model
qwix finds 1 of the 7 dense weights of a block (w_down, by its shape), then refuses its own
quantised params in `apply`, and the custom backward could not take a QArray (docs/qlora.md has
the transcript). Reading the weight dequantised at `Module.param` needs no change to the model
and keeps its CPU weight gradient; qwix's interception machinery
(`qwix.quantize_model` with a provider) is what puts that hook on `Module.param`.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pathways_jax.adapters import lora
from pathways_jax.config import ConfigError

QTYPES = ('int8', 'int4', 'nf4')
_BITS = {'int8': 8, 'int4': 4, 'nf4': 4}
# How many leading axes of each dense weight are its input; the model's layout (transformer.py).
_IN_AXES = {'wq': 1, 'wk': 1, 'wv': 1, 'wo': 2, 'w_gate': 1, 'w_up': 1, 'w_down': 1}
_NDIM = {'wq': 3, 'wk': 3, 'wv': 3, 'wo': 3, 'w_gate': 2, 'w_up': 2, 'w_down': 2}


def _qwix():
  try:
    import qwix  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('QLoRA quantises the base with qwix, which is not installed: '
                      'pip install -e ".[qlora]"') from e
  return qwix


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How the frozen base's dense weights are stored.

  qtype: 'int8', 'int4' (symmetric integers) or 'nf4' (NormalFloat4, the QLoRA paper's type).
  block_size: how many consecutive input elements share one absmax scale (QLoRA uses 64 for
    NF4): the blocks run along the weight's last input axis (embed for wq/wk/wv/w_gate/w_up,
    mlp for w_down, head_dim for wo) with one scale per output channel (and per head of wo,
    per layer when scanned); an axis shorter than block_size is one block. 0: one scale per
    output channel over the whole input.
  targets: 'all-linear' or a regex searched in 'blocks_0/attn/wq'-like paths, as LoRA's.
  scale_dtype: the scales' dtype, which is also the dequantised weight's ('float32' or
    'bfloat16'; the model casts it to its compute dtype).
  """
  qtype: str = 'nf4'
  block_size: int = 64
  targets: str = 'all-linear'
  scale_dtype: str = 'float32'

  def __post_init__(self):
    if self.qtype not in QTYPES:
      raise ConfigError(f'QLoRA qtype must be one of {QTYPES}, got {self.qtype!r}')
    if self.block_size < 0:
      raise ConfigError(f'QLoRA block_size must be >= 0, got {self.block_size}')
    if self.scale_dtype not in ('float32', 'bfloat16'):
      raise ConfigError(f"QLoRA scale_dtype must be 'float32' or 'bfloat16', got "
                        f'{self.scale_dtype!r}')

  @property
  def bits(self) -> int:
    return _BITS[self.qtype]

  def qwix_qtype(self):
    return {'int8': jnp.int8, 'int4': jnp.int4, 'nf4': 'nf4'}[self.qtype]


def is_quantized(x) -> bool:
  return isinstance(x, _qwix().QArray)


def _how(parts: tuple[str, ...], shape: tuple[int, ...], qcfg: QuantConfig):
  """(channelwise_axes, tiled_axes) of the weight at `parts` with `shape`."""
  name = parts[-1]
  lead = len(shape) - _NDIM[name]  # 1 under scan_layers: the [layers] axis
  if lead not in (0, 1):
    raise ConfigError(f'{"/".join(parts)} has shape {shape}; a dense {name} has {_NDIM[name]} '
                      'axes (one more under scan_layers)')
  n_in = _IN_AXES[name]
  last_in = lead + n_in - 1
  channelwise = tuple(i for i in range(len(shape)) if i != last_in)
  n = shape[last_in]
  tile = n if qcfg.block_size == 0 else min(qcfg.block_size, n)
  if n % tile:
    raise ConfigError(f'QLoRA block_size={qcfg.block_size} does not divide the input axis '
                      f'({n}) of {"/".join(parts)} {shape}')
  return channelwise, {last_in: tile}


def quantize_base(params, qcfg: QuantConfig) -> dict:
  """`params` (a base or adapted model's params, unboxed) with the dense weights `qcfg.targets`
  selects replaced by qwix QArrays; embeddings, norms, biases and adapters are left as they are."""
  flat = traverse_util.flatten_dict(params)
  targets = set(lora.target_paths(lora.split(params)[0], lora.LoraConfig(targets=qcfg.targets)))
  chosen = {'/'.join(p): w for p, w in flat.items()
            if '/'.join(p) in targets and not is_quantized(w)}  # a held base is left as it is
  for path, w in chosen.items():
    _how(tuple(path.split('/')), tuple(w.shape), qcfg)  # a bad block size named before jit
  quantized = _quantize(chosen, qcfg)
  return traverse_util.unflatten_dict(
      {p: quantized.get('/'.join(p), w) for p, w in flat.items()})


@functools.partial(jax.jit, static_argnames='qcfg')
def _quantize(weights: dict[str, jax.Array], qcfg: QuantConfig) -> dict:
  qwix = _qwix()
  scale_dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[qcfg.scale_dtype]
  out = {}
  for path, w in weights.items():
    channelwise, tiled = _how(tuple(path.split('/')), tuple(w.shape), qcfg)
    out[path] = qwix.quantize(w.astype(jnp.float32), qcfg.qwix_qtype(),
                              channelwise_axes=channelwise, tiled_axes=tiled,
                              scale_dtype=scale_dtype)
  return out


def dequantize_base(params) -> dict:
  """The float params a quantised base stands for (each QArray dequantised)."""
  qwix = _qwix()
  return jax.tree_util.tree_map(lambda x: qwix.dequantize(x) if is_quantized(x) else x, params,
                                is_leaf=is_quantized)


def quantized_model(model: nn.Module) -> nn.Module:
  """`model` (a Transformer) reading QArray params dequantised: wherever a module reads a param
  (`self.param`) that is a qwix QArray, it gets `qwix.dequantize` of it, computed there (inside
  the layer, so inside `nn.scan` / `nn.remat` when the model uses them). Float params read as
  before, so the same model also runs an unquantised tree. Uses qwix's interception
  (`qwix.quantize_model`) to hook `flax.linen.Module.param` while the model runs."""
  qwix = _qwix()

  class _DequantizeOnRead(qwix.QuantizationProvider):

    def __init__(self):
      super().__init__(rules=[])

    def _param(self, module, name, *args, **kwargs):
      if module.has_variable('params', name):
        value = nn.unbox(module.get_variable('params', name))
        if isinstance(value, qwix.QArray):
          return qwix.dequantize(value)
      return module.param(name, *args, **kwargs)

    def get_intercept_map(self):
      return {**super().get_intercept_map(), 'flax.linen.Module.param': self._param}

  return qwix.quantize_model(model, _DequantizeOnRead())


@dataclasses.dataclass(frozen=True)
class Bytes:
  """Bytes of the dense weights of a tree: as float32, as stored here, and packed (b bits a
  value plus the scales: what a backend that packs 4-bit types would hold; XLA:CPU does not)."""
  float32: int
  stored: int
  packed: float

  @property
  def stored_ratio(self) -> float:
    return self.stored / self.float32

  @property
  def packed_ratio(self) -> float:
    return self.packed / self.float32


def dense_bytes(params) -> Bytes:
  """Bytes of the quantised (QArray) weights of `params` against float32 ones of their shape.
  `stored` is what the arrays occupy on their device (`on_device_size_in_bytes`); XLA:CPU gives
  an int4/uint4 value a whole byte, so there 4-bit weights store at 1/4 of float32, not 1/8."""
  f32 = stored = packed = 0
  for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized):
    if not is_quantized(x):
      continue
    bits = 4 if x.qvalue.dtype.name in ('int4', 'uint4') else 8 * x.qvalue.dtype.itemsize
    f32 += 4 * x.qvalue.size
    leaves = [x.qvalue, x.scale] + ([x.zero_point] if x.zero_point is not None else [])
    stored += sum(int(a.on_device_size_in_bytes()) for a in leaves)
    packed += x.qvalue.size * bits / 8 + sum(a.nbytes for a in leaves[1:])
  return Bytes(f32, stored, packed)


def quantized_paths(params) -> list[str]:
  """The paths of the QArray leaves of `params` ('blocks_0/attn/wq')."""
  flat = traverse_util.flatten_dict(params)
  return sorted('/'.join(p) for p, v in flat.items() if is_quantized(v))


def adapters_like(adapters, dtype: str) -> Any:
  """The adapters cast to 'float32' or 'bfloat16' (the dtype they are stored and trained in)."""
  dt = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[dtype]
  return jax.tree_util.tree_map(lambda x: x.astype(dt), adapters)



# ------------------------------------------------------------------------------------ runs

def run_quant_config(cfg) -> QuantConfig | None:
  """The QuantConfig of a run config's model.lora_quantize / lora_quantize_block (None: off)."""
  qtype = cfg.model.get('lora_quantize', '')
  if not qtype:
    return None
  return QuantConfig(qtype=qtype, block_size=int(cfg.model.get('lora_quantize_block', 64)))


def quantized_shardings(qparams, shardings, qcfg: QuantConfig):
  """Shardings of `quantize_base`'s output from those of the float params: a QArray's qvalue
  takes its weight's sharding; its scale the same, except the blocked (tiled) axis, which is
  replicated (the scale is 1/block_size of it, and a block count need not divide the mesh)."""
  flat_q = traverse_util.flatten_dict(qparams)
  flat_s = traverse_util.flatten_dict(shardings)
  return traverse_util.unflatten_dict({
      path: _qarray_sharding(flat_q[path], path, s, qcfg) if is_quantized(flat_q[path]) else s
      for path, s in flat_s.items()})


def _qarray_sharding(q, path: tuple[str, ...], s, qcfg: QuantConfig):
  """The shardings (a QArray of them) of QArray `q` of the weight at `path` sharded as `s`."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  _, tiled = _how(path, tuple(q.shape), qcfg)
  spec = list(s.spec) + [None] * (len(q.shape) - len(s.spec))
  for axis in tiled:
    spec[axis] = None
  return dataclasses.replace(q, qvalue=s, scale=NamedSharding(s.mesh, P(*spec)))


def quantize_placed(params, shardings, qcfg: QuantConfig):
  """(`quantize_base(params, qcfg)`, its shardings) for params placed with `shardings` (a run's
  frozen base): quantised in one program whose outputs land in their shardings."""
  abstract = jax.eval_shape(lambda p: quantize_base(p, qcfg), params)
  qshardings = quantized_shardings(abstract, shardings, qcfg)
  return jax.jit(lambda p: quantize_base(p, qcfg), out_shardings=qshardings)(params), qshardings


# ------------------------------------------------------------- streaming loads and storage

class LeafQuantizer:
  """Quantises a base one weight at a time, as a loader places each (`train.init_from`: a HF
  directory's tensors, a run's params): `quantize(path, float_leaf)` is the QArray of a dense
  weight `qcfg.targets` selects, in its quantised sharding (from the float leaf's own), and any
  other leaf unchanged. The caller drops each float weight before the next is read, so a base
  that does not fit on the device in float is never whole there: the quantised base plus one
  float weight at a time. Each quantised leaf is what `quantize_base` gives that weight, bit for
  bit (the same qwix call, one weight per program), in whichever layer layout the loader reads
  (`blocks_i/...`, or `blocks/...` stacked by scan_layers).
  """

  def __init__(self, qcfg: QuantConfig):
    self.qcfg = qcfg
    self._pattern = None if qcfg.targets == 'all-linear' else re.compile(qcfg.targets)

  def is_target(self, path: tuple[str, ...]) -> bool:
    """As `lora.target_paths`: a dense weight, whose path the targets pattern finds."""
    key = '/'.join(path)
    return ('/'.join(path[-2:]) in lora.DENSE
            and (self._pattern is None or self._pattern.search(key) is not None))

  def __call__(self, path: tuple[str, ...], x):
    if is_quantized(x) or not self.is_target(path):
      return x
    _how(path, tuple(x.shape), self.qcfg)  # a bad block size named with the weight's path
    sharding = x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else None
    return _quantize_one(path[-1], self.qcfg, sharding, tuple(x.shape), x.dtype)(x)


# Values quantised at once by a loader: qwix finds each value's NF4 level with an argmin over all
# 16 (vmapped: 16 floats a value), so one large weight at once would need 16x its float bytes.
_CHUNK_VALUES = 1 << 20


@functools.lru_cache(maxsize=None)
def _quantize_one(name: str, qcfg: QuantConfig, sharding, shape, dtype):
  """The compiled quantiser of one dense weight `name` of `shape` (one per kind of weight): in
  slices of its last (output) axis, one after another, each of at most _CHUNK_VALUES values
  where the axis divides so. Scales are per output channel and per block of the input axis,
  so the slices give the whole weight's QArray bit for bit."""
  n, size = shape[-1], int(np.prod(shape))
  k = next((k for k in range(1, n + 1) if n % k == 0 and size // k <= _CHUNK_VALUES), n)
  one = lambda w: _quantize({name: w}, qcfg)[name]

  def fn(w):
    if k == 1:
      return one(w)
    sliced = jnp.moveaxis(w.reshape(*shape[:-1], k, n // k), -2, 0)  # [k, ..., n / k]
    q = jax.lax.map(one, sliced)
    back = lambda x: jnp.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], -1)
    return dataclasses.replace(q, qvalue=back(q.qvalue), scale=back(q.scale))

  if sharding is None:
    return jax.jit(fn)
  abstract = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype))
  return jax.jit(fn, out_shardings=_qarray_sharding(abstract, (name,), sharding, qcfg))


# XLA:CPU and orbax's tensorstore have no 4-bit type to store: a 4-bit value is saved in a byte.
_STORED_AS = {'uint4': jnp.uint8, 'int4': jnp.int8}


def for_storage(params):
  """`params` as orbax can save them: each QArray with a 4-bit qvalue widened to a byte (the
  same values; `from_storage` narrows them back)."""
  def widen(x):
    if is_quantized(x) and x.qvalue.dtype.name in _STORED_AS:
      return dataclasses.replace(x, qvalue=_astype(x.qvalue, _STORED_AS[x.qvalue.dtype.name]))
    return x
  return jax.tree_util.tree_map(widen, params, is_leaf=is_quantized)


def storage_target(abstract_params, shardings, qcfg: QuantConfig):
  """(abstract, shardings) to restore a saved quantised base into (`for_storage`'s dtypes), from
  the float base's abstract params and shardings; `from_storage` of the restored tree is the
  base `quantize_placed` would give."""
  abstract = jax.eval_shape(lambda p: quantize_base(p, qcfg), abstract_params)
  return for_storage(abstract), quantized_shardings(abstract, shardings, qcfg)


def from_storage(params, qcfg: QuantConfig):
  """The quantised base `for_storage` saved: 4-bit qvalues narrowed back to their type."""
  narrow = {'nf4': jnp.uint4, 'int4': jnp.int4}.get(qcfg.qtype)
  def back(x):
    if narrow is not None and is_quantized(x) and x.qvalue.dtype != narrow:
      return dataclasses.replace(x, qvalue=_astype(x.qvalue, narrow))
    return x
  return jax.tree_util.tree_map(back, params, is_leaf=is_quantized)


def _astype(x, dtype):
  """An array cast, or an abstract one (jax.ShapeDtypeStruct) given the dtype."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
  return x.astype(dtype)


def stored_quantized(flat_metadata: dict) -> bool:
  """Whether a saved frozen base (its orbax metadata, flattened to 'a/b/c' paths) holds QArrays."""
  return any(path.endswith('/qvalue') for path in flat_metadata)


def describe_bytes(qparams, qcfg: QuantConfig) -> tuple[dict, str]:
  """(numbers for results.json, a line for the log) of a quantised base's dense weights."""
  b = dense_bytes(qparams)
  mib = lambda n: n / 2**20
  numbers = {'qtype': qcfg.qtype, 'block_size': qcfg.block_size,
             'dense_weights': len(quantized_paths(qparams)), 'dense_bytes_float32': b.float32,
             'dense_bytes_stored': b.stored, 'dense_bytes_packed': b.packed}
  line = (f'QLoRA: frozen base dense weights held {qcfg.qtype} (block {qcfg.block_size}): '
          f'{mib(b.stored):.2f} MiB on device against {mib(b.float32):.2f} MiB in float32 '
          f'({b.stored_ratio:.3f}x; {b.packed_ratio:.3f}x where 4-bit values pack)')
  return numbers, line


def run_model_and_params(model, params, cfg):
  """A run directory's (model, params) as its QLoRA run trained them: the frozen base quantised
  as model.lora_quantize says (as loaded, `train.frozen.load(keep_quantized=True)`, or from a
  float one saved by an older run), the model reading it dequantised; unchanged for other runs."""
  qcfg = run_quant_config(cfg)
  if qcfg is None:
    return model, params
  return quantized_model(model), quantize_base(params, qcfg)
