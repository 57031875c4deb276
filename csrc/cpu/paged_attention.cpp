// CPU paged attention and KV-cache store (raw pointers, no torch). See fastinfer/cpu_attention.h.
//
// Build: baseline compiler flags (portable); the AVX2 and AVX-512 variants are compiled under
// `#pragma GCC target` and picked at run time with __builtin_cpu_supports, so the same binary runs on
// any x86-64 (and other architectures get the generic variant only). FASTINFER_CPU_ISA=generic|avx2|avx512
// forces a variant (and =avx512_bf16 the AVX-512 one with VDPBF16PS bf16 scores); tests use it to cover every
// path on one machine.
#include "fastinfer/cpu_attention.h"
#include "fastinfer/cpu_common.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastinfer {
namespace cpu {
namespace {

constexpr int kChunk = 16;              // key positions per inner step (one 16-lane vector of scores)
#ifndef FI_PREFETCH_CHUNKS
#define FI_PREFETCH_CHUNKS 1  // measured best on Zen 4 (2 and 3 ahead: 10-15% slower decode)
#endif
constexpr int kPrefetchChunks = FI_PREFETCH_CHUNKS;  // how far ahead (in chunks) the rows are prefetched
#ifndef FI_TARGET_QUERIES
#define FI_TARGET_QUERIES 64
#endif
constexpr int64_t kTargetQueries = FI_TARGET_QUERIES;  // queries (rows x heads) per prefill work item
constexpr int64_t kAllHeadsQueries = 64;  // items with at most this many queries take every KV head
constexpr int64_t kMinSplit = 256;      // never split a context into parts shorter than this
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kRescaleLog2 = 8.f;  // conditional softmax rescaling: probabilities stay below 2^8

// One unit of parallel work: sequence `seq`, KV heads kvh .. kvh + nkvh - 1, query rows row0 ..
// row0 + nrows - 1 of that sequence, key positions [lo, hi). `partial` >= 0: offset (floats) of its slab in
// the partials buffer when the context was split into several parts; -1: it writes the output directly.
struct Item {
  int32_t seq, kvh, nkvh, row0, nrows;
  int64_t lo, hi;
  int64_t partial;
  double cost;
};

// Per-thread scratch (fp32), all 64-byte aligned: q, acc [M][D]; kt [D][16]; vf [16][D]; pr, sumv [M][16];
// small per-query arrays.
struct Scratch {
  float *qf, *acc, *kt, *vf, *pr, *sumv, *mx, *sum, *alpha, *qsc;
  int16_t* qi;  // int8 KV with 16-bit dots: q codes [M][D] and their scales qsc [M]
  int64_t *lo, *hi;
  uint32_t* mask;
};

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

Scratch thread_scratch(int64_t D, int64_t M) {
  thread_local std::unique_ptr<float, AlignedFree> buf;
  thread_local size_t cap = 0;
  auto round16 = [](int64_t n) { return size_t((n + 15) / 16 * 16); };  // 64 bytes
  const size_t need = 2 * round16(M * D) + 2 * round16(D * kChunk) + 2 * round16(M * kChunk) +
                      4 * round16(M) + round16((M * D + 1) / 2) + 2 * round16(2 * M) + round16(M);
  Scratch s{};
  if (need > cap) {
    buf.reset(static_cast<float*>(std::aligned_alloc(64, need * sizeof(float))));
    cap = buf ? need : 0;
    if (!buf) return s;  // s.qf == nullptr: out of memory
  }
  float* p = buf.get();
  s.qf = p, p += round16(M * D);
  s.acc = p, p += round16(M * D);
  s.kt = p, p += round16(D * kChunk);
  s.vf = p, p += round16(D * kChunk);
  s.pr = p, p += round16(M * kChunk);
  s.sumv = p, p += round16(M * kChunk);
  s.mx = p, p += round16(M);
  s.sum = p, p += round16(M);
  s.alpha = p, p += round16(M);
  s.qsc = p, p += round16(M);
  s.qi = reinterpret_cast<int16_t*>(p), p += round16((M * D + 1) / 2);
  s.lo = reinterpret_cast<int64_t*>(p), p += round16(2 * M);
  s.hi = reinterpret_cast<int64_t*>(p), p += round16(2 * M);
  s.mask = reinterpret_cast<uint32_t*>(p);
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Generic vector API: 16 floats in an array; loops the compiler vectorises for whatever target the
// including function is compiled for (baseline SSE2, or AVX2 under the target pragma below).
struct GenericOps {
  struct V {
    float v[16];
  };
  static FI_INLINE V zero() {
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = 0.f;
    return r;
  }
  static FI_INLINE V set1(float x) {
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = x;
    return r;
  }
  static FI_INLINE V load(const float* p) {
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = p[i];
    return r;
  }
  template <class T>
  static FI_INLINE V load_cvt(const T* p) {
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = to_float(p[i]);
    return r;
  }
  static FI_INLINE V load_cvt(const bf16_t* p) {
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = bits_to_float(uint32_t(p[i].x) << 16);
    return r;
  }
  static FI_INLINE V load_cvt(const int8_t* p) {  // int8 KV codes
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = float(p[i]);
    return r;
  }
  static FI_INLINE void store(float* p, const V& a) {
    for (int i = 0; i < 16; ++i) p[i] = a.v[i];
  }
  template <class T>
  static FI_INLINE void store_cvt(T* p, const V& a) {
    for (int i = 0; i < 16; ++i) from_float(a.v[i], p + i);
  }
  static FI_INLINE V add(const V& a, const V& b) {
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static FI_INLINE V sub(const V& a, const V& b) {
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] - b.v[i];
    return r;
  }
  static FI_INLINE V mul(const V& a, const V& b) {
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  static FI_INLINE V fma(const V& a, const V& b, const V& c) {  // a * b + c
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static FI_INLINE float hmax(const V& a) {
    float m = a.v[0];
    for (int i = 1; i < 16; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
  }
  static FI_INLINE float hsum(const V& a) {
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += a.v[i];
    return s;
  }
  static FI_INLINE bool any_gt(const V& a, float b) {
    bool r = false;
    for (int i = 0; i < 16; ++i) r |= a.v[i] > b;
    return r;
  }
  static FI_INLINE V select(uint32_t mask, const V& a, const V& b) {
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = (mask >> i) & 1u ? a.v[i] : b.v[i];
    return r;
  }
  // 2^x for x <= kRescaleLog2 in the lanes of `mask`, 0 elsewhere (degree-7 polynomial on [-0.5, 0.5], ~1 ulp).
  static FI_INLINE V exp2_maskz(uint32_t mask, const V& x) {
    V r;
    for (int i = 0; i < 16; ++i) {
      const float xi = x.v[i] > -127.f ? x.v[i] : -127.f;
      const float n = std::floor(xi + 0.5f);
      const float f = xi - n;
      float y = 1.525273380405984e-05f;
      y = y * f + 1.5403530393381606e-04f;
      y = y * f + 1.3333558146428443e-03f;
      y = y * f + 9.618129107628477e-03f;
      y = y * f + 5.550410866482158e-02f;
      y = y * f + 2.402265069591007e-01f;
      y = y * f + 6.931471805599453e-01f;
      y = y * f + 1.0f;
      const float scale = bits_to_float(uint32_t(int32_t(n) + 127) << 23);  // 2^n; n = -127 gives 0
      r.v[i] = (mask >> i) & 1u ? y * scale : 0.f;
    }
    return r;
  }
  // c * tanh(x / c) (c > 0) as sign(x) c (1 - e) / (1 + e), e = exp(-2 |x| / c): no overflow for any x.
  static FI_INLINE V softcap(const V& x, float c) {
    V a;
    for (int i = 0; i < 16; ++i) a.v[i] = std::fabs(x.v[i]) * (-2.f * kLog2e / c);
    const V e = exp2_maskz(0xffffu, a);
    V r;
    for (int i = 0; i < 16; ++i) r.v[i] = std::copysign(c * (1.f - e.v[i]) / (1.f + e.v[i]), x.v[i]);
    return r;
  }
  static FI_INLINE void transpose16(V* r) {
    for (int i = 0; i < 16; ++i)
      for (int j = i + 1; j < 16; ++j) std::swap(r[i].v[j], r[j].v[i]);
  }
  // int8 KV: 16-bit integer dot products (QK and PV); only the AVX-512 VNNI variant has them.
  template <class T, class C>
  static FI_INLINE bool i16_dots(const T*, const C*, int64_t) {
    return false;
  }
  static float quantize_i16(const float*, int64_t, int16_t*) { return 0.f; }
  static void qk_rows_i16(const int16_t*, const float*, int, const int8_t* const*, int64_t, int64_t, V*) {}
  static void pv_rows_i16(float*, int64_t, const float*, const float*, int, const int8_t* const*, int64_t, int) {}
  // Scores of one query against n <= 16 cache rows; this API always uses the transposed-K path instead.
  template <class T>
  static FI_INLINE bool rows_qk(const T*, int64_t, int64_t) {
    return false;
  }
  template <class T, class C>
  static FI_INLINE void qk_rows(const T* const*, const float* qf, int nq, const C* const* rows, int64_t hoff,
                                int64_t D, float, V* s) {
    for (int j = 0; j < nq; ++j) {
      s[j] = zero();
      for (int t = 0; t < 16; ++t)
        for (int64_t d = 0; d < D; ++d) s[j].v[t] += qf[j * D + d] * to_float(rows[t][hoff + d]);
    }
  }
};

namespace generic {
using Ops = GenericOps;
#include "paged_attention_impl.h"
}  // namespace generic

#if FI_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
using Ops = GenericOps;
#include "paged_attention_impl.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
bool g_dpbf16 = false;  // the avx512_bf16 variant: bf16 scores with VDPBF16PS (set per call from the ISA)
// Defined below under an extra target; called through a pointer (a plain declaration with other target
// options would make GCC treat the definition as a separate function version).
using QkDpFn = void (*)(const bf16_t* const*, int, const bf16_t* const*, int64_t, int64_t, float, __m512*);
QkDpFn g_qk_rows_dpbf16 = nullptr;
// The int8-KV 16-bit dot products (VPDPWSSD, AVX512-VNNI), defined below under that target; g_i16: use them
// (set per call: the avx512_bf16 variant on a CPU with VNNI).
bool g_i16 = false;
using QkI16Fn = void (*)(const int16_t*, const float*, int, const int8_t* const*, int64_t, int64_t, __m512*);
using PvI16Fn = void (*)(float*, int64_t, const float*, const float*, int, const int8_t* const*, int64_t, int);
QkI16Fn g_qk_rows_i16 = nullptr;
PvI16Fn g_pv_rows_i16 = nullptr;

// The loads / stores / conversions of cpu_vec.h plus what the attention kernel needs.
struct Avx512Ops : Avx512Vec {
  using Avx512Vec::load_cvt;
  static FI_INLINE V load_cvt(const int8_t* p) {  // 16 int8 KV codes, widened to fp32
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static FI_INLINE void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static FI_INLINE float hmax(V a) { return _mm512_reduce_max_ps(a); }
  static FI_INLINE V select(uint32_t mask, V a, V b) { return _mm512_mask_blend_ps(__mmask16(mask), b, a); }
  static FI_INLINE bool any_gt(V a, float b) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(b), _CMP_GT_OQ) != 0; }
  static FI_INLINE V exp2_maskz(uint32_t mask, V x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
    const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(x, n);
    V y = _mm512_set1_ps(1.525273380405984e-05f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.5403530393381606e-04f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-03f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.618129107628477e-03f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550410866482158e-02f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.402265069591007e-01f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931471805599453e-01f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(__mmask16(mask), _mm512_scalef_ps(y, n));
  }
  static FI_INLINE V softcap(V x, float c) {  // as GenericOps::softcap
    const V e = exp2_maskz(0xffffu, _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-2.f * kLog2e / c)));
    const V one = _mm512_set1_ps(1.f);
    const V t = _mm512_mul_ps(_mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e)), _mm512_set1_ps(c));
    return _mm512_or_ps(t, _mm512_and_ps(x, _mm512_castsi512_ps(_mm512_set1_epi32(int(0x80000000u)))));
  }
  static FI_INLINE V lo_pd(V a, V b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
  static FI_INLINE V hi_pd(V a, V b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
  static FI_INLINE void transpose16(V* r) {
    V t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // r[4i + k], 128-bit lane L: rows 4i..4i+3 of column 4L + k
      r[4 * i] = lo_pd(t[4 * i], t[4 * i + 2]);
      r[4 * i + 1] = hi_pd(t[4 * i], t[4 * i + 2]);
      r[4 * i + 2] = lo_pd(t[4 * i + 1], t[4 * i + 3]);
      r[4 * i + 3] = hi_pd(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int k = 0; k < 4; ++k) {
      t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
      t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
      t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
      t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
    }
    for (int k = 0; k < 4; ++k) {
      r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
      r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd);
      r[4 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88);
      r[12 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xdd);
    }
  }
  // Lane t of the result = horizontal sum of a[t] (45 shuffles/adds for 16 sums). The fold order leaves
  // input slot s in lane kPerm[s] (an involution), so slots are read through kPerm to land in order.
  static FI_INLINE V reduce16(const V* a) {
    constexpr int kPerm[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
    V b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i) {  // 512 -> 256 bits: [slot i | slot i + 8]
      const V x = a[kPerm[i]], y = a[kPerm[i + 8]];
      b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xee));
    }
    for (int i = 0; i < 4; ++i)  // 256 -> 128 bits: lanes hold slots i, i + 8, i + 4, i + 12
      c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], 0x88), _mm512_shuffle_f32x4(b[i], b[i + 4], 0xdd));
    for (int i = 0; i < 2; ++i) d[i] = _mm512_add_ps(lo_pd(c[i], c[i + 2]), hi_pd(c[i], c[i + 2]));
    return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xdd));
  }
  // Scores of one query against n <= 16 cache rows (row t at rows[t] + hoff) without a transposed copy:
  // cheaper than the transposed-K path for few queries per KV head (always, for bf16 with VDPBF16PS).
