// The tensor-core path of the kernel: bfloat16 and float16 inputs multiplied
// with mma.sync.m16n8k16 (float32 accumulation), on the same block tile and
// the same load_tiles / store_outputs phases as the SIMT path.
//
// The block's 8 warps form a 2 x 4 grid over the 64 x 64 tile; each warp owns
// a 32 x 16 sub-tile, i.e. 2 x 2 instructions of shape 16 x 8 per 16-deep
// reduction step. A thread's 16 accumulators are the C fragments of its
// warp's 4 instructions, so the accumulator file has the SIMT path's shape.
#pragma once

#include <cstdint>

#include "cks/dtypes.h"
#include "kernel.cuh"
#include "mma_layout.cuh"

namespace cks {
namespace cuda {

struct MmaLayout {
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int kTilesM = kBM / (kWarpsM * mma::kM);  // instructions per warp, in M
  static constexpr int kTilesN = kBN / (kWarpsN * mma::kN);  // and in N
  static_assert(kWarpsM * kWarpsN * mma::kWarp == kThreads, "one warp per sub-tile");
  static_assert(kTilesM * 2 == kTM && kTilesN * 2 == kTN, "C fragments fill acc[kTM][kTN]");
  static_assert(kBK == mma::kK, "one instruction step per reduction block");

