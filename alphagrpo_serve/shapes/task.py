"""ShapesWorld as a task plug-in: its prompt grammar (explicit and implicit prompts), training
split, embedded DVReward, held-out GenEval-rule suite and per-category rollout metrics."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..tasks.base import Task
from .grammar import CATEGORIES, all_prompts, is_heldout

CATEGORIES_ALL = tuple(CATEGORIES) + ("implicit",)


class ShapesTask(Task):
    name = "shapes"

    def check_prompt(self, prompt: str) -> None:
        from ..reward.embedded import spec_of

        spec_of(prompt)  # PromptError (a ValueError) naming the word and position

    def training_prompts(self) -> Dict[str, List[str]]:
        return {c: [p for p in all_prompts(c) if not is_heldout(p)] for c in CATEGORIES_ALL}

    def reward(self):
        from ..reward.embedded import embedded_reward

        return embedded_reward()

    def evaluate(self, policy, sampling, modes: Sequence[tuple], limit: int = 0) -> Dict[str, Dict]:
        from .policy_eval import evaluate_modes

        return evaluate_modes(policy, sampling, modes=modes, limit=limit)

    def results_table(self, results: Dict[str, Dict]) -> str:
        if any(not r.get("accuracy") for r in results.values()):  # a held-out file's reward-only results
            return super().results_table(results)
        from .policy_eval import modes_table

        return modes_table(results)

    def rollout_metrics(self, prompts: Sequence[str], images: np.ndarray) -> Dict[str, float]:
        from .evaluate import evaluate

        rep = evaluate(list(prompts), images)
        return {f"acc_{k}": v for k, v in rep.accuracy.items()}

    def grid_prompts(self) -> List[str]:
        from .policy_eval import GRID_PROMPTS

        return list(GRID_PROMPTS)
