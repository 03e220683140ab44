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
                                   p, p, p, p, p, p, p, i64, i64, p]
  ci, pi = ctypes.c_int, ctypes.POINTER(ctypes.c_int)
  lib.cks_cuda_mma_layout.argtypes = [ci, ci, ci, pi, pi]
  lib.cks_cuda_mma_model.argtypes = [ci, p, p, p]
  lib.cks_cuda_mma_block.argtypes = [ci, p, p, p]
  lib.cks_cuda_block_tile.argtypes = [pi, pi, pi]
  lib.cks_cuda_grid.restype = ctypes.c_char_p
  lib.cks_cuda_grid.argtypes = [p, p, p, i64, p, p, p, p, p, p, p, i64, i64, p, pi]
  return lib


def available() -> bool:
  return library() is not None


def handler_capsule():
  import jax
  return jax.ffi.pycapsule(library().CksConvCudaHandler)


def _i64(xs) -> ctypes.Array:
  arr = (ctypes.c_int64 * len(xs))(*[int(x) for x in xs])
  return arr


# The kernel's phase-2 implementations, as cks_cuda_emulate reports them.
PATHS = {0: "simt", 1: "mma"}


def _lib() -> ctypes.CDLL:
  lib = library()
  if lib is None:
    raise RuntimeError("the CUDA library was not built (no nvcc at install time)")
  return lib


def emulate(lhs: np.ndarray, rhs: np.ndarray, out_shape, out_dtype, *, window_strides, padding,
            lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
            batch_group_count, rhs_reversed: bool = False, return_path: bool = False, **_):
  """Runs the CUDA kernel's phases on the CPU (the host harness of DESIGN.md 4.3).

  Returns the output of shape ``out_shape``, or ``(output, path)`` with
  ``return_path``: the phase-2 implementation that ran, ``"simt"`` (float32,
  float64) or ``"mma"`` (bfloat16, float16 on tensor cores, through the host
  model of mma.sync), or None for an empty output. ``rhs_reversed`` (the
  primitive's param) flips rhs's spatial dimensions first, as the CUDA
  lowering does with ``lax.rev``.
  """
  lib = _lib()
  if rhs_reversed:
    rhs = np.flip(rhs, tuple(dimension_numbers[1][2:]))
  lhs, rhs = np.ascontiguousarray(lhs), np.ascontiguousarray(rhs)
  out = np.zeros(out_shape, out_dtype)
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  path = ctypes.c_int(-1)
  err = lib.cks_cuda_emulate(
      _DTYPE_CODES[lhs.dtype.name], _DTYPE_CODES[np.dtype(out_dtype).name],
      lhs.ctypes.data_as(ctypes.c_void_p), _i64(lhs.shape),
      rhs.ctypes.data_as(ctypes.c_void_p), _i64(rhs.shape),
      out.ctypes.data_as(ctypes.c_void_p), _i64(out.shape), lhs.ndim,
      _i64(window_strides), _i64(lhs_dilation), _i64(rhs_dilation),
      _i64([lo for lo, _ in padding]), _i64(lhs_spec), _i64(rhs_spec), _i64(out_spec),
      int(feature_group_count), int(batch_group_count), ctypes.byref(path))
  if err is not None:
    raise ValueError(err.decode())
  return (out, PATHS.get(path.value)) if return_path else out


# ---------------------------------------------------------------- tensor-core pieces
def _bits16(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x)).view(np.uint16)


def mma_layout(operand: str) -> np.ndarray:
  """The m16n8k16 fragment layout the kernel uses (ffi/cuda/mma_layout.cuh).

  ``operand`` is "a", "b" or "c"; returns int array [32 lanes, elements, 2]
  of (row, col) for element i of each lane's fragment (8, 4 and 4 elements).
  """
  lib = _lib()
  op = "abc".index(operand)
  n = {"a": 8, "b": 4, "c": 4}[operand]
  out = np.zeros((32, n, 2), np.int64)
  row, col = ctypes.c_int(), ctypes.c_int()
  for lane in range(32):
    for i in range(n):
      if not lib.cks_cuda_mma_layout(op, lane, i, ctypes.byref(row), ctypes.byref(col)):
        raise ValueError(f"no element {i} in operand {operand}")
      out[lane, i] = row.value, col.value
  return out


