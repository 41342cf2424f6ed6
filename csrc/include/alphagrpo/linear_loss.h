// grpo_linear_token_loss: the GRPO token loss from hidden states and the LM head, chunk by chunk
// over tokens, so that the [tokens, vocab] logits never exist. One device-neutral driver
// (csrc/grpo_linear.cpp: normalisers, the chunk loop, GEMMs through ATen, reductions) over a
// per-device row backend (csrc/cpu/grpo_linear.cpp, csrc/cuda/grpo_linear_glue.cpp) that runs
// the same row kernel as grpo_token_loss on each chunk's logits.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "alphagrpo/ops.h"

namespace alphagrpo {

// Default budget for one chunk's logits: chunk_tokens = max(1, kLinearChunkBytes / (vocab x
// element size)), e.g. 883 tokens of a 151,936-entry bf16 vocabulary, 441 in float32.
constexpr int64_t kLinearChunkBytes = int64_t(256) << 20;
int64_t default_chunk_tokens(int64_t vocab, int64_t element_size);

struct LinearLossParams {
  double inv_temp, eps_low, eps_high;
  double dual_clip;  // <= 0: off
  double beta;
  bool has_ref;
};

// One chunk's rows [n0, n0 + c) of the flattened [B * T] batch: per-row tensors, each [c] and
// contiguous, in the accumulation type (tokens int64). scale = aggregation weight x mask (the loss
// is sum over rows of scale x per-token loss). old, ref, log_ratio may be undefined; log_ratio
// (sequence level) replaces logp - old.
struct RowSlice {
  int64_t n0, T;  // to name a row as (n / T, n % T) in errors
  Tensor tokens, adv, mask, scale, old, ref, log_ratio;
};

// The per-device row work on one chunk of logits [c, V] (contiguous, in hidden's dtype).
class LinearRows {
 public:
  virtual ~LinearRows() = default;
  // Raises IndexError naming the first token outside [0, V) (or defers that to finish()).
  virtual void check_tokens(const Tensor& tokens, int64_t V, int64_t T) = 0;
  // Row normalisers norm [c, 2] = (shift, log_sum) and sampled-token log-probs logp [c].
  virtual void norm(const Tensor& logits, const RowSlice& rows, const LinearLossParams& p, const Tensor& norm,
                    const Tensor& logp) = 0;
  // The fused pass: unless norms_given, norm and logp as above; then per row the clipped surrogate
  // and KL, contrib [4, c] = (scale x loss, mask x ratio, mask x clipped, mask x kl), and with
  // grad the gradient of the loss w.r.t. the logits written over `logits`. With norms_given and
  // no grad, `logits` may be undefined.
  virtual void loss(const Tensor& logits, const RowSlice& rows, const LinearLossParams& p, bool norms_given,
                    bool grad, const Tensor& norm, const Tensor& logp, const Tensor& contrib) = 0;
  // Called once after the last chunk (the CUDA backend reads its error flag here).
  virtual void finish() {}
};

struct LinearLossArgs {
  const Tensor& hidden;  // [B, T, H]
  const Tensor& weight;  // [V, H]
  const std::optional<Tensor>& bias;  // [V]
  const Tensor& tokens;  // [B, T] int64
  const Tensor& advantages;  // [B, T]
  const Tensor& mask;  // [B, T]
  const std::optional<Tensor>& old_logp;  // [B, T]
  const std::optional<Tensor>& ref_logp;  // [B, T]
  double temperature, eps_low, eps_high;
  std::optional<double> dual_clip;
  double beta;
  const std::string& ratio_level;
  const std::string& aggregation;
  std::optional<int64_t> chunk_tokens;
  bool grad_hidden, grad_weight, grad_bias;
};

Tensor6 grpo_linear_token_loss_impl(LinearRows& rows, const LinearLossArgs& a);

}  // namespace alphagrpo
