"""The CPU kernel's special paths (ffi/cpu/conv_cpu.cc), against lax, values and both VJPs.

- The narrow path (run_narrow): outputs with at most 8 features per group whose lhs batch is
  contiguous, vectorised over strips of the batch. It runs the filter gradient of a layer with
  few output channels (NHWC: the batch of that gradient is the layer's input channels). Tested
  around the strip boundaries (32 floats, 16 doubles: exact, overlapping last strip, tails).
  With two spatial dimensions or more and several sub-problems its taps are interleaved
  (run_narrow_taps), over chunks of the cotangent's rows.
- The phase B (pack_phase_b): with 16 or more channels per group read innermost, each phase's
  sub-kernel is packed once, and every trimmed sub-problem of that phase reads runs of it.
  Tested where sub-problems trim differently (small maps, big kernels, several phases,
  groups, 1D/3D, several column panels).
- Outputs over 8 MB are written with non-temporal stores where rows are aligned vectors.
- The GEMM's A sources (RunA, IndirectA, PackedA, and A packed where a strided conv's filter
  gradient would read it in place), B sources (packed panels, or read in place through an
  offset per index on AVX-512) and C destinations (the output itself, or a scratch block), and
  the portable and AVX2 kernels, selected with CKS_CPU_ISA in a subprocess.
- Filter gradients of large operands with the taps interleaved (run_taps). explain names each
  path (cpu_path) from the kernel's own code.
- The dot path (run_dot): outputs with at most 8 features per group whose lhs channels are
  contiguous, 16 or more per group (forwards of layers with few output channels), vectorised
  along the reduction. Tested around the vector tails (runs not a multiple of 16 floats or 8
  doubles), tile tails (rows not a multiple of a tile), every feature count's tile shape,
  groups, strides, 1D/3D, and sub-problems whose reduction is empty.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import cks_jax
from cks_jax._src import backends

from oracle import check, random

DN2 = ("NHWC", "HWIO", "NHWC")


def narrow_here(lhs_shape, rhs_shape, dtype, *args, **kw):
  """Whether explain (the Python mirror of CksConv::narrow) puts the d-rhs on the narrow path."""
  e = cks_jax.explain(jnp.zeros(lhs_shape, dtype), jnp.zeros(rhs_shape, dtype), *args,
                      gradients=True, platform="cpu", backend="ffi", **kw)
  return "narrow" in dict(e.gradients)["d rhs"].reason


def run_python(code, timeout=600, **env):
  """Runs `code` in a fresh Python with the environment variables `env` added (the kernel reads
  its CKS_CPU_* switches once per process) and returns its stdout's words; fails with its stderr
  if it fails. Run from tests/, so that the installed cks_jax is imported, not the source tree."""
  here = os.path.dirname(os.path.abspath(__file__))
  res = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "PYTHONPATH": here},
                       capture_output=True, text=True, cwd=here, timeout=timeout)
  assert res.returncode == 0, res.stderr[-3000:]
  return res.stdout.split()


def check_on_kernel(case, dtype, seed):
  """:func:`check` of one (lhs shape, rhs shape, conv args, kwargs) case on the FFI kernel,
  NHWC unless the kwargs say otherwise."""
  lhs_shape, rhs_shape, args, kw = case
  with cks_jax.use_backend("ffi"):
    check(lhs_shape, rhs_shape, *args, dtype=dtype, seed=seed,
          **{"dimension_numbers": DN2, **kw})


# (lhs shape, rhs shape, conv args, kwargs): the d-rhs of each runs on the narrow path.
CASES = [
    # transposed k4 s2 (DCGAN's last layer), exactly one strip of floats
    ((4, 6, 6, 32), (4, 4, 32, 3), ((1, 1), [(2, 2), (2, 2)], (2, 2)), {}),
    # an overlapping last strip (45 = 32 + 13) and one feature
    ((3, 7, 5, 45), (3, 3, 45, 1), ((1, 1), "SAME"), {}),
    # VALID: every tap has the same range, so each sub-problem has 9 positions
    ((2, 9, 9, 70), (3, 3, 70, 8), ((1, 1), "VALID"), {}),
    # stride and dilation (the Sk-dilated d-rhs) and 5 features
    ((2, 12, 11, 33), (3, 3, 33, 5), ((2, 2), [(1, 2), (0, 1)], (1, 1), (2, 1)), {}),
    # feature groups: the d-rhs is batch-grouped, 32 channels per group
    ((2, 8, 8, 64), (3, 3, 32, 4), ((1, 1), "SAME"), {"feature_group_count": 2}),
    # 1D (WaveNet-like, dilated) and 3D (a volumetric transposed conv)
    ((3, 40, 36), (3, 36, 2), ((1,), [(2, 2)], (1,), (2,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    ((1, 4, 4, 4, 34), (2, 2, 2, 34, 3), ((1, 1, 1), [(1, 1)] * 3, (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}),
    # long reductions, walked in blocks of 128 indices (kNarrowBlock): runs of
    # 299 taps cut into pieces (odd tail), and runs of 18-19 several to a block
    ((2, 301, 40), (3, 40, 2), ((1,), "VALID"), {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    ((2, 20, 19, 40), (3, 3, 40, 1), ((1, 1), "SAME"), {}),
    # padding wider than the input: six of the nine filter taps read only padding, so
    # their sub-problems have empty reductions (runs of length 0)
    ((2, 3, 40), (9, 40, 2), ((1,), [(5, 1)]), {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    # interleaved taps (run_narrow_taps): every sub-problem of a task over chunks of about
    # kNarrowChunk reduction indices of the densest: a 3x3 SAME d-rhs in 5 chunks, and a k4 s2
    # transposed one (16 sub-problems, taps stepping by 2) in 4, with an overlapping strip
    ((4, 40, 33, 40), (3, 3, 40, 2), ((1, 1), "SAME"), {}),
    ((8, 20, 20, 40), (4, 4, 40, 3), ((1, 1), [(2, 2), (2, 2)], (2, 2)), {}),
    # 32 sub-problems or more (kNarrowManyTaps): chunks of about kNarrowChunkL1 = 128
    # indices, FSRCNN's k9 s3 p4 op2 transposed d-rhs (81 sub-problems, 1 feature) and a
    # 7x7 SAME one (49, 5 features), each in 3-4 chunks, with an overlapping strip
    ((3, 12, 10, 40), (9, 9, 40, 1), ((1, 1), [(4, 6), (4, 6)], (3, 3)), {}),
    ((2, 17, 15, 45), (7, 7, 45, 5), ((1, 1), "SAME"), {}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_narrow_filter_gradient(case, dtype):
  lhs_shape, rhs_shape, args, kw = CASES[case]
  assert narrow_here(lhs_shape, rhs_shape, dtype, *args, **{"dimension_numbers": DN2, **kw})
  check_on_kernel(CASES[case], dtype, seed=case)


# (lhs shape, rhs shape, conv args, kwargs, taps as columns): narrow filter gradients whose last
# kernel dimension's taps run as the columns of one tile (CksConv::run_narrow_cols: 1-6 features
# on AVX-512, 1-3 on AVX2; cols_here), or not (then tap by tap).
COLS_CASES = [
    # 1 feature, 9 taps in one tile; 4 features, 3 taps (a tile of 3); transposed (lhs dilation,
    # a phase per tap) with uneven padding
    ((2, 11, 10, 33), (9, 9, 33, 1), ((1, 1), [(4, 6), (4, 6)], (3, 3)), {}, True),
    ((2, 9, 8, 33), (5, 3, 33, 4), ((1, 1), [(1, 3), (0, 2)], (2, 3)), {}, True),
    # a map smaller than the kernel: no input is read by every tap of a tile (no interior)
    ((2, 5, 4, 33), (7, 7, 33, 2), ((1, 1), "SAME"), {}, True),
    # 5 and 6 features: tiles of 2 taps (7 = 1 + 2 + 2 + 2), padding wider than the kernel
    ((2, 13, 11, 40), (7, 7, 40, 5), ((1, 1), "SAME"), {}, True),
    ((2, 9, 8, 33), (3, 3, 33, 6), ((1, 1), [(3, 3), (3, 3)]), {}, True),
    # 3-D: SAME, and a k4 s2 transposed one
    ((2, 5, 6, 7, 32), (3, 3, 3, 32, 2), ((1, 1, 1), "SAME"),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}, True),
    ((1, 4, 5, 6, 40), (4, 4, 4, 40, 1), ((1, 1, 1), [(2, 2)] * 3, (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}, True),
    # tap by tap: rhs dilation (the taps read every other input), 7 features (no tile of 2),
    # a channels-first output (the cotangent's features not innermost)
    ((2, 9, 8, 33), (3, 3, 33, 2), ((1, 1), "SAME", (1, 1), (2, 2)), {}, False),
    ((2, 9, 8, 33), (3, 3, 33, 7), ((1, 1), "SAME"), {}, False),
    ((2, 9, 8, 33), (3, 3, 33, 2), ((1, 1), "SAME"), {"dimension_numbers": ("NHWC", "HWIO", "NCHW")},
     False),
]


def cols_here(features):
  """Whether this CPU's kernel has a taps-as-columns tile for this many features."""
  return features <= {2: 6, 1: 3}.get(backends.cpu_isa(), 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(COLS_CASES)))
def test_narrow_taps_as_columns(case, dtype):
  lhs_shape, rhs_shape, args, kw, cols = COLS_CASES[case]
  e, g = case_paths(COLS_CASES[case], dtype)
  want = "narrow, taps as columns" if cols and cols_here(rhs_shape[-1]) else "narrow"
  assert g["d rhs"].cpu_path == want, str(e)
  check_on_kernel(COLS_CASES[case][:4], dtype, seed=740 + case)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_filter_gradient_16bit(dtype):
  lhs_shape, rhs_shape, args, kw = CASES[1]
  assert narrow_here(lhs_shape, rhs_shape, dtype, *args, dimension_numbers=DN2)
  with cks_jax.use_backend("ffi"):
    check(lhs_shape, rhs_shape, *args, dtype=dtype, dimension_numbers=DN2, **kw)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_narrow_forward_with_batch_last(dtype):
  # A forward pass whose lhs is laid out batch-last ("HWCN"): the narrow path
  # directly, at an odd batch (37 floats / 37 doubles: strips + overlap).
  kw = {"dimension_numbers": ("HWCN", "HWIO", "NHWC")}
  args = ((1, 1), "SAME")
  e = cks_jax.explain(jnp.zeros((6, 5, 9, 37), dtype), jnp.zeros((3, 3, 9, 2), dtype), *args,
                      platform="cpu", backend="ffi", **kw)
  assert "narrow" in e.reason
  with cks_jax.use_backend("ffi"):
    check((6, 5, 9, 37), (3, 3, 9, 2), *args, dtype=dtype, **kw)


def test_narrow_needs_a_full_strip():
  # Fewer batch entries than one strip or more than 8 features: the ordinary
  # GEMM path (no narrow claim), still correct. 16-bit inputs reach the kernel
  # widened to float32 (by the kernel: RunConv), so they take float32's strips.
  p = lambda fgc=1, bgc=1, dn=(0, 3, 1, 2): {
      "dimension_numbers": (dn, (3, 2, 0, 1), (0, 3, 1, 2)),
      "feature_group_count": fgc, "batch_group_count": bgc}
  hwcn = (3, 2, 0, 1)  # HWCN: the lhs batch is the last (contiguous) dimension
  assert backends.kernel_narrow(p(dn=hwcn), (5, 5, 9, 32), (3, 3, 9, 3), np.float32)
  assert backends.kernel_narrow(p(dn=hwcn), (5, 5, 9, 16), (3, 3, 9, 3), np.float64)
  assert not backends.kernel_narrow(p(dn=hwcn), (5, 5, 9, 31), (3, 3, 9, 3), np.float32)
  assert backends.kernel_narrow(p(dn=hwcn), (5, 5, 9, 32), (3, 3, 9, 3), jnp.bfloat16)
  assert not backends.kernel_narrow(p(dn=hwcn), (5, 5, 9, 31), (3, 3, 9, 3), jnp.float16)
  assert not backends.kernel_narrow(p(dn=hwcn), (5, 5, 9, 32), (3, 3, 9, 9), np.float32)
  assert not backends.kernel_narrow(p(dn=hwcn, bgc=2), (5, 5, 9, 32), (3, 3, 9, 4), np.float32)
  assert not backends.kernel_narrow(p(), (32, 5, 5, 9), (3, 3, 9, 3), np.float32)  # NHWC
  with cks_jax.use_backend("ffi"):
    check((5, 5, 9, 31), (3, 3, 9, 3), (1, 1), "SAME", dtype=np.float32,
          dimension_numbers=("HWCN", "HWIO", "NHWC"))


