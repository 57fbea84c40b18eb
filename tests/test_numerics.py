"""The suite's float tolerance (tests/numerics.py) is loose enough for rounding and tight enough
for bugs: two attention backends that differ in one mask entry fail the same-function check."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import assert_same_function_on_packed_rows, packed_rows_with_padding, requires_cxx
from numerics import SLACK, assert_close, assert_trees_close, eps, tolerance
from pathways_jax.config import ModelConfig
from pathways_jax.models import attention as attn_lib
from pathways_jax.models.transformer import Transformer


def test_the_tolerance_is_slack_eps_sqrt_terms_times_the_largest_reference_value():
  want = np.array([0.5, -171.0, 3.0], np.float32)
  assert tolerance(want, terms=100) == pytest.approx(SLACK * 2.0**-23 * 10 * 171)
  assert eps(np.float32) == 2.0**-23 and eps('bfloat16') == 2.0**-7
  assert tolerance(want, terms=4, dtype='bfloat16', scale=2.0) == pytest.approx(SLACK * 2**-7 * 4)


def test_reassociation_noise_passes_and_a_real_difference_fails():
  """The issue's case: one gradient entry of 0.0754509 against 0.0754361 in an array whose
  largest entry is ~171 is rounding; a 1% change of a large entry is not."""
  want = np.random.RandomState(0).randn(1536).astype(np.float32)
  want[0], want[1] = 171.0, 0.0754361
  noisy = want.copy()
  noisy[1] = 0.0754509
  assert_close(noisy, want, terms=200)
  wrong = want.copy()
  wrong[0] *= 1.01
  with pytest.raises(AssertionError, match=r'max \|got - want\| = 1.71 .*1 of 1536'):
    assert_close(wrong, want, terms=200)


def test_where_restricts_the_comparison_and_non_finite_values_must_match():
  want = np.array([1.0, 2.0, 1e6], np.float32)
  got = np.array([1.0, 2.0, 0.0], np.float32)
  assert_close(got, want, where=[True, True, False])
  with pytest.raises(AssertionError):
    assert_close(got, want)
  assert_close(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]))
  with pytest.raises(AssertionError, match='non-finite'):
    assert_close(np.array([np.inf, 1.0]), np.array([1.0, 1.0]))


def test_trees_are_compared_leaf_by_leaf_each_on_its_own_scale():
  """A small leaf is not compared on a large leaf's scale: its error is named by its path."""
  want = {'big': np.array([1000.0]), 'small': np.array([1e-3])}
  with pytest.raises(AssertionError, match=r"\['small'\]"):
    assert_trees_close({'big': np.array([1000.0]), 'small': np.array([1.1e-3])}, want)


# One changed mask entry, in one backend only: the check must see it.
_MUTATIONS = {
    'a query sees one key of the previous document': (0, 50, 5, True),
    'a query sees the next token': (1, 20, 21, True),
    'a query loses one key': (1, 60, 3, False),
}


def _mutate(mask_BLS, where):
  row, query, key, value = where
  return mask_BLS.at[row, query, key].set(value)


def _model(**kw):
  cfg = ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=128, **kw)
  return Transformer(cfg)


def _params(model):
  tokens, _, _ = packed_rows_with_padding(model.cfg.vocab_size)
  return nn.unbox(model.init(jax.random.key(1), tokens)['params'])


@pytest.mark.parametrize('mutation', list(_MUTATIONS))
def test_blocked_attention_with_one_mask_entry_changed_fails_the_same_function_check(
    monkeypatch, mutation):
  model = _model(causal=True, causal_query_blocks=1)
  blocked = Transformer(model.cfg.replace(causal_query_blocks=3))
  params = _params(model)
  assert_same_function_on_packed_rows(model, blocked, params)  # unchanged: the same function
  original = attn_lib._causal_blocked_attention  # pylint: disable=protected-access

  def mutated(q, k, v, mask_BLL, scale, num_blocks):
    return original(q, k, v, _mutate(mask_BLL, _MUTATIONS[mutation]), scale, num_blocks)

  monkeypatch.setattr(attn_lib, '_causal_blocked_attention', mutated)
  with pytest.raises(AssertionError, match='max \\|got - want\\|'):
    assert_same_function_on_packed_rows(model, blocked, params)


@requires_cxx
@pytest.mark.parametrize('causal,mutation', [
    (causal, m) for causal in (True, False) for m in _MUTATIONS
    if causal or m != 'a query sees the next token'])  # bidirectional: it sees it anyway
def test_cpu_kernel_against_xla_with_one_mask_entry_changed_fails(monkeypatch, causal, mutation):
  """The mask of the 'xla' side is changed (the kernel computes its own from the segments)."""
  xla_model = _model(causal=causal, attention='xla')
  cpu_model = _model(causal=causal, attention='cpu')
  params = _params(xla_model)
  original = attn_lib.attention_mask
  monkeypatch.setattr(attn_lib, 'attention_mask',
                      lambda *a: _mutate(original(*a), _MUTATIONS[mutation]))
  with pytest.raises(AssertionError, match='max \\|got - want\\|'):
    assert_same_function_on_packed_rows(xla_model, cpu_model, params)


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='counts threads in /proc')
def test_nproc_sets_the_xla_cpu_thread_pool_that_make_test_variants_varies():
  """`make test-variants` changes XLA's CPU thread count through NPROC: it must take effect."""
  code = ('import os, jax.numpy as jnp; x = jnp.ones((512, 512)); (x @ x).block_until_ready(); '
          "print(len(os.listdir('/proc/self/task')))")
  threads = {}
  for n in ('1', '8'):
    out = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'NPROC': n,
                                                            'JAX_PLATFORMS': 'cpu'},
                         capture_output=True, text=True, timeout=120, check=True)
    threads[n] = int(out.stdout.split()[-1])
  assert threads['8'] >= threads['1'] + 7, threads