def mma_model(dtype, a_regs: np.ndarray, b_regs: np.ndarray, c: np.ndarray) -> np.ndarray:
  """The host model of one mma.sync.m16n8k16 on 32 lanes' registers.

  a_regs: uint32 [32, 4], b_regs: uint32 [32, 2] (pairs of 16-bit ``dtype``
  values, lower element in the low half), c: float32 [32, 4]. Returns d,
  float32 [32, 4].
  """
  a = np.ascontiguousarray(a_regs, np.uint32)
  b = np.ascontiguousarray(b_regs, np.uint32)
  d = np.array(c, np.float32, order="C")
  assert a.shape == (32, 4) and b.shape == (32, 2) and d.shape == (32, 4)
  if not _lib().cks_cuda_mma_model(_DTYPE_CODES[np.dtype(dtype).name], a.ctypes.data,
                                   b.ctypes.data, d.ctypes.data):
    raise ValueError(f"no tensor-core path for {dtype}")
  return d


def block_tile() -> tuple[int, int, int]:
  """The kernel's block tile (kBM, kBN, kBK)."""
  bm, bn, bk = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
  _lib().cks_cuda_block_tile(ctypes.byref(bm), ctypes.byref(bn), ctypes.byref(bk))
  return bm.value, bn.value, bk.value


def launch_grid(lhs_shape, rhs_shape, out_shape, params) -> tuple[tuple[int, int, int], bool]:
  """The CUDA kernel's launch grid for a convolution (``params``: cks_conv's).

  Returns ((x, y, z), fits): the most blocks in each dimension over the
  kernel's launches (conv_cuda.cu's grid_of: x row tiles of the largest
  phase, y output-feature tiles times groups, z phases of one launch) and
  whether CUDA can launch every one of them.
  """
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  grid, fits = (ctypes.c_int64 * 3)(), ctypes.c_int()
  err = _lib().cks_cuda_grid(
      _i64(lhs_shape), _i64(rhs_shape), _i64(out_shape), len(lhs_shape),
      _i64(params["window_strides"]), _i64(params["lhs_dilation"]),
      _i64(params["rhs_dilation"]), _i64([lo for lo, _ in params["padding"]]), _i64(lhs_spec),
      _i64(rhs_spec), _i64(out_spec), int(params["feature_group_count"]),
      int(params["batch_group_count"]), grid, ctypes.byref(fits))
  if err is not None:
    raise ValueError(err.decode())
  return (grid[0], grid[1], grid[2]), bool(fits.value)


def check_grid(lhs_shape, rhs_shape, out_shape, params) -> None:
  """Raises ValueError, at trace time, where the kernel could not launch
  (launch_grid: CUDA allows 65535 blocks in y, one per 64-feature output tile
  of each group), instead of failing inside XLA."""
  (x, y, z), fits = launch_grid(lhs_shape, rhs_shape, out_shape, params)
  if not fits:
    _, bn, _ = block_tile()
    raise ValueError(
        f"the CUDA kernel cannot launch this convolution: its grid needs {x} x {y} x {z} "
        f"blocks, over CUDA's 2^31 - 1 x 65535 x 65535 (y: the groups times their {bn}-feature "
        "output tiles); use backend='auto' or 'xla'")


def mma_block(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """One block tile of the tensor-core product as the harness computes it.

  a: [kBM, kBK], b: [kBK, kBN] (both bfloat16 or both float16), c: float32
  [kBM, kBN]. Runs shared tiles -> every warp's fragment loads -> host model
  of mma.sync -> accumulators, and returns a @ b + c, float32 [kBM, kBN].
  """
  bm, bn, bk = block_tile()
  assert a.shape == (bm, bk) and b.shape == (bk, bn) and c.shape == (bm, bn)
  assert a.dtype == b.dtype
  ab, bb = _bits16(a), _bits16(b)
  d = np.array(c, np.float32, order="C")
  if not _lib().cks_cuda_mma_block(_DTYPE_CODES[np.dtype(a.dtype).name], ab.ctypes.data,
                                   bb.ctypes.data, d.ctypes.data):
    raise ValueError(f"no tensor-core path for {a.dtype}")
  return d
