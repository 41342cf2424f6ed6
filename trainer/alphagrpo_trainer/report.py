"""The run's report: the before/after table (held-out split, GenEval rule), per-category changes,
the reward-hacking watch (S and Q, extra objects, critique format) with its flags, training curves
(matplotlib, one panel per signal: raw points and a smoothed line, labelled axes) and before/after
image grids with the prompt under each image, as Markdown beside the PNGs."""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Dict, List, Optional, Sequence

import numpy as np

Q_DROP = 0.05  # a run whose held-out Q falls by more than this is flagged
BG_RISE = (
    2.0  # ... or whose background noise (mean RGB distance from the background colour, 0-255) rises by more than this
)
# the trainer logs the recompute's largest log-prob deviation from the rollout's record, measured
# before the batch's first update: the rollout/recompute gap the clip range must not be swamped by
GAP_TITLE = "rollout/recompute gap (before updating)"
CATEGORY_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "implicit")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    return plt


def smooth(y: Sequence[float], window: int = 9) -> np.ndarray:
    """Centred moving average over up to `window` points (shorter at the ends)."""
    y = np.asarray(y, dtype=np.float64)
    if len(y) < 3:
        return y
    w = max(1, min(window, len(y) // 2 * 2 - 1))
    h = w // 2
    return np.asarray([y[max(0, i - h) : i + h + 1].mean() for i in range(len(y))])


def _series(rows: List[Dict], key: str, task: Optional[str] = None):
    pts = [
        (r["step"], r[key])
        for r in rows
        if isinstance(r.get(key), (int, float)) and not math.isnan(r[key]) and (task is None or r.get("task") == task)
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def _line(ax, x, y, label, color, marker="o"):
    if not x:
        return
    ax.scatter(x, y, s=6, alpha=0.35, color=color, marker=marker, linewidths=0)
    ax.plot(x, smooth(y), color=color, lw=1.6, label=label)


def _eval_points(periodic: List[Dict], before: Optional[Dict], after: Optional[Dict], last_step: int):
    """[(step, results, rows)] of every held-out evaluation: before (step 0), periodic, after; rows is
    how many held-out rows it scored (the periodic ones may use fewer than before and after)."""
    pts = []
    if before:
        pts.append((0, before))
    pts += [(p["step"], p["results"]) for p in periodic if p.get("results")]
    if after:
        pts.append((last_step, after))
    return [(s, r, _rows(r)) for s, r in pts]


def _rows(results: Dict) -> int:
    """Held-out rows behind an evaluation (the per-category counts of its first mode)."""
    for m in results.values():
        if isinstance(m, dict) and isinstance(m.get("counts"), dict):
            return int(sum(m["counts"].values()))
    return 0


def _main_rows(evals) -> int:
    """The row count most of the evaluations scored (the periodic ones' when there are any)."""
    counts = [n for _, _, n in evals]
    return max(set(counts), key=lambda n: (counts.count(n), -n)) if counts else 0


def _eval_line(ax, evals, value, color, label):
    """One held-out series. Points scored on different row sets are not joined: the evaluations on
    the most common row count make the labelled solid line, the others (say a larger before/after
    than the periodic ones) a dashed line of hollow points; `_rows_legend` explains the two."""
    main = _main_rows(evals)
    groups: Dict[int, List] = {}
    for s, r, n in evals:
        v = value(r)
        if v is not None:
            groups.setdefault(n, []).append((s, v))
    for i, (n, pts) in enumerate(sorted(groups.items(), key=lambda g: g[0] != main)):
        style = dict(ls="-", ms=4) if n == main else dict(ls="--", mfc="none", ms=5)
        if i == 0:  # the series' name on its first line (dashed when it has no point on the main rows)
            style["label"] = label
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, **style)


def _rows_legend(ax, evals):
    rows = sorted({n for _, _, n in evals})
    if len(rows) > 1:
        main = _main_rows(evals)
        others = ", ".join(str(n) for n in rows if n != main)
        ax.plot([], [], marker="o", ls="-", color="gray", ms=4, label=f"solid: {main} rows")
        ax.plot([], [], marker="o", ls="--", mfc="none", color="gray", ms=5, label=f"dashed: {others} rows")


def _tasks(rows: List[Dict]) -> List[str]:
    """The task kinds (rt2i, srr) that the metrics rows hold, sorted."""
    return sorted({r.get("task") for r in rows if r.get("task")})


def panel_specs(rows: List[Dict]) -> List:
    """[(title, y label, what)] of the panels the metrics rows can fill: `what` is a list of
    (metric key, task or None) series, or a held-out view ("eval_modes", ("eval_categories", mode)).
    A panel with no series in the rows is left out (the format panel stays: it also shows the
    held-out critiques)."""
    kinds = _tasks(rows)
    panels = [
        ("reward (rectified on SRR steps)", "reward", [("reward_mean", k) for k in kinds]),
        ("RT2I reward by drawing mode", "reward", [("reward_think_mean", None), ("reward_plain_mean", None)]),
        ("S: semantic score", "S", [("reward_semantic", k) for k in kinds]),
        ("Q: quality score", "Q", [("reward_quality", k) for k in kinds]),
        ("images with more objects than asked", "share", [("extra_objects_frac", k) for k in kinds]),
        ("background noise (invisible to the reward)", "mean RGB distance", [("background_noise", k) for k in kinds]),
        ("held-out accuracy per category (think)", "accuracy", ("eval_categories", "think")),
        ("held-out accuracy per category (plain)", "accuracy", ("eval_categories", "plain")),
        ("held-out overall per mode", "accuracy", "eval_modes"),
        (
            "format of rollout texts",
            "share well formed",
            [("thought_format_rate", None), ("critique_format_rate", None)],
        ),
        ("KL to the base policy", "KL", [("text_kl", None), ("image_kl", None)]),
        ("clip fraction", "fraction clipped", [("text_clip_frac", None), ("image_clip_frac", None)]),
        ("ratio spread (std of the ratio)", "std", [("text_ratio_std", None), ("image_ratio_std", None)]),
        (GAP_TITLE, "max |log-prob gap|", [("text_logp_dev", None), ("image_logp_dev", None)]),
        (
            "reward spread within groups",
            "mean group std",
            [(k, None) for k in sorted({k for r in rows for k in r if k.startswith("spread_")})],
        ),
        ("gradient norm (before clipping)", "norm", [("grad_norm", None)]),
    ]
    return [
        p
        for p in panels
        if not isinstance(p[2], list) or any(_series(rows, k, t)[0] for k, t in p[2]) or p[0].startswith("format")
    ]


def plot_panels(
    out_dir: str,
    rows: List[Dict],
    periodic: List[Dict],
    before: Optional[Dict],
    after: Optional[Dict],
    name: str = "curves.png",
) -> Dict[str, str]:
    """One figure, one panel per signal; returns {label: path} for the report."""
    plt = _plt()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last = rows[-1]["step"] if rows else 0
    evals = _eval_points(periodic, before, after, last)
    several_tasks = len(_tasks(rows)) > 1
    panels = panel_specs(rows)
    ncol = 4
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.1 * nrow), squeeze=False)
    for ax, (title, ylabel, what) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if isinstance(what, tuple) and what[0] == "eval_categories":
            mode = what[1]
            cats = [c for c in CATEGORY_ORDER if any(c in (r.get(mode) or {}).get("accuracy", {}) for _, r, _ in evals)]
            for i, c in enumerate(cats):
                _eval_line(
                    ax, evals, lambda r, c=c: (r.get(mode) or {}).get("accuracy", {}).get(c), colors[i % len(colors)], c
                )
            if not cats:
                ax.text(0.5, 0.5, f"no held-out evaluation in {mode} mode", ha="center", transform=ax.transAxes)
            _rows_legend(ax, evals)
            ax.set_ylim(-0.02, 1.02)
        elif what == "eval_modes":
            modes = [m for m in ("plain", "think", "think+reflect") if any(m in r for _, r, _ in evals)]
            for i, m in enumerate(modes):
                _eval_line(ax, evals, lambda r, m=m: (r.get(m) or {}).get("overall"), colors[i], m)
            _rows_legend(ax, evals)
            ax.set_ylim(-0.02, 1.02)
        else:
            for i, (key, task) in enumerate(what):
                x, y = _series(rows, key, task)
                label = key.replace("spread_", "") + (f" ({task})" if task and several_tasks else "")
                _line(ax, x, y, label, colors[i % len(colors)], "x" if task == "srr" else "o")
            if title.startswith("format"):
                for s, r, _ in evals:  # the held-out critiques' format at each evaluation with reflection
                    v = (r.get("think+reflect") or {}).get("critique_format_rate")
                    if v is not None:
                        ax.scatter([s], [v], marker="D", color="black", s=22, zorder=3)
                ax.scatter([], [], marker="D", color="black", s=22, label="held-out critiques")
        if title == GAP_TITLE:  # gaps span decades (1e-7 on images, 1e-5 on tokens in fp32)
            ax.set_yscale("symlog", linthresh=1e-8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"GRPO run: {last} steps (points: each step; lines: moving average over 9)", fontsize=11)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {"training curves": path}


