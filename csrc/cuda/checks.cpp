// The CUDA launchers' argument checks (checks.h), linked into both extensions: fastinfer._C exposes them as ops
// (check_ops.cpp), fastinfer._C_cuda runs them before each launch (bindings_cuda.cpp).
#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

namespace fastinfer {
namespace cuda_checks {
namespace {

namespace fc = fastinfer::cuda;

#define FI_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, "fastinfer::", op, " (CUDA): ", __VA_ARGS__)

constexpr int64_t kMaxGrid = 65535;  // grid y / z limit

fc::DType kernel_dtype(const at::Tensor& t, const char* op, const char* name, bool allow_fp32) {
  switch (t.scalar_type()) {
    case at::kHalf: return fc::DType::kFloat16;
    case at::kBFloat16: return fc::DType::kBFloat16;
    case at::kFloat:
      if (allow_fp32) return fc::DType::kFloat32;
      break;
    default: break;
  }
  FI_CHECK(false, op, name, " must be ", allow_fp32 ? "float32, " : "", "float16 or bfloat16, got ", t.scalar_type());
  return fc::DType::kFloat16;
}

void same_device(const char* op, const at::Tensor& ref, const char* ref_name,
                 std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  for (const auto& [t, name] : others)
    FI_CHECK(t->device() == ref.device(), op, name, " is on ", t->device(), " but ", ref_name, " is on ", ref.device());
}

// Elements between rows (dim 0); a single row counts as packed.
int64_t row_stride(const at::Tensor& t) {
  int64_t packed = 1;
  for (int64_t d = 1; d < t.dim(); ++d) packed *= t.size(d);
  return t.size(0) > 1 ? t.stride(0) : packed;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// [T, heads, D] with contiguous heads and dims (the token stride may differ: views of the fused qkv projection).
void check_rows(const at::Tensor& t, const char* op, const char* name) {
  FI_CHECK(t.dim() == 3, op, name, " must be [tokens, heads, head_dim], got ", t.sizes());
  FI_CHECK(t.size(2) <= 1 || t.stride(2) == 1, op, name, " must have a unit stride over head_dim, got strides ",
           t.strides());
  FI_CHECK(t.size(1) <= 1 || t.stride(1) == t.size(2), op, name, " must have contiguous heads (stride ", t.size(2),
           "), got strides ", t.strides());
  FI_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1) * t.size(2), op, name, " rows overlap (token stride ",
           t.stride(0), " < ", t.size(1) * t.size(2), ")");
}

void check_int_vector(const at::Tensor& t, const char* op, const char* name, at::ScalarType st, int64_t dims) {
  FI_CHECK(t.scalar_type() == st, op, name, " must be ", st, ", got ", t.scalar_type());
  FI_CHECK(t.dim() == dims, op, name, " must have ", dims, " dims, got ", t.sizes());
  FI_CHECK(t.is_contiguous(), op, name, " must be contiguous");
}

void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  FI_CHECK(k_cache.scalar_type() != at::kChar && k_cache.scalar_type() != at::kByte, op,
           "quantized KV caches (int8 / fp8 rows) are not supported by the CUDA kernels; the Triton backend runs them");
  FI_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
           "k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], got ", k_cache.sizes(),
           " and ", v_cache.sizes());
  FI_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), op, "k_cache is ", k_cache.scalar_type(), " but v_cache is ",
           v_cache.scalar_type());
  FI_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, "k_cache and v_cache must be contiguous");
}

// [rows, H] with a unit inner stride (the row stride may differ).
void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  FI_CHECK(t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1), op, name,
           " must be 2-D with contiguous rows, got ", t.sizes(), " strides ", t.strides());
}

}  // namespace

