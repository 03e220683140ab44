"""Backend choice: the cks FFI kernel, the portable lax decomposition, or XLA. On the CPU
(on_cpu) also where the default backend is a GPU; the CUDA choice is in test_cuda."""
import os
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cks_jax
from cks_jax._src import backends
from oracle import assert_close, check, random

pytestmark = pytest.mark.usefixtures("on_cpu")
DN = ("NHWC", "HWIO", "NHWC")
CASES = [
    dict(window_strides=(1, 1), padding=[(2, 2), (2, 2)], lhs_dilation=(2, 2)),   # KS-deconv
    dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 3)),             # Sk-dilated
    dict(window_strides=(2, 1), padding=[(1, 2), (0, 1)], lhs_dilation=(3, 1),
         rhs_dilation=(1, 2)),                                                    # mixed
    dict(window_strides=(2, 2), padding="SAME"),                                  # ConvV2
]


@pytest.mark.parametrize("backend", ["ffi", "portable", "xla", "auto"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_backend_matches_lax(backend, case):
  kw = dict(CASES[case], dimension_numbers=DN)
  l, r = random((2, 9, 8, 4), np.float64, 0), random((4, 3, 4, 6), np.float64, 1)
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, backend=backend, **kw)
  g = lambda l, r: lax.conv_general_dilated(l, r, **kw)
  assert_close(jax.jit(f)(l, r), g(l, r), np.float64, "value")
  ct = random(g(l, r).shape, np.float64, 2)
  for a, b in zip(jax.vjp(f, l, r)[1](ct), jax.vjp(g, l, r)[1](ct)):
    assert_close(a, b, np.float64, "vjp")


def _dilated_convolutions(text):
  """stablehlo.convolution ops that still carry an lhs or rhs dilation."""
  bad = []
  for line in text.splitlines():
    if "stablehlo.convolution" not in line:
      continue
    for key in ("lhs_dilate", "rhs_dilate"):
      m = re.search(key + r"\s*=\s*\[([^\]]*)\]", line)
      if m and any(int(v) != 1 for v in m.group(1).split(",")):
        bad.append(line.strip()[:160])
  return bad


@pytest.mark.parametrize("platform", ["tpu", "rocm"])
@pytest.mark.parametrize("backend", ["portable", "auto"])
def test_platforms_without_kernel_leave_no_dilated_convolution(platform, backend):
  l, r = jnp.ones((2, 8, 8, 4)), jnp.ones((4, 4, 4, 6))
  up = lambda l, r: cks_jax.conv_transpose(l, r, (2, 2), "SAME", dimension_numbers=DN,
                                           backend=backend)
  atrous = lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "SAME", rhs_dilation=(2, 2),
                                                     dimension_numbers=DN, backend=backend)
  # "auto" sends atrous convolutions to XLA (measured faster there), so it
  # is checked on the transposed convolution alone.
  loss = ((lambda l, r: jnp.sum(up(l, r) ** 2) + jnp.sum(atrous(l, r) ** 2))
          if backend == "portable" else (lambda l, r: jnp.sum(up(l, r) ** 2)))
  step = jax.grad(loss, (0, 1))
  text = jax.jit(step).trace(l, r).lower(lowering_platforms=(platform,)).as_text()
  assert "cks_conv_cpu" not in text and "cks_conv_cuda" not in text
  assert not _dilated_convolutions(text), _dilated_convolutions(text)
  # lax itself would have dilated convolutions here: the check can fail.
  ref = jax.grad(lambda l, r: jnp.sum(lax.conv_transpose(l, r, (2, 2), "SAME",
                                                         dimension_numbers=DN) ** 2), (0, 1))
  assert _dilated_convolutions(jax.jit(ref).trace(l, r).lower(
      lowering_platforms=(platform,)).as_text())


def test_ffi_backend_without_kernel_is_a_clear_error():
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "SAME", backend="ffi")
  with pytest.raises(NotImplementedError, match="no cks kernel for platform 'tpu'"):
    jax.jit(f).trace(jnp.ones((1, 2, 5, 5)), jnp.ones((3, 2, 3, 3))).lower(
        lowering_platforms=("tpu",))


