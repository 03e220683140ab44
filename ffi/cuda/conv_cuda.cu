// CUDA handler of the C-K-S convolution, and the host harness that runs the
// same kernel phases on the CPU (for machines without a GPU).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cks/dtypes.h"
#include "cks/ffi_problem.h"
#include "cks/geometry.h"
#include "cks/plan.h"
#include "cks/problem.h"
#include "kernel.cuh"
#include "xla/ffi/api/ffi.h"

namespace cks {
namespace cuda {
namespace {

// The phase classes of a problem (product of the per-dimension phases),
// in launches of at most kMaxClasses.
std::vector<LaunchParams> make_launches(const ConvProblem& pb) {
  std::vector<Phase> ph[kMaxSpatial];
  for (int d = 0; d < pb.nd; ++d) ph[d] = phases(pb.dim[d]);
  std::vector<LaunchParams> launches;
  for (int d = 0; d < pb.nd; ++d)
    if (ph[d].empty()) return launches;  // empty output
  int64_t idx[kMaxSpatial] = {0, 0, 0};
  while (true) {
    if (launches.empty() || launches.back().nclasses == kMaxClasses) {
      launches.emplace_back();
      launches.back().pb = pb;
      launches.back().nclasses = 0;
    }
    LaunchParams& lp = launches.back();
    ClassDesc& c = lp.cls[lp.nclasses++];
    c.rows = pb.out_batch();
    c.red = pb.group_in();
    for (int d = 0; d < kMaxSpatial; ++d) {
      c.ph[d] = d < pb.nd ? ph[d][idx[d]] : Phase{0, 1, 1, 0, 1, 1, 0, 0, 1};
      if (d < pb.nd) {
        c.rows *= c.ph[d].U;
        c.red *= c.ph[d].T;
      }
    }
    int d = pb.nd - 1;
    while (d >= 0 && ++idx[d] == static_cast<int64_t>(ph[d].size())) idx[d--] = 0;
    if (d < 0) break;
  }
  return launches;
}

struct Grid {
  int64_t x, y, z;
};

Grid grid_of(const LaunchParams& lp) {
  int64_t max_rows = 0;
  for (int i = 0; i < lp.nclasses; ++i) max_rows = std::max(max_rows, lp.cls[i].rows);
  const int64_t col_tiles = (lp.pb.group_out() + kBN - 1) / kBN;
  return {(max_rows + kBM - 1) / kBM, col_tiles * lp.pb.groups(), lp.nclasses};
}

// ---------------------------------------------------------------- device
template <typename Tin, typename Acc, typename Tout>
__global__ void __launch_bounds__(kThreads)
    cks_conv_kernel(const __grid_constant__ LaunchParams p, const Tin* lhs, const Tin* rhs,
                    Tout* out) {
  __shared__ SharedTiles<Acc> s;
  const BlockIdx b = block_coords(p, blockIdx.x, blockIdx.y, blockIdx.z);
  if (!block_active(p, b)) return;
  const int tid = static_cast<int>(threadIdx.x);
  Acc acc[kTM][kTN] = {};
  const int64_t red = p.cls[b.cls].red;
  for (int64_t k0 = 0; k0 < red; k0 += kBK) {
    load_tiles(p, b, tid, k0, lhs, rhs, s);
    __syncthreads();
    multiply_tiles(tid, s, acc);
    __syncthreads();
  }
  store_outputs(p, b, tid, acc, out);
}

template <typename Tin, typename Acc, typename Tout>
cudaError_t launch(cudaStream_t stream, const ConvProblem& pb, const void* lhs, const void* rhs,
                   void* out) {
  for (const LaunchParams& lp : make_launches(pb)) {
    const Grid g = grid_of(lp);
    if (g.x > 0x7fffffff || g.y > 65535) return cudaErrorInvalidConfiguration;
    cks_conv_kernel<Tin, Acc, Tout>
        <<<dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y),
                static_cast<unsigned>(g.z)),
           kThreads, 0, stream>>>(lp, static_cast<const Tin*>(lhs),
                                  static_cast<const Tin*>(rhs), static_cast<Tout*>(out));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------- host harness
// Runs a whole grid on the CPU, block by block; inside a block every thread
// finishes one phase before any thread starts the next (== __syncthreads).
template <typename Tin, typename Acc, typename Tout>
void emulate(const ConvProblem& pb, const void* lhs_v, const void* rhs_v, void* out_v) {
  const Tin* lhs = static_cast<const Tin*>(lhs_v);
  const Tin* rhs = static_cast<const Tin*>(rhs_v);
  Tout* out = static_cast<Tout*>(out_v);
  std::vector<Acc> acc_store(static_cast<size_t>(kThreads) * kTM * kTN);
  SharedTiles<Acc> s;
  for (const LaunchParams& lp : make_launches(pb)) {
    const Grid g = grid_of(lp);
    for (int64_t bz = 0; bz < g.z; ++bz)
      for (int64_t by = 0; by < g.y; ++by)
        for (int64_t bx = 0; bx < g.x; ++bx) {
          const BlockIdx b = block_coords(lp, bx, by, bz);
          if (!block_active(lp, b)) continue;
          std::fill(acc_store.begin(), acc_store.end(), Acc(0));
          auto acc_of = [&](int tid) -> Acc(&)[kTM][kTN] {
            return *reinterpret_cast<Acc(*)[kTM][kTN]>(acc_store.data() + tid * kTM * kTN);
          };
          for (int64_t k0 = 0; k0 < lp.cls[b.cls].red; k0 += kBK) {
            for (int tid = 0; tid < kThreads; ++tid) load_tiles(lp, b, tid, k0, lhs, rhs, s);
            for (int tid = 0; tid < kThreads; ++tid) multiply_tiles(tid, s, acc_of(tid));
          }
          for (int tid = 0; tid < kThreads; ++tid) store_outputs(lp, b, tid, acc_of(tid), out);
        }
  }
}

template <typename Tin, typename Acc, typename Tout>
struct Emulate {
  static void run(const ConvProblem& pb, const void* l, const void* r, void* o) {
    emulate<Tin, Acc, Tout>(pb, l, r, o);
  }
};

template <typename Tin, typename Acc, typename Tout>
struct Launch {
  static void run(cudaError_t* err, cudaStream_t st, const ConvProblem& pb, const void* l,
                  const void* r, void* o) {
    *err = launch<Tin, Acc, Tout>(st, pb, l, r, o);
  }
};

ffi::Error CksConvCuda(cudaStream_t stream, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                       ffi::Result<ffi::AnyBuffer> out, I64Span window_strides,
                       I64Span lhs_dilation, I64Span rhs_dilation, I64Span padding_lo,
                       I64Span lhs_spec, I64Span rhs_spec, I64Span out_spec,
                       int64_t feature_group_count, int64_t batch_group_count) {
  ConvProblem pb;
  ffi::Error e = decode_problem(lhs, rhs, *out, window_strides, lhs_dilation, rhs_dilation,
                                padding_lo, lhs_spec, rhs_spec, out_spec, feature_group_count,
                                batch_group_count, &pb);
  if (e.failure()) return e;
  if (out->element_count() == 0) return ffi::Error::Success();
  cudaError_t err = cudaSuccess;
  if (!dispatch_dtypes<Launch>(dtype_code(lhs.element_type()), dtype_code(out->element_type()), &err,
                        stream, pb, lhs.untyped_data(), rhs.untyped_data(),
                        out->untyped_data()))
    return ffi::Error::InvalidArgument("cks: unsupported dtype combination");
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("cks CUDA kernel: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace cuda
}  // namespace cks

XLA_FFI_DEFINE_HANDLER_SYMBOL(CksConvCudaHandler, cks::cuda::CksConvCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
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

// Host harness entry point (ctypes): runs the CUDA kernel's phases on the
// CPU. Returns nullptr or an error message.
extern "C" const char* cks_cuda_emulate(int in_dtype, int out_dtype, const void* lhs,
                                        const int64_t* lhs_dims, const void* rhs,
                                        const int64_t* rhs_dims, void* out,
                                        const int64_t* out_dims, int64_t rank,
                                        const int64_t* window_strides,
                                        const int64_t* lhs_dilation,
                                        const int64_t* rhs_dilation, const int64_t* padding_lo,
                                        const int64_t* lhs_spec, const int64_t* rhs_spec,
                                        const int64_t* out_spec, int64_t feature_group_count,
                                        int64_t batch_group_count) {
  cks::ConvProblem pb;
  if (rank < 3 || rank > cks::kMaxSpatial + 2) return "cks: rank must be 3, 4 or 5";
  const char* err = cks::make_problem(lhs_dims, rhs_dims, out_dims, rank, window_strides,
                                      lhs_dilation, rhs_dilation, padding_lo, lhs_spec, rhs_spec,
                                      out_spec, feature_group_count, batch_group_count, &pb);
  if (err != nullptr) return err;
  for (int64_t i = 0; i < rank; ++i)
    if (out_dims[i] == 0) return nullptr;
  if (!cks::dispatch_dtypes<cks::cuda::Emulate>(in_dtype, out_dtype, pb, lhs, rhs, out))
    return "cks: unsupported dtype combination";
  return nullptr;
}
