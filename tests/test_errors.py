"""Bad input raises a clear Python error before any kernel runs; empty shapes work."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cks_jax

L = jnp.zeros((2, 4, 8, 8), jnp.float32)
R = jnp.zeros((6, 4, 3, 3), jnp.float32)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lhs=jnp.zeros((2, 4, 8)), rhs=R), ValueError, "same rank"),
    (dict(lhs=jnp.zeros((2, 4)), rhs=jnp.zeros((6, 4))), ValueError, "1 to 3 spatial"),
    (dict(lhs=jnp.zeros((1,) * 6), rhs=jnp.zeros((1,) * 6)), ValueError, "1 to 3 spatial"),
    (dict(rhs=jnp.zeros((6, 3, 3, 3))), ValueError, "input feature"),
    (dict(window_strides=(0, 1)), ValueError, "window_strides"),
    (dict(window_strides=(-1, 1)), ValueError, "window_strides"),
    (dict(window_strides=(1,)), ValueError, "window_strides"),
    (dict(window_strides=(1.5, 1)), TypeError, "window_strides"),
    (dict(lhs_dilation=(1, 0)), ValueError, "lhs_dilation"),
    (dict(rhs_dilation=(-2, 1)), ValueError, "rhs_dilation"),
    (dict(padding="FULL"), ValueError, "padding"),
    (dict(padding=[(1, 1)]), ValueError, "padding"),
    (dict(padding=[(1, 1, 1), (0, 0)]), ValueError, "padding"),
    (dict(padding=[(-9, 0), (0, 0)]), ValueError, "negative padding"),
    (dict(padding="SAME", lhs_dilation=(2, 2)), ValueError, "transposed"),
    (dict(feature_group_count=0), ValueError, "feature_group_count"),
    (dict(feature_group_count=3, rhs=jnp.zeros((6, 1, 3, 3))), ValueError, "feature_group_count"),
    (dict(feature_group_count=4, rhs=jnp.zeros((6, 1, 3, 3))), ValueError,
     "multiple of feature_group_count"),
    (dict(batch_group_count=-1), ValueError, "batch_group_count"),
    (dict(batch_group_count=3, rhs=jnp.zeros((6, 4, 3, 3))), ValueError, "batch_group_count"),
    (dict(batch_group_count=2, feature_group_count=2, rhs=jnp.zeros((6, 2, 3, 3))), ValueError,
     "at most one"),
    (dict(rhs=R.astype(jnp.float16)), TypeError, "same dtype"),
    (dict(lhs=L.astype(jnp.int32), rhs=R.astype(jnp.int32)), TypeError, "float32"),
    (dict(lhs=L.astype(jnp.complex64), rhs=R.astype(jnp.complex64)), TypeError, "float32"),
    (dict(preferred_element_type=jnp.int32), TypeError, "preferred_element_type"),
    (dict(preferred_element_type=jnp.float16), TypeError, "narrower"),
    (dict(dimension_numbers=("NCHW", "OIHW")), TypeError, "dimension_numbers"),
    (dict(dimension_numbers=("NCHW", "OIHW", "NCXW")), TypeError, "dimension_numbers"),
])
def test_bad_input(kwargs, exc, match):
  args = dict(lhs=L, rhs=R, window_strides=(1, 1), padding="SAME")
  args.update(kwargs)
  with pytest.raises(exc, match=match):
    cks_jax.conv_general_dilated(**args)


def test_errors_under_jit_are_raised_at_trace_time():
  f = jax.jit(lambda l, r: cks_jax.conv_general_dilated(l, r, (0, 1), "SAME"))
  with pytest.raises(ValueError, match="window_strides"):
    f(L, R)


def test_index_overflow_is_rejected():
  big = jax.ShapeDtypeStruct((2**31, 2**31, 2, 2), jnp.float32)
  with pytest.raises(ValueError, match="too many elements"):
    jax.eval_shape(lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "SAME"), big,
                   jax.ShapeDtypeStruct((1, 2**31, 1, 1), jnp.float32))


def test_conv_transpose_bad_input():
  with pytest.raises(ValueError, match="strides"):
    cks_jax.conv_transpose(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), (0, 2), "SAME")
  with pytest.raises(ValueError, match="padding"):
    cks_jax.conv_transpose(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), (2, 2), "FULL")


def test_out_sharding_is_refused_clearly():
  with pytest.raises(NotImplementedError, match="out_sharding"):
    cks_jax.conv_general_dilated(L, R, (1, 1), "SAME", out_sharding=object())


def test_kernel_rejects_inconsistent_custom_call():
  # The C++ handler re-validates: a mismatched group count is an error, not
  # an out-of-bounds read.
  from cks_jax._src import primitive
  from jax import lax
  params = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=(1, 1),
                rhs_dilation=(1, 1), dimension_numbers=lax.ConvDimensionNumbers(
                    (0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3)),
                feature_group_count=1, batch_group_count=1, precision=None,
                out_dtype=np.dtype(np.float32), backend="auto")
  bad_rhs = jnp.zeros((6, 2, 3, 3), jnp.float32)  # 2 input features, lhs has 4
  with pytest.raises(Exception, match="inconsistent"):
    jax.block_until_ready(jax.jit(lambda l, r: primitive.bind(l, r, **params))(L, bad_rhs))


def test_jax_version_check():
  from cks_jax._src import compat
  compat.check_jax_version("0.10.2")
  compat.check_jax_version("0.12.0.1")
  with pytest.raises(ImportError, match="needs jax >= 0.10"):
    compat.check_jax_version("0.4.30")


def test_extension_version_matches_package():
  from cks_jax._src import ffi
  assert ffi.extension().__version__ == cks_jax.__version__
