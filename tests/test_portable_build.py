"""The CPU kernel compiles without its x86 kernels, as it must on aarch64 (Apple silicon, Graviton).

Everything x86-specific in ffi/cpu (the AVX2/AVX-512 tiles, the bfloat16 pair kernel, streaming
stores) sits behind one guard in gemm.h; other CPUs build the portable kernel alone. Nothing here
runs on such a CPU, so a name used outside that guard but declared inside it (as `gemm::PairC`
was for a while: the bfloat16 filter-gradient path) would break every source build there unseen.
This compiles conv_cpu.cc with -DCKS_PORTABLE_ONLY, which takes the guard's other branch on
x86-64 too, with the extension's warning flags, and checks that the object has no ymm/zmm code
left in it. The portable kernel's numbers are tested elsewhere (CKS_CPU_ISA=0 in
test_kernel_paths), through the same code.
"""
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "c++")


def _ffi_include() -> str | None:
  try:
    import jax.ffi
    return jax.ffi.include_dir()
  except (ImportError, AttributeError):
    return None


def _why_skip() -> str | None:
  if not (ROOT / "ffi" / "cpu" / "conv_cpu.cc").exists():
    return f"the kernel sources are not beside the tests ({ROOT / 'ffi'})"
  if shutil.which(CXX) is None:
    return f"needs a C++ compiler ({CXX}) on PATH"
  if _ffi_include() is None:
    return "needs jax.ffi.include_dir() for the XLA FFI headers"
  return None


@pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))
def test_portable_only_build(tmp_path):
  obj = tmp_path / "conv_cpu.o"
  cmd = [CXX, "-std=c++17", "-O1", "-c", "-DCKS_PORTABLE_ONLY", "-Wall", "-Wextra", "-Werror",
         "-Wno-unused-parameter", f"-I{ROOT / 'ffi' / 'include'}", "-isystem", _ffi_include(),
         str(ROOT / "ffi" / "cpu" / "conv_cpu.cc"), "-o", str(obj)]
  res = subprocess.run(cmd, capture_output=True, text=True)
  assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
  assert obj.stat().st_size > 0
  if platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None:
    return  # the compile is the check; the register check below is x86's
  asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True,
                       text=True, check=True).stdout
  wide = [line for line in asm.splitlines() if "%ymm" in line or "%zmm" in line]
  assert not wide, f"x86 vector kernels left in a portable-only build: {wide[:5]}"
