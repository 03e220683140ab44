"""Choosing how a cks_conv runs: the FFI kernel, the portable lax decomposition, or XLA.

- ``"ffi"``: the C-K-S C++/CUDA kernel (CPU always; CUDA when built). An error
  on a platform without one.
- ``"portable"``: the same C-K-S decomposition written as dense, undilated
  ``lax`` convolutions over strided slices (any XLA backend).
- ``"xla"``: XLA's own convolution (computes on the zeros).
- ``"auto"`` (default): the CPU's FFI kernel, except for some outputs with
  fewer than ``CPU_MIN_FEATURES`` features per group (see
  :func:`cpu_alternative`). Not the CUDA kernel, which measured slower than
  XLA's convolution on an H200 (``AUTO_KERNEL_PLATFORMS``). Elsewhere the
  portable path for convolutions with lhs dilation: those are transposed
  convolutions and the filter gradients of transposed ones (batch-grouped for
  grouped layers), where the whole gradient was measured 6.0-69x faster than
  XLA's on the CPU, 12.4x on the geometric mean (``benchmarks/results/portable_grad_cpu.txt``).
  Everything else goes to XLA. Atrous (rhs-dilated) convolutions go to XLA too: the portable
  path was 0.8-1.2x XLA at dilations 2-8, and far slower at 12-18
  (``benchmarks/results/``).
"""
from __future__ import annotations

import contextlib
import math
import threading

import jax
import ml_dtypes
import numpy as np

from cks_jax._src import shapes

BACKENDS = ("auto", "ffi", "portable", "xla")

# The platforms whose FFI kernel "auto" runs. Not "cuda": on an NVIDIA H200
# (benchmarks/results/gpu_h200.txt, 2026-12-04, jax 0.11.2) the CUDA kernel was
# slower than XLA's convolution (cuDNN) on 88 of the 90 ops of the benchmark
# set, 0.16x on the geometric mean in float32 (its float32 path runs on CUDA
# cores, cuDNN's on TF32 tensor cores) and 0.14x in bfloat16. The choice made
# where no kernel exists (portable for lhs-dilated convolutions, else XLA),
# which "auto" makes on a GPU since, measured 1.29x XLA's speed on the
# geometric mean there (gpu_h200_auto.txt; 0.54x at worst, the input gradient
# of the k4 s2 discriminator layer), and the DCGAN generator step 0.8 ms
# against XLA's 1.4 and the CUDA kernel's 15.2. backend="ffi" still runs the
# CUDA kernel.
AUTO_KERNEL_PLATFORMS = ("cpu",)

_state = threading.local()
# use_backend's setting: a jax user context, so part of jit's cache key (a
# function jitted under one backend is traced again under another instead of
# running the first one's trace). Per thread, as jax's own contexts. Made once,
# at import: jax asks that none be made while other threads call jax.
_BACKEND = jax.make_user_context(default_value="auto")


def default_platform() -> str:
  """Where an uncommitted computation runs: the platform of ``jax.default_device``
  when one is set (a device or a platform name), else ``jax.default_backend()``;
  inside :func:`target_platform`, the platform given there."""
  forced = getattr(_state, "platform", None)
  if forced is not None:
    return forced
  dev = jax.config.jax_default_device
  if dev is None:
    return jax.default_backend()
  return dev if isinstance(dev, str) else dev.platform


@contextlib.contextmanager
def target_platform(platform: str | None):
  """Context manager: trace cks convolutions as if for ``platform`` (``explain``'s
  ``platform=``), where a choice made at trace time depends on it."""
  prev = getattr(_state, "platform", None)
  _state.platform = platform
  try:
    yield
  finally:
    _state.platform = prev


