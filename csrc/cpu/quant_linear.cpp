// Weight-only quantized linear layers on the CPU (int8 / int4, group-wise; raw pointers, no torch). See
// fastinfer/cpu_quant.h for the format and the contract.
//
// Decode-shaped (few rows of x; the weight streamed once per call from memory). Nothing is quantized on the
// activation side: the weights are expanded in registers, products and sums are fp32.
// - fp32 kernels (any x dtype; x converted once per call to fp32, for int4 with the even and odd k of each
//   32 inputs split apart to match the nibbles): weights become exactly the reference's fp32 values
//   (q * scale, then + min). int4 looks the nibbles up in a per-group 16-entry table scale * [0..15] + min,
//   one VPERMPS per 16 weights (it reads only index bits 3:0, so the low nibble needs no mask); int8
//   converts (VPMOVSXBD + VCVTDQ2PS) and scales; per channel, the scale is factored out of the sum.
// - bf16 x on AVX512_BF16 (bf16dp): weights become the exact bf16 numbers 128 + q (int4, nibbles spread
//   with VPMULTISHIFTQB) or 2048 + 16 uh and 128 + l (int8 groups, u = q ^ 0x80 = 16 uh + l), so one
//   VDPBF16PS takes 32 weights (exact products); the offsets come back out through group sums of x. Half
//   the vector work of the fp32 kernels.
// - A tile is R output rows x MT rows of x (every x vector feeds R rows, every weight vector MT rows of x);
//   OpenMP threads take contiguous ranges of output rows; weights are prefetched ahead.
// - Up to kMidMaxRows rows of bf16 x: blocks of R rows are dequantized to bf16 scratch once and run
//   against tiles of x with VDPBF16PS. More rows: the caller's dequantize (quant_dequantize) + GEMM.
// Variants: generic (portable C++), AVX2, AVX-512, AVX-512 + BF16, compiled under `#pragma GCC target` and
// chosen at run time by the ISA of cpu_attention.h (FASTINFER_CPU_ISA / set_isa).
#include "fastinfer/cpu_quant.h"
#include "fastinfer/cpu_common.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// No FMA contraction: the weights must be the reference's q * s, then + m (two roundings; GCC would fuse
// the mul + add intrinsics otherwise). Explicit FMA intrinsics stay FMAs.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace fastinfer {
namespace cpu {
namespace {

// Rows of x up to which the in-register (GEMV-like) kernels run; int4 with bf16 x on AVX512_BF16 then
// takes the dequantize-a-block + VDPBF16PS kernel up to kMidMaxRows (quant_linear_prefers; measured, 2
// threads: at M = 16 1.1-1.3x bf16 F.linear vs ~1.0x for dequantize + GEMM; for int8, whose dequantization
// costs more, and for M = 32 the GEMM is as fast or faster).
constexpr int64_t kGemvMaxRows = 8;
#ifndef FQ_MID_MAX_ROWS
#define FQ_MID_MAX_ROWS 16
#endif
constexpr int64_t kMidMaxRows = FQ_MID_MAX_ROWS;

enum QuantError : int {
  kOk = 0,
  kBadArgs = -1,
  kUnsupported = -2,
  kBadDType = -3,
};

// Growable per-thread fp32 buffers (index 0: prepared x on the calling thread; 1: scales/mins; 2: a row).
float* thread_buf(int which, size_t n) {
  thread_local std::vector<float> bufs[3];
  std::vector<float>& b = bufs[which];
  if (b.size() < n) b.resize(n);
  return b.data();
}

#if FI_X86
// Software prefetch of the weight rows this far ahead (bytes) of the tile, once per 64-byte line of each.
// Measured on Zen 4/5-class EPYC, 2 threads, M = 1: 8-24 KiB all about equal, 1.2-1.5x faster than 512 B
// for the int4 and int8-g32 kernels (the hardware prefetchers alone reach ~30 GB/s, like bf16 F.linear).
#ifndef FQ_PREFETCH_BYTES
#define FQ_PREFETCH_BYTES 16384
#endif
template <int R>
FI_INLINE void prefetch_rows(const uint8_t* const* qr, int64_t off) {
  for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(qr[r] + off + FQ_PREFETCH_BYTES), _MM_HINT_T0);
}
#endif

// Everything a tile needs, fixed per call.
struct Ctx {
  const float* xf = nullptr;  // prepared x [M, K] fp32 (int4 on AVX2/AVX-512: 32-blocks split even | odd)
  int64_t xs = 0;             // its row stride (floats)
  const float* xsum = nullptr;  // [M] row sums of x (per-channel int8 with mins), else nullptr
  const uint16_t* xb = nullptr;  // bf16dp kernel: x as bf16 pairs [M, K] (see bf16dp::prep)
  const float* xgs = nullptr;    // bf16dp kernel: group sums of x [M, G]
  const uint8_t* q = nullptr;
  int64_t qrow = 0;  // bytes per weight row
  const void* scales = nullptr;
  const void* mins = nullptr;
  bool s16 = false;  // scales / mins are fp16
  int64_t M = 0, N = 0, K = 0, G = 0, g = 0;
  const float* bias = nullptr;
  void* out = nullptr;
  int64_t os = 0;
  DType odt = DType::kFloat32;
};

// fp32 scales and mins of rows n0 .. n0 + nr - 1 ([nr][G] each; mins all zero when absent): pointers into
// the weight itself when it is fp32, else converted into a per-thread buffer.
struct RowScales {
  const float* s[8];
  const float* m[8];
};

// row_scales(c, n0, nr, buf) of an ISA namespace (which defines cvt_f16): the fp32 scales and mins of rows
// n0 .. n0 + nr - 1 ([nr][G] each; mins all zero when absent), pointing into the weight itself when it is
// fp32, else converted into `buf` (from scales_buf(c, >= nr)).
#define FQ_DEFINE_ROW_SCALES()                                                                     \
  FI_INLINE RowScales row_scales(const Ctx& c, int64_t n0, int nr, float* buf) {                  \
    RowScales rs{};                                                                                \
    const int64_t G = c.G;                                                                         \
    for (int r = 0; r < nr; ++r) {                                                                 \
      const int64_t off = (n0 + r) * G;                                                            \
      float* sd = buf + (2 * r + 1) * G;                                                           \
      float* md = sd + G;                                                                          \
      if (c.s16) {                                                                                 \
        cvt_f16(static_cast<const uint16_t*>(c.scales) + off, sd, G);                              \
        rs.s[r] = sd;                                                                              \
      } else {                                                                                     \
        rs.s[r] = static_cast<const float*>(c.scales) + off;                                       \
      }                                                                                            \
      if (c.mins == nullptr) {                                                                     \
        rs.m[r] = buf; /* G zeros (scales_buf) */                                                  \
      } else if (c.s16) {                                                                          \
        cvt_f16(static_cast<const uint16_t*>(c.mins) + off, md, G);                                \
        rs.m[r] = md;                                                                              \
      } else {                                                                                     \
        rs.m[r] = static_cast<const float*>(c.mins) + off;                                         \
      }                                                                                            \
    }                                                                                              \
    return rs;                                                                                     \
  }

// The calling thread's buffer for row_scales of up to nr rows.
// (G zeros: the mins of weights without any; then [2 nr G] for row_scales.)
float* scales_buf(const Ctx& c, int nr) {
  float* b = thread_buf(1, size_t((2 * nr + 1) * c.G));
  std::fill(b, b + c.G, 0.f);
  return b;
}

FI_INLINE void cvt_f16_scalar(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

// Write out[m0 + mt, n0 + r] = res[r][mt] + bias.
template <int R, int MT>
FI_INLINE void store_tile(const Ctx& c, int64_t n0, int64_t m0, const float (&res)[R][MT]) {
  for (int r = 0; r < R; ++r) {
    const float b = c.bias ? c.bias[n0 + r] : 0.f;
    for (int mt = 0; mt < MT; ++mt) store_elem(c.out, c.odt, (m0 + mt) * c.os + n0 + r, res[r][mt] + b);
  }
}

// The row-range drivers of one ISA namespace (which defines kRmax, kMTmax <= 4, cvt_f16 and the tiles):
// rows [n0, n1) in blocks of kRmax output rows, each against all rows of x in tiles of up to kMTmax;
// group size 32 (GGUF) gets its own instantiation (GS = 32: the per-group inner loop disappears).
#define FQ_DEFINE_ROWS(NAME, TILE)                                                        \
  template <int R, int GS>                                                                \
  FI_INLINE void NAME##_block(const Ctx& c, int64_t n0, float* sbuf) {                    \
    const RowScales rs = row_scales(c, n0, R, sbuf);                                      \
    for (int64_t m0 = 0; m0 < c.M; m0 += kMTmax) {                                        \
      switch (std::min<int64_t>(kMTmax, c.M - m0)) {                                      \
        case 1: TILE<R, 1, GS>(c, n0, m0, rs); break;                                     \
        case 2: TILE<R, 2, GS>(c, n0, m0, rs); break;                                     \
        case 3: TILE<R, 3, GS>(c, n0, m0, rs); break;                                     \
        default: TILE<R, (kMTmax < 4 ? kMTmax : 4), GS>(c, n0, m0, rs); break;            \
      }                                                                                   \
    }                                                                                     \
  }                                                                                       \
  template <int GS>                                                                       \
  FI_INLINE void NAME##_gs(const Ctx& c, int64_t n0, int64_t n1) {                        \
    float* sbuf = scales_buf(c, kRmax);                                                   \
    int64_t n = n0;                                                                       \
    for (; n + kRmax <= n1; n += kRmax) NAME##_block<kRmax, GS>(c, n, sbuf);              \
    for (; n < n1; ++n) NAME##_block<1, GS>(c, n, sbuf);                                  \
  }                                                                                       \
  __attribute__((noinline)) void NAME(const Ctx& c, int64_t n0, int64_t n1) {             \
    if (c.g == 32) NAME##_gs<32>(c, n0, n1);                                              \
    else NAME##_gs<0>(c, n0, n1);                                                         \
  }

