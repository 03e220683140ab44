// The CUDA C-K-S kernel, written as phases between barriers.
//
// One launch covers every phase class of the plan (the product of the
// per-dimension phases of geometry.h). Each phase class is one dense GEMM
//     out[rows, Fg] = A[rows, taps*Cg] * B[taps*Cg, Fg]
// on the original, undilated operands: rows are (batch, u...) and the
// reduction is (t..., c) over the class's sub-kernel. Border trimming (C) is
// done by predication: a (row, tap) pair whose input lies outside the
// operand loads 0, so no padded copy exists and the work wasted is O(border).
//
// Every phase is a __host__ __device__ function of (block, thread, shared
// tile): the device kernel runs them with __syncthreads() in between, and
// the host harness (conv_cuda.cu) runs all threads of a block through one
// phase before the next, which is exactly the barrier semantics. So the same
// index math and tile logic are checked on machines without a GPU.
//
// Phase 2 has two implementations over the same block tile: a SIMT
// register-blocked product (float32 and float64, here) and a tensor-core
// product with mma.sync for bfloat16 and float16 (mma_path.cuh), whose
// warp-level instruction the harness runs through a host model of it.
#pragma once

#include <cstdint>

#include "cks/dtypes.h"
#include "cks/geometry.h"
#include "cks/plan.h"

namespace cks {
namespace cuda {

constexpr int kBM = 64, kBN = 64, kBK = 16;  // block tile
constexpr int kTM = 4, kTN = 4;              // per-thread register tile
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256
constexpr int kMaxClasses = 32;              // phase classes per launch

// One phase class: a per-dimension Phase for every spatial dimension.
struct ClassDesc {
  Phase ph[kMaxSpatial];
  int64_t rows;  // out_batch * prod(U)
  int64_t red;   // prod(T) * Cg
};

// Kernel parameters, passed by value (__grid_constant__): ~10 KB.
struct LaunchParams {
  ConvProblem pb;
  int nclasses;
  ClassDesc cls[kMaxClasses];
};

// Each thread of load_tiles fills kLoadK consecutive reduction indices of
// one row of A and one column of B.
constexpr int kLoadK = kBK * kBM / kThreads;  // 4
static_assert(kBM == kBN && kLoadK * kThreads == kBK * kBM, "load_tiles covers the tiles");

// Which accumulator of a thread holds which element of the block tile:
// acc[i][j] is element (row(tid, i), col(tid, j)). The SIMT path gives each
// thread a kTM x kTN register tile.
struct SimtLayout {
  CKS_HD static int row(int tid, int i) { return tid / (kBN / kTN) * kTM + i; }
  CKS_HD static int col(int tid, int j) { return tid % (kBN / kTN) * kTN + j; }
};

// The shared tiles of the SIMT path: operands converted to the accumulation
// type on load, stored k-major.
template <typename Acc>
struct SimtTiles {
  using Elem = Acc;
  using Layout = SimtLayout;
  static constexpr int kPath = 0;  // reported by the host harness
  Acc a[kBK][kBM];
  Acc b[kBK][kBN];

