// CUDA kernels of the GRPO losses.
//  - token loss: (1) one block per row: online log-sum-exp over the vocabulary -> normaliser and
//    the sampled token's log-prob; (2) one block over all tokens: ratios, clipping, KL, aggregation
//    weights, loss, metrics and d loss / d logp; (3) one block per row: the gradient w.r.t. the
//    logits in their dtype. No float32 log-softmax is materialised; logits are read twice and the
//    gradient written once. launch_token_rows runs the same row kernels on one chunk of
//    grpo_linear_token_loss (per-row aggregation weights given; the gradient written in place).
//  - advantages and the Flow-GRPO step loss: one small single-block kernel each.
#include "alphagrpo/cuda_common.cuh"
#include "alphagrpo/grpo_math.h"

namespace alphagrpo {
namespace dev {

constexpr int kRowThreads = 256;
constexpr int kReduceThreads = 1024;

// Combines two (max, sum of exp(z - max)) pairs.
template <typename A>
__device__ __forceinline__ void lse_combine(A& m, A& s, A m2, A s2) {
  if (m2 > m) {
    s = s * exp(m - m2) + s2;
    m = m2;
  } else if (m2 > -INFINITY) {
    s = s + s2 * exp(m2 - m);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) token_norm_kernel(
    const T* __restrict__ logits,        // [N, row_stride] (first V of each row used)
    const int64_t* __restrict__ tokens,  // [N]
    int64_t V, int64_t row_stride, acc_t<T> inv_temp,
    acc_t<T>* __restrict__ shift,        // [N], stride ns
    acc_t<T>* __restrict__ log_sum,      // [N], stride ns
    int64_t ns,
    acc_t<T>* __restrict__ logp,         // [N]
    int* __restrict__ error_flag) {      // [1]
  using A = acc_t<T>;
  __shared__ A sm[32], ss[32];
  const int64_t n = blockIdx.x;
  const T* row = logits + n * row_stride;
  A m = -INFINITY, s = 0;
  for (int64_t i = threadIdx.x; i < V / VEC; i += blockDim.x) {
    const auto p = reinterpret_cast<const Pack<T, VEC>*>(row)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) lse_combine<A>(m, s, to_acc(p.v[j]) * inv_temp, A(1));
  }
  // warp, then block combine of (m, s)
  for (int o = 16; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_combine<A>(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    m = lane < warps ? sm[lane] : A(-INFINITY);
    s = lane < warps ? ss[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) {
      const A m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      lse_combine<A>(m, s, m2, s2);
    }
    if (lane == 0) {
      int64_t tok = tokens[n];
      const bool bad_token = tok < 0 || tok >= V;
      const A ls = log(s);
      if (bad_token || !isfinite(m) || !isfinite(ls)) atomicOr(error_flag, bad_token ? 1 : 2);
      tok = bad_token ? 0 : tok;
      shift[n * ns] = m;
      log_sum[n * ns] = ls;
      logp[n] = (to_acc(row[tok]) * inv_temp - m) - ls;
    }
  }
}

// Single block: per-token terms, aggregation weights, loss and metrics, d loss / d logp.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads) token_terms_kernel(
    const A* __restrict__ logp,        // [N]
    const A* __restrict__ advantages,  // [N]
    const A* __restrict__ mask,        // [N]
    const A* __restrict__ old_logp,    // [N] nullable
    const A* __restrict__ ref_logp,    // [N] nullable
    int64_t B, int64_t T, TokenLossParams<A> p, bool sequence_level, int aggregation,
    A* __restrict__ seq_total,         // [B] workspace
    A* __restrict__ seq_log_ratio,     // [B] workspace
    A* __restrict__ coef,              // [N] d loss / d logp, aggregation weight included
    A* __restrict__ loss_out,          // []
    A* __restrict__ metrics) {         // [3]
  __shared__ A red[32];
  A my_total = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    A st = 0, lr = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = b * T + t;
      st += mask[n];
      lr += (old_logp ? logp[n] - old_logp[n] : A(0)) * mask[n];
    }
    seq_total[b] = st;
    seq_log_ratio[b] = lr / (st > A(1) ? st : A(1));
    my_total += st;
  }
  const A total = block_sum<A>(my_total, red);  // also orders the seq_* writes before the reads below
  A loss = 0, ratio_sum = 0, clip_sum = 0, kl_sum = 0;
  for (int64_t n = threadIdx.x; n < B * T; n += blockDim.x) {
    const int64_t b = n / T;
    const A log_ratio = sequence_level ? seq_log_ratio[b] : (old_logp ? logp[n] - old_logp[n] : A(0));
    const TokenTerms<A> t = token_terms<A>(logp[n], log_ratio, advantages[n], ref_logp ? ref_logp[n] : A(0), p);
    const A w = mask[n] * aggregation_weight<A>(aggregation, total, seq_total[b], B, T);
    coef[n] = t.coef * w;
    loss += t.loss * w;
    ratio_sum += t.ratio * mask[n];
    clip_sum += t.clipped * mask[n];
    kl_sum += t.kl * mask[n];
  }
  loss = block_sum<A>(loss, red);
  ratio_sum = block_sum<A>(ratio_sum, red);
  clip_sum = block_sum<A>(clip_sum, red);
  kl_sum = block_sum<A>(kl_sum, red);
  if (threadIdx.x == 0) {
    const A denom = total > A(1) ? total : A(1);
    *loss_out = loss;
    metrics[0] = ratio_sum / denom;
    metrics[1] = clip_sum / denom;
    metrics[2] = kl_sum / denom;
  }
}