# The CPU kernel is fastest with channels-last operands: the GEMM reads a row's
# channels in place (NHWC) and writes its features in place, and the filter
# gradient's batch (the channels) is contiguous; NCHW made it gather A into
# panels, write through scratch blocks and pack the filter gradient's operands
# per task. Measured on the Zen 4 VM (2 cores, float32, in process): NCHW 3x3
# (8 x 64 x 32 x 32, 64 features) forward 4.0 ms against NHWC's 2.7, filter
# gradient 11.9 against 2.8 (XLA 7.1 either way); NCHW k4 s2 transposed
# (8 x 128 x 16 x 16 -> 64) forward 4.4 against 2.4 (XLA 3.8); a NCHW
# depthwise 3x3's filter gradient 108 ms (XLA 21) against 0.7. So under
# "auto" on the CPU, a convolution whose operands are not channels-last
# (lhs and out (N, spatial..., C), rhs (spatial..., I, O)) is run on
# transposed copies, and its result transposed back (see api.py).
def wants_channels_last(requested: str, platform: str, dimension_numbers) -> bool:
  """Whether ``conv_general_dilated`` runs this call on channels-last copies of
  its operands: ``"auto"`` on the CPU, where the kernel exists, with operands
  that are not channels-last already."""
  if requested != "auto" or platform != "cpu":
    return False
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n = len(lhs_spec)
  ident = tuple(range(n))
  return ((lhs_spec[0], *lhs_spec[2:], lhs_spec[1]) != ident
          or (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]) != ident
          or (out_spec[0], *out_spec[2:], out_spec[1]) != ident)


def check(name: str) -> str:
  if name not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
  return name


def current() -> str:
  """The backend used when a call passes ``backend=None``."""
  return _BACKEND.value


@contextlib.contextmanager
def use_backend(name: str):
  """Context manager: run the cks convolutions traced inside on ``name``.

  The backend is read when a function is traced, and is part of ``jax.jit``'s
  cache key, as jax's own contexts are: a jitted function called under
  another backend than before is traced again for it. The setting is per
  thread (a thread started inside does not inherit it).

  Example::

      with cks_jax.use_backend("portable"):
        y = jax.jit(model)(x)   # traced here for the portable path
      y = jax.jit(model)(x)     # "auto" again: the cached trace is not reused
  """
  with _BACKEND(check(name)):
    yield


# On the CPU the kernel's GEMM pads its columns (output features per group) to
# 16. With fewer than this many, measured in benchmarks/results/
# cpu_epyc_2core.json: forward 6.2 ms (XLA 0.73) and filter gradient 10.1 ms
# (portable 2.6) for DCGAN's 3-channel layer, 13.4 (1.2) and 17.0 (3.5) for
# FSRCNN's 1-channel layer. Since then, such layers stay on the kernel where
# its narrow path (filter gradients) or its dot path (forwards) takes them:
# see kernel_narrow and kernel_dot.
CPU_MIN_FEATURES = 4
# ... and only for problems worth it (useful multiply-adds): below this the
# call overhead dominates and the kernel is as good as anything.
CPU_MIN_MACS = 2**24


# The kernel has a row-vectorised path (conv_cpu.cc, run_narrow) for narrow
# outputs (at most KERNEL_NARROW_F features per group) whose lhs batch is its
# contiguous dimension and spans at least two vectors: the filter gradients of
# layers with few output channels. Measured there (same machine, same run):
# DCGAN's 3-channel layer 1.7 ms (portable 4.8, XLA 29), FSRCNN's 1-channel
# layer 2.9 ms (portable 2.6-4.3, XLA 20).
KERNEL_NARROW_F = 8


# The kernel has a path vectorised along the reduction (conv_cpu.cc, run_dot)
# for narrow outputs (at most KERNEL_DOT_F features per group) whose lhs
# channels are its contiguous dimension, at least KERNEL_DOT_MIN_C per group:
# the forward pass of a layer with few output channels (NHWC). Measured on an
# AVX-512 Zen 4 (2 cores, hot caches, float32): DCGAN's 3-channel layer
# 1.3 ms (portable 1.5, XLA 2.2), FSRCNN's 1-channel layer 0.8 ms (portable
# 2.1, XLA 3.2); with the AVX2 kernel (CKS_CPU_ISA=1) 1.4 and 1.6 ms. With
# 16-bit operands, widened to float32 for the kernel, the portable path
# was faster (1.5 and 2.0 ms, kernel 1.8 and 2.5), so those keep their route.
KERNEL_DOT_F = 8
KERNEL_DOT_MIN_C = 16


# On the CPU, the kernel runs 16-bit operands widened to float32 copies that
# it makes first (conv_cpu.cc, RunConv), and then reads in place: measured
# faster than converting inside its packing (the k8 s4 head's forward 23 -> 11
# ms, the grouped deconv's 6.5 -> 2.6 ms; benchmarks/results/, same machine).
# The values are the same: it accumulates 16-bit inputs in float32 anyway.
CPU_WIDENED = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


