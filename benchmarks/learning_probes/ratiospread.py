"""Ratio spread after one Adam step (lr 7e-5) on an RT2I batch and an SRR batch: what a clip range must tolerate."""

import torch
from common import base_policy, rollout_batch, setup

from alphagrpo_trainer.config import TrainConfig
from alphagrpo_trainer.loss import grpo_backward

rew, pools, rng = setup(seed=0)
for label, cats, reflect, tw in [
    (
        "rt2i",
        ["implicit", "counting", "position", "two_object", "single_object", "colors", "color_attr", "counting"],
        False,
        1.0,
    ),
    ("srr tw1", ["counting", "position", "two_object", "color_attr"], True, 1.0),
    ("srr tw0.03", ["counting", "position", "two_object", "color_attr"], True, 0.03),
]:
    pol = base_policy()
    out, adv, refl = rollout_batch(pol, rew, pools, rng, cats, reflect, window=(1, 2))
    params = pol.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=7e-5, betas=(0.9, 0.999), weight_decay=0.0)
    cfg = TrainConfig(text_weight=tw, steps=10, clip_image=1e-3)
    pol.train()
    for u in range(3):
        opt.zero_grad()
        m = grpo_backward(pol, out, adv, cfg, refl)
        print(
            f"{label} update {u}: image ratio std {m['image_ratio_std']:.2e} max|logr| {m['image_logp_dev']:.2e} clip {m['image_clip_frac']:.2f} | text ratio std {m.get('text_ratio_std', 0):.2e} max|logr| {m.get('text_logp_dev', 0):.2e} clip {m.get('text_clip_frac', 0):.2f}",
            flush=True,
        )
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
