"""Public convolution functions: drop-in replacements for their ``jax.lax`` namesakes."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cks_jax._src import backends, ffi, shapes
from cks_jax._src.primitive import bind

Array = jax.Array
Padding = str | Sequence[tuple[int, int]]
DimensionNumbers = lax.ConvDimensionNumbers | tuple[str, str, str] | None

_F32 = np.dtype("float32")


def _canonical_precision(precision):
  if precision is None or isinstance(precision, (str, lax.Precision)):
    return precision
  if isinstance(precision, (tuple, list)) and len(precision) == 2:
    return tuple(precision)
  raise ValueError(f"precision must be None, a lax.Precision, a string or a pair of them, "
                   f"got {precision!r}")


def _check_dtypes(lhs, rhs, preferred_element_type):
  if lhs.dtype != rhs.dtype:
    raise TypeError(
        f"lhs and rhs must have the same dtype, got lhs {lhs.dtype} and rhs {rhs.dtype}; "
        "cast one of them (e.g. rhs.astype(lhs.dtype))")
  if not shapes.is_supported_dtype(lhs.dtype):
    raise TypeError(
        f"cks_jax supports float32, float64, bfloat16 and float16 operands, got {lhs.dtype}; "
        "use jax.lax.conv_general_dilated for other dtypes")
  if preferred_element_type is None:
    return np.dtype(lhs.dtype)
  pet = np.dtype(preferred_element_type)
  if not shapes.is_supported_dtype(pet):
    raise TypeError(
        f"preferred_element_type must be float32, float64, bfloat16 or float16, got {pet}")
  canonical = np.dtype(jax.dtypes.canonicalize_dtype(pet))
  if canonical != pet:  # float64 without jax_enable_x64: float32, with lax's warning
    warnings.warn(
        f"Explicitly requested dtype {pet} requested in conv_general_dilated is not available, "
        f"and will be truncated to dtype {canonical}. To enable more dtypes, set the "
        "jax_enable_x64 configuration option or the JAX_ENABLE_X64 shell environment variable.",
        stacklevel=3)
    pet = canonical
  if pet.itemsize < np.dtype(lhs.dtype).itemsize:
    raise TypeError(
        f"preferred_element_type {pet} must not be narrower than the operand dtype {lhs.dtype}")
  return pet


def _channels_last_form(dimension_numbers):
  """The channels-last form of a convolution (see ``backends.wants_channels_last``):
  the permutations of lhs and rhs into it, the one of its output back into the
  caller's layout, and its dimension numbers."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  last = (0, nd + 1, *range(1, nd + 1))
  back = tuple(int(i) for i in np.argsort((out_spec[0], *out_spec[2:], out_spec[1])))
  return ((lhs_spec[0], *lhs_spec[2:], lhs_spec[1]), (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]),
          back, lax.ConvDimensionNumbers(last, (nd + 1, nd, *range(nd)), last))


def _channels_last(backend: str, spec, lhs, rhs) -> bool:
  """Whether this call runs on channels-last copies of its operands: where
  ``backends.wants_channels_last`` says so and ``"auto"`` then takes the CPU
  kernel (not its narrow-output alternatives)."""
  platform = backends.default_platform()
  if not backends.wants_channels_last(backend, platform, spec.dimension_numbers):
    return False
  lhs_perm, rhs_perm, _, dn = _channels_last_form(spec.dimension_numbers)
  params = dict(window_strides=spec.window_strides, padding=spec.padding,
                lhs_dilation=spec.lhs_dilation, rhs_dilation=spec.rhs_dilation,
                dimension_numbers=dn, feature_group_count=spec.feature_group_count,
                batch_group_count=spec.batch_group_count)
  shapes_cl = (tuple(lhs.shape[d] for d in lhs_perm), tuple(rhs.shape[d] for d in rhs_perm))
  return backends.choose(backend, platform, ffi.kernel_platforms(), params, shapes_cl,
                         lhs.dtype) == "ffi"


