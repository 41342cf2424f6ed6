"""Flow-matching SDE step and its log-probability: typed wrappers over torch.ops.alphagrpo.

Shapes: latents x, v, noise are [B, ...] (any trailing shape); sigma and sigma_next are floats or
[B] tensors (one value per sample, so one batch may hold samples at different timesteps).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from . import reference
from ._registry import use_fast_path

Sigma = Union[float, torch.Tensor]


class SdeStep(NamedTuple):
    x_next: torch.Tensor  # [B, ...] in x.dtype
    mean: torch.Tensor  # [B, ...] in x.dtype: the step's Gaussian mean
    std: torch.Tensor  # [B] float32: the noise_level-scaled std (before sqrt(-dt))
    log_prob: torch.Tensor  # [B] float32: mean over non-batch dims of log N(x_next; mean, (std sqrt(-dt))^2)


def _check_latent(t: torch.Tensor, name: str, like: Optional[torch.Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if like is None:
        if t.dim() < 1 or t.shape[0] == 0:
            raise ValueError(f"{name} must be [batch, ...] with batch > 0, got shape {tuple(t.shape)}")
        return
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of x ({like.dtype}), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on the device of x ({like.device}), got {t.device}")


def _as_sigma(value: Sigma, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A float or [B] tensor -> a float32/64 [B] tensor on device, value-checked where that costs no sync."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name} must be a float or a [{batch}] tensor, got shape {tuple(value.shape)}")
        if value.dtype not in (torch.float32, torch.float64):
            value = value.float()
        if value.device != device:
            raise ValueError(f"{name} must be on the device of x ({device}), got {value.device}")
        return value.contiguous()
    return torch.full((batch,), float(value), dtype=torch.float32, device=device)


def _check_schedule(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float, sigma_max: float) -> None:
    if not (noise_level >= 0.0 and noise_level < float("inf")):
        raise ValueError(f"noise_level must be finite and >= 0, got {noise_level}")
    if not 0.0 < sigma_max < 1.0:
        raise ValueError(f"sigma_max must be in (0, 1), got {sigma_max}")
    if sigma.device.type != "cpu" or torch.compiler.is_compiling():
        return  # reading values would synchronise or break the graph; kernels are defined for valid input only
    if not bool(torch.all((sigma > 0) & (sigma <= 1))):
        raise ValueError(f"sigma must be in (0, 1], got {sigma.tolist()}")
    if not bool(torch.all((sigma_next >= 0) & (sigma_next < sigma))):
        raise ValueError(
            f"sigma_next must be in [0, sigma), got sigma_next={sigma_next.tolist()} sigma={sigma.tolist()}"
        )


def flow_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    *,
    noise_level: float = 0.7,
    sigma_max: float = 0.98,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    v_uncond: Optional[torch.Tensor] = None,
    cfg_scale: float = 1.0,
) -> SdeStep:
    """One flow-matching SDE step x (at sigma) -> x_next (at sigma_next < sigma).

    x, v, noise, v_uncond: [B, ...], one dtype. With v_uncond the velocity is CFG-combined first:
    v_uncond + cfg_scale * (v - v_uncond). noise: standard normal [B, ...]; drawn from generator
    when None. sigma_max replaces sigma in the std formula where sigma == 1 (the schedule's
    second sigma). noise_level 0 is exactly the Euler ODE step (log_prob 0: no density).
    """
    _check_latent(x, "x")
    _check_latent(v, "v", x)
    if v_uncond is not None:
        _check_latent(v_uncond, "v_uncond", x)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        _check_latent(noise, "noise", x)
    s = _as_sigma(sigma, x.shape[0], x.device, "sigma")
    sn = _as_sigma(sigma_next, x.shape[0], x.device, "sigma_next")
    _check_schedule(s, sn, noise_level, sigma_max)
    if use_fast_path("flow_sde_step", x):
        out = torch.ops.alphagrpo.flow_sde_step(
            x, v, v_uncond, float(cfg_scale), s, sn, float(noise_level), float(sigma_max), noise
        )
    else:
        out = reference.flow_sde_step(x, v, s, sn, noise_level, sigma_max, noise, v_uncond, cfg_scale)
    return SdeStep(*out)


def flow_sde_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    *,
    noise_level: float = 0.7,
    sigma_max: float = 0.98,
) -> torch.Tensor:
    """log_prob [B] of x_next under the SDE step from x with velocity v: the training-time recompute.

    Differentiable in v and x (the gradient w.r.t. x is computed only when x requires grad).
    Returns 0 for samples whose step is deterministic (noise_level 0 or sigma_next == sigma).
    """
    _check_latent(x, "x")
    _check_latent(v, "v", x)
    _check_latent(x_next, "x_next", x)
    s = _as_sigma(sigma, x.shape[0], x.device, "sigma")
    sn = _as_sigma(sigma_next, x.shape[0], x.device, "sigma_next")
    _check_schedule(s, sn, noise_level, sigma_max)
    if use_fast_path("flow_sde_logprob", x):
        return torch.ops.alphagrpo.flow_sde_logprob(x, v, x_next, s, sn, float(noise_level), float(sigma_max))
    return reference.flow_sde_logprob(x, v, x_next, s, sn, noise_level, sigma_max)
