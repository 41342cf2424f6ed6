"""How much can GRPO raise held-out accuracy? pass@k of the training rollouts' own distribution.

GRPO only reinforces what its rollouts already draw. A prompt where none of k rollouts succeeds gives
no learning signal at k, and a prompt the policy already always solves gives none either. For each
held-out row this draws k think-mode samples from the distribution the RT2I rollouts of a training
config use (default configs/proxy.yaml: 10 steps, SDE on a 2-step window whose first step is drawn
from 0-4 as the trainer draws it, noise 0.7, CFG 3, thoughts sampled at temperature 1, up to 40
tokens). Each sample is scored by the GenEval rule. The script prints, per category and overall
(the mean of the six GenEval categories, as the evaluation reports it; implicit rows are listed
apart):
- pass@1: the rollouts' mean accuracy;
- pass@k for k = 2, 4, 8, ... and K, with the unbiased estimator 1 - C(n-c, k) / C(n, k);
- the share of rows whose K samples are neither all right nor all wrong (the rows that carry signal;
  overall: the mean of the six categories' shares);
- whether the reward ranks the samples as the GenEval rule does: over every pair of samples of one
  row where one is right and the other wrong, the share where the right one gets the higher DVReward
  (ties count a half). GRPO's advantages come from that ranking within a group; 0.5 is no signal.
pass@K is a rough ceiling for greedy held-out accuracy after training: RL mostly moves probability
toward answers the model already draws.

    PYTHONPATH=.:trainer OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learning_probes/passk.py \
        [WEIGHTS] [--k 8] [--limit 0] [--config configs/proxy.yaml] [--json out.json]
"""

import argparse
import json
import sys
import time
from math import comb

import numpy as np
import torch

from alphagrpo_serve.models.registry import load_policy
from alphagrpo_serve.reward.embedded import embedded_reward
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig
from alphagrpo_serve.shapes.evaluate import CATEGORIES, evaluate, load_heldout
from alphagrpo_serve.tasks.base import evenly_spaced
from alphagrpo_trainer.config import load_config
from alphagrpo_trainer.data import draw_sde_window


def rollout_sampling(cfg, rng):
    """(SamplingConfig, TextConfig) of one RT2I rollout batch of TrainConfig `cfg`, its SDE window drawn
    as the trainer's step_inputs draws it (data.draw_sde_window)."""
    sc = SamplingConfig(
        steps=cfg.steps,
        mode="sde",
        sde_window=draw_sde_window(cfg, rng),
        noise_level=cfg.noise_level,
        cfg_scale=3.0 if cfg.cfg_scale is None else cfg.cfg_scale,
    )
    return sc, TextConfig(temperature=cfg.temperature, max_tokens=cfg.max_thought_tokens)


def draw(pol, prompts, seeds, cfg, k: int):
    """k think-mode rollouts of every prompt (sample j of a prompt with seed s uses seed 10,000 (j + 1) + s;
    the windows come from one generator seeded 0, so every policy sees the same draws), scored by the
    GenEval rule and the embedded DVReward: (right, rewards), both (len(prompts), k)."""
    t0 = time.time()
    rng = np.random.default_rng(0)
    right = np.zeros((len(prompts), k), dtype=bool)
    rewards = np.zeros((len(prompts), k))
    reward = embedded_reward()
    for j in range(k):
        sc, text = rollout_sampling(cfg, rng)
        seeds_j = [10_000 * (j + 1) + s for s in seeds]
        images = []
        with torch.no_grad():
            for i in range(0, len(prompts), 64):
                out = pol.generate(prompts[i : i + 64], seeds_j[i : i + 64], sc, text, think=True)
                images += [s.image for s in out]
        report = evaluate(prompts, np.stack(images), reward=reward)
        right[:, j], rewards[:, j] = report.correct, report.rewards
        print(
            f"sample {j + 1}/{k} (window {sc.sde_window}): accuracy {right[:, j].mean():.3f} ({time.time() - t0:.0f} s)",
            flush=True,
        )
    return right, rewards


def pass_at(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of n samples with c right (Chen et al. 2021)."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def ranking_agreement(right: np.ndarray, rewards: np.ndarray):
    """Over every (right, wrong) pair of samples within a row, the share where the right sample has the
    higher reward (ties: a half); None when no row has both."""
    wins = pairs = 0.0
    for ok, rw in zip(right, rewards):
        good, bad = rw[ok], rw[~ok]
        if len(good) and len(bad):
            diff = good[:, None] - bad[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return wins / pairs if pairs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", nargs="?", default=None, help="policy weights (default: the shipped base)")
    ap.add_argument("--k", type=int, default=8, help="samples per held-out row (default 8)")
    ap.add_argument("--limit", type=int, default=0, help="evenly spaced held-out rows (0: all 360)")
    ap.add_argument("--config", default="configs/proxy.yaml", help="training config whose rollouts to sample")
    ap.add_argument("--json", default=None, help="also write the per-row success counts here")
    args = ap.parse_args(argv)
    if args.k < 1:
        raise SystemExit(f"error: --k must be >= 1, got {args.k}")
    torch.set_num_threads(1)
    t0 = time.time()
    rows = evenly_spaced(load_heldout(), args.limit)
    pol = load_policy("tiny", args.weights)
    pol.eval()
    cfg = load_config(args.config)
    prompts = [r["prompt"] for r in rows]
    right, rewards = draw(pol, prompts, [int(r["seed"]) for r in rows], cfg, args.k)

    cats = [r["category"] for r in rows]
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32) if k <= args.k} | {args.k})
    table = {}
    for c in list(CATEGORIES) + ["implicit"]:
        sel = [i for i, cc in enumerate(cats) if cc == c]
        if not sel:
            continue
        counts = right[sel].sum(1)
        table[c] = {f"pass@{k}": float(np.mean([pass_at(args.k, int(n), k) for n in counts])) for k in ks}
        table[c]["signal_rows"] = float(np.mean((counts > 0) & (counts < args.k)))
        table[c]["reward_agrees"] = ranking_agreement(right[sel], rewards[sel])
        table[c]["n"] = len(sel)
    main_cats = [c for c in CATEGORIES if c in table]
    if not main_cats:
        raise SystemExit("error: no GenEval category among the rows: raise --limit")
    table["overall"] = {
        key: float(np.mean([table[c][key] for c in main_cats])) for key in table[main_cats[0]] if key != "reward_agrees"
    }
    table["overall"]["n"] = sum(table[c]["n"] for c in main_cats)
    sel = [i for i, c in enumerate(cats) if c in main_cats]  # pooled over the six categories' rows
    table["overall"]["reward_agrees"] = ranking_agreement(right[sel], rewards[sel])
    head = "| category | n | " + " | ".join(f"pass@{k}" for k in ks) + " | rows with signal | reward agrees |"
    print(head)
    print("|---|---:|" + "---:|" * (len(ks) + 2))
    for c, v in table.items():
        cells = " | ".join(f"{v[f'pass@{k}']:.3f}" for k in ks)
        agree = "-" if v["reward_agrees"] is None else f"{v['reward_agrees']:.2f}"
        print(f"| {c} | {v['n']} | {cells} | {v['signal_rows']:.2f} | {agree} |")
    print(f"{args.weights or 'base'}: {len(rows)} rows x {args.k} samples in {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "weights": args.weights,
                    "k": args.k,
                    "table": table,
                    "rows": [
                        {"prompt": p, "category": c, "right": [bool(x) for x in ok], "reward": [float(x) for x in rw]}
                        for p, c, ok, rw in zip(prompts, cats, right, rewards)
                    ],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
