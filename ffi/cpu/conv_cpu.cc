// CPU handler of the C-K-S convolution.
//
// Every dense sub-problem of the plan (plan.h) is a GEMM
//     out[rows, Fg] = A[rows, taps*Cg] * B[taps*Cg, Fg]
// whose operands come straight from the unpadded, undilated tensors. Row,
// reduction and column offsets are separable, so an element of A is
// lhs[row_off[r] + red_off[k]]: no padded or zero-inserted copy exists
// anywhere, and any layout (dimension_numbers) is read in place.
// - A is read in place when its rows or its channels are contiguous: walked
//   as long runs of channels or taps (RunA), else through an offset per
//   index (IndirectA); otherwise it is gathered into MR-row panels.
// - The product is written straight into the output (OutC) where its
//   features are contiguous; else through a scratch block.
// - B is packed into NR-column panels: once per phase when the channels are
//   the inner reduction index (pack_phase_b; trimmed sub-problems read runs
//   of it), else once per sub-problem or block by block inside each task;
//   on AVX-512, blocks that would be packed inside a task are read in place
//   instead where the features are contiguous (reads_b_in_place); where
//   interleaved taps would pack it tap by tap, each chunk of it is packed
//   once for all taps instead (packs_taps_b).
// - Outputs with at most 8 features per group and a contiguous lhs batch
//   (filter gradients of few-channel layers) take a narrow path vectorised
//   over the batch instead of the features (run_narrow), its reduction
//   walked as runs with constant steps (no offset tables, B read in place).
//   On AVX-512, filter gradients with more features take it too, in tiles of
//   8 features, where that measured faster (wide_rows).
// - Filter gradients of large operands with at most 16 taps run all their
//   sub-problems on one chunk of the reduction before the next (run_taps), so
//   input and cotangent come from memory once instead of once per tap.
// Tasks (sub-problem x group x row block x column block) run on XLA's
// intra-op thread pool; each output element is summed by one task in a fixed
// order, so results do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cks/dtypes.h"
#include "cks/ffi_problem.h"
#include "cks/plan.h"
#include "convert.h"
#include "depthwise.h"
#include "gemm.h"
#include "scratch.h"
#include "xla/ffi/api/ffi.h"

namespace cks {
namespace {

// ---------------------------------------------------------------- threading
// The caller runs tasks too and only waits for tasks a helper has started,
// so this cannot deadlock even when every pool thread is busy or the caller
// is itself a pool thread. With the caller, num_threads() workers in all:
// XLA sizes its pool to the CPUs, and the caller (often a thread outside the
// pool) is on one of them. One helper per pool thread ran three workers on
// two cores; with two, in process on Zen 4, forwards and input gradients took
// 0.97-0.99x the time, filter gradients 1.01-1.02x (repeated A/B runs).
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

// Once its own share is done, the caller polls for up to kSpinWait before
// sleeping on the condition variable: the helpers' last tasks mostly end
// within it, and sleeping costs a futex wake-up, twice per call (pass 1 and
// pass 2; in a trace of one call the pool's helper, woken the same way,
// started 10-100 us after the caller). In process on Zen 4 (2 cores), spinning
// against not: ops of 0.3-2.5 ms took 0.81-1.03x the time (3-D U-Net k2 s2
// 0.81-0.89x, DCGAN's 1->4 0.84x, 3-D atrous 0.93-0.99x, WaveNet 0.97-0.99x;
// V-Net and grouped 1.00-1.03x), ops of 3-22 ms 0.97-1.04x (noise); 100 us
// recovered less, 1000 us no more.
constexpr auto kSpinWait = std::chrono::microseconds(300);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

void spin_until_done(const ParallelState& st) {
  const auto start = std::chrono::steady_clock::now();
  while (st.done.load(std::memory_order_acquire) != st.n) {
    for (int i = 0; i < 64; ++i) cpu_relax();
    if (std::chrono::steady_clock::now() - start > kSpinWait) return;
  }
}

void parallel_for(ffi::ThreadPool* pool, int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  int64_t helpers = 0;
  if (pool != nullptr && n > 1) helpers = std::min<int64_t>(pool->num_threads() - 1, n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto st = std::make_shared<ParallelState>();
  st->n = n;
  st->fn = &fn;
  for (int64_t h = 0; h < helpers; ++h) pool->Schedule([st] { st->work(); });
  st->work();
  spin_until_done(*st);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

using gemm::gemm_block;
using gemm::IndirectA;
using gemm::kKC;
using gemm::kMC;
using gemm::kNC;
using gemm::PackedA;
using gemm::Tile;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// a * b wrapping as input_index does: the step of a run of one tap (a huge
// stride or dilation times a stride) is never taken, but must not be UB.
inline int64_t wrap_mul(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) * static_cast<uint64_t>(b));
}

// ---------------------------------------------------------------- the conv
// Packed B of a (sub-problem, group) is built once, in a first parallel pass,
// and shared by that sub-problem's row-block tasks, if it is at most
// kSharedBBytes per sub-problem and kSharedBTotal in all. A larger B (the long
// reductions of filter gradients) is packed block by block inside each task,
// where each block is used while it is in cache: allocating and filling
// hundreds of MB of panels cost more than packing twice (measured).
constexpr int64_t kSharedBBytes = int64_t{4} << 20;
constexpr int64_t kSharedBTotal = int64_t{256} << 20;

template <typename Tin, typename Acc, typename Tout>
struct CksConv {
  const ConvProblem& pb;
  const Plan& plan;
  const Tin* lhs;
  const Tin* rhs;
  Tout* out;
  static constexpr int MR = Tile<Acc>::MR, NR = Tile<Acc>::NR;

  // Rows [row0, row1) x columns [col0, col1) of one (sub-problem, group); on
  // the narrow path, positions [j0, j1) of rows [row0, row1).
  struct Task {
    int64_t sp, group, row0, row1, col0, col1, j0 = 0, j1 = 0;
    bool all_taps = false;  // sub-problems [sp, sp1), interleaved (run_taps)
    // run_taps: sub-problems [sp, sp1); run_narrow_taps: those, batch
    // entries [row0, row1).
    int64_t sp1 = 0;
    // fuses_phases: columns [col0, col1) of all sub-problems' nsp x Fg.
    bool fused = false;
    // A sub-problem's part of a run_taps task whose B is packed chunk by
    // chunk (packs_taps_b): read as position runs, no B of its own. Set
    // where task_buffers counts its buffers.
    bool b_chunks = false;
  };

  int64_t nsp() const { return static_cast<int64_t>(plan.subproblems.size()); }
  int64_t red_size(int64_t sp) const { return plan.subproblems[sp].taps * pb.group_in(); }
  // Packed B of one (sub-problem, group): all its column blocks and
  // reduction blocks, NR-column panels, zero-filled past Fg.
  int64_t packed_b_size(int64_t sp) const {
    return round_up(pb.group_out(), NR) * red_size(sp);
  }

  // A is read in place when no conversion is needed and either each tap's
  // channels or the rows' batch entries are contiguous (a filter gradient's
  // batch is the original channels): as runs (RunA) where the reduction's runs
  // (reduction_runs) hold at least kMinRun indices, else through an offset
  // per index (IndirectA); otherwise A is gathered into panels.
  static constexpr int64_t kMinRun = 32;
  bool reads_a_in_place() const {
    return std::is_same<Tin, Acc>::value && (pb.lhs_c == 1 || pb.lhs_n == 1);
  }
  bool reads_a_as_runs(int64_t s) const {
    if (!reads_a_in_place()) return false;
    thread_local std::vector<int64_t> ra, rb;
    return a_runs(s, ra, rb).R >= kMinRun;
  }
  // A column block of nc output columns is written into the output in place
  // (OutC) when the output holds the accumulator type with contiguous
  // features, no non-temporal stores are wanted, and the GEMM writes such a
  // block in place (gemm::writes_in_place); else through a scratch block.
  bool writes_out_in_place(int64_t nc) const {
    return std::is_same<Tout, Acc>::value && pb.out_c == 1 &&
           gemm::writes_in_place<Acc>(nc) && !stream_out();
  }
  const Acc* lhs_in_acc() const { return reinterpret_cast<const Acc*>(lhs); }

  // Worth packing B once: the sub-problem has three row blocks or more (with
  // two, packing twice in cache beat one shared copy through memory).
  bool shares_b(int64_t sp) const {
    return !narrow() && !dot() && !interleaves_taps() && plan.subproblems[sp].rows > 2 * kMC &&
           packed_b_size(sp) * static_cast<int64_t>(sizeof(Acc)) <= kSharedBBytes;
  }

  // Narrow outputs (Fg <= kNarrowF) whose batch entries are contiguous (the
  // filter gradient of a layer with few output channels) run on the
  // row-vectorised kernel: see run_narrow. So do wider ones (wide_rows), in
  // feature tiles of kNarrowF.
  bool narrow() const {
    return std::is_same<Tin, Acc>::value && pb.lhs_n == 1 &&
           pb.out_batch() >= gemm::kStrip<Acc> && (pb.group_out() <= gemm::kNarrowF || wide_rows());
  }
  // The row-vectorised kernel reads A (a filter gradient's input) and B (its
  // cotangent) in place, where the GEMM packs one of them per task and tap.
  // Measured in process on Zen 4 (AVX-512, 2 cores), 2-D and 3-D filter
  // gradients: up to kWideFewF features 0.65-0.84x the time (transposed
  // k2 s2 3-D, k8 s4 head, grouped k4 s2); up to kWideF features, no lhs
  // dilation and at most kWideMaxSubproblems taps, 0.73-0.93x (DCGAN
  // discriminator 0.73-0.76, ResNet 3x3 0.86-0.90 and s2 0.76-0.83, dilated
  // 3x3 and 3x3x3 0.75-0.93). Left on the GEMM: 256 features (1.01-1.06x),
  // a 7x7's 49 taps on 8x8 maps (1.00-1.08x), transposed layers (lhs
  // dilation: each phase reads its own part of the cotangent) with 32-128
  // features (1.06-1.5x), and 1-D (WaveNet 0.88-1.08x; it has no
  // run_narrow_taps). With AVX2 only, in tiles of gemm::kWideTileAvx2
  // features (AVX2 Zen 3 EPYC, 2 cores, in process, 2-3 alternating rounds,
  // medians): up to kWideFewF features, one group, 0.70-0.72x the time (the
  // k8 s4 head's 21: 12.7 -> 9.2-9.7 ms; the 3-D k2 s2 layer's 16: 0.45 ->
  // 0.31), and up to kWideFAvx2 without lhs dilation (the 3-D atrous layer's
  // 32: 3.46 -> 2.47). Left on the GEMM there: the grouped k4 s2 layer (16
  // per group, 1.35x), 32 features with lhs dilation (U-Net 64->128 1.4x,
  // V-Net 1.0x), 64-128 without (ResNet 3x3 and the 64-channel atrous d2
  // 1.1-1.2x, ResNet s2 1.0x). In tiles of 8 (as on AVX-512) the head was
  // unchanged and the 3-D atrous layer 0.9x: a tile of 7 or 8 features has
  // one ymm of rows per feature (load-bound, kWideTileAvx2's comment).
  static constexpr int64_t kWideFewF = 24, kWideF = 128, kWideMaxSubproblems = 27;
  static constexpr int64_t kWideFAvx2 = 32;
  bool wide_rows() const {
    const int isa = gemm::gemm_isa();
    if (isa == 0 || pb.nd < 2 || (isa == 1 && pb.groups() != 1)) return false;
    if (pb.group_out() <= kWideFewF) return true;
    bool dilated = false;
    for (int d = 0; d < pb.nd; ++d) dilated = dilated || pb.dim[d].lhs_dil > 1;
    if (isa == 1) return !dilated && pb.group_out() <= kWideFAvx2;
    return !dilated && nsp() <= kWideMaxSubproblems && pb.group_out() <= kWideF;
  }
  // One strip of the row-vectorised kernel over all Fg features, in tiles of
  // at most kNarrowF (AVX2, wide_rows: kWideTileAvx2): Cs[f * W + i] += the
  // reduction k (W = kStrip) from A at a.
  void narrow_strips(const Acc* a, const Acc* b, const gemm::NarrowRuns& k, Acc* Cs) const {
    constexpr int W = gemm::kStrip<Acc>;
    const int64_t Fg = pb.group_out();
    // Tiles of equal width (21 features: 7 + 7 + 7, not 8 + 8 + 5): the k8 s4
    // head's filter gradient took 0.97x the time (Xeon VM, 2 cores, medians
    // of 4 alternating rounds: 5.96-6.03 -> 5.70-5.84 ms).
    const int64_t tw = Fg > gemm::kNarrowF && gemm::gemm_isa() == 1 ? gemm::kWideTileAvx2
                                                                     : gemm::kNarrowF;
    const int64_t tiles = (Fg + tw - 1) / tw;
    const int64_t fw = (Fg + tiles - 1) / tiles;
    for (int64_t f0 = 0; f0 < Fg; f0 += fw)
      gemm::narrow_strip(static_cast<int>(std::min<int64_t>(fw, Fg - f0)), a,
                         b + f0 * pb.rhs_o, k, Cs + f0 * W, W);
  }
  // Narrow outputs (Fg <= kDotF) whose channels are contiguous, at least
  // kDotMinC per group (a forward pass with few output channels, NHWC) run
  // on the dot kernel, vectorised along the reduction: see run_dot.
  static constexpr int64_t kDotMinC = 16;
  // Rows per task: a row's work is small (Fg x the reduction), so the tasks'
  // set-up (row offsets, runs) is spread over more rows than kMC.
  static constexpr int64_t kDotMC = 4 * kMC;
  bool dot() const {
    return std::is_same<Tin, Acc>::value && std::is_same<Tout, Acc>::value && !narrow() &&
           pb.lhs_c == 1 && pb.group_out() <= gemm::kDotF && pb.group_in() >= kDotMinC;
  }

  // Depthwise problems run on the depthwise kernel (depthwise.h), vectorised
  // over the groups: one output feature per group, and either one input
  // channel per group (feature groups: a depthwise conv's forward and input
  // gradient) or one batch entry (batch groups: its filter gradient), the
  // groups contiguous in lhs, rhs and out (NHWC and HWIO). The GEMM would pad
  // the one column to a panel and read each group's lane of every row.
  // bfloat16 operands are read in place where gemm::bf16_depthwise() (the
  // kernel widens them in registers and rounds a bfloat16 output as it
  // stores it); elsewhere RunConv runs them on float32 copies.
  static constexpr int64_t kDwMinGroups = 8;
  static constexpr bool kDwBf16 = std::is_same<Tin, bf16>::value && std::is_same<Acc, float>::value;
  static constexpr bool kDwTypes =
      (std::is_same<Tin, Acc>::value && std::is_same<Tout, Acc>::value) || kDwBf16;
  bool depthwise() const {
    if (!kDwTypes || (kDwBf16 && !gemm::bf16_depthwise()) || pb.groups() < kDwMinGroups ||
        pb.out_c != 1)
      return false;
    if (pb.feature_groups > 1) {  // grouped: also the layout of its input gradient's filter
      const int64_t g = pb.group_in();
      return g == pb.group_out() && dw_group_width(g) && pb.lhs_c == 1 &&
             (pb.rhs_o == 1 || (g > 1 && pb.rhs_i == 1 && pb.rhs_o == g));
    }
    // Batch groups: a depthwise convolution's filter gradient (one entry and
    // one feature per group), or a grouped one's (g and g: dw_spread).
    const int64_t g = pb.group_out();
    return g == pb.out_batch() && dw_spread_width(g) && pb.rhs_o == 1 && pb.lhs_n == 1;
  }
  // Grouped convolutions of g channels in and g out per group (ResNeXt's
  // 32 groups of 4) run on the depthwise path too, as g depthwise ones: the
  // lanes are the channels, and "channel" c of lane l (group G, feature f)
  // reads the input lane of the group's channel (f + c) % g, a permutation
  // inside each group of lanes (dw::Red::grp), against the filter's
  // matching taps (dw_filter). The GEMM padded each group's g columns to a
  // whole panel. g must divide every ISA's vector of Acc: 2 or 4 (both
  // float and double), or 8 floats on AVX-512 (gemm_isa, which
  // backends.cpu_isa mirrors; on AVX2, 8 x 28 x 28 x 256 in 32 groups of 8
  // ran 4.2 ms forward against the GEMM path's 3.7: Zen 4 capped by
  // CKS_CPU_ISA=1, 2 cores). The filter's (feature, channel) block is
  // innermost, the features contiguous (HWIO) or, g apart, the channels
  // (the layout jax gives its input gradient's filter: HW(G g)g).
  static bool dw_group_width(int64_t g) {
    const bool avx512_f32 = sizeof(Acc) == 4 && gemm::gemm_isa() == 2;
    return g == 1 || g == 2 || g == 4 || ((g == 8 || dw_bcast(g)) && avx512_f32);
  }
  // Groups of one or two whole AVX-512 vectors of floats (16 or 32 channels)
  // broadcast each channel over the group's lanes instead (Red::bcast): no
  // permutes, the filter in its own order. The GEMM padded 16 features per
  // group to a 64-column tile.
  static bool dw_bcast(int64_t g) { return sizeof(Acc) == 4 && (g == 16 || g == 32); }
  int64_t dw_group() const { return pb.feature_groups > 1 ? pb.group_in() : 1; }
  // The filter gradient of a grouped convolution of g channels in and out
  // per group is batch groups of g entries (the input's channels) and g
  // features: lane i (feature i % g) needs all g channels of its group, so
  // each of its rows runs as g sums, channel j of the group spread over the
  // group's lanes (dw::spread), into the output's rows of entry j. The GEMM
  // padded the g columns to a panel ("interleaved taps"; see
  // backends.KERNEL_SPREAD_WIDTHS for times).
  int64_t dw_spread() const { return pb.batch_groups > 1 ? pb.out_batch() : 1; }
  // g must divide the ISA's vector of Acc. A group of a whole vector (16
  // floats or 8 doubles on AVX-512, 8 floats on AVX2) broadcasts each input
  // element instead of permuting (a multiply-add with an embedded broadcast).
  static bool dw_spread_width(int64_t g) {
    const int isa = gemm::gemm_isa();
    return g == 1 || g == 2 || g == 4 ||
           (g == 8 && (isa == 2 || (isa == 1 && sizeof(Acc) == 4))) ||
           (g == 16 && isa == 2 && sizeof(Acc) == 4);
  }
  // Depthwise tasks: row blocks of each sub-problem, a multiple of kDwRows
  // (of 4) rows and at least kDwTaskMacs multiply-adds where the rows allow,
  // columns [col0, col1) the lanes, split in blocks of kDwLanes when that
  // leaves fewer than kTasksPerWorker tasks per worker. A sub-problem's rows
  // run four (or eight) at a time, one chain each, its last rows % 4 one at
  // a time in four chains (depthwise.h): fixed by the shape, so the bits do
  // not depend on the thread count. Tasks of 64 rows, whatever the work,
  // were 18k multiply-adds for MobileNet's 32-channel 3x3 (Zen 4, 2 cores:
  // 0.80 ms forward; 0.60-0.64 with 2^17 or 2^18, 0.58 with 2^19, but
  // 512-channel layers 1.2x slower there).
  static constexpr int64_t kDwRows = 64, kDwLanes = 32, kDwTaskMacs = int64_t{1} << 17;
  // Lane blocks of a set of tasks: splits of the G lanes (the output
  // features: a group's one, or a grouped convolution's g), as many as
  // leave kTasksPerWorker tasks per worker (with `base` tasks per block).
  int64_t dw_width(int64_t base, int64_t workers) const {
    const int64_t G = pb.out_feat, want = kTasksPerWorker * workers;
    base = std::max<int64_t>(base, 1);
    const int64_t splits = std::clamp<int64_t>((want + base - 1) / base, 1,
                                               (G + kDwLanes - 1) / kDwLanes);
    return round_up((G + splits - 1) / splits, kDwLanes);
  }
  // A depthwise filter gradient (batch groups) reduces over the batch
  // entries c (Cg of them) and the cotangent's positions. Its sub-problems
  // are the kernel's taps, a few rows each, so tasks by sub-problem would
  // each read all of the input and cotangent (from L3 for a 3x3's nine
  // taps). Instead each task takes a chunk of the entries and runs every
  // sub-problem on them, entry after entry within a sub-problem, so that
  // an entry's lanes stay in L2 across the taps. Chunk q sums its entries
  // in order into its own copy of the output (partial q: see
  // run_depthwise_entries), and the copies are added in order of q. The
  // chunks (dw_chunks) depend on the shape only: the same bits on any
  // number of threads.
  static constexpr int64_t kDwMaxChunks = 64, kDwPartialBytes = int64_t{8} << 20;
  // Within a chunk, each entry's runs (the cotangent's rows, for 2-D) go in
  // blocks of dw_run_block(), every sub-problem over one block before the
  // next, so that the block's input and cotangent lanes stay in L2 across
  // the taps; a block's sums are added to those before it. Blocks of about
  // kDwBlockBytes of both operands over kDwLanes lanes, set by the shape
  // alone (the same bits on any thread count and ISA, and for bfloat16
  // operands read in place or from float32 copies). Intel Xeon with AMX (2
  // cores of a VM; L2 2 MB per core), filter gradients: MobileNet's 8 x 112
  // x 112 x 32 3x3 3.7 ms -> 1.1 (each tap's pass over a whole image was
  // 3.2 MB from L3), its stride-2 2.1 -> 1.0, ResNeXt's 8 x 56 x 56 x 128 in
  // 32 groups of 4 5.3-6.9 -> 1.8-2.2; 64 KB to 256 KB and lane caps of 32
  // to 128 within noise.
  int64_t dw_max_len() const {
    int64_t len = 1;
    for (const SubProblem& sp : plan.subproblems)
      len = std::max(len, sp.seg[pb.nd - 1].t_hi - sp.seg[pb.nd - 1].t_lo);
    return len;
  }
  static constexpr int64_t kDwBlockBytes = 128 << 10;
  int64_t dw_run_block() const {
    return std::max<int64_t>(
        1, kDwBlockBytes / (dw_max_len() * kDwLanes * 2 * static_cast<int64_t>(sizeof(Acc))));
  }
  bool dw_entries() const {
    return depthwise() && pb.batch_groups > 1 && (pb.group_in() > 1 || dw_spread() > 1);
  }
  // Bytes of one partial output (float32 for a bfloat16 output, whose
  // partials are always written: the bits of a float32 output, rounded after).
  int64_t dw_part_bytes() const {
    return out_bytes() / static_cast<int64_t>(sizeof(Tout)) * static_cast<int64_t>(sizeof(Acc));
  }
  bool dw_partials() const { return dw_chunks() > 1 || !std::is_same<Tout, Acc>::value; }
  int64_t dw_chunks() const {
    return std::clamp<int64_t>(std::min(kDwMaxChunks, kDwPartialBytes / std::max<int64_t>(
                                                                              dw_part_bytes(), 1)),
                               1, pb.group_in());
  }
  std::vector<Task> depthwise_tasks(int64_t workers) const {
    const int64_t G = pb.out_feat;  // lanes
    if (dw_entries()) {  // (chunk q of entries [row0, row1), lanes [col0, col1)), q in j0
      const int64_t nq = dw_chunks(), Cg = pb.group_in(), width = dw_width(nq, workers);
      std::vector<Task> ts;
      for (int64_t q = 0; q < nq; ++q)
        for (int64_t c = 0; c < G; c += width) {
          Task t{0, 0, q * Cg / nq, (q + 1) * Cg / nq, c, std::min(G, c + width), q, q + 1};
          t.all_taps = true;
          ts.push_back(t);
        }
      return ts;
    }
    int64_t blocks = 0, rows_all = 0;
    for (const SubProblem& sp : plan.subproblems)
      if (sp.taps > 0) blocks += (sp.rows + kDwRows - 1) / kDwRows, rows_all += sp.rows;
    const int64_t width = dw_width(blocks, workers);
    // Rows per task: kDwRows, or a multiple of it where a task of kDwRows
    // rows would do fewer than kDwTaskMacs multiply-adds (few groups, few
    // taps), keeping kTasksPerWorker tasks per worker.
    const int64_t cap =
        std::max(kDwRows, rows_all / (kTasksPerWorker * workers) / kDwRows * kDwRows);
    std::vector<Task> ts;
    for (int64_t s = 0; s < nsp(); ++s) {
      const SubProblem& sp = plan.subproblems[s];
      const int64_t per_row = std::max<int64_t>(1, width * sp.taps * pb.group_in());
      const int64_t step = std::clamp(round_up((kDwTaskMacs + per_row - 1) / per_row, kDwRows),
                                      kDwRows, cap);
      for (int64_t r = 0; r < sp.rows; r += step)
        for (int64_t c = 0; c < G; c += width)
          ts.push_back({s, 0, r, std::min(sp.rows, r + step), c, std::min(G, c + width)});
    }
    return ts;
  }
  // The depthwise kernel's reduction of sub-problem sp over nc channels:
  // runs of its taps along the last dimension (tap_offsets' run starts in
  // tap_l and tap_r), steps as tap_offsets takes them.
  dw::Red dw_red(const SubProblem& sp, std::vector<int64_t>& tap_l, std::vector<int64_t>& tap_r,
                 int64_t nc) const {
    tap_offsets(sp, tap_l, tap_r, true);
    const int last = pb.nd - 1;
    const Phase& ph = *sp.phase[last];
    // Grouped: the input lane moves, not the pointer; the filter is
    // dw_filter's, its channels out_feat apart.
    const int64_t g = dw_group();
    return dw::Red{tap_l.data(), tap_r.data(), static_cast<int64_t>(tap_l.size()),
                   sp.seg[last].t_hi - sp.seg[last].t_lo, wrap_mul(ph.tstride, pb.lhs_sp[last]),
                   wrap_mul(ph.kstep, pb.rhs_sp[last]), nc, g > 1 ? 0 : pb.lhs_c,
                   g > 1 ? pb.out_feat : pb.rhs_i, g, g > 1 && dw_bcast(g)};
  }
  // Depthwise outputs over kStreamOutBytes are written with non-temporal
  // stores (AVX-512), where every row starts on a zmm: a depthwise output is
  // written once, and its input read once, so both stream through memory.
  // On Zen 4 (2 cores, builds alternating, minima of 4 runs each), MobileNet's
  // 8 x 112 x 112 x 32 3x3 forward (12.8 MB out) took 0.55-0.69x the time
  // (0.81-0.83 ms against 1.20-1.57), 0.77-0.80x followed by a ReLU, and
  // 8 x 56 x 56 x 128's 0.62-0.71x.
  bool dw_streams() const {
    constexpr int64_t A = 64 / sizeof(Acc);  // elements per zmm
    if (!stream_out() || pb.feature_groups == 1 || reinterpret_cast<uintptr_t>(out) % 64 != 0 ||
        pb.out_n % A != 0)
      return false;
    for (int d = 0; d < pb.nd; ++d)
      if (pb.out_sp[d] % A != 0) return false;
    return true;
  }
  // The filter as the kernel reads it, where that differs from rhs
  // (dw_filter_copied): a buffer filled once per call, with rhs's taps, each
  // a block of channels c (out_feat apart) of lanes l: a bfloat16 filter
  // widened to float32 (the kernel then widens only its input), and a
  // grouped convolution's channel c of lane l taken from the group's channel
  // (l + c) % g, the one that meets the input lane the kernel permutes there
  // (see dw_group_width), or channel c itself where the kernel broadcasts
  // (dw_bcast). Filled per task, it took most of ResNeXt's 3x3
  // of 32 groups of 4 on 56 x 56 (a division per element).
  int64_t dw_filter_taps() const {
    int64_t taps = 1;
    for (int d = 0; d < pb.nd; ++d) taps *= pb.dim[d].k_size;
    return taps;
  }
  // (Where the kernel broadcasts and the filter is HWIO, it reads rhs as it
  // is: the same layout.)
  bool dw_filter_copied() const {
    const int64_t g = dw_group();
    return kDwBf16 || (g > 1 && !(dw_bcast(g) && pb.rhs_o == 1 && pb.rhs_i == pb.out_feat));
  }
  int64_t dw_filter_size() const { return dw_filter_taps() * pb.group_in() * pb.out_feat; }
  // Taps in parallel: 9 x 16 x 512 elements (ResNeXt's groups of 16 on 14 x
  // 14, input gradient) took 0.2 ms of a 1.3 ms call on one thread.
  void dw_filter(std::vector<Acc>& buf, ffi::ThreadPool* pool) const {
    const int64_t g = dw_group(), F = pb.out_feat;
    buf.resize(static_cast<size_t>(dw_filter_size()));
    parallel_for(pool, dw_filter_taps(), [&](int64_t e) {
      int64_t off = 0, rest = e;
      for (int d = pb.nd - 1; d >= 0; --d) {
        off += rest % pb.dim[d].k_size * pb.rhs_sp[d];
        rest /= pb.dim[d].k_size;
      }
      for (int64_t c = 0; c < g; ++c)
        for (int64_t l0 = 0; l0 < F; l0 += g)  // group by group
          for (int64_t f = 0; f < g; ++f) {
            const int64_t ch = dw_bcast(g) ? c : f + c < g ? f + c : f + c - g, l = l0 + f;
            // The copy has rhs's tap strides: its first tap at the same
            // shift from its start (rhs_reversed: the last element's block).
            buf[pb.rhs_shift + off + c * F + l] =
                load<Acc>(rhs[off + ch * pb.rhs_i + l * pb.rhs_o]);
          }
    });
  }
  // One depthwise task. A sub-problem with no taps (outputs that read only
  // padding) writes zeros.
  void run_depthwise(const Task& t, const Acc* filter) const {
    if constexpr (kDwTypes) {
      thread_local std::vector<int64_t> lhs_row, out_row, tap_l, tap_r;
      const SubProblem& sp = plan.subproblems[t.sp];
      row_offsets(t, lhs_row, out_row);
      const int64_t rows = t.row1 - t.row0, n = t.col1 - t.col0;
      Tout* const o = out + t.col0;
      if (sp.taps == 0) {
        for (int64_t r = 0; r < rows; ++r) std::fill_n(o + out_row[r], n, store<Tout>(Acc(0)));
        return;
      }
      // The reduction (c, tap), c outer: the channels are one (forwards) or
      // the batch (filter gradients), its stride the largest.
      const dw::Red k = dw_red(sp, tap_l, tap_r, pb.group_in());
      const Tin* const a = lhs + t.col0;
      const int64_t quads = std::clamp<int64_t>(sp.rows / 4 * 4 - t.row0, 0, rows);
      // Rows in fours, or eights where the registers hold eight chains of
      // the block (AVX-512): one chain per row either way, the same bits.
      const bool nt = dw_streams(), eights = dw::eight_rows();
      const bool slide8 = eights && k.len >= dw::kSlide8MinTL;
      auto run = [&](const auto* b) {
        int64_t r = 0;
        for (; r < quads; r += 4) {
          const int64_t* const ar = lhs_row.data() + r;
          const int64_t* const orr = out_row.data() + r;
          if (slide8 && r + 8 <= quads && dw::slide<8>(a, ar, b, k, o, orr, n, nt)) {
            r += 4;
          } else if (dw::slide<4>(a, ar, b, k, o, orr, n, nt)) {
          } else if (eights && r + 8 <= quads) {
            dw::rows<8, 1>(a, ar, b, k, o, orr, n, false, nt);
            r += 4;
          } else {
            dw::rows<4, 1>(a, ar, b, k, o, orr, n, false, nt);
          }
        }
        for (; r < rows; ++r)
          dw::rows<1, 4>(a, lhs_row.data() + r, b, k, o, out_row.data() + r, n, false, nt);
      };
      if (filter != nullptr)
        run(filter + t.col0);
      else if constexpr (!kDwBf16)
        run(rhs + t.col0);
#ifdef CKS_X86_AVX2
      if (nt) _mm_sfence();
#endif
    } else {
      (void)t;
    }
  }
  // One task of a depthwise filter gradient (dw_entries): every sub-problem
  // on entries [t.row0, t.row1), lanes [t.col0, t.col1), into `part`
  // (the output's layout): entry c's sum is added to those before it.
  void run_depthwise_entries(const Task& t, Acc* part) const {
    if constexpr (kDwTypes) {
      // Every sub-problem's offsets and runs, built once per task.
      struct Sub {
        std::vector<int64_t> lhs_row, out_row, tap_l, tap_r;
        dw::Red k{};
        int64_t rows = 0;
      };
      thread_local std::vector<Sub> subs;
      subs.resize(static_cast<size_t>(nsp()));
      const int64_t n = t.col1 - t.col0;
      Acc* const o = part + t.col0;
      const int64_t g = dw_spread();
      int64_t max_runs = 0;
      for (int64_t s = 0; s < nsp(); ++s) {
        const SubProblem& sp = plan.subproblems[s];
        Sub& u = subs[s];
        // Grouped (g > 1): the rows of entry 0, each run for all g entries.
        u.rows = sp.rows / g;
        row_offsets(Task{s, 0, 0, u.rows, 0, 0}, u.lhs_row, u.out_row);
        if (sp.taps == 0) {
          for (int64_t r = 0; r < u.rows; ++r)
            for (int64_t j = 0; j < g; ++j)
              std::fill_n(o + u.out_row[r] + j * pb.out_n, n, Acc(0));
          u.k.nruns = 0;
          continue;
        }
        u.k = dw_red(sp, u.tap_l, u.tap_r, 1);
        max_runs = std::max(max_runs, u.k.nruns);
      }
      const int64_t B = dw_run_block();
      for (int64_t c = t.row0; c < t.row1; ++c) {
        const Tin* const a = lhs + t.col0 + c * pb.lhs_c;
        const Tin* const b = rhs + t.col0 + c * pb.rhs_i;
        for (int64_t b0 = 0; b0 < max_runs; b0 += B) {
          const bool add = c > t.row0 || b0 > 0;
          for (const Sub& u : subs) {
            if (b0 >= u.k.nruns) continue;
            dw::Red k = u.k;
            k.ra += b0, k.rb += b0, k.nruns = std::min(B, k.nruns - b0);
            const int64_t* const lr = u.lhs_row.data();
            const int64_t* const orr = u.out_row.data();
            if (g > 1) {
              for (int64_t r = 0; r < u.rows; ++r)
                dw::spread(g, a, lr[r], b, k, o, orr[r], pb.out_n, n, add);
              continue;
            }
            const int64_t quads = u.rows / 4 * 4;
            int64_t r = 0;
            for (; r < quads; r += 4) dw::rows<4, 1>(a, lr + r, b, k, o, orr + r, n, add);
            for (; r < u.rows; ++r) dw::rows<1, 4>(a, lr + r, b, k, o, orr + r, n, add);
          }
        }
      }
    } else {
      (void)t, (void)part;
    }
  }

