"""Does the reward prefer a duplicated object? Base-model images with one detected object, the object copied once more."""

import numpy as np
import torch
from scipy import ndimage

from alphagrpo_serve.models.registry import load_policy
from alphagrpo_serve.reward.embedded import embedded_reward
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig
from alphagrpo_serve.shapes.detect import Detector
from alphagrpo_serve.shapes.world import BACKGROUND

torch.set_num_threads(1)
pol = load_policy("tiny", None)
rew = embedded_reward()
det = Detector()
prompts = [
    "a circle",
    "a square",
    "a triangle",
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a purple triangle",
]
ps = [p for p in prompts for _ in range(8)]
out = pol.generate(
    ps,
    list(range(len(ps))),
    SamplingConfig(steps=20, mode="ode", cfg_scale=3.0),
    TextConfig(temperature=0.0),
    think=False,
)
bg = np.asarray(BACKGROUND, dtype=np.float32)
rows = []
for p, s in zip(ps, out):
    img = s.image
    d = det(img)
    if len(d.objects) != 1:
        continue
    fg = np.linalg.norm(img.astype(np.float32) - bg, axis=-1) > 40
    lab, n = ndimage.label(fg)
    if n < 1:
        continue
    k = np.bincount(lab.ravel())[1:].argmax() + 1
    ys, xs = np.where(lab == k)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    patch = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    m = (lab == k)[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    best = None
    for ty in range(0, 32 - h):
        for tx in range(0, 32 - w):
            if not fg[max(0, ty - 2) : ty + h + 2, max(0, tx - 2) : tx + w + 2].any():
                best = (ty, tx)
                break
        if best:
            break
    if not best:
        continue
    dup = img.copy()
    ty, tx = best
    region = dup[ty : ty + h, tx : tx + w]
    region[m] = patch[m]
    r1, r2 = rew([p, p], np.stack([img, dup]))
    conf = d.objects[0].shape_probs.max()
    rows.append((p, conf, r1.reward, r2.reward, r1.semantic, r2.semantic, r1.quality, r2.quality))
rows = np.array([r[1:] for r in rows], dtype=float)
print("pairs", len(rows))
for lo, hi in [(0, 0.6), (0.6, 0.8), (0.8, 0.95), (0.95, 1.01)]:
    sel = (rows[:, 0] >= lo) & (rows[:, 0] < hi)
    if sel.any():
        r = rows[sel]
        print(
            f"shape conf [{lo},{hi}): n={sel.sum():2d} reward one {r[:, 1].mean():.3f} two {r[:, 2].mean():.3f}  S {r[:, 3].mean():.2f}->{r[:, 4].mean():.2f} Q {r[:, 5].mean():.2f}->{r[:, 6].mean():.2f}  share where two wins {(r[:, 2] > r[:, 1]).mean():.2f}"
        )
