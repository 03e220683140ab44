"""Edge and hostile input: each gets lax's result or a clear error, never a crash."""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cks_jax
from oracle import assert_close, check, direct_conv, random


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


@pytest.mark.usefixtures("on_cpu")
def test_inf_in_kernel_never_meets_a_padded_zero():
  # Documented difference: XLA:CPU multiplies padded zeros, so Inf * 0 turns
  # border outputs into NaN; C-K-S never multiplies them, so the outputs that
  # read only real elements stay finite (inf where an inf tap meets data).
  # The CPU kernel's behaviour (the CUDA kernel's tiles multiply padded zeros,
  # as XLA does: README, "GPU").
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
  text = jax.jit(f).trace(lhs, rhs).lower(lowering_platforms=("cpu",)).as_text()
  assert "cks_conv_cpu" in text


# ---------------------------------------------------------------- zero sizes
@pytest.mark.parametrize("case", [
    # empty input, padding alone makes a (zero) output: the kernel must write it
    dict(lhs=(1, 2, 0, 5), rhs=(3, 2, 2, 3), args=((1, 1), [(2, 2), (0, 0)])),
    dict(lhs=(1, 2, 0, 5), rhs=(3, 2, 2, 3), args=((2, 1), [(3, 2), (1, 0)], (3, 1), (2, 1))),
    # empty batch with batch groups, empty features with feature groups
    dict(lhs=(0, 2, 4, 5), rhs=(4, 2, 2, 3), args=((1, 1), [(2, 2), (0, 0)]),
         kw=dict(batch_group_count=2)),
    dict(lhs=(2, 0, 4, 5), rhs=(4, 0, 2, 3), args=((1, 1), [(2, 2), (0, 0)], (2, 1)),
         kw=dict(feature_group_count=2)),
    dict(lhs=(2, 4, 4, 5), rhs=(0, 2, 2, 3), args=((1, 1), "SAME"), kw=dict(feature_group_count=2)),
    # 1D and 3D
    dict(lhs=(2, 3, 0), rhs=(4, 3, 2), args=((1,), [(1, 3)], (2,), (3,))),
    dict(lhs=(1, 2, 3, 0, 2), rhs=(2, 2, 1, 2, 1), args=((1, 1, 1), [(0, 0), (2, 1), (0, 0)])),
])
def test_zero_size_corpus(case):
  check(case["lhs"], case["rhs"], *case["args"], oracle="direct" if len(case["lhs"]) == 5
        else "lax", **case.get("kw", {}))


def test_zero_size_kernel_window_sums_nothing():
  # lax's shape rule accepts a kernel dimension of size 0 (its lowering then
  # fails); cks computes the empty sum.
  l, r = random((1, 2, 5, 5), np.float32, 0), jnp.zeros((3, 2, 0, 3), jnp.float32)
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "VALID")
  out = jax.jit(f)(l, r)
  assert out.shape == jax.eval_shape(
      lambda l, r: lax.conv_general_dilated(l, r, (1, 1), "VALID"), l, r).shape == (1, 3, 6, 3)
  np.testing.assert_array_equal(np.asarray(out), 0)
  dl, dr = jax.grad(lambda l, r: jnp.sum(f(l, r)), (0, 1))(l, r)
  np.testing.assert_array_equal(np.asarray(dl), 0)
  assert dr.shape == r.shape


# ---------------------------------------------------------------- NaN and Inf
NAN_INF_CONFIGS = [
    dict(padding="SAME"),
    dict(padding="SAME", window_strides=(2, 2)),
    dict(padding="SAME", rhs_dilation=(2, 2)),
    dict(padding=((2, 2), (2, 1)), lhs_dilation=(2, 2)),
    dict(padding=((-1, 3), (2, -1)), lhs_dilation=(2, 1), rhs_dilation=(1, 2)),
    dict(padding="SAME", feature_group_count=2),
    dict(padding="VALID", batch_group_count=2),
]


