// The paged-attention work item, written once against a small vector API `Ops` (16 fp32 lanes) and
// included by paged_attention.cpp into one namespace per instruction set (generic, AVX2, AVX-512), each of
// which defines `Ops` and compiles this file under its own target options. No include guard on purpose.
//
// One work item = one sequence, one or more KV heads, a tile of query rows, a range of key positions. The
// rows x G queries of a KV head (all its G query heads) share every key/value read. Keys are taken 16
// positions at a time ("chunk") and the scores of one query for a chunk form one 16-lane vector, computed
// either from a transposed fp32 copy of the chunk's keys, kt[D][16] (D FMAs per query, no horizontal sums:
// best for many queries), or straight from the cache rows as 16 dot products folded by a 16-way reduction
// (best for few queries, e.g. decode; bf16 uses VDPBF16PS). The online softmax runs on that vector and the
// probabilities are accumulated against the chunk's values.
//
// An int8 KV cache (C = int8_t: rows of head_dim codes + an fp16 scale) runs the same loops on the codes,
// widened to fp32 as they load; the 16 rows' key scales multiply the chunk's score vector once, and their value
// scales multiply the probabilities before the PV accumulation (p * scale, then fma with the codes). Where the
// vector API has 16-bit integer dot products (AVX512-VNNI, under a bf16 / fp16 model: Ops::i16_dots), decode
// instead takes q and each chunk's weights as 16-bit codes and sums exactly in int32 (VPDPWSSD): no fp32
// widening of the codes, about half the instructions per row.
//
// The online softmax rescales conditionally (as FlashAttention-4 does): the running max moves only when a score
// of the chunk beats it by more than kRescaleLog2 (log2 units), so most chunks skip the horizontal max and the
// rescale; the sums stay vectors until the end of the item.

using V = Ops::V;

template <int NQ>
FI_INLINE void qk_tile(const float* __restrict qf, int64_t D, const float* __restrict kt, V* __restrict s) {
  V a[NQ], b[NQ];
  for (int j = 0; j < NQ; ++j) {
    a[j] = Ops::zero();
    b[j] = Ops::zero();
  }
  for (int64_t d = 0; d < D; d += 2) {  // two accumulator sets hide the FMA latency for small NQ
    const V k0 = Ops::load(kt + d * kChunk);
    const V k1 = Ops::load(kt + (d + 1) * kChunk);
    for (int j = 0; j < NQ; ++j) {
      a[j] = Ops::fma(Ops::set1(qf[j * D + d]), k0, a[j]);
      b[j] = Ops::fma(Ops::set1(qf[j * D + d + 1]), k1, b[j]);
    }
  }
  for (int j = 0; j < NQ; ++j) s[j] = Ops::add(a[j], b[j]);
}

FI_INLINE void qk_any(int nq, const float* qf, int64_t D, const float* kt, V* s) {
  switch (nq) {
    case 1: qk_tile<1>(qf, D, kt, s); break;
    case 2: qk_tile<2>(qf, D, kt, s); break;
    case 3: qk_tile<3>(qf, D, kt, s); break;
    case 4: qk_tile<4>(qf, D, kt, s); break;
    case 5: qk_tile<5>(qf, D, kt, s); break;
    case 6: qk_tile<6>(qf, D, kt, s); break;
    case 7: qk_tile<7>(qf, D, kt, s); break;
    default: qk_tile<8>(qf, D, kt, s); break;
  }
}

