"""The GRPO trainer's pieces without a server: the SRR rectification rule on hand-made rewards, the
config (validation, --set overrides, documentation), the prompt stream, the loss and advantages
against a plain float64 computation, the fused text loss against the logits path, and the held-out
evaluation's sampling. Runs against a served policy are in test_trainer.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from alphagrpo_serve import kernels
from alphagrpo_serve.models.pretrain import export_safetensors
from alphagrpo_serve.models.tiny_policy import TinyPolicy
from alphagrpo_serve.models.tiny_umm import TinyUMM, TinyUMMConfig
from alphagrpo_serve.models.tokenizer import Tokenizer
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig
from alphagrpo_trainer.config import TrainConfig, load_config
from alphagrpo_trainer.data import PromptSource, shard
from alphagrpo_trainer.loss import grpo_backward
from alphagrpo_trainer.rollout import rectify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "trainer")]), OMP_NUM_THREADS="1")


# ---- pure pieces ---------------------------------------------------------------------------------
def test_rectify_rule_on_hand_made_rewards():
    stage1 = torch.tensor([[0.2, 0.5, 0.9], [0.4, 0.45, 0.6]])
    chosen = torch.tensor([0, 0])  # the lowest-reward image of each group is refined
    stage2 = torch.tensor([[0.1, 0.2, 0.95], [0.4, 0.41, 0.3]])
    # a refinement not better than its stage-1 image (0.2 resp. 0.4) gets the group's stage-1 minimum
    assert torch.equal(rectify(stage1, chosen, stage2), torch.tensor([[0.2, 0.2, 0.95], [0.4, 0.41, 0.4]]))
    # with a margin, a marginal "improvement" (0.41 vs 0.4) counts as none
    assert torch.equal(rectify(stage1, chosen, stage2, margin=0.05), torch.tensor([[0.2, 0.2, 0.95], [0.4, 0.4, 0.4]]))
    # refining another image than the minimum: its own reward is the bar, the group minimum the floor
    out = rectify(stage1, torch.tensor([1, 2]), torch.tensor([[0.5, 0.51, 0.3], [0.7, 0.6, 0.61]]))
    assert torch.equal(out, torch.tensor([[0.2, 0.51, 0.2], [0.7, 0.4, 0.61]]))
    with pytest.raises(ValueError, match="share P"):
        rectify(stage1, chosen, torch.zeros(3, 3))


def test_config_validation_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: srr\ngroup_size: 4\n")
    assert load_config(str(p)).task == "srr"
    p.write_text("task: srr\ngroup_sise: 4\n")
    with pytest.raises(ValueError, match="unknown field.*group_sise"):
        load_config(str(p))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        load_config(None, {"group_size": 1})
    with pytest.raises(ValueError, match="sde_window"):
        load_config(None, {"steps": 4, "sde_window_range": [0, 6]})
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):  # every shipped example loads
        load_config(os.path.join(REPO, "configs", name))


def test_set_overrides_parse_yaml_values_and_mapping_keys(tmp_path):
    """--set FIELD=VALUE (the trainer CLI and the learning probes): YAML-typed values, a dotted key
    sets one key of a mapping field over the config file's mapping, and a malformed item is named."""
    from alphagrpo_trainer.config import set_overrides

    p = tmp_path / "c.yaml"
    p.write_text("policy:\n  name: tiny\n  path: w.safetensors\n")
    got = set_overrides(
        ["lr=0.0001", "sde_window_range=[0, 4]", 'category_weights={"counting": 1.0}', "policy.name=bagel"], str(p)
    )
    assert got == {
        "lr": 1e-4,
        "sde_window_range": [0, 4],
        "category_weights": {"counting": 1.0},
        "policy": {"name": "bagel", "path": "w.safetensors"},
    }
    assert load_config(str(p), got).policy == {"name": "bagel", "path": "w.safetensors"}
    # exponent floats without a dot are floats (PyYAML alone reads them as strings), on --set and in files
    assert set_overrides(["lr=1e-4", "kl_image=2E-1", "max_steps=30", "seed=1_0"]) == {
        "lr": 1e-4,
        "kl_image": 0.2,
        "max_steps": 30,
        "seed": 10,
    }
    assert set_overrides(["out_dir=1e3x", "kl_text=+1.5e+0"]) == {"out_dir": "1e3x", "kl_text": 1.5}
    p.write_text("lr: 7e-5\nkl_image: 2.5E-1\n")
    cfg = load_config(str(p))
    assert (cfg.lr, cfg.kl_image) == (7e-5, 0.25)
    with pytest.raises(ValueError, match="--set expects FIELD=VALUE, got 'lr'"):
        set_overrides(["lr"])


