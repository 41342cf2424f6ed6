// The vectorised CPU loops, written once over an instruction-set trait `Isa` and included by one
// translation unit per instruction set (csrc/cpu/simd_avx512.cpp, csrc/cpu/simd_avx2.cpp) inside
// its `#pragma GCC target` region. No include guard on purpose: each ISA file includes it once.
//
// Isa provides (vf = a vector of W floats):
//   W, kUnroll; set1, zero, add, sub, mul, fmadd(a, b, c) = a b + c, fnmadd(a, b, c) = c - a b,
//   vmin, vmax (the second operand is returned when either is NaN), round_nearest, pow2n(p, n)
//   = p 2^n for integral n, hmax, hsum, first; load/store of float, bfloat16 bits and half bits.
//
// Element kinds: kF32 (float storage), kBF16 and kF16 (uint16_t storage). All math is in float32.

namespace alphagrpo {
namespace {

enum Elt : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
template <int E> struct Store { using type = uint16_t; };
template <> struct Store<kF32> { using type = float; };
template <int E> using St = typename Store<E>::type;

using vf = Isa::vf;
constexpr int W = Isa::W;

// 1 in the first n lanes, 0 after: loaded from kLaneMask + 16 - n (n <= W <= 16).
alignas(64) const float kLaneMask[32] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                         0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};

template <int E>
inline vf load(const St<E>* p) {
  if constexpr (E == kF32) return Isa::load_f32(p);
  else if constexpr (E == kBF16) return Isa::load_bf16(p);
  else return Isa::load_f16(p);
}

template <int E>
inline void store(St<E>* p, vf v) {
  if constexpr (E == kF32) Isa::store_f32(p, v);
  else if constexpr (E == kBF16) Isa::store_bf16(p, v);
  else Isa::store_f16(p, v);
}

// The first n (< W) elements, the other lanes filled with `pad` (given as the storage bits).
template <int E>
inline vf load_tail(const St<E>* p, int64_t n, St<E> pad) {
  St<E> buf[W];
  for (int j = 0; j < W; ++j) buf[j] = pad;
  std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(St<E>));
  return load<E>(buf);
}

template <int E>
inline void store_tail(St<E>* p, int64_t n, vf v) {
  St<E> buf[W];
  store<E>(buf, v);
  std::memcpy(p, buf, static_cast<size_t>(n) * sizeof(St<E>));
}

template <int E>
constexpr St<E> neg_inf_bits() {
  if constexpr (E == kF32) return -__builtin_inff();
  else if constexpr (E == kBF16) return 0xFF80u;
  else return 0xFC00u;
}

template <int E>
inline float to_float(const St<E>* p, int64_t i) {
  return Isa::first(load_tail<E>(p + i, 1, St<E>(0)));
}

// exp(x) in float32: Cody-Waite reduction by ln 2 and the degree-6 polynomial of fast_expf
// (cpu_common.h), within a few ulp; x is clamped to [-87.3, 88.3] (so exp(-inf) is ~1e-38, never
// inf). NaN in, NaN out: vmin/vmax return their second operand on NaN, and x is passed second.
inline vf vexp(vf x) {
  x = Isa::vmax(Isa::set1(-87.3f), Isa::vmin(Isa::set1(88.3f), x));
  const vf n = Isa::round_nearest(Isa::mul(x, Isa::set1(1.44269504088896341f)));
  vf r = Isa::fnmadd(n, Isa::set1(0.693145751953125f), x);
  r = Isa::fnmadd(n, Isa::set1(1.428606765330187045e-06f), r);
  vf p = Isa::set1(1.9875691500e-4f);
  p = Isa::fmadd(p, r, Isa::set1(1.3981999507e-3f));
  p = Isa::fmadd(p, r, Isa::set1(8.3334519073e-3f));
  p = Isa::fmadd(p, r, Isa::set1(4.1665795894e-2f));
  p = Isa::fmadd(p, r, Isa::set1(1.6666665459e-1f));
  p = Isa::fmadd(p, r, Isa::set1(5.0000001201e-1f));
  p = Isa::add(Isa::fmadd(p, Isa::mul(r, r), r), Isa::set1(1.0f));
  return Isa::pow2n(p, n);
}

