// Portability macros shared by the CPU kernel sources (csrc/cpu/*.cpp); include first.
#pragma once

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
