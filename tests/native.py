"""Small C++ programs built on the kernel's headers (ffi/) and run, for the tests that compare
vector code with the scalar reference lane by lane (test_bf16_rounding, test_convert)."""
import os
import platform
import shutil
import subprocess
from pathlib import Path

FFI = Path(__file__).resolve().parents[1] / "ffi"
CXX = os.environ.get("CXX", "c++")


def why_skip(header: str, cpu_flags: tuple[str, ...], what: str) -> str | None:
  """Why a program on ffi/``header`` testing ``what`` (x86-64 code needing ``cpu_flags``, as
  /proc/cpuinfo names them) cannot run here, or None."""
  if platform.machine() not in ("x86_64", "AMD64"):
    return f"{what} are x86-64 only (this is {platform.machine()})"
  if not (FFI / header).exists():
    return f"the kernel sources are not beside the tests ({FFI})"
  if shutil.which(CXX) is None:
    return f"needs a C++ compiler ({CXX}) on PATH"
  try:
    flags = Path("/proc/cpuinfo").read_text().split()
  except OSError:
    return f"cannot read /proc/cpuinfo to tell whether this CPU has {' + '.join(cpu_flags)}"
  missing = [f for f in cpu_flags if f not in flags]
  if missing:
    return f"this CPU has no {' + '.join(missing)} ({what} do not run here)"
  return None


def build_and_run(tmp_path: Path, name: str, program: str,
                  **env: str) -> subprocess.CompletedProcess:
  """Compiles ``program`` against ffi/ and ffi/include, runs it with ``env`` added."""
  src, exe = tmp_path / f"{name}.cc", tmp_path / name
  src.write_text(program)
  subprocess.run([CXX, "-O2", "-std=c++17", f"-I{FFI}", f"-I{FFI / 'include'}", str(src), "-o",
                  str(exe)], check=True, capture_output=True, text=True)
  return subprocess.run([str(exe)], capture_output=True, text=True, env={**os.environ, **env})
