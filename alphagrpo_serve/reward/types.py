"""The data of a decomposed, verified reward, shared by every backend (embedded, OpenAI-compatible)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

KINDS = ("semantic", "quality")
SEMANTIC_TAGS = (
    "Style",
    "Environment",
    "Viewpoint",
    "Existence",
    "Count",
    "Attribute",
    "Action",
    "Spatial",
    "Text",
    "Negative",
)
QUALITY_TAGS = ("Geometry", "Anatomy", "Texture", "Coherence", "Lighting", "Physics", "Legibility", "Aesthetics")


@dataclass(frozen=True)
class Question:
    """One atomic yes/no question about an image. check: a machine-checkable form where the world
    allows (the embedded verifier answers from it), e.g. {"op": "exists", "shape": "circle", "color": "red"}."""

    id: str
    text: str
    kind: str  # semantic | quality
    tag: str  # one of SEMANTIC_TAGS or QUALITY_TAGS
    check: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"question kind must be one of {KINDS}, got {self.kind!r}")
        tags = SEMANTIC_TAGS if self.kind == "semantic" else QUALITY_TAGS
        if self.tag not in tags:
            raise ValueError(f"a {self.kind} question's tag must be one of {tags}, got {self.tag!r}")


@dataclass
class Answer:
    """A verifier's answer: score = P(yes) / (P(yes) + P(no)) in [0, 1], or None when it failed."""

    question: Question
    score: Optional[float]
    answer: str = ""  # the verifier's text answer ("yes"/"no"), when it has one
    failed: bool = False
    detail: str = ""  # why it failed, or how the score was read (e.g. "fallback: parsed answer")

    @property
    def yes(self) -> bool:
        return self.score is not None and self.score >= 0.5


@dataclass
class RewardResult:
    prompt: str
    reward: float  # aggregate of S and Q (sqrt(S * Q) by default)
    semantic: float  # S: mean semantic score
    quality: float  # Q: mean quality score
    answers: List[Answer] = field(default_factory=list)
    failed: int = 0  # questions that finally failed (excluded from S and Q, never silently scored)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        return d

    def table(self) -> str:
        """The per-question breakdown as a text table."""
        rows = [f"{'kind':9s} {'tag':10s} {'score':>6s}  question"]
        for a in self.answers:
            score = "failed" if a.score is None else f"{a.score:.3f}"
            rows.append(f"{a.question.kind:9s} {a.question.tag:10s} {score:>6s}  {a.question.text}")
        rows.append(
            f"S = {self.semantic:.3f}  Q = {self.quality:.3f}  reward = {self.reward:.3f}"
            + (f"  ({self.failed} failed)" if self.failed else "")
        )
        return "\n".join(rows)
