"""Probe the base policy: per-category reward spread of SDE rollouts (as in training) vs ODE eval."""

import sys
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
P = 6
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
rng = np.random.default_rng(0)
for cat, pool in pools.items():
    prompts = [pool[i] for i in rng.choice(len(pool), P)]
    t = time.time()
    ps = [p for p in prompts for _ in range(G)]
    sc = SamplingConfig(steps=steps, mode="sde", sde_window=(2, 2), noise_level=0.7, cfg_scale=3.0)
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
