"""Implicit prompts for reasoning text-to-image: the colour, shape or count is given by reference
("a shape with no corners, coloured like the sky") and resolves to exactly one explicit spec
("a blue circle"). The reference tables are shapes/data/implicit.json.

Templates (REF_* are phrases of the tables):
    colour+shape:  "a shape with {SHAPE_REF}, coloured like {COLOR_REF}"
    shape only:    "a shape with {SHAPE_REF}"
    colour only:   "a {shape} coloured like {COLOR_REF}"
    count:         "as many {shape}s as {COUNT_REF}"  /  "as many {colour} {shape}s as {COUNT_REF}"
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np

from .grammar import PLURALS, Group, Spec, write
from .world import COLORS, SHAPES

DATA = os.path.join(os.path.dirname(__file__), "data", "implicit.json")


@lru_cache(maxsize=1)
def tables() -> Dict[str, Dict]:
    with open(DATA) as f:
        data = json.load(f)
    for k, v in data["colors"].items():
        assert v in COLORS, f"implicit.json: colour of {k!r} is {v!r}, not one of {COLORS}"
    for k, v in data["shapes"].items():
        assert v in SHAPES, f"implicit.json: shape of {k!r} is {v!r}, not one of {SHAPES}"
    for k, v in data["counts"].items():
        assert v in (1, 2, 3, 4), f"implicit.json: count of {k!r} is {v!r}, not 1..4"
    return {k: data[k] for k in ("colors", "shapes", "counts")}


def _alt(keys) -> str:
    return "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))


@lru_cache(maxsize=1)
def _patterns():
    t = tables()
    c, s, n = _alt(t["colors"]), _alt(t["shapes"]), _alt(t["counts"])
    shape, plural, color = _alt(SHAPES), _alt(PLURALS.values()), _alt(COLORS)
    return [
        (re.compile(rf"^a shape with (?P<sref>{s}),? coloured like (?P<cref>{c})$"), "color_shape"),
        (re.compile(rf"^a shape with (?P<sref>{s})$"), "shape"),
        (re.compile(rf"^an? (?P<shape>{shape}) coloured like (?P<cref>{c})$"), "color"),
        (re.compile(rf"^as many (?:(?P<color>{color}) )?(?P<plural>{plural}) as (?P<nref>{n})$"), "count"),
    ]


def resolve(prompt: str) -> Optional[Spec]:
    """The explicit spec an implicit prompt means, or None when it is not an implicit prompt."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    t = tables()
    for pat, kind in _patterns():
        m = pat.match(text)
        if not m:
            continue
        g = m.groupdict()
        if kind == "color_shape":
            return Spec((Group(t["shapes"][g["sref"]], t["colors"][g["cref"]]),))
        if kind == "shape":
            return Spec((Group(t["shapes"][g["sref"]]),))
        if kind == "color":
            return Spec((Group(g["shape"], t["colors"][g["cref"]]),))
        shape = {p: s for s, p in PLURALS.items()}[g["plural"]]
        return Spec((Group(shape, g["color"], t["counts"][g["nref"]], True),))
    return None


def is_implicit(prompt: str) -> bool:
    return resolve(prompt) is not None


def sample_implicit(rng: np.random.Generator) -> Tuple[str, Spec]:
    """A random implicit prompt and the explicit spec it resolves to."""
    t = tables()
    pick = lambda d: list(d)[rng.integers(len(d))]  # noqa: E731
    kind = rng.integers(4)
    if kind == 0:
        text = f"a shape with {pick(t['shapes'])}, coloured like {pick(t['colors'])}"
    elif kind == 1:
        text = f"a shape with {pick(t['shapes'])}"
    elif kind == 2:
        shape = SHAPES[rng.integers(len(SHAPES))]
        text = f"a {shape} coloured like {pick(t['colors'])}"
    else:
        color = COLORS[rng.integers(len(COLORS))] + " " if rng.random() < 0.5 else ""
        text = f"as many {color}{PLURALS[SHAPES[rng.integers(len(SHAPES))]]} as {pick(t['counts'])}"
    spec = resolve(text)
    assert spec is not None, text
    return text, spec


def all_implicit() -> List[str]:
    """Every implicit prompt of the templates, in a fixed order."""
    t = tables()
    out = [f"a shape with {s}, coloured like {c}" for s in t["shapes"] for c in t["colors"]]
    out += [f"a shape with {s}" for s in t["shapes"]]
    out += [f"a {shape} coloured like {c}" for shape in SHAPES for c in t["colors"]]
    out += [
        f"as many {col + ' ' if col else ''}{PLURALS[shape]} as {n}"
        for shape in SHAPES
        for col in [""] + list(COLORS)
        for n in t["counts"]
    ]
    return out


def explicit_text(prompt: str) -> str:
    """The explicit prompt of an implicit one (what a good <think> should write)."""
    spec = resolve(prompt)
    if spec is None:
        raise ValueError(f"not an implicit prompt: {prompt!r}")
    return write(spec)
