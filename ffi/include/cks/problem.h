// A ConvProblem from raw shapes and attributes (no XLA dependency), shared by
// the FFI handlers and the CUDA host harness.
#pragma once

#include <cstdint>

#include "cks/plan.h"

namespace cks {

// Row-major element strides of a shape.
inline void row_major_strides(const int64_t* dims, int64_t rank, int64_t* strides) {
  int64_t s = 1;
  for (int64_t i = rank - 1; i >= 0; --i) {
    strides[i] = s;
    s *= dims[i];
  }
}

// The problem from raw shapes and attributes; returns nullptr or an error
// message. Used by every handler and by the CUDA host harness.
inline const char* make_problem(const int64_t* ld, const int64_t* rd, const int64_t* od,
                                int64_t rank, const int64_t* window_strides,
                                const int64_t* lhs_dilation, const int64_t* rhs_dilation,
                                const int64_t* padding_lo, const int64_t* lhs_spec,
                                const int64_t* rhs_spec, const int64_t* out_spec,
                                int64_t feature_group_count, int64_t batch_group_count,
                                ConvProblem* pb) {
  const int64_t nd = rank - 2;
  if (nd < 1 || nd > kMaxSpatial) return "cks: operands must have rank 3, 4 or 5 (1-3 spatial dims)";
  for (int64_t i = 0; i < rank; ++i)
    if (lhs_spec[i] < 0 || lhs_spec[i] >= rank || rhs_spec[i] < 0 || rhs_spec[i] >= rank ||
        out_spec[i] < 0 || out_spec[i] >= rank)
      return "cks: dimension numbers out of range";
  int64_t ls[kMaxSpatial + 2], rs[kMaxSpatial + 2], os[kMaxSpatial + 2];
  row_major_strides(ld, rank, ls);
  row_major_strides(rd, rank, rs);
  row_major_strides(od, rank, os);

  pb->nd = static_cast<int>(nd);
  pb->batch = ld[lhs_spec[0]];
  pb->in_feat = ld[lhs_spec[1]];
  pb->out_feat = rd[rhs_spec[0]];
  pb->feature_groups = feature_group_count;
  pb->batch_groups = batch_group_count;
  pb->lhs_n = ls[lhs_spec[0]];
  pb->lhs_c = ls[lhs_spec[1]];
  pb->rhs_o = rs[rhs_spec[0]];
  pb->rhs_i = rs[rhs_spec[1]];
  pb->out_n = os[out_spec[0]];
  pb->out_c = os[out_spec[1]];
  for (int64_t d = 0; d < nd; ++d) {
    if (window_strides[d] < 1 || lhs_dilation[d] < 1 || rhs_dilation[d] < 1)
      return "cks: strides and dilations must be positive";
    pb->dim[d] = Dim{ld[lhs_spec[2 + d]], rd[rhs_spec[2 + d]], od[out_spec[2 + d]],
                     window_strides[d], lhs_dilation[d], rhs_dilation[d], padding_lo[d]};
    pb->lhs_sp[d] = ls[lhs_spec[2 + d]];
    pb->rhs_sp[d] = rs[rhs_spec[2 + d]];
    pb->out_sp[d] = os[out_spec[2 + d]];
  }
  const int64_t G = feature_group_count, B = batch_group_count;
  if (G < 1 || B < 1 || (G > 1 && B > 1) || pb->in_feat % G != 0 || pb->out_feat % (G * B) != 0 ||
      pb->batch % B != 0 || rd[rhs_spec[1]] * G != pb->in_feat || od[out_spec[0]] * B != pb->batch ||
      od[out_spec[1]] != pb->out_feat)
    return "cks: inconsistent batch/feature sizes or group counts";
  // Output sizes come from the out buffer; the trimmed ranges keep every
  // read inside the operands whatever they are.
  return nullptr;
}

// Reads rhs's spatial dimensions in reverse (the primitive's rhs_reversed:
// the input gradient's flipped kernel): tap t of dimension d is element
// (k - 1 - t), so the first tap moves to the last and each step is negated.
// Every offset stays inside the buffer.
inline void reverse_rhs(ConvProblem* pb) {
  for (int d = 0; d < pb->nd; ++d) {
    pb->rhs_shift += (pb->dim[d].k_size - 1) * pb->rhs_sp[d];
    pb->rhs_sp[d] = -pb->rhs_sp[d];
  }
}

}  // namespace cks
