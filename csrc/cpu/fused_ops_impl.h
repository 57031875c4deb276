// The per-layer ops of fused_ops.cpp written once against a vector API `Ops` (cpu_vec.h) and included into one
// namespace per instruction set. Each loop runs kW lanes at a time and finishes the row with the same body on
// GenericVec (one lane), so vector and tail compute the same numbers. No include guard on purpose.

constexpr int kW = Ops::kW;

// v rounded to T's precision (kept as fp32): what a torch op in dtype T stores.
template <class O, class T>
FI_INLINE typename O::V rnd(typename O::V v) {
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else {
    T tmp[O::kW];
    O::store_cvt(tmp, v);
    return O::load_cvt(tmp);
  }
}

// Sum of squares of s[i0, i1) where s = x (residual null) or s = round(x + r) (stored to so).
template <class O, class T>
FI_INLINE float rms_sum(const T* x, const T* r, T* so, int64_t i0, int64_t i1, typename O::V& acc) {
  for (int64_t i = i0; i + O::kW <= i1; i += O::kW) {
    typename O::V s = O::load_cvt(x + i);
    if (r) {
      s = rnd<O, T>(O::add(s, O::load_cvt(r + i)));
      O::store_cvt(so + i, s);
    }
    acc = O::fma(s, s, acc);
  }
  return O::hsum(acc);
}

template <class O, class T>
FI_INLINE void rms_scale(const T* s, const T* w, T* out, float inv, int64_t i0, int64_t i1) {
  const typename O::V vi = O::set1(inv);
  for (int64_t i = i0; i + O::kW <= i1; i += O::kW)
    O::store_cvt(out + i, O::mul(O::load_cvt(w + i), rnd<O, T>(O::mul(O::load_cvt(s + i), vi))));
}

template <class T>
void rms_rows(const RmsNormParams& p, int64_t t0, int64_t t1) {
  const int64_t H = p.H, main = H / kW * kW;
  for (int64_t t = t0; t < t1; ++t) {
    const T* x = static_cast<const T*>(p.x) + t * p.x_stride;
    const T* r = p.residual ? static_cast<const T*>(p.residual) + t * p.r_stride : nullptr;
    T* so = p.residual ? static_cast<T*>(p.residual_out) + t * H : nullptr;
    typename Ops::V acc = Ops::zero();
    float ss = rms_sum<Ops, T>(x, r, so, 0, main, acc);
    float tail = 0.f;
    ss += rms_sum<GenericVec, T>(x, r, so, main, H, tail);
    const float inv = 1.f / std::sqrt(ss / float(H) + p.eps);
    const T* s = so ? so : x;
    const T* w = static_cast<const T*>(p.weight);
    T* out = static_cast<T*>(p.out) + t * H;
    rms_scale<Ops, T>(s, w, out, inv, 0, main);
    rms_scale<GenericVec, T>(s, w, out, inv, main, H);
  }
}

// One head's rotation for features [i0, i1) of the first half (c, s: the cache row's cos and sin halves).
template <class O, class T>
FI_INLINE void rotate(T* x, const float* c, const float* s, int64_t half, int64_t i0, int64_t i1) {
  using V = typename O::V;
  for (int64_t i = i0; i + O::kW <= i1; i += O::kW) {
    const V x1 = O::load_cvt(x + i), x2 = O::load_cvt(x + half + i);
    const V vc = rnd<O, T>(O::load(c + i)), vs = rnd<O, T>(O::load(s + i));
    const V a = O::sub(rnd<O, T>(O::mul(x1, vc)), rnd<O, T>(O::mul(x2, vs)));
    const V b = O::add(rnd<O, T>(O::mul(x2, vc)), rnd<O, T>(O::mul(x1, vs)));
    O::store_cvt(x + i, a);
    O::store_cvt(x + half + i, b);
  }
}

