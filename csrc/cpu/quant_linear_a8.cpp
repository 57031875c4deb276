// W4A8 / W8A8 linear layers on the CPU: int4 or int8 weights x int8-quantized activations, integer dot products
// per block of 32 (raw pointers, no torch). See fastinfer/cpu_quant_a8.h for the contract.
//
// The activation row is quantized once per call on the calling thread (fp32 x on x86: AVX2 code, else scalar; both
// round x * 127 / amax to nearest even, so every variant sees the same int8 values; only the fp32 order of the
// group sums differs), each 32-block stored even k then odd k to match the nibbles: a weight block is 16 bytes, its
// low nibbles (even k) and high nibbles (odd k) masked apart, and one VPMADDUBSW (u8 weight x s8 activation, pairs
// summed to i16: at most 2 x 15 x 127, no saturation) + VPMADDWD (pairs to i32) give the block's dot in 8 i32
// lanes (AVX-512: two blocks in 16 lanes), converted and scaled by d_block x scale_group into fp32 accumulators.
// AVX2 int4 takes two blocks per 32-byte load instead, x stored to match (prep_row's pair layout; see tile_int4).
// int8 weights (natural order, signed): VPMADDUBSW(|w|, x * sign(w)), llama.cpp's Q8 x Q8 trick
// (|w| <= 128, so the i16 pair sums stay below 2^15), with a scale per half-block for groups of 16 (Q6_K).
// The mins term uses the exact fp32 group sums of x. Tiles: R output rows x MT rows of x; OpenMP
// threads take contiguous ranges of output rows.
#include "fastinfer/cpu_quant_a8.h"
#include "fastinfer/cpu_common.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastinfer {
namespace cpu {
namespace {

enum A8Error : int { kOk = 0, kBadArgs = -1, kBadGroup = -2, kBadDType = -3 };

constexpr int64_t kBlock = 32;
constexpr int64_t kPrefetchBytes = 4096;

// Everything the tiles read, fixed per call.
struct Job {
  const QuantLinearA8Params* p;
  const int8_t* xq;    // [M, K]: int4 weights: each 32-block even k then odd k; int8: natural order
  const float* d;      // [M, B] block scales of x
  const float* gsum;   // [M, G] exact fp32 group sums of x
  const int32_t* gh;   // [B, 2] group of each half-block (16 inputs)
  const void* s;       // [N, G] scales, fp32 or fp16 (f16)
  const void* mn;      // [N, G] mins like the scales, or null
  bool f16;
  int64_t M, N, K, B, G;
};

// Row m of x: int8 blocks (even | odd for int4 weights, natural for int8), their scales, and the exact group sums.
// pairs (the AVX2 int4 layout): blocks 2i and 2i + 1 as 64 bytes [even k of 2i | even k of 2i + 1 | odd k of 2i |
// odd k of 2i + 1], matching one 32-byte load of both blocks' codes (low nibbles, then high); an odd last block
// stays [even | odd].
void prep_row(const QuantLinearA8Params& p, int64_t m, int8_t* xq, float* d, float* gsum, bool pairs) {
  const int64_t K = p.K, B = K / kBlock, paired = pairs ? B - B % 2 : 0;
  const bool split = p.bits == 4;
  std::fill(gsum, gsum + K / p.group, 0.f);
  float xb[kBlock];
  for (int64_t b = 0; b < B; ++b) {
    float amax = 0.f, half[2] = {0.f, 0.f};
    for (int64_t i = 0; i < kBlock; ++i) {
      xb[i] = load_elem(p.x, p.dtype, m * p.x_stride + b * kBlock + i);
      amax = std::max(amax, std::fabs(xb[i]));
      half[i / 16] += xb[i];
    }
    for (int h = 0; h < 2; ++h) gsum[(b * kBlock + 16 * h) / p.group] += half[h];
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    d[b] = amax / 127.f;
    int8_t* o = xq + b * kBlock;
    for (int64_t i = 0; i < kBlock; ++i) {
      const int64_t pos = !split ? i : b < paired ? (b % 2 ? -kBlock + 16 : 0) + (i % 2) * kBlock + i / 2
                                                  : (i % 2) * 16 + i / 2;
      o[pos] = int8_t(std::nearbyint(xb[i] * id));
    }
  }
}

// fp32 scales and mins [G] of up to 4 consecutive output rows: pointers into fp32 tables, or converted (fp16
// tables) into a per-thread buffer by the variant's own F16C code. m[r] is null without mins.
struct Tables {
  const float* s[4];
  const float* m[4];
};

FI_INLINE float* table_buf(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

template <class Cvt>
FI_INLINE Tables tables(const Job& j, int64_t n0, int R, Cvt cvt) {
  Tables t{};
  float* buf = j.f16 ? table_buf(size_t(2 * R * j.G)) : nullptr;
  for (int r = 0; r < R; ++r) {
    const int64_t off = (n0 + r) * j.G;
    for (int which = 0; which < 2; ++which) {
      const void* src = which ? j.mn : j.s;
      const float** dst = which ? t.m : t.s;
      if (!src) {
        dst[r] = nullptr;
      } else if (!j.f16) {
        dst[r] = static_cast<const float*>(src) + off;
      } else {
        float* o = buf + (2 * r + which) * j.G;
        cvt(static_cast<const uint16_t*>(src) + off, o, j.G);
        dst[r] = o;
      }
    }
  }
  return t;
}

// The mins term of rows n0 .. n0 + R - 1 for x rows m0 .. m0 + MT - 1.
template <int R, int MT>
FI_INLINE void mins_term(const Job& j, const Tables& t, int64_t m0, float (&res)[R][MT]) {
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) {
      float acc = 0.f;
      if (t.m[r])
        for (int64_t g = 0; g < j.G; ++g) acc += t.m[r][g] * j.gsum[(m0 + mt) * j.G + g];
      res[r][mt] = acc;
    }
}

template <int R, int MT>
FI_INLINE void store(const Job& j, int64_t n0, int64_t m0, const float (&res)[R][MT]) {
  const QuantLinearA8Params& p = *j.p;
  for (int r = 0; r < R; ++r) {
    const float bias = p.bias ? load_elem(p.bias, p.dtype, n0 + r) : 0.f;
    for (int mt = 0; mt < MT; ++mt) store_elem(p.out, p.dtype, (m0 + mt) * j.N + n0 + r, res[r][mt] + bias);
  }
}

// ------------------------------------------------------------------------------------------- generic (scalar)
namespace generic {
constexpr int kR = 1, kMT = 1;
void cvt(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

template <int R, int MT>
void tile(const Job& j, const Tables& t, int64_t n0, int64_t m0) {
  float res[R][MT];
  mins_term<R, MT>(j, t, m0, res);
  float acc = 0.f;
  const bool int4 = j.p->bits == 4;
  const uint8_t* q = j.p->qweight + n0 * (int4 ? j.K / 2 : j.K);
  const int8_t* xq = j.xq + m0 * j.K;
  for (int64_t b = 0; b < j.B; ++b) {
    for (int h = 0; h < 2; ++h) {  // half-blocks: 16 inputs (int4: even / odd codes; int8: k in order)
      int32_t dot = 0;
      for (int64_t i = 0; i < 16; ++i) {
        const int32_t w = int4 ? (h ? q[b * 16 + i] >> 4 : q[b * 16 + i] & 15) : int8_t(q[b * kBlock + 16 * h + i]);
        dot += w * xq[b * kBlock + 16 * h + i];
      }
      acc += float(dot) * (j.d[m0 * j.B + b] * t.s[0][j.gh[2 * b + h]]);
    }
  }
  res[0][0] += acc;
  store<R, MT>(j, n0, m0, res);
}
}  // namespace generic

#if FI_X86
// ------------------------------------------------------------------------------------------------------- AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr int kR = 4, kMT = 2;
void cvt(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

// prep_row for an fp32 row, 32 inputs per step: the same int8 codes, scales and layouts as the scalar prep_row.
void prep_row_f32(const QuantLinearA8Params& p, int64_t m, int8_t* xq, float* d, float* gsum, bool pairs) {
  const int64_t B = p.K / kBlock, paired = pairs ? B - B % 2 : 0;
  const bool split = p.bits == 4;
  const float* x = static_cast<const float*>(p.x) + m * p.x_stride;
  std::fill(gsum, gsum + p.K / p.group, 0.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs' dword order back to k order
  const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                              0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t b = 0; b < B; ++b) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + b * kBlock + 8 * i);
    const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    for (int hh = 0; hh < 2; ++hh)
      gsum[(b * kBlock + 16 * hh) / p.group] += Avx2Vec::hsum(_mm256_add_ps(v[2 * hh], v[2 * hh + 1]));
    const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    d[b] = amax / 127.f;
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));  // nearest even, as nearbyint
    __m256i c = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    c = _mm256_permutevar8x32_epi32(c, order);  // the 32 codes in k order
    int8_t* o = xq + b * kBlock;
    if (!split) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), c);
      continue;
    }
    c = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(c, evens_odds), 0xd8);  // [even k | odd k]
    if (b < paired) {  // [even 2i | even 2i + 1 | odd 2i | odd 2i + 1]
      int8_t* pair = xq + (b & ~int64_t(1)) * kBlock + (b % 2) * 16;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(pair), _mm256_castsi256_si128(c));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(pair + kBlock), _mm256_extracti128_si256(c, 1));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), c);
    }
  }
}

