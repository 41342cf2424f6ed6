// CUDA kernels of the flow-matching SDE step and its log-probability (forward and backward).
// One pass over memory with 16-byte accesses where sizes and pointers allow; per-sample sums
// of squares go to per-block partials, finished in a fixed order (deterministic).
#include "alphagrpo/cuda_common.cuh"

namespace alphagrpo {
namespace dev {

constexpr int kThreads = 256;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p, int64_t i) {
  return reinterpret_cast<const Pack<T, VEC>*>(p)[i];
}
template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, int64_t i, const Pack<T, VEC>& v) {
  reinterpret_cast<Pack<T, VEC>*>(p)[i] = v;
}

// grid (blocks_per_sample, B); each block strides over its sample's packs.
template <typename T, int VEC, bool CFG>
__global__ void __launch_bounds__(kThreads) sde_step_kernel(
    const T* __restrict__ x,          // [B, D]
    const T* __restrict__ v,          // [B, D]
    const T* __restrict__ v_uncond,   // [B, D] (read only when CFG)
    acc_t<T> cfg_scale,
    const T* __restrict__ noise,      // [B, D]
    const acc_t<T>* __restrict__ sigma,       // [B]
    const acc_t<T>* __restrict__ sigma_next,  // [B]
    acc_t<T> noise_level, acc_t<T> sigma_max,
    T* __restrict__ x_next,           // [B, D]
    T* __restrict__ mean_out,         // [B, D]
    double* __restrict__ partial,     // [B, gridDim.x]
    int64_t D) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const int64_t b = blockIdx.y;
  const SdeCoef<A> c = sde_coef<A>(sigma[b], sigma_next[b], noise_level, sigma_max);
  const int64_t n_packs = D / VEC, base = b * n_packs;
  A ss = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_packs; i += int64_t(gridDim.x) * blockDim.x) {
    const auto xp = load<T, VEC>(x, base + i);
    const auto vp = load<T, VEC>(v, base + i);
    const auto np = load<T, VEC>(noise, base + i);
    Pack<T, VEC> up;
    if constexpr (CFG) up = load<T, VEC>(v_uncond, base + i);
    Pack<T, VEC> xn_p, m_p;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A vel = to_acc(vp.v[j]);
      if constexpr (CFG) {
        const A u = to_acc(up.v[j]);
        vel = u + cfg_scale * (vel - u);
      }
      const A m = c.a * to_acc(xp.v[j]) + c.b * vel;
      const A xn = m + c.scale * to_acc(np.v[j]);
      const A d = xn - m;
      ss += d * d;
      xn_p.v[j] = from_acc<T>(xn);
      m_p.v[j] = from_acc<T>(m);
    }
    store<T, VEC>(x_next, base + i, xn_p);
    store<T, VEC>(mean_out, base + i, m_p);
  }
  ss = block_sum<A>(ss, red);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = static_cast<double>(ss);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) sde_sumsq_kernel(
    const T* __restrict__ x,       // [B, D]
    const T* __restrict__ v,       // [B, D]
    const T* __restrict__ x_next,  // [B, D]
    const acc_t<T>* __restrict__ sigma, const acc_t<T>* __restrict__ sigma_next,  // [B]
    acc_t<T> noise_level, acc_t<T> sigma_max,
    double* __restrict__ partial,  // [B, gridDim.x]
    int64_t D) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const int64_t b = blockIdx.y;
  const SdeCoef<A> c = sde_coef<A>(sigma[b], sigma_next[b], noise_level, sigma_max);
  const int64_t n_packs = D / VEC, base = b * n_packs;
  A ss = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_packs; i += int64_t(gridDim.x) * blockDim.x) {
    const auto xp = load<T, VEC>(x, base + i);
    const auto vp = load<T, VEC>(v, base + i);
    const auto np = load<T, VEC>(x_next, base + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = to_acc(np.v[j]) - (c.a * to_acc(xp.v[j]) + c.b * to_acc(vp.v[j]));
      ss += d * d;
    }
  }
  ss = block_sum<A>(ss, red);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = static_cast<double>(ss);
}

// One thread per sample: log_prob = -sum / (2 scale^2 D) - log(scale) - log sqrt(2 pi); 0 when scale == 0.
template <typename A>
__global__ void sde_finish_kernel(const double* __restrict__ partial,  // [B, n_partials]
                                  const A* __restrict__ sigma, const A* __restrict__ sigma_next,  // [B]
                                  A noise_level, A sigma_max,
                                  A* __restrict__ std_out,   // [B] (nullable)
                                  A* __restrict__ log_prob,  // [B]
                                  int64_t B, int64_t n_partials, int64_t D) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  const SdeCoef<A> c = sde_coef<A>(sigma[b], sigma_next[b], noise_level, sigma_max);
  if (std_out) std_out[b] = c.std;
  if (!(c.scale > A(0))) {
    log_prob[b] = A(0);
    return;
  }
  double ss = 0;
  for (int64_t i = 0; i < n_partials; ++i) ss += partial[b * n_partials + i];
  const double sc = static_cast<double>(c.scale);
  log_prob[b] = static_cast<A>(-ss / (2.0 * sc * sc * static_cast<double>(D)) - log(sc) - kLogSqrt2Pi);
}

