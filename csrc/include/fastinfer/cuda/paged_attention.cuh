// Paged decode attention (GQA-aware, split-KV) for fp16 / bf16, head sizes 64 and 128. See PagedAttentionParams
// (params.h) for the contract and the work split. No torch headers.
//
// One CTA of kAttnThreads threads per (token, KV head, split). A K or V row of D elements is read by D / 8 lanes,
// 16 bytes each, so a CTA reads kAttnThreads * 8 / D rows per load (four loads in flight per thread), each row
// once for all `group` query heads:
//   1. scores: each lane's partial dot products with every head's query (fp32, queries in shared memory), summed
//      over the row's lanes with xor shuffles, scaled (and soft-capped) into shared memory;
//   2. per head (one warp each): the chunk's max, the running max / sum rescaled (flash-attention's online
//      softmax), scores replaced by their exponentials;
//   3. the accumulators rescaled, then each thread sums p * V over its rows for GP heads at a time in registers
//      and adds them into the shared accumulators (GP heads per pass: the V rows of a chunk are re-read from L1 /
//      L2 for groups larger than GP).
// A split's result is acc / l; with several splits, (max, sum, acc / l) go to the workspace and
// paged_attention_reduce_kernel combines them: M = max m_s, out = sum_s l_s e^(m_s - M) o_s / sum_s l_s e^(m_s - M)
// over the splits that saw keys (l_s > 0).
#pragma once

#include <cmath>

#include "fastinfer/cuda/common.cuh"