// ---------------------------------------------------------------------------------------------------------
// Generic variant: dequantize one row to fp32 (exact reference values), then dot with every row of x.

namespace generic {

FI_INLINE void cvt_f16(const uint16_t* src, float* dst, int64_t n) { cvt_f16_scalar(src, dst, n); }
FQ_DEFINE_ROW_SCALES()

void dequant_row(const Ctx& c, int64_t n, const RowScales& rs, float* w) {
  const uint8_t* q = c.q + n * c.qrow;
  for (int64_t gi = 0; gi < c.G; ++gi) {
    const float s = rs.s[0][gi], m = rs.m[0][gi];
    for (int64_t k = gi * c.g; k < (gi + 1) * c.g; ++k) {
      int v;
      if (c.qrow == c.K) v = static_cast<int8_t>(q[k]);
      else v = (k & 1) ? q[k >> 1] >> 4 : q[k >> 1] & 0x0f;
      w[k] = float(v) * s + m;
    }
  }
}

void rows(const Ctx& c, int64_t n0, int64_t n1) {
  float* w = thread_buf(2, size_t(c.K));
  float* sbuf = scales_buf(c, 1);
  for (int64_t n = n0; n < n1; ++n) {
    const RowScales rs = row_scales(c, n, 1, sbuf);
    dequant_row(c, n, rs, w);
    for (int64_t m = 0; m < c.M; ++m) {
      const float* x = c.xf + m * c.xs;
      float acc[16] = {};
      int64_t k = 0;
      for (; k + 16 <= c.K; k += 16)
        for (int i = 0; i < 16; ++i) acc[i] += x[k + i] * w[k + i];
      for (; k < c.K; ++k) acc[k & 15] += x[k] * w[k];
      float s = 0.f;
      for (int i = 0; i < 16; ++i) s += acc[i];
      const float res[1][1] = {{s}};
      store_tile<1, 1>(c, n, m, res);
    }
  }
}

}  // namespace generic

#if FI_X86
// ---------------------------------------------------------------------------------------------------------
// AVX2 variant: 8 lanes; int4 through convert + scale (no 16-entry permute in AVX2).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

constexpr int kRmax = 2;

template <int R>
struct RowPtrs {
  const uint8_t* p[R];
};
template <int R>
FI_INLINE RowPtrs<R> qrow_ptrs(const Ctx& c, int64_t n0) {
  RowPtrs<R> rp;
  for (int r = 0; r < R; ++r) rp.p[r] = c.q + (n0 + r) * c.qrow;
  return rp;
}
constexpr int kMTmax = 4;

FI_INLINE float hsum(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

void cvt_f16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}
FQ_DEFINE_ROW_SCALES()

// int4, x split even | odd per 32-block: (e0..e15, o0..o15).
template <int R, int MT, int GS>
FI_INLINE void int4_tile(const Ctx& c, int64_t n0, int64_t m0, const RowScales& rs) {
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm256_setzero_ps();
  const __m256i lo4 = _mm256_set1_epi32(0x0f);
  for (int64_t gi = 0; gi < c.G; ++gi) {
    __m256 s[R], m[R];
    for (int r = 0; r < R; ++r) {
      s[r] = _mm256_set1_ps(rs.s[r][gi]);
      m[r] = _mm256_set1_ps(rs.m[r][gi]);
    }
    for (int64_t k = gi * c.g; k < (gi + 1) * c.g; k += 32) {
      if ((k & 127) == 0) prefetch_rows<R>(qrow_ptrs<R>(c, n0).p, k / 2);
      for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h + 7: evens 8h.., odds 8h..
        __m256 xe[MT], xo[MT];
        for (int mt = 0; mt < MT; ++mt) {
          xe[mt] = _mm256_loadu_ps(c.xf + (m0 + mt) * c.xs + k + 8 * h);
          xo[mt] = _mm256_loadu_ps(c.xf + (m0 + mt) * c.xs + k + 16 + 8 * h);
        }
        for (int r = 0; r < R; ++r) {
          const uint8_t* qp = c.q + (n0 + r) * c.qrow + k / 2 + 8 * h;
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qp)));
          const __m256 we =
              _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, lo4)), s[r]), m[r]);
          const __m256 wo = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), s[r]), m[r]);
          for (int mt = 0; mt < MT; ++mt) {
            acc[r][mt] = _mm256_fmadd_ps(xe[mt], we, acc[r][mt]);
            acc[r][mt] = _mm256_fmadd_ps(xo[mt], wo, acc[r][mt]);
          }
        }
      }
    }
  }
  float res[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) res[r][mt] = hsum(acc[r][mt]);
  store_tile<R, MT>(c, n0, m0, res);
}

