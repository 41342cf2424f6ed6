// CPU kernels of the GRPO losses: group advantages, the fused token loss (selective log-softmax,
// clipped surrogate, KL, aggregation, and the gradient w.r.t. the logits in the logits' dtype,
// without materialising a float32 log-softmax), and the Flow-GRPO step loss.
#include <ATen/Parallel.h>

#include <vector>

#include "alphagrpo/cpu_common.h"
#include "alphagrpo/cpu_rows.h"
#include "alphagrpo/grpo_math.h"
#include "alphagrpo/ops.h"

namespace alphagrpo {
namespace {

int aggregation_code(const std::string& name) {
  if (name == "token-mean") return kTokenMean;
  if (name == "seq-mean-token-mean") return kSeqMeanTokenMean;
  if (name == "seq-mean-token-sum") return kSeqMeanTokenSum;
  return kSeqMeanTokenSumNorm;
}

// ---- group advantages -----------------------------------------------------------------------------
// Sums in double with kAdvLanes independent accumulators (so the loops vectorise without
// reassociating anything); the output loop multiplies by 1 / denominator (within an ulp of double
// of the division, before rounding to the output type).
constexpr int kAdvLanes = 8;

template <typename T>
inline __attribute__((always_inline)) double lane_sum(const T* p, int64_t n, double shift, bool square) {
  double acc[kAdvLanes] = {};
  int64_t i = 0;
  for (; i + kAdvLanes <= n; i += kAdvLanes) {
    for (int j = 0; j < kAdvLanes; ++j) {
      const double d = static_cast<double>(load_acc(p, i + j)) - shift;
      acc[j] += square ? d * d : d;
    }
  }
  for (; i < n; ++i) {
    const double d = static_cast<double>(load_acc(p, i)) - shift;
    acc[0] += square ? d * d : d;
  }
  for (int w = kAdvLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

template <typename T>
inline __attribute__((always_inline)) void advantages_body(const T* r,      // [P, G]
                                                           acc_t<T>* out,   // [P, G]
                                                           int64_t P, int64_t G, int scope, double eps, double lo,
                                                           double hi) {
  const int64_t n = P * G;
  std::vector<double> mean(P);
  double total = 0;
  for (int64_t i = 0; i < P; ++i) {
    const double s = lane_sum(r + i * G, G, 0.0, false);
    mean[i] = s / static_cast<double>(G);
    total += s;
  }
  const double batch_mean = total / static_cast<double>(n);
  const double batch_inv = scope == 1 ? 1.0 / (std::sqrt(lane_sum(r, n, batch_mean, true) / n) + eps) : 1.0;
  for (int64_t i = 0; i < P; ++i) {
    const T* g = r + i * G;
    const double m = mean[i];
    const double inv = scope == 0 ? 1.0 / (std::sqrt(lane_sum(g, G, m, true) / G) + eps) : batch_inv;
    for (int64_t j = 0; j < G; ++j) {
      const double a = (static_cast<double>(load_acc(g, j)) - m) * inv;
      out[i * G + j] = static_cast<acc_t<T>>(a < lo ? lo : (a > hi ? hi : a));
    }
  }
}

// float32 rewards (the usual case) get AVX-512 / AVX2 clones picked at load time.
__attribute__((target_clones("avx512f", "avx2", "default"))) void advantages(const float* r, float* out, int64_t P,
                                                                            int64_t G, int scope, double eps,
                                                                            double lo, double hi) {
  advantages_body(r, out, P, G, scope, eps, lo, hi);
}
template <typename T>
void advantages(const T* r, acc_t<T>* out, int64_t P, int64_t G, int scope, double eps, double lo, double hi) {
  advantages_body(r, out, P, G, scope, eps, lo, hi);
}

template <typename T>
Tensor4 token_loss_impl(const Tensor& logits, const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                        const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                        double temperature, double eps_low, double eps_high, std::optional<double> dual_clip,
                        double beta, bool sequence_level, int aggregation, bool compute_grad) {
  using A = acc_t<T>;
  const at::ScalarType acc_type = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  const int64_t B = logits.size(0), Tn = logits.size(1), V = logits.size(2), N = B * Tn;
  auto lg = logits.contiguous();
  auto tok = tokens.contiguous();
  auto adv = advantages.to(acc_type).contiguous();
  auto msk = mask.to(acc_type).contiguous();
  Tensor old = old_logp ? old_logp->to(acc_type).contiguous() : Tensor();
  Tensor ref = ref_logp ? ref_logp->to(acc_type).contiguous() : Tensor();
  auto logp_t = at::empty({B, Tn}, logits.options().dtype(acc_type));
  auto grad = compute_grad ? at::empty_like(lg) : at::empty({0}, logits.options());

  const T* L = lg.data_ptr<T>();
  const int64_t* tk = tok.data_ptr<int64_t>();
  const A* ad = adv.data_ptr<A>();
  const A* m = msk.data_ptr<A>();
  const A* od = old_logp ? old.data_ptr<A>() : nullptr;
  const A* rf = ref_logp ? ref.data_ptr<A>() : nullptr;
  A* lp = logp_t.data_ptr<A>();
  T* G = compute_grad ? grad.data_ptr<T>() : nullptr;
  const A inv_temp = static_cast<A>(1.0 / temperature);

  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_INDEX(tk[n] >= 0 && tk[n] < V, "tokens must be in [0, ", V, "), got ", tk[n], " at position (",
                      n / Tn, ", ", n % Tn, ")");
  }
  // Aggregation weights depend only on the mask.
  std::vector<A> seq_total(B, A(0));
  A total = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < Tn; ++t) seq_total[b] += m[b * Tn + t];
    total += seq_total[b];
  }
  std::vector<A> weight(B);
  for (int64_t b = 0; b < B; ++b) weight[b] = aggregation_weight<A>(aggregation, total, seq_total[b], B, Tn);

