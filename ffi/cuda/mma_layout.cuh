// The fragment layout of mma.sync.aligned.m16n8k16.row.col with 16-bit
// inputs (.f16/.bf16) and .f32 accumulators, as the PTX ISA gives it
// ("Matrix Fragments for mma.m16n8k16 with floating point type"):
//     groupID = laneid >> 2, threadID_in_group = laneid % 4.
// This is the one place for that formula: the fragment loads of the device
// kernel and the host model of the instruction both use these functions, and
// tests/test_cuda.py checks them against a transcription of the ISA tables.
//
// Element i of a lane's fragment lives in register i / 2; the lower-indexed
// element of a pair is in the low 16 bits ("elements low to high").
#pragma once

#include "cks/geometry.h"

namespace cks {
namespace cuda {
namespace mma {

constexpr int kM = 16, kN = 8, kK = 16;  // the instruction's shape
constexpr int kWarp = 32;
constexpr int kARegs = 4, kBRegs = 2, kCRegs = 4;  // .b32 registers per lane

CKS_HD constexpr int group_id(int lane) { return lane >> 2; }
CKS_HD constexpr int thread_in_group(int lane) { return lane % 4; }

// A (16x16, row-major), elements a0..a7: rows g (a0,a1,a4,a5) and g+8
// (a2,a3,a6,a7); columns 2t+(i&1), plus 8 for a4..a7.
CKS_HD constexpr int a_row(int lane, int i) { return group_id(lane) + 8 * ((i >> 1) & 1); }
CKS_HD constexpr int a_col(int lane, int i) {
  return 2 * thread_in_group(lane) + (i & 1) + 8 * (i >> 2);
}

// B (16x8, "col": stored by columns), elements b0..b3: rows (k) 2t+(i&1),
// plus 8 for b2,b3; column g.
CKS_HD constexpr int b_row(int lane, int i) {
  return 2 * thread_in_group(lane) + (i & 1) + 8 * (i >> 1);
}
CKS_HD constexpr int b_col(int lane, int /*i*/) { return group_id(lane); }

// C and D (16x8, f32), elements c0..c3 (one per register): rows g (c0,c1)
// and g+8 (c2,c3); columns 2t+(i&1).
CKS_HD constexpr int c_row(int lane, int i) { return group_id(lane) + 8 * (i >> 1); }
CKS_HD constexpr int c_col(int lane, int i) { return 2 * thread_in_group(lane) + (i & 1); }

}  // namespace mma
}  // namespace cuda
}  // namespace cks