  template <typename Tin>
  CKS_HD static Acc from(Tin x) {
    return load<Acc>(x);
  }
  CKS_HD void put_a(int kq, int m, const Acc (&v)[kLoadK]) {
    for (int j = 0; j < kLoadK; ++j) a[kq + j][m] = v[j];
  }
  CKS_HD void put_b(int kq, int n, const Acc (&v)[kLoadK]) {
    for (int j = 0; j < kLoadK; ++j) b[kq + j][n] = v[j];
  }
};

// Block coordinates: x = row tile, y = (group, column tile), z = class.
struct BlockIdx {
  int64_t row_tile, col_tile, group, cls;
};

CKS_HD inline BlockIdx block_coords(const LaunchParams& p, int64_t bx, int64_t by, int64_t bz) {
  const int64_t col_tiles = (p.pb.group_out() + kBN - 1) / kBN;
  return {bx, by % col_tiles, by / col_tiles, bz};
}

// A block whose row tile lies past its class's rows has nothing to do; the
// whole block returns before any barrier.
CKS_HD inline bool block_active(const LaunchParams& p, const BlockIdx& b) {
  return b.row_tile * kBM < p.cls[b.cls].rows;
}

// Row r of a class -> batch index n and the per-dimension output counters u.
CKS_HD inline int64_t decode_row(const LaunchParams& p, const ClassDesc& c, int64_t r,
                                 int64_t* u) {
  for (int d = p.pb.nd - 1; d >= 0; --d) {
    u[d] = r % c.ph[d].U;
    r /= c.ph[d].U;
  }
  return r;
}

// Reduction index k -> per-dimension sub-kernel taps t and channel c.
CKS_HD inline int64_t decode_red(const LaunchParams& p, const ClassDesc& c, int64_t k,
                                 int64_t* t) {
  const int64_t Cg = p.pb.group_in();
  const int64_t ch = k % Cg;
  k /= Cg;
  for (int d = p.pb.nd - 1; d >= 0; --d) {
    t[d] = k % c.ph[d].T;
    k /= c.ph[d].T;
  }
  return ch;
}

// Phase 1: each thread loads kLoadK consecutive reduction indices of one row
// of A and of one column of B, for the reduction block starting at k0 (zeros
// outside the operands), and hands them to the path's shared tiles.
template <typename Tin, typename Tiles>
CKS_HD inline void load_tiles(const LaunchParams& p, const BlockIdx& b, int tid, int64_t k0,
                              const Tin* lhs, const Tin* rhs, Tiles& s) {
  using Elem = typename Tiles::Elem;
  const ConvProblem& pb = p.pb;
  const ClassDesc& c = p.cls[b.cls];
  const int lane = tid % kBM, kq = (tid / kBM) * kLoadK;
  // A: row `lane` of the tile.
  {
    const int64_t r = b.row_tile * kBM + lane;
    int64_t u[kMaxSpatial] = {0, 0, 0};
    const bool row_ok = r < c.rows;
    const int64_t n = row_ok ? decode_row(p, c, r, u) : 0;
    const int64_t base = pb.feature_groups > 1
                             ? n * pb.lhs_n + b.group * pb.group_in() * pb.lhs_c
                             : (b.group * pb.out_batch() + n) * pb.lhs_n;
    Elem v[kLoadK];
    for (int j = 0; j < kLoadK; ++j) {
      const int64_t k = k0 + kq + j;
      v[j] = Elem{};
      if (row_ok && k < c.red) {
        int64_t t[kMaxSpatial] = {0, 0, 0};
        const int64_t ch = decode_red(p, c, k, t);
        int64_t off = base + ch * pb.lhs_c;
        bool inside = true;
        for (int d = 0; d < pb.nd; ++d) {
          const Phase& ph = c.ph[d];
          const int64_t i = input_index(ph, u[d], t[d]);
          inside = inside && i >= 0 && i < pb.dim[d].in_size;  // trimmed (C)
          off += i * pb.lhs_sp[d];
        }
        if (inside) v[j] = Tiles::from(lhs[off]);
      }
    }
    s.put_a(kq, lane, v);
  }
  // B: column `lane` of the tile, from the class's sub-kernel.
  {
    const int64_t f = b.col_tile * kBN + lane;
    const bool col_ok = f < pb.group_out();
    Elem v[kLoadK];
    for (int j = 0; j < kLoadK; ++j) {
      const int64_t k = k0 + kq + j;
      v[j] = Elem{};
      if (col_ok && k < c.red) {
        int64_t t[kMaxSpatial] = {0, 0, 0};
        const int64_t ch = decode_red(p, c, k, t);
        int64_t off = (b.group * pb.group_out() + f) * pb.rhs_o + ch * pb.rhs_i;
        for (int d = 0; d < pb.nd; ++d)
          off += (c.ph[d].k0 + c.ph[d].kstep * t[d]) * pb.rhs_sp[d];  // sub-kernel tap (K, S)
        v[j] = Tiles::from(rhs[off]);
      }
    }
    s.put_b(kq, lane, v);
  }
}

// Phase 2 (SIMT path): the register-blocked product of the two shared tiles.
// The tensor-core path's phase 2 is in mma_path.cuh.
template <typename Acc>
CKS_HD inline void multiply_tiles(int tid, const SimtTiles<Acc>& s, Acc (&acc)[kTM][kTN]) {
  for (int kk = 0; kk < kBK; ++kk) {
    Acc a[kTM], bv[kTN];
    for (int i = 0; i < kTM; ++i) a[i] = s.a[kk][SimtLayout::row(tid, i)];
    for (int j = 0; j < kTN; ++j) bv[j] = s.b[kk][SimtLayout::col(tid, j)];
    for (int i = 0; i < kTM; ++i)
      for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * bv[j];
  }
}

// Phase 3: write the thread's outputs straight to their strided positions
// (no interleave pass): output o = o0 + L*u in every dimension. Layout says
// which tile element each accumulator holds (SimtLayout or MmaLayout).
template <typename Layout, typename Acc, typename Tout>
CKS_HD inline void store_outputs(const LaunchParams& p, const BlockIdx& b, int tid,
                                 const Acc (&acc)[kTM][kTN], Tout* out) {
  const ConvProblem& pb = p.pb;
  const ClassDesc& c = p.cls[b.cls];
  for (int i = 0; i < kTM; ++i) {
    const int64_t r = b.row_tile * kBM + Layout::row(tid, i);
    if (r >= c.rows) continue;
    int64_t u[kMaxSpatial] = {0, 0, 0};
    const int64_t n = decode_row(p, c, r, u);
    int64_t off = n * pb.out_n;
    for (int d = 0; d < pb.nd; ++d) off += (c.ph[d].o0 + c.ph[d].L * u[d]) * pb.out_sp[d];
    for (int j = 0; j < kTN; ++j) {
      const int64_t f = b.col_tile * kBN + Layout::col(tid, j);
      if (f < pb.group_out())
        out[off + (b.group * pb.group_out() + f) * pb.out_c] = store<Tout, Acc>(acc[i][j]);
    }
  }
}

}  // namespace cuda
}  // namespace cks