#ifndef FI_ROWS_MAX_F32
#define FI_ROWS_MAX_F32 8
#endif
#ifndef FI_ROWS_MAX_BF16
#define FI_ROWS_MAX_BF16 4
#endif
  static FI_INLINE bool rows_qk(const float*, int64_t mh, int64_t) { return mh <= FI_ROWS_MAX_F32; }
  static FI_INLINE bool rows_qk(const fp16_t*, int64_t mh, int64_t) { return mh <= 4; }
  static FI_INLINE bool rows_qk(const int8_t*, int64_t mh, int64_t) { return mh <= FI_ROWS_MAX_F32; }
  static FI_INLINE bool rows_qk(const bf16_t*, int64_t mh, int64_t D) {
    return g_dpbf16 && D % 32 == 0 && mh <= FI_ROWS_MAX_BF16;
  }
  // rows[t] must be readable for all 16 t (the caller repeats a real row past n; those lanes are masked).
  // Scores of NQ queries (fp32, pre-scaled) against the 16 rows: R rows at a time, each row converted once and
  // used by every query (NQ x R independent accumulators); per (query, row) the sum runs over d in the same
  // order for every R, so the scores do not depend on how many queries share the pass.
  template <int NQ, class T>
  static FI_INLINE void qk_rows_nq(const float* qf, const T* const* rows, int64_t hoff, int64_t D, V* s) {
    constexpr int R = NQ == 1 ? 16 : NQ <= 3 ? 8 : 4;  // NQ <= 4
    V a[NQ][16];
    for (int t0 = 0; t0 < 16; t0 += R) {
      V r[NQ][R];
      for (int j = 0; j < NQ; ++j)
        for (int t = 0; t < R; ++t) r[j][t] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16)
        for (int t = 0; t < R; ++t) {
          const V x = load_cvt(rows[t0 + t] + hoff + d);
          for (int j = 0; j < NQ; ++j) r[j][t] = _mm512_fmadd_ps(load(qf + j * D + d), x, r[j][t]);
        }
      for (int j = 0; j < NQ; ++j)
        for (int t = 0; t < R; ++t) a[j][t0 + t] = r[j][t];
    }
    for (int j = 0; j < NQ; ++j) s[j] = reduce16(a[j]);
  }
  // Scores of the nq queries (raw q[j], or qf + j D: fp32 pre-scaled) against the 16 rows, into s[j].
  template <class T, class C>
  static FI_INLINE void qk_rows(const T* const*, const float* qf, int nq, const C* const* rows, int64_t hoff,
                                int64_t D, float, V* s) {
    for (int j0 = 0; j0 < nq; j0 += 4) {  // at most FI_ROWS_MAX_F32 = 8 queries per KV head come here
      const float* qj = qf + j0 * D;
      switch (nq - j0) {
        case 1: qk_rows_nq<1>(qj, rows, hoff, D, s + j0); break;
        case 2: qk_rows_nq<2>(qj, rows, hoff, D, s + j0); break;
        case 3: qk_rows_nq<3>(qj, rows, hoff, D, s + j0); break;
        default: qk_rows_nq<4>(qj, rows, hoff, D, s + j0); break;
      }
    }
  }
  static FI_INLINE void qk_rows(const bf16_t* const* q, const float*, int nq, const bf16_t* const* rows, int64_t hoff,
                                int64_t D, float qscale, V* s) {
    g_qk_rows_dpbf16(q, nq, rows, hoff, D, qscale, s);
  }
  // int8 KV under a bf16 / fp16 model: q as 16-bit codes (a scale per query), keys and values widened to 16
  // bits, probabilities (times the value scales) as 16-bit codes per chunk; exact integer sums (VPDPWSSD).
  // The two roundings (2^-16 of q's and of the chunk's largest weight) are far below the cache's own int8
  // step and the bf16 / fp16 output; an fp32 model keeps the exact fp32 path.
  template <class T, class C>
  static FI_INLINE bool i16_dots(const T*, const C*, int64_t) {
    return false;
  }
  template <class T>
  static FI_INLINE bool i16_dots(const T*, const int8_t*, int64_t D) {
    return !std::is_same<T, float>::value && g_i16 && D % 32 == 0;
  }
  // x[0 : D] as 16-bit codes of its largest |element| (D % 16 == 0); returns the scale (code 32767 = max |x|).
  static FI_INLINE float quantize_i16(const float* x, int64_t D, int16_t* out) {
    V m = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + d)));
    const float amax = _mm512_reduce_max_ps(m);
    const V inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d),
                          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + d), inv))));
    return amax / 32767.f;
  }
  static FI_INLINE void qk_rows_i16(const int16_t* qi, const float* qsc, int nq, const int8_t* const* rows,
                                    int64_t hoff, int64_t D, V* s) {
    g_qk_rows_i16(qi, qsc, nq, rows, hoff, D, s);
  }
  static FI_INLINE void pv_rows_i16(float* acc, int64_t D, const float* w, const float* alpha, int nq,
                                    const int8_t* const* rows, int64_t hoff, int n) {
    g_pv_rows_i16(acc, D, w, alpha, nq, rows, hoff, n);
  }
};

