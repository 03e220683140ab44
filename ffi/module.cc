// Python module `cks_jax._cks`: the FFI handler capsules and a read-only view
// of the plan (used by `cks_jax.explain` and by the geometry tests), so the
// index math exists once, in C++.
#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "cks/geometry.h"
#include "cks/dtypes.h"
#include "cks/plan.h"
#include "cks/problem.h"
#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* CksConvCpuHandler(XLA_FFI_CallFrame*);

namespace cks {
bool cpu_scratch_bytes(const ConvProblem& pb, int in_code, int out_code, int64_t workers,
                       int64_t* shared, int64_t* per_thread, const char** path);
int64_t cpu_pool_threads();
int cpu_isa();
bool cpu_bf16_pairs();
bool cpu_bf16_amx();
bool cpu_bf16_depthwise();
int64_t cpu_widened_held_bytes();
void cpu_widened_release();
int64_t cpu_packed_b_held_bytes();
int64_t cpu_packed_b_page_bytes();
void cpu_packed_b_release();
}

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

int dtype_code(const std::string& name) {
  if (name == "float32") return cks::kF32;
  if (name == "float64") return cks::kF64;
  if (name == "bfloat16") return cks::kBF16;
  if (name == "float16") return cks::kF16;
  throw nb::value_error("dtype: float32, float64, bfloat16 or float16");
}

// Scratch bytes of one call of the CPU kernel, from the same code that
// allocates it (conv_cpu.cc): (packed B shared by all tasks, buffers per
// thread that runs tasks, the name of the kernel path it takes). Arguments as
// the FFI call's, shapes row-major.
nb::tuple cpu_scratch(std::vector<int64_t> lhs_shape, std::vector<int64_t> rhs_shape,
                      std::vector<int64_t> out_shape, std::vector<int64_t> window_strides,
                      std::vector<int64_t> lhs_dilation, std::vector<int64_t> rhs_dilation,
                      std::vector<int64_t> padding_lo, std::vector<int64_t> lhs_spec,
                      std::vector<int64_t> rhs_spec, std::vector<int64_t> out_spec,
                      int64_t feature_group_count, int64_t batch_group_count,
                      const std::string& in_dtype, const std::string& out_dtype,
                      int64_t workers) {
  const size_t rank = lhs_shape.size(), nd = rank - 2;
  if (rank < 3 || rhs_shape.size() != rank || out_shape.size() != rank ||
      lhs_spec.size() != rank || rhs_spec.size() != rank || out_spec.size() != rank ||
      window_strides.size() != nd || lhs_dilation.size() != nd || rhs_dilation.size() != nd ||
      padding_lo.size() != nd)
    throw nb::value_error("cpu_scratch: inconsistent ranks");
  cks::ConvProblem pb;
  const char* err = cks::make_problem(
      lhs_shape.data(), rhs_shape.data(), out_shape.data(), static_cast<int64_t>(rank),
      window_strides.data(), lhs_dilation.data(), rhs_dilation.data(), padding_lo.data(),
      lhs_spec.data(), rhs_spec.data(), out_spec.data(), feature_group_count, batch_group_count,
      &pb);
  if (err != nullptr) throw nb::value_error(err);
  int64_t shared = 0, per_thread = 0;
  const char* path = "";
  if (!cks::cpu_scratch_bytes(pb, dtype_code(in_dtype), dtype_code(out_dtype),
                              std::max<int64_t>(1, workers), &shared, &per_thread, &path))
    throw nb::value_error("cpu_scratch: unsupported dtype combination");
  return nb::make_tuple(shared, per_thread, std::string(path));
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
  m.def("cpu_scratch", &cpu_scratch);
  // Threads of XLA's intra-op pool seen by the last CPU kernel call; 0 before one.
  m.def("cpu_pool_threads", &cks::cpu_pool_threads);
  // The CPU kernel's instruction set: 2 AVX-512F, 1 AVX2+FMA, 0 portable C++.
  m.def("cpu_isa", &cks::cpu_isa);
  // Whether bfloat16 operands run on the AVX512_BF16 pair kernel where it applies.
  m.def("cpu_bf16_pairs", &cks::cpu_bf16_pairs);
  // Whether those pair paths multiply on AMX tiles (AMX-BF16, granted by the OS).
  m.def("cpu_bf16_amx", &cks::cpu_bf16_amx);
  // Whether bfloat16 depthwise convolutions are read in place (AVX-512BW/VL).
  m.def("cpu_bf16_depthwise", &cks::cpu_bf16_depthwise);
  // Bytes of the float32 copies of 16-bit operands held for reuse between
  // calls, and freeing them (conv_cpu.cc: WidenedPool).
  m.def("cpu_widened_held_bytes", &cks::cpu_widened_held_bytes);
  m.def("cpu_widened_release", &cks::cpu_widened_release);
  // Bytes of the packed B buffers (2 MB pages) held for reuse between calls,
  // and freeing them (scratch.h: HugePool).
  m.def("cpu_packed_b_held_bytes", &cks::cpu_packed_b_held_bytes);
  m.def("cpu_packed_b_release", &cks::cpu_packed_b_release);
  // The unit those buffers are held in (HugePool::kPage): explain's summary.
  m.def("cpu_packed_b_page_bytes", &cks::cpu_packed_b_page_bytes);
}
