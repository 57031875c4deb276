// Registers the raw kernels of csrc/ as torch ops (torch.ops.fastinfer.*). Thin on purpose: check dtypes,
// shapes, devices and layouts, then call the kernel. Importing fastinfer._C runs the registration.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string>

#include "fastinfer/cpu_attention.h"
#include "fastinfer/cpu_fused.h"
#include "fastinfer/cpu_moe.h"
#include "fastinfer/cpu_quant.h"
#include "fastinfer/cpu_quant_a8.h"

namespace {

namespace fc = fastinfer::cpu;

fc::DType cpu_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return fc::DType::kFloat32;
    case at::kBFloat16: return fc::DType::kBFloat16;
    case at::kHalf: return fc::DType::kFloat16;
    default: TORCH_CHECK(false, "fastinfer: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_int_vector(const at::Tensor& t, const char* name, at::ScalarType st, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), "fastinfer: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == st, "fastinfer: ", name, " must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "fastinfer: ", name, " must have ", dims, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), "fastinfer: ", name, " must be contiguous");
}

// Rows of [T, H, D] may be strided (q is a view into the fused qkv projection); heads and dims may not.
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "fastinfer: ", name, " must be [tokens, heads, head_dim], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 && (t.size(1) == 1 || t.stride(1) == t.size(2)),
              "fastinfer: ", name, " must have contiguous heads and dims (token stride may differ)");
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1) * t.size(2), "fastinfer: ", name, " rows overlap");
}

void paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_table, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t window, at::Tensor& out,
                         double softcap) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k_cache, &v_cache, &out})
    TORCH_CHECK(t->device().is_cpu(), "fastinfer::paged_attention: all tensors must be on the CPU");
  const fc::DType dt = cpu_dtype(q, "q");
  // int8 caches: int8 KV rows (head_dim codes + an fp16 scale per token and KV head)
  const bool kv_int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK((kv_int8 || k_cache.scalar_type() == q.scalar_type()) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fastinfer::paged_attention: q and out must share a dtype, the caches q's or int8 (int8 KV)");
  check_rows(q, "q");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == q.sizes(), "fastinfer::paged_attention: out must have q's shape");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "fastinfer::paged_attention: caches must both be [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "fastinfer::paged_attention: caches must be contiguous");
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2), head_dim = q.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim + (kv_int8 ? 2 : 0), "fastinfer::paged_attention: cache row ",
              k_cache.size(3), " != q head_dim ", head_dim, kv_int8 ? " + 2 (int8 KV: codes + fp16 scale)" : "");
  TORCH_CHECK(head_dim % 16 == 0 && head_dim <= fc::kMaxHeadDim,
              "fastinfer::paged_attention: head_dim must be a multiple of 16 up to 256, got ", head_dim);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "fastinfer::paged_attention: num_heads ", heads,
              " is not a multiple of num_kv_heads ", kv_heads);
  check_int_vector(block_table, "block_table", at::kInt, 2);
  check_int_vector(seq_lens, "seq_lens", at::kInt, 1);
  check_int_vector(query_start_loc, "query_start_loc", at::kInt, 1);
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1 && block_table.size(0) >= num_seqs,
              "fastinfer::paged_attention: need query_start_loc [B + 1] and block_table [>= B, max_blocks]");

  fc::PagedAttentionParams p;
  p.dtype = dt;
  p.kv_int8 = kv_int8;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.num_tokens = q.size(0);
  p.num_seqs = num_seqs;
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.num_blocks = k_cache.size(0);
  p.block_size = k_cache.size(1);
  p.block_table_stride = block_table.size(1);
  p.q_stride = q.stride(0);
  p.out_stride = out.stride(0);
  p.scale = static_cast<float>(scale);
  p.window = window;
  TORCH_CHECK(softcap >= 0, "fastinfer::paged_attention: softcap must be >= 0 (0: none), got ", softcap);
  p.softcap = static_cast<float>(softcap);
  p.num_threads = at::get_num_threads();  // follow torch.set_num_threads
  const int rc = fc::paged_attention(p);
  TORCH_CHECK(rc == 0, "fastinfer::paged_attention: ", fc::error_string(rc));
}