  // B packed once per phase ("phase B"). Sub-problems of one phase (one
  // Phase per dimension) read the same sub-kernel, each trimmed to its own
  // tap ranges. When the channels are the inner reduction index and there are
  // at least kPhaseBMinC of them, the whole sub-kernel of each phase is packed
  // once, as [panel][full tap][Cg][NR]: a sub-problem's reduction is then runs
  // of consecutive full taps (its trimmed range in the last dimension), each
  // run contiguous in that layout, and no sub-problem packs B again. Down to
  // 16 channels: in process on Zen 4 (2 cores), input gradients with 16 and
  // 21 took 0.80-1.00x the time with it as with 32 as the floor (the k8 s4
  // head's 0.80x, the grouped k4 s2's 0.97x, 3-D U-Net's 1.00x), and their
  // bfloat16 ones, which the pair path then takes, 0.42-0.84x.
  static constexpr int64_t kPhaseBMinC = 16;
  bool phase_b() const {
    return !narrow() && !dot() && channels_inner() && pb.group_in() >= kPhaseBMinC;
  }
  int64_t ncombos() const {
    int64_t n = 1;
    for (int d = 0; d < pb.nd; ++d) n *= static_cast<int64_t>(plan.phases[d].size());
    return n;
  }
  int64_t combo_of(const SubProblem& sp) const {
    int64_t c = 0;
    for (int d = 0; d < pb.nd; ++d)
      c = c * static_cast<int64_t>(plan.phases[d].size()) + sp.seg[d].phase;
    return c;
  }
  void combo_phases(int64_t c, const Phase* ph[kMaxSpatial]) const {
    for (int d = pb.nd - 1; d >= 0; --d) {
      const int64_t n = static_cast<int64_t>(plan.phases[d].size());
      ph[d] = &plan.phases[d][c % n];
      c /= n;
    }
  }
  // Full taps of a phase combination and the element stride between its panels.
  int64_t combo_taps(int64_t c) const {
    const Phase* ph[kMaxSpatial];
    combo_phases(c, ph);
    int64_t t = 1;
    for (int d = 0; d < pb.nd; ++d) t *= ph[d]->T;
    return t;
  }
  int64_t phase_ldb(int64_t c) const { return combo_taps(c) * pb.group_in() * NR; }
  // fc: fuses_columns(), which callers in loops over combinations ask once.
  int64_t phase_b_size(int64_t c, bool fc) const {
    return round_up(combo_cols(c, fc), NR) / NR * phase_ldb(c);
  }

  // Packs panels [q0, q1) of the phase B of (phase combination c, group g)
  // into dst, the combination's base: row (tap f, channel ci) of panel q is
  // dst + q * ldb + (f * Cg + ci) * NR. Reads follow whichever of features
  // (HWIO) or channels (a d-input's swapped kernel) is contiguous; a panel's
  // rows of one tap (Cg x NR) are written while they are in L1. Column j of
  // fused phases (combo_cols) is feature j % Fg of the j / Fg-th phase of the
  // run, whose taps are the leader's shifted by the difference of their k0.
  void pack_phase_b(int64_t c, int64_t g, int64_t q0, int64_t q1, Acc* dst) const {
    const int64_t Cg = pb.group_in(), Fg = pb.group_out(), ldb = phase_ldb(c);
    const int64_t ri = pb.rhs_i, ro = pb.rhs_o, cols = combo_cols(c), last = pb.nd - 1;
    const std::vector<Phase>& ph = plan.phases[last];
    const int64_t lead = c % static_cast<int64_t>(ph.size());
    // rhs offset of column j from the leader's tap: its phase's and feature's
    auto col_off = [&](int64_t j) {
      return (ph[lead + j / Fg].k0 - ph[lead].k0) * pb.rhs_sp[last] + j % Fg * ro;
    };
    phase_taps(c, g, [&](int64_t f, int64_t roff) {
      for (int64_t q = q0; q < q1; ++q) {
        Acc* panel = dst + q * ldb + f * Cg * NR;
        const int64_t n = std::min<int64_t>(NR, cols - q * NR);  // columns present
        const bool one_phase = q * NR / Fg == (q * NR + n - 1) / Fg;  // not across fused ones
        const Tin* src = rhs + roff + col_off(q * NR);
        if (one_phase && n == NR && ro == 1) {
          for (int64_t ci = 0; ci < Cg; ++ci)
            for (int j = 0; j < NR; ++j) panel[ci * NR + j] = load<Acc>(src[ci * ri + j]);
        } else if (one_phase && ri == 1) {
          int64_t c0 = 0;  // channels done by whole 16 x 16 blocks
#ifdef CKS_X86_AVX2
          if constexpr (std::is_same<Tin, float>::value && std::is_same<Acc, float>::value) {
            static_assert(NR == 16, "transpose16 fills 16-column float panels");
            if (n == NR && gemm::gemm_isa() == 2)
              for (; c0 + NR <= Cg; c0 += NR) gemm::transpose16(src + c0, ro, panel + c0 * NR, NR);
          }
#endif
          for (int j = 0; j < NR; ++j)
            for (int64_t ci = c0; ci < Cg; ++ci)
              panel[ci * NR + j] = j < n ? load<Acc>(src[j * ro + ci]) : Acc(0);
        } else {  // each column through its rhs offset (col_off), once per panel
          int64_t off[NR];
          for (int j = 0; j < n; ++j) off[j] = roff + col_off(q * NR + j);
          for (int64_t ci = 0; ci < Cg; ++ci) {
            for (int j = 0; j < n; ++j) panel[ci * NR + j] = load<Acc>(rhs[off[j] + ci * ri]);
            for (int j = static_cast<int>(n); j < NR; ++j) panel[ci * NR + j] = Acc(0);
          }
        }
      }
    });
  }
  // fn(f, roff) for each full tap f of phase combination c, in order, with
  // roff the rhs offset of that tap's group-g kernel slice (pack_phase_b
  // here and in Bf16Pairs).
  template <typename Fn>
  void phase_taps(int64_t c, int64_t g, Fn&& fn) const {
    const Phase* ph[kMaxSpatial];
    combo_phases(c, ph);
    const int64_t taps = combo_taps(c);
    int64_t tt[kMaxSpatial] = {0, 0, 0};
    for (int64_t f = 0; f < taps; ++f) {
      int64_t roff = g * pb.group_out() * pb.rhs_o;
      for (int d = 0; d < pb.nd; ++d) roff += (ph[d]->k0 + ph[d]->kstep * tt[d]) * pb.rhs_sp[d];
      fn(f, roff);
      for (int d = pb.nd - 1; d >= 0 && ++tt[d] == ph[d]->T; --d) tt[d] = 0;
    }
  }

  // Full tap index of the first tap of each run (the trimmed last-dimension
  // range at fixed outer taps) of sub-problem sp, runs in reduction order.
  void run_starts(const SubProblem& sp, std::vector<int64_t>& f0) const {
    int64_t cnt[kMaxSpatial], tt[kMaxSpatial] = {0, 0, 0}, ts[kMaxSpatial];
    int64_t stride = 1;
    for (int d = pb.nd - 1; d >= 0; --d) {
      cnt[d] = sp.seg[d].t_hi - sp.seg[d].t_lo;
      ts[d] = stride;
      stride *= sp.phase[d]->T;
    }
    const int64_t last = pb.nd - 1, runs = cnt[last] > 0 ? sp.taps / cnt[last] : 0;
    f0.resize(runs);
    for (int64_t r = 0; r < runs; ++r) {
      int64_t f = 0;
      for (int d = 0; d < pb.nd; ++d) f += (sp.seg[d].t_lo + tt[d]) * ts[d];
      f0[r] = f;
      for (int d = last - 1; d >= 0 && ++tt[d] == cnt[d]; --d) tt[d] = 0;
    }
  }

  // Row blocks of kMC rows. With fewer than kTasksPerWorker of them (of
  // units, task_unit) per worker (filter gradients: few rows, long
  // reductions) the columns are split too, in whole AVX-512 tiles (2 NR).
  // Splitting columns does not change any element's sum, so the bits do not
  // depend on the thread count.
  static constexpr int64_t kTasksPerWorker = 4;
  std::vector<Task> tasks(int64_t workers) const {
    if (depthwise()) return depthwise_tasks(workers);
    if (narrow()) return narrow_cols() ? cols_tasks(workers) : narrow_tasks(workers);
    if (interleaves_taps()) return tap_tasks(workers);
    const bool fused = fuses_phases(), fc = fuses_columns();
    // Columns per row: a fused task's span every sub-problem's.
    const int64_t Fg = pb.group_out(), cols = fused ? nsp() * Fg : Fg;
    int64_t row_blocks = 0;
    for (int64_t s = 0; s < (fused ? 1 : nsp()); ++s)
      if (fused || sp_cols(s, fc) > 0)
        row_blocks += (plan.subproblems[s].rows + kMC - 1) / kMC;
    const Unit kind = unit_kind(workers);
    row_blocks = row_blocks * pb.groups() / unit_size(kind);  // units run in parallel
    int64_t splits = 1;
    const int64_t want = kTasksPerWorker * workers;
    if (row_blocks > 0 && row_blocks < want && cols > 2 * NR)
      splits = std::min((want + row_blocks - 1) / row_blocks, cols / (2 * NR));
    // Task width for a GEMM of n columns (fused phases: sp_cols).
    auto width_of = [&](int64_t n) {
      return splits > 1 ? round_up((n + splits - 1) / splits, 2 * NR) : n;
    };
    const int64_t width = width_of(cols);
    std::vector<Task> ts;
    if (fused) {
      const int64_t rows = plan.subproblems[0].rows;
      for (int64_t r = 0; r < rows; r += kMC)
        for (int64_t c = 0; c < cols; c += width) {
          ts.push_back({0, 0, r, std::min(rows, r + kMC), c, std::min(cols, c + width)});
          ts.back().fused = true;
        }
      return ts;
    }
    if (kind == Unit::kGroups) {  // (sub-problem, row block, columns, group)
      for (int64_t s = 0; s < nsp(); ++s) {
        const int64_t rows = plan.subproblems[s].rows;
        for (int64_t r = 0; r < rows; r += kMC)
          for (int64_t c = 0; c < Fg; c += width)
            for (int64_t g = 0; g < pb.groups(); ++g)
              ts.push_back({s, g, r, std::min(rows, r + kMC), c, std::min(Fg, c + width)});
      }
      return ts;
    }
    if (kind == Unit::kSameRows) {  // (group, row block, columns, sub-problem): see unit_kind
      const int64_t rows = plan.subproblems[0].rows;
      for (int64_t g = 0; g < pb.groups(); ++g)
        for (int64_t r = 0; r < rows; r += kMC)
          for (int64_t c = 0; c < Fg; c += width)
            for (int64_t s = 0; s < nsp(); ++s)
              ts.push_back({s, g, r, std::min(rows, r + kMC), c, std::min(Fg, c + width)});
      return ts;
    }
    const int64_t mc = dot() ? kDotMC : kMC;
    for (int64_t s = 0; s < nsp(); ++s) {
      const int64_t rows = plan.subproblems[s].rows, n = sp_cols(s, fc), w = width_of(n);
      for (int64_t g = 0; g < pb.groups(); ++g)
        for (int64_t r = 0; r < rows; r += mc)
          for (int64_t c = 0; c < n; c += w)
            ts.push_back({s, g, r, std::min(rows, r + mc), c, std::min(n, c + w)});
    }
    return ts;
  }

  // Consecutive tasks run as one unit of this many, on one thread. Where
  // every sub-problem has the same rows (each phase of a transposed conv
  // whose kernel equals its stride is one untrimmed sub-problem), a unit is
  // one row block of all of them (same_rows_unit): they read the same input
  // rows, and together write whole lines of the same output rows instead of
  // every other line, phase after phase. Otherwise, in a grouped
  // convolution, a unit is one row block of every group (groups_unit): each
  // group reads and writes its own slice of the same pixels' cache lines (16
  // channels of 64: one line in four), which the next group then finds in
  // this core's L1 or L2. The grouped transposed layer (16 x 16 x 16 x 128
  // -> 64, k4 s2, 4 groups) on the Xeon VM (2 cores), against groups as
  // separate tasks (4 rounds, one process): input gradient 1.05-1.12 ->
  // 0.93-0.98 ms (minimum; medians 1.21-1.30 -> 1.07-1.10), forward
  // 1.28-1.38 -> 1.22-1.33; with the groups merely innermost in the task
  // order (two threads taking turns), no faster.
  // Only with enough units to keep every worker busy: a filter gradient's
  // sub-problems (one per tap, a single row block each) would otherwise run
  // as one unit on one thread.
  enum class Unit { kTask, kSameRows, kGroups };
  Unit unit_kind(int64_t workers) const {
    if (narrow() || dot() || interleaves_taps() || fuses_phases() || fuses_columns())
      return Unit::kTask;
    if (same_rows_unit(workers)) return Unit::kSameRows;
    return groups_unit(workers) ? Unit::kGroups : Unit::kTask;
  }
  int64_t task_unit(int64_t workers) const { return unit_size(unit_kind(workers)); }
  int64_t unit_size(Unit kind) const {
    return kind == Unit::kSameRows ? nsp() : kind == Unit::kGroups ? pb.groups() : 1;
  }
  int64_t col_splits() const {
    const int64_t Fg = pb.group_out();
    return Fg > 2 * NR ? Fg / (2 * NR) : 1;
  }
  bool same_rows_unit(int64_t workers) const {
    if (nsp() < 2) return false;
    for (const SubProblem& sp : plan.subproblems)
      if (sp.rows != plan.subproblems[0].rows) return false;
    const int64_t units = (plan.subproblems[0].rows + kMC - 1) / kMC * pb.groups() * col_splits();
    return units >= kTasksPerWorker * workers;
  }
  bool groups_unit(int64_t workers) const {
    if (pb.groups() < 2) return false;
    int64_t units = 0;
    for (const SubProblem& sp : plan.subproblems) units += (sp.rows + kMC - 1) / kMC * col_splits();
    return units >= kTasksPerWorker * workers;
  }

