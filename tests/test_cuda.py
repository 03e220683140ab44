"""The CUDA op, verified without a GPU (DESIGN.md section 4), and on one when present.

1. It compiles: the library exists whenever nvcc was found at install time.
2. It lowers: every public function, its grad, vmap and jvp, cross-lowered for
   platform "cuda", is made of cks CUDA custom calls and no convolution.
3. Its kernel bodies run on the CPU: the host harness runs the CUDA kernel's
   phases block by block, thread by thread, barrier by barrier, against lax.
   bfloat16 and float16 take the tensor-core path, whose warp-level
   mma.sync the harness runs through a host model of the instruction; the
   fragment layout both rely on is checked against the PTX ISA's tables.
"""
import dataclasses
import itertools
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cks_jax
from cks_jax._src import cuda, shapes
from oracle import assert_close, random

needs_lib = pytest.mark.skipif(not cuda.available(),
                               reason="CUDA library not built (no nvcc at install time)")
has_gpu = any(d.platform == "gpu" for d in jax.devices()) if jax.default_backend() == "gpu" \
    else False
needs_gpu = pytest.mark.skipif(not has_gpu, reason="no GPU on this machine")


def test_library_built_when_nvcc_present():
  if shutil.which("nvcc") is None:
    pytest.skip("no nvcc on this machine: the CPU-only package is expected")
  assert cuda.available(), "nvcc is present but libcks_cuda.so was not built"
  assert "cuda" in cks_jax.kernel_platforms()


# ---------------------------------------------------------------- 3. harness
def harness(lhs_shape, rhs_shape, ws, padding, ld=None, rd=None, dn=None, g=1, bg=1,
            dtype=np.float64, out_dtype=None):
  nd = len(lhs_shape) - 2
  lhs, rhs = random(lhs_shape, dtype, 0), random(rhs_shape, dtype, 1)
  spec = shapes.canonicalize(lhs.shape, rhs.shape, ws, padding, ld, rd, dn, g, bg)
  kw = dict(window_strides=spec.window_strides, padding=spec.padding,
            lhs_dilation=spec.lhs_dilation, rhs_dilation=spec.rhs_dilation,
            dimension_numbers=spec.dimension_numbers, feature_group_count=g,
            batch_group_count=bg)
  out_dtype = np.dtype(out_dtype or dtype)
  ref = lax.conv_general_dilated(lhs.astype(np.float64), rhs.astype(np.float64), **kw)
  out, path = cuda.emulate(np.asarray(lhs), np.asarray(rhs), ref.shape, out_dtype,
                           return_path=True, **kw)
  what = f"harness {np.dtype(dtype).name} {lhs_shape} {rhs_shape} {kw}"
  expected = "mma" if np.dtype(dtype) in TENSOR_CORE else "simt"
  assert path == (expected if ref.size else None), what  # an empty output runs nothing
  assert_close(out, ref, dtype, what)
  del nd


# The input dtypes that run on tensor cores (mma.sync, float32 accumulation).
TENSOR_CORE = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
HARNESS_DTYPES = [np.float64, jnp.bfloat16, jnp.float16]