void store_kv_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&key, &value, &k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu(), "fastinfer::store_kv: all tensors must be on the CPU");
  const bool kv_int8 = k_cache.scalar_type() == at::kChar;  // int8 KV rows: quantized on the way in
  const fc::DType dt = cpu_dtype(kv_int8 ? key : k_cache, kv_int8 ? "key" : "k_cache");
  TORCH_CHECK((kv_int8 || key.scalar_type() == k_cache.scalar_type()) && value.scalar_type() == key.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "fastinfer::store_kv: key, value and the caches must share a dtype (or the caches be int8: int8 KV)");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "fastinfer::store_kv: caches must be contiguous [num_blocks, block_size, kv_heads, head_dim]");
  check_rows(key, "key");
  check_rows(value, "value");
  TORCH_CHECK(key.sizes() == value.sizes() && key.size(1) == k_cache.size(2) &&
                  key.size(2) + (kv_int8 ? 2 : 0) == k_cache.size(3),
              "fastinfer::store_kv: key/value must be [T, kv_heads, head_dim] matching the cache (int8 KV: + 2)");
  check_int_vector(slot_mapping, "slot_mapping", at::kLong, 1);
  TORCH_CHECK(slot_mapping.size(0) == key.size(0), "fastinfer::store_kv: slot_mapping must have one slot per token");

  fc::StoreKVParams p;
  p.dtype = dt;
  p.kv_int8 = kv_int8;
  p.head_dim = key.size(2);
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = key.size(0);
  p.key_stride = key.stride(0);
  p.value_stride = value.stride(0);
  p.row_elems = key.size(1) * key.size(2);
  p.num_slots = k_cache.size(0) * k_cache.size(1);
  p.num_threads = at::get_num_threads();
  const int rc = fc::store_kv(p);
  TORCH_CHECK(rc == 0, "fastinfer::store_kv: ", fc::error_string(rc));
}

fc::DType scale_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return fc::DType::kFloat32;
    case at::kHalf: return fc::DType::kFloat16;
    default: TORCH_CHECK(false, "fastinfer::quant_linear: ", name, " must be float32 or float16, got ", t.scalar_type());
  }
}

// Where the kernels would be slower (many rows of x, fp32 or fp16 x), a GEMM on the weight dequantized to
// x's dtype, in chunks of about kDequantChunkBytes (still in cache when the GEMM reads them).
constexpr int64_t kDequantChunkBytes = int64_t(4) << 20;