// int8 with groups (g % 32 == 0): exact w = q * s + m.
template <int R, int MT, int GS>
FI_INLINE void int8g_tile(const Ctx& c, int64_t n0, int64_t m0, const RowScales& rs) {
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < c.G; ++gi) {
    __m256 s[R], m[R];
    for (int r = 0; r < R; ++r) {
      s[r] = _mm256_set1_ps(rs.s[r][gi]);
      m[r] = _mm256_set1_ps(rs.m[r][gi]);
    }
    for (int64_t k = gi * c.g; k < (gi + 1) * c.g; k += 8) {
      if ((k & 63) == 0) prefetch_rows<R>(qrow_ptrs<R>(c, n0).p, k);
      __m256 xv[MT];
      for (int mt = 0; mt < MT; ++mt) xv[mt] = _mm256_loadu_ps(c.xf + (m0 + mt) * c.xs + k);
      for (int r = 0; r < R; ++r) {
        const uint8_t* qp = c.q + (n0 + r) * c.qrow + k;
        const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qp))));
        const __m256 w = _mm256_add_ps(_mm256_mul_ps(qf, s[r]), m[r]);
        for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm256_fmadd_ps(xv[mt], w, acc[r][mt]);
      }
    }
  }
  float res[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) res[r][mt] = hsum(acc[r][mt]);
  store_tile<R, MT>(c, n0, m0, res);
}

// int8 per channel (one group of K, any K): y = s * sum x q + m * sum x.
template <int R, int MT, int GS>
FI_INLINE void int8c_tile(const Ctx& c, int64_t n0, int64_t m0, const RowScales& rs) {
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= c.K; k += 8) {
    if ((k & 63) == 0) prefetch_rows<R>(qrow_ptrs<R>(c, n0).p, k);
    __m256 xv[MT];
    for (int mt = 0; mt < MT; ++mt) xv[mt] = _mm256_loadu_ps(c.xf + (m0 + mt) * c.xs + k);
    for (int r = 0; r < R; ++r) {
      const uint8_t* qp = c.q + (n0 + r) * c.qrow + k;
      const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qp))));
      for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm256_fmadd_ps(xv[mt], qf, acc[r][mt]);
    }
  }
  float res[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) {
      float d = hsum(acc[r][mt]);
      const int8_t* qr = reinterpret_cast<const int8_t*>(c.q + (n0 + r) * c.qrow);
      const float* xr = c.xf + (m0 + mt) * c.xs;
      for (int64_t kk = k; kk < c.K; ++kk) d += xr[kk] * float(qr[kk]);
      res[r][mt] = rs.s[r][0] * d + (c.xsum ? rs.m[r][0] * c.xsum[m0 + mt] : 0.f);
    }
  store_tile<R, MT>(c, n0, m0, res);
}

FQ_DEFINE_ROWS(rows_int4, int4_tile)
FQ_DEFINE_ROWS(rows_int8g, int8g_tile)
FQ_DEFINE_ROWS(rows_int8c, int8c_tile)

}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------------
// AVX-512 variant.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace avx512 {

#ifndef FQ_R512
#define FQ_R512 8
#endif
constexpr int kRmax = FQ_R512;
constexpr int kMTmax = 4;

FI_INLINE void cvt_f16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(dst + i, mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, src + i)));
  }
}
FQ_DEFINE_ROW_SCALES()

// The four horizontal sums of a, b, c, d.
FI_INLINE __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
  const __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  const __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// res[r][mt] = horizontal sum of acc[r][mt] (then + add[r][mt] lane-wise first, when add is given).
template <int R, int MT>
FI_INLINE void reduce_tile(const __m512 (&acc)[R][MT], float (&res)[R][MT]) {
  for (int mt = 0; mt < MT; ++mt) {
    int r = 0;
    for (; r + 4 <= R; r += 4) {
      alignas(16) float t[4];
      _mm_store_ps(t, hsum4(acc[r][mt], acc[r + 1][mt], acc[r + 2][mt], acc[r + 3][mt]));
      for (int i = 0; i < 4; ++i) res[r + i][mt] = t[i];
    }
    for (; r < R; ++r) res[r][mt] = _mm512_reduce_add_ps(acc[r][mt]);
  }
}

template <int R, int MT, int A>
FI_INLINE void reduce_tile(const __m512 (&acc)[R][MT][A], float (&res)[R][MT]) {
  __m512 sum[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) sum[r][mt] = A == 2 ? _mm512_add_ps(acc[r][mt][0], acc[r][mt][A - 1]) : acc[r][mt][0];
  reduce_tile<R, MT>(sum, res);
}

// The fp32 tiles' common start: zeroed accumulators, the R weight rows from n0 and the MT fp32 x rows from m0.
template <int R, int MT, int A>
FI_INLINE void tile_begin(const Ctx& c, int64_t n0, int64_t m0, __m512 (&acc)[R][MT][A], const uint8_t* (&qr)[R],
                          const float* (&xr)[MT]) {
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt)
      for (int a = 0; a < A; ++a) acc[r][mt][a] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) qr[r] = c.q + (n0 + r) * c.qrow;
  for (int mt = 0; mt < MT; ++mt) xr[mt] = c.xf + (m0 + mt) * c.xs;
}

// int4, x split even | odd per 32-block. The table of row r for group gi holds w for q = 0..15; VPERMPS
// reads index bits 3:0, so the zero-extended byte indexes its low nibble directly.
template <int R, int MT, int GS>
FI_INLINE void int4_tile(const Ctx& c, int64_t n0, int64_t m0, const RowScales& rs) {
  constexpr int A = MT == 1 ? 2 : 1;  // a second accumulator chain when there is one row of x
  __m512 acc[R][MT][A];
  const uint8_t* qr[R];
  const float* xr[MT];
  tile_begin(c, n0, m0, acc, qr, xr);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t g = GS ? GS : c.g;
  for (int64_t gi = 0; gi < c.G; ++gi) {
    __m512 tbl[R];
    for (int r = 0; r < R; ++r)  // q * s, then + m: the reference's two roundings
      tbl[r] = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(rs.s[r][gi])), _mm512_set1_ps(rs.m[r][gi]));
    const int64_t k0 = gi * g;
    for (int64_t k = k0; k < k0 + g; k += 32) {
      __m512 xe[MT], xo[MT];
      for (int mt = 0; mt < MT; ++mt) {
        xe[mt] = _mm512_loadu_ps(xr[mt] + k);
        xo[mt] = _mm512_loadu_ps(xr[mt] + k + 16);
      }
      if ((k & 127) == 0) prefetch_rows<R>(qr, k / 2);
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + k / 2)));
        const __m512 we = _mm512_permutexvar_ps(b, tbl[r]);
        const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tbl[r]);
        for (int mt = 0; mt < MT; ++mt) {
          acc[r][mt][0] = _mm512_fmadd_ps(xe[mt], we, acc[r][mt][0]);
          acc[r][mt][A - 1] = _mm512_fmadd_ps(xo[mt], wo, acc[r][mt][A - 1]);
        }
      }
    }
  }
  float res[R][MT];
  reduce_tile(acc, res);
  store_tile<R, MT>(c, n0, m0, res);
}