def test_the_local_server_is_started_for_the_run(tmp_path):
    """--server local: the server gets the run's prompt task (its embedded reward) and a thought
    budget at least the run's; a task without an embedded reward is refused before anything starts."""
    from alphagrpo_trainer.cli import local_server_args

    cfg = load_config(None, {"max_thought_tokens": 512})
    assert local_server_args(cfg) == ["--task", "shapes", "--max-thought-tokens", "512"]
    assert local_server_args(load_config(None))[-1] == "128"  # the server's own default is the floor
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat on a sofa"}\n')
    open_cfg = {"prompt_task": "open", "prompts_file": str(f)}
    with pytest.raises(ValueError, match="prompt_task 'open' has none"):
        local_server_args(load_config(None, open_cfg))
    sets = [a for k, v in open_cfg.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "alphagrpo_serve.cli", "train", "--out", str(tmp_path / "run"), *sets]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: --server local runs the embedded reward" in done.stderr, done.stderr[-500:]


def test_prompts_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a red circle"}\n\n{"prompt": "two blue squares"}\n')
    src = PromptSource(0, 3, prompts_file=str(f))
    assert set(src.prompts_for(0)) <= {"a red circle", "two blue squares"}
    f.write_text('{"prompt": "a red circle"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not JSON"):
        PromptSource(0, 3, prompts_file=str(f))
    f.write_text('{"text": "a red circle"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: each row must be an object with a non-empty string 'prompt'"):
        PromptSource(0, 3, prompts_file=str(f))


def test_prompts_depend_only_on_step_and_skip_heldout():
    from alphagrpo_serve.shapes.grammar import is_heldout

    a, b = PromptSource(3, 8), PromptSource(3, 8)
    assert a.prompts_for(41) == b.prompts_for(41)  # b never saw steps 0..40
    assert a.prompts_for(0) != a.prompts_for(1)
    seen = [p for s in range(60) for p in a.prompts_for(s)]
    assert not any(is_heldout(p) for p in seen)
    assert shard(list(range(8)), 1, 2) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="split evenly"):
        shard(list(range(7)), 0, 2)


# ---- the loss against a plain float64 computation ---------------------------------------------------
def small_policy(seed=0):
    torch.manual_seed(seed)
    return TinyPolicy(TinyUMM(TinyUMMConfig(vocab_size=len(Tokenizer()), width=32, layers=1, heads=1)))


def _plain_gaussian_logp(x_next, mean, scale):
    return (-((x_next - mean) ** 2) / (2 * scale**2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)).mean(
        dim=(1, 2, 3)
    )


def test_loss_and_advantages_match_plain_pytorch():
    torch.manual_seed(0)
    pol = small_policy()
    cfg = TrainConfig(
        group_size=3,
        prompts_per_step=2,
        steps=4,
        sde_window_size=2,
        sde_window_range=[1, 4],
        cfg_scale=2.5,
        noise_level=0.7,
        clip_image=2e-3,
        clip_text=[0.2, 0.28],
        text_weight=0.7,
    )
    sc = SamplingConfig(steps=4, mode="sde", sde_window=(1, 2), noise_level=cfg.noise_level, cfg_scale=cfg.cfg_scale)
    prompts = ["a red circle"] * 3 + ["two blue squares"] * 3
    with torch.no_grad():
        samples = pol.generate(prompts, list(range(6)), sc, TextConfig(max_tokens=5), think=True)
    rewards = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.3, 0.8]])
    adv = kernels.grpo_advantages(rewards, std_scope="batch").reshape(-1)
    r = rewards.double()
    expect_adv = (r - r.mean(1, keepdim=True)) / (
        (r - r.mean()).pow(2).mean().sqrt() + 1e-4
    )  # the batch's std (ddof 0)
    assert torch.allclose(adv.double(), expect_adv.reshape(-1), atol=1e-6)
    # move the weights so that ratios differ from 1 and some clip
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    params = pol.trainable_parameters()
    for p in params:
        p.grad = None
    metrics = grpo_backward(pol, samples, adv, cfg)
    ours = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    # plain PyTorch: the same policy forward, then every formula written out here in float64
    for p in params:
        p.grad = None
    logits, tokens, mask = pol.token_logits(samples)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]
    old = torch.zeros_like(logp)
    for i, s in enumerate(samples):
        old[i, : len(s.text.logps)] = torch.tensor(s.text.logps, dtype=torch.float64)
    ratio = torch.exp(logp - old)
    A = adv.double()[:, None]
    per_tok = -torch.minimum(ratio * A, ratio.clamp(0.8, 1.28) * A)
    text_loss = (per_tok * mask).sum() / mask.sum()
    img_loss = 0.0
    for k in range(2):
        x = torch.stack([s.trajectory.latents[k] for s in samples]).double()
        xn = torch.stack([s.trajectory.latents[k + 1] for s in samples]).double()
        sig, sign = float(samples[0].trajectory.sigmas[k]), float(samples[0].trajectory.sigma_nexts[k])
        smax = samples[0].trajectory.sigma_max
        # the two branches, combined here by hand (guidance is on at every step of this config)
        unguided = [dataclasses.replace(s, sampling=s.sampling.replace(cfg_scale=1.0)) for s in samples]
        vc = pol.guided_velocity(unguided, k)
        vu = pol._branch_velocity([pol.uncond_prefix()] * len(samples), x.float(), torch.full((len(samples),), sig))
        v = vu.double() + cfg.cfg_scale * (vc.double() - vu.double())
        dt = sign - sig
        s_ = smax if sig == 1.0 else sig
        std = cfg.noise_level * math.sqrt(sig / (1 - s_))
        mean = x * (1 + std**2 / (2 * sig) * dt) + v * (1 + std**2 * (1 - sig) / (2 * sig)) * dt
        lp = _plain_gaussian_logp(xn, mean, torch.tensor(std * math.sqrt(-dt), dtype=torch.float64))
        old_k = torch.tensor([float(s.trajectory.log_probs[k]) for s in samples], dtype=torch.float64)
        rk = torch.exp(lp - old_k)
        a = adv.double()
        img_loss = img_loss + torch.maximum(-a * rk, -a * rk.clamp(1 - cfg.clip_image, 1 + cfg.clip_image)).mean() / 2
    total = cfg.text_weight * text_loss + img_loss
    total.backward()
    assert abs(metrics["loss"] - float(total.detach())) < 1e-5, (metrics["loss"], float(total.detach()))
    assert 0 < metrics["image_clip_frac"] < 1, "the test should exercise clipping"
    for p, g in zip(params, ours):
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(g, ref.float(), atol=1e-5, rtol=1e-3), float((g - ref).abs().max())


