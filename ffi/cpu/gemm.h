// GEMM block of the CPU kernels: C[mc x nc] += A * Bp.
//   A : read through an A source: PackedA (MR-row panels, each [kc][MR]) or
//       IndirectA (in place, through row and reduction offsets);
//   Bp: NR-column panels, each [kc][NR], ldb elements apart (kc * NR when
//       packed block by block; more when a block is a window of a larger
//       packed B);
//   C : row-major, row stride ldc;     mc, nc multiples of MR, NR.
// x86-64 picks a hand-written micro-kernel at run time (no -march needed):
//   AVX2+FMA : 6x16 float / 6x8 double tile in 12 ymm accumulators;
//   AVX-512F : two adjacent B panels at once, 6x32 / 6x16 in 12 zmm.
// Anything else runs the portable kernel. All paths add in the same order
// per element, so they give identical bits.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace cks {
namespace gemm {

#if defined(__x86_64__) && defined(__GNUC__)
#define CKS_X86_AVX2 1
#ifndef CKS_GEMM_AVX512
#define CKS_GEMM_AVX512 1  // -DCKS_GEMM_AVX512=0: never use zmm
#endif
#endif

template <typename T>
struct Tile;
template <>
struct Tile<float> {
  static constexpr int MR = 6, NR = 16;
};
template <>
struct Tile<double> {
  static constexpr int MR = 6, NR = 8;
};

constexpr int64_t kMC = 96;   // rows per task (multiple of MR)
constexpr int64_t kKC = 256;  // reduction block
constexpr int64_t kNC = 256;  // column block (multiple of NR)

// A sources. panel(ir) gives the MR rows starting at ir; at(p, i) points at
// element (row i, reduction p) of that panel.
template <typename T>
struct PackedA {  // MR-row panels [kc][MR], contiguous
  const T* Ap;
  int64_t kc;
  struct Panel {
    const T* a;
    const T* at(int64_t p, int i) const { return a + p * Tile<T>::MR + i; }
  };
  Panel panel(int64_t ir) const { return {Ap + ir * kc}; }
};
// Element (r, p) is base[rows[r] + red[p]]: A read in place with no packing
// (indirection, as in XNNPACK). Pays when the reduction runs along
// contiguous memory (channel stride 1), so every cache line read is used.
template <typename T>
struct IndirectA {
  const T* base;
  const int64_t* rows;  // mc entries, all valid offsets
  const int64_t* red;   // kc entries
  struct Panel {
    const T* r[Tile<T>::MR];
    const int64_t* red;
    const T* at(int64_t p, int i) const { return r[i] + red[p]; }
  };
  Panel panel(int64_t ir) const {
    Panel pn;
    for (int i = 0; i < Tile<T>::MR; ++i) pn.r[i] = base + rows[ir + i];
    pn.red = red;
    return pn;
  }
};

// Portable kernel: C[mc x nc] += A * Bp (the compiler vectorises it as it can).
template <typename T, typename ASrc>
inline __attribute__((always_inline)) void macro_kernel(int64_t mc, int64_t nc, int64_t kc,
                                                        const ASrc& A, const T* Bp, int64_t ldb,
                                                        T* C, int64_t ldc) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  for (int64_t jr = 0; jr < nc; jr += NR) {
    const T* b = Bp + jr / NR * ldb;
    for (int64_t ir = 0; ir < mc; ir += MR) {
      const auto a = A.panel(ir);
      T acc[MR][NR] = {};
      for (int64_t p = 0; p < kc; ++p) {
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          const T ai = *a.at(p, i);
#pragma GCC unroll 16
          for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[p * NR + j];
        }
      }
      T* c = C + ir * ldc + jr;
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) c[i * ldc + j] += acc[i][j];
    }
  }
}

