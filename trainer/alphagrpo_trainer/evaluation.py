"""Evaluations of the trainer's policy: the task's built-in held-out suite (ShapesWorld: GenEval
rule per category), or a held-out JSONL of prompts scored by the server's reward (mean reward, S and
Q), plus the before/after image grids. Every mode draws with ODE and fixed seeds."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from alphagrpo_serve.fileio import iter_jsonl
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig
from alphagrpo_serve.tasks.base import evenly_spaced

# (name, think, reflect): plain drawing, think first, think then one round of self-reflective refinement
EVAL_MODES = (("plain", False, False), ("think", True, False), ("think+reflect", True, True))


def read_heldout_file(path: str) -> List[Dict]:
    rows = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}:{n}: each row must be an object with a non-empty string 'prompt'")
        rows.append({"prompt": row["prompt"], "seed": int(row.get("seed", len(rows)))})
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


EVAL_VERSION = "3"  # bump when what an evaluation computes changes: cached evaluations of other versions are not used


def weights_digest(policy) -> str:
    """sha256 of the policy's full weights (names and float32 bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(policy.export_weights(lora=False).items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_evaluation(
    cfg, policy, evaluate: Callable[[], Optional[Dict]], limit: Optional[int] = None, srr: Optional[bool] = None
) -> Optional[Dict]:
    """evaluate(), or its earlier result from cfg.eval_cache for the same weights and evaluation
    settings (an evaluation is deterministic: ODE, fixed seeds, greedy text). limit and srr: the
    evaluation's rows and whether it has the SRR mode, when not the before/after evaluation's."""
    if not cfg.eval_cache:
        return evaluate()
    key = dict(
        version=EVAL_VERSION,
        weights=weights_digest(policy),
        policy=cfg.policy["name"],
        task=cfg.prompt_task,
        heldout_file=cfg.heldout_file,
        limit=cfg.eval_final_limit if limit is None else limit,
        steps=cfg.eval_steps,
        cfg_scale=cfg.cfg_scale,
        srr=cfg.eval_srr if srr is None else srr,
    )
    path = os.path.join(
        cfg.eval_cache, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json"
    )
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["result"]
    result = evaluate()
    if result is not None:
        from alphagrpo_serve.fileio import write_json_atomic

        os.makedirs(cfg.eval_cache, exist_ok=True)
        write_json_atomic({"key": key, "result": result}, path)
    return result


def eval_sampling(policy, cfg) -> SamplingConfig:
    """The held-out evaluation's sampling for a TrainConfig `cfg`: the deterministic ODE sampler with
    `cfg.eval_steps` steps, and `cfg.cfg_scale` where set (else the policy's own guidance scale)."""
    overrides = dict(steps=cfg.eval_steps, mode="ode")
    if cfg.cfg_scale is not None:
        overrides["cfg_scale"] = cfg.cfg_scale
    return policy.resolve_sampling(overrides)


def modes_for(policy, modes: Sequence[tuple]) -> List[tuple]:
    """The modes the policy can run (no think/reflect modes for a policy without them)."""
    caps = policy.info.capabilities
    return [m for m in modes if (caps.think or not m[1]) and (caps.reflect or not m[2])]


def evaluate_file(
    policy, rows: List[Dict], sampling: SamplingConfig, verify, modes: Sequence[tuple], limit: int = 0, batch: int = 32
) -> Dict[str, Dict]:
    """{mode: {"overall": mean reward, "mean_reward", "semantic", "quality", "accuracy": {}}}: the
    policy draws each held-out prompt (ODE, the row's seed, greedy text) and verify(prompts, images)
    (the server's reward) scores the images."""
    rows = evenly_spaced(rows, limit)
    prompts = [r["prompt"] for r in rows]
    seeds = [r["seed"] for r in rows]
    greedy = TextConfig(temperature=0.0, max_tokens=policy.info.text_defaults.max_tokens)
    out = {}
    for name, think, reflect in modes_for(policy, modes):
        images = []
        for i in range(0, len(rows), batch):
            got = policy.generate(prompts[i : i + batch], seeds[i : i + batch], sampling, greedy, think=think)
            if reflect:
                rsc = policy.resolve_sampling(
                    dict(steps=sampling.steps, mode="ode", cfg_scale=sampling.cfg_scale), reflect=True
                )
                got = policy.reflect(prompts[i : i + batch], [s.image for s in got], seeds[i : i + batch], rsc, greedy)
            images += [s.image for s in got]
        results = verify(prompts, images)
        r = [x.reward for x in results]
        out[name] = {
            "overall": float(np.mean(r)),
            "mean_reward": float(np.mean(r)),
            "accuracy": {},
            "semantic": float(np.mean([x.semantic for x in results])),
            "quality": float(np.mean([x.quality for x in results])),
        }
    return out


def draw_grid(
    policy,
    path: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: SamplingConfig,
    think: bool = True,
    title: Optional[str] = None,
) -> Optional[str]:
    """PNG grid (matplotlib): one column per prompt, one row per seed (greedy thoughts, ODE), the
    prompt under each image; None without prompts."""
    if not prompts:
        return None
    think = think and policy.info.capabilities.think
    greedy = TextConfig(temperature=0.0, max_tokens=policy.info.text_defaults.max_tokens)
    rows = [
        [s.image for s in policy.generate(list(prompts), [seed] * len(prompts), sampling, greedy, think=think)]
        for seed in seeds
    ]
    from .report import image_grid

    return image_grid(path, rows, list(prompts), [f"seed {s}" for s in seeds], title)