// int8 with groups (g % 32 == 0): exact w = q * s + m.
template <int R, int MT, int GS>
FI_INLINE void int8g_tile(const Ctx& c, int64_t n0, int64_t m0, const RowScales& rs) {
  constexpr int A = MT == 1 ? 2 : 1;
  __m512 acc[R][MT][A];
  const uint8_t* qr[R];
  const float* xr[MT];
  tile_begin(c, n0, m0, acc, qr, xr);
  const bool has_m = c.mins != nullptr;
  const int64_t g = GS ? GS : c.g;
  for (int64_t gi = 0; gi < c.G; ++gi) {
    __m512 s[R], m[R];
    for (int r = 0; r < R; ++r) {
      s[r] = _mm512_set1_ps(rs.s[r][gi]);
      m[r] = _mm512_set1_ps(rs.m[r][gi]);
    }
    const int64_t k0 = gi * g;
    for (int64_t k = k0; k < k0 + g; k += 32) {
      __m512 x0[MT], x1[MT];
      for (int mt = 0; mt < MT; ++mt) {
        x0[mt] = _mm512_loadu_ps(xr[mt] + k);
        x1[mt] = _mm512_loadu_ps(xr[mt] + k + 16);
      }
      if ((k & 63) == 0) prefetch_rows<R>(qr, k);
      for (int r = 0; r < R; ++r) {
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + k))));
        const __m512 q1 =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + k + 16))));
        __m512 w0 = _mm512_mul_ps(q0, s[r]), w1 = _mm512_mul_ps(q1, s[r]);
        if (has_m) {
          w0 = _mm512_add_ps(w0, m[r]);
          w1 = _mm512_add_ps(w1, m[r]);
        }
        for (int mt = 0; mt < MT; ++mt) {
          acc[r][mt][0] = _mm512_fmadd_ps(x0[mt], w0, acc[r][mt][0]);
          acc[r][mt][A - 1] = _mm512_fmadd_ps(x1[mt], w1, acc[r][mt][A - 1]);
        }
      }
    }
  }
  float res[R][MT];
  reduce_tile(acc, res);
  store_tile<R, MT>(c, n0, m0, res);
}

// int8 per channel (one group of K, any K; the tail is masked): y = s * sum x q + m * sum x.
template <int R, int MT, int GS>
FI_INLINE void int8c_tile(const Ctx& c, int64_t n0, int64_t m0, const RowScales& rs) {
  constexpr int A = MT == 1 ? 2 : 1;
  __m512 acc[R][MT][A];
  const uint8_t* qr[R];
  const float* xr[MT];
  tile_begin(c, n0, m0, acc, qr, xr);
  const int64_t K = c.K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512 x0[MT], x1[MT];
    for (int mt = 0; mt < MT; ++mt) {
      x0[mt] = _mm512_loadu_ps(xr[mt] + k);
      x1[mt] = _mm512_loadu_ps(xr[mt] + k + 16);
    }
    if ((k & 63) == 0) prefetch_rows<R>(qr, k);
    for (int r = 0; r < R; ++r) {
      const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + k))));
      const __m512 q1 =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + k + 16))));
      for (int mt = 0; mt < MT; ++mt) {
        acc[r][mt][0] = _mm512_fmadd_ps(x0[mt], q0, acc[r][mt][0]);
        acc[r][mt][A - 1] = _mm512_fmadd_ps(x1[mt], q1, acc[r][mt][A - 1]);
      }
    }
  }
  for (; k < K; k += 16) {  // 0, 1 or 2 steps of up to 16 (masked)
    const int64_t left = K - k;
    const __mmask16 mk = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
    __m512 xv[MT];
    for (int mt = 0; mt < MT; ++mt) xv[mt] = _mm512_maskz_loadu_ps(mk, xr[mt] + k);
    for (int r = 0; r < R; ++r) {
      const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, qr[r] + k)));
      for (int mt = 0; mt < MT; ++mt) acc[r][mt][0] = _mm512_fmadd_ps(xv[mt], qf, acc[r][mt][0]);
    }
  }
  float res[R][MT];
  reduce_tile(acc, res);
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) res[r][mt] = rs.s[r][0] * res[r][mt] + (c.xsum ? rs.m[r][0] * c.xsum[m0 + mt] : 0.f);
  store_tile<R, MT>(c, n0, m0, res);
}

FQ_DEFINE_ROWS(rows_int4, int4_tile)
FQ_DEFINE_ROWS(rows_int8g, int8g_tile)
FQ_DEFINE_ROWS(rows_int8c, int8c_tile)

// 16 fp32 -> 16 bf16 / fp16 (rounded to nearest even; weights are finite, so no NaN care), in a __m256i.
FI_INLINE __m256i to16(DType dt, __m512 v) {
  if (dt == DType::kFloat16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// Row n of the weight into dst (row i of it), the exact fp32 values, rounded once when dt is bf16 / fp16.
// Needs g % 32 == 0; other groups take the generic row. int4 to 16 bits: nibbles index a 16-entry table of
// the group's 16-bit weights with one VPERMW per 32 weights.
__attribute__((noinline)) void dequant_row(const Ctx& c, int64_t n, float* sbuf, void* dst, DType dt, int64_t i) {
  const RowScales rs = row_scales(c, n, 1, sbuf);
  const uint8_t* q = c.q + n * c.qrow;
  const int64_t K = c.K, g = c.g, base = i * K;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i nib2 = _mm512_set1_epi32(0x000f000f);
  float* d32 = static_cast<float*>(dst) + base;
  uint16_t* d16 = static_cast<uint16_t*>(dst) + base;
  for (int64_t gi = 0; gi < c.G; ++gi) {
    const __m512 s = _mm512_set1_ps(rs.s[0][gi]), m = _mm512_set1_ps(rs.m[0][gi]);
    const int64_t k0 = gi * g;
    if (c.qrow != K) {
      const __m512 tbl = _mm512_add_ps(_mm512_mul_ps(iota, s), m);
      if (dt == DType::kFloat32) {
        for (int64_t k = k0; k < k0 + g; k += 32) {
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
          const __m512 we = _mm512_permutexvar_ps(b, tbl);
          const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tbl);
          _mm512_storeu_ps(d32 + k, _mm512_permutex2var_ps(we, lo_idx, wo));
          _mm512_storeu_ps(d32 + k + 16, _mm512_permutex2var_ps(we, hi_idx, wo));
        }
      } else {
        const __m512i t16 = _mm512_castsi256_si512(to16(dt, tbl));
        for (int64_t k = k0; k < k0 + g; k += 32) {
          // dword j = byte j; words (lo nibble, hi nibble) = (b | b << 12) & 0x000f000f: natural order.
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
          const __m512i idx = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), nib2, 0xa8);
          _mm512_storeu_si512(d16 + k, _mm512_permutexvar_epi16(idx, t16));
        }
      }
    } else {
      for (int64_t k = k0; k < k0 + g; k += 16) {
        const __m512 qf =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
        const __m512 w = _mm512_add_ps(_mm512_mul_ps(qf, s), m);
        if (dt == DType::kFloat32) _mm512_storeu_ps(d32 + k, w);
        else _mm256_storeu_si256(reinterpret_cast<__m256i*>(d16 + k), to16(dt, w));
      }
    }
  }
}

}  // namespace avx512

