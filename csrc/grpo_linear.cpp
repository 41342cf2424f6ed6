// The device-neutral driver of grpo_linear_token_loss: global normalisers first (token counts per
// sequence and in all, so every chunk's rows carry their final aggregation weight), then chunk by
// chunk over the flattened tokens: logits = hidden_chunk @ weight^T (+ bias) by a GEMM into one
// reused [chunk, vocab] buffer, the row kernel of the device (log-prob of the sampled token, ratio,
// clipping, KL, and the gradient of the loss w.r.t. the logits written over them), then the chunk's
// share of the gradients: grad_hidden rows = grad_logits @ weight, grad_weight += grad_logits^T @
// hidden_chunk, grad_bias += column sums. GEMMs go through ATen (oneDNN/MKL on the CPU, cuBLAS on
// CUDA, on the current stream); nothing here reads a device value back.
//
// GSPO (ratio_level = sequence) needs a whole sequence's log-probs before any of its tokens'
// gradients: chunks then hold whole sequences when chunk_tokens >= T (rounded down to a multiple of
// T; the row kernel reads each chunk's logits twice), and otherwise a first pass over all chunks
// computes the log-probs and a second pass recomputes each chunk's logits for the gradients.
#include "alphagrpo/linear_loss.h"

#include <algorithm>