#pragma GCC push_options
#pragma GCC target("avx512bf16")
// q . row for bf16 pairs straight from the cache (exact products, fp32 sums); unscaled.
// Scores (times qscale) of nq queries q[j] against the 16 rows, into s[j].
__attribute__((noinline)) void qk_rows_dpbf16(const bf16_t* const* q, int nq, const bf16_t* const* rows, int64_t hoff,
                                              int64_t D, float qscale, __m512* s) {
  for (int j = 0; j < nq; ++j) {
    __m512 a[16];
    for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {  // D % 32 == 0 here
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q[j] + d);
      for (int t = 0; t < 16; ++t)
        a[t] = _mm512_dpbf16_ps(a[t], qv, (__m512bh)_mm512_loadu_si512(rows[t] + hoff + d));
    }
    s[j] = _mm512_mul_ps(Avx512Ops::reduce16(a), _mm512_set1_ps(qscale));
  }
}
const bool g_qk_rows_dpbf16_set = (g_qk_rows_dpbf16 = qk_rows_dpbf16, true);
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512vnni")
// Scores (times qsc[j]) of NQ queries, 16-bit codes qi + j D, against the 16 int8 rows (unscaled by the row
// scales): R rows at a time, each row widened once; the int32 sums are exact.
template <int NQ>
FI_INLINE void qk_i16_nq(const int16_t* qi, const float* qsc, const int8_t* const* rows, int64_t hoff, int64_t D,
                         __m512* s) {
  constexpr int R = NQ == 1 ? 16 : NQ <= 3 ? 8 : 4;
  __m512 a[NQ][16];
  for (int t0 = 0; t0 < 16; t0 += R) {
    __m512i r[NQ][R];
    for (int j = 0; j < NQ; ++j)
      for (int t = 0; t < R; ++t) r[j][t] = _mm512_setzero_si512();
    for (int64_t d = 0; d < D; d += 32)
      for (int t = 0; t < R; ++t) {
        const __m512i x =
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[t0 + t] + hoff + d)));
        for (int j = 0; j < NQ; ++j) r[j][t] = _mm512_dpwssd_epi32(r[j][t], _mm512_loadu_si512(qi + j * D + d), x);
      }
    for (int j = 0; j < NQ; ++j)
      for (int t = 0; t < R; ++t) a[j][t0 + t] = _mm512_cvtepi32_ps(r[j][t]);
  }
  for (int j = 0; j < NQ; ++j) s[j] = _mm512_mul_ps(Avx512Ops::reduce16(a[j]), _mm512_set1_ps(qsc[j]));
}
__attribute__((noinline)) void qk_rows_i16(const int16_t* qi, const float* qsc, int nq, const int8_t* const* rows,
                                           int64_t hoff, int64_t D, __m512* s) {
  for (int j0 = 0; j0 < nq; j0 += 4) {  // at most FI_ROWS_MAX_F32 = 8 queries per KV head come here
    const int16_t* q = qi + j0 * D;
    switch (nq - j0) {
      case 1: qk_i16_nq<1>(q, qsc + j0, rows, hoff, D, s + j0); break;
      case 2: qk_i16_nq<2>(q, qsc + j0, rows, hoff, D, s + j0); break;
      case 3: qk_i16_nq<3>(q, qsc + j0, rows, hoff, D, s + j0); break;
      default: qk_i16_nq<4>(q, qsc + j0, rows, hoff, D, s + j0); break;
    }
  }
}
// acc[j] = alpha[j] acc[j] + sum_t w[j][t] v(t) for NQ queries over the n <= 16 int8 rows of the chunk (w: the
// probabilities times the value scales, 0 past n). Each query's 16 weights become 16-bit codes of its largest
// one (quantize_i16, as q); rows go in pairs (t, t + 1) interleaved by VPUNPCK{L,H}WD, so one VPDPWSSD adds both
// rows' products to 16 dims, in a lane order that one VPERMT2D per 16 dims undoes. Sums of 8 pairs stay below 2^31 (8 x 2 x 127 x 32767).
template <int NQ>
FI_INLINE void pv_i16_nq(float* acc, int64_t D, const float* w, const float* alpha, const int8_t* const* rows,
                         int64_t hoff, int n) {
  alignas(64) int32_t pw[NQ][8];  // pw[j][k]: codes of rows 2k (low half) and 2k + 1 (high half)
  float ps[NQ];
  for (int j = 0; j < NQ; ++j) ps[j] = Avx512Ops::quantize_i16(w + j * 16, 16, reinterpret_cast<int16_t*>(pw[j]));
  const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i idx1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const int pairs = (n + 1) / 2;  // row n (odd n) is a readable repeat of row 0 with weight 0
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    __m512i lo[NQ], hi[NQ];
    for (int j = 0; j < NQ; ++j) lo[j] = hi[j] = _mm512_setzero_si512();
    for (int k = 0; k < pairs; ++k) {
      const __m512i a0 =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * k] + hoff + d0)));
      const __m512i a1 =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * k + 1] + hoff + d0)));
      const __m512i l = _mm512_unpacklo_epi16(a0, a1), h = _mm512_unpackhi_epi16(a0, a1);
      for (int j = 0; j < NQ; ++j) {
        const __m512i b = _mm512_set1_epi32(pw[j][k]);
        lo[j] = _mm512_dpwssd_epi32(lo[j], l, b);
        hi[j] = _mm512_dpwssd_epi32(hi[j], h, b);
      }
    }
    for (int j = 0; j < NQ; ++j) {
      float* o = acc + j * D + d0;
      const __m512 al = _mm512_set1_ps(alpha[j]), sc = _mm512_set1_ps(ps[j]);
      const __m512 v0 = _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo[j], idx0, hi[j]));
      const __m512 v1 = _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo[j], idx1, hi[j]));
      _mm512_storeu_ps(o, _mm512_fmadd_ps(v0, sc, _mm512_mul_ps(_mm512_loadu_ps(o), al)));
      _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(v1, sc, _mm512_mul_ps(_mm512_loadu_ps(o + 16), al)));
    }
  }
}
__attribute__((noinline)) void pv_rows_i16(float* acc, int64_t D, const float* w, const float* alpha, int nq,
                                           const int8_t* const* rows, int64_t hoff, int n) {
  for (int j0 = 0; j0 < nq; j0 += 4) {
    float* a = acc + j0 * D;
    switch (nq - j0) {
      case 1: pv_i16_nq<1>(a, D, w + j0 * 16, alpha + j0, rows, hoff, n); break;
      case 2: pv_i16_nq<2>(a, D, w + j0 * 16, alpha + j0, rows, hoff, n); break;
      case 3: pv_i16_nq<3>(a, D, w + j0 * 16, alpha + j0, rows, hoff, n); break;
      default: pv_i16_nq<4>(a, D, w + j0 * 16, alpha + j0, rows, hoff, n); break;
    }
  }
}
const bool g_i16_set = (g_qk_rows_i16 = qk_rows_i16, g_pv_rows_i16 = pv_rows_i16, true);
#pragma GCC pop_options
namespace avx512 {
using Ops = Avx512Ops;
#include "paged_attention_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#endif  // FI_X86

// ---------------------------------------------------------------------------------------------------------
// Dispatch.

using ItemFn = void (*)(const PagedAttentionParams&, const Item&, const Scratch&, float*);

bool cpu_has(Isa isa) {
#if FI_X86
  if (isa == Isa::kAvx512Bf16) return cpu_has(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
  if (isa == Isa::kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == Isa::kAvx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return isa == Isa::kGeneric;
}

Isa best_isa(Isa want) {
  if (want == Isa::kAuto) want = Isa::kAvx512Bf16;
  for (int i = int(want); i > 0; --i)
    if (cpu_has(Isa(i))) return Isa(i);
  return Isa::kGeneric;
}

Isa initial_isa() {
  const char* env = std::getenv("FASTINFER_CPU_ISA");
  if (env != nullptr) {
    if (!std::strcmp(env, "generic")) return best_isa(Isa::kGeneric);
    if (!std::strcmp(env, "avx2")) return best_isa(Isa::kAvx2);
    if (!std::strcmp(env, "avx512")) return best_isa(Isa::kAvx512);
    if (!std::strcmp(env, "avx512_bf16")) return best_isa(Isa::kAvx512Bf16);
  }
  return best_isa(Isa::kAuto);
}

Isa& current_isa() {
  static Isa isa = initial_isa();
  return isa;
}

#define FI_ITEM_FNS(ns)                                                                     \
  if (kv_int8) {                                                                            \
    if (dt == DType::kFloat32) return ns::run_item<float, int8_t>;                          \
    if (dt == DType::kBFloat16) return ns::run_item<bf16_t, int8_t>;                        \
    return ns::run_item<fp16_t, int8_t>;                                                    \
  }                                                                                         \
  if (dt == DType::kFloat32) return ns::run_item<float, float>;                             \
  if (dt == DType::kBFloat16) return ns::run_item<bf16_t, bf16_t>;                          \
  return ns::run_item<fp16_t, fp16_t>;

ItemFn item_fn(Isa isa, DType dt, bool kv_int8) {
#if FI_X86
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16) {
    FI_ITEM_FNS(avx512)
  }
  if (isa == Isa::kAvx2) {
    FI_ITEM_FNS(avx2)
  }
#endif
  FI_ITEM_FNS(generic)
}
#undef FI_ITEM_FNS

// Merge the parts of one split context: out = sum_p 2^(m_p - m) acc_p / sum_p 2^(m_p - m) l_p.
template <class T>
void combine(const PagedAttentionParams& p, const Item& first, int parts, const float* partials) {
  const int64_t D = p.head_dim, G = p.num_heads / p.num_kv_heads, Mh = int64_t(first.nrows) * G;
  const int64_t M = Mh * first.nkvh;
  const int64_t slab = M * (D + 2);
  const float* base = partials + first.partial;
  T* out = static_cast<T*>(p.out);
  const int64_t qs = p.query_start_loc[first.seq];
  std::vector<float> w(parts), o(D);
  for (int64_t m = 0; m < M; ++m) {
    float gm = -std::numeric_limits<float>::infinity();
    for (int k = 0; k < parts; ++k) gm = std::max(gm, base[k * slab + M * D + m]);
    float total = 0.f;
    for (int k = 0; k < parts; ++k) {
      const float mk = base[k * slab + M * D + m];
      w[k] = mk == -std::numeric_limits<float>::infinity() ? 0.f : std::exp2(mk - gm);
      total += w[k] * base[k * slab + M * D + M + m];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    std::fill(o.begin(), o.end(), 0.f);
    for (int k = 0; k < parts; ++k) {
      if (w[k] == 0.f) continue;
      const float* acc = base + k * slab + m * D;
      for (int64_t d = 0; d < D; ++d) o[d] += w[k] * acc[d];
    }
    const int64_t hl = m / Mh, r = (m % Mh) / G, g = m % G;
    T* orow = out + (qs + first.row0 + r) * p.out_stride + ((first.kvh + hl) * G + g) * D;
    for (int64_t d = 0; d < D; ++d) from_float(o[d] * inv, orow + d);
  }
}

using CombineFn = void (*)(const PagedAttentionParams&, const Item&, int, const float*);

CombineFn combine_fn(DType dt) {
  if (dt == DType::kFloat32) return combine<float>;
  if (dt == DType::kBFloat16) return combine<bf16_t>;
  return combine<fp16_t>;
}

}  // namespace

enum ErrorCode : int {
  kOk = 0,
  kBadArgs = -1,
  kBadHeadDim = -2,
  kBadHeads = -3,
  kBadQueryStartLoc = -4,
  kBadSeqLen = -5,
  kBlockTableTooShort = -6,
  kBadBlockId = -7,
  kBadSlot = -8,
  kBadDType = -9,
  kOutOfMemory = -10,
};

const char* error_string(int code) {
  switch (code) {
    case kOk: return "ok";
    case kBadArgs: return "null pointer or non-positive size";
    case kBadHeadDim: return "head_dim must be a positive multiple of 16, at most 256";
    case kBadHeads: return "num_heads must be a positive multiple of num_kv_heads";
    case kBadQueryStartLoc: return "query_start_loc must start at 0, be non-decreasing and end <= num_tokens";
    case kBadSeqLen: return "each seq_len must be >= its query_len";
    case kBlockTableTooShort: return "a seq_len exceeds block_table width * block_size";
    case kBadBlockId: return "a block id in use is outside [0, num_blocks)";
    case kBadSlot: return "a slot in slot_mapping is >= num_blocks * block_size";
    case kBadDType: return "unsupported dtype";
    case kOutOfMemory: return "out of memory for the per-thread scratch";
    default: return "unknown error";
  }
}

Isa set_isa(Isa isa) { return current_isa() = best_isa(isa); }
Isa active_isa() { return current_isa(); }
const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kGeneric: return "generic";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    default: return "auto";
  }
}

