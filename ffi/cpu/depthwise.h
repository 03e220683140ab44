// The depthwise kernel: convolutions with one input channel and one output
// feature per group (a depthwise convolution's forward and input gradient,
// and, as batch groups of one entry, its filter gradient), vectorised over
// the groups, which are contiguous in all three operands. The GEMM would
// multiply a 1-column B padded to a whole panel, group after group.
//
// Rows [0, R) of a block, lanes (groups) i < n:
//   out[orow[r] + i] = sum over c < nc, k < nk of
//                      a[arow[r] + c * ca + ka[k] + i] * b[c * cb + kb[k] + i]
// Each lane's sum runs in S chains: index k into chain k % S (restarting at
// every c), the chains added in order at the end, so that R x S chains per
// vector hide the FMA latency. Every ISA runs the same fused multiply-adds in
// the same order per lane, so the same bits whatever the vector width.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gemm.h"

namespace cks {
namespace dw {

struct Red {
  const int64_t* ka;  // a offset of tap k (relative to a row's)
  const int64_t* kb;  // b offset of tap k
  int64_t nk;         // taps
  int64_t nc, ca, cb;  // channels (outer) and their a and b strides
};

template <int R, int S, typename T>
void rows_portable(const T* a, const int64_t* arow, const T* b, const Red& k, T* out,
                   const int64_t* orow, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int r = 0; r < R; ++r) {
      T acc[S] = {};
      for (int64_t c = 0; c < k.nc; ++c) {
        const T* ap = a + arow[r] + c * k.ca + i;
        const T* bp = b + c * k.cb + i;
        for (int64_t q = 0; q < k.nk; ++q)
          acc[q % S] = std::fma(ap[k.ka[q]], bp[k.kb[q]], acc[q % S]);
      }
      T sum = acc[0];
      for (int u = 1; u < S; ++u) sum += acc[u];
      out[orow[r] + i] = sum;
    }
}

#ifdef CKS_X86_AVX2
// Masked loads and stores of the first m lanes of a vector (m may be 0 or
// past the vector: clamped); masked-off lanes are neither read nor written.
#define CKS_DW512 __attribute__((target("avx512f,avx2,fma"), always_inline)) inline
CKS_DW512 __mmask16 dw_mask16(int64_t m) {
  return m >= 16 ? __mmask16(0xFFFF) : m <= 0 ? __mmask16(0) : __mmask16((1u << m) - 1);
}
CKS_DW512 __m512 dw_zload(const float* p, int64_t m) {
  return _mm512_maskz_loadu_ps(dw_mask16(m), p);
}
CKS_DW512 __m512d dw_zload(const double* p, int64_t m) {
  return _mm512_maskz_loadu_pd(static_cast<__mmask8>(dw_mask16(std::min<int64_t>(m, 8))), p);
}
CKS_DW512 void dw_zstore(float* p, __m512 v, int64_t m) {
  _mm512_mask_storeu_ps(p, dw_mask16(m), v);
}
CKS_DW512 void dw_zstore(double* p, __m512d v, int64_t m) {
  _mm512_mask_storeu_pd(p, static_cast<__mmask8>(dw_mask16(std::min<int64_t>(m, 8))), v);
}

#define CKS_DW256 __attribute__((target("avx2,fma"), always_inline)) inline
CKS_DW256 __m256i dw_mask32(int64_t m) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(m, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
CKS_DW256 __m256i dw_mask64(int64_t m) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(std::clamp<int64_t>(m, 0, 4)),
                            _mm256_setr_epi64x(0, 1, 2, 3));
}
CKS_DW256 __m256 dw_vload(const float* p, int64_t m) { return _mm256_maskload_ps(p, dw_mask32(m)); }
CKS_DW256 __m256d dw_vload(const double* p, int64_t m) {
  return _mm256_maskload_pd(p, dw_mask64(m));
}
CKS_DW256 void dw_vstore(float* p, __m256 v, int64_t m) { _mm256_maskstore_ps(p, dw_mask32(m), v); }
CKS_DW256 void dw_vstore(double* p, __m256d v, int64_t m) {
  _mm256_maskstore_pd(p, dw_mask64(m), v);
}

