"""The ShapesWorld prompt grammar, in GenEval's six categories.

    prompt   := group | group " and " group | group " " relation " " group
    group    := ("a" | "an" | "one" | "two" | "three" | "four") [colour] shape["s"]
    relation := "to the left of" | "to the right of" | "above" | "below"

Categories (as GenEval): single_object "a circle"; two_object "a circle and a square";
counting "three green triangles" (1 to 4, exact); colors "a purple square"; position "a red
circle to the left of a blue square"; color_attr "a red circle and a blue square" (two objects,
distinct shape-colour bindings). parse(write(spec)) == spec for every spec of the grammar.
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .world import COLORS, SHAPES, Obj, Scene, place

CATEGORIES: Tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}
PLURALS = {s: s + "s" for s in SHAPES}
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


class PromptError(ValueError):
    """A prompt outside the grammar; names the word and its position (0-based word index)."""

    def __init__(self, prompt: str, position: int, word: str, expected: str):
        self.prompt, self.position, self.word, self.expected = prompt, position, word, expected
        shown = repr(word) if word else "end of prompt"
        super().__init__(f"cannot parse prompt {prompt!r}: at word {position} ({shown}) expected {expected}")


@dataclass(frozen=True)
class Group:
    """count objects of `shape` (and `color` when given). exact: the count is a requirement
    (counting prompts); otherwise 'a circle' means at least one."""

    shape: str
    color: Optional[str] = None
    count: int = 1
    exact: bool = False


@dataclass(frozen=True)
class Spec:
    groups: Tuple[Group, ...]
    relation: Optional[str] = None  # between groups[0] and groups[1]

    @property
    def category(self) -> str:
        if self.relation is not None:
            return "position"
        if len(self.groups) == 2:
            return "color_attr" if all(g.color for g in self.groups) else "two_object"
        g = self.groups[0]
        if g.exact:
            return "counting"
        return "colors" if g.color else "single_object"


def _group_text(g: Group) -> str:
    noun = PLURALS[g.shape] if g.count > 1 else g.shape
    words = [NUMBER_WORDS[g.count] if g.exact else "a"] + ([g.color] if g.color else []) + [noun]
    return " ".join(words)


def write(spec: Spec) -> str:
    """Spec -> prompt text."""
    if spec.relation is not None:
        return f"{_group_text(spec.groups[0])} {_RELATION_TEXT[spec.relation]} {_group_text(spec.groups[1])}"
    return " and ".join(_group_text(g) for g in spec.groups)


def parse(prompt: str) -> Spec:
    """Prompt text -> Spec. Raises PromptError naming the word it could not parse."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    words = re.findall(r"[a-z]+", prompt.lower())
    pos = 0

    def word(i):
        return words[i] if i < len(words) else ""

    def group() -> Group:
        nonlocal pos
        w = word(pos)
        if w in ("a", "an"):
            count, exact = 1, False
        elif w in NUMBERS:
            count, exact = NUMBERS[w], True
        else:
            raise PromptError(prompt, pos, w, "'a', 'an' or a number one..four")
        pos += 1
        color = None
        if word(pos) in COLORS:
            color = word(pos)
            pos += 1
        w = word(pos)
        singular = {s: s for s in SHAPES}
        plural = {p: s for s, p in PLURALS.items()}
        if count == 1 and w in singular:
            shape = singular[w]
        elif count > 1 and w in plural:
            shape = plural[w]
        else:
            form = (
                "a shape (circle, square, triangle)" if count == 1 else "a plural shape (circles, squares, triangles)"
            )
            raise PromptError(prompt, pos, w, form + ("" if color else " or a colour " + "/".join(COLORS)))
        pos += 1
        return Group(shape, color, count, exact)

    if not words:
        raise PromptError(prompt, 0, "", "a prompt such as 'a red circle'")
    first = group()
    if pos == len(words):
        return Spec((first,))
    w = word(pos)
    if w == "and":
        pos += 1
        second = group()
        relation = None
    else:
        relation = None
        if words[pos : pos + 3] in (["to", "the", "left"], ["to", "the", "right"]) and word(pos + 3) == "of":
            relation = f"{words[pos + 2]} of"
            pos += 4
        elif w in ("above", "below"):
            relation = w
            pos += 1
        else:
            raise PromptError(prompt, pos, w, "'and', 'to the left of', 'to the right of', 'above', 'below' or the end")
        second = group()
    if pos != len(words):
        raise PromptError(prompt, pos, word(pos), "the end of the prompt")
    if len({(first.shape, first.color), (second.shape, second.color)}) < 2:
        raise PromptError(prompt, pos - 1, words[pos - 1], "a second object different from the first")
    if relation is not None and (first.count > 1 or second.count > 1):
        raise PromptError(prompt, 0, words[0], "single objects on both sides of a relation")
    return Spec((first, second), relation)