  // Sub-problems fused into one GEMM. Where every sub-problem reads the same
  // A (the same input rows through the same taps: each phase of a transposed
  // conv whose kernel equals its stride) and writes rows a constant offset
  // from sub-problem 0's, they are one GEMM of nsp x Fg columns: a tile
  // multiplies a row of A into 4 panels however few features each phase has,
  // and a task's set-up is done once for all phases. Column panel q is panel
  // q % (Fg / NR) of sub-problem q / (Fg / NR): its phase B follows the one
  // before it in the shared buffer (one group, phases in order), its output
  // is fused_cols' offset from the row's. Only float32 on AVX-512, where
  // the tiles are streamed in place (large outputs, one reduction block: no
  // scratch block to copy out), with at most kFuseMaxF features: in process
  // (Xeon with AVX-512, 2 cores, 3 runs each), U-Net's k2 s2 forward 64->128
  // (32 features) took 0.81x the time (2.54-2.59 ms, 2.04-2.12 fused); with
  // 64 and 128 features (32->64, 16->32) no change (0.91-1.04x).
  static constexpr int64_t kFuseMaxF = 2 * NR;
  bool fuses_phases() const {
    if (!std::is_same<Tin, float>::value || !std::is_same<Tout, float>::value ||
        gemm::gemm_isa() != 2 || narrow() || dot() || !phase_b() || pb.groups() != 1 ||
        nsp() < 2 || pb.group_out() % NR != 0 || pb.group_out() > kFuseMaxF)
      return false;
    const SubProblem& s0 = plan.subproblems[0];
    const int64_t c0 = combo_of(s0);
    for (int64_t s = 0; s < nsp(); ++s) {
      const SubProblem& sp = plan.subproblems[s];
      if (sp.taps == 0 || sp.rows != s0.rows || combo_of(sp) != c0 + s) return false;
      for (int d = 0; d < pb.nd; ++d) {
        const Phase &p = *sp.phase[d], &p0 = *s0.phase[d];
        const Segment &g = sp.seg[d], &g0 = s0.seg[d];
        // Same rows and taps of A (so the same runs and reduction blocks of
        // the phase B), and outputs L apart in every phase.
        if (g.count != g0.count || g.t_lo != g0.t_lo || g.t_hi != g0.t_hi || p.T != p0.T ||
            p.ustride != p0.ustride || p.tstride != p0.tstride || p.L != p0.L ||
            input_index(p, g.u0, g.t_lo) != input_index(p0, g0.u0, g0.t_lo))
          return false;
      }
    }
    if (nsp() * phase_b_size(c0, false) * static_cast<int64_t>(sizeof(Acc)) > kSharedBTotal)
      return false;
    thread_local std::vector<int64_t> f0;
    thread_local std::vector<PhaseBlock> pblocks;
    return streams_block(reduction_blocks(s0, red_size(0), true, f0, pblocks),
                         std::min(kNC, nsp() * pb.group_out()));
  }
  // Where a fused GEMM's column panel q is written, from the output row of
  // sub-problem 0: the offset of its sub-problem's rows, plus its features'.
  std::vector<int64_t> fused_cols() const {
    const int64_t Fg = pb.group_out();
    const SubProblem& s0 = plan.subproblems[0];
    std::vector<int64_t> cols(nsp() * Fg / NR);
    for (int64_t q = 0; q < static_cast<int64_t>(cols.size()); ++q) {
      const SubProblem& sp = plan.subproblems[q * NR / Fg];
      int64_t off = q * NR % Fg;
      for (int d = 0; d < pb.nd; ++d) {
        const Phase &p = *sp.phase[d], &p0 = *s0.phase[d];
        off += ((p.o0 + p.L * sp.seg[d].u0) - (p0.o0 + p0.L * s0.seg[d].u0)) * pb.out_sp[d];
      }
      cols[q] = off;
    }
    return cols;
  }

  // Adjacent phases fused as columns. Along the last dimension, consecutive
  // phases that read the same input through the same taps (same base,
  // strides, taps and outputs: phases 0-1 and 2-3 of a k8 s4 transposed conv,
  // 0-1 of a k9 s3 p4) write outputs one position apart; with the features
  // innermost (out_sp[last] == Fg, one group) the m x Fg outputs of a run of m
  // such phases are contiguous, so the run is one GEMM of m x Fg columns
  // whose phase B holds the m sub-kernels side by side. A task reads A once
  // for all m, and a number of features that is not a multiple of NR pads
  // once per run instead of once per phase (21 features: 42 of 48 columns,
  // not 21 of 32 twice). Only where that saves panels, float32 operands
  // (16-bit ones widened), and the phase B is shared (shared_b: a task would
  // pack only its own phase's columns).
  bool same_columns(int64_t pi) const {  // phases pi and pi + 1 of the last dimension
    const std::vector<Phase>& ph = plan.phases[pb.nd - 1];
    const Phase &p = ph[pi], &q = ph[pi + 1];
    return p.T > 0 && q.o0 == p.o0 + 1 && q.L == p.L && q.U == p.U && q.T == p.T &&
           q.base == p.base && q.ustride == p.ustride && q.tstride == p.tstride &&
           q.kstep == p.kstep;
  }
  // The run of equal phases that last-dimension phase pi leads: its length,
  // or 0 where pi follows an equal phase (the run's leader computes it).
  int64_t column_run(int64_t pi) const {
    const int64_t P = static_cast<int64_t>(plan.phases[pb.nd - 1].size());
    if (pi > 0 && same_columns(pi - 1)) return 0;
    int64_t m = 1;
    while (pi + m < P && same_columns(pi + m - 1)) ++m;
    return m;
  }
  bool fuses_columns() const {
    const int64_t Fg = pb.group_out(), last = pb.nd - 1;
    if (!std::is_same<Tin, float>::value || !std::is_same<Acc, float>::value ||
        Fg % NR == 0 || pb.groups() != 1 || pb.out_c != 1 || pb.out_sp[last] != Fg ||
        !phase_b())
      return false;
    const int64_t P = static_cast<int64_t>(plan.phases[last].size());
    int64_t alone = 0, fused = 0;  // panels
    for (int64_t pi = 0; pi < P; ++pi) {
      const int64_t m = column_run(pi);
      alone += m * round_up(Fg, NR) / NR;
      fused += round_up(m * Fg, NR) / NR;
    }
    if (fused >= alone) return false;
    // The fused phase B, every combination counted (shared_b counts the used
    // ones): panels x taps x Cg x NR, summed over the product of the
    // dimensions' phases as a product of per-dimension sums.
    double elements = static_cast<double>(pb.group_in()) * NR;
    for (int d = 0; d < last; ++d) {
      int64_t taps = 0;
      for (const Phase& p : plan.phases[d]) taps += p.T;
      elements *= static_cast<double>(taps);
    }
    int64_t last_sum = 0;
    for (int64_t pi = 0; pi < P; ++pi)
      last_sum += round_up(Fg * column_run(pi), NR) / NR * plan.phases[last][pi].T;
    return elements * static_cast<double>(last_sum) * sizeof(Acc) <= kSharedBTotal;
  }
  // Columns of the GEMM of phase combination c (sub-problem s): Fg, or m x
  // Fg where its last-dimension phase leads m fused ones (fuses_columns), or
  // 0 where another combination's GEMM computes its outputs.
  int64_t combo_cols(int64_t c, bool fc) const {
    const int64_t P = static_cast<int64_t>(plan.phases[pb.nd - 1].size());
    return pb.group_out() * (fc ? column_run(c % P) : 1);
  }
  int64_t combo_cols(int64_t c) const { return combo_cols(c, fuses_columns()); }
  int64_t sp_cols(int64_t s, bool fc) const {
    return combo_cols(combo_of(plan.subproblems[s]), fc);
  }

  // A filter gradient (rows: the input channels, contiguous; one sub-problem
  // per tap, or per phase and tap) whose input and cotangent are larger than
  // the caches would stream both from memory once per tap, the packing of A
  // and B waiting on it (a fifth of a ResNet 3x3 d-filter's time). Its taps
  // are instead interleaved (run_taps): each task runs every sub-problem on a
  // chunk of the cotangent's rows before moving on, so the rows stay in cache
  // from the first tap to the last. Measured in process (AVX-512 Zen 4, 2
  // cores): 3x3 d-filters of 6-16 MB operands 0.78-0.93x the time, 1D
  // WaveNet/up-sampling 0.83-0.96x, DCGAN generator 8->16 and 16->32 0.88x.
  // Where it did not pay, the limits: operands under kTapsMinBytes (3D and
  // 7x7 layers of 1-4 MB, 1.09-1.38x), more than kTapsMaxSubproblems taps
  // (the k8 s4 head's 64, 1.18x), fewer than kTapsMinChunks chunks (DCGAN's
  // 4->8, one chunk per 16 batch entries: 1.08-1.19x). Those two limits are
  // Zen 4's (1 MB of L2 per core, a fast L3). Cores with 2 MB of L2 or more
  // (the Xeon VM: its L3 far slower per core) interleave from 1 MB of
  // operands and up to 64 taps: the 7x7 layer on an 8x8 map (49 taps, 4 MB)
  // took 0.55-0.58x the time there (24.2-25.5 ms, 13.5-14.7 interleaved).
  // Every task's output blocks stay within half the L2 (kTapsOutBytes on
  // Zen 4): on the Xeon, that 7x7 layer at 512 KB split its 128 columns
  // into blocks of 32, 32 and 64 (17.5-18.5 ms).
  static constexpr int64_t kTapsMinBytes = int64_t{6} << 20, kTapsMaxSubproblems = 16;
  static constexpr int64_t kTapsMinBytesBigL2 = int64_t{1} << 20, kTapsMaxSubproblemsBigL2 = 64;
  static constexpr int64_t kTapsMinChunks = 8, kTapsOutBytes = int64_t{512} << 10;
  static bool big_l2() { return gemm::l2_bytes() >= (int64_t{2} << 20); }
  static int64_t taps_out_bytes() { return std::max(kTapsOutBytes, gemm::l2_bytes() / 2); }
  // Elements of lhs and rhs together.
  int64_t operand_elements() const {
    int64_t lhs_n = pb.batch * pb.in_feat, rhs_n = pb.out_feat * pb.group_in();
    for (int d = 0; d < pb.nd; ++d) {
      lhs_n *= pb.dim[d].in_size;
      rhs_n *= pb.dim[d].k_size;
    }
    return lhs_n + rhs_n;
  }
  bool interleaves_taps() const {
    if (narrow() || pb.lhs_n != 1 || channels_inner() || nsp() < 2 || stream_out() ||
        nsp() > (big_l2() ? kTapsMaxSubproblemsBigL2 : kTapsMaxSubproblems))
      return false;
    return operand_elements() * static_cast<int64_t>(sizeof(Tin)) >=
               (big_l2() ? kTapsMinBytesBigL2 : kTapsMinBytes) &&
           pb.group_in() * pb.dim[0].k_size >= kTapsMinChunks * tap_chunk_rows();
  }
  // Taps fused into one GEMM. A filter gradient's sub-problems (its taps)
  // that differ only in the last dimension's kernel offset, by one position,
  // read the same A (the input) and B rows one cotangent position apart: with
  // the features contiguous and a position exactly Fg features long, the B
  // row of m such taps is m x Fg contiguous floats, which one GEMM reads as
  // m x Fg columns (6 x 64 tiles for U-Net's k2 s2 layers of 32 features,
  // instead of 6 x 32 per tap). Returns m, the group size (consecutive
  // sub-problems [i m, (i + 1) m), the last dimension fastest in the plan),
  // or 0. Float32 on AVX-512 (B read in place), with at most kFuseTapsCols
  // columns in all; tap_tasks then splits the groups among the tasks before
  // the rows, so each task reads its taps' part of the cotangent once, for
  // all rows. In process (Xeon with AVX-512, 2 cores, same bits), U-Net
  // 64->128's d-filter took 0.70x the time (2.93-3.02 ms, 2.01-2.21 fused);
  // fused but with the rows split among the tasks as before, 0.83x.
  static constexpr int64_t kFuseTapsCols = 4 * NR;
  int64_t fused_taps() const {
    const int last = pb.nd - 1;
    const int64_t Fg = pb.group_out();
    if (!std::is_same<Tin, float>::value || !std::is_same<Tout, float>::value ||
        gemm::gemm_isa() != 2 || pb.nd < 2 || pb.groups() != 1 || pb.rhs_o != 1 ||
        pb.rhs_sp[last] != Fg || Fg % NR != 0 || 2 * Fg > kFuseTapsCols || !interleaves_taps())
      return 0;
    // m: the sub-problems from 0 on that share everything outside the last dimension.
    auto same_outer = [&](const SubProblem& a, const SubProblem& b) {
      if (a.rows != b.rows || a.taps != b.taps || a.taps == 0) return false;
      for (int d = 0; d < last; ++d)
        if (a.phase[d] != b.phase[d] || a.seg[d].u0 != b.seg[d].u0 ||
            a.seg[d].count != b.seg[d].count || a.seg[d].t_lo != b.seg[d].t_lo ||
            a.seg[d].t_hi != b.seg[d].t_hi)
          return false;
      return true;
    };
    int64_t m = 1;
    while (m < nsp() && same_outer(plan.subproblems[0], plan.subproblems[m])) ++m;
    if (m < 2 || m * Fg > kFuseTapsCols || nsp() % m != 0) return 0;
    for (int64_t f = 0; f < nsp(); f += m) {
      const SubProblem& a = plan.subproblems[f];
      const Phase& pa = *a.phase[last];
      const Segment& ga = a.seg[last];
      std::vector<char> seen(m, 0);
      for (int64_t s = f; s < f + m; ++s) {
        const SubProblem& b = plan.subproblems[s];
        const Phase& pp = *b.phase[last];
        const Segment& gb = b.seg[last];
        // The same A: rows and taps (input_index linear in u and t), so the
        // same row offsets, reduction and chunks (tap_index reads dimension 0).
        if (!same_outer(a, b) || gb.count != ga.count || gb.t_lo != ga.t_lo || gb.t_hi != ga.t_hi ||
            pp.ustride != pa.ustride || pp.tstride != pa.tstride || pp.kstep != pa.kstep ||
            input_index(pp, gb.u0, gb.t_lo) != input_index(pa, ga.u0, ga.t_lo))
          return 0;
        // B one kernel position (Fg elements) per slot from the lowest.
        const int64_t slot = tap_slot(s, m);
        if (slot >= m || seen[slot]) return 0;
        seen[slot] = 1;
      }
    }
    return m;
  }
  // The column slot of sub-problem s in its group of m (fused_taps).
  int64_t tap_slot(int64_t s, int64_t m) const {
    const int last = pb.nd - 1;
    int64_t k0_min = plan.subproblems[s].phase[last]->k0;
    for (int64_t i = s / m * m; i < s / m * m + m; ++i)
      k0_min = std::min(k0_min, plan.subproblems[i].phase[last]->k0);
    return plan.subproblems[s].phase[last]->k0 - k0_min;
  }
  // Tasks of run_taps: row blocks, each over all columns and a range of
  // sub-problems, or over all sub-problems and a column block. On AVX-512
  // with at most 4 NR features (one 6 x 64 tile), the sub-problems are split
  // among the tasks (whole groups where fused_taps), in ranges of about equal
  // work (float32 and the bfloat16 pair path: float accumulators): each task
  // then reads its taps' part of the cotangent, for all rows, with whole
  // tiles. In process (Xeon, 2 cores, same bits), against splitting the
  // columns into 6 x 32 tiles: 1-D filter gradients of 64 features
  // 0.86-0.89x the time (WaveNet, k4 s2 up-sampling), U-Net 32->64's (64
  // features, 2-D) no change (1.00x); U-Net 64->128's fused taps 0.83x, and
  // its bfloat16 filter gradient (pairs on AMX) 0.65x, against splitting the
  // rows. On AVX2 the same where the features are one such unit (at most
  // 2 NR), whose tasks would otherwise be row blocks each packing all of the
  // cotangent: U-Net 64->128's filter gradient (32 features) took 0.85x the
  // time (AVX2 EPYC, 2 cores, 3 alternating rounds; 4.5-5.1 ms against
  // 5.3-5.9); with 64 features (columns split in two, nothing packed twice)
  // it was slower: ResNet 3x3's 1.05x, the 64-channel atrous d2's 1.04x.
  // Otherwise columns (whole AVX-512 tiles, 2 NR), then rows (whole MR
  // blocks) are split until every worker has kTapTasksPerWorker tasks, and
  // rows further until the tasks divide among the workers; blocks are of
  // equal size (with 2 workers, row blocks of 96 + 32 took 1.4x the time of
  // 64 + 64).
  static constexpr int64_t kTapTasksPerWorker = 1;
  std::vector<Task> tap_tasks(int64_t workers) const {
    int64_t rows = 0;
    for (const SubProblem& sp : plan.subproblems) rows = std::max(rows, sp.rows);
    const int64_t Fg = pb.group_out(), G = pb.groups(), want = kTapTasksPerWorker * workers;
    // Column units: whole AVX-512 tiles (2 NR), or units of m sub-problems
    // (m = 1, or fused_taps' groups).
    const int64_t fused = fused_taps();
    const bool f32 = std::is_same<Acc, float>::value;  // float32, or bfloat16 pairs
    const int isa = gemm::gemm_isa();
    const bool split_taps =
        f32 && nsp() > 1 && ((isa == 2 && Fg <= 4 * NR) || (isa == 1 && Fg <= 2 * NR));
    const int64_t m = fused > 1 ? fused : split_taps ? 1 : 0;
    const int64_t units = m > 0 ? nsp() / m : 0;
    const int64_t tiles = m > 0 ? units : std::max<int64_t>(1, Fg / (2 * NR));
    const int64_t max_rb = std::max<int64_t>(1, rows / MR);
    int64_t rb = std::max<int64_t>(1, (rows + kMC - 1) / kMC), cb = 1;
    while (G * rb * cb < want && (cb < tiles || rb < max_rb)) cb < tiles ? ++cb : ++rb;
    // Every sub-problem's output block is live across a task's chunks: keep
    // them within taps_out_bytes(), splitting the longer side.
    auto out_bytes = [&] {
      const int64_t subs = m > 0 ? (units + cb - 1) / cb * m : nsp();
      const int64_t cols = m > 0 ? Fg : round_up((Fg + cb - 1) / cb, NR);
      return subs * round_up((rows + rb - 1) / rb, MR) * cols * static_cast<int64_t>(sizeof(Acc));
    };
    while (out_bytes() > taps_out_bytes() && (cb < tiles || rb < max_rb)) {
      const bool by_rows = rb < max_rb && (cb >= tiles || rows / rb >= Fg / cb);
      by_rows ? ++rb : ++cb;
    }
    while ((G * rb * cb) % workers != 0 && rb < max_rb) ++rb;
    // Block i of n of `len` in units of u: [i * m / n * u, (i + 1) * m / n * u), m units in all.
    auto cut = [](int64_t i, int64_t n, int64_t len, int64_t u) {
      const int64_t m = (len + u - 1) / u;
      return std::min(len, i * m / n * u);
    };
    // Sub-problem ranges: cb ranges of whole units, cut where the work
    // (rows x taps) before them passes j / cb of the whole.
    std::vector<int64_t> sp_cut(cb + 1, nsp());
    if (m > 0) {
      std::vector<int64_t> work(units + 1, 0);
      for (int64_t u = 0; u < units; ++u) {
        work[u + 1] = work[u];
        for (int64_t s = u * m; s < (u + 1) * m; ++s)
          work[u + 1] += plan.subproblems[s].rows * plan.subproblems[s].taps;
      }
      sp_cut[0] = 0;
      for (int64_t j = 1; j < cb; ++j) {
        int64_t u = sp_cut[j - 1] / m + 1;  // at least one unit per range
        while (u < units - (cb - j) && work[u] * cb < work[units] * j) ++u;
        sp_cut[j] = u * m;
      }
    }
    std::vector<Task> ts;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < rb; ++i)
        for (int64_t j = 0; j < cb; ++j) {
          Task t{0, g, cut(i, rb, rows, MR), cut(i + 1, rb, rows, MR), 0, Fg};
          t.all_taps = true;
          if (m > 0) {
            t.sp = sp_cut[j];
            t.sp1 = sp_cut[j + 1];
          } else {
            t.col0 = cut(j, cb, Fg, 2 * NR);
            t.col1 = cut(j + 1, cb, Fg, 2 * NR);
            t.sp1 = nsp();
          }
          if (t.row1 > t.row0 && t.col1 > t.col0 && t.sp1 > t.sp) ts.push_back(t);
        }
    return ts;
  }
  // The part of an all-taps task that falls on sub-problem s (empty rows
  // where s has fewer).
  Task sub_task(const Task& t, int64_t s) const {
    const int64_t rows = plan.subproblems[s].rows;
    return Task{s, t.group, std::min(t.row0, rows), std::min(t.row1, rows), t.col0, t.col1};
  }
  // Rows of a chunk of interleaved taps (run_taps, run_narrow_taps), in rhs
  // index of dimension 0: about `indices` reduction indices of the densest
  // sub-problem per chunk.
  int64_t chunk_rows(int64_t indices) const {
    int64_t dens = 1;
    for (const SubProblem& sp : plan.subproblems) {
      const int64_t cnt0 = sp.seg[0].t_hi - sp.seg[0].t_lo;
      if (cnt0 > 0) dens = std::max(dens, sp.taps / cnt0 / sp.phase[0]->kstep);
    }
    return std::max<int64_t>(1, indices / dens);
  }
  int64_t tap_chunk_rows() const { return chunk_rows(kKC); }

  // The first reduction index of sub-problem sp at or after global row g
  // (= c * J + rhs index of dimension 0): k = c * taps + tap, dimension 0's
  // tap outermost, so the indices of a range of global rows are contiguous.
  // With `taps` the sub-problem's reduction per channel outside the last
  // dimension (run_narrow_cols), the index of a run of that dimension.
  int64_t tap_index(const SubProblem& sp, int64_t g, int64_t J) const {
    return tap_index(sp, g, J, sp.taps);
  }
  int64_t tap_index(const SubProblem& sp, int64_t g, int64_t J, int64_t taps) const {
    const Phase& ph = *sp.phase[0];
    const int64_t lo = sp.seg[0].t_lo, hi = sp.seg[0].t_hi, c = g / J;
    const int64_t t = std::clamp(ceil_div(g % J - ph.k0, ph.kstep), lo, hi);
    return c * taps + (t - lo) * (taps / (hi - lo));
  }
  // One all-taps task: for each chunk of H global rows (tap_index), every
  // sub-problem multiplies the reduction indices it has there, a contiguous
  // range, into its own scratch block, copied out at the end (in process,
  // writing in place instead took 1.26x the time with the AVX-512 kernel
  // and 0.98-1.15x with the AVX2 one). Each output element is still summed in
  // reduction order by one task, in blocks that depend on the shapes alone,
  // so the bits do not depend on the thread count.
  void run_taps(const Task& task) const {
    const int64_t Cg = pb.group_in(), s0 = task.sp, s1 = task.sp1;
    thread_local std::vector<TaskA> st;
    thread_local std::vector<Task> sub;
    thread_local std::vector<Acc> Ap, Bp, Cbuf;
    // packs_taps_b: a chunk's rhs offsets; of each class, its first position
    // in the chunk's packed B and in the class (-1: no sub-problem reads it)
    thread_local std::vector<int64_t> chunk_off, at, first;
    if (st.size() < static_cast<size_t>(nsp())) st.resize(nsp());
    sub.resize(nsp());
    const int64_t mc_max = round_up(task.row1 - task.row0, MR);
    const int64_t nc_max = round_up(std::min(kNC, task.col1 - task.col0), NR);
    const bool once = packs_taps_b(task);
    at.assign(once ? class_count() : 0, -1);
    first.assign(at.size(), 0);
    for (int64_t s = s0; s < s1; ++s) {
      sub[s] = sub_task(task, s);
      if (sub[s].row1 <= sub[s].row0) continue;
      prepare_a(sub[s], !once, st[s]);
      if (!once || plan.subproblems[s].taps == 0) continue;
      st[s].b_runs = position_runs(s, st[s].bra, st[s].brb);
      at[rhs_class(plan.subproblems[s])] = 0;
    }
    // Sub-problem s's block: Cbuf + (s - s0) * mc_max * nc_max.
    Cbuf.resize((s1 - s0) * mc_max * nc_max);
    const int64_t H = tap_chunk_rows(), J = pb.dim[0].k_size;
    // Fused taps (fused_taps; the task then a range of whole groups, all of Fg):
    // each group of m sub-problems is one GEMM of m x Fg columns from the B
    // of its slot 0, into the group's m blocks read as one block of m x Fg
    // columns (slot j's: columns [j Fg, (j + 1) Fg) of each row).
    const int64_t m = fused_taps(), step = m > 1 ? m : 1;
    thread_local std::vector<int64_t> slot, lead;  // of each sub-problem; of each group
    slot.assign(nsp(), 0);
    lead.assign(nsp() / step, 0);
    for (int64_t s = s0; s < s1; ++s) {
      if (m > 1) slot[s] = tap_slot(s, m);
      if (slot[s] == 0) lead[s / step] = s;
    }
    for (int64_t nc0 = task.col0; nc0 < task.col1;) {
      const int64_t nc = std::min(nc0 / kNC * kNC + kNC, task.col1) - nc0;
      const int64_t nc_pad = round_up(nc, NR);
      std::fill(Cbuf.begin(), Cbuf.end(), Acc(0));
      for (int64_t g0 = 0; g0 < Cg * J; g0 += H) {
        const int64_t g1 = std::min(g0 + H, Cg * J);
        int64_t n = 0;  // the chunk's positions of the classes read, class after class
        for (int64_t r = 0; r < static_cast<int64_t>(at.size()); ++r) {
          if (at[r] < 0) continue;
          first[r] = class_start(r, g0);
          const int64_t len = class_start(r, g1) - first[r];
          chunk_off.resize(n + len);
          class_offsets(r, first[r], first[r] + len, chunk_off.data() + n);
          at[r] = n;
          n += len;
        }
        if (once) {
          Bp.resize(nc_pad * n);
          pack_b_block(chunk_off, task.group, nc0, nc, 0, n, Bp.data());
        }
        for (int64_t s = s0; s < s1; s += step) {
          const int64_t l = lead[s / step];  // the sub-problem whose B comes first
          const SubProblem& sp = plan.subproblems[l];
          const TaskA& x = st[l];
          const int64_t mc = sub[l].row1 - sub[l].row0;
          if (mc <= 0 || sp.taps == 0) continue;  // no rows, or outputs all zero
          const int64_t k0 = tap_index(sp, g0, J), k1 = tap_index(sp, g1, J);
          const gemm::BufC<Acc> C{Cbuf.data() + (s - s0) * mc_max * nc_max, step * nc_pad};
          for (int64_t kc0 = k0; kc0 < k1; kc0 += kKC) {
            const int64_t kc = std::min(kKC, k1 - kc0);
            if (once) {
              const gemm::NarrowRuns& k = x.b_runs;
              const int64_t r = rhs_class(sp);
              const gemm::PanelRunB<Acc> B{
                  {Bp.data() + at[r] * NR, k.rb, k.R, k.sb * NR, kc0 / k.R, kc0 % k.R},
                  first[r],
                  n * NR};
              multiply_a(x, mc, kc0, kc, B, nc, C, Ap);
            } else {
              multiply_b(x, mc, task.group, nc0, step * nc, kc0, kc, C, Ap, Bp);
            }
          }
        }
      }
      for (int64_t s = s0; s < s1; ++s)
        if (sub[s].row1 > sub[s].row0)
          copy_out(st[s].out_row.data(), sub[s].row1 - sub[s].row0, task.group, nc0, nc,
                   Cbuf.data() + (s / step * step - s0) * mc_max * nc_max + slot[s] * nc_pad,
                   step * nc_pad, false);
      nc0 += nc;
    }
  }

