// The depthwise kernel: convolutions with one input channel and one output
// feature per group (a depthwise convolution's forward and input gradient,
// and, as batch groups of one entry, its filter gradient), vectorised over
// the groups, which are contiguous in all three operands. The GEMM would
// multiply a 1-column B padded to a whole panel, group after group. Grouped
// convolutions of a few channels per group run on it too: with the input's
// lanes permuted inside each group (Red::grp), and their filter gradients
// as `spread` rows.
//
// Rows [0, R) of a block, lanes (groups) i < n (out[...] + the sum where add):
//   out[orow[r] + i] = sum over c < nc, runs j < nruns, q < len of
//       a[arow[r] + c * ca + ra[j] + q * sa + i] * b[c * cb + rb[j] + q * sb + i]
// The reduction's taps come as runs along the last spatial dimension, with
// constant steps (no table of every tap: a filter gradient's taps are the
// cotangent's positions). Each lane's sum runs in S chains: index q of a
// run into chain q % S, the chains added in order at the end, so that R x S
// chains per vector hide the FMA latency. Every ISA runs the same fused
// multiply-adds in the same order per lane: the same bits whatever the
// vector width.
//
// Element types: TA of a, TB of b, TO of out, accumulated in T = Acc<TA>
// (float or double). bfloat16 operands (AVX-512 only) are widened in
// registers and a bfloat16 output rounded as it is stored (float_to_bf16):
// the same bits as the float32 kernel on float32 copies of the operands,
// rounded after, without the copies.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cks/dtypes.h"
#include "gemm.h"