// y [M, N] = x [M, K] @ W.T + bias with W in the weight-only format of fastinfer/quantization.py.
at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& mins, int64_t bits, int64_t group_size,
                            const std::optional<at::Tensor>& bias) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &qweight, &scales})
    TORCH_CHECK(t->device().is_cpu(), "fastinfer::quant_linear: all tensors must be on the CPU");
  const fc::DType xdt = cpu_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1) && (x.size(0) <= 1 || x.stride(0) >= x.size(1)),
              "fastinfer::quant_linear: x must be [M, K] with unit column stride and non-overlapping rows, got ", x.sizes(), " strides ",
              x.strides());
  TORCH_CHECK(bits == 4 || bits == 8, "fastinfer::quant_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "fastinfer::quant_linear: qweight must be contiguous ", bits == 8 ? "int8 [N, K]" : "uint8 [N, K / 2]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * (bits == 4 ? 2 : 1) == K, "fastinfer::quant_linear: qweight ", qweight.sizes(),
              " does not match K=", K);
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "fastinfer::quant_linear: group_size ", group_size,
              " does not divide K=", K);
  const fc::DType sdt = scale_dtype(scales, "scales");
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group_size,
              "fastinfer::quant_linear: scales must be contiguous [N, K / group_size]");
  const bool has_mins = mins.has_value() && mins->defined();
  if (has_mins) {
    TORCH_CHECK(mins->device().is_cpu() && mins->scalar_type() == scales.scalar_type() && mins->is_contiguous() &&
                    mins->sizes() == scales.sizes(),
                "fastinfer::quant_linear: mins must be contiguous, with the dtype and shape of scales");
  }
  TORCH_CHECK(bits == 8 || has_mins, "fastinfer::quant_linear: 4-bit weights need mins");
  TORCH_CHECK(fc::quant_linear_supported(int(bits), K, group_size), "fastinfer::quant_linear: ",
              fc::quant_error_string(-2));
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N,
                "fastinfer::quant_linear: bias must be a CPU tensor [N]");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const int nthreads = at::get_num_threads();  // follow torch.set_num_threads

  if (!fc::quant_linear_prefers(M, xdt, int(bits), group_size)) {  // dequantize chunks of W, GEMM them (fp16 in fp32: CPU fp16 GEMMs are slow)
    const at::Tensor xw = x.scalar_type() == at::kHalf ? x.to(at::kFloat) : x;  // [M, K]
    // Chunks of whole multiples of 256 rows: oneDNN's bf16 GEMM runs some other widths (e.g. 3640) 2x slower.
    const int64_t fit = kDequantChunkBytes / (K * int64_t(xw.element_size()));
    const int64_t rows = std::min<int64_t>(N, std::max<int64_t>(256, fit / 256 * 256));
    at::Tensor w = at::empty({std::min(rows, N), K}, xw.options());  // [rows, K]
    at::Tensor out = at::empty({M, N}, xw.options());                 // [M, N]
    fc::QuantDequantParams d;
    d.qweight = qweight.data_ptr();
    d.scales = scales.data_ptr();
    d.mins = has_mins ? mins->data_ptr() : nullptr;
    d.scale_dtype = sdt;
    d.dst = w.data_ptr();
    d.dst_dtype = cpu_dtype(w, "x");
    d.N = N, d.K = K, d.bits = int(bits), d.group_size = group_size, d.num_threads = nthreads;
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      d.n0 = n0;
      d.n1 = std::min(N, n0 + rows);
      const int rc = fc::quant_dequantize(d);
      TORCH_CHECK(rc == 0, "fastinfer::quant_linear: ", fc::quant_error_string(rc));
      const at::Tensor wv = w.narrow(0, 0, d.n1 - n0);
      if (d.n1 - n0 == N) at::mm_out(out, xw, wv.t());
      else out.narrow(1, n0, d.n1 - n0).copy_(at::mm(xw, wv.t()));
    }
    if (bias_f.defined()) out.add_(bias_f);
    return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
  }

  at::Tensor out = at::empty({M, N}, x.options());  // [M, N]
  fc::QuantLinearParams p;
  p.x_dtype = xdt;
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.qweight = qweight.data_ptr();
  p.scales = scales.data_ptr();
  p.mins = has_mins ? mins->data_ptr() : nullptr;
  p.scale_dtype = sdt;
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.M = M, p.N = N, p.K = K;
  p.x_stride = M > 1 ? x.stride(0) : K;
  p.out_stride = N;
  p.bits = int(bits);
  p.group_size = group_size;
  p.num_threads = nthreads;
  const int rc = fc::quant_linear(p);
  TORCH_CHECK(rc == 0, "fastinfer::quant_linear: ", fc::quant_error_string(rc));
  return out;
}

// x [T, H], w13 [E, 2I, H], w2 [E, H, I] (one dtype, contiguous), topk_weights fp32 [T, k], topk_ids int32 /
// int64 [T, k] -> out [T, H]. Every T runs in the kernel (grouped by expert, each active expert read once).
// One expert projection [E, N, K] (w13: N = 2I, K = H; w2: N = H, K = I): float in x's dtype, or int8 / packed
// int4 codes with fp32 scales (and optional mins) [E, N, K / group].
fc::MoeWeight moe_weight(const char* name, const at::Tensor& w, const c10::optional<at::Tensor>& scales,
                         const c10::optional<at::Tensor>& mins, const at::Tensor& x, int64_t E, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.dim() == 3 && w.is_contiguous(), "fastinfer::fused_moe: ", name,
                    " must be a contiguous 3-D CPU tensor, got ", w.sizes());
  fc::MoeWeight mw;
  mw.w = w.data_ptr();
  if (!scales.has_value()) {
    TORCH_CHECK_VALUE(w.scalar_type() == x.scalar_type(), "fastinfer::fused_moe: float ", name,
                      " must have x's dtype ", x.scalar_type(), ", got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.size(0) == E && w.size(1) == N && w.size(2) == K, "fastinfer::fused_moe: ", name, " ",
                      w.sizes(), " does not fit x (need [", E, ", ", N, ", ", K, "])");
    TORCH_CHECK_VALUE(!mins.has_value(), "fastinfer::fused_moe: ", name, " mins without scales");
    return mw;
  }
  TORCH_CHECK_VALUE(w.scalar_type() == at::kChar || w.scalar_type() == at::kByte, "fastinfer::fused_moe: quantized ",
                    name, " must be int8 or uint8 (packed int4), got ", w.scalar_type());
  mw.bits = w.scalar_type() == at::kChar ? 8 : 4;
  TORCH_CHECK_VALUE(w.size(0) == E && w.size(1) == N && w.size(2) * (mw.bits == 4 ? 2 : 1) == K,
                    "fastinfer::fused_moe: quantized ", name, " ", w.sizes(), " does not fit [", E, ", ", N, ", ", K,
                    "] (int4: K / 2 bytes per row)");
  for (const at::Tensor* t : {&*scales, mins.has_value() ? &*mins : &*scales}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 &&
                          t->size(0) == E && t->size(1) == N && t->size(2) == scales->size(2),
                      "fastinfer::fused_moe: ", name, " scales / mins must be contiguous fp32 [", E, ", ", N,
                      ", groups] CPU tensors alike, got ", t->sizes(), " ", t->scalar_type());
  }
  const int64_t groups = scales->size(2);
  TORCH_CHECK_VALUE(groups > 0 && K % groups == 0, "fastinfer::fused_moe: ", name, " has ", groups,
                    " groups per row, which does not divide K = ", K);
  mw.scales = scales->data_ptr<float>();
  mw.mins = mins.has_value() ? mins->data_ptr<float>() : nullptr;
  mw.group = K / groups;
  return mw;
}

