"""DVReward: decompose a prompt into atomic yes/no questions, verify each against the image, and
aggregate: S = mean semantic score, Q = mean quality score, reward = sqrt(S * Q) (the paper's
rule; `mean` and `weighted` are options). Decompositions depend only on the prompt and are cached.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import List, Optional, Protocol, Sequence

from .types import Answer, Question, RewardResult

AGGREGATIONS = ("geometric", "mean", "weighted")


class Decomposer(Protocol):
    def decompose(self, prompts: Sequence[str]) -> List[List[Question]]:
        """Questions for each prompt; raises ValueError naming a prompt it cannot decompose."""


class Verifier(Protocol):
    def verify(self, images: Sequence, questions: Sequence[List[Question]]) -> List[List[Answer]]:
        """Answers for each (image, questions) pair."""


def aggregate(answers: Sequence[Answer], mode: str = "geometric", semantic_weight: float = 0.5):
    """(reward, S, Q, failed). Failed answers are excluded from the means and counted; a kind with
    no (scored) question counts as 1.0 (nothing was asked of it)."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    sem = [a.score for a in answers if a.question.kind == "semantic" and a.score is not None]
    qua = [a.score for a in answers if a.question.kind == "quality" and a.score is not None]
    failed = sum(1 for a in answers if a.score is None)
    S = sum(sem) / len(sem) if sem else 1.0
    Q = sum(qua) / len(qua) if qua else 1.0
    if mode == "geometric":
        reward = math.sqrt(max(S, 0.0) * max(Q, 0.0))
    elif mode == "mean":
        reward = 0.5 * (S + Q)
    else:
        reward = semantic_weight * S + (1.0 - semantic_weight) * Q
    return reward, S, Q, failed


class DecompositionCache:
    """Thread-safe LRU cache: prompt -> questions."""

    def __init__(self, max_size: int = 100_000):
        self.max_size = max_size
        self._data: "OrderedDict[str, List[Question]]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, prompt: str) -> Optional[List[Question]]:
        with self._lock:
            qs = self._data.get(prompt)
            if qs is None:
                self.misses += 1
                return None
            self._data.move_to_end(prompt)
            self.hits += 1
            return qs

    def put(self, prompt: str, questions: List[Question]) -> None:
        with self._lock:
            self._data[prompt] = questions
            self._data.move_to_end(prompt)
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class DVReward:
    """reward = DVReward(decomposer, verifier); results = reward(prompts, images)."""

    def __init__(
        self,
        decomposer: Decomposer,
        verifier: Verifier,
        aggregation: str = "geometric",
        semantic_weight: float = 0.5,
        cache: Optional[DecompositionCache] = None,
    ):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.decomposer, self.verifier = decomposer, verifier
        self.aggregation, self.semantic_weight = aggregation, semantic_weight
        self.cache = cache if cache is not None else DecompositionCache()

    def decompose(self, prompts: Sequence[str]) -> List[List[Question]]:
        out: List[Optional[List[Question]]] = [self.cache.get(p) for p in prompts]
        missing = sorted({p for p, q in zip(prompts, out) if q is None})
        if missing:
            for p, qs in zip(missing, self.decomposer.decompose(missing)):
                self.cache.put(p, qs)
            out = [q if q is not None else self.cache.get(p) for p, q in zip(prompts, out)]
        return out  # type: ignore[return-value]

    def __call__(self, prompts: Sequence[str], images: Sequence) -> List[RewardResult]:
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        questions = self.decompose(prompts)
        answers = self.verifier.verify(images, questions)
        results = []
        for prompt, ans in zip(prompts, answers):
            reward, S, Q, failed = aggregate(ans, self.aggregation, self.semantic_weight)
            results.append(RewardResult(prompt, reward, S, Q, list(ans), failed))
        return results