fc::PagedAttentionParams paged_attention_params(const at::Tensor& q, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, const at::Tensor& block_table,
                                                const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                                double scale, int64_t window, const at::Tensor& out, double softcap) {
  const char* op = "paged_attention";
  same_device(op, q, "q", {{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&block_table, "block_table"},
                           {&seq_lens, "seq_lens"}, {&query_start_loc, "query_start_loc"}, {&out, "out"}});
  check_cache(k_cache, v_cache, op);
  fc::PagedAttentionParams p;
  p.dtype = kernel_dtype(q, op, "q", false);
  FI_CHECK(k_cache.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
           "q, k_cache, v_cache and out must share a dtype, got q ", q.scalar_type(), ", caches ",
           k_cache.scalar_type(), ", out ", out.scalar_type());
  check_rows(q, op, "q");
  check_rows(out, op, "out");
  FI_CHECK(out.sizes() == q.sizes(), op, "out ", out.sizes(), " must have q's shape ", q.sizes());
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2), head_dim = q.size(2);
  FI_CHECK(k_cache.size(3) == head_dim, op, "cache head_dim ", k_cache.size(3), " != q head_dim ", head_dim);
  FI_CHECK(head_dim == 64 || head_dim == 128, op, "head_dim must be 64 or 128, got ", head_dim);
  FI_CHECK(kv_heads > 0 && heads % kv_heads == 0, op, "num_heads ", heads, " is not a multiple of num_kv_heads ",
           kv_heads);
  FI_CHECK(kv_heads <= kMaxGrid, op, "at most ", kMaxGrid, " KV heads, got ", kv_heads);
  FI_CHECK(aligned16(k_cache) && aligned16(v_cache), op, "k_cache and v_cache must start on a 16-byte boundary");
  check_int_vector(block_table, op, "block_table", at::kInt, 2);
  check_int_vector(seq_lens, op, "seq_lens", at::kInt, 1);
  check_int_vector(query_start_loc, op, "query_start_loc", at::kInt, 1);
  const int64_t num_seqs = seq_lens.size(0);
  FI_CHECK(num_seqs > 0 || q.size(0) == 0, op, "no sequences for ", q.size(0), " tokens");
  FI_CHECK(query_start_loc.size(0) == num_seqs + 1, op, "query_start_loc must have num_seqs + 1 = ", num_seqs + 1,
           " entries, got ", query_start_loc.size(0));
  FI_CHECK(block_table.size(0) >= num_seqs, op, "block_table has ", block_table.size(0), " rows for ", num_seqs,
           " sequences");
  FI_CHECK(window >= 0, op, "window must be >= 0 (0: none), got ", window);
  FI_CHECK(softcap >= 0 && std::isfinite(softcap), op, "softcap must be >= 0 (0: none), got ", softcap);
  FI_CHECK(std::isfinite(scale), op, "scale must be finite, got ", scale);
  FI_CHECK(q.size(0) <= INT32_MAX, op, "at most 2^31 - 1 tokens, got ", q.size(0));

  p.q = q.data_ptr(), p.out = out.data_ptr(), p.k_cache = k_cache.data_ptr(), p.v_cache = v_cache.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>(), p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.num_tokens = q.size(0), p.num_seqs = num_seqs, p.num_heads = heads, p.num_kv_heads = kv_heads;
  p.head_dim = head_dim, p.num_blocks = k_cache.size(0), p.block_size = k_cache.size(1);
  p.block_table_stride = block_table.size(1);
  p.q_stride = row_stride(q), p.out_stride = row_stride(out);
  p.scale = static_cast<float>(scale), p.softcap = static_cast<float>(softcap), p.window = window;
  FI_CHECK(fc::plan_paged_attention(p), op, heads / kv_heads, " query heads per KV head do not fit the kernel's ",
           fc::kAttnMaxSmemBytes / 1024, " KiB of shared memory at head_dim ", head_dim);
  FI_CHECK(p.num_splits <= kMaxGrid, op, "a context of ", p.block_table_stride * p.block_size, " keys needs ",
           p.num_splits, " splits (at most ", kMaxGrid, ")");
  return p;
}

