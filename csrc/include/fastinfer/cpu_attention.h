// Raw-pointer CPU attention kernels of fastinfer. No torch headers: csrc/bindings.cpp wraps these as
// torch ops. All functions return 0 on success or a negative error code (see cpu_error_string).
#pragma once

#include <cstdint>

namespace fastinfer {
namespace cpu {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Instruction-set variant the kernels run with. kAuto picks the best the CPU supports at run time.
// kAvx512Bf16 is kAvx512 plus VDPBF16PS for bf16 scores.
enum class Isa : int { kAuto = -1, kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// Paged attention over a cache laid out [num_blocks, block_size, num_kv_heads, head_dim] (contiguous).
//
// Sequence i owns queries q[query_start_loc[i] .. query_start_loc[i+1]) (query_len of them); query r sits
// at position p = seq_lens[i] - query_len + r and attends to keys max(0, p - window + 1) .. p (window <= 0:
// no window). Query head h reads KV head h / (num_heads / num_kv_heads). Position pos of sequence i lives
// in cache block block_table[i * block_table_stride + pos / block_size], slot pos % block_size. Slots at or
// beyond seq_lens[i] are never read. Softmax runs in fp32 (online); out = softmax(cap(scale * q k^T)) v, where
// cap(x) = softcap * tanh(x / softcap) when softcap > 0 (Gemma 2's attention logit soft-capping), else x.
//
// kv_int8: the caches are int8 KV rows [num_blocks, block_size, num_kv_heads, head_dim + 2]: per token and KV
// head, head_dim int8 codes then that row's scale as a little-endian IEEE fp16 (value = code * scale; the spec
// is fastinfer.ops.reference.quantize_kv_rows). The codes are widened to fp32 inside the dot products and the
// scale applied once per row (to the score for K, to the probability for V): no float copy of the cache.
struct PagedAttentionParams {
  DType dtype = DType::kFloat32;  // of q and out, and of the caches unless kv_int8
  bool kv_int8 = false;
  const void* q = nullptr;        // [num_tokens, num_heads, head_dim]; token stride q_stride (elements)
  const void* k_cache = nullptr;  // [num_blocks, block_size, num_kv_heads, head_dim]
  const void* v_cache = nullptr;
  void* out = nullptr;            // [num_tokens, num_heads, head_dim]; token stride out_stride
  const int32_t* block_table = nullptr;  // [num_seqs, block_table_stride]
  const int32_t* seq_lens = nullptr;     // [num_seqs]
  const int32_t* query_start_loc = nullptr;  // [num_seqs + 1]
  int64_t num_tokens = 0;
  int64_t num_seqs = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // a multiple of 16, at most kMaxHeadDim
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t block_table_stride = 0;  // == max blocks per sequence for a contiguous table
  int64_t q_stride = 0;    // elements between consecutive tokens of q (num_heads * head_dim if contiguous)
  int64_t out_stride = 0;  // same for out
  float scale = 1.0f;
  int64_t window = 0;      // sliding window; <= 0 means none
  float softcap = 0.0f;    // attention logit soft-cap; <= 0 means none
  int num_threads = 0;     // <= 0: the OpenMP default
};

constexpr int64_t kMaxHeadDim = 256;

int paged_attention(const PagedAttentionParams& p);

// Scatter key/value [num_tokens, num_kv_heads, head_dim] (heads and dims contiguous, token stride given)
// into the caches at flat slots slot_mapping[t] = block * block_size + offset; negative slots are skipped.
// kv_int8: the caches hold int8 KV rows (see PagedAttentionParams): each key / value row of head_dim values is
// quantized on the way in, exactly as fastinfer.ops.reference.quantize_kv_rows(x, "int8").
struct StoreKVParams {
  DType dtype = DType::kFloat32;  // of key and value, and of the caches unless kv_int8
  bool kv_int8 = false;
  int64_t head_dim = 0;  // needed when kv_int8
  const void* key = nullptr;
  const void* value = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* slot_mapping = nullptr;  // [num_tokens]
  int64_t num_tokens = 0;
  int64_t key_stride = 0;    // elements between tokens of key
  int64_t value_stride = 0;  // elements between tokens of value
  int64_t row_elems = 0;     // num_kv_heads * head_dim
  int64_t num_slots = 0;     // num_blocks * block_size
  int num_threads = 0;
};

int store_kv(const StoreKVParams& p);

// Error message for a code returned above.
const char* error_string(int code);

// Force an instruction-set variant (kAuto restores run-time detection); returns the one now in use.
// Asking for a variant the CPU lacks falls back to the best supported one.
Isa set_isa(Isa isa);
Isa active_isa();
const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace fastinfer