  // Narrow tasks: batch chunks of [kStrip, 2 kStrip) entries (a chunk shorter
  // than a strip would run one row at a time), and the positions split too
  // when that leaves fewer than kTasksPerWorker tasks per worker. Rows are
  // (n, position), position fastest, so a chunk [n0, n1) is rows [n0 P, n1 P).
  std::vector<Task> narrow_tasks(int64_t workers) const {
    const int64_t nb = pb.out_batch(), chunks = std::max<int64_t>(1, nb / gemm::kStrip<Acc>);
    if (narrow_taps()) {
      // Each task: a batch chunk of a group over a range of sub-problems, as
      // few ranges as keep every worker busy (each range reads all of A).
      const int64_t base = pb.groups() * chunks;
      const int64_t sets = std::clamp<int64_t>((workers + base - 1) / base, 1, nsp());
      std::vector<Task> ts;
      for (int64_t g = 0; g < pb.groups(); ++g)
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t q = 0; q < sets; ++q) {
            Task t{q * nsp() / sets, g, c * nb / chunks, (c + 1) * nb / chunks, 0, pb.group_out()};
            t.all_taps = true;
            t.sp1 = (q + 1) * nsp() / sets;
            ts.push_back(t);
          }
      return ts;
    }
    const int64_t want = kTasksPerWorker * workers;
    int64_t used = 0;
    for (int64_t s = 0; s < nsp(); ++s) used += plan.subproblems[s].rows > 0;
    const int64_t base = std::max<int64_t>(1, used * pb.groups() * chunks);
    const int64_t splits = (want + base - 1) / base;
    std::vector<Task> ts;
    for (int64_t s = 0; s < nsp(); ++s) {
      const int64_t P = plan.subproblems[s].rows / nb;
      if (P == 0) continue;
      const int64_t ps = std::min(P, splits);
      for (int64_t g = 0; g < pb.groups(); ++g)
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t q = 0; q < ps; ++q)
            ts.push_back({s, g, c * nb / chunks * P, (c + 1) * nb / chunks * P, 0,
                          pb.group_out(), q * P / ps, (q + 1) * P / ps});
    }
    return ts;
  }

  // lhs and out element offsets of rows [row0, row1) of a sub-problem; rows
  // are (n, j_0, ..., j_{nd-1}) row-major. Padding rows up to a multiple of
  // MR get -1 (read as zeros). Not inlined: inside a task's body, its loops
  // ran with their pointers and steps spilled to the stack.
#if defined(__GNUC__)
  __attribute__((noinline))
