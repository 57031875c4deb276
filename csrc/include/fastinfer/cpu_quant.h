// Raw-pointer CPU kernels for weight-only quantized linear layers (int8 / int4, group-wise). No torch
// headers: csrc/bindings.cpp wraps them as the torch op fastinfer::quant_linear. The weight format is the
// one of fastinfer/quantization.py:
//
//   bits 8: qweight int8 [N, K];  bits 4: uint8 [N, K / 2], q[n, 2j] in the low nibble of byte (n, j) and
//   q[n, 2j + 1] in its high nibble (0..15);  scales, mins [N, K / group_size] (mins may be absent)
//   w[n, k] = q[n, k] * scales[n, k / group_size] + mins[n, k / group_size]   (fp32)
//
// All functions return 0 on success or a negative code (quant_error_string). The instruction-set variant
// is the one of cpu_attention.h (set_isa / FASTINFER_CPU_ISA), shared by every CPU kernel.
#pragma once

#include <cstdint>

#include "fastinfer/cpu_attention.h"

namespace fastinfer {
namespace cpu {

// out[m, n] = sum_k x[m, k] * w[n, k] + bias[n], with w dequantized in registers in fp32 (activations stay
// in their dtype's precision: nothing is quantized), accumulated in fp32, rounded once to out's dtype.
//
// Covered: bits 8 with group_size == K (any K, "per channel") or group_size % 32 == 0; bits 4 with
// group_size % 32 == 0 (quant_linear_supported says whether a case is). Any M is computed, but the kernels
// are meant for few rows (decode); quant_linear_prefers says up to which M they beat dequantize + GEMM.
struct QuantLinearParams {
  DType x_dtype = DType::kFloat32;  // of x and out alike
  const void* x = nullptr;          // [M, K], row stride x_stride (elements), unit column stride
  void* out = nullptr;              // [M, N], row stride out_stride
  const void* qweight = nullptr;    // int8 [N, K] or uint8 [N, K / 2], contiguous
  const void* scales = nullptr;     // [N, K / group_size], contiguous
  const void* mins = nullptr;       // like scales, or nullptr
  DType scale_dtype = DType::kFloat32;  // of scales and mins: kFloat32 or kFloat16
  const float* bias = nullptr;      // [N] fp32, or nullptr
  int64_t M = 0, N = 0, K = 0;
  int64_t x_stride = 0;
  int64_t out_stride = 0;
  int bits = 8;
  int64_t group_size = 0;
  int num_threads = 0;  // <= 0: the OpenMP default
};

int quant_linear(const QuantLinearParams& p);

// True when quant_linear handles this (bits, K, group_size).
bool quant_linear_supported(int bits, int64_t K, int64_t group_size);

// True when quant_linear is expected to be faster than quant_dequantize + a GEMM for M rows of x (on the
// active instruction set).
bool quant_linear_prefers(int64_t M, DType x_dtype, int bits, int64_t group_size);

// Dequantize weight rows [n0, n1) into dst ([n1 - n0, K], row stride K) of dtype dst_dtype (fp32 exact;
// bf16 / fp16 rounded to nearest even from the fp32 value). Same weight fields as QuantLinearParams.
struct QuantDequantParams {
  const void* qweight = nullptr;
  const void* scales = nullptr;
  const void* mins = nullptr;
  DType scale_dtype = DType::kFloat32;
  void* dst = nullptr;
  DType dst_dtype = DType::kFloat32;
  int64_t N = 0, K = 0, n0 = 0, n1 = 0;
  int bits = 8;
  int64_t group_size = 0;
  int num_threads = 0;
};

int quant_dequantize(const QuantDequantParams& p);

const char* quant_error_string(int code);

}  // namespace cpu
}  // namespace fastinfer
