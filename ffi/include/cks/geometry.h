// C-K-S index geometry of one spatial dimension (DESIGN.md section 2).
//
// An output o and a filter tap k meet input element i when
//     o*s + k*d - lo == i*a,   0 <= i < N,   0 <= k < K,
// with window stride s, lhs dilation a, rhs dilation d and low padding lo
// (which may be negative). The outputs split into P*Q residue classes
// ("phases"); inside one phase the taps that can ever meet a real input form
// an arithmetic progression (the phase's sub-kernel) and the input index is
// affine in (output, tap):
//     o = o0 + L*u,  k = k0 + kstep*t,  i = base + ustride*u + tstride*t.
// For each u only a contiguous range of t reads inside the input (the trimmed
// range); consecutive outputs with the same range form a segment, and every
// segment is a dense, zero-free sub-problem.
//
// This header is the one place for that arithmetic. It is plain C++ with no
// allocation in the per-element functions so CUDA kernels can share it.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define CKS_HD __host__ __device__
#else
#define CKS_HD
#endif

namespace cks {

CKS_HD inline int64_t gcd(int64_t x, int64_t y) {
  while (y != 0) {
    int64_t r = x % y;
    x = y;
    y = r;
  }
  return x < 0 ? -x : x;
}
// Division rounding towards -infinity / +infinity, for any sign of x (y > 0).
CKS_HD inline int64_t floor_div(int64_t x, int64_t y) {
  int64_t q = x / y;
  return (q * y != x && x < 0) ? q - 1 : q;
}
CKS_HD inline int64_t ceil_div(int64_t x, int64_t y) { return -floor_div(-x, y); }
CKS_HD inline int64_t pos_mod(int64_t x, int64_t y) { return x - floor_div(x, y) * y; }
CKS_HD inline int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }
CKS_HD inline int64_t max64(int64_t x, int64_t y) { return x > y ? x : y; }

// The problem along one spatial dimension.
struct Dim {
  int64_t in_size;   // N: undilated input length
  int64_t k_size;    // K: undilated filter length
  int64_t out_size;  // O
  int64_t stride;    // s (window stride)
  int64_t lhs_dil;   // a (zeros inserted between inputs: deconvolution)
  int64_t rhs_dil;   // d (zeros inserted between taps: dilated convolution)
  int64_t pad_lo;    // lo (may be negative)
};

// One residue class of outputs and its sub-kernel.
struct Phase {
  int64_t o0, L;              // outputs o = o0 + L*u, u in [0, U)
  int64_t U;
  int64_t k0, kstep, T;       // sub-kernel taps k = k0 + kstep*t, t in [0, T)
  int64_t base, ustride, tstride;  // input i = base + ustride*u + tstride*t
};

// The input row i = base + ustride*u + tstride*t read by output u, tap t.
// Wherever it is read, i is a real index, yet ustride*u alone can pass 2^63
// at huge strides: unsigned arithmetic wraps back to the exact value.
CKS_HD inline int64_t input_index(const Phase& p, int64_t u, int64_t t) {
  return static_cast<int64_t>(static_cast<uint64_t>(p.base) +
                              static_cast<uint64_t>(p.ustride) * static_cast<uint64_t>(u) +
                              static_cast<uint64_t>(p.tstride) * static_cast<uint64_t>(t));
}

// The trimmed tap range [t_lo, t_hi) of output u of a phase: exactly the taps
// that read a real input element. Empty ranges come back as [0, 0).
struct TapRange {
  int64_t t_lo, t_hi;
};
CKS_HD inline __int128 floor_div128(__int128 x, __int128 y) {
  const __int128 q = x / y;
  return (x % y != 0 && ((x < 0) != (y < 0))) ? q - 1 : q;
}
// The tap bounds of output u clamped to [0, T], before an empty range is
// mapped to [0, 0). Both fall as u grows (the input index x does), so the
// outputs with equal bounds are consecutive: segments() finds each run's end
// by bisection.
CKS_HD inline TapRange tap_bounds(const Phase& p, int64_t in_size, int64_t u) {
  // In 128 bits: with huge strides and paddings, ustride * u alone passes
  // 2^63 even where base + ustride * u does not.
  const __int128 x = __int128(p.base) + __int128(p.ustride) * u;
  const __int128 lo = -floor_div128(x, p.tstride);  // ceil((0 - x) / tstride)
  const __int128 hi = floor_div128(__int128(in_size) - 1 - x, p.tstride) + 1;
  const __int128 t_lo = lo < 0 ? 0 : lo > p.T ? p.T : lo, t_hi = hi < 0 ? 0 : hi > p.T ? p.T : hi;
  return {static_cast<int64_t>(t_lo), static_cast<int64_t>(t_hi)};
}
CKS_HD inline TapRange trimmed_range(const Phase& p, int64_t in_size, int64_t u) {
  const TapRange b = tap_bounds(p, in_size, u);
  if (b.t_hi <= b.t_lo) return {0, 0};
  return b;
}