@pytest.mark.usefixtures("on_cpu")  # the CPU kernel against XLA:CPU's semantics
@pytest.mark.parametrize("kw", NAN_INF_CONFIGS)
def test_nan_and_inf_in_lhs_propagate_like_lax(kw):
  # NaN, +Inf and -Inf in real input elements reach exactly the outputs (and
  # filter gradients) lax's do, with the same signs; the rest agrees in value.
  # (Non-finite kernels differ at borders by design: test_inf_in_kernel_...)
  kw = dict(dict(window_strides=(1, 1)), **kw)
  g = kw.get("feature_group_count", 1)
  l = np.array(random((2, 4, 7, 7), np.float64, 0))
  for (n, c, h, w), v in zip([(0, 0, 3, 3), (0, 1, 1, 5), (1, 2, 5, 1), (1, 3, 6, 6),
                              (0, 3, 0, 2)], [np.inf, -np.inf, np.nan, np.inf, -np.inf]):
    l[n, c, h, w] = v
  r = random((4, 4 // g, 3, 3), np.float64, 1)
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, **kw)
  ref = lambda l, r: lax.conv_general_dilated(l, r, **kw)
  if kw.get("batch_group_count", 1) > 1:
    # lax's filter gradient of a batch-grouped conv spreads a NaN to the
    # filters of every batch group (it masks by multiplying with zeros); cks
    # confines it to the group that reads it, as the direct method does.
    ref = lambda l, r: direct_conv(l, r, **kw)
  ct = random(jax.eval_shape(ref, l, r).shape, np.float64, 2)
  got = (f(l, r),) + jax.vjp(f, l, r)[1](ct)
  want = (ref(l, r),) + jax.vjp(ref, l, r)[1](ct)
  for name, a, b in zip(("value", "d lhs", "d rhs"), got, want):
    a, b = np.asarray(a), np.asarray(b)
    for mask in (np.isnan, np.isposinf, np.isneginf):
      np.testing.assert_array_equal(mask(a), mask(b), err_msg=f"{name} {mask.__name__} {kw}")
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], rtol=1e-11, atol=1e-11, err_msg=name)
  # The configuration does meet NaN and Inf.
  assert np.isnan(want[0]).any() and np.isinf(want[0]).any()