template <class T>
void rotary_rows(const RotaryParams& p) {
  const int64_t half = p.rot / 2, main = half / kW * kW;
  for (int64_t t = 0; t < p.T; ++t) {
    const float* c = p.cache + p.positions[t] * p.rot;
    const float* s = c + half;
    for (int which = 0; which < 2; ++which) {
      T* base = static_cast<T*>(which ? p.k : p.q) + t * (which ? p.k_stride : p.q_stride);
      const int64_t heads = which ? p.Hk : p.Hq;
      for (int64_t h = 0; h < heads; ++h) {
        T* x = base + h * p.D;
        rotate<Ops, T>(x, c, s, half, 0, main);
        rotate<GenericVec, T>(x, c, s, half, main, half);
      }
    }
  }
}

template <class O, class T>
FI_INLINE void silu_mul_range(const T* x, T* out, int64_t d, int64_t i0, int64_t i1) {
  using V = typename O::V;
  const V one = O::set1(1.f);
  for (int64_t i = i0; i + O::kW <= i1; i += O::kW) {
    const V g = O::load_cvt(x + i);
    const V a = rnd<O, T>(O::div(g, O::add(one, O::exp(O::sub(O::zero(), g)))));
    O::store_cvt(out + i, O::mul(a, O::load_cvt(x + d + i)));
  }
}

template <class T>
void silu_rows(const SiluMulParams& p, int64_t t0, int64_t t1) {
  const int64_t main = p.d / kW * kW;
  for (int64_t t = t0; t < t1; ++t) {
    const T* x = static_cast<const T*>(p.x) + t * p.x_stride;
    T* out = static_cast<T*>(p.out) + t * p.d;
    silu_mul_range<Ops, T>(x, out, p.d, 0, main);
    silu_mul_range<GenericVec, T>(x, out, p.d, main, p.d);
  }
}

// First index of the maximum of x[0, n); a NaN wins (the first NaN). Two passes: the maximum (noting any NaN),
// then the first lane equal to it.
int64_t argmax(const float* x, int64_t n) {
  typename Ops::V m = Ops::set1(-INFINITY);
  bool nan = false;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const typename Ops::V v = Ops::load(x + i);
    nan |= Ops::any_nan(v);
    m = Ops::max(m, v);
  }
  float best = Ops::hmax(m);
  for (int64_t j = i; j < n; ++j) {
    nan |= std::isnan(x[j]);
    best = x[j] > best ? x[j] : best;
  }
  if (nan) {
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(x[j])) return j;
  }
  const typename Ops::V b = Ops::set1(best);
  for (i = 0; i + kW <= n; i += kW) {
    const int lane = Ops::first_eq(Ops::load(x + i), b);
    if (lane >= 0) return i + lane;
  }
  for (; i < n; ++i)
    if (x[i] == best) return i;
  return 0;
}

// Structured outputs: logits[j] = -inf where bit j of the row's bitmask (32 tokens per int32 word, least
// significant bit first) is 0. An all-ones word (32 allowed tokens) is skipped and an all-zero one (the common
// case: a grammar state allows few tokens) is one 32-float fill this ISA's codegen vectorises.
void mask_row(float* logits, const int32_t* words, int64_t V) {
  const int64_t W = (V + 31) / 32;
  for (int64_t w = 0; w < W; ++w) {
    const uint32_t bits = uint32_t(words[w]);
    if (bits == 0xFFFFFFFFu) continue;
    float* l = logits + w * 32;
    const int64_t n = std::min<int64_t>(32, V - w * 32);
    if (bits == 0 && n == 32) {
      for (int j = 0; j < 32; ++j) l[j] = -INFINITY;
      continue;
    }
    for (int64_t j = 0; j < n; ++j)
      if (!((bits >> j) & 1u)) l[j] = -INFINITY;
  }
}

const Kernels kKernels = {
    {rms_rows<float>, rms_rows<bf16_t>, rms_rows<fp16_t>},
    {rotary_rows<float>, rotary_rows<bf16_t>, rotary_rows<fp16_t>},
    {silu_rows<float>, silu_rows<bf16_t>, silu_rows<fp16_t>},
    argmax,
    mask_row,
};
