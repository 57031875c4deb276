// Device helpers shared by the CUDA kernels: element conversions, 16-byte vector loads, warp reductions.
// No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fastinfer/cuda/params.h"

namespace fastinfer {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// T (float, __half, __nv_bfloat16) <-> fp32, round to nearest even.
template <class T>
__device__ __forceinline__ float to_f(T x) {
  if constexpr (std::is_same<T, __half>::value) return __half2float(x);
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(x);
  else return x;
}

template <class T>
__device__ __forceinline__ T from_f(float x) {
  if constexpr (std::is_same<T, __half>::value) return __float2half_rn(x);
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(x);
  else return x;
}

// x rounded to T's precision, kept as fp32: what a torch op in dtype T stores.
template <class T>
__device__ __forceinline__ float rnd(float x) { return to_f<T>(from_f<T>(x)); }

// 8 consecutive elements of a 2-byte type from a 16-byte aligned address, as fp32.
template <class T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  static_assert(sizeof(T) == 2, "load8 reads 8 two-byte elements");
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f<T>(e[i]);
}

// Sum over aligned groups of WIDTH lanes (a power of two <= 32); every lane of the warp must call it.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return group_sum<32>(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the CTA (blockDim.x a multiple of 32, at most 1024); every thread must call it; all get the result.
__device__ __forceinline__ float block_sum(float v, float* scratch /* >= 32 floats of shared memory */) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

}  // namespace cuda
}  // namespace fastinfer
