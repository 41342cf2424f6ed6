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

from alphagrpo_serve.models.registry import load_policy  # noqa: E402
from alphagrpo_serve.sampling.sampler import SamplingConfig  # noqa: E402
from alphagrpo_serve.shapes.policy_eval import GRID_PROMPTS, evaluate_modes, modes_table  # noqa: E402
from alphagrpo_trainer.evaluation import draw_grid  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="tiny UMM safetensors (default: the shipped weights)")
    p.add_argument("--grid", default=None, help="write a PNG grid of fixed prompts (rows: seeds 0-3)")
    p.add_argument("--json", default=None, help="write the numbers as JSON")
    args = p.parse_args(argv)
    pol = load_policy("tiny", args.weights)
    sc = SamplingConfig(steps=20, mode="ode", cfg_scale=3.0)
    results = evaluate_modes(pol, sc, log=lambda m: print(m, flush=True))
    print(modes_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.grid:
        draw_grid(
            pol, args.grid, GRID_PROMPTS, range(4), pol.resolve_sampling(dict(steps=20, mode="ode", cfg_scale=3.0))
        )


if __name__ == "__main__":
    main()