// Scales of the two half-blocks of a block as the i32 lanes of block_dot hold them: a in lanes 0-3, b in 4-7.
FI_INLINE __m256 half_scales(float a, float b) { return _mm256_set_m128(_mm_set1_ps(b), _mm_set1_ps(a)); }

// The 32 codes of one block as u8, low nibbles (even k) then high nibbles (odd k).
FI_INLINE __m256i codes(const uint8_t* q) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), m = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// i32 dot lanes of one block: lanes 0-3 the first 16 bytes, 4-7 the second.
template <int BITS>
FI_INLINE __m256i block_dot(const uint8_t* q, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 4) return _mm256_madd_epi16(_mm256_maddubs_epi16(codes(q), x), ones);
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
}

// The mins term, 8 groups per FMA (the scalar form is a dependent chain per row: with K = 576 it cost about as much
// as a 4-row tile's dot products).
template <int R, int MT>
FI_INLINE void mins_term8(const Job& j, const Tables& t, int64_t m0, float (&res)[R][MT]) {
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) {
      res[r][mt] = 0.f;
      if (!t.m[r]) continue;
      const float* gs = j.gsum + (m0 + mt) * j.G;
      __m256 v = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= j.G; g += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(t.m[r] + g), _mm256_loadu_ps(gs + g), v);
      float acc = Avx2Vec::hsum(v);
      for (; g < j.G; ++g) acc += t.m[r][g] * gs[g];
      res[r][mt] = acc;
    }
}

