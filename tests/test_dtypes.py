"""float32, float64, bfloat16, float16 and preferred_element_type."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cks_jax
from cks_jax._src import ffi
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


@pytest.mark.usefixtures("on_cpu")  # the CPU kernel's float32 copies
def test_16bit_float32_copies_are_shared_between_threads_and_released():
  # The CPU kernel runs 16-bit operands on float32 copies kept for the next call, in one
  # process-wide free list: calls from several threads, one after another, leave one set held,
  # the size explain reports, not one per thread; two threads at once hold at most two.
  # release_cpu_buffers frees them and says how much it freed.
  ext = ffi.extension()
  l, r = random((2, 16, 12, 12), jnp.bfloat16, 0), random((24, 16, 3, 3), jnp.bfloat16, 1)
  copies = cks_jax.explain(l, r, (1, 1), "SAME", backend="ffi").scratch["widened"]
  assert copies == 4 * (l.size + r.size)
  # backend="ffi" in the call, not use_backend: jit may trace again in another thread, whose
  # default is "auto" (which would run this NCHW problem on channels-last copies, on the
  # bfloat16 pair path where the CPU has AVX512_BF16: no float32 copies)
  f = jax.jit(lambda a, b: cks_jax.conv_general_dilated(a, b, (1, 1), "SAME", backend="ffi"))
  want = np.asarray(f(l, r), np.float32)
  check((2, 16, 12, 12), (24, 16, 3, 3), (1, 1), "SAME", dtype=jnp.bfloat16, grads=False)
  cks_jax.release_cpu_buffers()
  assert ext.cpu_widened_held_bytes() == 0
  outs = []

  def call(times):
    for _ in range(times):
      outs.append(np.asarray(f(l, r), np.float32))

  for _ in range(3):
    t = threading.Thread(target=call, args=(1,))
    t.start()
    t.join()
  assert ext.cpu_widened_held_bytes() == copies
  ts = [threading.Thread(target=call, args=(20,)) for _ in range(2)]
  for t in ts:
    t.start()
  for t in ts:
    t.join()
  assert len(outs) == 43 and all(np.array_equal(o, want) for o in outs)
  assert copies <= ext.cpu_widened_held_bytes() <= 2 * copies
  held = ext.cpu_widened_held_bytes() + ext.cpu_packed_b_held_bytes()  # both kinds: freed
  assert cks_jax.release_cpu_buffers() == held
  assert ext.cpu_widened_held_bytes() == 0 and cks_jax.release_cpu_buffers() == 0


@pytest.mark.usefixtures("on_cpu")  # the CPU kernel's packed B
def test_packed_b_is_kept_in_whole_2mb_buffers_and_released():
  # The CPU kernel packs B into a buffer of 2 MB pages kept for the next call (scratch.h):
  # rounded up to whole 2 MB, one buffer for calls one after another (a larger B replaces it,
  # not joins it), at most two for two threads at once; release_cpu_buffers frees them.
  ext = ffi.extension()
  mib2 = 2 << 20
  dn = ("NHWC", "HWIO", "NHWC")

  def layer(lhs_shape, rhs_shape):
    l, r = random(lhs_shape, np.float32, 0), random(rhs_shape, np.float32, 1)
    e = cks_jax.explain(l, r, (1, 1), ((2, 2), (2, 2)), (2, 2), dimension_numbers=dn,
                        backend="ffi")
    f = jax.jit(lambda a, b: cks_jax.conv_general_dilated(
        a, b, (1, 1), ((2, 2), (2, 2)), (2, 2), dimension_numbers=dn, backend="ffi"))
    want = jax.lax.conv_general_dilated(l, r, (1, 1), ((2, 2), (2, 2)), (2, 2),
                                        dimension_numbers=dn)
    return e.scratch["packed_b"], lambda: f(l, r), want

  small_b, small, small_want = layer((2, 8, 8, 128), (4, 4, 128, 64))  # DCGAN's k4 s2: 512 KB
  big_b, big, big_want = layer((1, 4, 4, 256), (4, 4, 256, 320))       # 5 MB
  assert 0 < small_b < mib2 < 2 * mib2 < big_b < 3 * mib2
  cks_jax.release_cpu_buffers()
  assert ext.cpu_packed_b_held_bytes() == 0
  for _ in range(3):
    t = threading.Thread(target=lambda: np.testing.assert_allclose(
        small(), small_want, rtol=2e-5, atol=2e-4))
    t.start()
    t.join()
  assert ext.cpu_packed_b_held_bytes() == mib2
  np.testing.assert_allclose(big(), big_want, rtol=2e-5, atol=2e-4)
  assert ext.cpu_packed_b_held_bytes() == 3 * mib2  # the 2 MB one gave way
  np.testing.assert_allclose(small(), small_want, rtol=2e-5, atol=2e-4)  # served by the 6 MB
  assert ext.cpu_packed_b_held_bytes() == 3 * mib2
  outs = []

  def call(times):
    for _ in range(times):
      outs.append(np.asarray(big()))

  ts = [threading.Thread(target=call, args=(10,)) for _ in range(2)]
  for t in ts:
    t.start()
  for t in ts:
    t.join()
  assert len(outs) == 20 and all(np.array_equal(o, outs[0]) for o in outs)
  assert ext.cpu_packed_b_held_bytes() in (3 * mib2, 6 * mib2)
  held = ext.cpu_packed_b_held_bytes() + ext.cpu_widened_held_bytes()
  assert cks_jax.release_cpu_buffers() == held
  assert ext.cpu_packed_b_held_bytes() == 0 and cks_jax.release_cpu_buffers() == 0
