// CPU row backend of grpo_linear_token_loss (the driver is csrc/grpo_linear.cpp): the row kernel
// of grpo_token_loss (cpu_rows.h: one online pass for the normaliser, the gradient written in the
// logits' dtype over the chunk's logits in place) on each chunk of GEMM output.
#include <vector>

#include "alphagrpo/cpu_common.h"
#include "alphagrpo/cpu_rows.h"
#include "alphagrpo/linear_loss.h"

namespace alphagrpo {
namespace {

template <typename A>
const A* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

class LinearRowsCpu final : public LinearRows {
 public:
  explicit LinearRowsCpu(at::ScalarType dtype) : dtype_(dtype) {}

  void check_tokens(const Tensor& tokens, int64_t V, int64_t T) override {
    const int64_t* tk = tokens.data_ptr<int64_t>();
    for (int64_t n = 0; n < tokens.numel(); ++n) {
      TORCH_CHECK_INDEX(tk[n] >= 0 && tk[n] < V, "tokens must be in [0, ", V, ") (the rows of weight), got ", tk[n],
                        " at position (", n / T, ", ", n % T, ")");
    }
  }

  void norm(const Tensor& logits, const RowSlice& rows, const LinearLossParams& p, const Tensor& norm,
            const Tensor& logp) override {
    dispatch_floating(dtype_, "grpo_linear_token_loss", [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      auto* nrm = reinterpret_cast<RowNorm<A>*>(norm.data_ptr<A>());
      const int64_t c = rows.tokens.numel();
      rows_norm(logits.data_ptr<T>(), c, logits.size(1), static_cast<A>(p.inv_temp), rows.tokens.data_ptr<int64_t>(),
                nrm, logp.data_ptr<A>());
      check_rows(nrm, rows);
    });
  }

  void loss(const Tensor& logits, const RowSlice& rows, const LinearLossParams& p, bool norms_given, bool grad,
            const Tensor& norm, const Tensor& logp, const Tensor& contrib) override {
    dispatch_floating(dtype_, "grpo_linear_token_loss", [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      const int64_t c = rows.tokens.numel();
      T* L = logits.defined() ? logits.data_ptr<T>() : nullptr;
      const int64_t V = logits.defined() ? logits.size(1) : 0;
      const A* scale = rows.scale.data_ptr<A>();
      const A* mask = rows.mask.data_ptr<A>();
      TokenRows<A> in{rows.tokens.data_ptr<int64_t>(), rows.adv.data_ptr<A>(), scale, ptr_or_null<A>(rows.old),
                      ptr_or_null<A>(rows.ref), ptr_or_null<A>(rows.log_ratio)};
      TokenLossParams<A> tp{static_cast<A>(p.eps_low), static_cast<A>(p.eps_high), static_cast<A>(p.dual_clip),
                            static_cast<A>(p.beta), p.has_ref};
      auto* nrm = reinterpret_cast<RowNorm<A>*>(norm.data_ptr<A>());
      std::vector<TokenTerms<A>> terms(c);
      rows_loss(L, grad ? L : nullptr, c, V, static_cast<A>(p.inv_temp), in, tp, norms_given, nrm, logp.data_ptr<A>(),
                terms.data());
      if (!norms_given) check_rows(nrm, rows);
      A* out = contrib.data_ptr<A>();  // [c, 4]
      for (int64_t r = 0; r < c; ++r) {
        out[4 * r + 0] = terms[r].loss * scale[r];
        out[4 * r + 1] = terms[r].ratio * mask[r];
        out[4 * r + 2] = terms[r].clipped * mask[r];
        out[4 * r + 3] = terms[r].kl * mask[r];
      }
    });
  }

 private:
  template <typename A>
  static void check_rows(const RowNorm<A>* nrm, const RowSlice& rows) {
    if (const int64_t r = first_bad_row(nrm, rows.tokens.numel()); r >= 0) {
      const int64_t n = rows.n0 + r;
      TORCH_CHECK_VALUE(false, "hidden @ weight.T (+ bias) has a non-finite logit (NaN or +inf) in row (", n / rows.T,
                        ", ", n % rows.T, "): check hidden, weight and bias");
    }
  }

  at::ScalarType dtype_;
};

}  // namespace

Tensor6 grpo_linear_token_loss_cpu(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                   const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                                   const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                                   double temperature, double eps_low, double eps_high,
                                   std::optional<double> dual_clip, double beta, const std::string& ratio_level,
                                   const std::string& aggregation, std::optional<int64_t> chunk_tokens,
                                   bool grad_hidden, bool grad_weight, bool grad_bias) {
  check_floating(hidden, "hidden");
  LinearRowsCpu rows(hidden.scalar_type());
  return grpo_linear_token_loss_impl(
      rows, LinearLossArgs{hidden, weight, bias, tokens, advantages, mask, old_logp, ref_logp, temperature, eps_low,
                           eps_high, dual_clip, beta, ratio_level, aggregation, chunk_tokens, grad_hidden,
                           grad_weight, grad_bias});
}

}  // namespace alphagrpo