int paged_attention(const PagedAttentionParams& p) {
  if (p.num_seqs == 0 || p.num_tokens == 0) return kOk;  // (empty tensors may have null data)
  if (!p.q || !p.k_cache || !p.v_cache || !p.out || !p.block_table || !p.seq_lens || !p.query_start_loc ||
      p.num_seqs < 0 || p.num_tokens < 0 || p.block_size <= 0 || p.num_blocks < 0 || p.block_table_stride < 0)
    return kBadArgs;
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return kBadDType;
  if (p.head_dim <= 0 || p.head_dim % 16 != 0 || p.head_dim > kMaxHeadDim) return kBadHeadDim;
  if (p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0) return kBadHeads;
  const int64_t G = p.num_heads / p.num_kv_heads, bs = p.block_size;
  const int nthreads = resolve_threads(p.num_threads);
  const int64_t rows_per_tile = std::max<int64_t>(1, kTargetQueries / G);

  // Work items (validating the metadata on the way, so the kernels can trust it).
  std::vector<Item> items;
  items.reserve(size_t(p.num_seqs * p.num_kv_heads));
  if (p.num_seqs > 0 && p.query_start_loc[0] != 0) return kBadQueryStartLoc;
  double total_cost = 0;
  for (int64_t i = 0; i < p.num_seqs; ++i) {
    const int64_t qs = p.query_start_loc[i], qlen = p.query_start_loc[i + 1] - qs, slen = p.seq_lens[i];
    if (qlen < 0 || p.query_start_loc[i + 1] > p.num_tokens) return kBadQueryStartLoc;
    if (slen < qlen) return kBadSeqLen;
    if (slen > p.block_table_stride * bs) return kBlockTableTooShort;
    const int32_t* bt = p.block_table + i * p.block_table_stride;
    for (int64_t r0 = 0; r0 < qlen; r0 += rows_per_tile) {
      const int64_t nr = std::min(rows_per_tile, qlen - r0);
      const int64_t first = slen - qlen + r0, last = first + nr - 1;
      const int64_t lo = p.window > 0 ? std::max<int64_t>(0, first - p.window + 1) : 0, hi = last + 1;
      for (int64_t b = lo / bs; b <= (hi - 1) / bs; ++b)
        if (bt[b] < 0 || bt[b] >= p.num_blocks) return kBadBlockId;
      // Few queries (decode): one item takes all KV heads, so it reads whole slot rows (contiguous blocks).
      const int64_t nkvh = nr * p.num_heads <= kAllHeadsQueries ? p.num_kv_heads : 1;
      const double cost = double(hi - lo) * double(nkvh * (nr * G + 8));
      for (int64_t h = 0; h < p.num_kv_heads; h += nkvh) {
        items.push_back(Item{int32_t(i), int32_t(h), int32_t(nkvh), int32_t(r0), int32_t(nr), lo, hi, -1, cost});
        total_cost += cost;
      }
    }
  }
  if (items.empty()) return kOk;

  // Split long contexts into parts when there are too few items to keep every thread busy; each part keeps
  // its softmax state in `partials`, merged afterwards.
  struct Group {
    size_t first;
    int parts;
  };
  std::vector<Group> groups;
  int64_t partial_floats = 0;
  if (nthreads > 1) {
    const double target = total_cost / double(8 * nthreads);
    const size_t n0 = items.size();
    for (size_t k = 0; k < n0; ++k) {
      const Item it = items[k];
      const int64_t len = it.hi - it.lo;
      int64_t parts = std::min<int64_t>(int64_t(std::ceil(it.cost / target)), len / kMinSplit);
      if (parts < 2) continue;
      const int64_t M = int64_t(it.nrows) * G * it.nkvh, slab = M * (p.head_dim + 2);
      const int64_t step = (len + parts - 1) / parts;
      for (int64_t a = it.lo; a < it.hi; a += step) {
        Item part = it;
        part.lo = a;
        part.hi = std::min(it.hi, a + step);
        part.cost = it.cost * double(part.hi - part.lo) / double(len);
        part.partial = partial_floats;
        partial_floats += slab;
        items.push_back(part);
      }
      items[k].nrows = 0;  // replaced by its parts
    }
    if (partial_floats > 0) {
      items.erase(std::remove_if(items.begin(), items.end(), [](const Item& it) { return it.nrows == 0; }),
                  items.end());
      // The parts of one split item are consecutive, in order, with consecutive slabs.
      for (size_t k = 0; k < items.size(); ++k) {
        if (items[k].partial < 0) continue;
        const Item* prev = k > 0 ? &items[k - 1] : nullptr;
        if (prev && prev->partial >= 0 && prev->seq == items[k].seq && prev->kvh == items[k].kvh &&
            prev->row0 == items[k].row0)
          ++groups.back().parts;
        else
          groups.push_back(Group{k, 1});
      }
    }
  }
  std::vector<float> partials(static_cast<size_t>(partial_floats));

  // Longest items first: dynamic scheduling then balances the tail.
  std::vector<int64_t> order(items.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = int64_t(k);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return items[a].cost > items[b].cost; });

  const Isa isa = current_isa();
