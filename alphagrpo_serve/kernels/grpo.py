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


def grpo_advantages(rewards: torch.Tensor, std_scope: str = "batch", eps: float = 1e-4,
                    clip: Optional[float] = None) -> torch.Tensor:
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


def _as_bt(t: Optional[torch.Tensor], shape, name: str, device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of logits ({device}), got {t.device}")
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
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64:
        raise TypeError(f"tokens must be an int64 tensor, got {getattr(tokens, 'dtype', type(tokens))}")
    if tuple(tokens.shape) != (B, T):
        raise ValueError(f"tokens must be [{B}, {T}], got {tuple(tokens.shape)}")
    if tokens.device != logits.device:
        raise ValueError(f"tokens must be on the device of logits ({logits.device}), got {tokens.device}")
    if (tokens.device.type == "cpu" and not torch.compiler.is_compiling() and tokens.numel()
            and not bool(((tokens >= 0) & (tokens < V)).all())):
        raise IndexError(f"tokens must be in [0, {V}), got values in [{int(tokens.min())}, {int(tokens.max())}]")
    if mask is None:
        mask = torch.ones((B, T), dtype=torch.float32, device=logits.device)
    advantages = _as_bt(advantages, (B, T), "advantages", logits.device)
    mask = _as_bt(mask, (B, T), "mask", logits.device)
    old_logp = _as_bt(old_logp, (B, T), "old_logp", logits.device)
    ref_logp = _as_bt(ref_logp, (B, T), "ref_logp", logits.device)
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
    if use_fast_path("grpo_token_loss", logits):
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, metrics, logp, _ = torch.ops.alphagrpo.grpo_token_loss(
            logits, tokens, advantages, mask, old_logp, ref_logp, float(temperature), float(eps_low),
            float(eps_high), dual_clip, float(beta), ratio_level, aggregation, compute_grad)
        return LossOutput(loss, metrics, logp)
    return LossOutput(*reference.grpo_token_loss(logits, tokens, advantages, mask, old_logp, ref_logp, temperature,
                                                 eps_low, eps_high, dual_clip, beta, ratio_level, aggregation))


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
        loss, metrics, _, _ = torch.ops.alphagrpo.flow_grpo_loss(logp, old_logp, advantages, kl, float(clip_range),
                                                                 float(beta))
        return LossOutput(loss, metrics)
    return LossOutput(*reference.flow_grpo_loss(logp, old_logp, advantages, clip_range, kl, beta))