@needs_lib
@pytest.mark.parametrize("dtype", HARNESS_DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("s,a,d", list(itertools.product([1, 2, 3], [1, 2, 4], [1, 2, 3])))
def test_harness_1d_grid(s, a, d, dtype):
  # Reductions of 3 * taps (never a multiple of 16) and 4 output features
  # (not a multiple of 8): every tile has reduction and column tails.
  for k, pad in [(1, (0, 0)), (3, (1, 2)), (4, (-1, 3)), (9, (4, 4))]:
    harness((2, 3, 11), (4, 3, k), (s,), [pad], (a,), (d,), dtype=dtype)


@needs_lib
@pytest.mark.parametrize("case", [
    dict(lhs=(2, 3, 13, 10), rhs=(5, 3, 3, 3), ws=(1, 1), padding="SAME"),
    dict(lhs=(2, 3, 13, 10), rhs=(5, 3, 2, 5), ws=(2, 3), padding="VALID", rd=(2, 1)),
    dict(lhs=(2, 4, 7, 6), rhs=(3, 4, 4, 4), ws=(1, 1), padding=[(2, 2), (2, 2)], ld=(2, 2)),
    dict(lhs=(2, 4, 7, 6), rhs=(3, 4, 3, 2), ws=(1, 1), padding=[(-2, 1), (1, -3)], ld=(3, 2)),
    dict(lhs=(2, 6, 9, 8), rhs=(6, 2, 3, 3), ws=(2, 2), padding=[(1, 1), (2, 0)], ld=(2, 2),
         rd=(2, 1), g=3),
    dict(lhs=(4, 3, 9, 8), rhs=(8, 3, 3, 2), ws=(2, 1), padding=[(1, 1), (0, 2)], ld=(2, 1),
         bg=2),
    dict(lhs=(2, 9, 8, 4), rhs=(3, 2, 4, 5), ws=(2, 1), padding=[(2, 3), (1, -1)], ld=(2, 3),
         rd=(3, 2), dn=("NHWC", "HWIO", "NHWC")),
    dict(lhs=(4, 9, 8, 2), rhs=(5, 3, 2, 4), ws=(1, 2), padding=[(1, 2), (0, 1)], ld=(1, 2),
         dn=("CHWN", "OHWI", "NWHC")),
    # several row, column and reduction tiles
    dict(lhs=(3, 70, 9, 8), rhs=(130, 70, 3, 3), ws=(1, 1), padding="SAME"),
    dict(lhs=(2, 3, 6, 5, 4), rhs=(4, 3, 3, 3, 3), ws=(1, 1, 1), padding="SAME"),
    dict(lhs=(2, 3, 4, 5, 3), rhs=(4, 3, 4, 2, 3), ws=(1, 1, 1),
         padding=[(3, 3), (1, 2), (2, 2)], ld=(2, 2, 2)),
    dict(lhs=(1, 4, 7, 6, 5), rhs=(2, 4, 3, 3, 2), ws=(2, 1, 2),
         padding=[(2, 1), (0, 0), (1, 1)], rd=(2, 2, 1)),
])
@pytest.mark.parametrize("dtype", HARNESS_DTYPES, ids=lambda t: np.dtype(t).name)
def test_harness_configurations(case, dtype):
  harness(case["lhs"], case["rhs"], case["ws"], case["padding"], case.get("ld"), case.get("rd"),
          case.get("dn"), case.get("g", 1), case.get("bg", 1), dtype=dtype)


@needs_lib
@pytest.mark.parametrize("dtype,out", [(np.float32, None), (jnp.bfloat16, None),
                                       (jnp.float16, None), (jnp.bfloat16, np.float32),
                                       (jnp.float16, np.float32)])
def test_harness_dtypes(dtype, out):
  harness((2, 40, 7, 6), (6, 40, 4, 3), (1, 1), [(2, 2), (1, 1)], (2, 2), None, dtype=dtype,
          out_dtype=out)


# ---------------------------------------------------------------- 3b. tensor cores
def isa_fragment(operand, lane, i):
  """(row, col) of element i of a lane's m16n8k16 .f16/.bf16 fragment, as the
  PTX ISA tables state it ("Matrix Fragments for mma.m16n8k16 with floating
  point type"), written independently of ffi/cuda/mma_layout.cuh."""
  group, tig = lane >> 2, lane % 4
  if operand == "a":  # 16 x 16, a0..a7
    row = group if (0 <= i < 2 or 4 <= i < 6) else group + 8
    col = tig * 2 + (i & 1) if i < 4 else tig * 2 + (i & 1) + 8
  elif operand == "b":  # 16 x 8, b0..b3
    row = tig * 2 + (i & 1) if i < 2 else tig * 2 + (i & 1) + 8
    col = group
  else:  # C and D, 16 x 8, c0..c3
    row = group if i < 2 else group + 8
    col = tig * 2 + (i & 1)
  return row, col


FRAGMENTS = {"a": (8, (16, 16)), "b": (4, (16, 8)), "c": (4, (16, 8))}


@needs_lib
@pytest.mark.parametrize("operand", list(FRAGMENTS))
def test_mma_fragment_layout_matches_the_ptx_isa(operand):
  n, shape = FRAGMENTS[operand]
  got = cuda.mma_layout(operand)
  want = np.array([[isa_fragment(operand, lane, i) for i in range(n)] for lane in range(32)])
  np.testing.assert_array_equal(got, want)
  # The 32 lanes hold every element of the matrix exactly once.
  cells = {tuple(rc) for rc in got.reshape(-1, 2)}
  assert len(cells) == 32 * n == shape[0] * shape[1]
  assert all(0 <= r < shape[0] and 0 <= c < shape[1] for r, c in cells)


def _fragments(matrix, operand):
  """The lanes' 32-bit registers for `matrix` (16-bit values), packed by the
  ISA's rule: element 2r in the low half of register r, 2r+1 in the high."""
  n, _ = FRAGMENTS[operand]
  bits = np.asarray(matrix).view(np.uint16).astype(np.uint32)
  regs = np.zeros((32, n // 2), np.uint32)
  for lane in range(32):
    for i in range(n):
      regs[lane, i // 2] |= bits[isa_fragment(operand, lane, i)] << (16 * (i % 2))
  return regs


@needs_lib
@pytest.mark.parametrize("dtype", TENSOR_CORE, ids=str)
def test_mma_model_is_a_16x8x16_product(dtype):
  # The host model of one instruction, fed registers built here from the ISA
  # tables, computes D = A B + C in float32 and returns D in the C layout.
  a, b = random((16, 16), dtype, 0), random((16, 8), dtype, 1)
  c = np.asarray(random((16, 8), np.float32, 2))
  c_regs = np.array([[c[isa_fragment("c", lane, i)] for i in range(4)] for lane in range(32)])
  d_regs = cuda.mma_model(dtype, _fragments(a, "a"), _fragments(b, "b"), c_regs)
  d = np.zeros((16, 8), np.float32)
  for lane in range(32):
    for i in range(4):
      d[isa_fragment("c", lane, i)] = d_regs[lane, i]
  ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64) + c
  assert_close(d, ref, np.float32, f"mma model {dtype}")
  # It reads each half of a register: swapping them changes the product.
  a_regs = _fragments(a, "a")
  swapped = (a_regs >> 16) | (a_regs << 16)
  assert np.abs(cuda.mma_model(dtype, swapped, _fragments(b, "b"), c_regs) - d_regs).max() > 0.1


@needs_lib
@pytest.mark.parametrize("dtype", TENSOR_CORE, ids=str)
def test_mma_block_tile_through_fragment_loads(dtype):
  # A whole block tile as the harness runs it: shared tiles (as load_tiles
  # fills them), every warp's load_fragments, the model, and the
  # accumulators read back through the output layout, equal A B + C.
  bm, bn, bk = cuda.block_tile()
  a, b = np.asarray(random((bm, bk), dtype, 3)), np.asarray(random((bk, bn), dtype, 4))
  c = np.asarray(random((bm, bn), np.float32, 5))
  d = cuda.mma_block(a, b, c)
  ref = a.astype(np.float64) @ b.astype(np.float64) + c
  assert_close(d, ref, np.float32, f"mma block tile {dtype}")


def _eval_with_harness(jaxpr, consts, *args):
  """Evaluates a jaxpr, running every cks_conv through the CUDA host harness."""
  from cks_jax._src.primitive import cks_conv_p
  env = {}
  from jax.extend.core import Literal
  read = lambda v: v.val if isinstance(v, Literal) else env[v]
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  count = 0
  for e in jaxpr.eqns:
    ins = [read(v) for v in e.invars]
    if e.primitive is cks_conv_p:
      aval = e.outvars[0].aval
      params = {k: v for k, v in e.params.items() if k != "out_dtype"}
      outs = [jnp.asarray(cuda.emulate(np.asarray(ins[0]), np.asarray(ins[1]), aval.shape,
                                       aval.dtype, **params))]
      count += 1
    elif "jaxpr" in e.params:  # pjit / closed_call: recurse
      sub = e.params["jaxpr"]
      outs, n = _eval_with_harness(sub.jaxpr, sub.consts, *ins)
      count += n
    else:
      outs = e.primitive.bind(*ins, **e.params)
      outs = outs if e.primitive.multiple_results else [outs]
    for v, x in zip(e.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars], count


@needs_lib
@pytest.mark.parametrize("kind", ["strided", "transposed", "dilated"])
def test_harness_runs_the_gradient_convolutions(kind):
  # The convolutions jax.grad emits (KS-deconv d-lhs, Sk-dilated d-rhs, ...)
  # go through the harness too: a whole VJP evaluated on the CUDA kernel body.
  dn = ("NHWC", "HWIO", "NHWC")
  kw = {"strided": dict(window_strides=(2, 2), padding="SAME"),
        "transposed": dict(window_strides=(1, 1), padding=[(2, 2), (2, 2)], lhs_dilation=(2, 2)),
        "dilated": dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 3))}[kind]
  l, r = random((2, 8, 9, 4), np.float64, 0), random((4, 4, 4, 3), np.float64, 1)
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, dimension_numbers=dn, **kw)
  g = lambda l, r: lax.conv_general_dilated(l, r, dimension_numbers=dn, **kw)
  ct = random(jax.eval_shape(f, l, r).shape, np.float64, 2)
  vjp = lambda l, r, c: (f(l, r),) + tuple(jax.vjp(f, l, r)[1](c))
  closed = jax.make_jaxpr(vjp)(l, r, ct)
  outs, n = _eval_with_harness(closed.jaxpr, closed.consts, l, r, ct)
  assert n == 4  # the value twice (our f and the vjp's forward), d lhs, d rhs
  refs = (g(l, r),) + tuple(jax.vjp(g, l, r)[1](ct))
  for name, a, b in zip(("value", "d lhs", "d rhs"), outs, refs):
    assert_close(a, b, np.float64, f"harness {name}")


