"""Property-based fuzzing of cks_jax.conv_general_dilated against jax.lax.

One strategy draws every parameter of a convolution: 1 to 3 spatial
dimensions, shapes (zero sizes included), window strides, lhs and rhs
dilations (huge ones included), explicit padding (negative, asymmetric, past
the input) or string padding, feature or batch groups, random dimension-number
permutations (as layout strings or ConvDimensionNumbers), operand dtype and
preferred_element_type. Each example checks

- the value at the drawn dtype and its VJP for both operands,
- in float64: the VJP and a second derivative (Hessian-vector product of a
  non-linear scalar loss, forward-over-reverse or reverse-over-reverse),

against lax, or for 3D derivatives against oracle.direct_conv (XLA:CPU aborts
compiling lax's own gradient of some 3D convolutions), and for negative
padding against oracle.direct_conv (XLA:CPU's convolution reads past its input
for some negative low paddings, openxla/xla#48713). A shape-only property
checks that cks raises a clear error exactly where lax rejects the arguments.

Example counts come from the hypothesis profile (conftest.py): bounded and
derandomized in CI; ``HYPOTHESIS_PROFILE=long`` for a long run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, note, settings, strategies as st
from jax import lax

import cks_jax
from fuzz_medium import arguments, check, draw_problem
from oracle import TOL, assert_close, direct_conv, value_and_vjp

F64 = np.dtype("float64")
DTYPES = [np.dtype("float32"), F64, np.dtype(jnp.bfloat16), np.dtype(jnp.float16)]
# Numerical examples per run: the profile's count; the cheap shape-only
# property runs ten times as many.
EXAMPLES = settings().max_examples
MAX_OUT = 20000  # output elements per example


# ------------------------------------------------------------------ strategy
def _spatial_letters(nd: int) -> str:
  return "DHW"[3 - nd:]


@st.composite
def dimension_numbers(draw, nd: int):
  """None, layout strings, or a lax.ConvDimensionNumbers of random permutations."""
  kind = draw(st.sampled_from(["none", "strings", "perms"]))
  if kind == "none":
    return None
  if kind == "perms":
    perm = lambda: tuple(draw(st.permutations(range(nd + 2))))
    return lax.ConvDimensionNumbers(perm(), perm(), perm())
  sp = _spatial_letters(nd)
  return tuple("".join(draw(st.permutations(chars + sp))) for chars in ("NC", "OI", "NC"))


def _place(canon, spec):
  """Sizes in canonical order (batch/out-feature, feature/in-feature, spatial...)
  laid out by a dimension-number spec."""
  shape = [0] * len(canon)
  for pos, dim in enumerate(spec):
    shape[dim] = canon[pos]
  return tuple(shape)


def _dilated(n: int, a: int) -> int:
  return 0 if n == 0 else (n - 1) * a + 1


small = lambda lo, hi: st.integers(lo, hi)
# Mostly small factors, sometimes far larger than the input.
factor = st.one_of(small(1, 3), st.sampled_from([4, 5, 9, 1000]))


@st.composite
def conv_problem(draw):
  """A valid conv_general_dilated call: shapes, positional args, keyword args, dtype."""
  nd = draw(st.integers(1, 3))
  max_in, max_k = (10, 5) if nd < 3 else (5, 3)
  in_sp = [draw(small(0, max_in)) for _ in range(nd)]
  k_sp = [draw(small(1, max_k)) for _ in range(nd)]
  strides = tuple(draw(factor) for _ in range(nd))
  lhs_dil = tuple(draw(factor) for _ in range(nd))
  rhs_dil = tuple(draw(factor) for _ in range(nd))
  if all(a == 1 for a in lhs_dil) and draw(st.booleans()):
    padding = draw(st.sampled_from(["SAME", "VALID", "SAME_LOWER"]))
  else:
    padding = []
    for n, a in zip(in_sp, lhs_dil):
      size = _dilated(n, a)
      lo = draw(small(-size - 2, 6))
      hi = draw(small(max(-size - lo, -4), max(-size - lo, -4) + 10))
      padding.append((lo, hi))
  groups = draw(st.sampled_from(["none", "feature", "batch"]))
  g = draw(small(2, 3)) if groups == "feature" else 1
  bg = draw(small(2, 3)) if groups == "batch" else 1
  wide = nd < 3 and draw(st.integers(0, 9)) == 0  # several reduction blocks (kKC = 256)
  cg = draw(st.sampled_from([37, 40])) if wide else draw(small(0, 3))
  fg = draw(small(0, 3)) if draw(st.integers(0, 9)) == 0 else draw(small(1, 3))
  n = draw(small(0, 3)) * bg if draw(st.integers(0, 9)) == 0 else draw(small(1, 3)) * bg
  dn = draw(dimension_numbers(nd))
  dnums = lax.conv_dimension_numbers((1,) * (nd + 2), (1,) * (nd + 2), dn)
  lhs_shape = _place([n, cg * g] + in_sp, dnums.lhs_spec)
  rhs_shape = _place([fg * g * bg, cg] + k_sp, dnums.rhs_spec)
  dtype = draw(st.sampled_from(DTYPES))
  pet = None
  if draw(st.integers(0, 3)) == 0:
    pet = draw(st.sampled_from([d for d in DTYPES if d.itemsize >= dtype.itemsize]))
  kwargs = dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dil,
                rhs_dilation=rhs_dil, dimension_numbers=dn, feature_group_count=g,
                batch_group_count=bg)
  # Huge lhs dilations with small strides give huge outputs: keep each example fast.
  out = jax.eval_shape(lambda l, r: lax.conv_general_dilated(l, r, **kwargs),
                       jax.ShapeDtypeStruct(lhs_shape, F64), jax.ShapeDtypeStruct(rhs_shape, F64))
  assume(np.prod(out.shape) <= MAX_OUT)
  return dict(lhs=lhs_shape, rhs=rhs_shape, kwargs=kwargs, dtype=dtype, pet=pet,
              order2=draw(st.sampled_from(["fwd-over-rev", "rev-over-rev"])),
              seed=draw(st.integers(0, 2**31 - 1)))


# ------------------------------------------------------------------ the check
def _derivatives(conv, order2):
  """f(l, r, ct, tl, tr) -> (out, dl, dr, hl, hr): value, VJP of both operands with
  cotangent ct, and the Hessian of sum(ct * sin(conv)) times (tl, tr)."""
  def f(l, r, ct, tl, tr):
    out, vjp = jax.vjp(conv, l, r)
    dl, dr = vjp(ct)
    grad = jax.grad(lambda l, r: jnp.sum(ct * jnp.sin(conv(l, r))), (0, 1))
    if order2 == "fwd-over-rev":
      hl, hr = jax.jvp(grad, (l, r), (tl, tr))[1]
    else:
      hl, hr = jax.grad(lambda l, r: sum(jnp.vdot(g, t) for g, t in
                                         zip(grad(l, r), (tl, tr))), (0, 1))(l, r)
    return out, dl, dr, hl, hr
  return f


DIRECT_MAX_POSITIONS = 1 << 16


def _padded_positions(lhs_shape, kw) -> int:
  """Positions of the dilated, padded lhs (direct_conv's intermediate)."""
  dn = lax.conv_dimension_numbers(lhs_shape, lhs_shape, kw["dimension_numbers"])
  sizes = [_dilated(lhs_shape[a], d) + lo + hi
           for a, d, (lo, hi) in zip(dn.lhs_spec[2:], kw["lhs_dilation"], kw["padding"])]
  return int(np.prod(sizes))


def check_problem(p, backend="ffi"):
  """Values (drawn dtype), VJPs (drawn dtype and float64) and second derivatives
  (float64) of cks equal the reference's."""
  kw, dtype, pet = p["kwargs"], p["dtype"], p["pet"]
  nd = len(p["lhs"]) - 2
  rng = np.random.default_rng(p["seed"])
  l64, r64 = rng.standard_normal(p["lhs"]), rng.standard_normal(p["rhs"])
  cks = lambda l, r, **e: cks_jax.conv_general_dilated(l, r, **kw, **e, backend=backend)
  ref = lambda l, r, **e: lax.conv_general_dilated(l, r, **kw, **e)
  out_shape = jax.eval_shape(ref, l64, r64).shape
  ct64, tl, tr = (rng.standard_normal(s) for s in (out_shape, l64.shape, r64.shape))
  note(f"lhs {p['lhs']} rhs {p['rhs']} {kw} dtype {dtype} pet {pet} {p['order2']}")

  # The drawn dtype (value and VJP, against float64 lax on the same rounded
  # inputs) and float64 (value, VJP, second derivative), each side compiled as
  # one function: compiling, not computing, is what an example costs.
  drawn = dtype != F64 or pet is not None
  if drawn:
    l, r = jnp.asarray(l64, dtype), jnp.asarray(r64, dtype)
    out_dtype = jax.eval_shape(lambda l, r: ref(l, r, preferred_element_type=pet), l, r).dtype
    ct = jnp.asarray(ct64, out_dtype)
  # Negative padding: XLA:CPU's own convolution reads past its input for some
  # (openxla/xla#48713), so lax is no reference there; the direct oracle is,
  # where its padded, dilated input stays small (it holds the dilation's zeros).
  direct_ref = (not isinstance(kw["padding"], str)
                and min(map(min, kw["padding"]), default=0) < 0
                and _padded_positions(p["lhs"], kw) <= DIRECT_MAX_POSITIONS)
  direct = lambda l, r: direct_conv(l, r, **kw)
  oracle = ref if nd < 3 and not direct_ref else direct

  def both(conv, conv_drawn):
    def f(f64_ops, drawn_ops):
      out = {"f64": _derivatives(conv, p["order2"])(*f64_ops)}
      if drawn:
        out["drawn"] = value_and_vjp(conv_drawn)(*drawn_ops)
      if nd == 3 and conv is oracle and not direct_ref:  # the oracle against lax's value
        out["lax"] = ref(*f64_ops[:2])
      return out
    return jax.jit(f)

  f64_ops = (l64, r64, ct64, tl, tr)
  got = both(cks, lambda l, r: cks(l, r, preferred_element_type=pet))(
      f64_ops, (l, r, ct) if drawn else ())
  want = both(oracle, direct if direct_ref else ref)(
      f64_ops, tuple(np.asarray(x, F64) for x in (l, r, ct)) if drawn else ())
  if drawn:
    tol_dtype = max(dtype, out_dtype, key=lambda d: TOL[d])
    for name, a, b, dt in zip(("value", "d lhs", "d rhs"), got["drawn"], want["drawn"],
                              (out_dtype, dtype, dtype)):
      assert a.dtype == dt, f"{name}: dtype {a.dtype} != {dt}"
      assert_close(a, b, tol_dtype, f"{name} ({dtype}, pet {pet})")
  names = ("value", "d lhs", "d rhs", f"d2 lhs {p['order2']}", f"d2 rhs {p['order2']}")
  for name, a, b in zip(names, got["f64"], want["f64"]):
    assert_close(a, b, F64, f"float64 {name}")
  if "lax" in want:
    assert_close(want["f64"][0], want["lax"], F64, "direct oracle value")


# ------------------------------------------------------------------ properties
@settings(max_examples=EXAMPLES)
@given(conv_problem())
def test_fuzz_against_lax(p):
  check_problem(p)


@settings(max_examples=10 * EXAMPLES)
@given(st.data())
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # lax, on strides of 0
def test_fuzz_shapes_and_errors_match_lax(data):
  """Possibly invalid arguments: cks raises a clear ValueError/TypeError exactly
  where lax rejects them, and otherwise has lax's output shape and dtype."""
  nd = data.draw(st.integers(1, 3))
  dims = lambda lo, hi: tuple(data.draw(small(lo, hi)) for _ in range(nd))
  lhs = (data.draw(small(0, 4)), data.draw(small(0, 6))) + dims(0, 8)
  rhs = (data.draw(small(0, 6)), data.draw(small(0, 6))) + dims(0, 4)
  dtype = data.draw(st.sampled_from(DTYPES))
  padding = data.draw(st.one_of(
      st.sampled_from(["SAME", "VALID", "SAME_LOWER"]),
      st.lists(st.tuples(small(-12, 6), small(-12, 6)), min_size=nd, max_size=nd)))
  kw = dict(window_strides=dims(0, 3), padding=padding, lhs_dilation=dims(0, 3),
            rhs_dilation=dims(0, 3), dimension_numbers=data.draw(dimension_numbers(nd)),
            feature_group_count=data.draw(small(0, 3)), batch_group_count=data.draw(small(0, 3)))
  if data.draw(st.booleans()):
    kw["preferred_element_type"] = data.draw(st.sampled_from(DTYPES))
  args = (jax.ShapeDtypeStruct(lhs, dtype), jax.ShapeDtypeStruct(rhs, dtype))
  try:
    want = jax.eval_shape(lambda l, r: lax.conv_general_dilated(l, r, **kw), *args)
  except Exception as e:  # noqa: BLE001 -- lax's error types vary; only rejection matters
    note(f"lax: {type(e).__name__}: {e}")
    want = None
  # lax's shape rule accepts window strides < 1 (XLA rejects them only when
  # compiling); cks refuses them up front.
  if want is None or min(kw["window_strides"]) < 1:
    with pytest.raises((ValueError, TypeError)):
      jax.eval_shape(lambda l, r: cks_jax.conv_general_dilated(l, r, **kw), *args)
  else:
    got = jax.eval_shape(lambda l, r: cks_jax.conv_general_dilated(l, r, **kw), *args)
    assert (got.shape, got.dtype) == (want.shape, want.dtype)


# ------------------------------------------------------------------ regressions
# Failures the fuzzers found, as named tests.


def test_regression_zero_window_stride():
  # Found by test_fuzz_shapes_and_errors_match_lax: lax's shape rule accepts a
  # window stride of 0 (dividing by zero) and fails only when compiling; cks
  # refuses it up front.
  args = (jax.ShapeDtypeStruct((1, 1, 4), np.float32), jax.ShapeDtypeStruct((1, 1, 2), np.float32))
  with pytest.warns(RuntimeWarning, match="divide by zero"):
    jax.eval_shape(lambda l, r: lax.conv_general_dilated(l, r, (0,), "SAME"), *args)
  with pytest.raises(ValueError, match="window_strides must contain only positive"):
    jax.eval_shape(lambda l, r: cks_jax.conv_general_dilated(l, r, (0,), "SAME"), *args)


# ------------------------------------------------------------------ medium sizes
@pytest.mark.parametrize("seed", range(8))
def test_medium_problems(seed):
  """Problems of fuzz_medium.py (2e4-6e6 output elements: the sizes at which the
  kernel changes path), value and both VJPs against the direct oracle; that
  script runs them for as long as asked."""
  rng = np.random.default_rng(seed)
  p = draw_problem(rng)
  while arguments(p) is None:
    p = draw_problem(rng)
  assert check(p, seed) == [], p
