"""GRPO advantages and losses: typed wrappers over torch.ops.alphagrpo."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import reference
from ._registry import use_fast_path
from .reference import AGGREGATIONS, RATIO_LEVELS, STD_SCOPES


class LossOutput(NamedTuple):
    loss: torch.Tensor  # [] float32, differentiable
    metrics: torch.Tensor  # [3] float32: mean ratio, clip fraction, mean KL (masked means)
    logp: Optional[torch.Tensor] = None  # [B, T] float32 token log-probs (token loss only)

    def metrics_dict(self) -> dict:
        ratio, clip_frac, kl = self.metrics.tolist()
        return {"ratio_mean": ratio, "clip_frac": clip_frac, "kl": kl}


def _choice(value: str, valid, name: str) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")


def _finite(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def grpo_advantages(
    rewards: torch.Tensor, std_scope: str = "batch", eps: float = 1e-4, clip: Optional[float] = None
) -> torch.Tensor:
    """Group-relative advantages: rewards [P, G] (P prompts x G samples) -> [P, G] float32.

    Subtracts each prompt's group mean, then divides by (std + eps) with std the population std of
    the group ('group') or of the whole batch ('batch', as AlphaGRPO), or by nothing ('none');
    clamps to [-clip, clip] when clip is given.
    """
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating torch.Tensor, got {getattr(rewards, 'dtype', type(rewards))}")
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be [prompts, group] and non-empty, got shape {tuple(rewards.shape)}")
    _choice(std_scope, STD_SCOPES, "std_scope")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 when given, got {clip}")
    _finite(rewards, "rewards")
    if use_fast_path("grpo_advantages", rewards):
        return torch.ops.alphagrpo.grpo_advantages(rewards, std_scope, float(eps), clip)
    return reference.grpo_advantages(rewards, std_scope, eps, clip)


def _as_bt(t: Optional[torch.Tensor], shape, name: str, device, ref_name: str = "logits") -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({device}), got {t.device}")
    if name == "advantages" and t.dim() == 1 and t.shape[0] == shape[0]:
        t = t.unsqueeze(1).expand(shape)
    if tuple(t.shape) != tuple(shape):
        extra = f" or [{shape[0]}]" if name == "advantages" else ""
        raise ValueError(f"{name} must be [{shape[0]}, {shape[1]}]{extra}, got {tuple(t.shape)}")
    if t.dtype == torch.bool:
        t = t.float()
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating (or bool for mask), got {t.dtype}")
    if name != "mask":
        _finite(t, name)
    return t


def _token_args(
    B: int,
    T: int,
    V: int,
    device,
    ref_name: str,
    tokens,
    advantages,
    mask,
    old_logp,
    ref_logp,
    temperature,
    eps_low,
    eps_high,
    dual_clip,
    beta,
    ratio_level,
    aggregation,
):
    """Checks the arguments shared by the token losses (each error names its argument); returns
    (advantages, mask, old_logp, ref_logp) as [B, T] floating tensors (mask None: all ones)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64:
        raise TypeError(f"tokens must be an int64 tensor, got {getattr(tokens, 'dtype', type(tokens))}")
    if tuple(tokens.shape) != (B, T):
        raise ValueError(f"tokens must be [{B}, {T}], got {tuple(tokens.shape)}")
    if tokens.device != device:
        raise ValueError(f"tokens must be on the device of {ref_name} ({device}), got {tokens.device}")
    if (
        tokens.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and tokens.numel()
        and not bool(((tokens >= 0) & (tokens < V)).all())
    ):
        raise IndexError(f"tokens must be in [0, {V}), got values in [{int(tokens.min())}, {int(tokens.max())}]")
    if mask is None:
        mask = torch.ones((B, T), dtype=torch.float32, device=device)
    advantages = _as_bt(advantages, (B, T), "advantages", device, ref_name)
    mask = _as_bt(mask, (B, T), "mask", device, ref_name)
    old_logp = _as_bt(old_logp, (B, T), "old_logp", device, ref_name)
    ref_logp = _as_bt(ref_logp, (B, T), "ref_logp", device, ref_name)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 when given, got {dual_clip}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    _choice(ratio_level, RATIO_LEVELS, "ratio_level")
    _choice(aggregation, AGGREGATIONS, "aggregation")
    if ref_logp is None and beta != 0.0:
        raise ValueError("beta != 0 needs ref_logp (the reference policy's token log-probs)")
    return advantages, mask, old_logp, ref_logp


