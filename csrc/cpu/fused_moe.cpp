// Fused Mixture-of-Experts layer on the CPU (raw pointers, no torch). See fastinfer/cpu_moe.h for the contract.
//
// Meant for decode and small batches, where the layer is memory-bound: the (token, expert) assignments are
// counting-sorted by expert on the calling thread, so each active expert's weights stream from memory once per
// call whatever the number of its tokens, and experts no token chose are never touched. One OpenMP region:
//   1. x -> fp32 (the calling thread; fp32 x is read in place);
//   2. gate/up: units of kPairs row pairs of one active expert, split over threads in contiguous ranges of
//      equal estimated cost (weight bytes + token work); act[slot] = round_to_dtype(silu(g) u), fp32;
//   3. (barrier) down: each thread owns a contiguous range of output columns h (multiples of 16 floats: no
//      shared cache lines) for every active expert, accumulates weight * (w2[e] @ act) in fp32 and writes
//      its columns of out.
// Weights: float in the dtype, or int8 / int4 weight-only (fastinfer's format: per-group fp32 scales and optional
// mins, dequantized in registers as q * scale + min, exact in fp32, then the same fp32 dot products), each
// projection on its own; only the codes and scales of the active experts are read.
// Variants: generic (portable scalar C++), AVX2, AVX-512, compiled under `#pragma GCC target` and chosen at run time
// by the ISA of cpu_attention.h (FASTINFER_CPU_ISA / set_isa; avx512_bf16 runs the AVX-512 code).
#include "fastinfer/cpu_moe.h"
#include "fastinfer/cpu_common.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastinfer {
namespace cpu {
namespace {

enum MoeError : int { kOk = 0, kBadArgs = -1, kBadId = -2, kBadDType = -3, kBadQuant = -4 };

// Weight kinds, the index of the kernel tables: float in one of the three dtypes (DType's values), int8, int4.
enum WKind : int { kWF32 = 0, kWBF16 = 1, kWF16 = 2, kWQ8 = 3, kWQ4 = 4, kNumWKinds = 5 };
struct Q8 {};  // tag types of the quantized kinds
struct Q4 {};

// Weight bytes ahead of the tile each row is prefetched (the next rows follow in memory, so this runs on).
constexpr int64_t kPrefetchBytes = 4096;

// silu(g) * u in fp32, rounded to the dtype (kept as the fp32 value of the rounded number).
FI_INLINE float silu_mul(DType dt, float g, float u) {
  const float a = g / (1.f + std::exp(-g)) * u;
  switch (dt) {
    case DType::kBFloat16: return bf16_to_float(float_to_bf16(a));
    case DType::kFloat16: return fp16_to_float(float_to_fp16(a));
    default: return a;
  }
}

// Everything the phases need, fixed per call.
struct Work {
  DType dtype;
  const void* x;
  MoeWeight w13, w2;
  void* out;
  int64_t T, H, I;
  const float* xf;       // x as fp32 [T, H]
  const int64_t* start;  // [E + 1] slots of expert e: [start[e], start[e + 1])
  const int32_t* tok;    // [T K] token of each slot
  const float* wt;       // [T K] routing weight of each slot
  const int32_t* active;  // experts with at least one slot
  int64_t num_active;
  float* act;  // [T K, I] activations (fp32 values of the dtype's numbers)
  float* acc;  // [T, H] fp32 output sums
};

using PrepFn = void (*)(const Work&, float*, int64_t, int64_t);
using RangeFn = void (*)(const Work&, int64_t, int64_t);
struct Kernels {
  PrepFn prep[3];             // by DType of x
  RangeFn gate_up[kNumWKinds];  // by WKind of w13
  RangeFn down[kNumWKinds][3];  // by WKind of w2, DType of out
  int pairs;                  // gate/up row pairs per phase-1 unit
};

// ---------------------------------------------------------------------------------------------------------
// The vector APIs of cpu_vec.h plus the tile shapes of this kernel.
struct GenericOps : GenericVec {
  static constexpr int kMT = 2, kPairs = 2;
};

namespace generic {
using Ops = GenericOps;
#include "fused_moe_impl.h"
}  // namespace generic

#if FI_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
struct Avx2Ops : Avx2Vec {
  static constexpr int kMT = 2, kPairs = 2;  // 4 rows x 2 tokens: 8 accumulators of 16 registers
};
namespace avx2 {
using Ops = Avx2Ops;
#include "fused_moe_impl.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
struct Avx512Ops : Avx512Vec {
  static constexpr int kMT = 4, kPairs = 2;  // 4 rows x 4 tokens: 16 accumulators of 32 registers
};
namespace avx512 {
using Ops = Avx512Ops;
#include "fused_moe_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#endif  // FI_X86

const Kernels& kernels(Isa isa) {
#if FI_X86
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16) return avx512::kKernels;
  if (isa == Isa::kAvx2) return avx2::kKernels;
#endif
  (void)isa;
  return generic::kKernels;
}

// Growable buffers of the calling thread (0: x as fp32; 1: activations; 2: output sums).
float* call_buf(int which, size_t n) {
  thread_local std::vector<float> bufs[3];
  std::vector<float>& b = bufs[which];
  if (b.size() < n) b.resize(n);
  return b.data();
}

// Thread t of nt takes phase-1 units [first unit whose cost prefix reaches C t / nt, ... of t + 1).
// A unit of expert e costs kUnitWeightCost + (its token count): the weight stream plus the token work.
constexpr int64_t kUnitWeightCost = 4;
int64_t unit_at_cost(const Work& wk, int64_t units_per_expert, int64_t target) {
  int64_t cost = 0;
  for (int64_t a = 0; a < wk.num_active; ++a) {
    const int64_t e = wk.active[a];
    const int64_t c = kUnitWeightCost + (wk.start[e + 1] - wk.start[e]);
    if (cost + c * units_per_expert > target) return a * units_per_expert + (target - cost + c - 1) / c;
    cost += c * units_per_expert;
  }
  return wk.num_active * units_per_expert;
}

}  // namespace

// The kernel-table index of a projection, or -1 when its format is not one the kernels read.
int weight_kind(const MoeWeight& w, DType dtype, int64_t K) {
  if (!w.w) return -1;
  if (w.bits == 0) return int(dtype);
  if ((w.bits != 8 && w.bits != 4) || !w.scales || w.group <= 0 || w.group % 16 || K % w.group) return -1;
  return w.bits == 8 ? kWQ8 : kWQ4;
}

int fused_moe(const FusedMoeParams& p) {
  if (p.T == 0) return kOk;
  if (!p.x || !p.w13.w || !p.w2.w || !p.topk_weights || !p.topk_ids || !p.out || p.T < 0 || p.H <= 0 ||
      p.I <= 0 || p.E <= 0 || p.K <= 0)
    return kBadArgs;
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return kBadDType;
  const int k13 = weight_kind(p.w13, p.dtype, p.H), k2 = weight_kind(p.w2, p.dtype, p.I);
  if (k13 < 0 || k2 < 0) return kBadQuant;
  const int64_t n = p.T * p.K;
  // Counting sort of the assignments by expert (stable: token order within an expert).
  std::vector<int64_t> start(size_t(p.E + 1), 0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t e = p.topk_ids[j];
    if (e < 0 || e >= p.E) return kBadId;
    ++start[size_t(e + 1)];
  }
  std::vector<int32_t> active;
  for (int64_t e = 0; e < p.E; ++e) {
    if (start[size_t(e + 1)] > 0) active.push_back(int32_t(e));
    start[size_t(e + 1)] += start[size_t(e)];
  }
  std::vector<int32_t> tok(static_cast<size_t>(n));
  std::vector<float> wt(static_cast<size_t>(n));
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t s = fill[size_t(p.topk_ids[j])]++;
    tok[size_t(s)] = int32_t(j / p.K);
    wt[size_t(s)] = p.topk_weights[j];
  }