at::Tensor fused_moe_cpu(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                         const c10::optional<at::Tensor>& w13_scales, const c10::optional<at::Tensor>& w13_mins,
                         const c10::optional<at::Tensor>& w2_scales, const c10::optional<at::Tensor>& w2_mins) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &topk_weights, &topk_ids})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "fastinfer::fused_moe: all tensors must be on the CPU");
  const fc::DType dt = cpu_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous() && w13.dim() == 3 && w2.dim() == 3,
                    "fastinfer::fused_moe: need a contiguous x [T, H], w13 [E, 2I, H], w2 [E, H, I]");
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK_VALUE(w13.size(1) == 2 * I, "fastinfer::fused_moe: w13 ", w13.sizes(), " needs an even row count");
  TORCH_CHECK_VALUE(topk_weights.scalar_type() == at::kFloat, "fastinfer::fused_moe: topk_weights must be float32");
  TORCH_CHECK_VALUE(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
                    "fastinfer::fused_moe: topk_ids must be int32 or int64");
  TORCH_CHECK_VALUE(topk_weights.dim() == 2 && topk_weights.size(0) == T && topk_ids.sizes() == topk_weights.sizes(),
                    "fastinfer::fused_moe: topk_weights and topk_ids must both be [T, k], got ", topk_weights.sizes(),
                    " and ", topk_ids.sizes());
  fc::FusedMoeParams p;
  p.w13 = moe_weight("w13", w13, w13_scales, w13_mins, x, E, 2 * I, H);
  p.w2 = moe_weight("w2", w2, w2_scales, w2_mins, x, E, H, I);
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.contiguous();
  at::Tensor out = at::empty({T, H}, x.options());  // [T, H]
  p.dtype = dt;
  p.x = x.data_ptr();
  p.topk_weights = wts.data_ptr<float>();
  p.topk_ids = ids.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.T = T, p.H = H, p.I = I, p.E = E, p.K = topk_ids.size(1);
  p.num_threads = at::get_num_threads();  // follow torch.set_num_threads
  const int rc = fc::fused_moe(p);
  TORCH_CHECK_VALUE(rc == 0, "fastinfer::fused_moe: ", fc::moe_error_string(rc));
  return out;
}

// [T, H] rows with a unit inner stride (the row stride may differ), on the CPU, in a kernel dtype.
void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1),
                    "fastinfer::", op, ": ", name, " must be a 2-D CPU tensor with contiguous rows, got ", t.sizes(),
                    " strides ", t.strides());
}

