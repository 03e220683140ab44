"""Comparison of cks_jax against jax.lax: values and both VJPs."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import cks_jax

# Tolerances relative to the output's scale (max |ref|).
TOL = {np.dtype("float64"): 1e-11, np.dtype("float32"): 2e-5,
       np.dtype(jnp.bfloat16): 2e-2, np.dtype(jnp.float16): 4e-3}


def random(shape, dtype, seed):
  x = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(x, dtype)


def assert_close(out, ref, dtype, what):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
  if ref.size == 0:
    return
  scale = max(1.0, float(np.max(np.abs(ref))))
  err = float(np.max(np.abs(out - ref))) / scale
  assert err <= TOL[np.dtype(dtype)], f"{what}: relative error {err:.3g} (dtype {dtype})"


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


def check(lhs_shape, rhs_shape, *args, dtype=np.float64, grads=True, seed=0, oracle="lax",
          **kwargs):
  """Values equal lax's and gradients of both operands equal lax's VJP
  (``oracle="direct"``: :func:`direct_conv`'s), references in float64."""
  lhs, rhs = random(lhs_shape, dtype, seed), random(rhs_shape, dtype, seed + 1)
  ref_dtype = np.float64
  f_cks = lambda l, r: cks_jax.conv_general_dilated(l, r, *args, **kwargs)
  # References run in float64 (a preferred type must not be narrower).
  ref_kwargs = dict(kwargs)
  pet = ref_kwargs.pop("preferred_element_type", None)
  if pet is not None:
    ref_kwargs["preferred_element_type"] = np.float64
  f_lax = lambda l, r: lax.conv_general_dilated(l, r, *args, **ref_kwargs)
  f_ref = f_lax if oracle == "lax" else (lambda l, r: direct_conv(l, r, *args, **ref_kwargs))
  out = jax.jit(f_cks)(lhs, rhs)
  ref = f_lax(lhs.astype(ref_dtype), rhs.astype(ref_dtype))
  assert out.dtype == jax.eval_shape(
      lambda l, r: lax.conv_general_dilated(l, r, *args, **kwargs), lhs, rhs).dtype
  assert_close(out, ref, dtype, "value")
  if oracle != "lax":
    assert_close(jax.jit(f_ref)(lhs.astype(ref_dtype), rhs.astype(ref_dtype)), ref, ref_dtype,
                 "direct oracle")
  if not grads:
    return out
  ct = random(ref.shape, out.dtype, seed + 2)
  g_cks = jax.jit(lambda l, r, c: jax.vjp(f_cks, l, r)[1](c))(lhs, rhs, ct)
  g_ref = jax.jit(lambda l, r, c: jax.vjp(f_ref, l, r)[1](c))(
      lhs.astype(ref_dtype), rhs.astype(ref_dtype), ct.astype(ref_dtype))
  for name, a, b, x in zip(("d lhs", "d rhs"), g_cks, g_ref, (lhs, rhs)):
    assert a.dtype == x.dtype, f"{name}: dtype {a.dtype} != {x.dtype}"
    assert_close(a, b, dtype, name)
  return out
