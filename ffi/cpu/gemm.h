// GEMM block of the CPU kernels: C[mc x nc] (+)= A * B.
//   A : an A source, walked as segments of the reduction along which each
//       row's elements are a constant step apart: PackedA (MR-row panels,
//       each [kc][MR]: one segment), IndirectA (read in place through an
//       offset per index) or RunA (read in place: long runs of contiguous
//       channels, then as ChannelRunA, or of one dimension's taps);
//   B : a B source: PanelB (NR-column panels, each [kc][NR], ldb elements
//       apart: kc * NR when packed block by block, more when a block is a
//       window of a larger packed B), TableB (read in place, row k
//       through an offset per index, its columns contiguous) or RunB (read
//       in place as runs with a constant step);
//   C : a C destination: BufC (row-major scratch, whole tiles, mc and nc
//       multiples of MR and NR) or OutC (the output itself, through row
//       offsets; tiles past mc rows or nc columns are masked).
// x86-64 picks a hand-written micro-kernel at run time (no -march needed):
//   AVX2+FMA : 6x16 float / 6x8 double tile in 12 ymm accumulators;
//   AVX-512F : four adjacent B panels at once, 6x64 float / 6x32 double in
//              24 zmm; what is left in tiles of two panels and of one.
// Anything else runs the portable kernel. All paths add in the same order
// per element; the AVX2 and AVX-512 ones (both FMA) give identical bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

// x86-64 with GCC or Clang: the AVX2 and AVX-512 kernels, chosen at run time.
// CKS_PORTABLE_ONLY leaves them out, as on any other CPU (tests/
// test_portable_build.py compiles the kernel so on x86-64 too).
#if defined(__linux__)
#include <unistd.h>  // sysconf (l2_bytes)
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(CKS_PORTABLE_ONLY)
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define CKS_X86_AVX2 1
#ifndef CKS_GEMM_AVX512
#define CKS_GEMM_AVX512 1  // -DCKS_GEMM_AVX512=0: never use zmm
#endif
#endif

namespace cks {
namespace gemm {

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

// Before the tiles' loops over reduction indices: GCC unrolls them 4 times.
// Clang, told the same, kept each row pointer plus 1, 2 and 3 steps as loop
// invariants of their own (24 for a 6-row tile; the step is a run-time
// value), spilled them and reloaded one per broadcast: 128 tile functions had
// stack operands in their innermost loop (objdump; 22 not unrolled, most of
// them the dot path's, where GCC has some too), and a clang build ran DCGAN
// 16->32's input and filter gradients in 1.8x and 1.4x the time of GCC's
// build (1.09x and 1.03x not unrolled, 10 other ops 1.00-1.13x; best of two
// runs, separate processes).
#if defined(__clang__)
#define CKS_UNROLL_STEPS _Pragma("clang loop unroll(disable)")
#else
#define CKS_UNROLL_STEPS _Pragma("GCC unroll 4")
#endif
// The AVX-512 float tiles do not unroll segments of A read in place with
// step 1 (ChannelRunA: runs of contiguous channels): GCC's 4-fold unrolling,
// with a run-time trip count, cost the 6 x 32 tile 3 % of its rate on runs
// of 32 channels, 7 % on runs of 16 and 11 % on runs of 8 (Zen 4, one
// thread: the tile on a 3x3x3 dilated conv's A read in place, 112 -> 116,
// 108 -> 115 and 101 -> 113 GFLOP/s; 64-feature tiles and single segments
// 0-1 % faster too). Strided A (a filter gradient's, step = channels) keeps
// it: rolled, the 6 x 64 tile lost 5 % of its rate there (103 -> 97 GFLOP/s)
// and U-Net 64->128's filter gradient took 1.13x the time. So do packed A,
// and the AVX2 tiles (0-1 % faster with it).
#if defined(__clang__)
#define CKS_ROLLED_STEPS _Pragma("clang loop unroll(disable)")
#else
#define CKS_ROLLED_STEPS _Pragma("GCC unroll 1")
#endif

// p, computed in a general register. GCC otherwise adds the six row offsets
// of a tile as vectors, stores them and reloads them one by one (a
// store-forwarding stall per tile; the instruction after it held 7 % of the
// kernel's samples on U-Net's k2 s2 forward).
template <typename T>
__attribute__((always_inline)) inline const T* scalar(const T* p) {
  asm("" : "+r"(p));
  return p;
}

// A sources, walked tile by tile: rows(ir, base) points base[i] at row
// ir + i; segment(cur, left, o) sets o to the offset from base[i] of row i's
// element at the cursor and returns how many reduction indices from it on
// (at most `left`) form the next segment, advancing the cursor past them.
// Inside a segment the elements of its index q are at base[i] + o + q * step
// (PackedA, RunA), or at base[i] + red[p + q] with p the segment's first
// index (IndirectA, kTable). The row pointers stay put for the whole tile:
// a segment moves one offset, not six pointers (recomputing them at each of
// a RunA's runs, with the cursor, ran out of registers and spilled them).
template <typename T>
struct PackedA {  // MR-row panels [kc][MR], contiguous: one segment
  const T* Ap;
  int64_t kc;
  static constexpr bool kTable = false;
  static constexpr int64_t step = Tile<T>::MR;
  struct Cursor {
    int64_t p;
  };
  Cursor begin() const { return {0}; }
  void rows(int64_t ir, const T** base) const {
    for (int i = 0; i < Tile<T>::MR; ++i) base[i] = Ap + ir * kc + i;
  }
  int64_t segment(Cursor& c, int64_t left, int64_t& o) const {
    o = c.p * step;
    c.p += left;
    return left;
  }
};
// Element (r, p) is base[rows[r] + red[p]]: A read in place with no packing
// (indirection, as in XNNPACK), through an offset table read per index: for
// reductions made of short runs. Pays when the reduction runs along
// contiguous memory (channel stride 1), or when the rows are contiguous (a
// filter gradient's), so every cache line read is used.
template <typename T>
struct IndirectA {
  const T* base;
  const int64_t* rows_;  // mc entries, all valid offsets
  const int64_t* red;    // kc entries
  static constexpr bool kTable = true;
  static constexpr int64_t step = 0;  // unused: offsets come from red
  struct Cursor {};
  Cursor begin() const { return {}; }
  void rows(int64_t ir, const T** b) const {
    for (int i = 0; i < Tile<T>::MR; ++i) b[i] = scalar(base + rows_[ir + i]);
  }
  int64_t segment(Cursor&, int64_t left, int64_t& o) const {
    o = 0;
    return left;  // one segment: the whole block, offsets from the table
  }
};
// Element (r, k) is base[rows[r] + starts[k / len] + (k % len) * step]: A
// read in place as IndirectA, where the reduction is long runs of `len`
// indices with a constant step. Walking the runs keeps six row pointers in
// registers and one offset: the table cost 20 % of the kernel's rate on
// 64-channel runs, but beat walking runs of 8 (the filter gradient of a
// k8 s4 transposed conv). The block starts at index q0 of run run0.
template <typename T>
struct RunA {
  const T* base;
  const int64_t* rows_;   // mc entries, all valid offsets
  const int64_t* starts;  // offset of each run's first index
  int64_t len, step, run0, q0;
  static constexpr bool kTable = false;
  struct Cursor {
    int64_t run, q;
  };
  Cursor begin() const { return {run0, q0}; }
  void rows(int64_t ir, const T** b) const {
    for (int i = 0; i < Tile<T>::MR; ++i) b[i] = scalar(base + rows_[ir + i]);
  }
  int64_t segment(Cursor& c, int64_t left, int64_t& o) const {
    const int64_t n = std::min(len - c.q, left);
    o = starts[c.run] + c.q * step;
    c.q += n;
    if (c.q == len) c = {c.run + 1, 0};
    return n;
  }
};
// A RunA whose step is 1 (runs of contiguous channels): a type of its own so
// that the AVX-512 tiles compile its segments' loop rolled (CKS_ROLLED_STEPS)
// and a strided RunA's unrolled (one function with both loops, chosen per
// segment, ran both 3-4 % slower than either alone). The step stays a
// run-time value: as a constant 1, GCC built a loop 5 % slower (110 GFLOP/s).
template <typename T>
struct ChannelRunA : RunA<T> {};
template <typename ASrc>
constexpr bool kChannelRuns = false;
template <typename T>
constexpr bool kChannelRuns<ChannelRunA<T>> = true;

// The compiler folds six row pointers into one base plus six offsets and
// then spends an address computation per broadcast (measured: 20 % of the
// rate); making them opaque keeps each in its own register.
template <int MR, typename T>
__attribute__((always_inline)) inline void opaque(const T** r) {
  for (int i = 0; i < MR; ++i) asm("" : "+r"(r[i]));
}

// B sources, walked alongside A: segment(cur, left, row) points *row at the
// row at the cursor (the block's first panel; panel p of a row is ldb
// elements further) and returns how many indices (at most left) follow it
// with a constant step (step elements apart); advance(cur, n) moves the
// cursor n indices on, within that segment. A kTable source instead gives
// each index's row, row(k). cols(j) is the source of the block's columns
// from j (a multiple of NR) on.
template <typename T>
struct PanelB {  // packed NR-column panels [kc][NR], ldb apart: one segment
  const T* b;
  int64_t ldb;
  static constexpr bool kTable = false;
  static constexpr int64_t step = Tile<T>::NR;
  struct Cursor {
    int64_t q;
  };
  Cursor begin() const { return {0}; }
  int64_t segment(const Cursor& c, int64_t left, const T** row) const {
    *row = b + c.q * step;
    return left;
  }
  void advance(Cursor& c, int64_t n) const { c.q += n; }
  PanelB cols(int64_t j) const { return {b + j / Tile<T>::NR * ldb, ldb}; }
};
// Row k at base + red[k], columns contiguous: B read in place through an
// offset per index, as IndirectA reads A. Every panel is read whole, so the
// block's columns must all exist (nc == live). Packing a filter gradient's B
// (the cotangent: megabytes) block by block took a third of U-Net's k2 s2
// d-filter time.
template <typename T>
struct TableB {
  const T* base;
  const int64_t* red;  // kc entries
  static constexpr bool kTable = true;
  static constexpr int64_t ldb = Tile<T>::NR;
  static constexpr int64_t step = 0;  // rows come from red
  struct Cursor {};
  Cursor begin() const { return {}; }
  int64_t segment(const Cursor&, int64_t left, const T** row) const {
    *row = nullptr;  // rows come from the table
    return left;
  }
  void advance(Cursor&, int64_t) const {}
  const T* row(int64_t k) const { return base + red[k]; }
  TableB cols(int64_t j) const { return {base + j, red}; }
};
// Row k at base + starts[k / len] + (k % len) * step, columns contiguous: B
// read in place as runs with a constant step, as RunA reads A (a filter
// gradient's cotangent rows along one line of positions), with no offset
// table to build or read. The block starts at index q0 of run run0; a
// segment ends where its run does.
template <typename T>
struct RunB {
  const T* base;
  const int64_t* starts;
  int64_t len, step, run0, q0;
  static constexpr bool kTable = false;
  static constexpr int64_t ldb = Tile<T>::NR;
  struct Cursor {
    int64_t run, q;
  };
  Cursor begin() const { return {run0, q0}; }
  int64_t segment(const Cursor& c, int64_t left, const T** row) const {
    *row = base + starts[c.run] + c.q * step;
    return std::min(len - c.q, left);
  }
  void advance(Cursor& c, int64_t n) const {
    c.q += n;
    if (c.q == len) c = {c.run + 1, 0};
  }
  RunB cols(int64_t j) const { return {base + j, starts, len, step, run0, q0}; }
};
// RunB over packed NR-column panels (ldb elements apart) whose rows are
// positions: row k at base + (starts[k / len] - origin) NR + (k % len) step.
// A chunk of the cotangent packed once and read by every tap (conv_cpu.cc,
// packs_taps_b): starts count a residue class's positions from its first,
// origin is the chunk's first of that class, so one table serves every
// chunk. The cursor (begin, advance) is RunB's.
template <typename T>
struct PanelRunB : RunB<T> {
  int64_t origin, ldb;  // ldb hides RunB's NR: panels are a chunk apart
  int64_t segment(const typename RunB<T>::Cursor& c, int64_t left, const T** row) const {
    *row = this->base + (this->starts[c.run] - origin) * Tile<T>::NR + c.q * this->step;
    return std::min(this->len - c.q, left);
  }
  PanelRunB cols(int64_t j) const {
    return {{this->base + j / Tile<T>::NR * ldb, this->starts, this->len, this->step, this->run0,
             this->q0},
            origin,
            ldb};
  }
};

// Every kernel walks a block as segments, each ending where a segment of A
// or of B ends. In a segment, index q's A elements are at r[i] + a_at(A, q,
// o) and its B row at b_at(B, q, bq), where o and bq start at 0 and at the
// segment's first row and step by A.step and B.step: a table source's entry
// for q (its step is 0), else o and bq themselves. One loop thus serves
// every pair of sources (objdump: its innermost loops have as many
// instructions as the separate loops had, or fewer; with TableB one lea more
// per index).
template <typename ASrc>
__attribute__((always_inline)) inline int64_t a_at(const ASrc& A, int64_t q, int64_t o) {
  if constexpr (ASrc::kTable) return A.red[q];
  else return o;
}
template <typename BSrc, typename T>
__attribute__((always_inline)) inline const T* b_at(const BSrc& B, int64_t q, const T* bq) {
  if constexpr (BSrc::kTable) return B.row(q);
  else return bq;
}

// C destinations. BufC: a row-major scratch block, C += the product.
template <typename T>
struct BufC {
  T* C;
  int64_t ldc;
};
// OutC: the output itself, row r at base + rows[r] with its columns
// contiguous; C = the product on the first reduction block, += after it.
// Writing in place saves zeroing and copying out a scratch block.
template <typename T>
struct OutC {
  T* base;
  const int64_t* rows;  // mc entries
  int64_t mc, nc;       // rows and columns that exist
  bool add;
  // Whole tiles with non-temporal stores (aligned rows and columns, the only
  // reduction block): they skip reading each output line before writing it.
  // Fence before the output is handed on.
  bool stream = false;
  // Row r, column j of the block.
  T* at(int64_t r, int64_t j) const { return base + rows[r] + j; }
};
// An OutC whose NR-column panels are not adjacent in a row: panel q of the
// block starts cols[q] elements after the row's start (several
// sub-problems' columns as one GEMM: conv_cpu.cc, fuses_phases). A type of
// its own so that OutC's tiles compile as they did: as a field of OutC, the
// table cost the 6 x 24 tile a stack operand per two FMAs (test_codegen).
template <typename T>
struct PanelOutC : OutC<T> {
  const int64_t* cols;
  T* at(int64_t r, int64_t j) const {
    constexpr int NR = Tile<T>::NR;
    return this->base + this->rows[r] + cols[j / NR] + j % NR;
  }
};
// Whether CDst is the output itself (OutC or PanelOutC), not a BufC.
template <typename CDst, typename T>
constexpr bool kOutDst =
    std::is_same<CDst, OutC<T>>::value || std::is_same<CDst, PanelOutC<T>>::value;
// RoundC: a bfloat16 output itself (its bits), row r at base + rows[r] with
// its columns contiguous, each float32 sum rounded to nearest even as the
// AVX2 tile stores it (conv_cpu.cc: rounds_out, where the reduction is one
// block, so nothing is added to a rounded value). No scratch block to zero,
// fill and round on the way out.
struct RoundC {
  uint16_t* base;
  const int64_t* rows;  // mc entries
  int64_t mc, nc;       // rows and columns that exist
};

// Stores an R x W tile t (row stride W) at (ir, jr) of an OutC, masked to
// the rows and columns that exist.
template <typename T, int W = Tile<T>::NR, int R = Tile<T>::MR, typename CDst>
inline void store_edge(const CDst& C, int64_t ir, int64_t jr, const T* t) {
  const int64_t mi = std::min<int64_t>(R, C.mc - ir), nj = std::min<int64_t>(W, C.nc - jr);
  for (int64_t i = 0; i < mi; ++i) {
    if constexpr (std::is_same<CDst, OutC<T>>::value) {
      T* c = C.base + C.rows[ir + i] + jr;
      for (int64_t j = 0; j < nj; ++j) c[j] = C.add ? c[j] + t[i * W + j] : t[i * W + j];
    } else {  // the tile may span panels
      for (int64_t j = 0; j < nj; ++j) {
        T* c = C.at(ir + i, jr + j);
        *c = C.add ? *c + t[i * W + j] : t[i * W + j];
      }
    }
  }
}

// Portable kernel (the compiler vectorises it as it can).
template <typename T, typename ASrc, typename BSrc, typename CDst>
inline __attribute__((always_inline)) void macro_kernel(int64_t mc, int64_t nc, int64_t kc,
                                                        const ASrc& A, const BSrc& B,
                                                        const CDst& C) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  constexpr bool kOut = kOutDst<CDst, T>;
  for (int64_t jr = 0; jr < nc; jr += NR) {
    for (int64_t ir = 0; ir < mc; ir += MR) {
      const BSrc b = B.cols(jr);
      T acc[MR][NR] = {};
      const T* rb[MR];
      A.rows(ir, rb);
      auto cur = A.begin();
      auto bcur = b.begin();
      for (int64_t p = 0; p < kc;) {
        const T* bq;
        int64_t o0;
        const int64_t n = A.segment(cur, b.segment(bcur, kc - p, &bq), o0);
        for (int64_t q = p, o = o0; q < p + n; ++q, o += A.step, bq += b.step) {
          const int64_t ao = a_at(A, q, o);
          const T* bk = b_at(b, q, bq);
          for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) acc[i][j] += rb[i][ao] * bk[j];
        }
        b.advance(bcur, n);
        p += n;
      }
      if constexpr (kOut) {
        store_edge(C, ir, jr, &acc[0][0]);
      } else {
        T* c = C.C + ir * C.ldc + jr;
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < NR; ++j) c[i * C.ldc + j] += acc[i][j];
      }
    }
  }
}

