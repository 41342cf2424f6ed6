// CPU kernels of the flow-matching SDE step and its log-probability (forward and backward).
// One pass over memory: each element of every input is read once and each output written once;
// per-sample log-prob sums are reduced from fixed-size chunks in a fixed order, so results do
// not depend on the number of threads.
#include <ATen/Parallel.h>

#include <vector>

#include "alphagrpo/cpu_common.h"
#include "alphagrpo/cpu_kernels.h"
#include "alphagrpo/ops.h"

namespace alphagrpo {
namespace {

constexpr int64_t kChunk = 16384;  // elements per parallel work item

// The vectorised element loops (cpu_kernels.h) for float32 and the 16-bit types; nullptr for
// float64, which runs the scalar loops below.
template <typename T>
const SdeFns<std::conditional_t<std::is_same_v<T, float>, float, uint16_t>>* simd_sde() {
  if constexpr (std::is_same_v<T, float>) return &cpu_kernels().sde_f32;
  else if constexpr (std::is_same_v<T, c10::BFloat16>) return &cpu_kernels().sde_bf16;
  else if constexpr (std::is_same_v<T, c10::Half>) return &cpu_kernels().sde_f16;
  else return nullptr;
}

template <typename T>
auto bits(T* p) {  // the table's storage type for T
  using S = std::conditional_t<std::is_same_v<std::remove_const_t<T>, float>, float, uint16_t>;
  using R = std::conditional_t<std::is_const_v<T>, const S*, S*>;
  return reinterpret_cast<R>(p);
}

// Per-sample coefficients: mean = a x + b v, x_next = mean + scale * noise.
template <typename A>
struct SdeCoef {
  std::vector<A> a, b, std, scale;
};

template <typename A>
SdeCoef<A> sde_coefficients(const Tensor& sigma_t, const Tensor& sigma_next_t, double noise_level, double sigma_max) {
  const auto B = sigma_t.size(0);
  auto sig = sigma_t.to(at::kDouble).contiguous();
  auto sig_next = sigma_next_t.to(at::kDouble).contiguous();
  const double* s_ptr = sig.data_ptr<double>();
  const double* sn_ptr = sig_next.data_ptr<double>();
  SdeCoef<A> c;
  c.a.resize(B), c.b.resize(B), c.std.resize(B), c.scale.resize(B);
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(s_ptr[i]) && s_ptr[i] > 0.0 && s_ptr[i] <= 1.0, "sigma must be in (0, 1], got ",
                      s_ptr[i], " for sample ", i);
    TORCH_CHECK_VALUE(std::isfinite(sn_ptr[i]) && sn_ptr[i] >= 0.0 && sn_ptr[i] < s_ptr[i],
                      "sigma_next must be in [0, sigma), got sigma_next=", sn_ptr[i], " sigma=", s_ptr[i],
                      " for sample ", i);
    // The spec computes in the accumulation type; so do we.
    const A sigma = static_cast<A>(s_ptr[i]);
    const A dt = static_cast<A>(sn_ptr[i]) - sigma;
    const A s = sigma == A(1) ? static_cast<A>(sigma_max) : sigma;
    const A std_ = static_cast<A>(noise_level) * std::sqrt(sigma / (A(1) - s));
    c.a[i] = A(1) + std_ * std_ / (A(2) * sigma) * dt;
    c.b[i] = (A(1) + std_ * std_ * (A(1) - sigma) / (A(2) * sigma)) * dt;
    c.std[i] = std_;
    c.scale[i] = std_ * std::sqrt(-dt);
  }
  return c;
}

// Finishes the per-sample log-prob from chunk partial sums of (x_next - mean)^2.
template <typename A>
void finish_logprob(const std::vector<double>& partial, int64_t B, int64_t n_chunks, int64_t D,
                    const std::vector<A>& scale, A* out) {
  for (int64_t b = 0; b < B; ++b) {
    if (!(scale[b] > A(0))) {
      out[b] = A(0);  // deterministic step: no density (the ODE limit)
      continue;
    }
    double ss = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) ss += partial[b * n_chunks + c];
    const double sc = static_cast<double>(scale[b]);
    TORCH_CHECK_VALUE(std::isfinite(ss), "the inputs of sample ", b, " contain non-finite values (NaN or inf)");
    out[b] = static_cast<A>(-ss / (2.0 * sc * sc * static_cast<double>(D)) - std::log(sc) - kLogSqrt2Pi);
  }
}