namespace cks {
namespace dw {

template <typename TI>
using Acc = std::conditional_t<std::is_same<TI, double>::value, double, float>;

struct Red {
  const int64_t* ra;  // a offset of run j's first tap (relative to a row's)
  const int64_t* rb;  // b offset of run j's first tap
  int64_t nruns, len, sa, sb;  // runs, taps per run, a and b steps along a run
  int64_t nc, ca, cb;          // channels (outer) and their a and b strides
  // Group width g (grouped convolutions, g channels in and out per group;
  // else 1): channel c of lane i reads a's lane perm(i, c), the group's
  // channel (i + c) % g, with ca = 0 (see CksConv::dw_group); or, where
  // bcast (a group of one or two whole AVX-512 vectors), the group's
  // channel c itself, broadcast over the group's lanes.
  int64_t grp = 1;
  bool bcast = false;
};

inline int64_t perm(int64_t i, int64_t c, int64_t g) { return i - i % g + (i % g + c) % g; }

// The widest group whose lanes are permuted (8: wider ones broadcast).
constexpr int kMaxPermGroup = 8;

// The a lane that channel c of lane i reads (see Red::grp).
inline int64_t group_lane(const Red& k, int64_t i, int64_t c) {
  return k.grp == 1 ? i : k.bcast ? i - i % k.grp + c : perm(i, c, k.grp);
}

template <int R, int S, typename T, typename TA, typename TB, typename TO>
void rows_portable(const TA* a, const int64_t* arow, const TB* b, const Red& k, TO* out,
                   const int64_t* orow, int64_t n, bool add) {
  for (int64_t i = 0; i < n; ++i)
    for (int r = 0; r < R; ++r) {
      T acc[S] = {};
      for (int64_t c = 0; c < k.nc; ++c)
        for (int64_t j = 0; j < k.nruns; ++j) {
          const TA* ap = a + arow[r] + c * k.ca + k.ra[j] + group_lane(k, i, c);
          const TB* bp = b + c * k.cb + k.rb[j] + i;
          for (int64_t q = 0; q < k.len; ++q)
            acc[q % S] = std::fma(load<T>(ap[q * k.sa]), load<T>(bp[q * k.sb]), acc[q % S]);
        }
      T sum = acc[0];
      for (int u = 1; u < S; ++u) sum += acc[u];
      TO& o = out[orow[r] + i];
      o = store<TO>(add ? load<T>(o) + sum : sum);
    }
}

// Rows of a grouped convolution whose groups are one or two whole AVX-512
// vectors (Red::bcast): the group's channels are the innermost index, each
// broadcast over the group's lanes, as a GEMM micro-kernel runs its
// reduction (the channel-outer order re-walked every run for each channel):
//   out[orow[r] + i] = sum over runs j, q < len, c < grp (in that order) of
//       a[arow[r] + ra[j] + q * sa + i - i % grp + c] * b[c * cb + rb[j] + q * sb + i]
// in S chains per row (index c into chain c % S).
template <int R, int S, typename T, typename TA, typename TB, typename TO>
void bcast_rows_portable(const TA* a, const int64_t* arow, const TB* b, const Red& k, TO* out,
                         const int64_t* orow, int64_t n, bool add) {
  for (int64_t i = 0; i < n; ++i)
    for (int r = 0; r < R; ++r) {
      T acc[S] = {};
      for (int64_t j = 0; j < k.nruns; ++j)
        for (int64_t q = 0; q < k.len; ++q)
          for (int64_t c = 0; c < k.grp; ++c)
            acc[c % S] = std::fma(load<T>(a[arow[r] + k.ra[j] + q * k.sa + i - i % k.grp + c]),
                                  load<T>(b[c * k.cb + k.rb[j] + q * k.sb + i]), acc[c % S]);
      T sum = acc[0];
      for (int u = 1; u < S; ++u) sum += acc[u];
      TO& o = out[orow[r] + i];
      o = store<TO>(add ? load<T>(o) + sum : sum);
    }
}

// One row of a grouped convolution's filter gradient (batch groups of G
// entries and G features, CksConv::dw_entries), G outputs per lane: lane i
// (feature i % G of its group) sums, for each channel j of its group,
//   out[orow + j * oj + i] = sum over c, runs, q of
//       a[arow + c * ca + ra + q * sa + i - i % G + j] * b[c * cb + rb + q * sb + i]
// (+ out where add): the input's lane j of the group spread over the
// group's lanes (one permute per multiply-add, each input and cotangent
// vector loaded once for G of them). Sums in kSpreadChains / G chains
// (index q of a run into chain q % S), the same on every ISA.
constexpr int kSpreadChains = 8;
constexpr int spread_chains(int g) { return g < kSpreadChains ? kSpreadChains / g : 1; }

template <int G, typename T, typename TA, typename TB, typename TO>
void spread_portable(const TA* a, int64_t arow, const TB* b, const Red& k, TO* out, int64_t orow,
                     int64_t oj, int64_t n, bool add) {
  constexpr int S = spread_chains(G);
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < G; ++j) {
      T acc[S] = {};
      for (int64_t c = 0; c < k.nc; ++c)
        for (int64_t r = 0; r < k.nruns; ++r) {
          const TA* ap = a + arow + c * k.ca + k.ra[r] + i - i % G + j;
          const TB* bp = b + c * k.cb + k.rb[r] + i;
          for (int64_t q = 0; q < k.len; ++q)
            acc[q % S] = std::fma(load<T>(ap[q * k.sa]), load<T>(bp[q * k.sb]), acc[q % S]);
        }
      T sum = acc[0];
      for (int u = 1; u < S; ++u) sum += acc[u];
      TO& o = out[orow + j * oj + i];
      o = store<TO>(add ? load<T>(o) + sum : sum);
    }
}

#ifdef CKS_X86_AVX2
// Vector operations of one ISA and element type, for CKS_DW_CHUNK: L lanes,
// gemm.h's whole-vector overloads, and masks of the first m lanes (m clamped
// to [0, L]; masked-off lanes are neither read nor written); for float,
// bfloat16 loads (widened) and stores (rounded) of L lanes too.
#define CKS_DW512_TARGET "avx512f,avx512bw,avx512vl,avx2,fma"
#define CKS_DW512 static __attribute__((target(CKS_DW512_TARGET), always_inline)) inline
#define CKS_DW256 static __attribute__((target("avx2,fma"), always_inline)) inline
template <typename T_>
struct Z512 {
  using T = T_;
  static constexpr bool F = std::is_same<T, float>::value;
  using V = decltype(gemm::zload(static_cast<const T*>(nullptr)));
  using M = std::conditional_t<F, __mmask16, __mmask8>;
  static constexpr int L = 64 / sizeof(T);
  CKS_DW512 M mask(int64_t m) {
    return m >= L ? M((1u << L) - 1) : m <= 0 ? M(0) : M((1u << m) - 1);
  }
  CKS_DW512 V zero() { return V{}; }
  CKS_DW512 V load(const T* p) { return gemm::zload(p); }
  CKS_DW512 V load(const T* p, M m) {
    if constexpr (F) return _mm512_maskz_loadu_ps(m, p);
    else return _mm512_maskz_loadu_pd(m, p);
  }
  CKS_DW512 V fma(V a, V b, V c) { return gemm::zfma(a, b, c); }
  // Lane i of permute(x, index(c, g)) is x's lane perm(i, c, g) (g | L).
  using P = __m512i;
  CKS_DW512 P index(int64_t c, int64_t g) {
    int64_t p[L];
    for (int i = 0; i < L; ++i) p[i] = perm(i, c, g);
    return index(p);
  }
  // Lane i of permute(x, spread(j, g)) is x's lane i - i % g + j (g | L).
  CKS_DW512 P spread(int64_t j, int64_t g) {
    int64_t p[L];
    for (int i = 0; i < L; ++i) p[i] = i - i % g + j;
    return index(p);
  }
  // The permutations of a group's channels c < k.nc (at most kMaxPermGroup),
  // built once per call: per channel and block of lanes they cost more than
  // a 1-tap run's FMAs.
  CKS_DW512 void indices(const Red& k, P* pcs) {
    for (int64_t c = 0; c < std::min<int64_t>(k.nc, kMaxPermGroup); ++c) pcs[c] = index(c, k.grp);
  }
  CKS_DW512 P index(const int64_t* p) {
    if constexpr (F)
      return _mm512_setr_epi32(int(p[0]), int(p[1]), int(p[2]), int(p[3]), int(p[4]), int(p[5]),
                               int(p[6]), int(p[7]), int(p[8]), int(p[9]), int(p[10]),
                               int(p[11]), int(p[12]), int(p[13]), int(p[14]), int(p[15]));
    else
      return _mm512_setr_epi64(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
  }
  CKS_DW512 V permute(V x, P p) {  // zero-masked forms: see gemm::round_bf16
    if constexpr (F) return _mm512_maskz_permutexvar_ps(__mmask16(0xffff), p, x);
    else return _mm512_maskz_permutexvar_pd(__mmask8(0xff), p, x);
  }
  CKS_DW512 V add(V a, V b) { return gemm::zadd(a, b); }
  CKS_DW512 V bcast(const T* p) {
    if constexpr (F) return _mm512_set1_ps(*p);
    else return _mm512_set1_pd(*p);
  }
  CKS_DW512 V bcast(const bf16* p) {
    static_assert(F, "bfloat16 accumulates in float32");
    return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(uint32_t{p->bits} << 16)));
  }
  CKS_DW512 void store(T* p, V v) { gemm::zstore(p, v); }
  CKS_DW512 void store(T* p, V v, M m) {
    if constexpr (F) _mm512_mask_storeu_ps(p, m, v);
    else _mm512_mask_storeu_pd(p, m, v);
  }
  CKS_DW512 void stream(T* p, V v) { gemm::zstream(p, v); }
  // bfloat16 is float32's upper half: widened by a shift, exactly.
  CKS_DW512 V widen(__m256i h) {
    static_assert(F, "bfloat16 accumulates in float32");
    constexpr __mmask16 all = 0xffff;  // zero-masked forms: see gemm::round_bf16
    return _mm512_castsi512_ps(
        _mm512_maskz_slli_epi32(all, _mm512_maskz_cvtepu16_epi32(all, h), 16));
  }
  CKS_DW512 V load(const bf16* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  CKS_DW512 V load(const bf16* p, M m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
  CKS_DW512 void store(bf16* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), gemm::round_bf16(v));
  }
  CKS_DW512 void store(bf16* p, V v, M m) { _mm256_mask_storeu_epi16(p, m, gemm::round_bf16(v)); }
  CKS_DW512 void stream(bf16* p, V v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), gemm::round_bf16(v));
  }
};
template <typename T_>
struct Y256 {
  using T = T_;
  static constexpr bool F = std::is_same<T, float>::value;
  using V = decltype(gemm::vload(static_cast<const T*>(nullptr)));
  using M = __m256i;
  static constexpr int L = 32 / sizeof(T);
  CKS_DW256 M mask(int64_t m) {
    const int64_t n = std::clamp<int64_t>(m, 0, L);
    if constexpr (F)
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    else
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  CKS_DW256 V zero() { return V{}; }
  CKS_DW256 V load(const T* p) { return gemm::vload(p); }
  CKS_DW256 V load(const T* p, M m) {
    if constexpr (F) return _mm256_maskload_ps(p, m);
    else return _mm256_maskload_pd(p, m);
  }
  CKS_DW256 V fma(V a, V b, V c) { return gemm::vfma(a, b, c); }
  using P = __m256i;  // float lanes (a double's two halves for double)
  CKS_DW256 P index(int64_t c, int64_t g) {
    int p[8];
    for (int i = 0; i < 8; ++i)
      p[i] = F ? int(perm(i, c, g)) : int(2 * perm(i / 2, c, g) + i % 2);
    return _mm256_setr_epi32(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
  }
  CKS_DW256 void indices(const Red& k, P* pcs) {  // as Z512's
    for (int64_t c = 0; c < std::min<int64_t>(k.nc, kMaxPermGroup); ++c) pcs[c] = index(c, k.grp);
  }
  CKS_DW256 P spread(int64_t j, int64_t g) {
    int p[8];
    for (int i = 0; i < 8; ++i) {
      const int e = F ? i : i / 2;  // element of float lane i
      p[i] = F ? int(e - e % g + j) : int(2 * (e - e % g + j) + i % 2);
    }
    return _mm256_setr_epi32(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
  }
  CKS_DW256 V permute(V x, P p) {
    if constexpr (F) return _mm256_permutevar8x32_ps(x, p);
    else return _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(x), p));
  }
  CKS_DW256 V add(V a, V b) { return gemm::vadd(a, b); }
  CKS_DW256 V bcast(const T* p) {
    if constexpr (F) return _mm256_broadcast_ss(p);
    else return _mm256_broadcast_sd(p);
  }
  CKS_DW256 void store(T* p, V v) { gemm::vstore(p, v); }
  CKS_DW256 void store(T* p, V v, M m) {
    if constexpr (F) _mm256_maskstore_ps(p, m, v);
    else _mm256_maskstore_pd(p, m, v);
  }
  CKS_DW256 void stream(T* p, V v) { gemm::vstream(p, v); }
};
#undef CKS_DW512
#undef CKS_DW256

// The depthwise kernel's ISA: gemm_isa(), where AVX-512 also needs BW and
// VL (every AVX-512 CPU since Skylake-SP has them).
inline int isa() {
  static const int i =
      gemm::gemm_isa() == 2 && !gemm::cpu_features().avx512bw_vl ? 1 : gemm::gemm_isa();
  return i;
}

// One block of 2 L lanes from lane i (whole vectors where FULL, else the
// first m lanes, masked) of R rows with S chains each. A macro, stamped
// into one function per ISA (each with its own target attribute).
#define CKS_DW_CHUNK(I, FULL)                                                                  \
  {                                                                                            \
    using V = typename I::V;                                                                   \
    constexpr int L = I::L;                                                                    \
    const typename I::M k0 = I::mask(m), k1 = I::mask(m - L);                                  \
    V acc[R][S][2];                                                                            \
    for (int r = 0; r < R; ++r)                                                                \
      for (int u = 0; u < S; ++u) acc[r][u][0] = acc[r][u][1] = I::zero();                     \
    const int64_t len = k.len, sa = k.sa, sb = k.sb;                                           \
    for (int64_t c = 0; c < k.nc; ++c) {                                                       \
      const typename I::P pc = GM == 1 ? pcs[c] : typename I::P{};                             \
      for (int64_t j = 0; j < k.nruns; ++j) {                                                  \
        const TB* bp = b + c * k.cb + k.rb[j] + i;                                             \
        const TA* ap[R];                                                                       \
        for (int r = 0; r < R; ++r) ap[r] = a + arow[r] + c * k.ca + k.ra[j] + i;              \
        for (int64_t q = 0; q < len; q += S) {                                                 \
          _Pragma("GCC unroll 4") for (int u = 0; u < S; ++u) {                                \
            if (S > 1 && q + u >= len) break;                                                  \
            const V b0 = FULL ? I::load(bp) : I::load(bp, k0);                                 \
            const V b1 = FULL ? I::load(bp + L) : I::load(bp + L, k1);                         \
            bp += sb;                                                                          \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {                              \
              V a0 = FULL ? I::load(ap[r]) : I::load(ap[r], k0);                               \
              V a1 = FULL ? I::load(ap[r] + L) : I::load(ap[r] + L, k1);                       \
              if (GM == 1) a0 = I::permute(a0, pc), a1 = I::permute(a1, pc);                   \
              acc[r][u][0] = I::fma(a0, b0, acc[r][u][0]);                                     \
              acc[r][u][1] = I::fma(a1, b1, acc[r][u][1]);                                     \
              ap[r] += sa;                                                                     \
            }                                                                                  \
          }                                                                                    \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
    for (int r = 0; r < R; ++r)                                                                \
      for (int h = 0; h < 2; ++h) {                                                            \
        V sum = acc[r][0][h];                                                                  \
        for (int u = 1; u < S; ++u) sum = I::add(sum, acc[r][u][h]);                           \
        TO* const op = out + orow[r] + i + h * L;                                              \
        if (add) sum = I::add(FULL ? I::load(op) : I::load(op, h == 0 ? k0 : k1), sum);         \
        if (FULL && nt)                                                                        \
          I::stream(op, sum);                                                                  \
        else if (FULL)                                                                         \
          I::store(op, sum);                                                                   \
        else                                                                                   \
          I::store(op, sum, h == 0 ? k0 : k1);                                                 \
      }                                                                                        \
  }

// GM: 0 no groups, 1 permuted lanes (see Red).
template <int R, int S, int GM, typename TA, typename TB, typename TO>
__attribute__((target(CKS_DW512_TARGET))) void rows_avx512(const TA* a, const int64_t* arow,
                                                          const TB* b, const Red& k, TO* out,
                                                          const int64_t* orow, int64_t n,
                                                          bool add, bool nt) {
  using I = Z512<Acc<TA>>;
  typename I::P pcs[kMaxPermGroup];
  if (GM == 1) I::indices(k, pcs);
  int64_t i = 0;
  for (; i + 2 * I::L <= n; i += 2 * I::L) {
    const int64_t m = 2 * I::L;
    CKS_DW_CHUNK(I, true)
  }
  if (i < n) {
    const int64_t m = n - i;
    CKS_DW_CHUNK(I, false)
  }
}

// bcast_rows_portable on AVX-512: blocks of two vectors of lanes (one group
// of 2 L, or two of L), whole vectors only (n is a multiple of the group).
template <int R, int S, typename TA, typename TB, typename TO>
__attribute__((target(CKS_DW512_TARGET))) void bcast_rows_avx512(const TA* a, const int64_t* arow,
                                                                const TB* b, const Red& k,
                                                                TO* out, const int64_t* orow,
                                                                int64_t n, bool add, bool nt) {
  using I = Z512<Acc<TA>>;
  using V = typename I::V;
  constexpr int L = I::L;
  const int64_t g = k.grp, cb = k.cb;
  for (int64_t i = 0; i < n; i += 2 * L) {
    const bool two = i + L < n;  // a second vector of lanes (always, for groups of 2 L)
    V acc[R][S][2];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < S; ++u) acc[r][u][0] = acc[r][u][1] = I::zero();
    for (int64_t j = 0; j < k.nruns; ++j) {
      const TB* bp = b + k.rb[j] + i;
      const TA* ap[R];
      for (int r = 0; r < R; ++r) ap[r] = a + arow[r] + k.ra[j] + i;
      for (int64_t q = 0; q < k.len; ++q) {
        for (int64_t c = 0; c < g; c += S) {
#pragma GCC unroll 4
          for (int u = 0; u < S; ++u) {
            const V b0 = I::load(bp + (c + u) * cb);
            const V b1 = two ? I::load(bp + (c + u) * cb + L) : I::zero();
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
              const V a0 = I::bcast(ap[r] + c + u);
              const V a1 = g > L ? a0 : two ? I::bcast(ap[r] + L + c + u) : I::zero();
              acc[r][u][0] = I::fma(a0, b0, acc[r][u][0]);
              acc[r][u][1] = I::fma(a1, b1, acc[r][u][1]);
            }
          }
        }
        bp += k.sb;
        for (int r = 0; r < R; ++r) ap[r] += k.sa;
      }
    }
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < (two ? 2 : 1); ++h) {
        V sum = acc[r][0][h];
        for (int u = 1; u < S; ++u) sum = I::add(sum, acc[r][u][h]);
        TO* const op = out + orow[r] + i + h * L;
        if (add) sum = I::add(I::load(op), sum);
        if (nt)
          I::stream(op, sum);
        else
          I::store(op, sum);
      }
  }
}

template <int R, int S, int GM, typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const T* a, const int64_t* arow, const T* b,
                                                   const Red& k, T* out, const int64_t* orow,
                                                   int64_t n, bool add, bool nt) {
  using I = Y256<T>;
  using TA = T;
  using TB = T;
  using TO = T;
  typename I::P pcs[kMaxPermGroup];
  if (GM == 1) I::indices(k, pcs);
  int64_t i = 0;
  for (; i + 2 * I::L <= n; i += 2 * I::L) {
    const int64_t m = 2 * I::L;
    CKS_DW_CHUNK(I, true)
  }
  if (i < n) {
    const int64_t m = n - i;
    CKS_DW_CHUNK(I, false)
  }
}
#undef CKS_DW_CHUNK