// Where a block of the bfloat16 pair kernel (pairs_block, x86-64 only; this
// plain struct is declared everywhere, as conv_cpu.cc names it) puts its
// product. Reduction blocks before the last go to a float32 scratch block
// (buf, row stride ldc: the first stores, later ones add); the last (or
// only) one adds the scratch (if any came before) and stores the sum into
// the output, rounded to To (bfloat16 bits or float): row r at out +
// rows[r], columns contiguous, masked to mc rows and nc columns. With out
// null every block goes to buf (an output whose features are not
// contiguous, copied out by the caller).
template <typename To>
struct PairC {
  float* buf;
  int64_t ldc;
  To* out;
  const int64_t* rows;
  int64_t mc, nc;
  bool first, last;
};

#ifdef CKS_X86_AVX2
// Thin overloads so one template serves float (8 lanes) and double (4 lanes).
// Explicit FMA intrinsics: GCC does not contract a*b+c under -std=c++17.
#define CKS_AVX2_FN __attribute__((target("avx2,fma"), always_inline)) inline
CKS_AVX2_FN __m256 vload(const float* p) { return _mm256_loadu_ps(p); }
CKS_AVX2_FN __m256d vload(const double* p) { return _mm256_loadu_pd(p); }
CKS_AVX2_FN void vstore(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
CKS_AVX2_FN __m256 vadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
CKS_AVX2_FN __m256d vadd(__m256d a, __m256d b) { return _mm256_add_pd(a, b); }
CKS_AVX2_FN void vstore(double* p, __m256d v) { _mm256_storeu_pd(p, v); }
CKS_AVX2_FN __m256 vbcast(const float* p) { return _mm256_broadcast_ss(p); }
CKS_AVX2_FN __m256d vbcast(const double* p) { return _mm256_broadcast_sd(p); }
CKS_AVX2_FN __m256 vfma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
CKS_AVX2_FN __m256d vfma(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
CKS_AVX2_FN void vstream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
CKS_AVX2_FN void vstream(double* p, __m256d v) { _mm256_stream_pd(p, v); }
CKS_AVX2_FN void vaddto(float* p, __m256 v) { _mm256_storeu_ps(p, _mm256_add_ps(vload(p), v)); }
CKS_AVX2_FN void vaddto(double* p, __m256d v) { _mm256_storeu_pd(p, _mm256_add_pd(vload(p), v)); }
// 8 floats rounded to bfloat16 bits as float_to_bf16 does (dtypes.h): to
// nearest even in integer arithmetic, a NaN quieted (its top 16 bits with
// the quiet bit set). convert.h's arrays and RoundC's tiles use it.
CKS_AVX2_FN __m128i vround_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i magnitude = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  const __m256i w = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
  // Each 128-bit lane packs its 4 words twice; keep the low 64 bits of each.
  const __m256i p = _mm256_packus_epi32(w, w);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08));
}
// One reduction index of an MR x NV ymm tile: acc[i] += r[i][o] * b[0 : NV W].
template <int MR, int NV, typename T, typename V>
CKS_AVX2_FN void avx2_step(const T* const* r, int64_t o, const T* b, V (&acc)[MR][NV]) {
  constexpr int W = 32 / sizeof(T);
  V bv[NV];
  for (int v = 0; v < NV; ++v) bv[v] = vload(b + v * W);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    const V ai = vbcast(r[i] + o);
    for (int v = 0; v < NV; ++v) acc[i][v] = vfma(ai, bv[v], acc[i][v]);
  }
}

// Columns [jr, jr + NV W) of a block: MR x NV ymm tiles. NV = 2 is a whole
// panel (12 accumulators + 2 B vectors + 1 broadcast = 15 of 16 ymm
// registers, no spills, checked with objdump); NV = 1 a last panel with at
// most W live columns (21 classes: 16 + 5), at half the FMAs.
template <int NV, typename T, typename ASrc, typename BSrc, typename CDst>
__attribute__((target("avx2,fma"))) void panel_avx2(int64_t mc, int64_t jr, int64_t kc,
                                                    const ASrc& A, const BSrc& B,
                                                    const CDst& C) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR, W = 32 / sizeof(T);
  static_assert(NR == 2 * W, "a panel is 2 ymm");
  constexpr bool kOut = kOutDst<CDst, T>;
  using V = decltype(vload(static_cast<const T*>(nullptr)));
  for (int64_t ir = 0; ir < mc; ir += MR) {
    V acc[MR][NV];
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = V{};
    const T* rb[MR];
    A.rows(ir, rb);
    opaque<MR>(rb);
    auto cur = A.begin();
    auto bcur = B.begin();
    for (int64_t p = 0; p < kc;) {
      const T* bq;
      int64_t o0;
      const int64_t n = A.segment(cur, B.segment(bcur, kc - p, &bq), o0);
      const int64_t sa = A.step, sb = B.step;
      CKS_UNROLL_STEPS
      for (int64_t q = p, o = o0; q < p + n; ++q, o += sa, bq += sb)
        avx2_step(rb, a_at(A, q, o), b_at(B, q, bq), acc);
      B.advance(bcur, n);
      p += n;
    }
    if constexpr (std::is_same<CDst, RoundC>::value) {
      static_assert(std::is_same<T, float>::value, "bfloat16 from float32 sums");
      // The tile to t first (the edge tile's stores): rounded with every
      // accumulator live, GCC spilled them (test_codegen).
      T t[MR * NR];
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) vstore(t + i * NR + v * W, acc[i][v]);
      const int64_t mi = std::min<int64_t>(MR, C.mc - ir);
      const int64_t nj = std::min<int64_t>(NV * W, C.nc - jr);
      for (int64_t i = 0; i < mi; ++i) {
        uint16_t* c = C.base + C.rows[ir + i] + jr;
        uint16_t r[NR];
        uint16_t* d = nj == NV * W ? c : r;  // whole rows in place, else via r
        for (int v = 0; v < NV; ++v)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + v * W),
                           vround_bf16(vload(t + i * NR + v * W)));
        if (d == r) std::memcpy(c, r, nj * sizeof(uint16_t));  // the columns that exist
      }
    } else if constexpr (kOut) {
      if (ir + MR <= C.mc && jr + NV * W <= C.nc) {
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i) {
          T* c = C.at(ir + i, jr);  // NV W <= NR: one panel
          for (int v = 0; v < NV; ++v) {
            if (C.add) vaddto(c + v * W, acc[i][v]);
            else if (C.stream) vstream(c + v * W, acc[i][v]);
            else vstore(c + v * W, acc[i][v]);
          }
        }
      } else {  // store_edge reads no more than the NV W live columns
        T t[MR * NR];
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i)
          for (int v = 0; v < NV; ++v) vstore(t + i * NR + v * W, acc[i][v]);
        store_edge(C, ir, jr, t);
      }
    } else {
      T* c = C.C + ir * C.ldc + jr;
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) vaddto(c + i * C.ldc + v * W, acc[i][v]);
    }
  }
}