def test_use_backend_context_and_explain():
  shapes = ((2, 8, 8, 4), (4, 4, 4, 6), (1, 1), [(2, 2), (2, 2)], (2, 2))
  assert cks_jax.explain(*shapes, dimension_numbers=DN).backend == "cks-cpu"
  with cks_jax.use_backend("portable"):
    e = cks_jax.explain(*shapes, dimension_numbers=DN)
    assert e.backend == "portable" and "requested" in e.reason
    l, r = random((2, 8, 8, 4), np.float32, 0), random((4, 4, 4, 6), np.float32, 1)
    hlo = jax.jit(lambda l, r: cks_jax.conv_transpose(l, r, (2, 2), "SAME")).lower(
        l, r).as_text()
    assert "cks_conv_cpu" not in hlo
  assert cks_jax.explain(*shapes, dimension_numbers=DN, platform="tpu").backend == "portable"
  assert cks_jax.explain((1, 5, 5, 2), (3, 3, 2, 3), (2, 2), "SAME", dimension_numbers=DN,
                         platform="tpu").backend == "xla"
  assert cks_jax.explain(*shapes, dimension_numbers=DN, platform="tpu",
                         backend="ffi").backend == "unavailable"


def test_use_backend_is_part_of_the_jit_cache_key():
  # A function jitted under one backend is traced again under another (as under
  # jax's own contexts), not run on the trace of the first; so is a
  # jax.checkpoint inside it, whose own trace cache jax keys the same way. Per
  # thread: a thread started inside the context has the default.
  l, r = random((2, 8, 8, 4), np.float32, 0), random((4, 4, 4, 6), np.float32, 1)
  traced = []

  def g(l, r):
    traced.append(backends.current())
    return cks_jax.conv_transpose(l, r, (2, 2), "SAME", dimension_numbers=DN)

  f = jax.jit(g)
  outs = [f(l, r)]
  with cks_jax.use_backend("portable"):
    outs.append(f(l, r))
    assert "cks_conv_cpu" not in f.lower(l, r).as_text()
    seen = []
    t = threading.Thread(target=lambda: seen.append(backends.current()))
    t.start()
    t.join()
    assert seen == ["auto"]
  outs.append(f(l, r))
  assert "cks_conv_cpu" in f.lower(l, r).as_text()
  with cks_jax.use_backend("portable"):
    outs.append(f(l, r))
  assert traced == ["auto", "portable"]
  for o in outs[1:]:
    assert_close(o, outs[0], np.float32, "the same convolution")

  loss = jax.grad(jax.checkpoint(lambda l, r: jnp.sum(g(l, r) ** 2)), (0, 1))
  for backend, calls in (("xla", 0), ("ffi", 3), ("portable", 0), ("ffi", 3)):
    with cks_jax.use_backend(backend):
      text = jax.jit(loss).lower(l, r).as_text()
    assert text.count("@cks_conv_cpu(") == calls, backend


def test_unknown_backend():
  with pytest.raises(ValueError, match="backend must be one of"):
    cks_jax.conv_general_dilated(jnp.ones((1, 2, 5)), jnp.ones((3, 2, 3)), (1,), "SAME",
                                 backend="cudnn")
  with pytest.raises(ValueError, match="backend must be one of"):
    with cks_jax.use_backend("fast"):
      pass


# DCGAN's 3-channel and FSRCNN's 1-channel transposed layers (bench_shapes.json).
NARROW = [((16, 32, 32, 64), (4, 4, 64, 3), [(2, 2), (2, 2)], (2, 2)),
          ((8, 32, 32, 56), (9, 9, 56, 1), [(4, 6), (4, 6)], (3, 3))]


