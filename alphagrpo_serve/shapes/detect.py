"""The ShapesWorld detector: image -> objects (shape, colour, centroid, area, confidence).

Colour segmentation works on the direction of (pixel - background) in RGB, which a blend with the
background (anti-aliasing, blur) does not change, so soft edges keep their colour. Each colour's
mask is split into 8-connected components (one scipy call for a whole batch); a component's shape
comes from two features: fill = area / bounding-box area (triangle 0.5, circle 0.79, square 1.0)
and how far its centroid sits below the box centre (a triangle's mass is low). Shape and colour
come out as probabilities, so a verifier can grade near misses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np
from scipy import ndimage

from .world import BACKGROUND, COLORS, PALETTE, SHAPES

_BG = np.asarray(BACKGROUND, dtype=np.float32)
_DIRS = np.stack([np.asarray(PALETTE[c], dtype=np.float32) - _BG for c in COLORS])  # [6, 3]
_NORMS = np.linalg.norm(_DIRS, axis=1)  # [6]
_UNIT = _DIRS / _NORMS[:, None]
# shape prototypes in (fill, centroid offset below the box centre / box height, mean coverage of
# the box's four corner pixels): circle, square, triangle
# (measured on clean and blurred renders at 32 px: circle fill 0.64-0.88, corners <= 0.11; square
# fill >= 0.94, corners >= 0.25; triangle offset 0.10-0.16)
_PROTOS = np.asarray([[0.77, 0.0, 0.02], [0.985, 0.0, 0.6], [0.6, 0.135, 0.33]], dtype=np.float32)
_PROTO_SCALE = np.asarray([0.06, 0.03, 0.15], dtype=np.float32)
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True  # 8-connected within an image, never across images of a batch


@dataclass
class Detection:
    shape: str
    color: str
    cx: float  # centroid, pixels
    cy: float
    area: int  # pixels
    confidence: float  # P(shape) * P(colour) of the best labels
    shape_probs: np.ndarray = field(repr=False)  # [3] over SHAPES
    color_probs: np.ndarray = field(repr=False)  # [6] over COLORS
    features: np.ndarray = field(repr=False, default=None)  # (fill, centroid offset, corner coverage)


@dataclass
class ImageDetections:
    objects: List[Detection]
    stray_fraction: float  # foreground pixels outside any kept object, as a share of the image


def check_images(images, name: str = "image") -> np.ndarray:
    """Accepts [H, W, 3] or [N, H, W, 3] uint8 (or float in [0, 1]); returns uint8 [N, H, W, 3]."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must be [H, W, 3] or [N, H, W, 3] RGB, got shape {arr.shape}")
    if arr.shape[1] != arr.shape[2] or arr.shape[1] < 16:
        raise ValueError(f"{name} must be square and at least 16x16, got {arr.shape[1]}x{arr.shape[2]}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"a float {name} must hold finite values in [0, 1]")
        return np.rint(arr * 255).astype(np.uint8)
    raise TypeError(f"{name} must be uint8 (0..255) or float (0..1), got dtype {arr.dtype}")


class Detector:
    def __init__(self, min_area_frac: float = 0.008, alpha_threshold: float = 0.45):
        self.min_area_frac = min_area_frac  # components smaller than this share of the image are noise
        self.alpha_threshold = alpha_threshold  # a pixel is foreground above this share of its colour

    def __call__(self, image) -> ImageDetections:
        return self.detect_batch(image)[0]

    def detect_batch(self, images) -> List[ImageDetections]:
        imgs = check_images(images)
        N, H, W, _ = imgs.shape
        rel = imgs.reshape(N, H * W, 3).astype(np.float32) - _BG  # [N, P, 3]
        proj = rel @ _UNIT.T  # [N, P, 6] length along each colour direction
        length = np.linalg.norm(rel, axis=-1)  # [N, P]
        label = proj.argmax(-1)  # [N, P] best colour by angle (projection / length ordering is the same)
        alpha = np.take_along_axis(proj, label[..., None], -1)[..., 0] / _NORMS[label]
        fg = alpha > self.alpha_threshold
        label = label.reshape(N, H, W)
        fg = fg.reshape(N, H, W)
        coverage = np.clip(alpha.reshape(N, H, W), 0.0, 1.0)
        min_area = max(3, int(self.min_area_frac * H * W))
        ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
        results = [ImageDetections([], 0.0) for _ in range(N)]
        kept_pixels = np.zeros(N, dtype=np.int64)
        cos_all = proj / np.maximum(length, 1e-6)[..., None]  # [N, P, 6]
        for ci in range(len(COLORS)):
            mask = fg & (label == ci)
            if not mask.any():
                continue
            lab, n = ndimage.label(mask, structure=_STRUCTURE)
            flat = lab.ravel()
            area = np.bincount(flat, minlength=n + 1)
            sy = np.bincount(flat, weights=np.broadcast_to(ys, lab.shape).ravel(), minlength=n + 1)
            sx = np.bincount(flat, weights=np.broadcast_to(xs, lab.shape).ravel(), minlength=n + 1)
            cos_sum = np.stack(
                [np.bincount(flat, weights=cos_all[..., k].ravel(), minlength=n + 1) for k in range(len(COLORS))],
                axis=1,
            )
            for k, sl in enumerate(ndimage.find_objects(lab), start=1):
                if sl is None or area[k] < min_area:
                    continue
                img_i = sl[0].start
                h = sl[1].stop - sl[1].start
                w = sl[2].stop - sl[2].start
                cy, cx = sy[k] / area[k], sx[k] / area[k]
                fill = area[k] / float(h * w)
                offset = (cy + 0.5 - (sl[1].start + sl[1].stop) / 2.0) / h
                y0, y1, x0, x1 = sl[1].start, sl[1].stop - 1, sl[2].start, sl[2].stop - 1
                corners = coverage[img_i, [y0, y0, y1, y1], [x0, x1, x0, x1]].mean()
                feats = np.asarray([fill, offset, corners], dtype=np.float32)
                z = ((feats - _PROTOS) / _PROTO_SCALE) ** 2
                logits = -0.5 * z.sum(1)
                aspect = min(h, w) / max(h, w)
                logits -= 4.0 * max(0.0, 0.75 - aspect)  # elongated blobs are no clean shape
                shape_probs = np.exp(logits - logits.max())
                shape_probs /= shape_probs.sum()
                mean_cos = cos_sum[k] / area[k]
                color_logits = 100.0 * mean_cos  # red vs orange (22 degrees apart): P(red) ~ 0.999
                color_probs = np.exp(color_logits - color_logits.max())
                color_probs /= color_probs.sum()
                s_i = int(shape_probs.argmax())
                results[img_i].objects.append(
                    Detection(
                        SHAPES[s_i],
                        COLORS[ci],
                        float(cx + 0.5),
                        float(cy + 0.5),
                        int(area[k]),
                        float(shape_probs[s_i] * color_probs[ci]),
                        shape_probs,
                        color_probs,
                        feats,
                    )
                )
                kept_pixels[img_i] += area[k]
        fg_count = fg.reshape(N, -1).sum(1)
        for i in range(N):
            results[i].objects.sort(key=lambda d: (d.cy, d.cx))
            results[i].stray_fraction = float(fg_count[i] - kept_pixels[i]) / (H * W)
        return results


def detect(image) -> ImageDetections:
    """Detections of one image with the default detector."""
    return Detector()(image)


def expected_centroid(obj) -> tuple:
    """Where an object's mass centre lies: a triangle's sits a third of r below its box centre."""
    return obj.cx, obj.cy + (obj.r / 3.0 if obj.shape == "triangle" else 0.0)


def scene_matches(dets: ImageDetections, objects: Sequence) -> bool:
    """Exact read-back: the same multiset of (shape, colour), each centroid within 1.5 px of its object's."""
    if len(dets.objects) != len(objects):
        return False
    remaining = list(dets.objects)
    for o in objects:
        ex, ey = expected_centroid(o)
        match = [
            d
            for d in remaining
            if d.shape == o.shape and d.color == o.color and abs(d.cx - ex) <= 1.5 and abs(d.cy - ey) <= 1.5
        ]
        if not match:
            return False
        remaining.remove(match[0])
    return True