// A block of nc columns (a multiple of NR), of which the first `live` are
// kept: panel by panel, the last at half width where it can be.
template <typename T, typename ASrc, typename BSrc, typename CDst>
inline void macro_kernel_avx2(int64_t mc, int64_t nc, int64_t live, int64_t kc, const ASrc& A,
                              const BSrc& B, const CDst& C) {
  constexpr int NR = Tile<T>::NR;
  for (int64_t jr = 0; jr < nc; jr += NR) {
    if (live - jr <= NR / 2) panel_avx2<1, T>(mc, jr, kc, A, B.cols(jr), C);
    else panel_avx2<2, T>(mc, jr, kc, A, B.cols(jr), C);
  }
}
#undef CKS_AVX2_FN

// AVX-512 (Zen 4/5, Xeon): NR lanes = one zmm, so P adjacent B panels form a
// 6 x P NR tile of 6 P zmm accumulators; packing unchanged. Same per-element
// order -> identical bits.
#define CKS_Z512_FN __attribute__((target("avx512f,avx2,fma"), always_inline)) inline
CKS_Z512_FN __m512 zload(const float* p) { return _mm512_loadu_ps(p); }
CKS_Z512_FN __m512d zload(const double* p) { return _mm512_loadu_pd(p); }
CKS_Z512_FN __m512 zbcast(const float* p) { return _mm512_set1_ps(*p); }
CKS_Z512_FN __m512d zbcast(const double* p) { return _mm512_set1_pd(*p); }
CKS_Z512_FN __m512 zfma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
CKS_Z512_FN __m512d zfma(__m512d a, __m512d b, __m512d c) { return _mm512_fmadd_pd(a, b, c); }
CKS_Z512_FN void zstore(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
CKS_Z512_FN void zstore(double* p, __m512d v) { _mm512_storeu_pd(p, v); }
CKS_Z512_FN void zstream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
CKS_Z512_FN void zstream(double* p, __m512d v) { _mm512_stream_pd(p, v); }
CKS_Z512_FN void zaddto(float* p, __m512 v) { _mm512_storeu_ps(p, _mm512_add_ps(zload(p), v)); }
CKS_Z512_FN void zaddto(double* p, __m512d v) { _mm512_storeu_pd(p, _mm512_add_pd(zload(p), v)); }
// The low ymm of a zmm (GCC 12's cast intrinsics trip -Wmaybe-uninitialized).
CKS_Z512_FN __m256 zlow(__m512 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
CKS_Z512_FN __m256d zlow(__m512d v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3); }
CKS_Z512_FN __m512 zadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
CKS_Z512_FN __m512d zadd(__m512d a, __m512d b) { return _mm512_add_pd(a, b); }
// One reduction index of an MR x P zmm tile over P adjacent B panels, ldb
// apart, and with H = 1 the first half (one ymm) of the next panel:
// acc[i][p] += r[i][o] * b[p * ldb : p * ldb + NR], hacc[i] likewise.
template <int MR, int P, int H, typename T, typename V, typename VH>
CKS_Z512_FN void avx512_step(const T* const* r, int64_t o, const T* b, int64_t ldb,
                             V (&acc)[MR][P > 0 ? P : 1], VH (&hacc)[MR]) {
  V bv[P > 0 ? P : 1];
  VH bh{};
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) bv[p] = zload(b + p * ldb);
  if constexpr (H > 0) bh = vload(b + P * ldb);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    if constexpr (P == 0) {
      hacc[i] = vfma(vbcast(r[i] + o), bh, hacc[i]);
    } else {
      const V ai = zbcast(r[i] + o);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) acc[i][p] = zfma(ai, bv[p], acc[i][p]);
      if constexpr (H > 0) hacc[i] = vfma(zlow(ai), bh, hacc[i]);
    }
  }
}

// Columns [jr, jr + P NR + H NR / 2) of a block, rows [ir0, mc): MR x P zmm
// tiles (plus MR ymm for a half panel), B the source of those columns
// (cols(jr) of the block's). P = 4 (6 x 64 floats: 24 accumulators + 4 B
// vectors + 1 broadcast of 32 zmm, no spills, checked with objdump) broadcasts each A
// element once per 64 columns instead of per 32: in process on Zen 4,
// against the 6 x 2 zmm tile, 64-feature forwards (3x3, dilated, k4 s2 and
// k2 s2 transposed) took 0.94-0.98x the time, wider layers and gradients
// 0.96-1.0x. P = 1 serves blocks of one panel, which the AVX2 kernel would
// run with twice the FMAs and loads. H = 1 serves a last panel with at most
// NR / 2 live columns (21 classes of a segmentation head: 16 + 5) at half
// the FMAs of a whole one. Writes a BufC, or an OutC (masked to the rows
// and columns that exist; whole tiles streamed where it asks). Rows from ir0
// on in tiles of RT x 6 (RT = 2: panels, below), while a whole tile fits
// before mc.
template <int P, int H, int RT, typename T, typename ASrc, typename BSrc, typename CDst>
__attribute__((target("avx512f,avx2,fma"))) void panels_avx512(int64_t ir0, int64_t mc,
                                                               int64_t jr, int64_t kc,
                                                               const ASrc& A, const BSrc& B,
                                                               const CDst& C) {
  constexpr int MR = Tile<T>::MR * RT, NR = Tile<T>::NR, HW = NR / 2;
  static_assert(NR * sizeof(T) == 64, "one B panel row = one zmm");
  constexpr bool kOut = kOutDst<CDst, T>;
  using V = decltype(zload(static_cast<const T*>(nullptr)));
  using VH = decltype(vload(static_cast<const T*>(nullptr)));
  constexpr int kWidth = P * NR + H * HW;
  for (int64_t ir = ir0; ir + MR <= mc; ir += MR) {
    V acc[MR][P > 0 ? P : 1];
    VH hacc[MR];
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) acc[i][p] = V{};
      hacc[i] = VH{};
    }
    const T* rb[MR];
#pragma GCC unroll 2
    for (int t = 0; t < RT; ++t) A.rows(ir + t * Tile<T>::MR, rb + t * Tile<T>::MR);
    opaque<MR>(rb);
    auto cur = A.begin();
    auto bcur = B.begin();
    for (int64_t p = 0; p < kc;) {
      const T* bq;
      int64_t o0;
      const int64_t n = A.segment(cur, B.segment(bcur, kc - p, &bq), o0);
      const int64_t sa = A.step, sb = B.step;
      if constexpr (kChannelRuns<ASrc>) {
        CKS_ROLLED_STEPS
        for (int64_t q = p, o = o0; q < p + n; ++q, o += sa, bq += sb)
          avx512_step<MR, P, H>(rb, a_at(A, q, o), b_at(B, q, bq), B.ldb, acc, hacc);
      } else {
        CKS_UNROLL_STEPS
        for (int64_t q = p, o = o0; q < p + n; ++q, o += sa, bq += sb)
          avx512_step<MR, P, H>(rb, a_at(A, q, o), b_at(B, q, bq), B.ldb, acc, hacc);
      }
      B.advance(bcur, n);
      p += n;
    }
    if constexpr (kOut) {
      if (ir + MR <= C.mc && jr + kWidth <= C.nc) {
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
          T* c = C.base + C.rows[ir + i] + jr;
#pragma GCC unroll 4
          for (int p = 0; p < P; ++p) {
            T* cp = c + p * NR;
            if constexpr (!std::is_same<CDst, OutC<T>>::value) cp = C.at(ir + i, jr + p * NR);
            if (C.add) zaddto(cp, acc[i][p]);
            else if (C.stream) zstream(cp, acc[i][p]);
            else zstore(cp, acc[i][p]);
          }
          if constexpr (H > 0) {
            T* cp = c + P * NR;
            if constexpr (!std::is_same<CDst, OutC<T>>::value) cp = C.at(ir + i, jr + P * NR);
            if (C.add) vaddto(cp, hacc[i]);
            else if (C.stream) vstream(cp, hacc[i]);
            else vstore(cp, hacc[i]);
          }
        }
      } else {
        // The whole tile to t, then one store_edge. Every index into acc must
        // be a constant once unrolled, or GCC keeps the tile in memory: a
        // rolled loop of store_edge calls per panel here had the 6 x 64 tile
        // stored and reloaded at every segment of a RunA (each 64-channel
        // run); without it, 64-channel forwards took 0.93-0.98x the time.
        // objdump: no zmm stack traffic but the stores to t.
        T t[MR * kWidth];
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
          for (int p = 0; p < P; ++p) zstore(t + i * kWidth + p * NR, acc[i][p]);
          if constexpr (H > 0) vstore(t + i * kWidth + P * NR, hacc[i]);
        }
        store_edge<T, kWidth, MR>(C, ir, jr, t);
      }
    } else {
      T* c = C.C + ir * C.ldc + jr;
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) zaddto(c + i * C.ldc + p * NR, acc[i][p]);
        if constexpr (H > 0) vaddto(c + i * C.ldc + P * NR, hacc[i]);
      }
    }
  }
}

// Tiles of at most two panels (6 x 32 floats and narrower) run 12 rows at a
// time where the block's B is packed (PanelB): 6 rows are 6 (or 12) chains
// of dependent FMAs, fewer than the FMA latency times the FMA ports hides,
// and each B row is loaded for 12 rows' FMAs instead of 6. On the Xeon VM
// (AVX-512, 2 cores; medians of 4 runs, builds alternating), 6 rows -> 12:
// the k8 s4 head's forward (21 features) 5.44-6.39 -> 5.10-5.34 ms, the 3-D
// atrous forward and input gradient (32) 1.28-1.49 -> 1.16-1.31, V-Net's
// (32) 0.90-1.06 -> 0.81-0.96, the grouped transposed layer's (16 and 32 per
// group) 1.13-1.54 -> 1.11-1.46; in L1 alone (one core) a 6 x 16 tile ran at
// 143 GFLOP/s, 12 x 16 at 164, 6 x 64 at 185 (the FMA peak: 221).
// A 12-row tile keeps 12 row pointers in registers, which is all but every
// general register: GCC's innermost loops read 0.18-0.71 stack operands per
// FMA in the 12-row tiles from TableB or RunB (more pointers and steps),
// into a PanelOutC, and in the half-panel one (P = 0); clang 22's 0.2-2.7 in
// nearly all (test_codegen). Those, clang builds and Zen 4 (tall_tiles) keep
// 6 rows. Each element is summed in the same order either way.
#if defined(__clang__)
constexpr bool kTallTiles = false;
#else
constexpr bool kTallTiles = true;
#endif
inline bool tall_tiles();  // below, with the CPU features
template <int P, int H, typename T, typename ASrc, typename BSrc, typename CDst>
inline void panels(int64_t mc, int64_t jr, int64_t kc, const ASrc& A, const BSrc& B,
                   const CDst& C) {
  constexpr int MR = Tile<T>::MR;
  if constexpr (kTallTiles && P >= 1 && P <= 2 && std::is_same<BSrc, PanelB<T>>::value &&
                !std::is_same<CDst, PanelOutC<T>>::value) {
    if (tall_tiles()) {
      panels_avx512<P, H, 2, T>(0, mc, jr, kc, A, B, C);
      if (mc % (2 * MR)) panels_avx512<P, H, 1, T>(mc - MR, mc, jr, kc, A, B, C);
    } else {
      panels_avx512<P, H, 1, T>(0, mc, jr, kc, A, B, C);
    }
  } else {
    panels_avx512<P, H, 1, T>(0, mc, jr, kc, A, B, C);
  }
}
// A block of nc columns (a multiple of NR), of which the first `live` are
// kept: 4-panel column tiles, then what is left in tiles of 2 panels, 1 1/2,
// 1 or 1/2, so that a last panel with at most NR / 2 live columns costs half.
template <typename T, typename ASrc, typename BSrc, typename CDst>
inline void macro_kernel_avx512(int64_t mc, int64_t nc, int64_t live, int64_t kc,
                                const ASrc& A, const BSrc& B, const CDst& C) {
  constexpr int NR = Tile<T>::NR, HW = NR / 2;
  int64_t jr = 0;
  // Into the output (writes_in_place), no 4-panel tile past the live columns:
  // its edge would go through store_edge.
  const int64_t wide = kOutDst<CDst, T> ? live : nc;
  for (; jr + 4 * NR <= wide; jr += 4 * NR) panels<4, 0, T>(mc, jr, kc, A, B.cols(jr), C);
  if (live - jr > 2 * NR) {
    panels<2, 0, T>(mc, jr, kc, A, B.cols(jr), C);
    jr += 2 * NR;
  }
  const int64_t left = live - jr;
  const BSrc b = B.cols(jr);
  if (left > NR + HW) panels<2, 0, T>(mc, jr, kc, A, b, C);
  else if (left > NR) panels<1, 1, T>(mc, jr, kc, A, b, C);
  else if (left > HW) panels<1, 0, T>(mc, jr, kc, A, b, C);
  else if (left > 0) panels<0, 1, T>(mc, jr, kc, A, b, C);
}
// n floats to a 64-byte aligned dst (n a multiple of 16) with non-temporal
// stores, which skip reading the destination lines first; fence before the
// data is handed to another thread.
__attribute__((target("avx512f"))) inline void stream_copy(float* dst, const float* src,
                                                          int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
}
// dst[c * ldd + j] = src[j * lds + c] for j, c < 16: a 16 x 16 block
// transposed in registers. pack_phase_b's panels, where the kernel's output
// features are its outer dimension (input gradients of channels-last
// convolutions), were one scalar store per element: 10 % of the profile of
// the DCGAN step's 4->8 input gradient (batch 16, 256 -> 128 channels, 2
// cores). Rows are interleaved by 32 then 64 bits within 128-bit lanes
// (u[4 q + k], lane L: column 4 L + k, rows 4 q .. 4 q + 3), then the lanes
// of u[k], u[4 + k], u[8 + k], u[12 + k] are transposed as a 4 x 4 matrix
// of 128-bit blocks.
__attribute__((target("avx512f"))) inline void transpose16(const float* src, int64_t lds,
                                                          float* dst, int64_t ldd) {
  constexpr __mmask16 all = 0xffff;  // zero-masked forms: see round_bf16
  __m512 r[16], t[16], u[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(src + j * lds);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_maskz_unpacklo_ps(all, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_maskz_unpackhi_ps(all, r[2 * i], r[2 * i + 1]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * q + 2]), d = _mm512_castps_pd(t[4 * q + 3]);
    u[4 * q] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xff, a, c));
    u[4 * q + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xff, a, c));
    u[4 * q + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xff, b, d));
    u[4 * q + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xff, b, d));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 v0 = _mm512_maskz_shuffle_f32x4(all, u[k], u[4 + k], 0x44);  // lanes 0, 1 of each
    const __m512 v1 = _mm512_maskz_shuffle_f32x4(all, u[k], u[4 + k], 0xee);  // lanes 2, 3
    const __m512 v2 = _mm512_maskz_shuffle_f32x4(all, u[8 + k], u[12 + k], 0x44);
    const __m512 v3 = _mm512_maskz_shuffle_f32x4(all, u[8 + k], u[12 + k], 0xee);
    _mm512_storeu_ps(dst + k * ldd, _mm512_maskz_shuffle_f32x4(all, v0, v2, 0x88));
    _mm512_storeu_ps(dst + (4 + k) * ldd, _mm512_maskz_shuffle_f32x4(all, v0, v2, 0xdd));
    _mm512_storeu_ps(dst + (8 + k) * ldd, _mm512_maskz_shuffle_f32x4(all, v1, v3, 0x88));
    _mm512_storeu_ps(dst + (12 + k) * ldd, _mm512_maskz_shuffle_f32x4(all, v1, v3, 0xdd));
  }
}
#undef CKS_Z512_FN

