"""Text vs image gradient magnitudes on one RT2I batch and one SRR-like batch (base policy, real rewards)."""

import numpy as np
import torch

from alphagrpo_serve import kernels
from alphagrpo_serve.models.registry import load_policy
from alphagrpo_serve.reward.embedded import embedded_reward
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig
from alphagrpo_serve.shapes.task import ShapesTask
from alphagrpo_trainer.config import TrainConfig
from alphagrpo_trainer.loss import grpo_backward

torch.set_num_threads(1)
pol = load_policy("tiny", None)
rew = embedded_reward()
pools = ShapesTask().training_prompts()
rng = np.random.default_rng(0)
G = 8


def batch(cats, reflect=False):
    prompts = [pools[c][rng.integers(len(pools[c]))] for c in cats]
    ps = [p for p in prompts for _ in range(G)]
    sc = SamplingConfig(steps=10, mode="sde", sde_window=(2, 2), noise_level=0.7, cfg_scale=3.0)
    tc = TextConfig(temperature=1.0, max_tokens=40)
    refl = None
    if reflect:
        ode = SamplingConfig(steps=10, mode="ode", cfg_scale=3.0)
        first = pol.generate(prompts, list(range(len(prompts))), ode, tc, think=True)
        refl = [first[i // G].image for i in range(len(ps))]
        out = pol.reflect(ps, refl, list(range(len(ps))), sc, tc)
    else:
        out = pol.generate(ps, list(range(len(ps))), sc, tc, think=True)
    r = torch.tensor([x.reward for x in rew(ps, np.stack([s.image for s in out]))]).view(len(prompts), G)
    adv = kernels.grpo_advantages(r, std_scope="batch").reshape(-1)
    return out, adv, refl


params = pol.trainable_parameters()
names = [n for n, p in pol.model.named_parameters() if p.requires_grad]


def grads(samples, adv, refl, text_w, img):
    for p in params:
        p.grad = None
    cfg = TrainConfig(text_weight=text_w, steps=10)
    if not img:  # text only: call text part by zeroing image via huge... simplest: compute with image then subtract
        pass
    m = grpo_backward(pol, samples, adv, cfg, refl)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params], m


pol.train()
for label, cats, reflect in [
    (
        "rt2i mixed",
        ["implicit"] * 2 + ["counting", "position", "two_object", "single_object", "colors", "color_attr"],
        False,
    ),
    ("srr", ["counting", "position", "two_object", "color_attr"], True),
]:
    s, a, refl = batch(cats, reflect)
    g_all, m = grads(s, a, refl, 1.0, True)
    g_img, _ = grads(s, a, refl, 0.0, True)
    g_txt = [x - y for x, y in zip(g_all, g_img)]
    n = lambda gs: float(torch.sqrt(sum((g**2).sum() for g in gs)))
    print(label, "norm all %.3g image %.3g text %.3g" % (n(g_all), n(g_img), n(g_txt)))
    # shared transformer blocks vs embeddings
    for key in ["tok_emb", "blocks.0.", "blocks.4.", "dec", "patch_in"]:
        gi = [g for nm, g in zip(names, g_img) if key in nm]
        gt = [g for nm, g in zip(names, g_txt) if key in nm]
        if gi:
            print("   %-10s image %.3g text %.3g" % (key, n(gi), n(gt)))
    print("   metrics", {k: round(v, 5) for k, v in m.items() if "text" in k or "image" in k})
