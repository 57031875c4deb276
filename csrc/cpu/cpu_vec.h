// A small fp32 vector API shared by the CPU kernels that are written once and compiled per instruction set
// (fused_moe.cpp, fused_ops.cpp): kW lanes of fp32 with loads / stores converting from / to fp32, bf16 and fp16
// (round to nearest even, NaN stays NaN, bit-exact with torch's casts), arithmetic, reductions, exp, and the
// int8 / int4 code loads of the weight-only format. Three structs: GenericVec (one float, portable), Avx2Vec (8
// lanes) and Avx512Vec (16 lanes); the SIMD ones are compiled under their own `#pragma GCC target`, so a kernel
// includes its implementation once per struct, inside the same target region (see fused_moe.cpp).
#pragma once

#include <cmath>
#include <cstring>

#include "fastinfer/cpu_common.h"

namespace fastinfer {
namespace cpu {

// The body of a SIMD struct's exp(x): Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial; about
// 1 ulp over the clamped range [-87.3, 88.7], 0 below, inf above). A macro, not a template, so that it is compiled
// under the struct's own target options (a template defined outside them could not inline its intrinsics).
#define FI_EXP_POLY_BODY(x)                                                          \
  const V hi_ = set1(88.7228f), lo_ = set1(-87.3365f);                               \
  const V big_ = gt(x, hi_), small_ = lt(x, lo_);                                    \
  x = min(max(x, lo_), hi_);                                                         \
  const V n_ = floor(fma(x, set1(1.44269504088896341f), set1(0.5f)));                \
  V r_ = fma(n_, set1(-0.693359375f), x);                                            \
  r_ = fma(n_, set1(2.12194440e-4f), r_);                                            \
  V p_ = set1(1.9875691500e-4f);                                                     \
  p_ = fma(p_, r_, set1(1.3981999507e-3f));                                          \
  p_ = fma(p_, r_, set1(8.3334519073e-3f));                                          \
  p_ = fma(p_, r_, set1(4.1665795894e-2f));                                          \
  p_ = fma(p_, r_, set1(1.6666665459e-1f));                                          \
  p_ = fma(p_, r_, set1(5.0000001201e-1f));                                          \
  p_ = fma(mul(p_, r_), r_, add(r_, set1(1.f)));                                     \
  const V y_ = blend(mul(p_, pow2n(n_)), set1(INFINITY), big_);                      \
  return blend(y_, zero(), small_);

struct GenericVec {
  static constexpr int kW = 1;
  using V = float;
  static FI_INLINE V zero() { return 0.f; }
  static FI_INLINE V set1(float a) { return a; }
  static FI_INLINE V load(const float* p) { return *p; }
  template <class T>
  static FI_INLINE V load_cvt(const T* p) { return to_float(*p); }
  template <class T>
  static FI_INLINE void store_cvt(T* p, V a) { from_float(a, p); }
  static FI_INLINE V add(V a, V b) { return a + b; }
  static FI_INLINE V sub(V a, V b) { return a - b; }
  static FI_INLINE V mul(V a, V b) { return a * b; }
  static FI_INLINE V div(V a, V b) { return a / b; }
  static FI_INLINE V fma(V a, V b, V c) { return a * b + c; }
  static FI_INLINE float hsum(V a) { return a; }
  static FI_INLINE V max(V a, V b) { return a > b ? a : b; }
  static FI_INLINE bool any_nan(V a) { return std::isnan(a); }
  static FI_INLINE int first_eq(V a, V b) { return a == b ? 0 : -1; }
  static FI_INLINE float hmax(V a) { return a; }
  static FI_INLINE V exp(V a) { return std::exp(a); }
  static FI_INLINE V load_q8(const uint8_t* q, int64_t k) { return float(int8_t(q[k])); }
  static FI_INLINE V load_q4(const uint8_t* q, int64_t k) { return float((q[k >> 1] >> ((k & 1) * 4)) & 15); }
};

}  // namespace cpu
}  // namespace fastinfer

