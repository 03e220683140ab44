"""The CUDA kernel library (``libcks_cuda.so``): loading, FFI capsule, host harness.

The library is built whenever nvcc is found at install time. It links the
CUDA runtime statically, so it loads, and its host harness runs, on machines
without a GPU.
"""
from __future__ import annotations

import ctypes
import functools
import pathlib

import numpy as np

_DTYPE_CODES = {"float32": 0, "float64": 1, "bfloat16": 2, "float16": 3}


def library_path() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parent.parent / "libcks_cuda.so"


@functools.cache
def library() -> ctypes.CDLL | None:
  """The loaded CUDA library, or None when it was not built."""
  path = library_path()
  if not path.exists():
    return None
  lib = ctypes.CDLL(str(path))
  lib.cks_cuda_emulate.restype = ctypes.c_char_p
  p, i64 = ctypes.c_void_p, ctypes.c_int64
  lib.cks_cuda_emulate.argtypes = [ctypes.c_int, ctypes.c_int, p, p, p, p, p, p, i64,
                                   p, p, p, p, p, p, p, i64, i64]
  return lib


def available() -> bool:
  return library() is not None


def handler_capsule():
  import jax
  return jax.ffi.pycapsule(library().CksConvCudaHandler)


def _i64(xs) -> ctypes.Array:
  arr = (ctypes.c_int64 * len(xs))(*[int(x) for x in xs])
  return arr


def emulate(lhs: np.ndarray, rhs: np.ndarray, out_shape, out_dtype, *, window_strides, padding,
            lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
            batch_group_count, **_) -> np.ndarray:
  """Runs the CUDA kernel's phases on the CPU (the host harness of DESIGN.md 4.3)."""
  lib = library()
  if lib is None:
    raise RuntimeError("the CUDA library was not built (no nvcc at install time)")
  lhs, rhs = np.ascontiguousarray(lhs), np.ascontiguousarray(rhs)
  out = np.zeros(out_shape, out_dtype)
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  err = lib.cks_cuda_emulate(
      _DTYPE_CODES[lhs.dtype.name], _DTYPE_CODES[np.dtype(out_dtype).name],
      lhs.ctypes.data_as(ctypes.c_void_p), _i64(lhs.shape),
      rhs.ctypes.data_as(ctypes.c_void_p), _i64(rhs.shape),
      out.ctypes.data_as(ctypes.c_void_p), _i64(out.shape), lhs.ndim,
      _i64(window_strides), _i64(lhs_dilation), _i64(rhs_dilation),
      _i64([lo for lo, _ in padding]), _i64(lhs_spec), _i64(rhs_spec), _i64(out_spec),
      int(feature_group_count), int(batch_group_count))
  if err is not None:
    raise ValueError(err.decode())
  return out
