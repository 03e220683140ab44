"""cks_jax.explain: algorithm, sub-problems and zeros avoided. On the CPU (on_cpu) also where
the default backend is a GPU; explain for "cuda" is in test_cuda."""
import jax
import numpy as np
import pytest

import cks_jax
from cks_jax._src import backends

pytestmark = pytest.mark.usefixtures("on_cpu")


def test_transposed_conv_stride2_k4():
  # DCGAN layer: 3/4 of the direct method's products hit inserted zeros.
  e = cks_jax.explain((16, 16, 16, 128), (4, 4, 128, 64), (1, 1), ((2, 2), (2, 2)), (2, 2),
                      dimension_numbers=("NHWC", "HWIO", "NHWC"), platform="cpu")
  assert e.algorithm == "KS-deconv" and e.backend == "cks-cpu"
  assert e.phases == 4
  assert e.shapes[2] == (16, 32, 32, 64)
  # Per dimension 62 real (output, tap) pairs: 2 per output, less one at
  # each border (brute-force count: 14 inputs x 4 taps + 2 x 3).
  assert e.cks_macs == 16 * 62**2 * 128 * 64
  assert e.direct_macs == 16 * (32 * 4) ** 2 * 128 * 64
  assert 0.75 < e.zeros_avoided < 0.77
  assert "KS-deconv" in str(e)