// The phases of one dimension: K split (P phases by lhs dilation) times
// S split (Q polyphase sub-images by rhs dilation). Phases with no output are
// dropped; phases with no tap are kept (their outputs are zeros).
//
// With split_dilation = false the S split is left to the reader: each K phase
// reads its input with stride tstride = d1 directly (that *is* reading the
// polyphase sub-images, without cutting the outputs into Q classes). A
// gathering kernel (the CPU one) then runs Q times fewer, Q times larger
// GEMMs, which matters when the dilation is large and the map small.
inline std::vector<Phase> phases(const Dim& dm, bool split_dilation = true) {
  const int64_t s = dm.stride, a = dm.lhs_dil, d = dm.rhs_dil, lo = dm.pad_lo;
  const int64_t g_as = gcd(a, s), P = a / g_as, s1 = s / g_as;
  const int64_t g_ad = gcd(a, d), kstep = a / g_ad, d1 = d / g_ad;
  const int64_t h = gcd(s1, d1), Q = split_dilation ? d1 / h : 1;
  std::vector<Phase> out;
  // Phase phi's outputs start at o0 >= phi and its taps at k0: bounding both
  // loops by the sizes keeps huge dilations O(out_size * k_size), not O(a).
  for (int64_t phi = 0; phi < min64(P, dm.out_size); ++phi) {
    // k0: the first tap whose dilated position lands on a real input row.
    int64_t k0 = -1;
    for (int64_t k = 0; k < min64(kstep, dm.k_size); ++k) {
      if (pos_mod(phi * s + k * d - lo, a) == 0) {
        k0 = k;
        break;
      }
    }
    const int64_t T = (k0 < 0 || k0 >= dm.k_size) ? 0 : ceil_div(dm.k_size - k0, kstep);
    const int64_t off = T > 0 ? (phi * s + k0 * d - lo) / a : 0;  // exact division
    for (int64_t q = 0; q < Q && q < ceil_div(dm.out_size - phi, P); ++q) {
      Phase p;
      p.o0 = phi + P * q;
      p.L = P * Q;
      p.U = ceil_div(dm.out_size - p.o0, p.L);
      p.k0 = T > 0 ? k0 : 0;
      p.kstep = kstep;
      p.T = T;
      p.base = off + q * s1;
      p.ustride = Q * s1;  // == d1 * s2 with the S split (s2 = s1 / h)
      p.tstride = d1;
      out.push_back(p);
    }
  }
  return out;
}

// A run of consecutive outputs of one phase sharing one trimmed tap range.
struct Segment {
  int64_t phase;     // index into phases()
  int64_t u0, count; // outputs u in [u0, u0 + count)
  int64_t t_lo, t_hi;
};

// All segments of a dimension, phase by phase. Every output belongs to
// exactly one segment, so the sub-problems write disjoint outputs.
inline std::vector<Segment> segments(const Dim& dm, const std::vector<Phase>& ph) {
  std::vector<Segment> out;
  for (int64_t pi = 0; pi < static_cast<int64_t>(ph.size()); ++pi) {
    const Phase& p = ph[pi];
    for (int64_t u = 0; u < p.U;) {
      // The run of outputs with u's bounds ends before `end` (bisection: a
      // 1-D layer of 4096 outputs took 57 us per plan output by output).
      const TapRange b = tap_bounds(p, dm.in_size, u);
      int64_t last = u, end = p.U;
      while (end - last > 1) {
        const int64_t mid = last + (end - last) / 2;
        const TapRange m = tap_bounds(p, dm.in_size, mid);
        if (m.t_lo == b.t_lo && m.t_hi == b.t_hi) last = mid;
        else end = mid;
      }
      const TapRange r = trimmed_range(p, dm.in_size, u);
      const int64_t count = last + 1 - u;
      // Runs of different empty bounds ([3, 3) then [2, 2): an input shorter
      // than the tap stride) make one empty segment, as output by output.
      if (!out.empty() && out.back().phase == pi && out.back().t_lo == r.t_lo &&
          out.back().t_hi == r.t_hi && out.back().u0 + out.back().count == u) {
        out.back().count += count;
      } else {
        out.push_back({pi, u, count, r.t_lo, r.t_hi});
      }
      u += count;
    }
  }
  return out;
}

}  // namespace cks