# ---- sampling -------------------------------------------------------------------------------------
def sample_spec(rng: np.random.Generator, category: str) -> Spec:
    """A random spec of a category."""
    shape = lambda: SHAPES[rng.integers(len(SHAPES))]  # noqa: E731
    color = lambda: COLORS[rng.integers(len(COLORS))]  # noqa: E731
    if category == "single_object":
        return Spec((Group(shape()),))
    if category == "colors":
        return Spec((Group(shape(), color()),))
    if category == "counting":
        n = int(rng.integers(1, 5))
        return Spec((Group(shape(), color() if rng.random() < 0.5 else None, n, True),))
    a, b = rng.choice(len(SHAPES), 2, replace=False)
    if category == "two_object":
        return Spec((Group(SHAPES[a]), Group(SHAPES[b])))
    ca, cb = rng.choice(len(COLORS), 2, replace=False)
    if category == "color_attr":
        return Spec((Group(SHAPES[a], COLORS[ca]), Group(SHAPES[b], COLORS[cb])))
    if category == "position":
        return Spec(
            (Group(SHAPES[a], COLORS[ca]), Group(SHAPES[b], COLORS[cb])), RELATIONS[rng.integers(len(RELATIONS))]
        )
    raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")


HELDOUT_CATEGORIES = ("counting", "position", "color_attr", "implicit")


def is_heldout(prompt: str) -> bool:
    """The held-out rule: a fixed fifth (by CRC-32 of the text) of the prompts of the large
    categories. Training samplers skip these; the three small categories keep all their prompts."""
    from .implicit import resolve

    category = "implicit" if resolve(prompt) is not None else parse(prompt).category
    return category in HELDOUT_CATEGORIES and zlib.crc32(prompt.encode()) % 5 == 0


def all_prompts(category: str) -> List[str]:
    """Every prompt of a category, in a fixed order."""
    if category == "implicit":
        from .implicit import all_implicit

        return all_implicit()
    cols: List[Optional[str]] = [None] + list(COLORS)
    out = []
    if category == "single_object":
        out = [Spec((Group(s),)) for s in SHAPES]
    elif category == "colors":
        out = [Spec((Group(s, c),)) for s in SHAPES for c in COLORS]
    elif category == "counting":
        out = [Spec((Group(s, c, n, True),)) for s in SHAPES for c in cols for n in range(1, 5)]
    elif category == "two_object":
        out = [Spec((Group(a), Group(b))) for a, b in itertools.permutations(SHAPES, 2)]
    elif category in ("color_attr", "position"):
        rels = RELATIONS if category == "position" else (None,)
        out = [
            Spec((Group(a, ca), Group(b, cb)), r)
            for a, b in itertools.permutations(SHAPES, 2)
            for ca, cb in itertools.permutations(COLORS, 2)
            for r in rels
        ]
    else:
        raise ValueError(f"category must be one of {CATEGORIES + ('implicit',)}, got {category!r}")
    return [write(s) for s in out]


class PromptSampler:
    """Seeded prompts by category mix; held-out prompts (is_heldout) are never drawn."""

    def __init__(self, seed: int = 0, mix: Optional[Dict[str, float]] = None, exclude: Sequence[str] = ()):
        self.rng = np.random.default_rng(seed)
        mix = mix or {c: 1.0 for c in CATEGORIES}
        bad = set(mix) - set(CATEGORIES)
        if bad:
            raise ValueError(f"unknown categories {sorted(bad)}; valid: {CATEGORIES}")
        self.categories = list(mix)
        p = np.asarray([mix[c] for c in self.categories], dtype=np.float64)
        self.p = p / p.sum()
        self.exclude = set(exclude)

    def __call__(self) -> Spec:
        for _ in range(1000):
            spec = sample_spec(self.rng, self.categories[self.rng.choice(len(self.categories), p=self.p)])
            text = write(spec)
            if text not in self.exclude and not is_heldout(text):
                return spec
        raise RuntimeError("every sampled prompt is excluded")


# ---- ground truth ---------------------------------------------------------------------------------
RELATION_MARGIN = 0.1  # a relation holds when the centres differ by more than this share of the canvas


def relation_holds(a: Obj, b: Obj, relation: str, canvas: int, margin: float = RELATION_MARGIN) -> bool:
    """Whether a stands in relation to b: centres apart by more than margin x canvas along the axis."""
    t = margin * canvas
    return {
        "left of": b.cx - a.cx > t,
        "right of": a.cx - b.cx > t,
        "above": b.cy - a.cy > t,
        "below": a.cy - b.cy > t,
    }[relation]


def scene_for_spec(spec: Spec, rng: np.random.Generator, canvas: int = 32) -> Scene:
    """A scene that satisfies spec exactly (unspecified colours drawn at random, no extra objects)."""
    pairs = []
    for g in spec.groups:
        for _ in range(g.count):
            pairs.append((g.shape, g.color or COLORS[rng.integers(len(COLORS))]))
    constraint = None
    if spec.relation is not None:
        # ground truth keeps a clear margin (a quarter of the canvas), well past the judging margin
        constraint = lambda objs: relation_holds(objs[0], objs[1], spec.relation, canvas, 0.25)  # noqa: E731
    return Scene(place(pairs, canvas, rng, constraint), canvas)