// The SIMD body for one ISA: lanes in blocks of two vectors (2 L), the last
// block masked. Ops: load(p, m), store(p, v, m), fma, add, as above.
#define CKS_DW_STEP(Q, U, LOAD, FMA, L)                                                                \
  {                                                                                        \
    const V b0 = LOAD(bc + k.kb[Q], m0), b1 = LOAD(bc + k.kb[Q] + (L), m1);                \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {                                  \
      acc[r][U][0] = FMA(LOAD(ac[r] + k.ka[Q], m0), b0, acc[r][U][0]);                     \
      acc[r][U][1] = FMA(LOAD(ac[r] + k.ka[Q] + (L), m1), b1, acc[r][U][1]);               \
    }                                                                                      \
  }

#define CKS_DW_BODY(LOAD, STORE, FMA, ADD, L)                                              \
  for (int64_t i = 0; i < n; i += 2 * (L)) {                                               \
    const int64_t m0 = n - i, m1 = n - i - (L);                                             \
    V acc[R][S][2];                                                                        \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                    \
        _Pragma("GCC unroll 4") for (int u = 0; u < S; ++u) acc[r][u][0] = acc[r][u][1] = V{}; \
    for (int64_t c = 0; c < k.nc; ++c) {                                                   \
      const T* bc = b + c * k.cb + i;                                                      \
      const T* ac[R];                                                                      \
      _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) ac[r] = a + arow[r] + c * k.ca + i; \
      int64_t q = 0;                                                                       \
      for (; q + S <= k.nk; q += S) {                                                      \
        _Pragma("GCC unroll 4") for (int u = 0; u < S; ++u) CKS_DW_STEP(q + u, u, LOAD, FMA, L)          \
      }                                                                                    \
      _Pragma("GCC unroll 4") for (int u = 0; u < S; ++u) if (q + u < k.nk) CKS_DW_STEP(q + u, u, LOAD, FMA, L) \
    }                                                                                      \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {                                  \
      _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h) {                                \
        V sum = acc[r][0][h];                                                              \
        _Pragma("GCC unroll 4") for (int u = 1; u < S; ++u) sum = ADD(sum, acc[r][u][h]);  \
        STORE(out + orow[r] + i + h * (L), sum, h == 0 ? m0 : m1);                          \
      }                                                                                    \
    }                                                                                      \
  }

template <int R, int S, typename T>
__attribute__((target("avx512f,avx2,fma"))) void rows_avx512(const T* a, const int64_t* arow,
                                                               const T* b, const Red& k, T* out,
                                                               const int64_t* orow, int64_t n) {
  using V = decltype(gemm::zload(a));
  CKS_DW_BODY(dw_zload, dw_zstore, gemm::zfma, gemm::zadd, int64_t{64 / sizeof(T)})
}

template <int R, int S, typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const T* a, const int64_t* arow, const T* b,
                                                   const Red& k, T* out, const int64_t* orow,
                                                   int64_t n) {
  using V = decltype(gemm::vload(a));
  CKS_DW_BODY(dw_vload, dw_vstore, gemm::vfma, gemm::vadd, int64_t{32 / sizeof(T)})
}
#undef CKS_DW_BODY
#undef CKS_DW_STEP
#undef CKS_DW512
#undef CKS_DW256
#endif

// Rows [0, R) of a block (see the top of this file) on the kernel's ISA.
template <int R, int S, typename T>
void rows(const T* a, const int64_t* arow, const T* b, const Red& k, T* out, const int64_t* orow,
          int64_t n) {
#ifdef CKS_X86_AVX2
  if (gemm::gemm_isa() == 2) return rows_avx512<R, S>(a, arow, b, k, out, orow, n);
  if (gemm::gemm_isa() == 1) return rows_avx2<R, S>(a, arow, b, k, out, orow, n);
#endif
  rows_portable<R, S>(a, arow, b, k, out, orow, n);
}

}  // namespace dw
}  // namespace cks