# ---------------------------------------------------------------- buffers
@pytest.mark.parametrize("donate", [(0,), (1,), (0, 1)])
def test_donated_buffers_forward_and_gradients(donate):
  # Output, d lhs and d rhs each have the shape of a donated operand, so XLA
  # may hand the kernel a donated buffer as its output; it must still read
  # the operands intact. Several row blocks (kMC = 96) per task list.
  l0, r0 = random((2, 16, 12, 12), np.float32, 0), random((16, 16, 3, 3), np.float32, 1)
  ct = random((2, 16, 12, 12), np.float32, 2)
  ref = lambda l, r: lax.conv_general_dilated(l, r, (1, 1), "SAME")
  want = (ref(l0, r0),) + jax.vjp(ref, l0, r0)[1](ct)

  def all3(l, r):
    f = lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "SAME")
    out, vjp = jax.vjp(f, l, r)
    return (out,) + vjp(ct)
  l, r = jnp.array(l0), jnp.array(r0)  # fresh copies to give away
  got = jax.jit(all3, donate_argnums=donate)(l, r)
  for name, a, b in zip(("value", "d lhs", "d rhs"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=name)
  assert [x.is_deleted() for x in (l, r)] == [i in donate for i in (0, 1)]


@pytest.mark.parametrize("view", ["transpose", "step", "reverse", "sliced_channels"])
def test_non_contiguous_numpy_views(view):
  # Strided NumPy views (no copy made by the caller) give the contiguous result.
  base = np.random.default_rng(0).standard_normal((4, 6, 10, 9))
  lhs = {"transpose": base.transpose(0, 1, 3, 2), "step": base[::2, :, ::3, 1::2],
         "reverse": base[:, :, ::-1, ::-1], "sliced_channels": base[:, 1:5]}[view]
  assert not lhs.flags.c_contiguous
  rhs = np.random.default_rng(1).standard_normal((3, lhs.shape[1], 3, 2))[:, :, ::-1]
  kw = dict(window_strides=(2, 1), padding=((1, 2), (0, 1)), lhs_dilation=(1, 2),
            rhs_dilation=(2, 1))
  out = cks_jax.conv_general_dilated(lhs, rhs, **kw)
  ref = lax.conv_general_dilated(np.ascontiguousarray(lhs), np.ascontiguousarray(rhs), **kw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-12, atol=1e-12)


def test_transposed_and_strided_values_inside_jit():
  # Transposes, strided slices and broadcasts feeding the kernel inside one
  # jit (XLA may fuse them into the operand or give another layout), and the
  # gradients flowing back through them.
  l, r = random((2, 9, 16, 4), np.float64, 0), random((3, 3, 5, 4), np.float64, 1)

  def make(conv):
    def f(l, r):
      lt = jnp.transpose(l, (0, 3, 2, 1))[:, :, ::2, 1:]          # N C W' H'
      rt = jnp.broadcast_to(jnp.transpose(r, (2, 3, 1, 0))[:, :, ::-1], (5, 4, 3, 3))
      return conv(lt, rt, (1, 2), [(1, 1), (2, 0)], (1, 2), (2, 1))
    return f
  f, g = make(cks_jax.conv_general_dilated), make(lax.conv_general_dilated)
  assert_close(jax.jit(f)(l, r), g(l, r), np.float64, "value")
  loss = lambda fn: (lambda l, r: jnp.sum(jnp.sin(fn(l, r))))
  for a, b in zip(jax.jit(jax.grad(loss(f), (0, 1)))(l, r), jax.grad(loss(g), (0, 1))(l, r)):
    assert_close(a, b, np.float64, "grad")


# ---------------------------------------------------------------- 64-bit indexing
S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("lhs,rhs,kw", [
    # lhs, rhs or output above 2^31 elements; one dimension above 2^31
    (S((2, 2**15, 2**15, 2), jnp.float32), S((3, 3, 2, 4), jnp.float32),
     dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    (S((1, 2**16, 4, 4), jnp.float32), S((2**16, 2**16, 1, 1), jnp.float32), {}),
    (S((1, 1, 2**16, 2**16), jnp.bfloat16), S((1, 1, 2, 2), jnp.bfloat16),
     dict(lhs_dilation=(2, 2), padding=((1, 1), (1, 1)))),
    (S((1, 2, 2**33), jnp.float64), S((2, 2, 5), jnp.float64), dict(rhs_dilation=(3,))),
    (S((3, 2, 2**12, 2**12, 2**8), jnp.float16), S((2, 2, 3, 3, 3), jnp.float16),
     dict(window_strides=(2, 1, 1))),
])
def test_beyond_int32_shapes_lower_forward_and_gradients(lhs, rhs, kw):
  # 64-bit indexing: shapes with more than 2^31 elements are accepted, their
  # shapes match lax's, and the value and both gradients lower to cks
  # kernels (never allocated here).
  nd = len(lhs.shape) - 2
  kw = dict(dict(window_strides=(1,) * nd, padding="SAME"), **kw)
  # backend "ffi": "auto" sends large narrow outputs to XLA on the CPU.
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, backend="ffi", **kw)
  out = jax.eval_shape(f, lhs, rhs)
  assert out.shape == jax.eval_shape(lambda l, r: lax.conv_general_dilated(l, r, **kw),
                                     lhs, rhs).shape
  assert max(np.prod(s.shape, dtype=object) for s in (lhs, rhs, out)) > 2**31
  grads = jax.grad(lambda l, r: jnp.sum(jnp.square(f(l, r).astype(jnp.float32))), (0, 1))
  text = jax.jit(grads).trace(lhs, rhs).lower(lowering_platforms=("cpu",)).as_text()
  assert text.count("cks_conv_cpu") == 3  # value and both transposes
  assert "convolution" not in text


def _conv1d_by_definition(lhs, rhs, s, lo, hi, a, d):
  """out[n, f, o] = sum_{c, k} lhs_dilated_padded[n, c, o*s + k*d] * rhs[f, c, k]
  with Python integers: exact for any parameter size."""
  n_in, k_sz = lhs.shape[-1], rhs.shape[-1]
  size = (0 if n_in == 0 else (n_in - 1) * a + 1) + lo + hi
  win = 0 if k_sz == 0 else (k_sz - 1) * d + 1
  n_out = 0 if size < win else (size - win) // s + 1
  out = np.zeros((lhs.shape[0], rhs.shape[0], n_out))
  for o in range(n_out):
    for k in range(k_sz):
      p = o * s + k * d - lo  # position in the dilated, unpadded input
      if p >= 0 and p % a == 0 and p // a < n_in:
        out[:, :, o] += lhs[:, :, p // a] @ rhs[:, :, k].T
  return out


@pytest.mark.parametrize("s,pad,a,d", [
    pytest.param(2**62, (0, 0), 2**62, 1, id="dilated_size_2e63"),
    # Regression (UBSan): ustride * u alone is 2^63 in trimmed_range.
    pytest.param(2**62, (2**62, 2**62), 1, 1, id="padded_size_2e63"),
    pytest.param(2**61, (2**61, 2**61 - 5), 2**61, 1, id="dilated_and_padded_2e62"),
    pytest.param(2**40, (2**40, 2**40), 2**40, 2**40, id="all_2e40"),
    pytest.param(2**62, (-(2**62), -(2**62) + 1), 2**62, 1, id="cropped_to_one_element"),
    pytest.param(2**62 - 1, (5, 5), 1, 2**62, id="dilated_kernel_2e62"),
    pytest.param(1, (0, 0), 1, 2**70, id="beyond_int64_empty_output"),
])
def test_huge_strides_dilations_and_padding_index_in_64_bits(s, pad, a, d):
  # Geometry whose intermediate sizes pass 2^62 or 2^63, with tiny tensors:
  # the result is the exact one (lax's int64 shape rule overflows on several).
  l, r = random((2, 3, 3), np.float64, 0), random((2, 3, 2), np.float64, 1)
  want = _conv1d_by_definition(np.asarray(l), np.asarray(r), s, *pad, a, d)
  kw = dict(window_strides=(s,), padding=(pad,), lhs_dilation=(a,), rhs_dilation=(d,))
  got = jax.jit(lambda l, r: cks_jax.conv_general_dilated(l, r, **kw))(l, r)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
  assert np.count_nonzero(want) or want.size == 0


def test_huge_lhs_dilation_with_coprime_stride_finishes(tmp_path):
  # Regression: phases() looped over all a/gcd(a, s) phases and a/gcd(a, d)
  # taps (a = 2^62, s = 3: it never returned). In a child process, so a
  # regression fails the test instead of hanging the suite.
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      jax.config.update("jax_enable_x64", True)
      import cks_jax
      kw = dict(window_strides=(3,), padding=((-(2**62), -(2**62) + 1),), lhs_dilation=(2**62,))
      l, r = jnp.arange(1.0, 4.0).reshape(1, 1, 3), jnp.ones((1, 1, 2))
      out = np.asarray(jax.jit(lambda l, r: cks_jax.conv_general_dilated(l, r, **kw))(l, r))
      assert out.tolist() == [[[2.0]]], out  # only element 1 is left after the crop
  """)
  try:
    subprocess.run([sys.executable, "-c", code], check=True, timeout=15, cwd=tmp_path)
  except subprocess.TimeoutExpired:
    pytest.fail("the kernel did not finish in 15 s")


def test_parameters_beyond_int64_are_rejected():
  # Non-empty outputs whose geometry the kernels cannot represent.
  l, r = jnp.ones((1, 1, 3)), jnp.ones((1, 1, 2))
  for kw in [dict(window_strides=(2**64,), padding="VALID"),
             dict(window_strides=(1,), padding=[(2**63, 0)]),
             dict(window_strides=(2**70,), padding=[(2**70, 2**70)]),
             dict(window_strides=(1,), padding="VALID", lhs_dilation=(2**70,))]:
    with pytest.raises((ValueError, OverflowError, TypeError)):
      jax.block_until_ready(jax.jit(lambda l, r: cks_jax.conv_general_dilated(l, r, **kw))(l, r))


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.int32, jnp.bool_,
                                   jnp.complex64, jnp.float8_e4m3fn, jnp.float8_e5m2,
                                   jnp.int4])
def test_unsupported_dtypes_raise_a_clear_error(dtype):
  l, r = jnp.zeros((1, 2, 4, 4), dtype), jnp.zeros((3, 2, 2, 2), dtype)
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "SAME")
  for call in (f, jax.jit(f)):
    with pytest.raises(TypeError, match=f"float32.*got {np.dtype(dtype).name}"):
      call(l, r)


def test_kernel_rejects_unsupported_dtype_custom_call():
  # Past the Python checks (a direct bind), the C++ handler refuses a dtype
  # combination it has no kernel for with an error, not a wrong read.
  from cks_jax._src import primitive
  params = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=(1, 1),
                rhs_dilation=(1, 1), dimension_numbers=lax.ConvDimensionNumbers(
                    (0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3)),
                feature_group_count=1, batch_group_count=1, precision=None, backend="ffi")
  for dtype, out_dtype in [(np.int32, np.int32), (np.float32, np.float16),
                           (np.float64, np.float32)]:
    l, r = jnp.ones((1, 2, 4, 4), dtype), jnp.ones((3, 2, 3, 3), dtype)
    with pytest.raises(Exception, match="unsupported dtype"):
      jax.block_until_ready(jax.jit(lambda l, r: primitive.bind(
          l, r, **params, out_dtype=np.dtype(out_dtype)))(l, r))