// Sliding rows: R rows whose lhs offsets step by rs, over runs of TL taps
// whose a step is rs too (a stride-1 undilated forward: row r's tap t reads
// the position of row r + t's tap 0).
// Each run's R + TL - 1 input vectors are loaded once instead of R x TL
// times. One chain per row, taps in order: the same FMAs as rows<R, 1>.
// NV vectors of lanes per block (as many as the registers allow).
#define CKS_DW_SLIDE(I, NV, FULL)                                                              \
  {                                                                                            \
    using V = typename I::V;                                                                   \
    constexpr int L = I::L;                                                                    \
    typename I::M mk[NV];                                                                      \
    for (int v = 0; v < NV; ++v) mk[v] = I::mask(m - v * L);                                   \
    V acc[R][NV];                                                                              \
    for (int r = 0; r < R; ++r)                                                                \
      for (int v = 0; v < NV; ++v) acc[r][v] = I::zero();                                      \
    for (int64_t c = 0; c < k.nc; ++c) {                                                       \
      const typename I::P pc = PERM ? pcs[c] : typename I::P{};                                \
      const TA* const arc = a + arow0 + c * k.ca + i;                                          \
      const TB* const bc = b + c * k.cb + i;                                                   \
      for (int64_t j = 0; j < k.nruns; ++j) {                                                  \
        const TA* const ap = arc + k.ra[j];                                                    \
        V w[R + TL - 1][NV];                                                                   \
        _Pragma("GCC unroll 16") for (int j = 0; j < R + TL - 1; ++j)                          \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; ++v) {                             \
          w[j][v] = FULL ? I::load(ap + j * rs + v * L) : I::load(ap + j * rs + v * L, mk[v]); \
          if (PERM) w[j][v] = I::permute(w[j][v], pc);                                         \
        }                                                                                      \
        _Pragma("GCC unroll 8") for (int t = 0; t < TL; ++t) {                                 \
          const TB* const bp = bc + k.rb[j] + t * k.sb;                                        \
          V bv[NV];                                                                            \
          _Pragma("GCC unroll 2") for (int v = 0; v < NV; ++v) bv[v] =                         \
              FULL ? I::load(bp + v * L) : I::load(bp + v * L, mk[v]);                         \
          _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)                                  \
              _Pragma("GCC unroll 2") for (int v = 0; v < NV; ++v) acc[r][v] =                 \
              I::fma(w[r + t][v], bv[v], acc[r][v]);                                           \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
    for (int r = 0; r < R; ++r)                                                                \
      for (int v = 0; v < NV; ++v) {                                                           \
        TO* const op = out + orow[r] + i + v * L;                                              \
        if (FULL && nt)                                                                        \
          I::stream(op, acc[r][v]);                                                            \
        else if (FULL)                                                                         \
          I::store(op, acc[r][v]);                                                             \
        else                                                                                   \
          I::store(op, acc[r][v], mk[v]);                                                      \
      }                                                                                        \
  }

template <int R, int TL, bool PERM, typename TA, typename TB, typename TO>
__attribute__((target(CKS_DW512_TARGET))) void slide_avx512(const TA* a, int64_t arow0,
                                                           int64_t rs, const TB* b, const Red& k,
                                                           TO* out, const int64_t* orow,
                                                           int64_t n, bool nt) {
  using I = Z512<Acc<TA>>;
  constexpr int NV = R + TL - 1 <= 8 ? 2 : 1;  // windows + accumulators within 32 zmm
  typename I::P pcs[kMaxPermGroup];
  if (PERM) I::indices(k, pcs);
  int64_t i = 0;
  for (; i + NV * I::L <= n; i += NV * I::L) {
    const int64_t m = NV * I::L;
    CKS_DW_SLIDE(I, NV, true)
  }
  if (i < n) {
    const int64_t m = n - i;
    CKS_DW_SLIDE(I, NV, false)
  }
}

template <int R, int TL, bool PERM, typename T>
__attribute__((target("avx2,fma"))) void slide_avx2(const T* a, int64_t arow0, int64_t rs,
                                                    const T* b, const Red& k, T* out,
                                                    const int64_t* orow, int64_t n, bool nt) {
  using I = Y256<T>;
  using TA = T;
  using TB = T;
  using TO = T;
  typename I::P pcs[kMaxPermGroup];
  if (PERM) I::indices(k, pcs);
  int64_t i = 0;
  for (; i + I::L <= n; i += I::L) {
    const int64_t m = I::L;
    CKS_DW_SLIDE(I, 1, true)
  }
  if (i < n) {
    const int64_t m = n - i;
    CKS_DW_SLIDE(I, 1, false)
  }
}
#undef CKS_DW_SLIDE

// spread_portable's sums, NV vectors of lanes per block.
#define CKS_DW_SPREAD(I, NV, FULL)                                                             \
  {                                                                                            \
    using V = typename I::V;                                                                   \
    constexpr int L = I::L, S = spread_chains(G);                                              \
    typename I::M mk[NV];                                                                      \
    for (int v = 0; v < NV; ++v) mk[v] = I::mask(m - v * L);                                   \
    V acc[G][S][NV];                                                                           \
    for (int j = 0; j < G; ++j)                                                                \
      for (int u = 0; u < S; ++u)                                                              \
        for (int v = 0; v < NV; ++v) acc[j][u][v] = I::zero();                                 \
    for (int64_t c = 0; c < k.nc; ++c)                                                         \
      for (int64_t r = 0; r < k.nruns; ++r) {                                                  \
        const TA* ap = a + arow + c * k.ca + k.ra[r] + i;                                      \
        const TB* bp = b + c * k.cb + k.rb[r] + i;                                             \
        for (int64_t q = 0; q < k.len; q += S) {                                               \
          _Pragma("GCC unroll 8") for (int u = 0; u < S; ++u) {                                \
            if (S > 1 && q + u >= k.len) break;                                                \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; ++v) {                             \
              const V bv = FULL ? I::load(bp + v * L) : I::load(bp + v * L, mk[v]);            \
              if constexpr (G == L) { /* one group per vector: broadcasts */                   \
                _Pragma("GCC unroll 16") for (int j = 0; j < G; ++j) acc[j][u][v] =            \
                    I::fma(I::bcast(ap + v * L + j), bv, acc[j][u][v]);                        \
              } else {                                                                         \
                const V av = FULL ? I::load(ap + v * L) : I::load(ap + v * L, mk[v]);          \
                _Pragma("GCC unroll 8") for (int j = 0; j < G; ++j) acc[j][u][v] =             \
                    I::fma(I::permute(av, px[j]), bv, acc[j][u][v]);                           \
              }                                                                                \
            }                                                                                  \
            ap += k.sa;                                                                        \
            bp += k.sb;                                                                        \
          }                                                                                    \
        }                                                                                      \
      }                                                                                        \
    for (int j = 0; j < G; ++j)                                                                \
      for (int v = 0; v < NV; ++v) {                                                           \
        V sum = acc[j][0][v];                                                                  \
        for (int u = 1; u < S; ++u) sum = I::add(sum, acc[j][u][v]);                           \
        TO* const op = out + orow + j * oj + i + v * L;                                        \
        if (add) sum = I::add(FULL ? I::load(op) : I::load(op, mk[v]), sum);                   \
        if (FULL)                                                                              \
          I::store(op, sum);                                                                   \
        else                                                                                   \
          I::store(op, sum, mk[v]);                                                            \
      }                                                                                        \
  }

