"""The ``cks_conv`` primitive: jax.lax.conv_general_dilated semantics, C-K-S kernels.

One primitive, closed under differentiation (DESIGN.md section 2): its JVP is
bilinear, and both transposes are the same primitive with the roles of window
stride, lhs dilation and rhs dilation permuted, so derivatives of every order
run on the C-K-S kernels. The batching rule folds the vmapped axis into the
batch, feature or group dimensions, as lax does.

Params (all hashable): ``window_strides``, ``padding``, ``lhs_dilation``,
``rhs_dilation``, ``dimension_numbers`` (a ``lax.ConvDimensionNumbers``),
``feature_group_count``, ``batch_group_count``, ``precision``,
``out_dtype`` (a concrete numpy dtype; the wrappers in ``api.py`` only bind
dtype combinations the kernels support), ``backend`` (the requested
backend, see ``backends.py``; resolved per platform at lowering) and
``rhs_reversed`` (a bool, False where not bound: rhs's spatial dimensions are
read in reverse order, as if it were ``lax.rev(rhs, spatial)``). The input
gradient binds the forward's kernel with ``rhs_reversed`` toggled instead of
flipping it: the CPU kernel reads it flipped in place (negative tap strides),
where XLA's reverse was a copy of the kernel on every step (0.7 ms of
4 x 4 x 512 x 256 float32 weights on the Xeon VM); the other lowerings flip
it with ``lax.rev``.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from cks_jax._src import backends, cuda, ffi, portable, shapes, sharding

cks_conv_p = jex_core.Primitive("cks_conv")


def bind(lhs, rhs, **params):
  lhs, rhs = sharding.match_varying(lhs, rhs)
  return cks_conv_p.bind(lhs, rhs, **params)


# ------------------------------------------------------------------ eval rules
@functools.lru_cache(maxsize=512)
def _jitted(params_items):
  params = dict(params_items)
  return jax.jit(functools.partial(cks_conv_p.bind, **params))


def _impl(lhs, rhs, **params):
  return _jitted(tuple(sorted(params.items())))(lhs, rhs)


def _abstract_eval(lhs, rhs, **params):
  shape = shapes.out_shape(lhs.shape, rhs.shape, shapes.spec_of(params))
  # update() keeps lhs's manual (shard_map) axes; bind matched rhs's to them.
  return lhs.update(shape=shape, dtype=params["out_dtype"], weak_type=False,
                    sharding=sharding.out_sharding(lhs, rhs, params))


cks_conv_p.def_impl(_impl)
cks_conv_p.def_abstract_eval(_abstract_eval)


# ------------------------------------------------------------------ lowering
def _conv_params(params):
  return {k: v for k, v in params.items() if k not in ("backend", "rhs_reversed")}


def _rhs_spatial(params):
  return tuple(params["dimension_numbers"][1][2:])


def _reversed(params) -> bool:
  """The rhs_reversed param; False where a bind leaves it out."""
  return bool(params.get("rhs_reversed", False))


def _unreversed(lhs, rhs, **params):
  """The same conv with rhs flipped by XLA: lowerings without the CPU kernel."""
  return bind(lhs, lax.rev(rhs, _rhs_spatial(params)), **dict(params, rhs_reversed=False))


def _reference(lhs, rhs, **params):
  """XLA's own convolution with the same semantics (backend "xla"), negative
  padding as a slice (portable.crop_negative_padding: XLA:CPU's is wrong)."""
  cropped = portable.crop_negative_padding(lhs, params["padding"], params["lhs_dilation"],
                                           params["dimension_numbers"][0])
  if cropped is None:
    return _zeros(lhs, rhs, **params)
  lhs, padding = cropped
  out = lax.conv_general_dilated(
      lhs, rhs, params["window_strides"], padding, params["lhs_dilation"],
      params["rhs_dilation"], params["dimension_numbers"], params["feature_group_count"],
      params["batch_group_count"], precision=params["precision"],
      preferred_element_type=params["out_dtype"])
  return out.astype(params["out_dtype"])


def _zeros(lhs, rhs, **params):
  shape = shapes.out_shape(lhs.shape, rhs.shape, shapes.spec_of(params))
  return jax.numpy.zeros(shape, params["out_dtype"])


def _is_empty(lhs_aval, rhs_aval, out_aval) -> bool:
  return lhs_aval.size == 0 or rhs_aval.size == 0 or out_aval.size == 0


def _lower_ffi(target: str, ctx, lhs, rhs, **params):
  if sharding.needs_partitioning(ctx):
    # XLA cannot split a custom call: wrap it so it can (sharding.py).
    return sharding.lower(ctx, lhs, rhs, bind=bind, params=params)
  ffi.register()
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  i64 = lambda xs: np.asarray(xs, dtype=np.int64)
  rule = jax.ffi.ffi_lowering(target)
  # Only the CPU kernel reads a reversed rhs (lower() flips it for the others).
  extra = ({"rhs_reversed": np.int64(_reversed(params))}
           if target == ffi.CPU_TARGET else {})
  return rule(ctx, lhs, rhs, **extra,
              window_strides=i64(params["window_strides"]),
              lhs_dilation=i64(params["lhs_dilation"]),
              rhs_dilation=i64(params["rhs_dilation"]),
              padding_lo=i64([lo for lo, _ in params["padding"]]),
              lhs_spec=i64(lhs_spec), rhs_spec=i64(rhs_spec), out_spec=i64(out_spec),
              feature_group_count=np.int64(params["feature_group_count"]),
              batch_group_count=np.int64(params["batch_group_count"]))


_lower_xla = mlir.lower_fun(_reference, multiple_results=False)


def _portable(lhs, rhs, **params):
  return portable.conv_portable(lhs, rhs, **_conv_params(params))


_lower_portable = mlir.lower_fun(_portable, multiple_results=False)


def _lowering(platform: str):
  """The lowering of cks_conv for one platform: FFI kernel, portable or XLA."""
  target = {"cpu": ffi.CPU_TARGET, "cuda": ffi.CUDA_TARGET}.get(platform)

  def lower(ctx, lhs, rhs, **params):
    if _is_empty(*ctx.avals_in, *ctx.avals_out):  # zeros; XLA rejects empty windows
      return mlir.lower_fun(functools.partial(_zeros, **params), multiple_results=False)(
          ctx, lhs, rhs)
    shapes_in = tuple(a.shape for a in ctx.avals_in)
    chosen = backends.choose(params["backend"], platform, ffi.kernel_platforms(), params,
                             shapes_in, ctx.avals_in[0].dtype)
    if _reversed(params) and not (chosen == "ffi" and platform == "cpu"):
      return mlir.lower_fun(functools.partial(_unreversed, **params), multiple_results=False)(
          ctx, lhs, rhs)
    if chosen == "ffi":
      if platform == "cuda":
        cuda.check_grid(*shapes_in, ctx.avals_out[0].shape, params)
      return _lower_ffi(target, ctx, lhs, rhs, **params)
    if chosen == "portable":
      return _lower_portable(ctx, lhs, rhs, **params)
    return _lower_xla(ctx, lhs, rhs, **params)
  return lower


for _platform in ("cpu", "cuda", "rocm", "tpu"):
  mlir.register_lowering(cks_conv_p, _lowering(_platform), platform=_platform)
# Any other platform (plugins): no kernel, so portable or XLA as "auto" says.
mlir.register_lowering(cks_conv_p, _lowering("other"))
sharding.register(cks_conv_p)


# ------------------------------------------------------------------ transposes
def _reshape_axis_into(src, dst, x):
  # `dst` indexes the dimensions of x after `src` is removed.
  perm = [i for i in range(x.ndim) if i != src]
  perm.insert(dst, src)
  new_shape = list(np.delete(x.shape, src))
  new_shape[dst] *= x.shape[src]
  return lax.reshape(x, new_shape, perm)


def _reshape_axis_out_of(src, size1, x):
  shape = list(x.shape)
  size2, ragged = divmod(shape[src], size1)
  assert not ragged
  shape[src:src + 1] = [size1, size2]
  return lax.reshape(x, shape)


def _swap_io(spec):
  return (spec[1], spec[0]) + tuple(spec[2:])


def _with_dtype(x, dtype):
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _transpose_lhs(g, lhs, rhs, **params):
  """d lhs: a convolution of the cotangent with the flipped kernel, window
  stride and lhs dilation swapped (a KS-deconv for strided forward convs)."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  G, B = params["feature_group_count"], params["batch_group_count"]
  lhs_shape = lhs.aval.shape
  if G > 1:
    rhs = _reshape_axis_out_of(rhs_spec[0], G, rhs)
    rhs = _reshape_axis_into(rhs_spec[0], rhs_spec[1], rhs)
  elif B > 1:
    rhs = _reshape_axis_out_of(rhs_spec[0], B, rhs)
    rhs = _reshape_axis_into(rhs_spec[0], rhs_spec[1], rhs)
    G = B
  padding = shapes.vjp_lhs_padding(
      [lhs_shape[d] for d in lhs_spec[2:]], [rhs.shape[d] for d in rhs_spec[2:]],
      [g.shape[d] for d in out_spec[2:]], params["window_strides"], params["padding"],
      params["lhs_dilation"], params["rhs_dilation"])
  # The flipped kernel: read flipped (rhs_reversed toggled), not copied.
  out = bind(g, _with_dtype(rhs, g.dtype),
             window_strides=params["lhs_dilation"], padding=tuple(padding),
             lhs_dilation=params["window_strides"], rhs_dilation=params["rhs_dilation"],
             dimension_numbers=lax.ConvDimensionNumbers(out_spec, _swap_io(rhs_spec), lhs_spec),
             feature_group_count=G, batch_group_count=1, precision=params["precision"],
             out_dtype=np.dtype(g.dtype), backend=params["backend"],
             rhs_reversed=not _reversed(params))
  out = _with_dtype(out, lhs.aval.dtype)
  if params["batch_group_count"] > 1:
    out = _reshape_axis_out_of(lhs_spec[1], params["batch_group_count"], out)
    out = _reshape_axis_into(lhs_spec[1], lhs_spec[0], out)
  return sharding.retype(out, lhs.aval)


def _transpose_rhs(g, lhs, rhs, **params):
  """d rhs: a convolution of lhs with the cotangent as filter, dilated by the
  forward window stride (an Sk-dilated conv for strided forward convs)."""
  if np.size(g) == 0:
    return ad.Zero(rhs.aval)
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  G, B = params["feature_group_count"], params["batch_group_count"]
  if B > 1:
    G, B = B, 1
  elif G > 1:
    G, B = 1, G
  rhs_shape = rhs.aval.shape
  padding = shapes.vjp_rhs_padding(
      [lhs.shape[d] for d in lhs_spec[2:]], [rhs_shape[d] for d in rhs_spec[2:]],
      [g.shape[d] for d in out_spec[2:]], params["window_strides"], params["padding"],
      params["lhs_dilation"], params["rhs_dilation"])
  lhs = _with_dtype(lhs, g.dtype)
  out = bind(lhs, g,
             window_strides=params["rhs_dilation"], padding=tuple(padding),
             lhs_dilation=params["lhs_dilation"], rhs_dilation=params["window_strides"],
             dimension_numbers=lax.ConvDimensionNumbers(
                 _swap_io(lhs_spec), _swap_io(out_spec), _swap_io(rhs_spec)),
             feature_group_count=G, batch_group_count=B, precision=params["precision"],
             out_dtype=np.dtype(g.dtype), backend=params["backend"], rhs_reversed=False)
  if _reversed(params):  # the gradient of the flipped kernel, flipped back
    out = lax.rev(out, _rhs_spatial(params))
  return sharding.retype(_with_dtype(out, rhs.aval.dtype), rhs.aval)


ad.defbilinear(cks_conv_p, _transpose_lhs, _transpose_rhs)


# ------------------------------------------------------------------ batching
def _batch_rule(batched_args, batch_dims, **params):
  lhs, rhs = batched_args
  lhs_bdim, rhs_bdim = batch_dims
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  G, B = params["feature_group_count"], params["batch_group_count"]
  if lhs_bdim is None and rhs_bdim is None:
    return bind(lhs, rhs, **params), None

  if ((lhs_bdim is not None and lhs.shape[lhs_bdim] == 0) or
      (rhs_bdim is not None and rhs.shape[rhs_bdim] == 0)):
    lshape = [s for i, s in enumerate(lhs.shape) if i != lhs_bdim]
    rshape = [s for i, s in enumerate(rhs.shape) if i != rhs_bdim]
    shape = shapes.out_shape(lshape, rshape, shapes.spec_of(params))
    return jax.numpy.zeros((0,) + shape, params["out_dtype"]), 0

  if lhs_bdim is not None and rhs_bdim is not None:
    size = lhs.shape[lhs_bdim]
    if B > 1:
      new_lhs = _reshape_axis_into(lhs_bdim, lhs_spec[0], lhs)
      new_params = dict(params, batch_group_count=B * size)
    else:
      new_lhs = _reshape_axis_into(lhs_bdim, lhs_spec[1], lhs)
      new_params = dict(params, feature_group_count=G * size)
    new_rhs = _reshape_axis_into(rhs_bdim, rhs_spec[0], rhs)
    out = bind(new_lhs, new_rhs, **new_params)
    return _reshape_axis_out_of(out_spec[1], size, out), out_spec[1]

  if lhs_bdim is not None:
    size = lhs.shape[lhs_bdim]
    if B == 1:
      new_lhs = _reshape_axis_into(lhs_bdim, lhs_spec[0], lhs)
    else:
      new_lhs = _reshape_axis_out_of(lhs_spec[0] + int(lhs_bdim <= lhs_spec[0]), B, lhs)
      new_lhs = _reshape_axis_into(lhs_bdim + int(lhs_spec[0] < lhs_bdim), lhs_spec[0] + 1,
                                   new_lhs)
      new_lhs = _reshape_axis_into(lhs_spec[0], lhs_spec[0], new_lhs)
    out = bind(new_lhs, rhs, **params)
    return _reshape_axis_out_of(out_spec[0], size, out), out_spec[0]

  size = rhs.shape[rhs_bdim]
  if G == 1 and B == 1:
    new_rhs = _reshape_axis_into(rhs_bdim, rhs_spec[0], rhs)
    out = bind(lhs, new_rhs, **params)
    return _reshape_axis_out_of(out_spec[1], size, out), out_spec[1]
  # Groups must stay outermost in the output-feature dimension.
  groups = G if G > 1 else B
  new_rhs = _reshape_axis_out_of(rhs_spec[0] + int(rhs_bdim <= rhs_spec[0]), groups, rhs)
  new_rhs = _reshape_axis_into(rhs_bdim + int(rhs_spec[0] < rhs_bdim), rhs_spec[0] + 1, new_rhs)
  new_rhs = _reshape_axis_into(rhs_spec[0], rhs_spec[0], new_rhs)
  out = bind(lhs, new_rhs, **params)
  out = _reshape_axis_out_of(out_spec[1], groups, out)
  out = _reshape_axis_out_of(out_spec[1] + 1, size, out)
  out = _reshape_axis_into(out_spec[1], out_spec[1] + 1, out)
  return out, out_spec[1]


batching.primitive_batchers[cks_conv_p] = _batch_rule
