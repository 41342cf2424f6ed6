"""How much of a group's reward spread comes from the SDE window (what GRPO credits) vs the initial noise."""

import numpy as np
import torch
from common import G, base_policy, setup

from alphagrpo_serve.models.layout import to_uint8
from alphagrpo_serve.sampling.sampler import SamplingConfig, sample_images

pol = base_policy()
rew, pools, rng = setup(seed=1)
cats = ["single_object", "two_object", "counting", "colors", "position", "color_attr"] * 2
prompts = [pools[c][rng.integers(len(pools[c]))] for c in cats]


def draw(ps, init_seeds, sde_seeds, sc):
    contexts = [pol.prefix(p, False) for p in ps]
    m = pol.model
    B = len(ps)
    c = m.cfg
    _, past, kv, pos = pol._encode(contexts)
    _, upast, ukv, upos = pol._encode([pol.uncond_prefix()])
    upast = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in upast]
    ukv, upos = ukv.expand(B, -1), upos.expand(B)

    def velocity(x, sigma):
        return (
            pol._velocity_cached(past, kv, pos, x, sigma),
            pol._velocity_cached(upast, ukv, upos, x, sigma),
            sc.cfg_scale,
        )

    noise0 = torch.stack(
        [torch.randn(3, c.canvas, c.canvas, generator=torch.Generator().manual_seed(int(s))) for s in init_seeds]
    )
    gens = [torch.Generator().manual_seed(10_000_000 + int(s)) for s in sde_seeds]
    x0, _ = sample_images(velocity, noise0, sc, gens)
    return to_uint8(x0)


with torch.no_grad():
    for win in [(0, 2), (2, 2), (4, 2)]:
        sc = SamplingConfig(steps=10, mode="sde", sde_window=win, noise_level=0.7, cfg_scale=3.0)
        ps = [p for p in prompts for _ in range(G)]
        idx = np.arange(len(ps))
        shared = np.repeat(np.arange(len(prompts)), G) * 1000
        out = {}
        for name, init in [("distinct x_T", idx), ("shared x_T", shared)]:
            imgs = draw(ps, init, idx, sc)
            r = np.array([x.reward for x in rew(ps, imgs)]).reshape(len(prompts), G)
            out[name] = r.std(1).mean()
        print(
            f"window {win}: mean group reward std: distinct x_T {out['distinct x_T']:.3f}, shared x_T {out['shared x_T']:.3f}",
            flush=True,
        )
