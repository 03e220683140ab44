// Python module `cks_jax._cks`: the FFI handler capsules and a read-only view
// of the plan (used by `cks_jax.explain` and by the geometry tests), so the
// index math exists once, in C++.
#include <cstdint>
#include <tuple>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "cks/geometry.h"
#include "cks/plan.h"
#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* CksConvCpuHandler(XLA_FFI_CallFrame*);

namespace nb = nanobind;

namespace {

cks::Dim make_dim(int64_t in_size, int64_t k_size, int64_t out_size, int64_t stride,
                  int64_t lhs_dil, int64_t rhs_dil, int64_t pad_lo) {
  return cks::Dim{in_size, k_size, out_size, stride, lhs_dil, rhs_dil, pad_lo};
}

// Per-dimension plan: phases as (o0, L, U, k0, kstep, T, base, ustride,
// tstride) and segments as (phase, u0, count, t_lo, t_hi).
nb::tuple geometry_1d(int64_t in_size, int64_t k_size, int64_t out_size, int64_t stride,
                      int64_t lhs_dil, int64_t rhs_dil, int64_t pad_lo, bool split_dilation) {
  const cks::Dim dm = make_dim(in_size, k_size, out_size, stride, lhs_dil, rhs_dil, pad_lo);
  const auto ph = cks::phases(dm, split_dilation);
  const auto sg = cks::segments(dm, ph);
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                         int64_t>>
      phs;
  for (const auto& p : ph)
    phs.emplace_back(p.o0, p.L, p.U, p.k0, p.kstep, p.T, p.base, p.ustride, p.tstride);
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> sgs;
  for (const auto& s : sg) sgs.emplace_back(s.phase, s.u0, s.count, s.t_lo, s.t_hi);
  return nb::make_tuple(phs, sgs);
}

// Summary of the whole plan for `explain`: (phases, sub-problems with work,
// all-zero sub-problems, C-K-S multiply-adds, direct multiply-adds).
nb::tuple plan_stats(std::vector<int64_t> in_sizes, std::vector<int64_t> k_sizes,
                     std::vector<int64_t> out_sizes, std::vector<int64_t> strides,
                     std::vector<int64_t> lhs_dil, std::vector<int64_t> rhs_dil,
                     std::vector<int64_t> pad_lo, int64_t out_batch, int64_t group_in,
                     int64_t out_feat) {
  cks::ConvProblem pb;
  pb.nd = static_cast<int>(in_sizes.size());
  if (pb.nd < 1 || pb.nd > cks::kMaxSpatial) throw nb::value_error("1 to 3 spatial dimensions");
  pb.batch = out_batch;
  pb.in_feat = group_in;
  pb.out_feat = out_feat;
  for (int d = 0; d < pb.nd; ++d)
    pb.dim[d] = make_dim(in_sizes[d], k_sizes[d], out_sizes[d], strides[d], lhs_dil[d],
                         rhs_dil[d], pad_lo[d]);
  const cks::Plan plan = cks::make_plan(pb);
  const cks::PlanStats st = cks::plan_stats(pb, plan);
  return nb::make_tuple(st.phases, st.subproblems, st.zero_subproblems, st.cks_macs,
                        st.direct_macs);
}

}  // namespace

NB_MODULE(_cks, m) {
  m.attr("__version__") = CKS_VERSION;
  m.def("registrations", []() {
    nb::dict d;
    d["cks_conv_cpu"] = nb::capsule(reinterpret_cast<void*>(&CksConvCpuHandler));
    return d;
  });
  m.def("geometry_1d", &geometry_1d, nb::arg("in_size"), nb::arg("k_size"), nb::arg("out_size"),
        nb::arg("stride"), nb::arg("lhs_dil"), nb::arg("rhs_dil"), nb::arg("pad_lo"),
        nb::arg("split_dilation") = true);
  m.def("plan_stats", &plan_stats);
}
