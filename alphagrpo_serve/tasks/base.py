"""The task (prompt domain) interface."""

from __future__ import annotations

import abc
from typing import Dict, List, Optional, Sequence

import numpy as np


def evenly_spaced(rows: Sequence, limit: int) -> List:
    """`limit` evenly spaced rows (all of them when limit is 0 or not below their number). Held-out
    splits are grouped by category, so every category keeps its share."""
    rows = list(rows)
    if limit and limit < len(rows):
        return [rows[i * len(rows) // limit] for i in range(limit)]
    return rows


class Task(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def check_prompt(self, prompt: str) -> None:
        """Raises ValueError (naming the problem) when the prompt lies outside the domain."""

    def training_prompts(self) -> Dict[str, List[str]]:
        """{category: prompts training may draw} (held-out prompts removed); empty: the task has no
        built-in prompt pool (train from a prompts file)."""
        return {}

    def reward(self):
        """The task's embedded reward (a DVReward), or None when it has none (use a reward server)."""
        return None

    def evaluate(self, policy, sampling, modes: Sequence[tuple], limit: int = 0) -> Optional[Dict[str, Dict]]:
        """The held-out suite: {mode name: {"overall": float, "accuracy": {category: float}, ...}} for
        each (name, think, reflect) mode, or None when the task has no built-in suite."""
        return None

    def results_table(self, results: Dict[str, Dict]) -> str:
        """Markdown of evaluate()'s (or a held-out file's) results: one row per mode."""
        lines = ["| mode | overall | mean reward | S | Q |", "|---|---:|---:|---:|---:|"]
        for name, r in results.items():
            lines.append(
                f"| {name} | **{r['overall']:.3f}** | {r.get('mean_reward', float('nan')):.3f} | "
                f"{r.get('semantic', float('nan')):.3f} | {r.get('quality', float('nan')):.3f} |"
            )
        return "\n".join(lines)

    def rollout_metrics(self, prompts: Sequence[str], images: np.ndarray) -> Dict[str, float]:
        """Extra per-step metrics of rollout images (e.g. accuracy per category)."""
        return {}

    def grid_prompts(self) -> List[str]:
        """Fixed prompts for the before/after image grids."""
        return []


class OpenTask(Task):
    """Any non-empty UTF-8 prompt (the server's size limits still apply); no built-in prompts,
    reward or evaluation suite: train from a prompts file against a reward server."""

    name = "open"

    def check_prompt(self, prompt: str) -> None:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