# ---- config documentation, the fused text loss, the evaluation's sampling -------------------------------
def test_every_config_field_is_documented_and_print_config_round_trips(tmp_path):
    import dataclasses

    from alphagrpo_trainer.config import config_yaml, field_docs

    docs = field_docs()
    assert [f.name for f in dataclasses.fields(TrainConfig) if f.name not in docs] == []
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"))
    p = tmp_path / "printed.yaml"
    p.write_text(config_yaml(cfg, docs=True))
    assert load_config(str(p)) == cfg


@pytest.mark.parametrize("lora", [False, True])
def test_fused_linear_text_loss_equals_the_logits_path(lora):
    """The trainer's text loss (hidden states + LM head through kernels.grpo_linear_token_loss) gives
    the loss and parameter gradients of the logits path (the policy's logits through grpo_token_loss)."""
    from alphagrpo_trainer.loss import text_loss

    pol = small_policy(4)
    if lora:
        pol.enable_lora(2, 4.0)
    cfg = TrainConfig(group_size=2, prompts_per_step=2, text_aggregation="seq-mean-token-mean", kl_text=0.0)
    sc = SamplingConfig(steps=2, mode="sde", sde_window=(0, 1), cfg_scale=2.0)
    with torch.no_grad():
        samples = pol.generate(
            ["a red circle"] * 2 + ["two blue squares"] * 2,
            [0, 1, 2, 3],
            sc,
            TextConfig(temperature=0.8, max_tokens=7),
            think=True,
        )
        for p in pol.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # ratios away from 1 so that clipping matters
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8])
    params = pol.trainable_parameters()
    out, old, mask = text_loss(pol, samples, adv, cfg)
    out.loss.backward()
    grads = lambda: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]  # noqa: E731
    fused = grads()
    for p in params:
        p.grad = None
    logits, tokens, mask2 = pol.token_logits(samples)
    ref = kernels.grpo_token_loss(
        logits,
        tokens,
        adv,
        mask2,
        old_logp=old,
        temperature=0.8,
        eps_low=0.2,
        eps_high=0.28,
        aggregation="seq-mean-token-mean",
    )
    ref.loss.backward()
    assert abs(float(out.loss.detach()) - float(ref.loss.detach())) < 1e-5
    assert torch.allclose(out.logp, ref.logp, atol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in fused)
    for g, r in zip(fused, grads()):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4), float((g - r).abs().max())