# ---------------------------------------------------------------- 2. lowering
DN = ("NHWC", "HWIO", "NHWC")
# backend="ffi": "auto" does not run the CUDA kernel (backends.AUTO_KERNEL_PLATFORMS).
PUBLIC = {
    "conv_general_dilated": (lambda l, r: cks_jax.conv_general_dilated(
        l, r, (1, 1), [(2, 2), (2, 2)], (2, 2), (1, 1), DN, backend="ffi"),
                             (2, 8, 8, 4), (4, 4, 4, 6)),
    "conv": (lambda l, r: cks_jax.conv(l, r, (2, 2), "SAME", backend="ffi"),
             (2, 4, 8, 8), (6, 4, 3, 3)),
    "conv_with_general_padding": (lambda l, r: cks_jax.conv_with_general_padding(
        l, r, (1, 1), [(1, 1), (2, 2)], (1, 1), (2, 2), backend="ffi"),
                                  (2, 4, 8, 8), (6, 4, 3, 3)),
    "conv_transpose": (lambda l, r: cks_jax.conv_transpose(l, r, (2, 2), "SAME", backend="ffi"),
                       (2, 8, 8, 4), (4, 4, 4, 6)),
}


def _transforms(f, lhs_shape, rhs_shape):
  l, r = jnp.ones(lhs_shape, jnp.float32), jnp.ones(rhs_shape, jnp.float32)
  loss = lambda l, r: jnp.sum(f(l, r) ** 2)
  return {
      "fwd": (f, (l, r)),
      "grad": (jax.grad(loss, (0, 1)), (l, r)),
      "vmap": (jax.vmap(f, (0, None)), (jnp.stack([l, l]), r)),
      "vmap_grad": (jax.vmap(jax.grad(loss), (None, 0)), (l, jnp.stack([r, r]))),
      "jvp": (lambda l, r: jax.jvp(f, (l, r), (l, r)), (l, r)),
  }


