// Decoding the FFI call (buffers + attributes) into a ConvProblem. Shared by
// the CPU and CUDA handlers; Python validates first, this re-checks so that a
// hand-written custom call can never index out of bounds.
#pragma once

#include <cstdint>
#include <string>

#include "cks/plan.h"
#include "xla/ffi/api/ffi.h"

namespace cks {

namespace ffi = xla::ffi;

using I64Span = ffi::Span<const int64_t>;

// Row-major element strides of a buffer.
inline void row_major_strides(ffi::AnyBuffer::Dimensions dims, int64_t* strides) {
  int64_t s = 1;
  for (int64_t i = static_cast<int64_t>(dims.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= dims[i];
  }
}

inline ffi::Error decode_problem(const ffi::AnyBuffer& lhs, const ffi::AnyBuffer& rhs,
                                 const ffi::AnyBuffer& out, I64Span window_strides,
                                 I64Span lhs_dilation, I64Span rhs_dilation, I64Span padding_lo,
                                 I64Span lhs_spec, I64Span rhs_spec, I64Span out_spec,
                                 int64_t feature_group_count, int64_t batch_group_count,
                                 ConvProblem* pb) {
  const auto ld = lhs.dimensions(), rd = rhs.dimensions(), od = out.dimensions();
  const int64_t rank = static_cast<int64_t>(ld.size());
  const int64_t nd = rank - 2;
  if (nd < 1 || nd > kMaxSpatial || static_cast<int64_t>(rd.size()) != rank ||
      static_cast<int64_t>(od.size()) != rank)
    return ffi::Error::InvalidArgument("cks: operands must have rank 3, 4 or 5 (1-3 spatial dims)");
  if (static_cast<int64_t>(window_strides.size()) != nd ||
      static_cast<int64_t>(lhs_dilation.size()) != nd ||
      static_cast<int64_t>(rhs_dilation.size()) != nd ||
      static_cast<int64_t>(padding_lo.size()) != nd ||
      static_cast<int64_t>(lhs_spec.size()) != rank ||
      static_cast<int64_t>(rhs_spec.size()) != rank ||
      static_cast<int64_t>(out_spec.size()) != rank)
    return ffi::Error::InvalidArgument("cks: attribute lengths do not match the operand rank");
  for (int64_t i = 0; i < rank; ++i)
    if (lhs_spec[i] < 0 || lhs_spec[i] >= rank || rhs_spec[i] < 0 || rhs_spec[i] >= rank ||
        out_spec[i] < 0 || out_spec[i] >= rank)
      return ffi::Error::InvalidArgument("cks: dimension numbers out of range");
  int64_t ls[kMaxSpatial + 2], rs[kMaxSpatial + 2], os[kMaxSpatial + 2];
  row_major_strides(ld, ls);
  row_major_strides(rd, rs);
  row_major_strides(od, os);

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
      return ffi::Error::InvalidArgument("cks: strides and dilations must be positive");
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
    return ffi::Error::InvalidArgument("cks: inconsistent batch/feature sizes or group counts");
  // Every output a dense output of the declared size: checked by Python's
  // shape rule; here only that every read lands inside the operands, which
  // the trimmed ranges guarantee by construction.
  return ffi::Error::Success();
}

}  // namespace cks
