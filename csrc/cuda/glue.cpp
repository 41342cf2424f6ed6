// Torch glue of the CUDA kernels: argument checks (shared with the CPU path), output allocation,
// device guard and current stream; the kernels themselves live in *.cu and see raw pointers only.
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "alphagrpo/cpu_common.h"
#include "alphagrpo/cuda_launch.h"
#include "alphagrpo/grpo_math.h"
#include "alphagrpo/ops.h"

namespace alphagrpo {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

// Per-sample schedule values as contiguous tensors of the accumulation type, on x's device.
Tensor sigma_as(const Tensor& s, const Tensor& x) { return s.to(acc_type(x.scalar_type())).contiguous(); }

}  // namespace

Tensor4 flow_sde_step_cuda(const Tensor& x, const Tensor& v, const std::optional<Tensor>& v_uncond, double cfg_scale,
                           const Tensor& sigma, const Tensor& sigma_next, double noise_level, double sigma_max,
                           const Tensor& noise) {
  validate_flow_sde(x, {{&v, "v"}, {&noise, "noise"}, {v_uncond ? &*v_uncond : nullptr, "v_uncond"}}, sigma, sigma_next,
                    noise_level, sigma_max);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.numel() / B;
  auto xc = x.contiguous(), vc = v.contiguous(), nc = noise.contiguous();
  Tensor vuc = v_uncond ? v_uncond->contiguous() : Tensor();
  auto s = sigma_as(sigma, x), sn = sigma_as(sigma_next, x);
  auto x_next = at::empty_like(xc), mean = at::empty_like(xc);
  auto std_out = at::empty({B}, x.options().dtype(acc_type(x.scalar_type())));
  auto log_prob = at::empty({B}, x.options().dtype(acc_type(x.scalar_type())));
  auto ws = at::empty({B * flow_sde_partials(B, D)}, x.options().dtype(at::kDouble));
  check_cuda(launch_flow_sde_step(to_dtype(x.scalar_type()), xc.data_ptr(), vc.data_ptr(),
                                  v_uncond ? vuc.data_ptr() : nullptr, cfg_scale, nc.data_ptr(), s.data_ptr(),
                                  sn.data_ptr(), noise_level, sigma_max, x_next.data_ptr(), mean.data_ptr(),
                                  std_out.data_ptr(), log_prob.data_ptr(), ws.data_ptr<double>(), B, D,
                                  c10::cuda::getCurrentCUDAStream()),
             "flow_sde_step");
  return {x_next, mean, std_out, log_prob};
}

Tensor flow_sde_logprob_cuda(const Tensor& x, const Tensor& v, const Tensor& x_next, const Tensor& sigma,
                             const Tensor& sigma_next, double noise_level, double sigma_max) {
  validate_flow_sde(x, {{&v, "v"}, {&x_next, "x_next"}}, sigma, sigma_next, noise_level, sigma_max);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = v.size(0), D = v.numel() / B;
  auto xc = x.contiguous(), vc = v.contiguous(), xnc = x_next.contiguous();
  auto s = sigma_as(sigma, v), sn = sigma_as(sigma_next, v);
  auto log_prob = at::empty({B}, v.options().dtype(acc_type(v.scalar_type())));
  auto ws = at::empty({B * flow_sde_partials(B, D)}, v.options().dtype(at::kDouble));
  check_cuda(launch_flow_sde_logprob(to_dtype(v.scalar_type()), xc.data_ptr(), vc.data_ptr(), xnc.data_ptr(),
                                     s.data_ptr(), sn.data_ptr(), noise_level, sigma_max, log_prob.data_ptr(),
                                     ws.data_ptr<double>(), B, D, c10::cuda::getCurrentCUDAStream()),
             "flow_sde_logprob");
  return log_prob;
}

std::tuple<Tensor, Tensor> flow_sde_logprob_backward_cuda(const Tensor& grad, const Tensor& x, const Tensor& v,
                                                          const Tensor& x_next, const Tensor& sigma,
                                                          const Tensor& sigma_next, double noise_level,
                                                          double sigma_max, bool need_grad_x) {
  validate_flow_sde(x, {{&v, "v"}, {&x_next, "x_next"}}, sigma, sigma_next, noise_level, sigma_max);
  const int64_t B = v.size(0), D = v.numel() / B;
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == B, "grad must be [", B, "], got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(), vc = v.contiguous(), xnc = x_next.contiguous();
  auto g = grad.to(acc_type(v.scalar_type())).contiguous();
  auto s = sigma_as(sigma, v), sn = sigma_as(sigma_next, v);
  auto grad_v = at::empty_like(vc);
  auto grad_x = need_grad_x ? at::empty_like(xc) : at::empty({0}, v.options());
  check_cuda(launch_flow_sde_logprob_backward(to_dtype(v.scalar_type()), g.data_ptr(), xc.data_ptr(), vc.data_ptr(),
                                              xnc.data_ptr(), s.data_ptr(), sn.data_ptr(), noise_level, sigma_max,
                                              grad_v.data_ptr(), need_grad_x ? grad_x.data_ptr() : nullptr, B, D,
                                              c10::cuda::getCurrentCUDAStream()),
             "flow_sde_logprob_backward");
  return {grad_v, grad_x};
}

