// torch.ops.fastinfer.cuda_check_<op>(the op's arguments) and cuda_plan_paged_attention: the CUDA launchers'
// argument checks and launch plan (checks.cpp) as ops of the CPU extension fastinfer._C, so tests prove every check
// on a machine without a GPU or CUDA torch (tests/ops/test_cuda_checks.py). They check and plan; nothing launches.
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "checks.h"

namespace fastinfer {
namespace cuda_checks {
namespace fc = fastinfer::cuda;
namespace {

void check_paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t window, const at::Tensor& out,
                           double softcap) {
  paged_attention_params(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale, window, out, softcap);
}

void check_store_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  store_kv_params(key, value, k_cache, v_cache, slot_mapping);
}

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, const c10::optional<at::Tensor>& residual) {
  rms_norm_params(x, residual, weight, eps);
}

void check_rotary(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cache) {
  rotary_params(positions, q, k, cache);
}

void check_quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group_size,
                        const c10::optional<at::Tensor>& bias) {
  quant_linear_params(x, qweight, scales, mins, bits, group_size, bias);
}

// The launch plan of paged_attention as [partition, split_len, num_splits, workspace floats] (tests, benchmarks).
std::vector<int64_t> plan_paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                          const at::Tensor& block_table, const at::Tensor& seq_lens,
                                          const at::Tensor& query_start_loc, double scale, int64_t window,
                                          const at::Tensor& out, double softcap) {
  const fc::PagedAttentionParams p = paged_attention_params(q, k_cache, v_cache, block_table, seq_lens,
                                                            query_start_loc, scale, window, out, softcap);
  return {p.partition, p.split_len, p.num_splits, fc::paged_attention_workspace_floats(p)};
}

}  // namespace
}  // namespace cuda_checks
}  // namespace fastinfer

TORCH_LIBRARY_FRAGMENT(fastinfer, m) {
  namespace ck = fastinfer::cuda_checks;
  m.def("cuda_check_paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
        "Tensor query_start_loc, float scale, int window, Tensor out, float softcap=0.0) -> ()",
        &ck::check_paged_attention);
  m.def("cuda_plan_paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
        "Tensor query_start_loc, float scale, int window, Tensor out, float softcap=0.0) -> int[]",
        &ck::plan_paged_attention);
  m.def("cuda_check_store_kv(Tensor key, Tensor value, Tensor k_cache, Tensor v_cache, Tensor slot_mapping) -> ()",
        &ck::check_store_kv);
  m.def("cuda_check_rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual=None) -> ()", &ck::check_rms_norm);
  m.def("cuda_check_rotary_embedding(Tensor positions, Tensor q, Tensor k, Tensor cos_sin_cache) -> ()",
        &ck::check_rotary);
  m.def("cuda_check_quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int bits, int group_size, "
        "Tensor? bias=None) -> ()",
        &ck::check_quant_linear);
}
