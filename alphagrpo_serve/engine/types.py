"""The typed messages between the services and the model thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ..sampling.sampler import SamplingConfig, TextConfig

KINDS = ("generate", "reflect")


@dataclass(frozen=True)
class BatchKey:
    """Work items with equal keys share a model batch (their settings are compatible)."""

    kind: str  # generate | reflect
    sampling: SamplingConfig  # resolved
    text: TextConfig  # resolved
    think: bool  # Generate's think mode (Reflect always writes a critique)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class Work:
    """One item's samples: prompt i drawn with seed i (and, for Reflect, refining image i)."""

    prompts: List[str]
    seeds: List[int]
    images: Optional[List[np.ndarray]] = None

    def __post_init__(self):
        if len(self.prompts) != len(self.seeds) or (self.images is not None and len(self.images) != len(self.prompts)):
            raise ValueError("a work item needs one seed (and for Reflect one image) per prompt")

    @property
    def size(self) -> int:
        return len(self.prompts)