template <int G, typename TA, typename TB, typename TO>
__attribute__((target(CKS_DW512_TARGET))) void spread_avx512(const TA* a, int64_t arow,
                                                            const TB* b, const Red& k, TO* out,
                                                            int64_t orow, int64_t oj, int64_t n,
                                                            bool add) {
  using I = Z512<Acc<TA>>;
  // G x S x NV = 16 accumulators and G indices within 32 zmm; a group of a
  // whole vector (whose lanes are always whole vectors) broadcasts instead.
  constexpr int NV = G < I::L ? 2 : 1;
  typename I::P px[G < I::L ? G : 1];
  if constexpr (G < I::L)
    for (int j = 0; j < G; ++j) px[j] = I::spread(j, G);
  int64_t i = 0;
  for (; i + NV * I::L <= n; i += NV * I::L) {
    const int64_t m = NV * I::L;
    CKS_DW_SPREAD(I, NV, true)
  }
  if (i < n) {
    const int64_t m = n - i;
    CKS_DW_SPREAD(I, NV, false)
  }
}

template <int G, typename T>
__attribute__((target("avx2,fma"))) void spread_avx2(const T* a, int64_t arow, const T* b,
                                                     const Red& k, T* out, int64_t orow,
                                                     int64_t oj, int64_t n, bool add) {
  using I = Y256<T>;
  using TA = T;
  using TB = T;
  using TO = T;
  typename I::P px[G < I::L ? G : 1];
  if constexpr (G < I::L)
    for (int j = 0; j < G; ++j) px[j] = I::spread(j, G);
  int64_t i = 0;
  for (; i + I::L <= n; i += I::L) {
    const int64_t m = I::L;
    CKS_DW_SPREAD(I, 1, true)
  }
  if (i < n) {
    const int64_t m = n - i;
    CKS_DW_SPREAD(I, 1, false)
  }
}
#undef CKS_DW_SPREAD
#undef CKS_DW512_TARGET
#endif

