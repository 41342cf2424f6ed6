// Argument validation shared by the CPU and CUDA paths, so both reject the same inputs with the
// same messages. Every message names the argument and the expected form.
#include "alphagrpo/cpu_common.h"
#include "alphagrpo/ops.h"

namespace alphagrpo {

void validate_flow_sde(const Tensor& x, std::initializer_list<NamedTensor> latents, const Tensor& sigma,
                       const Tensor& sigma_next, double noise_level, double sigma_max) {
  check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(0) > 0, "x must be [batch, ...] with batch > 0, got shape ", x.sizes());
  for (const NamedTensor& t : latents) {
    if (t.tensor == nullptr) continue;
    check_same_dtype(*t.tensor, x, t.name, "x");
    check_same_shape(*t.tensor, x, t.name, "x");
    check_same_device(*t.tensor, x, t.name, "x");
  }
  check_per_sample(sigma, x.size(0), "sigma");
  check_per_sample(sigma_next, x.size(0), "sigma_next");
  check_same_device(sigma, x, "sigma", "x");
  check_same_device(sigma_next, x, "sigma_next", "x");
  TORCH_CHECK_VALUE(std::isfinite(noise_level) && noise_level >= 0.0, "noise_level must be finite and >= 0, got ",
                    noise_level);
  TORCH_CHECK_VALUE(sigma_max > 0.0 && sigma_max < 1.0, "sigma_max must be in (0, 1), got ", sigma_max);
}

// tokens, advantages, mask, old_logp, ref_logp against a [B, T] batch on the device of `ref`.
void validate_token_inputs(int64_t B, int64_t T, const Tensor& ref, const char* ref_name, const Tensor& tokens,
                           const Tensor& advantages, const Tensor& mask, const std::optional<Tensor>& old_logp,
                           const std::optional<Tensor>& ref_logp) {
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong, "tokens must be int64, got ", tokens.scalar_type());
  TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.size(0) == B && tokens.size(1) == T, "tokens must be [", B, ", ", T,
                    "], got ", tokens.sizes());
  auto check_bt = [&](const Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == T, name, " must be [", B, ", ", T, "], got ",
                      t.sizes());
    check_floating(t, name);
    check_same_device(t, ref, name, ref_name);
  };
  check_bt(advantages, "advantages");
  check_bt(mask, "mask");
  if (old_logp) check_bt(*old_logp, "old_logp");
  if (ref_logp) check_bt(*ref_logp, "ref_logp");
  check_same_device(tokens, ref, "tokens", ref_name);
}

void validate_loss_options(double temperature, std::optional<double> dual_clip, const std::string& ratio_level,
                           const std::string& aggregation) {
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(!dual_clip || *dual_clip > 1.0, "dual_clip must be > 1 when given, got ", dual_clip.value_or(0.0));
  check_choice(ratio_level, {"token", "sequence"}, "ratio_level");
  check_choice(aggregation, {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"},
               "aggregation");
}

void validate_token_loss(const Tensor& logits, const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                         const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                         double temperature, std::optional<double> dual_clip, const std::string& ratio_level,
                         const std::string& aggregation) {
  check_floating(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(2) > 0, "logits must be [batch, tokens, vocab], got shape ",
                    logits.sizes());
  validate_token_inputs(logits.size(0), logits.size(1), logits, "logits", tokens, advantages, mask, old_logp,
                        ref_logp);
  validate_loss_options(temperature, dual_clip, ratio_level, aggregation);
}

void validate_linear_token_loss(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                                const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                                double temperature, std::optional<double> dual_clip, const std::string& ratio_level,
                                const std::string& aggregation, std::optional<int64_t> chunk_tokens, bool grad_bias) {
  check_floating(hidden, "hidden");
  TORCH_CHECK_VALUE(hidden.dim() == 3 && hidden.size(2) > 0, "hidden must be [batch, tokens, hidden], got shape ",
                    hidden.sizes());
  const int64_t H = hidden.size(2);
  check_same_dtype(weight, hidden, "weight", "hidden");
  check_same_device(weight, hidden, "weight", "hidden");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) == H, "weight must be [vocab, ", H,
                    "] (the LM head, one row per token id), got shape ", weight.sizes());
  if (bias) {
    check_same_dtype(*bias, hidden, "bias", "hidden");
    check_same_device(*bias, hidden, "bias", "hidden");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [", weight.size(0),
                      "], got shape ", bias->sizes());
  }
  TORCH_CHECK_VALUE(bias || !grad_bias, "grad_bias needs a bias");
  TORCH_CHECK_VALUE(!chunk_tokens || *chunk_tokens >= 1, "chunk_tokens must be >= 1 when given, got ",
                    chunk_tokens.value_or(0));
  validate_token_inputs(hidden.size(0), hidden.size(1), hidden, "hidden", tokens, advantages, mask, old_logp,
                        ref_logp);
  validate_loss_options(temperature, dual_clip, ratio_level, aggregation);
}

void validate_advantages(const Tensor& rewards, const std::string& std_scope, double eps, std::optional<double> clip) {
  check_floating(rewards, "rewards");
  TORCH_CHECK_VALUE(rewards.dim() == 2 && rewards.numel() > 0, "rewards must be [prompts, group] and non-empty, got ",
                    rewards.sizes());
  check_choice(std_scope, {"group", "batch", "none"}, "std_scope");
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(!clip || *clip > 0.0, "clip must be > 0 when given, got ", clip.value_or(0.0));
}

void validate_flow_grpo(const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                        const std::optional<Tensor>& kl) {
  check_floating(logp, "logp");
  TORCH_CHECK_VALUE(logp.dim() == 2 && logp.numel() > 0, "logp must be [batch, steps] and non-empty, got ",
                    logp.sizes());
  check_same_shape(old_logp, logp, "old_logp", "logp");
  check_same_device(old_logp, logp, "old_logp", "logp");
  check_floating(old_logp, "old_logp");
  check_floating(advantages, "advantages");
  TORCH_CHECK_VALUE(advantages.dim() == 1 && advantages.size(0) == logp.size(0), "advantages must be [",
                    logp.size(0), "], got ", advantages.sizes());
  check_same_device(advantages, logp, "advantages", "logp");
  if (kl) {
    check_same_shape(*kl, logp, "kl", "logp");
    check_same_device(*kl, logp, "kl", "logp");
    check_floating(*kl, "kl");
  }
}

}  // namespace alphagrpo
