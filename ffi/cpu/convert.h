// Arrays between 16-bit floats and float32 for the widened path of the CPU
// kernel (conv_cpu.cc): the float32 copies of bfloat16 operands, and the
// rounding of float32 sums into a bfloat16 output. bfloat16 runs 8 lanes at
// a time where the CPU has AVX2 (gemm_isa), with the same bits as the scalar
// bf16_to_float / float_to_bf16 (tests/test_convert.py checks every lane);
// float16 and other CPUs convert element by element.
//
// Why: on an AVX2 machine without AVX512_BF16 every bfloat16 layer runs
// widened, and the scalar rounding of the output as it was copied out took
// 11 % of WaveNet d1's input gradient (1-D, 4 x 4096 x 64; perf, Zen 3).
#pragma once

#include <cstdint>

#include "cks/dtypes.h"
#include "gemm.h"

namespace cks::convert {

#ifdef CKS_X86_AVX2
// The whole vectors of 8 at the front of [0, n); returns how many elements
// they hold (the callers' scalar loops finish the rest).
__attribute__((target("avx2,fma"))) inline int64_t widen_bf16_avx2(const bf16* src, int64_t n,
                                                               float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(u));
  }
  return i;
}

__attribute__((target("avx2,fma"))) inline int64_t round_bf16_avx2(const float* src, int64_t n,
                                                              bf16* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     gemm::vround_bf16(_mm256_loadu_ps(src + i)));
  return i;
}
#endif

// dst[i] = src[i] widened to float32, i < n.
template <typename T>
inline void to_float(const T* src, int64_t n, float* dst) {
  int64_t i = 0;
#ifdef CKS_X86_AVX2
  if constexpr (std::is_same<T, bf16>::value)
    if (gemm::gemm_isa() >= 1) i = widen_bf16_avx2(src, n, dst);
#endif
  for (; i < n; ++i) dst[i] = load<float>(src[i]);
}

// dst[i] = src[i] rounded to T (to nearest even), i < n.
template <typename T>
inline void from_float(const float* src, int64_t n, T* dst) {
  int64_t i = 0;
#ifdef CKS_X86_AVX2
  if constexpr (std::is_same<T, bf16>::value)
    if (gemm::gemm_isa() >= 1) i = round_bf16_avx2(src, n, dst);
#endif
  for (; i < n; ++i) dst[i] = store<T, float>(src[i]);
}

}  // namespace cks::convert