// ---------------------------------------------------------------- bfloat16 pairs
// bfloat16 operands on AVX512_BF16 (Zen 4, Sapphire Rapids): vdpbf16ps
// multiplies 16 pairs of bfloat16 and adds both products of each pair to a
// float32 lane, twice the multiply-adds of an FMA per instruction (Zen 4, one
// core, a 6 x 64 tile in L1: 195-209 against 97-106 GFLOP/s). A pair of
// reduction indices (k, k + 1), k even, is one 32-bit element: A's (two
// adjacent channels, read in place) is broadcast, B's is packed as pair
// panels [kc / 2][NR][2] (ldb elements between panels): the phase B
// (conv_cpu.cc, Bf16Pairs) or a block packed by the task (Bf16PackedPairs).
//
// A sources of the pair kernel, walked as the float ones are (segments);
// `step` elements from one pair of a row to the next. PairRunA: A read in
// place as runs of an even number of contiguous channels (a forward's);
// PairPackedA: A packed as pairs, [kc / 2][ld][2] (a filter gradient's,
// whose successive reduction indices are not adjacent in memory).
struct PairRunA {
  const uint16_t* base;
  const int64_t* rows_;   // mc entries, all valid offsets
  const int64_t* starts;  // offset of each run's first index
  int64_t len, run0, q0;  // even run length; the block's first index (q0 even)
  static constexpr int64_t step = 2;
  struct Cursor {
    int64_t run, q;
  };
  Cursor begin() const { return {run0, q0}; }
  template <int MR>
  void rows(int64_t ir, const uint16_t** rb) const {
    for (int i = 0; i < MR; ++i) rb[i] = scalar(base + rows_[ir + i]);
  }
  // o: the offset of the cursor's pair from each row's base; returns the
  // segment's length (the rest of a run, at most left) and moves the cursor
  // past it.
  int64_t segment(Cursor& c, int64_t left, int64_t& o) const {
    const int64_t n = std::min(len - c.q, left);
    o = starts[c.run] + c.q;
    c.q += n;
    if (c.q == len) c = {c.run + 1, 0};
    return n;
  }
};
struct PairPackedA {
  const uint16_t* Ap;
  int64_t ld;  // rows per pair (the block's padded rows)
  int64_t step;  // 2 ld
  struct Cursor {};
  Cursor begin() const { return {}; }
  template <int MR>
  void rows(int64_t ir, const uint16_t** rb) const {
    for (int i = 0; i < MR; ++i) rb[i] = scalar(Ap + 2 * (ir + i));
  }
  int64_t segment(Cursor&, int64_t left, int64_t& o) const {
    o = 0;
    return left;  // one segment: the whole block
  }
};
constexpr int kPairNR = 16;  // float32 lanes of a zmm: columns per panel

#define CKS_BF16_TARGET "avx512f,avx512bf16,avx512bw,avx512vl,avx2,fma"
// One pair of reduction indices of an MR x P zmm tile: acc[i][p] +=
// r[i][o, o + 1] . b[p * ldb : p * ldb + 2 NR] (lane j: both products of
// column j's pair).
template <int MR, int P>
__attribute__((target(CKS_BF16_TARGET), always_inline)) inline void pair_step(
    const uint16_t* const* r, int64_t o, const uint16_t* b, int64_t ldb, __m512 (&acc)[MR][P]) {
  __m512bh bv[P];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) bv[p] = (__m512bh)_mm512_loadu_si512(b + p * ldb);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    int32_t pair;
    std::memcpy(&pair, r[i] + o, sizeof(pair));
    const __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) acc[i][p] = _mm512_dpbf16_ps(acc[i][p], ai, bv[p]);
  }
}

// 16 floats rounded to bfloat16 as float_to_bf16 does (to nearest even,
// NaN quieted), as 16 bits each. (Zero-masked forms: GCC 12's unmasked ones
// trip -Wmaybe-uninitialized on an undefined vector.)
// AVX-512F only, so that the depthwise kernel (without AVX512_BF16) inlines it.
__attribute__((target("avx512f"), always_inline)) inline __m256i round_bf16(__m512 v) {
  constexpr __mmask16 all = 0xffff;
  const __m512i u = _mm512_castps_si512(v), hi = _mm512_maskz_srli_epi32(all, u, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                        _mm512_and_si512(hi, _mm512_set1_epi32(1)));
  __m512i r = _mm512_maskz_srli_epi32(all, _mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                            _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_maskz_cvtepi32_epi16(all, r);
}
// The first n (<= 16) columns of v to p, rounded to To.
__attribute__((target(CKS_BF16_TARGET), always_inline)) inline void store_cols(uint16_t* p,
                                                                              __m512 v, int64_t n) {
  if (n >= kPairNR) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf16(v));
  else _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), round_bf16(v));
}
__attribute__((target(CKS_BF16_TARGET), always_inline)) inline void store_cols(float* p, __m512 v,
                                                                              int64_t n) {
  if (n >= kPairNR) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
}

// Columns [jr, jr + P NR) of a block, rows [0, mc) (a multiple of MR):
// A[:, block] * B to C, B's first panel at b. P = 4: 24 accumulators + 4 B
// vectors + 1 broadcast of 32 zmm.
template <int P, typename To, typename ASrc>
__attribute__((target(CKS_BF16_TARGET))) void pairs_avx512(int64_t mc, int64_t jr, int64_t kc,
                                                          const ASrc& A, const uint16_t* b,
                                                          int64_t ldb, const PairC<To>& C) {
  constexpr int MR = Tile<float>::MR;
  const bool to_out = C.last && C.out != nullptr;
  for (int64_t ir = 0; ir < mc; ir += MR) {
    __m512 acc[MR][P];
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) acc[i][p] = _mm512_setzero_ps();
    const uint16_t* rb[MR];
    A.template rows<MR>(ir, rb);
    opaque<MR>(rb);
    auto cur = A.begin();
    const uint16_t* bq = b;
    for (int64_t p = 0; p < kc;) {
      int64_t o;
      const int64_t n = A.segment(cur, kc - p, o);
      const int64_t sa = A.step;
      CKS_UNROLL_STEPS
      for (int64_t e = 0; e < n; e += 2, o += sa, bq += 2 * kPairNR)
        pair_step<MR, P>(rb, o, bq, ldb, acc);
      p += n;
    }
    float* c = C.buf + ir * C.ldc + jr;
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      if (!C.first) {
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p)
          acc[i][p] = _mm512_add_ps(acc[i][p], _mm512_loadu_ps(c + i * C.ldc + p * kPairNR));
      }
      if (!to_out) {
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) _mm512_storeu_ps(c + i * C.ldc + p * kPairNR, acc[i][p]);
      } else if (ir + i < C.mc) {
        To* o = C.out + C.rows[ir + i] + jr;
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
          const int64_t live = C.nc - jr - p * kPairNR;  // columns of panel p in the output
          if (live > 0) store_cols(o + p * kPairNR, acc[i][p], live);
        }
      }
    }
  }
}

// Packing pairs: dst[2 i] = a[i], dst[2 i + 1] = b[i] for i < n <= 32 (b
// null: zeros), 2 n elements written: two rows of a reduction index pair
// side by side, 32 at a time.
__attribute__((target(CKS_BF16_TARGET))) inline void interleave_pairs(const uint16_t* a,
                                                                     const uint16_t* b,
                                                                     int64_t n, uint16_t* dst) {
  const __mmask32 in = n >= 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
  const __m512i va = _mm512_maskz_loadu_epi16(in, a);
  const __m512i vb = b != nullptr ? _mm512_maskz_loadu_epi16(in, b) : _mm512_setzero_si512();
  alignas(64) static constexpr uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                   37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                   11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo_idx = _mm512_load_si512(kLo);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  const int64_t m = 2 * n;  // elements out
  const __mmask32 first = m >= 32 ? ~__mmask32{0} : (__mmask32{1} << m) - 1;
  _mm512_mask_storeu_epi16(dst, first, _mm512_permutex2var_epi16(va, lo_idx, vb));
  if (m > 32) {
    const __mmask32 second = m >= 64 ? ~__mmask32{0} : (__mmask32{1} << (m - 32)) - 1;
    _mm512_mask_storeu_epi16(dst + 32, second, _mm512_permutex2var_epi16(va, hi_idx, vb));
  }
}

// A pair of rows of n columns (b null: zeros) as pair panels of kPairNR
// columns: panel j's pairs at dst[j * ldp + i], i < 2 kPairNR; columns past n
// zero.
// One call per pair of reduction indices (B of the packed pairs path: a
// filter gradient's cotangent rows), 32 columns (two panels) a step, where
// one interleave_pairs call per panel and a fill of its tail took several
// times longer.
__attribute__((target(CKS_BF16_TARGET))) inline void interleave_pair_panels(
    const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* dst, int64_t ldp) {
  alignas(64) static constexpr uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                   37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                   11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  static_assert(kPairNR == 16, "two panels of 16 columns per 32 loaded");
  const __m512i lo_idx = _mm512_load_si512(kLo);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  for (int64_t c = 0, j = 0; c < n; c += 32, j += 2) {
    const int64_t m = n - c;
    const __mmask32 in = m >= 32 ? ~__mmask32{0} : (__mmask32{1} << m) - 1;
    const __m512i va = _mm512_maskz_loadu_epi16(in, a + c);
    const __m512i vb =
        b != nullptr ? _mm512_maskz_loadu_epi16(in, b + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + j * ldp, _mm512_permutex2var_epi16(va, lo_idx, vb));
    if (m > 16)
      _mm512_storeu_si512(dst + (j + 1) * ldp, _mm512_permutex2var_epi16(va, hi_idx, vb));
  }
}

