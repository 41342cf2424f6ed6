"""Rollouts for one GRPO step: RT2I (Generate in SDE mode with trajectories -> Verify) and SRR
(stage 1 Generate in ODE mode -> Verify -> the lowest-reward image per prompt -> Reflect x G in
SDE mode -> Verify -> false-positive rectification). Only what is trained carries trajectories.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from alphagrpo_serve.models.base import Sample, TextSample

from .servers import ServerPool


def rectify(stage1: torch.Tensor, chosen: torch.Tensor, stage2: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """SRR false-positive rectification.

    stage1 [P, G1]: stage-1 rewards; chosen [P]: index of the stage-1 image each prompt refines;
    stage2 [P, G]: rewards of its refinements. A refinement whose reward is not above its stage-1
    image's by more than `margin` gets the group's minimum stage-1 reward; the others keep theirs.
    """
    if stage1.dim() != 2 or stage2.dim() != 2 or stage1.shape[0] != stage2.shape[0]:
        raise ValueError(
            f"stage1 [P, G1] and stage2 [P, G] must share P, got {tuple(stage1.shape)} and {tuple(stage2.shape)}"
        )
    base = stage1.gather(1, chosen.long()[:, None])  # [P, 1]
    floor = stage1.min(dim=1, keepdim=True).values.expand_as(stage2)
    return torch.where(stage2 > base + margin, stage2, floor)


@dataclass
class Rollouts:
    """What one rank trains on in one step (prompt-major: sample p * G + g)."""

    kind: str  # rt2i | srr
    prompts: List[str]
    samples: List[Sample]
    rewards: torch.Tensor  # [P, G] (rectified for SRR)
    raw_rewards: torch.Tensor  # [P, G] as verified
    semantic: torch.Tensor  # [P, G]
    quality: torch.Tensor  # [P, G]
    addresses: List[str]  # the server that produced each sample
    reflect_images: Optional[List[np.ndarray]] = None  # SRR: the stage-1 image each sample refines
    stage1_rewards: Optional[torch.Tensor] = None  # SRR: [P, G1]
    seeds: List[int] = field(default_factory=list)  # request seeds (for the record)

    def groups(self, idx: Sequence[int]) -> "Rollouts":
        """The rollouts of the prompts (groups) idx, in that order."""
        G = self.rewards.shape[1]
        rows = [p * G + g for p in idx for g in range(G)]
        ix = torch.tensor(list(idx), dtype=torch.long)
        pick = lambda t: None if t is None else t[ix]  # noqa: E731
        return Rollouts(
            self.kind,
            [self.prompts[p] for p in idx],
            [self.samples[i] for i in rows],
            self.rewards[ix],
            self.raw_rewards[ix],
            self.semantic[ix],
            self.quality[ix],
            [self.addresses[i] for i in rows],
            None if self.reflect_images is None else [self.reflect_images[i] for i in rows],
            pick(self.stage1_rewards),
            list(self.seeds),
        )

    @staticmethod
    def cat(parts: Sequence["Rollouts"]) -> "Rollouts":
        """The groups of several Rollouts of one kind, one after another."""
        a = parts[0]
        cat = lambda name: None if getattr(a, name) is None else torch.cat([getattr(r, name) for r in parts])  # noqa: E731
        return Rollouts(
            a.kind,
            [p for r in parts for p in r.prompts],
            [s for r in parts for s in r.samples],
            cat("rewards"),
            cat("raw_rewards"),
            cat("semantic"),
            cat("quality"),
            [x for r in parts for x in r.addresses],
            None if a.reflect_images is None else [x for r in parts for x in r.reflect_images],
            cat("stage1_rewards"),
            [s for r in parts for s in r.seeds],
        )


def to_sample(g, think: bool, reflect: bool = False) -> Sample:
    """A wire sample (alphagrpo_serve.client.GeneratedImage with trajectory and the settings the
    server resolved) as the policy's Sample."""
    t = g.trajectory
    if t is None or g.sampling is None:
        raise ValueError("the server returned a sample without its trajectory or resolved settings")
    text = TextSample(list(t.token_ids), list(t.token_logprobs), g.thought)
    return Sample(
        g.prompt,
        g.image,
        g.thought,
        text,
        t.image,
        int(g.seed),
        g.sampling,
        g.text_config,
        think=think,
        reflect=reflect,
        policy_version=int(g.policy_version),
    )


def _chunks(items: Sequence, n: int) -> List[List[int]]:
    """Indices of items split into at most n near-equal contiguous chunks (empty chunks dropped)."""
    idx = np.array_split(np.arange(len(items)), max(1, min(n, len(items))))
    return [list(map(int, c)) for c in idx if len(c)]