  const Kernels& kn = kernels(active_isa());
  const int d = int(p.dtype);
  Work wk{p.dtype, p.x, p.w13, p.w2, p.out, p.T, p.H, p.I, nullptr, start.data(), tok.data(), wt.data(),
          active.data(), int64_t(active.size()), call_buf(1, size_t(n * p.I)), call_buf(2, size_t(p.T * p.H))};
  if (p.dtype == DType::kFloat32) {
    wk.xf = static_cast<const float*>(p.x);
  } else {
    float* xf = call_buf(0, size_t(p.T * p.H));
    kn.prep[d](wk, xf, 0, p.T);
    wk.xf = xf;
  }

  const int64_t units_per_expert = (p.I + kn.pairs - 1) / kn.pairs;
  const int64_t col_blocks = (p.H + 15) / 16;
  int64_t total_cost = 0;
  for (int32_t e : active) total_cost += (kUnitWeightCost + start[size_t(e + 1)] - start[size_t(e)]) * units_per_expert;
  // Small layers run on one thread (waking the others costs more than it saves).
  const int64_t work = int64_t(active.size()) * 3 * p.H * p.I * (n / int64_t(active.size()) + 3);
  const int nthreads = resolve_threads(p.num_threads);
  const int nt = work >= (int64_t(1) << 20) ? int(std::min<int64_t>(nthreads, col_blocks)) : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int t = 0, T = 1;
#endif
    kn.gate_up[k13](wk, unit_at_cost(wk, units_per_expert, total_cost * t / T),
                  unit_at_cost(wk, units_per_expert, total_cost * (t + 1) / T));
#pragma omp barrier
    const int64_t h0 = std::min(p.H, col_blocks * t / T * 16), h1 = std::min(p.H, col_blocks * (t + 1) / T * 16);
    if (h1 > h0) kn.down[k2][d](wk, h0, h1);
  }
  return kOk;
}

const char* moe_error_string(int code) {
  switch (code) {
    case kOk: return "ok";
    case kBadArgs: return "null pointer or bad size";
    case kBadId: return "an expert id in topk_ids is outside [0, num_experts)";
    case kBadDType: return "unsupported dtype (fp32 / bf16 / fp16)";
    case kBadQuant: return "unsupported expert weight format (bits 8 / 4 with scales, group a multiple of 16 dividing K)";
    default: return "unknown error";
  }
}

}  // namespace cpu
}  // namespace fastinfer
