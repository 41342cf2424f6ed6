"""The learning-side pieces of the trainer, on hand-made inputs (seconds): the format check of
thoughts and critiques, the extra-object count, the format reward, dynamic sampling's group
selection, Rollouts slicing, the cached before-evaluation, the reward-hacking flags and the
matplotlib report (headless)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alphagrpo_serve.models.base import Sample, TextSample
from alphagrpo_serve.sampling.sampler import ImageTrajectory
from alphagrpo_serve.shapes.evaluate import ground_truth_images
from alphagrpo_serve.shapes.task import ShapesTask, background_noise, objects_exceed, text_format
from alphagrpo_trainer.config import TrainConfig
from alphagrpo_trainer.evaluation import cached_evaluation
from alphagrpo_trainer.report import hacking_flags, image_grid, learning_summary, plot_panels, smooth
from alphagrpo_trainer.rollout import Rollouts
from alphagrpo_trainer.shaping import Refiller, format_flags, shaped_rewards, step_stats


def test_text_format_of_thoughts_and_critiques():
    implicit = "a shape with no corners, coloured like the sky"
    assert text_format(implicit, "a blue circle", False) == (True, True)
    assert text_format(implicit, "a red circle", False) == (True, False)  # well formed, not what was asked
    assert text_format(implicit, "a blue", False) == (False, False)
    crit = "i see a blue circle . the circle should be red . draw a red circle"
    assert text_format("a red circle", crit, True) == (True, True)
    assert text_format("a red circle", "i see a red circle . it is correct", True) == (True, True)
    assert text_format("a red circle", "i see a blue circle . the circle should be red . draw a", True) == (
        False,
        False,
    )
    assert text_format("a red circle", "i see a blue circle . the circle should be red", True) == (False, False)
    assert text_format("two red circles", crit, True) == (True, False)


def test_objects_exceed_counts_extra_copies():
    one = ground_truth_images(["a red circle"], seeds=[0])[0]
    two = ground_truth_images(["two red circles"], seeds=[0])[0]
    assert objects_exceed(["a red circle", "a red circle", "two red circles"], np.stack([one, two, two])) == [
        False,
        True,
        False,
    ]


def test_background_noise_sees_tints_the_detector_ignores():
    from alphagrpo_serve.shapes.detect import Detector

    clean = ground_truth_images(["a red circle", "two blue squares"], seeds=[0, 1])
    assert background_noise(clean).tolist() == [0.0, 0.0]  # object edges are not background
    tinted = clean.astype(np.int16)
    tinted[..., 2] += 12  # a faint blue cast everywhere
    tinted = np.clip(tinted, 0, 255).astype(np.uint8)
    assert background_noise(tinted) == pytest.approx([12.0, 12.0], abs=0.6)
    assert [len(d.objects) for d in Detector().detect_batch(tinted)] == [1, 2]  # below the detector's threshold


def _sample(prompt, text="", reflect=False):
    ids = [1] * len(text.split())
    tr = ImageTrajectory(torch.zeros(2, 3, 4, 4), torch.ones(1), torch.zeros(1), torch.zeros(1))
    return Sample(
        prompt,
        np.zeros((32, 32, 3), np.uint8),
        text,
        TextSample(ids, [0.0] * len(ids), text),
        tr,
        0,
        think=bool(text),
        reflect=reflect,
    )


def _rollouts(prompts, texts, rewards, kind="rt2i"):
    r = torch.tensor(rewards, dtype=torch.float32)
    samples = [_sample(p, t, kind == "srr") for p, row in zip(prompts, texts) for t in row]
    return Rollouts(
        kind, list(prompts), samples, r, r.clone(), r.clone(), r.clone(), ["a"] * len(samples), None, None, [0]
    )


def test_format_reward_lowers_only_malformed_samples():
    roll = _rollouts(
        ["a shape with no corners, coloured like the sky"], [["a blue circle", "a blue", ""]], [[0.5, 0.5, 0.5]]
    )
    ok, has = format_flags(ShapesTask(), roll)
    assert ok.tolist() == [[1.0, 0.0, 1.0]] and has.tolist() == [[True, True, False]]
    cfg = TrainConfig(format_weight=0.2)
    assert torch.allclose(shaped_rewards(cfg, roll, ok), torch.tensor([[0.5, 0.3, 0.5]]))
    assert torch.equal(shaped_rewards(TrainConfig(), roll, ok), roll.rewards)
    m = step_stats(ShapesTask(), roll, roll.rewards, ok, has, 0.05)
    assert m["thought_format_rate"] == 0.5 and m["groups_flat_frac"] == 1.0 and m["spread_implicit"] == 0.0


def test_rt2i_reward_is_split_by_drawing_mode():
    # group 0 thinks (texts), group 1 draws plain: the means by hand are 0.2 and 0.7
    roll = _rollouts(["a red circle", "a blue square"], [["a red circle"] * 2, ["", ""]], [[0.1, 0.3], [0.6, 0.8]])
    ok, has = format_flags(ShapesTask(), roll)
    m = step_stats(ShapesTask(), roll, roll.rewards, ok, has, 0.05)
    assert m["reward_think_mean"] == pytest.approx(0.2) and m["reward_plain_mean"] == pytest.approx(0.7)
    plain_only = _rollouts(["a red circle"], [["", ""]], [[0.1, 0.3]])
    m = step_stats(ShapesTask(), plain_only, plain_only.rewards, *format_flags(ShapesTask(), plain_only), 0.05)
    assert m["reward_plain_mean"] == pytest.approx(0.2) and "reward_think_mean" not in m
    srr = _rollouts(["a red circle"], [["it is correct", "it is correct"]], [[0.1, 0.3]], kind="srr")
    assert not any(
        k.startswith("reward_")
        for k in step_stats(ShapesTask(), srr, srr.rewards, *format_flags(ShapesTask(), srr), 0.05)
    )


def test_rollouts_groups_and_cat_keep_samples_with_their_rewards():
    roll = _rollouts(
        ["a red circle", "a blue square", "a circle"], [["", ""]] * 3, [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
    )
    sub = roll.groups([2, 0])
    assert sub.prompts == ["a circle", "a red circle"] and torch.allclose(
        sub.rewards, torch.tensor([[0.5, 0.6], [0.1, 0.2]])
    )
    assert [s.prompt for s in sub.samples] == ["a circle", "a circle", "a red circle", "a red circle"]
    both = Rollouts.cat([sub, roll.groups([1])])
    assert both.prompts[-1] == "a blue square" and both.rewards.shape == (3, 2) and len(both.samples) == 6


def test_dynamic_sampling_replaces_flat_groups_and_keeps_the_batch_size():
    cfg = TrainConfig(group_size=2, prompts_per_step=3, dynamic_sampling=True, dynamic_min_std=0.05)
    first = _rollouts(
        ["a red circle", "a blue square", "a circle"], [["", ""]] * 3, [[0.1, 0.9], [0.5, 0.5], [0.2, 0.2]]
    )
    fresh = {"n": None}

    def rt2i(prompts, think, seed, window):  # the refill round: one fresh group with spread, one without
        fresh["n"] = len(prompts)
        return _rollouts(prompts, [["", ""]] * len(prompts), [[0.0, 1.0], [0.3, 0.31]][: len(prompts)])

    trainer = SimpleNamespace(rank=0, task=ShapesTask(), runner=SimpleNamespace(rt2i=rt2i))
    ref = Refiller(cfg, world=1)
    inp = {"step": 4, "task": "rt2i", "seeds": [100], "window": (0, 2)}
    ok = torch.ones(3, 2)
    has = torch.zeros(3, 2, dtype=torch.bool)
    roll, r, ok2, has2, replaced = ref.refill(trainer, inp, first, first.rewards, ok, has)
    assert fresh["n"] == 2 and r.shape == (3, 2) and len(roll.samples) == 6
    # both groups with spread first, then the widest of the rest (the fresh 0.3/0.31 beats the flat originals)
    assert r.std(1, unbiased=False).tolist() == pytest.approx([0.4, 0.5, 0.005], abs=1e-6) and replaced == 2
    assert roll.prompts[0] == "a red circle" and [s.prompt for s in roll.samples[:2]] == ["a red circle"] * 2
    # a batch without flat groups is left alone and draws nothing
    fresh["n"] = None
    assert (
        ref.refill(trainer, inp, first.groups([0]), first.rewards[:1], ok[:1], has[:1])[4] == 0 and fresh["n"] is None
    )
    # the refill prompts depend only on (seed, step, rank) and are training prompts
    assert Refiller(cfg, 1).fresh(4, 0, 2) == ref.fresh(4, 0, 2)


def test_cached_evaluation_runs_once_per_weights_and_settings(tmp_path):
    from alphagrpo_trainer.evaluation import weights_digest
    from test_trainer_units import small_policy

    pol = small_policy()
    calls = []
    cfg = TrainConfig(eval_cache=str(tmp_path), eval_final_limit=7)
    run = lambda: calls.append(1) or {"plain": {"overall": 0.25}}  # noqa: E731
    assert cached_evaluation(cfg, pol, run) == {"plain": {"overall": 0.25}}
    assert cached_evaluation(cfg, pol, run) == {"plain": {"overall": 0.25}} and len(calls) == 1
    cached_evaluation(TrainConfig(eval_cache=str(tmp_path), eval_final_limit=8), pol, run)  # other settings
    assert len(calls) == 2
    d0 = weights_digest(pol)
    with torch.no_grad():
        pol.trainable_parameters()[0].add_(1e-3)
    assert weights_digest(pol) != d0  # other weights: another key
    cached_evaluation(cfg, pol, run)
    assert len(calls) == 3
    assert cached_evaluation(TrainConfig(), pol, run) and len(calls) == 4  # no cache folder: always evaluates


def _evals(q, crit, extra, acc, rows_per_category=10):
    cats = ["single_object", "two_object", "counting", "colors", "position", "color_attr", "implicit"]
    res = {
        "accuracy": dict(zip(cats, acc)),
        "counts": {c: rows_per_category for c in cats},
        "overall": float(np.mean(acc[:6])),
        "mean_reward": 0.5,
        "semantic": 0.5,
        "quality": q,
        "extra_objects_frac": extra,
        "background_noise": 3.0 + 10 * extra,
    }
    return {"think": dict(res), "think+reflect": dict(res, critique_format_rate=crit)}


def test_hacking_flags_and_learning_summary():
    before = _evals(0.85, 0.9, 0.2, [0.3, 0.3, 0.3, 0.7, 0.1, 0.3, 0.5])
    fine = _evals(0.83, 0.9, 0.22, [0.6, 0.4, 0.4, 0.8, 0.2, 0.4, 0.6])
    assert hacking_flags(before, fine) == []
    hacked = _evals(0.70, 0.5, 0.5, [0.9, 0.3, 0.3, 0.7, 0.1, 0.3, 0.5])
    flags = hacking_flags(before, hacked)
    assert (
        any("Q fell" in f for f in flags)
        and any("critiques" in f for f in flags)
        and any("more objects" in f for f in flags)
    )
    assert any("noisier background" in f for f in flags)
    s = learning_summary(before, hacked)["think"]
    assert s["top_category"] == "single_object" and s["top_share"] == pytest.approx(1.0) and s["improved"] == 1
    s = learning_summary(before, fine)["think"]
    # by hand: overall 2.0/6 -> 2.8/6 (+0.1333); single_object +0.3 of it, /6 categories: 0.05/0.1333
    assert s["improved"] == 7 and s["gain"] == pytest.approx(0.8 / 6) and s["top_share"] == pytest.approx(0.375)


def test_critique_flag_has_no_margin_and_the_report_lists_flags_and_links(tmp_path):
    from alphagrpo_trainer.report import write_report

    before = _evals(0.85, 0.9, 0.2, [0.3] * 7)
    assert hacking_flags(before, _evals(0.85, 0.9, 0.2, [0.3] * 7)) == []  # equal: not "less often"
    flags = hacking_flags(before, _evals(0.85, 0.899, 0.2, [0.3] * 7))
    assert flags == ["think+reflect: critiques well formed less often than before (0.900 -> 0.899)"]
    assert hacking_flags(before, _evals(0.80, 0.9, 0.2, [0.3] * 7)) == []  # Q down exactly 0.05: within
    after = _evals(0.79, 0.9, 0.2, [0.3] * 7)
    curves = tmp_path / "curves.png"
    curves.write_bytes(b"png")
    cfg = {"max_steps": 4, "task": "rt2i", "group_size": 8, "prompts_per_step": 2, "seed": 0}
    text = open(
        write_report(str(tmp_path), cfg, before, after, [{"step": 4}], [], {"training curves": str(curves)}, 60)
    ).read()
    assert "**Flagged:**" in text and "think: held-out Q fell 0.850 -> 0.790 (more than 0.05)" in text
    assert "![training curves](curves.png)" in text
    text = open(write_report(str(tmp_path), cfg, before, before, [{"step": 4}], [], {}, 60)).read()
    assert "**Flagged:**" not in text and "No flags" in text


def test_report_panels_cover_every_logged_signal_and_keep_row_sets_apart():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alphagrpo_trainer.report import _eval_line, _eval_points, panel_specs

    keys = ["reward_mean", "reward_semantic", "reward_quality", "extra_objects_frac", "background_noise"]
    keys += ["text_kl", "image_kl", "text_clip_frac", "image_clip_frac", "text_ratio_std", "image_ratio_std"]
    keys += ["text_logp_dev", "image_logp_dev", "grad_norm", "spread_colors", "critique_format_rate"]
    rows = [dict({k: 0.1 for k in keys}, step=1, task="rt2i")]
    titles = " | ".join(t for t, _, _ in panel_specs(rows))
    for want in (
        "reward",
        "S: semantic",
        "Q: quality",
        "more objects than asked",
        "background noise",
        "per category (think)",
        "per category (plain)",
        "per mode",
        "format",
        "KL",
        "clip fraction",
        "ratio spread",
        "rollout/recompute gap",
        "reward spread",
        "gradient norm",
    ):
        assert want in titles, want
    # a run scoring 30 rows at each periodic evaluation and 60 before and after: two lines per
    # series, never one line through all four points
    small, large = _evals(0.8, 0.9, 0.2, [0.3] * 7, 5), _evals(0.8, 0.9, 0.2, [0.4] * 7, 10)
    evals = _eval_points([{"step": 2, "results": small}, {"step": 4, "results": small}], large, large, 6)
    assert [(s, n) for s, _, n in evals] == [(0, 70), (2, 35), (4, 35), (6, 70)]
    fig, ax = plt.subplots()
    _eval_line(ax, evals, lambda r: r["think"]["overall"], "C0", "think")
    lines = sorted((list(ln.get_xdata()), ln.get_linestyle(), ln.get_label()) for ln in ax.lines)
    plt.close(fig)
    assert [x for x, _, _ in lines] == [[0, 6], [2, 4]]
    assert lines[1][1:] == ("-", "think") and lines[0][1] == "--" and lines[0][2].startswith("_")


def test_report_figures_render_headless(tmp_path):
    rows = [
        {
            "step": i + 1,
            "task": "rt2i" if i < 6 else "srr",
            "reward_mean": 0.5 + 0.01 * i,
            "reward_semantic": 0.5,
            "reward_quality": 0.8,
            "text_kl": 0.0,
            "image_kl": 0.001 * i,
            "spread_colors": 0.1,
            "critique_format_rate": 0.9,
            "grad_norm": 0.1,
            "text_logp_dev": 2e-5,
            "image_logp_dev": 1e-7,
        }
        for i in range(10)
    ]
    ev = _evals(0.85, 0.9, 0.2, [0.3] * 7)
    files = plot_panels(str(tmp_path), rows, [{"step": 5, "results": ev}], ev, ev)
    assert os.path.getsize(files["training curves"]) > 10_000
    img = np.zeros((32, 32, 3), np.uint8)
    path = image_grid(
        str(tmp_path / "g.png"),
        [[img, img]] * 2,
        ["a red circle", "a shape with no corners, coloured like the sky"],
        ["seed 0", "seed 1"],
        "before",
    )
    assert os.path.getsize(path) > 1000
    assert smooth([0.0, 1.0, 0.0, 1.0, 0.0], 3).tolist() == pytest.approx([0.5, 1 / 3, 2 / 3, 1 / 3, 0.5])


def test_passk_probe_estimator_matches_hand_counts():
    """benchmarks/learning_probes/passk.py's unbiased pass@k against values counted by hand: with n
    samples of which c are right, pass@k is the chance that k drawn without replacement hold a right one."""
    import importlib.util
    from itertools import combinations

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "learning_probes", "passk.py"
    )
    spec = importlib.util.spec_from_file_location("passk", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # its rollout sampling: windows of the config's size, first steps 0-4 for proxy.yaml's [0, 6] range
    from alphagrpo_trainer.config import TrainConfig

    cfg = TrainConfig(steps=10, sde_window_size=2, sde_window_range=[0, 6], noise_level=0.7, cfg_scale=3.0)
    rng = np.random.default_rng(0)
    draws = [mod.rollout_sampling(cfg, rng) for _ in range(200)]
    assert {sc.sde_window for sc, _ in draws} == {(0, 2), (1, 2), (2, 2), (3, 2), (4, 2)}
    assert all(sc.mode == "sde" and sc.steps == 10 and sc.noise_level == 0.7 for sc, _ in draws)
    assert (draws[0][1].temperature, draws[0][1].max_tokens) == (1.0, 40)
    assert mod.pass_at(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs hold the right sample
    assert mod.pass_at(4, 0, 4) == 0.0 and mod.pass_at(4, 4, 1) == 1.0
    assert mod.pass_at(16, 3, 1) == pytest.approx(3 / 16)
    # the reward's ranking against the rule: row 1 has pairs (0.9>0.2 win, 0.9>0.5 win), row 2 (0.3<0.4
    # loss, 0.3=0.3 tie), row 3 has no wrong sample: 2 + 0 + 0.5 of 4 pairs
    right = np.array([[True, False, False], [True, False, False], [True, True, True]])
    rewards = np.array([[0.9, 0.2, 0.5], [0.3, 0.4, 0.3], [0.1, 0.2, 0.3]])
    assert mod.ranking_agreement(right, rewards) == pytest.approx(2.5 / 4)
    assert mod.ranking_agreement(right[2:], rewards[2:]) is None
    for n, c, k in [(5, 2, 3), (6, 1, 4), (8, 3, 2)]:  # enumerate every k-subset of n samples
        right = [True] * c + [False] * (n - c)
        subsets = list(combinations(range(n), k))
        assert mod.pass_at(n, c, k) == pytest.approx(sum(any(right[i] for i in s) for s in subsets) / len(subsets))