// A tile's end: the mins term plus each accumulator's lanes (+ bias), stored.
template <int R, int MT>
FI_INLINE void finish(const Job& j, const Tables& t, int64_t n0, int64_t m0, const __m256 (&acc)[R][MT]) {
  float res[R][MT];
  mins_term8<R, MT>(j, t, m0, res);
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) res[r][mt] += Avx2Vec::hsum(acc[r][mt]);
  store<R, MT>(j, n0, m0, res);
}

// Scales of the blocks of one row, one per block (int4 groups span whole blocks): the fp32 table itself for groups of
// 32, else expanded from the groups into a per-thread buffer.
FI_INLINE const float* block_scales(const Job& j, const float* s, int r) {
  if (j.G == j.B) return s;
  thread_local std::vector<float> buf;  // a row of blocks for each of a tile's kR rows
  if (buf.size() < size_t(kR * j.B)) buf.resize(size_t(kR * j.B));
  float* o = buf.data() + r * j.B;
  for (int64_t b = 0; b < j.B; ++b) o[b] = s[j.gh[2 * b]];
  return o;
}

// int4 weights x the pair layout of prep_row: one 32-byte load holds blocks b and b + 1 (16 bytes each); its low
// nibbles times [even k of b | even k of b + 1] plus its high nibbles times [odd k of b | odd k of b + 1] (i16 sums
// of at most 4 x 15 x 127, no saturation) give i32 lanes 0-3 block b, 4-7 block b + 1. Eight blocks' scale
// products d_x x s_w are one vector multiply, spread to the pairs by VPERMPS. An odd last block runs as before.
template <int R, int MT>
FI_INLINE void tile_int4(const Job& j, const Tables& t, int64_t n0, int64_t m0) {
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm256_setzero_ps();
  const int64_t qrow = j.K / 2, paired = j.B - j.B % 2;
  const uint8_t* q = j.p->qweight + n0 * qrow;
  const float* sb[R];
  for (int r = 0; r < R; ++r) sb[r] = block_scales(j, t.s[r], r);
  const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  alignas(32) float ds[R][MT][8];
  for (int64_t b = 0; b < paired; b += 2) {
    const int64_t b8 = b & ~int64_t(7);
    const int pair = int(b - b8) / 2;
    if (pair == 0) {
      for (int r = 0; r < R; ++r) FI_PREFETCH(q + r * qrow + b * 16 + kPrefetchBytes);
      if (b8 + 8 <= j.B) {
        for (int r = 0; r < R; ++r)
          for (int mt = 0; mt < MT; ++mt)
            _mm256_store_ps(ds[r][mt], _mm256_mul_ps(_mm256_loadu_ps(j.d + (m0 + mt) * j.B + b8),
                                                     _mm256_loadu_ps(sb[r] + b8)));
      } else {  // the last blocks past a multiple of 8
        for (int r = 0; r < R; ++r)
          for (int mt = 0; mt < MT; ++mt)
            for (int64_t i = 0; i < 8; ++i)
              ds[r][mt][i] = b8 + i < j.B ? j.d[(m0 + mt) * j.B + b8 + i] * sb[r][b8 + i] : 0.f;
      }
    }
    const __m256i idx = _mm256_setr_epi32(2 * pair, 2 * pair, 2 * pair, 2 * pair, 2 * pair + 1, 2 * pair + 1,
                                          2 * pair + 1, 2 * pair + 1);
    __m256i xe[MT], xo[MT];
    for (int mt = 0; mt < MT; ++mt) {
      const int8_t* xp = j.xq + (m0 + mt) * j.K + b * kBlock;
      xe[mt] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
      xo[mt] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + kBlock));
    }
    for (int r = 0; r < R; ++r) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * qrow + b * 16));
      const __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
      for (int mt = 0; mt < MT; ++mt) {
        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe[mt]), _mm256_maddubs_epi16(hi, xo[mt]));
        const __m256 f = _mm256_permutevar8x32_ps(_mm256_load_ps(ds[r][mt]), idx);
        acc[r][mt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones)), f, acc[r][mt]);
      }
    }
  }
  if (paired < j.B) {  // an odd last block, [even | odd]
    const int64_t b = paired;
    for (int r = 0; r < R; ++r)
      for (int mt = 0; mt < MT; ++mt) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(j.xq + (m0 + mt) * j.K + b * kBlock));
        const __m256 f = _mm256_set1_ps(j.d[(m0 + mt) * j.B + b] * sb[r][b]);
        acc[r][mt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<4>(q + r * qrow + b * 16, xv)), f, acc[r][mt]);
      }
  }
  finish(j, t, n0, m0, acc);
}