#ifdef CKS_X86_AVX2
// Thin overloads so one template serves float (8 lanes) and double (4 lanes).
// Explicit FMA intrinsics: GCC does not contract a*b+c under -std=c++17.
#define CKS_AVX2_FN __attribute__((target("avx2,fma"), always_inline)) inline
CKS_AVX2_FN __m256 vload(const float* p) { return _mm256_loadu_ps(p); }
CKS_AVX2_FN __m256d vload(const double* p) { return _mm256_loadu_pd(p); }
CKS_AVX2_FN __m256 vbcast(const float* p) { return _mm256_broadcast_ss(p); }
CKS_AVX2_FN __m256d vbcast(const double* p) { return _mm256_broadcast_sd(p); }
CKS_AVX2_FN __m256 vfma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
CKS_AVX2_FN __m256d vfma(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
CKS_AVX2_FN void vaddto(float* p, __m256 v) { _mm256_storeu_ps(p, _mm256_add_ps(vload(p), v)); }
CKS_AVX2_FN void vaddto(double* p, __m256d v) { _mm256_storeu_pd(p, _mm256_add_pd(vload(p), v)); }

// MR x NR tile = MR x 2 ymm: 12 accumulators + 2 B vectors + 1 broadcast
// = 15 of 16 ymm registers, no spills (checked with objdump).
template <typename T, typename ASrc>
__attribute__((target("avx2,fma"))) void macro_kernel_avx2(int64_t mc, int64_t nc, int64_t kc,
                                                           const ASrc& A, const T* Bp,
                                                           int64_t ldb, T* C, int64_t ldc) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR, W = 32 / sizeof(T);
  static_assert(NR == 2 * W, "tile is MR x 2 ymm");
  using V = decltype(vload(Bp));
  for (int64_t jr = 0; jr < nc; jr += NR) {
    for (int64_t ir = 0; ir < mc; ir += MR) {
      const auto a = A.panel(ir);
      const T* b = Bp + jr / NR * ldb;
      V acc[MR][2];
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = V{};
#pragma GCC unroll 4
      for (int64_t p = 0; p < kc; ++p, b += NR) {
        const V b0 = vload(b), b1 = vload(b + W);
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i) {
          const V ai = vbcast(a.at(p, i));
          acc[i][0] = vfma(ai, b0, acc[i][0]);
          acc[i][1] = vfma(ai, b1, acc[i][1]);
        }
      }
      T* c = C + ir * ldc + jr;
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        vaddto(c + i * ldc, acc[i][0]);
        vaddto(c + i * ldc + W, acc[i][1]);
      }
    }
  }
}
#undef CKS_AVX2_FN

// AVX-512 (Zen 4/5, Xeon): NR lanes = one zmm, so two adjacent B panels form
// a 6 x 2NR tile with 12 zmm accumulators; packing unchanged. A leftover odd
// panel goes to the AVX2 kernel. Same per-element order -> identical bits.
#define CKS_Z512_FN __attribute__((target("avx512f,avx2,fma"), always_inline)) inline
CKS_Z512_FN __m512 zload(const float* p) { return _mm512_loadu_ps(p); }
CKS_Z512_FN __m512d zload(const double* p) { return _mm512_loadu_pd(p); }
CKS_Z512_FN __m512 zbcast(const float* p) { return _mm512_set1_ps(*p); }
CKS_Z512_FN __m512d zbcast(const double* p) { return _mm512_set1_pd(*p); }
CKS_Z512_FN __m512 zfma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
CKS_Z512_FN __m512d zfma(__m512d a, __m512d b, __m512d c) { return _mm512_fmadd_pd(a, b, c); }
CKS_Z512_FN void zaddto(float* p, __m512 v) { _mm512_storeu_ps(p, _mm512_add_ps(zload(p), v)); }
CKS_Z512_FN void zaddto(double* p, __m512d v) { _mm512_storeu_pd(p, _mm512_add_pd(zload(p), v)); }
CKS_Z512_FN __m512 zadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
CKS_Z512_FN __m512d zadd(__m512d a, __m512d b) { return _mm512_add_pd(a, b); }

