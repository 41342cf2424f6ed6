// The CPU loops of cpu_kernels.h in portable C++ (the fallback for x86-64 CPUs without AVX2 and
// for other architectures): two passes over a row (max, then sum of exponentials) with kLanes
// independent accumulators that the compiler may vectorise for the baseline ISA.
#include "alphagrpo/cpu_common.h"
#include "alphagrpo/cpu_kernels.h"

namespace alphagrpo {
namespace {

template <typename T>
void row_norm_t(const T* row, int64_t V, float inv_temp, float* shift_out, float* log_sum_out) {  // row: [V]
  float mx[kLanes];
  for (int j = 0; j < kLanes; ++j) mx[j] = -3.4028234663852886e38f;
  int64_t v = 0;
  bool nan = false;
  for (; v + kLanes <= V; v += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float z = load_acc(row, v + j);
      nan |= z != z;
      mx[j] = z > mx[j] ? z : mx[j];
    }
  }
  for (; v < V; ++v) {
    const float z = load_acc(row, v);
    nan |= z != z;
    mx[0] = z > mx[0] ? z : mx[0];
  }
  float m = mx[0];
  for (int j = 1; j < kLanes; ++j) m = mx[j] > m ? mx[j] : m;
  const float shift = m * inv_temp;
  float sum[kLanes] = {};
  v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    for (int j = 0; j < kLanes; ++j) sum[j] += fast_expf(load_acc(row, v + j) * inv_temp - shift);
  }
  for (; v < V; ++v) sum[0] += fast_expf(load_acc(row, v) * inv_temp - shift);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) sum[j] += sum[j + w];
  }
  *shift_out = shift;
  *log_sum_out = (nan || !(m > -3.4028234663852886e38f)) ? NAN : std::log(sum[0]);
}

template <typename T>
void row_grad_t(const T* row, int64_t V, float inv_temp, float shift, float log_sum, int64_t token, float coef,
                T* out) {  // row, out: [V]; out may be row
  if (coef == 0.0f) {
    std::memset(static_cast<void*>(out), 0, static_cast<size_t>(V) * sizeof(T));
    return;
  }
  const float k = -coef * inv_temp;
  const float x_tok = load_acc(row, token);
  for (int64_t v = 0; v < V; ++v) store_acc(out, v, k * fast_expf((load_acc(row, v) * inv_temp - shift) - log_sum));
  store_acc(out, token, k * (fast_expf((x_tok * inv_temp - shift) - log_sum) - 1.0f));
}

template <typename T>
float sde_step_t(const T* x, const T* v, const T* vu, float g, const T* noise, float a, float b, float scale,
                 T* x_next, T* mean, int64_t n) {
  auto body = [&](auto cfg) {
    return lane_sum_sq<float>(0, n, [&](int64_t i) {
      float vel = load_acc(v, i);
      if constexpr (decltype(cfg)::value) vel = load_acc(vu, i) + g * (vel - load_acc(vu, i));
      const float m = a * load_acc(x, i) + b * vel;
      const float xn = m + scale * load_acc(noise, i);
      store_acc(x_next, i, xn);
      store_acc(mean, i, m);
      return xn - m;
    });
  };
  return vu ? body(std::true_type{}) : body(std::false_type{});
}

template <typename T>
float sde_sq_t(const T* x, const T* v, const T* x_next, float a, float b, int64_t n) {
  return lane_sum_sq<float>(0, n, [&](int64_t i) { return load_acc(x_next, i) - (a * load_acc(x, i) + b * load_acc(v, i)); });
}

template <typename T>
float sde_bwd_t(const T* x, const T* v, const T* x_next, float a, float b, float kv, float kx, T* grad_v, T* grad_x,
                int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = load_acc(x_next, i) - (a * load_acc(x, i) + b * load_acc(v, i));
    store_acc(grad_v, i, kv * d);
    if (grad_x) store_acc(grad_x, i, kx * d);
  }
  return 0.0f;
}

// Entry points over the storage types of the table (16-bit kinds as raw bits).
template <typename T, typename S>
RowFns<S> row_fns() {
  return {[](const S* r, int64_t V, float t, float* sh, float* ls) { row_norm_t(reinterpret_cast<const T*>(r), V, t, sh, ls); },
          [](const S* r, int64_t V, float t, float sh, float ls, int64_t tok, float c, S* o) {
            row_grad_t(reinterpret_cast<const T*>(r), V, t, sh, ls, tok, c, reinterpret_cast<T*>(o));
          }};
}

template <typename T, typename S>
SdeFns<S> sde_fns() {
  return {[](const S* x, const S* v, const S* vu, float g, const S* nz, float a, float b, float sc, S* xn, S* mn,
             int64_t n) {
            return sde_step_t(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(v),
                              reinterpret_cast<const T*>(vu), g, reinterpret_cast<const T*>(nz), a, b, sc,
                              reinterpret_cast<T*>(xn), reinterpret_cast<T*>(mn), n);
          },
          [](const S* x, const S* v, const S* xn, float a, float b, int64_t n) {
            return sde_sq_t(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(v),
                            reinterpret_cast<const T*>(xn), a, b, n);
          },
          [](const S* x, const S* v, const S* xn, float a, float b, float kv, float kx, S* gv, S* gx, int64_t n) {
            return sde_bwd_t(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(v),
                             reinterpret_cast<const T*>(xn), a, b, kv, kx, reinterpret_cast<T*>(gv),
                             reinterpret_cast<T*>(gx), n);
          }};
}

}  // namespace

const CpuKernels* cpu_kernels_scalar() {
  static const CpuKernels table = {
      "scalar",
      row_fns<float, float>(),
      row_fns<c10::BFloat16, uint16_t>(),
      row_fns<c10::Half, uint16_t>(),
      sde_fns<float, float>(),
      sde_fns<c10::BFloat16, uint16_t>(),
      sde_fns<c10::Half, uint16_t>(),
  };
  return &table;
}

}  // namespace alphagrpo
