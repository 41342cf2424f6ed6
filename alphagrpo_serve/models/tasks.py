"""Pretraining examples for the tiny UMM, in four tasks, and the text templates they use.

    t2i       explicit prompt -> image (half of them through a <think> that restates the prompt)
    implicit  implicit prompt -> <think> explicit prompt </think> -> image
    reflect   prompt + flawed image -> <think> critique and edit instruction </think> -> corrected image
    caption   image -> description

A sequence is a list of segments: ("text", ids, loss) with loss True where the tokens are
targets, ("image", pixels) for a clean input image, and a final ("gen", pixels) for the image to
draw. With probability cfg_drop the conditioning of a drawing task is dropped (the unconditional
branch of classifier-free guidance): ("text", [<bos> <user> <assistant> <img>]) + ("gen", ...).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..shapes.grammar import COLORS, NUMBER_WORDS, PLURALS, SHAPES, Group, PromptSampler, Spec, scene_for_spec, write
from ..shapes.implicit import sample_implicit
from ..shapes.world import Obj, Scene, render

TEMPLATE_WORDS = "i see nothing it is correct the should be there missing not remove draw describe image : . ,"
TASKS = ("t2i", "implicit", "reflect", "caption")
_REL_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def describe(objects: Sequence[Obj]) -> str:
    """'two red circles and a blue square' (groups in order of first appearance); 'nothing' when empty."""
    if not objects:
        return "nothing"
    counts = Counter((o.color, o.shape) for o in objects)
    parts = []
    for (color, shape), n in counts.items():
        parts.append(f"a {color} {shape}" if n == 1 else f"{NUMBER_WORDS.get(n, 'four')} {color} {PLURALS[shape]}")
    return " and ".join(parts)


def _noun(g: Group) -> str:
    return " ".join(([g.color] if g.color else []) + [g.shape])


def flaw(spec: Spec, scene: Scene, rng: np.random.Generator) -> Tuple[Scene, str]:
    """A flawed version of a correct scene and the sentence that names the fix ('it is correct'
    when the scene is left as it is)."""
    objs = list(scene.objects)
    canvas = scene.canvas
    kinds = ["colour", "shape", "extra", "none"]
    if len(spec.groups) == 2:
        kinds.append("missing")
    if spec.relation is not None:
        kinds += ["position", "position"]
    if spec.groups[0].exact:
        kinds += ["count", "count"]
    kind = kinds[rng.integers(len(kinds))]
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if kind == "colour":
        new = [c for c in COLORS if c != o.color][rng.integers(len(COLORS) - 1)]
        objs[i] = Obj(o.shape, new, o.cx, o.cy, o.r)
        return Scene(objs, canvas), f"the {o.shape} should be {o.color}"
    if kind == "shape":
        new = [s for s in SHAPES if s != o.shape][rng.integers(len(SHAPES) - 1)]
        objs[i] = Obj(new, o.color, o.cx, o.cy, o.r)
        return Scene(objs, canvas), f"the {o.color} {new} should be a {o.shape}"
    if kind == "missing":
        del objs[i]
        return Scene(objs, canvas), f"a {o.color} {o.shape} is missing"
    if kind == "position":
        a, b = objs[0], objs[1]
        objs[0], objs[1] = Obj(a.shape, a.color, b.cx, b.cy, a.r), Obj(b.shape, b.color, a.cx, a.cy, b.r)
        ga, gb = spec.groups
        return Scene(objs, canvas), f"the {_noun(ga)} should be {_REL_TEXT[spec.relation]} the {_noun(gb)}"
    if kind == "count":
        g = spec.groups[0]
        if (rng.random() < 0.5 and len(objs) > 1) or len(objs) >= 4:
            del objs[i]
        else:
            objs = _add_object(objs, (o.shape, o.color), canvas, rng) or objs[:-1]
        noun = PLURALS[g.shape] if g.count > 1 else g.shape
        return Scene(
            objs, canvas
        ), f"there should be {NUMBER_WORDS[g.count]} {(g.color + ' ') if g.color else ''}{noun}"
    if kind == "extra":
        pair = (SHAPES[rng.integers(3)], COLORS[rng.integers(6)])
        added = _add_object(objs, pair, canvas, rng)
        if added is not None:
            return Scene(added, canvas), f"remove the {pair[1]} {pair[0]}"
    return Scene(objs, canvas), "it is correct"


def _add_object(objs: List[Obj], pair, canvas: int, rng) -> Optional[List[Obj]]:
    from ..shapes.world import overlaps, size_range

    lo, hi = size_range(canvas)
    for _ in range(200):
        r = float(rng.uniform(lo, lo + (hi - lo) * 0.4))
        o = Obj(
            pair[0], pair[1], float(rng.uniform(r + 1, canvas - r - 1)), float(rng.uniform(r + 1, canvas - r - 1)), r
        )
        if all(not overlaps(o, p, canvas / 16) for p in objs):
            return objs + [o]
    return None


def critique_text(flawed: Scene, fix: str, target_prompt: str) -> str:
    """The reflect-mode thought: what the image shows, what to fix, and the explicit prompt to draw."""
    return f"i see {describe(flawed.objects)} . {fix} . draw {target_prompt}"


@dataclass
class Example:
    task: str
    segments: list  # ("text", [ids], loss: bool) | ("image", uint8 HxWx3) | ("gen", uint8 HxWx3)


class ExampleMaker:
    """Random pretraining examples; never draws a held-out prompt (grammar.is_heldout)."""

    def __init__(
        self,
        tokenizer,
        seed: int = 0,
        canvas: int = 32,
        cfg_drop: float = 0.1,
        mix: Tuple[float, float, float, float] = (0.45, 0.2, 0.25, 0.1),
        jitter: float = 6.0,
    ):
        self.tok, self.canvas, self.cfg_drop, self.jitter = tokenizer, canvas, cfg_drop, jitter
        self.rng = np.random.default_rng(seed)
        self.sampler = PromptSampler(seed=int(self.rng.integers(2**31)))
        self.mix = np.asarray(mix) / np.sum(mix)

    def _render(self, scene: Scene) -> np.ndarray:
        return render(scene, jitter=self.jitter, rng=self.rng)

    def _uncond(self, target: np.ndarray) -> Example:
        t = self.tok
        return Example("uncond", [("text", [t.bos_id, t.user_id, t.assistant_id, t.img_id], False), ("gen", target)])

    def __call__(self) -> Example:
        from ..shapes.grammar import is_heldout

        t, rng = self.tok, self.rng
        task = TASKS[rng.choice(len(TASKS), p=self.mix)]
        if task == "implicit":
            while True:
                text, spec = sample_implicit(rng)
                if not is_heldout(text):
                    break
            prompt, thought = text, write(spec)
        else:
            spec = self.sampler()
            prompt = thought = write(spec)
        scene = scene_for_spec(spec, rng, self.canvas)
        target = self._render(scene)
        if task == "caption":
            return Example(
                task,
                [
                    ("text", [t.bos_id, t.user_id, t.img_id], False),
                    ("image", target),
                    ("text", [t.img_end_id] + t.encode("describe") + [t.assistant_id], False),
                    ("text", t.encode(describe(scene.objects)) + [t.eos_id], True),
                ],
            )
        if rng.random() < self.cfg_drop:
            return self._uncond(target)
        head = [t.bos_id, t.user_id] + t.encode(prompt)
        if task == "reflect":
            flawed, fix = flaw(spec, scene, rng)
            return Example(
                task,
                [
                    ("text", head + [t.img_id], False),
                    ("image", self._render(flawed)),
                    ("text", [t.img_end_id, t.assistant_id, t.think_id], False),
                    ("text", t.encode(critique_text(flawed, fix, thought)) + [t.think_end_id], True),
                    ("text", [t.img_id], False),
                    ("gen", target),
                ],
            )
        if task == "implicit" or rng.random() < 0.5:
            return Example(
                task,
                [
                    ("text", head + [t.assistant_id, t.think_id], False),
                    ("text", t.encode(thought) + [t.think_end_id], True),
                    ("text", [t.img_id], False),
                    ("gen", target),
                ],
            )
        return Example(task, [("text", head + [t.assistant_id, t.img_id], False), ("gen", target)])
