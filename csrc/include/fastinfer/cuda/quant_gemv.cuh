// W4A16 / W8A16 GEMV and small-M GEMM over fastinfer's weight-only format (QuantLinearParams, params.h), and the
// dequantization kernel used for larger M. No torch headers.
//
// A warp owns kQuantRowsPerWarp output rows. Per step each lane reads one 16-byte chunk of codes of each row (32
// int4 or 16 int8 codes, inside one group: group_size is a multiple of the chunk), the chunk's scale and min, and
// x's matching features for each of the MT (<= kQuantMaxRows) rows of x; the codes become fp32 through the
// exponent trick (0x4B000000 | q is the float 2^23 + q, exact), w = q * scale + min in fp32 (one fma), and
// y += x * w in fp32. Lanes' sums meet by xor shuffles; lane 0 adds the bias and rounds to x's dtype.
#pragma once

#include "fastinfer/cuda/common.cuh"

namespace fastinfer {
namespace cuda {

constexpr float kMagic = 8388608.f;  // 2^23

// Eight codes of one 32-bit word as fp32: int4 (nibble j = code j, low nibble first) or int8 (bytes 2 words).
__device__ __forceinline__ void int4_codes(uint32_t w, float (&q)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) q[j] = __uint_as_float(0x4B000000u | ((w >> (4 * j)) & 0xFu)) - kMagic;
}

// Four signed bytes of w as fp32: byte ^ 0x80 is q + 128 in 0..255.
__device__ __forceinline__ void int8_codes(uint32_t w, float* q) {
  const uint32_t u = w ^ 0x80808080u;
#pragma unroll
  for (int j = 0; j < 4; ++j) q[j] = __uint_as_float(0x4B000000u | ((u >> (8 * j)) & 0xFFu)) - (kMagic + 128.f);
}

__device__ __forceinline__ float load_scale(const void* s, bool f16, int64_t i) {
  return f16 ? __half2float(static_cast<const __half*>(s)[i]) : static_cast<const float*>(s)[i];
}

template <class T, int BITS, int MT>
__global__ void __launch_bounds__(kQuantThreads) quant_gemv_kernel(const QuantLinearParams p) {
  constexpr int kR = kQuantRowsPerWarp, kCodes = BITS == 4 ? 32 : 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n0 = (int64_t(blockIdx.x) * (kQuantThreads / 32) + warp) * kR;
  if (n0 >= p.N) return;  // whole warps leave together
  const int64_t chunks = p.K / kCodes, row_bytes = p.K * BITS / 8, groups = p.K / p.group_size;
  const uint8_t* qw = static_cast<const uint8_t*>(p.qweight);
  const T* x = static_cast<const T*>(p.x);
  float acc[MT][kR] = {};

#pragma unroll 2
  for (int64_t ci = lane; ci < chunks; ci += 32) {
    const int64_t k0 = ci * kCodes, g = k0 / p.group_size;
    uint4 code[kR];
    float s[kR], mn[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const int64_t n = min(n0 + r, p.N - 1);  // rows past N repeat the last one; never stored
      code[r] = __ldg(reinterpret_cast<const uint4*>(qw + n * row_bytes) + ci);
      s[r] = load_scale(p.scales, p.scales_f16, n * groups + g);
      mn[r] = p.mins ? load_scale(p.mins, p.scales_f16, n * groups + g) : 0.f;
    }
#pragma unroll
    for (int sub = 0; sub < kCodes / 8; ++sub) {  // 8 features at a time
      float w[kR][8];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        const uint32_t* words = reinterpret_cast<const uint32_t*>(&code[r]);
        float q[8];
        if (BITS == 4) {
          int4_codes(words[sub], q);
        } else {
          int8_codes(words[2 * sub], q);
          int8_codes(words[2 * sub + 1], q + 4);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) w[r][e] = fmaf(q[e], s[r], mn[r]);
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= p.M) break;
        float xf[8];
        load8(x + m * p.x_stride + k0 + sub * 8, xf);
#pragma unroll
        for (int r = 0; r < kR; ++r)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m][r] = fmaf(xf[e], w[r][e], acc[m][r]);
      }
    }
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const float y = warp_sum(acc[m][r]);  // every lane takes part (m and r are uniform)
      const int64_t n = n0 + r;
      if (lane == 0 && m < p.M && n < p.N) out[m * p.N + n] = from_f<T>(y + (p.bias ? p.bias[n] : 0.f));
    }
  }
}

// dst [n1 - n0, K] = dequantized rows n0 .. n1 of W, one thread per (row, 8 features).
template <class T, int BITS>
__global__ void quant_dequantize_kernel(const QuantLinearParams p, T* dst, int64_t n0, int64_t n1) {
  const int64_t per_row = p.K / 8, i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= (n1 - n0) * per_row) return;
  const int64_t n = n0 + i / per_row, k0 = (i % per_row) * 8, g = n * (p.K / p.group_size) + k0 / p.group_size;
  const float s = load_scale(p.scales, p.scales_f16, g), mn = p.mins ? load_scale(p.mins, p.scales_f16, g) : 0.f;
  const uint8_t* row = static_cast<const uint8_t*>(p.qweight) + n * (p.K * BITS / 8);
  float q[8];
  if (BITS == 4) {
    int4_codes(*reinterpret_cast<const uint32_t*>(row + k0 / 2), q);
  } else {
    int8_codes(*reinterpret_cast<const uint32_t*>(row + k0), q);
    int8_codes(*reinterpret_cast<const uint32_t*>(row + k0 + 4), q + 4);
  }
  T* d = dst + (n - n0) * p.K + k0;
#pragma unroll
  for (int e = 0; e < 8; ++e) d[e] = from_f<T>(fmaf(q[e], s, mn));
}

}  // namespace cuda
}  // namespace fastinfer
