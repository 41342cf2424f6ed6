"""DVReward: decomposed, verifiable rewards (AlphaGRPO). Backends share the Decomposer/Verifier
interfaces; the embedded one (ShapesWorld's detector) loads lazily, so a server with another
reward backend imports nothing of ShapesWorld."""

from .dvreward import AGGREGATIONS, Decomposer, DecompositionCache, DVReward, Verifier, aggregate
from .types import QUALITY_TAGS, SEMANTIC_TAGS, Answer, Question, RewardResult

_EMBEDDED = ("DetectorVerifier", "ShapesDecomposer", "embedded_reward", "spec_of")

__all__ = [
    "AGGREGATIONS",
    "Answer",
    "DVReward",
    "DecompositionCache",
    "Decomposer",
    "QUALITY_TAGS",
    "Question",
    "RewardResult",
    "SEMANTIC_TAGS",
    "Verifier",
    "aggregate",
    *_EMBEDDED,
]


def __getattr__(name):
    if name in _EMBEDDED:
        from . import embedded

        return getattr(embedded, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