// grad may be logits itself (grpo_linear_token_loss writes the gradient over its chunk's logits):
// each thread reads a pack and then writes the same pack, so neither pointer is __restrict__.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) token_grad_kernel(
    const T* logits,                     // [N, row_stride]
    const int64_t* __restrict__ tokens,  // [N]
    const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ log_sum,  // [N], stride ns
    int64_t ns,
    const acc_t<T>* __restrict__ coef,   // [N]
    int64_t V, int64_t row_stride, acc_t<T> inv_temp,
    T* grad) {                           // [N, V] contiguous
  using A = acc_t<T>;
  const int64_t n = blockIdx.x;
  const T* row = logits + n * row_stride;
  T* out = grad + n * V;
  const A k = -coef[n] * inv_temp, sh = shift[n * ns], ls = log_sum[n * ns];
  const int64_t tok = tokens[n];
  for (int64_t i = threadIdx.x; i < V / VEC; i += blockDim.x) {
    Pack<T, VEC> g;
    if (k == A(0)) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) g.v[j] = from_acc<T>(A(0));
    } else {
      const auto p = reinterpret_cast<const Pack<T, VEC>*>(row)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A prob = exp((to_acc(p.v[j]) * inv_temp - sh) - ls);
        g.v[j] = from_acc<T>(k * (i * VEC + j == tok ? prob - A(1) : prob));
      }
    }
    reinterpret_cast<Pack<T, VEC>*>(out)[i] = g;
  }
}

// Per row of one chunk (grpo_linear_token_loss): terms with the aggregation weight given.
template <typename A>
__global__ void token_rows_terms_kernel(
    const A* __restrict__ logp,        // [n]
    const A* __restrict__ advantages,  // [n]
    const A* __restrict__ scale,       // [n] aggregation weight x mask
    const A* __restrict__ mask,        // [n]
    const A* __restrict__ old_logp,    // [n] nullable
    const A* __restrict__ ref_logp,    // [n] nullable
    const A* __restrict__ log_ratio,   // [n] nullable (sequence level)
    int64_t n, TokenLossParams<A> p,
    A* __restrict__ coef,              // [n] d loss / d logp
    A* __restrict__ contrib) {         // [n, 4]
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const A lr = log_ratio ? log_ratio[i] : (old_logp ? logp[i] - old_logp[i] : A(0));
  const TokenTerms<A> t = token_terms<A>(logp[i], lr, advantages[i], ref_logp ? ref_logp[i] : A(0), p);
  coef[i] = t.coef * scale[i];
  contrib[4 * i + 0] = t.loss * scale[i];
  contrib[4 * i + 1] = t.ratio * mask[i];
  contrib[4 * i + 2] = t.clipped * mask[i];
  contrib[4 * i + 3] = t.kl * mask[i];
}

