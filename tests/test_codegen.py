"""The x86 GEMM tiles (ffi/cpu/gemm.h) keep their accumulators in registers.

A tile whose accumulators the compiler keeps on the stack still gives the right numbers, only
slower, so no value test sees it: one rolled loop over the panels of an edge tile (a runtime
index into the accumulator array) made GCC store and reload the whole 6 x 64 tile at every
segment of a RunA, and cost 64-channel forwards 2-7 %. This compiles every tile template the
way the extension is built (-O3), for every A source, B source and C destination, and counts,
per instantiation, the ymm/zmm registers it stores to the stack: only an edge tile's stores to
its scratch copy (one per accumulator vector) may be there.

Needs GCC for x86-64 and objdump; skipped elsewhere, with the reason.
"""
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

FFI = Path(__file__).resolve().parents[1] / "ffi"
CXX = os.environ.get("CXX", "c++")
MR = 6  # rows of every tile (gemm::Tile)

# (P, H) of panels_avx512: P zmm panels and H ymm half panels per row.
AVX512_TILES = [(4, 0), (2, 0), (1, 1), (1, 0), (0, 1)]
AVX2_TILES = [2, 1]  # NV: ymm per row of panel_avx2
PAIR_TILES = [4, 2, 1]  # P: zmm per row of pairs_avx512
A_SOURCES = ["RunA", "IndirectA", "PackedA"]
B_SOURCES = ["PanelB", "TableB", "RunB"]
C_DESTS = ["OutC", "BufC"]


def _why_skip() -> str | None:
  if platform.machine() not in ("x86_64", "AMD64"):
    return f"the AVX2/AVX-512 tiles are x86-64 only (this is {platform.machine()})"
  if not (FFI / "cpu" / "gemm.h").exists():
    return f"the kernel sources are not beside the tests ({FFI})"
  if shutil.which(CXX) is None or shutil.which("objdump") is None:
    return f"needs {CXX} and objdump on PATH"
  version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
  if "clang" in version.lower() or not re.search(r"g\+\+|GCC|Free Software", version):
    return f"register allocation checked for GCC only; {CXX} is: {version.splitlines()[0]}"
  return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))


def _instantiations() -> dict[str, int]:
  """Explicit instantiation line -> most ymm/zmm stores to the stack allowed."""
  out = {}
  for t in ("float", "double"):
    for a in A_SOURCES:
      for b in B_SOURCES:
        for c in C_DESTS:
          srcs = f"{a}<{t}>, {b}<{t}>, {c}<{t}>"
          args = f"int64_t, int64_t, int64_t, const {a}<{t}>&, const {b}<{t}>&, const {c}<{t}>&"
          for p, h in AVX512_TILES:
            line = f"template void cks::gemm::panels_avx512<{p}, {h}, {t}, {srcs}>({args});"
            out[line] = MR * (p + h) if c == "OutC" else 0
          for nv in AVX2_TILES:
            line = f"template void cks::gemm::panel_avx2<{nv}, {t}, {srcs}>({args});"
            out[line] = MR * nv if c == "OutC" else 0
  for p in PAIR_TILES:  # bfloat16 pairs: masked stores, no edge tile copy
    for to in ("uint16_t", "float"):
      for a in ("PairRunA", "PairPackedA"):
        out[f"template void cks::gemm::pairs_avx512<{p}, {to}, {a}>(int64_t, int64_t, int64_t, "
            f"const {a}&, const uint16_t*, int64_t, const PairC<{to}>&);"] = 0
  return out


# A whole ymm or zmm register stored to an address on %rsp or %rbp (AT&T syntax): every
# spill of an accumulator starts with one. (Loads from the stack are store_edge reading t;
# vmovq of an xmm is a general register parked in a vector one.)
STACK_VECTOR = re.compile(r"\bv\S+\s+%[yz]mm\d+,\s*-?(0x[0-9a-f]+)?\(%r[sb]p")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")


def _stack_vector_stores(obj: Path) -> dict[str, int]:
  dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)],
                        capture_output=True, text=True, check=True).stdout
  counts: dict[str, int] = {}
  name = None
  for line in dump.splitlines():
    m = FUNCTION.match(line)
    if m:
      name = m.group(1)
      counts[name] = 0
    elif name is not None and STACK_VECTOR.search(line):
      counts[name] += 1
  return counts


def _key(signature: str) -> str:
  """'panels_avx512<4, 0, float, RunA, PanelB, OutC>' (or 'pairs_avx512<4, float, PairRunA>')
  from a demangled name or an instantiation."""
  m = re.search(r"((?:panels?|pairs)_avx\w+)<(.*?)>\(", signature)
  args = re.sub(r"cks::gemm::|<(float|double)>", "", m.group(2)).replace("unsigned short",
                                                                        "uint16_t")
  return f"{m.group(1)}<{', '.join(a.strip() for a in args.split(','))}>"


def test_gemm_tiles_keep_accumulators_in_registers(tmp_path):
  allowed = _instantiations()
  src = tmp_path / "tiles.cc"
  src.write_text('#include "cpu/gemm.h"\nusing namespace cks::gemm;\n' + "\n".join(allowed) + "\n")
  obj = tmp_path / "tiles.o"
  subprocess.run([CXX, "-O3", "-DNDEBUG", "-std=c++17", "-fPIC", f"-I{FFI}", "-c", str(src),
                  "-o", str(obj)], check=True)
  counts = {_key(n): c for n, c in _stack_vector_stores(obj).items() if "_avx" in n}
  want = {_key(line): n for line, n in allowed.items()}
  assert set(want) <= set(counts), sorted(set(want) - set(counts))
  over = {k: (counts[k], n) for k, n in want.items() if counts[k] > n}
  assert not over, (
      "tiles storing vectors to the stack more often than their edge-tile stores "
      f"(found, allowed): {over}; look for an accumulator indexed by a loop variable that is "
      "not unrolled")
