"""Comparison of cks_jax against jax.lax: values and both VJPs."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import cks_jax

# Tolerances relative to the output's scale (max |ref|).
TOL = {np.dtype("float64"): 1e-11, np.dtype("float32"): 2e-5,
       np.dtype(jnp.bfloat16): 2e-2, np.dtype(jnp.float16): 4e-3}


def random(shape, dtype, seed, scale=1.0):
  """Standard normals (times ``scale``) from numpy: jax.random would compile a
  threefry kernel for every new shape, seconds per test."""
  x = scale * np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(x, dtype)


def relative_error(out, ref) -> float:
  """max |out - ref| over max(1, max |ref|), the measure of every tolerance
  here (same shapes; 0 for empty arrays)."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if ref.size == 0:
    return 0.0
  return float(np.max(np.abs(out - ref))) / max(1.0, float(np.max(np.abs(ref))))


def assert_close(out, ref, dtype, what):
  out, ref = np.asarray(out), np.asarray(ref)
  assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
  err = relative_error(out, ref)
  assert err <= TOL[np.dtype(dtype)], f"{what}: relative error {err:.3g} (dtype {dtype})"


def value_and_vjp(conv):
  """f(lhs, rhs, ct) -> (conv(lhs, rhs), d lhs, d rhs): the value and both VJPs of ct."""
  def f(l, r, ct):
    out, vjp = jax.vjp(conv, l, r)
    return (out,) + vjp(ct)
  return f


