"""Does GRPO's gain come from the prompts a run trained on? Rollout accuracy on seen and unseen training prompts.

For each large category (counting, position, color_attr, implicit: their held-out prompts are never
drawn in training), this replays the prompts that a proxy run of `--seed` drew in its `--steps` steps
(the trainer's PromptSource, RT2I and SRR steps alike). It then takes the category's training
prompts that the run drew at least once ("seen") and as many that it never drew ("unseen", a
random pick), and the category's held-out rows (new prompts by construction). The seen and unseen
groups come from the same category and the same training pool, so the only difference between them
is whether the run saw them. For the base policy and for the trained weights, it
draws k think-mode rollouts of every prompt as passk.py does, and prints pass@1 per group and its
change. If the change is much larger on seen prompts than on unseen ones, the gain is per prompt and
does not transfer to new compositions.

    PYTHONPATH=.:trainer OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learning_probes/exposure.py \
        runs/learn/p-kl01fmt-s0/policy.safetensors [--seed 0] [--steps 80] [--k 16] [--per-group 40] [--set KEY=YAML] [--categories C,...]
"""

import argparse
import os
import sys
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from passk import draw  # noqa: E402

from alphagrpo_serve.models.registry import load_policy  # noqa: E402
from alphagrpo_serve.shapes.evaluate import load_heldout  # noqa: E402
from alphagrpo_serve.tasks import load_task  # noqa: E402
from alphagrpo_trainer.config import load_config, set_overrides  # noqa: E402
from alphagrpo_trainer.data import PromptSource  # noqa: E402

LARGE = ("counting", "position", "color_attr", "implicit")


def seen_counts(cfg, steps: int) -> Counter:
    """How often the run of TrainConfig `cfg` draws each prompt in its first `steps` steps."""
    src = PromptSource.of_config(cfg)
    return Counter(p for step in range(steps) for p in src.prompts_for(step))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", help="trained policy weights (compared with the shipped base)")
    ap.add_argument("--config", default="configs/proxy.yaml", help="the run's training config")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    ap.add_argument("--steps", type=int, default=80, help="the run's steps (default 80)")
    ap.add_argument("--k", type=int, default=16, help="rollouts per prompt (default 16)")
    ap.add_argument("--per-group", type=int, default=40, help="most prompts per category and group (default 40)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=YAML", help="a training-config override of the run"
    )
    ap.add_argument("--categories", default=",".join(LARGE), help="comma-separated (default: the four large ones)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, {"seed": args.seed, **set_overrides(args.set, args.config)})
    cats = [c for c in args.categories.split(",") if c]
    counts = seen_counts(cfg, args.steps)
    pools = load_task("shapes").training_prompts()
    heldout = load_heldout()
    rng = np.random.default_rng(1)
    prompts, groups = [], []
    for c in cats:
        seen = sorted(p for p in pools[c] if counts[p] > 0)
        unseen = sorted(p for p in pools[c] if counts[p] == 0)
        held = sorted(r["prompt"] for r in heldout if r["category"] == c)
        for name, ps in (("seen", seen), ("unseen", unseen), ("held-out", held)):
            n = min(len(ps), args.per_group)
            prompts += [ps[i] for i in sorted(rng.choice(len(ps), size=n, replace=False))]
            groups += [(c, name)] * n
        times = [counts[p] for p in seen] or [0]
        print(
            f"{c}: {len(pools[c])} training prompts, {len(seen)} drawn (mean {np.mean(times):.1f} times), "
            f"{len(held)} held-out rows"
        )
    seeds = list(range(len(prompts)))
    acc = {}
    for label, path in (("base", None), ("trained", args.weights)):
        pol = load_policy("tiny", path)
        pol.eval()
        right, _ = draw(pol, prompts, seeds, cfg, args.k)
        acc[label] = right.mean(1)
    print("| category | group | prompts | base pass@1 | trained pass@1 | change |")
    print("|---|---|---:|---:|---:|---:|")
    for c in cats + ["all"]:
        for name in ("seen", "unseen", "held-out"):
            sel = [i for i, g in enumerate(groups) if g[1] == name and (c == "all" or g[0] == c)]
            if sel:
                b, t = float(acc["base"][sel].mean()), float(acc["trained"][sel].mean())
                print(f"| {c} | {name} | {len(sel)} | {b:.3f} | {t:.3f} | {t - b:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