def _convolutions(text):
  return re.findall(r"stablehlo\.convolution", text)


@needs_lib
@pytest.mark.parametrize("name", list(PUBLIC))
def test_cross_lowering_for_cuda(name):
  f, ls, rs = PUBLIC[name]
  for tname, (fn, args) in _transforms(f, ls, rs).items():
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "cks_conv_cuda" in text, f"{name}/{tname}: no cks CUDA custom call"
    assert not _convolutions(text), f"{name}/{tname}: an XLA convolution survived"
    assert "cks_conv_cpu" not in text


@needs_lib
def test_export_for_cpu_and_cuda_together():
  f, ls, rs = PUBLIC["conv_transpose"]
  g = jax.grad(lambda l, r: jnp.sum(f(l, r) ** 2), (0, 1))
  # cks custom calls carry no cross-version compatibility guarantee, as for
  # any FFI extension: the export says so explicitly.
  checks = [jax.export.DisabledSafetyCheck.custom_call(t)
            for t in ("cks_conv_cpu", "cks_conv_cuda")]
  exp = jax.export.export(jax.jit(g), platforms=("cpu", "cuda"), disabled_checks=checks)(
      jax.ShapeDtypeStruct(ls, jnp.float32), jax.ShapeDtypeStruct(rs, jnp.float32))
  text = exp.mlir_module()
  assert "cks_conv_cuda" in text and "cks_conv_cpu" in text and not _convolutions(text)
  # The exported artifact runs here on the CPU and matches lax.
  l, r = random(ls, np.float32, 0), random(rs, np.float32, 1)
  ref = jax.grad(lambda l, r: jnp.sum(lax.conv_transpose(l, r, (2, 2), "SAME") ** 2), (0, 1))(
      l, r)
  for a, b in zip(exp.call(l, r), ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-3)