// ---------------------------------------------------------------------------------------------------------
// AVX-512 BF16 int4 kernel for bf16 x: the nibbles become the bf16 numbers 128 + q (bits 0x4300 | q, exact),
// so one VDPBF16PS takes 32 weights against 32 bf16 inputs (exact products, fp32 sums), with no table:
//   y = sum_g s_g * dot_g + sum_g (m_g - 128 s_g) * xsum_g,   dot_g = sum_{k in g} x_k (128 + q_k).
// The bytes are spread with VPMULTISHIFTQB (AVX512_VBMI), which every AVX512_BF16 CPU but Cooper Lake has.
#pragma GCC push_options
#pragma GCC target("avx512bf16,avx512vbmi")
namespace bf16dp {

// x in 32-blocks of bf16 pairs: dword p of a block = the pair (2 beta, 2 beta + 1), beta = beta_of(p): the
// order the multishift below produces from the block's 16 bytes broadcast to the four 128-bit lanes.
constexpr int beta_of(int p) { return 8 * ((p >> 1) & 1) + 2 * (p >> 2) + (p & 1); }

// Prepared x: xb [M, K] bf16 pairs as above; xs [M, G] fp32 group sums. x itself is bf16 [M, K] (stride).
void prep(const QuantLinearParams& p, uint16_t* xb, float* xs) {
  const int64_t K = p.K, g = p.group_size, G = K / g;
  __m512i idx;
  {
    alignas(64) int32_t t[16];
    for (int i = 0; i < 16; ++i) t[i] = beta_of(i);
    idx = _mm512_load_si512(t);
  }
  const __m512i hi_mask = _mm512_set1_epi32(int32_t(0xffff0000u));
  for (int64_t m = 0; m < p.M; ++m) {
    const uint16_t* x = static_cast<const uint16_t*>(p.x) + m * p.x_stride;
    uint16_t* d = xb + m * K;
    for (int64_t gi = 0; gi < G; ++gi) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = gi * g; k < (gi + 1) * g; k += 32) {
        const __m512i v = _mm512_loadu_si512(x + k);
        _mm512_storeu_si512(d + k, _mm512_permutexvar_epi32(idx, v));
        sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                                               _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask))));
      }
      xs[m * G + gi] = _mm512_reduce_add_ps(sum);
    }
  }
}

template <int R, int MT, int GS>
FI_INLINE void int4_tile(const Ctx& c, int64_t n0, int64_t m0, const RowScales& rs) {
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm512_setzero_ps();
  // Qword j of the output takes bytes 2 (j / 2) and 2 (j / 2) + 1 of input qword j % 2 (one 128-bit lane):
  // its words are lo, -, hi, -, lo, -, hi, - nibbles of those bytes (bits 3:0 kept by the ternlog).
  alignas(64) static const uint8_t kCtrl[64] = {
      0,  0, 4,  0, 8,  0, 12, 0, 0,  0, 4,  0, 8,  0, 12, 0, 16, 0, 20, 0, 24, 0, 28, 0, 16, 0, 20, 0, 24, 0, 28, 0,
      32, 0, 36, 0, 40, 0, 44, 0, 32, 0, 36, 0, 40, 0, 44, 0, 48, 0, 52, 0, 56, 0, 60, 0, 48, 0, 52, 0, 56, 0, 60, 0};
  const __m512i ctrl = _mm512_load_si512(kCtrl);
  const __m512i nib = _mm512_set1_epi32(0x000f000f), one28 = _mm512_set1_epi32(0x43004300);
  const __m512 zero = _mm512_setzero_ps();
  const uint8_t* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = c.q + (n0 + r) * c.qrow;
  const uint16_t* xr[MT];
  for (int mt = 0; mt < MT; ++mt) xr[mt] = c.xb + (m0 + mt) * c.xs;
  const int64_t g = GS ? GS : c.g;
  for (int64_t gi = 0; gi < c.G; ++gi) {
    __m512 s[R];
    for (int r = 0; r < R; ++r) s[r] = _mm512_set1_ps(rs.s[r][gi]);
    const int64_t k0 = gi * g;
    for (int64_t k = k0; k < k0 + g; k += 32) {
      __m512bh xv[MT];
      for (int mt = 0; mt < MT; ++mt) xv[mt] = (__m512bh)_mm512_loadu_si512(xr[mt] + k);
      if ((k & 127) == 0) prefetch_rows<R>(qr, k / 2);
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + k / 2)));
        const __m512bh w = (__m512bh)_mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(ctrl, b), nib, one28, 0xea);
        for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, xv[mt], w), s[r], acc[r][mt]);
      }
    }
  }
  // + sum_g (m_g - 128 s_g) xsum_g, lane-wise into the accumulators before their horizontal sums.
  const __m512 k128 = _mm512_set1_ps(128.f);
  for (int64_t g0 = 0; g0 < c.G; g0 += 16) {
    const __mmask16 mk = c.G - g0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (c.G - g0)) - 1u);
    __m512 xs[MT];
    for (int mt = 0; mt < MT; ++mt) xs[mt] = _mm512_maskz_loadu_ps(mk, c.xgs + (m0 + mt) * c.G + g0);
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(mk, rs.s[r] + g0), k128,
                                        _mm512_maskz_loadu_ps(mk, rs.m[r] + g0));
      for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm512_fmadd_ps(d, xs[mt], acc[r][mt]);
    }
  }
  float res[R][MT];
  avx512::reduce_tile(acc, res);
  store_tile<R, MT>(c, n0, m0, res);
}

// Group sums xs [M, G] (fp32) of bf16 x [M, K] (row stride x_stride), for the int8 kernel (x used in place).
void prep8(const QuantLinearParams& p, float* xs) {
  const int64_t K = p.K, g = p.group_size, G = K / g;
  const __m512i hi_mask = _mm512_set1_epi32(int32_t(0xffff0000u));
  for (int64_t m = 0; m < p.M; ++m) {
    const uint16_t* x = static_cast<const uint16_t*>(p.x) + m * p.x_stride;
    for (int64_t gi = 0; gi < G; ++gi) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = gi * g; k < (gi + 1) * g; k += 32) {
        const int64_t left = (gi + 1) * g - k;
        const __mmask32 mk = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1u);
        const __m512i v = _mm512_maskz_loadu_epi16(mk, x + k);
        sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                                               _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask))));
      }
      xs[m * G + gi] = _mm512_reduce_add_ps(sum);
    }
  }
}