def cpu_widened(dtype) -> bool:
  """Whether the CPU kernel runs operands of ``dtype`` widened to float32
  (``primitive._lower_ffi``)."""
  return dtype is not None and np.dtype(dtype) in CPU_WIDENED


def _kernel_float(dtype) -> np.dtype | None:
  """The float type the CPU kernel reads for operands of ``dtype`` (float32
  for widened 16-bit ones), or None where it runs none of its float paths."""
  if dtype is None:
    return None
  dtype = np.dtype(np.float32 if cpu_widened(dtype) else dtype)
  return dtype if dtype in (np.float32, np.float64) else None


def kernel_narrow(params, lhs_shape, rhs_shape, dtype) -> bool:
  """Whether the CPU kernel runs this convolution on its narrow, row-vectorised path
  as a narrow output (at most ``KERNEL_NARROW_F`` features per group).

  Mirrors ``CksConv::narrow()`` in ``ffi/cpu/conv_cpu.cc`` for those outputs. Wider
  filter gradients that the kernel runs on the same path in feature tiles
  (``CksConv::wide_rows``: on AVX-512, and on AVX2 with narrower tiles) are not
  narrow outputs: no rule here depends on them, and ``explain`` asks the kernel
  itself for its path.
  """
  dtype = _kernel_float(dtype)
  if dtype is None:
    return False
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  groups = params["feature_group_count"] * params["batch_group_count"]
  batch = lhs_spec[0]
  contiguous = math.prod(lhs_shape[batch + 1:]) == 1  # row-major: batch stride 1
  strip = 128 // np.dtype(dtype).itemsize
  return (rhs_shape[rhs_spec[0]] // groups <= KERNEL_NARROW_F and contiguous
          and lhs_shape[batch] // params["batch_group_count"] >= strip)


def kernel_dot(params, lhs_shape, rhs_shape, dtype) -> bool:
  """Whether the CPU kernel runs this convolution on its dot path (vectorised
  along the reduction: few output features, contiguous input channels).

  Mirrors ``CksConv::dot()`` in ``ffi/cpu/conv_cpu.cc``.
  """
  if _kernel_float(dtype) is None or kernel_narrow(params, lhs_shape, rhs_shape, dtype):
    return False
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  channels = lhs_spec[1]
  contiguous = math.prod(lhs_shape[channels + 1:]) == 1  # row-major: channel stride 1
  groups = params["feature_group_count"] * params["batch_group_count"]
  features = rhs_shape[rhs_spec[0]] // groups
  channels_per_group = lhs_shape[channels] // params["feature_group_count"]
  return contiguous and features <= KERNEL_DOT_F and channels_per_group >= KERNEL_DOT_MIN_C


# The kernel has a depthwise path (conv_cpu.cc, run_depthwise; depthwise.h),
# vectorised over the groups, for problems with one output feature per group
# and either one input channel per group (feature groups: the forward and
# input gradient of a depthwise convolution) or one lhs batch entry per group
# (batch groups: its filter gradient), at least KERNEL_DEPTHWISE_MIN_GROUPS
# groups, contiguous in every operand (NHWC, HWIO). Measured on the Zen 4 VM
# (2 cores, float32, hot caches), 8 x 56 x 56 x 64, 3x3: forward 0.3 ms (the
# GEMM path 9.7, XLA 44), input gradient 0.4 (XLA 44), filter gradient 0.7
# (the GEMM path 86, XLA 24); benchmarks/results/*_depthwise.* for more. Under
# "auto", large ones (over CPU_MIN_MACS) therefore stay on the kernel though
# they have one feature per group.
KERNEL_DEPTHWISE_MIN_GROUPS = 8
# Feature groups of g channels in and g features out also take it, for g in
# these (per kernel float type: g divides every ISA's vector; 8 floats only on
# AVX-512, where it was measured faster than the GEMM path), as g depthwise
# convolutions over permuted input lanes (CksConv::dw_group_width). Zen 4, 2
# cores, float32, 3x3 forwards: 8 x 56 x 56 x 128 in 32 groups of 4, 2.6 ms
# (GEMM path 13.5, PyTorch 3.9); 8 x 28 x 28 x 256 in 32 groups of 8, 2.2 ms
# (GEMM path 3.3, PyTorch 1.4).
KERNEL_GROUP_WIDTHS = {np.dtype(np.float32): (1, 2, 4), np.dtype(np.float64): (1, 2, 4)}
KERNEL_GROUP_WIDTHS_AVX512 = {np.dtype(np.float32): (1, 2, 4, 8, 16, 32),
                              np.dtype(np.float64): (1, 2, 4)}


def kernel_group_widths(dtype) -> tuple:
  """The group widths (channels in and out per group) the CPU kernel's depthwise
  path takes for operands of ``dtype`` on this CPU (a kernel float type)."""
  table = KERNEL_GROUP_WIDTHS_AVX512 if cpu_isa() == 2 else KERNEL_GROUP_WIDTHS
  return table[_kernel_float(dtype)]


# The filter gradient of a grouped convolution of g channels in and g out per
# group (lax's batch groups of g entries and g features) takes the depthwise
# path for these g, by kernel float type and cpu_isa() (CksConv::dw_spread_width:
# g divides the ISA's vector; groups of a whole vector broadcast). The Intel Xeon VM
# with AMX (2 cores), float32, 3x3 filter gradients (benchmarks/grouped_shapes.json;
# PyTorch's convolution_backward of the filter alone): 8 x 56 x 56 x 128
# in 32 groups of 4, 1.8 ms (the GEMM path 37-42, PyTorch 4.4); 8 x 28 x 28 x 256
# in 32 of 8, 1.5-1.7 (12.6-13.5, PyTorch 1.7); 8 x 14 x 14 x 512 in 32 of 16,
# 1.5-1.6 (2.5-2.8, PyTorch 0.9); 8 x 56 x 56 x 64 in 32 of 2, 0.85 (35-41, the
# portable path 11-12, PyTorch 2.1).
KERNEL_SPREAD_WIDTHS = {
    0: {np.dtype(np.float32): (1, 2, 4), np.dtype(np.float64): (1, 2, 4)},
    1: {np.dtype(np.float32): (1, 2, 4, 8), np.dtype(np.float64): (1, 2, 4)},
    2: {np.dtype(np.float32): (1, 2, 4, 8, 16), np.dtype(np.float64): (1, 2, 4, 8)},
}


def kernel_spread_widths(dtype) -> tuple:
  """The group widths whose grouped filter gradients (batch groups of g entries
  and g features) the CPU kernel's depthwise path takes for operands of
  ``dtype`` on this CPU (a kernel float type)."""
  return KERNEL_SPREAD_WIDTHS[cpu_isa()][_kernel_float(dtype)]


def _row_major_stride(shape, axis) -> int:
  return math.prod(shape[axis + 1:])


def kernel_depthwise(params, lhs_shape, rhs_shape, dtype) -> bool:
  """Whether the CPU kernel runs this convolution on its depthwise path (a
  depthwise convolution, or a grouped one of ``KERNEL_GROUP_WIDTHS`` channels
  in and out per group; as batch groups, their filter gradients, of
  ``KERNEL_SPREAD_WIDTHS`` entries and features per group).

  Mirrors ``CksConv::depthwise()`` in ``ffi/cpu/conv_cpu.cc``.
  """
  if _kernel_float(dtype) is None:
    return False
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  fgc, bgc = params["feature_group_count"], params["batch_group_count"]
  groups = fgc * bgc
  if groups < KERNEL_DEPTHWISE_MIN_GROUPS:
    return False
  out_shape = shapes.out_shape(lhs_shape, rhs_shape, shapes.spec_of(params))
  if _row_major_stride(out_shape, out_spec[1]) != 1:
    return False
  rhs_o = _row_major_stride(rhs_shape, rhs_spec[0])
  if fgc > 1:
    # the filter's features contiguous, or g apart with the channels contiguous (the layout
    # of a grouped convolution's input gradient's filter)
    width = lhs_shape[lhs_spec[1]] // fgc
    layout = rhs_o == 1 or (width > 1 and rhs_o == width
                            and _row_major_stride(rhs_shape, rhs_spec[1]) == 1)
    return (rhs_shape[rhs_spec[0]] == width * fgc and layout
            and width in kernel_group_widths(dtype)
            and _row_major_stride(lhs_shape, lhs_spec[1]) == 1)
  # batch groups of g entries and g features: a depthwise (g = 1) or grouped convolution's
  # filter gradient
  width = rhs_shape[rhs_spec[0]] // bgc
  return (rhs_o == 1 and rhs_shape[rhs_spec[0]] == width * bgc
          and lhs_shape[lhs_spec[0]] == width * bgc and width in kernel_spread_widths(dtype)
          and _row_major_stride(lhs_shape, lhs_spec[0]) == 1)


# XLA:CPU's own convolution of a narrow transposed layer took about 3x longer
# on the AVX2 EPYC than on the AVX-512 one, the portable path about as long
# on both, and the kernel's narrow path is the one tuned on AVX-512. So on a
# CPU with AVX2 but no AVX-512 (the kernel's CPU_ISA_AVX2), narrow layers with
# lhs dilation go to the portable path: measured on the AVX2 EPYC
# (benchmarks/results/cpu_epyc_avx2_2core.json), forwards 2.34 ms (XLA 3.96)
# for DCGAN's 3-channel layer and 2.70 (5.55) for FSRCNN's 1-channel one, and
# FSRCNN's filter gradient 3.20 ms (kernel 4.43). On the AVX-512 EPYC
# (cpu_epyc_2core.json) XLA's forwards took 1.26 and 1.77 ms, the portable
# path's 2.33 and 2.63, and the kernel's filter gradient 1.6 ms against 2.1.
# The same held for bfloat16 (cpu_epyc_avx2_2core_bf16.json: forwards 3.56 ms
# against XLA's 4.90, 3.35 against 6.61; filter gradient 3.51 against 5.00).
# Since the AVX2 kernel runs a filter gradient's taps as the columns of one tile
# (NARROW_COLS), those stay on the kernel: FSRCNN's (1 feature) took 0.62 ms
# there against 1.16 tap by tap (AVX2 Zen 3 EPYC, 2 cores, 3 alternating
# rounds, 2026-12-07), and in one process 0.73 ms against the portable path's
# 1.01 and XLA's 23.2 (bfloat16, widened: 1.02 against 1.78 and 23.0).
CPU_ISA_AVX2 = 1
NARROW_COLS = "narrow, taps as columns"
CPU_ISA_AVX2_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))