namespace fastinfer {
namespace cuda {

// The sequence of packed token t: the largest i with query_start_loc[i] <= t (empty sequences share their start
// with the next one, which wins).
__device__ __forceinline__ int sequence_of(const int32_t* qsl, int64_t num_seqs, int64_t t) {
  int lo = 0, hi = int(num_seqs) - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (qsl[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <class T, int D, int GP>
__global__ void __launch_bounds__(kAttnThreads) paged_attention_split_kernel(const PagedAttentionParams p) {
  constexpr int kVec = 8, kLanesPerRow = D / kVec, kRows = kAttnThreads / kLanesPerRow, kUnroll = 4;
  static_assert(D % (kVec * 8) == 0 && kLanesPerRow <= 32, "head_dim must be 64 or 128");
  extern __shared__ float smem[];
  const int group = int(p.num_heads / p.num_kv_heads), P = p.partition;
  float* q_s = smem;                  // [group, D]
  float* acc_s = q_s + group * D;     // [group, D]
  float* logits = acc_s + group * D;  // [group, P]
  float* m_run = logits + group * P;  // [group]
  float* l_run = m_run + group;       // [group]
  float* alpha = l_run + group;       // [group]

  const int64_t t = blockIdx.x;
  const int kvh = blockIdx.y, split = blockIdx.z, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int32_t* qsl = p.query_start_loc;
  if (t >= qsl[p.num_seqs]) return;  // past the packed batch (uniform over the CTA)
  const int seq = sequence_of(qsl, p.num_seqs, t);
  const int64_t qlen = qsl[seq + 1] - qsl[seq];
  const int64_t pos = int64_t(p.seq_lens[seq]) - qlen + (t - qsl[seq]);
  const int64_t key_lo = p.window > 0 ? max(int64_t(0), pos - p.window + 1) : int64_t(0);
  const int64_t start = max(key_lo, int64_t(split) * p.split_len);
  const int64_t end = min(pos + 1, int64_t(split + 1) * p.split_len);
  const int64_t head0 = int64_t(kvh) * group;
  const int64_t H = p.num_heads, S = p.num_splits;

  if (end <= start) {  // no key of this token in this split
    if (S > 1) {
      float* ml = p.workspace + ((t * H + head0) * S + split) * 2;
      for (int g = tid; g < group; g += kAttnThreads) {
        ml[g * S * 2] = -INFINITY;
        ml[g * S * 2 + 1] = 0.f;
      }
    } else {
      T* orow = static_cast<T*>(p.out) + t * p.out_stride + head0 * D;
      for (int i = tid; i < group * D; i += kAttnThreads) orow[i] = from_f<T>(0.f);
    }
    return;
  }

  const T* qrow = static_cast<const T*>(p.q) + t * p.q_stride + head0 * D;  // the group's heads are contiguous
  for (int i = tid; i < group * D; i += kAttnThreads) {
    q_s[i] = to_f<T>(qrow[i]);
    acc_s[i] = 0.f;
  }
  for (int g = tid; g < group; g += kAttnThreads) {
    m_run[g] = -INFINITY;
    l_run[g] = 0.f;
  }
  __syncthreads();

  const int c = tid % kLanesPerRow;    // this lane's 8 features of a row
  const int slot = tid / kLanesPerRow; // this thread's row within a step
  const int64_t row_stride = p.num_kv_heads * D;
  const T* kbase = static_cast<const T*>(p.k_cache) + int64_t(kvh) * D + c * kVec;
  const T* vbase = static_cast<const T*>(p.v_cache) + int64_t(kvh) * D + c * kVec;
  const int32_t* btab = p.block_table + int64_t(seq) * p.block_table_stride;
  const int64_t bs = p.block_size;
  auto slot_of = [&](int64_t key) -> int64_t { return int64_t(btab[key / bs]) * bs + key % bs; };

  for (int64_t c0 = start; c0 < end; c0 += P) {
    const int n = int(min(int64_t(P), end - c0));
    // 1. scores of the chunk's keys, kUnroll rows per thread per step (all loads issued before the shuffles)
    for (int j0 = 0; j0 < n; j0 += kUnroll * kRows) {
      float kr[kUnroll][kVec] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kRows + slot;
        if (j < n) load8(kbase + slot_of(c0 + j) * row_stride, kr[u]);
      }
      for (int g = 0; g < group; ++g) {
        const float* qg = q_s + g * D + c * kVec;
        float sc[kUnroll] = {};
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float qe = qg[e];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) sc[u] = fmaf(qe, kr[u][e], sc[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          float v = group_sum<kLanesPerRow>(sc[u]) * p.scale;  // every lane takes part
          if (p.softcap > 0.f) v = p.softcap * tanhf(v / p.softcap);
          const int j = j0 + u * kRows + slot;
          if (c == 0 && j < n) logits[g * P + j] = v;
        }
      }
    }
    __syncthreads();
    // 2. online softmax per head
    for (int g = warp; g < group; g += kAttnThreads / 32) {
      float* lg = logits + g * P;
      float m = -INFINITY;
      for (int j = lane; j < n; j += 32) m = fmaxf(m, lg[j]);
      m = fmaxf(warp_max(m), m_run[g]);
      float l = 0.f;
      for (int j = lane; j < n; j += 32) {
        const float e = expf(lg[j] - m);
        lg[j] = e;
        l += e;
      }
      l = warp_sum(l);
      if (lane == 0) {
        const float a = expf(m_run[g] - m);  // 0 on the first chunk (m_run = -inf, m finite)
        alpha[g] = a;
        l_run[g] = l_run[g] * a + l;
        m_run[g] = m;
      }
    }
    __syncthreads();
    for (int i = tid; i < group * D; i += kAttnThreads) acc_s[i] *= alpha[i / D];
    __syncthreads();
    // 3. p * V, GP heads per pass
    for (int g0 = 0; g0 < group; g0 += GP) {
      float acc[GP][kVec] = {};
#pragma unroll 4
      for (int j = slot; j < n; j += kRows) {
        float v[kVec];
        load8(vbase + slot_of(c0 + j) * row_stride, v);
#pragma unroll
        for (int g = 0; g < GP; ++g) {
          const float w = g0 + g < group ? logits[(g0 + g) * P + j] : 0.f;
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(w, v[e], acc[g][e]);
        }
      }
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        if (g0 + g >= group) break;
#pragma unroll
        for (int e = 0; e < kVec; ++e) atomicAdd(&acc_s[(g0 + g) * D + c * kVec + e], acc[g][e]);
      }
    }
    __syncthreads();  // logits and acc_s complete before the next chunk overwrites the scores
  }

  if (S == 1) {
    T* orow = static_cast<T*>(p.out) + t * p.out_stride + head0 * D;
    for (int i = tid; i < group * D; i += kAttnThreads) orow[i] = from_f<T>(acc_s[i] / l_run[i / D]);
    return;
  }
  float* ml = p.workspace;  // [T, H, S, 2]
  float* o = p.workspace + p.num_tokens * H * S * 2;  // [T, H, S, D]
  for (int i = tid; i < group * D; i += kAttnThreads) {
    const int g = i / D, d = i % D;
    o[((t * H + head0 + g) * S + split) * D + d] = acc_s[i] / l_run[g];
  }
  for (int g = tid; g < group; g += kAttnThreads) {
    ml[((t * H + head0 + g) * S + split) * 2] = m_run[g];
    ml[((t * H + head0 + g) * S + split) * 2 + 1] = l_run[g];
  }
}

// One CTA of D threads per (token, head): the splits' partial outputs combined with their max / sum weights.
template <class T, int D>
__global__ void __launch_bounds__(D) paged_attention_reduce_kernel(const PagedAttentionParams p) {
  const int64_t t = blockIdx.x, h = blockIdx.y, H = p.num_heads, S = p.num_splits;
  if (t >= p.query_start_loc[p.num_seqs]) return;
  const int d = threadIdx.x;
  const float* ml = p.workspace + (t * H + h) * S * 2;
  const float* o = p.workspace + p.num_tokens * H * S * 2 + (t * H + h) * S * D + d;
  float m = -INFINITY;
  for (int64_t s = 0; s < S; ++s)
    if (ml[2 * s + 1] > 0.f) m = fmaxf(m, ml[2 * s]);
  float num = 0.f, den = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const float l = ml[2 * s + 1];
    if (l > 0.f) {
      const float w = l * expf(ml[2 * s] - m);
      num = fmaf(w, o[s * D], num);
      den += w;
    }
  }
  static_cast<T*>(p.out)[t * p.out_stride + h * D + d] = from_f<T>(den > 0.f ? num / den : 0.f);
}

}  // namespace cuda
}  // namespace fastinfer
