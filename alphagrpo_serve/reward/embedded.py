"""The embedded DVReward backends for ShapesWorld: a rule-based decomposer for the prompt grammar
and a verifier that answers from the detector with graded probabilities of "yes", so a near miss
(one object too many, a shape barely on the wrong side, a colour one step off) scores between a
failure and a success.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..shapes.detect import Detection, Detector, ImageDetections, check_images
from ..shapes.grammar import NUMBER_WORDS, PLURALS, RELATION_MARGIN, Group, Spec, parse
from ..shapes.implicit import resolve
from ..shapes.world import COLORS, SHAPES
from .dvreward import DVReward
from .types import Answer, Question

_REL_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def spec_of(prompt: str) -> Spec:
    """The explicit spec a prompt asks for (implicit prompts resolved); PromptError when outside the grammar."""
    spec = resolve(prompt)
    return spec if spec is not None else parse(prompt)


def _noun(g: Group) -> str:
    return " ".join(([g.color] if g.color else []) + [g.shape])


def _group_check(g: Group) -> Dict:
    return {"shape": g.shape, "color": g.color, "count": g.count, "exact": g.exact}


def questions_for_spec(spec: Spec) -> List[Question]:
    """Atomic semantic questions (existence, count, colour, spatial) and quality questions."""
    qs: List[Question] = []

    def add(text, kind, tag, check):
        qs.append(Question(f"q{len(qs)}", text, kind, tag, check))

    for g in spec.groups:
        add(f"Is there a {_noun(g)} in the image?", "semantic", "Existence", {"op": "exists", **_group_check(g)})
        if g.exact:
            plural = " ".join(([g.color] if g.color else []) + [PLURALS[g.shape] if g.count > 1 else g.shape])
            add(
                f"Are there exactly {NUMBER_WORDS[g.count]} {plural}?",
                "semantic",
                "Count",
                {"op": "count", **_group_check(g)},
            )
        if g.color:
            add(f"Is the {g.shape} {g.color}?", "semantic", "Attribute", {"op": "color", **_group_check(g)})
    if spec.relation is not None:
        a, b = spec.groups
        add(
            f"Is the {_noun(a)} {_REL_TEXT[spec.relation]} the {_noun(b)}?",
            "semantic",
            "Spatial",
            {"op": "relation", "a": _group_check(a), "b": _group_check(b), "relation": spec.relation},
        )
    add(
        "Are all the shapes well formed (clean circles, squares and triangles)?",
        "quality",
        "Geometry",
        {"op": "well_formed"},
    )
    add("Is the background clean, free of specks and smudges?", "quality", "Texture", {"op": "clean_background"})
    add(
        "Does the image hold only the objects the prompt asks for?",
        "quality",
        "Coherence",
        {"op": "no_extra", "groups": [_group_check(g) for g in spec.groups]},
    )
    return qs


class ShapesDecomposer:
    """Rule-based decomposer for the ShapesWorld grammar (and its implicit prompts)."""

    def decompose(self, prompts: Sequence[str]) -> List[List[Question]]:
        return [questions_for_spec(spec_of(p)) for p in prompts]


# ---- verifier ---------------------------------------------------------------------------------------
def _match(o: Detection, g: Dict) -> float:
    """P(object o is a `g` object) from the detector's shape and colour probabilities."""
    p = float(o.shape_probs[SHAPES.index(g["shape"])])
    if g.get("color"):
        p *= float(o.color_probs[COLORS.index(g["color"])])
    return p


def _count_distribution(probs: Sequence[float]) -> np.ndarray:
    """Poisson-binomial: P(exactly k of the independent events happen), k = 0..len(probs)."""
    dist = np.zeros(len(probs) + 1)
    dist[0] = 1.0
    for p in probs:
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    return dist


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -60 else 0.0


