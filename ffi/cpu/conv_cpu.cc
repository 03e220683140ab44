// CPU handler of the C-K-S convolution.
//
// Every dense sub-problem of the plan (plan.h) is a GEMM
//     out[rows, Fg] = A[rows, taps*Cg] * B[taps*Cg, Fg]
// whose operands are gathered ("packed") straight from the unpadded,
// undilated tensors. Row, reduction and column offsets are separable, so a
// packed element is lhs[row_off[r] + red_off[k]]: no padded or zero-inserted
// copy exists anywhere, and any layout (dimension_numbers) is read in place.
// The GEMM is a classic packed, register-blocked one; tasks (sub-problem x
// group x row block) run on XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cks/dtypes.h"
#include "cks/ffi_problem.h"
#include "cks/plan.h"
#include "gemm.h"
#include "xla/ffi/api/ffi.h"

namespace cks {
namespace {

// ---------------------------------------------------------------- threading
// The caller runs tasks too and only waits for tasks a helper has started,
// so this cannot deadlock even when every pool thread is busy or the caller
// is itself a pool thread.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;
  std::mutex mu;
  std::condition_variable cv;

  void work() {
    int64_t i;
    while ((i = next.fetch_add(1)) < n) {
      (*fn)(i);
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

void parallel_for(ffi::ThreadPool* pool, int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  int64_t helpers = 0;
  if (pool != nullptr && n > 1) helpers = std::min<int64_t>(pool->num_threads(), n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto st = std::make_shared<ParallelState>();
  st->n = n;
  st->fn = &fn;
  for (int64_t h = 0; h < helpers; ++h) pool->Schedule([st] { st->work(); });
  st->work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

using gemm::gemm_block;
using gemm::kKC;
using gemm::kMC;
using gemm::kNC;
using gemm::Tile;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------- the conv
template <typename Tin, typename Acc, typename Tout>
struct CksConv {
  const ConvProblem& pb;
  const Plan& plan;
  const Tin* lhs;
  const Tin* rhs;
  Tout* out;

  struct Task {
    int64_t sp, group, row0, row1;
  };

  std::vector<Task> tasks() const {
    std::vector<Task> ts;
    for (int64_t s = 0; s < static_cast<int64_t>(plan.subproblems.size()); ++s) {
      const int64_t rows = plan.subproblems[s].rows;
      for (int64_t g = 0; g < pb.groups(); ++g)
        for (int64_t r = 0; r < rows; r += kMC) ts.push_back({s, g, r, std::min(rows, r + kMC)});
    }
    return ts;
  }

  void run(const Task& t) const {
    constexpr int MR = Tile<Acc>::MR, NR = Tile<Acc>::NR;
    const SubProblem& sp = plan.subproblems[t.sp];
    const int nd = pb.nd;
    const int64_t Cg = pb.group_in(), Fg = pb.group_out();
    const int64_t mc = t.row1 - t.row0;
    const int64_t red = sp.taps * Cg;
    // Group offsets: feature groups pick an lhs channel block, batch groups
    // an lhs batch block.
    const int64_t lhs_group = pb.feature_groups > 1 ? t.group * Cg * pb.lhs_c
                                                    : t.group * pb.out_batch() * pb.lhs_n;

    thread_local std::vector<int64_t> lhs_row, out_row, lhs_red, rhs_red;
    thread_local std::vector<Acc> Ap, Bp, Cbuf;
    lhs_row.assign(round_up(mc, MR), -1);
    out_row.resize(mc);
    // Rows: (n, j_0, ..., j_{nd-1}) row-major.
    for (int64_t r = 0; r < mc; ++r) {
      int64_t rem = t.row0 + r, lo = lhs_group, oo = 0;
      for (int d = nd - 1; d >= 0; --d) {
        const int64_t cnt = sp.seg[d].count, j = rem % cnt;
        rem /= cnt;
        const Phase& ph = *sp.phase[d];
        const int64_t u = sp.seg[d].u0 + j;
        lo += (ph.base + ph.ustride * u + ph.tstride * sp.seg[d].t_lo) * pb.lhs_sp[d];
        oo += (ph.o0 + ph.L * u) * pb.out_sp[d];
      }
      lhs_row[r] = lo + rem * pb.lhs_n;
      out_row[r] = oo + rem * pb.out_n;
    }
    // Reduction: (t_0, ..., t_{nd-1}, c) row-major, relative to t_lo.
    lhs_red.resize(red);
    rhs_red.resize(red);
    for (int64_t k = 0; k < red; ++k) {
      int64_t rem = k / Cg, li = (k % Cg) * pb.lhs_c, ri = (k % Cg) * pb.rhs_i;
      for (int d = nd - 1; d >= 0; --d) {
        const int64_t cnt = sp.seg[d].t_hi - sp.seg[d].t_lo, tt = rem % cnt;
        rem /= cnt;
        const Phase& ph = *sp.phase[d];
        li += ph.tstride * tt * pb.lhs_sp[d];
        ri += (ph.k0 + ph.kstep * (sp.seg[d].t_lo + tt)) * pb.rhs_sp[d];
      }
      lhs_red[k] = li;
      rhs_red[k] = ri;
    }
    const int64_t mc_pad = round_up(mc, MR);
    for (int64_t nc0 = 0; nc0 < Fg; nc0 += kNC) {
      const int64_t nc = std::min(kNC, Fg - nc0), nc_pad = round_up(nc, NR);
      Cbuf.assign(mc_pad * nc_pad, Acc(0));
      for (int64_t kc0 = 0; kc0 < red; kc0 += kKC) {
        const int64_t kc = std::min(kKC, red - kc0);
        // Pack B: NR-column panels [kc][NR], zero-filled past nc.
        Bp.resize(nc_pad * kc);
        for (int64_t jr = 0; jr < nc_pad; jr += NR) {
          Acc* dst = Bp.data() + jr * kc;
          for (int64_t p = 0; p < kc; ++p) {
            const Tin* src = rhs + rhs_red[kc0 + p];
            for (int j = 0; j < NR; ++j) {
              const int64_t f = nc0 + jr + j;
              dst[p * NR + j] =
                  (jr + j < nc) ? load<Acc>(src[(t.group * Fg + f) * pb.rhs_o]) : Acc(0);
            }
          }
        }
        // Pack A: MR-row panels [kc][MR], zero-filled past mc.
        Ap.resize(mc_pad * kc);
        for (int64_t ir = 0; ir < mc_pad; ir += MR) {
          Acc* dst = Ap.data() + ir * kc;
          for (int i = 0; i < MR; ++i) {
            const int64_t base = lhs_row[ir + i];
            if (base < 0) {
              for (int64_t p = 0; p < kc; ++p) dst[p * MR + i] = Acc(0);
            } else {
              const int64_t* ro = lhs_red.data() + kc0;
              for (int64_t p = 0; p < kc; ++p) dst[p * MR + i] = load<Acc>(lhs[base + ro[p]]);
            }
          }
        }
        gemm_block(mc_pad, nc_pad, kc, Ap.data(), Bp.data(), Cbuf.data(), nc_pad);
      }
      for (int64_t r = 0; r < mc; ++r) {
        Tout* dst = out + out_row[r];
        const Acc* src = Cbuf.data() + r * nc_pad;
        for (int64_t j = 0; j < nc; ++j)
          dst[(t.group * Fg + nc0 + j) * pb.out_c] = store<Tout, Acc>(src[j]);
      }
    }
  }
};

template <typename Tin, typename Acc, typename Tout>
void run_conv(const ConvProblem& pb, const void* lhs, const void* rhs, void* out,
              ffi::ThreadPool* pool) {
  const Plan plan = make_plan(pb);
  CksConv<Tin, Acc, Tout> conv{pb, plan, static_cast<const Tin*>(lhs),
                               static_cast<const Tin*>(rhs), static_cast<Tout*>(out)};
  const auto ts = conv.tasks();
  parallel_for(pool, static_cast<int64_t>(ts.size()), [&](int64_t i) { conv.run(ts[i]); });
}

template <typename Tin, typename Acc, typename Tout>
struct RunConv {
  static void run(const ConvProblem& pb, const void* lhs, const void* rhs, void* out,
                  ffi::ThreadPool* pool) {
    run_conv<Tin, Acc, Tout>(pb, lhs, rhs, out, pool);
  }
};

ffi::Error CksConvCpu(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                      ffi::Result<ffi::AnyBuffer> out, I64Span window_strides,
                      I64Span lhs_dilation, I64Span rhs_dilation, I64Span padding_lo,
                      I64Span lhs_spec, I64Span rhs_spec, I64Span out_spec,
                      int64_t feature_group_count, int64_t batch_group_count) {
  ConvProblem pb;
  ffi::Error err = decode_problem(lhs, rhs, *out, window_strides, lhs_dilation, rhs_dilation,
                                  padding_lo, lhs_spec, rhs_spec, out_spec, feature_group_count,
                                  batch_group_count, &pb);
  if (err.failure()) return err;
  if (out->element_count() == 0) return ffi::Error::Success();
  if (!dispatch_dtypes<RunConv>(dtype_code(lhs.element_type()), dtype_code(out->element_type()),
                                pb, lhs.untyped_data(), rhs.untyped_data(), out->untyped_data(),
                                &pool))
    return ffi::Error::InvalidArgument(
        "cks: unsupported dtype combination (inputs f32/f64/bf16/f16; output the input dtype, "
        "or f32 for 16-bit inputs)");
  return ffi::Error::Success();
}

}  // namespace
}  // namespace cks

XLA_FFI_DEFINE_HANDLER_SYMBOL(CksConvCpuHandler, cks::CksConvCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<cks::I64Span>("window_strides")
                                  .Attr<cks::I64Span>("lhs_dilation")
                                  .Attr<cks::I64Span>("rhs_dilation")
                                  .Attr<cks::I64Span>("padding_lo")
                                  .Attr<cks::I64Span>("lhs_spec")
                                  .Attr<cks::I64Span>("rhs_spec")
                                  .Attr<cks::I64Span>("out_spec")
                                  .Attr<int64_t>("feature_group_count")
                                  .Attr<int64_t>("batch_group_count"));
