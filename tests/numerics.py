"""How closely two floating-point computations of the same function must agree: one rule for the
whole suite.

Two float computations of one function (another attention backend, another summation order,
another XLA thread count, optimisation level or CPU) agree only up to rounding. Each rounding is
at most eps(dtype) relative; a reduction of n terms accumulates about sqrt(n) of them when the
errors have random signs (n at worst), and the error is relative to the magnitude of the *terms*,
which the magnitude of the values in the array bounds far better than each element's own value
does: a small gradient entry that is a difference of large terms carries the large terms' error.
So every comparison here is, element by element,

    |got - want| <= tolerance = SLACK * eps(dtype) * sqrt(terms) * scale,

with `scale` = max |want| over the compared elements (or a scale the caller names) and `terms` the
length of the longest reduction behind the values (the caller states it: tokens summed into a
gradient, the contraction size of a matmul, ...). SLACK covers the chain of operations around
that reduction (a few layers forward and backward, exp/log approximations); it is one constant
for the suite, raised at a call site only with a comment saying why.

A bug of substance (a mask entry wrong, a term dropped, a wrong scale) moves values by a fraction
of `scale`, orders of magnitude above this; tests/test_numerics.py checks both sides.

Exact equality (`np.testing.assert_array_equal`) is used only where exactness is promised:
bit-identical resume on one machine, integer outputs, the same program run twice. Statistical
checks (Monte Carlo estimates, sampling frequencies) state their own bounds where they are made.
"""
import jax
import jax.numpy as jnp
import numpy as np

SLACK = 16.0


def eps(dtype) -> float:
  """Machine epsilon of a float dtype (float32, bfloat16, float16, float64)."""
  return float(jnp.finfo(dtype).eps)


def _compute_dtype(got, dtype):
  """The precision the values were computed in: the caller's word, else `got`'s dtype when it is a
  float of at most 32 bits, else float32 (a float64 reference says nothing of the computation)."""
  if dtype is not None:
    return dtype
  got_dtype = getattr(got, 'dtype', None)
  if got_dtype is not None and jnp.issubdtype(got_dtype, jnp.floating) and got_dtype.itemsize <= 4:
    return got_dtype
  return jnp.float32


def tolerance(want, *, terms: int = 1, dtype=jnp.float32, slack: float = SLACK,
              scale: float | None = None) -> float:
  """The absolute tolerance the module docstring states, for reference values `want`."""
  if scale is None:
    scale = float(np.max(np.abs(np.asarray(want, np.float64)))) if np.size(want) else 0.0
  return slack * eps(dtype) * float(np.sqrt(max(terms, 1))) * scale


def assert_close(got, want, *, terms: int = 1, dtype=None, slack: float = SLACK,
                 scale: float | None = None, where=None, err_msg: str = '') -> None:
  """`got` equals the reference `want` up to the suite's rounding tolerance (module docstring).

  `where` (a boolean array broadcastable to the values) restricts the comparison, and the scale,
  to the elements that matter (not padding, say).
  """
  dtype = _compute_dtype(got, dtype)
  g, w = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
  g, w = np.broadcast_arrays(g, w)
  if where is not None:
    keep = np.broadcast_to(np.asarray(where, bool), g.shape)
    g, w = g[keep], w[keep]
  bad = ~np.isfinite(g) | ~np.isfinite(w)
  if np.any(bad) and not np.array_equal(g[bad], w[bad], equal_nan=True):
    raise AssertionError(f'{err_msg}: non-finite values differ')
  finite = np.isfinite(w)
  g, w = g[finite], w[finite]
  tol = tolerance(w, terms=terms, dtype=dtype, slack=slack, scale=scale)
  if g.size == 0:
    return
  err = np.abs(g - w)
  worst = int(np.argmax(err))
  if err[worst] > tol:
    shown_scale = scale if scale is not None else float(np.max(np.abs(w)))
    raise AssertionError(
        f'{err_msg + ": " if err_msg else ""}max |got - want| = {err[worst]:.3g} '
        f'(got {g[worst]:.9g}, want {w[worst]:.9g}; {int(np.sum(err > tol))} of {err.size} '
        f'elements over) > tolerance {tol:.3g} = {slack:g} * eps({jnp.dtype(dtype).name}) * '
        f'sqrt({terms}) * scale {shown_scale:.4g}')


def assert_trees_close(got, want, **kwargs) -> None:
  """assert_close leaf by leaf (each leaf scaled by its own largest reference value); the leaf's
  path names a failure."""
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves = jax.tree_util.tree_leaves_with_path(want)
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves], 'tree structures differ'
  prefix = kwargs.pop('err_msg', '')
  for (path, g), (_, w) in zip(got_leaves, want_leaves):
    assert_close(g, w, err_msg=f'{prefix}{jax.tree_util.keystr(path)}', **kwargs)
