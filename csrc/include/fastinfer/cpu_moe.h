// Raw-pointer CPU kernel for a Mixture-of-Experts layer (fused_moe). No torch headers: csrc/bindings.cpp wraps
// it as the torch op fastinfer::fused_moe. The instruction-set variant is the one of cpu_attention.h (set_isa /
// FASTINFER_CPU_ISA), shared by every CPU kernel. Returns 0 on success or a negative code (moe_error_string).
#pragma once

#include <cstdint>

#include "fastinfer/cpu_attention.h"

namespace fastinfer {
namespace cpu {

// out[t] = sum_j topk_weights[t, j] * w2[e] @ act_e(x[t]),  e = topk_ids[t, j], where
//   act_e(x) = round_to_dtype(silu(w13[e, :I] @ x) * (w13[e, I:] @ x))
// Both projections accumulate in fp32 (products of the exact fp32 values of x and the weights); the weighted
// sum over the k experts is fp32, rounded once to the dtype. Tokens are grouped by expert so each active
// expert's weights are read once per call (experts no token chose are never read).
//
// Each projection is float (in the dtype) or weight-only quantized (fastinfer's format, stacked per expert):
// bits 8: int8 [E, N, K]; bits 4: uint8 [E, N, K / 2], byte j of a row holding q[2j] (low nibble) and q[2j + 1]
// (high); w[n, k] = q * scales[n, g] + mins[n, g] in fp32 (g = k / group; mins may be null: 0), scales / mins
// fp32 [E, N, K / group]. The group must be a multiple of 16 (one SIMD vector of either ISA).
struct MoeWeight {
  const void* w = nullptr;  // float [E, N, K] in the dtype, or the quantized codes
  int bits = 0;             // 0: float; 8 / 4: quantized
  const float* scales = nullptr;
  const float* mins = nullptr;
  int64_t group = 0;  // inputs per scale (quantized only)
};

struct FusedMoeParams {
  DType dtype = DType::kFloat32;  // of x and out (and of float expert weights)
  const void* x = nullptr;        // [T, H] contiguous
  MoeWeight w13;                  // [E, 2 I, H] contiguous: rows [0, I) gate, [I, 2 I) up
  MoeWeight w2;                   // [E, H, I] contiguous
  const float* topk_weights = nullptr;  // [T, K]
  const int64_t* topk_ids = nullptr;    // [T, K], each in [0, E)
  void* out = nullptr;                  // [T, H] contiguous
  int64_t T = 0, H = 0, I = 0, E = 0, K = 0;
  int num_threads = 0;  // <= 0: the OpenMP default
};

int fused_moe(const FusedMoeParams& p);

const char* moe_error_string(int code);

}  // namespace cpu
}  // namespace fastinfer
