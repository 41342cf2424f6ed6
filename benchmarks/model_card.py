"""Evaluates tiny UMM weights on the held-out split in three modes (plain, think, think + one round
of reflection; ODE, 20 steps, CFG 3, the split's fixed seeds) and prints the tables the model card
quotes, plus a PNG grid of fixed prompts.

    python benchmarks/model_card.py [--weights PATH] [--grid out.png] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from alphagrpo_serve.models.evaluate_policy import evaluate_policy  # noqa: E402
from alphagrpo_serve.models.tiny_policy import TinyPolicy  # noqa: E402
from alphagrpo_serve.sampling.sampler import SamplingConfig  # noqa: E402
from alphagrpo_serve.shapes.grammar import CATEGORIES  # noqa: E402

GRID_PROMPTS = ["a red circle", "a blue square", "three green triangles", "a yellow circle to the left of a purple square",
                "a circle and a triangle", "a shape with no corners, coloured like the sky"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="tiny UMM safetensors (default: the shipped weights)")
    p.add_argument("--grid", default=None, help="write a PNG grid of fixed prompts (rows: seeds 0-3)")
    p.add_argument("--json", default=None, help="write the numbers as JSON")
    args = p.parse_args(argv)
    pol = TinyPolicy.load(args.weights)
    sc = SamplingConfig(steps=20, mode="ode", cfg_scale=3.0)
    results = {}
    for name, think, reflect in (("plain", False, False), ("think", True, False), ("think+reflect", True, True)):
        res = evaluate_policy(pol, think=think, reflect=reflect, sampling=sc)
        results[name] = dict(res.report.to_dict(), thought_parse_rate=res.thought_parse_rate,
                             thought_correct_rate=res.thought_correct_rate)
        print(f"{name}: overall {res.report.overall:.3f}", flush=True)
    cats = list(CATEGORIES) + ["implicit"]
    lines = ["| mode | " + " | ".join(cats) + " | overall | mean DVReward |", "|---" * (len(cats) + 3) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['accuracy'].get(c, float('nan')):.3f}" for c in cats)
                     + f" | **{r['overall']:.3f}** | {r['mean_reward']:.3f} |")
    for name, r in results.items():
        if r["thought_parse_rate"] is not None:
            lines.append(f"\n{name}: implicit-prompt thoughts that parse {r['thought_parse_rate']:.3f}, "
                         f"that parse to the intended prompt {r['thought_correct_rate']:.3f}")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.grid:
        from PIL import Image

        rows = []
        for seed in range(4):
            out = pol.generate(GRID_PROMPTS, [seed] * len(GRID_PROMPTS), sc, think=True, temperature=1e-4)
            rows.append(np.concatenate([s.image for s in out], axis=1))
        grid = np.concatenate(rows, axis=0)
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(args.grid)


if __name__ == "__main__":
    main()