def cpu_isa() -> int:
  """The CPU kernel's instruction set: 2 AVX-512F, 1 AVX2+FMA, 0 portable C++
  (``CKS_CPU_ISA=0`` or ``1`` caps it, as for the kernel)."""
  from cks_jax._src import ffi  # the extension, only where a CPU choice is made
  return int(ffi.extension().cpu_isa())


def cpu_bf16_pairs() -> bool:
  """Whether the CPU kernel runs bfloat16 operands on its AVX512_BF16 pair
  paths where they apply (``cpu_path`` ``"bf16 pairs"`` or ``"bf16 packed
  pairs"`` in :func:`cks_jax.explain`):
  an AVX-512 CPU with AVX512_BF16, unless ``CKS_CPU_ISA`` caps the ISA or
  ``CKS_CPU_BF16_PAIRS=0`` turns it off."""
  from cks_jax._src import ffi
  return bool(ffi.extension().cpu_bf16_pairs())


def cpu_bf16_amx() -> bool:
  """Whether those bfloat16 pair paths multiply on AMX tiles (Intel Xeon
  Sapphire Rapids and later: AMX-TILE and AMX-BF16, with the tile state
  granted by Linux), unless ``CKS_CPU_AMX=0`` turns it off. Implies
  :func:`cpu_bf16_pairs`."""
  from cks_jax._src import ffi
  return bool(ffi.extension().cpu_bf16_amx())


