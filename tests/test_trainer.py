"""The GRPO trainer against a real `alphagrpo serve` subprocess on 127.0.0.1 (a small random tiny UMM in
a real safetensors file keeps them fast): two steps change the served weights, kill -9 and --resume
repeat the next step exactly, two torchrun ranks equal one rank, a killed trainer leaves no server,
restarts and LoRA pushes. The pieces without a server are in test_trainer_units.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from alphagrpo_serve.client import Client
from alphagrpo_serve.models.pretrain import export_safetensors
from alphagrpo_serve.models.tiny_policy import TinyPolicy
from alphagrpo_serve.models.tiny_umm import TinyUMM, TinyUMMConfig
from alphagrpo_serve.models.tokenizer import Tokenizer
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig
from alphagrpo_trainer.config import load_config
from alphagrpo_trainer.servers import LocalServer, ServerError, ServerPool
from serving import wait_for_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "trainer")]), OMP_NUM_THREADS="1")


# ---- runs against a real server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small random tiny UMM in a safetensors file, served by a real `alphagrpo serve` subprocess."""
    d = tmp_path_factory.mktemp("grpo")
    weights = str(d / "base.safetensors")
    torch.manual_seed(1)
    export_safetensors(TinyUMM(TinyUMMConfig(vocab_size=len(Tokenizer()), width=32, layers=1, heads=1)), weights)
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        server = LocalServer({"name": "tiny", "path": weights}, log_path=str(d / "server.log"))
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
    yield server.address, weights, d
    server.stop()


def write_cfg(path, weights, out, **kw):
    cfg = dict(
        task="mixed",
        mixed_rt2i_steps=1,
        group_size=3,
        prompts_per_step=2,
        steps=4,
        sde_window_size=2,
        sde_window_range=[0, 4],
        max_thought_tokens=6,
        max_steps=2,
        checkpoint_every=1,
        eval_final_limit=6,
        eval_steps=3,
        eval_srr=False,
        lr=1e-3,
        policy={"name": "tiny", "path": weights},
        out_dir=str(out),
    )
    cfg.update(kw)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train_cmd(cfg, server, *extra):
    return [
        sys.executable,
        "-m",
        "alphagrpo_serve.cli",
        "train",
        "--config",
        cfg,
        "--server",
        server,
        "--no-progress",
        *extra,
    ]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_steps_change_the_served_weights_and_bump_the_version(served, tmp_path):
    addr, weights, _ = served
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path / "c.yaml", weights, out, eval_every=1, eval_limit=7)
    with Client(addr) as c:
        v0 = c.model_info().policy_version
        before = c.generate(["a red circle"], seed=5, steps=3, think=True, max_thought_tokens=4)[0].image
    res = subprocess.run(train_cmd(cfg, addr), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "report:" in res.stdout and "overall before" in res.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and [r["task"] for r in rows] == ["rt2i", "srr"]
    assert all(r["off_policy_count"] == 0 for r in rows)
    # every RT2I rollout thinks (think_fraction 1): the think mode's reward is the step's, no plain key
    assert rows[0]["reward_think_mean"] == pytest.approx(rows[0]["reward_raw_mean"], abs=1e-6)
    assert "reward_plain_mean" not in rows[0] and "reward_think_mean" not in rows[1]
    assert rows[0]["image_logp_dev"] < 1e-4 and rows[0]["text_logp_dev"] < 1e-4  # trainer recompute = server's record
    with Client(addr) as c:
        info = c.model_info()
        after = c.generate(["a red circle"], seed=5, steps=3, think=True, max_thought_tokens=4)[0].image
    assert info.policy_version == v0 + 3  # the initial push and one per step
    assert not np.array_equal(before, after)
    # the server holds exactly the trainer's final weights: same image for the same seed in-process
    trained = TinyPolicy.load(str(out / "policy.safetensors"))
    sc = SamplingConfig(steps=3, mode="ode", cfg_scale=3.0)
    local = trained.generate(["a red circle"], [5], sc, TextConfig(max_tokens=4), think=True)[0].image
    assert np.array_equal(local, after)
    for f in ("report.md", "grid_before.png", "grid_after.png", "curves.png", "checkpoint.pt", "config.yaml"):
        assert (out / f).exists(), f
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "tb"))
    # periodic evaluations on their own 7 rows (before/after: 6) start with the base policy at step 0
    periodic = torch.load(out / "checkpoint.pt", weights_only=False)["periodic"]
    assert [p["step"] for p in periodic] == [0, 1]
    assert all(sorted(p["results"]) == ["plain", "think"] for p in periodic)
    assert all(sum(p["results"]["think"]["counts"].values()) == 7 for p in periodic)
    from alphagrpo_serve.shapes.task import ShapesTask

    base = TinyPolicy.load(weights)
    ref = ShapesTask().evaluate(base, SamplingConfig(steps=3, mode="ode", cfg_scale=3.0), [("think", True, False)], 7)
    assert periodic[0]["results"]["think"]["overall"] == pytest.approx(ref["think"]["overall"])