# (lhs shape, rhs shape, conv args, kwargs) with >= 16 channels per group: the phase B.
PHASE_B_CASES = [
    # transposed k4 s2 on a 3x3 map: 4 phases, every output trims differently; 40 features
    # (two AVX-512 panels plus a partial one)
    ((2, 3, 3, 48), (4, 4, 48, 40), ((1, 1), [(2, 2), (2, 2)], (2, 2)), {}),
    # a 7x7 kernel on a 5x5 map: 25 sub-problems of one phase, runs of 3-7 taps
    ((3, 5, 5, 32), (7, 7, 32, 17), ((1, 1), [(3, 3), (3, 3)]), {}),
    # strided, dilated, grouped (2 x 32 channels), asymmetric padding
    ((2, 9, 10, 64), (3, 3, 32, 6), ((2, 1), [(2, 0), (1, 3)], (1, 1), (2, 3)),
     {"feature_group_count": 2}),
    # k8 s4 transposed 1D, and a 3D transposed conv
    ((2, 5, 33), (8, 33, 9), ((1,), [(5, 5)], (4,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    ((1, 3, 3, 3, 32), (3, 3, 3, 32, 4), ((1, 1, 1), [(1, 2)] * 3, (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}),
    # an OIHW kernel (neither its features nor its channels contiguous: B packed element by
    # element), strided, 20 features (a partial panel); its d-input's kernel likewise
    ((2, 9, 9, 40), (20, 40, 3, 3), ((2, 2), "SAME"),
     {"dimension_numbers": ("NHWC", "OIHW", "NHWC")}),
    # 3x3 SAME: the untrimmed sub-problem's three runs (120 indices each) are one
    # reduction block (kKCPhase = 1152); with 160 channels two runs of 480 are, the third
    # not; with 400 channels each run of 1200 is cut, its second block starting mid-run
    ((2, 10, 9, 40), (3, 3, 40, 20), ((1, 1), "SAME"), {}),
    ((2, 7, 8, 160), (3, 3, 160, 16), ((1, 1), "SAME"), {}),
    ((1, 5, 6, 400), (3, 3, 400, 24), ((1, 1), "SAME"), {}),
    # 16 to 31 channels: 16 (the floor, kPhaseBMinC), grouped 2 x 18 with 20 features, and
    # the k8 s4 head's d-input (21 channels, its forward's features) with 24 features
    ((2, 9, 9, 16), (3, 3, 16, 24), ((1, 1), "SAME"), {}),
    ((2, 6, 7, 36), (4, 4, 18, 40), ((1, 1), [(2, 2), (2, 2)], (2, 2)),
     {"feature_group_count": 2}),
    ((2, 18, 18, 21), (8, 8, 21, 24), ((4, 4), [(2, 2), (2, 2)]), {}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(PHASE_B_CASES)))
def test_phase_b(case, dtype):
  check_on_kernel(PHASE_B_CASES[case], dtype, seed=10 + case)


# (lhs shape, rhs shape, conv args, kwargs): bfloat16 forwards (and, with an even number of at
# least 16 features, input gradients) on the pair path: the phase-B cases with an even number of
# channels per group, and its own edges.
def per_group(case, dim):
  """Channels ("I") or features ("O") per group of a case's kernel."""
  _, rhs_shape, _, kw = case
  return rhs_shape[kw.get("dimension_numbers", DN2)[1].index(dim)] // (
      1 if dim == "I" else kw.get("feature_group_count", 1))


# (not the phase-B cases with at most 8 features per group: the dot path takes those)
PAIRS_CASES = [c for c in PHASE_B_CASES if per_group(c, "I") % 2 == 0 and per_group(c, "O") > 8] + [
    # 130 features: tiles of 4, then 1 panel (2 columns live), over two column blocks (kNC)
    ((2, 5, 7, 34), (3, 3, 34, 130), ((1, 1), "VALID"), {}),
    # runs of 2 taps x 600 channels, longer than a reduction block (kKCPhase = 1152): blocks
    # start mid-run; the trimmed sub-problems' runs of 600 are blocks of their own
    ((1, 4, 5, 600), (2, 2, 600, 32), ((1, 1), [(1, 0), (0, 1)]), {}),
    # U-Net's k2 s2 transposed layer: one tap per phase, phases run as task units; 38 rows
    # per phase (not a multiple of the 6-row tile)
    ((2, 1, 19, 64), (2, 2, 64, 32), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}),
    # dilated 1D (WaveNet-like)
    ((2, 50, 64), (2, 64, 64), ((1,), [(8, 0)], (1,), (8,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    # an NCHW output: the forward's float32 block is copied out, not stored by the kernel; the
    # d-input (its lhs, the cotangent, has strided channels) stays widened; the d-rhs's
    # cotangent has its features strided (B packed element by element)
    ((2, 6, 7, 34), (3, 3, 34, 48), ((1, 1), "SAME"),
     {"dimension_numbers": ("NHWC", "HWIO", "NCHW")}),
    # strided and dilated, 33 features: an odd number, so the d-input stays widened; the d-rhs
    # packs pairs (two panels, one live column in the second)
    ((3, 5, 6, 40), (3, 3, 40, 33), ((2, 1), [(1, 2), (1, 1)], (1, 2)), {}),
    # AMX's edges (amx_block): reduction blocks ending past a multiple of 32 (220 and 8: a last
    # chunk of B copied with zeros), row blocks of 36 and 96 (a last partial 16-row tile), 3
    # panels (a 2-panel tile and a 1-panel one)
    ((2, 12, 13, 96), (3, 3, 96, 48), ((1, 1), "SAME", (1, 1), (2, 2)), {}),
    # phases of 20 outputs a row and 64-channel runs: 16-row tiles read in place from the input
    ((1, 3, 40, 64), (3, 3, 64, 32), ((1, 1), "SAME", (1, 1), (2, 2)), {}),
    # an NCHW output: whole 16-row tiles stored straight into the float32 block
    ((2, 10, 10, 64), (3, 3, 64, 64), ((1, 1), "SAME"),
     {"dimension_numbers": ("NHWC", "HWIO", "NCHW")}),
]


def case_paths(case, dtype=jnp.bfloat16, **extra):
  """explain() of a (lhs shape, rhs shape, conv args, kwargs) case on the CPU kernel, NHWC unless
  the kwargs say otherwise, and its gradients' explanations by name ("d lhs", "d rhs")."""
  lhs_shape, rhs_shape, args, kw = case[:4]
  e = cks_jax.explain(jnp.zeros(lhs_shape, dtype), jnp.zeros(rhs_shape, dtype), *args,
                      gradients=True, platform="cpu", backend="ffi",
                      **{"dimension_numbers": DN2, **kw, **extra})
  return e, dict(e.gradients)


@pytest.mark.skipif(not backends.cpu_bf16_pairs(), reason="needs AVX-512F and AVX512_BF16 (and "
                    "no CKS_CPU_ISA cap): elsewhere bfloat16 runs widened to float32, as "
                    "test_dtypes and the 16-bit cases here test")
@pytest.mark.parametrize("case", range(len(PAIRS_CASES)))
def test_bf16_pairs(case):
  e, g = case_paths(PAIRS_CASES[case])
  assert e.cpu_path == "bf16 pairs" and e.scratch["widened"] == 0, str(e)
  assert "AVX512_BF16" in e.reason and "widened" not in e.reason
  assert ("AMX-BF16" in e.reason) == backends.cpu_bf16_amx(), e.reason
  features = per_group(PAIRS_CASES[case], "O")  # the d-input's channels per group
  # The d-input is on the pair path where it has the same shape of problem; the d-rhs (its
  # reduction runs over positions, channels outer) packs pairs where it has >= 16 features and
  # >= 64 rows (input channels per group)
  out_spec = PAIRS_CASES[case][3].get("dimension_numbers", DN2)[2]
  on_pairs = features % 2 == 0 and features >= 16 and out_spec.endswith("C")
  assert (g["d lhs"].cpu_path == "bf16 pairs") == on_pairs, str(g["d lhs"])
  packed = g["d rhs"].cpu_path == "bf16 packed pairs"
  assert packed == (features >= 16 and per_group(PAIRS_CASES[case], "I") >= 64)
  assert (g["d rhs"].scratch["widened"] == 0) == packed
  check_on_kernel(PAIRS_CASES[case], jnp.bfloat16, seed=200 + case)


# (lhs shape, rhs shape, conv args, kwargs): bfloat16 filter gradients on the packed pair path
# (>= 16 features and >= 64 input channels per group) whose forwards are not on the pair path.
PACKED_PAIRS_CASES = [
    # 65 rows (odd: 11 tiles, the last with one live row) and an odd reduction (3 x 5 x 7
    # positions per tap): pairs straddle runs and the last is half empty; 16 features (one panel)
    ((3, 5, 7, 65), (3, 3, 65, 16), ((1, 1), "SAME"), {}),
    # a long reduction (blocks of kKC) over 2 x 40 x 40 positions, 96 + 4 rows (two row blocks)
    ((2, 40, 40, 100), (2, 2, 100, 20), ((2, 2), "VALID"), {}),
    # k4 s2 transposed with 3D volumes, and a grouped one (16 features per group)
    ((2, 3, 4, 3, 64), (4, 4, 4, 64, 24), ((1, 1, 1), [(2, 2)] * 3, (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}),
    ((2, 6, 6, 128), (4, 4, 64, 32), ((1, 1), [(2, 2), (2, 2)], (2, 2)),
     {"feature_group_count": 2}),
    # a strided filter gradient with several taps per sub-problem, so that a task's rows
    # (channel, tap) are packed in memory order (segments of channels): 72 channels x 4 taps
    # (row blocks of 96 cut the channels), 20 features (a second panel with 4 live columns);
    # and 65 channels with a 3x3 s2 window and 48 features (three panels)
    ((2, 12, 12, 72), (4, 4, 72, 20), ((2, 2), [(1, 1), (1, 1)]), {}),
    ((2, 13, 11, 65), (3, 3, 65, 48), ((2, 2), [(1, 1), (1, 1)]), {}),
]


@pytest.mark.skipif(not backends.cpu_bf16_pairs(), reason="needs AVX-512F and AVX512_BF16")
@pytest.mark.parametrize("case", range(len(PACKED_PAIRS_CASES)))
def test_bf16_packed_pairs(case):
  e, g = case_paths(PACKED_PAIRS_CASES[case])
  assert g["d rhs"].cpu_path == "bf16 packed pairs" and g["d rhs"].scratch["widened"] == 0
  assert "packed as pairs" in g["d rhs"].reason
  check_on_kernel(PACKED_PAIRS_CASES[case], jnp.bfloat16, seed=400 + case)


@pytest.mark.skipif(not backends.cpu_bf16_pairs(), reason="needs AVX-512F and AVX512_BF16")
def test_bf16_packed_pairs_interleaved_taps():
  # Operands of at least 12 MB of bfloat16 (6.4 M elements): the d-rhs runs its 9 taps chunk by
  # chunk, each into its own float32 block. 48 features (tiles of two panels and of one).
  case = ((14, 64, 64, 64), (3, 3, 64, 48), ((1, 1), "SAME"), {})
  g = case_paths(case)[1]
  assert g["d rhs"].cpu_path == "bf16 packed pairs, interleaved taps", str(g["d rhs"])
  assert g["d rhs"].scratch["widened"] == 0
  check_on_kernel(case, jnp.bfloat16, seed=410)


# (lhs shape, rhs shape, conv args, kwargs): bfloat16 outputs of the widened path. On AVX2
# (gemm_isa 1) the tiles round their float32 sums as they store them (gemm::RoundC) where the
# reduction is one block and B comes packed; elsewhere a float32 block is rounded as it is
# copied out (convert::from_float). Either way the output is the float32 one rounded.
ROUNDED_CASES = [
    # U-Net's k2 s2 transposed layer: 38 rows per phase (a partial 6-row tile), 2 whole panels
    ((2, 1, 19, 64), (2, 2, 64, 32), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}),
    # k4 s2 transposed, 21 features: a whole panel, then a half one with 5 live columns
    ((2, 5, 7, 16), (4, 4, 16, 21), ((1, 1), [(2, 2), (2, 2)], (2, 2)), {}),
    # 2 groups of 24 features (a panel and a half panel each, the second group's columns
    # offset in the output row)
    ((2, 6, 5, 32), (3, 3, 16, 48), ((1, 1), "SAME"), {"feature_group_count": 2}),
    # dilated 1-D (WaveNet-like): trimmed sub-problems, runs of 64 channels
    ((2, 50, 64), (2, 64, 64), ((1,), [(8, 0)], (1,), (8,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    # runs of 2 taps x 600 channels: the untrimmed sub-problem's two reduction blocks go through a
    # float32 block rounded on the way out, the trimmed ones' single block is rounded as stored
    ((1, 4, 5, 600), (2, 2, 600, 32), ((1, 1), [(1, 0), (0, 1)]), {}),
    # an NCHW output (features strided): a float32 block copied out element by element
    ((2, 6, 7, 34), (3, 3, 34, 48), ((1, 1), "SAME"),
     {"dimension_numbers": ("NHWC", "HWIO", "NCHW")}),
]


def bf16_output_is_rounded_f32(case, seed):
  """The kernel's bfloat16 output of a case, NaN included, bit for bit its float32 output
  (preferred_element_type: the same sums) rounded to nearest even."""
  lhs_shape, rhs_shape, args, kw = case
  kw = {"dimension_numbers": DN2, **kw}
  rng = np.random.default_rng(seed)
  l = rng.standard_normal(lhs_shape).astype(np.float32)
  l.reshape(-1)[l.size // 3] = np.nan
  l, r = jnp.asarray(l, jnp.bfloat16), jnp.asarray(rng.standard_normal(rhs_shape), jnp.bfloat16)
  f = lambda pet: jax.jit(lambda l, r: cks_jax.conv_general_dilated(
      l, r, *args, preferred_element_type=pet, backend="ffi", **kw))
  b16, f32 = np.asarray(f(None)(l, r)), np.asarray(f(np.float32)(l, r))
  assert b16.dtype == jnp.bfloat16 and np.isnan(f32).any() and not np.isnan(f32).all()
  np.testing.assert_array_equal(b16.view(np.uint16), f32.astype(jnp.bfloat16).view(np.uint16))


@pytest.mark.parametrize("case", range(len(ROUNDED_CASES)))
def test_bf16_output_rounded(case):
  bf16_output_is_rounded_f32(ROUNDED_CASES[case], seed=500 + case)


@pytest.mark.skipif(backends.cpu_isa() != 2, reason="the machine's own kernels are the AVX2 ones "
                    "or the portable ones: test_bf16_output_rounded runs them")
def test_bf16_output_rounded_on_avx2():
  # On AVX-512 machines, the AVX2 kernel's rounding tiles (CKS_CPU_ISA=1, read once per process)
  code = textwrap.dedent("""
      import test_kernel_paths as k
      for i, c in enumerate(k.ROUNDED_CASES):
        k.bf16_output_is_rounded_f32(c, seed=500 + i)
      print("ok", len(k.ROUNDED_CASES))
  """)
  assert run_python(code, timeout=600, CKS_CPU_ISA="1")[-2:] == ["ok", str(len(ROUNDED_CASES))]


@pytest.mark.skipif(not backends.cpu_bf16_pairs(), reason="needs AVX-512F and AVX512_BF16")
def test_bf16_pairs_edges():
  # float32 output (preferred_element_type): the float32 block copied out unrounded
  lhs_shape, rhs_shape, args, kw = PAIRS_CASES[0]
  e = case_paths(PAIRS_CASES[0], preferred_element_type=np.float32)[0]
  assert e.params["out_dtype"] == np.float32
  assert e.cpu_path == "bf16 pairs" and e.scratch["widened"] == 0
  with cks_jax.use_backend("ffi"):
    check(lhs_shape, rhs_shape, *args, dtype=jnp.bfloat16, seed=90,
          preferred_element_type=np.float32, **{"dimension_numbers": DN2, **kw})
  # A bfloat16 output is the float32 one rounded to nearest even, NaN kept (the kernel rounds
  # 16 lanes at a time as it stores them): bit for bit
  rng = np.random.default_rng(93)
  l = rng.standard_normal(lhs_shape).astype(np.float32)
  l[0, 1, 2, 3] = np.nan
  l, r = jnp.asarray(l, jnp.bfloat16), jnp.asarray(rng.standard_normal(rhs_shape), jnp.bfloat16)
  f = lambda pet: jax.jit(lambda l, r: cks_jax.conv_general_dilated(
      l, r, *args, preferred_element_type=pet, backend="ffi", **{"dimension_numbers": DN2, **kw}))
  b16, f32 = np.asarray(f(None)(l, r)), np.asarray(f(np.float32)(l, r))
  assert b16.dtype == jnp.bfloat16 and np.isnan(f32).any() and not np.isnan(f32).all()
  np.testing.assert_array_equal(b16.view(np.uint16), f32.astype(jnp.bfloat16).view(np.uint16))
  # A filter gradient with 32 rows (input channels) stays widened (row-vectorised there)
  g = case_paths(((2, 8, 8, 32), (3, 3, 32, 32), ((1, 1), "SAME"), {}))[1]
  assert g["d rhs"].cpu_path != "bf16 packed pairs" and g["d rhs"].scratch["widened"] > 0
  # Not on it: an odd number of channels (a pair would straddle two taps), fewer than 16, and
  # float16 (no pair instruction): widened, the GEMM path
  for lhs_shape, rhs_shape, dtype in (((2, 6, 6, 33), (3, 3, 33, 32), jnp.bfloat16),
                                      ((2, 6, 6, 14), (3, 3, 14, 32), jnp.bfloat16),
                                      ((2, 6, 6, 32), (3, 3, 32, 32), jnp.float16)):
    case = (lhs_shape, rhs_shape, ((1, 1), "SAME"), {})
    e = case_paths(case, dtype)[0]
    assert e.cpu_path == "gemm" and e.scratch["widened"] > 0 and "widened" in e.reason, str(e)
    check_on_kernel(case, dtype, seed=91)


@pytest.mark.skipif(not backends.cpu_bf16_pairs(), reason="needs AVX-512F and AVX512_BF16")
def test_bf16_pairs_can_be_turned_off():
  # CKS_CPU_BF16_PAIRS=0 (read once per process, so in a subprocess) runs bfloat16 widened.
  code = textwrap.dedent("""
      import jax
      jax.config.update("jax_enable_x64", True)
      import jax.numpy as jnp, test_kernel_paths as k
      from cks_jax._src import backends
      assert not backends.cpu_bf16_pairs()
      case = k.PAIRS_CASES[0]
      e = k.case_paths(case)[0]
      assert e.cpu_path == "gemm" and e.scratch["widened"] > 0, str(e)
      k.check_on_kernel(case, jnp.bfloat16, seed=92)
      print("ok")
  """)
  assert run_python(code, CKS_CPU_BF16_PAIRS="0")[-1] == "ok"


@pytest.mark.skipif(not backends.cpu_bf16_amx(), reason="needs AMX-BF16 (Sapphire Rapids or "
                    "later, tile state granted by Linux): elsewhere the pair tests above run "
                    "the vdpbf16ps kernel")
def test_bf16_pairs_without_amx():
  # On an AMX machine the pair tests above run amx_block; CKS_CPU_AMX=0 (read once per process,
  # so in a subprocess) runs the same cases on the vdpbf16ps tiles, so both stay tested here.
  code = textwrap.dedent("""
      import jax
      jax.config.update("jax_enable_x64", True)
      import jax.numpy as jnp, test_kernel_paths as k
      from cks_jax._src import backends
      assert backends.cpu_bf16_pairs() and not backends.cpu_bf16_amx()
      for i, case in enumerate(k.PAIRS_CASES + k.PACKED_PAIRS_CASES):
        e, g = k.case_paths(case)
        assert "AMX-BF16" not in e.reason + g["d rhs"].reason, e.reason
        k.check_on_kernel(case, jnp.bfloat16, seed=500 + i)
      print("ok")
  """)
  assert run_python(code, CKS_CPU_AMX="0")[-1] == "ok"


def test_large_output_written_with_streaming_stores():
  # An output over kStreamOutBytes (8 MB) is written with non-temporal stores
  # where its rows are whole aligned vectors (32 features here), else copied.
  with cks_jax.use_backend("ffi"):
    check((8, 64, 64, 16), (2, 2, 16, 32), (1, 1), [(1, 1), (1, 1)], (2, 2), dtype=np.float32,
          dimension_numbers=DN2, grads=False)
    check((8, 64, 64, 16), (2, 2, 16, 40), (1, 1), [(1, 1), (1, 1)], (2, 2), dtype=np.float32,
          dimension_numbers=DN2, grads=False)


# Transposed convs whose kernel equals their stride: every phase reads the same input rows, so
# the float32 kernel on AVX-512 runs all phases as one GEMM (fuses_phases) where the output is
# over 2 MB and written in place with streaming stores, with at most 32 features: 32 features x 4
# phases (4-panel tiles spanning two phases); 16 features x 8 phases of a 3D layer (panels of
# one feature block each, 2 x 16^3 rows: edge tiles); 1D k3 s3, 32 features x 3 phases (tiles
# of 4 panels and 2). Not fused: phases that read different rows (k2 s2 with no padding: one
# phase reads input u, the other u + 1); 48 features; 2 MB exactly (not streamed).
FUSED_CASES = [
    ((3, 64, 64, 32), (2, 2, 32, 32), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}, True),
    ((2, 16, 16, 16, 40), (2, 2, 2, 40, 16), ((1, 1, 1), [(1, 1)] * 3, (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}, True),
    ((8, 4096, 32), (3, 32, 32), ((1,), [(2, 2)], (3,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}, True),
    ((3, 64, 64, 32), (2, 2, 32, 32), ((1, 1), [(0, 0), (0, 0)], (2, 2)), {}, False),
    ((2, 64, 64, 32), (2, 2, 32, 48), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}, False),
    ((2, 64, 64, 32), (2, 2, 32, 16), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}, False),
]


@pytest.mark.parametrize("case", range(len(FUSED_CASES)))
def test_fused_phases(case):
  fused = FUSED_CASES[case][-1]
  e = case_paths(FUSED_CASES[case], np.float32)[0]
  if backends.cpu_isa() == 2:  # the path is taken on AVX-512 only (measured there)
    assert e.cpu_path == ("gemm, phases fused" if fused else "gemm"), str(e)
  else:
    assert e.cpu_path == "gemm", str(e)
  check_on_kernel(FUSED_CASES[case][:4], np.float32, seed=700 + case)


@pytest.mark.skipif(backends.cpu_isa() != 2, reason="phases are fused on AVX-512 only")
def test_fused_phases_same_bits(tmp_path):
  # Fused or not, every output element is the same sum in the same order: the fused GEMM's
  # values equal, bit for bit, those of the AVX2 kernel (CKS_CPU_ISA=1, in a subprocess), which
  # runs each phase as its own GEMM (and gives the AVX-512 kernel's bits on unfused problems).
  code = textwrap.dedent(f"""
      import numpy as np, cks_jax, test_kernel_paths as k
      from oracle import random
      for i in (0, 2):
        lhs_shape, rhs_shape, args, kw, _ = k.FUSED_CASES[i]
        kw = {{"dimension_numbers": k.DN2, **kw}}
        out = cks_jax.conv_general_dilated(random(lhs_shape, np.float32, i),
                                           random(rhs_shape, np.float32, i + 1), *args,
                                           backend="ffi", **kw)
        np.save(r"{tmp_path}/avx2_%d.npy" % i, np.asarray(out))
      print("ok")
  """)
  assert run_python(code, CKS_CPU_ISA="1")[-1] == "ok"
  for i in (0, 2):
    lhs_shape, rhs_shape, args, kw, fused = FUSED_CASES[i]
    kw = {"dimension_numbers": DN2, **kw}
    assert fused
    out = cks_jax.conv_general_dilated(random(lhs_shape, np.float32, i),
                                       random(rhs_shape, np.float32, i + 1), *args,
                                       backend="ffi", **kw)
    np.testing.assert_array_equal(np.asarray(out), np.load(tmp_path / f"avx2_{i}.npy"))


# (lhs shape, rhs shape, conv args, kwargs): forwards and input gradients whose column tiles
# have at most two panels, which the AVX-512 kernel runs 12 rows at a time from a packed B
# (gemm.h, kTallTiles): whole 12-row tiles, a last tile of 6 rows (row blocks of 6 mod 12) and
# edge tiles past the last row; 16, 21 (a panel and a half), 32 and 40 (two, then a half)
# features, float64's 8-wide panels the same at half the width.
TALL_CASES = [
    ((2, 6, 11, 24), (3, 3, 24, 16), ((1, 1), "SAME"), {}),
    ((1, 7, 13, 20), (3, 3, 20, 21), ((1, 1), "SAME"), {}),
    ((2, 5, 5, 12), (4, 4, 12, 32), ((1, 1), [(2, 2), (2, 2)], (2, 2)), {}),
    ((3, 4, 5, 64), (3, 3, 16, 40), ((1, 1), "SAME"), {"feature_group_count": 4}),
]


def _tall_outputs(dtype: str) -> list:
  """Forward and input gradient of each TALL_CASES case, as numpy arrays (the filter gradients
  take other paths, some of them AVX-512 only)."""
  from oracle import random
  outs = []
  for i, (lhs_shape, rhs_shape, args, kw) in enumerate(TALL_CASES):
    kw = {"dimension_numbers": DN2, **kw}
    x, w = random(lhs_shape, dtype, 800 + i), random(rhs_shape, dtype, 900 + i)
    y, vjp = jax.vjp(lambda x, w: cks_jax.conv_general_dilated(x, w, *args, backend="ffi",
                                                               **kw), x, w)
    outs += [np.asarray(y), np.asarray(vjp(random(y.shape, dtype, 1000 + i))[0])]
  return outs


@pytest.mark.skipif(backends.cpu_isa() != 2, reason="the 12-row tiles are AVX-512 tiles")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tall_tiles_same_bits(tmp_path, dtype):
  # A 12-row tile sums each element in the order of a 6-row one: the AVX-512 kernel's values
  # with 12-row tiles (CKS_CPU_TALL_TILES=1; GCC builds) and with 6-row ones (=0; Zen 4's
  # default) equal, bit for bit, the AVX2 kernel's (CKS_CPU_ISA=1: 6-row tiles) and this
  # process's (the machine's default), and lax's within tolerance. Each setting is read once
  # per process: subprocesses.
  runs = {"avx2": {"CKS_CPU_ISA": "1"}, "tall": {"CKS_CPU_TALL_TILES": "1"},
          "short": {"CKS_CPU_TALL_TILES": "0"}}
  for name, env in runs.items():
    code = textwrap.dedent(f"""
        import jax
        jax.config.update("jax_enable_x64", True)
        import numpy as np, test_kernel_paths as k
        np.savez(r"{tmp_path}/{name}.npz", *k._tall_outputs("{dtype}"))
        print("ok")
    """)
    assert run_python(code, **env)[-1] == "ok"
  outs = _tall_outputs(dtype)  # (conftest enables float64)
  for name in runs:
    other = np.load(tmp_path / f"{name}.npz")
    assert len(outs) == len(other.files) == 2 * len(TALL_CASES)
    for i, out in enumerate(outs):
      np.testing.assert_array_equal(out, other[f"arr_{i}"], err_msg=f"output {i} ({name})")
  for i, case in enumerate(TALL_CASES):
    check_on_kernel(case, np.dtype(dtype).type, seed=1100 + i)


# (lhs shape, rhs shape, conv args, kwargs): grouped forwards and input gradients with enough row
# blocks (96 rows) that each block runs all its groups in turn on one thread (conv_cpu.cc,
# groups_unit): a transposed k4 s2 layer (4 groups, 16 sub-problems of different rows, as the
# bench's grouped layer), a 3x3 (3 groups, uneven padding), a 1-D one of 2 groups and 24 features.
GROUP_UNIT_CASES = [
    ((4, 12, 12, 64), (4, 4, 16, 32), ((1, 1), [(2, 2), (2, 2)], (2, 2)),
     {"feature_group_count": 4}),
    ((4, 17, 15, 24), (3, 3, 8, 48), ((1, 1), [(2, 0), (1, 1)]), {"feature_group_count": 3}),
    ((5, 300, 32), (3, 16, 24), ((1,), "SAME"),
     {"feature_group_count": 2, "dimension_numbers": ("NWC", "WIO", "NWC")}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16])
@pytest.mark.parametrize("case", range(len(GROUP_UNIT_CASES)))
def test_grouped_row_blocks_run_every_group_in_turn(case, dtype):
  lhs_shape, rhs_shape, args, kw = GROUP_UNIT_CASES[case]
  # Enough rows per group (output positions) for 8 row blocks: the unit on 2 workers.
  rows = int(np.prod(lhs_shape[:-1])) * (4 if len(args) > 2 else 1)
  assert rows >= 8 * 96 and kw["feature_group_count"] > 1
  check_on_kernel(GROUP_UNIT_CASES[case], dtype, seed=1200 + case)


# (lhs shape, rhs shape, conv args, kwargs, fused): forwards whose adjacent last-dimension phases
# read the same input rows, run as one GEMM of m x Fg columns where that saves panels
# (CksConv::fuses_columns; every ISA, float32).
COLUMN_CASES = [
    # k8 s4 p2 head, 21 features: phases 0-1 and 2-3 of each dimension, 42 of 48 columns; edge
    # sub-problems trimmed to one tap
    ((3, 8, 8, 64), (8, 8, 64, 21), ((1, 1), [(5, 5), (5, 5)], (4, 4)), {}, True),
    # k16 s8, 17 features: runs of 4 phases (68 columns, across 5 panels)
    ((2, 5, 6, 40), (16, 16, 40, 17), ((1, 1), [(11, 11), (11, 11)], (8, 8)), {}, True),
    # k9 s3 p4 op2, 20 features: phases 0-1 fused (40 columns), phase 2 alone
    ((2, 7, 9, 40), (9, 9, 40, 20), ((1, 1), [(4, 6), (4, 6)], (3, 3)), {}, True),
    # 1-D k8 s4, and 3-D with the last dimension's k8 s4 only, 21 features
    ((3, 10, 64), (8, 64, 21), ((1,), [(5, 5)], (4,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}, True),
    ((2, 4, 5, 6, 32), (4, 4, 8, 32, 21), ((1, 1, 1), [(3, 3), (3, 3), (5, 5)], (2, 2, 4)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}, True),
    # k64 s32 (FCN-32s), 21 classes: runs of 16 phases, 336 columns (two column blocks)
    ((1, 3, 4, 32), (64, 64, 32, 21), ((1, 1), [(47, 47), (47, 47)], (32, 32)), {}, True),
    # not fused: 32 features (no panel saved), 10 features on k9 s3 (2 x 10 pads to 32 either
    # way), 2 feature groups, features not innermost in the output, k4 s2 (phases read
    # different rows)
    ((3, 8, 8, 64), (8, 8, 64, 32), ((1, 1), [(5, 5), (5, 5)], (4, 4)), {}, False),
    ((2, 7, 9, 40), (9, 9, 40, 10), ((1, 1), [(4, 6), (4, 6)], (3, 3)), {}, False),
    ((3, 8, 8, 64), (8, 8, 32, 42), ((1, 1), [(5, 5), (5, 5)], (4, 4)),
     {"feature_group_count": 2}, False),
    ((3, 8, 8, 64), (8, 8, 64, 21), ((1, 1), [(5, 5), (5, 5)], (4, 4)),
     {"dimension_numbers": ("NHWC", "HWIO", "NCHW")}, False),
    ((3, 8, 8, 64), (4, 4, 64, 21), ((1, 1), [(2, 2), (2, 2)], (2, 2)), {}, False),
]


@pytest.mark.parametrize("case", range(len(COLUMN_CASES)))
def test_fused_columns(case):
  fused = COLUMN_CASES[case][-1]
  e = case_paths(COLUMN_CASES[case], np.float32)[0]
  assert e.cpu_path == ("gemm, adjacent phases fused" if fused else "gemm"), str(e)
  check_on_kernel(COLUMN_CASES[case][:4], np.float32, seed=740 + case)


@pytest.mark.parametrize("case", [0, 3])
def test_fused_columns_16bit(case):
  # float16 runs widened: the float32 kernel on float32 copies, each output rounded as the
  # block of fused columns is copied out
  e = case_paths(COLUMN_CASES[case], jnp.float16)[0]
  assert COLUMN_CASES[case][-1] and e.cpu_path == "gemm, adjacent phases fused", str(e)
  check_on_kernel(COLUMN_CASES[case][:4], jnp.float16, seed=760 + case)


def test_fused_columns_same_bits():
  # Every output element is the same sum in the same order as on the unfused GEMM, which the
  # same conv takes with its output's features not innermost (NCHW): equal bit for bit.
  for i in range(6):
    lhs_shape, rhs_shape, args, kw, fused = COLUMN_CASES[i]
    assert fused
    nd = len(lhs_shape) - 2
    lhs_spec, rhs_spec, out_spec = kw.get("dimension_numbers", DN2)
    planar = "NC" + out_spec[1:-1]
    lhs, rhs = random(lhs_shape, np.float32, i), random(rhs_shape, np.float32, i + 1)
    run = lambda out: np.asarray(cks_jax.conv_general_dilated(
        lhs, rhs, *args, dimension_numbers=(lhs_spec, rhs_spec, out), backend="ffi"))
    e = cks_jax.explain(lhs, rhs, *args, dimension_numbers=(lhs_spec, rhs_spec, planar),
                        platform="cpu", backend="ffi")
    assert e.cpu_path == "gemm", str(e)
    np.testing.assert_array_equal(run(out_spec), np.moveaxis(run(planar), 1, nd + 1))


# (lhs shape, rhs shape, conv args, kwargs, fused): filter gradients on the interleaved-taps path
# whose taps are fused into one GEMM on AVX-512 (CksConv::fused_taps), or not.
FUSED_TAP_CASES = [
    # U-Net's k2 s2 up-sampling, 32 features: 2 groups of 2 taps, 64 columns each
    ((2, 64, 64, 64), (2, 2, 64, 32), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}, True),
    # 16 features (groups of 32 columns), 20 input channels (rows: a partial MR tile; with 32
    # or more the row-vectorised path takes 16 features)
    ((5, 64, 64, 20), (2, 2, 20, 16), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}, True),
    # 3-D k2 s2, 16 features: 4 groups of 2 taps
    ((1, 32, 32, 32, 8), (2, 2, 2, 8, 16), ((1, 1, 1), [(1, 1)] * 3, (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}, True),
    # not fused: 48 features (96 columns a pair), 2 feature groups, a k4 s2 kernel (taps of a
    # phase read different input rows)
    ((2, 64, 64, 48), (2, 2, 48, 48), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}, False),
    ((2, 64, 64, 64), (2, 2, 32, 64), ((1, 1), [(1, 1), (1, 1)], (2, 2)),
     {"feature_group_count": 2}, False),
    ((2, 64, 64, 64), (4, 4, 64, 32), ((1, 1), [(2, 2), (2, 2)], (2, 2)), {}, False),
]


@pytest.mark.parametrize("case", range(len(FUSED_TAP_CASES)))
def test_fused_taps(case):
  fused = FUSED_TAP_CASES[case][-1]
  e, g = case_paths(FUSED_TAP_CASES[case], np.float32)
  d_rhs = g["d rhs"]
  if backends.cpu_isa() == 2:  # the taps are fused on AVX-512 only (B read in place there)
    assert d_rhs.cpu_path == ("interleaved taps, fused" if fused else "interleaved taps"), str(e)
  else:
    assert d_rhs.cpu_path == "interleaved taps", str(e)
  check_on_kernel(FUSED_TAP_CASES[case][:4], np.float32, seed=720 + case)


def test_interleaved_many_taps_with_big_l2():
  # A 7x7 SAME filter gradient on an 8x8 map, 49 taps, 1 MB of operands: interleaved
  # (run_taps) where a core's L2 is 2 MB or more (CksConv::big_l2), else one GEMM per tap.
  case = ((32, 8, 8, 64), (7, 7, 64, 64), ((1, 1), "SAME"), {})
  e, g = case_paths(case, np.float32)
  # the kernel's own source of the size: glibc's sysconf, as getconf prints it
  got = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True)
  l2 = int(got.stdout.strip() or 0) if got.returncode == 0 and got.stdout.strip().isdigit() else 0
  want = "interleaved taps" if l2 >= 2 << 20 else "gemm"
  assert g["d rhs"].cpu_path == want, (l2, str(e))
  check_on_kernel(case, np.float32, seed=731)


def fused_tap_d_rhs(i):
  """The filter gradient of FUSED_TAP_CASES[i] on the FFI kernel, from seeded operands."""
  lhs_shape, rhs_shape, args, kw, _ = FUSED_TAP_CASES[i]
  kw = {"dimension_numbers": DN2, **kw}
  lhs = random(lhs_shape, np.float32, i)
  out, vjp = jax.vjp(lambda w: cks_jax.conv_general_dilated(lhs, w, *args, backend="ffi", **kw),
                     random(rhs_shape, np.float32, i + 1))
  return np.asarray(vjp(random(out.shape, np.float32, i + 2))[0])


@pytest.mark.skipif(backends.cpu_isa() != 2, reason="taps are fused on AVX-512 only")
def test_fused_taps_same_bits(tmp_path):
  # As test_fused_phases_same_bits: the fused filter gradient equals, bit for bit, that of the
  # AVX2 kernel (CKS_CPU_ISA=1, in a subprocess), which runs each tap as its own GEMM.
  code = textwrap.dedent(f"""
      import numpy as np, test_kernel_paths as k
      for i in (0, 2):
        np.save(r"{tmp_path}/avx2_%d.npy" % i, k.fused_tap_d_rhs(i))
      print("ok")
  """)
  assert run_python(code, CKS_CPU_ISA="1")[-1] == "ok"
  for i in (0, 2):
    assert FUSED_TAP_CASES[i][-1]
    np.testing.assert_array_equal(fused_tap_d_rhs(i), np.load(tmp_path / f"avx2_{i}.npy"))


# (lhs shape, rhs shape, conv args, kwargs) for the GEMM path's A and B sources and C destinations:
# A read in place as long runs (RunA) or through an offset per index (IndirectA), or packed
# (PackedA); the product written straight into the output (OutC, masked at the row and column
# edges) or through a scratch block (BufC).
GEMM_CASES = [
    # 100 channels: runs of 100 cut by the 256-index reduction blocks; 21 features (a partial
    # column panel); 7 x 7 positions (a partial row tile); 3 reduction blocks add into the output
    ((2, 7, 7, 100), (3, 3, 100, 21), ((1, 1), "SAME"), {}),
    # 112 features: AVX-512 column tiles of 4, 2 and 1 panels (float; double: 4, 4, 4, 2)
    ((2, 6, 7, 40), (3, 3, 40, 112), ((1, 1), "SAME"), {}),
    # channels-first input: neither its channels nor its batch is contiguous (packed A)
    ((2, 40, 9, 8), (3, 3, 40, 19), ((1, 1), "SAME"),
     {"dimension_numbers": ("NCHW", "HWIO", "NHWC")}),
    # 300 features: two column blocks (256 + 44), feature groups offsetting the output columns
    ((1, 5, 6, 24), (3, 3, 12, 600), ((1, 1), "SAME"), {"feature_group_count": 2}),
    # 3 channels: runs too short to walk (an offset per index); 5 features
    ((3, 9, 8, 3), (3, 3, 3, 5), ((1, 1), "SAME"), {}),
    # lhs dilation 3, kernel 2: phases without taps, whose outputs are all zero
    ((2, 4, 5, 16), (2, 2, 16, 9), ((1, 1), [(1, 1), (1, 1)], (3, 3)), {}),
    # k2 s2 transposed (U-Net up-sampling): one tap per phase
    ((2, 6, 6, 40), (2, 2, 40, 24), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}),
    # features not contiguous (NCHW output): through the scratch block
    ((2, 8, 7, 12), (3, 3, 12, 20), ((1, 1), "SAME"),
     {"dimension_numbers": ("NHWC", "HWIO", "NCHW")}),
    # 1D dilated with a long kernel: runs of the taps for the filter gradient
    ((3, 50, 16), (5, 16, 18), ((1,), [(4, 4)], (1,), (2,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    # filter gradients whose runs of 20 (16) taps continue one another in the
    # input and are walked as one run of 480 (512), cut by the reduction blocks:
    # every phase of a k2 s2 transposed conv, the untrimmed taps of a SAME 3x3
    ((2, 12, 20, 40), (2, 2, 40, 24), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}),
    ((2, 16, 16, 24), (3, 3, 24, 16), ((1, 1), "SAME"), {}),
    # stride 2, 130 features: the filter gradient's A (rows: the 100 input channels, two row
    # blocks) is packed, not read in place (packs_strided_a); 300 reduction indices per tap
    ((3, 20, 20, 100), (3, 3, 100, 130), ((2, 2), "SAME"), {}),
    # the same, 35 outputs wide: A would be read as runs of 35 positions, and is packed too
    ((1, 8, 70, 100), (3, 3, 100, 130), ((2, 2), "SAME"), {}),
    # outputs over 2 MB (kStreamTilesBytes) from one reduction block, rows aligned to a zmm:
    # the GEMM writes its whole tiles in place with streaming stores (AVX2 and AVX-512); 80
    # features: AVX-512 tiles of 4 panels and 1, and 3 x 39 x 39 rows per phase (edge tiles)
    ((3, 64, 64, 16), (2, 2, 16, 32), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}),
    ((3, 39, 39, 16), (2, 2, 16, 80), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}),
    # AVX-512 half-panel tiles (a last panel with at most 8 live float columns): 8 features
    # written in place over two reduction blocks (the half alone); 72 features (4 panels and a
    # half); 21 features, as in the first case, take a panel and a half
    ((2, 9, 10, 12), (5, 5, 12, 8), ((1, 1), "SAME"), {}),
    ((2, 6, 7, 20), (3, 3, 20, 72), ((1, 1), "SAME"), {}),
    # 33-63 features, written in place on AVX-512 too (tiles of 2 panels and the rest, none of 4
    # past the live columns): 40 over 4 reduction blocks, 7 x 7 positions (edge tiles); 56 from
    # a one-channel input through a k9 s3 window (FSRCNN's input gradient), one block
    ((2, 7, 7, 100), (3, 3, 100, 40), ((1, 1), "SAME"), {}),
    ((2, 20, 20, 1), (9, 9, 1, 56), ((3, 3), [(4, 4), (4, 4)]), {}),
    # filter gradients with whole panels of contiguous features read B (the cotangent) in
    # place on AVX-512, through an offset per index (TableB): 2 groups of 320 features (column
    # blocks of 256 + 64, the group offsetting B), runs of 12 positions (too short to walk),
    # 432 reduction indices per tap (two blocks); the k2 s2 case above packs B for float (24
    # features: a partial panel) and reads it through the table for double (runs of 20)...
    ((3, 12, 12, 40), (3, 3, 20, 640), ((1, 1), "SAME"), {"feature_group_count": 2}),
    # ... or as runs (RunB) where they are at least 32 positions long: 1D with 48 features, runs
    # of 298-300 (900 indices per tap), and a stride-2 filter gradient whose A is packed
    # (packs_strided_a), 144 features, runs of 32-33 positions cut by the reduction blocks
    ((3, 300, 16), (3, 16, 48), ((1,), [(2, 2)], (1,), (2,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    ((2, 66, 66, 24), (3, 3, 24, 144), ((2, 2), "SAME"), {}),
    # blocks of two panels (17-32 float features: the AVX-512 12-row two-panel tiles): 3-D
    # dilated 3x3x3 (d2) with 32 and 24 features, 343 rows per sub-problem (B packed once and
    # shared), and a 2-D SAME 3x3 with 20 features (a partial second panel)
    ((1, 14, 14, 14, 16), (3, 3, 3, 16, 32), ((1, 1, 1), [(2, 2)] * 3, (1, 1, 1), (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}),
    ((1, 14, 14, 14, 16), (3, 3, 3, 16, 24), ((1, 1, 1), [(2, 2)] * 3, (1, 1, 1), (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}),
    ((2, 8, 10, 40), (3, 3, 40, 20), ((1, 1), "SAME"), {}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(GEMM_CASES)))
def test_gemm_sources_and_destinations(case, dtype):
  check_on_kernel(GEMM_CASES[case], dtype, seed=20 + case)


# Filter gradients whose input and cotangent together reach 6 MB (kTapsMinBytes), with at most
# 16 sub-problems and 8 or more chunks of rows: every task runs all taps on one chunk of the
# cotangent before the next (run_taps), into one output block per tap.
TAPS_CASES = [
    # 3x3 SAME, 100 input channels (rows cut into MR-aligned blocks of unequal length), 136
    # features (a partial column panel; more than the row-vectorised path takes); 9
    # sub-problems trimmed differently
    ((8, 48, 48, 100), (3, 3, 100, 136), ((1, 1), "SAME"), {}),
    # 1D dilated (WaveNet-like), padding that trims the edge taps
    ((4, 3000, 96), (3, 96, 40), ((1,), [(4, 4)], (1,), (4,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    # k4 s2 transposed (KS-deconv) with 2 feature groups: 16 sub-problems whose taps step by 2
    ((24, 16, 16, 128), (4, 4, 64, 64), ((1, 1), [(2, 2), (2, 2)], (2, 2)),
     {"feature_group_count": 2}),
    # 1D k4 s2 transposed (vocoder up-sampling), 48 features: two taps per residue class of the
    # cotangent's positions, whose chunks (packed once for both on AVX2: packs_taps_b) cut the
    # taps' runs (a batch entry's positions, several entries' where they continue) in the middle
    ((4, 3000, 64), (4, 64, 48), ((1,), [(2, 2)], (2,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(TAPS_CASES)))
def test_interleaved_taps(case, dtype):
  check_on_kernel(TAPS_CASES[case], dtype, seed=40 + case)


# Interleaved-tap filter gradients of at most 32 features (2 NR): on AVX2 (float32) the tasks
# split the sub-problems, each task then every row and column of its taps (CksConv::tap_tasks;
# AVX-512 too, for those it keeps on the interleaved taps: not the 2 groups of 20 features,
# row-vectorised there); float64 splits rows.
# test_narrower_kernels runs them on AVX2 on every x86-64 machine (CKS_CPU_ISA=1).
TAPS_SPLIT_CASES = [
    # k2 s2 transposed (U-Net's up-sampling), 32 features: two whole panels, 4 sub-problems
    ((4, 48, 48, 72), (2, 2, 72, 32), ((1, 1), [(1, 1), (1, 1)], (2, 2)), {}),
    # 3x3 SAME, 2 groups of 20 features (a partial second panel), 9 sub-problems of unequal
    # work (one group of 20 takes the row-vectorised path, on AVX2 too)
    ((8, 40, 40, 128), (3, 3, 64, 40), ((1, 1), "SAME"), {"feature_group_count": 2}),
    # k4 s2 transposed, 28 features (24 take the row-vectorised path): 16 sub-problems over 2
    # tasks
    ((6, 40, 40, 96), (4, 4, 96, 28), ((1, 1), [(2, 2), (2, 2)], (2, 2)), {}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(TAPS_SPLIT_CASES)))
def test_interleaved_taps_split(case, dtype):
  if backends.cpu_isa() == 1:  # AVX-512 may take the row-vectorised or fused paths instead
    e, g = case_paths(TAPS_SPLIT_CASES[case], dtype)
    assert g["d rhs"].cpu_path == "interleaved taps", str(e)
  check_on_kernel(TAPS_SPLIT_CASES[case], dtype, seed=60 + case)


# Filter gradients with more than 8 features that the row-vectorised path takes on AVX-512
# (CksConv::wide_rows): the narrow kernel in feature tiles of at most 8, of equal width (20
# features: 7 + 7 + 6), its taps interleaved over chunks of the cotangent (run_narrow_taps).
# On AVX2 it takes those of one group with at most 24 features, or 32 without lhs dilation
# (WIDE_AVX2), in tiles of at most 6 (21: 6 + 6 + 6 + 3).
WIDE_CASES = [
    # 3x3 SAME, 21 features (tiles 7 + 7 + 7), 70 channels (two strips and an overlapping
    # third), 1600 reduction indices per tap (two chunks; more on cores with 2 MB of L2)
    ((4, 20, 20, 70), (3, 3, 70, 21), ((1, 1), "SAME"), {}),
    # k4 s2 strided (a DCGAN discriminator layer), 40 features
    ((4, 16, 16, 40), (4, 4, 40, 40), ((2, 2), [(1, 1), (1, 1)]), {}),
    # the same with 72 features and 48 channels: A and B take 1056 bytes per reduction index, so
    # chunks of 496 indices (CksConv::narrow_chunk; 128 on cores with 2 MB of L2) and 1024 per
    # tap: three chunks (eight), cut inside batch entries
    ((4, 32, 32, 48), (4, 4, 48, 72), ((2, 2), [(1, 1), (1, 1)]), {}),
    # k4 s2 transposed with 2 feature groups of 20 features: lhs dilation, few features
    ((6, 8, 8, 128), (4, 4, 64, 40), ((1, 1), [(2, 2), (2, 2)], (2, 2)),
     {"feature_group_count": 2}),
    # 3D dilated 3x3x3 (d2), 24 features
    ((1, 8, 8, 8, 36), (3, 3, 3, 36, 24), ((1, 1, 1), [(2, 2)] * 3, (1, 1, 1), (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}),
    # within AVX2's limits too: k8 s4 transposed (the segmentation head's shape), 21 features
    # (tiles 6 + 6 + 6 + 3); without lhs dilation, 2-D with 32 features and 3x3x3 with 30
    # (tiles 6 x 5)
    ((4, 4, 4, 40), (8, 8, 40, 21), ((1, 1), [(5, 5), (5, 5)], (4, 4)), {}),
    ((4, 12, 12, 33), (3, 3, 33, 32), ((1, 1), "SAME"), {}),
    ((1, 7, 6, 8, 32), (3, 3, 3, 32, 30), ((1, 1, 1), "SAME"),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}),
]
# The WIDE_CASES the AVX2 kernel takes row-vectorised (not: 40 and 72 features, 2 groups).
WIDE_AVX2 = [0, 4, 5, 6, 7]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(WIDE_CASES)))
def test_row_vectorised_filter_gradient(case, dtype):
  if backends.cpu_isa() == 1:
    e, g = case_paths(WIDE_CASES[case], dtype)
    want = "row-vectorised" if case in WIDE_AVX2 else ("gemm", "interleaved taps")
    assert g["d rhs"].cpu_path in want, str(e)
  check_on_kernel(WIDE_CASES[case], dtype, seed=80 + case)


def test_interleaved_taps_16bit():
  # bfloat16 operands, widened to float32 by the kernel (as every 16-bit conv on the CPU):
  # the float32 operands are what reach kTapsMinBytes
  lhs_shape, rhs_shape, args, kw = TAPS_CASES[0]
  check_on_kernel(((16,) + lhs_shape[1:], rhs_shape, args, kw), jnp.bfloat16, seed=50)


def dot_here(lhs_shape, rhs_shape, dtype, *args, **kw):
  """Whether explain (the Python mirror of CksConv::dot) puts the forward on the dot path."""
  e = cks_jax.explain(jnp.zeros(lhs_shape, dtype), jnp.zeros(rhs_shape, dtype), *args,
                      platform="cpu", backend="ffi", **kw)
  return "dot path" in e.reason


# (lhs shape, rhs shape, conv args, kwargs): the forward of each runs on the dot path.
DOT_CASES = [
    # DCGAN's last layer (k4 s2 transposed, 3 features): runs of 2 taps x 32 channels (whole
    # vectors); 189 rows per phase, not a multiple of the 8-row tile
    ((3, 9, 7, 32), (4, 4, 32, 3), ((1, 1), [(2, 2), (2, 2)], (2, 2)), {}),
    # FSRCNN-like: 1 feature, k9 s3; runs of 3 taps x 20 channels (tails of 12 floats, 4 doubles)
    ((2, 8, 8, 20), (9, 9, 20, 1), ((1, 1), [(4, 6), (4, 6)], (3, 3)), {}),
    # 8 features (the most), 17 channels (a tail of 1), SAME
    ((3, 7, 9, 17), (3, 3, 17, 8), ((1, 1), "SAME"), {}),
    # 2 feature groups of 24 channels and 5 features
    ((2, 7, 9, 48), (3, 3, 24, 10), ((1, 1), "SAME"), {"feature_group_count": 2}),
    # window strides, 4 features, 16 channels (the fewest the path takes)
    ((2, 11, 11, 16), (3, 3, 16, 4), ((2, 2), "SAME"), {}),
    # 1D dilated (WaveNet-like) with 2 features, and 3D transposed with 7 and 6 features
    ((3, 40, 36), (3, 36, 2), ((1,), [(2, 2)], (1,), (2,)),
     {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    ((1, 4, 4, 4, 34), (2, 2, 2, 34, 7), ((1, 1, 1), [(1, 1)] * 3, (2, 2, 2)),
     {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}),
    # padding wider than the input: sub-problems with empty reductions (outputs all zero)
    ((2, 3, 40), (9, 40, 6), ((1,), [(5, 1)]), {"dimension_numbers": ("NWC", "WIO", "NWC")}),
    # more rows than one task (4 x 96): tasks of several row blocks, 1200 rows
    ((3, 20, 20, 24), (3, 3, 24, 1), ((1, 1), "SAME"), {}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(DOT_CASES)))
def test_dot_forward(case, dtype):
  lhs_shape, rhs_shape, args, kw = DOT_CASES[case]
  assert dot_here(lhs_shape, rhs_shape, dtype, *args, **{"dimension_numbers": DN2, **kw})
  check_on_kernel(DOT_CASES[case], dtype, seed=60 + case)


def test_dot_forward_16bit():
  # bfloat16 operands run widened to float32 in the kernel, so they take the dot path too
  lhs_shape, rhs_shape, args, kw = DOT_CASES[0]
  assert dot_here(lhs_shape, rhs_shape, jnp.bfloat16, *args, dimension_numbers=DN2)
  check_on_kernel(DOT_CASES[0], jnp.bfloat16, seed=70)


def test_dot_path_bounds():
  # kernel_dot mirrors CksConv::dot(): at most 8 features and at least 16 channels per
  # group, channels contiguous, float operands, and not the narrow path.
  p = lambda fgc=1, dn=(0, 3, 1, 2): {
      "dimension_numbers": (dn, (3, 2, 0, 1), (0, 3, 1, 2)),
      "feature_group_count": fgc, "batch_group_count": 1}
  assert backends.kernel_dot(p(), (2, 5, 5, 16), (3, 3, 16, 8), np.float32)
  assert not backends.kernel_dot(p(), (2, 5, 5, 16), (3, 3, 16, 9), np.float32)
  assert not backends.kernel_dot(p(), (2, 5, 5, 15), (3, 3, 15, 8), np.float32)
  assert backends.kernel_dot(p(fgc=2), (2, 5, 5, 32), (3, 3, 16, 16), np.float64)
  assert not backends.kernel_dot(p(fgc=2), (2, 5, 5, 30), (3, 3, 15, 16), np.float32)
  assert backends.kernel_dot(p(), (2, 5, 5, 16), (3, 3, 16, 1), jnp.float16)
  assert not backends.kernel_dot(p(), (2, 5, 5, 16), (3, 3, 16, 1), np.int32)
  assert not backends.kernel_dot(p(dn=(0, 1, 2, 3)), (2, 16, 5, 5), (3, 3, 16, 1), np.float32)
  # batch last and contiguous (>= one strip): the narrow path, not the dot path
  hwcn = (3, 2, 0, 1)
  assert not backends.kernel_dot(p(dn=hwcn), (5, 5, 16, 32), (3, 3, 16, 3), np.float32)
  # A forward with fewer than 16 channels: the GEMM path, still correct
  case = ((2, 6, 6, 8), (3, 3, 8, 2), ((1, 1), "SAME"), {})
  assert not dot_here(case[0], case[1], np.float32, *case[2], dimension_numbers=DN2)
  check_on_kernel(case, np.float32, seed=71)


def depthwise_paths(lhs_shape, rhs_shape, dtype, *args, **kw):
  """explain's cpu_path of the forward and both gradients (the kernel's own CksConv::path),
  each checked against the Python mirror (kernel_depthwise) through explain's reason."""
  e = cks_jax.explain(jnp.zeros(lhs_shape, dtype), jnp.zeros(rhs_shape, dtype), *args,
                      gradients=True, platform="cpu", backend="ffi", **kw)
  out = []
  for x in (e,) + tuple(g for _, g in e.gradients):
    on_path = x.cpu_path in ("depthwise", "bf16 depthwise")
    assert on_path == ("depthwise path" in x.reason), (x.cpu_path, x.reason)
    out.append(x.cpu_path)
  return out


# (lhs shape, rhs shape, conv args, kwargs): depthwise convolutions (one input channel and one
# output feature per group, as many groups as channels). The forward, the input gradient and
# the filter gradient (batch groups of one entry) all run on the depthwise path, vectorised over
# the groups in blocks of 2 vectors; a sub-problem's rows run four at a time, its last rows % 4
# one at a time (depthwise.h), four rows of a stride-1 undilated forward as sliding windows.
DW_CASES = [
    # 3x3 SAME, 16 channels (one AVX-512 vector of floats, two of doubles); 9 x 11 maps: the
    # interior's 126 rows end in a tail of 2
    ((2, 9, 11, 16), (3, 3, 1, 16), ((1, 1), "SAME"), {"feature_group_count": 16}),
    # 40 channels (a vector block of 32 and a masked tail of 8) and window strides
    ((2, 9, 11, 40), (3, 3, 1, 40), ((2, 2), "SAME"), {"feature_group_count": 40}),
    # dilated 3x3 (DeepLab's depthwise atrous), 70 channels: blocks of 32, 32 and 6
    ((2, 9, 11, 70), (3, 3, 1, 70), ((1, 1), [(2, 2), (2, 2)], (1, 1), (2, 2)),
     {"feature_group_count": 70}),
    # transposed k4 s2 (lhs dilation: four phases), 24 channels
    ((2, 7, 6, 24), (4, 4, 1, 24), ((1, 1), [(2, 2), (2, 2)], (2, 2)),
     {"feature_group_count": 24}),
    # 7x7 SAME (ConvNeXt's), 33 channels, 2 x 12 x 12 rows: several row blocks of 64 per
    # sub-problem, filter gradient taps with long reductions
    ((2, 12, 12, 33), (7, 7, 1, 33), ((1, 1), "SAME"), {"feature_group_count": 33}),
    # 1D k5 with 8 channels (the fewest groups the path takes)
    ((3, 17, 8), (5, 1, 8), ((1,), "SAME"), {"feature_group_count": 8,
                                             "dimension_numbers": ("NWC", "WIO", "NWC")}),
    # 3D 3x3x3
    ((1, 5, 6, 7, 33), (3, 3, 3, 1, 33), ((1, 1, 1), "SAME"),
     {"feature_group_count": 33, "dimension_numbers": ("NDHWC", "DHWIO", "NDHWC")}),
    # an output over 8 MB (8.7 MB in float32), written with non-temporal stores (AVX-512)
    ((8, 66, 64, 64), (3, 3, 1, 64), ((1, 1), "SAME"), {"feature_group_count": 64}),
    # 7x7 SAME on 10 x 20 maps: the interior's spans of 14 rows run as eight sliding rows,
    # four, then eight rows across the span's end (AVX-512; rows<4, 1> elsewhere)
    ((2, 10, 20, 33), (7, 7, 1, 33), ((1, 1), "SAME"), {"feature_group_count": 33}),
    # padding wider than the input: sub-problems with no taps (outputs all zero)
    ((2, 3, 3, 16), (5, 5, 1, 16), ((1, 1), [(4, 4), (4, 4)]), {"feature_group_count": 16}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(DW_CASES)))
def test_depthwise(case, dtype):
  lhs_shape, rhs_shape, args, kw = DW_CASES[case]
  kw = {"dimension_numbers": DN2, **kw}
  assert depthwise_paths(lhs_shape, rhs_shape, dtype, *args, **kw) == ["depthwise"] * 3
  check_on_kernel(DW_CASES[case], dtype, seed=80 + case)


def test_depthwise_16bit():
  # float16 operands run widened to float32, the output written in float32 and rounded after;
  # bfloat16 ones too, unless the CPU has AVX-512BW/VL: then the kernel reads them in place
  # (widened in registers, a bfloat16 output rounded as it is stored), with no float32 copies
  for dtype in (jnp.bfloat16, jnp.float16):
    lhs_shape, rhs_shape, args, kw = DW_CASES[1]
    kw = {"dimension_numbers": DN2, **kw}
    in_place = dtype == jnp.bfloat16 and backends.cpu_bf16_depthwise()
    want = "bf16 depthwise" if in_place else "depthwise"
    assert depthwise_paths(lhs_shape, rhs_shape, dtype, *args, **kw) == [want] * 3
    for out_dtype in (None, jnp.float32):
      e = cks_jax.explain(jnp.zeros(lhs_shape, dtype), jnp.zeros(rhs_shape, dtype), *args,
                          gradients=True, platform="cpu", backend="ffi",
                          preferred_element_type=out_dtype, **kw)
      # (with a float32 output, the gradients' cotangent is float32: they run in float32)
      for x in (e,) + (tuple(g for _, g in e.gradients) if out_dtype is None else ()):
        assert x.cpu_path == want and (x.scratch["widened"] == 0) == in_place, str(x)
        assert ("widened to float32 in registers" in x.reason) == in_place, x.reason
    check_on_kernel(DW_CASES[1], dtype, seed=90)


# bfloat16 depthwise cases for the in-place path: DW_CASES 0-4, 8 and 9 (sliding rows, lane
# tails, strides, dilation, lhs dilation, rows in eights, no taps), and an output over 8 MB in
# bfloat16 (9.4 MB: non-temporal stores of rounded rows).
BF16_DW_CASES = DW_CASES[:5] + DW_CASES[8:] + [
    ((8, 64, 144, 64), (3, 3, 1, 64), ((1, 1), "SAME"), {"feature_group_count": 64})]


@pytest.mark.skipif(not backends.cpu_bf16_depthwise(), reason="needs AVX-512BW and VL (and no "
                    "CKS_CPU_ISA cap): elsewhere bfloat16 depthwise convolutions run on float32 "
                    "copies, which test_depthwise_16bit checks")
def test_bf16_depthwise_same_bits(tmp_path):
  # Read in place or from float32 copies (CKS_CPU_BF16_PAIRS=0, in a subprocess), every output
  # is the same float32 sum in the same order, rounded the same way: the same bits, for the
  # forward and both gradients, with bfloat16 and float32 outputs.
  code = textwrap.dedent(f"""
      import jax, numpy as np, test_kernel_paths as k
      from cks_jax._src import backends
      assert not backends.cpu_bf16_depthwise()
      np.savez(r"{tmp_path}/copies.npz", **k.depthwise_outputs(k.BF16_DW_CASES, k.BF16_OUT))
      print("ok")
  """)
  assert run_python(code, CKS_CPU_BF16_PAIRS="0")[-1] == "ok"
  copies = np.load(tmp_path / "copies.npz")
  here = depthwise_outputs(BF16_DW_CASES, BF16_OUT)
  assert sorted(here) == sorted(copies.files) and len(here) == len(BF16_DW_CASES) * 2 * 3
  differ = [name for name, x in here.items() if not np.array_equal(x, copies[name])]
  assert not differ, differ
  # and they are right
  for i, case in enumerate(BF16_DW_CASES[:-1]):
    check_on_kernel(case, jnp.bfloat16, seed=95 + i)


@pytest.mark.skipif(backends.cpu_isa() != 2, reason="compares the AVX-512 kernel's bits with "
                    "the narrower kernels': needs AVX-512 (and no CKS_CPU_ISA cap)")
@pytest.mark.parametrize("isa", ["0", "1"])
def test_depthwise_same_bits_across_isas(isa, tmp_path):
  # One chain per row in tap order (four or eight rows at a time, sliding or not), the last
  # rows % 4 in four chains: the AVX-512, AVX2 and portable kernels (CKS_CPU_ISA, in a
  # subprocess) give the same bits, forward and both gradients.
  cases = DW_CASES[:2] + DW_CASES[4:5] + DW_CASES[8:9]
  code = textwrap.dedent(f"""
      import jax
      jax.config.update("jax_enable_x64", True)
      import numpy as np, test_kernel_paths as k
      cases = k.DW_CASES[:2] + k.DW_CASES[4:5] + k.DW_CASES[8:9]
      np.savez(r"{tmp_path}/narrow.npz", **k.depthwise_outputs(cases, k.FLOAT_OUT))
      print("ok")
  """)
  assert run_python(code, CKS_CPU_ISA=isa)[-1] == "ok"
  narrow = np.load(tmp_path / "narrow.npz")
  here = depthwise_outputs(cases, FLOAT_OUT)
  assert sorted(here) == sorted(narrow.files) and len(here) == len(cases) * 2 * 3
  differ = [name for name, x in here.items() if not np.array_equal(x, narrow[name])]
  assert not differ, differ


@pytest.mark.skipif(backends.cpu_isa() != 2, reason="compares the AVX-512 kernel's bits with "
                    "the narrower kernels': needs AVX-512 (and no CKS_CPU_ISA cap)")
@pytest.mark.parametrize("isa", ["0", "1"])
def test_grouped_same_bits_across_isas(isa, tmp_path):
  # Grouped convolutions on the depthwise path (groups of 2 and 4, on the path on every ISA):
  # the same bits from the AVX-512, AVX2 and portable kernels, forward and both gradients.
  code = textwrap.dedent(f"""
      import jax
      jax.config.update("jax_enable_x64", True)
      import numpy as np, test_kernel_paths as k
      np.savez(r"{tmp_path}/narrow.npz", **k.depthwise_outputs(k.GROUPED_CASES[:4], k.FLOAT_OUT))
      print("ok")
  """)
  assert run_python(code, CKS_CPU_ISA=isa)[-1] == "ok"
  narrow = np.load(tmp_path / "narrow.npz")
  here = depthwise_outputs(GROUPED_CASES[:4], FLOAT_OUT)
  assert len(here) == 4 * 2 * 3
  differ = [name for name, x in here.items() if not np.array_equal(x, narrow[name])]
  assert not differ, differ


# (operand dtype, output dtype: None for the operands'), for depthwise_outputs
BF16_OUT = [(jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)]
FLOAT_OUT = [(np.float32, None), (np.float64, None)]


def depthwise_outputs(cases, dtypes):
  """Raw bits of the forward, d lhs and d rhs of each (lhs shape, rhs shape, args, kwargs) case
  on the kernel, for each (operand dtype, output dtype) of dtypes, by name."""
  out = {}
  for i, (lhs_shape, rhs_shape, args, kw) in enumerate(cases):
    kw = {"dimension_numbers": DN2, **kw}
    for dtype, out_dtype in dtypes:
      rng = np.random.default_rng(i)
      lhs = jnp.asarray(rng.standard_normal(lhs_shape), dtype)
      rhs = jnp.asarray(rng.standard_normal(rhs_shape), dtype)
      f = lambda l, r: cks_jax.conv_general_dilated(l, r, *args, backend="ffi",
                                                    preferred_element_type=out_dtype, **kw)
      o, vjp = jax.vjp(f, lhs, rhs)
      ct = jnp.asarray(rng.standard_normal(o.shape), o.dtype)
      for what, x in zip(("out", "d_lhs", "d_rhs"), (o,) + vjp(ct)):
        x = np.asarray(x)
        name = f"{i}-{np.dtype(dtype).name}-{out_dtype is None}-{what}"
        out[name] = x.view(f"u{x.itemsize}")
  return out


def test_depthwise_path_bounds():
  # kernel_depthwise mirrors CksConv::depthwise(): one feature per group, one channel per
  # group (or one batch entry per batch group), at least 8 groups, all contiguous.
  p = lambda fgc=1, bgc=1, dn=((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)): {
      "dimension_numbers": dn, "feature_group_count": fgc, "batch_group_count": bgc,
      "window_strides": (1, 1), "padding": ((0, 0), (0, 0)), "lhs_dilation": (1, 1),
      "rhs_dilation": (1, 1)}
  assert backends.kernel_depthwise(p(fgc=8), (2, 5, 5, 8), (3, 3, 1, 8), np.float32)
  assert backends.kernel_depthwise(p(fgc=8), (2, 5, 5, 8), (3, 3, 1, 8), jnp.bfloat16)
  assert not backends.kernel_depthwise(p(fgc=7), (2, 5, 5, 7), (3, 3, 1, 7), np.float32)
  assert not backends.kernel_depthwise(p(fgc=8), (2, 5, 5, 8), (3, 3, 1, 8), np.int32)
  # a channel multiplier of 2, two channels per group, NCHW, OIHW
  assert not backends.kernel_depthwise(p(fgc=8), (2, 5, 5, 8), (3, 3, 1, 16), np.float32)
  assert not backends.kernel_depthwise(p(fgc=8), (2, 5, 5, 16), (3, 3, 2, 8), np.float32)
  nchw = ((0, 1, 2, 3), (3, 2, 0, 1), (0, 1, 2, 3))
  assert not backends.kernel_depthwise(p(fgc=8, dn=nchw), (2, 8, 5, 5), (3, 3, 1, 8), np.float32)
  oihw = ((0, 3, 1, 2), (0, 1, 2, 3), (0, 3, 1, 2))
  assert not backends.kernel_depthwise(p(fgc=8, dn=oihw), (2, 5, 5, 8), (8, 1, 3, 3), np.float32)
  # the filter-gradient form: batch groups of one entry, contiguous
  # (lhs: the input, its channels as the batch; rhs: the cotangent; out: the HWIO kernel)
  grad = ((3, 0, 1, 2), (3, 0, 1, 2), (2, 3, 0, 1))
  assert backends.kernel_depthwise(p(bgc=8, dn=grad), (2, 5, 5, 8), (2, 3, 3, 8), np.float32)
  assert not backends.kernel_depthwise(p(bgc=8, dn=grad), (2, 5, 5, 16), (2, 3, 3, 8),
                                       np.float32)
  # Not taken (and still right): a channel multiplier of 2 runs on the GEMM
  case = ((2, 6, 6, 8), (3, 3, 1, 16), ((1, 1), "SAME"), {"feature_group_count": 8})
  assert "depthwise" not in depthwise_paths(case[0], case[1], np.float32, *case[2],
                                            dimension_numbers=DN2, feature_group_count=8)
  check_on_kernel(case, np.float32, seed=91)


# (lhs shape, rhs shape, conv args, kwargs): grouped convolutions of g channels in and g features
# out per group, which the depthwise path runs as g depthwise convolutions over lanes permuted
# inside each group (groups of 2 or 4, and of 8 floats on AVX-512): the forward and the input
# gradient; groups of 16 and 32 floats on AVX-512 with each channel broadcast over its group's
# lanes; and the filter gradient (batch groups of g entries and g features), each group's input
# channels spread over its lanes (2 or 4, 8 floats or on AVX-512 doubles, 16 floats on AVX-512).
GROUPED_CASES = [
    # ResNeXt-like 3x3 SAME, 8 groups of 4: 32 lanes, one block of two AVX-512 float vectors
    ((2, 9, 11, 32), (3, 3, 4, 32), ((1, 1), "SAME"), {"feature_group_count": 8}),
    # 20 groups of 2 (40 lanes: a masked tail of 8) and window strides
    ((2, 9, 11, 40), (3, 3, 2, 40), ((2, 2), "SAME"), {"feature_group_count": 20}),
    # transposed k4 s2 (lhs dilation), 12 groups of 4
    ((2, 7, 6, 48), (4, 4, 4, 48), ((1, 1), [(2, 2), (2, 2)], (2, 2)),
     {"feature_group_count": 12}),
    # 7x7 SAME on 10 x 20 maps (eight sliding rows on AVX-512), 17 groups of 2
    ((2, 10, 20, 34), (7, 7, 2, 34), ((1, 1), "SAME"), {"feature_group_count": 17}),
    # 9 groups of 8, dilated 5x5: on the path for floats on AVX-512 only
    ((2, 9, 11, 72), (5, 5, 8, 72), ((1, 1), [(4, 4), (4, 4)], (1, 1), (2, 2)),
     {"feature_group_count": 9}),
    # 8 groups of 16, 1-D, stride 2: on the path for floats on AVX-512 (broadcasts: a group per
    # vector)
    ((3, 23, 128), (3, 16, 128), ((2,), "SAME"), {"feature_group_count": 8,
                                                  "dimension_numbers": ("NWC", "WIO", "NWC")}),
    # 9 groups of 32 (two vectors per group), 3x3 dilated: the forward and input gradient on the
    # path for floats on AVX-512, the filter gradient on the GEMM
    ((2, 7, 6, 288), (3, 3, 32, 288), ((1, 1), "SAME", (1, 1), (2, 1)),
     {"feature_group_count": 9}),
]


def grouped_on_path(case, dtype) -> tuple[bool, bool]:
  """Whether the depthwise path takes the case's (forward and input gradient, filter gradient)."""
  lhs_shape, _, _, kw = case
  g = lhs_shape[-1] // kw["feature_group_count"]
  return g in backends.kernel_group_widths(dtype), g in backends.kernel_spread_widths(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(GROUPED_CASES)))
def test_grouped_on_depthwise_path(case, dtype):
  lhs_shape, rhs_shape, args, kw = GROUPED_CASES[case]
  paths = depthwise_paths(lhs_shape, rhs_shape, dtype, *args, **{"dimension_numbers": DN2, **kw})
  on, spread = grouped_on_path(GROUPED_CASES[case], dtype)
  avx512, f32 = backends.cpu_isa() == 2, np.dtype(dtype) == np.float32
  if case < 4:
    assert on and spread
  elif case == 4:  # 8 per group
    assert on == (f32 and avx512) and spread == (avx512 or (f32 and backends.cpu_isa() == 1))
  elif case == 5:  # 16 per group
    assert on == spread == (f32 and avx512)
  else:  # 32 per group
    assert on == (f32 and avx512) and not spread
  assert [p == "depthwise" for p in paths] == [on, on, spread], paths
  check_on_kernel(GROUPED_CASES[case], dtype, seed=100 + case)


@pytest.mark.skipif(not backends.cpu_bf16_depthwise(), reason="needs AVX-512BW and VL (and no "
                    "CKS_CPU_ISA cap): elsewhere bfloat16 grouped convolutions run on float32 "
                    "copies, which test_grouped_on_depthwise_path's float32 cases cover")
def test_bf16_grouped_same_bits(tmp_path):
  # bfloat16 grouped convolutions read in place or from float32 copies (CKS_CPU_BF16_PAIRS=0):
  # the same bits where the depthwise path runs them (the GEMM's bfloat16 pair paths sum in
  # another order), and right.
  code = textwrap.dedent(f"""
      import numpy as np, test_kernel_paths as k
      np.savez(r"{tmp_path}/copies.npz", **k.depthwise_outputs(k.GROUPED_CASES, k.BF16_OUT))
      print("ok")
  """)
  assert run_python(code, CKS_CPU_BF16_PAIRS="0")[-1] == "ok"
  copies = np.load(tmp_path / "copies.npz")
  def on_path(name):
    on, spread = grouped_on_path(GROUPED_CASES[int(name.split("-")[0])], np.float32)
    return spread if name.endswith("d_rhs") else on
  here = {n: x for n, x in depthwise_outputs(GROUPED_CASES, BF16_OUT).items() if on_path(n)}
  assert len(here) == len(GROUPED_CASES) * 2 * 3 - 2, sorted(here)  # all but 32's d-rhs
  differ = [name for name, x in here.items() if not np.array_equal(x, copies[name])]
  assert not differ, differ
  for i, case in enumerate(GROUPED_CASES):
    check_on_kernel(case, jnp.bfloat16, seed=110 + i)


def test_grouped_path_bounds():
  # kernel_depthwise's grouped side, as CksConv::depthwise(): g channels in and g features out
  # per group, g in KERNEL_GROUP_WIDTHS (8, 16, 32 floats on AVX-512 only), the filter HWIO or in
  # the layout jax gives a grouped convolution's input gradient (HW, features g apart, channels
  # contiguous)
  p = lambda fgc=8, dn=((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)): {
      "dimension_numbers": dn, "feature_group_count": fgc, "batch_group_count": 1,
      "window_strides": (1, 1), "padding": ((0, 0), (0, 0)), "lhs_dilation": (1, 1),
      "rhs_dilation": (1, 1)}
  assert backends.kernel_depthwise(p(), (2, 5, 5, 32), (3, 3, 4, 32), np.float32)
  assert backends.kernel_depthwise(p(), (2, 5, 5, 16), (3, 3, 2, 16), np.float64)
  assert backends.kernel_depthwise(p(), (2, 5, 5, 32), (3, 3, 4, 32), jnp.bfloat16)
  assert (backends.kernel_depthwise(p(), (2, 5, 5, 64), (3, 3, 8, 64), np.float32)
          == (backends.cpu_isa() == 2))
  assert not backends.kernel_depthwise(p(), (2, 5, 5, 64), (3, 3, 8, 64), np.float64)
  assert not backends.kernel_depthwise(p(), (2, 5, 5, 24), (3, 3, 3, 24), np.float32)  # g = 3
  avx512 = backends.cpu_isa() == 2  # 16 and 32 per group: broadcast, floats on AVX-512
  assert backends.kernel_depthwise(p(), (2, 5, 5, 128), (3, 3, 16, 128), np.float32) == avx512
  assert backends.kernel_depthwise(p(), (2, 5, 5, 256), (3, 3, 32, 256), np.float32) == avx512
  assert not backends.kernel_depthwise(p(), (2, 5, 5, 128), (3, 3, 16, 128), np.float64)
  assert not backends.kernel_depthwise(p(), (2, 5, 5, 512), (3, 3, 64, 512), np.float32)
  assert not backends.kernel_depthwise(p(fgc=4), (2, 5, 5, 16), (3, 3, 4, 16), np.float32)
  # 4 channels in, 8 features out per group
  assert not backends.kernel_depthwise(p(), (2, 5, 5, 32), (3, 3, 4, 64), np.float32)
  transposed = ((0, 3, 1, 2), (2, 3, 0, 1), (0, 3, 1, 2))  # HW, O g apart, I contiguous
  assert backends.kernel_depthwise(p(dn=transposed), (2, 5, 5, 32), (3, 3, 32, 4), np.float32)
  oihw = ((0, 3, 1, 2), (0, 1, 2, 3), (0, 3, 1, 2))
  assert not backends.kernel_depthwise(p(dn=oihw), (2, 5, 5, 32), (32, 4, 3, 3), np.float32)
  # The filter gradient's form: batch groups of g entries (the input's channels) and g features
  # (the cotangent's), g in KERNEL_SPREAD_WIDTHS, all contiguous (out: the HWIO kernel).
  grad = ((3, 0, 1, 2), (3, 0, 1, 2), (2, 3, 0, 1))
  q = lambda bgc=8, dn=grad: {**p(fgc=1, dn=dn), "batch_group_count": bgc}
  assert backends.kernel_depthwise(q(), (2, 5, 5, 32), (2, 3, 3, 32), np.float32)
  assert backends.kernel_depthwise(q(), (2, 5, 5, 16), (2, 3, 3, 16), np.float64)
  assert backends.kernel_depthwise(q(), (2, 5, 5, 64), (2, 3, 3, 64), np.float32) == (
      backends.cpu_isa() >= 1)
  assert backends.kernel_depthwise(q(), (2, 5, 5, 64), (2, 3, 3, 64), np.float64) == avx512
  assert backends.kernel_depthwise(q(), (2, 5, 5, 128), (2, 3, 3, 128), np.float32) == avx512
  assert not backends.kernel_depthwise(q(), (2, 5, 5, 128), (2, 3, 3, 128), np.float64)
  assert not backends.kernel_depthwise(q(), (2, 5, 5, 24), (2, 3, 3, 24), np.float32)  # g = 3
  assert not backends.kernel_depthwise(q(), (2, 5, 5, 256), (2, 3, 3, 256), np.float32)  # 32
  # 4 entries, 8 features per group; the cotangent's features not contiguous (NCHW)
  assert not backends.kernel_depthwise(q(), (2, 5, 5, 32), (2, 3, 3, 64), np.float32)
  nchw_ct = ((3, 0, 1, 2), (0, 1, 2, 3), (2, 3, 0, 1))
  assert not backends.kernel_depthwise(q(dn=nchw_ct), (2, 5, 5, 32), (2, 32, 3, 3), np.float32)


def test_grouped_auto():
  # 8 x 56 x 56 x 64 in 32 groups of 2, 3x3: "auto" runs the forward and both gradients on the
  # depthwise path (the filter gradient, 2 features per batch group, is a narrow output over
  # CPU_MIN_MACS, which XLA's convolution took about 4 s for: Zen 4, 2 cores)
  e = cks_jax.explain(jnp.zeros((8, 56, 56, 64)), jnp.zeros((3, 3, 2, 64)), (1, 1), "SAME",
                      dimension_numbers=DN2, feature_group_count=32, gradients=True,
                      platform="cpu")
  for x in (e,) + tuple(g for _, g in e.gradients):
    assert (x.backend, x.cpu_path) == ("cks-cpu", "depthwise"), x.reason
  # groups of 3: the filter gradient on the portable path, not in XLA's convolution
  e = cks_jax.explain(jnp.zeros((8, 56, 56, 48)), jnp.zeros((3, 3, 3, 48)), (1, 1), "SAME",
                      dimension_numbers=DN2, feature_group_count=16, gradients=True,
                      platform="cpu")
  (_, d_rhs), = e.gradients[1:]
  assert d_rhs.backend == "portable" and "group by group" in d_rhs.reason, d_rhs.reason
  # and right, small
  with cks_jax.use_backend("auto"):
    check((2, 6, 7, 16), (3, 3, 2, 16), (1, 1), "SAME", dtype=np.float32, seed=120,
          dimension_numbers=DN2, feature_group_count=8)


def test_depthwise_auto_stays_on_the_kernel():
  # A depthwise layer has one feature per group, fewer than CPU_MIN_FEATURES: "auto" would
  # send a large one to XLA (0.01-0.02x the kernel's time here), unless the depthwise path
  # takes it. 8 x 28 x 28 x 128, 7x7: 39M multiply-adds, over CPU_MIN_MACS.
  x, w = jnp.zeros((8, 28, 28, 128)), jnp.zeros((7, 7, 1, 128))
  e = cks_jax.explain(x, w, (1, 1), "SAME", dimension_numbers=DN2, feature_group_count=128,
                      gradients=True, platform="cpu")
  for x_ in (e,) + tuple(g for _, g in e.gradients):
    assert x_.backend == "cks-cpu" and x_.cpu_path == "depthwise", (x_.backend, x_.reason)
  # Without it (a multiplier of 2), the rule still applies
  e = cks_jax.explain(jnp.zeros((8, 28, 28, 64)), jnp.zeros((7, 7, 1, 128)), (1, 1), "SAME",
                      dimension_numbers=DN2, feature_group_count=64, platform="cpu")
  assert e.backend == "xla", e.reason


def test_explain_names_the_kernels_path():
  # explain's cpu_path comes from the kernel's own code (CksConv::path); the case tables'
  # claims, and the Python mirrors that auto and explain's reason use, agree with it.
  def paths(case, dtype=np.float32):
    lhs_shape, rhs_shape, args, kw = case
    e = cks_jax.explain(jnp.zeros(lhs_shape, dtype), jnp.zeros(rhs_shape, dtype), *args,
                        gradients=True, platform="cpu", backend="ffi",
                        **{"dimension_numbers": DN2, **kw})
    return e, dict(e.gradients)
  # taps as columns on AVX-512 and AVX2 (COLS_CASES asserts which cases)
  narrow = ("narrow", "narrow, taps as columns") if cols_here(1) else ("narrow",)
  for case in CASES:
    e, g = paths(case)
    assert g["d rhs"].cpu_path in narrow, str(e)
    assert "narrow" in g["d rhs"].reason
  for case in DOT_CASES:
    for dtype in (np.float32, np.float64, jnp.bfloat16):
      e, g = paths(case, dtype)
      assert e.cpu_path == "dot" and "dot path" in e.reason, (case, dtype)
  for case in TAPS_CASES:
    e, g = paths(case)
    assert g["d rhs"].cpu_path == "interleaved taps", case
    assert "CPU kernel path: interleaved taps" in str(e)
  if backends.cpu_isa() == 2:  # wide_rows (AVX2's cases: test_row_vectorised_filter_gradient)
    for case in WIDE_CASES:
      for dtype in (np.float32, np.float64, jnp.bfloat16):
        e, g = paths(case, dtype)
        # bfloat16 with >= 16 features packs pairs instead where the CPU has AVX512_BF16
        packed = (dtype == jnp.bfloat16 and backends.cpu_bf16_pairs()
                  and per_group(case, "O") >= 16 and per_group(case, "I") >= 64)
        want = "bf16 packed pairs" if packed else "row-vectorised"
        assert g["d rhs"].cpu_path == want, (case, dtype)
        assert f"CPU kernel path: {want}" in str(e)
  e, g = paths(GEMM_CASES[0])
  assert e.cpu_path == "gemm" and "path:" not in e.reason
  assert cks_jax.explain((2, 8, 8, 4), (3, 3, 4, 6), (1, 1), "SAME", dimension_numbers=DN2,
                         platform="tpu").cpu_path is None


@pytest.mark.parametrize("isa", ["0", "1"])
def test_narrower_kernels(isa):
  # CKS_CPU_ISA caps the kernel choice (read once per process, so in a
  # subprocess): 0 runs the portable C++ kernels, 1 the AVX2 ones (the
  # default here unless the machine has AVX-512).
  code = textwrap.dedent("""
      import jax
      jax.config.update("jax_enable_x64", True)
      import numpy as np, test_kernel_paths as k
      # PHASE_B_CASES[-5:-3]: 3x3 SAME (reduction blocks); [-3]: 16 channels; COLUMN_CASES 0
      # and 3: adjacent phases fused as columns (float32); DW_CASES: sliding rows (0, 4), lane
      # tails, no taps; TAPS_CASES[-1]: a chunk of the cotangent packed once for all taps (AVX2,
      # 1-D, two residue classes); TAPS_SPLIT_CASES: sub-problems split among tasks (AVX2 float32);
      # COLS_CASES 0 and 2: taps as columns (AVX2: 1 and 2 features, 9 and 7 taps);
      # WIDE_CASES 5: row-vectorised (AVX2: tiles of 6 + 6 + 6 + 3 features)
      cases = (k.GEMM_CASES + k.CASES[:2] + k.CASES[-1:] + k.PHASE_B_CASES[:2]
               + k.PHASE_B_CASES[-5:-2] + k.TAPS_CASES[:1] + k.TAPS_CASES[-1:]
               + k.TAPS_SPLIT_CASES + k.DOT_CASES[:4]
               + [c[:4] for c in (k.COLUMN_CASES[0], k.COLUMN_CASES[3])]
               + [c[:4] for c in (k.COLS_CASES[0], k.COLS_CASES[2])] + k.WIDE_CASES[5:6]
               + k.DW_CASES[:3] + k.DW_CASES[4:5] + k.DW_CASES[-1:])
      for i, c in enumerate(cases):
        for dtype in (np.float64, np.float32):
          k.check_on_kernel(c, dtype, seed=i)
      print("ok", len(cases))
  """)
  assert run_python(code, timeout=900, CKS_CPU_ISA=isa)[-2:] == ["ok", str(len(GEMM_CASES) + 27)]