@pytest.mark.parametrize("isa", [1, 2])
def test_auto_routes_narrow_layers_by_instruction_set(isa, monkeypatch):
  # Float32 forwards of narrow layers run on the kernel's dot path whatever the instruction
  # set, bfloat16 ones on the portable path (XLA's convolution measured slower), float16 ones
  # on XLA's. On an AVX2 CPU without AVX-512, the float32 and bfloat16 filter gradient of the
  # one-feature layer stay on the kernel where it runs their taps as columns (as on AVX-512),
  # else go to the portable path (the tap-by-tap narrow path measured slower there).
  from cks_jax._src import backends
  monkeypatch.setattr(backends, "cpu_isa", lambda: isa)
  for lhs, rhs, pad, s in NARROW:
    for dtype in (np.float32, jnp.bfloat16, np.float16):
      e = cks_jax.explain(lhs, rhs, (1, 1), pad, lhs_dilation=s, dimension_numbers=DN,
                          dtype=dtype, gradients=True)
      grads = dict((name, g.backend) for name, g in e.gradients)
      ruled = dtype != np.float16  # the rule's dtypes: float32 and bfloat16, as measured
      if dtype == np.float32:
        assert e.backend == "cks-cpu" and "dot path" in e.reason, (lhs, e.reason)
      elif dtype == jnp.bfloat16:
        assert e.backend == "portable", (lhs, isa, e.reason)
        assert ("AVX2" if isa == 1 else "bfloat16 transposed forward") in e.reason, e.reason
      else:
        assert e.backend == "xla", (lhs, dtype, e.reason)
      assert grads["d lhs"] == "cks-cpu"  # 56 or 64 features: not narrow
      one = rhs[-1] == 1
      cols = dict(cks_jax.explain(lhs, rhs, (1, 1), pad, lhs_dilation=s, dimension_numbers=DN,
                                  dtype=dtype, gradients=True, backend="ffi").gradients)[
                                      "d rhs"].cpu_path == "narrow, taps as columns"
      portable = isa == 1 and ruled and one and not cols
      assert grads["d rhs"] == ("portable" if portable else "cks-cpu"), (lhs, dtype)
  # Wide layers stay on the kernel whatever the instruction set.
  assert cks_jax.explain((2, 8, 8, 16), (4, 4, 16, 8), (1, 1), [(2, 2), (2, 2)],
                         lhs_dilation=(2, 2), dimension_numbers=DN).backend == "cks-cpu"


def test_cpu_isa_is_the_kernels():
  """The kernels the CPU op picks are the ones /proc/cpuinfo says this CPU has. A build whose
  feature check reads nothing (zig's clang left __builtin_cpu_supports false everywhere) would
  run the portable kernel: right values, a fraction of the speed."""
  from cks_jax._src import backends
  assert backends.cpu_isa() in (0, 1, 2)
  try:
    with open("/proc/cpuinfo") as f:
      lines = [line for line in f if line.startswith("flags")]
  except OSError:
    pytest.skip("no /proc/cpuinfo to compare with")
  if not lines:
    pytest.skip("/proc/cpuinfo lists no x86 flags")
  flags = set(lines[0].split(":", 1)[1].split())
  want = 0
  if {"avx2", "fma"} <= flags:
    want = 2 if "avx512f" in flags else 1
  cap = os.environ.get("CKS_CPU_ISA")
  if cap in ("0", "1"):
    want = min(want, int(cap))
  has = sorted(flags & {"avx2", "fma", "avx512f"})
  assert backends.cpu_isa() == want, f"kernel ISA {backends.cpu_isa()}, /proc/cpuinfo has {has}"
  pairs = (want == 2 and {"avx512bw", "avx512vl", "avx512_bf16"} <= flags
           and os.environ.get("CKS_CPU_BF16_PAIRS") != "0")
  assert backends.cpu_bf16_pairs() == pairs
  bf16_dw = (want == 2 and {"avx512bw", "avx512vl"} <= flags
             and os.environ.get("CKS_CPU_BF16_PAIRS") != "0")
  assert backends.cpu_bf16_depthwise() == bf16_dw
  # AMX: the tile state is also granted by Linux (arch_prctl), which every kernel that lists the
  # flags does
  amx = pairs and {"amx_tile", "amx_bf16"} <= flags and os.environ.get("CKS_CPU_AMX") != "0"
  assert backends.cpu_bf16_amx() == amx


