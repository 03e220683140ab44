// Storage types and their conversion to the accumulation type. 16-bit
// floats are stored as raw bits and accumulated in float32.
#pragma once

#include <cstdint>
#include <cstring>

#include "cks/geometry.h"

namespace cks {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

CKS_HD inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
CKS_HD inline uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

CKS_HD inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
CKS_HD inline uint16_t float_to_f16(float f) {  // round to nearest even
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;  // overflows to infinity
  if (u < 0x38800000u) {                        // subnormal or zero in f16
    if (u < 0x33000000u) return sign;           // below half the smallest subnormal
    const uint32_t man = (u & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(u >> 23);  // 14..24
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = u - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

template <typename Acc, typename T>
CKS_HD inline Acc load(T x) {
  return static_cast<Acc>(x);
}
template <>
CKS_HD inline float load<float, bf16>(bf16 x) {
  return bf16_to_float(x.bits);
}
template <>
CKS_HD inline float load<float, f16>(f16 x) {
  return f16_to_float(x.bits);
}

template <typename T, typename Acc>
CKS_HD inline T store(Acc x) {
  return static_cast<T>(x);
}
template <>
CKS_HD inline bf16 store<bf16, float>(float x) {
  return bf16{float_to_bf16(x)};
}
template <>
CKS_HD inline f16 store<f16, float>(float x) {
  return f16{float_to_f16(x)};
}

// The dtype combinations every kernel supports, as (input, accumulation,
// output): equal input and output, or 16-bit input with a float32 output.
// Codes match cks_jax/_src/cuda.py.
enum DTypeCode : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3, kUnsupported = -1 };

// Calls Fn<Tin, Acc, Tout>::run(args...) for the combination; false if the
// combination is unsupported.
template <template <typename, typename, typename> class Fn, typename... Args>
bool dispatch_dtypes(int in, int out, Args&&... args) {
  if (in == kF32 && out == kF32) return Fn<float, float, float>::run(args...), true;
  if (in == kF64 && out == kF64) return Fn<double, double, double>::run(args...), true;
  if (in == kBF16 && out == kBF16) return Fn<bf16, float, bf16>::run(args...), true;
  if (in == kF16 && out == kF16) return Fn<f16, float, f16>::run(args...), true;
  if (in == kBF16 && out == kF32) return Fn<bf16, float, float>::run(args...), true;
  if (in == kF16 && out == kF32) return Fn<f16, float, float>::run(args...), true;
  return false;
}

}  // namespace cks
