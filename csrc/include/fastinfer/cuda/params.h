// Host-side interface of the CUDA kernels of fastinfer: parameter structs, launch planning and the launchers'
// declarations. Neither torch nor CUDA headers: the CPU build compiles the argument checks (csrc/cuda/checks.cpp)
// against this file too, so a CPU test exercises the very checks and plans the CUDA binding uses. The kernels are
// in the .cuh files next to this one, the launchers in csrc/cuda/*.cu. Every launcher returns 0 or a cudaError_t
// value (cuda_error_string names it) and takes the stream as a cudaStream_t passed as void*.
#pragma once

#include <cstdint>

namespace fastinfer {
namespace cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

inline int64_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

const char* cuda_error_string(int rc);  // csrc/cuda/layer_ops.cu

// ------------------------------------------------------------------------------------------ paged attention

// Causal attention of packed queries over the paged cache [num_blocks, block_size, num_kv_heads, head_dim], the
// contract of fastinfer.ops.reference.paged_attention (and of the CPU kernel, cpu_attention.h): sequence i owns
// the tokens query_start_loc[i] .. query_start_loc[i + 1]; its token r sits at p = seq_lens[i] - query_len + r and
// reads keys max(0, p - window + 1) .. p. One CTA per (token, KV head, split) loads each K / V row once for the
// group of num_heads / num_kv_heads query heads that share it. A split covers split_len keys, walked in chunks of
// `partition` (scores in shared memory, online max / sum rescaling between chunks); with num_splits > 1 a second
// kernel combines the splits' partial outputs (flash-decoding).
constexpr int kAttnThreads = 128;
constexpr int kAttnMaxSmemBytes = 48 * 1024;  // no opt-in needed on any sm_80+ part
constexpr int kAttnMinPartition = 32;
constexpr int kAttnMaxPartition = 512;
constexpr int64_t kAttnTargetCtas = 1024;  // split long contexts until about this many CTAs are in flight

struct PagedAttentionParams {
  DType dtype = DType::kFloat16;  // of q, out and the caches (fp16 / bf16)
  const void* q = nullptr;        // [num_tokens, num_heads, head_dim], token stride q_stride (elements)
  const void* k_cache = nullptr;  // [num_blocks, block_size, num_kv_heads, head_dim], contiguous
  const void* v_cache = nullptr;
  void* out = nullptr;  // [num_tokens, num_heads, head_dim], token stride out_stride
  const int32_t* block_table = nullptr;      // [>= num_seqs, block_table_stride]
  const int32_t* seq_lens = nullptr;         // [num_seqs]
  const int32_t* query_start_loc = nullptr;  // [num_seqs + 1]
  int64_t num_tokens = 0, num_seqs = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t num_blocks = 0, block_size = 0, block_table_stride = 0;
  int64_t q_stride = 0, out_stride = 0;
  float scale = 1.0f;
  float softcap = 0.0f;  // <= 0: none
  int64_t window = 0;    // <= 0: none
  // From plan_paged_attention. The grid is sized by max_context = block_table_stride * block_size, a bound from
  // the shapes (no device read, so a captured CUDA graph keeps its grid); splits past a row's keys only mark
  // themselves empty.
  int partition = 0;      // keys per chunk
  int64_t split_len = 0;  // keys per split, a multiple of partition
  int num_splits = 0;
  float* workspace = nullptr;  // num_splits > 1: paged_attention_workspace_floats(p) floats on the device
};

inline int64_t paged_attention_group(const PagedAttentionParams& p) { return p.num_heads / p.num_kv_heads; }

// Dynamic shared memory of one CTA: the group's queries and output accumulators, its scores over a chunk, and the
// running max, sum and rescale factor of each head.
inline int64_t paged_attention_smem_bytes(const PagedAttentionParams& p, int64_t partition) {
  const int64_t group = paged_attention_group(p);
  return group * (2 * p.head_dim + partition + 3) * int64_t(sizeof(float));
}

// Fills partition, split_len and num_splits; false when even the smallest chunk does not fit in shared memory
// (a query-head group too large).
inline bool plan_paged_attention(PagedAttentionParams& p) {
  int64_t part = kAttnMaxPartition;
  while (part > kAttnMinPartition && paged_attention_smem_bytes(p, part) > kAttnMaxSmemBytes) part /= 2;
  if (paged_attention_smem_bytes(p, part) > kAttnMaxSmemBytes) return false;
  const int64_t max_context = p.block_table_stride * p.block_size;
  const int64_t chunks = max_context <= 0 ? 1 : (max_context + part - 1) / part;
  const int64_t ctas = p.num_tokens * p.num_kv_heads;
  int64_t splits = ctas <= 0 ? 1 : (kAttnTargetCtas + ctas - 1) / ctas;
  splits = splits < 1 ? 1 : (splits > chunks ? chunks : splits);
  const int64_t per_split = (chunks + splits - 1) / splits;  // chunks
  p.partition = int(part);
  p.split_len = per_split * part;
  p.num_splits = int((chunks + per_split - 1) / per_split);
  return true;
}

// [num_tokens, num_heads, num_splits] (max, sum) pairs, then [num_tokens, num_heads, num_splits, head_dim] outputs.
inline int64_t paged_attention_workspace_floats(const PagedAttentionParams& p) {
  return p.num_splits > 1 ? p.num_tokens * p.num_heads * p.num_splits * (2 + p.head_dim) : 0;
}

int launch_paged_attention(const PagedAttentionParams& p, void* stream);

// ------------------------------------------------------------------------------------------ quantized linear

// y [M, N] = x [M, K] @ W.T + bias, W in the weight-only format of fastinfer.quantization.format (int8 [N, K] or
// int4 packed uint8 [N, K / 2], even k in the low nibble; w = q * scale + min per group, fp32). One warp per
// kQuantRowsPerWarp output rows reads each 16-byte chunk of codes once and dequantizes it in registers for up to
// kQuantMaxRows rows of x (fp32 sums); more rows go through quant_dequantize + a GEMM (the binding).
constexpr int kQuantThreads = 128;
constexpr int kQuantRowsPerWarp = 4;
constexpr int64_t kQuantMaxRows = 8;

struct QuantLinearParams {
  DType x_dtype = DType::kFloat16;  // of x and out (fp16 / bf16)
  const void* x = nullptr;          // [M, K], row stride x_stride, unit column stride
  void* out = nullptr;              // [M, N] contiguous
  const void* qweight = nullptr;    // int8 [N, K] or uint8 [N, K / 2], contiguous
  const void* scales = nullptr;     // [N, K / group_size] fp32 or fp16, contiguous
  const void* mins = nullptr;       // like scales, or null (8-bit only)
  bool scales_f16 = false;
  const float* bias = nullptr;      // fp32 [N] or null
  int64_t M = 0, N = 0, K = 0, x_stride = 0;
  int bits = 8;
  int64_t group_size = 0;  // a multiple of 32 (int4) / 16 (int8) dividing K
};

// Codes per 16-byte chunk: the unit a lane reads; a chunk never crosses a group.
inline int64_t quant_chunk_codes(int bits) { return bits == 4 ? 32 : 16; }

int launch_quant_gemv(const QuantLinearParams& p, void* stream);

// Rows [n0, n1) of W dequantized into dst [n1 - n0, K] of dtype dst_dtype (w = q * scale + min in fp32, rounded).
int launch_quant_dequantize(const QuantLinearParams& p, void* dst, DType dst_dtype, int64_t n0, int64_t n1,
                            void* stream);

// ------------------------------------------------------------------------------------------ per-layer ops

// key / value [num_tokens, Hkv, D] (rows of row_elems contiguous elements, token strides given) into the caches at
// flat slots slot_mapping[t]; slots < 0 (padding) and >= num_slots are skipped.
struct StoreKVParams {
  DType dtype = DType::kFloat16;  // of key, value and the caches
  const void* key = nullptr;
  const void* value = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* slot_mapping = nullptr;
  int64_t num_tokens = 0, key_stride = 0, value_stride = 0, row_elems = 0, num_slots = 0;
  bool vec16 = false;  // every row start 16-byte aligned and row bytes a multiple of 16: uint4 copies
};

int launch_store_kv(const StoreKVParams& p, void* stream);

// out = weight * round(s * rsqrt(mean(s^2) + eps)), s = x or (fused) round(x + residual), also stored to
// residual_out: the rounding of fastinfer.ops.reference.rms_norm / fused_add_rms_norm and the CPU kernel.
struct RmsNormParams {
  DType dtype = DType::kFloat16;  // of x, residual, weight and the outputs
  const void* x = nullptr;         // [T, H], row stride x_stride
  const void* residual = nullptr;  // [T, H], row stride r_stride, or null
  const void* weight = nullptr;    // [H]
  void* out = nullptr;             // [T, H] contiguous
  void* residual_out = nullptr;    // [T, H] contiguous (fused only)
  int64_t T = 0, H = 0, x_stride = 0, r_stride = 0;
  float eps = 1e-6f;
};

int launch_rms_norm(const RmsNormParams& p, void* stream);

// NeoX rotary embedding in place on q [T, Hq, D] and k [T, Hk, D] (views of the fused qkv projection: token
// strides given, heads contiguous) with cache fp32 [max_pos, rot] (cos half, then sin half); features past rot are
// left alone. Each product and sum is rounded to the dtype as the torch ops round them. Positions outside
// [0, max_pos) leave their token unchanged (the CPU kernel reports them as an error).
struct RotaryParams {
  DType dtype = DType::kFloat16;
  void* q = nullptr;
  void* k = nullptr;
  const float* cache = nullptr;
  const int64_t* positions = nullptr;
  int64_t T = 0, Hq = 0, Hk = 0, D = 0, rot = 0, q_stride = 0, k_stride = 0, max_pos = 0;
};

int launch_rotary_embedding(const RotaryParams& p, void* stream);

}  // namespace cuda
}  // namespace fastinfer
