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
#include "mma_layout.cuh"
#include "mma_model.cuh"
#include "mma_path.cuh"
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
// Whether CUDA can launch grid g (x up to 2^31 - 1, y and z up to 65535).
bool launchable(const Grid& g) { return g.x <= 0x7fffffff && g.y <= 65535 && g.z <= 65535; }

// ---------------------------------------------------------------- device
// Tiles picks the path: SimtTiles (f32, f64) or MmaTiles (bf16, f16).
template <typename Tin, typename Acc, typename Tout>
__global__ void __launch_bounds__(kThreads)
    cks_conv_kernel(const __grid_constant__ LaunchParams p, const Tin* lhs, const Tin* rhs,
                    Tout* out) {
  using Tiles = typename TilesFor<Tin, Acc>::type;
  __shared__ Tiles s;
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
  store_outputs<typename Tiles::Layout>(p, b, tid, acc, out);
}

template <typename Tin, typename Acc, typename Tout>
cudaError_t launch(cudaStream_t stream, const ConvProblem& pb, const void* lhs, const void* rhs,
                   void* out) {
  for (const LaunchParams& lp : make_launches(pb)) {
    const Grid g = grid_of(lp);
    if (!launchable(g)) return cudaErrorInvalidConfiguration;
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
// Phase 2 in the harness: the SIMT product thread by thread, the tensor-core
// product warp by warp through the model of the instruction.
template <typename Acc, typename AccOf>
void emulate_multiply(const SimtTiles<Acc>& s, AccOf&& acc_of) {
  for (int tid = 0; tid < kThreads; ++tid) multiply_tiles(tid, s, acc_of(tid));
}
template <typename Tin, typename AccOf>
void emulate_multiply(const MmaTiles<Tin>& s, AccOf&& acc_of) {
  multiply_tiles_model(s, acc_of);
}

// The accumulator files of a block's threads.
template <typename Acc>
struct BlockAccumulators {
  std::vector<Acc> store = std::vector<Acc>(static_cast<size_t>(kThreads) * kTM * kTN);
  Acc (&operator()(int tid))[kTM][kTN] {
    return *reinterpret_cast<Acc(*)[kTM][kTN]>(store.data() + tid * kTM * kTN);
  }
};

// Runs a whole grid on the CPU, block by block; inside a block every thread
// (every warp, for the tensor-core product) finishes one phase before any
// starts the next (== __syncthreads). Returns the path that ran (kPath).
template <typename Tin, typename Acc, typename Tout>
int emulate(const ConvProblem& pb, const void* lhs_v, const void* rhs_v, void* out_v) {
  using Tiles = typename TilesFor<Tin, Acc>::type;
  const Tin* lhs = static_cast<const Tin*>(lhs_v);
  const Tin* rhs = static_cast<const Tin*>(rhs_v);
  Tout* out = static_cast<Tout*>(out_v);
  BlockAccumulators<Acc> acc;
  Tiles s;
  for (const LaunchParams& lp : make_launches(pb)) {
    const Grid g = grid_of(lp);
    for (int64_t bz = 0; bz < g.z; ++bz)
      for (int64_t by = 0; by < g.y; ++by)
        for (int64_t bx = 0; bx < g.x; ++bx) {
          const BlockIdx b = block_coords(lp, bx, by, bz);
          if (!block_active(lp, b)) continue;
          std::fill(acc.store.begin(), acc.store.end(), Acc(0));
          for (int64_t k0 = 0; k0 < lp.cls[b.cls].red; k0 += kBK) {
            for (int tid = 0; tid < kThreads; ++tid) load_tiles(lp, b, tid, k0, lhs, rhs, s);
            emulate_multiply(s, acc);
          }
          for (int tid = 0; tid < kThreads; ++tid)
            store_outputs<typename Tiles::Layout>(lp, b, tid, acc(tid), out);
        }
  }
  return Tiles::kPath;
}

template <typename Tin, typename Acc, typename Tout>
struct Emulate {
  static void run(int* path, const ConvProblem& pb, const void* l, const void* r, void* o) {
    *path = emulate<Tin, Acc, Tout>(pb, l, r, o);
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
// CPU and sets *path to the path that ran (0 = SIMT, 1 = tensor cores).
// Returns nullptr or an error message.
extern "C" const char* cks_cuda_emulate(int in_dtype, int out_dtype, const void* lhs,
                                        const int64_t* lhs_dims, const void* rhs,
                                        const int64_t* rhs_dims, void* out,
                                        const int64_t* out_dims, int64_t rank,
                                        const int64_t* window_strides,
                                        const int64_t* lhs_dilation,
                                        const int64_t* rhs_dilation, const int64_t* padding_lo,
                                        const int64_t* lhs_spec, const int64_t* rhs_spec,
                                        const int64_t* out_spec, int64_t feature_group_count,
                                        int64_t batch_group_count, int* path) {
  *path = -1;
  cks::ConvProblem pb;  // make_problem checks the rank before it reads any array
  const char* err = cks::make_problem(lhs_dims, rhs_dims, out_dims, rank, window_strides,
                                      lhs_dilation, rhs_dilation, padding_lo, lhs_spec, rhs_spec,
                                      out_spec, feature_group_count, batch_group_count, &pb);
  if (err != nullptr) return err;
  for (int64_t i = 0; i < rank; ++i)
    if (out_dims[i] == 0) return nullptr;
  if (!cks::dispatch_dtypes<cks::cuda::Emulate>(in_dtype, out_dtype, path, pb, lhs, rhs, out))
    return "cks: unsupported dtype combination";
  return nullptr;
}

// The largest launch grid of a problem (ctypes, cuda.check_grid: the Python
// side refuses at trace time what launch() could not launch), each dimension
// the maximum over the problem's launches, and whether every launch fits.
// Returns nullptr or an error message.
extern "C" const char* cks_cuda_grid(const int64_t* lhs_dims, const int64_t* rhs_dims,
                                     const int64_t* out_dims, int64_t rank,
                                     const int64_t* window_strides, const int64_t* lhs_dilation,
                                     const int64_t* rhs_dilation, const int64_t* padding_lo,
                                     const int64_t* lhs_spec, const int64_t* rhs_spec,
                                     const int64_t* out_spec, int64_t feature_group_count,
                                     int64_t batch_group_count, int64_t* grid, int* fits) {
  grid[0] = grid[1] = grid[2] = 0;
  *fits = 1;
  cks::ConvProblem pb;  // make_problem checks the rank before it reads any array
  const char* err = cks::make_problem(lhs_dims, rhs_dims, out_dims, rank, window_strides,
                                      lhs_dilation, rhs_dilation, padding_lo, lhs_spec, rhs_spec,
                                      out_spec, feature_group_count, batch_group_count, &pb);
  if (err != nullptr) return err;
  for (const cks::cuda::LaunchParams& lp : cks::cuda::make_launches(pb)) {
    const cks::cuda::Grid g = cks::cuda::grid_of(lp);
    grid[0] = std::max(grid[0], g.x);
    grid[1] = std::max(grid[1], g.y);
    grid[2] = std::max(grid[2], g.z);
    *fits = *fits && cks::cuda::launchable(g);
  }
  return nullptr;
}

// ---------------------------------------------------------------- tensor-core checks
// Test hooks (ctypes) for the tensor-core path's pieces, below the whole grid.

// The ISA fragment layout as mma_layout.cuh writes it: operand 0 = A,
// 1 = B, 2 = C/D; element i of lane `lane` -> (row, col). False when out of
// range.
extern "C" int cks_cuda_mma_layout(int operand, int lane, int i, int* row, int* col) {
  namespace m = cks::cuda::mma;
  if (lane < 0 || lane >= m::kWarp || i < 0) return 0;
  if (operand == 0 && i < 2 * m::kARegs) {
    *row = m::a_row(lane, i), *col = m::a_col(lane, i);
  } else if (operand == 1 && i < 2 * m::kBRegs) {
    *row = m::b_row(lane, i), *col = m::b_col(lane, i);
  } else if (operand == 2 && i < m::kCRegs) {
    *row = m::c_row(lane, i), *col = m::c_col(lane, i);
  } else {
    return 0;
  }
  return 1;
}

// The host model of one instruction on the 32 lanes' registers a[32][4],
// b[32][2] (16-bit pairs) and c[32][4] (overwritten with d). False for a
// dtype other than bfloat16 (2) or float16 (3).
extern "C" int cks_cuda_mma_model(int in_dtype, const uint32_t* a, const uint32_t* b, float* c) {
  using namespace cks::cuda;
  WarpMma w;
  std::copy(a, a + sizeof(w.a) / sizeof(uint32_t), &w.a[0][0]);
  std::copy(b, b + sizeof(w.b) / sizeof(uint32_t), &w.b[0][0]);
  std::copy(c, c + sizeof(w.c) / sizeof(float), &w.c[0][0]);
  if (in_dtype == cks::kBF16)
    mma_m16n8k16_model<cks::bf16>(w);
  else if (in_dtype == cks::kF16)
    mma_m16n8k16_model<cks::f16>(w);
  else
    return 0;
  std::copy(&w.c[0][0], &w.c[0][0] + sizeof(w.c) / sizeof(float), c);
  return 1;
}

namespace {
template <typename Tin>
void mma_block(const uint16_t* a, const uint16_t* b, float* c) {
  using namespace cks::cuda;
  MmaTiles<Tin> s;
  for (int kq = 0; kq < kBK; kq += kLoadK)  // as load_tiles hands them over
    for (int x = 0; x < kBM; ++x) {
      Tin va[kLoadK], vb[kLoadK];
      for (int j = 0; j < kLoadK; ++j) {
        va[j] = Tin{a[x * kBK + kq + j]};
        vb[j] = Tin{b[(kq + j) * kBN + x]};
      }
      s.put_a(kq, x, va);
      s.put_b(kq, x, vb);
    }
  BlockAccumulators<float> acc;
  for (int tid = 0; tid < kThreads; ++tid)
    for (int i = 0; i < kTM; ++i)
      for (int j = 0; j < kTN; ++j)
        acc(tid)[i][j] = c[MmaLayout::row(tid, i) * kBN + MmaLayout::col(tid, j)];
  multiply_tiles_model(s, acc);
  for (int tid = 0; tid < kThreads; ++tid)
    for (int i = 0; i < kTM; ++i)
      for (int j = 0; j < kTN; ++j)
        c[MmaLayout::row(tid, i) * kBN + MmaLayout::col(tid, j)] = acc(tid)[i][j];
}
}  // namespace

// One block tile of the tensor-core product as the harness runs it: A
// (kBM x kBK, row-major 16-bit bits) and B (kBK x kBN) through the shared
// tiles, the warps' fragment loads and the instruction model, C (kBM x kBN
// float32) in and out through MmaLayout. False for a dtype other than
// bfloat16 or float16.
extern "C" int cks_cuda_mma_block(int in_dtype, const uint16_t* a, const uint16_t* b, float* c) {
  if (in_dtype == cks::kBF16) return mma_block<cks::bf16>(a, b, c), 1;
  if (in_dtype == cks::kF16) return mma_block<cks::f16>(a, b, c), 1;
  return 0;
}

// The block tile shape (kBM, kBN, kBK), for the tests.
extern "C" void cks_cuda_block_tile(int* bm, int* bn, int* bk) {
  *bm = cks::cuda::kBM, *bn = cks::cuda::kBN, *bk = cks::cuda::kBK;
}
