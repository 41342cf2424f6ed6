"""Evaluate saved policy weights on the ShapesWorld held-out split exactly as the trainer's
before/after evaluation does (the trainer's modes and sampling: ODE, `eval_steps` denoising steps,
the policy's guidance scale, greedy text, fixed seeds), and write the same result dict to JSON.

The learning study (benchmarks/NOTES-learning.md, E1) used it to re-score the proxy's policies on
all 360 rows; the proxy runs themselves score 120.

    python benchmarks/eval_heldout.py runs/learn/p-kl01fmt-s0/policy.safetensors --out e1-s0.json
    python benchmarks/eval_heldout.py W.safetensors --limit 120 --out e.json   (the proxy's rows)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "trainer")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", help="policy weights (safetensors) of the tiny ShapesWorld policy")
    ap.add_argument("--out", required=True, help="JSON file for {weights, limit, wall_s, result}")
    ap.add_argument("--limit", type=int, default=0, help="evenly spaced held-out rows (0: all 360)")
    ap.add_argument("--no-srr", action="store_true", help="skip the think + one SRR round mode")
    args = ap.parse_args(argv)
    if not os.path.exists(args.weights):
        raise SystemExit(f"error: no such weights file: {args.weights}")

    import torch

    from alphagrpo_serve.models.registry import load_policy
    from alphagrpo_serve.tasks import load_task
    from alphagrpo_trainer.config import TrainConfig
    from alphagrpo_trainer.evaluation import EVAL_MODES, eval_sampling, modes_for

    t0 = time.time()
    policy = load_policy("tiny", args.weights, "cpu", None)
    policy.eval()
    sampling = eval_sampling(policy, TrainConfig())
    modes = modes_for(policy, [m for m in EVAL_MODES if not (args.no_srr and m[2])])
    with torch.no_grad():
        result = load_task("shapes").evaluate(policy, sampling, modes, args.limit)
    wall = time.time() - t0
    with open(args.out, "w") as f:
        json.dump({"weights": args.weights, "limit": args.limit, "wall_s": wall, "result": result}, f, indent=1)
    print(args.out, {k: round(v["overall"], 4) for k, v in result.items()}, f"{wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