def cpu_bf16_depthwise() -> bool:
  """Whether the CPU kernel's depthwise path reads bfloat16 operands in
  place, widening them to float32 in registers (``cpu_path`` ``"bf16
  depthwise"`` in :func:`cks_jax.explain`; elsewhere ``"depthwise"`` on float32
  copies, with the same bits): an AVX-512 CPU with AVX-512BW and VL, unless
  ``CKS_CPU_ISA`` caps the ISA or ``CKS_CPU_BF16_PAIRS=0`` turns it off."""
  from cks_jax._src import ffi
  return bool(ffi.extension().cpu_bf16_depthwise())


def _narrow_facts(params, lhs_shape, rhs_shape):
  """For a narrow output (fewer than ``CPU_MIN_FEATURES`` features per group)
  of at least ``CPU_MIN_MACS`` multiply-adds: (features per group, whether it
  has a filter gradient's shape (fewer output positions than kernel taps),
  whether it has lhs dilation). None for any other problem."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  groups = params["feature_group_count"] * params["batch_group_count"]
  features = rhs_shape[rhs_spec[0]] // groups
  if features >= CPU_MIN_FEATURES:
    return None
  out_shape = shapes.out_shape(lhs_shape, rhs_shape, shapes.spec_of(params))
  positions = math.prod(out_shape[d] for d in out_spec[2:])
  taps = math.prod(rhs_shape[d] for d in rhs_spec[2:])
  macs = (math.prod(out_shape) * rhs_shape[rhs_spec[1]] * taps
          // math.prod(params["lhs_dilation"]))
  if macs < CPU_MIN_MACS:
    return None
  return features, positions <= taps, any(a > 1 for a in params["lhs_dilation"])


def kernel_cpu_path(params, lhs_shape, rhs_shape, dtype) -> str:
  """The CPU kernel's path for this problem (``Explanation.cpu_path``), as the
  kernel's own planning code names it on this CPU."""
  from cks_jax._src import explain  # imports this module
  out_shape = shapes.out_shape(lhs_shape, rhs_shape, shapes.spec_of(params))
  return explain.cpu_scratch(lhs_shape, rhs_shape, out_shape, params, dtype)[1]