at::Tensor rms_norm_impl(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                         double eps, at::Tensor* residual_out) {
  check_matrix(x, "rms_norm", "x");
  const fc::DType dt = cpu_dtype(x, "x");
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
                        weight.is_contiguous() && weight.device().is_cpu(),
                    "fastinfer::rms_norm: weight must be a contiguous [", x.size(1), "] CPU tensor of x's dtype");
  fc::RmsNormParams p;
  p.dtype = dt;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.T = x.size(0), p.H = x.size(1), p.x_stride = x.stride(0);
  p.eps = float(eps);
  p.num_threads = at::get_num_threads();
  at::Tensor out = at::empty({p.T, p.H}, x.options());
  p.out = out.data_ptr();
  if (residual.has_value()) {
    check_matrix(*residual, "fused_add_rms_norm", "residual");
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                      "fastinfer::fused_add_rms_norm: residual ", residual->sizes(), " must match x ", x.sizes());
    *residual_out = at::empty({p.T, p.H}, x.options());
    p.residual = residual->data_ptr();
    p.r_stride = residual->stride(0);
    p.residual_out = residual_out->data_ptr();
  }
  const int rc = fc::rms_norm(p);
  TORCH_CHECK_VALUE(rc == 0, "fastinfer::rms_norm: ", fc::fused_error_string(rc));
  return out;
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_impl(x, c10::nullopt, weight, eps, nullptr);
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                          const at::Tensor& weight, double eps) {
  at::Tensor res_out;
  at::Tensor out = rms_norm_impl(x, residual, weight, eps, &res_out);
  return {out, res_out};
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cache) {
  check_rows(q, "q");
  check_rows(k, "k");
  const fc::DType dt = cpu_dtype(q, "q");
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu() && k.scalar_type() == q.scalar_type() &&
                        q.size(0) == k.size(0) && q.size(2) == k.size(2),
                    "fastinfer::rotary_embedding: q ", q.sizes(), " and k ", k.sizes(),
                    " must be CPU tensors [T, heads, D] of one dtype");
  check_int_vector(positions, "positions", at::kLong, 1);
  TORCH_CHECK_VALUE(positions.size(0) == q.size(0), "fastinfer::rotary_embedding: ", positions.size(0),
                    " positions for ", q.size(0), " tokens");
  TORCH_CHECK_VALUE(cache.device().is_cpu() && cache.scalar_type() == at::kFloat && cache.dim() == 2 &&
                        cache.is_contiguous() && cache.size(1) <= q.size(2),
                    "fastinfer::rotary_embedding: cos_sin_cache must be a contiguous fp32 [max_pos, rot <= D]");
  fc::RotaryParams p;
  p.dtype = dt;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.cache = cache.data_ptr<float>();
  p.positions = positions.data_ptr<int64_t>();
  p.T = q.size(0), p.Hq = q.size(1), p.Hk = k.size(1), p.D = q.size(2), p.rot = cache.size(1);
  p.q_stride = q.stride(0), p.k_stride = k.stride(0), p.max_pos = cache.size(0);
  const int rc = fc::rotary_embedding(p);
  TORCH_CHECK_VALUE(rc == 0, "fastinfer::rotary_embedding: ", fc::fused_error_string(rc));
}

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  check_matrix(x, "silu_and_mul", "x");
  TORCH_CHECK_VALUE(x.size(1) % 2 == 0, "fastinfer::silu_and_mul: x needs an even last dim, got ", x.sizes());
  fc::SiluMulParams p;
  p.dtype = cpu_dtype(x, "x");
  p.x = x.data_ptr();
  p.T = x.size(0), p.d = x.size(1) / 2, p.x_stride = x.stride(0);
  p.num_threads = at::get_num_threads();
  at::Tensor out = at::empty({p.T, p.d}, x.options());
  p.out = out.data_ptr();
  const int rc = fc::silu_and_mul(p);
  TORCH_CHECK_VALUE(rc == 0, "fastinfer::silu_and_mul: ", fc::fused_error_string(rc));
  return out;
}

void apply_token_bitmask_cpu(at::Tensor& logits, const at::Tensor& bitmask) {
  check_matrix(logits, "apply_token_bitmask", "logits");
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat && logits.size(1) > 0,
                    "fastinfer::apply_token_bitmask: logits must be fp32 [B, V>0]");
  TORCH_CHECK_VALUE(bitmask.device().is_cpu() && bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 &&
                        bitmask.is_contiguous() && bitmask.size(0) == logits.size(0) &&
                        bitmask.size(1) >= (logits.size(1) + 31) / 32,
                    "fastinfer::apply_token_bitmask: bitmask must be contiguous int32 [B, >= ceil(V / 32)] on the CPU");
  const int rc = fc::apply_token_bitmask(logits.data_ptr<float>(), logits.size(0), logits.size(1), logits.stride(0),
                                         bitmask.data_ptr<int32_t>(), bitmask.size(1));
  TORCH_CHECK_VALUE(rc == 0, "fastinfer::apply_token_bitmask: ", fc::fused_error_string(rc));
}

at::Tensor argmax_rows_cpu(const at::Tensor& x) {
  check_matrix(x, "argmax_rows", "x");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.size(1) > 0, "fastinfer::argmax_rows: x must be fp32 [B, V>0]");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const int rc = fc::argmax_rows(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), out.data_ptr<int64_t>());
  TORCH_CHECK_VALUE(rc == 0, "fastinfer::argmax_rows: ", fc::fused_error_string(rc));
  return out;
}

