// Host entry points of every op, one declaration per device. The schemas live in bindings.cpp;
// the formulas in alphagrpo_serve/kernels/reference.py (the spec).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>

namespace alphagrpo {

using at::Tensor;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Shared validation (csrc/validate.cpp): the same checks for every device.
// x and every named latent (v, noise, x_next, v_uncond, ...) share dtype, shape and device.
struct NamedTensor {
  const Tensor* tensor;  // nullptr: absent (optional argument)
  const char* name;
};
void validate_flow_sde(const Tensor& x, std::initializer_list<NamedTensor> latents, const Tensor& sigma,
                       const Tensor& sigma_next, double noise_level, double sigma_max);
void validate_advantages(const Tensor& rewards, const std::string& std_scope, double eps, std::optional<double> clip);
void validate_token_loss(const Tensor& logits, const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                         const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                         double temperature, std::optional<double> dual_clip, const std::string& ratio_level,
                         const std::string& aggregation);
void validate_linear_token_loss(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                                const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                                double temperature, std::optional<double> dual_clip, const std::string& ratio_level,
                                const std::string& aggregation, std::optional<int64_t> chunk_tokens, bool grad_bias);
void validate_flow_grpo(const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                        const std::optional<Tensor>& kl);

// ---- flow-matching SDE -------------------------------------------------------------------------
Tensor4 flow_sde_step_cpu(const Tensor& x, const Tensor& v, const std::optional<Tensor>& v_uncond, double cfg_scale,
                          const Tensor& sigma, const Tensor& sigma_next, double noise_level, double sigma_max,
                          const Tensor& noise);
Tensor flow_sde_logprob_cpu(const Tensor& x, const Tensor& v, const Tensor& x_next, const Tensor& sigma,
                            const Tensor& sigma_next, double noise_level, double sigma_max);
std::tuple<Tensor, Tensor> flow_sde_logprob_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& v,
                                                         const Tensor& x_next, const Tensor& sigma,
                                                         const Tensor& sigma_next, double noise_level,
                                                         double sigma_max, bool need_grad_x);

// ---- GRPO ---------------------------------------------------------------------------------------
Tensor grpo_advantages_cpu(const Tensor& rewards, const std::string& std_scope, double eps,
                           std::optional<double> clip);
Tensor4 grpo_token_loss_cpu(const Tensor& logits, const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                            const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                            double temperature, double eps_low, double eps_high, std::optional<double> dual_clip,
                            double beta, const std::string& ratio_level, const std::string& aggregation,
                            bool compute_grad);
Tensor4 flow_grpo_loss_cpu(const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                           const std::optional<Tensor>& kl, double clip_range, double beta);
// grpo_linear_token_loss (csrc/grpo_linear.cpp drives the chunks; the row work is per device).
// Returns (loss, metrics, logp [B, T], grad_hidden, grad_weight, grad_bias); a gradient not asked
// for comes back as an empty tensor.
Tensor6 grpo_linear_token_loss_cpu(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                   const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                                   const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                                   double temperature, double eps_low, double eps_high,
                                   std::optional<double> dual_clip, double beta, const std::string& ratio_level,
                                   const std::string& aggregation, std::optional<int64_t> chunk_tokens,
                                   bool grad_hidden, bool grad_weight, bool grad_bias);

#ifdef ALPHAGRPO_WITH_CUDA
Tensor4 flow_sde_step_cuda(const Tensor& x, const Tensor& v, const std::optional<Tensor>& v_uncond, double cfg_scale,
                           const Tensor& sigma, const Tensor& sigma_next, double noise_level, double sigma_max,
                           const Tensor& noise);
Tensor flow_sde_logprob_cuda(const Tensor& x, const Tensor& v, const Tensor& x_next, const Tensor& sigma,
                             const Tensor& sigma_next, double noise_level, double sigma_max);
std::tuple<Tensor, Tensor> flow_sde_logprob_backward_cuda(const Tensor& grad, const Tensor& x, const Tensor& v,
                                                          const Tensor& x_next, const Tensor& sigma,
                                                          const Tensor& sigma_next, double noise_level,
                                                          double sigma_max, bool need_grad_x);
Tensor grpo_advantages_cuda(const Tensor& rewards, const std::string& std_scope, double eps,
                            std::optional<double> clip);
Tensor4 grpo_token_loss_cuda(const Tensor& logits, const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                             const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                             double temperature, double eps_low, double eps_high, std::optional<double> dual_clip,
                             double beta, const std::string& ratio_level, const std::string& aggregation,
                             bool compute_grad);
Tensor4 flow_grpo_loss_cuda(const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                            const std::optional<Tensor>& kl, double clip_range, double beta);
Tensor6 grpo_linear_token_loss_cuda(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                    const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                                    const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                                    double temperature, double eps_low, double eps_high,
                                    std::optional<double> dual_clip, double beta, const std::string& ratio_level,
                                    const std::string& aggregation, std::optional<int64_t> chunk_tokens,
                                    bool grad_hidden, bool grad_weight, bool grad_bias);
#endif

}  // namespace alphagrpo