#if FI_X86
  g_dpbf16 = isa == Isa::kAvx512Bf16;
  g_i16 = g_dpbf16 && __builtin_cpu_supports("avx512vnni");
#endif
  const ItemFn fn = item_fn(isa, p.dtype, p.kv_int8);
  const int64_t mmax = std::max(rows_per_tile * G, kAllHeadsQueries);  // most queries of any item
  const int64_t n = int64_t(items.size());
  float* pbuf = partials.data();
  bool oom = false;
  if (n == 1 || nthreads == 1) {
    const Scratch sc = thread_scratch(p.head_dim, mmax);
    if (sc.qf == nullptr) return kOutOfMemory;
    for (int64_t k = 0; k < n; ++k) fn(p, items[order[k]], sc, pbuf);
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t k = 0; k < n; ++k) {
      const Scratch sc = thread_scratch(p.head_dim, mmax);
      if (sc.qf == nullptr) {
#pragma omp atomic write
        oom = true;
        continue;
      }
      fn(p, items[order[k]], sc, pbuf);
    }
  }
  if (oom) return kOutOfMemory;
  if (!groups.empty()) {
    const CombineFn cfn = combine_fn(p.dtype);
    const int64_t ng = int64_t(groups.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t k = 0; k < ng; ++k) cfn(p, items[groups[k].first], groups[k].parts, pbuf);
  }
  return kOk;
}