def test_eval_heldout_script_scores_weights_as_the_trainer_does(tmp_path):
    """benchmarks/eval_heldout.py (the study's re-scoring of saved weights) uses the trainer's evaluation
    sampling: ODE, TrainConfig's 20 steps, the policy's guidance scale 3.0; checked against a
    hand-built SamplingConfig, and cfg_scale from the config wins over the policy's."""
    from alphagrpo_serve.shapes.task import ShapesTask
    from alphagrpo_trainer.evaluation import eval_sampling

    weights = str(tmp_path / "w.safetensors")
    torch.manual_seed(3)
    export_safetensors(TinyUMM(TinyUMMConfig(vocab_size=len(Tokenizer()), width=32, layers=1, heads=1)), weights)
    policy = TinyPolicy.load(weights)
    sc = eval_sampling(policy, TrainConfig())
    assert (sc.steps, sc.mode, sc.cfg_scale) == (20, "ode", 3.0)
    sc4 = eval_sampling(policy, TrainConfig(cfg_scale=1.5, eval_steps=4))
    assert (sc4.steps, sc4.mode, sc4.cfg_scale) == (4, "ode", 1.5)
    out = tmp_path / "e.json"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "eval_heldout.py")
    res = subprocess.run(
        [sys.executable, script, weights, "--limit", "7", "--no-srr", "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())["result"]
    assert sorted(got) == ["plain", "think"]
    ref = ShapesTask().evaluate(
        policy, SamplingConfig(steps=20, mode="ode", cfg_scale=3.0), [("think", True, False)], 7
    )
    for key in ("overall", "mean_reward", "quality"):  # a random model scores 0: the reward and Q tell the steps apart
        assert got["think"][key] == pytest.approx(ref["think"][key], rel=1e-7, abs=1e-9), key
    assert sum(got["think"]["counts"].values()) == 7
    bad = subprocess.run(
        [sys.executable, script, str(tmp_path / "none.safetensors"), "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "no such weights file" in bad.stderr
