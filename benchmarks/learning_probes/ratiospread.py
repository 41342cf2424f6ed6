"""Ratio spread after one Adam step (lr 7e-5) on an RT2I batch and an SRR batch: what a clip range must tolerate."""

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
rew = embedded_reward()
pools = ShapesTask().training_prompts()
rng = np.random.default_rng(0)
G = 8
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
    pol = load_policy("tiny", None)
    prompts = [pools[c][rng.integers(len(pools[c]))] for c in cats]
    ps = [p for p in prompts for _ in range(G)]
    sc = SamplingConfig(steps=10, mode="sde", sde_window=(1, 2), noise_level=0.7, cfg_scale=3.0)
    tc = TextConfig(temperature=1.0, max_tokens=40)
    refl = None
    if reflect:
        first = pol.generate(
            prompts, list(range(len(prompts))), SamplingConfig(steps=10, mode="ode", cfg_scale=3.0), tc, think=True
        )
        refl = [first[i // G].image for i in range(len(ps))]
        out = pol.reflect(ps, refl, list(range(len(ps))), sc, tc)
    else:
        out = pol.generate(ps, list(range(len(ps))), sc, tc, think=True)
    r = torch.tensor([x.reward for x in rew(ps, np.stack([s.image for s in out]))]).view(len(prompts), G)
    adv = kernels.grpo_advantages(r, std_scope="batch").reshape(-1)
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