#endif
  void row_offsets(const Task& t, std::vector<int64_t>& lhs_row,
                   std::vector<int64_t>& out_row) const {
    const SubProblem& sp = plan.subproblems[t.sp];
    const int64_t mc = t.row1 - t.row0;
    // Feature groups pick an lhs channel block, batch groups an lhs batch block.
    const int64_t lhs_group = pb.feature_groups > 1 ? t.group * pb.group_in() * pb.lhs_c
                                                    : t.group * pb.out_batch() * pb.lhs_n;
    lhs_row.assign(round_up(mc, MR), -1);
    out_row.resize(mc);
    // (n, j) of row0, then an odometer: no division per row (they were a
    // quarter of the task set-up on U-Net's k2 s2 forward).
    int64_t j[kMaxSpatial] = {0, 0, 0}, n = t.row0;
    for (int d = pb.nd - 1; d >= 0; --d) {
      j[d] = n % sp.seg[d].count;
      n /= sp.seg[d].count;
    }
    // Along the last dimension the offsets step by constants; they are
    // recomputed where it wraps (a few cycles per row less: the dot kernel's
    // rows are short). Unsigned steps: the same wrap-around as input_index.
    const int last = pb.nd - 1;
    const uint64_t lstep = static_cast<uint64_t>(sp.phase[last]->ustride) *
                           static_cast<uint64_t>(pb.lhs_sp[last]);
    const uint64_t ostep = static_cast<uint64_t>(sp.phase[last]->L) *
                           static_cast<uint64_t>(pb.out_sp[last]);
    // One span per stretch of the last dimension: its first offsets from
    // (n, j), then a loop that steps them (an odometer step per row kept j in
    // memory).
    const int64_t count = sp.seg[last].count;
    for (int64_t r = 0; r < mc;) {
      uint64_t lo = static_cast<uint64_t>(lhs_group + n * pb.lhs_n);
      uint64_t oo = static_cast<uint64_t>(n * pb.out_n);
      for (int d = 0; d < pb.nd; ++d) {
        const Phase& ph = *sp.phase[d];
        const int64_t u = sp.seg[d].u0 + j[d];
        lo += static_cast<uint64_t>(input_index(ph, u, sp.seg[d].t_lo)) *
              static_cast<uint64_t>(pb.lhs_sp[d]);
        oo += static_cast<uint64_t>((ph.o0 + ph.L * u) * pb.out_sp[d]);
      }
      const int64_t span = std::min(mc - r, count - j[last]);
      int64_t* const lr = lhs_row.data() + r;
      int64_t* const orr = out_row.data() + r;
      for (int64_t i = 0; i < span; ++i) {
        lr[i] = static_cast<int64_t>(lo + static_cast<uint64_t>(i) * lstep);
        orr[i] = static_cast<int64_t>(oo + static_cast<uint64_t>(i) * ostep);
      }
      r += span;
      if ((j[last] += span) == count) {
        j[last] = 0;
        int d = last - 1;
        for (; d >= 0 && ++j[d] == sp.seg[d].count; --d) j[d] = 0;
        if (d < 0) ++n;
      }
    }
  }

  // The reduction index k runs over (taps, c) with c innermost when the lhs
  // channels are its contiguous dimension, else over (c, taps), so that
  // successive k step through memory as little as possible (a filter
  // gradient's "channels" are the original batch, the largest stride).
  bool channels_inner() const { return pb.lhs_c <= pb.lhs_sp[pb.nd - 1]; }

  // lhs (relative to a row's offset) and rhs element offsets of each tap of
  // sub-problem sp, taps relative to t_lo, last dimension fastest: an
  // odometer, no division per tap. With run_starts, only of each run's first
  // tap (the last dimension at t_lo: taps / R entries), all that
  // reduction_runs reads when the channels are outer: a filter gradient's
  // taps are the cotangent's positions: 64 KB of tables per thread for
  // U-Net's 64->128 k2 s2 d-filter (a 32 KB output), 1 KB with run_starts.
  int64_t tap_entries(const SubProblem& sp, bool run_starts) const {
    const int64_t R = sp.seg[pb.nd - 1].t_hi - sp.seg[pb.nd - 1].t_lo;
    return !run_starts ? sp.taps : R > 0 ? sp.taps / R : 0;
  }
  // With class_sp, the rhs offsets are positions in sp's residue class
  // (class_positions' strides) instead of elements.
  void tap_offsets(const SubProblem& sp, std::vector<int64_t>& tap_l,
                   std::vector<int64_t>& tap_r, bool run_starts = false,
                   const int64_t* class_sp = nullptr) const {
    const int64_t n = tap_entries(sp, run_starts);
    const int inner = run_starts ? pb.nd - 2 : pb.nd - 1;  // the odometer's last digit
    tap_l.resize(n);
    tap_r.resize(n);
    int64_t tt[kMaxSpatial] = {0, 0, 0};
    for (int64_t i = 0; i < n; ++i) {
      int64_t li = 0, ri = 0;
      for (int d = 0; d < pb.nd; ++d) {
        const Phase& ph = *sp.phase[d];
        li += ph.tstride * tt[d] * pb.lhs_sp[d];
        ri += class_sp ? (sp.seg[d].t_lo + tt[d]) * class_sp[d]
                       : (ph.k0 + ph.kstep * (sp.seg[d].t_lo + tt[d])) * pb.rhs_sp[d];
      }
      tap_l[i] = li;
      tap_r[i] = ri;
      for (int d = inner; d >= 0 && ++tt[d] == sp.seg[d].t_hi - sp.seg[d].t_lo; --d) tt[d] = 0;
    }
  }

  // lhs (relative to a row's offset) and rhs element offsets of the
  // reduction index k. Either output may be null (both: nothing to do).
  void red_offsets(int64_t s, std::vector<int64_t>* lhs_red, std::vector<int64_t>* rhs_red) const {
    if (lhs_red == nullptr && rhs_red == nullptr) return;
    const SubProblem& sp = plan.subproblems[s];
    const int64_t Cg = pb.group_in(), red = red_size(s), taps = sp.taps;
    thread_local std::vector<int64_t> tap_l, tap_r;
    tap_offsets(sp, tap_l, tap_r);
    const bool c_inner = channels_inner();  // k = tap * Cg + c, else c * taps + tap
    // Filled in reduction order (sequential stores).
    auto fill = [&](std::vector<int64_t>& dst, const std::vector<int64_t>& tap, int64_t cs) {
      dst.resize(red);
      int64_t* d = dst.data();
      if (c_inner) {
        for (int64_t i = 0; i < taps; ++i)
          for (int64_t c = 0; c < Cg; ++c) *d++ = tap[i] + c * cs;
      } else {
        for (int64_t c = 0; c < Cg; ++c)
          for (int64_t i = 0; i < taps; ++i) *d++ = tap[i] + c * cs;
      }
    };
    if (lhs_red) fill(*lhs_red, tap_l, pb.lhs_c);
    if (rhs_red) fill(*rhs_red, tap_r, pb.rhs_i);
  }

  static constexpr int64_t kPrefetchBytes = 4096;
  static constexpr int64_t kStreamOutBytes = int64_t{8} << 20;
  int64_t out_bytes() const {
    int64_t n = pb.out_batch() * pb.out_feat * static_cast<int64_t>(sizeof(Tout));
    for (int d = 0; d < pb.nd; ++d) n *= pb.dim[d].out_size;
    return n;
  }
  // Packs column block [nc0, nc0 + nc) x reduction block [kc0, kc0 + kc)
  // of B of group g into NR-column panels [kc][NR], zero-filled past nc.
  void pack_b_block(const std::vector<int64_t>& rhs_red, int64_t g, int64_t nc0, int64_t nc,
                    int64_t kc0, int64_t kc, Acc* dst) const {
    const int64_t nc_pad = round_up(nc, NR), full = nc / NR * NR;
    const Tin* cols = rhs + (g * pb.group_out() + nc0) * pb.rhs_o;
    // Row p of the block is one reduction index: read it once, across all
    // panels. Contiguous columns (rhs_o == 1) copy as whole vectors. The rows
    // of a filter gradient's B are scattered over a large cotangent and come
    // from memory: the row about kPrefetchBytes ahead is prefetched (without,
    // 9/10 of the packing time of U-Net's k2 s2 d-rhs was stalled on these
    // loads; 8 rows ahead halved it; 32 rows of 128 B did better still, but 32
    // rows of 256 B, too many lines in flight, did worse than 8).
    const int64_t row_bytes = (nc - 1) * pb.rhs_o * static_cast<int64_t>(sizeof(Tin)) + 1;
    const int64_t red = static_cast<int64_t>(rhs_red.size());
    const int64_t ahead_rows =
        std::clamp<int64_t>(kPrefetchBytes / std::min<int64_t>(row_bytes, 256), 4, 32);
    for (int64_t p = 0; p < kc; ++p) {
      const Tin* src = cols + rhs_red[kc0 + p];
      Acc* row = dst + p * NR;
      if (kc0 + p + ahead_rows < red) {  // into the next block too
        const char* ahead = reinterpret_cast<const char*>(cols + rhs_red[kc0 + p + ahead_rows]);
        for (int64_t o = 0; o < row_bytes && o < 256; o += 64) __builtin_prefetch(ahead + o);
      }
      if (std::is_same<Tin, Acc>::value && pb.rhs_o == 1) {
        for (int64_t jr = 0; jr < full; jr += NR)
          std::memcpy(row + jr * kc, src + jr, NR * sizeof(Acc));
      } else if (pb.rhs_o == 1) {
        for (int64_t jr = 0; jr < full; jr += NR)
          for (int j = 0; j < NR; ++j) row[jr * kc + j] = load<Acc>(src[jr + j]);
      } else {
        for (int64_t jr = 0; jr < full; jr += NR)
          for (int j = 0; j < NR; ++j) row[jr * kc + j] = load<Acc>(src[(jr + j) * pb.rhs_o]);
      }
      if (full < nc_pad)  // the last, partial panel: zero-filled past nc
        for (int j = 0; j < NR; ++j)
          row[full * kc + j] = full + j < nc ? load<Acc>(src[(full + j) * pb.rhs_o]) : Acc(0);
    }
  }

  // Packs all of B of (sub-problem s, group g) into dst[packed_b_size(s)]:
  // the block (nc0, kc0) starts at nc0 * red + kc0 * nc_pad.
  void pack_b(int64_t s, int64_t g, Acc* dst) const {
    thread_local std::vector<int64_t> rhs_red;
    red_offsets(s, nullptr, &rhs_red);
    const int64_t Fg = pb.group_out(), red = red_size(s);
    for (int64_t nc0 = 0; nc0 < Fg; nc0 += kNC) {
      const int64_t nc = std::min(kNC, Fg - nc0), nc_pad = round_up(nc, NR);
      for (int64_t kc0 = 0; kc0 < red; kc0 += kKC)
        pack_b_block(rhs_red, g, nc0, nc, kc0, std::min(kKC, red - kc0),
                     dst + nc0 * red + kc0 * nc_pad);
    }
  }

  // Packs rows [0, mc_pad) x reduction [kc0, kc0 + kc) of A into MR-row
  // panels [kc][MR]; rows with offset -1 are zeros. Where the rows are
  // contiguous (lhs_n == 1: a filter gradient's input channels) a panel's MR
  // rows at one index share a line, and the index is the outer loop (in
  // process, with the rows outer five of six strided float32 d-filters took
  // 1.10-1.17x the time; bfloat16 d-filters did not change).
  void pack_a(const std::vector<int64_t>& lhs_row, const std::vector<int64_t>& lhs_red,
              int64_t kc0, int64_t kc, Acc* dst) const {
    const int64_t* ro = lhs_red.data() + kc0;
    for (int64_t ir = 0; ir < static_cast<int64_t>(lhs_row.size()); ir += MR) {
      Acc* panel = dst + ir * kc;
      const int64_t* rows = lhs_row.data() + ir;
      bool contiguous = std::is_same<Tin, Acc>::value;
      for (int i = 1; i < MR; ++i) contiguous = contiguous && rows[i] == rows[0] + i;
      if (contiguous && rows[0] >= 0) {
        const Tin* src = lhs + rows[0];
        for (int64_t p = 0; p < kc; ++p) std::memcpy(panel + p * MR, src + ro[p], MR * sizeof(Acc));
        continue;
      }
      if (pb.lhs_n == 1 && *std::min_element(rows, rows + MR) >= 0) {
        for (int64_t p = 0; p < kc; ++p)
          for (int i = 0; i < MR; ++i) panel[p * MR + i] = load<Acc>(lhs[rows[i] + ro[p]]);
        continue;
      }
      for (int i = 0; i < MR; ++i) {
        if (rows[i] < 0) {
          for (int64_t p = 0; p < kc; ++p) panel[p * MR + i] = Acc(0);
        } else {
          for (int64_t p = 0; p < kc; ++p) panel[p * MR + i] = load<Acc>(lhs[rows[i] + ro[p]]);
        }
      }
    }
  }

  // A that could be read in place (as runs, or through an offset per index)
  // is packed (pack_a) when its rows are contiguous (a filter gradient's, the
  // input channels) and successive reduction indices skip through the input
  // (the window stride of a strided conv): every index then reads a new line
  // of which the row block uses a part, once per column panel. Packing reads
  // it once; the gain grows with the stride and with the panels that reuse
  // the packed block. Measured in process, d-filter of stride-2 layers with
  // 128-512 features 0.50-0.86x the time, stride 4 with 64 features 0.69x;
  // but no gain for stride 2 with 64 features (0.98-1.06x), and for most
  // layers whose input is read with stride 1 1.06-1.37x (7x7, grouped, 3D,
  // dilated, k8 s4 transposed).
  bool packs_strided_a(const SubProblem& sp, int64_t cols) const {
    const int64_t panels = (std::min(kNC, cols) + NR - 1) / NR;
    const int64_t stride = sp.phase[pb.nd - 1]->tstride;
    return pb.lhs_n == 1 && !channels_inner() && stride > 1 && stride * panels >= 16;
  }
  // A is packed block by block (pack_a): where it needs a conversion, or
  // where packs_strided_a. run and task_buffers both ask here.
  bool packs_a(const Task& t) const {
    return !reads_a_in_place() || packs_strided_a(plan.subproblems[t.sp], t.col1 - t.col0);
  }
  // Outputs far larger than the caches are written with non-temporal stores
  // (AVX-512 machines only).
  bool stream_out() const { return gemm::gemm_isa() == 2 && out_bytes() > kStreamOutBytes; }
  // The GEMM writes whole tiles of outputs larger than kStreamTilesBytes in
  // place with non-temporal stores, where every row and column block starts
  // on a vector (features innermost, a multiple of a ymm, or of a zmm with
  // AVX-512), and the reduction fits one block (so each tile is written
  // once, never read back). Measured in process, even with an elementwise op
  // reading the output right after: AVX2, 4 MB outputs (WaveNet, U-Net
  // 16->32) 0.83-0.92x the time; AVX-512 (Zen 4), forwards and input
  // gradients with 2-16 MB outputs 0.87-1.00x (U-Net 64->128 0.87-0.91,
  // 32->64 0.92), 0.89-0.99x with the elementwise op.
  static constexpr int64_t kStreamTilesBytes = int64_t{2} << 20;
  bool streams_tiles() const {
    const int isa = gemm::gemm_isa();
    const int64_t bytes = isa == 2 ? 64 : 32, W = bytes / static_cast<int64_t>(sizeof(Acc));
    bool aligned = reinterpret_cast<uintptr_t>(out) % bytes == 0 && pb.out_n % W == 0 &&
                   pb.group_out() % W == 0;
    for (int d = 0; d < pb.nd; ++d) aligned = aligned && pb.out_sp[d] % W == 0;
    return isa >= 1 && std::is_same<Tout, Acc>::value && pb.out_c == 1 && aligned &&
           out_bytes() > kStreamTilesBytes;
  }

  // Whether run writes a bfloat16 output from the AVX2 tiles themselves, each
  // float32 sum rounded as it is stored (gemm::RoundC), instead of into a
  // zeroed scratch block rounded on the way out: where the task's reduction
  // is one block (nothing added to a rounded value) and B comes packed
  // (panel_b: the phase B or a shared one). In process on the Zen 3 VM
  // (AVX2, 2 cores), alternating builds, bfloat16, minima of 3 rounds: U-Net
  // 64->128's forward 4.42-5.42 -> 3.87-4.90 ms, its input gradient
  // 4.05-4.82 -> 3.72-3.96, DCGAN 8->16's forward 20.9-22.0 -> 20.5-21.2.
  bool rounds_out(int64_t blocks, bool panel_b) const {
    return std::is_same<Tout, bf16>::value && std::is_same<Acc, float>::value &&
           pb.out_c == 1 && blocks == 1 && panel_b && gemm::gemm_isa() == 1;
  }

  // Whether run writes a column block of nc columns, of a task whose
  // reduction is `blocks` blocks, as streamed whole tiles in place
  // (streams_tiles), which the AVX-512 kernel writes in any width; else it
  // writes in place only where writes_out_in_place. task_buffers asks too.
  bool streams_block(int64_t blocks, int64_t nc) const {
    return blocks == 1 && streams_tiles() &&
           (gemm::gemm_isa() == 2 || writes_out_in_place(nc));
  }

  // How one task reads A (run, run_taps): its row offsets, the runs or the
  // offset table of its reduction; and B where the task reads it itself: its
  // runs (b_runs, where b_as_runs) or else its offset table (rhs_red).
  struct TaskA {
    std::vector<int64_t> lhs_row, out_row, lhs_red, rhs_red, ra, rb, bra, brb;
    gemm::NarrowRuns runs, b_runs;
    bool packed = false, as_runs = false, b_as_runs = false;
  };
  // b_source: B is the task's to read (no shared or phase B); then either
  // walked as runs (reads_b_as_runs) or through its offset table (rhs_red).
  void prepare_a(const Task& t, bool b_source, TaskA& x) const {
    row_offsets(t, x.lhs_row, x.out_row);
    const bool indirect = reads_a_in_place();
    const int64_t mc = t.row1 - t.row0;
    // As reads_a_as_runs, with the runs built once; A is walked as runs
    // unless it is packed.
    x.runs = indirect ? a_runs(t.sp, x.ra, x.rb) : gemm::NarrowRuns{};
    x.packed = packs_a(t);
    x.as_runs = indirect && !x.packed && x.runs.R >= kMinRun;
    if (indirect)  // padding rows re-read row 0; their results are never stored
      for (int64_t r = mc; r < round_up(mc, MR); ++r) x.lhs_row[r] = x.lhs_row[0];
    x.b_as_runs = b_source && reads_b_as_runs(t);
    if (x.b_as_runs) x.b_runs = reduction_runs(t.sp, x.bra, x.brb);
    red_offsets(t.sp, x.as_runs ? nullptr : &x.lhs_red,
                b_source && !x.b_as_runs ? &x.rhs_red : nullptr);
  }
  // C (+)= A[:, kc0 : kc0 + kc] * B over the task's mc rows and nc columns
  // (B a gemm B source, its panels padded to NR); Ap holds A where it is packed.
  template <typename BSrc, typename CDst>
  void multiply_a(const TaskA& x, int64_t mc, int64_t kc0, int64_t kc, const BSrc& B, int64_t nc,
                  const CDst& C, std::vector<Acc>& Ap) const {
    const int64_t mc_pad = round_up(mc, MR), nc_pad = round_up(nc, NR);
    if (x.as_runs) {
      const gemm::RunA<Acc> A{lhs_in_acc(), x.lhs_row.data(), x.runs.ra, x.runs.R, x.runs.sa,
                              kc0 / x.runs.R, kc0 % x.runs.R};
      if constexpr (std::is_same<Acc, float>::value) {  // float: measured (gemm.h)
        if (x.runs.sa == 1 && gemm::gemm_isa() == 2)
          return gemm_block<Acc>(mc_pad, nc_pad, nc, kc, gemm::ChannelRunA<Acc>{A}, B, C);
      }
      gemm_block<Acc>(mc_pad, nc_pad, nc, kc, A, B, C);
    } else if (!x.packed) {
      const IndirectA<Acc> A{lhs_in_acc(), x.lhs_row.data(), x.lhs_red.data() + kc0};
      gemm_block<Acc>(mc_pad, nc_pad, nc, kc, A, B, C);
    } else {
      Ap.resize(mc_pad * kc);
      pack_a(x.lhs_row, x.lhs_red, kc0, kc, Ap.data());
      gemm_block<Acc>(mc_pad, nc_pad, nc, kc, PackedA<Acc>{Ap.data(), kc}, B, C);
    }
  }
  // B's reduction block [kc0, kc0 + kc) x columns [nc0, nc0 + nc) of group g,
  // multiplied by multiply_a: read in place as runs (b_as_runs) or through
  // its offset table (reads_b_in_place), else packed into Bp first.
  template <typename CDst>
  void multiply_b(const TaskA& x, int64_t mc, int64_t g, int64_t nc0, int64_t nc, int64_t kc0,
                  int64_t kc, const CDst& C, std::vector<Acc>& Ap, std::vector<Acc>& Bp) const {
    const Acc* cols = reinterpret_cast<const Acc*>(rhs) + (g * pb.group_out() + nc0) * pb.rhs_o;
    if (x.b_as_runs) {
      const gemm::NarrowRuns& k = x.b_runs;
      multiply_a(x, mc, kc0, kc, gemm::RunB<Acc>{cols, k.rb, k.R, k.sb, kc0 / k.R, kc0 % k.R}, nc,
                 C, Ap);
      return;
    }
    if (reads_b_in_place(nc)) {
      multiply_a(x, mc, kc0, kc, gemm::TableB<Acc>{cols, x.rhs_red.data() + kc0}, nc, C, Ap);
      return;
    }
    Bp.resize(round_up(nc, NR) * kc);
    pack_b_block(x.rhs_red, g, nc0, nc, kc0, kc, Bp.data());
    multiply_a(x, mc, kc0, kc, gemm::PanelB<Acc>{Bp.data(), kc * NR}, nc, C, Ap);
  }
  // B (rhs) is read in place through its offset table (TableB) where no
  // conversion is needed, its columns are contiguous and the block's fill
  // whole panels (TableB reads panels whole), on AVX-512. Blocks packed here
  // are filter gradients' (few rows, long reductions): their B, the
  // cotangent, is megabytes read once per row block. Measured in process on
  // Zen 4 (2 cores, interleaved A/B, same bits): filter gradients of U-Net
  // 16->32 and 64->128 0.87-0.95x the time, atrous 0.86-0.98x (64-channel d2
  // 1.05x once, 0.97x re-run), 7x7 0.85x, V-Net 3D 0.86x, 1-D 0.91-0.95x
  // (WaveNet d1 1.02x once, 0.94x re-run); DCGAN 8->16 1.02-1.04x. With the AVX2 tile
  // (one 64-byte line of each B row per tile) slower: in place (mostly as
  // runs, walked as segments) 1.00-1.10x the time (U-Net 16->32 1.10x,
  // 64->128 1.07x, 7x7 1.10x, 1-D 1.03-1.06x, 3-D 1.05x, atrous 1.00x;
  // 0.96-1.37x when RunB was read per index): packed there. Re-measured on
  // an AVX2-only Zen 3 (2 cores, 3 alternating rounds, minima), with the
  // taps interleaved: ResNet 3x3's filter gradient within noise, WaveNet
  // d1's 1.06x the time, atrous d2's 1.02-1.13x, U-Net 32->64's 1.2x,
  // 64->128's 1.2-1.35x, DCGAN 8->16's 1.15-1.45x: still packed.
  bool reads_b_in_place(int64_t nc) const {
    return std::is_same<Tin, Acc>::value && pb.rhs_o == 1 && nc % NR == 0 &&
           gemm::gemm_isa() == 2;
  }
  // An all-taps task (run_taps) that would pack B tap by tap (not read in
  // place: AVX2, or a partial panel) packs each chunk of the cotangent once
  // instead, and every tap walks its runs out of that (PanelRunB): the taps
  // of a residue class (class_positions) read nearly the same positions,
  // each trimmed at its own border, which a 3x3 layer's nine taps packed
  // nine times, a k4 s2 layer's four taps of a phase four times. Each class's
  // positions are packed together, so a tap's runs continue one another as
  // in the cotangent (with the phases' positions interleaved, U-Net's k2 s2
  // filter gradient took 1.27-1.35x the time: runs of a few positions two
  // apart). Measured in process (AVX2 Zen 3, 2 cores, 3 alternating rounds,
  // minima): ResNet 3x3's filter gradient 0.91-0.92x the time, atrous
  // 64-channel d2/d4/d8 0.92-0.94x, 256-channel d6 0.99-1.01x and d18 0.96x,
  // ResNet 3x3 s2's 0.94-0.97x, WaveNet's 0.96-0.98x, the grouped k4 s2
  // layer's 0.87x, DCGAN 16->32's 0.98-0.99x, the 1-D k4 s2 layer's 0.98x.
  // Where no class has two taps (k2 s2: nothing packed twice) it is not
  // used, nor where the chunk and the task's output blocks pass the L2
  // (DCGAN 8->16: 768 KB, 1.02x the time with it).
  bool packs_taps_b(const Task& t) const {
    if (!t.all_taps || reads_b_in_place(t.col1 - t.col0) || fused_taps() > 1) return false;
    std::vector<char> read(class_count(), 0);
    int64_t taps = 0, classes = 0;
    for (int64_t s = t.sp; s < t.sp1; ++s) {
      const SubProblem& sp = plan.subproblems[s];
      for (int d = 0; d < pb.nd; ++d)
        if (sp.phase[d]->kstep != plan.subproblems[0].phase[d]->kstep) return false;
      if (sp.taps == 0 || sp.rows == 0) continue;
      ++taps;
      char& seen = read[rhs_class(sp)];
      classes += seen ? 0 : 1;
      seen = 1;
    }
    // The chunk (about classes / class_count() of its rows' positions) and
    // the task's output blocks within the L2.
    int64_t positions = tap_chunk_rows() * classes / class_count();
    for (int d = 1; d < pb.nd; ++d) positions *= pb.dim[d].k_size;
    const int64_t out_rows = (t.sp1 - t.sp) * round_up(t.row1 - t.row0, MR);
    const int64_t nc_pad = round_up(std::min(kNC, t.col1 - t.col0), NR);
    return taps > classes && (positions + out_rows) * nc_pad * static_cast<int64_t>(sizeof(Acc)) <=
                                 gemm::l2_bytes();
  }
  // B in place as runs with a constant step (RunB) where every block of task
  // t reads it in place and its runs (reduction_runs) are at least kMinRun
  // long: no offset table to build or read per index. As fast as TableB in
  // process (U-Net, atrous, 7x7, 1-D and 3-D filter gradients, 0.99-1.01x),
  // with 3 MB less scratch on U-Net 64->128's d-filter.
  bool reads_b_as_runs(const Task& t) const {
    if (!reads_b_in_place(t.col1 - t.col0)) return false;
    const SubProblem& sp = plan.subproblems[t.sp];
    const int64_t last = pb.nd - 1;
    return (channels_inner() ? pb.group_in() : sp.seg[last].t_hi - sp.seg[last].t_lo) >= kMinRun;
  }
  // Rows [0, mc) of a scratch block (row stride ldc) to output columns
  // [nc0, nc0 + nc) of group g, with non-temporal stores where `stream`.
  void copy_out(const int64_t* out_row, int64_t mc, int64_t g, int64_t nc0, int64_t nc,
                const Acc* src, int64_t ldc, bool stream) const {
    for (int64_t r = 0; r < mc; ++r, src += ldc) {
      Tout* dst = out + out_row[r] + (g * pb.group_out() + nc0) * pb.out_c;
      if (std::is_same<Tout, Acc>::value && pb.out_c == 1) {  // features contiguous
#ifdef CKS_X86_AVX2
        if (stream && std::is_same<Acc, float>::value && nc % 16 == 0 &&
            reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
          gemm::stream_copy(reinterpret_cast<float*>(dst), reinterpret_cast<const float*>(src),
                            nc);
          continue;
        }
#endif
        std::memcpy(dst, src, nc * sizeof(Acc));
      } else {
        if constexpr (std::is_same<Acc, float>::value) {
          if (pb.out_c == 1) {  // a 16-bit output, features contiguous
            convert::from_float(src, nc, dst);
            continue;
          }
        }
        for (int64_t j = 0; j < nc; ++j) dst[j * pb.out_c] = store<Tout, Acc>(src[j]);
      }
    }
  }

  // One task: rows x columns of one (sub-problem, group). B comes from
  // `Bph`, the phase B of its phase (pack_phase_b), else from `Bsp`, its own
  // packed B (pack_b), else it is packed here block by block, just before use.
  // A fused task (fuses_phases) reads the phase B of all sub-problems from
  // sub-problem 0's on, and writes column panel q at fcols[q].
  void run(const Task& t, const Acc* Bph, const Acc* Bsp, const int64_t* fcols) const {
    const int64_t Fg = pb.group_out();
    const int64_t mc = t.row1 - t.row0, mc_pad = round_up(mc, MR);
    const int64_t red = red_size(t.sp);
    const SubProblem& sp = plan.subproblems[t.sp];

    thread_local TaskA a;
    thread_local std::vector<int64_t> f0;
    thread_local std::vector<Acc> Ap, Bp, Cbuf;
    prepare_a(t, !(Bph || Bsp), a);
    const bool stream = stream_out();
    const int64_t ph_ldb = Bph ? phase_ldb(combo_of(sp)) : 0;
    thread_local std::vector<PhaseBlock> pblocks;
    const int64_t blocks = reduction_blocks(sp, red, Bph != nullptr, f0, pblocks);
    bool streamed = stream;
    // Column blocks of at most kNC, cut at multiples of kNC so that a shared
    // B's block (pack_b) is found at blk0: panel (nc0 - blk0) / NR of it.
    for (int64_t nc0 = t.col0; nc0 < t.col1;) {
      const int64_t blk0 = nc0 / kNC * kNC, blk_pad = round_up(std::min(kNC, Fg - blk0), NR);
      const int64_t nc = std::min(blk0 + kNC, t.col1) - nc0, nc_pad = round_up(nc, NR);
      const bool stream_tiles = streams_block(blocks, nc);
      const bool rounded = rounds_out(blocks, Bph || Bsp);
      const bool in_place = stream_tiles || writes_out_in_place(nc) || rounded;
      streamed = streamed || stream_tiles;
      // The column block's product, reduction block by reduction block: into
      // the output itself (the first block stores, the others add), or else
      // into Cbuf, copied out below.
      bool first = true;
      auto block = [&](auto&& multiply) {  // multiply(C) for the block's C destination
        if constexpr (std::is_same<Acc, float>::value) {  // float only: fuses_phases
          if (t.fused) {  // in place, whole panels, by fuses_phases
            multiply(gemm::PanelOutC<Acc>{
                {reinterpret_cast<Acc*>(out), a.out_row.data(), mc, nc, !first, stream_tiles},
                fcols + nc0 / NR});
            first = false;
            return;
          }
        }
        if constexpr (std::is_same<Tout, bf16>::value && std::is_same<Acc, float>::value) {
          if (rounded) {  // the only block
            multiply(gemm::RoundC{reinterpret_cast<uint16_t*>(out) + t.group * Fg + nc0,
                                  a.out_row.data(), mc, nc});
            first = false;
            return;
          }
        }
        if (in_place) {
          Acc* base = reinterpret_cast<Acc*>(out) + t.group * Fg + nc0;
          multiply(gemm::OutC<Acc>{base, a.out_row.data(), mc, nc, !first, stream_tiles});
        } else {
          multiply(gemm::BufC<Acc>{Cbuf.data(), nc_pad});
        }
        first = false;
      };
      if (!in_place) Cbuf.assign(mc_pad * nc_pad, Acc(0));
      if (Bph) {  // each block is contiguous in the phase B
        const Acc* Bcols = Bph + nc0 / NR * ph_ldb;
        for (const PhaseBlock& pbk : pblocks)
          block([&](const auto& C) {
            multiply_a(a, mc, pbk.kc0, pbk.kc, gemm::PanelB<Acc>{Bcols + pbk.brow * NR, ph_ldb},
                       nc, C, Ap);
          });
      } else {
        for (int64_t kc0 = 0; kc0 < red; kc0 += kKC) {
          const int64_t kc = std::min(kKC, red - kc0);
          block([&](const auto& C) {
            if (Bsp)
              multiply_a(a, mc, kc0, kc,
                         gemm::PanelB<Acc>{Bsp + blk0 * red + kc0 * blk_pad + (nc0 - blk0) * kc,
                                           kc * NR},
                         nc, C, Ap);
            else if constexpr (!std::is_same<std::decay_t<decltype(C)>, gemm::RoundC>::value)
              multiply_b(a, mc, t.group, nc0, nc, kc0, kc, C, Ap, Bp);  // never rounds_out
          });
        }
      }
      if (first && in_place)  // no reduction block: a sub-problem whose outputs are all zero
        for (int64_t r = 0; r < mc; ++r)
          std::fill_n(reinterpret_cast<Acc*>(out) + a.out_row[r] + t.group * Fg + nc0, nc,
                      Acc(0));
      if (!in_place) copy_out(a.out_row.data(), mc, t.group, nc0, nc, Cbuf.data(), nc_pad, stream);
      nc0 += nc;
    }
#ifdef CKS_X86_AVX2
    if (streamed) _mm_sfence();
#endif
  }

  // Reduction blocks of a task reading the phase B: runs of run_len indices
  // (taps of the last dimension x channels) starting at B row f0[r] * Cg.
  // Consecutive runs whose B rows follow one another (an untrimmed
  // sub-problem's) share a block of up to kKCPhase indices, so the reduction
  // of a 3x3 layer with up to 128 channels is one block: the output tile is
  // stored once instead of read and written back per block (in process: ResNet
  // 3x3 forward 0.87x the time; DCGAN's k4 s2 discriminator layer, two runs of
  // 512, 0.94x). Runs are cut only past kKCPhase: cut past kKC (256) as the
  // other paths' blocks are, the 256-channel atrous, DCGAN 4->8 and 8->16 and
  // 7x7 forwards and input gradients took 1.01-1.03x the time (in process,
  // Zen 4, builds alternating, 2 cores and one); bfloat16 pairs the same
  // either way (0.99-1.01x).
  struct PhaseBlock {
    int64_t kc0, kc, brow;
  };
  static constexpr int64_t kKCPhase = 1152;
  void phase_blocks(const std::vector<int64_t>& f0, int64_t run_len,
                    std::vector<PhaseBlock>& out_blocks) const {
    const int64_t Cg = pb.group_in(), nr = static_cast<int64_t>(f0.size());
    out_blocks.clear();
    for (int64_t r = 0; r < nr;) {
      if (run_len > kKCPhase) {  // long runs: cut
        for (int64_t q = 0; q < run_len; q += kKCPhase)
          out_blocks.push_back(
              {r * run_len + q, std::min(kKCPhase, run_len - q), f0[r] * Cg + q});
        ++r;
        continue;
      }
      int64_t r2 = r + 1;
      while (r2 < nr && f0[r2] * Cg == f0[r2 - 1] * Cg + run_len &&
             (r2 - r + 1) * run_len <= kKCPhase)
        ++r2;
      out_blocks.push_back({r * run_len, (r2 - r) * run_len, f0[r] * Cg});
      r = r2;
    }
  }

  // How many reduction blocks run takes for sub-problem sp (red indices):
  // with the phase B, its runs of taps merged by phase_blocks (into pblocks,
  // f0 the runs' first taps); else blocks of kKC. run and task_buffers ask.
  int64_t reduction_blocks(const SubProblem& sp, int64_t red, bool phase,
                           std::vector<int64_t>& f0, std::vector<PhaseBlock>& pblocks) const {
    if (!phase) return (red + kKC - 1) / kKC;
    run_starts(sp, f0);
    phase_blocks(f0, (sp.seg[pb.nd - 1].t_hi - sp.seg[pb.nd - 1].t_lo) * pb.group_in(), pblocks);
    return static_cast<int64_t>(pblocks.size());
  }

  // The reduction of sub-problem s as runs with constant steps, in the order
  // of red_offsets: runs of the channels (channels inner) or of the last
  // dimension's taps at fixed channel and outer taps (channels outer). The
  // narrow kernel and RunA walk them.
  // With `positions`, the B offsets are positions in the sub-problem's
  // residue class (rb, sb; class_positions) instead of rhs elements: where
  // packs_taps_b.
  gemm::NarrowRuns reduction_runs(int64_t s, std::vector<int64_t>& ra, std::vector<int64_t>& rb,
                                  bool positions = false) const {
    const SubProblem& sp = plan.subproblems[s];
    const int64_t Cg = pb.group_in(), last = pb.nd - 1;
    int64_t n[kMaxSpatial], pos_sp[kMaxSpatial], per_c = 0;
    if (positions) per_c = class_positions(rhs_class(sp), n, pos_sp);
    const int64_t* r_sp = positions ? pos_sp : pb.rhs_sp;
    const int64_t r_i = positions ? per_c : pb.rhs_i;
    thread_local std::vector<int64_t> tap_l, tap_r;
    tap_offsets(sp, tap_l, tap_r, !channels_inner(), positions ? pos_sp : nullptr);
    if (channels_inner()) {
      ra = tap_l;
      rb = tap_r;
      return {ra.data(), rb.data(), sp.taps, Cg, pb.lhs_c, r_i, pb.rhs_o};
    }
    const Phase& ph = *sp.phase[last];
    const int64_t R = sp.seg[last].t_hi - sp.seg[last].t_lo, outer = R > 0 ? sp.taps / R : 0;
    ra.resize(Cg * outer);
    rb.resize(Cg * outer);
    for (int64_t c = 0; c < Cg; ++c)
      for (int64_t o = 0; o < outer; ++o) {
        ra[c * outer + o] = tap_l[o] + c * pb.lhs_c;
        rb[c * outer + o] = tap_r[o] + c * r_i;
      }
    return {ra.data(), rb.data(), Cg * outer, R, wrap_mul(ph.tstride, pb.lhs_sp[last]),
            positions ? 1 : wrap_mul(ph.kstep, r_sp[last]), pb.rhs_o};
  }

  // The rhs's positions (a filter gradient's cotangent's) fall into residue
  // classes: every sub-problem reads, along dimension d, positions k0 + kstep t
  // (k0 < kstep, kstep the same for all). Class r (its k0s, dimension 0's
  // slowest, an index below the product of the ksteps) counts its positions
  // densely: (c, t) is c per_c + sum_d t[d] pos_sp[d], the last dimension
  // fastest, n[d] of them along d; returns per_c. A chunk packed by
  // packs_taps_b holds each class's consecutive positions.
  int64_t rhs_class(const SubProblem& sp) const {
    int64_t r = 0;
    for (int d = 0; d < pb.nd; ++d) r = r * sp.phase[d]->kstep + sp.phase[d]->k0;
    return r;
  }
  int64_t class_count() const {
    int64_t n = 1;
    for (int d = 0; d < pb.nd; ++d) n *= plan.subproblems[0].phase[d]->kstep;
    return n;
  }
  int64_t class_positions(int64_t r, int64_t (&n)[kMaxSpatial], int64_t (&pos_sp)[kMaxSpatial],
                          int64_t* k0 = nullptr) const {
    int64_t per_c = 1;
    for (int d = pb.nd - 1; d >= 0; --d) {
      const int64_t kstep = plan.subproblems[0].phase[d]->kstep, r_d = r % kstep;
      r /= kstep;
      if (k0) k0[d] = r_d;
      n[d] = ceil_div(pb.dim[d].k_size - r_d, kstep);
      pos_sp[d] = per_c;
      per_c *= n[d];
    }
    return per_c;
  }
  // The positions of class r in global rows [0, g) (g = c J + rhs index of
  // dimension 0, as tap_index counts them).
  int64_t class_start(int64_t r, int64_t g) const {
    int64_t n[kMaxSpatial], pos_sp[kMaxSpatial], k0[kMaxSpatial];
    const int64_t per_c = class_positions(r, n, pos_sp, k0), J = pb.dim[0].k_size;
    const int64_t kstep = plan.subproblems[0].phase[0]->kstep;
    const int64_t rows = std::min(n[0], std::max<int64_t>(0, ceil_div(g % J - k0[0], kstep)));
    return g / J * per_c + rows * pos_sp[0];
  }
  // The rhs element offsets (relative to a column) of class r's positions
  // [p0, p1).
  void class_offsets(int64_t r, int64_t p0, int64_t p1, int64_t* dst) const {
    int64_t n[kMaxSpatial], pos_sp[kMaxSpatial], k0[kMaxSpatial], t[kMaxSpatial] = {0, 0, 0};
    const int64_t per_c = class_positions(r, n, pos_sp, k0);
    int64_t step[kMaxSpatial], off = p0 / per_c * pb.rhs_i;
    for (int d = 0; d < pb.nd; ++d) {
      step[d] = plan.subproblems[0].phase[d]->kstep * pb.rhs_sp[d];
      t[d] = p0 % per_c / pos_sp[d] % n[d];
      off += k0[d] * pb.rhs_sp[d] + t[d] * step[d];
    }
    for (int64_t p = p0; p < p1; ++p) {  // an odometer over (c, t)
      *dst++ = off;
      int d = pb.nd - 1;
      for (; d >= 0 && t[d] + 1 == n[d]; --d) {
        off -= t[d] * step[d];
        t[d] = 0;
      }
      if (d >= 0) {
        ++t[d];
        off += step[d];
      } else {
        off += pb.rhs_i;
      }
    }
  }
  // reduction_runs of sub-problem s with B as positions of its class (rb, sb),
  // runs that continue one another merged as a_runs merges A's: what a
  // PanelRunB of a packed chunk walks.
  gemm::NarrowRuns position_runs(int64_t s, std::vector<int64_t>& ra,
                                 std::vector<int64_t>& rb) const {
    gemm::NarrowRuns k = reduction_runs(s, ra, rb, true);
    k.ra = nullptr;
    const int64_t m = continuing_runs(rb.data(), k.nruns, k.R * k.sb);
    if (m > 1) {
      for (int64_t r = 0; r < k.nruns / m; ++r) rb[r] = rb[r * m];
      k.nruns /= m;
      k.R *= m;
    }
    return k;
  }
  // m > 1 where every run i with i % m != 0 starts `jump` after run i - 1
  // (and m is the same for all: n % m == 0), else 1.
  static int64_t continuing_runs(const int64_t* starts, int64_t n, int64_t jump) {
    int64_t m = 1;
    while (m < n && starts[m] == starts[m - 1] + jump) ++m;
    if (m == 1 || n % m != 0) return 1;
    for (int64_t r = 1; r < n; ++r)
      if (r % m != 0 && starts[r] != starts[r - 1] + jump) return 1;
    return m;
  }

  // reduction_runs for reading A alone (RunA): runs that continue one another
  // in A (the next starts where the previous ends, as the untrimmed taps of
  // contiguous input lines do) merged m at a time, m the same for all runs.
  // The reduction order is unchanged; each run costs the GEMM kernel a
  // segment switch (in a microbenchmark, runs of 56 ran 14 % slower than one
  // long run). No B offsets: rb is left unmerged and not returned.
  gemm::NarrowRuns a_runs(int64_t s, std::vector<int64_t>& ra, std::vector<int64_t>& rb) const {
    gemm::NarrowRuns k = reduction_runs(s, ra, rb);
    k.rb = nullptr;
    const int64_t n = k.nruns, m = continuing_runs(ra.data(), n, k.R * k.sa);
    if (m == 1) return k;
    for (int64_t r = 0; r < n / m; ++r) ra[r] = ra[r * m];
    k.nruns = n / m;
    k.R *= m;
    return k;
  }

  // The narrow kernel on one task: strips of kStrip consecutive batch entries
  // n at one position j (local row (n - n0) * P + j), the chunk [n0, n1) at
  // least one strip long (narrow_tasks); B is read in place.
  void run_narrow(const Task& t) const {
    constexpr int W = gemm::kStrip<Acc>;
    const int64_t Fg = pb.group_out();
    const int64_t P = plan.subproblems[t.sp].rows / pb.out_batch();  // positions
    thread_local std::vector<int64_t> lhs_row, out_row, ra, rb;
    thread_local std::vector<Acc> cs;
    row_offsets(t, lhs_row, out_row);
    const gemm::NarrowRuns k = reduction_runs(t.sp, ra, rb);
    const Acc* b = reinterpret_cast<const Acc*>(rhs) + t.group * Fg * pb.rhs_o;
    cs.resize(Fg * W);
    Acc* Cs = cs.data();
    const int64_t n0 = t.row0 / P, n1 = t.row1 / P;
    for (int64_t j = t.j0; j < t.j1; ++j)
      // The last strip ends at n1, overlapping the one before: the overlap is
      // computed twice, to identical bits.
      for (int64_t n = n0;; n = std::min(n + W, n1 - W)) {
        const int64_t l = (n - n0) * P + j;  // batch n + i is local row l + i * P
        std::fill(Cs, Cs + Fg * W, Acc(0));
        narrow_strips(lhs_in_acc() + lhs_row[l], b, k, Cs);
        for (int64_t f = 0; f < Fg; ++f)
          for (int i = 0; i < W; ++i)
            out[out_row[l + i * P] + (t.group * Fg + f) * pb.out_c] =
                store<Tout, Acc>(Cs[f * W + i]);
        if (n + W >= n1) break;
      }
  }

  // A narrow filter gradient with several sub-problems (one per tap, or per
  // phase and tap) would read all of A (the input) once per tap and strip,
  // from L3 or memory: FSRCNN's 1-feature k9 s3 d-filter (81 taps) streamed
  // 1.8 MB 162 times and ran at 38 GFLOP/s. Its taps are instead
  // interleaved, as run_taps does: each task runs every one of its
  // sub-problems on a chunk of the cotangent's rows (about narrow_chunk()
  // reduction indices of the densest) before moving on, so that chunk of A
  // stays in cache from the first tap to the last. Needs the reduction's
  // runs to be whole within a chunk: channels outer, two dimensions or more.
  // With kNarrowManyTaps sub-problems or more, each re-reading the chunk, it
  // is cut to kNarrowChunkL1 indices, whose A (a strip's 128 bytes per index:
  // 16 KB) stays in L1. In process on Zen 4 (2 cores), against 1024: FSRCNN's
  // d-filter (81 sub-problems, 1 feature) 0.68x the time (1.05-1.09 ms ->
  // 0.72), the k8 s4 head's (64, 21 features) 0.95x (7.27-7.48 -> 6.93-7.03);
  // with 16 (DCGAN's 32->64, 3 features) 1.11x (0.64-0.65 -> 0.72), where the
  // calls per chunk cost more than L2 reads.
  static constexpr int64_t kNarrowChunk = 1024, kNarrowChunkL1 = 128, kNarrowManyTaps = 32;
  // Wider outputs (wide_rows) read more per reduction index: Fg features of
  // B, and of A the batch at every input position the taps reach, up to the
  // stride (rhs_dil) per dimension. Their chunks are cut so that both take
  // at most kNarrowChunkBytes (half of a Zen 4 core's L2). In process on Zen
  // 4, old and new builds alternating: stride-2 filter gradients of 128
  // features, whose 1024-index chunks read 1.5 MB, took 0.94-0.98x the time
  // (DCGAN discriminator, 341 indices; 0.94x on one core) and 0.84-0.94x
  // (ResNet's stride-2 3x3; 1.01x on one core); the ResNet 3x3's (768 KB,
  // 682 indices) 0.91-0.96x; 256 KB cut the first two as much and slowed the
  // atrous 64-channel ones (1.04-1.06x, 512 indices). Cores with 2 MB of L2
  // (big_l2: the Xeon VM) run faster on chunks of kNarrowChunkBytesBigL2, at
  // least kNarrowChunkL1 indices (a strip of A for them in L1): there, 4
  // alternating rounds (medians), against 512 KB: ResNet 3x3's filter
  // gradient 0.95x the time (6.79 -> 6.46 ms; 128 indices, were 682), the
  // 64-channel atrous d2, d4 and d8 ones 0.97x, 0.95x and 0.94x, the
  // discriminator's 0.97x, ResNet's stride-2 0.99x; the k8 s4 head's, 3-D
  // atrous, V-Net and grouped ones unchanged. Down to 64 indices: no faster.
  static constexpr int64_t kNarrowChunkBytes = int64_t{512} << 10;
  static constexpr int64_t kNarrowChunkBytesBigL2 = int64_t{64} << 10;
  int64_t narrow_chunk() const {
    if (nsp() >= kNarrowManyTaps) return kNarrowChunkL1;
    if (pb.group_out() <= gemm::kNarrowF) return kNarrowChunk;
    int64_t positions = 1;
    for (int d = 0; d < pb.nd; ++d) positions *= std::min(pb.dim[d].rhs_dil, pb.dim[d].out_size);
    const int64_t bytes = (positions * pb.out_batch() + pb.group_out()) * sizeof(Acc);
    const int64_t budget = big_l2() ? kNarrowChunkBytesBigL2 : kNarrowChunkBytes;
    return std::clamp(budget / bytes, kNarrowChunkL1, kNarrowChunk);
  }
  bool narrow_taps() const {
    return narrow() && !channels_inner() && pb.nd >= 2 && nsp() >= 2;
  }
  // One sub-problem of a run_narrow_taps task: its row offsets over the
  // task's batch chunk, its reduction's runs, its accumulators' offset.
  struct NarrowSub {
    std::vector<int64_t> lhs_row, out_row, ra, rb;
    gemm::NarrowRuns runs;
    int64_t P = 0, acc = 0;
  };
  // Strip i of nstrips over the batch chunk [n0, n1): as run_narrow's, the
  // last one ends at n1 (overlapping the one before).
  static int64_t strip_start(int64_t i, int64_t nstrips, int64_t n0, int64_t n1) {
    return i + 1 < nstrips ? n0 + i * gemm::kStrip<Acc> : n1 - gemm::kStrip<Acc>;
  }
  void run_narrow_taps(const Task& t) const {
    constexpr int W = gemm::kStrip<Acc>;
    const int64_t Fg = pb.group_out(), nb = pb.out_batch(), n0 = t.row0, n1 = t.row1;
    const int64_t nstrips = (n1 - n0 + W - 1) / W, ns = t.sp1 - t.sp;
    thread_local std::vector<NarrowSub> subs;
    thread_local std::vector<Acc> acc;
    if (subs.size() < static_cast<size_t>(ns)) subs.resize(ns);
    int64_t total = 0;
    for (int64_t i = 0; i < ns; ++i) {
      NarrowSub& u = subs[i];
      const int64_t s = t.sp + i;
      u.P = plan.subproblems[s].rows / nb;
      u.acc = total;
      if (u.P == 0) continue;
      row_offsets(Task{s, t.group, n0 * u.P, n1 * u.P, 0, Fg}, u.lhs_row, u.out_row);
      u.runs = reduction_runs(s, u.ra, u.rb);
      total += u.P * nstrips * Fg * W;
    }
    acc.assign(total, Acc(0));
    const Acc* b = reinterpret_cast<const Acc*>(rhs) + t.group * Fg * pb.rhs_o;
    const int64_t H = chunk_rows(narrow_chunk());
    const int64_t J = pb.dim[0].k_size, CJ = pb.group_in() * J;
    for (int64_t g0 = 0; g0 < CJ; g0 += H)
      for (int64_t i = 0; i < ns; ++i) {
        const NarrowSub& u = subs[i];
        const SubProblem& sp = plan.subproblems[t.sp + i];
        if (u.P == 0 || sp.taps == 0) continue;
        // Reduction indices k = run * R + q; a chunk's range starts and ends
        // on whole runs (tap_index steps dimension 0's taps, nd >= 2).
        const int64_t R = u.runs.R;
        const int64_t r0 = tap_index(sp, g0, J) / R;
        const int64_t r1 = tap_index(sp, std::min(g0 + H, CJ), J) / R;
        if (r1 <= r0) continue;
        gemm::NarrowRuns k = u.runs;
        k.ra += r0;
        k.rb += r0;
        k.nruns = r1 - r0;
        for (int64_t j = 0; j < u.P; ++j)
          for (int64_t q = 0; q < nstrips; ++q) {
            const int64_t l = (strip_start(q, nstrips, n0, n1) - n0) * u.P + j;
            narrow_strips(lhs_in_acc() + u.lhs_row[l], b, k,
                          acc.data() + u.acc + (j * nstrips + q) * Fg * W);
          }
      }
    for (int64_t i = 0; i < ns; ++i) {
      const NarrowSub& u = subs[i];
      for (int64_t j = 0; j < u.P; ++j)
        for (int64_t q = 0; q < nstrips; ++q) {
          const int64_t l = (strip_start(q, nstrips, n0, n1) - n0) * u.P + j;
          const Acc* Cs = acc.data() + u.acc + (j * nstrips + q) * Fg * W;
          for (int64_t f = 0; f < Fg; ++f)
            for (int r = 0; r < W; ++r)
              out[u.out_row[l + r * u.P] + (t.group * Fg + f) * pb.out_c] =
                  store<Tout, Acc>(Cs[f * W + r]);
        }
    }
  }

  // ---- taps as columns
  // A narrow filter gradient of run_narrow_taps' kind whose last dimension's
  // outputs o (the filter's last taps) read input i through a unit tstride at
  // cotangent position pos0(i) - o: every tap of the dimension reads the same
  // strip of A at input i, and their B values are one contiguous run when
  // the cotangent's features are innermost (rhs_sp[last] == Fg, rhs_o == 1),
  // as in transposed and stride-1 layers. The tap-by-tap kernel loads the
  // strip once per tap (FSRCNN's 1-feature k9 s3 d-filter: 2 vector loads and
  // a broadcast per 2 FMAs); here tiles of up to cols_acc() / Fg taps share
  // each load (gemm::narrow_cols). Each tap trims its own input range, so a
  // tile runs the inputs all its taps read as long runs (the interior), and
  // each input outside it for the taps that read it (the border), so nothing
  // is computed on padding. AVX-512 (up to 6 features), and AVX2 (up to 3):
  // there FSRCNN's d-filter took 0.53x the time of the tap-by-tap kernel
  // (0.62 ms against 1.16) and DCGAN's 3-feature one 0.75x (0.63 against
  // 0.84; AVX2 Zen 3 EPYC, 2 cores, 3 alternating rounds).
  struct ColsLayout {
    int64_t O = 0, kstep = 0, c0 = 0;  // column o at input i: cotangent position c0 + kstep i - o
    std::vector<int64_t> ilo, ihi;     // column o reads the inputs [ilo[o], ihi[o])
    // That position, in unsigned arithmetic: c0 and kstep i may pass 2^63 at
    // huge dilations and paddings (as input_index's terms may) where the
    // position, a real cotangent index, does not.
    int64_t pos(int64_t i, int64_t o) const {
      return static_cast<int64_t>(static_cast<uint64_t>(c0) +
                                  static_cast<uint64_t>(kstep) * static_cast<uint64_t>(i) -
                                  static_cast<uint64_t>(o));
    }
  };
  bool cols_layout(ColsLayout& c) const {
    const int last = pb.nd - 1;
    const Dim& dm = pb.dim[last];
    c.O = dm.out_size;
    c.ilo.assign(c.O, 0);
    c.ihi.assign(c.O, 0);
    for (int64_t o = 0; o < c.O; ++o) {
      const Phase* ph = nullptr;
      int64_t u = 0;
      for (const Phase& p : plan.phases[last])
        if (o >= p.o0 && (o - p.o0) % p.L == 0 && (o - p.o0) / p.L < p.U) {
          ph = &p;
          u = (o - p.o0) / p.L;
          break;
        }
      if (ph == nullptr || ph->T == 0 || ph->tstride != 1) return false;
      const TapRange r = trimmed_range(*ph, dm.in_size, u);
      if (r.t_hi <= r.t_lo) return false;  // a column of zeros: left to the tap-by-tap path
      const uint64_t b = static_cast<uint64_t>(input_index(*ph, u, 0));  // i = b + t
      const int64_t c0 = static_cast<int64_t>(static_cast<uint64_t>(ph->k0) -
                                              static_cast<uint64_t>(ph->kstep) * b +
                                              static_cast<uint64_t>(o));
      if (o == 0) {
        c.kstep = ph->kstep;
        c.c0 = c0;
      } else if (ph->kstep != c.kstep || c0 != c.c0) {
        return false;
      }
      c.ilo[o] = static_cast<int64_t>(b + static_cast<uint64_t>(r.t_lo));
      c.ihi[o] = static_cast<int64_t>(b + static_cast<uint64_t>(r.t_hi));
    }
    return true;
  }
  bool narrow_cols() const {
#ifdef CKS_X86_AVX2
    const int last = pb.nd - 1;
    if (gemm::cols_acc() == 0 || !narrow_taps() || pb.groups() != 1 || pb.rhs_o != 1 ||
        pb.group_out() > gemm::cols_acc() / 2 || pb.rhs_sp[last] != pb.group_out() ||
        pb.dim[last].out_size < 2)
      return false;
    ColsLayout c;
    return cols_layout(c);
#else
    return false;
#endif
  }
  // The sub-problems of outer block j (the same segments outside the last
  // dimension): [j S, (j + 1) S), S the last dimension's segments.
  int64_t cols_blocks() const {
    return nsp() / static_cast<int64_t>(plan.segments[pb.nd - 1].size());
  }
  // Tasks: one strip of kStrip batch entries (the last one overlapping the
  // one before) over a range of outer blocks, as few ranges as give every
  // worker a task (each range reads the strip's A once, in chunks).
  std::vector<Task> cols_tasks(int64_t workers) const {
    constexpr int64_t W = gemm::kStrip<Acc>;
    const int64_t nb = pb.out_batch(), nstrips = (nb + W - 1) / W, blocks = cols_blocks();
    const int64_t sets = std::clamp<int64_t>((workers + nstrips - 1) / nstrips, 1, blocks);
    std::vector<Task> ts;
    for (int64_t q = 0; q < nstrips; ++q)
      for (int64_t k = 0; k < sets; ++k) {
        const int64_t n = std::min(q * W, nb - W);
        Task t{k * blocks / sets, 0, n, n + W, 0, pb.group_out()};
        t.all_taps = true;
        t.sp1 = (k + 1) * blocks / sets;
        ts.push_back(t);
      }
    return ts;
  }
  // One outer block of a task: its first sub-problem (the segments outside
  // the last dimension), positions and taps there; its positions' offsets
  // (lhs, out), its runs (channel and taps outside the last dimension: ra,
  // rb), its accumulators.
  struct ColsBlock {
    std::vector<int64_t> lhs_pos, out_pos, ra, rb;
    int64_t s = 0, P = 0, taps = 0, acc = 0;
  };
  void cols_shape(int64_t j, ColsBlock& u) const {
    u.s = j * (nsp() / cols_blocks());
    const SubProblem& sp = plan.subproblems[u.s];
    u.P = 1;
    u.taps = 1;
    for (int d = 0; d + 1 < pb.nd; ++d) {
      u.P *= sp.seg[d].count;
      u.taps *= sp.seg[d].t_hi - sp.seg[d].t_lo;
    }
  }
  void cols_block(int64_t j, ColsBlock& u) const {
    cols_shape(j, u);
    const SubProblem& sp = plan.subproblems[u.s];
    const int last = pb.nd - 1;
    u.lhs_pos.resize(u.P);
    u.out_pos.resize(u.P);
    int64_t jj[kMaxSpatial] = {0, 0, 0};
    for (int64_t p = 0; p < u.P; ++p) {
      uint64_t lo = 0, oo = 0;  // unsigned: input_index's wrap-around
      for (int d = 0; d < last; ++d) {
        const Phase& ph = *sp.phase[d];
        const int64_t uu = sp.seg[d].u0 + jj[d];
        lo += static_cast<uint64_t>(input_index(ph, uu, sp.seg[d].t_lo)) *
              static_cast<uint64_t>(pb.lhs_sp[d]);
        oo += static_cast<uint64_t>((ph.o0 + ph.L * uu) * pb.out_sp[d]);
      }
      u.lhs_pos[p] = static_cast<int64_t>(lo);
      u.out_pos[p] = static_cast<int64_t>(oo);
      for (int d = last - 1; d >= 0 && ++jj[d] == sp.seg[d].count; --d) jj[d] = 0;
    }
    // reduction_runs' runs start at this sub-problem's first tap of the last
    // dimension; the layout's cotangent positions (ColsLayout::pos) stand in
    // for that dimension, so its B offset comes out.
    reduction_runs(u.s, u.ra, u.rb);
    const Phase& pl = *sp.phase[last];
    const int64_t rb_last = (pl.k0 + pl.kstep * sp.seg[last].t_lo) * pb.rhs_sp[last];
    for (int64_t& x : u.rb) x -= rb_last;
  }
  // Reduction indices of the densest sub-problem per chunk of the cotangent's
  // rows (chunk_rows), so that the chunk's A stays in L2 across the blocks.
  static constexpr int64_t kColsChunk = 1024;
  void run_narrow_cols(const Task& t) const {
    constexpr int W = gemm::kStrip<Acc>;
    const int last = pb.nd - 1;
    const int64_t Fg = pb.group_out(), nbk = t.sp1 - t.sp;
    ColsLayout L;
    cols_layout(L);
    const int64_t O = L.O, mt = gemm::cols_acc() / Fg, tiles = (O + mt - 1) / mt;
    thread_local std::vector<ColsBlock> bl;
    thread_local std::vector<Acc> acc;
    if (bl.size() < static_cast<size_t>(nbk)) bl.resize(nbk);
    int64_t total = 0;
    for (int64_t i = 0; i < nbk; ++i) {
      cols_block(t.sp + i, bl[i]);
      bl[i].acc = total;
      total += bl[i].P * O * Fg * W;
    }
    acc.assign(total, Acc(0));
    const Acc* a0 = lhs_in_acc() + t.row0;
    const Acc* b0 = reinterpret_cast<const Acc*>(rhs);
    const int64_t sa = pb.lhs_sp[last], sb = L.kstep * Fg;
    const int64_t H = chunk_rows(kColsChunk);
    const int64_t J = pb.dim[0].k_size, CJ = pb.group_in() * J;
    for (int64_t g0 = 0; g0 < CJ; g0 += H)
      for (int64_t i = 0; i < nbk; ++i) {
        const ColsBlock& u = bl[i];
        if (u.taps == 0) continue;  // outputs all zero
        const int64_t r0 = tap_index(plan.subproblems[u.s], g0, J, u.taps);
        const int64_t r1 = tap_index(plan.subproblems[u.s], std::min(g0 + H, CJ), J, u.taps);
        if (r1 <= r0) continue;
        gemm::NarrowRuns k{u.ra.data() + r0, u.rb.data() + r0, r1 - r0, 0, sa, sb, 0};
        // Columns [oa, ob) at inputs [i0, i1): B of column oa at input i0.
        auto cols = [&](const Acc* a, Acc* C, int64_t oa, int64_t ob, int64_t i0, int64_t i1) {
          k.R = i1 - i0;
          gemm::narrow_cols(static_cast<int>(ob - oa), static_cast<int>(Fg), a + i0 * sa,
                            b0 + L.pos(i0, oa) * Fg, k, C + oa * Fg * W);
        };
        for (int64_t p = 0; p < u.P; ++p) {
          const Acc* a = a0 + u.lhs_pos[p];
          Acc* C = acc.data() + u.acc + p * O * Fg * W;
          for (int64_t tl = 0; tl < tiles; ++tl) {
            const int64_t o0 = tl * O / tiles, o1 = (tl + 1) * O / tiles;
            int64_t lo = L.ilo[o0], hi = L.ihi[o0], in0 = L.ilo[o0], in1 = L.ihi[o0];
            for (int64_t o = o0; o < o1; ++o) {
              lo = std::min(lo, L.ilo[o]);
              hi = std::max(hi, L.ihi[o]);
              in0 = std::max(in0, L.ilo[o]);
              in1 = std::min(in1, L.ihi[o]);
            }
            if (in1 > in0)
              cols(a, C, o0, o1, in0, in1);
            else
              in0 = in1 = hi;  // no interior: every input is on the border
            // The border: each input outside the interior, for each run of
            // the tile's columns that read it.
            for (int64_t x = lo; x < hi; ++x) {
              if (x == in0) x = in1;
              if (x >= hi) break;
              for (int64_t o = o0; o < o1;) {
                if (x < L.ilo[o] || x >= L.ihi[o]) {
                  ++o;
                  continue;
                }
                int64_t e = o + 1;
                while (e < o1 && x >= L.ilo[e] && x < L.ihi[e]) ++e;
                cols(a, C, o, e, x, x + 1);
                o = e;
              }
            }
          }
        }
      }
    for (int64_t i = 0; i < nbk; ++i) {
      const ColsBlock& u = bl[i];
      for (int64_t p = 0; p < u.P; ++p)
        for (int64_t o = 0; o < O; ++o)
          for (int64_t f = 0; f < Fg; ++f) {
            const Acc* Cs = acc.data() + u.acc + ((p * O + o) * Fg + f) * W;
            Tout* dst = out + u.out_pos[p] + o * pb.out_sp[last] + f * pb.out_c;
            for (int r = 0; r < W; ++r) dst[(t.row0 + r) * pb.out_n] = store<Tout, Acc>(Cs[r]);
          }
    }
  }

  // The dot kernel's B of (sub-problem s, group g): its Fg rows of B, each
  // in reduction order, into dst[Fg * red_size(s)].
  void pack_dot_b(int64_t s, int64_t g, Acc* dst) const {
    thread_local std::vector<int64_t> rhs_red;
    red_offsets(s, nullptr, &rhs_red);
    const int64_t Fg = pb.group_out(), red = red_size(s);
    const Acc* b = reinterpret_cast<const Acc*>(rhs) + g * Fg * pb.rhs_o;
    for (int64_t f = 0; f < Fg; ++f)
      for (int64_t q = 0; q < red; ++q) dst[f * red + q] = b[f * pb.rhs_o + rhs_red[q]];
  }

  // The dot kernel on one task (a row block of one sub-problem and group):
  // A read in place as runs of contiguous channels (a_runs: sa == 1), B
  // packed once per (sub-problem, group) by pack_dot_b.
  void run_dot(const Task& t, const Acc* Bt) const {
    const int64_t Fg = pb.group_out();
    thread_local std::vector<int64_t> lhs_row, out_row, ra, rb;
    row_offsets(t, lhs_row, out_row);
    const gemm::NarrowRuns k = a_runs(t.sp, ra, rb);
    // dot(): Tout is Acc
    Acc* c = reinterpret_cast<Acc*>(out) + t.group * Fg * pb.out_c;
    gemm::dot_rows(static_cast<int>(Fg), t.row1 - t.row0, lhs_in_acc(), lhs_row.data(), k, Bt,
                   red_size(t.sp), c, out_row.data(), pb.out_c);
  }

  // B packed once and shared by the tasks: per (phase combination, group)
  // (phase_b), or else per (sub-problem, group) where shares_b, in one
  // allocation at these offsets; neither when it would exceed kSharedBTotal.
  // The dot kernel's B (pack_dot_b) is always packed once, at b_off.
  struct SharedB {
    std::vector<int64_t> ph_off, b_off;
    bool phase = false, shared = false, dot = false;
    int64_t elements() const {
      return phase ? ph_off.back() : shared || dot ? b_off.back() : 0;
    }
  };
  SharedB shared_b() const {
    const int64_t G = pb.groups();
    SharedB sb;
    sb.ph_off.assign(ncombos() * G + 1, 0);
    sb.b_off.assign(nsp() * G + 1, 0);
    if (dot()) {
      for (int64_t i = 0; i < nsp() * G; ++i)
        sb.b_off[i + 1] = sb.b_off[i] + pb.group_out() * red_size(i / G);
      sb.dot = true;
      return sb;
    }
    if (phase_b()) {
      std::vector<char> used(ncombos(), 0);  // by a GEMM with taps
      for (const SubProblem& sp : plan.subproblems) used[combo_of(sp)] |= sp.taps > 0;
      const bool fc = fuses_columns();
      for (int64_t c = 0; c < ncombos(); ++c) used[c] = used[c] && combo_cols(c, fc) > 0;
      for (int64_t i = 0; i < ncombos() * G; ++i)
        sb.ph_off[i + 1] = sb.ph_off[i] + (used[i / G] ? phase_b_size(i / G, fc) : 0);
      sb.phase = sb.ph_off.back() * static_cast<int64_t>(sizeof(Acc)) <= kSharedBTotal;
    }
    if (!sb.phase) {
      for (int64_t i = 0; i < nsp() * G; ++i)
        sb.b_off[i + 1] = sb.b_off[i] + (shares_b(i / G) ? packed_b_size(i / G) : 0);
      sb.shared = sb.b_off.back() > 0 &&
                  sb.b_off.back() * static_cast<int64_t>(sizeof(Acc)) <= kSharedBTotal;
    }
    return sb;
  }

  // Bytes of the thread-local buffers of run / run_narrow on task t, buffer
  // by buffer (each grows to the largest task its thread runs).
  static constexpr int kBuffers = 9;
  void task_buffers(const Task& t, const SharedB& sb, int64_t (&bytes)[kBuffers]) const {
    if (narrow_cols()) {  // run_narrow_cols: every block's tables and accumulators at once
      constexpr int64_t I = sizeof(int64_t), W = gemm::kStrip<Acc>;
      ColsLayout L;
      cols_layout(L);
      int64_t b[kBuffers] = {};
      ColsBlock u;
      b[2] = 2 * L.O * I;  // the layout's ilo, ihi (held beside the tap tables)
      for (int64_t j = t.sp; j < t.sp1; ++j) {
        cols_shape(j, u);
        b[0] = std::max(b[0], 2 * u.taps * I);                       // reduction_runs' tap tables
        b[1] += 2 * u.P * I;                                         // lhs_pos, out_pos
        b[3] += 2 * pb.group_in() * u.taps * I;                      // ra, rb
        b[7] += u.P * L.O * pb.group_out() * W * static_cast<int64_t>(sizeof(Acc));
      }
      for (int i = 0; i < kBuffers; ++i) bytes[i] = std::max(bytes[i], b[i]);
      return;
    }
    if (narrow() && t.all_taps) {  // run_narrow_taps: every sub-problem's tables and
                                   // accumulators at once
      constexpr int64_t I = sizeof(int64_t), W = gemm::kStrip<Acc>;
      const int64_t n = t.row1 - t.row0, nstrips = (n + W - 1) / W;
      int64_t b[kBuffers] = {};
      for (int64_t s = t.sp; s < t.sp1; ++s) {
        const SubProblem& sp = plan.subproblems[s];
        const int64_t P = sp.rows / pb.out_batch();
        const int64_t R = sp.seg[pb.nd - 1].t_hi - sp.seg[pb.nd - 1].t_lo;
        if (P == 0) continue;
        b[0] = std::max(b[0], 2 * tap_entries(sp, !channels_inner()) * I);  // reduction_runs'
        b[1] += round_up(n * P, MR) * I;                              // lhs_row
        b[2] += n * P * I;                                            // out_row
        b[3] += 2 * (R > 0 ? pb.group_in() * (sp.taps / R) : 0) * I;  // ra, rb
        b[7] += P * nstrips * pb.group_out() * W * static_cast<int64_t>(sizeof(Acc));
      }
      for (int i = 0; i < kBuffers; ++i) bytes[i] = std::max(bytes[i], b[i]);
      return;
    }
    if (t.all_taps) {  // run_taps: every sub-problem's tables and output block at once
      int64_t sum[kBuffers] = {};
      const bool chunks = packs_taps_b(t);
      for (int64_t s = t.sp; s < t.sp1; ++s) {
        Task u = sub_task(t, s);
        u.b_chunks = chunks;
        if (u.row1 <= u.row0) continue;
        int64_t one[kBuffers] = {};
        task_buffers(u, sb, one);
        // The tap tables, Ap and Bp are the thread's, reused sub-problem
        // after sub-problem; the rest is held for all of them at once.
        for (int i = 0; i < kBuffers; ++i)
          sum[i] = i == 0 || i == 5 || i == 6 ? std::max(sum[i], one[i]) : sum[i] + one[i];
      }
      const int64_t nc_pad = round_up(std::min(kNC, t.col1 - t.col0), NR);
      sum[7] = (t.sp1 - t.sp) * round_up(t.row1 - t.row0, MR) * nc_pad *
               static_cast<int64_t>(sizeof(Acc));
      if (chunks) {  // a chunk's rhs offsets (with lhs_red's), its packed B
        // at most every position of tap_chunk_rows() rows, each class's
        int64_t positions = tap_chunk_rows();
        for (int d = 1; d < pb.nd; ++d) positions *= pb.dim[d].k_size;
        sum[3] += positions * static_cast<int64_t>(sizeof(int64_t));
        sum[6] = nc_pad * positions * static_cast<int64_t>(sizeof(Acc));
      }
      for (int i = 0; i < kBuffers; ++i) bytes[i] = std::max(bytes[i], sum[i]);
      return;
    }
    constexpr int64_t I = sizeof(int64_t), A = sizeof(Acc);
    const SubProblem& sp = plan.subproblems[t.sp];
    const int64_t rows = t.row1 - t.row0, mc_pad = round_up(rows, MR), red = red_size(t.sp);
    if (sb.dot) {  // run_dot: tap tables (reduction_runs, and red_offsets in
                   // pack_dot_b), lhs_row, out_row, rhs_red, ra and rb
      const int64_t d[kBuffers] = {2 * sp.taps * I, mc_pad * I, rows * I, red * I, 0, 0, 0, 0,
                                   2 * sp.taps * I};
      for (int i = 0; i < kBuffers; ++i) bytes[i] = std::max(bytes[i], d[i]);
      return;
    }
    const int64_t last = pb.nd - 1, R = sp.seg[last].t_hi - sp.seg[last].t_lo;
    const int64_t runs = channels_inner() ? sp.taps : R > 0 ? pb.group_in() * (sp.taps / R) : 0;
    const bool own_b = !sb.phase && !(sb.shared && shares_b(t.sp));
    const int64_t nc = std::min(kNC, t.col1 - t.col0), nc_pad = round_up(nc, NR);  // widest block
    const bool as_runs = !narrow() && reads_a_as_runs(t.sp);
    const bool b_runs = !narrow() && own_b && reads_b_as_runs(t);
    const bool packed = !narrow() && packs_a(t), lhs_red = !narrow() && (!as_runs || packed);
    const bool rhs_red = !narrow() && own_b && !b_runs && !t.b_chunks;
    // taps: tap_l, tap_r of red_offsets where it builds a table, and of
    // reduction_runs where it runs (prepare_a runs it wherever A is read in
    // place; position_runs for b_chunks); lhs_row, out_row
    const bool walks_runs = narrow() || reads_a_in_place() || b_runs || t.b_chunks;
    int64_t b[kBuffers] = {2 * I * ((lhs_red || rhs_red ? sp.taps : 0) +
                                    (walks_runs ? tap_entries(sp, !channels_inner()) : 0)),
                           mc_pad * I, rows * I};
    if (narrow()) {
      b[3] = 2 * runs * I;                                             // ra, rb
      b[7] = pb.group_out() * gemm::kStrip<Acc> * A;                   // cs
    } else {
      b[3] = red * I * ((lhs_red ? 1 : 0) + (rhs_red ? 1 : 0));         // lhs_red, rhs_red
      b[4] = sb.phase ? (R > 0 ? sp.taps / R : 0) * I : 0;               // f0
      const int64_t kc_max = std::min(sb.phase ? std::max(kKC, kKCPhase) : kKC, red);
      b[5] = packed ? mc_pad * kc_max * A : 0;                           // Ap
      const bool packs_b = own_b && !reads_b_in_place(t.col1 - t.col0) && !t.b_chunks;
      b[6] = packs_b ? nc_pad * std::min(kKC, red) * A : 0;              // Bp
      std::vector<int64_t> f0;
      std::vector<PhaseBlock> pblocks;
      const int64_t blocks = reduction_blocks(sp, red, sb.phase, f0, pblocks);
      const bool in_place =
          streams_block(blocks, nc) || writes_out_in_place(nc) || rounds_out(blocks, !own_b);
      b[7] = in_place ? 0 : mc_pad * nc_pad * A;                         // Cbuf
      b[8] = ((as_runs ? 2 : 0) + (b_runs || t.b_chunks ? 2 : 0)) * runs * I;  // ra, rb, bra, brb
    }
    for (int i = 0; i < kBuffers; ++i) bytes[i] = std::max(bytes[i], b[i]);
  }

  // The path this call takes, named as explain reports it (module.cc: cpu_scratch).
  const char* path() const {
    if (depthwise()) return kDwBf16 ? "bf16 depthwise" : "depthwise";
    if (narrow_cols()) return "narrow, taps as columns";
    if (narrow()) return pb.group_out() <= gemm::kNarrowF ? "narrow" : "row-vectorised";
    if (fuses_phases()) return "gemm, phases fused";
    if (fuses_columns()) return "gemm, adjacent phases fused";
    if (fused_taps() > 1) return "interleaved taps, fused";
    return dot() ? "dot" : interleaves_taps() ? "interleaved taps" : "gemm";
  }

  // Scratch of one call on `workers` pool threads: the shared packed B, and
  // the thread-local buffers of the largest tasks (on every thread that may
  // run tasks: the pool's and the caller's).
  void scratch(int64_t workers, int64_t* shared, int64_t* per_thread) const {
    if (depthwise()) {  // row and tap offsets, and the entry chunks' partial outputs
      constexpr int64_t I = sizeof(int64_t);
      *shared = 0;
      *per_thread = 0;
      if (dw_entries()) {  // every sub-problem's offsets at once
        *shared = dw_partials() ? dw_chunks() * dw_part_bytes() : 0;
        for (const SubProblem& sp : plan.subproblems)
          *per_thread += 2 * I * (round_up(sp.rows, MR) + tap_entries(sp, true));
        return;
      }
      for (const Task& t : tasks(workers))
        *per_thread = std::max(*per_thread, 2 * I * (round_up(t.row1 - t.row0, MR) +
                                                     tap_entries(plan.subproblems[t.sp], true)));
      if (dw_filter_copied())  // dw_filter's buffer
        *shared += dw_filter_size() * static_cast<int64_t>(sizeof(Acc));
      return;
    }
    const SharedB sb = shared_b();
    *shared = sb.elements() * static_cast<int64_t>(sizeof(Acc)) +
              (fuses_phases() ? nsp() * pb.group_out() / NR * static_cast<int64_t>(sizeof(int64_t))
                              : 0);
    int64_t bytes[kBuffers] = {};
    for (const Task& t : tasks(workers)) task_buffers(t, sb, bytes);
    *per_thread = 0;
    for (int64_t x : bytes) *per_thread += x;
  }

  void run_all(ffi::ThreadPool* pool) const {
    if (depthwise()) {
      const auto ts = tasks(pool != nullptr ? std::max<int64_t>(1, pool->num_threads()) : 1);
      if (!dw_entries()) {
        std::vector<Acc> filter;
        if (dw_filter_copied()) dw_filter(filter, pool);
        const Acc* const f = filter.empty() ? nullptr : filter.data() + pb.rhs_shift;
        parallel_for(pool, static_cast<int64_t>(ts.size()),
                     [&](int64_t i) { run_depthwise(ts[i], f); });
        return;
      }
      if constexpr (kDwTypes) {
        // Partial outputs of the entry chunks (straight into out when there
        // is one chunk and out holds Acc), then their sum in chunk order,
        // rounded to Tout.
        const int64_t nq = dw_chunks(), E = dw_part_bytes() / static_cast<int64_t>(sizeof(Acc));
        const bool parts = dw_partials();
        Acc* direct = nullptr;
        if constexpr (std::is_same<Tout, Acc>::value) direct = out;
        std::vector<Acc> part(parts ? nq * E : 0);
        parallel_for(pool, static_cast<int64_t>(ts.size()), [&](int64_t i) {
          run_depthwise_entries(ts[i], parts ? part.data() + ts[i].j0 * E : direct);
        });
        if (parts) {
          constexpr int64_t kChunk = 4096;
          parallel_for(pool, (E + kChunk - 1) / kChunk, [&](int64_t u) {
            for (int64_t e = u * kChunk; e < std::min(E, (u + 1) * kChunk); ++e) {
              Acc v = part[e];
              for (int64_t q = 1; q < nq; ++q) v += part[q * E + e];
              out[e] = store<Tout>(v);
            }
          });
        }
      }
      return;
    }
    const int64_t G = pb.groups();
    // Pass 1: pack B once per phase (phase_b), or else once per sub-problem
    // with three row blocks or more (shares_b), if it all fits. Other tasks
    // pack B block by block as they go, which keeps each block in cache
    // (d-rhs: few rows, long reductions).
    const SharedB sb = shared_b();
    const PackedBLease<Acc> packed(sb.elements());  // in 2 MB pages: scratch.h
    Acc* const Bshared = packed.get();
    const int64_t workers = pool != nullptr ? std::max<int64_t>(1, pool->num_threads()) : 1;
    if (sb.phase) {
      // In panel ranges, so that every worker packs: a strided conv's
      // d-input has one phase combination, and its B is all of the kernel.
      const int64_t cg = ncombos() * G, panels = round_up(pb.group_out(), NR) / NR;
      const int64_t chunks = std::min(panels, (kTasksPerWorker * workers + cg - 1) / cg);
      const bool fc = fuses_columns();
      parallel_for(pool, cg * chunks, [&](int64_t i) {
        const int64_t k = i / chunks, q = i % chunks;
        const int64_t n = round_up(combo_cols(k / G, fc), NR) / NR;  // this one's panels
        if (sb.ph_off[k + 1] > sb.ph_off[k])
          pack_phase_b(k / G, k % G, q * n / chunks, (q + 1) * n / chunks,
                       Bshared + sb.ph_off[k]);
      });
    } else if (sb.shared) {
      parallel_for(pool, nsp() * G, [&](int64_t i) {
        if (shares_b(i / G)) pack_b(i / G, i % G, Bshared + sb.b_off[i]);
      });
    } else if (sb.dot) {
      parallel_for(pool, nsp() * G,
                   [&](int64_t i) { pack_dot_b(i / G, i % G, Bshared + sb.b_off[i]); });
    }
    const std::vector<int64_t> fcols = fuses_phases() ? fused_cols() : std::vector<int64_t>{};
    // Pass 2: the tasks.
    const auto ts = tasks(workers);
    const int64_t unit = task_unit(workers);
    const bool cols = narrow_cols();
    parallel_for(pool, static_cast<int64_t>(ts.size()) / unit, [&](int64_t u) {
      for (int64_t i = u * unit; i < (u + 1) * unit; ++i) {
        const Task& t = ts[i];
        if (narrow()) {
          cols ? run_narrow_cols(t) : t.all_taps ? run_narrow_taps(t) : run_narrow(t);
          continue;
        }
        if (sb.dot) {
          run_dot(t, Bshared + sb.b_off[t.sp * G + t.group]);
          continue;
        }
        if (t.all_taps) {
          run_taps(t);
          continue;
        }
        const Acc* Bph = nullptr;
        if (sb.phase)
          Bph = Bshared + sb.ph_off[combo_of(plan.subproblems[t.sp]) * G + t.group];
        const bool shared = sb.shared && shares_b(t.sp);
        run(t, Bph, shared ? Bshared + sb.b_off[t.sp * G + t.group] : nullptr, fcols.data());
      }
    });
  }
};

