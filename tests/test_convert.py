"""convert.h's AVX2 bfloat16 arrays give the bits of the scalar bf16_to_float / float_to_bf16.

The widened path of the CPU kernel (every bfloat16 layer on an AVX2 machine without AVX512_BF16)
widens its operands with convert::to_float and rounds a bfloat16 output with convert::from_float,
8 lanes at a time. This builds a small program on convert.h that converts arrays of every length
from 0 to 40 (whole vectors and scalar tails) and large random ones, and compares each element
with dtypes.h's scalar functions: special values (zeros, denormals, the largest finite, infinities,
quiet and signalling NaNs of both signs), ties to even and random bit patterns. The array sizes
and offsets are odd, so unaligned loads and stores are exercised. Needs x86-64 with AVX2 and a C++
compiler; skipped elsewhere.
"""
import pytest

from native import build_and_run, why_skip

PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "cpu/convert.h"

static long checked = 0, bad = 0;

static void check(const std::vector<uint32_t>& bits, int off) {
  const int64_t n = static_cast<int64_t>(bits.size()) - off;
  std::vector<float> f(bits.size() + 1, 0.0f);
  std::memcpy(f.data() + off, bits.data() + off, 4 * n);
  std::vector<cks::bf16> h(bits.size() + 1, cks::bf16{0xabab});
  cks::convert::from_float(f.data() + off, n, h.data() + off);
  for (int64_t i = 0; i < static_cast<int64_t>(h.size()); ++i) {
    const bool in = i >= off && i < off + n;
    const uint16_t want = in ? cks::float_to_bf16(f[i]) : 0xabab;  // nothing else written
    ++checked;
    if (h[i].bits != want && bad++ < 10)
      std::printf("from_float %ld of %ld: %08x -> %04x, want %04x\n", (long)i, (long)n,
                  in ? bits[i] : 0u, h[i].bits, want);
  }
  std::vector<float> back(h.size() + 1, -7.0f);
  cks::convert::to_float(h.data() + off, n, back.data() + off);
  for (int64_t i = 0; i < static_cast<int64_t>(back.size()); ++i) {
    const bool in = i >= off && i < off + n;
    const float want = in ? cks::bf16_to_float(h[i].bits) : -7.0f;
    ++checked;
    if (std::memcmp(&back[i], &want, 4) != 0 && bad++ < 10)
      std::printf("to_float %ld of %ld: %04x -> %a, want %a\n", (long)i, (long)n,
                  in ? h[i].bits : 0u, back[i], want);
  }
}

int main() {
  if (cks::gemm::gemm_isa() < 1) {
    std::printf("no AVX2\n");
    return 2;
  }
  const uint32_t special[] = {0x00000000u, 0x80000000u, 0x00000001u, 0x80000001u, 0x007fffffu,
                              0x807fffffu, 0x00400000u, 0x00008000u, 0x00018000u, 0x00800000u,
                              0x80800000u, 0x7f7fffffu, 0xff7fffffu, 0x7f800000u, 0xff800000u,
                              0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fbfffffu,
                              0xffffffffu, 0x7fffffffu, 0x3f808000u, 0x3f818000u, 0x3f80ffffu,
                              0x3f7fffffu, 0x7f7f8000u, 0x7f7f7fffu};
  const int ns = sizeof(special) / sizeof(special[0]);
  std::mt19937 rng(11);
  for (int n = 0; n <= 40; ++n)
    for (int off : {0, 1, 3}) {
      std::vector<uint32_t> v(n + off);
      for (int s = 0; s < ns; ++s) {  // windows of the specials
        for (int i = 0; i < n + off; ++i) v[i] = special[(s + i) % ns];
        check(v, off);
      }
    }
  for (int r = 0; r < 400; ++r) {
    std::vector<uint32_t> v(1000 + rng() % 100);
    for (auto& x : v) x = rng();
    const int kind = r % 3;  // 0: random; 1: denormals; 2: near ties
    if (kind == 1) for (auto& x : v) x &= 0x807fffffu;
    if (kind == 2) for (auto& x : v) x = (x & 0xffff0000u) | 0x8000u | (rng() & 1);
    check(v, static_cast<int>(rng() % 5));
  }
  std::printf("checked %ld elements, %ld wrong\n", checked, bad);
  return bad != 0;
}
"""


SKIP = why_skip("cpu/convert.h", ("avx2", "fma"), "the AVX2 conversions")


@pytest.mark.skipif(SKIP is not None, reason=str(SKIP))
def test_bf16_arrays_match_scalar(tmp_path):
  run = build_and_run(tmp_path, "convert", PROGRAM, CKS_CPU_ISA="")
  assert run.returncode == 0, run.stdout + run.stderr
  assert " 0 wrong" in run.stdout