namespace alphagrpo {

int64_t default_chunk_tokens(int64_t vocab, int64_t element_size) {
  return std::max<int64_t>(1, kLinearChunkBytes / std::max<int64_t>(1, vocab * element_size));
}

namespace {

// Per row: the masked mean of (logp - old) over the row's sequence (0 without old). logp, old,
// mask: [k * T] for k whole sequences.
Tensor seq_log_ratio(const Tensor& logp, const Tensor& old, const Tensor& mask, int64_t T) {
  const int64_t k = logp.size(0) / T;
  const Tensor lr = old.defined() ? (logp - old) * mask : at::zeros_like(logp);
  const Tensor per_seq = lr.view({k, T}).sum(1) / mask.view({k, T}).sum(1).clamp_min(1.0);
  return per_seq.unsqueeze(1).expand({k, T}).reshape({k * T}).contiguous();
}

// Per sequence weight of the aggregation (loss = sum over tokens of mask x weight_b x per-token
// loss), the same rule as grpo_math.h's aggregation_weight.
Tensor aggregation_weights(const std::string& aggregation, const Tensor& seq_total, const Tensor& total, int64_t B,
                           int64_t T) {
  if (aggregation == "token-mean") return total.clamp_min(1.0).reciprocal().expand({B});
  if (aggregation == "seq-mean-token-mean") return (seq_total.clamp_min(1.0) * static_cast<double>(B)).reciprocal();
  if (aggregation == "seq-mean-token-sum") return at::full({B}, 1.0 / static_cast<double>(B), seq_total.options());
  return at::full({B}, 1.0 / (static_cast<double>(B) * static_cast<double>(T)), seq_total.options());
}

}  // namespace

Tensor6 grpo_linear_token_loss_impl(LinearRows& rows, const LinearLossArgs& a) {
  validate_linear_token_loss(a.hidden, a.weight, a.bias, a.tokens, a.advantages, a.mask, a.old_logp, a.ref_logp,
                             a.temperature, a.dual_clip, a.ratio_level, a.aggregation, a.chunk_tokens, a.grad_bias);
  const int64_t B = a.hidden.size(0), T = a.hidden.size(1), H = a.hidden.size(2), V = a.weight.size(0);
  const int64_t N = B * T;
  const auto acc = a.hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = a.hidden.options().dtype(acc);
  const bool sequence_level = a.ratio_level == "sequence";
  const bool any_grad = a.grad_hidden || a.grad_weight || a.grad_bias;

  const Tensor X = a.hidden.reshape({N, H}).contiguous();  // [N, H]
  const Tensor W = a.weight.contiguous();                    // [V, H]
  const Tensor bias = a.bias ? a.bias->contiguous() : Tensor();
  auto flat = [&](const Tensor& t) { return t.to(acc).reshape({N}).contiguous(); };
  const Tensor tok = a.tokens.reshape({N}).contiguous();
  const Tensor adv = flat(a.advantages), msk = flat(a.mask);
  const Tensor old = a.old_logp ? flat(*a.old_logp) : Tensor();
  const Tensor ref = a.ref_logp ? flat(*a.ref_logp) : Tensor();

  // Global normalisers, before any chunk.
  const Tensor seq_total = msk.view({B, T}).sum(1);  // [B]
  const Tensor total = seq_total.sum();               // []
  const Tensor scale = (msk.view({B, T}) * aggregation_weights(a.aggregation, seq_total, total, B, T).unsqueeze(1))
                           .reshape({N})
                           .contiguous();

  Tensor logp = at::empty({N}, acc_opts);
  Tensor contrib = at::empty({N, 4}, acc_opts);
  Tensor gh = a.grad_hidden ? at::empty({N, H}, a.hidden.options()) : at::empty({0}, a.hidden.options());
  Tensor gw = a.grad_weight ? at::empty_like(W) : at::empty({0}, a.weight.options());
  Tensor gb = a.grad_bias ? at::zeros({V}, acc_opts) : Tensor();
  const LinearLossParams p{1.0 / a.temperature, a.eps_low, a.eps_high, a.dual_clip.value_or(0.0), a.beta,
                           a.ref_logp.has_value()};

  if (N > 0) {
    rows.check_tokens(tok, V, T);
    int64_t C = std::min(N, a.chunk_tokens.value_or(default_chunk_tokens(V, a.hidden.element_size())));
    const bool aligned = sequence_level && C >= T;  // chunks of whole sequences
    if (aligned) C = (C / T) * T;
    Tensor buf = at::empty({C, V}, a.hidden.options());  // the only logits there are: one chunk
    Tensor norm_scratch = sequence_level && !aligned ? at::empty({N, 2}, acc_opts) : at::empty({C, 2}, acc_opts);

    auto slice = [&](int64_t n0, int64_t c) {
      auto part = [&](const Tensor& t) { return t.defined() ? t.narrow(0, n0, c) : Tensor(); };
      return RowSlice{n0, T, part(tok), part(adv), part(msk), part(scale), part(old), part(ref), Tensor()};
    };
    auto logits_of = [&](int64_t n0, int64_t c) {
      Tensor out = buf.narrow(0, 0, c);
      const Tensor xc = X.narrow(0, n0, c);
      if (bias.defined()) at::addmm_out(out, bias, xc, W.t());
      else at::mm_out(out, xc, W.t());
      return out;
    };
    bool first_weight_grad = true;
    auto accumulate_grads = [&](const Tensor& g, int64_t n0, int64_t c) {  // g: [c, V] d loss / d logits
      if (a.grad_hidden) {
        Tensor gh_rows = gh.narrow(0, n0, c);
        at::mm_out(gh_rows, g, W);
      }
      if (a.grad_weight) {
        if (first_weight_grad) at::mm_out(gw, g.t(), X.narrow(0, n0, c));
        else gw.addmm_(g.t(), X.narrow(0, n0, c));
        first_weight_grad = false;
      }
      if (a.grad_bias) gb.add_(g.sum(0, false, acc));
    };
    auto chunks = [&](auto&& fn) {
      for (int64_t n0 = 0; n0 < N; n0 += C) fn(n0, std::min(C, N - n0));
    };

    if (!sequence_level) {
      chunks([&](int64_t n0, int64_t c) {
        const Tensor L = logits_of(n0, c);
        rows.loss(L, slice(n0, c), p, false, any_grad, norm_scratch.narrow(0, 0, c), logp.narrow(0, n0, c),
                  contrib.narrow(0, n0, c));
        if (any_grad) accumulate_grads(L, n0, c);
      });
    } else if (aligned) {
      chunks([&](int64_t n0, int64_t c) {
        const Tensor L = logits_of(n0, c);
        RowSlice s = slice(n0, c);
        const Tensor nrm = norm_scratch.narrow(0, 0, c), lp = logp.narrow(0, n0, c);
        rows.norm(L, s, p, nrm, lp);
        s.log_ratio = seq_log_ratio(lp, s.old, s.mask, T);
        rows.loss(L, s, p, true, any_grad, nrm, lp, contrib.narrow(0, n0, c));
        if (any_grad) accumulate_grads(L, n0, c);
      });
    } else {
      chunks([&](int64_t n0, int64_t c) {
        rows.norm(logits_of(n0, c), slice(n0, c), p, norm_scratch.narrow(0, n0, c), logp.narrow(0, n0, c));
      });
      const Tensor lr = seq_log_ratio(logp, old, msk, T);
      chunks([&](int64_t n0, int64_t c) {
        const Tensor L = any_grad ? logits_of(n0, c) : Tensor();  // terms alone need no logits
        RowSlice s = slice(n0, c);
        s.log_ratio = lr.narrow(0, n0, c);
        rows.loss(L, s, p, true, any_grad, norm_scratch.narrow(0, n0, c), logp.narrow(0, n0, c),
                  contrib.narrow(0, n0, c));
        if (any_grad) accumulate_grads(L, n0, c);
      });
    }
    rows.finish();
  } else if (a.grad_weight) {
    gw.zero_();
  }

  // Reductions in float64 (ATen's sum order is fixed for a given size and device).
  const Tensor sums = contrib.sum(0, false, at::kDouble);  // [4]
  const Tensor loss = sums[0].to(acc);
  const Tensor metrics = (sums.narrow(0, 1, 3) / total.to(at::kDouble).clamp_min(1.0)).to(acc);
  return {loss,
          metrics,
          logp.view({B, T}),
          a.grad_hidden ? gh.view({B, T, H}) : gh,
          gw,
          a.grad_bias ? gb.to(a.hidden.scalar_type()) : at::empty({0}, a.hidden.options())};
}

}  // namespace alphagrpo
