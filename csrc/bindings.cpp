// Registers the raw kernels of csrc/ as torch ops (torch.ops.fastinfer.*). Thin on purpose: check dtypes,
// shapes, devices and layouts, then call the kernel. Importing fastinfer._C runs the registration.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>

#include "fastinfer/cpu_attention.h"

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
                         const at::Tensor& query_start_loc, double scale, int64_t window, at::Tensor& out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k_cache, &v_cache, &out})
    TORCH_CHECK(t->device().is_cpu(), "fastinfer::paged_attention: all tensors must be on the CPU");
  const fc::DType dt = cpu_dtype(q, "q");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "fastinfer::paged_attention: q, k_cache, v_cache and out must share a dtype");
  check_rows(q, "q");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == q.sizes(), "fastinfer::paged_attention: out must have q's shape");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "fastinfer::paged_attention: caches must both be [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "fastinfer::paged_attention: caches must be contiguous");
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2), head_dim = q.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "fastinfer::paged_attention: cache head_dim ", k_cache.size(3),
              " != q head_dim ", head_dim);
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
  p.num_threads = at::get_num_threads();  // follow torch.set_num_threads
  const int rc = fc::paged_attention(p);
  TORCH_CHECK(rc == 0, "fastinfer::paged_attention: ", fc::error_string(rc));
}

void store_kv_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&key, &value, &k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu(), "fastinfer::store_kv: all tensors must be on the CPU");
  const fc::DType dt = cpu_dtype(k_cache, "k_cache");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "fastinfer::store_kv: key, value and the caches must share a dtype");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "fastinfer::store_kv: caches must be contiguous [num_blocks, block_size, kv_heads, head_dim]");
  check_rows(key, "key");
  check_rows(value, "value");
  TORCH_CHECK(key.sizes() == value.sizes() && key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3),
              "fastinfer::store_kv: key/value must be [T, kv_heads, head_dim] matching the cache");
  check_int_vector(slot_mapping, "slot_mapping", at::kLong, 1);
  TORCH_CHECK(slot_mapping.size(0) == key.size(0), "fastinfer::store_kv: slot_mapping must have one slot per token");

  fc::StoreKVParams p;
  p.dtype = dt;
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
        "Tensor query_start_loc, float scale, int window, Tensor(a!) out) -> ()");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("cpu_isa(str force='') -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(fastinfer, CPU, m) {
  m.impl("paged_attention", &paged_attention_cpu);
  m.impl("store_kv", &store_kv_cpu);
}

// A plain Python module: importing it loads this library, whose static initialisers register the ops.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                            "fastinfer compiled ops, registered as torch.ops.fastinfer.*", -1, nullptr};
  return PyModule_Create(&def);
}