// int8 for bf16 x: q = 16 uh + l - 128 with u = q ^ 0x80 = 16 uh + l; the words 0x4500 | uh (= 2048 + 16 uh)
// and 0x4300 | l (= 128 + l) are exact bf16, and x is read in place (natural pairs), so two VDPBF16PS take 32
// weights: D_g = sum x (q + 2304), y = sum_g s_g D_g + sum_g (m_g - 2304 s_g) xsum_g. GS = -1: one group
// of K (per channel; the tail of K is masked), else g = GS (0: run-time g, a multiple of 32).
template <int R, int MT, int GS>
FI_INLINE void int8_tile(const Ctx& c, int64_t n0, int64_t m0, const RowScales& rs) {
  constexpr bool kChan = GS < 0;
  __m512 acc[R][MT], acc2[R][MT];  // per channel: the hi / lo chains of the whole row
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) acc[r][mt] = acc2[r][mt] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi16(0x000f), lo_c = _mm512_set1_epi16(0x4300), hi_c = _mm512_set1_epi16(0x4508);
  const __m512 zero = _mm512_setzero_ps();
  const uint8_t* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = c.q + (n0 + r) * c.qrow;
  const uint16_t* xr[MT];
  for (int mt = 0; mt < MT; ++mt) xr[mt] = c.xb + (m0 + mt) * c.xs;
  const int64_t g = kChan ? c.K : GS ? GS : c.g;
  for (int64_t gi = 0; gi < c.G; ++gi) {
    __m512 s[R];
    if (!kChan)
      for (int r = 0; r < R; ++r) s[r] = _mm512_set1_ps(rs.s[r][gi]);
    const int64_t k0 = gi * g, k1 = k0 + g;
    for (int64_t k = k0; k < k1; k += 32) {
      __mmask32 mk = __mmask32(0xffffffffu);
      if (kChan && k1 - k < 32) mk = __mmask32((1u << (k1 - k)) - 1u);
      __m512bh xv[MT];
      for (int mt = 0; mt < MT; ++mt) xv[mt] = (__m512bh)_mm512_maskz_loadu_epi16(mk, xr[mt] + k);
      if ((k & 63) == 0) prefetch_rows<R>(qr, k);
      for (int r = 0; r < R; ++r) {
        const __m512i u = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mk, qr[r] + k));
        const __m512bh wl = (__m512bh)_mm512_ternarylogic_epi32(u, nib, lo_c, 0xea);  // (u & 15) | 0x4300
        const __m512bh wh =
            (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(u, 4), nib, hi_c, 0x6a);  // (u>>4 & 15) ^ 0x4508
        for (int mt = 0; mt < MT; ++mt) {
          if (kChan) {
            acc[r][mt] = _mm512_dpbf16_ps(acc[r][mt], xv[mt], wh);
            acc2[r][mt] = _mm512_dpbf16_ps(acc2[r][mt], xv[mt], wl);
          } else {
            acc[r][mt] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_dpbf16_ps(zero, xv[mt], wh), xv[mt], wl), s[r],
                                         acc[r][mt]);
          }
        }
      }
    }
  }
  const __m512 k2304 = _mm512_set1_ps(2304.f);
  if (kChan) {
    for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_set1_ps(rs.s[r][0]);
      const __m512 d = _mm512_set1_ps(rs.m[r][0] - 2304.f * rs.s[r][0]);
      for (int mt = 0; mt < MT; ++mt)  // s D + (m - 2304 s) xsum, with xsum spread over lane 0
        acc[r][mt] = _mm512_fmadd_ps(_mm512_add_ps(acc[r][mt], acc2[r][mt]), sv,
                                     _mm512_maskz_mov_ps(1, _mm512_mul_ps(d, _mm512_set1_ps(c.xgs[m0 + mt]))));
    }
  } else {
    for (int64_t g0 = 0; g0 < c.G; g0 += 16) {
      const __mmask16 mk = c.G - g0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (c.G - g0)) - 1u);
      __m512 xs[MT];
      for (int mt = 0; mt < MT; ++mt) xs[mt] = _mm512_maskz_loadu_ps(mk, c.xgs + (m0 + mt) * c.G + g0);
      for (int r = 0; r < R; ++r) {
        const __m512 d = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(mk, rs.s[r] + g0), k2304,
                                          _mm512_maskz_loadu_ps(mk, rs.m[r] + g0));
        for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm512_fmadd_ps(d, xs[mt], acc[r][mt]);
      }
    }
  }
  float res[R][MT];
  avx512::reduce_tile(acc, res);
  store_tile<R, MT>(c, n0, m0, res);
}

constexpr int kRmax = 4;
constexpr int kMTmax = 4;

template <bool I8, int R, int MT, int GS>
FI_INLINE void tile(const Ctx& c, int64_t n0, int64_t m0, const RowScales& rs) {
  if (I8) int8_tile<R, MT, GS>(c, n0, m0, rs);
  else int4_tile<R, MT, GS>(c, n0, m0, rs);
}

template <bool I8, int R, int GS>
FI_INLINE void block(const Ctx& c, int64_t n0, float* sbuf) {
  const RowScales rs = avx512::row_scales(c, n0, R, sbuf);
  for (int64_t m0 = 0; m0 < c.M; m0 += kMTmax) {
    switch (std::min<int64_t>(kMTmax, c.M - m0)) {
      case 1: tile<I8, R, 1, GS>(c, n0, m0, rs); break;
      case 2: tile<I8, R, 2, GS>(c, n0, m0, rs); break;
      case 3: tile<I8, R, 3, GS>(c, n0, m0, rs); break;
      default: tile<I8, R, 4, GS>(c, n0, m0, rs); break;
    }
  }
}

template <bool I8, int GS>
FI_INLINE void rows_gs(const Ctx& c, int64_t n0, int64_t n1) {
  float* sbuf = scales_buf(c, kRmax);
  int64_t n = n0;
  for (; n + kRmax <= n1; n += kRmax) block<I8, kRmax, GS>(c, n, sbuf);
  for (; n < n1; ++n) block<I8, 1, GS>(c, n, sbuf);
}

__attribute__((noinline)) void rows_int4(const Ctx& c, int64_t n0, int64_t n1) {
  if (c.g == 32) rows_gs<false, 32>(c, n0, n1);
  else rows_gs<false, 0>(c, n0, n1);
}

__attribute__((noinline)) void rows_int8(const Ctx& c, int64_t n0, int64_t n1) {
  if (c.G == 1) rows_gs<true, -1>(c, n0, n1);
  else if (c.g == 32) rows_gs<true, 32>(c, n0, n1);
  else rows_gs<true, 0>(c, n0, n1);
}

