// The small per-layer ops of a decode step on the CPU (raw pointers, no torch): RMSNorm (+ residual add),
// rotary embedding in place, SiLU-and-mul, greedy argmax, the structured-output token bitmask. See fastinfer/cpu_fused.h for the contracts.
//
// Each op is a few streaming passes over one row at a time; they exist because the torch ops they replace cost
// 5-20 dispatches each (a rotary embedding is ~15 tensor ops), which at batch 1 is most of a step. Rows split
// over OpenMP threads only when a call is big enough to pay for waking them (prefill). Variants: generic, AVX2,
// AVX-512 (cpu_vec.h), chosen at run time by the shared ISA switch; the AVX-512 code serves avx512_bf16 too.
#include "fastinfer/cpu_fused.h"
#include "fastinfer/cpu_common.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace fastinfer {
namespace cpu {
namespace {

enum FusedError : int { kOk = 0, kBadArgs = -1, kBadDType = -2, kBadPosition = -3 };

using RmsFn = void (*)(const RmsNormParams&, int64_t, int64_t);
using RotaryFn = void (*)(const RotaryParams&);
using SiluFn = void (*)(const SiluMulParams&, int64_t, int64_t);
using ArgmaxFn = int64_t (*)(const float*, int64_t);
using MaskFn = void (*)(float*, const int32_t*, int64_t);
struct Kernels {
  RmsFn rms[3];  // by DType
  RotaryFn rotary[3];
  SiluFn silu[3];
  ArgmaxFn argmax;
  MaskFn mask_row;
};

namespace generic {
using Ops = GenericVec;
#include "fused_ops_impl.h"
}  // namespace generic

#if FI_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
using Ops = Avx2Vec;
#include "fused_ops_impl.h"

}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace avx512 {
using Ops = Avx512Vec;
#include "fused_ops_impl.h"

}  // namespace avx512
#pragma GCC pop_options
#endif  // FI_X86

const Kernels& kernels() {
#if FI_X86
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16) return avx512::kKernels;
  if (isa == Isa::kAvx2) return avx2::kKernels;
#endif
  return generic::kKernels;
}

bool dtype_ok(DType d) { return d == DType::kFloat32 || d == DType::kBFloat16 || d == DType::kFloat16; }

// Rows [0, T) of `fn` over threads when the call has at least 64k elements (prefill), else on the caller.
template <class P, class Fn>
void over_rows(const P& p, Fn fn, int64_t T, int64_t per_row) {
  const int nt = T * per_row >= (int64_t(1) << 16) ? int(std::min<int64_t>(resolve_threads(p.num_threads), T)) : 1;
  parallel_ranges(T, 1, nt, [&](int64_t t0, int64_t t1) { fn(p, t0, t1); });
}

}  // namespace

int rms_norm(const RmsNormParams& p) {
  if (p.T == 0) return kOk;
  if (!p.x || !p.weight || !p.out || (p.residual && !p.residual_out) || p.T < 0 || p.H <= 0) return kBadArgs;
  if (!dtype_ok(p.dtype)) return kBadDType;
  over_rows(p, kernels().rms[int(p.dtype)], p.T, p.H);
  return kOk;
}

int rotary_embedding(const RotaryParams& p) {
  if (p.T == 0) return kOk;
  if (!p.q || !p.k || !p.cache || !p.positions || p.rot <= 0 || p.rot % 2 || p.rot > p.D) return kBadArgs;
  if (!dtype_ok(p.dtype)) return kBadDType;
  for (int64_t t = 0; t < p.T; ++t)
    if (p.positions[t] < 0 || p.positions[t] >= p.max_pos) return kBadPosition;
  kernels().rotary[int(p.dtype)](p);
  return kOk;
}

int silu_and_mul(const SiluMulParams& p) {
  if (p.T == 0 || p.d == 0) return kOk;
  if (!p.x || !p.out || p.T < 0 || p.d < 0) return kBadArgs;
  if (!dtype_ok(p.dtype)) return kBadDType;
  over_rows(p, kernels().silu[int(p.dtype)], p.T, 2 * p.d);
  return kOk;
}

int argmax_rows(const float* x, int64_t B, int64_t V, int64_t stride, int64_t* out) {
  if (B == 0) return kOk;
  if (!x || !out || B < 0 || V <= 0) return kBadArgs;
  const ArgmaxFn fn = kernels().argmax;
  for (int64_t b = 0; b < B; ++b) out[b] = fn(x + b * stride, V);
  return kOk;
}

int apply_token_bitmask(float* logits, int64_t B, int64_t V, int64_t stride, const int32_t* bitmask,
                        int64_t words_per_row) {
  if (B == 0) return kOk;
  if (!logits || !bitmask || B < 0 || V <= 0 || words_per_row < (V + 31) / 32) return kBadArgs;
  const MaskFn fn = kernels().mask_row;
  for (int64_t b = 0; b < B; ++b) fn(logits + b * stride, bitmask + b * words_per_row, V);
  return kOk;
}

const char* fused_error_string(int code) {
  switch (code) {
    case kOk: return "ok";
    case kBadArgs: return "null pointer or bad size";
    case kBadDType: return "unsupported dtype (fp32 / bf16 / fp16)";
    case kBadPosition: return "a position is outside the rotary cache [0, max_position)";
    default: return "unknown error";
  }
}

}  // namespace cpu
}  // namespace fastinfer