// Runs fn(b, lo, hi, w) in parallel over fixed-size chunks [lo, hi) of each sample b's flat
// elements; w in [0, B * n_chunks) indexes per-chunk partial results. Returns n_chunks.
template <typename Fn>
int64_t for_each_chunk(int64_t B, int64_t D, Fn&& fn) {
  const int64_t n_chunks = (D + kChunk - 1) / kChunk;
  at::parallel_for(0, B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / n_chunks;
      const int64_t lo = b * D + (w % n_chunks) * kChunk;
      fn(b, lo, std::min(lo + kChunk, (b + 1) * D), w);
    }
  });
  return n_chunks;
}

template <typename T, bool CFG>
void sde_step_impl(const T* x, const T* v, const T* vu, double cfg_scale, const T* noise, const SdeCoef<acc_t<T>>& c,
                   T* x_next, T* mean_out, acc_t<T>* log_prob, int64_t B, int64_t D) {
  using A = acc_t<T>;
  std::vector<double> partial(B * ((D + kChunk - 1) / kChunk), 0.0);
  const A g = static_cast<A>(cfg_scale);
  const auto* simd = simd_sde<T>();
  const int64_t n_chunks = for_each_chunk(B, D, [&](int64_t b, int64_t lo, int64_t hi, int64_t w) {
    const A a = c.a[b], bb = c.b[b], sc = c.scale[b];
    if constexpr (!std::is_same_v<T, double>) {
      // one pass: CFG combine, mean, x_next and the squared deviation, vectorised
      partial[w] = simd->step(bits(x + lo), bits(v + lo), CFG ? bits(vu + lo) : nullptr, g, bits(noise + lo), a, bb,
                              sc, bits(x_next + lo), bits(mean_out + lo), hi - lo);
      return;
    }
    partial[w] = static_cast<double>(lane_sum_sq<A>(lo, hi, [&](int64_t i) {
      A vel = load_acc(v, i);
      if constexpr (CFG) vel = load_acc(vu, i) + g * (vel - load_acc(vu, i));
      const A m = a * load_acc(x, i) + bb * vel;
      const A xn = m + sc * load_acc(noise, i);
      store_acc(x_next, i, xn);
      store_acc(mean_out, i, m);
      return xn - m;
    }));
  });
  finish_logprob(partial, B, n_chunks, D, c.scale, log_prob);
}

template <typename T>
void sde_logprob_impl(const T* x, const T* v, const T* x_next, const SdeCoef<acc_t<T>>& c, acc_t<T>* log_prob,
                      int64_t B, int64_t D) {
  using A = acc_t<T>;
  std::vector<double> partial(B * ((D + kChunk - 1) / kChunk), 0.0);
  const int64_t n_chunks = for_each_chunk(B, D, [&](int64_t b, int64_t lo, int64_t hi, int64_t w) {
    const A a = c.a[b], bb = c.b[b];
    if constexpr (!std::is_same_v<T, double>) {
      partial[w] = simd_sde<T>()->sq(bits(x + lo), bits(v + lo), bits(x_next + lo), a, bb, hi - lo);
      return;
    }
    partial[w] = static_cast<double>(lane_sum_sq<A>(
        lo, hi, [&](int64_t i) { return load_acc(x_next, i) - (a * load_acc(x, i) + bb * load_acc(v, i)); }));
  });
  finish_logprob(partial, B, n_chunks, D, c.scale, log_prob);
}

// d lp_b / d mean_i = (x_next_i - mean_i) / (scale_b^2 D); mean = a x + b v.
template <typename T>
void sde_logprob_backward_impl(const acc_t<T>* grad, const T* x, const T* v, const T* x_next,
                               const SdeCoef<acc_t<T>>& c, T* grad_v, T* grad_x, int64_t B, int64_t D) {
  using A = acc_t<T>;
  for_each_chunk(B, D, [&](int64_t b, int64_t lo, int64_t hi, int64_t) {
    const A a = c.a[b], bb = c.b[b], sc = c.scale[b];
    const A k = sc > A(0) ? grad[b] / (sc * sc * static_cast<A>(D)) : A(0);
    const A kv = k * bb, kx = k * a;
    if constexpr (!std::is_same_v<T, double>) {
      simd_sde<T>()->bwd(bits(x + lo), bits(v + lo), bits(x_next + lo), a, bb, kv, kx, bits(grad_v + lo),
                         grad_x ? bits(grad_x + lo) : nullptr, hi - lo);
      return;
    }
    for (int64_t i = lo; i < hi; ++i) {
      const A d = load_acc(x_next, i) - (a * load_acc(x, i) + bb * load_acc(v, i));
      store_acc(grad_v, i, kv * d);
      if (grad_x) store_acc(grad_x, i, kx * d);
    }
  });
}

}  // namespace