namespace {

// One int8 KV row: D values of x (elements off .. off + D - 1 of dtype dt) -> D codes + the fp16 scale at dst,
// exactly as fastinfer.ops.reference.quantize_kv_rows(x, "int8"): amax over non-NaN |x| (no finite element:
// inf), scale = fp16(max(amax / 127, 2^-14)) capped at 65504, code = clamp(rint(x / scale), +-127), NaN -> 0.
void quantize_row_int8(const void* x, DType dt, int64_t off, int64_t D, int8_t* dst) {
  constexpr float kMinScale = 6.103515625e-05f;  // 2^-14
  float amax = 0.f;
  bool finite = false;
  for (int64_t d = 0; d < D; ++d) {
    const float v = load_elem(x, dt, off + d);
    if (!std::isnan(v)) amax = std::max(amax, std::fabs(v));
    finite |= std::isfinite(v);
  }
  if (!finite) amax = std::numeric_limits<float>::infinity();
  const float s32 = std::max(amax / 127.f, kMinScale);
  uint16_t h = float_to_fp16(s32);
  if (h == 0x7c00u) h = 0x7bffu;  // inf -> 65504
  const float s = fp16_to_float(h);
  for (int64_t d = 0; d < D; ++d) {
    float y = load_elem(x, dt, off + d) / s;
    y = std::isnan(y) ? 0.f : std::min(127.f, std::max(-127.f, y));
    dst[d] = int8_t(std::nearbyint(y));
  }
  std::memcpy(dst + D, &h, 2);  // little endian, as the host (x86) stores it
}

}  // namespace