def direct_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, batch_group_count=1):
  """The direct method in plain jnp (pad with interior zeros, slice per tap, einsum).

  An oracle independent of any convolution op, for the configurations where
  XLA:CPU's own convolution gradient aborts in its algebraic simplifier (3D
  convolutions with both window strides and dilations).
  """
  nd = lhs.ndim - 2
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  a = lhs_dilation or (1,) * nd
  d = rhs_dilation or (1,) * nd
  l = jnp.transpose(lhs, dn.lhs_spec)
  r = jnp.transpose(rhs, dn.rhs_spec)
  if isinstance(padding, str):
    eff = [(k - 1) * dd + 1 for k, dd in zip(r.shape[2:], d)]
    padding = lax.padtype_to_pads(l.shape[2:], eff, window_strides, padding)
  lp = lax.pad(l, jnp.zeros((), l.dtype),
               [(0, 0, 0), (0, 0, 0)] + [(lo, hi, aa - 1) for (lo, hi), aa in zip(padding, a)])
  ks = r.shape[2:]
  outs = [max(0, (lp.shape[2 + i] - ((ks[i] - 1) * d[i] + 1)) // window_strides[i] + 1)
          for i in range(nd)]
  G, B = feature_group_count, batch_group_count
  N, C, F = lp.shape[0], lp.shape[1], r.shape[0]
  acc = jnp.zeros((N // B, F) + tuple(outs), lhs.dtype)
  for k in np.ndindex(*ks):
    start = (0, 0) + tuple(k[i] * d[i] for i in range(nd))
    limit = (N, C) + tuple(k[i] * d[i] + (outs[i] - 1) * window_strides[i] + 1
                           for i in range(nd))
    if min(outs) == 0:
      break
    win = lax.slice(lp, start, limit, (1, 1) + tuple(window_strides))
    w = r[(slice(None), slice(None)) + k]  # [F, Cg]
    if B > 1:
      win = win.reshape((B, N // B, C) + win.shape[2:])
      w = w.reshape(B, F // B, C)
      term = jnp.einsum("bnc...,bfc->nbf...", win, w).reshape(acc.shape)
    else:
      win = win.reshape((N, G, C // G) + win.shape[2:])
      w = w.reshape(G, F // G, C // G)
      term = jnp.einsum("ngc...,gfc->ngf...", win, w).reshape(acc.shape)
    acc = acc + term
  return jnp.transpose(acc, np.argsort(dn.out_spec))


def case(lhs_shape, rhs_shape, *args, dtype=np.float64, grads=True, seed=0, oracle="lax",
         **kwargs):
  """One comparison for :func:`check_many`: the operand shapes and dtype,
  lax.conv_general_dilated's arguments, and the reference for the VJPs
  (``oracle="direct"``: :func:`direct_conv`'s)."""
  return dict(lhs_shape=lhs_shape, rhs_shape=rhs_shape, args=args, kwargs=kwargs, dtype=dtype,
              grads=grads, seed=seed, oracle=oracle)


def check(lhs_shape, rhs_shape, *args, backend=None, **kwargs):
  """Values equal lax's and gradients of both operands equal lax's VJP
  (``oracle="direct"``: :func:`direct_conv`'s), references in float64.
  Returns cks_jax's value."""
  return check_many([case(lhs_shape, rhs_shape, *args, **kwargs)], backend=backend)[0]


def check_many(cases, *, backend=None):
  """:func:`check` for several :func:`case`s, compiled as ONE function for
  cks_jax and one for the references: XLA:CPU's per-compile cost, not the
  arithmetic, is what the small grids spend their time on. Returns
  cks_jax's values."""
  cks_fns, ref_fns, cks_ops, ref_ops = [], [], [], []
  ref_dtype = np.float64
  for c in cases:
    args, kwargs = c["args"], c["kwargs"]
    lhs, rhs = random(c["lhs_shape"], c["dtype"], c["seed"]), random(c["rhs_shape"], c["dtype"],
                                                                      c["seed"] + 1)
    # References run in float64 (a preferred type must not be narrower).
    ref_kwargs = dict(kwargs)
    if ref_kwargs.pop("preferred_element_type", None) is not None:
      ref_kwargs["preferred_element_type"] = ref_dtype
    f_cks = lambda l, r, args=args, kwargs=kwargs: cks_jax.conv_general_dilated(
        l, r, *args, backend=backend, **kwargs)
    f_lax = lambda l, r, args=args, kw=ref_kwargs: lax.conv_general_dilated(l, r, *args, **kw)
    f_direct = lambda l, r, args=args, kw=ref_kwargs: direct_conv(l, r, *args, **kw)
    want = jax.eval_shape(lambda l, r: lax.conv_general_dilated(l, r, *args, **kwargs), lhs, rhs)
    ct = random(want.shape, want.dtype, c["seed"] + 2)
    cks_fns.append((f_cks, None, c["grads"]))
    ref_fns.append((f_lax, f_direct if c["oracle"] == "direct" else None, c["grads"]))
    cks_ops.append((lhs, rhs, ct))
    ref_ops.append(tuple(a.astype(ref_dtype) for a in (lhs, rhs, ct)))

  def run(fns, ops):
    """Per case: the value, the VJPs (if asked for), and the direct oracle's
    value and VJPs (if it is the VJPs' reference)."""
    outs = []
    for (f, f_vjp, grads), (l, r, ct) in zip(fns, ops):
      out = {"value": f(l, r)}
      if f_vjp is not None:
        out["direct oracle"] = f_vjp(l, r)
      if grads:
        out["d lhs"], out["d rhs"] = jax.vjp(f_vjp or f, l, r)[1](ct)
      outs.append(out)
    return outs

  got = jax.jit(lambda ops: run(cks_fns, ops))(cks_ops)
  ref = jax.jit(lambda ops: run(ref_fns, ops))(ref_ops)
  for c, (lhs, rhs, _), g, r in zip(cases, cks_ops, got, ref):
    where = (f"lhs {c['lhs_shape']} rhs {c['rhs_shape']} args {c['args']} {c['kwargs']}, "
             f"{np.dtype(c['dtype']).name}")
    assert g["value"].dtype == jax.eval_shape(
        lambda l, r: lax.conv_general_dilated(l, r, *c["args"], **c["kwargs"]), lhs, rhs).dtype
    assert_close(g["value"], r["value"], c["dtype"], f"{where}: value")
    if "direct oracle" in r:
      assert_close(r["direct oracle"], r["value"], ref_dtype, f"{where}: direct oracle")
    for name, x in (("d lhs", lhs), ("d rhs", rhs)):
      if name in g:
        assert g[name].dtype == x.dtype, f"{where}: {name} dtype {g[name].dtype} != {x.dtype}"
        assert_close(g[name], r[name], c["dtype"], f"{where}: {name}")
  return [g["value"] for g in got]