def conv_general_dilated(
    lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Padding,
    lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: DimensionNumbers = None, feature_group_count: int = 1,
    batch_group_count: int = 1, precision: Any = None,
    preferred_element_type: Any = None, out_sharding: Any = None, *,
    backend: str | None = None) -> Array:
  """General n-dimensional convolution, as ``jax.lax.conv_general_dilated``, on C-K-S kernels.

  Computes, per spatial dimension with stride ``s``, lhs dilation ``a``, rhs
  dilation ``d`` and low padding ``lo``::

      out[n, f, o] = sum_{c, k} lhs_dilated[n, c, o*s + k*d - lo] * rhs[f, c, k]

  without ever multiplying a padded or inserted zero: KS-deconv for ``a > 1``,
  Sk-dilated for ``d > 1``, ConvV2 (trimmed borders) for padding.

  Args:
    lhs: input, rank ``n+2`` (``n`` = 1, 2 or 3 spatial dimensions), e.g.
      ``[N, C, H, W]`` for the default dimension numbers.
    rhs: kernel, rank ``n+2``, e.g. ``[O, I, KH, KW]`` with ``I = C / feature_group_count``.
    window_strides: ``n`` positive integers.
    padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or ``n`` ``(low, high)`` pairs
      (negative values crop).
    lhs_dilation: ``n`` positive integers (transposed convolution), default ones.
    rhs_dilation: ``n`` positive integers (atrous convolution), default ones.
    dimension_numbers: ``None`` (``('NCHW', 'OIHW', 'NCHW')`` style), a
      ``lax.ConvDimensionNumbers`` or a triple of layout strings such as
      ``('NHWC', 'HWIO', 'NHWC')``.
    feature_group_count: grouped convolution; divides the lhs features.
    batch_group_count: batch-grouped convolution (filter gradients of grouped convs).
    precision: accepted for compatibility; the CPU kernels always accumulate
      float32 (or float64) exactly as ``Precision.HIGHEST`` would.
    preferred_element_type: output (and accumulation) dtype; 16-bit inputs
      always accumulate in float32.
    out_sharding: not supported; must be ``None``.
    backend: ``"auto"`` (default: the cks CPU kernel on the CPU, a few narrow
      outputs excepted as ``cks_jax.explain`` says, with operands in a layout
      that is not channels-last, such as NCHW/OIHW, transposed to
      channels-last copies and the result back; elsewhere, the
      CUDA kernel included, the portable decomposition for transposed
      convolutions and their filter gradients, else XLA),
      ``"ffi"``, ``"portable"`` or ``"xla"``; ``None`` takes the one set by
      ``cks_jax.use_backend``. ``cks_jax.explain`` tells which one runs.

  Returns:
    The output, shaped as ``jax.lax.conv_general_dilated``'s, e.g. ``[N, O, H', W']``.

  Raises:
    ValueError / TypeError: before any kernel runs, for wrong ranks, channel or
      group mismatches, non-positive strides or dilations, bad padding and
      unsupported or mixed dtypes.
  """
  if out_sharding is not None:
    raise NotImplementedError(
        "out_sharding is not supported by cks_jax; shard the inputs (or use "
        "jax.lax.with_sharding_constraint on the result) instead")
  backend = backends.check(backends.current() if backend is None else backend)
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  spec = shapes.canonicalize(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                             rhs_dilation, dimension_numbers, feature_group_count,
                             batch_group_count)
  out_dtype = _check_dtypes(lhs, rhs, preferred_element_type)
  shapes.check_index_range(lhs.shape, rhs.shape, shapes.out_shape(lhs.shape, rhs.shape, spec))
  in_dtype = np.dtype(lhs.dtype)
  # Kernels take (in, in) -> in, or 16-bit -> float32. Other (wider)
  # preferred types are computed at that type; bf16 <-> f16 via float32.
  if out_dtype == in_dtype or (in_dtype.itemsize == 2 and out_dtype == _F32):
    compute_in, compute_out = in_dtype, out_dtype
  elif out_dtype.itemsize > in_dtype.itemsize:
    compute_in = compute_out = out_dtype
  else:
    compute_in, compute_out = in_dtype, _F32
  lhs, rhs = lhs.astype(compute_in), rhs.astype(compute_in)
  dn, back = spec.dimension_numbers, None
  if _channels_last(backend, spec, lhs, rhs):
    # The CPU kernel on channels-last copies (backends.wants_channels_last);
    # their gradients are channels-last convolutions too.
    lhs_perm, rhs_perm, back, dn = _channels_last_form(dn)
    lhs, rhs = lax.transpose(lhs, lhs_perm), lax.transpose(rhs, rhs_perm)
  out = bind(lhs, rhs,
             window_strides=spec.window_strides, padding=spec.padding,
             lhs_dilation=spec.lhs_dilation, rhs_dilation=spec.rhs_dilation,
             dimension_numbers=dn,
             feature_group_count=spec.feature_group_count,
             batch_group_count=spec.batch_group_count,
             precision=_canonical_precision(precision), out_dtype=np.dtype(compute_out),
             backend=backend, rhs_reversed=False)
  if back is not None:
    out = lax.transpose(out, back)
  return out.astype(out_dtype)


def conv(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: str,
         precision: Any = None, preferred_element_type: Any = None, *,
         backend: str | None = None) -> Array:
  """``jax.lax.conv``: NCHW/OIHW convolution with string padding, on C-K-S kernels.

  Args:
    lhs: ``[N, C, *spatial]`` input.
    rhs: ``[O, C, *kernel]`` kernel.
    window_strides: one positive integer per spatial dimension.
    padding: ``'SAME'``, ``'SAME_LOWER'`` or ``'VALID'``.

  Returns:
    ``[N, O, *out_spatial]``.
  """
  return conv_general_dilated(lhs, rhs, window_strides, padding, precision=precision,
                              preferred_element_type=preferred_element_type, backend=backend)


