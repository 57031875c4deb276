// The per-layer CUDA kernels: KV-cache write, fused RMSNorm (+ residual) and in-place NeoX rotary embedding.
// Contracts in params.h (StoreKVParams, RmsNormParams, RotaryParams). No torch headers.
#pragma once

#include "fastinfer/cuda/common.cuh"

namespace fastinfer {
namespace cuda {

constexpr int kRowThreads = 256;

// One CTA per token: its key and value rows copied to the cache slot (uint4 copies when p.vec16).
template <class T>
__global__ void __launch_bounds__(kRowThreads) store_kv_kernel(const StoreKVParams p) {
  const int64_t t = blockIdx.x, slot = p.slot_mapping[t];
  if (slot < 0 || slot >= p.num_slots) return;
  const T* key = static_cast<const T*>(p.key) + t * p.key_stride;
  const T* value = static_cast<const T*>(p.value) + t * p.value_stride;
  T* kc = static_cast<T*>(p.k_cache) + slot * p.row_elems;
  T* vc = static_cast<T*>(p.v_cache) + slot * p.row_elems;
  if (p.vec16) {
    const int64_t n = p.row_elems * int64_t(sizeof(T)) / 16;
    for (int64_t i = threadIdx.x; i < n; i += kRowThreads) {
      reinterpret_cast<uint4*>(kc)[i] = reinterpret_cast<const uint4*>(key)[i];
      reinterpret_cast<uint4*>(vc)[i] = reinterpret_cast<const uint4*>(value)[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < p.row_elems; i += kRowThreads) {
      kc[i] = key[i];
      vc[i] = value[i];
    }
  }
}

// One CTA per row: s (x, or round(x + residual) stored to residual_out), the fp32 sum of squares, then
// out = round(weight * round(s * inv)).
template <class T>
__global__ void __launch_bounds__(kRowThreads) rms_norm_kernel(const RmsNormParams p) {
  __shared__ float scratch[32];
  const int64_t t = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + t * p.x_stride;
  const T* r = p.residual ? static_cast<const T*>(p.residual) + t * p.r_stride : nullptr;
  T* so = p.residual ? static_cast<T*>(p.residual_out) + t * p.H : nullptr;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < p.H; i += kRowThreads) {
    float s = to_f<T>(x[i]);
    if (r) {
      const T sum = from_f<T>(s + to_f<T>(r[i]));
      so[i] = sum;
      s = to_f<T>(sum);
    }
    ss = fmaf(s, s, ss);
  }
  ss = block_sum(ss, scratch);
  const float inv = 1.f / sqrtf(ss / float(p.H) + p.eps);
  const T* s = so ? so : x;  // each thread re-reads only what it wrote (same i), so no barrier is needed
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + t * p.H;
  for (int64_t i = threadIdx.x; i < p.H; i += kRowThreads)
    out[i] = from_f<T>(to_f<T>(w[i]) * rnd<T>(to_f<T>(s[i]) * inv));
}

// One CTA per token: every (head, feature pair) of q and k rotated in place.
template <class T>
__global__ void __launch_bounds__(kRowThreads) rotary_kernel(const RotaryParams p) {
  const int64_t t = blockIdx.x, pos = p.positions[t];
  if (pos < 0 || pos >= p.max_pos) return;
  const int64_t half = p.rot / 2, pairs = (p.Hq + p.Hk) * half;
  const float* c = p.cache + pos * p.rot;
  for (int64_t i = threadIdx.x; i < pairs; i += kRowThreads) {
    const int64_t h = i / half, j = i % half;
    T* x = h < p.Hq ? static_cast<T*>(p.q) + t * p.q_stride + h * p.D
                    : static_cast<T*>(p.k) + t * p.k_stride + (h - p.Hq) * p.D;
    const float x1 = to_f<T>(x[j]), x2 = to_f<T>(x[half + j]);
    const float vc = rnd<T>(c[j]), vs = rnd<T>(c[half + j]);
    x[j] = from_f<T>(rnd<T>(x1 * vc) - rnd<T>(x2 * vs));
    x[half + j] = from_f<T>(rnd<T>(x2 * vc) + rnd<T>(x1 * vs));
  }
}

}  // namespace cuda
}  // namespace fastinfer
