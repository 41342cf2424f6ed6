"""Plain-PyTorch reference implementations: the specification of every kernel.

Every fast path (C++ CPU, CUDA) is tested against these functions evaluated in float64.
They are also the runtime fallback when the extension is not built.  Math runs in float32
(or float64 when the input is float64) whatever the input dtype; outputs that live in the
input's space (x_next, mean, advantages of a half tensor) come back in the input dtype.

The formulas follow shared/ARCHITECTURE.md, section "Kernels".
"""

from __future__ import annotations

import math
from typing import Optional

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

STD_SCOPES = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] per-sample tensor so it broadcasts over like's non-batch dims."""
    return v.reshape([-1] + [1] * (like.dim() - 1))


def sde_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float, sigma_max: float):
    """Per-sample coefficients of one flow-matching SDE step.

    Returns (a, b, std, scale) with mean = a * x + b * v and x_next = mean + scale * noise,
    where scale = std * sqrt(-dt) is the standard deviation of x_next around the mean.
    """
    dt = sigma_next - sigma
    s = torch.where(sigma == 1.0, torch.full_like(sigma, sigma_max), sigma)
    std = noise_level * torch.sqrt(sigma / (1.0 - s))
    a = 1.0 + std * std / (2.0 * sigma) * dt
    b = (1.0 + std * std * (1.0 - sigma) / (2.0 * sigma)) * dt
    scale = std * torch.sqrt(-dt)
    return a, b, std, scale


def _gaussian_logprob(x_next: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch dims of log N(x_next; mean, scale^2); 0 for a sample whose scale is 0
    (a deterministic step has no density: the ODE limit)."""
    dims = list(range(1, x_next.dim()))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    sc = _per_sample(safe, x_next)
    lp = -((x_next - mean) ** 2) / (2.0 * sc * sc) - torch.log(sc) - LOG_SQRT_2PI
    lp = lp.mean(dim=dims) if dims else lp
    return torch.where(scale > 0, lp, torch.zeros_like(lp))


def cfg_combine(v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor], cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond); v_cond when v_uncond is None."""
    if v_uncond is None:
        return v_cond
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def flow_sde_step(x, v, sigma, sigma_next, noise_level, sigma_max, noise, v_uncond=None, cfg_scale=1.0):
    """One SDE step of a rectified-flow sampler.

    x, v, noise, v_uncond: [B, ...]; sigma, sigma_next: [B].
    Returns x_next [B, ...] (x.dtype), mean [B, ...] (x.dtype), std [B] and log_prob [B] (float32/64).
    """
    acc = _acc_dtype(x)
    xf, vf, nf = x.to(acc), v.to(acc), noise.to(acc)
    vf = cfg_combine(vf, None if v_uncond is None else v_uncond.to(acc), cfg_scale)
    a, b, std, scale = sde_coefficients(sigma.to(acc), sigma_next.to(acc), noise_level, sigma_max)
    mean = _per_sample(a, xf) * xf + _per_sample(b, xf) * vf
    x_next = mean + _per_sample(scale, xf) * nf
    log_prob = _gaussian_logprob(x_next, mean, scale)
    return x_next.to(x.dtype), mean.to(x.dtype), std, log_prob


def flow_sde_logprob(x, v, x_next, sigma, sigma_next, noise_level, sigma_max):
    """log_prob [B] of a given x_next under the SDE step from (x, v); differentiable in v and x."""
    acc = _acc_dtype(v)
    xf, vf, xn = x.to(acc), v.to(acc), x_next.to(acc)
    a, b, _, scale = sde_coefficients(sigma.to(acc), sigma_next.to(acc), noise_level, sigma_max)
    mean = _per_sample(a, xf) * xf + _per_sample(b, xf) * vf
    return _gaussian_logprob(xn, mean, scale)


def grpo_advantages(rewards: torch.Tensor, std_scope: str = "batch", eps: float = 1e-4, clip: Optional[float] = None):
    """Group-relative advantages for rewards [P, G] (P prompts, G samples each)."""
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
    acc = _acc_dtype(rewards)
    r = rewards.to(acc)
    centred = r - r.mean(dim=1, keepdim=True)
    if std_scope == "group":
        adv = centred / (r.std(dim=1, keepdim=True, correction=0) + eps)
    elif std_scope == "batch":
        adv = centred / (r.std(correction=0) + eps)
    else:
        adv = centred
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Reduce a per-token quantity [B, T] over the mask. Empty sequences count as zero."""
    B, T = per_token.shape
    masked = per_token * mask
    if aggregation == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if aggregation == "seq-mean-token-mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    if aggregation == "seq-mean-token-sum":
        return masked.sum(dim=1).mean()
    if aggregation == "seq-mean-token-sum-norm":
        return masked.sum() / (B * T)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at tokens: [B, T, V], [B, T] -> [B, T]."""
    acc = _acc_dtype(logits)
    lsm = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    return lsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def grpo_token_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    beta: float = 0.0,
    ratio_level: str = "token",
    aggregation: str = "token-mean",
):
    """GRPO clipped-surrogate loss over sampled text tokens.

    logits [B, T, V]; tokens [B, T] int64; advantages [B] or [B, T]; mask [B, T] (bool/float);
    old_logp, ref_logp [B, T] or None (old None: on-policy, ratio 1 with the gradient of logp).
    Returns (loss [], metrics [3] = (mean ratio, clip fraction, mean k3 KL), logp [B, T]).
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    logp = selective_log_softmax(logits, tokens, temperature)
    acc = logp.dtype
    m = mask.to(acc)
    adv = advantages.to(acc)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1).expand_as(logp)
    old = logp.detach() if old_logp is None else old_logp.to(acc)
    log_ratio = logp - old
    if ratio_level == "sequence":
        # GSPO-token: the value is the sequence's geometric-mean ratio, the gradient flows per token.
        seq = (log_ratio * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        log_ratio = seq.detach() + logp - logp.detach()
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token_loss = torch.maximum(-ratio * adv, -clipped_ratio * adv)
    if dual_clip is not None:
        per_token_loss = torch.where(adv < 0, torch.minimum(per_token_loss, -dual_clip * adv), per_token_loss)
    if ref_logp is not None:
        delta = ref_logp.to(acc) - logp
        per_token_kl = torch.exp(delta) - delta - 1.0
    else:
        per_token_kl = torch.zeros_like(logp)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    loss = _aggregate(per_token_loss, m, aggregation)
    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        metrics = torch.stack([(ratio * m).sum() / n, (is_clipped.to(acc) * m).sum() / n, (per_token_kl * m).sum() / n])
    return loss, metrics, logp.detach()


def grpo_linear_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    beta: float = 0.0,
    ratio_level: str = "token",
    aggregation: str = "token-mean",
):
    """The GRPO token loss from hidden states and an LM head: the unfused composition
    grpo_token_loss(hidden @ weight.T (+ bias), ...). hidden [B, T, H]; weight [V, H]; bias [V] or
    None; the rest as grpo_token_loss. Returns (loss [], metrics [3], logp [B, T])."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return grpo_token_loss(
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


