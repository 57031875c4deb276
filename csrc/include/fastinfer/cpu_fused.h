// Raw-pointer CPU kernels for the small per-layer ops of a decode step (no torch headers; csrc/bindings.cpp wraps
// them as torch ops): RMSNorm with the residual add fused in, rotary embedding applied in place to q and k,
// SiLU-and-mul, and the greedy argmax. Each has generic / AVX2 / AVX-512 code chosen by the ISA of cpu_attention.h
// (set_isa / FASTINFER_CPU_ISA). Results equal the torch backend's ops up to fp32 rounding order: every
// intermediate the torch ops round to the dtype (bf16 / fp16) is rounded here too. Return 0 or a negative code
// (fused_error_string).
#pragma once

#include <cstdint>

#include "fastinfer/cpu_attention.h"

namespace fastinfer {
namespace cpu {

// out = weight * round(s * rsqrt(mean(s^2) + eps)) with s = x, or with a residual s = round(x + residual), written
// to residual_out. Rows [T, H] with row strides (elements); weight [H]; all in `dtype`; sums in fp32.
struct RmsNormParams {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const void* residual = nullptr;  // null: plain RMSNorm
  const void* weight = nullptr;
  void* out = nullptr;
  void* residual_out = nullptr;  // [T, H] contiguous, when residual is given
  int64_t T = 0, H = 0, x_stride = 0, r_stride = 0;  // out is [T, H] contiguous
  float eps = 1e-6f;
  int num_threads = 0;
};
int rms_norm(const RmsNormParams& p);

// NeoX (rotate-half) rotary embedding of the first `rot` features of every head of q [T, Hq, D] and k [T, Hk, D],
// in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) with c, s = cache[pos[t], :rot/2], cache[pos[t], rot/2:] (fp32
// cache, rounded to the dtype first, as the torch op casts it). Heads and dims contiguous; token strides given.
struct RotaryParams {
  DType dtype = DType::kFloat32;
  void* q = nullptr;
  void* k = nullptr;
  const float* cache = nullptr;        // [max_pos, rot]
  const int64_t* positions = nullptr;  // [T]
  int64_t T = 0, Hq = 0, Hk = 0, D = 0, rot = 0, q_stride = 0, k_stride = 0, max_pos = 0;
};
int rotary_embedding(const RotaryParams& p);

// out[t, i] = round(round(silu(x[t, i])) * x[t, d + i]) for x [T, 2d] (row stride given), out [T, d] contiguous.
struct SiluMulParams {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  void* out = nullptr;
  int64_t T = 0, d = 0, x_stride = 0;
  int num_threads = 0;
};
int silu_and_mul(const SiluMulParams& p);

// out[b] = the first index of the largest value of row b of x [B, V] fp32 (row stride given); a NaN counts as
// larger than every number (torch.argmax's rule): the first NaN's index.
int argmax_rows(const float* x, int64_t B, int64_t V, int64_t stride, int64_t* out);

// Structured outputs, in place: logits[b, j] = -inf for every token j whose bit is 0 in row b of bitmask
// [B, words_per_row] int32 (xgrammar's layout: token j is bit j % 32 of word j / 32); rows all ones are untouched.
int apply_token_bitmask(float* logits, int64_t B, int64_t V, int64_t stride, const int32_t* bitmask,
                        int64_t words_per_row);

const char* fused_error_string(int code);

}  // namespace cpu
}  // namespace fastinfer