def conv_with_general_padding(lhs: Array, rhs: Array, window_strides: Sequence[int],
                              padding: Padding, lhs_dilation: Sequence[int] | None,
                              rhs_dilation: Sequence[int] | None, precision: Any = None,
                              preferred_element_type: Any = None, *,
                              backend: str | None = None) -> Array:
  """``jax.lax.conv_with_general_padding`` (NCHW/OIHW) on C-K-S kernels."""
  return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                              rhs_dilation=rhs_dilation, precision=precision,
                              preferred_element_type=preferred_element_type, backend=backend)


def _conv_transpose_padding(k: int, s: int, padding) -> tuple[int, int]:
  """Low/high padding of the lhs-dilated conv equal to a transposed conv (lax's rule)."""
  if padding == "SAME":
    pad_len = k + s - 2
    pad_a = k - 1 if s > k - 1 else int(np.ceil(pad_len / 2))
  elif padding == "VALID":
    pad_len = k + s - 2 + max(k - s, 0)
    pad_a = k - 1
  elif isinstance(padding, tuple):
    pads = tuple(k - p - 1 for p in padding)
    pad_a, pad_len = pads[0], sum(pads)
  else:
    raise ValueError(f"padding must be 'SAME', 'VALID' or (low, high) pairs, got {padding!r}")
  return pad_a, pad_len - pad_a


_TRANSPOSE_DEFAULT_DNUMS = {3: ("NHC", "HIO", "NHC"), 4: ("NHWC", "HWIO", "NHWC"),
                            5: ("NHWDC", "HWDIO", "NHWDC")}


def conv_transpose(lhs: Array, rhs: Array, strides: Sequence[int], padding: Padding,
                   rhs_dilation: Sequence[int] | None = None,
                   dimension_numbers: DimensionNumbers = None, transpose_kernel: bool = False,
                   precision: Any = None, preferred_element_type: Any = None,
                   use_consistent_padding: bool = False, *,
                   backend: str | None = None) -> Array:
  """Transposed convolution, as ``jax.lax.conv_transpose``, on KS-deconv kernels.

  The input is never zero-inserted: each output phase is a dense convolution
  of the original input with one sub-kernel.

  Args:
    lhs: input, by default ``[N, *spatial, C]`` (``NHWC``).
    rhs: kernel, by default ``[*kernel, I, O]`` (``HWIO``); with
      ``transpose_kernel=True`` it is flipped spatially and I/O are swapped, as
      Keras' ``Conv2DTranspose`` expects.
    strides: the upsampling factor per spatial dimension.
    padding: ``'SAME'``, ``'VALID'`` or ``(low, high)`` pairs (see
      ``use_consistent_padding``, as in lax).
    rhs_dilation: kernel dilation, default ones.
    dimension_numbers: as ``conv_general_dilated``; default ``NHWC``-style.

  Returns:
    By default ``[N, *out_spatial, O]`` with ``out = (in - 1) * stride + ...``
    as in ``jax.lax.conv_transpose``.
  """
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  if lhs.ndim != rhs.ndim:
    raise ValueError(f"lhs and rhs must have the same rank, got lhs.shape={lhs.shape} and "
                     f"rhs.shape={rhs.shape}")
  if dimension_numbers is None:
    if lhs.ndim not in _TRANSPOSE_DEFAULT_DNUMS:
      raise ValueError(f"cks_jax convolutions have 1 to 3 spatial dimensions (rank 3 to 5), "
                       f"got rank {lhs.ndim}")
    dimension_numbers = _TRANSPOSE_DEFAULT_DNUMS[lhs.ndim]
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  nd = lhs.ndim - 2
  k_sdims = [rhs.shape[d] for d in dn.rhs_spec[2:]]
  strides = shapes._int_tuple("strides", strides, nd)
  if rhs_dilation is None:
    rhs_dilation = (1,) * nd
  rhs_dilation = shapes._int_tuple("rhs_dilation", rhs_dilation, nd)
  if use_consistent_padding or (isinstance(padding, str) and padding in {"SAME", "VALID"}):
    eff_k = [shapes.dilate_dim(k, r) for k, r in zip(k_sdims, rhs_dilation)]
    reps = [padding] * nd if isinstance(padding, str) else [tuple(p) for p in padding]
    pads = tuple(_conv_transpose_padding(k, s, p) for k, s, p in zip(eff_k, strides, reps))
  else:
    pads = padding
  if transpose_kernel:
    rhs = jnp.flip(rhs, axis=tuple(dn.rhs_spec[2:]))
    rhs = jnp.swapaxes(rhs, dn.rhs_spec[0], dn.rhs_spec[1])
  return conv_general_dilated(lhs, rhs, (1,) * nd, pads, strides, rhs_dilation, dn,
                              precision=precision,
                              preferred_element_type=preferred_element_type, backend=backend)