fc::StoreKVParams store_kv_params(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  const char* op = "store_kv";
  same_device(op, k_cache, "k_cache", {{&key, "key"}, {&value, "value"}, {&v_cache, "v_cache"},
                                       {&slot_mapping, "slot_mapping"}});
  check_cache(k_cache, v_cache, op);
  fc::StoreKVParams p;
  p.dtype = kernel_dtype(k_cache, op, "k_cache", true);
  FI_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type(), op,
           "key and value must have the caches' dtype ", k_cache.scalar_type(), ", got ", key.scalar_type(), " and ",
           value.scalar_type());
  check_rows(key, op, "key");
  check_rows(value, op, "value");
  FI_CHECK(key.sizes() == value.sizes() && key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), op,
           "key and value must be [T, ", k_cache.size(2), ", ", k_cache.size(3), "] (the cache's heads and head_dim), got ",
           key.sizes(), " and ", value.sizes());
  check_int_vector(slot_mapping, op, "slot_mapping", at::kLong, 1);
  FI_CHECK(slot_mapping.size(0) == key.size(0), op, "slot_mapping has ", slot_mapping.size(0), " slots for ",
           key.size(0), " tokens");
  FI_CHECK(key.size(0) <= INT32_MAX, op, "at most 2^31 - 1 tokens, got ", key.size(0));
  p.key = key.data_ptr(), p.value = value.data_ptr(), p.k_cache = k_cache.data_ptr(), p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = key.size(0), p.row_elems = key.size(1) * key.size(2);
  p.key_stride = row_stride(key), p.value_stride = row_stride(value);
  p.num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t es = int64_t(k_cache.element_size());
  p.vec16 = (p.row_elems * es) % 16 == 0 && (p.key_stride * es) % 16 == 0 && (p.value_stride * es) % 16 == 0 &&
            aligned16(key) && aligned16(value) && aligned16(k_cache) && aligned16(v_cache);
  return p;
}

fc::RmsNormParams rms_norm_params(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                  const at::Tensor& weight, double eps) {
  const char* op = residual.has_value() ? "fused_add_rms_norm" : "rms_norm";
  same_device(op, x, "x", {{&weight, "weight"}});
  check_matrix(x, op, "x");
  fc::RmsNormParams p;
  p.dtype = kernel_dtype(x, op, "x", true);
  FI_CHECK(x.size(1) > 0, op, "x must have a non-empty last dim, got ", x.sizes());
  FI_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
               weight.is_contiguous(),
           op, "weight must be a contiguous [", x.size(1), "] tensor of x's dtype ", x.scalar_type(), ", got ",
           weight.scalar_type(), " ", weight.sizes());
  FI_CHECK(eps >= 0 && std::isfinite(eps), op, "eps must be finite and >= 0, got ", eps);
  FI_CHECK(x.size(0) <= INT32_MAX, op, "at most 2^31 - 1 rows, got ", x.size(0));
  p.x = x.data_ptr(), p.weight = weight.data_ptr();
  p.T = x.size(0), p.H = x.size(1), p.x_stride = row_stride(x), p.eps = static_cast<float>(eps);
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    same_device(op, x, "x", {{&r, "residual"}});
    check_matrix(r, op, "residual");
    FI_CHECK(r.sizes() == x.sizes() && r.scalar_type() == x.scalar_type(), op, "residual ", r.scalar_type(), " ",
             r.sizes(), " must match x ", x.scalar_type(), " ", x.sizes());
    p.residual = r.data_ptr(), p.r_stride = row_stride(r);
  }
  return p;
}