// ---------------------------------------------------------------- AMX
// Intel AMX (Sapphire Rapids and later): tdpbf16ps multiplies a 16 x 32
// bfloat16 A tile by a 32 x 16 B tile held as 16 rows of pairs, into a
// 16 x 16 float32 tile: 512 multiply-adds an instruction. B's pair panels
// [kc / 2][16][2] are that layout already, so B tiles are read in place, 32
// reduction indices (1 KB) of a panel at a time. A's 16-row tiles are read
// in place where they can be (amx_block), else copied per block into rows of
// kc32 (kc rounded up to 32, zeros past kc; zero rows past mc). C tiles are
// loaded from and stored to the float32 block (or a stack copy where a tile
// passes the block's rows, or goes to the output). One core of the Xeon VM
// (2026-12-04): 2x2 tiles on 64 KB of operands in L1, 3.0 TFLOP/s; the same
// loop over a block's 100-200 KB (L2), 0.7-1.6; in a convolution about 0.6
// (the bench's atrous 64 d2 forward: 1.24 TFLOP/s on 2 cores, PyTorch's
// oneDNN 2.47): what is left is L2 bandwidth and the blocks' C round trips,
// not the instruction. vdpbf16ps tiles: 0.12 on the same block. Linux hands the tile state out
// per process on request (arch_prctl; cpu_features asks).
#define CKS_AMX_TARGET "amx-tile,amx-bf16," CKS_BF16_TARGET
constexpr int kAmxRows = 16;  // rows of an A and C tile
constexpr int kAmxK = 32;     // reduction indices of an A tile (64 bytes a row)

struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (2 x 2), 4-5: A, 6-7: B; all 16 rows of 64 bytes.
__attribute__((target(CKS_AMX_TARGET))) inline void amx_configure() {
  AmxConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = kAmxRows;
  _tile_loadconfig(&cfg);
}

// Where an A tile's 16 rows are read, chunk by chunk: chunk q of the block
// (reduction indices [32 q, 32 q + 32)) at p + off[q], rows stride bytes
// apart: in place (the rows' runs, evenly spaced) or in the packed copy.
struct AmxA {
  const uint16_t* p;
  const int64_t* off;
  int64_t stride;
};

// RT x CT C tiles at c (row stride ldc floats), plus A (RT tiles a[0..RT))
// times B (CT panels from b, ldb apart; the 32-index chunks past `full` from
// tail, 16 pair rows a panel): zero (first) or loaded C, then stored back.
template <int RT, int CT>
__attribute__((target(CKS_AMX_TARGET))) inline void amx_tiles(const AmxA* a, int64_t chunks,
                                                              int64_t full, const uint16_t* b,
                                                              int64_t ldb, const uint16_t* tail,
                                                              float* c, int64_t ldc, bool first) {
  const int64_t sc = ldc * 4;
  constexpr int64_t kPanel = kAmxK * kPairNR;  // elements of a panel chunk: 1 KB
  if (first) {
    _tile_zero(0);
    if (CT > 1) _tile_zero(1);
    if (RT > 1) _tile_zero(2);
    if (RT > 1 && CT > 1) _tile_zero(3);
  } else {
    _tile_loadd(0, c, sc);
    if (CT > 1) _tile_loadd(1, c + kPairNR, sc);
    if (RT > 1) _tile_loadd(2, c + kAmxRows * ldc, sc);
    if (RT > 1 && CT > 1) _tile_loadd(3, c + kAmxRows * ldc + kPairNR, sc);
  }
  const AmxA a0 = a[0], a1 = a[RT - 1];
  for (int64_t q = 0; q < chunks; ++q) {
    const uint16_t* b0 = q < full ? b + q * kPanel : tail;
    const int64_t lb = q < full ? ldb : kPanel;
    _tile_loadd(4, a0.p + a0.off[q], a0.stride);
    _tile_loadd(6, b0, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (CT > 1) {
      _tile_loadd(7, b0 + lb, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (RT > 1) {
      _tile_loadd(5, a1.p + a1.off[q], a1.stride);
      _tile_dpbf16ps(2, 5, 6);
      if (CT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if (CT > 1) _tile_stored(1, c + kPairNR, sc);
  if (RT > 1) _tile_stored(2, c + kAmxRows * ldc, sc);
  if (RT > 1 && CT > 1) _tile_stored(3, c + kAmxRows * ldc + kPairNR, sc);
}

// 16 x 16 32-bit elements: row i of dst (ldd apart) = column i of src (rows
// lds apart; rows past `rows` and columns past `cols` read as zeros).
__attribute__((target(CKS_BF16_TARGET))) inline void transpose16_epi32(const uint32_t* src,
                                                                      int64_t lds, int64_t rows,
                                                                      int64_t cols, uint32_t* dst,
                                                                      int64_t ldd) {
  const __mmask16 live = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
  // Zero-masked forms: GCC 12's unmasked ones trip -Wmaybe-uninitialized.
  constexpr __mmask16 all16 = 0xffff;
  constexpr __mmask8 all8 = 0xff;
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_maskz_loadu_epi32(live, src + i * lds) : _mm512_setzero_si512();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_epi32(all16, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_epi32(all16, r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_maskz_unpacklo_epi64(all8, t[i], t[i + 2]);
    r[i + 1] = _mm512_maskz_unpackhi_epi64(all8, t[i], t[i + 2]);
    r[i + 2] = _mm512_maskz_unpacklo_epi64(all8, t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_maskz_unpackhi_epi64(all8, t[i + 1], t[i + 3]);
  }
  // r[4 g + j] holds, per 128-bit lane l, rows 4 g..4 g + 3 of column 4 l + j.
  for (int g = 0; g < 4; g += 2)
    for (int j = 0; j < 4; ++j) {
      t[4 * g + j] = _mm512_maskz_shuffle_i32x4(all16, r[4 * g + j], r[4 * g + 4 + j], 0x88);
      t[4 * g + 4 + j] = _mm512_maskz_shuffle_i32x4(all16, r[4 * g + j], r[4 * g + 4 + j], 0xdd);
    }
  for (int j = 0; j < 4; ++j) {
    // t[j], t[4 + j], t[8 + j], t[12 + j]: columns j, 4 + j, 8 + j, 12 + j in pairs of lanes
    const __m512i lo0 = _mm512_maskz_shuffle_i32x4(all16, t[j], t[8 + j], 0x88);
    const __m512i hi0 = _mm512_maskz_shuffle_i32x4(all16, t[j], t[8 + j], 0xdd);
    const __m512i lo1 = _mm512_maskz_shuffle_i32x4(all16, t[4 + j], t[12 + j], 0x88);
    const __m512i hi1 = _mm512_maskz_shuffle_i32x4(all16, t[4 + j], t[12 + j], 0xdd);
    _mm512_storeu_si512(dst + j * ldd, lo0);
    _mm512_storeu_si512(dst + (8 + j) * ldd, hi0);
    _mm512_storeu_si512(dst + (4 + j) * ldd, lo1);
    _mm512_storeu_si512(dst + (12 + j) * ldd, hi1);
  }
}

// The 16-row tiles of a block's A that amx_block cannot read in place, as
// tiles read them: rows [r0, r0 + 16) to dst (row r at (r - r0) * lda, zeros
// past kc and from row mc on). segs: the block's segments (the same for
// every row). PairPackedA's pairs ([kc / 2][ld][2]) are transposed 16 x 16
// at a time; PairRunA's runs copied.
struct AmxSeg {
  int64_t p, o, n;  // reduction index, offset from the row's base, length
};
template <typename ASrc>
__attribute__((target(CKS_BF16_TARGET))) inline void amx_pack_tile(
    int64_t r0, int64_t mc, int64_t kc, const ASrc& A, const std::vector<AmxSeg>& segs,
    int64_t lda, uint16_t* dst) {
  if constexpr (std::is_same<ASrc, PairPackedA>::value) {
    const int64_t kp = kc / 2, ld = A.ld;
    const uint32_t* src = reinterpret_cast<const uint32_t*>(A.Ap);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for (int64_t p0 = 0; p0 < lda / 2; p0 += 16)
      transpose16_epi32(src + p0 * ld + r0, ld, kp - p0, std::min<int64_t>(16, mc - r0),
                        d + p0, lda / 2);
  } else {
    static_assert(ASrc::step == 2, "a run source: each segment's elements contiguous");
    for (int64_t r = r0; r < r0 + kAmxRows; ++r) {
      uint16_t* d = dst + (r - r0) * lda;
      if (r >= mc) {
        std::memset(d, 0, lda * sizeof(uint16_t));
        continue;
      }
      const uint16_t* base;
      A.template rows<1>(r, &base);
      for (const AmxSeg& s : segs) std::memcpy(d + s.p, base + s.o, s.n * sizeof(uint16_t));
      std::memset(d + kc, 0, (lda - kc) * sizeof(uint16_t));
    }
  }
}

// pairs_block on AMX: the same contract (C, rows [0, mc), nc_pad columns,
// even kc). A tile whose 16 rows are evenly spaced, where every 32-index
// chunk of the block lies in one run of contiguous elements, is read in
// place (a forward's interior rows); the others are packed first.
template <typename To, typename ASrc>
__attribute__((target(CKS_AMX_TARGET))) void amx_block(int64_t mc, int64_t nc_pad, int64_t kc,
                                                       const ASrc& A, const uint16_t* b,
                                                       int64_t ldb, const PairC<To>& C) {
  const int64_t lda = (kc + kAmxK - 1) / kAmxK * kAmxK;
  const int64_t mc16 = (mc + kAmxRows - 1) / kAmxRows * kAmxRows, tiles = mc16 / kAmxRows;
  const int64_t chunks = lda / kAmxK, full = kc / kAmxK, panels = nc_pad / kPairNR;
  // One thread_local, its address taken once: in a shared library each
  // access to one is a call (__tls_get_addr: 16 % of a filter gradient's
  // time with six of them here).
  struct Scratch {
    std::vector<uint16_t> Ap, tail;
    std::vector<AmxSeg> segs;
    std::vector<int64_t> run_off, packed_off;
    std::vector<AmxA> at;
  };
  thread_local Scratch scratch;
  Scratch& x = scratch;
  auto &Ap = x.Ap, &tail = x.tail;
  auto& segs = x.segs;
  auto &run_off = x.run_off, &packed_off = x.packed_off;
  auto& at = x.at;
  segs.clear();
  auto cur = A.begin();
  bool in_place = A.step == 2 && full == chunks;
  for (int64_t p = 0; p < kc;) {
    int64_t o;
    const int64_t n = A.segment(cur, kc - p, o);
    segs.push_back({p, o, n});
    in_place = in_place && p % kAmxK == 0 && n % kAmxK == 0;
    p += n;
  }
  packed_off.resize(chunks);
  for (int64_t q = 0; q < chunks; ++q) packed_off[q] = q * kAmxK;
  if (in_place) {
    run_off.resize(chunks);
    for (const AmxSeg& s : segs)
      for (int64_t e = 0; e < s.n; e += kAmxK) run_off[(s.p + e) / kAmxK] = s.o + e;
  }
  Ap.resize(mc16 * lda);
  at.resize(tiles);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * kAmxRows;
    if (in_place && r0 + kAmxRows <= mc) {
      const uint16_t* rp[kAmxRows];
      for (int i = 0; i < kAmxRows; ++i) A.template rows<1>(r0 + i, rp + i);
      const int64_t d = rp[1] - rp[0];
      bool even = true;
      for (int i = 2; i < kAmxRows; ++i) even = even && rp[i] - rp[i - 1] == d;
      if (even) {
        at[t] = {rp[0], run_off.data(), d * static_cast<int64_t>(sizeof(uint16_t))};
        continue;
      }
    }
    amx_pack_tile(r0, mc, kc, A, segs, lda, Ap.data() + r0 * lda);
    at[t] = {Ap.data() + r0 * lda, packed_off.data(), lda * static_cast<int64_t>(sizeof(uint16_t))};
  }
  if (full < chunks) {  // the last chunk's pair rows of each panel, zeros past kc
    tail.assign(panels * kAmxK * kPairNR, 0);
    const int64_t live = (kc - full * kAmxK) * kPairNR;
    for (int64_t j = 0; j < panels; ++j)
      std::memcpy(tail.data() + j * kAmxK * kPairNR, b + j * ldb + full * kAmxK * kPairNR,
                  live * sizeof(uint16_t));
  }
  const bool to_out = C.last && C.out != nullptr;
  alignas(64) float stage[2 * kAmxRows][2 * kPairNR];
  amx_configure();
  for (int64_t ir = 0; ir < mc16; ir += 2 * kAmxRows) {
    const bool two_rows = ir + kAmxRows < mc16;
    const int64_t rows = std::min<int64_t>(2 * kAmxRows, mc - ir);  // of the block
    // Straight into the block where every tile row is in it and stays there.
    const bool direct = !to_out && ir + (two_rows ? 2 : 1) * kAmxRows <= mc;
    const AmxA* a = at.data() + ir / kAmxRows;
    for (int64_t jr = 0; jr < nc_pad; jr += 2 * kPairNR) {
      const bool two_cols = jr + kPairNR < nc_pad;
      float* c = direct ? C.buf + ir * C.ldc + jr : &stage[0][0];
      const int64_t ldc = direct ? C.ldc : 2 * kPairNR;
      if (!direct && !C.first) {
        for (int64_t i = 0; i < 2 * kAmxRows; ++i)
          for (int64_t j = 0; j < 2 * kPairNR; ++j)
            stage[i][j] = i < rows && jr + j < nc_pad ? C.buf[(ir + i) * C.ldc + jr + j] : 0.0f;
      }
      const uint16_t* bj = b + jr / kPairNR * ldb;
      const uint16_t* tj = full < chunks ? tail.data() + jr / kPairNR * kAmxK * kPairNR : nullptr;
      if (two_rows && two_cols) amx_tiles<2, 2>(a, chunks, full, bj, ldb, tj, c, ldc, C.first);
      else if (two_rows) amx_tiles<2, 1>(a, chunks, full, bj, ldb, tj, c, ldc, C.first);
      else if (two_cols) amx_tiles<1, 2>(a, chunks, full, bj, ldb, tj, c, ldc, C.first);
      else amx_tiles<1, 1>(a, chunks, full, bj, ldb, tj, c, ldc, C.first);
      if (direct) continue;
      const int64_t width = std::min<int64_t>(2 * kPairNR, nc_pad - jr);
      for (int64_t i = 0; i < rows; ++i) {
        if (!to_out) {
          std::memcpy(C.buf + (ir + i) * C.ldc + jr, stage[i], width * sizeof(float));
        } else if (ir + i < C.mc) {
          To* o = C.out + C.rows[ir + i] + jr;
          for (int64_t p = 0; p < width / kPairNR; ++p) {
            const int64_t live = C.nc - jr - p * kPairNR;
            if (live > 0) store_cols(o + p * kPairNR, _mm512_load_ps(stage[i] + p * kPairNR), live);
          }
        }
      }
    }
  }
  _tile_release();
}

inline bool bf16_amx();

// A block of nc_pad columns (a multiple of NR, B's panels zero past the
// live ones), rows [0, mc) (a multiple of MR), reduction [0, kc) (even).
template <typename To, typename ASrc>
inline void pairs_block(int64_t mc, int64_t nc_pad, int64_t kc, const ASrc& A,
                        const uint16_t* b, int64_t ldb, const PairC<To>& C) {
  if (bf16_amx()) return amx_block(mc, nc_pad, kc, A, b, ldb, C);
  int64_t jr = 0;
  for (; jr + 4 * kPairNR <= nc_pad; jr += 4 * kPairNR)
    pairs_avx512<4>(mc, jr, kc, A, b + jr / kPairNR * ldb, ldb, C);
  for (; jr + 2 * kPairNR <= nc_pad; jr += 2 * kPairNR)
    pairs_avx512<2>(mc, jr, kc, A, b + jr / kPairNR * ldb, ldb, C);
  if (jr < nc_pad) pairs_avx512<1>(mc, jr, kc, A, b + jr / kPairNR * ldb, ldb, C);
}
#undef CKS_BF16_TARGET
#endif  // CKS_X86_AVX2

#ifdef CKS_X86_AVX2
// What the kernels need of the CPU, read from cpuid, and of the OS: that it
// saves the ymm (and zmm, k) registers, per xgetbv. Not __builtin_cpu_supports:
// that reads __cpu_model, which the toolchain's runtime must fill in, and
// zig's clang leaves it zero, so a build with it ran the portable kernel.
struct CpuFeatures {
  bool avx2_fma = false;     // AVX2 and FMA
  bool avx512f = false;      // and AVX-512F
  bool avx512bw_vl = false;  // and AVX-512BW and VL
  bool avx512_bf16 = false;  // and AVX-512BW, VL and BF16
  bool amx_bf16 = false;     // and AMX-TILE and AMX-BF16, their state granted by Linux
  bool zen4 = false;         // AMD family 19h with AVX-512F: zmm FMAs as two 256-bit halves
};
inline CpuFeatures cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return f;
    __cpuid_count(0, 0, a, b, c, d);
    const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // AuthenticAMD
    __cpuid_count(1, 0, a, b, c, d);
    const unsigned family = ((a >> 8) & 0xf) == 0xf ? 0xf + ((a >> 20) & 0xff) : (a >> 8) & 0xf;
    const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
    if (!osxsave || !avx) return f;
    unsigned xcr0 = 0, xcr0_hi = 0;
    __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_hi) : "c"(0));
    const bool ymm_saved = (xcr0 & 0x6) == 0x6;     // SSE and AVX state
    const bool zmm_saved = (xcr0 & 0xe6) == 0xe6;   // and opmask, ZMM_Hi256, Hi16_ZMM
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned max_subleaf = a;
    f.avx2_fma = ymm_saved && fma && (b & (1u << 5));
    f.avx512f = f.avx2_fma && zmm_saved && (b & (1u << 16));
    const bool bw = b & (1u << 30), vl = b & (1u << 31);
    f.avx512bw_vl = f.avx512f && bw && vl;
    f.zen4 = f.avx512f && amd && family == 0x19;
    const bool amx_tile = d & (1u << 24), amx_bf16 = d & (1u << 22);
    if (max_subleaf >= 1) {
      __cpuid_count(7, 1, a, b, c, d);
      f.avx512_bf16 = f.avx512f && bw && vl && (a & (1u << 5));
    }
#if defined(__linux__)
    // XTILECFG and XTILEDATA in XCR0, then the process's permission to use
    // the tile data (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it
    // the first tile instruction faults).
    const bool tiles_saved = (xcr0 & 0x60000u) == 0x60000u;
    f.amx_bf16 = f.avx512_bf16 && amx_tile && amx_bf16 && tiles_saved &&
                 syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    (void)amx_tile, (void)amx_bf16;
#endif
    return f;
  }();
  return features;
}
#endif

// 2: AVX-512F, 1: AVX2+FMA, 0: portable. CKS_CPU_ISA=0 or 1 caps it (to
// test the narrower kernels on a wider machine); the cap is read once.
// Detected out of line, so that gemm_isa, asked per row by some callers
// (convert.h), inlines to a load (1 % of a bfloat16 forward as a call).
__attribute__((noinline)) inline int detect_gemm_isa() {
  int best = 0;
#ifdef CKS_X86_AVX2
  const CpuFeatures f = cpu_features();
  if (f.avx2_fma) best = CKS_GEMM_AVX512 && f.avx512f ? 2 : 1;
#endif
  const char* cap = std::getenv("CKS_CPU_ISA");
  if (cap != nullptr && (std::strcmp(cap, "0") == 0 || std::strcmp(cap, "1") == 0))
    best = std::min(best, cap[0] - '0');
  return best;
}
inline int gemm_isa() {
  static const int isa = detect_gemm_isa();
  return isa;
}

// Bytes of one core's L2 (the data cache a task's blocks are sized to):
// sysconf's where it knows it, else 1 MB (Zen 4's, the size most blocks
// here were first measured with). Read once.
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    int64_t b = 0;
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
    b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return b > 0 ? b : int64_t{1} << 20;
  }();
  return bytes;
}

// Whether panels() runs tiles of one or two panels 12 rows at a time
// (kTallTiles): not on Zen 4, whose zmm FMAs issue as two 256-bit halves,
// one a cycle, so a 6-row tile's 6-12 chains of FMAs already cover their
// latency, and the 12-row tiles' row pointers spilled to the stack cost
// more. Zen 4 VM (2 cores), 6 rows against 12, 10-12 alternating rounds in
// one process, medians: the 3-D atrous forward 0.96-0.97x the time and input
// gradient 0.95-0.98x, the k8 s4 head's forward 0.93-0.95x, the grouped
// transposed input gradient 0.95-0.99x, V-Net's 0.98-0.99x, 3-D U-Net's
// input gradient 0.93x. CKS_CPU_TALL_TILES=0 or 1 overrides (read once).
#ifdef CKS_X86_AVX2
inline bool tall_tiles() {
  static const bool on = [] {
    const char* v = std::getenv("CKS_CPU_TALL_TILES");
    if (v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0)) return v[0] == '1';
    return !cpu_features().zen4;
  }();
  return on;
}
#endif

