"""Held-out evaluation of a policy: GenEval-rule accuracy per category (ODE, fixed seeds), plain or
think mode, optionally after one round of self-reflective refinement, and how often thoughts on
implicit prompts parse as valid explicit prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..models.base import Policy
from ..reward.embedded import embedded_reward
from ..sampling.sampler import SamplingConfig, TextConfig
from ..tasks.base import evenly_spaced
from .evaluate import EvalReport, evaluate, load_heldout
from .grammar import PromptError, parse


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


def judged_correct(critique: str) -> bool:
    """True when a reflect-mode critique says the image already satisfies the prompt."""
    return "it is correct" in critique


def _overrides(sampling: SamplingConfig) -> dict:
    """The fields of an evaluation's SamplingConfig that the policy's defaults do not decide (steps,
    mode, guidance scale): the rest (canvas, shift, interval) stay the policy's."""
    return dict(steps=sampling.steps, mode=sampling.mode, cfg_scale=sampling.cfg_scale)


def evaluate_policy(
    policy: Policy,
    rows: Optional[Sequence[Dict]] = None,
    think: bool = False,
    reflect: bool = False,
    sampling: Optional[SamplingConfig] = None,
    batch: int = 64,
    limit: int = 0,
) -> PolicyEval:
    rows = evenly_spaced(rows if rows is not None else load_heldout(), limit)
    sampling = policy.resolve_sampling(dict(mode="ode") if sampling is None else _overrides(sampling))
    reflect_sampling = policy.resolve_sampling(_overrides(sampling), reflect=True)
    greedy = TextConfig(temperature=0.0, top_p=1.0, max_tokens=policy.info.text_defaults.max_tokens)
    prompts = [r["prompt"] for r in rows]
    seeds = [int(r.get("seed", i)) for i, r in enumerate(rows)]
    images, thoughts = [], []
    for i in range(0, len(rows), batch):
        out = policy.generate(prompts[i : i + batch], seeds[i : i + batch], sampling, greedy, think=think)
        if reflect:
            first = out
            out = policy.reflect(
                prompts[i : i + batch],
                [s.image for s in first],
                seeds[i : i + batch],
                reflect_sampling,
                greedy.replace(max_tokens=48),
            )
            # the policy's own verdict: a critique that finds the image correct keeps it
            out = [f if judged_correct(s.thought) else s for f, s in zip(first, out)]
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


# ---- the three evaluation modes the model card and the trainer's report print ----------------------
EVAL_MODES = (("plain", False, False), ("think", True, False), ("think+reflect", True, True))
GRID_PROMPTS = [
    "a red circle",
    "a blue square",
    "three green triangles",
    "a yellow circle to the left of a purple square",
    "a circle and a triangle",
    "a shape with no corners, coloured like the sky",
]


def evaluate_modes(
    policy: Policy,
    sampling: Optional[SamplingConfig] = None,
    modes=EVAL_MODES,
    rows: Optional[Sequence[Dict]] = None,
    limit: int = 0,
    log=None,
) -> Dict[str, Dict]:
    """{mode: report dict + thought rates} for each (name, think, reflect) mode (default: all three)."""
    sampling = sampling or SamplingConfig(steps=20, mode="ode", cfg_scale=3.0)
    results = {}
    for name, think, reflect in modes:
        res = evaluate_policy(policy, rows=rows, think=think, reflect=reflect, sampling=sampling, limit=limit)
        results[name] = dict(
            res.report.to_dict(),
            thought_parse_rate=res.thought_parse_rate,
            thought_correct_rate=res.thought_correct_rate,
        )
        if log:
            log(f"{name}: overall {res.report.overall:.3f}")
    return results


def modes_table(results: Dict[str, Dict]) -> str:
    """Markdown: one row per mode, accuracy per category, overall and mean DVReward."""
    from ..shapes.grammar import CATEGORIES

    cats = list(CATEGORIES) + ["implicit"]
    lines = ["| mode | " + " | ".join(cats) + " | overall | mean DVReward |", "|---" * (len(cats) + 3) + "|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r['accuracy'].get(c, float('nan')):.3f}" for c in cats)
            + f" | **{r['overall']:.3f}** | {r['mean_reward']:.3f} |"
        )
    for name, r in results.items():
        if r.get("thought_parse_rate") is not None:
            lines.append(
                f"\n{name}: implicit-prompt thoughts that parse {r['thought_parse_rate']:.3f}, "
                f"that parse to the intended prompt {r['thought_correct_rate']:.3f}"
            )
    return "\n".join(lines)
