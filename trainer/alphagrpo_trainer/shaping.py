"""Reward shaping and group selection for one GRPO step, and the statistics the reward-hacking
watch and the data mix read.

- Format reward: a sample whose thought or critique fails the task's format check
  (`Task.format_ok`; ShapesWorld: a thought parses as an explicit prompt, a critique ends in
  "draw <prompt>" or says "it is correct") loses `format_weight` of its reward.
- Dynamic sampling (DAPO): a group whose rewards have (almost) no spread gives every sample an
  advantage of ~0 and so no gradient; such groups are replaced by groups of fresh prompts (one
  refill round). The batch keeps its number of groups: groups with spread first, then the widest
  of the rest, so ranks stay equal in size.
- Statistics: format rates, the share of flat groups, the mean group spread per category.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch

from .data import PromptSource, shard
from .rollout import Rollouts

REFILL_SEED_OFFSET = 7_777_777  # refill samples' seeds: the step's seed + this (never a first-round seed)


def format_flags(task, roll: Rollouts) -> Tuple[torch.Tensor, torch.Tensor]:
    """([P, G] 1.0 where the sample's text passes the task's format check or the sample has no
    text, [P, G] bool: the sample has text and the task has a check)."""
    P, G = roll.rewards.shape
    check = getattr(task, "format_ok", None)
    ok = torch.ones(P * G)
    has = torch.zeros(P * G, dtype=torch.bool)
    if check is not None:
        for i, s in enumerate(roll.samples):
            if s.text.ids:
                has[i] = True
                try:
                    ok[i] = float(bool(check(s.prompt, s.thought, bool(s.reflect))))
                except ValueError:  # a prompt outside the task: no verdict
                    has[i] = False
    return ok.view(P, G), has.view(P, G)


def shaped_rewards(cfg, roll: Rollouts, ok: torch.Tensor) -> torch.Tensor:
    """The rewards the advantages are computed from: the (rectified) rewards minus the format penalty."""
    if cfg.format_weight > 0:
        return roll.rewards - cfg.format_weight * (1.0 - ok)
    return roll.rewards


def step_stats(
    task, roll: Rollouts, rewards: torch.Tensor, ok: torch.Tensor, has: torch.Tensor, min_std: float
) -> Dict[str, float]:
    """Format rate of the step's texts (thoughts on RT2I steps, critiques on SRR steps), the share of
    groups without spread, the mean group reward std per category (spread_<category>), and on RT2I
    steps the verified reward of each drawing mode present (reward_think_mean, reward_plain_mean:
    with think_fraction between 0 and 1 the two move separately)."""
    m: Dict[str, float] = {}
    if bool(has.any()):
        m["critique_format_rate" if roll.kind == "srr" else "thought_format_rate"] = float(ok[has].mean())
    if roll.kind == "rt2i":
        think = torch.tensor([bool(s.think) for s in roll.samples]).view(roll.raw_rewards.shape)
        for mode, sel in (("think", think), ("plain", ~think)):
            if bool(sel.any()):
                m[f"reward_{mode}_mean"] = float(roll.raw_rewards[sel].mean())
    std = rewards.std(1, unbiased=False)
    m["groups_flat_frac"] = float((std < min_std).float().mean())
    category = getattr(task, "category", None)
    if category is not None:
        by: Dict[str, List[float]] = {}
        for p, s in zip(roll.prompts, std.tolist()):
            try:
                by.setdefault(category(p), []).append(s)
            except ValueError:
                pass
        m.update({f"spread_{c}": float(np.mean(v)) for c, v in by.items()})
    return m


class Refiller:
    """Dynamic sampling: fresh prompts come from a second prompt stream (its own seed), so the
    refill of step s depends only on (seed, s) and a resumed run repeats it."""

    def __init__(self, cfg, world: int):
        self.cfg, self.world = cfg, world
        self.source = PromptSource.of_config(cfg, seed=cfg.seed + 1_000_003)

    def fresh(self, step: int, rank: int, n: int) -> Tuple[List[str], List[bool]]:
        prompts = shard(self.source.prompts_for(step), rank, self.world)[:n]
        rng = np.random.default_rng([self.cfg.seed, 15485863, step, rank])
        return prompts, [bool(x) for x in rng.random(len(prompts)) < self.cfg.think_fraction]

    def refill(
        self, trainer, inp: Dict, roll: Rollouts, rewards: torch.Tensor, ok: torch.Tensor, has: torch.Tensor
    ) -> Tuple[Rollouts, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(rollouts, shaped rewards, format flags, has-text) with the flat groups replaced where fresh
        groups with spread exist, and the number of groups replaced."""
        c = self.cfg
        P = rewards.shape[0]
        std = rewards.std(1, unbiased=False)
        flat = [i for i in range(P) if float(std[i]) < c.dynamic_min_std]
        if not flat:
            return roll, rewards, ok, has, 0
        prompts, think = self.fresh(inp["step"], trainer.rank, len(flat))
        seed = inp["seeds"][trainer.rank] + REFILL_SEED_OFFSET
        if inp["task"] == "srr":
            new = trainer.runner.srr(prompts, seed, inp["window"])
        else:
            new = trainer.runner.rt2i(prompts, think, seed, inp["window"])
        ok2, has2 = format_flags(trainer.task, new)
        r2 = shaped_rewards(c, new, ok2)
        both = Rollouts.cat([roll, new])
        r_all, ok_all, has_all = torch.cat([rewards, r2]), torch.cat([ok, ok2]), torch.cat([has, has2])
        std_all = r_all.std(1, unbiased=False)
        keep = [i for i in range(len(std_all)) if float(std_all[i]) >= c.dynamic_min_std]
        rest = sorted((i for i in range(len(std_all)) if i not in set(keep)), key=lambda i: -float(std_all[i]))
        chosen = sorted((keep + rest)[:P])
        replaced = sum(1 for i in chosen if i >= P)
        ix = torch.tensor(chosen)
        return both.groups(chosen), r_all[ix], ok_all[ix], has_all[ix], replaced