def test_kill_and_resume_repeats_the_next_step_exactly(served, tmp_path):
    addr, weights, _ = served
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref_cfg = write_cfg(tmp_path / "ref.yaml", weights, ref_out, max_steps=3, task="rt2i")
    cfg = write_cfg(tmp_path / "c.yaml", weights, out, max_steps=3, task="rt2i")
    res = subprocess.run(train_cmd(ref_cfg, addr), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen(train_cmd(cfg, addr), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill as soon as step 2 is checkpointed
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    res = subprocess.run(train_cmd(cfg, addr, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = metrics(ref_out), metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("prompts", "seeds", "window", "task"):
        assert a[2][key] == b[2][key], key
    assert abs(a[2]["reward_mean"] - b[2]["reward_mean"]) < 1e-6
    wa = TinyPolicy.load(str(ref_out / "policy.safetensors")).export_weights()
    wb = TinyPolicy.load(str(out / "policy.safetensors")).export_weights()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_two_torchrun_ranks_equal_one_rank(served, tmp_path):
    addr, weights, _ = served
    kw = dict(task="rt2i", max_steps=2, prompts_per_step=4, text_aggregation="seq-mean-token-mean", eval_final_limit=3)
    one = write_cfg(tmp_path / "one.yaml", weights, tmp_path / "one", **kw)
    two = write_cfg(tmp_path / "two.yaml", weights, tmp_path / "two", **kw)
    res = subprocess.run(train_cmd(one, addr), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "alphagrpo_serve.cli",
        "train",
        "--config",
        two,
        "--server",
        addr,
        "--no-progress",
    ]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["prompts"] for r in a] == [r["prompts"] for r in b]
    assert all(abs(x["reward_mean"] - y["reward_mean"]) < 1e-5 for x, y in zip(a, b))
    wa = TinyPolicy.load(str(tmp_path / "one" / "policy.safetensors")).export_weights()
    wb = TinyPolicy.load(str(tmp_path / "two" / "policy.safetensors")).export_weights()
    base = TinyPolicy.load(weights).export_weights()
    moved = max(float((wa[k] - base[k]).abs().max()) for k in wa)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert moved > 1e-4 and diff < 1e-2 * moved, (moved, diff)  # Adam: every weight moves ~lr a step


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_trainer_leaves_no_local_server_behind(served, tmp_path, sig):
    """SIGTERM unwinds the trainer (its finally stops the server); after SIGKILL the server sees
    its parent gone (--exit-with-parent) and stops by itself."""
    import socket

    _, weights, _ = served
    cfg = write_cfg(tmp_path / "c.yaml", weights, tmp_path / "run", task="rt2i", max_steps=50)
    proc = subprocess.Popen(
        train_cmd(cfg, "local"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        seen = wait_for_line(proc, "local server on ")
        assert seen and seen[-1].startswith("local server on "), "the trainer did not report its local server"
        addr = seen[-1].split()[-1]
        host, port = addr.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()  # it is up
        proc.send_signal(sig)
        proc.wait(timeout=60)
        gone, deadline = False, time.time() + 60
        while not gone and time.time() < deadline:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                time.sleep(0.5)
            except OSError:
                gone = True
        assert gone, f"the local server on {addr} outlived its trainer ({sig.name})"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_unreachable_server_names_the_address(tmp_path, served):
    _, weights, _ = served
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = ServerPool([f"127.0.0.1:{port}"], timeout_s=5, retries=2, backoff_s=0.05)
    try:
        with pytest.raises(ServerError, match=f"127.0.0.1:{port}.*after 2 retries"):
            pool.info()
    finally:
        pool.close()
    cfg = write_cfg(
        tmp_path / "c.yaml", weights, tmp_path / "run", server_retries=1, server_backoff_s=0.05, eval_final_limit=2
    )
    res = subprocess.run(train_cmd(cfg, f"127.0.0.1:{port}"), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and f"127.0.0.1:{port}" in res.stderr, res.stderr[-2000:]


def test_a_restarted_server_gets_the_current_weights_before_rollouts(tmp_path, served):
    from alphagrpo_trainer.train import Trainer

    _, weights, _ = served
    server = LocalServer({"name": "tiny", "path": weights}, log_path=str(tmp_path / "s1.log"))
    port = int(server.address.rsplit(":", 1)[1])
    cfg = load_config(
        None,
        dict(
            task="rt2i",
            group_size=3,
            prompts_per_step=2,
            steps=4,
            sde_window_size=2,
            sde_window_range=[0, 4],
            max_thought_tokens=6,
            max_steps=3,
            lr=1e-3,
            policy={"name": "tiny", "path": weights},
            out_dir=str(tmp_path / "run"),
        ),
    )
    tr = Trainer(cfg, [server.address], progress=False, log=lambda *a: None)
    try:
        tr.sync_servers(force=True)
        m1 = tr.train_step()
        boot1 = tr.pool.known[server.address][0]
        server.stop()
        server = LocalServer(
            {"name": "tiny", "path": weights}, log_path=str(tmp_path / "s2.log"), port=port
        )  # back with the base weights
        m2 = tr.train_step()
        assert tr.restarts == 1 and tr.pool.known[server.address][0] != boot1
        assert m1["off_policy_count"] == 0 and m2["off_policy_count"] == 0
        assert m2["image_logp_dev"] < 1e-4  # rollouts came from the trainer's weights, not the base
        with Client(server.address) as c:
            assert c.model_info().policy_version == 2  # the catch-up push, then the step's push
    finally:
        tr.close()
        server.stop()


def test_lora_run_pushes_adapters_that_the_server_applies_exactly(served, tmp_path):
    """A fresh server of the trainer's checkpoint: same base fingerprint, so the run pushes only
    adapters (version 1 after the first push, +1 per step: 3 after 2 steps; a full push first
    would make it 4), and the server's base stays the checkpoint's."""
    _, weights, _ = served
    server = LocalServer({"name": "tiny", "path": weights}, log_path=str(tmp_path / "server.log"))
    try:
        addr = server.address
        base_fp = TinyPolicy.load(weights).weights_fingerprint()
        with Client(addr) as c:
            assert c.model_info().weights_fingerprint == base_fp
        out = tmp_path / "lora"
        cfg = write_cfg(
            tmp_path / "c.yaml", weights, out, task="rt2i", max_steps=2, lora_rank=2, lora_alpha=8.0, lr=1e-2
        )
        res = subprocess.run(train_cmd(cfg, addr), env=ENV, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        with Client(addr) as c:
            info = c.model_info()
            served_img = c.generate(["two blue squares"], seed=3, steps=3, think=True, max_thought_tokens=4)[0].image
    finally:
        server.stop()
    assert info.lora_enabled and info.policy_version == 3 and info.weights_fingerprint == base_fp
    merged = TinyPolicy.load(str(out / "policy.safetensors"))  # adapters merged into the base weights
    base = TinyPolicy.load(weights).export_weights()
    assert any(not torch.equal(merged.export_weights()[k], base[k]) for k in base)
    sc = SamplingConfig(steps=3, mode="ode", cfg_scale=3.0)
    local = merged.generate(["two blue squares"], [3], sc, TextConfig(max_tokens=4), think=True)[0].image
    assert np.abs(local.astype(int) - served_img.astype(int)).max() <= 1  # merged vs adapter form: rounding only


def test_prompts_file_and_heldout_file_are_rewarded_by_the_server(served, tmp_path):
    """Training prompts from a JSONL file, evaluation of a held-out JSONL by the server's reward
    (not the task's built-in suite); the 'open' prompt task has no suite, so only the file counts."""
    addr, weights, _ = served
    train_file, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a red circle", "two blue squares")))
    heldout.write_text(
        "".join(
            json.dumps({"prompt": p, "seed": i}) + "\n"
            for i, p in enumerate(("a green triangle", "a yellow circle", "three red squares"))
        )
    )
    out = tmp_path / "run"
    cfg = write_cfg(
        tmp_path / "c.yaml",
        weights,
        out,
        task="rt2i",
        max_steps=1,
        prompt_task="open",
        prompts_file=str(train_file),
        heldout_file=str(heldout),
        eval_final_limit=0,
    )
    res = subprocess.run(train_cmd(cfg, addr), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    before = json.loads((out / "eval_before.json").read_text())
    assert set(before) == {"plain", "think"} and before["plain"]["accuracy"] == {}
    for r in before.values():
        assert 0.0 <= r["mean_reward"] <= 1.0 and r["overall"] == r["mean_reward"] and 0 <= r["quality"] <= 1
    rows = metrics(out)
    assert set(rows[0]["prompts"]) <= {"a red circle", "two blue squares"}
    assert not any(k.startswith("acc_") for k in rows[0])  # the open task has no per-category metrics
    assert "mean reward" in (out / "report.md").read_text()
