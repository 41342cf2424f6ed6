"""The GRPO loss of one batch of rollouts on the trainer's copy of the policy.

Text: teacher-forced hidden states of the recorded thought/critique tokens and the policy's LM head
-> kernels.grpo_linear_token_loss (old log-probs = the ones recorded at sampling). Image: for each
SDE-window step k, the policy's guided velocity at the recorded latent (Policy.guided_velocity: the
policy's own guidance rule, as at sampling) -> kernels.flow_sde_logprob of the recorded next latent
-> kernels.flow_grpo_loss against the recorded step log-probs. Gradients are
accumulated step by step (the loss is a mean over steps, so backward per step gives the same
gradient as one graph, with the memory of one step).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from alphagrpo_serve import kernels
from alphagrpo_serve.kernels import reference
from alphagrpo_serve.models.base import Policy, Sample


def _pad(rows: Sequence[Sequence[float]], T: int, device) -> torch.Tensor:
    out = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r[:T], dtype=torch.float32)
    return out.to(device)


def text_loss(
    policy: Policy,
    samples: List[Sample],
    advantages: torch.Tensor,
    cfg,
    reflect_images=None,
    ref_policy: Optional[Policy] = None,
):
    """The GRPO token loss of the recorded thoughts/critiques: teacher-forced hidden states and the
    policy's LM head into the fused linear loss (the [B, T, V] logits never exist). Returns
    (LossOutput, old log-probs [B, T], mask [B, T])."""
    hidden, tokens, mask = policy.token_hidden(samples, reflect_images)
    dev = hidden.device
    old = _pad([s.text.logps for s in samples], tokens.shape[1], dev)
    temperature = samples[0].text_config.logp_temperature
    ref = None
    if cfg.kl_text > 0:
        with torch.no_grad():
            ref = ref_policy.token_logps(samples, reflect_images, temperature=temperature)
    kw = dict(
        old_logp=old,
        ref_logp=ref,
        temperature=temperature,
        eps_low=cfg.clip_text[0],
        eps_high=cfg.clip_text[1],
        beta=cfg.kl_text,
        aggregation=cfg.text_aggregation,
    )
    weight, bias = policy.lm_head()
    out = kernels.grpo_linear_token_loss(hidden, weight, tokens, advantages.to(dev), mask, bias=bias, **kw)
    return out, old, mask


def grpo_backward(
    policy: Policy,
    samples: List[Sample],
    advantages: torch.Tensor,
    cfg,
    reflect_images: Optional[List] = None,
    ref_policy: Optional[Policy] = None,
    scale: float = 1.0,
) -> Dict[str, float]:
    """Computes the loss of the batch, accumulates scale * d loss / d params, returns metrics.

    advantages [B] (one per sample). The loss is text_weight * text loss + image loss. Every
    setting of the recompute (guidance, noise level, temperature) is the one each sample records.
    """
    B = len(samples)
    if advantages.shape != (B,):
        raise ValueError(f"advantages must be [{B}], got {tuple(advantages.shape)}")
    m: Dict[str, float] = {}
    total = 0.0
    # ---- text --------------------------------------------------------------------------------
    if any(len(s.text.ids) for s in samples) and cfg.text_weight > 0:
        out, old, mask = text_loss(policy, samples, advantages, cfg, reflect_images, ref_policy)
        (scale * cfg.text_weight * out.loss).backward()
        total += cfg.text_weight * float(out.loss.detach())
        ratio, clip, kl = (float(x) for x in out.metrics[:3])
        log_ratio = (out.logp.detach() - old)[mask]
        m.update(
            text_loss=float(out.loss.detach()),
            text_ratio=ratio,
            text_clip_frac=clip,
            text_kl=kl,
            text_logp_dev=float(log_ratio.abs().max()) if log_ratio.numel() else 0.0,
            text_ratio_std=float(log_ratio.exp().std(unbiased=False)) if log_ratio.numel() else 0.0,
        )
    # ---- image ---------------------------------------------------------------------------------
    K = samples[0].trajectory.log_probs.shape[0]
    if any(s.trajectory.log_probs.shape[0] != K for s in samples):
        raise ValueError("samples of one batch must share the SDE window length")
    noise = {s.sampling.noise_level for s in samples}
    if len(noise) > 1:
        raise ValueError(f"samples of one batch must share the SDE noise level, got {sorted(noise)}")
    noise_level = noise.pop()
    dev = policy.info.device
    agg = {
        "image_loss": 0.0,
        "image_ratio": 0.0,
        "image_clip_frac": 0.0,
        "image_kl": 0.0,
        "image_logp_dev": 0.0,
        "image_ratio_std": 0.0,
    }
    for k in range(K):
        tr = [s.trajectory for s in samples]
        x = torch.stack([t.latents[k] for t in tr]).to(dev)
        x_next = torch.stack([t.latents[k + 1] for t in tr]).to(dev)
        sig = torch.stack([t.sigmas[k] for t in tr]).float().to(dev)
        sig_n = torch.stack([t.sigma_nexts[k] for t in tr]).float().to(dev)
        sigma_max = tr[0].sigma_max
        old = torch.stack([t.log_probs[k] for t in tr]).float()[:, None].to(dev)
        v = policy.guided_velocity(samples, k, reflect_images)
        logp = kernels.flow_sde_logprob(x, v, x_next, sig, sig_n, noise_level=noise_level, sigma_max=sigma_max)[:, None]
        kl = None
        if cfg.kl_image > 0:
            with torch.no_grad():
                v_ref = ref_policy.guided_velocity(samples, k, reflect_images)
            a, b, _, sc = reference.sde_coefficients(sig, sig_n, noise_level, sigma_max)
            shape = (-1,) + (1,) * (x.dim() - 1)
            mean = a.view(shape) * x + b.view(shape) * v
            ref_mean = a.view(shape) * x + b.view(shape) * v_ref
            kl = kernels.step_mean_kl(mean, ref_mean, sc)[:, None]
        out = kernels.flow_grpo_loss(logp, old, advantages.to(dev), clip_range=cfg.clip_image, kl=kl, beta=cfg.kl_image)
        (scale * out.loss / K).backward()
        total += float(out.loss.detach()) / K
        agg["image_loss"] += float(out.loss.detach()) / K
        agg["image_ratio"] += float(out.metrics[0]) / K
        agg["image_clip_frac"] += float(out.metrics[1]) / K
        agg["image_kl"] += float(out.metrics[2]) / K
        agg["image_logp_dev"] = max(agg["image_logp_dev"], float((logp.detach() - old).abs().max()))
        agg["image_ratio_std"] += float((logp.detach() - old).exp().std(unbiased=False)) / K
    m.update(agg)
    m["loss"] = total
    return m