// int8 weights (natural order) x int8 x, one block at a time (groups of 16 give the halves their own scales).
template <int R, int MT>
FI_INLINE void tile_int8(const Job& j, const Tables& t, int64_t n0, int64_t m0) {
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm256_setzero_ps();
  const uint8_t* q = j.p->qweight + n0 * j.K;
  for (int64_t b = 0; b < j.B; ++b) {
    if ((b & 3) == 0)
      for (int r = 0; r < R; ++r) FI_PREFETCH(q + r * j.K + b * kBlock + kPrefetchBytes);
    __m256i xv[MT];
    float dm[MT];
    for (int mt = 0; mt < MT; ++mt) {
      xv[mt] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(j.xq + (m0 + mt) * j.K + b * kBlock));
      dm[mt] = j.d[(m0 + mt) * j.B + b];
    }
    const int32_t g0 = j.gh[2 * b], g1 = j.gh[2 * b + 1];
    for (int r = 0; r < R; ++r) {
      const float s0 = t.s[r][g0], s1 = t.s[r][g1];
      for (int mt = 0; mt < MT; ++mt) {
        const __m256i dot = block_dot<8>(q + r * j.K + b * kBlock, xv[mt]);
        acc[r][mt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), half_scales(dm[mt] * s0, dm[mt] * s1), acc[r][mt]);
      }
    }
  }
  finish(j, t, n0, m0, acc);
}