// ---- rows of logits ----------------------------------------------------------------------------
// Online log-sum-exp: per lane a running max m and sum s of exp(z - m). Each block of kUnroll
// vectors costs kUnroll + 1 exponentials (one rescales s when the max moves); the row is read once.
template <int E>
void row_norm_impl(const St<E>* row,  // [V]
                   int64_t V, float inv_temp, float* shift, float* log_sum) {
  constexpr int U = Isa::kUnroll;
  const vf t = Isa::set1(inv_temp);
  vf m = Isa::set1(-3.4028234663852886e38f), s = Isa::zero();
  int64_t i = 0;
  for (; i + U * W <= V; i += U * W) {
    vf z[U];
    for (int u = 0; u < U; ++u) z[u] = Isa::mul(load<E>(row + i + u * W), t);
    vf bm = z[0];
    for (int u = 1; u < U; ++u) bm = Isa::vmax(bm, z[u]);
    const vf mn = Isa::vmax(m, bm);
    vf e[U];
    for (int u = 0; u < U; ++u) e[u] = vexp(Isa::sub(z[u], mn));
    for (int w = U / 2; w > 0; w /= 2) {
      for (int u = 0; u < w; ++u) e[u] = Isa::add(e[u], e[u + w]);
    }
    s = Isa::fmadd(s, vexp(Isa::sub(m, mn)), e[0]);
    m = mn;
  }
  for (; i + W <= V; i += W) {
    const vf z = Isa::mul(load<E>(row + i), t);
    const vf mn = Isa::vmax(m, z);
    s = Isa::fmadd(s, vexp(Isa::sub(m, mn)), vexp(Isa::sub(z, mn)));
    m = mn;
  }
  if (i < V) {
    const int64_t n = V - i;
    const vf z = Isa::mul(load_tail<E>(row + i, n, neg_inf_bits<E>()), t);
    const vf mn = Isa::vmax(m, z);
    const vf e = Isa::mul(vexp(Isa::sub(z, mn)), Isa::load_f32(kLaneMask + 16 - n));
    s = Isa::fmadd(s, vexp(Isa::sub(m, mn)), e);
    m = mn;
  }
  const float M = Isa::hmax(m);
  const float total = Isa::hsum(Isa::mul(s, vexp(Isa::sub(m, Isa::set1(M)))));
  *shift = M;
  *log_sum = M > -3.4028234663852886e38f ? std::log(total) : __builtin_nanf("");
}

template <int E>
void row_grad_impl(const St<E>* row,  // [V]
                   int64_t V, float inv_temp, float shift, float log_sum, int64_t token, float coef,
                   St<E>* out) {      // [V], may be `row`
  if (coef == 0.0f) {
    std::memset(static_cast<void*>(out), 0, static_cast<size_t>(V) * sizeof(St<E>));  // +0 in every format
    return;
  }
  const float k = -coef * inv_temp;
  const float x_tok = to_float<E>(row, token);  // read before an in-place pass overwrites it
  const vf t = Isa::set1(inv_temp), sh = Isa::set1(shift), ls = Isa::set1(log_sum), kv = Isa::set1(k);
  auto grad = [&](vf x) { return Isa::mul(kv, vexp(Isa::sub(Isa::sub(Isa::mul(x, t), sh), ls))); };
  constexpr int U = Isa::kUnroll / 2;
  int64_t i = 0;
  for (; i + U * W <= V; i += U * W) {
    vf g[U];
    for (int u = 0; u < U; ++u) g[u] = grad(load<E>(row + i + u * W));
    for (int u = 0; u < U; ++u) store<E>(out + i + u * W, g[u]);
  }
  for (; i + W <= V; i += W) store<E>(out + i, grad(load<E>(row + i)));
  if (i < V) store_tail<E>(out + i, V - i, grad(load_tail<E>(row + i, V - i, St<E>(0))));
  const float p_tok = Isa::first(vexp(Isa::set1((x_tok * inv_temp - shift) - log_sum)));
  store_tail<E>(out + token, 1, Isa::set1(k * (p_tok - 1.0f)));
}

