// Launcher of the paged decode attention kernels (paged_attention.cuh): the template for dtype, head size and the
// heads-per-pass GP (the query-head group rounded up to 1, 2, 4 or 8), the grid from plan_paged_attention.
// No torch headers: compiled by plain nvcc in CI.
#include "fastinfer/cuda/paged_attention.cuh"

namespace fastinfer {
namespace cuda {
namespace {

template <class T, int D, int GP>
int launch(const PagedAttentionParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.num_tokens), unsigned(p.num_kv_heads), unsigned(p.num_splits));
  const size_t smem = size_t(paged_attention_smem_bytes(p, p.partition));
  paged_attention_split_kernel<T, D, GP><<<grid, kAttnThreads, smem, stream>>>(p);
  if (p.num_splits > 1)
    paged_attention_reduce_kernel<T, D><<<dim3(unsigned(p.num_tokens), unsigned(p.num_heads)), D, 0, stream>>>(p);
  return int(cudaGetLastError());
}

template <class T, int D>
int launch_group(const PagedAttentionParams& p, cudaStream_t stream) {
  const int64_t group = paged_attention_group(p);
  if (group <= 1) return launch<T, D, 1>(p, stream);
  if (group <= 2) return launch<T, D, 2>(p, stream);
  if (group <= 4) return launch<T, D, 4>(p, stream);
  return launch<T, D, 8>(p, stream);
}

template <class T>
int launch_dim(const PagedAttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_group<T, 64>(p, stream);
    case 128: return launch_group<T, 128>(p, stream);
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace

int launch_paged_attention(const PagedAttentionParams& p, void* stream) {
  if (p.num_tokens == 0) return 0;
  if (p.partition <= 0 || p.num_splits <= 0 || (p.num_splits > 1 && !p.workspace)) return int(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat16: return launch_dim<__half>(p, s);
    case DType::kBFloat16: return launch_dim<__nv_bfloat16>(p, s);
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace fastinfer