class DetectorVerifier:
    """Answers ShapesWorld questions from the detector.

    exists: noisy-OR of the per-object match probabilities. count: expected exp(-|k - n|) under
    the Poisson-binomial count distribution (off by one scores 0.37, none at all 0). color: the colour
    probability of the objects weighted by how likely each is the asked shape. relation: match
    probabilities of the two best objects times a sigmoid of their displacement past the judging
    margin. well_formed: mean shape confidence. clean_background: exp(-stray pixels / 2%).
    no_extra: exp(-expected number of objects no requirement claims).
    """

    def __init__(self, detector: Optional[Detector] = None, relation_softness: float = 0.05):
        self.detector = detector or Detector()
        self.relation_softness = relation_softness  # share of the canvas over which a relation fades in

    def verify(self, images, questions: Sequence[List[Question]]) -> List[List[Answer]]:
        imgs = check_images(images, "images")
        if len(imgs) != len(questions):
            raise ValueError(f"got {len(imgs)} images but {len(questions)} question lists")
        dets = self.detector.detect_batch(imgs)
        return [[self._answer(q, d, imgs.shape[1]) for q in qs] for qs, d in zip(questions, dets)]

    def answer_one(self, image, question: Question) -> Answer:
        return self.verify(image, [[question]])[0][0]

    def _answer(self, q: Question, dets: ImageDetections, canvas: int) -> Answer:
        if not q.check or "op" not in q.check:
            return Answer(q, None, failed=True, detail="the embedded verifier needs a machine-checkable question")
        score = float(np.clip(self._score(q.check, dets.objects, dets.stray_fraction, canvas), 0.0, 1.0))
        return Answer(q, score, "yes" if score >= 0.5 else "no")

    def _score(self, c: Dict, objs: List[Detection], stray: float, canvas: int) -> float:
        op = c["op"]
        if op == "exists":
            return 1.0 - float(np.prod([1.0 - _match(o, c) for o in objs])) if objs else 0.0
        if op == "count":
            # none at all is a failure, not a near miss; off by one scores e^-1
            dist = _count_distribution([_match(o, c) for o in objs])
            return float(sum(p * math.exp(-abs(k - c["count"])) for k, p in enumerate(dist) if k > 0))
        if op == "color":
            w = np.asarray([float(o.shape_probs[SHAPES.index(c["shape"])]) for o in objs])
            if not objs or w.sum() < 1e-6:
                return 0.0
            pc = np.asarray([float(o.color_probs[COLORS.index(c["color"])]) for o in objs])
            return float((w * pc).sum() / w.sum()) * float(1.0 - np.prod(1.0 - w))
        if op == "relation":
            if len(objs) < 2:
                return 0.0
            ma = np.asarray([_match(o, c["a"]) for o in objs])
            mb = np.asarray([_match(o, c["b"]) for o in objs])
            best = 0.0
            for i, a in enumerate(objs):
                for j, b in enumerate(objs):
                    if i == j:
                        continue
                    d = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}[
                        c["relation"]
                    ] / canvas
                    s = ma[i] * mb[j] * _sigmoid((d - RELATION_MARGIN) / self.relation_softness)
                    best = max(best, s)
            return best
        if op == "well_formed":
            return float(np.mean([o.shape_probs.max() for o in objs])) if objs else 1.0
        if op == "clean_background":
            return math.exp(-stray / 0.02)
        if op == "no_extra":
            claimed = np.zeros(len(objs))
            for g in c["groups"]:
                m = np.asarray([_match(o, g) for o in objs]) if objs else np.zeros(0)
                order = np.argsort(-m)[: g["count"]]
                claimed[order] = np.maximum(claimed[order], m[order])
            return math.exp(-float((1.0 - claimed).sum()))
        raise ValueError(f"unknown check op {op!r}")


def embedded_reward(**kwargs) -> DVReward:
    """The embedded DVReward: ShapesDecomposer + DetectorVerifier."""
    return DVReward(ShapesDecomposer(), DetectorVerifier(), **kwargs)
