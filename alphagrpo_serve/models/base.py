"""The policy interface every model implements (the tiny UMM now, BAGEL later). The engine and the
trainer use only this."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..sampling.sampler import ImageTrajectory, SamplingConfig


@dataclass
class TextSample:
    ids: List[int]  # sampled token ids (the stop token included when it was reached)
    logps: List[float]  # log-prob of each sampled token under the sampling distribution's policy (temperature 1)
    text: str = ""


@dataclass
class Sample:
    """One generated (or refined) image with everything GRPO needs to train on it."""
    prompt: str
    image: np.ndarray  # uint8 [H, W, 3]
    thought: str  # the <think> text ('' when think mode is off)
    text: TextSample
    trajectory: ImageTrajectory
    seed: int
    settings: Dict = field(default_factory=dict)
    policy_version: int = 0


class Policy(abc.ABC):
    version: int = 0

    # ---- text -------------------------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str) -> List[int]: ...

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    # ---- generation -------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], sampling: SamplingConfig, think: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, max_thought_tokens: int = 40) -> List[Sample]:
        """Reasoning text-to-image: optional <think> text, then an image (one per prompt/seed)."""

    @abc.abstractmethod
    def reflect(self, prompts: Sequence[str], images: Sequence[np.ndarray], seeds: Sequence[int],
                sampling: SamplingConfig, temperature: float = 1.0, top_p: float = 1.0,
                max_thought_tokens: int = 48) -> List[Sample]:
        """Self-reflective refinement: a critique with an edit instruction, then a refined image."""

    # ---- training-time recompute ---------------------------------------------------------------
    @abc.abstractmethod
    def token_logps(self, samples: Sequence[Sample], reflect_images: Optional[Sequence[np.ndarray]] = None) -> torch.Tensor:
        """Teacher-forced log-probs [B, T] of each sample's recorded text tokens (padded with 0), differentiable."""

    @abc.abstractmethod
    def step_velocities(self, samples: Sequence[Sample], k: int, with_uncond: bool,
                        reflect_images: Optional[Sequence[np.ndarray]] = None):
        """(v_cond, v_uncond) at window step k of each sample's trajectory, differentiable."""

    # ---- weights --------------------------------------------------------------------------------
    @abc.abstractmethod
    def export_weights(self, lora: bool = False) -> Dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def import_weights(self, tensors: Dict[str, torch.Tensor], lora: bool = False) -> None:
        """Validated and applied atomically: a bad tensor leaves every weight as it was."""