// Whether the bfloat16 paths that read bfloat16 in place may run: on
// AVX-512 (unless CKS_CPU_ISA caps the ISA below it), unless
// CKS_CPU_BF16_PAIRS=0 turns them off (read once; then bfloat16 runs
// widened to float32 copies, as everywhere else).
inline bool bf16_in_place_allowed() {
  static const bool on = [] {
    const char* off = std::getenv("CKS_CPU_BF16_PAIRS");
    return gemm_isa() == 2 && !(off != nullptr && std::strcmp(off, "0") == 0);
  }();
  return on;
}

// Whether bfloat16 operands run on the pair kernel (pairs_block): AVX-512F,
// BW, VL and AVX512_BF16, where bf16_in_place_allowed().
inline bool bf16_pairs() {
#ifdef CKS_X86_AVX2
  return bf16_in_place_allowed() && cpu_features().avx512_bf16;
#else
  return false;
#endif
}

// Whether the depthwise kernel reads bfloat16 operands in place, widening
// them in registers (depthwise.h): AVX-512F, BW and VL (the 16-bit masked
// loads and stores of its lane tails), where bf16_in_place_allowed(); no
// AVX512_BF16 needed (it multiplies in float32). Elsewhere bfloat16
// depthwise convolutions run on float32 copies: the same bits.
inline bool bf16_depthwise() {
#ifdef CKS_X86_AVX2
  return bf16_in_place_allowed() && cpu_features().avx512bw_vl;
#else
  return false;
#endif
}

// Whether the pair kernel's blocks run on AMX (amx_block): bf16_pairs() and
// AMX-BF16 granted, unless CKS_CPU_AMX=0 (read once).
inline bool bf16_amx() {
  static const bool on = [] {
#ifdef CKS_X86_AVX2
    const char* off = std::getenv("CKS_CPU_AMX");
    return bf16_pairs() && cpu_features().amx_bf16 &&
           !(off != nullptr && std::strcmp(off, "0") == 0);
#else
    return false;
#endif
  }();
  return on;
}

// Bytes amx_block keeps per thread for a block of mc rows, kc reduction
// indices and nc_pad columns (its packed A and the last chunk of B); 0
// where the blocks run on vdpbf16ps (or there is no AMX kernel).
inline int64_t amx_block_bytes(int64_t mc, int64_t kc, int64_t nc_pad) {
#ifdef CKS_X86_AVX2
  if (!bf16_amx()) return 0;
  const int64_t lda = (kc + kAmxK - 1) / kAmxK * kAmxK;
  const int64_t rows = (mc + kAmxRows - 1) / kAmxRows * kAmxRows;
  const int64_t tail = kc % kAmxK != 0 ? nc_pad * kAmxK : 0;
  return (rows * lda + tail) * static_cast<int64_t>(sizeof(uint16_t));
#else
  (void)mc, (void)kc, (void)nc_pad;
  return 0;
#endif
}

// Callers use OutC for a block of nc live columns where writes_in_place. On
// an AVX-512 machine only blocks narrower than four panels: a grouped
// transposed layer with 16 features per group spent 15 % of its forward
// copying 64-byte rows out of a BufC; with the tiles' accumulators in
// registers, 32-feature blocks in place took 0.91-0.97x the time (3D atrous,
// V-Net, U-Net 64->128 forwards and 3D input gradients; in process,
// interleaved), but blocks of four panels (64 features) up to 1.03x. Blocks
// of 33-63 run as 2 panels and the rest (macro_kernel_avx512 keeps 4-panel
// tiles off OutC columns that do not exist): FSRCNN's input gradient (56
// features, one reduction block) 0.81x the time in place (Xeon, medians).
template <typename T>
inline bool writes_in_place(int64_t nc) {
  return gemm_isa() != 2 || nc < 4 * Tile<T>::NR;
}

