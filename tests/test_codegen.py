"""The x86 GEMM tiles (ffi/cpu/gemm.h) keep their accumulators in registers.

A tile whose accumulators the compiler keeps on the stack still gives the right numbers, only
slower, so no value test sees it: one rolled loop over the panels of an edge tile (a runtime
index into the accumulator array) made GCC store and reload the whole 6 x 64 tile at every
segment of a RunA, and cost 64-channel forwards 2-7 %. This compiles every tile template the
way the extension is built (-O3), for every A source, B source and C destination, and counts,
per instantiation, the ymm/zmm registers it stores to the stack: only an edge tile's stores to
its scratch copy (one per accumulator vector) may be there.

A second check reads the tiles' innermost FMA loops, with GCC and with clang where CKS_CLANGXX
names one: operands read from the stack there, per FMA. Clang 22 with GCC's `unroll 4` kept a
6-row tile's row pointers and steps (24 invariants) on the stack and reloaded one at every
broadcast: 116 of the 264 tiles read 0.04-0.96 stack operands per FMA there, 52 float32 and
bfloat16 ones more than 1/6, and DCGAN 16->32's input gradient took 1.8x the time of the GCC
build (see CKS_UNROLL_STEPS in gemm.h).

Needs x86-64 and objdump, and GCC or a named clang; skipped elsewhere, with the reason.
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
# Those that also run 2 MR rows at a time (RT = 2; gemm.h, kTallTiles), from a packed B and
# into an OutC or BufC, in GCC builds only.
TALL_TILES = [(2, 0), (1, 1), (1, 0)]
AVX2_TILES = [2, 1]  # NV: ymm per row of panel_avx2
PAIR_TILES = [4, 2, 1]  # P: zmm per row of pairs_avx512
A_SOURCES = ["RunA", "ChannelRunA", "IndirectA", "PackedA"]
B_SOURCES = ["PanelB", "TableB", "RunB", "PanelRunB"]
C_DESTS = ["OutC", "BufC"]
# The whole-panel tiles a fused GEMM (float32 on AVX-512: gemm_block for a PanelOutC) runs.
PANEL_OUT_TILES = [(4, 0, 1), (2, 0, 1), (1, 0, 1)]


def _why_skip_platform() -> str | None:
  if platform.machine() not in ("x86_64", "AMD64"):
    return f"the AVX2/AVX-512 tiles are x86-64 only (this is {platform.machine()})"
  if not (FFI / "cpu" / "gemm.h").exists():
    return f"the kernel sources are not beside the tests ({FFI})"
  if shutil.which("objdump") is None:
    return "needs objdump on PATH"
  return None


def _why_skip_gcc() -> str | None:
  if shutil.which(CXX) is None:
    return f"needs {CXX} on PATH"
  version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
  if "clang" in version.lower() or not re.search(r"g\+\+|GCC|Free Software", version):
    return f"{CXX} is not GCC: {version.splitlines()[0]}"
  return None


pytestmark = pytest.mark.skipif(_why_skip_platform() is not None,
                                reason=str(_why_skip_platform()))


def _instantiations(tall: bool = True) -> dict[str, int]:
  """Explicit instantiation line -> most ymm/zmm stores to the stack allowed; with ``tall``, the
  12-row tiles too (what a GCC build instantiates)."""
  out = {}
  for t in ("float", "double"):
    for a in A_SOURCES:
      for b in B_SOURCES:
        for c in C_DESTS:
          srcs = f"{a}<{t}>, {b}<{t}>, {c}<{t}>"
          args = f"int64_t, int64_t, int64_t, const {a}<{t}>&, const {b}<{t}>&, const {c}<{t}>&"
          tiles = [(p, h, 1) for p, h in AVX512_TILES]
          if tall and b == "PanelB":
            tiles += [(p, h, 2) for p, h in TALL_TILES]
          for p, h, rt in tiles:
            line = (f"template void cks::gemm::panels_avx512<{p}, {h}, {rt}, {t}, {srcs}>"
                    f"(int64_t, {args});")
            out[line] = MR * rt * (p + h) if c == "OutC" else 0
          for nv in AVX2_TILES:
            line = f"template void cks::gemm::panel_avx2<{nv}, {t}, {srcs}>({args});"
            out[line] = MR * nv if c == "OutC" else 0
  for a in A_SOURCES:
    for b in B_SOURCES:
      srcs = f"{a}<float>, {b}<float>, PanelOutC<float>"
      args = f"int64_t, int64_t, int64_t, const {a}<float>&, const {b}<float>&, " \
             "const PanelOutC<float>&"
      for p, h, rt in PANEL_OUT_TILES:
        out[f"template void cks::gemm::panels_avx512<{p}, {h}, {rt}, float, {srcs}>"
            f"(int64_t, {args});"] = MR * rt * p
  # bfloat16 rounded as stored (RoundC), from packed B panels only: the tile's stores to a
  # scratch tile, and up to 2 of the rounding's constants parked after them (objdump, GCC 12:
  # one, past the reduction's last FMA).
  for a in A_SOURCES:
    for nv in AVX2_TILES:
      out[f"template void cks::gemm::panel_avx2<{nv}, float, {a}<float>, PanelB<float>, RoundC>"
          f"(int64_t, int64_t, int64_t, const {a}<float>&, const PanelB<float>&, "
          "const RoundC&);"] = MR * nv + 2
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


INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
STACK_OPERAND = re.compile(r"\(%r[sb]p\)")
FMA = ("vfmadd", "vdpbf16ps")


def _functions(obj: Path) -> dict[str, list[tuple[int, str, str]]]:
  """Demangled function name -> its instructions (address, mnemonic, operands)."""
  dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)],
                        capture_output=True, text=True, check=True).stdout
  funcs: dict[str, list[tuple[int, str, str]]] = {}
  name = None
  for line in dump.splitlines():
    m = FUNCTION.match(line)
    if m:
      name = m.group(1)
      funcs[name] = []
    elif name is not None and (m := INSN.match(line)):
      funcs[name].append((int(m.group(1), 16), m.group(2), m.group(3)))
  return funcs


def _stack_vector_stores(obj: Path) -> dict[str, int]:
  return {name: sum(1 for _, op, args in ins if STACK_VECTOR.search(f"{op} {args}"))
          for name, ins in _functions(obj).items()}


def _stack_operands_per_fma(ins: list[tuple[int, str, str]]) -> tuple[int, float]:
  """(innermost loops with FMAs, the most stack operands per FMA in one of them). A loop is a
  backward jump and what it jumps over; innermost if it holds no other."""
  loops = []
  for addr, op, args in ins:
    m = re.match(r"([0-9a-f]+)\b", args)
    if op.startswith("j") and m and int(m.group(1), 16) <= addr:
      loops.append((int(m.group(1), 16), addr))
  inner = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
  n, worst = 0, 0.0
  for lo, hi in inner:
    body = [(op, args) for addr, op, args in ins if lo <= addr <= hi]
    fmas = sum(1 for op, _ in body if op.startswith(FMA))
    if fmas:
      n += 1
      worst = max(worst, sum(1 for _, args in body if STACK_OPERAND.search(args)) / fmas)
  return n, worst


def _key(signature: str) -> str:
  """'panels_avx512<4, 0, float, RunA, PanelB, OutC>' (or 'pairs_avx512<4, float, PairRunA>')
  from a demangled name or an instantiation."""
  m = re.search(r"((?:panels?|pairs)_avx\w+)<(.*?)>\(", signature)
  args = re.sub(r"cks::gemm::|<(float|double)>", "", m.group(2)).replace("unsigned short",
                                                                        "uint16_t")
  return f"{m.group(1)}<{', '.join(a.strip() for a in args.split(','))}>"


@pytest.fixture(scope="module")
def tiles_object(tmp_path_factory):
  """compiler -> the object of every tile instantiation, compiled once per module and
  compiler (both tests read GCC's)."""
  objs: dict[str, Path] = {}

  def compile_tiles(cxx: str, tall: bool = True) -> Path:
    if cxx not in objs:
      d = tmp_path_factory.mktemp("tiles")
      src = d / "tiles.cc"
      src.write_text('#include "cpu/gemm.h"\nusing namespace cks::gemm;\n'
                     + "\n".join(_instantiations(tall)) + "\n")
      subprocess.run([cxx, "-O3", "-DNDEBUG", "-std=c++17", "-fPIC", f"-I{FFI}", "-c", str(src),
                      "-o", str(d / "tiles.o")], check=True)
      objs[cxx] = d / "tiles.o"
    return objs[cxx]

  return compile_tiles


@pytest.mark.skipif(_why_skip_gcc() is not None,
                    reason=f"vector spills checked for GCC only: {_why_skip_gcc()}")
def test_gemm_tiles_keep_accumulators_in_registers(tiles_object):
  allowed = _instantiations()
  obj = tiles_object(CXX)
  counts = {_key(n): c for n, c in _stack_vector_stores(obj).items() if "_avx" in n}
  want = {_key(line): n for line, n in allowed.items()}
  assert set(want) <= set(counts), sorted(set(want) - set(counts))
  over = {k: (counts[k], n) for k, n in want.items() if counts[k] > n}
  assert not over, (
      "tiles storing vectors to the stack more often than their edge-tile stores "
      f"(found, allowed): {over}; look for an accumulator indexed by a loop variable that is "
      "not unrolled")


# Stack operands per FMA allowed in a float32 or bfloat16 tile's innermost loops. GCC 12's code
# reloads a value once per unrolled step (at most 0.104: the 6 x 64 float32 RunA tile into a
# scratch block, BufC); clang 22 with the unroll pragma read up to 0.96 (52 float32 and bfloat16
# tiles over 1/6, from 0.19). float64 tiles are exempt: clang keeps the 6 x 32 double IndirectA
# tile's offsets on the stack (0.375), a path few layers take.
MAX_STACK_PER_FMA = 1 / 6


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_gemm_tiles_keep_their_operands_in_registers(compiler, tiles_object):
  if compiler == "gcc":
    if _why_skip_gcc():
      pytest.skip(str(_why_skip_gcc()))
    cxx = CXX
  else:
    cxx = os.environ.get("CKS_CLANGXX", "")
    if not cxx:
      pytest.skip("no clang named: set CKS_CLANGXX to a clang++ (.ci/run uses ziglang's)")
  tall = compiler == "gcc"  # clang builds keep 6-row tiles (gemm.h, kTallTiles)
  funcs = _functions(tiles_object(cxx, tall))
  tiles = {_key(n): _stack_operands_per_fma(ins) for n, ins in funcs.items() if "_avx" in n}
  assert set(map(_key, _instantiations(tall))) <= set(tiles)
  no_loop = sorted(k for k, (n, _) in tiles.items() if n == 0)
  assert not no_loop, f"tiles without an FMA loop (the loop finder is wrong): {no_loop}"
  over = {k: round(r, 3) for k, (_, r) in tiles.items()
          if r > MAX_STACK_PER_FMA and "double" not in k}
  assert not over, (
      f"{compiler}: tiles reading more than {MAX_STACK_PER_FMA:.3f} stack operands per FMA in an "
      f"innermost loop: {over}; see which invariants the compiler keeps on the stack (objdump)")