// ---------------------------------------------------------------- bfloat16 pairs
// The output element type the pair kernel stores: bfloat16 bits or float.
template <typename Tout>
using PairOut = std::conditional_t<std::is_same<Tout, bf16>::value, uint16_t, float>;

// The output of one pair task (both pair paths): column blocks of at most
// kNC in [t.col0, t.col1), each the sum of nblocks reduction blocks,
// mul(i, nc0, nc, C) multiplying block i into C. Where the features are
// contiguous (out_c == 1) the last block stores straight into the output
// (rows out_row), the ones before it sum into Cbuf; else every block sums
// into Cbuf, copied out. A task with no block (a sub-problem whose outputs
// are all zero) writes zeros.
template <typename Tout, typename Task, typename Mul>
void pair_task_output(const CksConv<bf16, float, Tout>& c, const Task& t, const int64_t* out_row,
                      int64_t nblocks, std::vector<float>& Cbuf, Mul&& mul) {
  using To = PairOut<Tout>;
  constexpr int MR = Tile<float>::MR, NR = Tile<float>::NR;
  const int64_t Fg = c.pb.group_out(), mc = t.row1 - t.row0, mc_pad = round_up(mc, MR);
  const bool direct = c.pb.out_c == 1;
  for (int64_t nc0 = t.col0; nc0 < t.col1;) {
    const int64_t nc = std::min(nc0 / kNC * kNC + kNC, t.col1) - nc0, nc_pad = round_up(nc, NR);
    Cbuf.resize(mc_pad * nc_pad);  // read only where more than one block, or !direct
    if (!direct) std::fill(Cbuf.begin(), Cbuf.end(), 0.0f);
    To* o = direct ? reinterpret_cast<To*>(c.out) + t.group * Fg + nc0 : nullptr;
    for (int64_t i = 0; i < nblocks; ++i)
      mul(i, nc0, nc,
          gemm::PairC<To>{Cbuf.data(), nc_pad, o, out_row, mc, nc, direct && i == 0,
                          i + 1 == nblocks});
    if (!direct) {
      c.copy_out(out_row, mc, t.group, nc0, nc, Cbuf.data(), nc_pad, false);
    } else if (nblocks == 0) {
      for (int64_t r = 0; r < mc; ++r) std::fill_n(o + out_row[r], nc, To(0));
    }
    nc0 += nc;
  }
}