template <typename T, typename ASrc, typename BSrc, typename CDst>
inline void gemm_block(int64_t mc, int64_t nc, int64_t live, int64_t kc, const ASrc& A,
                       const BSrc& B, const CDst& C) {
#ifdef CKS_X86_AVX2
  if (gemm_isa() == 2) return macro_kernel_avx512<T>(mc, nc, live, kc, A, B, C);
  if (gemm_isa() >= 1) return macro_kernel_avx2<T>(mc, nc, live, kc, A, B, C);
#endif
  macro_kernel<T>(mc, nc, kc, A, B, C);
}
// A block of whole panels (nc a multiple of NR) into a PanelOutC: tiles of
// 4, 2 and 1 panels on AVX-512, the one ISA conv_cpu.cc fuses on (so the
// tiles with a half panel, whose code GCC builds with spilled invariants for
// this destination, are never instantiated for it); elsewhere the portable
// kernel, which keeps every build whole but never runs.
template <typename T, typename ASrc, typename BSrc>
inline void gemm_block(int64_t mc, int64_t nc, int64_t live, int64_t kc, const ASrc& A,
                       const BSrc& B, const PanelOutC<T>& C) {
#ifdef CKS_X86_AVX2
  if (gemm_isa() == 2) {
    constexpr int NR = Tile<T>::NR;
    int64_t jr = 0;
    for (; jr + 4 * NR <= nc; jr += 4 * NR) panels<4, 0, T>(mc, jr, kc, A, B.cols(jr), C);
    if (nc - jr >= 2 * NR) {
      panels<2, 0, T>(mc, jr, kc, A, B.cols(jr), C);
      jr += 2 * NR;
    }
    if (jr < nc) panels<1, 0, T>(mc, jr, kc, A, B.cols(jr), C);
    return;
  }
#endif
  macro_kernel<T>(mc, nc, kc, A, B, C);
}
// A block into a RoundC: AVX2's tiles, the one ISA conv_cpu.cc rounds in
// place on (rounds_out); no other kernel stores bfloat16 from float32 tiles.
template <typename T, typename ASrc, typename BSrc>
inline void gemm_block(int64_t mc, int64_t nc, int64_t live, int64_t kc, const ASrc& A,
                       const BSrc& B, const RoundC& C) {
#ifdef CKS_X86_AVX2
  if constexpr (std::is_same<T, float>::value)
    if (gemm_isa() == 1) return macro_kernel_avx2<T>(mc, nc, live, kc, A, B, C);
#endif
  (void)mc, (void)nc, (void)live, (void)kc, (void)A, (void)B, (void)C;
  std::abort();  // unreachable: rounds_out asks for gemm_isa() == 1 and float sums
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
// The AVX2 kernel's feature tile for wider filter gradients (CksConv::wide_rows):
// up to 6 features keep two ymm of rows per feature in 12 accumulators (2 loads
// and 6 broadcasts per 12 FMAs), where 7 or 8 keep one (9 loads per 8).
constexpr int kWideTileAvx2 = 6;
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

// AVX2: the strip as kStrip / L ymm chunks, HB at a time (as many as 12
// accumulators allow), each over one block of about kNarrowBlock reduction
// indices before the next chunk takes the same block, its partial sums kept in
// `part` in between. Walking the whole reduction chunk by chunk streamed a
// filter gradient's A (the strided input) from L3 once per chunk: FSRCNN's
// ran at 10 GFLOP/s. The same FMAs in the same order per element as the
// AVX-512 kernel (block edges are multiples of every kSplit), so the same bits.
constexpr int64_t kNarrowBlock = 128;

template <int FG, int HB, typename T, typename V>
__attribute__((target("avx2,fma"), always_inline)) inline void narrow_step_avx2(
    const T* ap, const T* bp, int64_t so, V (&ac)[FG][HB]) {
  constexpr int L = 32 / sizeof(T);
  V a0[HB];
#pragma GCC unroll 2
  for (int h = 0; h < HB; ++h) a0[h] = vload(ap + h * L);
#pragma GCC unroll 8
  for (int f = 0; f < FG; ++f) {
    const V bf = vbcast(bp + f * so);
#pragma GCC unroll 2
    for (int h = 0; h < HB; ++h) ac[f][h] = vfma(a0[h], bf, ac[f][h]);
  }
}

// Indices [q0, q1) of one run into partial sums acc[q % S]; q0 is a multiple
// of S, and q1 too unless it ends the run.
template <int FG, int HB, int S, typename T, typename V>
__attribute__((target("avx2,fma"), always_inline)) inline void narrow_piece_avx2(
    const T* ap, const T* bp, int64_t sa, int64_t sb, int64_t so, int64_t q0, int64_t q1,
    V (&acc)[S][FG][HB]) {
  int64_t q = q0;
  for (; q + S <= q1; q += S) {
#pragma GCC unroll 4
    for (int u = 0; u < S; ++u)
      narrow_step_avx2<FG, HB>(ap + (q + u) * sa, bp + (q + u) * sb, so, acc[u]);
  }
#pragma GCC unroll 4
  for (int u = 0; u < S; ++u)  // the tail: q + u is still in partial sum u
    if (q + u < q1) narrow_step_avx2<FG, HB>(ap + (q + u) * sa, bp + (q + u) * sb, so, acc[u]);
}

template <int FG, typename T>
__attribute__((target("avx2,fma"))) void narrow_strip_avx2(const T* a, const T* b,
                                                          const NarrowRuns& k, T* C,
                                                          int64_t ldc) {
  constexpr int L = 32 / sizeof(T), S = kSplit<FG>, H = kStrip<T> / L;
  constexpr int HB = S * FG * 2 <= 12 ? 2 : 1;
  static_assert(kNarrowBlock % 4 == 0 && H % HB == 0, "block edges keep q % S");
  using V = decltype(vload(a));
  V part[H / HB][S][FG][HB];
#pragma GCC unroll 1
  for (int c = 0; c < H / HB; ++c)
    for (int u = 0; u < S; ++u)
      for (int f = 0; f < FG; ++f)
        for (int h = 0; h < HB; ++h) part[c][u][f][h] = V{};
  const int64_t R = k.R, sa = k.sa, sb = k.sb, so = k.so;
  // A block: whole runs [r0, r1) when runs are short, else the piece
  // [q0, q1) of run r0.
  const int64_t runs_per_block = R <= 0 || R >= kNarrowBlock ? 1 : kNarrowBlock / R;
  for (int64_t r0 = 0, q0 = 0; r0 < k.nruns;) {
    const int64_t r1 = std::min(k.nruns, r0 + runs_per_block);
    const int64_t q1 = R >= kNarrowBlock ? std::min(R, q0 + kNarrowBlock) : R;
#pragma GCC unroll 1
    for (int c = 0; c < H / HB; ++c) {
      V acc[S][FG][HB];
#pragma GCC unroll 4
      for (int u = 0; u < S; ++u)
#pragma GCC unroll 8
        for (int f = 0; f < FG; ++f)
#pragma GCC unroll 2
          for (int h = 0; h < HB; ++h) acc[u][f][h] = part[c][u][f][h];
      for (int64_t r = r0; r < r1; ++r)
        narrow_piece_avx2<FG, HB, S>(a + k.ra[r] + c * HB * L, b + k.rb[r], sa, sb, so, q0, q1,
                                     acc);
#pragma GCC unroll 4
      for (int u = 0; u < S; ++u)
#pragma GCC unroll 8
        for (int f = 0; f < FG; ++f)
#pragma GCC unroll 2
          for (int h = 0; h < HB; ++h) part[c][u][f][h] = acc[u][f][h];
    }
    if (q1 < R) {
      q0 = q1;
    } else {
      r0 = r1;
      q0 = 0;
    }
  }
#pragma GCC unroll 1
  for (int c = 0; c < H / HB; ++c)
#pragma GCC unroll 8
    for (int f = 0; f < FG; ++f)
#pragma GCC unroll 2
      for (int h = 0; h < HB; ++h) {
        V sum = part[c][0][f][h];
#pragma GCC unroll 4
        for (int u = 1; u < S; ++u) sum = vadd(sum, part[c][u][f][h]);
        vaddto(C + f * ldc + (c * HB + h) * L, sum);
      }
}
#endif

// fn(std::integral_constant<int, F>{}) for F = fg in 1..N (N for any fg past
// N): the narrow kernels' run-time feature count as a template argument.
template <int N, int F = 1, typename Fn>
inline void with_features(int fg, Fn&& fn) {
  if constexpr (F < N) {
    if (fg > F) return with_features<N, F + 1>(fg, fn);
  }
  fn(std::integral_constant<int, F>{});
}

// One strip of kStrip<T> rows starting at a, for fg = 1..kNarrowF columns
// starting at b: C[f * ldc + i] += the reduction k.
template <typename T>
inline void narrow_strip(int fg, const T* a, const T* b, const NarrowRuns& k, T* C,
                         int64_t ldc) {
  with_features<kNarrowF>(fg, [&](auto F) {
#ifdef CKS_X86_AVX2
    if (gemm_isa() == 2) return narrow_strip_avx512<F()>(a, b, k, C, ldc);
    if (gemm_isa() == 1) return narrow_strip_avx2<F()>(a, b, k, C, ldc);
#endif
    narrow_strip_portable<F()>(a, b, k, C, ldc);
  });
}

// Taps as columns (CksConv::run_narrow_cols): the M adjacent taps
// of a filter gradient's last kernel dimension read the same input strip at
// cotangent positions one apart, FG features each, so one strip load feeds
// M x FG column sums where the tap-by-tap kernel loads it per tap:
//   C[(o * FG + f) * kStrip + i] += sum_{r, q < R} a[ra[r] + q * sa + i] * b[rb[r] + q * sb - o * FG + f]
// for o < M, f < FG (k.so unused: the M x FG values are contiguous, columns
// descending). One chain per accumulator: M x FG x 2 of them, at most
// cols_acc() / FG columns: kColsAcc on AVX-512 (32 zmm), kColsAccAvx2 on AVX2
// (16 ymm: 12 accumulators, two A vectors, a broadcast).
constexpr int kColsAcc = 12, kColsAccAvx2 = 6;
#ifdef CKS_X86_AVX2
template <int M, int FG, typename T>
__attribute__((target("avx512f,avx2,fma"))) void narrow_cols_avx512(const T* a, const T* b,
                                                                    const NarrowRuns& k, T* C) {
  constexpr int L = 64 / sizeof(T);
  using V = decltype(zload(a));
  V acc[M][FG][2];
#pragma GCC unroll 12
  for (int o = 0; o < M; ++o)
#pragma GCC unroll 6
    for (int f = 0; f < FG; ++f) acc[o][f][0] = acc[o][f][1] = V{};
  const int64_t R = k.R, sa = k.sa, sb = k.sb;
  for (int64_t r = 0; r < k.nruns; ++r) {
    const T* ap = a + k.ra[r];
    const T* bp = b + k.rb[r];
    for (int64_t q = 0; q < R; ++q, ap += sa, bp += sb) {
      const V a0 = zload(ap), a1 = zload(ap + L);
#pragma GCC unroll 12
      for (int o = 0; o < M; ++o)
#pragma GCC unroll 6
        for (int f = 0; f < FG; ++f) {
          const V bv = zbcast(bp - o * FG + f);
          acc[o][f][0] = zfma(a0, bv, acc[o][f][0]);
          acc[o][f][1] = zfma(a1, bv, acc[o][f][1]);
        }
    }
  }
#pragma GCC unroll 12
  for (int o = 0; o < M; ++o)
#pragma GCC unroll 6
    for (int f = 0; f < FG; ++f) {
      zaddto(C + (o * FG + f) * 2 * L, acc[o][f][0]);
      zaddto(C + (o * FG + f) * 2 * L + L, acc[o][f][1]);
    }
}

// AVX2: the strip in chunks of two ymm, each over the whole reduction before
// the next (a chunk is one 64-byte line of A per index, so no line is read
// twice; B, a few values per index, is). Each element is still one chain of
// FMAs in reduction order, as on AVX-512.
template <int M, int FG, typename T>
__attribute__((target("avx2,fma"))) void narrow_cols_avx2(const T* a, const T* b,
                                                         const NarrowRuns& k, T* C) {
  constexpr int L = 32 / sizeof(T), H = kStrip<T> / L;
  static_assert(H % 2 == 0, "whole chunks of two ymm");
  using V = decltype(vload(a));
  const int64_t R = k.R, sa = k.sa, sb = k.sb;
#pragma GCC unroll 1
  for (int c = 0; c < H; c += 2) {
    V acc[M][FG][2];
#pragma GCC unroll 6
    for (int o = 0; o < M; ++o)
#pragma GCC unroll 6
      for (int f = 0; f < FG; ++f) acc[o][f][0] = acc[o][f][1] = V{};
    for (int64_t r = 0; r < k.nruns; ++r) {
      const T* ap = a + k.ra[r] + c * L;
      const T* bp = b + k.rb[r];
      for (int64_t q = 0; q < R; ++q, ap += sa, bp += sb) {
        const V a0 = vload(ap), a1 = vload(ap + L);
#pragma GCC unroll 6
        for (int o = 0; o < M; ++o)
#pragma GCC unroll 6
          for (int f = 0; f < FG; ++f) {
            const V bv = vbcast(bp - o * FG + f);
            acc[o][f][0] = vfma(a0, bv, acc[o][f][0]);
            acc[o][f][1] = vfma(a1, bv, acc[o][f][1]);
          }
      }
    }
#pragma GCC unroll 6
    for (int o = 0; o < M; ++o)
#pragma GCC unroll 6
      for (int f = 0; f < FG; ++f) {
        vaddto(C + (o * FG + f) * kStrip<T> + c * L, acc[o][f][0]);
        vaddto(C + (o * FG + f) * kStrip<T> + (c + 1) * L, acc[o][f][1]);
      }
  }
}

// fn(std::integral_constant<int, M>{}) for M = m in 1..N: a narrow_cols tile's
// column count as a template argument. Past N there is no tile (and C would be
// left unsummed): run_narrow_cols never asks for one, so trap.
template <int N, int M = 1, typename Fn>
inline void with_columns(int m, Fn&& fn) {
  if constexpr (M <= N) {
    if (m == M) return fn(std::integral_constant<int, M>{});
    return with_columns<N, M + 1>(m, fn);
  } else {
    std::abort();
  }
}
#endif

// Column-feature accumulators of one narrow_cols tile on this CPU (0: no kernel).
inline int cols_acc() {
#ifdef CKS_X86_AVX2
  return gemm_isa() == 2 ? kColsAcc : gemm_isa() == 1 ? kColsAccAvx2 : 0;
#else
  return 0;
#endif
}

// m columns (m * fg <= cols_acc()) of fg = 1..cols_acc() / 2 features; AVX-512 and AVX2.
template <typename T>
inline void narrow_cols(int m, int fg, const T* a, const T* b, const NarrowRuns& k, T* C) {
#ifdef CKS_X86_AVX2
  if (gemm_isa() == 2)
    return with_features<kColsAcc / 2>(fg, [&](auto F) {
      constexpr int FG = decltype(F)::value;
      with_columns<kColsAcc / FG>(m, [&](auto M) { narrow_cols_avx512<M(), FG>(a, b, k, C); });
    });
  with_features<kColsAccAvx2 / 2>(fg, [&](auto F) {
    constexpr int FG = decltype(F)::value;
    with_columns<kColsAccAvx2 / FG>(m, [&](auto M) { narrow_cols_avx2<M(), FG>(a, b, k, C); });
  });
#else
  (void)m, (void)fg, (void)a, (void)b, (void)k, (void)C;
#endif
}

// ---------------------------------------------------------------- dot
// Outputs with few features (FG <= kDotF per group) whose reduction is long
// contiguous runs of A (a forward pass with the channels innermost: the last
// layer of a generator or super-resolution net, 1-3 features) as dot
// products vectorised along the reduction:
//   c[crows[r] + f * cf] = sum_{j < nruns, q < R} a[rows[r] + ra[j] + q] * bt[f * ldb + j * R + q]
// with bt the features' B rows packed contiguously in reduction order, each
// output stored once (no scratch block). The
// column-vectorised kernel would pad FG to NR and waste most of its lanes.
// A tile of RT rows keeps RT x FG vector accumulators (as many as the
// registers hold) and sums each across its lanes at the end; a run's last
// R % lanes indices are read with masked loads. The lane count sets the
// order of the sum, so the AVX-512, AVX2 and portable kernels round
// differently; each is independent of the thread count.
constexpr int kDotF = 8;
// Rows per tile: RT x FG accumulators, FG B vectors, one A vector and one to
// spare in `regs` vector registers.
constexpr int dot_rows_per_tile(int fg, int regs) {
  const int rt = (regs - 2 - fg) / fg;
  return rt < 1 ? 1 : rt > 8 ? 8 : rt;
}

template <int FG, int RT, typename T>
inline void dot_tile_portable(const T* const* rp, const NarrowRuns& k, const T* bt,
                              int64_t ldb, T* const* c, int64_t cf) {
  T acc[RT][FG] = {};
  for (int64_t j = 0; j < k.nruns; ++j)
    for (int64_t q = 0; q < k.R; ++q)
      for (int i = 0; i < RT; ++i)
        for (int f = 0; f < FG; ++f) acc[i][f] += rp[i][k.ra[j] + q] * bt[f * ldb + j * k.R + q];
  for (int i = 0; i < RT; ++i)
    for (int f = 0; f < FG; ++f) c[i][f * cf] = acc[i][f];
}

#ifdef CKS_X86_AVX2
#define CKS_Z512_FN __attribute__((target("avx512f,avx2,fma"), always_inline)) inline
CKS_Z512_FN __m512 zload_first(const float* p, int n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
CKS_Z512_FN __m512d zload_first(const double* p, int n) {
  return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
}
#undef CKS_Z512_FN
#define CKS_AVX2_FN __attribute__((target("avx2,fma"), always_inline)) inline
// The first n lanes (n < lanes), the others zero.
CKS_AVX2_FN __m256 vload_first(const float* p, int n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
}
CKS_AVX2_FN __m256d vload_first(const double* p, int n) {
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  return _mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), lane));
}
CKS_AVX2_FN float vsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
CKS_AVX2_FN double vsum(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
#undef CKS_AVX2_FN
// The sum of a zmm's lanes: its two halves added, then as vsum. (GCC 12's
// _mm512_reduce_add_*, _mm512_castpd512_pd256 and unmasked
// _mm512_extractf64x4_pd trip -Wuninitialized on an undefined vector.)
#define CKS_Z512_FN __attribute__((target("avx512f,avx2,fma"), always_inline)) inline
template <int H>
CKS_Z512_FN __m256d half(__m512d v) {
  return _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xff, v, H);
}
CKS_Z512_FN float zsum(__m512 v) {
  const __m512d d = _mm512_castps_pd(v);
  return vsum(_mm256_add_ps(_mm256_castpd_ps(half<0>(d)), _mm256_castpd_ps(half<1>(d))));
}
CKS_Z512_FN double zsum(__m512d v) { return vsum(_mm256_add_pd(half<0>(v), half<1>(v))); }
#undef CKS_Z512_FN


