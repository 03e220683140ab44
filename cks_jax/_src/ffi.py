"""Loading the compiled extension and registering its FFI targets with XLA."""
from __future__ import annotations

import functools

import jax

CPU_TARGET = "cks_conv_cpu"
CUDA_TARGET = "cks_conv_cuda"


@functools.cache
def extension():
  """The compiled ``cks_jax._cks`` module (raises ImportError with advice if missing)."""
  try:
    from cks_jax import _cks  # type: ignore[attr-defined]
  except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "cks_jax's compiled extension is missing; install the package with "
        "`pip install .` (it builds the C++ kernels) rather than importing it from the "
        "source tree") from e
  from cks_jax import __version__
  if _cks.__version__ != __version__:
    raise ImportError(
        f"cks_jax {__version__} found a compiled extension of version {_cks.__version__}; "
        "reinstall the package (`pip install --force-reinstall --no-deps .`)")
  return _cks


@functools.cache
def register() -> frozenset[str]:
  """Registers every compiled FFI target; returns the platforms that have a kernel."""
  from cks_jax._src import cuda
  regs = extension().registrations()
  jax.ffi.register_ffi_target(CPU_TARGET, regs[CPU_TARGET], platform="cpu")
  platforms = {"cpu"}
  if cuda.available():
    jax.ffi.register_ffi_target(CUDA_TARGET, cuda.handler_capsule(), platform="CUDA")
    platforms.add("cuda")
  return frozenset(platforms)


def kernel_platforms() -> frozenset[str]:
  """Platforms on which the op runs on cks kernels (others lower to XLA's convolution).

  ``"cuda"`` is listed when the CUDA library was built (nvcc at install time).
  """
  return register()


def release_cpu_buffers() -> int:
  """Frees the buffers the CPU kernel keeps between calls; returns the bytes freed.

  Two kinds are kept for the next call instead of being allocated afresh, each in one
  process-wide free list (one buffer per call that ran at the same time as another, usually one
  in all, each as large as the largest it has served):

  - the packed B panels (``explain(...).scratch["packed_b"]`` for one problem), in 2 MB pages
    where Linux grants transparent huge pages (a packed B on 4 KB pages ran at two speeds,
    depending on where it landed in physical memory); rounded up to whole 2 MB, at most 64 MB
    kept;
  - the float32 copies of bfloat16 and float16 operands (and, on the dot path, of their
    output), on which 16-bit convolutions run (``explain(...).scratch["widened"]``).

  Call this after a run of large layers to hand that memory back; the next call allocates
  again. A no-op (returns 0) when nothing is held.
  """
  ext = extension()
  held = int(ext.cpu_widened_held_bytes()) + int(ext.cpu_packed_b_held_bytes())
  ext.cpu_widened_release()
  ext.cpu_packed_b_release()
  return held
