"""The CPU kernel compiles without its x86 kernels, as it must on aarch64 (Apple silicon, Graviton).

Everything x86-specific in ffi/cpu (the AVX2/AVX-512 tiles, the bfloat16 pair kernel, streaming
stores) sits behind one guard in gemm.h; other CPUs build the portable kernel alone. Nothing here
runs on such a CPU, so a name used outside that guard but declared inside it (as `gemm::PairC`
was for a while: the bfloat16 filter-gradient path) would break every source build there unseen.
This compiles conv_cpu.cc with -DCKS_PORTABLE_ONLY, which takes the guard's other branch on
x86-64 too, with the extension's warning flags, and checks that no x86 kernel is left in the
object (no function named after AVX, and no ymm/zmm code where the compiler's default target has
none): with the default compiler, and with clang where CKS_CLANGXX names one (Apple silicon
builds with Apple's clang), which also compiles the whole kernel. The portable kernel's numbers
are tested elsewhere (CKS_CPU_ISA=0 in test_kernel_paths), through the same code; .ci/run also
builds the extension with clang and runs the kernel tests on it.
"""
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The compilers to build with: the default one, and clang where CKS_CLANGXX names one (.ci/run
# sets it to ziglang's clang, from the package registry: macOS builds with Apple's clang).
COMPILERS = {"default": os.environ.get("CXX", "c++"), "clang": os.environ.get("CKS_CLANGXX", "")}


def _ffi_include() -> str | None:
  try:
    import jax.ffi
    return jax.ffi.include_dir()
  except (ImportError, AttributeError):
    return None


def _compiler(name: str) -> str:
  """The compiler `name` names, or skips the test saying what is missing."""
  if not (ROOT / "ffi" / "cpu" / "conv_cpu.cc").exists():
    pytest.skip(f"the kernel sources are not beside the tests ({ROOT / 'ffi'})")
  if _ffi_include() is None:
    pytest.skip("needs jax.ffi.include_dir() for the XLA FFI headers")
  cxx = COMPILERS[name]
  if not cxx:
    pytest.skip("no clang named: set CKS_CLANGXX to a clang++ (.ci/run uses ziglang's)")
  if shutil.which(cxx) is None:
    pytest.skip(f"needs the C++ compiler {cxx!r} on PATH")
  return cxx


def _compile(cxx: str, obj: Path, *flags: str) -> None:
  cmd = [cxx, "-std=c++17", "-c", *flags, "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
         f"-I{ROOT / 'ffi' / 'include'}", "-isystem", _ffi_include(),
         str(ROOT / "ffi" / "cpu" / "conv_cpu.cc"), "-o", str(obj)]
  res = subprocess.run(cmd, capture_output=True, text=True)
  assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
  assert obj.stat().st_size > 0


def _kernel_symbols(obj: Path) -> list[str]:
  """The object's functions named after an x86 ISA: the AVX2/AVX-512 tiles and strips."""
  names = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
  return [line for line in names.splitlines() if "avx" in line.lower()]


def _wide_lines(obj: Path) -> list[str]:
  """The object's instructions on ymm or zmm registers."""
  asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True,
                       text=True, check=True).stdout
  return [line for line in asm.splitlines() if "%ymm" in line or "%zmm" in line]


def _targets_avx(cxx: str, tmp_path: Path) -> bool:
  """Whether `cxx` vectorises with ymm/zmm by default (zig's clang targets the host CPU; some
  distributions build for x86-64-v3): a loop it may vectorise, compiled at -O3."""
  src, obj = tmp_path / "probe.cc", tmp_path / "probe.o"
  src.write_text("void scale(float* a, int n) { for (int i = 0; i < n; ++i) a[i] *= 2.0f; }\n")
  subprocess.run([cxx, "-O3", "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
  return bool(_wide_lines(obj))


@pytest.mark.parametrize("compiler", sorted(COMPILERS))
def test_portable_only_build(tmp_path, compiler):
  cxx = _compiler(compiler)
  obj = tmp_path / "conv_cpu.o"
  _compile(cxx, obj, "-O1", "-DCKS_PORTABLE_ONLY")
  if platform.machine() not in ("x86_64", "AMD64") or shutil.which("nm") is None:
    return  # the compile is the check; the checks below are x86's
  left = _kernel_symbols(obj)
  assert not left, f"x86 kernels left in a portable-only build: {left[:5]}"
  # No ymm/zmm code either, where the compiler's default target has none of its own.
  if shutil.which("objdump") is not None and not _targets_avx(cxx, tmp_path):
    wide = _wide_lines(obj)
    assert not wide, f"x86 vector kernels left in a portable-only build: {wide[:5]}"


def test_clang_build(tmp_path):
  """The whole kernel, x86 tiles included, compiled by clang with the extension's warnings at -O3
  (.ci/run's CKS_CLANGXX builds for plain x86-64, as an Intel Mac's clang or a Linux clang without
  -march does: the tiles' target attributes then decide what may be inlined where)."""
  obj = tmp_path / "conv_cpu.o"
  _compile(_compiler("clang"), obj, "-O3", "-fPIC")
  if platform.machine() in ("x86_64", "AMD64") and shutil.which("nm") is not None:
    assert _kernel_symbols(obj), "no AVX2/AVX-512 kernel in a clang build for x86-64"
