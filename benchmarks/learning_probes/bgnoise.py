import sys

import numpy as np
import torch

from alphagrpo_serve.models.registry import load_policy
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig
from alphagrpo_serve.shapes.evaluate import ground_truth_images, load_heldout
from alphagrpo_serve.shapes.task import background_noise, objects_exceed

torch.set_num_threads(1)
rows = load_heldout()[::6]
ps = [r["prompt"] for r in rows]
seeds = [r["seed"] for r in rows]
print("ground truth", background_noise(ground_truth_images(ps, seeds=seeds)).mean())
for path in [None] + sys.argv[1:]:
    pol = load_policy("tiny", path)
    out = pol.generate(
        ps, seeds, SamplingConfig(steps=20, mode="ode", cfg_scale=3.0), TextConfig(temperature=0.0), think=True
    )
    imgs = np.stack([s.image for s in out])
    bn = background_noise(imgs)
    print(
        path or "base",
        f"bg noise mean {bn.mean():.2f} p90 {np.percentile(bn, 90):.2f} extra {np.mean(objects_exceed(ps, imgs)):.2f}",
    )
