// Launchers of the weight-only int4 / int8 kernels (quant_gemv.cuh): the GEMV for up to kQuantMaxRows rows of x
// (MT, the row count rounded up to 1, 2, 4 or 8), and the dequantization used by the binding for more rows.
// No torch headers: compiled by plain nvcc in CI.
#include "fastinfer/cuda/quant_gemv.cuh"

namespace fastinfer {
namespace cuda {
namespace {

template <class T, int BITS, int MT>
int gemv(const QuantLinearParams& p, cudaStream_t stream) {
  constexpr int64_t rows_per_cta = (kQuantThreads / 32) * kQuantRowsPerWarp;
  const unsigned ctas = unsigned((p.N + rows_per_cta - 1) / rows_per_cta);
  quant_gemv_kernel<T, BITS, MT><<<ctas, kQuantThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

template <class T, int BITS>
int gemv_rows(const QuantLinearParams& p, cudaStream_t stream) {
  if (p.M <= 1) return gemv<T, BITS, 1>(p, stream);
  if (p.M <= 2) return gemv<T, BITS, 2>(p, stream);
  if (p.M <= 4) return gemv<T, BITS, 4>(p, stream);
  return gemv<T, BITS, 8>(p, stream);
}

template <class T>
int gemv_bits(const QuantLinearParams& p, cudaStream_t stream) {
  return p.bits == 4 ? gemv_rows<T, 4>(p, stream) : gemv_rows<T, 8>(p, stream);
}

template <class T>
int dequant(const QuantLinearParams& p, void* dst, int64_t n0, int64_t n1, cudaStream_t stream) {
  const int64_t work = (n1 - n0) * (p.K / 8);
  const unsigned ctas = unsigned((work + 255) / 256);
  if (p.bits == 4) quant_dequantize_kernel<T, 4><<<ctas, 256, 0, stream>>>(p, static_cast<T*>(dst), n0, n1);
  else quant_dequantize_kernel<T, 8><<<ctas, 256, 0, stream>>>(p, static_cast<T*>(dst), n0, n1);
  return int(cudaGetLastError());
}

}  // namespace

int launch_quant_gemv(const QuantLinearParams& p, void* stream) {
  if (p.M == 0 || p.N == 0) return 0;
  if (p.M > kQuantMaxRows || (p.bits != 4 && p.bits != 8)) return int(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.x_dtype) {
    case DType::kFloat16: return gemv_bits<__half>(p, s);
    case DType::kBFloat16: return gemv_bits<__nv_bfloat16>(p, s);
    default: return int(cudaErrorInvalidValue);
  }
}

int launch_quant_dequantize(const QuantLinearParams& p, void* dst, DType dst_dtype, int64_t n0, int64_t n1,
                            void* stream) {
  if (n1 <= n0 || p.K == 0) return 0;
  if (p.bits != 4 && p.bits != 8) return int(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dst_dtype) {
    case DType::kFloat16: return dequant<__half>(p, dst, n0, n1, s);
    case DType::kBFloat16: return dequant<__nv_bfloat16>(p, dst, n0, n1, s);
    case DType::kFloat32: return dequant<float>(p, dst, n0, n1, s);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace fastinfer
