// Device helpers shared by the CUDA kernels: dtype traits, 16-byte packs, block reductions and
// the per-sample SDE coefficients. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "alphagrpo/cuda_launch.h"

namespace alphagrpo {
namespace dev {

// Accumulation type: double for double, float otherwise.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements of T in one 16-byte (or smaller) aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};
template <typename T> constexpr int vec_width() { return 16 / sizeof(T); }

// Sum over a block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename A>
__device__ __forceinline__ A block_sum(A value, A* shared /* [32] */) {
  for (int o = 16; o > 0; o >>= 1) value += __shfl_xor_sync(0xffffffffu, value, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  value = lane < warps ? shared[lane] : A(0);
  for (int o = 16; o > 0; o >>= 1) value += __shfl_xor_sync(0xffffffffu, value, o);
  return value;
}

// Per-sample SDE coefficients (see reference.sde_coefficients): mean = a x + b v, x_next = mean + scale * noise.
template <typename A>
struct SdeCoef {
  A a, b, std, scale;
};

template <typename A>
__device__ __forceinline__ SdeCoef<A> sde_coef(A sigma, A sigma_next, A noise_level, A sigma_max) {
  const A dt = sigma_next - sigma;
  const A s = sigma == A(1) ? sigma_max : sigma;
  const A std_ = noise_level * sqrt(sigma / (A(1) - s));
  SdeCoef<A> c;
  c.a = A(1) + std_ * std_ / (A(2) * sigma) * dt;
  c.b = (A(1) + std_ * std_ * (A(1) - sigma) / (A(2) * sigma)) * dt;
  c.std = std_;
  c.scale = std_ * sqrt(-dt);
  return c;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Calls fn(std::integral_constant<int, VEC>{}) with the widest pack (16 bytes) when every size is
// a multiple of it and every pointer 16-byte aligned, else with VEC = 1.
template <typename T, typename Fn>
auto with_vec(std::initializer_list<int64_t> sizes, std::initializer_list<const void*> ptrs, Fn&& fn) {
  constexpr int W = vec_width<T>();
  bool ok = true;
  for (int64_t s : sizes) ok = ok && s % W == 0;
  for (const void* p : ptrs) ok = ok && aligned16(p);
  if (ok) return fn(std::integral_constant<int, W>{});
  return fn(std::integral_constant<int, 1>{});
}

}  // namespace dev

// Calls fn(T{}) with T the CUDA type for dtype.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat64: return fn(double{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace alphagrpo