int store_kv(const StoreKVParams& p) {
  if (p.num_tokens == 0) return kOk;
  if (!p.key || !p.value || !p.k_cache || !p.v_cache || (!p.slot_mapping && p.num_tokens > 0) ||
      p.num_tokens < 0 || p.row_elems <= 0 || p.num_slots < 0)
    return kBadArgs;
  if (p.kv_int8 && (p.head_dim <= 0 || p.row_elems % p.head_dim != 0)) return kBadArgs;
  size_t elem;
  switch (p.dtype) {
    case DType::kFloat32: elem = 4; break;
    case DType::kBFloat16:
    case DType::kFloat16: elem = 2; break;
    default: return kBadDType;
  }
  for (int64_t t = 0; t < p.num_tokens; ++t)
    if (p.slot_mapping[t] >= p.num_slots) return kBadSlot;
  if (p.kv_int8) {
    const int64_t D = p.head_dim, heads = p.row_elems / D, qrow = heads * (D + 2);
    int8_t* kq = static_cast<int8_t*>(p.k_cache);
    int8_t* vq = static_cast<int8_t*>(p.v_cache);
    const int nthreads = resolve_threads(p.num_threads);
    const bool par = nthreads > 1 && p.num_tokens * p.row_elems >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (par)
    for (int64_t t = 0; t < p.num_tokens; ++t) {
      const int64_t slot = p.slot_mapping[t];
      if (slot < 0) continue;
      for (int64_t h = 0; h < heads; ++h) {
        quantize_row_int8(p.key, p.dtype, t * p.key_stride + h * D, D, kq + slot * qrow + h * (D + 2));
        quantize_row_int8(p.value, p.dtype, t * p.value_stride + h * D, D, vq + slot * qrow + h * (D + 2));
      }
    }
    return kOk;
  }
  const size_t row_bytes = size_t(p.row_elems) * elem;
  const char* key = static_cast<const char*>(p.key);
  const char* value = static_cast<const char*>(p.value);
  char* kc = static_cast<char*>(p.k_cache);
  char* vc = static_cast<char*>(p.v_cache);
  const int nthreads = resolve_threads(p.num_threads);
  const bool par = nthreads > 1 && size_t(p.num_tokens) * row_bytes >= (size_t(1) << 18);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (par)
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    std::memcpy(kc + size_t(slot) * row_bytes, key + size_t(t * p.key_stride) * elem, row_bytes);
    std::memcpy(vc + size_t(slot) * row_bytes, value + size_t(t * p.value_stride) * elem, row_bytes);
  }
  return kOk;
}

}  // namespace cpu
}  // namespace fastinfer