@pytest.mark.parametrize("case", range(len(NARROW)))
def test_narrow_layers_match_lax_on_every_route(case):
  # The routes that auto picks for narrow layers give lax's values, gradients included.
  lhs, rhs, pad, s = NARROW[case]  # full size: auto's choice needs 2**24 multiply-adds
  l, r = random(lhs, np.float32, 0), random(rhs, np.float32, 1)
  kw = dict(window_strides=(1, 1), padding=pad, lhs_dilation=s, dimension_numbers=DN)
  ref = lambda l, r: lax.conv_general_dilated(l, r, precision="highest", **kw)
  y_ref, vjp_ref = jax.vjp(ref, l, r)
  ct = random(y_ref.shape, np.float32, 2)
  for backend in ("portable", "ffi", "auto"):
    f = lambda l, r: cks_jax.conv_general_dilated(l, r, backend=backend, **kw)
    y, vjp = jax.vjp(f, l, r)
    assert_close(y, y_ref, np.float32, f"{backend} forward")
    for name, g, g_ref in zip(("d lhs", "d rhs"), vjp(ct), vjp_ref(ct)):
      assert_close(g, g_ref, np.float32, f"{backend} {name}")
  # bfloat16 under auto: the forward on the portable path (portable_16bit_rule)
  lb, rb = l.astype(jnp.bfloat16), r.astype(jnp.bfloat16)
  y = cks_jax.conv_general_dilated(lb, rb, **kw)
  assert y.dtype == jnp.bfloat16
  assert_close(y, ref(lb.astype(np.float32), rb.astype(np.float32)), jnp.bfloat16,
               "auto bfloat16 forward")


# WaveNet's k2 layer (bench_shapes.json): 4 x 4096 x 64 channels.
WAVENET = ((4, 4096, 64), (2, 64, 64))
DN1 = ("NWC", "WIO", "NWC")


def test_auto_keeps_1d_layers_on_the_kernel_in_every_dtype():
  # Large 1-D forwards and input gradients (no zeros for C-K-S to skip but rhs dilation's)
  # once went to XLA in bfloat16; the kernel now runs them faster (backends.py), so "auto"
  # keeps forwards, both gradients and transposed 1-D layers on it, widened or not.
  lhs, rhs = WAVENET
  for d in (1, 64):
    for dtype in (np.float32, jnp.bfloat16, np.float16):
      e = cks_jax.explain(lhs, rhs, (1,), [(d, 0)], rhs_dilation=(d,), dimension_numbers=DN1,
                          dtype=dtype, gradients=True)
      backends_used = {e.backend} | {g.backend for _, g in e.gradients}
      assert backends_used == {"cks-cpu"}, (d, dtype, e.reason, e.gradients)
  for dtype in (np.float32, jnp.bfloat16):
    up = cks_jax.explain((8, 2048, 64), (4, 64, 64), (1,), [(2, 2)], lhs_dilation=(2,),
                         dimension_numbers=DN1, dtype=dtype, gradients=True)  # transposed 1-D
    assert {up.backend} | {g.backend for _, g in up.gradients} == {"cks-cpu"}, dtype


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_16bit_1d_layers_match_lax_under_auto(dtype):
  # WaveNet's k2 d8 layer, which "auto" now runs on the kernel in 16 bits too (widened there):
  # values and both gradients against lax's in float64.
  lhs, rhs = WAVENET
  check(lhs, rhs, (1,), [(8, 0)], (1,), (8,), dtype=dtype, dimension_numbers=DN1)


def test_1d_layers_match_lax_under_auto():
  lhs, rhs = WAVENET
  l, r = random(lhs, np.float32, 0), random(rhs, np.float32, 1)
  kw = dict(window_strides=(1,), padding=[(8, 0)], rhs_dilation=(8,), dimension_numbers=DN1)
  ref = lambda l, r: lax.conv_general_dilated(l, r, precision="highest", **kw)
  y_ref, vjp_ref = jax.vjp(ref, l, r)
  y, vjp = jax.vjp(lambda l, r: cks_jax.conv_general_dilated(l, r, **kw), l, r)
  ct = random(y_ref.shape, np.float32, 2)
  assert_close(y, y_ref, np.float32, "forward")
  for name, g, g_ref in zip(("d lhs", "d rhs"), vjp(ct), vjp_ref(ct)):
    assert_close(g, g_ref, np.float32, name)


