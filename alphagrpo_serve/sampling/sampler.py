"""Flow-matching sampling: the shifted schedule, ODE/SDE steps through kernels.flow_sde_step, an
SDE window (a contiguous run of steps samples with noise, the rest are ODE, as in the paper), and
the trajectory GRPO trains on.

Guidance is not decided here: each policy owns its guidance rule (which steps guide, with which
branches, scales and renormalisation) and hands the sampler a velocity function that applies it,
and the trainer's recompute calls the very same rule (`Policy.guided_velocity`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..kernels import flow_sde_step

MODES = ("ode", "sde")
RENORM_TYPES = ("none", "global", "channel", "text_channel")


class SamplingDiverged(ValueError):
    """The sampling settings, though each within its range, drove the image state to non-finite
    values (large noise_level, cfg_scale and timestep_shift together). Raised by sample_images;
    a server answers it as INVALID_ARGUMENT for that request alone."""


def shifted_sigmas(steps: int, shift: float = 2.0) -> torch.Tensor:
    """[steps + 1] noise levels from 1 to 0: t' = s t / (1 + (s - 1) t) on a uniform grid."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def _finite_in(name: str, value: float, lo: float, hi: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {value!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """How to draw one image. Every policy publishes its own defaults (PolicyInfo.generate_defaults,
    reflect_defaults); a request overrides fields of those. Frozen and hashable: requests with equal
    configs share a model batch."""

    steps: int = 20  # denoising updates (the schedule has steps + 1 noise levels)
    mode: str = "ode"  # ode: deterministic; sde: noise inside the SDE window
    noise_level: float = 0.7  # SDE noise level inside the window
    sde_window: Tuple[int, int] = (0, 4)  # (first step, number of steps) that sample with noise in sde mode
    cfg_scale: float = 3.0  # text (conditional vs unconditional) guidance scale; 1 disables it
    cfg_img_scale: float = 1.0  # image guidance scale (policies with a no-image branch); 1 disables it
    cfg_interval: Tuple[float, float] = (0.0, 1.0)  # guidance applies where sigma lies in this interval
    cfg_renorm_type: str = "none"  # none | global | channel | text_channel: renormalisation of the guided velocity
    cfg_renorm_min: float = 0.0  # lower clamp of the renormalisation factor
    shift: float = 2.0  # timestep shift of the schedule
    width: int = 0  # canvas in pixels (0: the policy's default)
    height: int = 0

    # documented ranges, checked for every request at the door
    MAX_STEPS = 1000
    MAX_SCALE = 100.0
    MAX_NOISE = 10.0
    MAX_SHIFT = 100.0

    def __post_init__(self):
        object.__setattr__(self, "sde_window", tuple(int(v) for v in self.sde_window))
        object.__setattr__(self, "cfg_interval", tuple(float(v) for v in self.cfg_interval))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.steps, int) and 1 <= self.steps <= self.MAX_STEPS):
            raise ValueError(f"steps must be in [1, {self.MAX_STEPS}], got {self.steps}")
        if len(self.sde_window) != 2:
            raise ValueError(f"sde_window must be (start, size), got {self.sde_window}")
        start, size = self.sde_window
        if self.mode == "sde" and (start < 0 or size < 0 or start + size > self.steps):
            raise ValueError(f"sde_window (start, size) must lie within the {self.steps} steps, got {self.sde_window}")
        _finite_in("noise_level", self.noise_level, 0.0, self.MAX_NOISE)
        _finite_in("cfg_scale", self.cfg_scale, 0.0, self.MAX_SCALE)
        _finite_in("cfg_img_scale", self.cfg_img_scale, 0.0, self.MAX_SCALE)
        if len(self.cfg_interval) != 2:
            raise ValueError(f"cfg_interval must be (low, high), got {self.cfg_interval}")
        lo, hi = self.cfg_interval
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"cfg_interval must satisfy 0 <= low <= high <= 1, got {self.cfg_interval}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        _finite_in("cfg_renorm_min", self.cfg_renorm_min, 0.0, 1.0)
        _finite_in("shift", self.shift, 1e-3, self.MAX_SHIFT)
        for name in ("width", "height"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 0 <= v <= 1 << 16):
                raise ValueError(f"{name} must be an integer in [0, 65536] (0: the policy's default), got {v!r}")

    def window(self) -> range:
        """The steps that sample with noise (empty in ode mode)."""
        if self.mode == "ode":
            return range(0)
        return range(self.sde_window[0], self.sde_window[0] + self.sde_window[1])

    def guides_at(self, sigma: float) -> bool:
        """The plain interval rule: guidance is on where low <= sigma <= high (policies may define
        their own; BAGEL's excludes the lower end)."""
        return self.cfg_interval[0] <= sigma <= self.cfg_interval[1]

    def replace(self, **changes) -> "SamplingConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingConfig":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


@dataclass(frozen=True)
class TextConfig:
    """How to write a thought or critique."""

    temperature: float = 1.0  # 0: greedy (the recorded log-probs are then those of temperature 1)
    top_p: float = 1.0  # nucleus mass in (0, 1]
    max_tokens: int = 40  # longest thought or critique

    MIN_TEMPERATURE = 1e-3
    MAX_TEMPERATURE = 100.0

    def __post_init__(self):
        t = self.temperature
        if not (
            isinstance(t, (int, float))
            and math.isfinite(t)
            and (t == 0 or self.MIN_TEMPERATURE <= t <= self.MAX_TEMPERATURE)
        ):
            raise ValueError(
                f"temperature must be 0 (greedy) or a finite number in [{self.MIN_TEMPERATURE:g}, "
                f"{self.MAX_TEMPERATURE:g}], got {t!r}"
            )
        if not (isinstance(self.top_p, (int, float)) and math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")

    @property
    def logp_temperature(self) -> float:
        """The temperature the recorded log-probs are computed at (1 for greedy)."""
        return self.temperature if self.temperature > 0 else 1.0

    def pick(self, logp: torch.Tensor, generator: torch.Generator) -> int:
        """The next token from one row of log-probs (log_softmax(logits / logp_temperature), [V]):
        the most likely one when greedy, else a draw from the top_p nucleus with `generator`."""
        if self.temperature == 0:
            return int(torch.argmax(logp))
        p = logp.exp()
        if self.top_p < 1.0:
            sp, si = torch.sort(p, descending=True)
            keep = (sp.cumsum(0) - sp) < self.top_p
            p = torch.zeros_like(p).scatter(0, si[keep], sp[keep])
        return int(torch.multinomial(p, 1, generator=generator))

    def replace(self, **changes) -> "TextConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageTrajectory:
    """What GRPO needs of one image: for each SDE-window step k, the latent before (latents[k]) and
    after (latents[k + 1]), sigma, sigma_next and the step's log-prob. The chain is stored once."""

    latents: torch.Tensor  # [K + 1, ...] float32, the policy's latent layout
    sigmas: torch.Tensor  # [K]
    sigma_nexts: torch.Tensor  # [K]
    log_probs: torch.Tensor  # [K]
    window_start: int = 0
    sigma_max: float = 0.0  # stands in for sigma where sigma == 1 in the step's std formula

    def to(self, device) -> "ImageTrajectory":
        return ImageTrajectory(
            self.latents.to(device),
            self.sigmas.to(device),
            self.sigma_nexts.to(device),
            self.log_probs.to(device),
            self.window_start,
            self.sigma_max,
        )


def _check_finite(t: torch.Tensor, k: int, cfg: SamplingConfig, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise SamplingDiverged(
            f"params: sampling diverged at step {k + 1} of {cfg.steps} (non-finite {what}) with mode {cfg.mode}, "
            f"noise_level {cfg.noise_level:g}, cfg_scale {cfg.cfg_scale:g}, timestep_shift {cfg.shift:g}; "
            f"lower params.noise_level, params.cfg_scale or params.timestep_shift"
        )


# velocity(x, sigma [B]) -> (v, v_uncond or None, scale): the policy's guided velocity; when it
# returns (v_cond, v_uncond, scale) the step kernel fuses v_uncond + scale (v_cond - v_uncond)
VelocityFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor], float]]


