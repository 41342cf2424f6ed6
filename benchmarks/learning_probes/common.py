"""What the probes share: the tiny base policy, the embedded reward, ShapesWorld's training prompts,
and one batch of G rollouts per prompt with its GRPO advantages (as the trainer draws them)."""

import numpy as np
import torch

from alphagrpo_serve import kernels
from alphagrpo_serve.models.registry import load_policy
from alphagrpo_serve.reward.embedded import embedded_reward
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig
from alphagrpo_serve.shapes.task import ShapesTask

G = 8


def setup(seed: int = 0, threads: int = 1):
    """(reward, training prompts by category, numpy generator) on `threads` torch threads."""
    torch.set_num_threads(threads)
    return embedded_reward(), ShapesTask().training_prompts(), np.random.default_rng(seed)


def base_policy():
    return load_policy("tiny", None)


def rollout_batch(pol, rew, pools, rng, cats, reflect=False, window=(2, 2)):
    """One prompt per category in `cats`, G SDE rollouts each (thinking; for SRR, reflections on the
    prompt's ODE image): (samples, batch-std advantages, the reflected images or None)."""
    prompts = [pools[c][rng.integers(len(pools[c]))] for c in cats]
    ps = [p for p in prompts for _ in range(G)]
    sc = SamplingConfig(steps=10, mode="sde", sde_window=window, noise_level=0.7, cfg_scale=3.0)
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
    return out, kernels.grpo_advantages(r, std_scope="batch").reshape(-1), refl
