"""Summarises GRPO runs over seeds (benchmarks/NOTES-learning.md): for each setting (a run folder
name without its -s<seed> suffix) the held-out change per mode, per category, the SRR gain at
inference, Q/S/extra-object/critique-format changes, rollout Q drop and wall time: mean and spread
(sample std) over the seeds found.

    python benchmarks/learning_runs.py runs/learn [--only p-kl0,p-kl01] [--categories] [--keys K1,K2]   (prints markdown tables)
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

import numpy as np

CATS = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "implicit")


def load_run(d):
    try:
        with open(os.path.join(d, "eval_before.json")) as f:
            before = json.load(f)
        with open(os.path.join(d, "eval_after.json")) as f:
            after = json.load(f)
    except FileNotFoundError:
        return None
    rows = []
    with open(os.path.join(d, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return before, after, rows


def run_stats(before, after, rows):
    s = {}
    for m in ("plain", "think", "think+reflect"):
        if m in before and m in after:
            s[f"{m}"] = after[m]["overall"] - before[m]["overall"]
            s[f"{m} after"] = after[m]["overall"]
            for c in CATS:
                if c in before[m]["accuracy"] and c in after[m]["accuracy"]:
                    s[f"{m}:{c}"] = after[m]["accuracy"][c] - before[m]["accuracy"][c]
            for k in ("quality", "semantic", "extra_objects_frac", "critique_format_rate", "background_noise"):
                if before[m].get(k) is not None and after[m].get(k) is not None:
                    s[f"{m}:{k}"] = after[m][k] - before[m][k]
    if "think" in after and "think+reflect" in after:
        s["srr gain after"] = after["think+reflect"]["overall"] - after["think"]["overall"]
    for m in ("plain", "think"):
        d = {c: s.get(f"{m}:{c}") for c in CATS if s.get(f"{m}:{c}") is not None}
        six = [c for c in d if c != "implicit"]
        if six and s.get(m, 0) > 0:
            s[f"{m} top share"] = max(d[c] for c in six) / len(six) / s[m]
        s[f"{m} improved"] = sum(v > 0 for v in d.values())
    rt = [r for r in rows if r.get("task") == "rt2i"]
    if len(rt) >= 20:
        s["rollout Q change"] = np.mean([r["reward_quality"] for r in rt[-10:]]) - np.mean(
            [r["reward_quality"] for r in rt[:10]]
        )
        s["rollout reward change"] = np.mean([r["reward_mean"] for r in rt[-10:]]) - np.mean(
            [r["reward_mean"] for r in rt[:10]]
        )
        if "extra_objects_frac" in rt[0]:
            s["rollout extra change"] = np.mean([r["extra_objects_frac"] for r in rt[-10:]]) - np.mean(
                [r["extra_objects_frac"] for r in rt[:10]]
            )
    srr = [r for r in rows if r.get("task") == "srr" and "critique_format_rate" in r]
    if srr:
        s["rollout critique format (last 5 srr)"] = np.mean([r["critique_format_rate"] for r in srr[-5:]])
    s["steps"] = rows[-1]["step"] if rows else 0
    s["wall min"] = rows[-1]["elapsed_s"] / 60 if rows else float("nan")
    return s


def fmt(vals, signed=True):
    v = np.asarray([x for x in vals if x is not None and not np.isnan(x)], dtype=float)
    if not len(v):
        return "-"
    sp = v.std(ddof=1) if len(v) > 1 else float("nan")
    f = "{:+.3f}" if signed else "{:.3f}"
    return f.format(v.mean()) + (f" ± {sp:.3f}" if len(v) > 1 else "") + (f" (n={len(v)})" if len(v) != 3 else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--only", default="")
    p.add_argument("--categories", action="store_true", help="per-category changes (think and plain)")
    p.add_argument("--keys", default="", help="comma-separated extra stat keys to print")
    args = p.parse_args(argv)
    groups = defaultdict(dict)
    for name in sorted(os.listdir(args.root)):
        m = re.match(r"(.+)-s(\d+)$", name)
        if not m or not os.path.isdir(os.path.join(args.root, name)):
            continue
        got = load_run(os.path.join(args.root, name))
        if got:
            groups[m.group(1)][int(m.group(2))] = run_stats(*got)
    only = [x for x in args.only.split(",") if x]
    keys = [
        "plain",
        "think",
        "think+reflect",
        "srr gain after",
        "think:implicit",
        "think:quality",
        "think+reflect:critique_format_rate",
        "think:extra_objects_frac",
        "think:background_noise",
        "rollout Q change",
        "think improved",
        "think top share",
        "wall min",
    ]
    keys += [k for k in args.keys.split(",") if k]
    if args.categories:
        keys = [f"{m}:{c}" for m in ("plain", "think") for c in CATS]
    print("| setting | seeds | " + " | ".join(keys) + " |")
    print("|---|---|" + "---:|" * len(keys))
    for g, seeds in groups.items():
        if only and g not in only:
            continue
        cells = [
            fmt(
                [seeds[s].get(k) for s in sorted(seeds)],
                signed=k not in ("think improved", "think top share", "wall min"),
            )
            for k in keys
        ]
        print(f"| {g} | {','.join(map(str, sorted(seeds)))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