template <int R, int MT>
void tile(const Job& j, const Tables& t, int64_t n0, int64_t m0) {
  if (j.p->bits == 4) tile_int4<R, MT>(j, t, n0, m0);
  else tile_int8<R, MT>(j, t, n0, m0);
}
}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------- AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace avx512 {
constexpr int kR = 4, kMT = 4;
void cvt(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

// Two blocks' int4 codes: [lo(b), hi(b), lo(b + 1), hi(b + 1)].
FI_INLINE __m512i codes2(const uint8_t* q) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), m = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_permute2x128_si256(lo, hi, 0x20)),
                            _mm256_permute2x128_si256(lo, hi, 0x31), 1);
}

// i32 dot lanes of two blocks: lanes 4h .. 4h + 3 half-block h (0, 1 of block b; 2, 3 of block b + 1).
template <int BITS>
FI_INLINE __m512i pair_dot(const uint8_t* q, __m512i x) {
  const __m512i ones = _mm512_set1_epi16(1);
  if constexpr (BITS == 4) return _mm512_madd_epi16(_mm512_maddubs_epi16(codes2(q), x), ones);
  const __m512i w = _mm512_loadu_si512(q);
  const __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);  // x * sign(w)
  return _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(w), sx), ones);
}

template <int R, int MT, int BITS>
FI_INLINE void tile_impl(const Job& j, const Tables& t, int64_t n0, int64_t m0) {
  float res[R][MT];
  mins_term<R, MT>(j, t, m0, res);
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) acc[r][mt] = _mm512_setzero_ps();
  const int64_t qrow = BITS == 4 ? j.K / 2 : j.K, qblock = BITS == 4 ? 16 : kBlock;
  const uint8_t* q = j.p->qweight + n0 * qrow;
  int64_t b = 0;
  for (; b + 2 <= j.B; b += 2) {
    if ((b & 3) == 0)
      for (int r = 0; r < R; ++r) FI_PREFETCH(q + r * qrow + b * qblock + kPrefetchBytes);
    __m512i xv[MT];
    float d0[MT], d1[MT];
    for (int mt = 0; mt < MT; ++mt) {
      xv[mt] = _mm512_loadu_si512(j.xq + (m0 + mt) * j.K + b * kBlock);
      d0[mt] = j.d[(m0 + mt) * j.B + b];
      d1[mt] = j.d[(m0 + mt) * j.B + b + 1];
    }
    const int32_t* gh = j.gh + 2 * b;
    for (int r = 0; r < R; ++r) {
      const float* sr = t.s[r];
      for (int mt = 0; mt < MT; ++mt) {
        const __m512i dot = pair_dot<BITS>(q + r * qrow + b * qblock, xv[mt]);
        const __m512 f =
            BITS == 4 ? _mm512_insertf32x8(_mm512_set1_ps(d0[mt] * sr[gh[0]]), _mm256_set1_ps(d1[mt] * sr[gh[2]]), 1)
                      : _mm512_insertf32x8(
                            _mm512_castps256_ps512(avx2::half_scales(d0[mt] * sr[gh[0]], d0[mt] * sr[gh[1]])),
                            avx2::half_scales(d1[mt] * sr[gh[2]], d1[mt] * sr[gh[3]]), 1);
        acc[r][mt] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, acc[r][mt]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int mt = 0; mt < MT; ++mt) res[r][mt] += _mm512_reduce_add_ps(acc[r][mt]);
  if (b < j.B) {  // an odd last block: 256-bit
    for (int r = 0; r < R; ++r) {
      const float s0 = t.s[r][j.gh[2 * b]], s1 = t.s[r][j.gh[2 * b + 1]];
      for (int mt = 0; mt < MT; ++mt) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(j.xq + (m0 + mt) * j.K + b * kBlock));
        const __m256i dot = avx2::block_dot<BITS>(q + r * qrow + b * qblock, xv);  // the AVX2 block, as is
        const float dm = j.d[(m0 + mt) * j.B + b];
        res[r][mt] += Avx2Vec::hsum(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), avx2::half_scales(dm * s0, dm * s1)));
      }
    }
  }
  store<R, MT>(j, n0, m0, res);
}

template <int R, int MT>
void tile(const Job& j, const Tables& t, int64_t n0, int64_t m0) {
  if (j.p->bits == 4) tile_impl<R, MT, 4>(j, t, n0, m0);
  else tile_impl<R, MT, 8>(j, t, n0, m0);
}
}  // namespace avx512
#pragma GCC pop_options
#endif  // FI_X86