#if FI_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fastinfer {
namespace cpu {
struct Avx2Vec {
  static constexpr int kW = 8;
  using V = __m256;
  static FI_INLINE V zero() { return _mm256_setzero_ps(); }
  static FI_INLINE V set1(float a) { return _mm256_set1_ps(a); }
  static FI_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static FI_INLINE V load_cvt(const float* p) { return _mm256_loadu_ps(p); }
  static FI_INLINE V load_cvt(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static FI_INLINE V load_cvt(const fp16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static FI_INLINE void store_cvt(float* p, V a) { _mm256_storeu_ps(p, a); }
  static FI_INLINE void store_cvt(bf16_t* p, V a) {  // round to nearest even, NaN stays NaN
    const __m256i u = _mm256_castps_si256(a);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static FI_INLINE void store_cvt(fp16_t* p, V a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static FI_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static FI_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static FI_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static FI_INLINE V div(V a, V b) { return _mm256_div_ps(a, b); }
  static FI_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static FI_INLINE V min(V a, V b) { return _mm256_min_ps(a, b); }
  static FI_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  static FI_INLINE V gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static FI_INLINE V lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static FI_INLINE V blend(V a, V b, V mask) { return _mm256_blendv_ps(a, b, mask); }
  static FI_INLINE V floor(V a) { return _mm256_floor_ps(a); }
  static FI_INLINE V pow2n(V n) {  // 2^n for integral n in [-127, 128]
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static FI_INLINE V exp(V x) { FI_EXP_POLY_BODY(x) }
  static FI_INLINE bool any_nan(V a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0; }
  // Lowest lane where a == b, or -1.
  static FI_INLINE int first_eq(V a, V b) {
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ));
    return m ? __builtin_ctz(unsigned(m)) : -1;
  }
  static FI_INLINE float hmax(V v) {
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    float m = lanes[0];
    for (int i = 1; i < 8; ++i) m = lanes[i] > m ? lanes[i] : m;
    return m;
  }
  static FI_INLINE float hsum(V v) {
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
  }
  // 8 int8 codes from q + k.
  static FI_INLINE V load_q8(const uint8_t* q, int64_t k) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k))));
  }
  // 8 int4 codes k .. k + 7 (k even) from the 4 bytes at q + k / 2: low nibble first.
  static FI_INLINE V load_q4(const uint8_t* q, int64_t k) {
    int32_t b4;
    std::memcpy(&b4, q + (k >> 1), 4);
    const __m128i b = _mm_cvtsi32_si128(b4), m = _mm_set1_epi8(0x0f);
    const __m128i lh = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lh));
  }
};
}  // namespace cpu
}  // namespace fastinfer
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace fastinfer {
namespace cpu {
struct Avx512Vec {
  static constexpr int kW = 16;
  using V = __m512;
  static FI_INLINE V zero() { return _mm512_setzero_ps(); }
  static FI_INLINE V set1(float a) { return _mm512_set1_ps(a); }
  static FI_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static FI_INLINE V load_cvt(const float* p) { return _mm512_loadu_ps(p); }
  static FI_INLINE V load_cvt(const bf16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static FI_INLINE V load_cvt(const fp16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static FI_INLINE void store_cvt(float* p, V a) { _mm512_storeu_ps(p, a); }
  static FI_INLINE void store_cvt(bf16_t* p, V a) {  // round to nearest even, NaN stays NaN
    const __m512i u = _mm512_castps_si512(a);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static FI_INLINE void store_cvt(fp16_t* p, V a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static FI_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  static FI_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static FI_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static FI_INLINE V div(V a, V b) { return _mm512_div_ps(a, b); }
  static FI_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static FI_INLINE V min(V a, V b) { return _mm512_min_ps(a, b); }
  static FI_INLINE V max(V a, V b) { return _mm512_max_ps(a, b); }
  // Masks as vectors (all-ones lanes), so exp_poly is written once for both SIMD widths.
  static FI_INLINE V gt(V a, V b) {
    return _mm512_castsi512_ps(_mm512_movm_epi32(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ)));
  }
  static FI_INLINE V lt(V a, V b) {
    return _mm512_castsi512_ps(_mm512_movm_epi32(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)));
  }
  static FI_INLINE V blend(V a, V b, V mask) {
    return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(mask)), a, b);
  }
  static FI_INLINE V floor(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static FI_INLINE V pow2n(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static FI_INLINE V exp(V x) { FI_EXP_POLY_BODY(x) }
  static FI_INLINE float hsum(V a) { return _mm512_reduce_add_ps(a); }
  static FI_INLINE bool any_nan(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0; }
  static FI_INLINE int first_eq(V a, V b) {
    const __mmask16 m = _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ);
    return m ? __builtin_ctz(unsigned(m)) : -1;
  }
  static FI_INLINE float hmax(V a) { return _mm512_reduce_max_ps(a); }
  // 16 int8 codes from q + k.
  static FI_INLINE V load_q8(const uint8_t* q, int64_t k) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
  }
  // 16 int4 codes k .. k + 15 (k even) from the 8 bytes at q + k / 2: low nibble first.
  static FI_INLINE V load_q4(const uint8_t* q, int64_t k) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (k >> 1))), m = _mm_set1_epi8(0x0f);
    const __m128i lh = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lh));
  }
};
}  // namespace cpu
}  // namespace fastinfer
#pragma GCC pop_options
#endif  // FI_X86
