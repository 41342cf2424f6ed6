"""DVReward: decomposed, verifiable rewards (AlphaGRPO). Backends share the Decomposer/Verifier
interfaces; the embedded one judges ShapesWorld images with the detector."""
from .dvreward import AGGREGATIONS, DecompositionCache, Decomposer, DVReward, Verifier, aggregate
from .embedded import DetectorVerifier, ShapesDecomposer, embedded_reward, spec_of
from .types import QUALITY_TAGS, SEMANTIC_TAGS, Answer, Question, RewardResult

__all__ = ["AGGREGATIONS", "Answer", "DVReward", "DecompositionCache", "Decomposer", "DetectorVerifier", "QUALITY_TAGS",
           "Question", "RewardResult", "SEMANTIC_TAGS", "ShapesDecomposer", "Verifier", "aggregate",
           "embedded_reward", "spec_of"]
