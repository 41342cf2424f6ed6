"""Embedded DVReward speed on one core, and the detector's accuracy under noise and blur.

    python benchmarks/reward.py [--images 4000] [--results benchmarks/RESULTS.md]

Speed: images/s of the full reward (decomposition from a warm cache, detection, every question
answered) over held-out prompts with their ground-truth renders, pinned to one CPU core.
Accuracy: exact-match read-back (every object's shape and colour, centroid within 1.5 px) of
2,000 random scenes per (canvas, noise, blur) setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import results  # noqa: E402
from alphagrpo_serve.reward import embedded_reward  # noqa: E402
from alphagrpo_serve.shapes.detect import Detector, scene_matches  # noqa: E402
from alphagrpo_serve.shapes.evaluate import ground_truth_images, load_heldout  # noqa: E402
from alphagrpo_serve.shapes.world import COLORS, SHAPES, Scene, place, render  # noqa: E402


def speed(n_images: int, repeats: int = 3):
    rows = load_heldout()
    prompts = [rows[i % len(rows)]["prompt"] for i in range(n_images)]
    imgs = ground_truth_images(prompts, 32, range(n_images))
    reward = embedded_reward()
    reward(prompts[: len(rows)], imgs[: len(rows)])  # warm the decomposition cache
    best_full, best_det = 0.0, 0.0
    det = Detector()
    for _ in range(repeats):
        t = time.perf_counter()
        reward(prompts, imgs)
        best_full = max(best_full, n_images / (time.perf_counter() - t))
        t = time.perf_counter()
        det.detect_batch(imgs)
        best_det = max(best_det, n_images / (time.perf_counter() - t))
    return best_full, best_det


def accuracy(canvas: int, noise: float, blur: float, n: int = 2000) -> float:
    rng = np.random.default_rng(1)
    scenes = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        pairs = [(SHAPES[rng.integers(3)], COLORS[rng.integers(6)]) for _ in range(k)]
        scenes.append(Scene(place(pairs, canvas, rng), canvas))
    imgs = np.stack([render(s, noise=noise, blur=blur, rng=rng) for s in scenes])
    dets = Detector().detect_batch(imgs)
    return float(np.mean([scene_matches(d, s.objects) for d, s in zip(dets, scenes)]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000, help="images per timed pass (default 4000)")
    p.add_argument("--results", default=None, help="append the tables with date and machine to this Markdown file")
    args = p.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    full, det = speed(args.images)
    lines = [
        "| measure | images/s (1 core, 32x32) |",
        "|---|---:|",
        f"| full embedded DVReward (detect + all questions) | {full:.0f} |",
        f"| detector alone | {det:.0f} |",
        "",
        "| canvas | noise std (RGB) | blur std (px) | exact-match read-back, 2,000 scenes |",
        "|---:|---:|---:|---:|",
    ]
    for canvas in (32, 64):
        for noise, blur in ((0, 0), (8, 0), (0, 0.6), (8, 0.6), (16, 0.8)):
            lines.append(f"| {canvas} | {noise} | {blur} | {accuracy(canvas, noise, blur):.4f} |")
    table = "\n".join(lines)
    print(table)
    if args.results:
        results.append(args.results, "Embedded DVReward and detector, 1 core pinned", table)


if __name__ == "__main__":
    main()
