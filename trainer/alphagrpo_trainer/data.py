"""Prompts for training: a task's training split (ShapesWorld's: every prompt the held-out rule does
not reserve, implicit prompts included) or a JSONL file, in seeded epochs.

The prompts of step s depend only on (seed, s): the run visits the pool in shuffled epochs and
step s takes the next prompts_per_step of that order, so a resumed run draws exactly the prompts
the uninterrupted run would have drawn. Category weights resample the pool (with replacement
inside an epoch) when given.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from alphagrpo_serve.tasks import load_task


def read_prompts_file(path: str) -> List[str]:
    from alphagrpo_serve.fileio import iter_jsonl

    prompts = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}:{n}: each row must be an object with a non-empty string 'prompt'")
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class PromptSource:
    """Deterministic prompts per step: prompts_for(step) -> list of prompts_per_step prompts."""

    EPOCH_LEN = 4096  # prompts per (weighted) epoch

    def __init__(
        self,
        seed: int,
        prompts_per_step: int,
        prompts_file: Optional[str] = None,
        category_weights: Optional[Dict[str, float]] = None,
        task: str = "shapes",
    ):
        self.seed, self.per_step = int(seed), int(prompts_per_step)
        if prompts_file:
            self.pools = {"file": read_prompts_file(prompts_file)}
            weights = {"file": 1.0}
        else:
            self.pools = {c: ps for c, ps in load_task(task).training_prompts().items() if ps}
            if not self.pools:
                raise ValueError(f"task {task!r} has no built-in training prompts: set prompts_file")
            weights = dict(category_weights or {c: 1.0 for c in self.pools})
            bad = sorted(set(weights) - set(self.pools))
            if bad:
                raise ValueError(f"category_weights: unknown categories {bad}; valid: {list(self.pools)}")
        cats = [c for c, w in weights.items() if w > 0]
        if not cats:
            raise ValueError("category_weights: at least one category needs a weight > 0")
        p = np.asarray([weights[c] for c in cats], dtype=np.float64)
        self.cats, self.p = cats, p / p.sum()
        self._epochs: Dict[int, List[str]] = {}

    @classmethod
    def of_config(cls, cfg, seed: Optional[int] = None) -> "PromptSource":
        """The prompt stream of TrainConfig `cfg` (its seed unless `seed` is given)."""
        seed = cfg.seed if seed is None else seed
        return cls(seed, cfg.prompts_per_step, cfg.prompts_file, cfg.category_weights, cfg.prompt_task)

    def _epoch(self, e: int) -> List[str]:
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, 7919, e])
            pick = rng.choice(len(self.cats), size=self.EPOCH_LEN, p=self.p)
            self._epochs = {e: [self.pools[self.cats[k]][rng.integers(len(self.pools[self.cats[k]]))] for k in pick]}
        return self._epochs[e]

    def position(self, step: int) -> int:
        """Index of the first prompt of `step` in the run's prompt stream (the data position)."""
        return step * self.per_step

    def prompts_for(self, step: int) -> List[str]:
        out, pos = [], self.position(step)
        while len(out) < self.per_step:
            e, i = divmod(pos, self.EPOCH_LEN)
            out.append(self._epoch(e)[i])
            pos += 1
        return out


def draw_sde_window(cfg, rng: np.random.Generator) -> tuple:
    """A step's SDE window (first step, number of steps): cfg.sde_window_size steps whose first step
    is drawn uniformly from cfg.sde_window_range (one draw of `rng`)."""
    lo, hi = cfg.sde_window_range
    return int(rng.integers(lo, hi - cfg.sde_window_size + 1)), cfg.sde_window_size


def shard(items: Sequence, rank: int, world: int) -> List:
    """rank's contiguous share of items (len(items) must be a multiple of world)."""
    if len(items) % world:
        raise ValueError(f"{len(items)} items do not split evenly over {world} ranks")
    n = len(items) // world
    return list(items[rank * n : (rank + 1) * n])