// avx512::dequant_row for a bf16 destination with VCVTNEPS2BF16 (round to nearest even, as the integer
// rounding there; denormal weights would flush to zero, which no real scale produces). Needs g % 32 == 0.
__attribute__((noinline)) void dequant_row_bf16(const Ctx& c, int64_t n, float* sbuf, uint16_t* dst, int64_t i) {
  const RowScales rs = avx512::row_scales(c, n, 1, sbuf);
  const uint8_t* q = c.q + n * c.qrow;
  const int64_t K = c.K, g = c.g;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i nib2 = _mm512_set1_epi32(0x000f000f);
  uint16_t* d = dst + i * K;
  for (int64_t gi = 0; gi < c.G; ++gi) {
    const __m512 s = _mm512_set1_ps(rs.s[0][gi]), m = _mm512_set1_ps(rs.m[0][gi]);
    const int64_t k0 = gi * g;
    if (c.qrow != K) {
      const __m512i t16 = _mm512_castsi256_si512(
          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_mul_ps(iota, s), m)));
      for (int64_t k = k0; k < k0 + g; k += 32) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
        const __m512i idx = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), nib2, 0xa8);
        _mm512_storeu_si512(d + k, _mm512_permutexvar_epi16(idx, t16));
      }
    } else {
      for (int64_t k = k0; k < k0 + g; k += 32) {
        const __m512 q0 =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
        const __m512 q1 =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16))));
        const __m512 w0 = _mm512_add_ps(_mm512_mul_ps(q0, s), m), w1 = _mm512_add_ps(_mm512_mul_ps(q1, s), m);
        _mm512_storeu_si512(d + k, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
      }
    }
  }
}

// Mid-size M (bf16 x): each block of R weight rows is dequantized once to bf16 (one rounding of the exact
// fp32 weight, like the GEMM path) into a per-thread scratch [R, K] (L1/L2), then VDPBF16PS runs it against
// tiles of up to kMidMT rows of x (read in place).
constexpr int kMidMT = 6;

template <int R, int MT>
FI_INLINE void mid_tile(const Ctx& c, const uint16_t* w, int64_t n0, int64_t m0) {
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm512_setzero_ps();
  const int64_t K = c.K;  // a multiple of 32 here
  const uint16_t* xr[MT];
  for (int mt = 0; mt < MT; ++mt) xr[mt] = c.xb + (m0 + mt) * c.xs;
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    for (int mt = 0; mt < MT; ++mt) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr[mt] + k);
      for (int r = 0; r < R; ++r) acc[r][mt] = _mm512_dpbf16_ps(acc[r][mt], xv, wv[r]);
    }
  }
  float res[R][MT];
  avx512::reduce_tile(acc, res);
  store_tile<R, MT>(c, n0, m0, res);
}

template <int R>
FI_INLINE void mid_block(const Ctx& c, uint16_t* w, float* sbuf, int64_t n0) {
  for (int r = 0; r < R; ++r) dequant_row_bf16(c, n0 + r, sbuf, w, r);
  for (int64_t m0 = 0; m0 < c.M; m0 += kMidMT) {
    switch (std::min<int64_t>(kMidMT, c.M - m0)) {
      case 1: mid_tile<R, 1>(c, w, n0, m0); break;
      case 2: mid_tile<R, 2>(c, w, n0, m0); break;
      case 3: mid_tile<R, 3>(c, w, n0, m0); break;
      case 4: mid_tile<R, 4>(c, w, n0, m0); break;
      case 5: mid_tile<R, 5>(c, w, n0, m0); break;
      default: mid_tile<R, 6>(c, w, n0, m0); break;
    }
  }
}

__attribute__((noinline)) void rows_mid(const Ctx& c, int64_t n0, int64_t n1) {
  uint16_t* w = reinterpret_cast<uint16_t*>(thread_buf(2, size_t(kRmax * c.K / 2 + 16)));
  float* sbuf = scales_buf(c, 1);
  int64_t n = n0;
  for (; n + kRmax <= n1; n += kRmax) mid_block<kRmax>(c, w, sbuf, n);
  for (; n < n1; ++n) mid_block<1>(c, w, sbuf, n);
}

}  // namespace bf16dp
#pragma GCC pop_options
#pragma GCC pop_options
#endif  // FI_X86

// ---------------------------------------------------------------------------------------------------------
// x preparation (once per call, on the calling thread).

// How prep_x orders each 32-block of x: as is, or even k then odd k (int4 on AVX2 / AVX-512).
enum class XLayout { kPlain, kEvenOdd };

FI_INLINE int64_t x_pos(XLayout l, int64_t k) {
  if (l == XLayout::kPlain) return k;
  const int64_t b = k & ~int64_t(31), i = k & 31;
  return b + ((i & 1) << 4) + (i >> 1);
}

// Rows of x as fp32 in `layout` (xf [M, K]) and, when xsum is given, their sums.
void prep_x(const QuantLinearParams& p, XLayout layout, float* xf, float* xsum) {
  const int64_t K = p.K;
  for (int64_t m = 0; m < p.M; ++m) {
    float* d = xf + m * K;
    const int64_t off = m * p.x_stride;
    if (layout != XLayout::kPlain) {
      for (int64_t k = 0; k < K; ++k) d[x_pos(layout, k)] = load_elem(p.x, p.x_dtype, off + k);
    } else {
      for (int64_t k = 0; k < K; ++k) d[k] = load_elem(p.x, p.x_dtype, off + k);
    }
    if (xsum) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += d[k];
      xsum[m] = s;
    }
  }
}

bool scale_dtype_ok(DType d) { return d == DType::kFloat32 || d == DType::kFloat16; }
bool x_dtype_ok(DType d) { return d == DType::kFloat32 || d == DType::kBFloat16 || d == DType::kFloat16; }

}  // namespace

bool quant_linear_prefers(int64_t M, DType x_dtype, int bits, int64_t group_size) {
  if (M <= kGemvMaxRows) return true;
  return FI_X86 && active_isa() == Isa::kAvx512Bf16 && x_dtype == DType::kBFloat16 && bits == 4 &&
         group_size % 32 == 0 && M <= kMidMaxRows;
}

bool quant_linear_supported(int bits, int64_t K, int64_t group_size) {
  if (K <= 0 || group_size <= 0 || K % group_size) return false;
  if (bits == 8) return group_size == K || group_size % 32 == 0;
  if (bits == 4) return group_size % 32 == 0;
  return false;
}