// d lp_b / d mean_i = (x_next_i - mean_i) / (scale_b^2 D); grad_v = g b dmean, grad_x = g a dmean.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) sde_logprob_backward_kernel(
    const acc_t<T>* __restrict__ grad,  // [B]
    const T* __restrict__ x, const T* __restrict__ v, const T* __restrict__ x_next,  // [B, D]
    const acc_t<T>* __restrict__ sigma, const acc_t<T>* __restrict__ sigma_next,      // [B]
    acc_t<T> noise_level, acc_t<T> sigma_max,
    T* __restrict__ grad_v,  // [B, D]
    T* __restrict__ grad_x,  // [B, D] (nullable)
    int64_t D) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.y;
  const SdeCoef<A> c = sde_coef<A>(sigma[b], sigma_next[b], noise_level, sigma_max);
  const A k = c.scale > A(0) ? grad[b] / (c.scale * c.scale * static_cast<A>(D)) : A(0);
  const A kv = k * c.b, kx = k * c.a;
  const int64_t n_packs = D / VEC, base = b * n_packs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_packs; i += int64_t(gridDim.x) * blockDim.x) {
    const auto xp = load<T, VEC>(x, base + i);
    const auto vp = load<T, VEC>(v, base + i);
    const auto np = load<T, VEC>(x_next, base + i);
    Pack<T, VEC> gv, gx;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = to_acc(np.v[j]) - (c.a * to_acc(xp.v[j]) + c.b * to_acc(vp.v[j]));
      gv.v[j] = from_acc<T>(kv * d);
      gx.v[j] = from_acc<T>(kx * d);
    }
    store<T, VEC>(grad_v, base + i, gv);
    if (grad_x) store<T, VEC>(grad_x, base + i, gx);
  }
}

// Blocks per sample: enough to fill the GPU for one sample, few enough to keep partials small.
inline int blocks_per_sample(int64_t B, int64_t D) {
  const int64_t want = ceil_div(D, int64_t(kThreads) * 8);
  const int64_t cap = B >= 512 ? 4 : 2048 / B + 1;
  return static_cast<int>(want < 1 ? 1 : (want > cap ? cap : want));
}

}  // namespace dev

int64_t flow_sde_partials(int64_t B, int64_t D) { return dev::blocks_per_sample(B, D); }

cudaError_t launch_flow_sde_step(DType dtype, const void* x, const void* v, const void* v_uncond, double cfg_scale,
                                 const void* noise, const void* sigma, const void* sigma_next, double noise_level,
                                 double sigma_max, void* x_next, void* mean, void* std_out, void* log_prob,
                                 double* workspace, int64_t B, int64_t D, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = dev::acc_t<T>;
    const int nblk = dev::blocks_per_sample(B, D);
    const dim3 grid(nblk, static_cast<unsigned>(B));
    auto* s = static_cast<const A*>(sigma);
    auto* sn = static_cast<const A*>(sigma_next);
    cudaError_t err = dev::with_vec<T>({D}, {x, v, v_uncond, noise, x_next, mean}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      if (v_uncond) {
        dev::sde_step_kernel<T, VEC, true><<<grid, dev::kThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(v), static_cast<const T*>(v_uncond), A(cfg_scale),
            static_cast<const T*>(noise), s, sn, A(noise_level), A(sigma_max), static_cast<T*>(x_next),
            static_cast<T*>(mean), workspace, D);
      } else {
        dev::sde_step_kernel<T, VEC, false><<<grid, dev::kThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(v), nullptr, A(cfg_scale), static_cast<const T*>(noise),
            s, sn, A(noise_level), A(sigma_max), static_cast<T*>(x_next), static_cast<T*>(mean), workspace, D);
      }
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
    dev::sde_finish_kernel<A><<<dev::ceil_div(B, 128), 128, 0, stream>>>(
        workspace, s, sn, A(noise_level), A(sigma_max), static_cast<A*>(std_out), static_cast<A*>(log_prob), B, nblk, D);
    return cudaGetLastError();
  });
}

cudaError_t launch_flow_sde_logprob(DType dtype, const void* x, const void* v, const void* x_next, const void* sigma,
                                    const void* sigma_next, double noise_level, double sigma_max, void* log_prob,
                                    double* workspace, int64_t B, int64_t D, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = dev::acc_t<T>;
    const int nblk = dev::blocks_per_sample(B, D);
    const dim3 grid(nblk, static_cast<unsigned>(B));
    auto* s = static_cast<const A*>(sigma);
    auto* sn = static_cast<const A*>(sigma_next);
    cudaError_t err = dev::with_vec<T>({D}, {x, v, x_next}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      dev::sde_sumsq_kernel<T, VEC><<<grid, dev::kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(v), static_cast<const T*>(x_next), s, sn, A(noise_level),
          A(sigma_max), workspace, D);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
    dev::sde_finish_kernel<A><<<dev::ceil_div(B, 128), 128, 0, stream>>>(
        workspace, s, sn, A(noise_level), A(sigma_max), nullptr, static_cast<A*>(log_prob), B, nblk, D);
    return cudaGetLastError();
  });
}

cudaError_t launch_flow_sde_logprob_backward(DType dtype, const void* grad, const void* x, const void* v,
                                             const void* x_next, const void* sigma, const void* sigma_next,
                                             double noise_level, double sigma_max, void* grad_v, void* grad_x,
                                             int64_t B, int64_t D, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = dev::acc_t<T>;
    const dim3 grid(dev::blocks_per_sample(B, D), static_cast<unsigned>(B));
    return dev::with_vec<T>({D}, {x, v, x_next, grad_v, grad_x}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      dev::sde_logprob_backward_kernel<T, VEC><<<grid, dev::kThreads, 0, stream>>>(
          static_cast<const A*>(grad), static_cast<const T*>(x), static_cast<const T*>(v),
          static_cast<const T*>(x_next), static_cast<const A*>(sigma), static_cast<const A*>(sigma_next),
          A(noise_level), A(sigma_max), static_cast<T*>(grad_v), static_cast<T*>(grad_x), D);
      return cudaGetLastError();
    });
  });
}

}  // namespace alphagrpo
