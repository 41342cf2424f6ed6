"""The run's report: before/after table (held-out split, GenEval rule), per-category tables,
image grids of fixed prompts, and the reward curve, as Markdown beside the PNGs."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np



def plot_curves(rows: List[Dict], path: str, keys=("reward_mean", "reward_semantic", "reward_quality"),
                size=(640, 360)) -> str:
    """A line plot of metrics per step (PIL only: no plotting dependency)."""
    from PIL import Image, ImageDraw

    W, H = size
    L, R, T, Bm = 50, 150, 20, 30
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    series = {k: [(r["step"], r[k]) for r in rows if k in r and r[k] is not None] for k in keys}
    series = {k: v for k, v in series.items() if v}
    d.rectangle([L, T, W - R, H - Bm], outline="black")
    if not series:
        d.text((L + 10, T + 10), "no data", fill="black")
        im.save(path)
        return path
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))

    def px(x, y):
        return (L + (x - x0) / (x1 - x0) * (W - L - R), H - Bm - (y - y0) / (y1 - y0) * (H - T - Bm))

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y0 + frac * (y1 - y0)
        _, py = px(x0, y)
        d.line([L - 4, py, L, py], fill="black")
        d.text((5, py - 6), f"{y:.2f}", fill="black")
    d.text((L, H - Bm + 8), f"step {x0}", fill="black")
    d.text((W - R - 60, H - Bm + 8), f"step {x1}", fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    for n, (k, v) in enumerate(series.items()):
        c = colors[n % len(colors)]
        pts = [px(x, y) for x, y in v]
        if len(v) >= 8:  # a moving average over 5 steps beside the raw points
            ys_ = np.convolve([y for _, y in v], np.ones(5) / 5, mode="valid")
            pts = [px(v[i + 2][0], y) for i, y in enumerate(ys_)]
            d.point([px(x, y) for x, y in v], fill=c)
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        d.text((W - R + 8, T + 16 * n), k, fill=c)
    im.save(path)
    return path


def before_after_table(before: Dict[str, Dict], after: Dict[str, Dict]) -> str:
    lines = ["| mode | overall before | overall after | change | implicit before | implicit after | reward before | reward after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in before:
        if mode not in after:
            continue
        b, a = before[mode], after[mode]
        lines.append(f"| {mode} | {b['overall']:.3f} | {a['overall']:.3f} | {a['overall'] - b['overall']:+.3f} | "
                     f"{b['accuracy'].get('implicit', float('nan')):.3f} | {a['accuracy'].get('implicit', float('nan')):.3f} | "
                     f"{b['mean_reward']:.3f} | {a['mean_reward']:.3f} |")
    if "think" in after and "think+reflect" in after:
        gain = after["think+reflect"]["overall"] - after["think"]["overall"]
        lines.append(f"\nOne round of SRR at inference, after training: {gain:+.3f} overall "
                     f"(before: {before['think+reflect']['overall'] - before['think']['overall']:+.3f}).")
    return "\n".join(lines)


def write_report(out_dir: str, cfg: Dict, before: Optional[Dict], after: Optional[Dict], rows: List[Dict],
                 periodic: List[Dict], files: Dict[str, str], elapsed_s: float, modes_table=None) -> str:
    """modes_table(results) -> Markdown: the task's results table (Task.results_table)."""
    modes_table = modes_table or (lambda r: "```json\n" + json.dumps(r, indent=1) + "\n```")
    path = os.path.join(out_dir, "report.md")
    suite = ("Evaluation: the held-out file's prompts scored by the server's reward, ODE, fixed seeds."
              if cfg.get("heldout_file") else
              f"Evaluation: the held-out suite of task {cfg.get('prompt_task', 'shapes')!r} (ShapesWorld: GenEval "
              "rule), ODE, the split's fixed seeds.")
    parts = ["# GRPO run report", "",
             f"Steps: {rows[-1]['step'] if rows else 0} of {cfg['max_steps']}, task {cfg['task']}, G = {cfg['group_size']}, "
             f"{cfg['prompts_per_step']} prompts per step, wall time {elapsed_s / 60:.1f} min. " + suite, ""]
    if before and after:
        parts += ["## Before / after", "", before_after_table(before, after), ""]
    if before:
        parts += ["## Before (base policy)", "", modes_table(before), ""]
    if after:
        parts += ["## After", "", modes_table(after), ""]
    if periodic:
        parts += ["## Periodic evaluations", "", "| step | mode | overall | implicit |", "|---:|---|---:|---:|"]
        for p in periodic:
            for mode, r in p["results"].items():
                parts.append(f"| {p['step']} | {mode} | {r['overall']:.3f} | {r['accuracy'].get('implicit', float('nan')):.3f} |")
        parts.append("")
    parts += ["## Files", ""]
    for label, f in files.items():
        rel = os.path.relpath(f, out_dir)
        parts.append(f"- {label}: [{rel}]({rel})" + (f"\n\n  ![{label}]({rel})" if rel.endswith(".png") else ""))
    parts += ["", "## Config", "", "```json", json.dumps(cfg, indent=1), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
