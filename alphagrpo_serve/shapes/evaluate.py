"""GenEval-style evaluation of (prompt, image) pairs on ShapesWorld.

A pair is correct only when every requirement of its prompt holds in the detector's reading
(GenEval's rule): each object group present (exactly `count` of them for counting prompts), with
its colour, and the relation between the two objects when one is asked. The table reports accuracy
per category, the overall score as GenEval does (the mean of the six category accuracies),
implicit prompts separately, and the mean DVReward.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .detect import Detector, ImageDetections, check_images
from .grammar import CATEGORIES, Group, Spec, parse, relation_holds, scene_for_spec, write
from .implicit import resolve
from .world import render

HELDOUT = os.path.join(os.path.dirname(__file__), "data", "heldout.jsonl")
HELDOUT_SEED = 20261126
HELDOUT_PER_CATEGORY = 50
HELDOUT_IMPLICIT = 60


def _matches(d, g: Group) -> bool:
    return d.shape == g.shape and (g.color is None or d.color == g.color)


def geneval_correct(spec: Spec, dets: ImageDetections, canvas: int) -> bool:
    """GenEval's rule on one image: every requirement of spec holds in the detections."""
    for g in spec.groups:
        n = sum(_matches(d, g) for d in dets.objects)
        if (g.exact and n != g.count) or n < 1:
            return False
    if spec.relation is not None:
        a, b = spec.groups
        return any(
            relation_holds(da, db, spec.relation, canvas)
            for da in dets.objects
            if _matches(da, a)
            for db in dets.objects
            if _matches(db, b) and db is not da
        )
    return True


def category_of(prompt: str) -> str:
    return "implicit" if resolve(prompt) is not None else parse(prompt).category


@dataclass
class EvalReport:
    accuracy: Dict[str, float]  # per category (and "implicit" when present)
    counts: Dict[str, int]
    overall: float  # mean of the six GenEval category accuracies present
    mean_reward: Optional[float]
    correct: List[bool] = field(default_factory=list)
    rewards: List[float] = field(default_factory=list)

    def table(self) -> str:
        rows = ["| category | n | accuracy |", "|---|---:|---:|"]
        for c in list(CATEGORIES) + ["implicit"]:
            if c in self.accuracy:
                rows.append(f"| {c} | {self.counts[c]} | {self.accuracy[c]:.3f} |")
        rows.append(
            f"| **overall** (mean of categories) | {sum(self.counts[c] for c in CATEGORIES if c in self.counts)} "
            f"| **{self.overall:.3f}** |"
        )
        if self.mean_reward is not None:
            rows.append(f"| mean DVReward | {len(self.rewards)} | {self.mean_reward:.3f} |")
        return "\n".join(rows)

    def to_dict(self) -> Dict:
        return {
            "accuracy": self.accuracy,
            "counts": self.counts,
            "overall": self.overall,
            "mean_reward": self.mean_reward,
        }


def evaluate(prompts: Sequence[str], images, *, reward=None, detector: Optional[Detector] = None) -> EvalReport:
    """Scores pairs by the GenEval rule (and the DVReward when `reward` is given)."""
    imgs = check_images(images, "images")
    if len(imgs) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(imgs)} images")
    detector = detector or Detector()
    dets = detector.detect_batch(imgs)
    correct, cats = [], []
    for p, d in zip(prompts, dets):
        spec = resolve(p) or parse(p)
        cats.append(category_of(p))
        correct.append(geneval_correct(spec, d, imgs.shape[1]))
    acc: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for c in set(cats):
        sel = [ok for ok, cc in zip(correct, cats) if cc == c]
        acc[c], counts[c] = float(np.mean(sel)), len(sel)
    main = [acc[c] for c in CATEGORIES if c in acc]
    overall = float(np.mean(main)) if main else float("nan")
    rewards = [r.reward for r in reward(list(prompts), imgs)] if reward is not None else []
    return EvalReport(acc, counts, overall, float(np.mean(rewards)) if rewards else None, correct, rewards)


# ---- the held-out split -------------------------------------------------------------------------
def make_heldout(seed: int = HELDOUT_SEED) -> List[Dict]:
    """The held-out split: HELDOUT_PER_CATEGORY rows per GenEval category and HELDOUT_IMPLICIT
    implicit rows, each {prompt, category, seed[, explicit]}; the seed fixes the evaluation noise.

    Prompts come from grammar.is_heldout's rule: for the large categories (counting, position,
    color_attr, implicit) a fixed fifth of all prompts that training never draws; the three small
    categories (3, 6 and 18 prompts in all) cannot lose prompts, so their rows are every prompt
    with seeds of their own. Shipped as shapes/data/heldout.jsonl; no training code reads it.
    """
    from .grammar import HELDOUT_CATEGORIES, all_prompts, is_heldout

    rows: List[Dict] = []
    for c in list(CATEGORIES) + ["implicit"]:
        pool = [p for p in all_prompts(c) if c not in HELDOUT_CATEGORIES or is_heldout(p)]
        rng = np.random.default_rng([seed, len(rows)])
        pool = [pool[i] for i in rng.permutation(len(pool))]
        n = HELDOUT_IMPLICIT if c == "implicit" else HELDOUT_PER_CATEGORY
        for i in range(n):
            p = pool[i % len(pool)]
            row = {"prompt": p, "category": c, "seed": int(seed + len(rows))}
            if c == "implicit":
                row["explicit"] = write(resolve(p))
            rows.append(row)
    return rows


def load_heldout(path: str = HELDOUT) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ground_truth_images(prompts: Sequence[str], canvas: int = 32, seeds: Optional[Sequence[int]] = None) -> np.ndarray:
    """Renders of scenes that satisfy each prompt exactly (the upper bound of any policy)."""
    seeds = range(len(prompts)) if seeds is None else seeds
    return np.stack(
        [
            render(scene_for_spec(resolve(p) or parse(p), np.random.default_rng(s), canvas))
            for p, s in zip(prompts, seeds)
        ]
    )


if __name__ == "__main__":  # regenerate the shipped split: python -m alphagrpo_serve.shapes.evaluate
    with open(HELDOUT, "w") as f:
        for row in make_heldout():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {HELDOUT}")