def test_explain_reports_the_cuda_backend():
  e = cks_jax.explain((2, 8, 8, 4), (4, 4, 4, 6), (1, 1), "SAME", dimension_numbers=DN,
                      platform="cuda", backend="ffi")
  if cuda.available():
    assert e.backend == "cks-cuda"
  else:
    assert e.backend == "unavailable" and "nvcc" in e.reason


@pytest.mark.parametrize("lhs_dilation,backend", [((1, 1), "xla"), ((2, 2), "portable")])
def test_auto_on_cuda_does_not_run_the_kernel(lhs_dilation, backend):
  # Measured slower than XLA's convolution on an H200 (backends.AUTO_KERNEL_PLATFORMS):
  # "auto" makes the kernel-less platforms' choice, and explain says why.
  pad = [(2, 2), (2, 2)]
  e = cks_jax.explain((2, 8, 8, 4), (4, 4, 4, 6), (1, 1), pad, lhs_dilation=lhs_dilation,
                      dimension_numbers=DN, platform="cuda")
  assert e.backend == backend
  assert ("'auto' does not run it" if cuda.available() else "not built") in e.reason
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), pad, lhs_dilation, None, DN)
  l, r = jnp.ones((2, 8, 8, 4)), jnp.ones((4, 4, 4, 6))
  g = jax.grad(lambda l, r: jnp.sum(f(l, r) ** 2), (0, 1))
  for fn in (f, g):
    text = jax.jit(fn).trace(l, r).lower(lowering_platforms=("cuda",)).as_text()
    assert "cks_conv_cuda" not in text


# ---------------------------------------------------------------- on a GPU
@needs_gpu
@pytest.mark.parametrize("name", list(PUBLIC))
def test_gpu_values_and_gradients(name):
  f, ls, rs = PUBLIC[name]
  l, r = random(ls, np.float32, 0), random(rs, np.float32, 1)
  ref_f = {"conv_general_dilated": lambda l, r: lax.conv_general_dilated(
      l, r, (1, 1), [(2, 2), (2, 2)], (2, 2), (1, 1), DN),
           "conv": lambda l, r: lax.conv(l, r, (2, 2), "SAME"),
           "conv_with_general_padding": lambda l, r: lax.conv_with_general_padding(
               l, r, (1, 1), [(1, 1), (2, 2)], (1, 1), (2, 2)),
           "conv_transpose": lambda l, r: lax.conv_transpose(l, r, (2, 2), "SAME")}[name]
  hlo = jax.jit(f).lower(l, r).compile().as_text()
  assert "cks_conv_cuda" in hlo
  assert_close(jax.jit(f)(l, r), ref_f(l, r), np.float32, "gpu value")
  loss = lambda fn: (lambda l, r: jnp.sum(fn(l, r) ** 2))
  for a, b in zip(jax.grad(loss(f), (0, 1))(l, r), jax.grad(loss(ref_f), (0, 1))(l, r)):
    assert_close(a, b, np.float32, "gpu gradient")


