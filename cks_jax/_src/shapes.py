"""Argument validation and the shape rule, with jax.lax's semantics.

Everything here runs in Python before any kernel: a bad argument raises a
ValueError or TypeError that names it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from jax import lax

ConvDimensionNumbers = lax.ConvDimensionNumbers

SUPPORTED_DTYPES = (np.dtype("float32"), np.dtype("float64"))
_16BIT = ("bfloat16", "float16")


def dilate_dim(d: int, dilation: int) -> int:
  """Length of a dimension of size ``d`` with ``dilation - 1`` zeros between elements."""
  return 0 if d == 0 else 1 + dilation * (d - 1)


def stride_dim(padded: int, window: int, stride: int) -> int:
  """Number of windows of size ``window`` with stride ``stride`` in ``padded``."""
  return 0 if padded < window else (padded - window) // stride + 1


def cropped_window(size: int, lhs_dilation: int, lo: int,
                   hi: int) -> tuple[int, int, int, int] | None:
  """A dimension's negative padding as a slice: ``(start, stop, lo2, hi2)``.

  lax's padding ``(lo, hi)`` of a dimension of ``size`` elements with lhs
  dilation ``a`` crops ``-lo`` (``-hi``) positions of the dilated input where
  negative. Elements ``[start, stop)`` padded by ``(lo2, hi2) >= 0`` (the
  dilation's zeros next to a cut turn into padding) give the same padded,
  dilated dimension. None where the crop leaves no element (every window
  reads padding only: the output is zeros). ``size`` 0 is returned as is.
  """
  if size == 0 or (lo >= 0 and hi >= 0):
    return 0, size, lo, hi
  a = lhs_dilation
  start, stop, lo2, hi2 = 0, size, lo, hi
  if lo < 0:
    start = -(lo // a)  # the first element at or past dilated position -lo
    lo2 = a * start + lo
  if hi < 0:
    last = a * (size - 1) + hi  # the last dilated position kept
    stop = last // a + 1
    hi2 = last - a * (stop - 1)
  return None if stop <= start else (start, stop, lo2, hi2)


def _vjp_sizes(in_sp, k_sp, out_sp, window_strides, padding, lhs_dilation, rhs_dilation):
  """Per spatial dimension of a convolution: its low padding and the dilated lhs, kernel and
  output sizes, from which both transposes' paddings follow."""
  for i, k, o, s, (lo, _), ld, rd in zip(in_sp, k_sp, out_sp, window_strides, padding,
                                        lhs_dilation, rhs_dilation):
    yield lo, dilate_dim(i, ld), dilate_dim(k, rd), dilate_dim(o, s)


def vjp_lhs_padding(in_sp: Sequence[int], k_sp: Sequence[int], out_sp: Sequence[int],
                    window_strides: Sequence[int], padding: Sequence[tuple[int, int]],
                    lhs_dilation: Sequence[int],
                    rhs_dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Padding of the d-lhs convolution (cotangent * flipped kernel, window strides and lhs
  dilation swapped) that gives back the lhs's spatial sizes ``in_sp``; ``k_sp`` and ``out_sp``
  are the kernel's and the forward output's spatial sizes."""
  return tuple((int(rhs_d - lo - 1), int(lhs_d + lo - out_d))
               for lo, lhs_d, rhs_d, out_d in _vjp_sizes(in_sp, k_sp, out_sp, window_strides,
                                                         padding, lhs_dilation, rhs_dilation))


def vjp_rhs_padding(in_sp: Sequence[int], k_sp: Sequence[int], out_sp: Sequence[int],
                    window_strides: Sequence[int], padding: Sequence[tuple[int, int]],
                    lhs_dilation: Sequence[int],
                    rhs_dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Padding of the d-rhs convolution (lhs * cotangent, window strides and rhs dilation
  swapped) that gives back the kernel's spatial sizes ``k_sp``."""
  return tuple((int(lo), int(out_d - lhs_d + rhs_d - lo - 1))
               for lo, lhs_d, rhs_d, out_d in _vjp_sizes(in_sp, k_sp, out_sp, window_strides,
                                                         padding, lhs_dilation, rhs_dilation))


def is_supported_dtype(dtype) -> bool:
  dtype = np.dtype(dtype)
  return dtype in SUPPORTED_DTYPES or dtype.name in _16BIT


def _int_tuple(name: str, value, n: int) -> tuple[int, ...]:
  try:
    out = tuple(operator.index(v) for v in value)
  except TypeError:
    raise TypeError(f"{name} must be a sequence of {n} integers, got {value!r}") from None
  if len(out) != n:
    raise ValueError(
        f"{name} must have one entry per spatial dimension ({n}), got {len(out)}: {value!r}")
  if any(v < 1 for v in out):
    raise ValueError(f"{name} must contain only positive integers, got {value!r}")
  return out


@dataclass(frozen=True)
class ConvSpec:
  """Validated, canonical parameters of one convolution (hashable)."""
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  dimension_numbers: ConvDimensionNumbers
  feature_group_count: int
  batch_group_count: int


def spec_of(params: dict) -> ConvSpec:
  """The ConvSpec in a ``cks_conv`` primitive's params."""
  return ConvSpec(params["window_strides"], params["padding"], params["lhs_dilation"],
                  params["rhs_dilation"], params["dimension_numbers"],
                  params["feature_group_count"], params["batch_group_count"])


def canonicalize(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides, padding,
                 lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count: int,
                 batch_group_count: int) -> ConvSpec:
  """Validates the arguments of ``conv_general_dilated`` and resolves padding strings."""
  lhs_shape, rhs_shape = tuple(lhs_shape), tuple(rhs_shape)
  if len(lhs_shape) != len(rhs_shape):
    raise ValueError(
        f"lhs and rhs must have the same rank, got lhs.shape={lhs_shape} and "
        f"rhs.shape={rhs_shape}")
  if not 3 <= len(lhs_shape) <= 5:
    raise ValueError(
        f"cks_jax convolutions have 1 to 3 spatial dimensions (operands of rank 3 to 5), "
        f"got rank {len(lhs_shape)} (lhs.shape={lhs_shape})")
  nd = len(lhs_shape) - 2
  dnums = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  lhs_spec, rhs_spec, _ = dnums

  if window_strides is None:
    raise TypeError("window_strides is required: a sequence of positive integers")
  window_strides = _int_tuple("window_strides", window_strides, nd)
  lhs_dilation = (1,) * nd if lhs_dilation is None else _int_tuple("lhs_dilation", lhs_dilation, nd)
  rhs_dilation = (1,) * nd if rhs_dilation is None else _int_tuple("rhs_dilation", rhs_dilation, nd)

  for name, v in (("feature_group_count", feature_group_count),
                  ("batch_group_count", batch_group_count)):
    try:
      operator.index(v)
    except TypeError:
      raise TypeError(f"{name} must be an integer, got {v!r}") from None
    if v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v}")
  feature_group_count, batch_group_count = int(feature_group_count), int(batch_group_count)
  if feature_group_count > 1 and batch_group_count > 1:
    raise ValueError(
        "at most one of feature_group_count and batch_group_count may be > 1, got "
        f"feature_group_count={feature_group_count} and batch_group_count={batch_group_count}")
  n, c = lhs_shape[lhs_spec[0]], lhs_shape[lhs_spec[1]]
  o, i = rhs_shape[rhs_spec[0]], rhs_shape[rhs_spec[1]]
  if c % feature_group_count:
    raise ValueError(
        f"feature_group_count={feature_group_count} must divide the lhs feature dimension "
        f"size {c}")
  if c // feature_group_count != i:
    raise ValueError(
        f"lhs feature dimension size divided by feature_group_count must equal the rhs input "
        f"feature dimension size, but {c} // {feature_group_count} != {i} "
        f"(lhs.shape={lhs_shape}, rhs.shape={rhs_shape}, dimension_numbers={dnums})")
  if o % feature_group_count:
    raise ValueError(
        f"rhs output feature dimension size {o} must be a multiple of "
        f"feature_group_count={feature_group_count}")
  if batch_group_count > 1 and n % batch_group_count:
    raise ValueError(
        f"batch_group_count={batch_group_count} must divide the lhs batch dimension size {n}")
  if o % batch_group_count:
    raise ValueError(
        f"rhs output feature dimension size {o} must be a multiple of "
        f"batch_group_count={batch_group_count}")

  lhs_sp = [lhs_shape[d] for d in lhs_spec[2:]]
  rhs_sp = [rhs_shape[d] for d in rhs_spec[2:]]
  if isinstance(padding, str):
    if any(a != 1 for a in lhs_dilation):
      raise ValueError(
          "String padding is not implemented for transposed convolution (lhs_dilation > 1); "
          "give explicit (low, high) pairs or use cks_jax.conv_transpose")
    if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
      raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or a sequence of "
                       f"(low, high) pairs, got {padding!r}")
    eff_k = [dilate_dim(k, d) for k, d in zip(rhs_sp, rhs_dilation)]
    padding = lax.padtype_to_pads(lhs_sp, eff_k, window_strides, padding)
  try:
    padding = tuple((operator.index(lo), operator.index(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    raise ValueError(
        "padding must be a string or a sequence of (low, high) integer pairs, "
        f"got {padding!r}") from None
  if len(padding) != nd:
    raise ValueError(f"padding must have one (low, high) pair per spatial dimension ({nd}), "
                     f"got {len(padding)}")
  for d in range(nd):
    if dilate_dim(lhs_sp[d], lhs_dilation[d]) + sum(padding[d]) < 0:
      raise ValueError(
          f"negative padding {padding[d]} is larger than spatial dimension {d} of the "
          f"(dilated) lhs, size {dilate_dim(lhs_sp[d], lhs_dilation[d])}")
  return ConvSpec(window_strides, padding, lhs_dilation, rhs_dilation, dnums,
                  feature_group_count, batch_group_count)


def out_shape(lhs_shape, rhs_shape, spec: ConvSpec) -> tuple[int, ...]:
  """Output shape, in the output's own dimension order (lax's shape rule)."""
  lhs_spec, rhs_spec, out_spec = spec.dimension_numbers
  nd = len(lhs_spec) - 2
  canon = [lhs_shape[lhs_spec[0]] // spec.batch_group_count, rhs_shape[rhs_spec[0]]]
  for d in range(nd):
    n = dilate_dim(lhs_shape[lhs_spec[2 + d]], spec.lhs_dilation[d]) + sum(spec.padding[d])
    k = dilate_dim(rhs_shape[rhs_spec[2 + d]], spec.rhs_dilation[d])
    canon.append(stride_dim(n, k, spec.window_strides[d]))
  shape = [0] * len(canon)
  for pos, dim in enumerate(out_spec):
    shape[dim] = canon[pos]
  return tuple(shape)


INT64_LIMIT = 2**62


def check_index_range(lhs_shape, rhs_shape, out_shape_) -> None:
  """Rejects operands whose element offsets would overflow the kernels' 64-bit indices."""
  for name, shape in (("lhs", lhs_shape), ("rhs", rhs_shape), ("output", out_shape_)):
    if int(np.prod([int(s) for s in shape], dtype=object)) >= INT64_LIMIT:
      raise ValueError(f"{name} of shape {tuple(shape)} has too many elements to index")
