// Raw-pointer CPU kernel for W4A8 / W8A8: int4 weights (fastinfer's format: uint8 [N, K / 2], low nibble = even
// k; groups of g inputs, g a multiple of 32) or int8 weights (int8 [N, K]; g a multiple of 16, e.g. GGUF Q8_0's 32,
// Q6_K's 16 or per channel) with scales / mins per group, times activations quantized on the fly to int8 per
// block of 32 inputs (symmetric: d = max |x| / 127, xq = nearest(x / d)), the technique llama.cpp uses for its
// Q4 x Q8 / Q8 x Q8 dot products. Per output y[m, n] =
//     sum_h d[m, b(h)] * scale[n, g(h)] * (sum_{k in h} q[n, k] * xq[m, k])  (h: half-blocks of 16, integer dots)
//   + sum_g min[n, g] * sum_{k in g} x[m, k]                                            (exact fp32 sums of x)
//   + bias[n].
// Everything but the integer dots is fp32; the activation quantization is the only approximation (the result
// differs from quant_linear's by it). Every row of x takes the same code path, so a row's output does not depend
// on how many rows are in the call (batched == single, bit for bit). Generic / AVX2 / AVX-512 variants by the
// ISA of cpu_attention.h. Returns 0 or a negative code (quant_a8_error_string).
#pragma once

#include <cstdint>

#include "fastinfer/cpu_attention.h"

namespace fastinfer {
namespace cpu {

struct QuantLinearA8Params {
  DType dtype = DType::kFloat32;  // of x, bias and out
  const void* x = nullptr;        // [M, K], row stride x_stride
  int64_t x_stride = 0;
  const uint8_t* qweight = nullptr;  // int4: [N, K / 2]; int8: the int8 codes [N, K] as bytes
  int bits = 4;
  const void* scales = nullptr;      // [N, K / group], fp32 or fp16 (scales_f16)
  const void* mins = nullptr;        // like scales, or null (0)
  bool scales_f16 = false;
  const void* bias = nullptr;  // [N] or null
  void* out = nullptr;         // [M, N] contiguous
  int64_t M = 0, N = 0, K = 0, group = 0;
  int num_threads = 0;
};

int quant_linear_a8(const QuantLinearA8Params& p);

const char* quant_a8_error_string(int code);

}  // namespace cpu
}  // namespace fastinfer
