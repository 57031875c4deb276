// Launchers of the per-layer kernels (layer_ops.cuh): store_kv, rms_norm (+ residual), rotary_embedding, for fp32,
// fp16 and bf16. No torch headers: compiled by plain nvcc in CI.
#include "fastinfer/cuda/layer_ops.cuh"

namespace fastinfer {
namespace cuda {
namespace {

// f(T()) for the element type T of d.
template <class F>
int by_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: return f(__half());
    case DType::kBFloat16: return f(__nv_bfloat16());
    case DType::kFloat32: return f(float());
  }
  return int(cudaErrorInvalidValue);
}

// One CTA of kRowThreads per row (token) of the kernel `pick(element tag)` returns for the dtype.
template <class P, class Pick>
int launch_rows(DType d, int64_t rows, const P& p, void* stream, Pick pick) {
  if (rows == 0) return 0;
  return by_dtype(d, [&](auto tag) {
    const auto kernel = pick(tag);
    kernel<<<unsigned(rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    return int(cudaGetLastError());
  });
}

}  // namespace

const char* cuda_error_string(int rc) { return cudaGetErrorString(static_cast<cudaError_t>(rc)); }

int launch_store_kv(const StoreKVParams& p, void* stream) {
  return launch_rows(p.dtype, p.num_tokens, p, stream, [](auto tag) { return store_kv_kernel<decltype(tag)>; });
}

int launch_rms_norm(const RmsNormParams& p, void* stream) {
  return launch_rows(p.dtype, p.T, p, stream, [](auto tag) { return rms_norm_kernel<decltype(tag)>; });
}

int launch_rotary_embedding(const RotaryParams& p, void* stream) {
  return launch_rows(p.dtype, p.T, p, stream, [](auto tag) { return rotary_kernel<decltype(tag)>; });
}

}  // namespace cuda
}  // namespace fastinfer