# Layouts that are not channels-last: "auto" on the CPU runs the kernel on channels-last copies
# (backends.wants_channels_last), "ffi" on the operands as given.
NCHW = ("NCHW", "OIHW", "NCHW")
LAYOUT_CASES = [
    # NCHW 3x3 SAME (the lax default layout)
    ((2, 8, 9, 7), (6, 8, 3, 3), ((1, 1), "SAME"), {"dimension_numbers": NCHW}),
    # NCHW k4 s2 transposed, two feature groups
    ((2, 8, 5, 6), (6, 4, 4, 4), ((1, 1), [(2, 2), (2, 2)], (2, 2)),
     {"dimension_numbers": NCHW, "feature_group_count": 2}),
    # a mixed layout: channels first in, features last out, a CHWN-like kernel; 1D and dilated
    ((3, 5, 17), (5, 4, 3), ((2,), [(2, 1)], (1,), (2,)),
     {"dimension_numbers": ("NCW", "IWO", "NWC")}),
    # NCDHW 3D depthwise
    ((1, 8, 5, 6, 4), (8, 1, 3, 3, 3), ((1, 1, 1), "SAME"),
     {"dimension_numbers": ("NCDHW", "OIDHW", "NCDHW"), "feature_group_count": 8}),
]


@pytest.mark.parametrize("case", range(len(LAYOUT_CASES)))
def test_auto_runs_other_layouts_channels_last(case):
  lhs_shape, rhs_shape, args, kw = LAYOUT_CASES[case]
  x, w = random(lhs_shape, np.float32, 0), random(rhs_shape, np.float32, 1)
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, *args, **kw)
  jpr = jax.make_jaxpr(jax.grad(lambda l, r: jnp.sum(f(l, r) ** 2), (0, 1)))(x, w).jaxpr
  convs = [e for e in jpr.eqns if e.primitive.name == "cks_conv"]
  assert len(convs) == 3
  nd = len(lhs_shape) - 2
  last = (0, nd + 1, *range(1, nd + 1))
  assert convs[0].params["dimension_numbers"] == lax.ConvDimensionNumbers(
      last, (nd + 1, nd, *range(nd)), last)
  assert any(e.primitive.name == "transpose" for e in jpr.eqns)
  # the same values and gradients as lax (and as the kernel on the layout as given)
  check(lhs_shape, rhs_shape, *args, dtype=np.float32, seed=3 + case, **kw)
  check(lhs_shape, rhs_shape, *args, dtype=np.float32, seed=3 + case, backend="ffi", **kw)
  # explain reports what runs: the channels-last problem on the CPU, the given one elsewhere
  e = cks_jax.explain(x, w, *args, platform="cpu", **kw)
  assert e.params["dimension_numbers"] == convs[0].params["dimension_numbers"]
  assert e.shapes[0] == tuple(lhs_shape) and e.backend == "cks-cpu"
  assert e.channels_last_copies == 4 * (x.size + w.size + f(x, w).size)
  assert "channels-last copies" in e.reason and "layout: run on channels-last" in str(e)
  g = cks_jax.explain(x, w, *args, platform="cpu", gradients=True, **kw).gradients
  assert [n for n, _ in g] == ["d lhs", "d rhs"]
  for platform, backend in (("tpu", None), ("cpu", "ffi"), ("cpu", "xla")):
    e = cks_jax.explain(x, w, *args, platform=platform, backend=backend, **kw)
    assert e.channels_last_copies == 0 and "layout:" not in str(e), (platform, backend)
    assert e.params["dimension_numbers"] != convs[0].params["dimension_numbers"]


def test_channels_last_layouts_are_left_alone():
  # NHWC/HWIO (and any layout under backend="ffi") runs as given: no transpose
  x, w = jnp.zeros((2, 6, 6, 4)), jnp.zeros((3, 3, 4, 5))
  for dn, backend in ((("NHWC", "HWIO", "NHWC"), None), (NCHW, "ffi")):
    if dn == NCHW:
      x, w = jnp.zeros((2, 4, 6, 6)), jnp.zeros((5, 4, 3, 3))
    jpr = jax.make_jaxpr(lambda l, r: cks_jax.conv_general_dilated(
        l, r, (1, 1), "SAME", dimension_numbers=dn, backend=backend))(x, w).jaxpr
    assert [e.primitive.name for e in jpr.eqns] == ["cks_conv"], dn