// acc[j][d0 : d0 + 16 ND] = alpha[j] * acc[j][...] + sum_t pr[j][t] * v(t, d0 + ...) for NQ queries; v(t, d)
// gives 16 fp32 values of position t (from the fp32 scratch, or converted straight from the cache row).
template <int NQ, int ND, class LoadV>
FI_INLINE void pv_tile(float* __restrict acc, int64_t D, const float* __restrict pr, const float* __restrict alpha,
                       const LoadV& load_v, int n, int64_t d0) {
  V a[NQ][ND];
  for (int j = 0; j < NQ; ++j) {
    const V al = Ops::set1(alpha[j]);
    for (int v = 0; v < ND; ++v) a[j][v] = Ops::mul(Ops::load(acc + j * D + d0 + v * 16), al);
  }
  for (int t = 0; t < n; ++t) {
    V x[ND];
    for (int v = 0; v < ND; ++v) x[v] = load_v(t, d0 + v * 16);
    for (int j = 0; j < NQ; ++j) {
      const V pb = Ops::set1(pr[j * kChunk + t]);
      for (int v = 0; v < ND; ++v) a[j][v] = Ops::fma(pb, x[v], a[j][v]);
    }
  }
  for (int j = 0; j < NQ; ++j)
    for (int v = 0; v < ND; ++v) Ops::store(acc + j * D + d0 + v * 16, a[j][v]);
}

template <int NQ, class LoadV>
FI_INLINE void pv_nd(int nd, float* acc, int64_t D, const float* pr, const float* alpha, const LoadV& load_v, int n,
                     int64_t d0) {
  switch (nd) {
    case 1: pv_tile<NQ, 1>(acc, D, pr, alpha, load_v, n, d0); break;
    case 2: pv_tile<NQ, 2>(acc, D, pr, alpha, load_v, n, d0); break;
    case 3: pv_tile<NQ, 3>(acc, D, pr, alpha, load_v, n, d0); break;
    default: pv_tile<NQ, 4>(acc, D, pr, alpha, load_v, n, d0); break;
  }
}

template <class LoadV>
FI_INLINE void pv_any(int nq, int nd, float* acc, int64_t D, const float* pr, const float* alpha, const LoadV& load_v,
                      int n, int64_t d0) {
  switch (nq) {
    case 1: pv_nd<1>(nd, acc, D, pr, alpha, load_v, n, d0); break;
    case 2: pv_nd<2>(nd, acc, D, pr, alpha, load_v, n, d0); break;
    case 3: pv_nd<3>(nd, acc, D, pr, alpha, load_v, n, d0); break;
    default: pv_nd<4>(nd, acc, D, pr, alpha, load_v, n, d0); break;
  }
}

// Where PV reads V: the fp32 scratch copy, or the cache rows (converted on the fly).
struct ScratchRows {
  const float* vf;
  int64_t D;
  FI_INLINE V operator()(int t, int64_t d) const { return Ops::load(vf + t * D + d); }
};
template <class T>
struct CacheRows {
  const T* const* rows;
  int64_t hoff;
  FI_INLINE V operator()(int t, int64_t d) const { return Ops::load_cvt(rows[t] + hoff + d); }
};

// PV from the fp32 scratch is the same for every dtype: one out-of-line copy per instruction set keeps the
// compile time down (inlining it buys nothing measurable; inlining the cache-rows PV does, for decode).
__attribute__((noinline)) void pv_scratch(int nq, int nd, float* acc, int64_t D, const float* pr, const float* alpha,
                                          const float* vf, int n, int64_t d0) {
  pv_any(nq, nd, acc, D, pr, alpha, ScratchRows{vf, D}, n, d0);
}

// The fp16 scales of 16 int8 KV rows (rows[t] + off: 2 bytes, little endian) as one fp32 vector. A stored
// scale is a positive normal fp16 (2^-14 .. 65504: quantize_kv_rows), so fp32 = its bits << 13 with the exponent
// rebiased by 112: exact, branch-free, and vectorised on every ISA.
FI_INLINE V row_scales(const int8_t* const* rows, int64_t off) {
  alignas(64) uint32_t u[kChunk];
  for (int t = 0; t < kChunk; ++t) {
    uint16_t h;
    std::memcpy(&h, rows[t] + off, 2);
    u[t] = (uint32_t(h) << 13) + 0x38000000u;
  }
  alignas(64) float f[kChunk];
  std::memcpy(f, u, sizeof f);
  return Ops::load(f);
}

