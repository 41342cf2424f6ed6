// Host launchers of the CUDA kernels: raw pointers, sizes and a stream only (no torch types), so
// the .cu files build with plain nvcc. The torch glue in csrc/cuda/*_glue.cpp checks arguments,
// allocates outputs, sets the device guard and passes the current stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace alphagrpo {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ---- flow-matching SDE -------------------------------------------------------------------------
// x, v, v_uncond (nullable), noise, x_next, mean: [B, D] in `dtype`; sigma, sigma_next, std_out,
// log_prob: [B] in the accumulation type (float64 for kFloat64, else float32). workspace: float64
// [B * flow_sde_partials(B, D)].
int64_t flow_sde_partials(int64_t B, int64_t D);
cudaError_t launch_flow_sde_step(DType dtype, const void* x, const void* v, const void* v_uncond, double cfg_scale,
                                 const void* noise, const void* sigma, const void* sigma_next, double noise_level,
                                 double sigma_max, void* x_next, void* mean, void* std_out, void* log_prob,
                                 double* workspace, int64_t B, int64_t D, cudaStream_t stream);
// x, v, x_next: [B, D]; log_prob: [B] (accumulation type); workspace as above.
cudaError_t launch_flow_sde_logprob(DType dtype, const void* x, const void* v, const void* x_next, const void* sigma,
                                    const void* sigma_next, double noise_level, double sigma_max, void* log_prob,
                                    double* workspace, int64_t B, int64_t D, cudaStream_t stream);
// grad: [B] (accumulation type); grad_v, grad_x (nullable): [B, D] in `dtype`.
cudaError_t launch_flow_sde_logprob_backward(DType dtype, const void* grad, const void* x, const void* v,
                                             const void* x_next, const void* sigma, const void* sigma_next,
                                             double noise_level, double sigma_max, void* grad_v, void* grad_x,
                                             int64_t B, int64_t D, cudaStream_t stream);

// ---- GRPO ---------------------------------------------------------------------------------------
// rewards: [P, G] in `dtype`; out: [P, G] in the accumulation type. std_scope: 0 group, 1 batch, 2 none.
cudaError_t launch_grpo_advantages(DType dtype, const void* rewards, void* out, int64_t P, int64_t G, int std_scope,
                                   double eps, bool has_clip, double clip, cudaStream_t stream);

struct TokenLossArgs {
  const void* logits;      // [N, V] in `dtype`, row stride `row_stride` elements
  const int64_t* tokens;   // [N]
  const void* advantages;  // [N] accumulation type
  const void* mask;        // [N] accumulation type
  const void* old_logp;    // [N] accumulation type, nullable
  const void* ref_logp;    // [N] accumulation type, nullable
  int64_t B, T, V, row_stride;
  double inv_temp, eps_low, eps_high, dual_clip, beta;  // dual_clip <= 0: off
  bool sequence_level;
  int aggregation;         // alphagrpo::Aggregation
  // outputs
  void* loss;              // [] accumulation type
  void* metrics;           // [3] accumulation type
  void* logp;              // [N] accumulation type
  void* grad_logits;       // [N, V] contiguous in `dtype`, nullable (no gradient)
  void* workspace;         // accumulation type, token_loss_workspace(N) elements
  int* error_flag;         // [1] int, set to 1 + first bad row index's presence (bad token or non-finite row)
};
int64_t token_loss_workspace(int64_t N);
cudaError_t launch_grpo_token_loss(DType dtype, const TokenLossArgs& a, cudaStream_t stream);

// One chunk of rows of grpo_linear_token_loss: the token loss's row kernels on contiguous rows,
// with per-row aggregation weights given (the driver computes them for the whole batch first).
struct TokenRowsArgs {
  const void* logits;      // [n, V] in `dtype`, contiguous; unused (may be null) with norms_given && !grad
  void* grad;              // [n, V] in `dtype`, nullable (no gradient); may be `logits`: written in place
  const int64_t* tokens;   // [n]
  const void* advantages;  // [n] accumulation type
  const void* scale;       // [n] accumulation type: aggregation weight x mask
  const void* mask;        // [n] accumulation type
  const void* old_logp;    // [n] accumulation type, nullable
  const void* ref_logp;    // [n] accumulation type, nullable
  const void* log_ratio;   // [n] accumulation type, nullable: the ratio's log when given (sequence level)
  int64_t n, V;
  double inv_temp, eps_low, eps_high, dual_clip, beta;  // dual_clip <= 0: off
  bool has_ref;
  bool norms_given;        // norm and logp are inputs (else computed)
  bool norm_only;          // stop after norm and logp
  void* norm;              // [n, 2] accumulation type: (shift, log_sum) per row
  void* logp;              // [n] accumulation type
  void* contrib;           // [n, 4] accumulation type: scale x loss, mask x ratio, mask x clipped, mask x kl
  void* coef;              // [n] accumulation type, workspace
  int* error_flag;         // [1]: |= 1 for a token outside [0, V), |= 2 for a non-finite row
};
cudaError_t launch_token_rows(DType dtype, const TokenRowsArgs& a, cudaStream_t stream);

// logp, old_logp, advantages, kl (nullable): accumulation type; [B, K], [B, K], [B], [B, K].
// loss [], metrics [3], grad_logp [B, K], grad_kl [B, K] (nullable).
cudaError_t launch_flow_grpo_loss(DType dtype, const void* logp, const void* old_logp, const void* advantages,
                                  const void* kl, double clip_range, double beta, void* loss, void* metrics,
                                  void* grad_logp, void* grad_kl, int64_t B, int64_t K, cudaStream_t stream);

}  // namespace alphagrpo