template <typename T, typename ASrc>
__attribute__((target("avx512f,avx2,fma"))) void macro_kernel_avx512(int64_t mc, int64_t nc,
                                                                     int64_t kc, const ASrc& A,
                                                                     const T* Bp, int64_t ldb,
                                                                     T* C, int64_t ldc) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  static_assert(NR * sizeof(T) == 64, "one B panel row = one zmm");
  using V = decltype(zload(Bp));
  int64_t jr = 0;
  for (; jr + 2 * NR <= nc; jr += 2 * NR) {
    for (int64_t ir = 0; ir < mc; ir += MR) {
      const auto a = A.panel(ir);
      const T* b = Bp + jr / NR * ldb;  // panel jr; panel jr + NR starts ldb later
      V acc[MR][2];
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = V{};
#pragma GCC unroll 4
      for (int64_t p = 0; p < kc; ++p, b += NR) {
        const V b0 = zload(b), b1 = zload(b + ldb);
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i) {
          const V ai = zbcast(a.at(p, i));
          acc[i][0] = zfma(ai, b0, acc[i][0]);
          acc[i][1] = zfma(ai, b1, acc[i][1]);
        }
      }
      T* c = C + ir * ldc + jr;
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        zaddto(c + i * ldc, acc[i][0]);
        zaddto(c + i * ldc + NR, acc[i][1]);
      }
    }
  }
  if (jr < nc) macro_kernel_avx2(mc, nc - jr, kc, A, Bp + jr / NR * ldb, ldb, C + jr, ldc);
}
// n floats to a 64-byte aligned dst (n a multiple of 16) with non-temporal
// stores, which skip reading the destination lines first; fence before the
// data is handed to another thread.
__attribute__((target("avx512f"))) inline void stream_copy(float* dst, const float* src,
                                                          int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
}
#undef CKS_Z512_FN

inline int gemm_isa() {  // 2: AVX-512F, 1: AVX2+FMA, 0: portable
  static const int isa = !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 0
                         : CKS_GEMM_AVX512 && __builtin_cpu_supports("avx512f")             ? 2
                                                                                            : 1;
  return isa;
}
#endif  // CKS_X86_AVX2

template <typename T, typename ASrc>
inline void gemm_block(int64_t mc, int64_t nc, int64_t kc, const ASrc& A, const T* Bp,
                       int64_t ldb, T* C, int64_t ldc) {
#ifdef CKS_X86_AVX2
  switch (gemm_isa()) {
    case 2: return macro_kernel_avx512(mc, nc, kc, A, Bp, ldb, C, ldc);
    case 1: return macro_kernel_avx2(mc, nc, kc, A, Bp, ldb, C, ldc);
  }
#endif
  macro_kernel<T>(mc, nc, kc, A, Bp, ldb, C, ldc);
}


// ---------------------------------------------------------------- narrow
// Narrow GEMM (FG <= kNarrowF columns) vectorised over rows instead of
// columns, for rows whose A entries are contiguous (a filter gradient's rows
// are the original channels). The column-vectorised kernel would pad FG to NR
// and waste most of its lanes. The reduction is walked as runs of R indices
// with constant steps (the channels, or the last kernel dimension's taps), so
// no per-index offset table or transposed copy of B is built:
//   C[f * ldc + i] += sum_{r, q < R} a[ra[r] + q * sa + i] * b[rb[r] + q * sb + f * so]
// for i < kStrip<T>. With few columns one chain of FMAs per accumulator would
// wait on the FMA latency, so the sum is split into kSplit<FG> partial sums
// over q modulo kSplit, combined in order at the end; the portable loop does
// the same.
constexpr int kNarrowF = 8;
template <typename T>
constexpr int kStrip = 128 / sizeof(T);  // two zmm of rows
template <int FG>
constexpr int kSplit = FG == 1 ? 4 : FG <= 4 ? 2 : 1;

// The reduction of a narrow strip: runs [0, nruns) of R indices.
struct NarrowRuns {
  const int64_t* ra;  // A offset of each run's first index
  const int64_t* rb;  // B offset of each run's first index
  int64_t nruns, R, sa, sb, so;
};

template <int FG, typename T>
inline void narrow_strip_portable(const T* a, const T* b, const NarrowRuns& k, T* C,
                                  int64_t ldc) {
  constexpr int W = kStrip<T>, S = kSplit<FG>;
  T acc[S][FG][W] = {};
  for (int64_t r = 0; r < k.nruns; ++r)
    for (int64_t q = 0; q < k.R; ++q) {
      const T* ap = a + k.ra[r] + q * k.sa;
      const T* bp = b + k.rb[r] + q * k.sb;
      for (int f = 0; f < FG; ++f)
        for (int i = 0; i < W; ++i) acc[q % S][f][i] += ap[i] * bp[f * k.so];
    }
  for (int f = 0; f < FG; ++f)
    for (int i = 0; i < W; ++i) {
      T sum = acc[0][f][i];
      for (int u = 1; u < S; ++u) sum += acc[u][f][i];
      C[f * ldc + i] += sum;
    }
}

