"""Text vs image gradient magnitudes on one RT2I batch and one SRR-like batch (base policy, real rewards)."""

import torch
from common import base_policy, rollout_batch, setup

from alphagrpo_trainer.config import TrainConfig
from alphagrpo_trainer.loss import grpo_backward

pol = base_policy()
rew, pools, rng = setup(seed=0)


def batch(cats, reflect=False):
    return rollout_batch(pol, rew, pools, rng, cats, reflect, window=(2, 2))


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