template <int FG, int RT, typename T>
__attribute__((target("avx512f,avx2,fma"))) void dot_tile_avx512(const T* const* rp,
                                                                 const NarrowRuns& k,
                                                                 const T* bt, int64_t ldb,
                                                                 T* const* c, int64_t cf) {
  constexpr int L = 64 / sizeof(T);
  using V = decltype(zload(bt));
  V acc[RT][FG];
#pragma GCC unroll 8
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 8
    for (int f = 0; f < FG; ++f) acc[i][f] = V{};
  const int64_t R = k.R, full = R / L * L;
  const int tail = static_cast<int>(R - full);
  for (int64_t j = 0; j < k.nruns; ++j) {
    const T* a[RT];
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) a[i] = scalar(rp[i] + k.ra[j]);
    const T* b = bt + j * R;
    for (int64_t q = 0; q < full; q += L) {
      V bf[FG];
#pragma GCC unroll 8
      for (int f = 0; f < FG; ++f) bf[f] = zload(b + f * ldb + q);
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) {
        V ai = zload(a[i] + q);
        asm("" : "+v"(ai));  // one load, not one memory operand per feature
#pragma GCC unroll 8
        for (int f = 0; f < FG; ++f) acc[i][f] = zfma(ai, bf[f], acc[i][f]);
      }
    }
    if (tail > 0) {
      V bf[FG];
#pragma GCC unroll 8
      for (int f = 0; f < FG; ++f) bf[f] = zload_first(b + f * ldb + full, tail);
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) {
        const V ai = zload_first(a[i] + full, tail);
#pragma GCC unroll 8
        for (int f = 0; f < FG; ++f) acc[i][f] = zfma(ai, bf[f], acc[i][f]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 8
    for (int f = 0; f < FG; ++f) c[i][f * cf] = zsum(acc[i][f]);
}

template <int FG, int RT, typename T>
__attribute__((target("avx2,fma"))) void dot_tile_avx2(const T* const* rp, const NarrowRuns& k,
                                                      const T* bt, int64_t ldb, T* const* c,
                                                      int64_t cf) {
  constexpr int L = 32 / sizeof(T);
  using V = decltype(vload(bt));
  V acc[RT][FG];
#pragma GCC unroll 8
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 8
    for (int f = 0; f < FG; ++f) acc[i][f] = V{};
  const int64_t R = k.R, full = R / L * L;
  const int tail = static_cast<int>(R - full);
  for (int64_t j = 0; j < k.nruns; ++j) {
    const T* a[RT];
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) a[i] = scalar(rp[i] + k.ra[j]);
    const T* b = bt + j * R;
    for (int64_t q = 0; q < full; q += L) {
      V bf[FG];
#pragma GCC unroll 8
      for (int f = 0; f < FG; ++f) bf[f] = vload(b + f * ldb + q);
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) {
        V ai = vload(a[i] + q);
        asm("" : "+x"(ai));
#pragma GCC unroll 8
        for (int f = 0; f < FG; ++f) acc[i][f] = vfma(ai, bf[f], acc[i][f]);
      }
    }
    if (tail > 0) {
      V bf[FG];
#pragma GCC unroll 8
      for (int f = 0; f < FG; ++f) bf[f] = vload_first(b + f * ldb + full, tail);
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) {
        const V ai = vload_first(a[i] + full, tail);
#pragma GCC unroll 8
        for (int f = 0; f < FG; ++f) acc[i][f] = vfma(ai, bf[f], acc[i][f]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 8
    for (int f = 0; f < FG; ++f) c[i][f * cf] = vsum(acc[i][f]);
}
#endif

// Rows [0, mc) in tiles of the ISA's rows per tile, the last rows one by one.
template <int FG, typename T>
inline void dot_rows_fg(int64_t mc, const T* a, const int64_t* rows, const NarrowRuns& k,
                        const T* bt, int64_t ldb, T* c, const int64_t* crows, int64_t cf) {
  const T* rp[8];
  T* cp[8];
  auto tiles = [&](auto rt_tag, auto tile) {
    constexpr int RT = decltype(rt_tag)::value;
    int64_t r = 0;
    for (; r + RT <= mc; r += RT) {
      for (int i = 0; i < RT; ++i) {
        rp[i] = a + rows[r + i];
        cp[i] = c + crows[r + i];
      }
      tile(std::integral_constant<int, RT>{});
    }
    for (; r < mc; ++r) {
      rp[0] = a + rows[r];
      cp[0] = c + crows[r];
      tile(std::integral_constant<int, 1>{});
    }
  };
#ifdef CKS_X86_AVX2
  if (gemm_isa() == 2)
    return tiles(std::integral_constant<int, dot_rows_per_tile(FG, 32)>{}, [&](auto rt) {
      dot_tile_avx512<FG, decltype(rt)::value>(rp, k, bt, ldb, cp, cf);
    });
  if (gemm_isa() == 1)
    return tiles(std::integral_constant<int, dot_rows_per_tile(FG, 16)>{}, [&](auto rt) {
      dot_tile_avx2<FG, decltype(rt)::value>(rp, k, bt, ldb, cp, cf);
    });
#endif
  tiles(std::integral_constant<int, 4>{}, [&](auto rt) {
    dot_tile_portable<FG, decltype(rt)::value>(rp, k, bt, ldb, cp, cf);
  });
}

// Row r < mc, feature f < fg <= kDotF: c[crows[r] + f * cf] = the reduction k
// of A's row a + rows[r] (runs contiguous: k.sa == 1) with bt's row f (ldb
// apart).
template <typename T>
inline void dot_rows(int fg, int64_t mc, const T* a, const int64_t* rows, const NarrowRuns& k,
                     const T* bt, int64_t ldb, T* c, const int64_t* crows, int64_t cf) {
  switch (fg) {
    case 1: return dot_rows_fg<1>(mc, a, rows, k, bt, ldb, c, crows, cf);
    case 2: return dot_rows_fg<2>(mc, a, rows, k, bt, ldb, c, crows, cf);
    case 3: return dot_rows_fg<3>(mc, a, rows, k, bt, ldb, c, crows, cf);
    case 4: return dot_rows_fg<4>(mc, a, rows, k, bt, ldb, c, crows, cf);
    case 5: return dot_rows_fg<5>(mc, a, rows, k, bt, ldb, c, crows, cf);
    case 6: return dot_rows_fg<6>(mc, a, rows, k, bt, ldb, c, crows, cf);
    case 7: return dot_rows_fg<7>(mc, a, rows, k, bt, ldb, c, crows, cf);
    default: return dot_rows_fg<8>(mc, a, rows, k, bt, ldb, c, crows, cf);
  }
}

}  // namespace gemm
}  // namespace cks
