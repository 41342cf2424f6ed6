"""Tiny UMM sampling speed: 64 images at 32x32, 20 steps, with CFG, in-process (the issue's bar:
<= 5 s on the 2-core development machine). Also think mode (thought first) for reference.

    python benchmarks/generate.py [--weights PATH] [--repeats 3] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import results  # noqa: E402
from alphagrpo_serve.models.registry import load_policy  # noqa: E402
from alphagrpo_serve.shapes.evaluate import load_heldout  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="tiny UMM safetensors (default: the shipped weights)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported (default 3)")
    p.add_argument("--results", default=None, help="append the table with date and machine to this Markdown file")
    args = p.parse_args(argv)
    pol = load_policy("tiny", args.weights)
    text = pol.resolve_text()
    prompts = [r["prompt"] for r in load_heldout()][:64]
    seeds = list(range(64))
    rows = []
    for name, think, ov in (
        ("plain, ODE, CFG 3", False, dict(steps=20, mode="ode", cfg_scale=3.0)),
        ("plain, SDE window 4, CFG 3", False, dict(steps=20, mode="sde", cfg_scale=3.0)),
        ("think, ODE, CFG 3", True, dict(steps=20, mode="ode", cfg_scale=3.0)),
    ):
        sc = pol.resolve_sampling(ov)
        pol.generate(prompts[:4], seeds[:4], sc, text, think=think)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            pol.generate(prompts, seeds, sc, text, think=think)
            best = min(best, time.perf_counter() - t)
        rows.append((name, best, 64 / best))
        print(f"{name}: {best:.2f} s for 64 images ({64 / best:.1f} images/s)", flush=True)
    table = "\n".join(
        ["| 64 images, 32x32, 20 steps | seconds | images/s |", "|---|---:|---:|"]
        + [f"| {n} | {s:.2f} | {r:.1f} |" for n, s, r in rows]
    )
    print(table)
    if args.results:
        results.append(args.results, f"Tiny UMM sampling, {torch.get_num_threads()} threads", table)


if __name__ == "__main__":
    main()
