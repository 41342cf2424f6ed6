// The one place that declares every op's schema, with one impl per device key. Fake (meta)
// implementations and autograd live in Python (alphagrpo_serve/kernels/_registry.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "alphagrpo/cpu_kernels.h"
#include "alphagrpo/linear_loss.h"
#include "alphagrpo/ops.h"

TORCH_LIBRARY(alphagrpo, m) {
  // flow-matching SDE sampling and its training-time log-prob recompute
  m.def("flow_sde_step(Tensor x, Tensor v, Tensor? v_uncond, float cfg_scale, Tensor sigma, Tensor sigma_next, "
        "float noise_level, float sigma_max, Tensor noise) -> (Tensor x_next, Tensor mean, Tensor std, Tensor log_prob)");
  m.def("flow_sde_logprob(Tensor x, Tensor v, Tensor x_next, Tensor sigma, Tensor sigma_next, float noise_level, "
        "float sigma_max) -> Tensor");
  m.def("flow_sde_logprob_backward(Tensor grad, Tensor x, Tensor v, Tensor x_next, Tensor sigma, Tensor sigma_next, "
        "float noise_level, float sigma_max, bool need_grad_x) -> (Tensor grad_v, Tensor grad_x)");
  // GRPO: advantages and losses
  m.def("grpo_advantages(Tensor rewards, str std_scope, float eps, float? clip) -> Tensor");
  m.def("grpo_token_loss(Tensor logits, Tensor tokens, Tensor advantages, Tensor mask, Tensor? old_logp, "
        "Tensor? ref_logp, float temperature, float eps_low, float eps_high, float? dual_clip, float beta, "
        "str ratio_level, str aggregation, bool compute_grad) -> (Tensor loss, Tensor metrics, Tensor logp, "
        "Tensor grad_logits)");
  m.def("grpo_linear_token_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor tokens, Tensor advantages, "
        "Tensor mask, Tensor? old_logp, Tensor? ref_logp, float temperature, float eps_low, float eps_high, "
        "float? dual_clip, float beta, str ratio_level, str aggregation, int? chunk_tokens, bool grad_hidden, "
        "bool grad_weight, bool grad_bias) -> (Tensor loss, Tensor metrics, Tensor logp, Tensor grad_hidden, "
        "Tensor grad_weight, Tensor grad_bias)");
  m.def("flow_grpo_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor? kl, float clip_range, float beta) "
        "-> (Tensor loss, Tensor metrics, Tensor grad_logp, Tensor grad_kl)");
}

TORCH_LIBRARY_IMPL(alphagrpo, CPU, m) {
  m.impl("flow_sde_step", &alphagrpo::flow_sde_step_cpu);
  m.impl("flow_sde_logprob", &alphagrpo::flow_sde_logprob_cpu);
  m.impl("flow_sde_logprob_backward", &alphagrpo::flow_sde_logprob_backward_cpu);
  m.impl("grpo_advantages", &alphagrpo::grpo_advantages_cpu);
  m.impl("grpo_token_loss", &alphagrpo::grpo_token_loss_cpu);
  m.impl("grpo_linear_token_loss", &alphagrpo::grpo_linear_token_loss_cpu);
  m.impl("flow_grpo_loss", &alphagrpo::flow_grpo_loss_cpu);
}

#ifdef ALPHAGRPO_WITH_CUDA
TORCH_LIBRARY_IMPL(alphagrpo, CUDA, m) {
  m.impl("flow_sde_step", &alphagrpo::flow_sde_step_cuda);
  m.impl("flow_sde_logprob", &alphagrpo::flow_sde_logprob_cuda);
  m.impl("flow_sde_logprob_backward", &alphagrpo::flow_sde_logprob_backward_cuda);
  m.impl("grpo_advantages", &alphagrpo::grpo_advantages_cuda);
  m.impl("grpo_token_loss", &alphagrpo::grpo_token_loss_cuda);
  m.impl("grpo_linear_token_loss", &alphagrpo::grpo_linear_token_loss_cuda);
  m.impl("flow_grpo_loss", &alphagrpo::flow_grpo_loss_cuda);
}
#endif

// Non-tensor facts about the build, for `alphagrpo info` and the tests.
PYBIND11_MODULE(_C, mod) {
  mod.doc() = "alphagrpo_serve native kernels (ops live under torch.ops.alphagrpo)";
#ifdef ALPHAGRPO_WITH_CUDA
  mod.attr("with_cuda") = true;
#else
  mod.attr("with_cuda") = false;
#endif
#ifdef ALPHAGRPO_CUDA_ARCHS
  mod.attr("cuda_archs") = ALPHAGRPO_CUDA_ARCHS;
#else
  mod.attr("cuda_archs") = "";
#endif
  // which vectorised CPU loops run (csrc/cpu/simd_*.cpp); tests and benchmarks switch them
  mod.def("cpu_isa", [] { return std::string(alphagrpo::cpu_kernels().name); }, "the active CPU loops");
  mod.def("cpu_isas", &alphagrpo::cpu_isas, "the CPU loops this machine runs, best first");
  mod.def("set_cpu_isa", &alphagrpo::set_cpu_isa, "select CPU loops by name; returns the previous name");
  // grpo_linear_token_loss's default budget for one chunk's logits
  mod.attr("linear_chunk_bytes") = alphagrpo::kLinearChunkBytes;
}