@needs_gpu
@pytest.mark.parametrize("dtype", TENSOR_CORE, ids=str)
def test_gpu_tensor_core_dtypes(dtype):
  # The tensor-core path on the real instruction, against lax in float64.
  f, ls, rs = PUBLIC["conv_general_dilated"]
  l, r = random(ls, dtype, 0), random(rs, dtype, 1)
  assert "cks_conv_cuda" in jax.jit(f).lower(l, r).compile().as_text()
  ref = lax.conv_general_dilated(np.asarray(l, np.float64), np.asarray(r, np.float64), (1, 1),
                                 [(2, 2), (2, 2)], (2, 2), (1, 1), DN)
  assert_close(jax.jit(f)(l, r), ref, dtype, "gpu tensor-core value")


@needs_lib
def test_launch_grid_is_the_kernels():
  # launch_grid asks the library (conv_cuda.cu's grid_of over make_launches), so the trace-time
  # check and the launch share one formula: x = row tiles of the largest phase, y = output-feature
  # tiles x groups, z = phases of a launch (at most 32).
  bm, bn, _ = cuda.block_tile()

  def grid(lhs_shape, rhs_shape, strides, padding, lhs_dilation=(1, 1), feature_group_count=1):
    spec = shapes.canonicalize(lhs_shape, rhs_shape, strides, padding, lhs_dilation, (1, 1), DN,
                               feature_group_count, 1)
    params = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    return cuda.launch_grid(lhs_shape, rhs_shape, shapes.out_shape(lhs_shape, rhs_shape, spec),
                            params)

  # k2 s2 transposed: 4 phases of 2 x 40 x 40 rows; 130 features: 3 tiles
  assert grid((2, 40, 40, 16), (2, 2, 16, 130), (1, 1), [(1, 1), (1, 1)], (2, 2)) == (
      (-(-2 * 40 * 40 // bm), -(-130 // bn), 4), True)
  # a plain 3x3: one phase of every output row; 3 groups of 20 features: one tile each
  assert grid((1, 9, 9, 30), (3, 3, 10, 60), (1, 1), "SAME", feature_group_count=3) == (
      (-(-81 // bm), 3, 1), True)
  # 6 x 6 = 36 phases of a k6 s6 transposed conv: launches of 32 and 4 classes
  assert grid((1, 2, 2, 8), (6, 6, 8, 8), (1, 1), [(5, 5), (5, 5)], (6, 6))[0][2] == 32
  # depthwise: one grid row per group
  assert grid((1, 3, 3, 65535), (3, 3, 1, 65535), (1, 1), "SAME",
              feature_group_count=65535) == ((1, 65535, 1), True)
  assert grid((1, 3, 3, 65536), (3, 3, 1, 65536), (1, 1), "SAME",
              feature_group_count=65536) == ((1, 65536, 1), False)


@needs_lib
def test_a_grid_cuda_cannot_launch_is_refused_at_trace_time():
  # g depthwise groups need g grid rows (one 64-feature tile each); CUDA allows 65535. More are
  # refused in Python while lowering, not inside XLA. Lowered only, never allocated.
  def lower(g, backend):
    lhs = jax.ShapeDtypeStruct((1, 3, 3, g), jnp.float32)
    rhs = jax.ShapeDtypeStruct((3, 3, 1, g), jnp.float32)
    f = lambda l, r: cks_jax.conv_general_dilated(
        l, r, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=g, backend=backend)
    return jax.jit(f).trace(lhs, rhs).lower(lowering_platforms=("cuda",)).as_text()

  with pytest.raises(ValueError, match="65535"):
    lower(65536, "ffi")
  assert "cks_conv_cuda" not in lower(65536, "auto")
  assert "cks_conv_cuda" in lower(65535, "ffi")