def test_dilated_conv():
  e = cks_jax.explain((8, 64, 64, 64), (3, 3, 64, 64), (1, 1), "SAME", rhs_dilation=(2, 2),
                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert e.algorithm == "Sk-dilated" and e.phases == 4


def test_valid_conv_has_nothing_to_avoid():
  e = cks_jax.explain((1, 3, 8, 8), (4, 3, 3, 3), (1, 1), "VALID")
  assert e.algorithm == "ConvV2" and e.subproblems == 1 and e.zeros_avoided == 0.0


def test_padding_zeros_avoided_exactly():
  # 1x1 map, 3x3 kernel, SAME: only the centre tap is real.
  e = cks_jax.explain((1, 4, 1, 1), (2, 4, 3, 3), (1, 1), "SAME")
  assert e.cks_macs == 4 * 2 and e.direct_macs == 9 * 4 * 2
  assert np.isclose(e.zeros_avoided, 8 / 9)


def test_gradients_are_explained():
  e = cks_jax.explain((2, 8, 8, 4), (4, 4, 4, 3), (2, 2), "SAME",
                      dimension_numbers=("NHWC", "HWIO", "NHWC"), gradients=True)
  names = [n for n, _ in e.gradients]
  assert names == ["d lhs", "d rhs"]
  d_lhs, d_rhs = e.gradients[0][1], e.gradients[1][1]
  assert d_lhs.algorithm == "KS-deconv"   # input gradient of a strided conv
  assert d_rhs.algorithm == "Sk-dilated"  # filter gradient: the cotangent is dilated
  assert d_lhs.shapes[2] == (2, 8, 8, 4) and d_rhs.shapes[2] == (4, 4, 4, 3)


def test_accepts_arrays_and_structs():
  a = jax.ShapeDtypeStruct((1, 2, 5), np.float32)
  e = cks_jax.explain(a, np.zeros((3, 2, 2), np.float32), (1,), "SAME")
  assert e.shapes == ((1, 2, 5), (3, 2, 2), (1, 3, 5))


def test_cpu_scratch_is_packed_panels_not_padded_copies():
  # DCGAN layer: 128 channels read innermost, so each phase's sub-kernel is
  # packed once (phase B): all of B, once, padded to whole 16-column panels.
  dn = ("NHWC", "HWIO", "NHWC")
  e = cks_jax.explain((16, 16, 16, 128), (4, 4, 128, 64), (1, 1), ((2, 2), (2, 2)), (2, 2),
                      dimension_numbers=dn, platform="cpu", backend="ffi", gradients=True)
  sc = e.scratch
  assert sc["packed_b"] == 4 * 4 * 128 * 64 * 4
  assert sc["widened"] == 0 and sc["threads"] >= 2
  assert sc["total"] == sc["packed_b"] + sc["threads"] * sc["per_thread"]
  assert 0 < sc["per_thread"] < 2**20
  zero_inserted_lhs = 16 * 31 * 31 * 128 * 4  # what a dilate-then-convolve would allocate
  out_bytes = 16 * 32 * 32 * 64 * 4
  assert sc["total"] < min(zero_inserted_lhs, out_bytes)
  for _, g in e.gradients:
    # Each thread of the pool has its own blocks: with CI's 2 cores (3 threads, the caller's
    # included) the whole scratch is under the output; on a 16-core machine the gradients'
    # 17 x 0.8 MB are not, so the bound counts at most 3 threads.
    assert g.scratch is not None
    threads = min(g.scratch["threads"], 3)
    assert g.scratch["packed_b"] + threads * g.scratch["per_thread"] < out_bytes
  assert "scratch:" in str(e)
  # The packed B (0.5 MB) is held between calls in whole 2 MB pages, and the summary says so.
  assert e.scratch["packed_b_page"] == 2 << 20  # the kernel's unit (scratch.h, HugePool::kPage)
  assert "packed B held in whole 2 MB pages: 2.00 MB" in str(e).splitlines()[4]
  # 16-bit operands: the kernel's float32 copies of them count too; of the output only on the
  # dot path, which writes float32 in place (the others round each output as they store it).
  # float16 always; bfloat16 where the pair path does not read them as they are.
  for dtype in (jax.numpy.float16, jax.numpy.bfloat16):
    b = cks_jax.explain((16, 16, 16, 128), (4, 4, 128, 64), (1, 1), ((2, 2), (2, 2)), (2, 2),
                        dimension_numbers=dn, platform="cpu", backend="ffi", dtype=dtype)
    if dtype == jax.numpy.bfloat16 and backends.cpu_bf16_pairs():
      # the phase B as bfloat16 pairs: half of float32's; no copies
      assert b.cpu_path == "bf16 pairs" and b.scratch["packed_b"] == 4 * 4 * 128 * 64 * 2
      assert b.scratch["widened"] == 0 and "float32 copies" not in str(b)
      assert b.scratch["total"] < out_bytes / 2
      continue
    assert b.cpu_path == "gemm"
    assert b.scratch["widened"] == 4 * (16 * 16 * 16 * 128 + 4 * 4 * 128 * 64)
    assert "float32 copies" in str(b)
  d = cks_jax.explain((3, 16, 16, 32), (3, 3, 32, 3), (1, 1), "SAME", dimension_numbers=dn,
                      platform="cpu", backend="ffi", dtype=jax.numpy.bfloat16)
  assert d.cpu_path == "dot"
  assert d.scratch["widened"] == 4 * (3 * 16 * 16 * 32 + 3 * 3 * 32 * 3 + 3 * 16 * 16 * 3)
  # Other backends: no kernel, no scratch to report.
  x = cks_jax.explain((16, 16, 16, 128), (4, 4, 128, 64), (1, 1), ((2, 2), (2, 2)), (2, 2),
                      dimension_numbers=dn, platform="cpu", backend="xla")
  assert x.scratch is None


@pytest.mark.skipif(backends.cpu_isa() != 2, reason="AVX-512 only: there the cotangent is read "
                    "in place as runs; the AVX2 and portable kernels pack it through an offset "
                    "per position (1.2 MB per thread here)")
def test_cpu_filter_gradient_scratch_has_no_table_per_cotangent_position():
  # U-Net's k2 s2 64->128 d-filter: a 32 KB output whose reduction runs over 4096 cotangent
  # positions per tap, in runs of 64 along the last dimension. Its tables hold an entry per
  # run, not per position: two 8-byte tables of every position are 64 KB a tap (and explain
  # counted them once per tap, 0.58 MB per thread in all, 18x the output).
  e = cks_jax.explain((8, 64, 64, 64), (2, 2, 64, 32), (1, 1), [(1, 1), (1, 1)], (2, 2),
                      dimension_numbers=("NHWC", "HWIO", "NHWC"), platform="cpu",
                      backend="ffi", gradients=True)
  d_rhs = dict(e.gradients)["d rhs"]
  assert d_rhs.cpu_path == "interleaved taps, fused" and d_rhs.scratch["packed_b"] == 0
  assert 0 < d_rhs.scratch["per_thread"] < 2 * 2**16


@pytest.mark.skipif(backends.cpu_isa() != 2, reason="AVX-512 only: the AVX2 kernel streams "
                    "outputs it writes in place anyway, and the portable kernel none")
def test_cpu_scratch_leaves_out_the_block_of_streamed_tiles():
  # U-Net's k2 s2 64->128 forward: a 16 MB output from one reduction block, rows aligned to a zmm,
  # so the AVX-512 kernel streams its tiles in place and no task holds a scratch block
  # (96 rows x 32 columns of float32); with features not innermost (NCHW) every task does.
  block = 96 * 32 * 4
  kw = dict(window_strides=(1, 1), padding=[(1, 1), (1, 1)], lhs_dilation=(2, 2),
            platform="cpu", backend="ffi")
  streamed = cks_jax.explain((8, 64, 64, 64), (2, 2, 64, 32),
                             dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)
  copied = cks_jax.explain((8, 64, 64, 64), (2, 2, 64, 32),
                           dimension_numbers=("NHWC", "HWIO", "NCHW"), **kw)
  assert streamed.scratch["per_thread"] < block <= copied.scratch["per_thread"]


def test_cpu_scratch_counts_the_pool_the_kernel_saw():
  # After a kernel call, the thread count is the intra-op pool's size as the
  # kernel read it from XLA (plus the calling thread), not a guess.
  from cks_jax._src import ffi
  x, w = jax.numpy.ones((2, 5, 5, 32)), jax.numpy.ones((3, 3, 32, 16))
  jax.block_until_ready(jax.jit(lambda a, b: cks_jax.conv_general_dilated(
      a, b, (1, 1), [(1, 1), (1, 1)], (2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      backend="ffi"))(x, w))
  seen = ffi.extension().cpu_pool_threads()
  assert seen >= 1
  e = cks_jax.explain(x.shape, w.shape, (1, 1), [(1, 1), (1, 1)], (2, 2),
                      dimension_numbers=("NHWC", "HWIO", "NHWC"), platform="cpu", backend="ffi")
  assert e.scratch["threads"] == seen + 1


def test_explain_takes_conv_general_dilateds_arguments():
  # The same positional arguments as conv_general_dilated (but out_sharding), precision and
  # preferred_element_type included; the output type reaches the explained primitive.
  import inspect
  ours = list(inspect.signature(cks_jax.explain).parameters)
  theirs = [p for p in inspect.signature(cks_jax.conv_general_dilated).parameters
            if p not in ("out_sharding", "backend")]
  assert ours[:len(theirs)] == theirs
  e = cks_jax.explain((2, 8, 8, 16), (3, 3, 16, 24), (1, 1), "SAME", None, None,
                      ("NHWC", "HWIO", "NHWC"), 1, 1, "highest", np.float32,
                      dtype=jax.numpy.bfloat16, platform="cpu", backend="ffi")
  assert e.params["out_dtype"] == np.float32 and e.params["precision"] is not None


def test_default_platform_follows_jax_default_device():
  # explain reports for where an uncommitted computation would run.
  from cks_jax._src import explain as ex
  args = ((2, 8, 8, 4), (3, 3, 4, 8), (1, 1), "SAME")
  kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for dev in (jax.devices("cpu")[0], "cpu"):
    with jax.default_device(dev):
      assert ex.default_platform() == "cpu"
      assert cks_jax.explain(*args, **kw).backend == "cks-cpu"
  with jax.default_device(None):
    assert ex.default_platform() == jax.default_backend()