def sigma_max_of(sigmas: torch.Tensor) -> float:
    """Stands in for sigma == 1 in the SDE std formula: the schedule's second level, kept in
    [1e-3, 0.999]; stored in each trajectory exactly as used."""
    return min(max(float(sigmas[1]) if len(sigmas) > 2 else 0.5, 1e-3), 0.999)


def sample_images(
    velocity: VelocityFn,
    noise0: torch.Tensor,
    cfg: SamplingConfig,
    generators: Optional[Sequence[torch.Generator]] = None,
    sigmas: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, List[ImageTrajectory]]:
    """Integrates from noise0 [B, ...] at sigma 1 to a sample at sigma 0 (float32 state).

    generators: one per sample, on noise0's device, for the SDE noise (reproducible per sample; the
    G samples of a group never share noise). sigmas: the schedule (default shifted_sigmas(steps,
    shift)). Returns (x0 [B, ...], trajectories, each on noise0's device)."""
    B = noise0.shape[0]
    dev = noise0.device
    sig = shifted_sigmas(cfg.steps, cfg.shift) if sigmas is None else sigmas
    sigma_max = sigma_max_of(sig)
    window = cfg.window()
    x = noise0.float()
    chain, logps = [], []
    for k in range(cfg.steps):
        s, sn = float(sig[k]), float(sig[k + 1])
        v, v_uncond, scale = velocity(x, torch.full((B,), s, device=dev))
        _check_finite(v if v_uncond is None else torch.stack([v, v_uncond]), k, cfg, "velocity")
        in_window = k in window
        if in_window:
            if not chain:
                chain.append(x)
            noise = (
                torch.stack([torch.randn(x.shape[1:], generator=g, device=dev) for g in generators])
                if generators is not None
                else torch.randn_like(x)
            )
        else:
            noise = torch.zeros_like(x)
        out = flow_sde_step(
            x,
            v.float(),
            s,
            sn,
            noise_level=cfg.noise_level if in_window else 0.0,
            sigma_max=sigma_max,
            noise=noise,
            v_uncond=None if v_uncond is None else v_uncond.float(),
            cfg_scale=scale,
        )
        x = out.x_next
        _check_finite(x, k, cfg, "state")
        if in_window:
            _check_finite(out.log_prob, k, cfg, "step log-prob")
            chain.append(x)
            logps.append(out.log_prob)
    K = len(logps)
    lp = torch.stack(logps, 1) if K else torch.zeros(B, 0, device=dev)
    lat = torch.stack(chain, 1) if K else torch.zeros(B, 0, *x.shape[1:], device=dev)
    s_win = torch.tensor([float(sig[k]) for k in window]) if K else torch.zeros(0)
    sn_win = torch.tensor([float(sig[k + 1]) for k in window]) if K else torch.zeros(0)
    trajs = [
        ImageTrajectory(lat[b], s_win.to(dev), sn_win.to(dev), lp[b], window[0] if K else 0, sigma_max)
        for b in range(B)
    ]
    return x, trajs