// bfloat16 operands of the phase-B path (channels contiguous and inner, at
// least kPhaseBMinC per group, an even number) on AVX512_BF16: the operands
// are read as they are, not widened, and multiplied by the pair kernel
// (gemm.h, pairs_block), which does twice the multiply-adds per instruction.
// The tasks, rows, runs and reduction blocks are CksConv's (the float32
// kernel would take the same); B is the phase B packed as pairs of reduction
// indices; a task's last reduction block stores its float32 sums straight
// into the output, rounded (the blocks before it sum into a float32 block).
// Sums are float32, but each instruction adds a pair of products, so the
// bits differ from the widened kernel's (not the thread count's).
template <typename Tout>
struct Bf16Pairs {
  using Conv = CksConv<bf16, float, Tout>;
  using Task = typename Conv::Task;
  using PhaseBlock = typename Conv::PhaseBlock;
  static constexpr int MR = Tile<float>::MR, NR = Tile<float>::NR;
  Conv c;

  // Not where the depthwise path takes the problem (grouped convolutions of
  // 16 or 32 channels per group), whose tasks are not the GEMM's.
  static bool applies(const ConvProblem& pb, const Plan& plan) {
    if (!gemm::bf16_pairs() || pb.lhs_c != 1 || pb.group_in() % 2 != 0 ||
        Conv{pb, plan, nullptr, nullptr, nullptr}.depthwise())
      return false;
    const CksConv<float, float, float> f{pb, plan, nullptr, nullptr, nullptr};
    return f.phase_b() && f.shared_b().phase;
  }

  // As CksConv::pack_phase_b, with row (tap f, channel ci) of panel q at
  // dst + q * ldb + (f * Cg + ci) / 2 * 2 NR + 2 j + ci % 2 for column j.
  void pack_phase_b(int64_t k, int64_t g, int64_t q0, int64_t q1, uint16_t* dst) const {
    const ConvProblem& pb = c.pb;
    const int64_t Cg = pb.group_in(), Fg = pb.group_out(), ldb = c.phase_ldb(k);
    const int64_t ri = pb.rhs_i, ro = pb.rhs_o;
    c.phase_taps(k, g, [&](int64_t f, int64_t roff) {
      for (int64_t q = q0; q < q1; ++q) {
        uint16_t* panel = dst + q * ldb + f * Cg * NR;
        const bf16* src = c.rhs + roff + q * NR * ro;
        const int64_t n = std::min<int64_t>(NR, Fg - q * NR);  // columns present
        for (int64_t ci = 0; ci < Cg; ++ci)
          for (int j = 0; j < NR; ++j)
            panel[ci / 2 * 2 * NR + 2 * j + ci % 2] = j < n ? src[ci * ri + j * ro].bits : 0;
      }
    });
  }

  // One task of CksConv::tasks: its rows x columns, from the phase B of its
  // phase combination (Bph).
  void run(const Task& t, const uint16_t* Bph) const {
#ifdef CKS_X86_AVX2
    const SubProblem& sp = c.plan.subproblems[t.sp];
    const int64_t mc = t.row1 - t.row0, mc_pad = round_up(mc, MR);
    thread_local std::vector<int64_t> lhs_row, out_row, ra, rb, f0;
    thread_local std::vector<PhaseBlock> pblocks;
    thread_local std::vector<float> Cbuf;
    c.row_offsets(t, lhs_row, out_row);
    for (int64_t r = mc; r < mc_pad; ++r) lhs_row[r] = lhs_row[0];  // never stored
    const gemm::NarrowRuns k = c.a_runs(t.sp, ra, rb);               // channel runs: even
    c.reduction_blocks(sp, c.red_size(t.sp), true, f0, pblocks);
    const int64_t ldb = c.phase_ldb(c.combo_of(sp));
    const uint16_t* lhs = reinterpret_cast<const uint16_t*>(c.lhs);
    pair_task_output(c, t, out_row.data(), static_cast<int64_t>(pblocks.size()), Cbuf,
                     [&](int64_t i, int64_t nc0, int64_t nc, const auto& C) {
                       const PhaseBlock& b = pblocks[i];
                       gemm::pairs_block(
                           mc_pad, round_up(nc, NR), b.kc,
                           gemm::PairRunA{lhs, lhs_row.data(), k.ra, k.R, b.kc0 / k.R,
                                          b.kc0 % k.R},
                           Bph + nc0 / NR * ldb + b.brow * NR, ldb, C);
                     });
#else
    (void)t, (void)Bph;
#endif
  }

  void run_all(ffi::ThreadPool* pool) const {
    const int64_t G = c.pb.groups();
    const auto sb = c.shared_b();
    const PackedBLease<uint16_t> packed(sb.elements());  // in 2 MB pages: scratch.h
    uint16_t* const B = packed.get();
    const int64_t workers = pool != nullptr ? std::max<int64_t>(1, pool->num_threads()) : 1;
    const int64_t cg = c.ncombos() * G, panels = round_up(c.pb.group_out(), NR) / NR;
    const int64_t chunks = std::min(panels, (Conv::kTasksPerWorker * workers + cg - 1) / cg);
    parallel_for(pool, cg * chunks, [&](int64_t i) {
      const int64_t k = i / chunks, q = i % chunks;
      if (sb.ph_off[k + 1] > sb.ph_off[k])
        pack_phase_b(k / G, k % G, q * panels / chunks, (q + 1) * panels / chunks,
                     B + sb.ph_off[k]);
    });
    const auto ts = c.tasks(workers);
    const int64_t unit = c.task_unit(workers);
    parallel_for(pool, static_cast<int64_t>(ts.size()) / unit, [&](int64_t u) {
      for (int64_t i = u * unit; i < (u + 1) * unit; ++i) {
        const Task& t = ts[i];
        run(t, B + sb.ph_off[c.combo_of(c.plan.subproblems[t.sp]) * G + t.group]);
      }
    });
  }

  // Scratch of one call (as CksConv::scratch): the pair phase B, shared, and
  // per thread the largest task's row offsets, runs (with reduction_runs' tap
  // tables), runs' first taps, reduction blocks (3 words each: at most one
  // per run, or one per kKCPhase of a longer run: phase_blocks), float32
  // block and, on AMX, the block's A as tiles read it (gemm::amx_block_bytes).
  void scratch(int64_t workers, int64_t* shared, int64_t* per_thread) const {
    constexpr int64_t I = sizeof(int64_t);
    *shared = c.shared_b().elements() * static_cast<int64_t>(sizeof(uint16_t));
    *per_thread = 0;
    for (const Task& t : c.tasks(workers)) {
      const SubProblem& sp = c.plan.subproblems[t.sp];
      const int64_t rows = t.row1 - t.row0, mc_pad = round_up(rows, MR);
      const int64_t R = sp.seg[c.pb.nd - 1].t_hi - sp.seg[c.pb.nd - 1].t_lo;
      const int64_t nc_pad = round_up(std::min(kNC, t.col1 - t.col0), NR);
      const int64_t runs = R > 0 ? sp.taps / R : 0;
      const int64_t blocks =
          runs * std::max<int64_t>(1, (R * c.pb.group_in() + Conv::kKCPhase - 1) / Conv::kKCPhase);
      const int64_t kc = std::min(std::max(kKC, Conv::kKCPhase), c.red_size(t.sp));
      const int64_t bytes = (mc_pad + rows + 4 * sp.taps + runs + 3 * blocks) * I +
                            mc_pad * nc_pad * static_cast<int64_t>(sizeof(float)) +
                            gemm::amx_block_bytes(mc_pad, kc, nc_pad);
      *per_thread = std::max(*per_thread, bytes);
    }
  }
};

// bfloat16 filter gradients (the rows, input channels, contiguous; the
// reduction over batch and positions, channels outer) with at least kMinF
// features per group on AVX512_BF16: successive reduction indices are not
// adjacent in memory, so each task packs A (its rows) and B (the cotangent's
// rows for its columns) as pairs, block by block (kKC indices), and runs
// the pair kernel on them. The widened path converted both whole operands to
// float32 first and ran at half the multiply-adds per instruction. In
// process on Zen 4 (2 cores), against the widened kernel: 1.1-2.8x as fast
// on the bench's filter gradients with 64 rows or more (DCGAN's
// discriminator 1.05x). Fewer features (up to 8: the narrow path's) would
// waste most of a 16-column panel, and with 32 rows (input channels per
// group) the float32 row-vectorised kernel, vectorised over those rows with
// its taps interleaved, was faster (3D U-Net and atrous 0.75-0.98x, grouped
// k4 s2 0.87-1.11x): those stay widened. Packing took most of the time
// (profiled on the discriminator's: the pair kernel 21 % of the samples,
// packing 52 %): A's rows are packed in memory order (prepare) and B's rows
// a pair of reduction indices at a time into every panel
// (interleave_pair_panels), where A went element by element and B panel by
// panel. In process on Zen 4 (2 cores, 8 alternating rounds, medians, same
// bits): DCGAN's discriminator 39.1 -> 17.6 ms, ResNet's stride-2 3x3 7.7
// -> 3.3, the 3x3 8.3 -> 6.7, the 7x7 16.9 -> 12.9, DCGAN 16->32 5.0 ->
// 3.9, U-Net 64->128 3.5 -> 2.9, the atrous d2 12.2 -> 10.6, the k8 s4
// head 10.0 -> 9.2.
template <typename Tout>
struct Bf16PackedPairs {
  using Conv = CksConv<bf16, float, Tout>;
  using Task = typename Conv::Task;
  static constexpr int MR = Tile<float>::MR, NR = Tile<float>::NR;
  static constexpr int64_t kMinF = 16, kMinRows = 64;
  Conv c;

