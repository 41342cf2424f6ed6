// CUDA row backend of grpo_linear_token_loss (the driver, csrc/grpo_linear.cpp, runs the cuBLAS GEMMs
// through ATen on the current stream): the token loss's row kernels (csrc/cuda/grpo.cu,
// launch_token_rows) on each chunk's logits, the gradient written over them in place. Bad tokens
// and non-finite rows raise one error flag on the device, read once after the last chunk (not
// under CUDA-graph capture).
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "alphagrpo/cpu_common.h"
#include "alphagrpo/cuda_launch.h"
#include "alphagrpo/linear_loss.h"

namespace alphagrpo {
namespace {

DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

class LinearRowsCuda final : public LinearRows {
 public:
  LinearRowsCuda(at::ScalarType dtype, const Tensor& like)
      : dtype_(dtype), flag_(at::zeros({1}, like.options().dtype(at::kInt))) {}

  void check_tokens(const Tensor&, int64_t V, int64_t) override { vocab_ = V; }  // checked by the row kernel

  void norm(const Tensor& logits, const RowSlice& rows, const LinearLossParams& p, const Tensor& norm,
            const Tensor& logp) override {
    launch(logits, rows, p, /*norms_given=*/false, /*norm_only=*/true, /*grad=*/false, norm, logp, Tensor());
  }

  void loss(const Tensor& logits, const RowSlice& rows, const LinearLossParams& p, bool norms_given, bool grad,
            const Tensor& norm, const Tensor& logp, const Tensor& contrib) override {
    launch(logits, rows, p, norms_given, /*norm_only=*/false, grad, norm, logp, contrib);
  }

  void finish() override {
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
    const int f = flag_.item<int>();
    TORCH_CHECK_INDEX(!(f & 1), "tokens must be in [0, ", vocab_, ") (the rows of weight)");
    TORCH_CHECK_VALUE(!(f & 2), "hidden @ weight.T (+ bias) has a non-finite logit (NaN or +inf): check hidden, "
                                "weight and bias");
  }

 private:
  void launch(const Tensor& logits, const RowSlice& rows, const LinearLossParams& p, bool norms_given,
              bool norm_only, bool grad, const Tensor& norm, const Tensor& logp, const Tensor& contrib) {
    TokenRowsArgs a{};
    a.logits = ptr_or_null(logits);
    a.grad = grad ? logits.data_ptr() : nullptr;
    a.tokens = rows.tokens.data_ptr<int64_t>();
    a.advantages = rows.adv.data_ptr();
    a.scale = rows.scale.data_ptr();
    a.mask = rows.mask.data_ptr();
    a.old_logp = ptr_or_null(rows.old);
    a.ref_logp = ptr_or_null(rows.ref);
    a.log_ratio = ptr_or_null(rows.log_ratio);
    a.n = rows.tokens.numel();
    a.V = logits.defined() ? logits.size(1) : vocab_;
    a.inv_temp = p.inv_temp, a.eps_low = p.eps_low, a.eps_high = p.eps_high, a.dual_clip = p.dual_clip;
    a.beta = p.beta, a.has_ref = p.has_ref;
    a.norms_given = norms_given, a.norm_only = norm_only;
    a.norm = norm.data_ptr(), a.logp = logp.data_ptr();
    Tensor coef;
    if (!norm_only) {
      coef = at::empty({a.n}, norm.options());
      a.contrib = contrib.data_ptr();
      a.coef = coef.data_ptr();
    }
    a.error_flag = flag_.data_ptr<int>();
    const cudaError_t err = launch_token_rows(cuda_dtype(dtype_), a, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "grpo_linear_token_loss: CUDA launch failed: ", cudaGetErrorString(err));
  }

  at::ScalarType dtype_;
  Tensor flag_;
  int64_t vocab_ = 0;
};

}  // namespace

Tensor6 grpo_linear_token_loss_cuda(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                    const Tensor& tokens, const Tensor& advantages, const Tensor& mask,
                                    const std::optional<Tensor>& old_logp, const std::optional<Tensor>& ref_logp,
                                    double temperature, double eps_low, double eps_high,
                                    std::optional<double> dual_clip, double beta, const std::string& ratio_level,
                                    const std::string& aggregation, std::optional<int64_t> chunk_tokens,
                                    bool grad_hidden, bool grad_weight, bool grad_bias) {
  check_floating(hidden, "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  LinearRowsCuda rows(hidden.scalar_type(), hidden);
  return grpo_linear_token_loss_impl(
      rows, LinearLossArgs{hidden, weight, bias, tokens, advantages, mask, old_logp, ref_logp, temperature, eps_low,
                           eps_high, dual_clip, beta, ratio_level, aggregation, chunk_tokens, grad_hidden,
                           grad_weight, grad_bias});
}

}  // namespace alphagrpo
