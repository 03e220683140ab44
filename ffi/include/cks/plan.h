// The whole convolution as a list of dense sub-problems: the product over the
// spatial dimensions of the per-dimension segments (geometry.h). Host-only;
// shared by every backend and by `cks_jax.explain`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cks/geometry.h"

namespace cks {

constexpr int kMaxSpatial = 3;

// A convolution with lax.conv_general_dilated semantics. Layout is free:
// every operand is addressed through element strides, so any
// dimension_numbers run without a transpose.
struct ConvProblem {
  int nd = 0;                 // number of spatial dimensions (1..3)
  Dim dim[kMaxSpatial];
  int64_t batch = 0;          // lhs batch size
  int64_t in_feat = 0;        // lhs feature size
  int64_t out_feat = 0;       // rhs output-feature size
  int64_t feature_groups = 1;
  int64_t batch_groups = 1;
  // element strides: lhs (batch, feature, spatial...), rhs (out, in,
  // spatial...), out (batch, feature, spatial...)
  int64_t lhs_n = 0, lhs_c = 0, lhs_sp[kMaxSpatial] = {0, 0, 0};
  int64_t rhs_o = 0, rhs_i = 0, rhs_sp[kMaxSpatial] = {0, 0, 0};
  // Offset of rhs's first tap from its buffer's start: 0, or where the
  // spatial dimensions are read in reverse (reverse_rhs), the last tap's.
  int64_t rhs_shift = 0;
  int64_t out_n = 0, out_c = 0, out_sp[kMaxSpatial] = {0, 0, 0};

  CKS_HD int64_t groups() const { return feature_groups > 1 ? feature_groups : batch_groups; }
  CKS_HD int64_t group_in() const { return in_feat / feature_groups; }  // Cg
  CKS_HD int64_t group_out() const { return out_feat / groups(); }      // Fg
  CKS_HD int64_t out_batch() const { return batch / batch_groups; }     // Nb
};

// One dense sub-problem: a segment per spatial dimension. Its GEMM is
// (out_batch x prod(count)) rows by (prod(t_hi - t_lo) x Cg) reduction by Fg.
struct SubProblem {
  const Phase* phase[kMaxSpatial];
  Segment seg[kMaxSpatial];
  int64_t rows = 0;
  int64_t taps = 0;
};

struct Plan {
  std::vector<Phase> phases[kMaxSpatial];
  std::vector<Segment> segments[kMaxSpatial];
  std::vector<SubProblem> subproblems;  // every output in exactly one
};

// The CPU plan: K phases with the S split read through strides (see
// phases()), cut into trimmed segments.
inline Plan make_plan(const ConvProblem& pb, bool split_dilation = false) {
  Plan plan;
  for (int d = 0; d < pb.nd; ++d) {
    plan.phases[d] = phases(pb.dim[d], split_dilation);
    plan.segments[d] = segments(pb.dim[d], plan.phases[d]);
  }
  int64_t idx[kMaxSpatial] = {0, 0, 0};
  for (int d = 0; d < pb.nd; ++d)
    if (plan.segments[d].empty()) return plan;  // an empty output
  while (true) {
    SubProblem sp;
    sp.rows = pb.out_batch();
    sp.taps = 1;
    for (int d = 0; d < pb.nd; ++d) {
      sp.seg[d] = plan.segments[d][idx[d]];
      sp.phase[d] = &plan.phases[d][sp.seg[d].phase];
      sp.rows *= sp.seg[d].count;
      sp.taps *= sp.seg[d].t_hi - sp.seg[d].t_lo;
    }
    plan.subproblems.push_back(sp);
    int d = pb.nd - 1;
    while (d >= 0 && ++idx[d] == static_cast<int64_t>(plan.segments[d].size())) idx[d--] = 0;
    if (d < 0) break;
  }
  return plan;
}

// Multiply-add counts for `explain`: what C-K-S executes (products of real
// elements only) and what the direct method over the dilated, padded input
// executes (every tap of every output).
struct PlanStats {
  int64_t phases = 1;          // C-K-S phases (K x S split), product over dims
  int64_t subproblems = 0;     // dense sub-problems with work
  int64_t zero_subproblems = 0;  // sub-problems whose outputs are all zero
  double cks_macs = 0;
  double direct_macs = 0;
};

inline PlanStats plan_stats(const ConvProblem& pb, const Plan& plan) {
  PlanStats st;
  const double per_tap = static_cast<double>(pb.group_in()) * pb.out_feat;
  for (int d = 0; d < pb.nd; ++d) st.phases *= static_cast<int64_t>(phases(pb.dim[d]).size());
  for (const SubProblem& sp : plan.subproblems) {
    if (sp.taps == 0) {
      ++st.zero_subproblems;
    } else {
      ++st.subproblems;
      st.cks_macs += static_cast<double>(sp.rows) * sp.taps * per_tap;
    }
  }
  double direct = static_cast<double>(pb.out_batch()) * per_tap;
  for (int d = 0; d < pb.nd; ++d) direct *= static_cast<double>(pb.dim[d].out_size) * pb.dim[d].k_size;
  st.direct_macs = direct;
  return st;
}

}  // namespace cks
