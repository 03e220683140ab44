// Process-wide buffers for the packed B panels of the CPU kernel, in 2 MB
// pages where Linux grants them (transparent huge pages, MADV_HUGEPAGE).
//
// Why: every row tile of a GEMM streams its column block's B panels (up to
// a few MB) from L2 again. On 4 KB pages the same call ran at two speeds
// depending on where its B landed in physical memory, fixed for a process
// (one allocation reused by malloc): on the Xeon VM (AVX-512, 2 cores), with
// B's buffer rotated over 8 allocations in one process, ResNet's 3x3 forward
// took 5.2 ms on 2 of them and 6.2-6.4 on the other 6, the atrous d8 forward
// 6.6 and 7.6-7.7 (the same 2 of 8 fast); moving each panel by 64 bytes
// changed nothing. In 2 MB pages all 8 ran at 5.6 and 6.9 ms; over the 8,
// forwards and input gradients that multiply a packed B took 0.83-0.93x the
// time (DCGAN, U-Net, the head, ResNet, the atrous and 7x7 layers; the
// grouped layer, whose B is 128 KB, 0.99x).
//
// A call takes a buffer and gives it back when done. Buffers are kept for
// the next call, so each is faulted in once: as many as calls ever ran at
// once (usually one), each as large as the largest B it served, up to
// kKeepBytes; a larger one is unmapped when given back. Taking a buffer
// when none held is large enough unmaps the largest held one first, so a
// run of growing B leaves one buffer, not one per size.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cks {

class HugePool {
 public:
  static constexpr int64_t kPage = int64_t{2} << 20;
  static constexpr int64_t kKeepBytes = int64_t{64} << 20;

  struct Buffer {
    void* p = nullptr;
    int64_t bytes = 0;
  };

  Buffer take(int64_t bytes) {
    bytes = std::max<int64_t>(kPage, (bytes + kPage - 1) / kPage * kPage);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->bytes >= bytes && (best == free_.end() || it->bytes < best->bytes)) best = it;
      if (best != free_.end()) {
        const Buffer b = *best;
        free_.erase(best);
        return b;
      }
      if (!free_.empty()) {  // all too small: give up the largest, then map anew
        auto big = std::max_element(
            free_.begin(), free_.end(),
            [](const Buffer& a, const Buffer& b) { return a.bytes < b.bytes; });
        unmap(*big);
        free_.erase(big);
      }
    }
    return map(bytes);
  }

  void give(Buffer b) {
    if (b.p == nullptr) return;
    if (b.bytes > kKeepBytes) return unmap(b);
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(b);
  }

  // Bytes of the buffers not in use; release() unmaps them.
  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t n = 0;
    for (const Buffer& b : free_) n += b.bytes;
    return n;
  }
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Buffer& b : free_) unmap(b);
    free_.clear();
  }

 private:
  static Buffer map(int64_t bytes) {
#if defined(__linux__)
    // Over-map by a page and trim, so the buffer starts on a 2 MB boundary
    // (a huge page covers only aligned 2 MB ranges).
    const size_t span = static_cast<size_t>(bytes + kPage);
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kPage - 1) / kPage * kPage;
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t end = aligned + static_cast<uintptr_t>(bytes);
    if (start + span > end) munmap(reinterpret_cast<void*>(end), start + span - end);
    void* p = reinterpret_cast<void*>(aligned);
#ifdef MADV_HUGEPAGE
    madvise(p, static_cast<size_t>(bytes), MADV_HUGEPAGE);  // a hint: 4 KB pages if refused
#endif
    return {p, bytes};
#else
    void* p = nullptr;
    if (posix_memalign(&p, 64, static_cast<size_t>(bytes)) != 0) throw std::bad_alloc();
    return {p, bytes};
#endif
  }
  static void unmap(const Buffer& b) {
#if defined(__linux__)
    munmap(b.p, static_cast<size_t>(b.bytes));
#else
    std::free(b.p);
#endif
  }

  std::mutex mu_;
  std::vector<Buffer> free_;
};

inline HugePool& packed_b_pool() {
  static HugePool* pool = new HugePool;  // never destroyed: calls may outlive statics
  return *pool;
}

// A buffer of at least `bytes` taken from packed_b_pool for one call, given
// back when the call ends; none for 0 bytes.
template <typename T>
class PackedBLease {
 public:
  explicit PackedBLease(int64_t elements) {
    if (elements > 0) b_ = packed_b_pool().take(elements * static_cast<int64_t>(sizeof(T)));
  }
  ~PackedBLease() { packed_b_pool().give(b_); }
  PackedBLease(const PackedBLease&) = delete;
  PackedBLease& operator=(const PackedBLease&) = delete;
  T* get() const { return static_cast<T*>(b_.p); }

 private:
  HugePool::Buffer b_;
};

}  // namespace cks