// Whether a block's rows run eight at a time (rows<8, 1>, slide<8>): on
// AVX-512, whose 32 registers hold their chains.
inline bool eight_rows() {
#ifdef CKS_X86_AVX2
  return isa() == 2;
#else
  return false;
#endif
}

// The largest run of taps the sliding kernel takes (its windows: R + TL - 1
// vectors per lane vector).
constexpr int64_t kSlideMaxTL = 7;

// The shortest runs that slide8 takes: with fewer taps, four rows of two
// vectors (slide4) already run eight chains.
constexpr int64_t kSlide8MinTL = 4;

// Rows [0, R) (R = 4, or 8 on AVX-512 for runs of kSlide8MinTL taps or
// more: eight chains of one vector) as rows<4, 1> computes them, where their
// lhs offsets step by the runs' a step and the runs are 2..kSlideMaxTL long
// (see CKS_DW_SLIDE), on a SIMD ISA (AVX-512 for bfloat16); returns false
// (nothing done) elsewhere.
template <int R, typename TA, typename TB, typename TO>
bool slide(const TA* a, const int64_t* arow, const TB* b, const Red& k, TO* out,
           const int64_t* orow, int64_t n, bool nt = false) {
  static_assert(R == 4 || R == 8, "slide: 4 or 8 rows");
#ifdef CKS_X86_AVX2
  using T = Acc<TA>;
  constexpr bool same = std::is_same<TA, T>::value && std::is_same<TB, T>::value &&
                        std::is_same<TO, T>::value;
  const int isa = dw::isa();
  const int64_t rs = arow[1] - arow[0];
  if (isa == 0 || ((!same || R == 8) && isa != 2) || k.len < (R == 8 ? kSlide8MinTL : 2) ||
      k.len > kSlideMaxTL || k.sa != rs || k.bcast)
    return false;
  for (int r = 2; r < R; ++r)
    if (arow[r] - arow[r - 1] != rs) return false;
  auto run = [&](auto tag) {
    constexpr int TL = decltype(tag)::value;
    if (isa == 2 && k.grp > 1)
      slide_avx512<R, TL, true>(a, arow[0], rs, b, k, out, orow, n, nt);
    else if (isa == 2)
      slide_avx512<R, TL, false>(a, arow[0], rs, b, k, out, orow, n, nt);
    else if constexpr (same && R == 4) {
      if (k.grp > 1)
        slide_avx2<R, TL, true>(a, arow[0], rs, b, k, out, orow, n, nt);
      else
        slide_avx2<R, TL, false>(a, arow[0], rs, b, k, out, orow, n, nt);
    }
  };
  switch (k.len) {
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 6: run(std::integral_constant<int, 6>{}); break;
    default: run(std::integral_constant<int, 7>{}); break;
  }
  return true;
#else
  (void)a, (void)arow, (void)b, (void)k, (void)out, (void)orow, (void)n, (void)nt;
  return false;
#endif
}

