"""jit, vmap (every axis, either or both operands), jvp, hessian, linear_transpose."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cks_jax
from oracle import assert_close, random

F64 = np.float64
KW = dict(window_strides=(2, 1), padding=[(1, 2), (0, 1)], lhs_dilation=(2, 1),
          rhs_dilation=(1, 2))


def pair(**overrides):
  kw = dict(KW, **overrides)
  return (lambda l, r: cks_jax.conv_general_dilated(l, r, **kw),
          lambda l, r: lax.conv_general_dilated(l, r, **kw))


@pytest.mark.parametrize("lhs_axis,rhs_axis", [(0, None), (1, None), (4, None), (None, 0),
                                               (None, 2), (None, 4), (0, 0), (3, 1), (4, 4)])
@pytest.mark.parametrize("groups", [dict(), dict(feature_group_count=2),
                                    dict(batch_group_count=2)])
def test_vmap(lhs_axis, rhs_axis, groups):
  f, g = pair(**groups)
  lhs, rhs = random((4, 4, 7, 6), F64, 0), random((4, 4 // groups.get("feature_group_count", 1),
                                                    3, 2), F64, 1)
  lhs_b = jnp.stack([lhs, 2 * lhs + 1, -lhs], lhs_axis) if lhs_axis is not None else lhs
  rhs_b = jnp.stack([rhs, rhs * 0.5, 1 - rhs], rhs_axis) if rhs_axis is not None else rhs
  out = jax.jit(jax.vmap(f, (lhs_axis, rhs_axis)))(lhs_b, rhs_b)
  ref = jax.vmap(g, (lhs_axis, rhs_axis))(lhs_b, rhs_b)
  assert_close(out, ref, F64, "vmap")
  # vmap of the gradient: the batching rule composed with the transposes.
  loss = lambda fn: (lambda l, r: jnp.sum(jnp.sin(fn(l, r))))
  gout = jax.jit(jax.vmap(jax.grad(loss(f), (0, 1)), (lhs_axis, rhs_axis)))(lhs_b, rhs_b)
  gref = jax.vmap(jax.grad(loss(g), (0, 1)), (lhs_axis, rhs_axis))(lhs_b, rhs_b)
  for a, b in zip(gout, gref):
    assert_close(a, b, F64, "vmap of grad")


def test_vmap_of_empty_batch():
  f, _ = pair()
  out = jax.vmap(f)(jnp.zeros((0, 2, 2, 7, 6)), jnp.zeros((0, 3, 2, 3, 2)))
  assert out.shape == (0,) + jax.eval_shape(f, jnp.zeros((2, 2, 7, 6)),
                                            jnp.zeros((3, 2, 3, 2))).shape


def test_jvp_and_linearity():
  f, g = pair()
  l, r = random((2, 3, 7, 6), F64, 0), random((4, 3, 3, 2), F64, 1)
  tl, tr = random(l.shape, F64, 2), random(r.shape, F64, 3)
  out, tan = jax.jvp(f, (l, r), (tl, tr))
  rout, rtan = jax.jvp(g, (l, r), (tl, tr))
  assert_close(out, rout, F64, "primal")
  assert_close(tan, rtan, F64, "tangent")


def test_hessian_and_higher_order():
  f, g = pair()
  l, r = random((1, 2, 5, 4), F64, 0), random((2, 2, 2, 2), F64, 1)
  loss = lambda fn: (lambda l, r: jnp.sum(jnp.tanh(fn(l, r))))
  h = jax.jit(jax.hessian(loss(f), (0, 1)))(l, r)
  hr = jax.hessian(loss(g), (0, 1))(l, r)
  for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(hr)):
    assert_close(a, b, F64, "hessian")
  # Third order: forward over reverse over reverse (a scalar directional
  # second derivative, then its gradient and a jvp of that).
  def d3(fn):
    d2 = lambda x: jnp.vdot(jax.grad(lambda y: loss(fn)(y, r))(x), l)
    return jax.jvp(jax.grad(d2), (l,), (l,))[1]
  third, third_r = d3(f), d3(g)
  assert_close(third, third_r, F64, "third order")


def test_linear_transpose():
  f, g = pair()
  l, r = random((2, 3, 7, 6), F64, 0), random((4, 3, 3, 2), F64, 1)
  ct = random(f(l, r).shape, F64, 2)
  (tl,) = jax.linear_transpose(lambda x: f(x, r), l)(ct)
  (tl_ref,) = jax.linear_transpose(lambda x: g(x, r), l)(ct)
  assert_close(tl, tl_ref, F64, "linear_transpose lhs")
  (tr,) = jax.linear_transpose(lambda x: f(l, x), r)(ct)
  (tr_ref,) = jax.linear_transpose(lambda x: g(l, x), r)(ct)
  assert_close(tr, tr_ref, F64, "linear_transpose rhs")


def test_eager_matches_jit():
  f, _ = pair()
  l, r = random((2, 3, 7, 6), F64, 0), random((4, 3, 3, 2), F64, 1)
  np.testing.assert_array_equal(np.asarray(f(l, r)), np.asarray(jax.jit(f)(l, r)))


def test_conv_transpose_matches_lax():
  for kw in [dict(strides=(2, 2), padding="SAME"), dict(strides=(2, 3), padding="VALID"),
             dict(strides=(2, 2), padding=[(1, 2), (2, 1)]),
             dict(strides=(2, 2), padding="SAME", transpose_kernel=True),
             dict(strides=(3, 2), padding=((1, 1), (0, 2)), use_consistent_padding=True),
             dict(strides=(2, 2), padding="SAME", rhs_dilation=(2, 1))]:
    r_shape = (4, 4, 5, 3) if kw.get("transpose_kernel") else (4, 4, 3, 5)
    l, r = random((2, 5, 6, 3), F64, 0), random(r_shape, F64, 1)
    out = cks_jax.conv_transpose(l, r, **kw)
    ref = lax.conv_transpose(l, r, **kw)
    assert_close(out, ref, F64, f"conv_transpose {kw}")


def test_conv_and_general_padding_wrappers():
  l, r = random((2, 3, 9, 8), F64, 0), random((4, 3, 3, 3), F64, 1)
  assert_close(cks_jax.conv(l, r, (2, 1), "SAME"), lax.conv(l, r, (2, 1), "SAME"), F64, "conv")
  assert_close(cks_jax.conv_with_general_padding(l, r, (1, 2), [(1, 0), (2, 2)], (2, 1), (1, 2)),
               lax.conv_with_general_padding(l, r, (1, 2), [(1, 0), (2, 2)], (2, 1), (1, 2)),
               F64, "conv_with_general_padding")
