// The fused MoE work, written once against a small vector API `Ops` (kW fp32 lanes: zero, load, load_cvt,
// store, fma, hsum) and included by fused_moe.cpp into one namespace per instruction set, each compiled under
// its own target options. No include guard on purpose.
//
// Weight rows stream from memory once per call; every weight vector feeds up to kMT token rows (fp32, from
// L1/L2), every token vector kR weight rows. Sums are fp32 (one accumulator vector per row x token, folded
// at the end of the row, then the scalar tail).

using V = Ops::V;
constexpr int kW = Ops::kW;
constexpr int kMT = Ops::kMT;      // token rows per tile
constexpr int kPairs = Ops::kPairs;  // gate/up row pairs per phase-1 unit
constexpr int kRows = 4;             // down-projection rows per tile

// res[r][m] = dot(w[r][0:n], x[m][0:n]) for R weight rows of type T and M <= kMT fp32 rows.
template <class T, int R, int M>
FI_INLINE void dot_tile(const T* const* w, const float* const* x, int64_t n, float (*res)[kMT]) {
  V acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = Ops::zero();
  int64_t k = 0;
  for (; k + kW <= n; k += kW) {
    for (int r = 0; r < R; ++r) FI_PREFETCH(w[r] + k + kPrefetchBytes / int64_t(sizeof(T)));
    V xv[M];
    for (int m = 0; m < M; ++m) xv[m] = Ops::load(x[m] + k);
    for (int r = 0; r < R; ++r) {
      const V wv = Ops::load_cvt(w[r] + k);
      for (int m = 0; m < M; ++m) acc[r][m] = Ops::fma(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) res[r][m] = Ops::hsum(acc[r][m]);
  for (; k < n; ++k)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) res[r][m] += to_float(w[r][k]) * x[m][k];
}

template <class T, int R>
FI_INLINE void dot_any(int mt, const T* const* w, const float* const* x, int64_t n, float (*res)[kMT]) {
  switch (mt) {
    case 1: dot_tile<T, R, 1>(w, x, n, res); break;
    case 2: dot_tile<T, R, 2 < kMT ? 2 : kMT>(w, x, n, res); break;
    case 3: dot_tile<T, R, 3 < kMT ? 3 : kMT>(w, x, n, res); break;
    default: dot_tile<T, R, kMT>(w, x, n, res); break;
  }
}

// res[r][m] = dot(dequant(w[r])[0:n], x[m][0:n]) for R quantized rows (codes q[r], fp32 scales s[r] / mins m[r]
// per group of gs inputs; m null: no mins) and M <= kMT fp32 rows; gs is a multiple of kW and divides n.
template <class W, int R, int M>
FI_INLINE void qdot_tile(const uint8_t* const* q, const float* const* s, const float* const* mn, int64_t n,
                         int64_t gs, const float* const* x, float (*res)[kMT]) {
  constexpr int64_t kBytesPerCode2 = std::is_same<W, Q4>::value ? 1 : 2;  // bytes per 2 codes
  V acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = Ops::zero();
  for (int64_t g0 = 0; g0 < n; g0 += gs) {
    const int64_t g = g0 / gs;
    V sv[R], mv[R];
    for (int r = 0; r < R; ++r) {
      sv[r] = Ops::set1(s[r][g]);
      mv[r] = mn[0] ? Ops::set1(mn[r][g]) : Ops::zero();
    }
    for (int64_t k = g0; k < g0 + gs; k += kW) {
      for (int r = 0; r < R; ++r) FI_PREFETCH(q[r] + k * kBytesPerCode2 / 2 + kPrefetchBytes);
      V xv[M];
      for (int m = 0; m < M; ++m) xv[m] = Ops::load(x[m] + k);
      for (int r = 0; r < R; ++r) {
        const V code = std::is_same<W, Q4>::value ? Ops::load_q4(q[r], k) : Ops::load_q8(q[r], k);
        const V wv = Ops::fma(code, sv[r], mv[r]);  // q * scale exact in fp32, then + min: the reference's value
        for (int m = 0; m < M; ++m) acc[r][m] = Ops::fma(wv, xv[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) res[r][m] = Ops::hsum(acc[r][m]);
}

// R rows of one projection of one expert: pointers to the weights (float) or codes + scales + mins (quantized).
template <class W, int R>
struct RowSet {
  static constexpr bool kQuant = std::is_same<W, Q8>::value || std::is_same<W, Q4>::value;
  using T = typename std::conditional<kQuant, uint8_t, W>::type;
  const T* w[R];
  const float* s[R];
  const float* m[R];
  int64_t gs = 0;

  // Row `row` (of all E * N rows of the stacked [E, N, K] projection) into slot r.
  FI_INLINE void set(int r, const MoeWeight& mw, int64_t row, int64_t K) {
    if constexpr (kQuant) {
      const int64_t groups = K / mw.group;
      w[r] = static_cast<const uint8_t*>(mw.w) + row * (std::is_same<W, Q4>::value ? K / 2 : K);
      s[r] = mw.scales + row * groups;
      m[r] = mw.mins ? mw.mins + row * groups : nullptr;
      gs = mw.group;
    } else {
      w[r] = static_cast<const T*>(mw.w) + row * K;
    }
  }

  FI_INLINE void dot(int mt, const float* const* x, int64_t n, float (*res)[kMT]) const {
    if constexpr (kQuant) {
      switch (mt) {
        case 1: qdot_tile<W, R, 1>(w, s, m, n, gs, x, res); break;
        case 2: qdot_tile<W, R, 2 < kMT ? 2 : kMT>(w, s, m, n, gs, x, res); break;
        case 3: qdot_tile<W, R, 3 < kMT ? 3 : kMT>(w, s, m, n, gs, x, res); break;
        default: qdot_tile<W, R, kMT>(w, s, m, n, gs, x, res); break;
      }
    } else {
      dot_any<T, R>(mt, w, x, n, res);
    }
  }
};

// Gate/up rows i .. i + P - 1 of expert e for its token slots [s0, s1): act[s][i] = round(silu(g) u).
template <class W, int P>
FI_INLINE void gate_up_rows(const Work& wk, int64_t e, int64_t i, int64_t s0, int64_t s1) {
  const int64_t H = wk.H, I = wk.I;
  RowSet<W, 2 * P> rows;
  for (int r = 0; r < P; ++r) {
    rows.set(r, wk.w13, e * 2 * I + i + r, H);          // gate
    rows.set(P + r, wk.w13, e * 2 * I + I + i + r, H);  // up
  }
  for (int64_t s = s0; s < s1; s += kMT) {
    const int mt = int(s1 - s < kMT ? s1 - s : kMT);
    const float* x[kMT];
    for (int m = 0; m < mt; ++m) x[m] = wk.xf + int64_t(wk.tok[s + m]) * H;
    float res[2 * P][kMT];
    rows.dot(mt, x, H, res);
    for (int m = 0; m < mt; ++m)
      for (int r = 0; r < P; ++r) wk.act[(s + m) * I + i + r] = silu_mul(wk.dtype, res[r][m], res[P + r][m]);
  }
}

// Down-projection rows h .. h + R - 1 of expert e for its token slots [s0, s1): acc[tok][h] += weight * dot.
template <class W, int R>
FI_INLINE void down_rows(const Work& wk, int64_t e, int64_t h, int64_t s0, int64_t s1) {
  const int64_t H = wk.H, I = wk.I;
  RowSet<W, R> rows;
  for (int r = 0; r < R; ++r) rows.set(r, wk.w2, e * H + h + r, I);
  for (int64_t s = s0; s < s1; s += kMT) {
    const int mt = int(s1 - s < kMT ? s1 - s : kMT);
    const float* x[kMT];
    for (int m = 0; m < mt; ++m) x[m] = wk.act + (s + m) * I;
    float res[R][kMT];
    rows.dot(mt, x, I, res);
    for (int m = 0; m < mt; ++m) {
      float* o = wk.acc + int64_t(wk.tok[s + m]) * H + h;
      const float wt = wk.wt[s + m];
      for (int r = 0; r < R; ++r) o[r] += wt * res[r][m];
    }
  }
}

// Phase 1 units [u0, u1) (unit = kPairs gate/up row pairs of one active expert).
template <class W>
void gate_up_units(const Work& wk, int64_t u0, int64_t u1) {
  const int64_t per = (wk.I + kPairs - 1) / kPairs;  // units per expert
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t e = wk.active[u / per], i = (u % per) * kPairs;
    const int64_t s0 = wk.start[e], s1 = wk.start[e + 1];
    if (i + kPairs <= wk.I) gate_up_rows<W, kPairs>(wk, e, i, s0, s1);
    else
      for (int64_t j = i; j < wk.I; ++j) gate_up_rows<W, 1>(wk, e, j, s0, s1);
  }
}

// Phase 2 rows [h0, h1) of every active expert, then those columns of out (type O).
template <class W, class O>
void down_cols(const Work& wk, int64_t h0, int64_t h1) {
  for (int64_t t = 0; t < wk.T; ++t)
    for (int64_t h = h0; h < h1; ++h) wk.acc[t * wk.H + h] = 0.f;
  for (int64_t a = 0; a < wk.num_active; ++a) {
    const int64_t e = wk.active[a], s0 = wk.start[e], s1 = wk.start[e + 1];
    int64_t h = h0;
    for (; h + kRows <= h1; h += kRows) down_rows<W, kRows>(wk, e, h, s0, s1);
    for (; h < h1; ++h) down_rows<W, 1>(wk, e, h, s0, s1);
  }
  O* out = static_cast<O*>(wk.out);
  for (int64_t t = 0; t < wk.T; ++t)
    for (int64_t h = h0; h < h1; ++h) from_float(wk.acc[t * wk.H + h], out + t * wk.H + h);
}

// x as fp32 rows [t0, t1).
template <class T>
void prep_x(const Work& wk, float* xf, int64_t t0, int64_t t1) {
  const T* x = static_cast<const T*>(wk.x);
  for (int64_t i = t0 * wk.H; i < t1 * wk.H; ++i) xf[i] = to_float(x[i]);
}

#define FI_MOE_DOWN(W) {down_cols<W, float>, down_cols<W, bf16_t>, down_cols<W, fp16_t>}
const Kernels kKernels = {
    {prep_x<float>, prep_x<bf16_t>, prep_x<fp16_t>},
    {gate_up_units<float>, gate_up_units<bf16_t>, gate_up_units<fp16_t>, gate_up_units<Q8>, gate_up_units<Q4>},
    {FI_MOE_DOWN(float), FI_MOE_DOWN(bf16_t), FI_MOE_DOWN(fp16_t), FI_MOE_DOWN(Q8), FI_MOE_DOWN(Q4)},
    kPairs,
};
#undef FI_MOE_DOWN
