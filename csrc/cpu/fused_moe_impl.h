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

// Gate/up rows i .. i + P - 1 of expert e for its token slots [s0, s1): act[s][i] = round(silu(g) u).
template <class T, int P>
FI_INLINE void gate_up_rows(const Work& wk, int64_t e, int64_t i, int64_t s0, int64_t s1) {
  const int64_t H = wk.H, I = wk.I;
  const T* w = static_cast<const T*>(wk.w13) + e * 2 * I * H;
  const T* rows[2 * P];
  for (int r = 0; r < P; ++r) {
    rows[r] = w + (i + r) * H;          // gate
    rows[P + r] = w + (I + i + r) * H;  // up
  }
  for (int64_t s = s0; s < s1; s += kMT) {
    const int mt = int(s1 - s < kMT ? s1 - s : kMT);
    const float* x[kMT];
    for (int m = 0; m < mt; ++m) x[m] = wk.xf + int64_t(wk.tok[s + m]) * H;
    float res[2 * P][kMT];
    dot_any<T, 2 * P>(mt, rows, x, H, res);
    for (int m = 0; m < mt; ++m)
      for (int r = 0; r < P; ++r) wk.act[(s + m) * I + i + r] = silu_mul(wk.dtype, res[r][m], res[P + r][m]);
  }
}

// Down-projection rows h .. h + R - 1 of expert e for its token slots [s0, s1): acc[tok][h] += weight * dot.
template <class T, int R>
FI_INLINE void down_rows(const Work& wk, int64_t e, int64_t h, int64_t s0, int64_t s1) {
  const int64_t H = wk.H, I = wk.I;
  const T* w = static_cast<const T*>(wk.w2) + e * H * I;
  const T* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = w + (h + r) * I;
  for (int64_t s = s0; s < s1; s += kMT) {
    const int mt = int(s1 - s < kMT ? s1 - s : kMT);
    const float* x[kMT];
    for (int m = 0; m < mt; ++m) x[m] = wk.act + (s + m) * I;
    float res[R][kMT];
    dot_any<T, R>(mt, rows, x, I, res);
    for (int m = 0; m < mt; ++m) {
      float* o = wk.acc + int64_t(wk.tok[s + m]) * H + h;
      const float wt = wk.wt[s + m];
      for (int r = 0; r < R; ++r) o[r] += wt * res[r][m];
    }
  }
}

// Phase 1 units [u0, u1) (unit = kPairs gate/up row pairs of one active expert).
template <class T>
void gate_up_units(const Work& wk, int64_t u0, int64_t u1) {
  const int64_t per = (wk.I + kPairs - 1) / kPairs;  // units per expert
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t e = wk.active[u / per], i = (u % per) * kPairs;
    const int64_t s0 = wk.start[e], s1 = wk.start[e + 1];
    if (i + kPairs <= wk.I) gate_up_rows<T, kPairs>(wk, e, i, s0, s1);
    else
      for (int64_t j = i; j < wk.I; ++j) gate_up_rows<T, 1>(wk, e, j, s0, s1);
  }
}

// Phase 2 rows [h0, h1) of every active expert, then those columns of out.
template <class T>
void down_cols(const Work& wk, int64_t h0, int64_t h1) {
  for (int64_t t = 0; t < wk.T; ++t)
    for (int64_t h = h0; h < h1; ++h) wk.acc[t * wk.H + h] = 0.f;
  for (int64_t a = 0; a < wk.num_active; ++a) {
    const int64_t e = wk.active[a], s0 = wk.start[e], s1 = wk.start[e + 1];
    int64_t h = h0;
    for (; h + kRows <= h1; h += kRows) down_rows<T, kRows>(wk, e, h, s0, s1);
    for (; h < h1; ++h) down_rows<T, 1>(wk, e, h, s0, s1);
  }
  T* out = static_cast<T*>(wk.out);
  for (int64_t t = 0; t < wk.T; ++t)
    for (int64_t h = h0; h < h1; ++h) from_float(wk.acc[t * wk.H + h], out + t * wk.H + h);
}

// x as fp32 rows [t0, t1).
template <class T>
void prep_x(const Work& wk, float* xf, int64_t t0, int64_t t1) {
  const T* x = static_cast<const T*>(wk.x);
  for (int64_t i = t0 * wk.H; i < t1 * wk.H; ++i) xf[i] = to_float(x[i]);
}

const Kernels kKernels = {
    {prep_x<float>, prep_x<bf16_t>, prep_x<fp16_t>},
    {gate_up_units<float>, gate_up_units<bf16_t>, gate_up_units<fp16_t>},
    {down_cols<float>, down_cols<bf16_t>, down_cols<fp16_t>},
    kPairs,
};
