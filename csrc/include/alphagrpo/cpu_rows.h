// The row kernel of the GRPO token losses on the CPU, shared by grpo_token_loss (rows of the
// caller's logits) and grpo_linear_token_loss (rows of one chunk's logits from a GEMM): per row,
// the log-softmax normaliser in one online pass, the sampled token's log-prob, the clipped
// surrogate and KL terms, and the gradient w.r.t. the row written in the row's dtype (in place
// over the row when asked). float32, bfloat16 and float16 rows go through the vectorised loops
// of cpu_kernels.h; float64 rows (for gradcheck-grade tests) through the exact scalar code here.
#pragma once

#include <ATen/Parallel.h>

#include "alphagrpo/cpu_common.h"
#include "alphagrpo/cpu_kernels.h"
#include "alphagrpo/grpo_math.h"

namespace alphagrpo {

// Log-softmax normaliser of one row of logits / temperature, kept as two parts so that
// log_softmax(z)_v = (z_v - shift) - log_sum (the form PyTorch rounds too).
template <typename A>
struct RowNorm {
  A shift;    // max_v z_v
  A log_sum;  // log sum_v exp(z_v - shift)
};

inline RowNorm<float> row_norm(const float* r, int64_t V, float t) {
  RowNorm<float> n;
  cpu_kernels().row_f32.norm(r, V, t, &n.shift, &n.log_sum);
  return n;
}
inline RowNorm<float> row_norm(const c10::BFloat16* r, int64_t V, float t) {
  RowNorm<float> n;
  cpu_kernels().row_bf16.norm(reinterpret_cast<const uint16_t*>(r), V, t, &n.shift, &n.log_sum);
  return n;
}
inline RowNorm<float> row_norm(const c10::Half* r, int64_t V, float t) {
  RowNorm<float> n;
  cpu_kernels().row_f16.norm(reinterpret_cast<const uint16_t*>(r), V, t, &n.shift, &n.log_sum);
  return n;
}
inline RowNorm<double> row_norm(const double* r, int64_t V, double t) {  // r: [V]
  double m = r[0];
  for (int64_t v = 1; v < V; ++v) m = r[v] > m || r[v] != r[v] ? r[v] : m;
  const double shift = m * t;
  double s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(r[v] * t - shift);
  return {shift, std::log(s)};
}

// out[v] = coef * d logp_token / d r_v = -coef / temperature * (softmax(r / temperature)_v - [v == token]);
// out may be r.
inline void row_grad(const float* r, int64_t V, float t, RowNorm<float> n, int64_t tok, float coef, float* out) {
  cpu_kernels().row_f32.grad(r, V, t, n.shift, n.log_sum, tok, coef, out);
}
inline void row_grad(const c10::BFloat16* r, int64_t V, float t, RowNorm<float> n, int64_t tok, float coef,
                     c10::BFloat16* out) {
  cpu_kernels().row_bf16.grad(reinterpret_cast<const uint16_t*>(r), V, t, n.shift, n.log_sum, tok, coef,
                              reinterpret_cast<uint16_t*>(out));
}
inline void row_grad(const c10::Half* r, int64_t V, float t, RowNorm<float> n, int64_t tok, float coef,
                     c10::Half* out) {
  cpu_kernels().row_f16.grad(reinterpret_cast<const uint16_t*>(r), V, t, n.shift, n.log_sum, tok, coef,
                             reinterpret_cast<uint16_t*>(out));
}
inline void row_grad(const double* r, int64_t V, double t, RowNorm<double> n, int64_t tok, double coef, double* out) {
  const double k = -coef * t, r_tok = r[tok];
  for (int64_t v = 0; v < V; ++v) out[v] = k * std::exp((r[v] * t - n.shift) - n.log_sum);
  out[tok] = k * (std::exp((r_tok * t - n.shift) - n.log_sum) - 1.0);
}

// Per-row inputs of the token loss, each [n] contiguous in the accumulation type A; old, ref and
// log_ratio may be null. scale is the row's aggregation weight times its mask: the loss is
// sum_rows scale * per_token_loss. log_ratio, when given, is the ratio's log (sequence level);
// otherwise it is logp - old (0 without old).
template <typename A>
struct TokenRows {
  const int64_t* tokens;
  const A* adv;
  const A* scale;
  const A* old;
  const A* ref;
  const A* log_ratio;
};

// Normalisers and sampled-token log-probs of n rows of L [n, V] (contiguous).
template <typename T>
void rows_norm(const T* L, int64_t n, int64_t V, acc_t<T> inv_temp, const int64_t* tokens,
               RowNorm<acc_t<T>>* norm,  // [n] out
               acc_t<T>* logp) {         // [n] out
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      norm[r] = row_norm(L + r * V, V, inv_temp);
      logp[r] = (load_acc(L, r * V + tokens[r]) * inv_temp - norm[r].shift) - norm[r].log_sum;
    }
  });
}

// The fused row pass: for each of n rows of L [n, V], unless norms_given, the normaliser and the
// log-prob (written to norm, logp); then the token's terms (written to terms) and, when G is
// non-null, the gradient of the loss w.r.t. the row, scale * coef * d logp / d row, into G [n, V]
// (G may be L). With norms_given and G null the rows are not read at all.
template <typename T>
void rows_loss(const T* L, T* G, int64_t n, int64_t V, acc_t<T> inv_temp, const TokenRows<acc_t<T>>& in,
               const TokenLossParams<acc_t<T>>& p, bool norms_given,
               RowNorm<acc_t<T>>* norm,        // [n] in or out
               acc_t<T>* logp,                 // [n] in or out
               TokenTerms<acc_t<T>>* terms) {  // [n] out
  using A = acc_t<T>;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tok = in.tokens[r];
      if (!norms_given) {
        norm[r] = row_norm(L + r * V, V, inv_temp);
        logp[r] = (load_acc(L, r * V + tok) * inv_temp - norm[r].shift) - norm[r].log_sum;
      }
      const A log_ratio = in.log_ratio ? in.log_ratio[r] : (in.old ? logp[r] - in.old[r] : A(0));
      terms[r] = token_terms<A>(logp[r], log_ratio, in.adv[r], in.ref ? in.ref[r] : A(0), p);
      if (G) row_grad(L + r * V, V, inv_temp, norm[r], tok, terms[r].coef * in.scale[r], G + r * V);
    }
  });
}

// Index of the first row whose normaliser is not finite (a NaN or +inf logit), or -1.
template <typename A>
int64_t first_bad_row(const RowNorm<A>* norm, int64_t n) {
  for (int64_t r = 0; r < n; ++r) {
    if (!std::isfinite(static_cast<double>(norm[r].shift + norm[r].log_sum))) return r;
  }
  return -1;
}

}  // namespace alphagrpo