def flow_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = 1e-4,
    kl: Optional[torch.Tensor] = None,
    beta: float = 0.0,
):
    """Flow-GRPO clipped surrogate over per-step image log-probs.

    logp, old_logp [B, K] (K SDE steps per sample); advantages [B]; kl [B, K] or None (per-step KL
    of the step means, see step_mean_kl). loss = mean_{b,k} max(-A r, -A clamp(r, 1-c, 1+c)) + beta * mean(kl).
    Returns (loss [], metrics [3] = (mean ratio, clip fraction, mean kl)).
    """
    acc = _acc_dtype(logp)
    adv = advantages.to(acc).unsqueeze(1)
    ratio = torch.exp(logp.to(acc) - old_logp.to(acc))
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_step_loss = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    loss = per_step_loss.mean()
    kl_mean = torch.zeros((), dtype=acc, device=logp.device)
    if kl is not None:
        kl_mean = kl.to(acc).mean()
        loss = loss + beta * kl_mean
    with torch.no_grad():
        is_clipped = ((ratio - 1.0).abs() > clip_range).to(acc)
        metrics = torch.stack([ratio.mean(), is_clipped.mean(), kl_mean.detach()])
    return loss, metrics


def step_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std_scale: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussians of equal per-sample scale: mean over non-batch dims of
    (mean - ref_mean)^2 / (2 scale^2). mean, ref_mean [B, ...]; std_scale [B] -> [B]."""
    dims = list(range(1, mean.dim()))
    d = (mean - ref_mean) ** 2
    return d.mean(dim=dims) / (2.0 * std_scale**2)
