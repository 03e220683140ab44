"""Choosing how a cks_conv runs: the FFI kernel, the portable lax decomposition, or XLA.

- ``"ffi"``: the C-K-S C++/CUDA kernel (CPU always; CUDA when built). An error
  on a platform without one.
- ``"portable"``: the same C-K-S decomposition written as dense, undilated
  ``lax`` convolutions over strided slices (any XLA backend).
- ``"xla"``: XLA's own convolution (computes on the zeros).
- ``"auto"`` (default): the FFI kernel where one is registered. Elsewhere the
  portable path for convolutions with lhs dilation and no batch groups: those
  are transposed convolutions and the filter gradients of transposed ones,
  where it was measured 5-50x faster than XLA on gradients. Everything else
  goes to XLA. Atrous (rhs-dilated) convolutions go to XLA too: the portable
  path was 0.8-1.2x XLA at dilations 2-8, and far slower at 12-18
  (``benchmarks/results/``).
"""
from __future__ import annotations

import contextlib
import threading

BACKENDS = ("auto", "ffi", "portable", "xla")

_state = threading.local()


def check(name: str) -> str:
  if name not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
  return name


def current() -> str:
  """The backend used when a call passes ``backend=None``."""
  return getattr(_state, "backend", "auto")


@contextlib.contextmanager
def use_backend(name: str):
  """Context manager: run the cks convolutions traced inside on ``name``.

  Example::

      with cks_jax.use_backend("portable"):
        y = jax.jit(model)(x)   # traced here, so lowered to the portable path
  """
  prev = current()
  _state.backend = check(name)
  try:
    yield
  finally:
    _state.backend = prev


def choose(requested: str, platform: str, kernel_platforms, params) -> str:
  """The backend that actually runs for ``requested`` on ``platform``."""
  platform = {"gpu": "cuda"}.get(platform, platform)
  has_kernel = platform in kernel_platforms
  if requested == "ffi":
    if not has_kernel:
      raise NotImplementedError(
          f"backend='ffi' was requested but there is no cks kernel for platform {platform!r} "
          "(CPU always; CUDA only when the package was built with nvcc). Use "
          "backend='portable' or 'auto'.")
    return "ffi"
  if requested in ("portable", "xla"):
    return requested
  if has_kernel:
    return "ffi"
  deconv = any(a > 1 for a in params["lhs_dilation"]) and params["batch_group_count"] == 1
  return "portable" if deconv else "xla"