at::Tensor quant_linear_a8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& mins, int64_t group_size,
                              const c10::optional<at::Tensor>& bias) {
  check_matrix(x, "quant_linear_a8", "x");
  const fc::DType dt = cpu_dtype(x, "x");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  const int bits = qweight.scalar_type() == at::kChar ? 8 : 4;
  TORCH_CHECK_VALUE(qweight.device().is_cpu() && (qweight.scalar_type() == at::kByte || bits == 8) &&
                        qweight.dim() == 2 && qweight.is_contiguous() && qweight.size(1) * (bits == 4 ? 2 : 1) == K,
                    "fastinfer::quant_linear_a8: qweight must be contiguous uint8 [N, K / 2] (int4) or int8 [N, K] "
                    "(K = ", K, "), got ", qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK_VALUE(group_size > 0 && K % group_size == 0, "fastinfer::quant_linear_a8: group_size ", group_size,
                    " does not divide K = ", K);
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scales, mins.has_value() ? &*mins : &scales})
    TORCH_CHECK_VALUE(t->device().is_cpu() && (t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf) &&
                          t->scalar_type() == scales.scalar_type() && t->is_contiguous() && t->dim() == 2 &&
                          t->size(0) == N && t->size(1) == G,
                      "fastinfer::quant_linear_a8: scales / mins must be contiguous fp32 or fp16 [", N, ", ", G,
                      "] alike, got ", t->sizes(), " ", t->scalar_type());
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type() && bias->numel() == N && bias->is_contiguous(),
                      "fastinfer::quant_linear_a8: bias must be a contiguous [", N, "] of x's dtype");
  at::Tensor out = at::empty({M, N}, x.options());
  fc::QuantLinearA8Params p;
  p.dtype = dt;
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.qweight = static_cast<const uint8_t*>(qweight.data_ptr());
  p.bits = bits;
  p.scales = scales.data_ptr();
  p.mins = mins.has_value() ? mins->data_ptr() : nullptr;
  p.scales_f16 = scales.scalar_type() == at::kHalf;
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.M = M, p.N = N, p.K = K, p.group = group_size;
  p.num_threads = at::get_num_threads();
  const int rc = fc::quant_linear_a8(p);
  TORCH_CHECK_VALUE(rc == 0, "fastinfer::quant_linear_a8: ", fc::quant_a8_error_string(rc));
  return out;
}

// "" -> report; "auto" | "generic" | "avx2" | "avx512" | "avx512_bf16" -> select (falls back to what the CPU supports).
std::string cpu_isa(std::string force) {
  if (force == "auto") fc::set_isa(fc::Isa::kAuto);
  else if (force == "generic") fc::set_isa(fc::Isa::kGeneric);
  else if (force == "avx2") fc::set_isa(fc::Isa::kAvx2);
  else if (force == "avx512") fc::set_isa(fc::Isa::kAvx512);
  else if (force == "avx512_bf16") fc::set_isa(fc::Isa::kAvx512Bf16);
  else TORCH_CHECK(force.empty(), "fastinfer::cpu_isa: unknown variant '", force, "'");
  return fc::isa_name(fc::active_isa());
}

}  // namespace

TORCH_LIBRARY(fastinfer, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
        "Tensor query_start_loc, float scale, int window, Tensor(a!) out, float softcap=0.0) -> ()");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("cpu_isa(str force='') -> str", &cpu_isa);
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int bits, int group_size, "
        "Tensor? bias=None) -> Tensor");
  m.def("quant_linear_a8(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int group_size, "
        "Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos_sin_cache) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask) -> ()");
  m.def("fused_moe(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, Tensor? w13_scales=None, "
        "Tensor? w13_mins=None, Tensor? w2_scales=None, Tensor? w2_mins=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastinfer, CPU, m) {
  m.impl("paged_attention", &paged_attention_cpu);
  m.impl("store_kv", &store_kv_cpu);
  m.impl("quant_linear", &quant_linear_cpu);
  m.impl("fused_moe", &fused_moe_cpu);
  m.impl("quant_linear_a8", &quant_linear_a8_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
  m.impl("rotary_embedding", &rotary_embedding_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("argmax_rows", &argmax_rows_cpu);
  m.impl("apply_token_bitmask", &apply_token_bitmask_cpu);
}

// A plain Python module: importing it loads this library, whose static initialisers register the ops.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                            "fastinfer compiled ops, registered as torch.ops.fastinfer.*", -1, nullptr};
  return PyModule_Create(&def);
}