int quant_linear(const QuantLinearParams& p) {
  if (p.M == 0 || p.N == 0) return kOk;
  if (!p.x || !p.out || !p.qweight || !p.scales || p.M < 0 || p.N < 0 || p.K <= 0 || p.x_stride < p.K ||
      p.out_stride < p.N)
    return kBadArgs;
  if (!x_dtype_ok(p.x_dtype) || !scale_dtype_ok(p.scale_dtype)) return kBadDType;
  if (!quant_linear_supported(p.bits, p.K, p.group_size)) return kUnsupported;

  const Isa isa = active_isa();
  const bool simd = FI_X86 && isa != Isa::kGeneric;
  Ctx c;
  c.q = static_cast<const uint8_t*>(p.qweight);
  c.qrow = p.bits == 4 ? p.K / 2 : p.K;
  c.scales = p.scales;
  c.mins = p.mins;
  c.s16 = p.scale_dtype == DType::kFloat16;
  c.M = p.M, c.N = p.N, c.K = p.K, c.g = p.group_size, c.G = p.K / p.group_size;
  c.bias = p.bias;
  c.out = p.out;
  c.os = p.out_stride;
  c.odt = p.x_dtype;
  using RowsFn = void (*)(const Ctx&, int64_t, int64_t);
  RowsFn fn = generic::rows;
  int64_t rblock = 1;
  const XLayout layout = simd && p.bits == 4 ? XLayout::kEvenOdd : XLayout::kPlain;
  const bool want_xsum = p.bits == 8 && c.G == 1 && p.mins != nullptr;
#if FI_X86
  static const bool has_vbmi = __builtin_cpu_supports("avx512vbmi");
  // bf16 x on AVX512_BF16: the VDPBF16PS kernels (int4 needs VBMI too). Per-channel int8 takes them only
  // for one row and long rows (measured: 1.4-1.6x faster there; else the fp32 kernel is as fast or faster).
  const bool bf = isa == Isa::kAvx512Bf16 && p.x_dtype == DType::kBFloat16;
  const bool mid = bf && p.M > kGemvMaxRows && c.g % 32 == 0;
  const bool dp = bf && !mid && (p.bits == 4 ? has_vbmi : c.G > 1 || (p.M == 1 && p.K >= 2048));
#else
  const bool dp = false, mid = false;
#endif
  if (mid) {
#if FI_X86
    c.xb = static_cast<const uint16_t*>(p.x);  // in place
    c.xs = p.x_stride;
    fn = bf16dp::rows_mid;
    rblock = bf16dp::kRmax;
#endif
  } else if (dp) {
#if FI_X86
    if (p.bits == 4) {
      float* buf = thread_buf(0, size_t((p.M * p.K + 1) / 2 + p.M * c.G));
      uint16_t* xb = reinterpret_cast<uint16_t*>(buf);
      c.xgs = buf + (p.M * p.K + 1) / 2;
      bf16dp::prep(p, xb, buf + (p.M * p.K + 1) / 2);
      c.xb = xb;
      c.xs = p.K;
      fn = bf16dp::rows_int4;
    } else {
      float* xgs = thread_buf(0, size_t(p.M * c.G));
      bf16dp::prep8(p, xgs);
      c.xgs = xgs;
      c.xb = static_cast<const uint16_t*>(p.x);  // in place
      c.xs = p.x_stride;
      fn = bf16dp::rows_int8;
    }
    rblock = bf16dp::kRmax;
#endif
  } else if (p.x_dtype == DType::kFloat32 && layout == XLayout::kPlain && !want_xsum) {
    c.xf = static_cast<const float*>(p.x);  // used in place
    c.xs = p.x_stride;
  } else {
    float* buf = thread_buf(0, size_t(p.M * p.K + p.M));
    prep_x(p, layout, buf, want_xsum ? buf + p.M * p.K : nullptr);
    c.xf = buf;
    c.xs = p.K;
    c.xsum = want_xsum ? buf + p.M * p.K : nullptr;
  }

#if FI_X86
  if (dp || mid) {
  } else if (isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16) {
    fn = p.bits == 4 ? avx512::rows_int4 : c.G == 1 ? avx512::rows_int8c : avx512::rows_int8g;
    rblock = avx512::kRmax;
  } else if (isa == Isa::kAvx2) {
    fn = p.bits == 4 ? avx2::rows_int4 : c.G == 1 ? avx2::rows_int8c : avx2::rows_int8g;
    rblock = avx2::kRmax;
  }
#endif
  const int nthreads = resolve_threads(p.num_threads);
  const int64_t nblocks = (p.N + rblock - 1) / rblock;
  // Small layers run on one thread (waking the others costs more than it saves; measured at M = 1: 192x576
  // 25% faster on one thread, 576x576 even).
  const bool par = nthreads > 1 && nblocks > 1 && p.N * p.K * (p.M + 3) >= (int64_t(1) << 20);
  const int nt = par ? int(std::min<int64_t>(nthreads, nblocks)) : 1;
  parallel_ranges(p.N, rblock, nt, [&](int64_t n0, int64_t n1) { fn(c, n0, n1); });
  return kOk;
}

int quant_dequantize(const QuantDequantParams& p) {
  if (p.n1 <= p.n0) return kOk;
  if (!p.qweight || !p.scales || !p.dst || p.n0 < 0 || p.n1 > p.N || p.K <= 0 || p.group_size <= 0 ||
      p.K % p.group_size || (p.bits != 4 && p.bits != 8) || (p.bits == 4 && p.group_size % 2))
    return kBadArgs;
  if (!x_dtype_ok(p.dst_dtype) || !scale_dtype_ok(p.scale_dtype)) return kBadDType;
  Ctx c;
  c.q = static_cast<const uint8_t*>(p.qweight);
  c.qrow = p.bits == 4 ? p.K / 2 : p.K;
  c.scales = p.scales;
  c.mins = p.mins;
  c.s16 = p.scale_dtype == DType::kFloat16;
  c.N = p.N, c.K = p.K, c.g = p.group_size, c.G = p.K / p.group_size;
  const int nthreads = resolve_threads(p.num_threads);
  const int64_t rows = p.n1 - p.n0;
  const bool par = nthreads > 1 && rows > 1 && rows * p.K >= (int64_t(1) << 16);
#if FI_X86
  const Isa isa = active_isa();
  const bool vec = (isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16) && c.g % 32 == 0;
#else
  const bool vec = false;
#endif
#pragma omp parallel num_threads(nthreads) if (par)
  {
    float* sbuf = scales_buf(c, 1);
    float* w = vec || p.dst_dtype == DType::kFloat32 ? nullptr : thread_buf(2, size_t(p.K));
#pragma omp for schedule(static)
    for (int64_t n = p.n0; n < p.n1; ++n) {
      const int64_t i = n - p.n0;
#if FI_X86
      if (vec && isa == Isa::kAvx512Bf16 && p.dst_dtype == DType::kBFloat16) {
        bf16dp::dequant_row_bf16(c, n, sbuf, static_cast<uint16_t*>(p.dst), i);
        continue;
      }
      if (vec) {
        avx512::dequant_row(c, n, sbuf, p.dst, p.dst_dtype, i);
        continue;
      }
#endif
      const RowScales rs = generic::row_scales(c, n, 1, sbuf);
      if (p.dst_dtype == DType::kFloat32) {
        generic::dequant_row(c, n, rs, static_cast<float*>(p.dst) + i * p.K);
      } else {
        generic::dequant_row(c, n, rs, w);
        for (int64_t k = 0; k < p.K; ++k) store_elem(p.dst, p.dst_dtype, i * p.K + k, w[k]);
      }
    }
  }
  return kOk;
}

const char* quant_error_string(int code) {
  switch (code) {
    case kOk: return "ok";
    case kBadArgs: return "null pointer, bad size or bad stride";
    case kUnsupported: return "unsupported bits / group_size (int8: per channel or group % 32; int4: group % 32)";
    case kBadDType: return "unsupported dtype (x: fp32/bf16/fp16; scales and mins: fp32/fp16)";
    default: return "unknown error";
  }
}

}  // namespace cpu
}  // namespace fastinfer
