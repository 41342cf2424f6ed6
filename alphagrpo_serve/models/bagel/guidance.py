"""BAGEL's sampling rules as pure functions (official modeling/bagel/bagel.py: generate_image and
_forward_flow; inferencer.py for the defaults).

- Timesteps run 1 -> 0: N points linspace(1, 0, N), shifted t' = s t / (1 + (s - 1) t); the N - 1
  Euler updates x <- x - v (t_i - t_{i+1}) use the first N - 1 points (the velocity points from
  data to noise).
- Guidance is on inside cfg_interval only: lo < t <= hi; outside it both scales are 1.
- With text scale > 1 (image guidance only ever applies together with text guidance):
    text_channel: v_text = v_no_text + s_t (v - v_no_text), rescaled per token by
                  clamp(|v| / (|v_text| + 1e-8), renorm_min, 1) over channels; then, with image
                  scale > 1, v_out = v_no_image + s_i (v_text - v_no_image)
    global | channel: v' = v_no_image + s_i (v_no_text + s_t (v - v_no_text) - v_no_image) (image
                  part only when s_i > 1), rescaled by clamp(|v| / (|v'| + 1e-8), renorm_min, 1)
                  with the norm over each sample's whole [N, C] velocity (global; the official
                  code works on one image at a time) or per token over channels (channel).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

RENORM_TYPES = ("global", "channel", "text_channel")


def timestep_schedule(num_timesteps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """[num_timesteps] from 1 to 0 (shifted); step i goes from t[i] to t[i+1]."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2 (N points make N - 1 updates), got {num_timesteps}")
    t = torch.linspace(1, 0, num_timesteps, device=device)
    return shift * t / (1 + (shift - 1) * t)


def cfg_active(t: float, interval: Sequence[float]) -> bool:
    """Whether guidance applies at timestep t: interval[0] < t <= interval[1]."""
    return float(interval[0]) < float(t) <= float(interval[1])


def _norm(v: torch.Tensor, renorm_type: str) -> torch.Tensor:
    if renorm_type == "global":  # per sample over all tokens and channels
        return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).reshape(-1, *([1] * (v.ndim - 1)))
    return torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def cfg_combine(
    v: torch.Tensor,
    v_no_text: Optional[torch.Tensor],
    v_no_image: Optional[torch.Tensor],
    text_scale: float,
    image_scale: float,
    renorm_type: str = "global",
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """BAGEL's guided velocity. v, v_no_text, v_no_image: [B, N, C] from the full context, the
    context without the text being guided, and the context without images. Scales <= 1 switch a
    branch off (its velocity may then be None). Returns [B, N, C]."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"renorm_type must be one of {RENORM_TYPES}, got {renorm_type!r}")
    if text_scale <= 1.0:
        return v
    if v_no_text is None or (image_scale > 1.0 and v_no_image is None):
        raise ValueError("cfg_combine: a branch with scale > 1 needs its velocity")
    v_text = v_no_text + text_scale * (v - v_no_text)
    if renorm_type == "text_channel":
        scale = (_norm(v, "channel") / (_norm(v_text, "channel") + 1e-8)).clamp(min=renorm_min, max=1.0)
        v_text = v_text * scale
        return v_no_image + image_scale * (v_text - v_no_image) if image_scale > 1.0 else v_text
    v_out = v_no_image + image_scale * (v_text - v_no_image) if image_scale > 1.0 else v_text
    scale = (_norm(v, renorm_type) / (_norm(v_out, renorm_type) + 1e-8)).clamp(min=renorm_min, max=1.0)
    return v_out * scale


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One ODE update from t to t_next < t: x - v (t - t_next)."""
    return x - v * (t - t_next)