class RolloutRunner:
    def __init__(self, pool: ServerPool, cfg):
        self.pool, self.cfg = pool, cfg
        self.timing: Dict[str, float] = {}  # seconds per kind of call since last popped

    def _timed(self, kind: str, fn):
        t = time.time()
        try:
            return fn()
        finally:
            self.timing[kind] = self.timing.get(kind, 0.0) + time.time() - t

    def _params(self, mode: str, think: bool, window: tuple) -> dict:
        """The settings a rollout asks for; unset ones (None) take the served policy's defaults."""
        c = self.cfg
        return dict(
            think=think,
            mode=mode,
            steps=c.steps,
            cfg_scale=c.cfg_scale,
            noise_level=c.noise_level,
            sde_window=window if mode == "sde" else None,
            temperature=c.temperature,
            max_thought_tokens=c.max_thought_tokens,
        )

    def _spread(self, what: str, runs: Sequence[tuple], call) -> List[tuple]:
        """runs: (start, indices); call(client, run) -> list of items. All runs concurrently over the
        servers; [(address, item)] flattened in run order."""
        out = self.pool.map(what, [lambda c, run=run: call(c, run) for run in runs])
        return [(addr, item) for addr, items in out for item in items]

    def _runs(self, flags: Sequence) -> List[tuple]:
        """Contiguous runs of equal flags, each split so every server gets work: [(start, [indices])]."""
        runs, i = [], 0
        while i < len(flags):
            j = i
            while j < len(flags) and flags[j] == flags[i]:
                j += 1
            for part in _chunks(range(i, j), len(self.pool.clients)):
                runs.append((i + part[0], [i + q for q in part]))
            i = j
        return runs

    def generate(self, prompts, G, seed, mode, think, window, trajectory=True):
        """[(address, GeneratedImage)] prompt-major (P * G). think: one flag per prompt. Sample (i, g)
        gets seed + i * G + g whatever the split over requests and servers (and ranks, whose seed
        is offset by their first prompt's global index)."""
        runs = self._runs(think)

        def call(c, run):
            start, ix = run
            return c.generate(
                [prompts[i] for i in ix],
                group_size=G,
                seed=seed + start * G,
                return_trajectory=trajectory,
                **self._params(mode, bool(think[start]), window),
            )

        return self._timed("generate", lambda: self._spread("Generate", runs, call))

    def reflect(self, prompts, images, G, seed, window):
        runs = self._runs([True] * len(prompts))

        def call(c, run):
            start, ix = run
            return c.reflect(
                [prompts[i] for i in ix],
                [images[i] for i in ix],
                group_size=G,
                seed=seed + start * G,
                return_trajectory=True,
                **self._params("sde", True, window),
            )

        return self._timed("generate", lambda: self._spread("Reflect", runs, call))

    def verify(self, prompts: Sequence[str], images: Sequence[np.ndarray]):
        runs = self._runs([0] * len(prompts))
        out = self._timed(
            "verify",
            lambda: self._spread(
                "Verify", runs, lambda c, run: c.verify([prompts[i] for i in run[1]], [images[i] for i in run[1]])
            ),
        )
        return [r for _, r in out]

    @staticmethod
    def _grid(results, P, G):
        r = torch.tensor([x.reward for x in results], dtype=torch.float32).view(P, G)
        s = torch.tensor([x.semantic for x in results], dtype=torch.float32).view(P, G)
        q = torch.tensor([x.quality for x in results], dtype=torch.float32).view(P, G)
        return r, s, q

    def rt2i(self, prompts: List[str], think: List[bool], seed: int, window: tuple) -> Rollouts:
        G = self.cfg.group_size
        got = self.generate(prompts, G, seed, "sde", think, window)
        samples = [to_sample(g, bool(think[i // G])) for i, (_, g) in enumerate(got)]
        results = self.verify([s.prompt for s in samples], [s.image for s in samples])
        r, s_, q = self._grid(results, len(prompts), G)
        return Rollouts("rt2i", list(prompts), samples, r, r.clone(), s_, q, [a for a, _ in got], seeds=[seed])

    def srr(self, prompts: List[str], seed: int, window: tuple) -> Rollouts:
        G, P = self.cfg.group_size, len(prompts)
        stage1 = self.generate(prompts, G, seed, "ode", [True] * P, window, trajectory=False)
        imgs1 = [g.image for _, g in stage1]
        r1 = torch.tensor([x.reward for x in self.verify([g.prompt for _, g in stage1], imgs1)]).view(P, G)
        chosen = r1.argmin(dim=1)
        worst = [imgs1[p * G + int(chosen[p])] for p in range(P)]
        got = self.reflect(prompts, worst, G, seed + 1_000_000_007, window)
        samples = [to_sample(g, True, reflect=True) for _, g in got]
        results = self.verify([s.prompt for s in samples], [s.image for s in samples])
        r2, s_, q = self._grid(results, P, G)
        rect = rectify(r1, chosen, r2, self.cfg.srr_margin)
        refl = [worst[i // G] for i in range(P * G)]
        return Rollouts("srr", list(prompts), samples, rect, r2, s_, q, [a for a, _ in got], refl, r1, seeds=[seed])
