"""BAGEL served and trained end to end: `alphagrpo serve --policy bagel --model DIR` (a tiny random
BAGEL in the official layout, on 127.0.0.1) answers Generate (think or not, any canvas the
checkpoint allows), Reflect, UpdateWeights (full tensors by their official names, and LoRA
adapters) and GetModelInfo; `alphagrpo train` runs an RT2I and an SRR step against it and the
served version changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
import yaml

from alphagrpo_serve.client import Client
from alphagrpo_serve.models.bagel.policy import BagelPolicy
from alphagrpo_trainer.servers import LocalServer
from bagel_fixtures import make_tiny_bagel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "trainer")]), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def bagel_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("bagel_serve")
    path = make_tiny_bagel.write(str(d / "ckpt"), seed=1)
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        server = LocalServer(
            {"name": "bagel", "path": path}, extra_args=["--task", "shapes"], log_path=str(d / "server.log")
        )
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
    yield server.address, path, d
    server.stop()


def test_generate_reflect_update_weights_and_model_info(bagel_server):
    addr, path, _ = bagel_server
    local = BagelPolicy.load(path)
    with Client(addr) as c:
        info = c.model_info()
        assert (
            info.name == "bagel"
            and info.capabilities.reflect
            and list(info.capabilities.guidance_branches) == ["text", "image"]
        )
        assert (info.canvas_rule.multiple, info.canvas_rule.max_side) == (16, 128)
        names = {p.name for p in info.parameters}
        assert {"language_model.model.layers.0.self_attn.q_proj_moe_gen.weight", "latent_pos_embed.pos_embed"} <= names
        assert info.generate_defaults.cfg_renorm_type == "global" and info.reflect_defaults.cfg_img_scale == 2.0
        v0 = info.policy_version
        # think, two prompts of different lengths in one request, a trajectory per sample
        prompts = ["a red circle", "a blue square to the left of a yellow triangle"]
        got = c.generate(
            prompts,
            group_size=2,
            seed=3,
            steps=3,
            think=True,
            max_thought_tokens=4,
            mode="sde",
            sde_window=(0, 2),
            return_trajectory=True,
        )
        assert len(got) == 4 and all(g.image.shape == (64, 64, 3) and g.thought is not None for g in got)
        assert all(len(g.trajectory.token_ids) >= 1 and g.trajectory.image.log_probs.shape == (2,) for g in got)
        # the served sample is the local policy's for the same settings and seed
        mine = local.generate([got[2].prompt], [got[2].seed], got[2].sampling, got[2].text_config, think=True)[0]
        assert np.abs(mine.image.astype(int) - got[2].image.astype(int)).max() <= 1
        assert mine.text.ids == list(got[2].trajectory.token_ids)
        wide = c.generate(["a red circle"], steps=2, width=96, height=48)
        assert wide[0].image.shape == (48, 96, 3)
        with pytest.raises(grpc.RpcError) as err:
            c.generate(["a red circle"], steps=2, width=40)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "width" in err.value.details()
        refined = c.reflect(
            ["a red circle"],
            [got[0].image],
            group_size=2,
            seed=1,
            steps=3,
            max_thought_tokens=4,
            mode="sde",
            sde_window=(1, 1),
            return_trajectory=True,
        )
        assert [r.image.shape for r in refined] == [(64, 64, 3)] * 2 and all(r.trajectory.token_ids for r in refined)
        # full weights by their official names
        full = local.export_weights()
        full["llm2vae.bias"] = full["llm2vae.bias"] + 0.5
        v1 = c.update_weights({"llm2vae.bias": full["llm2vae.bias"]})
        assert v1 == v0 + 1
        local.import_weights({"llm2vae.bias": full["llm2vae.bias"]})
        a = c.generate(["a red circle"], seed=5, steps=3)[0].image
        b = local.generate(["a red circle"], [5], local.resolve_sampling(dict(steps=3)), local.resolve_text())[0].image
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        # LoRA adapters (enabled on the server by the push)
        local.enable_lora(2, 4.0)
        with torch.no_grad():
            for p in local.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.05)
        v2 = c.update_weights(local.export_weights(lora=True), lora=True)
        info = c.model_info()
        assert v2 == v1 + 1 and info.lora_enabled and any(p.name.endswith("lora_A") for p in info.parameters)
        a = c.generate(["a red circle"], seed=5, steps=3)[0].image
        b = local.generate(["a red circle"], [5], local.resolve_sampling(dict(steps=3)), local.resolve_text())[0].image
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        # leave the server's adapters at zero (the base policy) for the full fine-tuning runs below
        c.update_weights({k: torch.zeros_like(v) for k, v in local.export_weights(lora=True).items()}, lora=True)


def train(tmp, addr, path, name, ranks=1, **kw):
    """`alphagrpo train` (RT2I step, then SRR step) on ShapesWorld prompts from a file, rewarded by the
    server; no held-out file, so no evaluation (the trainer's evaluations are tested on the tiny UMM)."""
    out = tmp / name
    prompts = tmp / f"{name}.jsonl"
    rows = ("a red circle", "a blue square to the left of a yellow triangle", "two green triangles")
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    cfg = dict(
        task="mixed",
        mixed_rt2i_steps=1,
        group_size=2,
        prompts_per_step=2,
        steps=4,
        sde_window_size=2,
        sde_window_range=[0, 4],
        max_thought_tokens=4,
        max_steps=2,
        checkpoint_every=2,
        lr=1e-3,
        policy={"name": "bagel", "path": path},
        prompt_task="open",
        prompts_file=str(prompts),
        out_dir=str(out),
        **kw,
    )
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    launch = (
        [sys.executable]
        if ranks == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    )
    cmd = launch + [
        "-m",
        "alphagrpo_serve.cli",
        "train",
        "--config",
        str(tmp / f"{name}.yaml"),
        "--server",
        addr,
        "--no-progress",
    ]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank_run(bagel_server, tmp_path_factory):
    addr, path, _ = bagel_server
    with Client(addr) as c:
        v0 = c.model_info().policy_version
    out, rows = train(tmp_path_factory.mktemp("one"), addr, path, "one")
    return out, rows, v0


def test_train_rt2i_and_srr_steps_against_a_bagel_server(bagel_server, one_rank_run):
    addr, _, _ = bagel_server
    out, rows, v0 = one_rank_run
    assert [r["task"] for r in rows] == ["rt2i", "srr"]
    for r in rows:  # the trainer's recompute equals the server's record
        assert r["image_logp_dev"] < 1e-4 and r["text_logp_dev"] < 1e-4, r
    with Client(addr) as c:
        assert c.model_info().policy_version >= v0 + 3  # the first push, then one per step
    assert (out / "policy" / "ema.safetensors").exists() and (out / "report.md").exists()


def test_fsdp_two_ranks_give_the_weights_of_one_rank(bagel_server, one_rank_run, tmp_path):
    """Full fine-tuning sharded with FSDP2 over two torchrun ranks (gloo, CPU) ends at the weights
    the one-rank run reached."""
    from safetensors.torch import load_file

    addr, path, _ = bagel_server
    one, _, _ = one_rank_run
    two, rows = train(tmp_path, addr, path, "two", ranks=2, fsdp=True)
    assert [r["task"] for r in rows] == ["rt2i", "srr"] and all(r["image_logp_dev"] < 1e-4 for r in rows)
    wa, wb = load_file(str(one / "policy" / "ema.safetensors")), load_file(str(two / "policy" / "ema.safetensors"))
    base = load_file(os.path.join(path, "ema.safetensors"))
    # Adam's first steps move every element by about lr x sign(gradient); an element whose gradient
    # is a near-cancelling sum (the G samples of a group share a context) may flip sign with the
    # summation order, so compare the total movement, not the largest element
    moved = sum(float((wa[k] - base[k]).abs().sum()) for k in wa)
    diff = sum(float((wa[k] - wb[k]).abs().sum()) for k in wa)
    assert moved > 0 and diff < 1e-3 * moved, (moved, diff)
    ckpt = torch.load(two / "checkpoint.pt", weights_only=False)  # full tensors, not one rank's shards
    assert (
        ckpt["model"]["language_model.model.layers.0.mlp.up_proj.weight"].shape
        == base["language_model.model.layers.0.mlp.up_proj.weight"].shape
    )