// Rows [0, R) of a block (see the top of this file) on the kernel's ISA;
// whole vectors stored non-temporally where nt (they must be aligned: the
// caller checks, and fences). bfloat16 operands: AVX-512, else portable.
template <int R, int S, typename TA, typename TB, typename TO>
void rows(const TA* a, const int64_t* arow, const TB* b, const Red& k, TO* out,
          const int64_t* orow, int64_t n, bool add = false, bool nt = false) {
  using T = Acc<TA>;
#ifdef CKS_X86_AVX2
  if (k.bcast && dw::isa() == 2)
    return bcast_rows_avx512<R, S>(a, arow, b, k, out, orow, n, add, nt);
  if (k.bcast) return bcast_rows_portable<R, S, T>(a, arow, b, k, out, orow, n, add);
  if (dw::isa() == 2)
    return k.grp > 1 ? rows_avx512<R, S, 1>(a, arow, b, k, out, orow, n, add, nt)
                     : rows_avx512<R, S, 0>(a, arow, b, k, out, orow, n, add, nt);
  if constexpr (std::is_same<TA, T>::value && std::is_same<TB, T>::value &&
                std::is_same<TO, T>::value)
    if (dw::isa() == 1)
      return k.grp > 1 ? rows_avx2<R, S, 1>(a, arow, b, k, out, orow, n, add, nt)
                       : rows_avx2<R, S, 0>(a, arow, b, k, out, orow, n, add, nt);
#else
  (void)nt;
  if (k.bcast) return bcast_rows_portable<R, S, T>(a, arow, b, k, out, orow, n, add);
#endif
  rows_portable<R, S, T>(a, arow, b, k, out, orow, n, add);
}

