"""Without jax_enable_x64, jax's default and most users' configuration (conftest
turns it on for every other test): float64 requests become float32 as in lax,
and every backend's value and both VJPs match lax's."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cks_jax
from oracle import assert_close, value_and_vjp

pytestmark = pytest.mark.usefixtures("on_cpu")

# (lhs shape, rhs shape, keyword arguments): KS-deconv, Sk-dilated on NCHW
# (auto's channels-last copies), grouped strided, 1-D batch groups, 3-D transposed.
CASES = [
    ((2, 8, 8, 6), (4, 4, 6, 5), dict(window_strides=(1, 1), padding=[(2, 2), (2, 2)],
                                      lhs_dilation=(2, 2),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    ((2, 6, 11, 10), (7, 6, 3, 3), dict(window_strides=(1, 1), padding="SAME",
                                        rhs_dilation=(2, 3))),
    ((2, 9, 10, 8), (3, 3, 4, 6), dict(window_strides=(2, 2), padding=[(1, 1), (0, 2)],
                                       feature_group_count=2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    ((4, 3, 20), (6, 3, 3), dict(window_strides=(1,), padding="VALID", batch_group_count=2)),
    ((1, 5, 4, 4, 3), (2, 2, 2, 3, 4), dict(window_strides=(1, 1, 1),
                                            padding=[(1, 1)] * 3, lhs_dilation=(2, 2, 2),
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
]


@pytest.fixture(autouse=True)
def x64_off():
  with jax.enable_x64(False):
    yield


@pytest.mark.parametrize("backend", ["auto", "ffi", "portable", "xla"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"case{i}")
def test_value_and_vjps_match_lax(case, backend):
  lhs_shape, rhs_shape, kw = CASES[case]
  rng = np.random.default_rng(case)
  # float64 numpy operands: canonicalized to float32, as lax does.
  lhs, rhs = rng.standard_normal(lhs_shape), rng.standard_normal(rhs_shape)
  cks = lambda l, r: cks_jax.conv_general_dilated(l, r, **kw, backend=backend)
  ref = lambda l, r: lax.conv_general_dilated(l, r, **kw)
  out = jax.eval_shape(ref, lhs, rhs)
  assert out.dtype == jnp.float32
  ct = rng.standard_normal(out.shape).astype(np.float32)
  got = jax.jit(value_and_vjp(cks))(lhs, rhs, ct)
  want = jax.jit(value_and_vjp(ref))(lhs, rhs, ct)
  for name, g, w in zip(("value", "d lhs", "d rhs"), got, want):
    assert g.dtype == w.dtype == jnp.float32, name
    assert_close(g, w, jnp.float32, f"{backend} {name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("pet", [jnp.float64, np.float64, "float64"])
def test_float64_preferred_type_is_float32_with_lax_warning(dtype, pet):
  # Before the fix the kernel got a float64 output for float32 operands and
  # failed at run time ("unsupported dtype combination").
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.standard_normal((2, 3, 9, 8)), dtype)
  rhs = jnp.asarray(rng.standard_normal((4, 3, 3, 3)), dtype)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = cks_jax.conv_general_dilated(lhs, rhs, (1, 1), "VALID", preferred_element_type=pet)
    want = lax.conv_general_dilated(lhs, rhs, (1, 1), "VALID", preferred_element_type=pet)
  assert got.dtype == want.dtype == jnp.float32
  assert_close(got, want, dtype, "value")
  messages = [str(w.message) for w in caught]
  assert len(messages) == 2 and all("truncated to dtype float32" in m for m in messages), messages
  assert caught[0].filename == __file__  # the warning points at the caller, as lax's


def test_explain_and_conv_transpose():
  e = cks_jax.explain((2, 8, 8, 6), (4, 4, 6, 5), (1, 1), [(2, 2), (2, 2)], (2, 2),
                      dimension_numbers=("NHWC", "HWIO", "NHWC"), platform="cpu")
  assert e.backend == "cks-cpu" and e.shapes[2] == (2, 16, 16, 5)
  rng = np.random.default_rng(1)
  x, w = rng.standard_normal((2, 8, 8, 6)), rng.standard_normal((4, 4, 6, 5))
  got = jax.jit(lambda x, w: cks_jax.conv_transpose(x, w, (2, 2), "SAME"))(x, w)
  want = lax.conv_transpose(x, w, (2, 2), "SAME")
  assert got.dtype == want.dtype == jnp.float32
  assert_close(got, want, jnp.float32, "conv_transpose")
