// Host-side argument checks of the CUDA launchers: tensors in, a filled parameter struct (params.h) out, or a
// ValueError naming the problem. Compiled in every build (csrc/cuda/checks.cpp): the CUDA binding
// (bindings_cuda.cpp) calls these before it launches, and the CPU build exposes them as the ops
// torch.ops.fastinfer.cuda_check_* so tests/ops/test_cuda_checks.py proves each check without a GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "fastinfer/cuda/params.h"

namespace fastinfer {
namespace cuda_checks {

// Every field but the workspace (the binding allocates paged_attention_workspace_floats(p) floats).
cuda::PagedAttentionParams paged_attention_params(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                                  const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                                  double scale, int64_t window, const at::Tensor& out,
                                                  double softcap);

cuda::StoreKVParams store_kv_params(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const at::Tensor& slot_mapping);

// Inputs only: the binding allocates out (and residual_out) and sets their pointers.
cuda::RmsNormParams rms_norm_params(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                    const at::Tensor& weight, double eps);

cuda::RotaryParams rotary_params(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& cos_sin_cache);

// Inputs only (out and the fp32 bias pointer are set by the binding); bias is checked for shape and device.
cuda::QuantLinearParams quant_linear_params(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                            const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group_size,
                                            const c10::optional<at::Tensor>& bias);

}  // namespace cuda_checks
}  // namespace fastinfer