#ifdef CKS_X86_AVX2
// One reduction index of a strip: ac[f] += a[0:2L] * b[f * so].
template <int FG, typename T, typename V>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void narrow_step(
    const T* ap, const T* bp, int64_t so, V (&ac)[FG][2]) {
  constexpr int L = 64 / sizeof(T);
  const V a0 = zload(ap), a1 = zload(ap + L);
#pragma GCC unroll 8
  for (int f = 0; f < FG; ++f) {
    const V b = zbcast(bp + f * so);
    ac[f][0] = zfma(a0, b, ac[f][0]);
    ac[f][1] = zfma(a1, b, ac[f][1]);
  }
}

template <int FG, typename T>
__attribute__((target("avx512f,avx2,fma"))) void narrow_strip_avx512(const T* a, const T* b,
                                                                     const NarrowRuns& k,
                                                                     T* C, int64_t ldc) {
  constexpr int L = 64 / sizeof(T), S = kSplit<FG>;  // lanes per zmm, partial sums
  using V = decltype(zload(a));
  V acc[S][FG][2];
#pragma GCC unroll 4
  for (int u = 0; u < S; ++u)
#pragma GCC unroll 8
    for (int f = 0; f < FG; ++f) acc[u][f][0] = acc[u][f][1] = V{};
  const int64_t R = k.R, sa = k.sa, sb = k.sb, so = k.so;
  for (int64_t r = 0; r < k.nruns; ++r) {
    const T* ap = a + k.ra[r];
    const T* bp = b + k.rb[r];
    int64_t q = 0;
    for (; q + S <= R; q += S) {
#pragma GCC unroll 4
      for (int u = 0; u < S; ++u)
        narrow_step<FG>(ap + (q + u) * sa, bp + (q + u) * sb, so, acc[u]);
    }
#pragma GCC unroll 4
    for (int u = 0; u < S; ++u)  // the tail: q + u is still in partial sum u
      if (q + u < R) narrow_step<FG>(ap + (q + u) * sa, bp + (q + u) * sb, so, acc[u]);
  }
#pragma GCC unroll 8
  for (int f = 0; f < FG; ++f) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      V sum = acc[0][f][h];
#pragma GCC unroll 4
      for (int u = 1; u < S; ++u) sum = zadd(sum, acc[u][f][h]);
      zaddto(C + f * ldc + h * L, sum);
    }
  }
}
#endif

template <int FG, typename T>
inline void narrow_strip_fg(const T* a, const T* b, const NarrowRuns& k, T* C, int64_t ldc) {
#ifdef CKS_X86_AVX2
  if (gemm_isa() == 2) return narrow_strip_avx512<FG>(a, b, k, C, ldc);
#endif
  narrow_strip_portable<FG>(a, b, k, C, ldc);
}

// One strip of kStrip<T> rows starting at a, for fg = 1..kNarrowF columns
// starting at b: C[f * ldc + i] += the reduction k.
template <typename T>
inline void narrow_strip(int fg, const T* a, const T* b, const NarrowRuns& k, T* C,
                         int64_t ldc) {
  switch (fg) {
    case 1: return narrow_strip_fg<1>(a, b, k, C, ldc);
    case 2: return narrow_strip_fg<2>(a, b, k, C, ldc);
    case 3: return narrow_strip_fg<3>(a, b, k, C, ldc);
    case 4: return narrow_strip_fg<4>(a, b, k, C, ldc);
    case 5: return narrow_strip_fg<5>(a, b, k, C, ldc);
    case 6: return narrow_strip_fg<6>(a, b, k, C, ldc);
    case 7: return narrow_strip_fg<7>(a, b, k, C, ldc);
    default: return narrow_strip_fg<8>(a, b, k, C, ldc);
  }
}

}  // namespace gemm
}  // namespace cks
