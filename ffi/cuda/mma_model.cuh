// Host model of mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32,
// and the tensor-core path's phase 2 as the host harness runs it: the same
// fragment loads as the device (load_fragments), one warp at a time, with the
// instruction replaced by the model.
//
// The model does not trust the fragment loads: it reassembles A, B and C
// element by element from the lanes' registers with the ISA layout
// (mma_layout.cuh), unpacking each register itself, so a wrong shared-memory
// index, register or half in load_fragments gives a wrong product.
#pragma once

#include <cstdint>

#include "cks/dtypes.h"
#include "mma_layout.cuh"
#include "mma_path.cuh"

namespace cks {
namespace cuda {

// The 32 lanes' operands of one instruction; c is overwritten with d.
struct WarpMma {
  uint32_t a[mma::kWarp][mma::kARegs];
  uint32_t b[mma::kWarp][mma::kBRegs];
  float c[mma::kWarp][mma::kCRegs];
};

// Element i of a fragment (i / 2 selects the register, i % 2 the half).
inline uint16_t fragment_half(const uint32_t* regs, int i) {
  const uint32_t reg = regs[i / 2];
  return static_cast<uint16_t>(i % 2 == 0 ? reg & 0xffffu : reg >> 16);
}

// D = A * B + C over the whole warp, in float32 (each product of two 16-bit
// floats is exact in float32; the sum runs in k order, which may differ from
// the hardware's order in the last bits).
template <typename Tin>
void mma_m16n8k16_model(WarpMma& w) {
  float A[mma::kM][mma::kK] = {}, B[mma::kK][mma::kN] = {}, D[mma::kM][mma::kN] = {};
  for (int lane = 0; lane < mma::kWarp; ++lane) {
    for (int i = 0; i < 2 * mma::kARegs; ++i)
      A[mma::a_row(lane, i)][mma::a_col(lane, i)] =
          load<float>(Tin{fragment_half(w.a[lane], i)});
    for (int i = 0; i < 2 * mma::kBRegs; ++i)
      B[mma::b_row(lane, i)][mma::b_col(lane, i)] =
          load<float>(Tin{fragment_half(w.b[lane], i)});
    for (int i = 0; i < mma::kCRegs; ++i)
      D[mma::c_row(lane, i)][mma::c_col(lane, i)] = w.c[lane][i];
  }
  for (int m = 0; m < mma::kM; ++m)
    for (int n = 0; n < mma::kN; ++n) {
      float d = D[m][n];
      for (int k = 0; k < mma::kK; ++k) d += A[m][k] * B[k][n];
      D[m][n] = d;
    }
  for (int lane = 0; lane < mma::kWarp; ++lane)
    for (int i = 0; i < mma::kCRegs; ++i)
      w.c[lane][i] = D[mma::c_row(lane, i)][mma::c_col(lane, i)];
}

// Phase 2 of the tensor-core path in the harness. acc_of(tid) is the
// thread's float[kTM][kTN] accumulator file.
template <typename Tin, typename AccOf>
void multiply_tiles_model(const MmaTiles<Tin>& s, AccOf&& acc_of) {
  for (int w0 = 0; w0 < kThreads; w0 += mma::kWarp) {
    Fragments f[mma::kWarp];
    for (int lane = 0; lane < mma::kWarp; ++lane) load_fragments(w0 + lane, s, f[lane]);
    for (int mi = 0; mi < MmaLayout::kTilesM; ++mi)
      for (int ni = 0; ni < MmaLayout::kTilesN; ++ni) {
        WarpMma w;
        for (int lane = 0; lane < mma::kWarp; ++lane) {
          for (int r = 0; r < mma::kARegs; ++r) w.a[lane][r] = f[lane].a[mi][r];
          for (int r = 0; r < mma::kBRegs; ++r) w.b[lane][r] = f[lane].b[ni][r];
          for (int r = 0; r < mma::kCRegs; ++r)
            w.c[lane][r] = c_elem(acc_of(w0 + lane), mi, ni, r);
        }
        mma_m16n8k16_model<Tin>(w);
        for (int lane = 0; lane < mma::kWarp; ++lane)
          for (int r = 0; r < mma::kCRegs; ++r) c_elem(acc_of(w0 + lane), mi, ni, r) = w.c[lane][r];
      }
  }
}

}  // namespace cuda
}  // namespace cks