  CKS_HD static int lane(int tid) { return tid % mma::kWarp; }
  CKS_HD static int warp_row0(int tid) { return tid / mma::kWarp / kWarpsN * kTilesM * mma::kM; }
  CKS_HD static int warp_col0(int tid) { return tid / mma::kWarp % kWarpsN * kTilesN * mma::kN; }
  // acc[i][j] holds element (i % 2) * 2 + j % 2 of the C fragment of
  // instruction (i / 2, j / 2): see c_elem.
  CKS_HD static int row(int tid, int i) {
    return warp_row0(tid) + (i >> 1) * mma::kM + mma::c_row(lane(tid), (i & 1) * 2);
  }
  CKS_HD static int col(int tid, int j) {
    return warp_col0(tid) + (j >> 1) * mma::kN + mma::c_col(lane(tid), j & 1);
  }
};

// Element r of the C fragment of instruction (mi, ni) among a thread's
// accumulators (the inverse of MmaLayout::row/col).
CKS_HD inline float& c_elem(float (&acc)[kTM][kTN], int mi, int ni, int r) {
  return acc[mi * 2 + (r >> 1)][ni * 2 + (r & 1)];
}

CKS_HD inline uint32_t pack_pair(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// The shared tiles of the tensor-core path: the 16-bit inputs unconverted,
// stored by row of A and by column of B with the reduction index
// contiguous, two per 32-bit word (the lower k in the low half, as in a
// fragment register). A row is padded to 12 words so that the 32 lanes'
// fragment loads (rows g = 0..7, words t = 0..3) fall in 32 distinct banks.
template <typename Tin>
struct MmaTiles {
  using Elem = Tin;
  using Layout = MmaLayout;
  static constexpr int kPath = 1;  // reported by the host harness
  static constexpr int kRowWords = kBK / 2 + 4;
  static_assert(kLoadK % 2 == 0, "load_tiles writes whole words");
  uint32_t a[kBM][kRowWords];  // a[m][k / 2]
  uint32_t b[kBN][kRowWords];  // b[n][k / 2]

  CKS_HD static Tin from(Tin x) { return x; }
  CKS_HD void put_a(int kq, int m, const Tin (&v)[kLoadK]) {
    for (int j = 0; j < kLoadK; j += 2) a[m][(kq + j) / 2] = pack_pair(v[j].bits, v[j + 1].bits);
  }
  CKS_HD void put_b(int kq, int n, const Tin (&v)[kLoadK]) {
    for (int j = 0; j < kLoadK; j += 2) b[n][(kq + j) / 2] = pack_pair(v[j].bits, v[j + 1].bits);
  }
};

// A thread's fragment registers for one reduction step: the A fragments of
// its warp's kTilesM row blocks and the B fragments of its kTilesN column
// blocks.
struct Fragments {
  uint32_t a[MmaLayout::kTilesM][mma::kARegs];
  uint32_t b[MmaLayout::kTilesN][mma::kBRegs];
};

// Phase 2a (per thread): read the lane's fragments from the shared tiles.
// Register r holds elements 2r and 2r+1, which the ISA places in adjacent
// k (A: columns c, c+1 of a row; B: rows k, k+1 of a column), i.e. in the
// one shared word at k / 2.
template <typename Tin>
CKS_HD inline void load_fragments(int tid, const MmaTiles<Tin>& s, Fragments& f) {
  const int lane = MmaLayout::lane(tid);
  for (int mi = 0; mi < MmaLayout::kTilesM; ++mi)
    for (int r = 0; r < mma::kARegs; ++r) {
      const int m = MmaLayout::warp_row0(tid) + mi * mma::kM + mma::a_row(lane, 2 * r);
      f.a[mi][r] = s.a[m][mma::a_col(lane, 2 * r) / 2];
    }
  for (int ni = 0; ni < MmaLayout::kTilesN; ++ni)
    for (int r = 0; r < mma::kBRegs; ++r) {
      const int n = MmaLayout::warp_col0(tid) + ni * mma::kN + mma::b_col(lane, 2 * r);
      f.b[ni][r] = s.b[n][mma::b_row(lane, 2 * r) / 2];
    }
}

#ifdef __CUDACC__
// The warp-level instruction, per lane: d = a * b + c in place on c.
template <typename Tin>
__device__ inline void mma_m16n8k16(const uint32_t (&a)[mma::kARegs],
                                    const uint32_t (&b)[mma::kBRegs], float& c0, float& c1,
                                    float& c2, float& c3);

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the tensor-core path needs sm_80 or newer (mma.sync.m16n8k16 with bf16)"
#endif

template <>
__device__ inline void mma_m16n8k16<bf16>(const uint32_t (&a)[mma::kARegs],
                                          const uint32_t (&b)[mma::kBRegs], float& c0,
                                          float& c1, float& c2, float& c3) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ inline void mma_m16n8k16<f16>(const uint32_t (&a)[mma::kARegs],
                                         const uint32_t (&b)[mma::kBRegs], float& c0,
                                         float& c1, float& c2, float& c3) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Phase 2 (tensor-core path, device): fragments, then the warp's
// kTilesM x kTilesN instructions. All 32 lanes of every warp get here
// (mma.sync is warp-collective). The host harness runs the same fragment
// loads and replaces the instruction by its model (mma_model.cuh).
template <typename Tin>
__device__ inline void multiply_tiles(int tid, const MmaTiles<Tin>& s, float (&acc)[kTM][kTN]) {
  Fragments f;
  load_fragments(tid, s, f);
  for (int mi = 0; mi < MmaLayout::kTilesM; ++mi)
    for (int ni = 0; ni < MmaLayout::kTilesN; ++ni)
      mma_m16n8k16<Tin>(f.a[mi], f.b[ni], c_elem(acc, mi, ni, 0), c_elem(acc, mi, ni, 1),
                        c_elem(acc, mi, ni, 2), c_elem(acc, mi, ni, 3));
}
#endif  // __CUDACC__

// The shared tiles of each (input, accumulation) pair: 16-bit inputs with
// float32 accumulation take the tensor-core path, the rest the SIMT path.
template <typename Tin, typename Acc>
struct TilesFor {
  using type = SimtTiles<Acc>;
};
template <>
struct TilesFor<bf16, float> {
  using type = MmaTiles<bf16>;
};
template <>
struct TilesFor<f16, float> {
  using type = MmaTiles<f16>;
};

}  // namespace cuda
}  // namespace cks