// Rows [n0, n1) of a variant: blocks of kR output rows (then single rows), each against all of x in tiles of up to
// kMT rows (then single rows), so every (x row, output row) pair runs the same instructions.
#define FQ_A8_ROWS(NS)                                                                     \
  void NS##_rows(const Job& j, int64_t n0, int64_t n1) {                                   \
    int64_t n = n0;                                                                        \
    for (; n + NS::kR <= n1; n += NS::kR) {                                                \
      const Tables t = tables(j, n, NS::kR, NS::cvt);                                      \
      int64_t m = 0;                                                                       \
      for (; m + NS::kMT <= j.M; m += NS::kMT) NS::tile<NS::kR, NS::kMT>(j, t, n, m);      \
      for (; m < j.M; ++m) NS::tile<NS::kR, 1>(j, t, n, m);                                \
    }                                                                                      \
    for (; n < n1; ++n) {                                                                  \
      const Tables t = tables(j, n, 1, NS::cvt);                                           \
      int64_t m = 0;                                                                       \
      for (; m + NS::kMT <= j.M; m += NS::kMT) NS::tile<1, NS::kMT>(j, t, n, m);           \
      for (; m < j.M; ++m) NS::tile<1, 1>(j, t, n, m);                                     \
    }                                                                                      \
  }
FQ_A8_ROWS(generic)
#if FI_X86
FQ_A8_ROWS(avx2)
FQ_A8_ROWS(avx512)
#endif

}  // namespace

int quant_linear_a8(const QuantLinearA8Params& p) {
  if (p.M == 0 || p.N == 0) return kOk;
  if (!p.x || !p.qweight || !p.scales || !p.out || p.M < 0 || p.N < 0 || p.K <= 0) return kBadArgs;
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return kBadDType;
  if ((p.bits != 4 && p.bits != 8) || p.group <= 0 || p.group % (p.bits == 4 ? kBlock : 16) || p.K % p.group ||
      p.K % kBlock)
    return kBadGroup;
  const int64_t B = p.K / kBlock, G = p.K / p.group;
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> f_buf;
  thread_local std::vector<int32_t> gh_buf;
  xq_buf.resize(size_t(p.M * p.K));
  f_buf.resize(size_t(p.M * B + p.M * G));
  gh_buf.resize(size_t(2 * B));
  for (int64_t h = 0; h < 2 * B; ++h) gh_buf[size_t(h)] = int32_t(h * 16 / p.group);
  float* d = f_buf.data();
  float* gsum = d + p.M * B;
  void (*rows)(const Job&, int64_t, int64_t) = generic_rows;
  int align = 1;
  bool pairs = false;  // the AVX2 int4 tile's x layout
  auto prep = prep_row;
#if FI_X86
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16) rows = avx512_rows, align = avx512::kR;
  else if (isa == Isa::kAvx2) rows = avx2_rows, align = avx2::kR, pairs = true;
  if (p.dtype == DType::kFloat32 && isa != Isa::kGeneric) prep = avx2::prep_row_f32;
#endif
  for (int64_t m = 0; m < p.M; ++m) prep(p, m, xq_buf.data() + m * p.K, d + m * B, gsum + m * G, pairs);
  const Job j{&p, xq_buf.data(), d, gsum, gh_buf.data(), p.scales, p.mins, p.scales_f16, p.M, p.N, p.K, B, G};
  const int64_t work = p.M * p.N * p.K;
  const int nt = work >= (int64_t(1) << 18) ? int(std::min<int64_t>(resolve_threads(p.num_threads), p.N / align + 1)) : 1;
  parallel_ranges(p.N, align, nt, [&](int64_t n0, int64_t n1) { rows(j, n0, n1); });
  return kOk;
}

const char* quant_a8_error_string(int code) {
  switch (code) {
    case kOk: return "ok";
    case kBadArgs: return "null pointer or bad size";
    case kBadGroup: return "bits must be 4 or 8, K a multiple of 32 and the group a multiple of 32 (int4) / 16 (int8) dividing K";
    case kBadDType: return "unsupported dtype (fp32 / bf16 / fp16)";
    default: return "unknown error";
  }
}

}  // namespace cpu
}  // namespace fastinfer