// Single block over [P, G] rewards; accumulation in double. std_scope: 0 group, 1 batch, 2 none.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) advantages_kernel(const T* __restrict__ rewards,  // [P, G]
                                                                    acc_t<T>* __restrict__ out,     // [P, G]
                                                                    int64_t P, int64_t G, int std_scope, double eps,
                                                                    bool has_clip, double clip) {
  __shared__ double red[32];
  const int64_t n = P * G;
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<double>(to_acc(rewards[i]));
  const double batch_mean = block_sum<double>(s, red) / static_cast<double>(n);
  double v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double d = static_cast<double>(to_acc(rewards[i])) - batch_mean;
    v += d * d;
  }
  const double batch_std = sqrt(block_sum<double>(v, red) / static_cast<double>(n));
  for (int64_t g = threadIdx.x; g < P; g += blockDim.x) {
    const T* r = rewards + g * G;
    double mean = 0, var = 0;
    for (int64_t j = 0; j < G; ++j) mean += static_cast<double>(to_acc(r[j]));
    mean /= static_cast<double>(G);
    for (int64_t j = 0; j < G; ++j) {
      const double d = static_cast<double>(to_acc(r[j])) - mean;
      var += d * d;
    }
    const double denom = std_scope == 0 ? sqrt(var / static_cast<double>(G)) + eps
                                        : (std_scope == 1 ? batch_std + eps : 1.0);
    for (int64_t j = 0; j < G; ++j) {
      double a = (static_cast<double>(to_acc(r[j])) - mean) / denom;
      if (has_clip) a = a < -clip ? -clip : (a > clip ? clip : a);
      out[g * G + j] = static_cast<acc_t<T>>(a);
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kReduceThreads) flow_grpo_loss_kernel(
    const A* __restrict__ logp, const A* __restrict__ old_logp,  // [B, K]
    const A* __restrict__ advantages,                            // [B]
    const A* __restrict__ kl,                                    // [B, K] nullable
    A clip_range, A beta, int64_t B, int64_t K,
    A* __restrict__ loss_out, A* __restrict__ metrics,           // [], [3]
    A* __restrict__ grad_logp, A* __restrict__ grad_kl) {        // [B, K], [B, K] nullable
  __shared__ double red[32];
  const int64_t n = B * K;
  double loss = 0, ratio_sum = 0, clip_sum = 0, kl_sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A l, d, r, c;
    flow_step_terms<A>(logp[i], old_logp[i], advantages[i / K], clip_range, &l, &d, &r, &c);
    grad_logp[i] = d / static_cast<A>(n);
    loss += l;
    ratio_sum += r;
    clip_sum += c;
    if (kl) {
      kl_sum += kl[i];
      grad_kl[i] = beta / static_cast<A>(n);
    }
  }
  loss = block_sum<double>(loss, red);
  ratio_sum = block_sum<double>(ratio_sum, red);
  clip_sum = block_sum<double>(clip_sum, red);
  kl_sum = block_sum<double>(kl_sum, red);
  if (threadIdx.x == 0) {
    *loss_out = static_cast<A>(loss / n + static_cast<double>(beta) * kl_sum / n);
    metrics[0] = static_cast<A>(ratio_sum / n);
    metrics[1] = static_cast<A>(clip_sum / n);
    metrics[2] = static_cast<A>(kl_sum / n);
  }
}

}  // namespace dev

int64_t token_loss_workspace(int64_t N) { return 3 * N + 2 * N; }

