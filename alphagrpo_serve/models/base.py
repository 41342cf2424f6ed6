"""The policy contract: everything the engine, the server, the CLI and the trainer use of a model.

A model is one package under models/, one line in models/registry.py and one entry in the contract
test (tests/test_policy_contract.py); docs/adding_a_policy.md walks through it. Nothing outside a
model's package may reach past this interface (no `policy.model`, no model-specific methods).

Conventions:
- Samples carry everything needed to recompute them: prompt, recorded text token ids and log-probs,
  the image trajectory, and the SamplingConfig/TextConfig they were drawn with.
- Recomputes (`token_logps`, `token_hidden`, `guided_velocity`) run the same modules and the same
  guidance rule as sampling, so the trainer's log-probs equal the recorded ones to float32 rounding.
- Weight names are the policy's own canonical names (for BAGEL: the official checkpoint's keys);
  `weight_specs()` lists exactly what `import_weights()` accepts.
- Seeds are any non-negative integer (requests carry uint64); `seed_streams` is the one place a
  sample's seed becomes torch generator seeds.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..sampling.sampler import ImageTrajectory, SamplingConfig, TextConfig

SEED_MODULUS = 1 << 64  # torch generators take seeds in [0, 2^64); requests carry uint64 seeds


def weights_fingerprint(tensors: Dict[str, torch.Tensor], samples: int = 1024) -> str:
    """A short hex digest of a set of weights: every name, dtype and shape, and the bits of up to
    `samples` evenly spaced elements of each tensor. Two policies loaded from the same checkpoint in
    the same dtype agree; another checkpoint, dtype or architecture differs (a changed weight between
    the sampled elements goes unseen: it identifies a checkpoint, it does not verify one)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        if t.numel():
            idx = torch.linspace(0, t.numel() - 1, min(t.numel(), samples), device=t.device).long()
            h.update(t[idx].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def seed_streams(seed: int, n: int) -> Tuple[int, ...]:
    """The n torch generator seeds of one sample (its noise, text, ... streams): (n * seed + k) mod 2^64
    for k < n. Every seed a request can carry (the whole uint64 range, any Python int here) gives
    valid generator seeds; below 2^64 / n they are exactly n * seed + k, so existing seeds keep
    their images. Seeds equal modulo 2^64 / n share their streams."""
    base = (int(seed) % SEED_MODULUS) * n
    return tuple((base + k) % SEED_MODULUS for k in range(n))


@dataclass
class TextSample:
    ids: List[int]  # sampled token ids (the stop token included when it was reached)
    logps: List[float]  # log-prob of each sampled token at TextConfig.logp_temperature
    text: str = ""


@dataclass
class Sample:
    """One generated (or refined) image with everything GRPO needs to train on it."""

    prompt: str
    image: np.ndarray  # uint8 [H, W, 3]
    thought: str  # the <think> text or critique ('' when the policy wrote none)
    text: TextSample
    trajectory: ImageTrajectory
    seed: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # resolved settings it was drawn with
    text_config: TextConfig = field(default_factory=TextConfig)
    think: bool = False  # RT2I think mode (Reflect samples always carry a critique)
    reflect: bool = False  # a Reflect sample: its context held the image being refined
    policy_version: int = 0


@dataclass(frozen=True)
class CanvasRule:
    """Which image sizes a policy draws: width and height multiples of `multiple` within
    [min_side, max_side]; `default` when a request leaves them unset (0)."""

    default: Tuple[int, int]
    multiple: int
    min_side: int
    max_side: int

    def resolve(self, width: int, height: int) -> Tuple[int, int]:
        """(width, height) with zeros replaced by the default; ValueError naming the field otherwise."""
        w = width or self.default[0]
        h = height or self.default[1]
        for name, v in (("width", w), ("height", h)):
            if v % self.multiple or not self.min_side <= v <= self.max_side:
                raise ValueError(
                    f"{name} {v} is not allowed: multiples of {self.multiple} in [{self.min_side}, {self.max_side}]"
                )
        return w, h

    def describe(self) -> str:
        if self.min_side == self.max_side:
            return f"{self.min_side}x{self.min_side}"
        return f"multiples of {self.multiple} in [{self.min_side}, {self.max_side}] (default {self.default[0]}x{self.default[1]})"


@dataclass(frozen=True)
class Capabilities:
    think: bool  # writes a <think> plan before drawing (RT2I)
    reflect: bool  # critiques an image and draws a refinement (SRR)
    understanding: bool  # reads input images
    guidance_branches: Tuple[str, ...]  # the contexts guidance drops: "text" (unconditional), "image" (no image)
    lora: bool  # LoRA adapters can be enabled, exported and imported
    canvas: CanvasRule


@dataclass(frozen=True)
class PolicyInfo:
    name: str  # registry name ("tiny", "bagel")
    parameters: int  # parameter count (LoRA adapters included when enabled)
    dtype: torch.dtype
    device: torch.device
    vocab_size: int
    special_tokens: Dict[str, int]  # e.g. {"think": id, "think_end": id, "eos": id}
    capabilities: Capabilities
    generate_defaults: SamplingConfig  # Generate's settings when a request leaves a field unset
    reflect_defaults: SamplingConfig  # Reflect's
    text_defaults: TextConfig
    prompt_domain: Optional[str] = None  # task plug-in the policy was trained for ("shapes"); None: any prompt


class CapabilityError(ValueError):
    """A request needs something the policy cannot do; the message names the capability."""


class Policy(abc.ABC):
    """The interface. Subclasses implement every abstract member; the concrete helpers below are
    written once here in terms of them."""

    name: ClassVar[str] = "?"
    version: int = 0  # bumped by every applied weight import

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def load(cls, path: Optional[str] = None, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> "Policy":
        """Loads the policy from `path` (None: the policy's default, where it has one) onto `device`
        in `dtype` (None: the policy's default for that device)."""

    @property
    @abc.abstractmethod
    def info(self) -> PolicyInfo:
        """Name, size, device, dtype, capabilities, tokenizer facts and sampling defaults."""

    # ---- modes and parameters ------------------------------------------------------------------------
    @abc.abstractmethod
    def train(self, mode: bool = True) -> "Policy":
        """Training mode (dropout etc.) on or off; returns self."""

    def eval(self) -> "Policy":
        return self.train(False)

    @abc.abstractmethod
    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """The parameters an optimiser updates (only the adapters when LoRA is enabled)."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The full module state (adapters included) for trainer checkpoints."""

    @abc.abstractmethod
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restores a state_dict() (same structure: enable LoRA first if it had adapters)."""

    # ---- text ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str) -> List[int]: ...

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    # ---- sampling --------------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampling: SamplingConfig,
        text: TextConfig,
        think: bool = False,
    ) -> List[Sample]:
        """Reasoning text-to-image: an optional <think> plan, then an image, one per (prompt, seed).
        Equal prompts in one call share one prefill of their context. sampling must be resolved
        (resolve_sampling). Trajectories come back on the CPU."""

    @abc.abstractmethod
    def reflect(
        self,
        prompts: Sequence[str],
        images: Sequence[np.ndarray],
        seeds: Sequence[int],
        sampling: SamplingConfig,
        text: TextConfig,
    ) -> List[Sample]:
        """Self-reflective refinement: a critique with an edit instruction, then a refined image.
        Raises CapabilityError when the policy cannot reflect."""

    # ---- training-time recompute -------------------------------------------------------------------
    @abc.abstractmethod
    def token_hidden(
        self, samples: Sequence[Sample], reflect_images: Optional[Sequence[np.ndarray]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced final hidden states at the positions that predict each sample's recorded
        text tokens: (hidden [B, T, H], tokens [B, T] int64, mask [B, T] bool), right-padded; a
        sample without text has an all-False row. Differentiable. With lm_head() this feeds the
        fused linear token loss without ever forming the [B, T, V] logits."""

    @abc.abstractmethod
    def lm_head(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight [V, H], bias [V] or None) of the text head: logits = hidden @ weight.T + bias."""

    def token_logits(self, samples: Sequence[Sample], reflect_images=None):
        """(logits [B, T, V] float32, tokens, mask): token_hidden through lm_head. Materialises the
        logits; the trainer prefers token_hidden + the fused linear loss."""
        hidden, tokens, mask = self.token_hidden(samples, reflect_images)
        w, b = self.lm_head()
        logits = torch.nn.functional.linear(hidden, w, b).float()
        return logits, tokens, mask

    def token_logps(
        self, samples: Sequence[Sample], reflect_images=None, temperature: float = 1.0, chunk_tokens: int = 1024
    ) -> torch.Tensor:
        """Teacher-forced log_softmax(logits / temperature) at each sample's recorded tokens, [B, T]
        (0 where masked), computed chunk by chunk so that at most chunk_tokens rows of logits live
        at once (large vocabularies)."""
        hidden, tokens, mask = self.token_hidden(samples, reflect_images)
        w, b = self.lm_head()
        B, T, H = hidden.shape
        flat_h, flat_t = hidden.reshape(B * T, H), tokens.reshape(B * T)
        parts = []
        for i in range(0, B * T, max(1, chunk_tokens)):
            logits = torch.nn.functional.linear(flat_h[i : i + chunk_tokens], w, b).float() / temperature
            parts.append(torch.log_softmax(logits, -1).gather(-1, flat_t[i : i + chunk_tokens, None])[:, 0])
        logp = torch.cat(parts).view(B, T) if parts else torch.zeros(B, T, device=hidden.device)
        return logp * mask

    @abc.abstractmethod
    def guided_velocity(
        self, samples: Sequence[Sample], k: int, reflect_images: Optional[Sequence[np.ndarray]] = None
    ) -> torch.Tensor:
        """The velocity at SDE-window step k of each sample's trajectory, with the policy's own
        guidance rule (branches, scales, interval, renormalisation) as at sampling, from each
        sample's recorded SamplingConfig. Differentiable; float32 [B, ...] like the latents."""

    # ---- weights ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def enable_lora(self, rank: int, alpha: float, targets: Optional[Sequence[str]] = None) -> None:
        """Adds LoRA adapters (base weights frozen) on the policy's default targets or `targets`.
        Raises CapabilityError when the policy has no LoRA support."""

    @property
    @abc.abstractmethod
    def lora_enabled(self) -> bool: ...

    @abc.abstractmethod
    def weight_specs(self, lora: bool = False) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """{name: (shape, dtype)} of exactly the tensors import_weights(lora=lora) accepts (for
        lora=True while LoRA is off: the adapters the server would enable on import)."""

    @abc.abstractmethod
    def export_weights(self, lora: bool = False) -> Dict[str, torch.Tensor]:
        """Full weights under their canonical names (base weights, whether or not LoRA wraps them),
        or the LoRA adapters with their scale folded in (a receiver applies them at scale 1)."""

    @abc.abstractmethod
    def import_weights(self, tensors: Dict[str, torch.Tensor], lora: bool = False) -> None:
        """Validates every tensor (name, shape, dtype, finite) before changing anything, then
        applies them all and bumps `version`; a rejected import leaves the policy exactly as it was,
        structure included. LoRA tensors enable LoRA (rank read from the adapters) when it is off."""

    def weights_fingerprint(self) -> str:
        """weights_fingerprint() of the base weights (LoRA adapters excluded): equal on a server and a
        trainer that loaded the same checkpoint in the same dtype, so a LoRA run can skip pushing
        the base. Policies with large weights override it to avoid export_weights' copies."""
        return weights_fingerprint(self.export_weights(lora=False))

    @abc.abstractmethod
    def merged_weights(self) -> Dict[str, torch.Tensor]:
        """Full weights with any LoRA adapters merged in."""

    @abc.abstractmethod
    def save(self, path: str) -> str:
        """Writes the (merged) weights where load(path) reads them back; returns the path written."""

    # ---- helpers written once ---------------------------------------------------------------------
    def resolve_sampling(self, overrides: Optional[dict] = None, reflect: bool = False) -> SamplingConfig:
        """The policy's defaults with `overrides` applied, the canvas resolved and checked.
        ValueError names a bad field; CapabilityError a setting the policy cannot honour."""
        info = self.info
        base = info.reflect_defaults if reflect else info.generate_defaults
        ov = dict(overrides or {})
        if "sde_window" not in ov and "steps" in ov:  # the default window, clipped to fewer steps
            start, size = base.sde_window
            ov["sde_window"] = (min(start, ov["steps"]), max(0, min(size, ov["steps"] - min(start, ov["steps"]))))
        sc = base.replace(**ov)
        w, h = info.capabilities.canvas.resolve(sc.width, sc.height)
        branches = info.capabilities.guidance_branches
        if sc.cfg_img_scale != 1.0 and "image" not in branches:
            raise CapabilityError(
                f"cfg_img_scale {sc.cfg_img_scale:g} needs image guidance, which policy "
                f"{info.name!r} does not have (its guidance branches: {list(branches)})"
            )
        if sc.cfg_scale != 1.0 and "text" not in branches:
            raise CapabilityError(f"cfg_scale {sc.cfg_scale:g} needs text guidance, which policy {info.name!r} lacks")
        return sc.replace(width=w, height=h)

    def resolve_text(self, overrides: Optional[dict] = None) -> TextConfig:
        return self.info.text_defaults.replace(**dict(overrides or {}))

    def check_context(self, prompts: Sequence[str], text: TextConfig, think: bool, reflect: bool = False) -> None:
        """Called at the door, before a request is queued: ValueError naming `prompts[i]` when a
        context cannot be served (longer than the policy's context window with the text budget).
        Default: every prompt fits."""

    def require(self, capability: str) -> None:
        """CapabilityError naming `capability` (think, reflect, understanding, lora) when it is missing."""
        if not getattr(self.info.capabilities, capability):
            raise CapabilityError(f"policy {self.info.name!r} does not support {capability}")

    def fsdp_modules(self) -> Tuple[torch.nn.Module, List[torch.nn.Module]]:
        """(root, units) for sharding full fine-tuning with FSDP2 (the trainer's `fsdp: true`): root's
        state_dict() is this policy's state_dict(); each unit becomes one fully_shard group and must
        run as a module call; parameters outside the units stay replicated. CapabilityError for a
        policy that does not support it."""
        raise CapabilityError(f"policy {self.info.name!r} does not support FSDP sharding")


class ModulePolicy(Policy):
    """A policy whose weights all live in one nn.Module, `self.model`: the mode switch, the trainable
    parameters and the checkpoint state are the module's."""

    model: torch.nn.Module

    def train(self, mode: bool = True) -> "ModulePolicy":
        self.model.train(mode)
        return self

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
