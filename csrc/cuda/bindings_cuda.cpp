// CUDA implementations of the ops csrc/bindings.cpp defines (same names and schemas as the CPU ones), registered
// for the CUDA dispatch key: the extension fastinfer._C_cuda, built only with a CUDA torch and nvcc (setup.py),
// loaded after fastinfer._C (which defines the ops). Each op runs the argument checks of checks.cpp (the functions
// fastinfer._C exposes as fastinfer::cuda_check_*), allocates what the launcher needs, launches on the current
// stream.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks.h"

namespace {

namespace fc = fastinfer::cuda;
namespace ck = fastinfer::cuda_checks;

void require_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.is_cuda(), "fastinfer::", op, " (CUDA): tensors must be on a CUDA device, got ", t.device());
}

void check_launch(int rc, const char* op) {
  TORCH_CHECK(rc == 0, "fastinfer::", op, " (CUDA): launch failed: ", fc::cuda_error_string(rc));
}

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void paged_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                          double scale, int64_t window, at::Tensor& out, double softcap) {
  require_cuda(q, "paged_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  fc::PagedAttentionParams p =
      ck::paged_attention_params(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale, window, out, softcap);
  at::Tensor workspace;
  if (const int64_t n = fc::paged_attention_workspace_floats(p)) {
    workspace = at::empty({n}, q.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  check_launch(fc::launch_paged_attention(p, stream()), "paged_attention");
}

void store_kv_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping) {
  require_cuda(k_cache, "store_kv");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  check_launch(fc::launch_store_kv(ck::store_kv_params(key, value, k_cache, v_cache, slot_mapping), stream()),
               "store_kv");
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  require_cuda(x, "rms_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  fc::RmsNormParams p = ck::rms_norm_params(x, c10::nullopt, weight, eps);
  at::Tensor out = at::empty({p.T, p.H}, x.options());
  p.out = out.data_ptr();
  check_launch(fc::launch_rms_norm(p, stream()), "rms_norm");
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                           const at::Tensor& weight, double eps) {
  require_cuda(x, "fused_add_rms_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  fc::RmsNormParams p = ck::rms_norm_params(x, residual, weight, eps);
  at::Tensor out = at::empty({p.T, p.H}, x.options());
  at::Tensor residual_out = at::empty({p.T, p.H}, x.options());
  p.out = out.data_ptr();
  p.residual_out = residual_out.data_ptr();
  check_launch(fc::launch_rms_norm(p, stream()), "fused_add_rms_norm");
  return {out, residual_out};
}

void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cache) {
  require_cuda(q, "rotary_embedding");
  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(fc::launch_rotary_embedding(ck::rotary_params(positions, q, k, cache), stream()), "rotary_embedding");
}

// Up to kQuantMaxRows rows of x: the GEMV kernel. More: rows of W dequantized to x's dtype in chunks of about
// kDequantChunkBytes, each multiplied by cuBLAS (at::mm), as the CPU binding does for its GEMM path.
constexpr int64_t kDequantChunkBytes = int64_t(64) << 20;

at::Tensor quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group_size,
                             const c10::optional<at::Tensor>& bias) {
  require_cuda(x, "quant_linear");
  const c10::cuda::CUDAGuard guard(x.device());
  fc::QuantLinearParams p = ck::quant_linear_params(x, qweight, scales, mins, bits, group_size, bias);
  at::Tensor bias_f;
  if (bias.has_value()) {
    bias_f = bias->to(at::kFloat).contiguous();
    p.bias = bias_f.data_ptr<float>();
  }
  at::Tensor out = at::empty({p.M, p.N}, x.options());  // [M, N]
  if (p.M <= fc::kQuantMaxRows) {
    p.out = out.data_ptr();
    check_launch(fc::launch_quant_gemv(p, stream()), "quant_linear");
    return out;
  }
  const int64_t rows = std::min<int64_t>(p.N, std::max<int64_t>(256, kDequantChunkBytes / (p.K * x.element_size())));
  at::Tensor w = at::empty({rows, p.K}, x.options());  // [rows, K]
  const fc::DType wdt = p.x_dtype;
  for (int64_t n0 = 0; n0 < p.N; n0 += rows) {
    const int64_t n1 = std::min(p.N, n0 + rows);
    check_launch(fc::launch_quant_dequantize(p, w.data_ptr(), wdt, n0, n1, stream()), "quant_linear");
    const at::Tensor wv = w.narrow(0, 0, n1 - n0);
    if (n1 - n0 == p.N) at::mm_out(out, x, wv.t());
    else out.narrow(1, n0, n1 - n0).copy_(at::mm(x, wv.t()));
  }
  if (bias_f.defined()) out.add_(bias_f);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("paged_attention", &paged_attention_cuda);
  m.impl("store_kv", &store_kv_cuda);
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cuda);
  m.impl("rotary_embedding", &rotary_embedding_cuda);
  m.impl("quant_linear", &quant_linear_cuda);
}

// A plain Python module: importing it loads this library, whose static initialisers register the CUDA impls.
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda",
                            "fastinfer CUDA kernels, registered for torch.ops.fastinfer.* on CUDA tensors", -1, nullptr};
  return PyModule_Create(&def);
}
