// Host-side helpers shared by the CPU kernels and the torch glue: argument checks with messages
// that name the argument, a dtype dispatcher written as a template (no macro pile), and a
// vectorisable exp.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace alphagrpo {

// ---- argument checks --------------------------------------------------------------------------
inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating tensor (float32, float64, float16 or bfloat16), got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(),
                    ", got ", t.sizes());
}

inline void check_per_sample(const at::Tensor& t, int64_t batch, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, name, " must have shape [", batch,
                    "] (one value per sample), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t.scalar_type());
}

inline void check_choice(const std::string& value, std::initializer_list<const char*> choices, const char* name) {
  for (const char* c : choices) {
    if (value == c) return;
  }
  std::string valid;
  for (const char* c : choices) valid += std::string(valid.empty() ? "" : ", ") + c;
  TORCH_CHECK_VALUE(false, name, " must be one of {", valid, "}, got '", value, "'");
}

// ---- dtype dispatch ---------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

// Accumulation type: double for double inputs, float for everything else.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls fn(TypeTag<T>{}) with T the C++ type of `dtype` (float, double, c10::Half, c10::BFloat16).
template <typename Fn>
decltype(auto) dispatch_floating(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(TypeTag<float>{});
    case at::kDouble: return fn(TypeTag<double>{});
    case at::kHalf: return fn(TypeTag<c10::Half>{});
    case at::kBFloat16: return fn(TypeTag<c10::BFloat16>{});
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", dtype);
  }
}

// ---- math -------------------------------------------------------------------------------------
constexpr double kLogSqrt2Pi = 0.91893853320467274178;  // 0.5 * log(2 pi)

// exp(x) for float, written so that GCC vectorises the loops that call it (no libm call):
// Cody-Waite range reduction and a degree-6 polynomial, within a few ulp over the range used;
// inputs are clamped to [-87.3, 88.3] (results below 2^-126 flush to about 1e-38, never inf).
inline float fast_expf(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // round to nearest by the 1.5 * 2^23 trick (plain arithmetic, so loops vectorise; |x log2 e| < 2^22)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693145751953125f;   // ln2, high part
  r = r - n * 1.428606765330187045e-06f;  // ln2, low part
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float fast_exp(float x) { return fast_expf(x); }
inline double fast_exp(double x) { return std::exp(x); }

// Element access in the accumulation type. bfloat16 goes through its bits as uint16_t (the same
// round-to-nearest-even as c10::BFloat16) so that loops over bf16 vectorise.
template <typename T>
inline acc_t<T> load_acc(const T* p, int64_t i) {
  return static_cast<acc_t<T>>(p[i]);
}
inline float load_acc(const c10::BFloat16* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline void store_acc(T* p, int64_t i, acc_t<T> v) {
  p[i] = static_cast<T>(v);
}
inline void store_acc(c10::BFloat16* p, int64_t i, float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
}

constexpr int kLanes = 16;  // independent accumulators: vectorisable without -ffast-math, and more accurate

// Sum over i in [lo, hi) of f(i)^2 with kLanes accumulators combined pairwise. f may have side
// effects (write outputs): the loop stays vectorisable.
template <typename A, typename F>
inline __attribute__((always_inline)) A lane_sum_sq(int64_t lo, int64_t hi, F&& f) {
  A acc[kLanes] = {};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const A d = f(i + j);
      acc[j] += d * d;
    }
  }
  for (; i < hi; ++i) {
    const A d = f(i);
    acc[0] += d * d;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

}  // namespace alphagrpo