// spread_portable's row on the kernel's ISA (bfloat16 operands: AVX-512,
// else portable), for a group width g of 2, 4, 8 or 16 that divides the
// ISA's vector (else portable).
template <typename TA, typename TB, typename TO>
void spread(int64_t g, const TA* a, int64_t arow, const TB* b, const Red& k, TO* out,
            int64_t orow, int64_t oj, int64_t n, bool add) {
  using T = Acc<TA>;
  auto run = [&](auto tag) {
    constexpr int G = decltype(tag)::value;
#ifdef CKS_X86_AVX2
    if constexpr (G * sizeof(T) <= 64)
      if (dw::isa() == 2) return spread_avx512<G>(a, arow, b, k, out, orow, oj, n, add);
    if constexpr (std::is_same<TA, T>::value && std::is_same<TB, T>::value &&
                  std::is_same<TO, T>::value && G * sizeof(T) <= 32)
      if (dw::isa() == 1) return spread_avx2<G>(a, arow, b, k, out, orow, oj, n, add);
#endif
    spread_portable<G, T>(a, arow, b, k, out, orow, oj, n, add);
  };
  switch (g) {
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 8: run(std::integral_constant<int, 8>{}); break;
    default: run(std::integral_constant<int, 16>{}); break;
  }
}

}  // namespace dw
}  // namespace cks
