// Decoding the FFI call (buffers + attributes) into a ConvProblem. Shared by
// the CPU and CUDA handlers; Python validates first, this re-checks so that a
// hand-written custom call can never index out of bounds.
#pragma once

#include <cstdint>
#include <string>

#include "cks/dtypes.h"
#include "cks/plan.h"
#include "cks/problem.h"
#include "xla/ffi/api/ffi.h"

namespace cks {

namespace ffi = xla::ffi;

using I64Span = ffi::Span<const int64_t>;

inline ffi::Error decode_problem(const ffi::AnyBuffer& lhs, const ffi::AnyBuffer& rhs,
                                 const ffi::AnyBuffer& out, I64Span window_strides,
                                 I64Span lhs_dilation, I64Span rhs_dilation, I64Span padding_lo,
                                 I64Span lhs_spec, I64Span rhs_spec, I64Span out_spec,
                                 int64_t feature_group_count, int64_t batch_group_count,
                                 ConvProblem* pb) {
  const auto ld = lhs.dimensions(), rd = rhs.dimensions(), od = out.dimensions();
  const int64_t rank = static_cast<int64_t>(ld.size());
  if (rank < 3 || rank > kMaxSpatial + 2 || static_cast<int64_t>(rd.size()) != rank ||
      static_cast<int64_t>(od.size()) != rank)
    return ffi::Error::InvalidArgument("cks: operands must have rank 3, 4 or 5 (1-3 spatial dims)");
  const int64_t nd = rank - 2;
  if (static_cast<int64_t>(window_strides.size()) != nd ||
      static_cast<int64_t>(lhs_dilation.size()) != nd ||
      static_cast<int64_t>(rhs_dilation.size()) != nd ||
      static_cast<int64_t>(padding_lo.size()) != nd ||
      static_cast<int64_t>(lhs_spec.size()) != rank ||
      static_cast<int64_t>(rhs_spec.size()) != rank ||
      static_cast<int64_t>(out_spec.size()) != rank)
    return ffi::Error::InvalidArgument("cks: attribute lengths do not match the operand rank");
  const char* err = make_problem(ld.begin(), rd.begin(), od.begin(), rank, window_strides.begin(),
                                 lhs_dilation.begin(), rhs_dilation.begin(), padding_lo.begin(),
                                 lhs_spec.begin(), rhs_spec.begin(), out_spec.begin(),
                                 feature_group_count, batch_group_count, pb);
  if (err != nullptr) return ffi::Error::InvalidArgument(err);
  if (lhs.element_type() != rhs.element_type())
    return ffi::Error::InvalidArgument("cks: lhs and rhs must have the same dtype");
  return ffi::Error::Success();
}

inline int dtype_code(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return kF32;
    case ffi::DataType::F64: return kF64;
    case ffi::DataType::BF16: return kBF16;
    case ffi::DataType::F16: return kF16;
    default: return kUnsupported;
  }
}

}  // namespace cks
