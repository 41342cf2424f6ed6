"""ShapesWorld as a task plug-in: its prompt grammar (explicit and implicit prompts), training
split, embedded DVReward, held-out GenEval-rule suite, per-category rollout metrics, and the
format check of thoughts and critiques (what the trainer's format reward and the reward-hacking
watch read)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..tasks.base import Task, evenly_spaced
from .grammar import CATEGORIES, PromptError, all_prompts, is_heldout, parse

CATEGORIES_ALL = tuple(CATEGORIES) + ("implicit",)


def _explicit(text: str) -> str:
    from .policy_eval import thought_explicit

    return thought_explicit(text)


def text_format(prompt: str, text: str, reflect: bool) -> tuple:
    """(well formed, intended) of a thought (think mode) or a critique (reflect mode).

    A thought is well formed when it parses as an explicit prompt of the grammar; a critique when
    it says "it is correct" or ends in "draw <explicit prompt>". Intended: the explicit prompt is
    the one `prompt` asks for (a critique that finds the image correct counts as intended here; the
    evaluation reports the share of drawing critiques that draw the intended prompt)."""
    from ..reward.embedded import spec_of

    text = text.strip()
    if reflect:
        if "it is correct" in text:
            return True, True
        if " draw " not in f" {text} ":
            return False, False
    try:
        spec = parse(_explicit(text))
    except PromptError:
        return False, False
    return True, spec == spec_of(prompt)


def objects_exceed(prompts: Sequence[str], images: np.ndarray, detector=None) -> List[bool]:
    """Per image: the detector reads more objects than the prompt asks for in all (extra copies,
    fragments, specks large enough to count)."""
    from ..reward.embedded import spec_of
    from .detect import Detector

    dets = (detector or Detector()).detect_batch(images)
    return [len(d.objects) > sum(g.count for g in spec_of(p).groups) for p, d in zip(prompts, dets)]


def background_noise(images: np.ndarray, alpha_threshold: float = 0.45) -> np.ndarray:
    """Per image: mean RGB distance (0-255 units) from the background colour over the background,
    i.e. pixels below the detector's foreground threshold and not next to an object. Tints, stripes
    and specks too faint for the detector (and so for the reward) show up here; a clean render
    scores 0."""
    from scipy import ndimage

    from .world import BACKGROUND, COLORS, PALETTE

    bg = np.asarray(BACKGROUND, dtype=np.float32)
    dirs = np.stack([np.asarray(PALETTE[c], dtype=np.float32) - bg for c in COLORS])
    norms = np.linalg.norm(dirs, axis=1)
    rel = np.asarray(images, dtype=np.float32) - bg  # [N, H, W, 3]
    alpha = ((rel @ (dirs / norms[:, None]).T) / norms).max(-1)  # [N, H, W]
    near = ndimage.binary_dilation(alpha > alpha_threshold, structure=np.ones((1, 3, 3), bool))
    dist = np.linalg.norm(rel, axis=-1)
    keep = ~near
    return (dist * keep).sum((1, 2)) / np.maximum(keep.sum((1, 2)), 1)


class _CritiqueRecorder:
    """Wraps a policy for evaluate_policy and keeps every critique its reflect() writes (the
    evaluation itself replaces the samples whose critique judges the image correct)."""

    def __init__(self, policy):
        self._policy = policy
        self.critiques: List[str] = []

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def reflect(self, *args, **kwargs):
        out = self._policy.reflect(*args, **kwargs)
        self.critiques += [s.thought for s in out]
        return out


class ShapesTask(Task):
    name = "shapes"

    def check_prompt(self, prompt: str) -> None:
        from ..reward.embedded import spec_of

        spec_of(prompt)  # PromptError (a ValueError) naming the word and position

    def training_prompts(self) -> Dict[str, List[str]]:
        return {c: [p for p in all_prompts(c) if not is_heldout(p)] for c in CATEGORIES_ALL}

    def reward(self):
        from ..reward.embedded import embedded_reward

        return embedded_reward()

    def evaluate(
        self, policy, sampling, modes: Sequence[tuple], limit: int = 0, rows: Optional[Sequence[Dict]] = None
    ) -> Dict[str, Dict]:
        """{mode: GenEval-rule accuracy per category, overall, mean DVReward and its S and Q, the
        share of images with more objects than asked, thought parse rates, and in reflect modes
        the critiques' format rates}."""
        from ..reward.embedded import embedded_reward
        from .evaluate import load_heldout
        from .policy_eval import evaluate_policy

        rows = evenly_spaced(rows if rows is not None else load_heldout(), limit)
        prompts = [r["prompt"] for r in rows]
        reward = embedded_reward()
        results = {}
        for name, think, reflect in modes:
            rec = _CritiqueRecorder(policy)
            res = evaluate_policy(rec, rows=rows, think=think, reflect=reflect, sampling=sampling)
            scored = reward(prompts, res.images)
            out = dict(
                res.report.to_dict(),
                thought_parse_rate=res.thought_parse_rate,
                thought_correct_rate=res.thought_correct_rate,
                semantic=float(np.mean([x.semantic for x in scored])),
                quality=float(np.mean([x.quality for x in scored])),
                extra_objects_frac=float(np.mean(objects_exceed(prompts, res.images))),
                background_noise=float(np.mean(background_noise(res.images))),
            )
            if reflect and rec.critiques:
                fmt = [text_format(p, c, True) for p, c in zip(prompts, rec.critiques)]
                drawing = [f[1] for f, c in zip(fmt, rec.critiques) if "it is correct" not in c]
                out.update(
                    critique_format_rate=float(np.mean([f[0] for f in fmt])),
                    critique_intended_rate=float(np.mean(drawing)) if drawing else None,
                    # the share of critiques that declare the image correct, right or wrong
                    critique_correct_verdict_rate=float(np.mean(["it is correct" in c for c in rec.critiques])),
                )
            results[name] = out
        return results

    def results_table(self, results: Dict[str, Dict]) -> str:
        if any(not r.get("accuracy") for r in results.values()):  # a held-out file's reward-only results
            return super().results_table(results)
        from .policy_eval import modes_table

        lines = [
            modes_table(results),
            "",
            "| mode | S | Q | more objects than asked | critiques well formed | critiques intended |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        for name, r in results.items():
            lines.append(
                f"| {name} | {f(r.get('semantic'))} | {f(r.get('quality'))} | {f(r.get('extra_objects_frac'))} | "
                f"{f(r.get('critique_format_rate'))} | {f(r.get('critique_intended_rate'))} |"
            )
        return "\n".join(lines)

    def rollout_metrics(self, prompts: Sequence[str], images: np.ndarray) -> Dict[str, float]:
        from .evaluate import evaluate

        rep = evaluate(list(prompts), images)
        out = {f"acc_{k}": v for k, v in rep.accuracy.items()}
        out["extra_objects_frac"] = float(np.mean(objects_exceed(prompts, images)))
        out["background_noise"] = float(np.mean(background_noise(images)))
        return out

    def category(self, prompt: str) -> str:
        """The prompt's category (GenEval's six, or implicit)."""
        from .evaluate import category_of

        return category_of(prompt)

    def format_ok(self, prompt: str, text: str, reflect: bool) -> bool:
        """The format check of a thought or critique (text_format's first answer)."""
        return text_format(prompt, text, reflect)[0]

    def grid_prompts(self) -> List[str]:
        from .policy_eval import GRID_PROMPTS

        return list(GRID_PROMPTS)
