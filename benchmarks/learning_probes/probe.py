"""Probe the base policy: per category, the reward, S, Q, GenEval-rule accuracy, group reward spread
and extra objects of SDE rollouts as in training.

    probe.py [STEPS=10]                        6 prompts x G 8 per category, SDE window (2, 2)
    probe.py [STEPS=10] --prompts 12 --random-window   (the notes' "probe12": 12 prompts, the window's
                                                        start drawn from 0-2 per category as the demo does)"""

import argparse
import time

import numpy as np
import torch

from alphagrpo_serve.models.registry import load_policy
from alphagrpo_serve.reward.embedded import embedded_reward, spec_of
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig
from alphagrpo_serve.shapes.detect import Detector
from alphagrpo_serve.shapes.evaluate import evaluate
from alphagrpo_serve.shapes.task import ShapesTask

torch.set_num_threads(2)
pol = load_policy("tiny", None, "cpu", None)
task = ShapesTask()
pools = task.training_prompts()
rew = embedded_reward()
det = Detector()
G = 8
ap = argparse.ArgumentParser()
ap.add_argument("steps", nargs="?", type=int, default=10, help="denoising steps of the rollouts")
ap.add_argument("--prompts", type=int, default=6, help="prompts per category (G 8 rollouts each)")
ap.add_argument("--random-window", action="store_true", help="draw the SDE window's start from 0-2")
args = ap.parse_args()
P, RANDOM_WINDOW, steps = args.prompts, args.random_window, args.steps
rng = np.random.default_rng(0)
for cat, pool in pools.items():
    prompts = [pool[i] for i in rng.choice(len(pool), P)]
    t = time.time()
    ps = [p for p in prompts for _ in range(G)]
    window = (int(rng.integers(0, 3)), 2) if RANDOM_WINDOW else (2, 2)
    sc = SamplingConfig(steps=steps, mode="sde", sde_window=window, noise_level=0.7, cfg_scale=3.0)
    out = pol.generate(ps, list(range(len(ps))), sc, TextConfig(temperature=1.0, max_tokens=40), think=True)
    imgs = np.stack([s.image for s in out])
    res = rew(ps, imgs)
    r = np.array([x.reward for x in res]).reshape(P, G)
    S = np.array([x.semantic for x in res]).reshape(P, G)
    Q = np.array([x.quality for x in res]).reshape(P, G)
    rep = evaluate(ps, imgs)
    acc = np.array(rep.correct).reshape(P, G)
    dets = det.detect_batch(imgs)
    extra = []
    for p, d in zip(ps, dets):
        spec = spec_of(p)
        want = sum(g.count for g in spec.groups)
        extra.append(len(d.objects) > want)
    print(
        f"{cat:12s} r {r.mean():.3f} S {S.mean():.3f} Q {Q.mean():.3f} acc {acc.mean():.3f} grp-std {r.std(1).mean():.3f} acc-grp-mixed {(acc.std(1) > 0).mean():.2f} extra {np.mean(extra):.2f} ({time.time() - t:.1f}s)",
        flush=True,
    )
