"""Edge and hostile input: each gets lax's result or a clear error, never a crash."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cks_jax
from oracle import check, random


@pytest.mark.parametrize("case", [
    # 1x1 everything
    dict(lhs=(1, 1, 1, 1), rhs=(1, 1, 1, 1), args=((1, 1), "SAME")),
    # kernel larger than the input
    dict(lhs=(1, 2, 3, 2), rhs=(2, 2, 7, 5), args=((1, 1), "SAME")),
    dict(lhs=(1, 2, 3, 2), rhs=(2, 2, 7, 5), args=((1, 1), [(6, 6), (4, 4)])),
    # padding that removes the whole input (empty output)
    dict(lhs=(1, 2, 3, 3), rhs=(2, 2, 1, 1), args=((1, 1), [(-3, 0), (0, 0)])),
    # padding that removes all but padding (outputs with no real tap)
    dict(lhs=(1, 2, 3, 3), rhs=(2, 2, 2, 2), args=((1, 1), [(-2, 4), (5, -3)])),
    # huge strides and dilations
    dict(lhs=(1, 2, 9, 9), rhs=(2, 2, 2, 2), args=((1000, 1000), [(3, 3), (3, 3)])),
    dict(lhs=(1, 2, 9, 9), rhs=(2, 2, 2, 2), args=((1, 1), [(3, 3), (3, 3)], (1000, 1),
                                                   (1, 1000))),
    dict(lhs=(1, 2, 5, 5), rhs=(2, 2, 2, 2), args=((3, 1), [(999, 999), (0, 0)], (1, 1),
                                                   (1000, 1))),
])
def test_corpus(case):
  check(case["lhs"], case["rhs"], *case["args"])


def test_nan_in_a_real_element_propagates_like_lax():
  l = jnp.ones((1, 1, 5, 5)).at[0, 0, 2, 2].set(jnp.nan)
  r = jnp.ones((1, 1, 3, 3))
  for kw in [dict(padding="SAME"), dict(padding=((2, 2), (2, 2)), lhs_dilation=(2, 2)),
             dict(padding="SAME", rhs_dilation=(2, 2))]:
    kw = dict(kw, window_strides=(1, 1))
    ours = np.isnan(np.asarray(cks_jax.conv_general_dilated(l, r, **kw)))
    ref = np.isnan(np.asarray(lax.conv_general_dilated(l, r, **kw)))
    np.testing.assert_array_equal(ours, ref)


def test_inf_in_kernel_never_meets_a_padded_zero():
  # Documented difference: XLA:CPU multiplies padded zeros, so Inf * 0 turns
  # border outputs into NaN; C-K-S never multiplies them, so the outputs that
  # read only real elements stay finite (inf where an inf tap meets data).
  l = jnp.ones((1, 1, 4, 4))
  r = jnp.ones((1, 1, 3, 3)).at[0, 0, 0, 0].set(jnp.inf)
  out = np.asarray(cks_jax.conv_general_dilated(l, r, (1, 1), "SAME"))[0, 0]
  assert not np.isnan(out).any()
  assert np.isinf(out[1:, 1:]).all() and np.isfinite(out[0]).all()
  np.testing.assert_array_equal(out[0], [4, 6, 6, 4])


def test_deterministic_run_to_run():
  l, r = random((4, 64, 17, 19), np.float32, 0), random((48, 64, 4, 4), np.float32, 1)
  f = jax.jit(lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), [(2, 2), (3, 1)],
                                                        (2, 2)))
  g = jax.jit(jax.grad(lambda l, r: jnp.sum(f(l, r) ** 2), (0, 1)))
  a, b = f(l, r), f(l, r)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for x, y in zip(g(l, r), g(l, r)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_donated_buffers():
  # Output shape equals lhs shape, so XLA may reuse the donated lhs buffer.
  l, r = random((2, 3, 8, 8), np.float32, 0), random((3, 3, 3, 3), np.float32, 1)
  ref = np.asarray(lax.conv_general_dilated(l, r, (1, 1), "SAME"))
  f = jax.jit(lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "SAME"),
              donate_argnums=(0,))
  np.testing.assert_allclose(np.asarray(f(jnp.array(l), r)), ref, rtol=1e-5, atol=1e-5)


def test_transposed_views_are_handled():
  # Non-default layouts reach the kernel as strides, never as copies that
  # could alias wrongly.
  l, r = random((2, 8, 9, 3), np.float64, 0), random((4, 3, 3, 5), np.float64, 1)
  lt = jnp.transpose(l, (0, 3, 1, 2))
  rt = jnp.transpose(r, (3, 2, 0, 1))
  ours = cks_jax.conv_general_dilated(lt, rt, (2, 1), "SAME")
  ref = lax.conv_general_dilated(l, r, (2, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(ours), np.transpose(np.asarray(ref), (0, 3, 1, 2)),
                             rtol=1e-12, atol=1e-12)


def test_flat_indices_beyond_int32_lower_without_error():
  # 64-bit indexing: shapes with more than 2^31 elements are accepted and
  # lowered (never allocated here).
  lhs = jax.ShapeDtypeStruct((2, 2**15, 2**15, 2), jnp.float32)   # 2^32 elements
  rhs = jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32)
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  text = jax.jit(f).trace(lhs, rhs).lower().as_text()
  assert "cks_conv_cpu" in text
