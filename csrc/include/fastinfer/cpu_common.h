// Portability macros shared by the CPU kernel sources (csrc/cpu/*.cpp); include first.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>

#include "fastinfer/cpu_attention.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define FI_X86 1
#include <immintrin.h>
#else
#define FI_X86 0
#endif

#define FI_INLINE inline __attribute__((always_inline))

// GCC drops __builtin_prefetch inside loops with a run-time trip count (seen with GCC 12 -O2/-O3), so
// x86 uses the instruction directly.
#if FI_X86
#define FI_PREFETCH(p) asm volatile("prefetcht0 %0" : : "m"(*reinterpret_cast<const char*>(p)))
#else
#define FI_PREFETCH(p) __builtin_prefetch(p)
#endif

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip this on _mm512_undefined_ps() inside the intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Scalar conversions, bit-exact with torch's casts (round to nearest even; NaN stays NaN).
FI_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FI_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
FI_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
FI_INLINE float fp16_to_float(uint16_t h16) {
  const uint32_t h = h16, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {  // zero / subnormal: man * 2^-24
    const float f = float(man) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
FI_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
FI_INLINE uint16_t float_to_fp16(float f) {
  const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    h = 0x7e00u;  // nan
  } else if (a >= 0x477ff000u) {  // rounds to >= 65520: inf
    h = 0x7c00u;
  } else if (a < 0x38800000u) {  // below the smallest normal half 2^-14: subnormal or zero
    // a + 0.5 (as float) puts the half subnormal mantissa in the low bits with round-to-nearest-even.
    h = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  } else {
    const uint32_t mant_odd = (a >> 13) & 1u;
    h = (a + 0xc8000fffu + mant_odd) >> 13;  // rebias exponent (-112 << 23) and round
  }
  return uint16_t(sign | h);
}

namespace fastinfer {
namespace cpu {

// Element types of the kernels' templates (bit patterns of bf16 / fp16) and their scalar conversions.
struct bf16_t {
  uint16_t x;
};
struct fp16_t {
  uint16_t x;
};

FI_INLINE float to_float(float v) { return v; }
FI_INLINE float to_float(bf16_t v) { return bf16_to_float(v.x); }
FI_INLINE float to_float(fp16_t v) { return fp16_to_float(v.x); }
FI_INLINE void from_float(float f, float* dst) { *dst = f; }
FI_INLINE void from_float(float f, bf16_t* dst) { dst->x = float_to_bf16(f); }
FI_INLINE void from_float(float f, fp16_t* dst) { dst->x = float_to_fp16(f); }

// Element i of a buffer of x's dtype, as fp32 / stored from fp32 (round to nearest even).
FI_INLINE float load_elem(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}
FI_INLINE void store_elem(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = float_to_fp16(v); break;
  }
}

// Threads for a kernel call: n, or the OpenMP default when n <= 0.
FI_INLINE int resolve_threads(int n) {
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  (void)n;
  return 1;
#endif
}

// fn(begin, end) over [0, n) on nt OpenMP threads (nt <= 1: once, on the caller), each thread one contiguous range
// whose ends are multiples of `align` (the last ends at n); empty ranges are skipped.
template <class Fn>
inline void parallel_ranges(int64_t n, int64_t align, int nt, Fn&& fn) {
  if (nt <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int t = 0, T = 1;
#endif
    const int64_t units = (n + align - 1) / align;
    const int64_t b = std::min(n, units * t / T * align), e = std::min(n, units * (t + 1) / T * align);
    if (e > b) fn(b, e);
  }
}

}  // namespace cpu
}  // namespace fastinfer