def grpo_token_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: Optional[float] = None,
    beta: float = 0.0,
    ratio_level: str = "token",
    aggregation: str = "token-mean",
) -> LossOutput:
    """Fused GRPO clipped-surrogate loss from logits.

    logits [B, T, V] (any float dtype); tokens [B, T] int64 (the sampled ids); advantages [B] or
    [B, T]; mask [B, T] bool/float (None: all ones); old_logp, ref_logp [B, T] (old None:
    on-policy). ratio_level 'token' or 'sequence' (GSPO-token). dual_clip c > 1 bounds the loss of
    negative-advantage tokens by -c A. beta weights the k3 KL to ref_logp. aggregation: one of
    token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm.

    The gradient w.r.t. logits is computed in the same pass (in the logits' dtype) when logits
    require grad; no float32 log-softmax of the logits is materialised.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating torch.Tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() != 3 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [batch, tokens, vocab], got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    advantages, mask, old_logp, ref_logp = _token_args(
        B,
        T,
        V,
        logits.device,
        "logits",
        tokens,
        advantages,
        mask,
        old_logp,
        ref_logp,
        temperature,
        eps_low,
        eps_high,
        dual_clip,
        beta,
        ratio_level,
        aggregation,
    )
    if use_fast_path("grpo_token_loss", logits):
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, metrics, logp, _ = torch.ops.alphagrpo.grpo_token_loss(
            logits,
            tokens,
            advantages,
            mask,
            old_logp,
            ref_logp,
            float(temperature),
            float(eps_low),
            float(eps_high),
            dual_clip,
            float(beta),
            ratio_level,
            aggregation,
            compute_grad,
        )
        return LossOutput(loss, metrics, logp)
    return LossOutput(
        *reference.grpo_token_loss(
            logits,
            tokens,
            advantages,
            mask,
            old_logp,
            ref_logp,
            temperature,
            eps_low,
            eps_high,
            dual_clip,
            beta,
            ratio_level,
            aggregation,
        )
    )


def grpo_linear_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: Optional[float] = None,
    beta: float = 0.0,
    ratio_level: str = "token",
    aggregation: str = "token-mean",
    chunk_tokens: Optional[int] = None,
) -> LossOutput:
    """Fused linear GRPO token loss: grpo_token_loss(hidden @ weight.T (+ bias), ...) without ever
    forming the [B * T, V] logits.

    hidden [B, T, H] (float32, bfloat16, float16 or float64); weight [V, H], the LM head, and bias
    [V] or None, both in hidden's dtype; tokens, advantages, mask, old_logp, ref_logp and every
    option as in grpo_token_loss. Returns LossOutput(loss [], metrics [3], logp [B, T] float32),
    equal to grpo_token_loss's on the same logits.

    The tokens are processed in chunks of `chunk_tokens` (None: as many as keep one chunk's logits
    within 256 MiB, `build_info()['linear_chunk_bytes']`: 883 tokens of a 151,936-entry bf16
    vocabulary). Per chunk: a GEMM forms the logits (in hidden's dtype, as the unfused product
    rounds them), the row kernel writes d loss / d logits over them, and the chunk's share of the
    gradients of hidden, weight and bias is accumulated before the next chunk. Gradients are
    computed in this forward call for every one of hidden, weight, bias that requires grad (a
    frozen weight costs no weight-gradient GEMM); backward only scales them. 16-bit weight
    gradients are accumulated in the weight's dtype, so they round once per chunk. With
    ratio_level='sequence' chunks hold whole sequences when chunk_tokens >= T; otherwise each
    chunk's logits are computed twice (log-probs first, gradients after).
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating torch.Tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if hidden.dim() != 3 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be [batch, tokens, hidden], got shape {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    if not isinstance(weight, torch.Tensor) or weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight must be a tensor of hidden's dtype ({hidden.dtype}), got {getattr(weight, 'dtype', type(weight))}"
        )
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight must be [vocab, {H}] (the LM head), got shape {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on the device of hidden ({hidden.device}), got {weight.device}")
    V = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != hidden.dtype:
            raise TypeError(
                f"bias must be a tensor of hidden's dtype ({hidden.dtype}), got {getattr(bias, 'dtype', type(bias))}"
            )
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be [{V}], got shape {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias must be on the device of hidden ({hidden.device}), got {bias.device}")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    advantages, mask, old_logp, ref_logp = _token_args(
        B,
        T,
        V,
        hidden.device,
        "hidden",
        tokens,
        advantages,
        mask,
        old_logp,
        ref_logp,
        temperature,
        eps_low,
        eps_high,
        dual_clip,
        beta,
        ratio_level,
        aggregation,
    )
    if use_fast_path("grpo_linear_token_loss", hidden):
        grad = torch.is_grad_enabled()
        loss, metrics, logp, *_ = torch.ops.alphagrpo.grpo_linear_token_loss(
            hidden,
            weight,
            bias,
            tokens,
            advantages,
            mask,
            old_logp,
            ref_logp,
            float(temperature),
            float(eps_low),
            float(eps_high),
            dual_clip,
            float(beta),
            ratio_level,
            aggregation,
            chunk_tokens,
            grad and hidden.requires_grad,
            grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad,
        )
        return LossOutput(loss, metrics, logp)
    return LossOutput(
        *reference.grpo_linear_token_loss(
            hidden,
            weight,
            tokens,
            advantages,
            mask,
            bias,
            old_logp,
            ref_logp,
            temperature,
            eps_low,
            eps_high,
            dual_clip,
            beta,
            ratio_level,
            aggregation,
        )
    )


def flow_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    kl: Optional[torch.Tensor] = None,
    beta: float = 0.0,
) -> LossOutput:
    """Flow-GRPO clipped surrogate over per-step image log-probs.

    logp, old_logp [B, K] (K SDE-window steps per sample); advantages [B]; kl [B, K] per-step KL of
    the step means (see kernels.step_mean_kl) or None. loss = mean over (b, k) of
    max(-A r, -A clamp(r, 1 - clip_range, 1 + clip_range)) + beta * mean(kl). Differentiable in logp and kl.
    """
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("kl", kl)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            raise TypeError(f"{name} must be a floating torch.Tensor")
    if logp.dim() != 2 or logp.numel() == 0:
        raise ValueError(f"logp must be [batch, steps] and non-empty, got {tuple(logp.shape)}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(old_logp.shape)}")
    if advantages.shape != (logp.shape[0],):
        raise ValueError(f"advantages must be [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if kl is not None and kl.shape != logp.shape:
        raise ValueError(f"kl must have the shape of logp {tuple(logp.shape)}, got {tuple(kl.shape)}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        if t.device != logp.device:
            raise ValueError(f"{name} must be on the device of logp ({logp.device}), got {t.device}")
        _finite(t.detach(), name)
    if use_fast_path("flow_grpo_loss", logp):
        loss, metrics, _, _ = torch.ops.alphagrpo.flow_grpo_loss(
            logp, old_logp, advantages, kl, float(clip_range), float(beta)
        )
        return LossOutput(loss, metrics)
    return LossOutput(*reference.flow_grpo_loss(logp, old_logp, advantages, clip_range, kl, beta))
