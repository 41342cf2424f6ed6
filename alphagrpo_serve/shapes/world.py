"""ShapesWorld scenes and their renderer.

A scene is a few flat-coloured shapes on a dark background. Canvas 32x32 RGB by default; any
square canvas from 16 px works (64x64 included), with sizes scaled to the canvas.

Palette (RGB, fixed; every pair is >= 70 apart in RGB and far from the background):
    red (220, 40, 40)      green (40, 170, 60)    blue (40, 90, 230)
    yellow (240, 215, 40)  purple (150, 60, 200)  orange (250, 140, 20)
    background (16, 16, 24)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
COLORS: Tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
BACKGROUND = (16, 16, 24)
DEFAULT_CANVAS = 32
SUPERSAMPLE = 4  # renderer anti-aliasing: each pixel averages SUPERSAMPLE^2 sub-samples


@dataclass(frozen=True)
class Obj:
    """One shape. cx, cy: centre in pixels; r: half-extent in pixels (circle radius, half the
    square's side, the triangle's circumradius-like half-width)."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float


@dataclass
class Scene:
    objects: List[Obj] = field(default_factory=list)
    canvas: int = DEFAULT_CANVAS


def size_range(canvas: int) -> Tuple[float, float]:
    """Half-extent range of objects on a canvas: 4-6 px at 32 px."""
    return canvas * 0.125, canvas * 0.1875


def _coverage(obj: Obj, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= obj.r * obj.r
    if obj.shape == "square":
        return (np.abs(dx) <= obj.r * 0.9) & (np.abs(dy) <= obj.r * 0.9)
    if obj.shape == "triangle":
        # upright isosceles triangle: apex at (0, -r), base from (-r, r) to (r, r)
        t = (dy + obj.r) / (2 * obj.r)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * obj.r)
    raise ValueError(f"unknown shape {obj.shape!r}; valid: {SHAPES}")


def render(
    scene: Scene,
    *,
    noise: float = 0.0,
    jitter: float = 0.0,
    blur: float = 0.0,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """Scene -> uint8 image [canvas, canvas, 3]. Deterministic for a given rng state.

    jitter: std of a per-object colour perturbation (RGB units); noise: std of per-pixel Gaussian
    noise (RGB units); blur: std (pixels) of a Gaussian blur. All 0 by default (a clean render).
    """
    n = scene.canvas
    if n < 16:
        raise ValueError(f"canvas must be >= 16 pixels, got {n}")
    rng = rng if rng is not None else np.random.default_rng(0)
    s = SUPERSAMPLE
    coords = (np.arange(n * s) + 0.5) / s
    xs, ys = np.meshgrid(coords, coords)
    img = np.empty((n * s, n * s, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for obj in scene.objects:
        if obj.color not in PALETTE:
            raise ValueError(f"unknown colour {obj.color!r}; valid: {COLORS}")
        color = np.asarray(PALETTE[obj.color], dtype=np.float32)
        if jitter > 0:
            color = np.clip(color + rng.normal(0, jitter, 3), 0, 255)
        img[_coverage(obj, xs, ys)] = color
    img = img.reshape(n, s, n, s, 3).mean(axis=(1, 3))
    if blur > 0:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img, sigma=(blur, blur, 0), mode="nearest")
    if noise > 0:
        img = img + rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def blank(canvas: int = DEFAULT_CANVAS) -> np.ndarray:
    """An image with no objects."""
    img = np.empty((canvas, canvas, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    return img


def overlaps(a: Obj, b: Obj, gap: float) -> bool:
    return abs(a.cx - b.cx) < a.r + b.r + gap and abs(a.cy - b.cy) < a.r + b.r + gap


def place(
    specs: Sequence[Tuple[str, str]], canvas: int, rng: np.random.Generator, constraint=None, tries: int = 2000
) -> List[Obj]:
    """Non-overlapping objects for (shape, colour) pairs at random positions and sizes; optional
    constraint(objs) -> bool. Raises RuntimeError when no layout is found."""
    lo, hi = size_range(canvas)
    if len(specs) > 2:
        hi = lo + (hi - lo) * 0.4  # crowded scenes use smaller shapes
    gap = canvas / 16
    for _ in range(tries):
        objs: List[Obj] = []
        for shape, color in specs:
            for _ in range(100):
                r = float(rng.uniform(lo, hi))
                o = Obj(
                    shape,
                    color,
                    float(rng.uniform(r + 1, canvas - r - 1)),
                    float(rng.uniform(r + 1, canvas - r - 1)),
                    r,
                )
                if all(not overlaps(o, p, gap) for p in objs):
                    objs.append(o)
                    break
            else:
                break
        if len(objs) == len(specs) and (constraint is None or constraint(objs)):
            return objs
    raise RuntimeError(f"could not place {len(specs)} objects on a {canvas}px canvas")
