"""Flow-matching sampling: the shifted schedule, ODE/SDE steps through kernels.flow_sde_step, an
SDE window (a contiguous run of steps samples with noise, the rest are ODE, as in the paper),
classifier-free guidance with a scale and an interval, and the trajectory GRPO trains on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..kernels import flow_sde_step

MODES = ("ode", "sde")


def shifted_sigmas(steps: int, shift: float = 2.0) -> torch.Tensor:
    """[steps + 1] noise levels from 1 to 0: t' = s t / (1 + (s - 1) t) on a uniform grid."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


@dataclass
class SamplingConfig:
    steps: int = 20
    mode: str = "ode"  # ode: deterministic; sde: noise inside the SDE window
    noise_level: float = 0.7
    sde_window: Tuple[int, int] = (0, 4)  # (first step, number of steps) that sample with noise in sde mode
    cfg_scale: float = 3.0
    cfg_interval: Tuple[float, float] = (0.0, 1.0)  # guidance applies where sigma lies in [lo, hi]
    shift: float = 2.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be in [1, 1000], got {self.steps}")
        start, size = self.sde_window
        if self.mode == "sde" and (start < 0 or size < 0 or start + size > self.steps):
            raise ValueError(f"sde_window (start, size) must lie within the {self.steps} steps, got {self.sde_window}")
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")

    def window(self) -> range:
        """The steps that sample with noise (empty in ode mode)."""
        if self.mode == "ode":
            return range(0)
        return range(self.sde_window[0], self.sde_window[0] + self.sde_window[1])

    def to_dict(self):
        return asdict(self)


@dataclass
class ImageTrajectory:
    """What GRPO needs of one image: for each SDE-window step k, the latent before (latents[k]) and
    after (latents[k + 1]), sigma, sigma_next and the step's log-prob. The chain is stored once."""
    latents: torch.Tensor  # [K + 1, C, H, W]
    sigmas: torch.Tensor  # [K]
    sigma_nexts: torch.Tensor  # [K]
    log_probs: torch.Tensor  # [K]
    window_start: int = 0
    sigma_max: float = 0.0  # stands in for sigma where sigma == 1 in the step's std formula


VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def sample_images(velocity: VelocityFn, noise0: torch.Tensor, cfg: SamplingConfig,
                  generators: Optional[Sequence[torch.Generator]] = None) -> Tuple[torch.Tensor, List[ImageTrajectory]]:
    """Integrates from noise0 [B, C, H, W] at sigma 1 to an image at sigma 0.

    velocity(x, sigma [B], with_uncond) -> (v_cond, v_uncond or None). generators: one per sample
    for the SDE noise (reproducible per sample). Returns (x0 [B, C, H, W], trajectories).
    """
    B = noise0.shape[0]
    sig = shifted_sigmas(cfg.steps, cfg.shift)
    # stands in for sigma == 1 in the std formula; stored in the trajectory exactly as used
    sigma_max = min(max(float(sig[1]) if cfg.steps > 1 else 0.5, 1e-3), 0.999)
    window = cfg.window()
    x = noise0
    chain = [x] if len(window) and window[0] == 0 else []
    logps, s_list, sn_list = [], [], []
    for k in range(cfg.steps):
        s, sn = float(sig[k]), float(sig[k + 1])
        use_cfg = cfg.cfg_scale != 1.0 and cfg.cfg_interval[0] <= s <= cfg.cfg_interval[1]
        v_cond, v_uncond = velocity(x, torch.full((B,), s), use_cfg)
        in_window = k in window
        if in_window and not chain:
            chain.append(x)
        if in_window:
            noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generators]) \
                if generators is not None else torch.randn_like(x)
        else:
            noise = torch.zeros_like(x)
        out = flow_sde_step(x, v_cond, s, sn, noise_level=cfg.noise_level if in_window else 0.0,
                            sigma_max=sigma_max, noise=noise,
                            v_uncond=v_uncond if use_cfg else None, cfg_scale=cfg.cfg_scale)
        x = out.x_next
        if in_window:
            chain.append(x)
            logps.append(out.log_prob)
            s_list.append(s)
            sn_list.append(sn)
    trajs = []
    K = len(logps)
    lp = torch.stack(logps, 1) if K else torch.zeros(B, 0)
    lat = torch.stack(chain, 1) if K else torch.zeros(B, 0, *x.shape[1:])
    for b in range(B):
        trajs.append(ImageTrajectory(lat[b], torch.tensor(s_list), torch.tensor(sn_list), lp[b],
                                     window[0] if K else 0, sigma_max))
    return x, trajs