  TokenLossParams<A> p{static_cast<A>(eps_low), static_cast<A>(eps_high),
                       static_cast<A>(dual_clip ? *dual_clip : 0.0), static_cast<A>(beta), ref_logp.has_value()};
  std::vector<A> scale(N);
  for (int64_t n = 0; n < N; ++n) scale[n] = m[n] * weight[n / Tn];
  std::vector<TokenTerms<A>> terms(N);
  std::vector<RowNorm<A>> norm(N);
  TokenRows<A> rows{tk, ad, scale.data(), od, rf, nullptr};

  std::vector<A> seq_log_ratio;
  if (sequence_level) {
    // GSPO-token: every token's ratio value needs its whole sequence's log-probs first.
    rows_norm(L, N, V, inv_temp, tk, norm.data(), lp);
    seq_log_ratio.resize(N);
    for (int64_t b = 0; b < B; ++b) {
      A s = 0;
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t n = b * Tn + t;
        s += (od ? lp[n] - od[n] : A(0)) * m[n];
      }
      const A lr = s / (seq_total[b] > A(1) ? seq_total[b] : A(1));
      for (int64_t t = 0; t < Tn; ++t) seq_log_ratio[b * Tn + t] = lr;
    }
    rows.log_ratio = seq_log_ratio.data();
  }
  // One pass per row: normaliser (unless computed above), log-prob, terms and the gradient while the
  // row is still in cache.
  rows_loss(L, G, N, V, inv_temp, rows, p, sequence_level, norm.data(), lp, terms.data());

  if (const int64_t n = first_bad_row(norm.data(), N); n >= 0) {
    TORCH_CHECK_VALUE(false, "logits has a non-finite value (NaN or +inf) in row (", n / Tn, ", ", n % Tn, ")");
  }
  // Reductions in a fixed order (deterministic), accumulated in double.
  double loss = 0, ratio_sum = 0, clip_sum = 0, kl_sum = 0;
  for (int64_t n = 0; n < N; ++n) {
    loss += static_cast<double>(terms[n].loss * m[n] * weight[n / Tn]);
    ratio_sum += static_cast<double>(terms[n].ratio * m[n]);
    clip_sum += static_cast<double>(terms[n].clipped * m[n]);
    kl_sum += static_cast<double>(terms[n].kl * m[n]);
  }
  const double denom = std::max(static_cast<double>(total), 1.0);
  auto loss_t = at::full({}, loss, logits.options().dtype(acc_type));
  auto metrics = at::tensor({ratio_sum / denom, clip_sum / denom, kl_sum / denom}, at::kDouble).to(acc_type);
  return {loss_t, metrics, logp_t, grad};
}

}  // namespace