cudaError_t launch_grpo_token_loss(DType dtype, const TokenLossArgs& a, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = dev::acc_t<T>;
    const int64_t N = a.B * a.T;
    A* ws = static_cast<A*>(a.workspace);
    A *shift = ws, *log_sum = ws + N, *coef = ws + 2 * N, *seq_total = ws + 3 * N, *seq_lr = ws + 4 * N;
    const A inv_temp = static_cast<A>(a.inv_temp);
    cudaError_t err = dev::with_vec<T>({a.V, a.row_stride}, {a.logits}, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      dev::token_norm_kernel<T, VEC><<<N, dev::kRowThreads, 0, stream>>>(
          static_cast<const T*>(a.logits), a.tokens, a.V, a.row_stride, inv_temp, shift, log_sum, 1,
          static_cast<A*>(a.logp), a.error_flag);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
    TokenLossParams<A> p{static_cast<A>(a.eps_low), static_cast<A>(a.eps_high), static_cast<A>(a.dual_clip),
                         static_cast<A>(a.beta), a.ref_logp != nullptr};
    dev::token_terms_kernel<A><<<1, dev::kReduceThreads, 0, stream>>>(
        static_cast<const A*>(a.logp), static_cast<const A*>(a.advantages), static_cast<const A*>(a.mask),
        static_cast<const A*>(a.old_logp), static_cast<const A*>(a.ref_logp), a.B, a.T, p, a.sequence_level,
        a.aggregation, seq_total, seq_lr, coef, static_cast<A*>(a.loss), static_cast<A*>(a.metrics));
    err = cudaGetLastError();
    if (err != cudaSuccess || a.grad_logits == nullptr) return err;
    return dev::with_vec<T>({a.V, a.row_stride}, {a.logits, a.grad_logits}, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      dev::token_grad_kernel<T, VEC><<<N, dev::kRowThreads, 0, stream>>>(
          static_cast<const T*>(a.logits), a.tokens, shift, log_sum, 1, coef, a.V, a.row_stride, inv_temp,
          static_cast<T*>(a.grad_logits));
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_token_rows(DType dtype, const TokenRowsArgs& a, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = dev::acc_t<T>;
    if (a.n == 0) return cudaSuccess;
    A* norm = static_cast<A*>(a.norm);
    const A inv_temp = static_cast<A>(a.inv_temp);
    cudaError_t err = cudaSuccess;
    if (!a.norms_given) {
      err = dev::with_vec<T>({a.V}, {a.logits}, [&](auto v) {
        constexpr int VEC = decltype(v)::value;
        dev::token_norm_kernel<T, VEC><<<a.n, dev::kRowThreads, 0, stream>>>(
            static_cast<const T*>(a.logits), a.tokens, a.V, a.V, inv_temp, norm, norm + 1, 2,
            static_cast<A*>(a.logp), a.error_flag);
        return cudaGetLastError();
      });
      if (err != cudaSuccess || a.norm_only) return err;
    }
    TokenLossParams<A> p{static_cast<A>(a.eps_low), static_cast<A>(a.eps_high), static_cast<A>(a.dual_clip),
                         static_cast<A>(a.beta), a.has_ref};
    constexpr int kThreads = 256;
    dev::token_rows_terms_kernel<A><<<dev::ceil_div(a.n, kThreads), kThreads, 0, stream>>>(
        static_cast<const A*>(a.logp), static_cast<const A*>(a.advantages), static_cast<const A*>(a.scale),
        static_cast<const A*>(a.mask), static_cast<const A*>(a.old_logp), static_cast<const A*>(a.ref_logp),
        static_cast<const A*>(a.log_ratio), a.n, p, static_cast<A*>(a.coef), static_cast<A*>(a.contrib));
    err = cudaGetLastError();
    if (err != cudaSuccess || a.grad == nullptr) return err;
    return dev::with_vec<T>({a.V}, {a.logits, a.grad}, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      dev::token_grad_kernel<T, VEC><<<a.n, dev::kRowThreads, 0, stream>>>(
          static_cast<const T*>(a.logits), a.tokens, norm, norm + 1, 2, static_cast<const A*>(a.coef), a.V, a.V,
          inv_temp, static_cast<T*>(a.grad));
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_grpo_advantages(DType dtype, const void* rewards, void* out, int64_t P, int64_t G, int std_scope,
                                   double eps, bool has_clip, double clip, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    dev::advantages_kernel<T><<<1, dev::kReduceThreads, 0, stream>>>(
        static_cast<const T*>(rewards), static_cast<dev::acc_t<T>*>(out), P, G, std_scope, eps, has_clip, clip);
    return cudaGetLastError();
  });
}

cudaError_t launch_flow_grpo_loss(DType dtype, const void* logp, const void* old_logp, const void* advantages,
                                  const void* kl, double clip_range, double beta, void* loss, void* metrics,
                                  void* grad_logp, void* grad_kl, int64_t B, int64_t K, cudaStream_t stream) {
  auto run = [&](auto tag) -> cudaError_t {
    using A = decltype(tag);
    dev::flow_grpo_loss_kernel<A><<<1, dev::kReduceThreads, 0, stream>>>(
        static_cast<const A*>(logp), static_cast<const A*>(old_logp), static_cast<const A*>(advantages),
        static_cast<const A*>(kl), A(clip_range), A(beta), B, K, static_cast<A*>(loss), static_cast<A*>(metrics),
        static_cast<A*>(grad_logp), static_cast<A*>(grad_kl));
    return cudaGetLastError();
  };
  return dtype == DType::kFloat64 ? run(double{}) : run(float{});
}

}  // namespace alphagrpo