fc::RotaryParams rotary_params(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& cos_sin_cache) {
  const char* op = "rotary_embedding";
  same_device(op, q, "q", {{&k, "k"}, {&positions, "positions"}, {&cos_sin_cache, "cos_sin_cache"}});
  check_rows(q, op, "q");
  check_rows(k, op, "k");
  fc::RotaryParams p;
  p.dtype = kernel_dtype(q, op, "q", true);
  FI_CHECK(k.scalar_type() == q.scalar_type(), op, "k is ", k.scalar_type(), " but q is ", q.scalar_type());
  FI_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), op, "q ", q.sizes(), " and k ", k.sizes(),
           " need the same tokens and head_dim");
  check_int_vector(positions, op, "positions", at::kLong, 1);
  FI_CHECK(positions.size(0) == q.size(0), op, positions.size(0), " positions for ", q.size(0), " tokens");
  FI_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous(), op,
           "cos_sin_cache must be a contiguous float32 [max_position, rot], got ", cos_sin_cache.scalar_type(), " ",
           cos_sin_cache.sizes());
  const int64_t rot = cos_sin_cache.size(1);
  FI_CHECK(rot > 0 && rot % 2 == 0 && rot <= q.size(2), op, "rot (cos_sin_cache.size(1)) must be even and in (0, ",
           q.size(2), "], got ", rot);
  FI_CHECK(q.size(0) <= INT32_MAX, op, "at most 2^31 - 1 tokens, got ", q.size(0));
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.cache = cos_sin_cache.data_ptr<float>();
  p.positions = positions.data_ptr<int64_t>();
  p.T = q.size(0), p.Hq = q.size(1), p.Hk = k.size(1), p.D = q.size(2), p.rot = rot;
  p.q_stride = row_stride(q), p.k_stride = row_stride(k), p.max_pos = cos_sin_cache.size(0);
  return p;
}

fc::QuantLinearParams quant_linear_params(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                          const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group_size,
                                          const c10::optional<at::Tensor>& bias) {
  const char* op = "quant_linear";
  same_device(op, x, "x", {{&qweight, "qweight"}, {&scales, "scales"}});
  if (mins.has_value()) same_device(op, x, "x", {{&*mins, "mins"}});
  if (bias.has_value()) same_device(op, x, "x", {{&*bias, "bias"}});
  fc::QuantLinearParams p;
  p.x_dtype = kernel_dtype(x, op, "x", false);
  check_matrix(x, op, "x");
  FI_CHECK(bits == 4 || bits == 8, op, "bits must be 4 or 8, got ", bits);
  FI_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
           op, "qweight must be contiguous ", bits == 8 ? "int8 [N, K]" : "uint8 [N, K / 2]", ", got ",
           qweight.scalar_type(), " ", qweight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  FI_CHECK(qweight.size(1) * (bits == 4 ? 2 : 1) == K, op, "qweight ", qweight.sizes(), " does not match K = ", K);
  const int64_t chunk = fc::quant_chunk_codes(int(bits));
  FI_CHECK(K % chunk == 0, op, "K = ", K, " must be a multiple of ", chunk, " for ", bits, "-bit weights");
  FI_CHECK(group_size > 0 && K % group_size == 0 && group_size % chunk == 0, op, "group_size ", group_size,
           " must divide K = ", K, " and be a multiple of ", chunk, " for ", bits, "-bit weights");
  FI_CHECK((scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf) && scales.is_contiguous() &&
               scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group_size,
           op, "scales must be contiguous float32 or float16 [", N, ", ", K / group_size, "], got ",
           scales.scalar_type(), " ", scales.sizes());
  if (mins.has_value())
    FI_CHECK(mins->scalar_type() == scales.scalar_type() && mins->is_contiguous() && mins->sizes() == scales.sizes(), op,
             "mins must be contiguous with the dtype and shape of scales, got ", mins->scalar_type(), " ",
             mins->sizes());
  FI_CHECK(bits == 8 || mins.has_value(), op, "4-bit weights need mins");
  if (bias.has_value())
    FI_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_floating_point(), op, "bias must be a float [", N,
             "] tensor, got ", bias->scalar_type(), " ", bias->sizes());
  const int64_t x_stride = row_stride(x);
  FI_CHECK(aligned16(x) && x_stride % 8 == 0, op, "x must start on a 16-byte boundary with a row stride that is a "
           "multiple of 8 elements (got stride ", x_stride, ")");
  FI_CHECK(aligned16(qweight), op, "qweight must start on a 16-byte boundary");
  p.x = x.data_ptr(), p.qweight = qweight.data_ptr(), p.scales = scales.data_ptr();
  p.mins = mins.has_value() ? mins->data_ptr() : nullptr, p.scales_f16 = scales.scalar_type() == at::kHalf;
  p.M = M, p.N = N, p.K = K, p.x_stride = x_stride, p.bits = int(bits), p.group_size = group_size;
  return p;
}

}  // namespace cuda_checks
}  // namespace fastinfer