def avx2_rule(params, lhs_shape, rhs_shape, dtype=None, isa=None) -> bool:
  """Whether ``"auto"``'s AVX2 rule (see ``CPU_ISA_AVX2``) sends this
  problem to the portable path: on a CPU without AVX-512 (``isa``, by default
  :func:`cpu_isa`), a float32 or bfloat16 narrow output with lhs dilation, a
  transposed convolution or the filter gradient of a one-feature layer that
  the kernel does not run with its taps as columns."""
  facts = _narrow_facts(params, lhs_shape, rhs_shape)
  if facts is None or dtype is None or np.dtype(dtype) not in CPU_ISA_AVX2_DTYPES:
    return False
  features, gradient, deconv = facts
  if not deconv or (gradient and features != 1):
    return False
  if (cpu_isa() if isa is None else isa) != CPU_ISA_AVX2:
    return False
  return not gradient or kernel_cpu_path(params, lhs_shape, rhs_shape, dtype) != NARROW_COLS


# On the AVX-512 Zen 4 (2 cores, every backend timed in blocks with hot caches:
# benchmarks/results/cpu_epyc_zen4_2core_bf16.json and the run the day before),
# the bfloat16 forwards of the narrow transposed layers took 0.75-0.85 ms on the
# portable path against 1.49-1.72 ms in XLA's bfloat16 convolution (DCGAN's
# 3-channel layer, 1.76-2.30x) and 0.73-0.80 against 2.16-2.36 (FSRCNN's
# 1-channel layer, 2.94-2.98x); the kernel takes 16-bit forwards widened, where
# the portable path was faster too (see KERNEL_DOT_F). So ``"auto"`` sends
# bfloat16 narrow outputs with lhs dilation that are not filter gradients to the
# portable path on any CPU (on AVX2 the AVX2 rule already does). float16 stays
# with XLA (not measured).
CPU_PORTABLE_16BIT_DTYPES = (np.dtype(ml_dtypes.bfloat16),)


def portable_16bit_rule(params, lhs_shape, rhs_shape, dtype=None) -> bool:
  """Whether ``"auto"`` sends this problem to the portable path as a
  bfloat16 narrow transposed forward (see ``CPU_PORTABLE_16BIT_DTYPES``)."""
  facts = _narrow_facts(params, lhs_shape, rhs_shape)
  if facts is None or dtype is None or np.dtype(dtype) not in CPU_PORTABLE_16BIT_DTYPES:
    return False
  _, gradient, deconv = facts
  return deconv and not gradient


