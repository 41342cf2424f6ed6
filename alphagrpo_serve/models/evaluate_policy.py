"""Held-out evaluation of a policy: GenEval-rule accuracy per category (ODE, fixed seeds), plain or
think mode, optionally after one round of self-reflective refinement, and how often thoughts on
implicit prompts parse as valid explicit prompts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..reward import embedded_reward
from ..sampling.sampler import SamplingConfig
from ..shapes.evaluate import EvalReport, evaluate, load_heldout
from ..shapes.grammar import PromptError, parse
from .base import Policy


@dataclass
class PolicyEval:
    report: EvalReport
    thought_parse_rate: Optional[float]  # share of implicit-prompt thoughts that parse (think mode)
    thought_correct_rate: Optional[float]  # share that parse to the intended explicit spec
    images: np.ndarray
    thoughts: List[str]


def thought_explicit(thought: str) -> str:
    """The explicit prompt a thought ends with ('... draw X' in critiques, the whole thought otherwise)."""
    text = thought.strip()
    if " draw " in f" {text}":
        text = text.rsplit("draw", 1)[1]
    return text.strip(" .")


def evaluate_policy(policy: Policy, rows: Optional[Sequence[Dict]] = None, think: bool = False, reflect: bool = False,
                    sampling: Optional[SamplingConfig] = None, batch: int = 64, limit: int = 0) -> PolicyEval:
    rows = list(rows if rows is not None else load_heldout())
    if limit:
        rows = rows[:limit]
    sampling = sampling or SamplingConfig(mode="ode")
    prompts = [r["prompt"] for r in rows]
    seeds = [int(r.get("seed", i)) for i, r in enumerate(rows)]
    images, thoughts = [], []
    for i in range(0, len(rows), batch):
        out = policy.generate(prompts[i:i + batch], seeds[i:i + batch], sampling, think=think, temperature=1e-4 if think else 1.0)
        if reflect:
            out = policy.reflect(prompts[i:i + batch], [s.image for s in out], seeds[i:i + batch], sampling,
                                 temperature=1e-4)
        images += [s.image for s in out]
        thoughts += [s.thought for s in out]
    images = np.stack(images)
    report = evaluate(prompts, images, reward=embedded_reward())
    parse_rate = correct_rate = None
    implicit = [(r, th) for r, th in zip(rows, thoughts) if r.get("category") == "implicit"]
    if (think or reflect) and implicit:
        ok = correct = 0
        for r, th in implicit:
            try:
                spec = parse(thought_explicit(th))
            except PromptError:
                continue
            ok += 1
            correct += int(spec == parse(r["explicit"]))
        parse_rate, correct_rate = ok / len(implicit), correct / len(implicit)
    return PolicyEval(report, parse_rate, correct_rate, images, thoughts)