Tensor grpo_advantages_cpu(const Tensor& rewards, const std::string& std_scope, double eps,
                           std::optional<double> clip) {
  validate_advantages(rewards, std_scope, eps, clip);
  auto r = rewards.contiguous();
  const int64_t P = r.size(0), G = r.size(1);
  auto out = at::empty({P, G}, r.options().dtype(r.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  const int scope = std_scope == "group" ? 0 : (std_scope == "batch" ? 1 : 2);
  const double lo = clip ? -*clip : -INFINITY, hi = clip ? *clip : INFINITY;
  dispatch_floating(r.scalar_type(), "grpo_advantages", [&](auto tag) {
    using T = typename decltype(tag)::type;
    advantages(r.data_ptr<T>(), out.data_ptr<acc_t<T>>(), P, G, scope, eps, lo, hi);
  });
  return out;
}

Tensor4 grpo_token_loss_cpu(const Tensor& logits, const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                            const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                            double temperature, double eps_low, double eps_high, std::optional<double> dual_clip,
                            double beta, const std::string& ratio_level, const std::string& aggregation,
                            bool compute_grad) {
  validate_token_loss(logits, tokens, advantages, mask, old_logp, ref_logp, temperature, dual_clip, ratio_level,
                      aggregation);
  return dispatch_floating(logits.scalar_type(), "grpo_token_loss", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return token_loss_impl<T>(logits, tokens, advantages, mask, old_logp, ref_logp, temperature, eps_low, eps_high,
                              dual_clip, beta, ratio_level == "sequence", aggregation_code(aggregation), compute_grad);
  });
}

Tensor4 flow_grpo_loss_cpu(const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                           const std::optional<Tensor>& kl, double clip_range, double beta) {
  validate_flow_grpo(logp, old_logp, advantages, kl);
  TORCH_CHECK_VALUE(clip_range > 0.0, "clip_range must be > 0, got ", clip_range);
  const auto acc_type = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lp = logp.to(at::kDouble).contiguous(), old = old_logp.to(at::kDouble).contiguous();
  auto adv = advantages.to(at::kDouble).contiguous();
  const int64_t B = lp.size(0), K = lp.size(1), N = B * K;
  std::vector<double> grad_logp(N), grad_kl(N, kl ? beta / N : 0.0);
  double loss = 0, ratio_sum = 0, clip_sum = 0, kl_sum = 0;
  for (int64_t n = 0; n < N; ++n) {
    double l, d, r, c;
    flow_step_terms<double>(lp.data_ptr<double>()[n], old.data_ptr<double>()[n], adv.data_ptr<double>()[n / K],
                            clip_range, &l, &d, &r, &c);
    loss += l;
    grad_logp[n] = d / N;
    ratio_sum += r;
    clip_sum += c;
  }
  loss /= N;
  if (kl) {
    auto k = kl->to(at::kDouble).contiguous();
    for (int64_t n = 0; n < N; ++n) kl_sum += k.data_ptr<double>()[n];
    loss += beta * kl_sum / N;
  }
  auto opts = logp.options().dtype(acc_type);
  auto metrics = at::tensor({ratio_sum / N, clip_sum / N, kl_sum / N}, at::kDouble).to(acc_type);
  return {at::full({}, loss, opts), metrics, at::tensor(grad_logp, at::kDouble).reshape({B, K}).to(acc_type),
          kl ? at::tensor(grad_kl, at::kDouble).reshape({B, K}).to(acc_type) : at::empty({0}, opts)};
}

}  // namespace alphagrpo