  static bool applies(const ConvProblem& pb, const Plan& plan) {
    if (!gemm::bf16_pairs() || pb.lhs_n != 1 || pb.group_out() < kMinF ||
        pb.out_batch() < kMinRows || Conv{pb, plan, nullptr, nullptr, nullptr}.depthwise())
      return false;
    return !CksConv<float, float, float>{pb, plan, nullptr, nullptr, nullptr}.channels_inner();
  }

  // Row blocks of kMC rows per (sub-problem, group); with fewer than
  // kTasksPerWorker per worker the columns are split too, in whole 2-panel
  // tiles, as CksConv::tasks does (a filter gradient has few rows).
  std::vector<Task> tasks(int64_t workers) const {
    const ConvProblem& pb = c.pb;
    const int64_t Fg = pb.group_out(), G = pb.groups();
    int64_t row_blocks = 0;
    for (const SubProblem& sp : c.plan.subproblems) row_blocks += (sp.rows + kMC - 1) / kMC;
    row_blocks *= G;
    int64_t width = Fg;
    const int64_t want = Conv::kTasksPerWorker * workers;
    if (row_blocks > 0 && row_blocks < want && Fg > 2 * NR) {
      const int64_t splits = std::min((want + row_blocks - 1) / row_blocks, Fg / (2 * NR));
      width = round_up((Fg + splits - 1) / splits, 2 * NR);
    }
    std::vector<Task> ts;
    for (int64_t s = 0; s < c.nsp(); ++s)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < c.plan.subproblems[s].rows; r += kMC)
          for (int64_t col = 0; col < Fg; col += width)
            ts.push_back({s, g, r, std::min(c.plan.subproblems[s].rows, r + kMC), col,
                          std::min(Fg, col + width)});
    return ts;
  }

  // How one task reads a sub-problem: its rows' offsets and its reduction's
  // runs (reduction_runs), and its rows as segments adjacent in memory
  // (seg: the first row of each, then the row count).
  struct SubA {
    std::vector<int64_t> lhs_row, out_row, ra, rb, seg;
    gemm::NarrowRuns k;
  };
  // A task's rows are (channel, tap) with the taps fastest, so a filter
  // gradient of several taps per sub-problem (a strided or dilated layer's)
  // has no two rows adjacent in memory, and A was packed element by element
  // (a sixth of the samples of the DCGAN discriminator's bfloat16 filter
  // gradient). The rows are put in memory order instead (lhs_row and out_row
  // alike: each row's sums are the same, only their place in the block
  // moves), so that each tap's channels are one segment, packed 32 at a time.
  void prepare(const Task& t, SubA& x) const {
    c.row_offsets(t, x.lhs_row, x.out_row);
    x.k = c.reduction_runs(t.sp, x.ra, x.rb);
    const int64_t mc = t.row1 - t.row0;
    bool sorted = true;
    for (int64_t r = 1; r < mc; ++r) sorted = sorted && x.lhs_row[r] > x.lhs_row[r - 1];
    if (!sorted) {
      thread_local std::vector<std::pair<int64_t, int64_t>> rows;  // (lhs_row, out_row)
      rows.resize(mc);
      for (int64_t r = 0; r < mc; ++r) rows[r] = {x.lhs_row[r], x.out_row[r]};
      std::sort(rows.begin(), rows.end());
      for (int64_t r = 0; r < mc; ++r) std::tie(x.lhs_row[r], x.out_row[r]) = rows[r];
    }
    x.seg.clear();
    for (int64_t r = 0; r < mc; ++r)
      if (r == 0 || x.lhs_row[r] != x.lhs_row[r - 1] + 1) x.seg.push_back(r);
    x.seg.push_back(mc);
  }

  // Reduction indices [kc0, kc0 + kc) (kc <= kKC) of a task's rows (mc of
  // them) x columns [nc0, nc0 + nc) of group g, packed as pairs (an odd last
  // index paired with zeros) and multiplied into C.
  template <typename To>
  void multiply(const SubA& x, int64_t mc, int64_t g, int64_t nc0, int64_t nc, int64_t kc0,
                int64_t kc, const gemm::PairC<To>& C) const {
#ifdef CKS_X86_AVX2
    const ConvProblem& pb = c.pb;
    const int64_t mc_pad = round_up(mc, MR), nc_pad = round_up(nc, NR), kp = (kc + 1) / 2;
    thread_local std::vector<int64_t> ao, bo;
    thread_local std::vector<uint16_t> Ap, Bp;
    const uint16_t* lhs = reinterpret_cast<const uint16_t*>(c.lhs);
    const uint16_t* cols =
        reinterpret_cast<const uint16_t*>(c.rhs) + (g * pb.group_out() + nc0) * pb.rhs_o;
    const gemm::NarrowRuns& k = x.k;
    ao.resize(kc);
    bo.resize(kc);
    for (int64_t i = 0, run = kc0 / k.R, q = kc0 % k.R; i < kc; ++i) {  // in reduction order
      ao[i] = k.ra[run] + q * k.sa;
      bo[i] = k.rb[run] + q * k.sb;
      if (++q == k.R) run += 1, q = 0;
    }
    // A: pair p of row r at Ap[p * 2 mc_pad + 2 r]; rows past mc zero.
    Ap.resize(kp * 2 * mc_pad);
    for (int64_t p = 0; p < kp; ++p) {
      uint16_t* dst = Ap.data() + p * 2 * mc_pad;
      const bool odd = 2 * p + 1 == kc;  // the block's last index has no partner
      for (size_t i = 0; i + 1 < x.seg.size(); ++i) {
        const int64_t r0 = x.seg[i], r1 = x.seg[i + 1];
        const uint16_t* a0 = lhs + x.lhs_row[r0] + ao[2 * p];
        const uint16_t* a1 = odd ? nullptr : lhs + x.lhs_row[r0] + ao[2 * p + 1];
        if (r1 - r0 == 1) {
          dst[2 * r0] = *a0;
          dst[2 * r0 + 1] = odd ? 0 : *a1;
          continue;
        }
        for (int64_t r = r0; r < r1; r += 32)
          gemm::interleave_pairs(a0 + (r - r0), a1 ? a1 + (r - r0) : nullptr,
                                 std::min<int64_t>(32, r1 - r), dst + 2 * r);
      }
      std::fill(dst + 2 * mc, dst + 2 * mc_pad, uint16_t{0});
    }
    // B: panel j's pair p at Bp[j * ldb + p * 2 NR], columns past nc zero.
    const int64_t ldb = kp * 2 * NR;
    Bp.resize(nc_pad / NR * ldb);
    if (pb.rhs_o == 1) {
      for (int64_t p = 0; p < kp; ++p) {
        const bool odd = 2 * p + 1 == kc;
        gemm::interleave_pair_panels(cols + bo[2 * p], odd ? nullptr : cols + bo[2 * p + 1], nc,
                                     Bp.data() + p * 2 * NR, ldb);
      }
    } else {
      for (int64_t j = 0; j < nc_pad / NR; ++j) {
        const int64_t n = std::min<int64_t>(NR, nc - j * NR);
        for (int64_t p = 0; p < kp; ++p) {
          uint16_t* dst = Bp.data() + j * ldb + p * 2 * NR;
          const bool odd = 2 * p + 1 == kc;
          const uint16_t* b0 = cols + bo[2 * p] + j * NR * pb.rhs_o;
          const uint16_t* b1 = odd ? nullptr : cols + bo[2 * p + 1] + j * NR * pb.rhs_o;
          for (int64_t e = 0; e < n; ++e) {
            dst[2 * e] = b0[e * pb.rhs_o];
            dst[2 * e + 1] = odd ? 0 : b1[e * pb.rhs_o];
          }
          std::fill(dst + 2 * n, dst + 2 * NR, uint16_t{0});
        }
      }
    }
    gemm::pairs_block(mc_pad, nc_pad, 2 * kp, gemm::PairPackedA{Ap.data(), mc_pad, 2 * mc_pad},
                      Bp.data(), ldb, C);
#else
    (void)x, (void)mc, (void)g, (void)nc0, (void)nc, (void)kc0, (void)kc, (void)C;
#endif
  }

  using To = PairOut<Tout>;

  // One task of one sub-problem: its reduction in blocks of kKC.
  void run(const Task& t) const {
    thread_local SubA x;
    thread_local std::vector<float> Cbuf;
    prepare(t, x);
    const int64_t red = x.k.nruns * x.k.R, nblocks = (red + kKC - 1) / kKC;
    pair_task_output(c, t, x.out_row.data(), nblocks, Cbuf,
                     [&](int64_t blk, int64_t nc0, int64_t nc, const auto& C) {
                       multiply(x, t.row1 - t.row0, t.group, nc0, nc, blk * kKC,
                                std::min(kKC, red - blk * kKC), C);
                     });
  }

  // Large operands (CksConv::interleaves_taps, and at least kTapsMinBytes
  // of bfloat16): each task runs every sub-problem on one chunk of the
  // cotangent's rows before the next, as CksConv::run_taps does, so that
  // chunk's input and cotangent stay in cache from the first tap to the
  // last; each sub-problem sums into its own float32 block, copied out at
  // the end. The chunks depend on the shapes alone, so the bits do not
  // depend on the thread count. In process on Zen 4 (2 cores): DCGAN's
  // discriminator layer (12 MB of bfloat16 operands) 0.93x the time; with
  // 6-8 MB (DCGAN 8->16, atrous 64 d2) 1.10-1.13x, the 7x7 (4 MB) 1.10x.
  static constexpr int64_t kTapsMinBytes = int64_t{12} << 20;
  bool interleaves() const {
    return c.interleaves_taps() &&
           c.operand_elements() * static_cast<int64_t>(sizeof(bf16)) >= kTapsMinBytes;
  }
  void run_taps(const Task& task) const {
    const ConvProblem& pb = c.pb;
    const int64_t S = c.nsp(), s0 = task.sp, s1 = task.sp1;  // sub-problems [s0, s1)
    thread_local std::vector<SubA> xs;
    thread_local std::vector<Task> sub;
    thread_local std::vector<float> Cbuf;
    if (xs.size() < static_cast<size_t>(S)) xs.resize(S);
    sub.resize(S);
    const int64_t mc_max = round_up(task.row1 - task.row0, MR);
    const int64_t nc_max = round_up(std::min(kNC, task.col1 - task.col0), NR);
    for (int64_t s = s0; s < s1; ++s) {
      sub[s] = c.sub_task(task, s);
      if (sub[s].row1 > sub[s].row0) prepare(sub[s], xs[s]);
    }
    Cbuf.resize((s1 - s0) * mc_max * nc_max);
    const int64_t H = c.tap_chunk_rows(), J = pb.dim[0].k_size, CJ = pb.group_in() * J;
    for (int64_t nc0 = task.col0; nc0 < task.col1;) {
      const int64_t nc = std::min(nc0 / kNC * kNC + kNC, task.col1) - nc0;
      const int64_t nc_pad = round_up(nc, NR);
      std::fill(Cbuf.begin(), Cbuf.end(), 0.0f);
      for (int64_t g0 = 0; g0 < CJ; g0 += H)
        for (int64_t s = s0; s < s1; ++s) {
          const SubProblem& sp = c.plan.subproblems[s];
          const int64_t mc = sub[s].row1 - sub[s].row0;
          if (mc <= 0 || sp.taps == 0) continue;
          const int64_t k0 = c.tap_index(sp, g0, J), k1 = c.tap_index(sp, std::min(g0 + H, CJ), J);
          for (int64_t kc0 = k0; kc0 < k1; kc0 += kKC)
            multiply(xs[s], mc, task.group, nc0, nc, kc0, std::min(kKC, k1 - kc0),
                     gemm::PairC<To>{Cbuf.data() + (s - s0) * mc_max * nc_max, nc_pad, nullptr,
                                     nullptr, mc, nc, false, false});
        }
      for (int64_t s = s0; s < s1; ++s)
        if (sub[s].row1 > sub[s].row0)
          c.copy_out(xs[s].out_row.data(), sub[s].row1 - sub[s].row0, task.group, nc0, nc,
                     Cbuf.data() + (s - s0) * mc_max * nc_max, nc_pad, false);
      nc0 += nc;
    }
  }

  void run_all(ffi::ThreadPool* pool) const {
    const int64_t workers = pool != nullptr ? std::max<int64_t>(1, pool->num_threads()) : 1;
    const bool taps = interleaves();
    const auto ts = taps ? c.tap_tasks(workers) : tasks(workers);
    parallel_for(pool, static_cast<int64_t>(ts.size()),
                 [&](int64_t i) { taps ? run_taps(ts[i]) : run(ts[i]); });
  }

  // Scratch of one call: nothing shared; per thread the largest task's row
  // offsets and runs (with reduction_runs' tap tables) of each sub-problem it
  // holds at once (all of them with interleaved taps), block offsets, packed
  // A and B blocks (on AMX, A also as tiles read it), and float32 blocks (one
  // per sub-problem held).
  void scratch(int64_t workers, int64_t* shared, int64_t* per_thread) const {
    constexpr int64_t I = sizeof(int64_t), H = sizeof(uint16_t), F = sizeof(float);
    const bool taps = interleaves();
    *shared = 0;
    *per_thread = 0;
    for (const Task& t : taps ? c.tap_tasks(workers) : tasks(workers)) {
      const int64_t nc_pad = round_up(std::min(kNC, t.col1 - t.col0), NR);
      int64_t held = 0, tables = 0, blocks = 0;  // bytes
      for (int64_t s = taps ? 0 : t.sp; s < (taps ? c.nsp() : t.sp + 1); ++s) {
        const Task u = taps ? c.sub_task(t, s) : t;
        if (u.row1 <= u.row0) continue;
        const SubProblem& sp = c.plan.subproblems[s];
        const int64_t rows = u.row1 - u.row0, mc_pad = round_up(rows, MR);
        const int64_t R = sp.seg[c.pb.nd - 1].t_hi - sp.seg[c.pb.nd - 1].t_lo;
        const int64_t runs = R > 0 ? c.pb.group_in() * (sp.taps / R) : 0;
        const int64_t kc = round_up(std::min(kKC, c.red_size(s)), 2);
        // lhs_row, out_row, the runs and the segments
        held += (mc_pad + rows + 2 * runs + rows + 1) * I + mc_pad * nc_pad * F;
        // the tap tables and the sort's (lhs_row, out_row) pairs, reused
        tables = std::max(tables, 2 * c.tap_entries(sp, true) * I + 2 * rows * I);
        blocks = std::max(blocks, 2 * kKC * I + kc * (mc_pad + nc_pad) * H +
                                      gemm::amx_block_bytes(mc_pad, kc, nc_pad));
      }
      *per_thread = std::max(*per_thread, held + tables + blocks);
    }
  }
};

template <typename Tin, typename Acc, typename Tout>
void run_conv(const ConvProblem& pb, const void* lhs, const void* rhs, void* out,
              ffi::ThreadPool* pool) {
  const Plan plan = make_plan(pb);
  CksConv<Tin, Acc, Tout> conv{pb, plan, static_cast<const Tin*>(lhs),
                               static_cast<const Tin*>(rhs) + pb.rhs_shift,
                               static_cast<Tout*>(out)};
  conv.run_all(pool);
}

// 16-bit operands run widened: float32 copies made once per call, in
// parallel, into buffers kept between calls (WidenedPool; fresh buffers would
// be paged in on every call), then the float32 kernel,
// which reads them in place and rounds a 16-bit output as it stores it (its
// dot path, which writes float32 in place, into a float32 copy rounded in a
// parallel pass). The values are those of the 16-bit kernel (float32
// accumulation either way). XLA's converts around the kernel did this work on
// one thread, into fresh buffers, with a pass for the output: in process on
// Zen 4, bfloat16 layers took 0.74-1.0x the time (WaveNet 0.98-1.0x).
// convert(src + i, m, dst + i) over chunks [i, i + m) of [0, n), in parallel.
template <typename From, typename To, typename Convert>
void convert_all(const From* src, int64_t n, To* dst, ffi::ThreadPool* pool, Convert convert) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  parallel_for(pool, (n + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t i0 = c * kChunk;
    convert(src + i0, std::min(n, i0 + kChunk) - i0, dst + i0);
  });
}

template <typename T>
const float* widened(const T* src, int64_t n, std::vector<float>& buf, ffi::ThreadPool* pool) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  convert_all(src, n, buf.data(), pool, convert::to_float<T>);
  return buf.data();
}

template <typename Tin>
constexpr bool kWidened = sizeof(Tin) == 2;

// Whether RunConv writes a float32 copy of a 16-bit output and rounds it
// after: where the float32 kernel takes its dot or depthwise path, which
// write float32 in place. ScratchOf asks too.
template <typename Tin, typename Tout>
bool widened_output(const ConvProblem& pb, const Plan& plan) {
  if constexpr (!kWidened<Tin> || std::is_same<Tout, float>::value) return false;
  const CksConv<float, float, float> conv{pb, plan, nullptr, nullptr, nullptr};
  return conv.dot() || conv.depthwise();
}

// The float32 copies of one call's 16-bit operands (and output, on the dot
// path). Kept for the next call, in one process-wide free list: a call takes
// a set and gives it back when done, so the sets held are as many as calls
// ever ran at once (usually one), each as large as the largest copies it
// served. Per-thread buffers held one set per thread that had ever called (XLA
// runs custom calls on its pool threads as well as the caller's).
struct WidenedSet {
  std::vector<float> lhs, rhs, out;
  int64_t bytes() const {
    return static_cast<int64_t>((lhs.capacity() + rhs.capacity() + out.capacity()) * 4);
  }
};
class WidenedPool {
 public:
  std::unique_ptr<WidenedSet> take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return std::make_unique<WidenedSet>();
    std::unique_ptr<WidenedSet> w = std::move(free_.back());
    free_.pop_back();
    return w;
  }
  void give(std::unique_ptr<WidenedSet> w) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(w));
  }
  // Bytes held by the sets not in use; release() frees them.
  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t n = 0;
    for (const auto& w : free_) n += w->bytes();
    return n;
  }
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    free_.clear();
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<WidenedSet>> free_;
};
WidenedPool& widened_pool() {
  static WidenedPool* pool = new WidenedPool;  // never destroyed: calls may outlive statics
  return *pool;
}
// A set taken from the pool for one call, given back when it ends.
struct WidenedLease {
  std::unique_ptr<WidenedSet> set = widened_pool().take();
  ~WidenedLease() { widened_pool().give(std::move(set)); }
};

template <typename Tin, typename Acc, typename Tout>
struct RunConv {
  using Conv16 = CksConv<bf16, float, Tout>;
  static void run(const ConvProblem& pb, const void* lhs, const void* rhs, int64_t lhs_n,
                  int64_t rhs_n, void* out, int64_t out_n, ffi::ThreadPool* pool) {
    if constexpr (std::is_same<Tin, bf16>::value) {
      const Plan plan = make_plan(pb);
      const Conv16 conv{pb, plan, static_cast<const bf16*>(lhs),
                        static_cast<const bf16*>(rhs) + pb.rhs_shift, static_cast<Tout*>(out)};
      if (Bf16Pairs<Tout>::applies(pb, plan)) return Bf16Pairs<Tout>{conv}.run_all(pool);
      if (Bf16PackedPairs<Tout>::applies(pb, plan))
        return Bf16PackedPairs<Tout>{conv}.run_all(pool);
      if (conv.depthwise()) return conv.run_all(pool);
    }
    if constexpr (kWidened<Tin>) {
      WidenedLease lease;
      WidenedSet& w = *lease.set;
      const float* l = widened(static_cast<const Tin*>(lhs), lhs_n, w.lhs, pool);
      const float* r =
          widened(static_cast<const Tin*>(rhs), rhs_n, w.rhs, pool) + pb.rhs_shift;
      const Plan plan = make_plan(pb);
      if (!widened_output<Tin, Tout>(pb, plan)) {  // rounds each output as it stores it
        CksConv<float, float, Tout>{pb, plan, l, r, static_cast<Tout*>(out)}.run_all(pool);
      } else {
        if (static_cast<int64_t>(w.out.size()) < out_n) w.out.resize(out_n);
        CksConv<float, float, float>{pb, plan, l, r, w.out.data()}.run_all(pool);
        convert_all(w.out.data(), out_n, static_cast<Tout*>(out), pool,
                    convert::from_float<Tout>);
      }
    } else {
      run_conv<Tin, Acc, Tout>(pb, lhs, rhs, out, pool);
    }
  }
};

// The scratch of the kernel RunConv runs (16-bit operands: the float32 one;
// their widened copies are counted by the caller).
template <typename Tin, typename Acc, typename Tout>
struct ScratchOf {
  using Conv16 = CksConv<bf16, float, Tout>;
  static void run(const ConvProblem& pb, int64_t workers, int64_t* shared, int64_t* per_thread,
                  const char** path) {
    using In = std::conditional_t<kWidened<Tin>, float, Tin>;
    const Plan plan = make_plan(pb);
    if constexpr (std::is_same<Tin, bf16>::value) {
      const Conv16 conv{pb, plan, nullptr, nullptr, nullptr};
      if (Bf16Pairs<Tout>::applies(pb, plan)) {
        Bf16Pairs<Tout>{conv}.scratch(workers, shared, per_thread);
        *path = "bf16 pairs";
        return;
      }
      if (Bf16PackedPairs<Tout>::applies(pb, plan)) {
        const Bf16PackedPairs<Tout> packed{conv};
        packed.scratch(workers, shared, per_thread);
        *path = packed.interleaves() ? "bf16 packed pairs, interleaved taps" : "bf16 packed pairs";
        return;
      }
      if (conv.depthwise()) {
        conv.scratch(workers, shared, per_thread);
        *path = conv.path();
        return;
      }
    }
    if (widened_output<Tin, Tout>(pb, plan)) {
      const CksConv<float, float, float> conv{pb, plan, nullptr, nullptr, nullptr};
      conv.scratch(workers, shared, per_thread);
      *path = conv.path();
    } else {
      const CksConv<In, Acc, Tout> conv{pb, plan, nullptr, nullptr, nullptr};
      conv.scratch(workers, shared, per_thread);
      *path = conv.path();
    }
  }
};

// The intra-op pool's size at the last call (module.cc: cpu_pool_threads), so
// that explain() reports the scratch of the threads XLA really lends.
std::atomic<int64_t> g_pool_threads{0};

ffi::Error CksConvCpu(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                      ffi::Result<ffi::AnyBuffer> out, I64Span window_strides,
                      I64Span lhs_dilation, I64Span rhs_dilation, I64Span padding_lo,
                      I64Span lhs_spec, I64Span rhs_spec, I64Span out_spec,
                      int64_t feature_group_count, int64_t batch_group_count,
                      int64_t rhs_reversed) {
  ConvProblem pb;
  ffi::Error err = decode_problem(lhs, rhs, *out, window_strides, lhs_dilation, rhs_dilation,
                                  padding_lo, lhs_spec, rhs_spec, out_spec, feature_group_count,
                                  batch_group_count, &pb);
  if (err.failure()) return err;
  if (rhs_reversed != 0) reverse_rhs(&pb);
  if (out->element_count() == 0) return ffi::Error::Success();
  g_pool_threads.store(pool.num_threads(), std::memory_order_relaxed);
  if (!dispatch_dtypes<RunConv>(dtype_code(lhs.element_type()), dtype_code(out->element_type()),
                                pb, lhs.untyped_data(), rhs.untyped_data(),
                                static_cast<int64_t>(lhs.element_count()),
                                static_cast<int64_t>(rhs.element_count()), out->untyped_data(),
                                static_cast<int64_t>(out->element_count()), &pool))
    return ffi::Error::InvalidArgument(
        "cks: unsupported dtype combination (inputs f32/f64/bf16/f16; output the input dtype, "
        "or f32 for 16-bit inputs)");
  return ffi::Error::Success();
}

}  // namespace

int64_t cpu_pool_threads() { return g_pool_threads.load(std::memory_order_relaxed); }

int cpu_isa() { return gemm::gemm_isa(); }

bool cpu_bf16_pairs() { return gemm::bf16_pairs(); }
bool cpu_bf16_amx() { return gemm::bf16_amx(); }
bool cpu_bf16_depthwise() { return gemm::bf16_depthwise(); }

int64_t cpu_widened_held_bytes() { return widened_pool().held(); }
void cpu_widened_release() { widened_pool().release(); }
int64_t cpu_packed_b_held_bytes() { return packed_b_pool().held(); }
int64_t cpu_packed_b_page_bytes() { return HugePool::kPage; }
void cpu_packed_b_release() { packed_b_pool().release(); }

// Scratch bytes of the CPU kernel on one call (module.cc: cpu_scratch): the
// packed B shared by all tasks, and the buffers of each thread that runs tasks;
// and the name of the path it takes (CksConv::path).
bool cpu_scratch_bytes(const ConvProblem& pb, int in_code, int out_code, int64_t workers,
                       int64_t* shared, int64_t* per_thread, const char** path) {
  return dispatch_dtypes<ScratchOf>(in_code, out_code, pb, workers, shared, per_thread, path);
}

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
                                  .Attr<int64_t>("batch_group_count")
                                  .Attr<int64_t>("rhs_reversed"));