// ---- SDE element ranges ------------------------------------------------------------------------
// Plain multiplies and adds in the reference's order (no fused multiply-add), so that results are
// bit-for-bit those of the float32 reference: noise_level 0 then gives exactly the Euler step.
inline vf affine(vf a, vf x, vf b, vf v) { return Isa::add(Isa::mul(a, x), Isa::mul(b, v)); }
template <int E, bool CFG>
float sde_step_impl(const St<E>* x, const St<E>* v, const St<E>* vu, float g, const St<E>* noise, float a, float b,
                    float scale, St<E>* x_next, St<E>* mean, int64_t n) {  // every pointer: [n]
  const vf va = Isa::set1(a), vb = Isa::set1(b), vs = Isa::set1(scale), vg = Isa::set1(g);
  vf acc0 = Isa::zero(), acc1 = Isa::zero();
  auto one = [&](vf xv, vf vv, vf vuv, vf nv, vf& m_out) {
    if constexpr (CFG) vv = Isa::add(vuv, Isa::mul(vg, Isa::sub(vv, vuv)));
    m_out = affine(va, xv, vb, vv);
    return Isa::add(m_out, Isa::mul(vs, nv));
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    vf m0, m1;
    const vf x0 = one(load<E>(x + i), load<E>(v + i), CFG ? load<E>(vu + i) : Isa::zero(), load<E>(noise + i), m0);
    const vf x1 = one(load<E>(x + i + W), load<E>(v + i + W), CFG ? load<E>(vu + i + W) : Isa::zero(),
                      load<E>(noise + i + W), m1);
    store<E>(x_next + i, x0), store<E>(mean + i, m0);
    store<E>(x_next + i + W, x1), store<E>(mean + i + W, m1);
    const vf d0 = Isa::sub(x0, m0), d1 = Isa::sub(x1, m1);
    acc0 = Isa::fmadd(d0, d0, acc0);
    acc1 = Isa::fmadd(d1, d1, acc1);
  }
  for (; i < n; i += W) {
    const int64_t r = n - i < W ? n - i : W;
    vf m0;
    const vf x0 = one(load_tail<E>(x + i, r, 0), load_tail<E>(v + i, r, 0), CFG ? load_tail<E>(vu + i, r, 0) : Isa::zero(),
                      load_tail<E>(noise + i, r, 0), m0);
    store_tail<E>(x_next + i, r, x0), store_tail<E>(mean + i, r, m0);
    const vf d0 = Isa::sub(x0, m0);  // 0 in the padded lanes: every input there is 0
    acc0 = Isa::fmadd(d0, d0, acc0);
  }
  return Isa::hsum(Isa::add(acc0, acc1));
}

template <int E>
float sde_step_fn(const St<E>* x, const St<E>* v, const St<E>* vu, float g, const St<E>* noise, float a, float b,
                  float scale, St<E>* x_next, St<E>* mean, int64_t n) {
  return vu ? sde_step_impl<E, true>(x, v, vu, g, noise, a, b, scale, x_next, mean, n)
            : sde_step_impl<E, false>(x, v, vu, g, noise, a, b, scale, x_next, mean, n);
}

