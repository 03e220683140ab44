"""The portable backend (C-K-S in plain lax ops) against jax.lax: values, VJPs,
geometry equal to the C++ header's, and lowering free of dilated convolutions."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import cks_jax
from cks_jax._src import ffi, geometry, shapes
import oracle
from oracle import assert_close, case, random
from test_conv import DN, GRID_1D, conv_case, shapes_for


def portable_fn(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                batch_group_count=1, out_dtype=None, dtype=np.float64):
  """The public op on the portable backend: its derivatives are the primitive's
  transposes, each again lowered to the portable decomposition."""
  del lhs_shape, rhs_shape, dtype
  return functools.partial(
      cks_jax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, preferred_element_type=out_dtype,
      backend="portable")


# The public op on the portable backend against lax, values and VJPs.
check = functools.partial(oracle.check, backend="portable")
check_many = functools.partial(oracle.check_many, backend="portable")


# --- values and gradients ----------------------------------------------------
@pytest.mark.parametrize("s,a,d,k", GRID_1D)
def test_1d_grid(s, a, d, k):
  check_many([case((2, 3, 11), (4, 3, k), (s,), (pad,), (a,), (d,), seed=i)
              for i, pad in enumerate([(k // 2, k - 1 - k // 2), (-1, 2), (3, 0), (6, -3)])])


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("s,d", [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("k", [(1, 1), (3, 3), (7, 4)])
def test_2d_strided_dilated(padding, s, d, k):
  check((2, 3, 13, 10), (5, 3) + k, (s, s + 1), padding, rhs_dilation=(d, 1))


@pytest.mark.parametrize("a", [(2, 2), (3, 2), (4, 1)])
@pytest.mark.parametrize("pad", [((0, 0), (0, 0)), ((2, 1), (3, 3)), ((-2, 1), (1, -3))])
@pytest.mark.parametrize("k", [(3, 3), (4, 4), (2, 5)])
def test_2d_transposed(a, pad, k):
  check((2, 4, 7, 6), (3, 4) + k, (1, 1), pad, lhs_dilation=a)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_dimension_numbers(nd, which):
  dn = DN[nd][which]
  lhs, rhs = shapes_for(nd, dn, 2, 4, 3, (7, 6, 5)[:nd], (3, 2, 4)[:nd])
  # XLA:CPU aborts compiling its own 3D gradient with strides and dilations.
  check(lhs, rhs, (2,) * nd, [(1, 2)] * nd, (2,) + (1,) * (nd - 1), (1,) * (nd - 1) + (2,),
        dimension_numbers=dn, oracle="direct" if nd == 3 else "lax")


@pytest.mark.parametrize("case", [
    dict(lhs=(2, 3, 6, 5, 4), rhs=(4, 3, 3, 3, 3), args=((1, 1, 1), "SAME")),
    dict(lhs=(2, 3, 4, 5, 3), rhs=(4, 3, 4, 2, 3),
         args=((1, 1, 1), [(3, 3), (1, 2), (2, 2)], (2, 2, 2))),
    dict(lhs=(1, 4, 7, 6, 5), rhs=(2, 4, 3, 3, 2),
         args=((2, 1, 2), [(2, 1), (0, -1), (1, 1)], (1, 1, 1), (2, 2, 1))),
    dict(lhs=(2, 4, 5, 4, 4), rhs=(4, 2, 2, 2, 2), args=((1, 1, 1), [(1, 1)] * 3, (2, 2, 2)),
         kw=dict(feature_group_count=2)),
])
def test_3d(case):
  check(case["lhs"], case["rhs"], *case["args"], oracle="direct", **case.get("kw", {}))


@pytest.mark.parametrize("groups", [2, 3, 6])
@pytest.mark.parametrize("a,s,d", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 3)])
def test_feature_groups(groups, a, s, d):
  check((2, 6, 9, 8), (6, 6 // groups, 3, 3), (s, s), [(1, 1), (2, 0)], (a, a), (d, 1),
        feature_group_count=groups)


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("a,s,d", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_batch_groups(groups, a, s, d):
  check((4, 3, 9, 8), (8, 3, 3, 2), (s, 1), [(1, 1), (0, 2)], (a, 1), (1, d),
        batch_group_count=groups)


def test_zero_size_and_empty_phases():
  check((0, 3, 8, 8), (4, 3, 3, 3), (1, 1), "SAME")
  check((2, 0, 8, 8), (4, 0, 3, 3), (1, 1), "SAME")
  check((2, 3, 8, 8), (0, 3, 3, 3), (1, 1), "SAME")
  check((2, 3, 0, 8), (4, 3, 3, 3), (1, 1), "SAME")
  check((2, 3, 2, 8), (4, 3, 5, 3), (1, 1), "VALID")  # empty output
  # Outputs far from the input have no real tap; phases with no tap at all.
  check((1, 2, 3), (2, 2, 2), (1,), [(6, 6)], (3,), (2,))
  check((1, 2, 4, 4), (2, 2, 2, 2), (3, 3), [(5, 7), (6, 5)], (2, 3))
  check((1, 2, 5), (2, 2, 1), (1,), [(1, 1)], (4,))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, jnp.float16])
def test_dtypes(dtype):
  check((2, 4, 7, 6), (3, 4, 4, 4), (1, 1), [(2, 2), (2, 1)], (2, 2), (1, 1), dtype=dtype,
        grads=dtype == np.float32)
  # A 16-bit input with a float32 result, as lax's preferred_element_type.
  lhs, rhs = random((2, 4, 7, 6), dtype, 0), random((3, 4, 3, 3), dtype, 1)
  f = portable_fn(lhs.shape, rhs.shape, (2, 1), [(1, 1)] * 2, (1, 2), dtype=dtype,
                  out_dtype=np.float32)
  ref = lax.conv_general_dilated(lhs, rhs, (2, 1), [(1, 1)] * 2, (1, 2),
                                 preferred_element_type=np.float32)
  out = jax.jit(f)(lhs, rhs)
  assert out.dtype == np.float32
  assert_close(out, ref, np.float32 if dtype == np.float32 else dtype, "preferred f32")


def test_forward_mode_and_second_order():
  lhs, rhs = random((1, 2, 6, 5), np.float64, 0), random((3, 2, 3, 2), np.float64, 1)
  args = ((2, 1), [(1, 2), (0, 1)], (1, 2), (2, 1))
  f = portable_fn(lhs.shape, rhs.shape, *args)
  f_lax = lambda l, r: lax.conv_general_dilated(l, r, *args)
  tl, tr = random(lhs.shape, np.float64, 2), random(rhs.shape, np.float64, 3)
  for a, b in zip(jax.jvp(f, (lhs, rhs), (tl, tr)), jax.jvp(f_lax, (lhs, rhs), (tl, tr))):
    assert_close(a, b, np.float64, "jvp")
  h = lambda fn: jax.grad(lambda l: jnp.sum(jnp.sin(fn(l, rhs))))(lhs)
  assert_close(jax.jacfwd(lambda l: h(f))(lhs), jax.jacfwd(lambda l: h(f_lax))(lhs),
               np.float64, "hessian")


@settings(max_examples=80, deadline=None)
@given(conv_case())
def test_property_against_lax(case):
  s, pad, a, d, dn, g, bg = case["args"]
  check(case["lhs"], case["rhs"], s, pad, a, d, dn, g, bg)


# --- geometry: the Python mirror equals the C++ header ---------------------------
@st.composite
def dim_case(draw):
  N, K = draw(st.integers(0, 12)), draw(st.integers(0, 6))
  s, a, d = (draw(st.integers(1, 5)) for _ in range(3))
  lo, hi = draw(st.integers(-4, 8)), draw(st.integers(-4, 8))
  n = shapes.dilate_dim(N, a) + lo + hi
  return N, K, shapes.stride_dim(max(n, 0), shapes.dilate_dim(K, d), s), s, a, d, lo


@settings(max_examples=400, deadline=None)
@given(dim_case())
def test_geometry_matches_cpp(dm):
  dm = geometry.Dim(*dm)
  phases = geometry.phases(dm)
  cpp_phases, cpp_segments = ffi.extension().geometry_1d(*dm)
  assert [tuple(p) for p in phases] == [tuple(p) for p in cpp_phases]
  assert [tuple(s) for s in geometry.segments(dm, phases)] == [tuple(s) for s in cpp_segments]


# --- lowering: no dilated convolution, forward or backward -------------------
def _conv_dilations(text):
  """(lhs_dilate, rhs_dilate) of every stablehlo.convolution in the text."""
  out = []
  for line in text.splitlines():
    if "stablehlo.convolution" not in line:
      continue
    dil = {}
    for name in ("lhs_dilate", "rhs_dilate"):
      m = re.search(name + r"\s*=\s*\[([^\]]*)\]", line)
      dil[name] = tuple(int(v) for v in m.group(1).split(",")) if m else ()
    out.append((dil["lhs_dilate"], dil["rhs_dilate"]))
  return out


@pytest.mark.parametrize("args", [
    ((1, 1), [(2, 2), (2, 2)], (2, 2), (1, 1)),   # transposed (KS-deconv)
    ((2, 2), [(1, 1), (1, 1)], (1, 1), (1, 1)),   # strided (d rhs is dilated in lax)
    ((1, 1), [(2, 2), (2, 2)], (1, 1), (2, 2)),   # atrous (Sk-dilated)
    ((2, 3), [(1, -1), (3, 2)], (3, 2), (2, 3)),  # everything at once
])
def test_lowering_has_no_dilated_convolution(args):
  lhs, rhs = jnp.ones((2, 9, 8, 4), jnp.float32), jnp.ones((4, 4, 4, 3), jnp.float32)
  f = portable_fn(lhs.shape, rhs.shape, *args, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                  dtype=np.float32)
  loss = lambda l, r: jnp.sum(f(l, r) ** 2)
  for fn in (f, jax.grad(loss, (0, 1)), jax.grad(lambda l, r: jnp.sum(jax.grad(loss)(l, r))),
             lambda l, r: jax.jvp(f, (l, r), (l, r))):
    text = jax.jit(fn).trace(lhs, rhs).lower(lowering_platforms=("tpu",)).as_text()
    convs = _conv_dilations(text)
    # Transposed convolutions lower to GEMMs (the col2im and gathered forms).
    assert convs or "stablehlo.dot_general" in text, "expected convolutions or GEMMs"
    for lhs_dil, rhs_dil in convs:
      assert set(lhs_dil) <= {1} and set(rhs_dil) <= {1}, (lhs_dil, rhs_dil)
  # The reference does have them, so the parse is not vacuous.
  ref = jax.jit(jax.grad(lambda l, r: jnp.sum(lax.conv_general_dilated(
      l, r, *args, dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2), (0, 1)))
  text = ref.trace(lhs, rhs).lower(lowering_platforms=("tpu",)).as_text()
  assert any(set(a) - {1} or set(b) - {1} for a, b in _conv_dilations(text))


# --- the shape-specific emissions of portable.py ------------------------------
def test_special_emissions_match_lax(monkeypatch):
  # Each special path (col2im tap GEMM, gathered GEMM, merged phases,
  # shifted-kernel GEMM, batch groups as feature groups) runs for these
  # configurations, and values and VJPs still match lax. Shapes are unique to
  # this test so no cached lowering hides a path.
  from cks_jax._src import portable
  ran = {name: 0 for name in ("_tap_gemm", "_gathered_gemm", "_per_position_dot",
                              "_stacked_kernel_dot", "_merged_phases", "_shifted_kernel_dot",
                              "_batch_groups_to_features", "_tiled_tap_dot",
                              "_tiled_gathered_dot", "_space_to_depth_dot", "_im2col_dot",
                              "_window_matrix_dot")}
  for name in ran:
    real = getattr(portable, name)

    def spy(*args, _real=real, _name=name, **kwargs):
      out = _real(*args, **kwargs)
      ran[_name] += out is not None
      return out
    monkeypatch.setattr(portable, name, spy)

  def check_runs(*args, paths, **kwargs):
    before = dict(ran)
    check(*args, **kwargs)
    assert all(ran[p] > before[p] for p in paths), (args, kwargs, ran, before)

  # A 1-feature k4 s2 transposed conv: the tap GEMM forward; its filter
  # gradient (4x4 positions from 10x9 inputs) as the gathered GEMM over the
  # cotangent's window matrix.
  check_runs((2, 16, 10, 9), (1, 16, 4, 4), (1, 1), [(2, 2), (2, 2)], (2, 2),
             paths=("_tap_gemm", "_gathered_gemm", "_window_matrix_dot"))
  # With 6 features, over the stacked strided windows.
  check_runs((2, 3, 10, 9), (6, 3, 4, 4), (1, 1), [(2, 2), (2, 2)], (2, 2),
             paths=("_gathered_gemm", "_stacked_kernel_dot"))
  # With 16 features the gathered GEMM runs one GEMM per position.
  check_runs((2, 4, 10, 9), (16, 4, 4, 4), (1, 1), [(2, 2), (2, 2)], (2, 2),
             paths=("_gathered_gemm", "_per_position_dot"))
  # The same with 2 groups of 16 (the filter gradient has batch groups).
  check_runs((2, 4, 10, 9), (32, 2, 4, 4), (1, 1), [(2, 2), (2, 2)], (2, 2),
             feature_group_count=2,
             paths=("_gathered_gemm", "_per_position_dot", "_batch_groups_to_features"))
  # Its 1D form: the filter gradient phase by phase, merged, each a
  # shifted-kernel GEMM.
  check_runs((2, 16, 30), (1, 16, 4), (1,), [(2, 2)], (2,),
             paths=("_tap_gemm", "_merged_phases", "_shifted_kernel_dot"))
  # Feature groups: tap GEMM per group; the filter gradient has batch groups.
  check_runs((2, 4, 6, 7), (4, 2, 3, 4), (1, 1), [(1, 2), (2, 1)], (2, 2),
             feature_group_count=2,
             paths=("_tap_gemm", "_gathered_gemm", "_batch_groups_to_features"))
  # Lhs and rhs dilation at once (not a transposed conv): merged phases.
  check_runs((4, 6, 10, 9), (1, 6, 4, 4), (1, 1), [(2, 2), (2, 2)], (2, 2), (1, 2),
             paths=("_merged_phases",))
  # Batch groups with lhs dilation (the filter gradient of a grouped deconv).
  check_runs((4, 3, 7, 5), (4, 3, 3, 2), (1, 1), [(1, 1), (2, 0)], (2, 2),
             batch_group_count=2, paths=("_batch_groups_to_features", "_merged_phases"))
  # Three output features (DCGAN's last layer): the input gradient is one GEMM
  # over the cotangent's windows, the filter gradient's gathered kernels.
  check_runs((2, 5, 10, 9), (3, 5, 4, 4), (1, 1), [(2, 2), (2, 2)], (2, 2),
             dimension_numbers=("NCHW", "OIHW", "NHWC"),
             paths=("_tap_gemm", "_im2col_dot", "_gathered_gemm", "_window_matrix_dot"))
  # Kernel equal to the dilation (U-Net's k2 s2), channels last: the forward
  # is one GEMM moved depth to space, the input gradient one GEMM over the
  # cotangent's tiles, the filter gradient one GEMM with every position.
  check_runs((2, 5, 4, 6), (2, 2, 6, 3), (1, 1), [(1, 1), (1, 1)], (2, 2),
             dimension_numbers=("NHWC", "HWIO", "NHWC"),
             paths=("_tiled_tap_dot", "_tiled_gathered_dot", "_space_to_depth_dot"))
  # ... with 2 groups, a lo of s - 1 + s (the output shifted) and a crop.
  check_runs((2, 4, 3, 5), (6, 2, 3, 2), (1, 1), [(5, -1), (3, 0)], (3, 2),
             feature_group_count=2,
             paths=("_tiled_tap_dot", "_tiled_gathered_dot", "_space_to_depth_dot"))


def test_gradient_computes_the_cotangent_windows_once():
  # A narrow transposed convolution (DCGAN's last layer, 3 features, k4 s2):
  # its input gradient (_im2col_dot) and filter gradient (_gathered_gemm) read
  # the cotangent's 16 windows as the same matrix, [batch x rows x columns,
  # taps x features], so the compiled gradient gathers it once, and from the
  # cotangent computed once: the col2im sum that makes it (the forward's, as
  # the loss is sum(y^2)) is not fused into the gather, where it would be
  # recomputed for each of the 4 windows that read an element.
  x, w = jnp.ones((4, 12, 12, 8), jnp.float32), jnp.ones((4, 4, 8, 3), jnp.float32)
  f = portable_fn(None, None, (1, 1), [(2, 2), (2, 2)], (2, 2),
                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1)))
  hlo = grad.lower(x, w).compile().as_text()
  gathers = re.findall(r"= f32\[576,1,4,4,3\]\S* gather\(", hlo)
  assert len(gathers) == 1, gathers
  fused = [c for c in hlo.split("\n\n") if " gather(" in c]
  assert len(fused) == 1 and not re.search(r"= f32\S* (add|multiply)\(", fused[0]), fused
  assert not re.search(r"\bconvolution\(", hlo), "the input gradient is XLA's convolution"
  g, g_ref = grad(x, w), jax.grad(lambda x, w: jnp.sum(lax.conv_general_dilated(
      x, w, (1, 1), [(2, 2), (2, 2)], (2, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2), (0, 1))(x, w)
  for a, b in zip(g, g_ref):
    assert_close(a, b, np.float32, "gradient")


@pytest.mark.parametrize("dn", [None, ("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NHWC"),
                                ("NWHC", "OHWI", "CHWN")])
def test_window_matrix_gradients(dn, monkeypatch):
  # Transposed convolutions with 1-4 output features: their filter gradients
  # run over the cotangent's gathered window matrix (_window_matrix_dot) for
  # strides 2-3, kernels 3-6, symmetric and one-sided pads, four layouts, and
  # in 3D; values and both VJPs match lax. (With crops the gathered form's
  # border waste is over its bound: those run elsewhere.)
  from cks_jax._src import portable
  ran = []
  real = portable._window_matrix_dot
  monkeypatch.setattr(portable, "_window_matrix_dot",
                      lambda *a, **k: ran.append(1) or real(*a, **k))
  cases = []
  for i, (f, s, k, pad) in enumerate([(1, 2, 4, (2, 2)), (3, 2, 4, (1, 3)), (4, 2, 3, (0, 1)),
                                      (2, 3, 5, (2, 4)), (2, 3, 6, (3, 3)), (3, 2, 4, (2, 1)),
                                      (1, 3, 4, (2, 2)), (1, 2, 4, (0, 4))]):
    lhs, rhs = shapes_for(2, dn, 2, 5, f, (12, 11), (k, k - (i % 2)))
    cases.append(case(lhs, rhs, (1, 1), [pad, pad], (s, s), dimension_numbers=dn, seed=i))
  if dn is None:  # 3D, one layout
    cases.append(case((2, 3, 10, 9, 8), (2, 3, 4, 4, 4), (1, 1, 1), [(2, 2)] * 3, (2, 2, 2)))
  check_many(cases)
  assert len(ran) >= len(cases), (len(ran), len(cases))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("pad", [(1, 1), (0, 0), (3, -1), (-1, 4)])
@pytest.mark.parametrize("groups", [1, 2])
def test_kernel_equals_stride(nd, pad, groups):
  # The tiled forms (kernel = lhs dilation, or kernel = window stride): every
  # lo, so both the depth-to-space GEMM (lo = s - 1 mod s) and the tap GEMM
  # run, channels first and last.
  sizes, ks = (5, 4, 3)[:nd], (2, 3, 2)[:nd]
  cases = [case((2, 2 * groups) + sizes, (4, 2) + ks, (1,) * nd, [pad] * nd, ks,
                feature_group_count=groups),
           case((2, 2 * groups) + tuple(2 * n + 1 for n in sizes), (4, 2) + ks, ks, [pad] * nd,
                feature_group_count=groups)]
  if groups == 1:  # permuted dimension numbers (shapes_for has no groups)
    for dn in DN[nd][1:]:
      lhs, rhs = shapes_for(nd, dn, 2, 3, 4, sizes, ks)
      cases.append(case(lhs, rhs, (1,) * nd, [pad] * nd, ks, dimension_numbers=dn,
                        oracle="direct" if nd == 3 else "lax"))
  check_many(cases)


def test_grouped_convolution_runs_per_group():
  # XLA:CPU computes a grouped convolution as a block-diagonal kernel, so the
  # portable path emits one convolution per group, up to _SPLIT_MAX_GROUPS.
  from cks_jax._src import portable
  for groups, convs in ((4, 4), (portable._SPLIT_MAX_GROUPS + 1, 1)):
    c = 2 * groups
    f = portable_fn(None, None, (2, 2), [(1, 1), (1, 1)], feature_group_count=groups)
    text = jax.jit(f).trace(jnp.ones((2, c, 9, 9)), jnp.ones((c, 2, 3, 3))).lower(
        lowering_platforms=("tpu",)).as_text()
    lines = [ln for ln in text.splitlines() if "stablehlo.convolution" in ln]
    assert len(lines) == convs, (groups, lines)
    assert all(f"feature_group_count = {groups if convs == 1 else 1}" in ln for ln in lines)
    check((2, c, 9, 9), (c, 2, 3, 3), (2, 2), [(1, 1), (1, 1)], feature_group_count=groups)
