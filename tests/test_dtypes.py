"""float32, float64, bfloat16, float16 and preferred_element_type."""
import jax.numpy as jnp
import numpy as np
import pytest

import cks_jax
from oracle import check, random

ARGS = ((2, 1), [(1, 2), (2, 1)], (2, 1), (1, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16, jnp.float16])
def test_dtype_values_and_gradients(dtype):
  check((2, 8, 9, 7), (6, 8, 3, 3), *ARGS, dtype=dtype)
  check((2, 6, 9, 7), (6, 3, 4, 3), *ARGS, dtype=dtype, feature_group_count=2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_accumulates_in_float32(dtype):
  # A long reduction: float32 accumulation keeps the error at the level of
  # one final rounding, far below what 16-bit accumulation would give.
  check((1, 512, 6, 6), (4, 512, 3, 3), (1, 1), "SAME", dtype=dtype, grads=False)


@pytest.mark.parametrize("dtype,pet", [(jnp.bfloat16, np.float32), (jnp.float16, np.float32),
                                       (np.float32, np.float64), (jnp.bfloat16, np.float64),
                                       (jnp.bfloat16, jnp.float16)])
def test_preferred_element_type(dtype, pet):
  l, r = random((2, 4, 7, 6), dtype, 0), random((3, 4, 3, 3), dtype, 1)
  out = cks_jax.conv_general_dilated(l, r, (1, 1), "SAME", preferred_element_type=pet)
  assert out.dtype == np.dtype(pet)
  check((2, 4, 7, 6), (3, 4, 3, 3), (1, 1), "SAME", dtype=dtype, preferred_element_type=pet)


def test_float32_precision_is_full():
  # The kernels accumulate float32 exactly like an fp32 GEMM; compare
  # against a float64 reference with a tight bound.
  check((2, 64, 10, 10), (32, 64, 3, 3), (1, 1), "SAME", dtype=np.float32, grads=False)