Tensor grpo_advantages_cuda(const Tensor& rewards, const std::string& std_scope, double eps,
                            std::optional<double> clip) {
  validate_advantages(rewards, std_scope, eps, clip);
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto r = rewards.contiguous();
  auto out = at::empty(r.sizes(), r.options().dtype(acc_type(r.scalar_type())));
  const int scope = std_scope == "group" ? 0 : (std_scope == "batch" ? 1 : 2);
  check_cuda(launch_grpo_advantages(to_dtype(r.scalar_type()), r.data_ptr(), out.data_ptr(), r.size(0), r.size(1),
                                    scope, eps, clip.has_value(), clip.value_or(0.0),
                                    c10::cuda::getCurrentCUDAStream()),
             "grpo_advantages");
  return out;
}

Tensor4 grpo_token_loss_cuda(const Tensor& logits, const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                             const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                             double temperature, double eps_low, double eps_high, std::optional<double> dual_clip,
                             double beta, const std::string& ratio_level, const std::string& aggregation,
                             bool compute_grad) {
  validate_token_loss(logits, tokens, advantages, mask, old_logp, ref_logp, temperature, dual_clip, ratio_level,
                      aggregation);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_type(logits.scalar_type());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), N = B * T;
  // rows may be strided (e.g. a vocabulary slice); the vocabulary itself must be contiguous
  Tensor lg = logits.stride(2) == 1 && logits.stride(0) == T * logits.stride(1) ? logits : logits.contiguous();
  auto opts = logits.options().dtype(acc);
  auto loss = at::zeros({}, opts), metrics = at::zeros({3}, opts), logp = at::empty({B, T}, opts);
  auto grad = compute_grad ? at::empty({B, T, V}, logits.options()) : at::empty({0}, logits.options());
  if (N == 0) {
    if (compute_grad) grad.zero_();
    return {loss, metrics, logp, grad};
  }
  auto tok = tokens.contiguous();
  auto adv = advantages.to(acc).contiguous(), msk = mask.to(acc).contiguous();
  Tensor old = old_logp ? old_logp->to(acc).contiguous() : Tensor();
  Tensor ref = ref_logp ? ref_logp->to(acc).contiguous() : Tensor();
  auto ws = at::empty({token_loss_workspace(N)}, opts);
  auto flag = at::zeros({1}, logits.options().dtype(at::kInt));
  static const char* const kAggs[] = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"};
  int agg = 0;
  while (aggregation != kAggs[agg]) ++agg;
  TokenLossArgs a{};
  a.logits = lg.data_ptr();
  a.tokens = tok.data_ptr<int64_t>();
  a.advantages = adv.data_ptr();
  a.mask = msk.data_ptr();
  a.old_logp = old_logp ? old.data_ptr() : nullptr;
  a.ref_logp = ref_logp ? ref.data_ptr() : nullptr;
  a.B = B, a.T = T, a.V = V, a.row_stride = lg.stride(1);
  a.inv_temp = 1.0 / temperature, a.eps_low = eps_low, a.eps_high = eps_high;
  a.dual_clip = dual_clip.value_or(0.0), a.beta = beta;
  a.sequence_level = ratio_level == "sequence";
  a.aggregation = agg;
  a.loss = loss.data_ptr(), a.metrics = metrics.data_ptr(), a.logp = logp.data_ptr();
  a.grad_logits = compute_grad ? grad.data_ptr() : nullptr;
  a.workspace = ws.data_ptr();
  a.error_flag = flag.data_ptr<int>();
  check_cuda(launch_grpo_token_loss(to_dtype(logits.scalar_type()), a, c10::cuda::getCurrentCUDAStream()),
             "grpo_token_loss");
  if (!capturing()) {  // one int read back; skipped inside CUDA-graph capture
    const int f = flag.item<int>();
    TORCH_CHECK_INDEX(!(f & 1), "tokens must be in [0, ", V, ")");
    TORCH_CHECK_VALUE(!(f & 2), "logits has a non-finite value (NaN or +inf, or a row of -inf)");
  }
  return {loss, metrics, logp, grad};
}

Tensor4 flow_grpo_loss_cuda(const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                            const std::optional<Tensor>& kl, double clip_range, double beta) {
  validate_flow_grpo(logp, old_logp, advantages, kl);
  TORCH_CHECK_VALUE(clip_range > 0.0, "clip_range must be > 0, got ", clip_range);
  const c10::cuda::CUDAGuard guard(logp.device());
  const auto acc = acc_type(logp.scalar_type());
  auto lp = logp.to(acc).contiguous(), old = old_logp.to(acc).contiguous(), adv = advantages.to(acc).contiguous();
  Tensor k = kl ? kl->to(acc).contiguous() : Tensor();
  const int64_t B = lp.size(0), K = lp.size(1);
  auto opts = lp.options();
  auto loss = at::empty({}, opts), metrics = at::empty({3}, opts), grad_logp = at::empty({B, K}, opts);
  auto grad_kl = kl ? at::empty({B, K}, opts) : at::empty({0}, opts);
  check_cuda(launch_flow_grpo_loss(to_dtype(acc), lp.data_ptr(), old.data_ptr(), adv.data_ptr(),
                                   kl ? k.data_ptr() : nullptr, clip_range, beta, loss.data_ptr(), metrics.data_ptr(),
                                   grad_logp.data_ptr(), kl ? grad_kl.data_ptr() : nullptr, B, K,
                                   c10::cuda::getCurrentCUDAStream()),
             "flow_grpo_loss");
  return {loss, metrics, grad_logp, grad_kl};
}

}  // namespace alphagrpo