// Lanes t of the chunk [c0, c0 + n) with lo <= c0 + t < hi.
FI_INLINE uint32_t lane_mask(int64_t lo, int64_t hi, int64_t c0, int n) {
  const int64_t a = lo > c0 ? lo - c0 : 0;
  const int64_t b = hi - c0 < n ? hi - c0 : n;
  if (a >= b) return 0u;
  return ((1u << b) - 1u) & ~((1u << a) - 1u);
}

// T: q / out element type; C: cache element type (T, or int8_t for an int8 KV cache).
template <class T, class C>
void run_item(const PagedAttentionParams& p, const Item& it, const Scratch& sc, float* partials) {
  constexpr bool kQ = std::is_same<C, int8_t>::value;
  const int64_t D = p.head_dim, H = p.num_heads, Hkv = p.num_kv_heads, G = H / Hkv, bs = p.block_size;
  const int64_t RD = kQ ? D + 2 : D;  // cache elements per (slot, KV head) row: the codes and the fp16 scale
  const T* q = static_cast<const T*>(p.q);
  const C* kc = static_cast<const C*>(p.k_cache);
  const C* vc = static_cast<const C*>(p.v_cache);
  const int32_t* bt = p.block_table + int64_t(it.seq) * p.block_table_stride;
  const int64_t qs = p.query_start_loc[it.seq];
  const int64_t qlen = p.query_start_loc[it.seq + 1] - qs;
  const int64_t slen = p.seq_lens[it.seq];
  const int64_t Mh = int64_t(it.nrows) * G;  // queries per KV head
  const int64_t M = Mh * it.nkvh;            // query m: KV head kvh + m / Mh, row (m % Mh) / G, head g = m % G
  const int64_t kv_row = Hkv * RD;           // elements between consecutive slots of the cache
  const float qscale = p.scale * kLog2e;     // scores in the log2 domain: exp2 instead of exp
  const float cap = p.softcap > 0.f ? p.softcap * kLog2e : 0.f;  // the soft-cap in the log2 domain
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // Scores from the cache rows directly (dot products + a 16-way reduction) instead of a transposed fp32
  // copy of K, where the vector API says that is cheaper for this many queries per KV head.
  const bool rows_qk = Ops::rows_qk(static_cast<const C*>(nullptr), Mh, D);
  // With at most 4 queries per KV head every V element is used by one PV tile: convert it there, no copy.
  const bool direct_v = Mh <= 4;
  // int8 KV: 16-bit integer dot products where the vector API has them (see Ops::i16_dots).
  const bool i16 =
      rows_qk && direct_v && Ops::i16_dots(static_cast<const T*>(nullptr), static_cast<const C*>(nullptr), D);

  for (int64_t r = 0; r < it.nrows; ++r) {
    const int64_t pos = slen - qlen + it.row0 + r;
    int64_t lo = p.window > 0 ? pos - p.window + 1 : 0;
    lo = lo > it.lo ? lo : it.lo;
    const int64_t hi = pos + 1 < it.hi ? pos + 1 : it.hi;
    const T* qrow = q + (qs + it.row0 + r) * p.q_stride;
    for (int64_t hl = 0; hl < it.nkvh; ++hl) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t m = hl * Mh + r * G + g;
        const T* qh = qrow + ((it.kvh + hl) * G + g) * D;
        sc.lo[m] = lo;
        sc.hi[m] = hi;
        sc.mx[m] = neg_inf;
        Ops::store(sc.sumv + m * kChunk, Ops::zero());
        for (int64_t d = 0; d < D; d += 16) {
          Ops::store(sc.qf + m * D + d, Ops::mul(Ops::load_cvt(qh + d), Ops::set1(qscale)));
          Ops::store(sc.acc + m * D + d, Ops::zero());
        }
        if (i16) sc.qsc[m] = Ops::quantize_i16(sc.qf + m * D, D, sc.qi + m * D);  // q as 16-bit codes
      }
    }
  }

  // Pointers to each position's slot row (the item's KV heads are contiguous in it), straight into the
  // cache blocks: no gather copy.
  const C* kp[kChunk];
  const C* vp[kChunk];
  auto row_ptrs = [&](int64_t c0, int n) {
    int64_t bi = c0 / bs, off = c0 % bs;
    for (int t = 0; t < n; ++t) {
      const int64_t slot = int64_t(bt[bi]) * bs + off;
      kp[t] = kc + slot * kv_row + int64_t(it.kvh) * RD;
      vp[t] = vc + slot * kv_row + int64_t(it.kvh) * RD;
      if (++off == bs) {
        off = 0;
        ++bi;
      }
    }
    for (int t = n; t < kChunk; ++t) {  // lanes past n read a real row again (masked): no branches, no garbage
      kp[t] = kp[0];
      vp[t] = vp[0];
    }
  };
  // Blocks sit at random places in memory, too short for the hardware prefetcher to learn: prefetch the
  // chunk kPrefetchChunks ahead, one KV head at a time, so that the requests trickle out while this chunk
  // is computed (a burst of hundreds of prefetches stalls on the miss buffers).
  const C* pk[kChunk];
  const C* pv[kChunk];
  int pn = 0;  // rows of the chunk to prefetch, in pk[]
  auto prefetch_ptrs = [&](int64_t c0) {
    pn = c0 < it.hi ? int(it.hi - c0 < kChunk ? it.hi - c0 : kChunk) : 0;
    int64_t bi = c0 / bs, off = c0 % bs;
    for (int t = 0; t < pn; ++t) {
      const int64_t slot = int64_t(bt[bi]) * bs + off;
      pk[t] = kc + slot * kv_row + int64_t(it.kvh) * RD;
      pv[t] = vc + slot * kv_row + int64_t(it.kvh) * RD;
      if (++off == bs) {
        off = 0;
        ++bi;
      }
    }
  };
  const int64_t head_bytes = RD * int64_t(sizeof(C));
  auto prefetch_head = [&](int t, int64_t hoff) {  // row t of the prefetched chunk, one KV head
    const char* k = reinterpret_cast<const char*>(pk[t] + hoff);
    const char* v = reinterpret_cast<const char*>(pv[t] + hoff);
    for (int64_t b = 0; b < head_bytes; b += 64) {
      FI_PREFETCH(k + b);
      FI_PREFETCH(v + b);
    }
  };
  // An item with every KV head reads whole slot rows, and the slots of a block are contiguous: prefetch each
  // cache line of rows t once (not once per head row that touches it).
  const bool whole_rows = it.nkvh == Hkv;
  const int64_t slot_bytes = kv_row * int64_t(sizeof(C));
  uintptr_t k_done = 0, v_done = 0;  // the last line prefetched
  auto prefetch_lines = [](const C* row, int64_t bytes, uintptr_t& done) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(row), e = a + uintptr_t(bytes);
    for (uintptr_t l = a & ~uintptr_t(63); l < e; l += 64)
      if (l > done || done - l > uintptr_t(bytes)) {  // a new line (or a jump backwards to another block)
        FI_PREFETCH(reinterpret_cast<const char*>(l));
        done = l;
      }
  };
  auto prefetch_rows = [&](int t0, int t1) {
    for (int t = t0; t < t1; ++t) {
      prefetch_lines(pk[t], slot_bytes, k_done);
      prefetch_lines(pv[t], slot_bytes, v_done);
    }
  };
  V rows[kChunk];
  V s[8];
  for (int k = 0; k < kPrefetchChunks; ++k) {
    prefetch_ptrs(it.lo + k * kChunk);
    if (whole_rows)
      prefetch_rows(0, pn);
    else
      for (int t = 0; t < pn; ++t)
        for (int64_t hl = 0; hl < it.nkvh; ++hl) prefetch_head(t, hl * RD);
  }
  for (int64_t c0 = it.lo; c0 < it.hi; c0 += kChunk) {
    const int n = int(it.hi - c0 < kChunk ? it.hi - c0 : kChunk);
    bool any = false;
    for (int64_t m = 0; m < M; ++m) {
      sc.mask[m] = lane_mask(sc.lo[m], sc.hi[m], c0, n);
      any |= sc.mask[m] != 0;
    }
    if (!any) continue;
    row_ptrs(c0, n);
    prefetch_ptrs(c0 + kPrefetchChunks * kChunk);
    for (int64_t hl = 0; hl < it.nkvh; ++hl) {
      const int64_t hoff = hl * RD;
      const int64_t mb = hl * Mh, me = mb + Mh;  // this KV head's queries
      V kscale = Ops::zero(), vscale = Ops::zero();  // int8 KV: the chunk's 16 row scales
      if constexpr (kQ) {
        kscale = row_scales(kp, hoff + D);
        vscale = row_scales(vp, hoff + D);
      }
      if (!rows_qk) {  // K -> fp32, transposed to kt[D][16] (lanes past n are masked)
        for (int64_t d = 0; d < D; d += 16) {
          for (int t = 0; t < kChunk; ++t) rows[t] = Ops::load_cvt(kp[t] + hoff + d);
          Ops::transpose16(rows);
          for (int j = 0; j < kChunk; ++j) Ops::store(sc.kt + (d + j) * kChunk, rows[j]);
        }
      }
      // Meanwhile, prefetch this head's rows (whole rows: this head's share of them) of a later chunk.
      if (whole_rows)
        prefetch_rows(int(pn * hl / it.nkvh), int(pn * (hl + 1) / it.nkvh));
      else
        for (int t = 0; t < pn; ++t) prefetch_head(t, hoff);
      if (!direct_v)  // V -> fp32 vf[16][D]; only rows < n are ever read
        for (int t = 0; t < n; ++t)
          for (int64_t d = 0; d < D; d += 16) Ops::store(sc.vf + t * D + d, Ops::load_cvt(vp[t] + hoff + d));

      // Scores and online softmax, 8 queries at a time.
      for (int64_t m0 = mb; m0 < me; m0 += 8) {
        const int nq = int(me - m0 < 8 ? me - m0 : 8);
        uint32_t tile_any = 0;
        for (int j = 0; j < nq; ++j) tile_any |= sc.mask[m0 + j];
        if (!tile_any) continue;
        if (rows_qk) {
          const T* qh[8];
          for (int j = 0; j < nq; ++j) {
            const int64_t m = m0 + j, r = (m - mb) / G, g = (m - mb) % G;
            qh[j] = q + (qs + it.row0 + r) * p.q_stride + ((it.kvh + hl) * G + g) * D;
          }
          if constexpr (kQ) {
            if (i16)
              Ops::qk_rows_i16(sc.qi + m0 * D, sc.qsc + m0, nq, kp, hoff, D, s);
            else
              Ops::qk_rows(qh, sc.qf + m0 * D, nq, kp, hoff, D, qscale, s);
          } else {
            Ops::qk_rows(qh, sc.qf + m0 * D, nq, kp, hoff, D, qscale, s);
          }
        } else {
          qk_any(nq, sc.qf + m0 * D, D, sc.kt, s);
        }
        if constexpr (kQ)
          for (int j = 0; j < nq; ++j) s[j] = Ops::mul(s[j], kscale);
        if (cap > 0.f)
          for (int j = 0; j < nq; ++j) s[j] = Ops::softcap(s[j], cap);
        for (int j = 0; j < nq; ++j) {
          const int64_t m = m0 + j;
          const uint32_t mk = sc.mask[m];
          float* pr = sc.pr + m * kChunk;
          if (!mk) {
            Ops::store(pr, Ops::zero());
            sc.alpha[m] = 1.f;
            continue;
          }
          const V x = Ops::select(mk, s[j], Ops::set1(neg_inf));
          // Conditional rescaling: the running max (the reference of acc and the sums) moves only when a score
          // exceeds it by more than kRescaleLog2, so most chunks skip the horizontal max and the rescale; the
          // probabilities stay below 2^kRescaleLog2, far from overflow, and the result is the same softmax.
          float alpha = 1.f;
          float* sv = sc.sumv + m * kChunk;
          if (Ops::any_gt(x, sc.mx[m] + kRescaleLog2)) {
            const float cm = Ops::hmax(x);
            const float mnew = cm > sc.mx[m] ? cm : sc.mx[m];
            alpha = std::exp2(sc.mx[m] - mnew);  // 0 when the old max was -inf
            sc.mx[m] = mnew;
            Ops::store(sv, Ops::mul(Ops::load(sv), Ops::set1(alpha)));
          }
          const V e = Ops::exp2_maskz(mk, Ops::sub(x, Ops::set1(sc.mx[m])));
          Ops::store(sv, Ops::add(Ops::load(sv), e));
          sc.alpha[m] = alpha;
          if constexpr (kQ)
            Ops::store(pr, Ops::mul(e, vscale));  // p * scale: PV then runs on the codes
          else
            Ops::store(pr, e);
        }
      }
      // acc = alpha * acc + p v, 4 queries x 64 dims at a time.
      if constexpr (kQ) {
        if (i16) {  // every query of the head at once (an all-masked query has p = 0, alpha = 1: a no-op)
          Ops::pv_rows_i16(sc.acc + mb * D, D, sc.pr + mb * kChunk, sc.alpha + mb, int(Mh), vp, hoff, n);
          continue;
        }
      }
      const CacheRows<C> v_cache{vp, hoff};
      for (int64_t m0 = mb; m0 < me; m0 += 4) {
        const int nq = int(me - m0 < 4 ? me - m0 : 4);
        uint32_t tile_any = 0;
        for (int j = 0; j < nq; ++j) tile_any |= sc.mask[m0 + j];
        if (!tile_any) continue;
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
          const int nd = int((D - d0) / 16 < 4 ? (D - d0) / 16 : 4);
          if (direct_v)
            pv_any(nq, nd, sc.acc + m0 * D, D, sc.pr + m0 * kChunk, sc.alpha + m0, v_cache, n, d0);
          else
            pv_scratch(nq, nd, sc.acc + m0 * D, D, sc.pr + m0 * kChunk, sc.alpha + m0, sc.vf, n, d0);
        }
      }
    }
  }

  for (int64_t m = 0; m < M; ++m) sc.sum[m] = Ops::hsum(Ops::load(sc.sumv + m * kChunk));
  if (it.partial >= 0) {  // one part of a split context: keep the unnormalised state for the combine pass
    float* slab = partials + it.partial;
    for (int64_t i = 0; i < M * D; ++i) slab[i] = sc.acc[i];
    for (int64_t m = 0; m < M; ++m) {
      slab[M * D + m] = sc.mx[m];
      slab[M * D + M + m] = sc.sum[m];
    }
    return;
  }
  T* out = static_cast<T*>(p.out);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t hl = m / Mh, r = (m % Mh) / G, g = m % G;
    T* orow = out + (qs + it.row0 + r) * p.out_stride + ((it.kvh + hl) * G + g) * D;
    const V inv = Ops::set1(sc.sum[m] > 0.f ? 1.f / sc.sum[m] : 0.f);
    for (int64_t d = 0; d < D; d += 16) Ops::store_cvt(orow + d, Ops::mul(Ops::load(sc.acc + m * D + d), inv));
  }
}

// Instantiate here, under this namespace's target options.
template void run_item<float, float>(const PagedAttentionParams&, const Item&, const Scratch&, float*);
template void run_item<bf16_t, bf16_t>(const PagedAttentionParams&, const Item&, const Scratch&, float*);
template void run_item<fp16_t, fp16_t>(const PagedAttentionParams&, const Item&, const Scratch&, float*);
template void run_item<float, int8_t>(const PagedAttentionParams&, const Item&, const Scratch&, float*);
template void run_item<bf16_t, int8_t>(const PagedAttentionParams&, const Item&, const Scratch&, float*);
template void run_item<fp16_t, int8_t>(const PagedAttentionParams&, const Item&, const Scratch&, float*);