def image_grid(
    path: str,
    rows: List[List[np.ndarray]],
    captions: Sequence[str],
    row_labels: Sequence[str],
    title: Optional[str] = None,
) -> str:
    """rows x columns of images, each with its column's caption (the prompt) under it."""
    plt = _plt()
    n_r, n_c = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_r, n_c, figsize=(1.9 * n_c, 2.25 * n_r), squeeze=False)
    for i in range(n_r):
        for j in range(n_c):
            ax = axes[i][j]
            ax.imshow(rows[i][j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("\n".join(textwrap.wrap(captions[j], 22)), fontsize=7)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- tables ----------------------------------------------------------------------------------------
def before_after_table(before: Dict[str, Dict], after: Dict[str, Dict]) -> str:
    lines = [
        "| mode | overall before | overall after | change | implicit before | implicit after | reward before | reward after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in before:
        if mode not in after:
            continue
        b, a = before[mode], after[mode]
        lines.append(
            f"| {mode} | {b['overall']:.3f} | {a['overall']:.3f} | {a['overall'] - b['overall']:+.3f} | "
            f"{b['accuracy'].get('implicit', float('nan')):.3f} | {a['accuracy'].get('implicit', float('nan')):.3f} | "
            f"{b['mean_reward']:.3f} | {a['mean_reward']:.3f} |"
        )
    if "think" in after and "think+reflect" in after:
        gain = after["think+reflect"]["overall"] - after["think"]["overall"]
        lines.append(
            f"\nOne round of SRR at inference, after training: {gain:+.3f} overall "
            f"(before: {before['think+reflect']['overall'] - before['think']['overall']:+.3f})."
        )
    return "\n".join(lines)


def category_change_table(before: Dict[str, Dict], after: Dict[str, Dict]) -> str:
    """Per category and mode: before -> after (change); the share of the overall gain each of the
    six GenEval categories supplies."""
    modes = [m for m in before if m in after and before[m].get("accuracy")]
    if not modes:
        return ""
    lines = ["| category | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for c in CATEGORY_ORDER:
        cells = []
        for m in modes:
            b, a = before[m]["accuracy"].get(c), after[m]["accuracy"].get(c)
            cells.append("-" if b is None or a is None else f"{b:.2f} -> {a:.2f} ({a - b:+.2f})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_summary(before: Dict[str, Dict], after: Dict[str, Dict]) -> Dict[str, Dict]:
    """Per mode: overall change, categories improved (of 7), the largest share of the overall gain
    one GenEval category supplies (its change / 6 over the overall change)."""
    out = {}
    for m in before:
        if m not in after or not before[m].get("accuracy"):
            continue
        b, a = before[m]["accuracy"], after[m]["accuracy"]
        d = {c: a[c] - b[c] for c in b if c in a}
        gain = after[m]["overall"] - before[m]["overall"]
        six = [c for c in d if c != "implicit"]
        top = max(six, key=lambda c: d[c]) if six else None
        out[m] = {
            "gain": gain,
            "improved": sum(v > 0 for v in d.values()),
            "categories": len(d),
            "top_category": top,
            "top_share": (d[top] / len(six) / gain) if top and gain > 0 else None,
            "implicit_change": d.get("implicit"),
        }
    return out


# the watch: (metric, how much worse counts, worse when it rises, what the flag says)
WATCH = (
    ("quality", Q_DROP, False, "held-out Q fell {b:.3f} -> {a:.3f} (more than %s)" % Q_DROP),
    ("critique_format_rate", 0.0, False, "critiques well formed less often than before ({b:.3f} -> {a:.3f})"),
    ("extra_objects_frac", Q_DROP, True, "more images with more objects than asked ({b:.3f} -> {a:.3f})"),
    (
        "background_noise",
        BG_RISE,
        True,
        "noisier background ({b:.1f} -> {a:.1f}, mean RGB distance from the background colour)",
    ),
)


def hacking_flags(before: Optional[Dict], after: Optional[Dict]) -> List[str]:
    """Flags of the reward-hacking watch: held-out Q down by more than Q_DROP, critiques well formed
    less often than before, more images with extra objects, a noisier background."""
    flags = []
    if not before or not after:
        return flags
    for m in before:
        b, a = before[m], after.get(m)
        if not a:
            continue
        for key, margin, rising, text in WATCH:
            vb, va = b.get(key), a.get(key)
            if vb is not None and va is not None and (va > vb + margin if rising else va < vb - margin):
                flags.append(f"{m}: " + text.format(b=vb, a=va))
    return flags


def watch_table(before: Dict[str, Dict], after: Dict[str, Dict]) -> str:
    keys = [
        ("semantic", "S"),
        ("quality", "Q"),
        ("extra_objects_frac", "more objects than asked"),
        ("background_noise", "background noise"),
        ("critique_format_rate", "critiques well formed"),
        ("critique_intended_rate", "drawing critiques: intended prompt"),
    ]
    lines = ["| mode | " + " | ".join(k[1] for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for m in before:
        if m not in after:
            continue
        cells = []
        for k, _ in keys:
            b, a = before[m].get(k), after[m].get(k)
            cells.append("-" if b is None or a is None else f"{b:.3f} -> {a:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: str,
    cfg: Dict,
    before: Optional[Dict],
    after: Optional[Dict],
    rows: List[Dict],
    periodic: List[Dict],
    files: Dict[str, str],
    elapsed_s: float,
    modes_table=None,
) -> str:
    """modes_table(results) -> Markdown: the task's results table (Task.results_table)."""
    modes_table = modes_table or (lambda r: "```json\n" + json.dumps(r, indent=1) + "\n```")
    path = os.path.join(out_dir, "report.md")
    suite = (
        "Evaluation: the held-out file's prompts scored by the server's reward, ODE, fixed seeds."
        if cfg.get("heldout_file")
        else f"Evaluation: the held-out suite of task {cfg.get('prompt_task', 'shapes')!r} (ShapesWorld: GenEval "
        "rule), ODE, the split's fixed seeds."
    )
    parts = [
        "# GRPO run report",
        "",
        f"Steps: {rows[-1]['step'] if rows else 0} of {cfg['max_steps']}, task {cfg['task']}, G = {cfg['group_size']}, "
        f"{cfg['prompts_per_step']} prompts per step, seed {cfg.get('seed')}, wall time {elapsed_s / 60:.1f} min. "
        + suite,
        "",
    ]
    if before and after:
        parts += ["## Before / after", "", before_after_table(before, after), ""]
        cat = category_change_table(before, after)
        if cat:
            summary = learning_summary(before, after)
            parts += ["Per category, before -> after (change):", "", cat, ""]
            for m, s in summary.items():
                share = "-" if s["top_share"] is None else f"{s['top_share']:.2f}"
                parts.append(
                    f"- {m}: overall {s['gain']:+.3f}; {s['improved']} of {s['categories']} categories improved; "
                    f"largest share of the gain from one category: {share} ({s['top_category']})"
                )
            parts.append("")
        flags = hacking_flags(before, after)
        parts += [
            "## Reward-hacking watch",
            "",
            watch_table(before, after),
            "",
            ("**Flagged:**\n\n" + "\n".join(f"- {f}" for f in flags))
            if flags
            else f"No flags (held-out Q within {Q_DROP} of before, critiques well formed at least as often, "
            f"no rise in images with extra objects, background noise within {BG_RISE} of before).",
            "",
        ]
    if before:
        parts += ["## Before (base policy)", "", modes_table(before), ""]
    if after:
        parts += ["## After", "", modes_table(after), ""]
    if periodic:
        parts += ["## Periodic evaluations", "", "| step | mode | overall | implicit |", "|---:|---|---:|---:|"]
        for p in periodic:
            for mode, r in p["results"].items():
                parts.append(
                    f"| {p['step']} | {mode} | {r['overall']:.3f} | {r['accuracy'].get('implicit', float('nan')):.3f} |"
                )
        parts.append("")
    parts += ["## Files", ""]
    for label, f in files.items():
        rel = os.path.relpath(f, out_dir)
        parts.append(f"- {label}: [{rel}]({rel})" + (f"\n\n  ![{label}]({rel})" if rel.endswith(".png") else ""))
    parts += ["", "## Config", "", "```json", json.dumps(cfg, indent=1), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