Tensor4 flow_sde_step_cpu(const Tensor& x, const Tensor& v, const std::optional<Tensor>& v_uncond, double cfg_scale,
                          const Tensor& sigma, const Tensor& sigma_next, double noise_level, double sigma_max,
                          const Tensor& noise) {
  validate_flow_sde(x, {{&v, "v"}, {&noise, "noise"}, {v_uncond ? &*v_uncond : nullptr, "v_uncond"}}, sigma, sigma_next,
                    noise_level, sigma_max);
  const auto B = x.size(0);
  const auto D = x.numel() / B;
  auto xc = x.contiguous(), vc = v.contiguous(), nc = noise.contiguous();
  Tensor vuc = v_uncond ? v_uncond->contiguous() : Tensor();
  auto x_next = at::empty_like(xc);
  auto mean = at::empty_like(xc);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto std_out = at::empty({B}, x.options().dtype(acc));
  auto log_prob = at::empty({B}, x.options().dtype(acc));
  dispatch_floating(x.scalar_type(), "flow_sde_step", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto c = sde_coefficients<A>(sigma, sigma_next, noise_level, sigma_max);
    std::copy(c.std.begin(), c.std.end(), std_out.data_ptr<A>());
    if (v_uncond) {
      sde_step_impl<T, true>(xc.data_ptr<T>(), vc.data_ptr<T>(), vuc.data_ptr<T>(), cfg_scale, nc.data_ptr<T>(), c,
                             x_next.data_ptr<T>(), mean.data_ptr<T>(), log_prob.data_ptr<A>(), B, D);
    } else {
      sde_step_impl<T, false>(xc.data_ptr<T>(), vc.data_ptr<T>(), nullptr, cfg_scale, nc.data_ptr<T>(), c,
                              x_next.data_ptr<T>(), mean.data_ptr<T>(), log_prob.data_ptr<A>(), B, D);
    }
  });
  return {x_next, mean, std_out, log_prob};
}

Tensor flow_sde_logprob_cpu(const Tensor& x, const Tensor& v, const Tensor& x_next, const Tensor& sigma,
                            const Tensor& sigma_next, double noise_level, double sigma_max) {
  validate_flow_sde(x, {{&v, "v"}, {&x_next, "x_next"}}, sigma, sigma_next, noise_level, sigma_max);
  const auto B = v.size(0);
  const auto D = v.numel() / B;
  auto xc = x.contiguous(), vc = v.contiguous(), xnc = x_next.contiguous();
  const auto acc = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto log_prob = at::empty({B}, v.options().dtype(acc));
  dispatch_floating(v.scalar_type(), "flow_sde_logprob", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto c = sde_coefficients<A>(sigma, sigma_next, noise_level, sigma_max);
    sde_logprob_impl<T>(xc.data_ptr<T>(), vc.data_ptr<T>(), xnc.data_ptr<T>(), c, log_prob.data_ptr<A>(), B, D);
  });
  return log_prob;
}

std::tuple<Tensor, Tensor> flow_sde_logprob_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& v,
                                                         const Tensor& x_next, const Tensor& sigma,
                                                         const Tensor& sigma_next, double noise_level,
                                                         double sigma_max, bool need_grad_x) {
  validate_flow_sde(x, {{&v, "v"}, {&x_next, "x_next"}}, sigma, sigma_next, noise_level, sigma_max);
  const auto B = v.size(0);
  const auto D = v.numel() / B;
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == B, "grad must be [", B, "], got ", grad.sizes());
  auto xc = x.contiguous(), vc = v.contiguous(), xnc = x_next.contiguous();
  auto grad_v = at::empty_like(vc);
  auto grad_x = need_grad_x ? at::empty_like(xc) : at::empty({0}, v.options());
  dispatch_floating(v.scalar_type(), "flow_sde_logprob_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto c = sde_coefficients<A>(sigma, sigma_next, noise_level, sigma_max);
    auto g = grad.to(v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
    sde_logprob_backward_impl<T>(g.data_ptr<A>(), xc.data_ptr<T>(), vc.data_ptr<T>(), xnc.data_ptr<T>(), c,
                                 grad_v.data_ptr<T>(), need_grad_x ? grad_x.data_ptr<T>() : nullptr, B, D);
  });
  return {grad_v, grad_x};
}

}  // namespace alphagrpo