template <int E>
float sde_sq_fn(const St<E>* x, const St<E>* v, const St<E>* x_next, float a, float b, int64_t n) {  // [n] each
  const vf va = Isa::set1(a), vb = Isa::set1(b);
  vf acc0 = Isa::zero(), acc1 = Isa::zero();
  auto diff = [&](vf xv, vf vv, vf xn) { return Isa::sub(xn, affine(va, xv, vb, vv)); };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const vf d0 = diff(load<E>(x + i), load<E>(v + i), load<E>(x_next + i));
    const vf d1 = diff(load<E>(x + i + W), load<E>(v + i + W), load<E>(x_next + i + W));
    acc0 = Isa::fmadd(d0, d0, acc0);
    acc1 = Isa::fmadd(d1, d1, acc1);
  }
  for (; i < n; i += W) {
    const int64_t r = n - i < W ? n - i : W;
    const vf d0 = diff(load_tail<E>(x + i, r, 0), load_tail<E>(v + i, r, 0), load_tail<E>(x_next + i, r, 0));
    acc0 = Isa::fmadd(d0, d0, acc0);
  }
  return Isa::hsum(Isa::add(acc0, acc1));
}

template <int E>
float sde_bwd_fn(const St<E>* x, const St<E>* v, const St<E>* x_next, float a, float b, float kv, float kx,
                 St<E>* grad_v, St<E>* grad_x, int64_t n) {  // [n] each; grad_x nullable
  const vf va = Isa::set1(a), vb = Isa::set1(b), vkv = Isa::set1(kv), vkx = Isa::set1(kx);
  for (int64_t i = 0; i < n; i += W) {
    const int64_t r = n - i < W ? n - i : W;
    vf d;
    if (r == W) d = Isa::sub(load<E>(x_next + i), affine(va, load<E>(x + i), vb, load<E>(v + i)));
    else d = Isa::sub(load_tail<E>(x_next + i, r, 0), affine(va, load_tail<E>(x + i, r, 0), vb, load_tail<E>(v + i, r, 0)));
    if (r == W) {
      store<E>(grad_v + i, Isa::mul(vkv, d));
      if (grad_x) store<E>(grad_x + i, Isa::mul(vkx, d));
    } else {
      store_tail<E>(grad_v + i, r, Isa::mul(vkv, d));
      if (grad_x) store_tail<E>(grad_x + i, r, Isa::mul(vkx, d));
    }
  }
  return 0.0f;
}

// Non-template entry points, defined here (inside the ISA's target region) so that every
// instantiation is compiled for that ISA.
#define AG_ROW(E, S)                                                                                    \
  void row_norm_##E(const S* r, int64_t V, float t, float* sh, float* ls) { row_norm_impl<E>(r, V, t, sh, ls); } \
  void row_grad_##E(const S* r, int64_t V, float t, float sh, float ls, int64_t tok, float c, S* o) {          \
    row_grad_impl<E>(r, V, t, sh, ls, tok, c, o);                                                              \
  }                                                                                                            \
  float sde_step_##E(const S* x, const S* v, const S* vu, float g, const S* nz, float a, float b, float sc,     \
                     S* xn, S* mn, int64_t n) {                                                                \
    return sde_step_fn<E>(x, v, vu, g, nz, a, b, sc, xn, mn, n);                                               \
  }                                                                                                            \
  float sde_sq_##E(const S* x, const S* v, const S* xn, float a, float b, int64_t n) {                         \
    return sde_sq_fn<E>(x, v, xn, a, b, n);                                                                    \
  }                                                                                                            \
  float sde_bwd_##E(const S* x, const S* v, const S* xn, float a, float b, float kv, float kx, S* gv, S* gx,    \
                    int64_t n) {                                                                               \
    return sde_bwd_fn<E>(x, v, xn, a, b, kv, kx, gv, gx, n);                                                   \
  }
AG_ROW(kF32, float)
AG_ROW(kBF16, uint16_t)
AG_ROW(kF16, uint16_t)
#undef AG_ROW

}  // namespace
}  // namespace alphagrpo
