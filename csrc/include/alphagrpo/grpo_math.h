// Per-token and per-step GRPO math shared by the CPU kernels and the CUDA kernels.
// Plain C++ (no torch, no CUDA runtime): compiled by the host compiler and by nvcc alike.
// The formulas are those of alphagrpo_serve/kernels/reference.py.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define AG_HD __host__ __device__ __forceinline__
#else
#define AG_HD inline
#endif

namespace alphagrpo {

// Aggregation of per-token losses over the mask, in the order of the Python names:
// token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm.
enum Aggregation : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };

template <typename A>
struct TokenLossParams {
  A eps_low, eps_high;
  A dual_clip;  // <= 0: off
  A beta;
  bool has_ref;
};

template <typename A>
struct TokenTerms {
  A loss;   // per-token loss, KL term included
  A coef;   // d loss / d logp (before aggregation weights)
  A ratio;  // importance ratio value
  A clipped;  // 1 where the clipped branch is active (trust region hit), else 0
  A kl;     // k3 estimator of KL(pi || ref), 0 without ref
};

// One token. log_ratio is logp - old_logp (token level) or the sequence's masked mean log-ratio
// (GSPO-token: the value is shared by the sequence, each token carries d ratio / d logp = ratio).
template <typename A>
AG_HD TokenTerms<A> token_terms(A logp, A log_ratio, A adv, A ref_logp, const TokenLossParams<A>& p) {
  TokenTerms<A> t;
  const A ratio = exp(log_ratio);
  const A lo = A(1) - p.eps_low, hi = A(1) + p.eps_high;
  const A clipped_ratio = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const A unclipped_loss = -ratio * adv, clipped_loss = -clipped_ratio * adv;
  const bool in_range = ratio >= lo && ratio <= hi;
  A loss = unclipped_loss > clipped_loss ? unclipped_loss : clipped_loss;
  // max(-rA, -clip(r)A): the gradient is -A unless the clipped branch wins outside the range.
  A dloss_dratio = (unclipped_loss > clipped_loss || in_range) ? -adv : A(0);
  if (p.dual_clip > A(0) && adv < A(0)) {
    const A floor_loss = -p.dual_clip * adv;
    if (floor_loss < loss) {
      loss = floor_loss;
      dloss_dratio = A(0);
    }
  }
  t.coef = dloss_dratio * ratio;
  t.kl = A(0);
  if (p.has_ref) {
    const A delta = ref_logp - logp;
    const A e = exp(delta);
    t.kl = e - delta - A(1);
    if (p.beta != A(0)) {
      loss += p.beta * t.kl;
      t.coef += p.beta * (A(1) - e);
    }
  }
  t.loss = loss;
  t.ratio = ratio;
  t.clipped = ((ratio < lo && adv < A(0)) || (ratio > hi && adv > A(0))) ? A(1) : A(0);
  return t;
}

// Aggregation weight of one sequence's tokens: loss = sum_t mask_t * weight_b * per_token_loss_t.
template <typename A>
AG_HD A aggregation_weight(int aggregation, A mask_total, A seq_mask_total, long long batch, long long max_len) {
  switch (aggregation) {
    case kTokenMean: return A(1) / (mask_total > A(1) ? mask_total : A(1));
    case kSeqMeanTokenMean: return A(1) / (A(batch) * (seq_mask_total > A(1) ? seq_mask_total : A(1)));
    case kSeqMeanTokenSum: return A(1) / A(batch);
    default: return A(1) / (A(batch) * A(max_len));
  }
}

// Flow-GRPO clipped surrogate for one SDE step: loss and d loss / d logp.
template <typename A>
AG_HD void flow_step_terms(A logp, A old_logp, A adv, A clip_range, A* loss, A* dloss_dlogp, A* ratio_out,
                           A* clipped) {
  const A ratio = exp(logp - old_logp);
  const A lo = A(1) - clip_range, hi = A(1) + clip_range;
  const A clipped_ratio = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const A unclipped_loss = -adv * ratio, clipped_loss = -adv * clipped_ratio;
  const bool in_range = ratio >= lo && ratio <= hi;
  *loss = unclipped_loss > clipped_loss ? unclipped_loss : clipped_loss;
  *dloss_dlogp = (unclipped_loss > clipped_loss || in_range) ? -adv * ratio : A(0);
  *ratio_out = ratio;
  const A dev = ratio - A(1);
  *clipped = (dev > clip_range || -dev > clip_range) ? A(1) : A(0);
}

}  // namespace alphagrpo