# 1-D layers stay on the kernel in every dtype. C-K-S skips only rhs
# dilation's zeros there, which XLA's own CPU convolution skips too, so
# "auto" once sent large 1-D forwards and input gradients to XLA: float32 ones
# until the AVX-512 tile of 6 x 64 floats, bfloat16 ones until the tile kept
# its accumulators in registers across 64-channel runs. On the Zen 4 VM (2
# cores, in process, medians of 3-6 interleaved runs, 2026-12-03) the kernel
# then ran WaveNet's k2 layers (4 x 4096 x 64, dilations 1-512) and the 1-D
# k4 s2 transposed layer's input gradient at 1.02-1.19x XLA's bfloat16
# (forwards and input gradients; 1.02-1.25x in float32).


def cpu_alternative(params, lhs_shape, rhs_shape, dtype=None, isa=None) -> str | None:
  """What ``"auto"`` runs on the CPU instead of the kernel, or None for the kernel.

  A narrow output (fewer than ``CPU_MIN_FEATURES`` features per group) of at
  least ``CPU_MIN_MACS`` multiply-adds stays on the kernel if its depthwise
  path takes it (:func:`kernel_depthwise`), or if its dot path
  takes it with float32 or float64 operands (:func:`kernel_dot`, needs the lhs
  ``dtype``); else it goes to the portable path where :func:`avx2_rule` says
  so (``isa`` as there) or :func:`portable_16bit_rule` does; else it stays on
  the kernel if its narrow path takes it (:func:`kernel_narrow`), else goes to
  the portable path when it is the filter gradient of a grouped convolution
  with 2-3 channels per group (batch groups of 2-3 features) or has the shape
  of a filter gradient (fewer output positions than kernel taps) with lhs
  dilation, else to XLA's convolution.
  """
  facts = _narrow_facts(params, lhs_shape, rhs_shape)
  if facts is None or kernel_depthwise(params, lhs_shape, rhs_shape, dtype):
    return None
  if not cpu_widened(dtype) and kernel_dot(params, lhs_shape, rhs_shape, dtype):
    return None
  if (avx2_rule(params, lhs_shape, rhs_shape, dtype, isa)
      or portable_16bit_rule(params, lhs_shape, rhs_shape, dtype)):
    return "portable"
  if kernel_narrow(params, lhs_shape, rhs_shape, dtype):
    return None
  features, gradient, deconv = facts
  if params["batch_group_count"] > 1 and features > 1:
    # The filter gradient of a grouped convolution with 2-3 features per group (lax's batch
    # groups) that the depthwise path does not take (groups of 3; of 2 in a layout it does not
    # read): XLA's convolution runs it group by group. On the Zen 4 VM (2 cores, float32,
    # 8 x 56 x 56 x 64 in 32 groups of 2, 3x3, before the depthwise path took it): XLA
    # 3960-4060 ms, the kernel's GEMM 44.7, the portable path 9-11.3; at stride 2, the GEMM
    # 7.3 and the portable path 3.8 (bfloat16: 13.0 and 3.9).
    return "portable"
  return "portable" if gradient and deconv else "xla"


def choose(requested: str, platform: str, kernel_platforms, params,
           shapes: tuple | None = None, dtype=None) -> str:
  """The backend that actually runs for ``requested`` on ``platform``.

  ``shapes``, the (lhs, rhs) shapes, and ``dtype``, the lhs dtype, let
  ``"auto"`` pick per configuration.
  """
  platform = {"gpu": "cuda"}.get(platform, platform)
  has_kernel = platform in kernel_platforms
  if requested == "ffi":
    if not has_kernel:
      raise NotImplementedError(
          f"backend='ffi' was requested but there is no cks kernel for platform {platform!r} "
          "(CPU always; CUDA only when the package was built with nvcc). Use "
          "backend='portable' or 'auto'.")
    return "ffi"
  if requested in ("portable", "xla"):
    return requested
  if has_kernel and platform in AUTO_KERNEL_PLATFORMS:
    if platform == "cpu" and shapes is not None:
      return cpu_alternative(params, *shapes, dtype) or "ffi"
    return "ffi"
  deconv = any(a > 1 for a in params["lhs_dilation"])
  return "portable" if deconv else "xla"
