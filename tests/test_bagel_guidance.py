"""BAGEL's sampling rules (guidance.py) against hand-computed tensors: the guidance combination
for each renorm type, the timestep schedule and the cfg interval."""

from __future__ import annotations

import math

import pytest
import torch

from alphagrpo_serve.models.bagel import cfg_active, cfg_combine, euler_step, timestep_schedule

# one sample, two tokens, two channels: small enough to work out by hand
V = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # |token0| = 5, |token1| = 1, |all| = sqrt(26)
V_NO_TEXT = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]])
V_NO_IMAGE = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])


def close(a, b, tol=1e-6):
    assert torch.allclose(a, b, atol=tol, rtol=0), f"max |diff| {float((a - b).abs().max()):.3g}\n{a}\nvs\n{b}"


def test_text_scale_at_most_one_returns_the_full_velocity_even_with_image_scale():
    # the official rule applies image guidance only inside the text-guidance branch
    for renorm in ("global", "channel", "text_channel"):
        close(cfg_combine(V, V_NO_TEXT, V_NO_IMAGE, 1.0, 2.0, renorm), V)
        close(cfg_combine(V, None, None, 0.5, 1.0, renorm), V)


def test_global_renorm_text_only():
    # v_text = v_no_text + 2 (v - v_no_text) = [[5, 6], [0, 1]]; |v_text| = sqrt(62), |v| = sqrt(26)
    v_text = torch.tensor([[[5.0, 6.0], [0.0, 1.0]]])
    out = cfg_combine(V, V_NO_TEXT, None, 2.0, 1.0, "global", 0.0)
    close(out, v_text * math.sqrt(26) / (math.sqrt(62) + 1e-8))
    # renorm_min above the ratio: the scale is clamped up to it
    close(cfg_combine(V, V_NO_TEXT, None, 2.0, 1.0, "global", 0.9), v_text * 0.9)


def test_global_renorm_text_and_image():
    # v' = v_no_image + 1.5 ([[5, 6], [0, 1]] - v_no_image) = [[7.5, 9], [-0.5, 1]]
    v_ = torch.tensor([[[7.5, 9.0], [-0.5, 1.0]]])
    norm_ = math.sqrt(7.5**2 + 81 + 0.25 + 1)
    close(cfg_combine(V, V_NO_TEXT, V_NO_IMAGE, 2.0, 1.5, "global"), v_ * math.sqrt(26) / (norm_ + 1e-8))


def test_channel_renorm_is_per_token():
    v_ = torch.tensor([[[7.5, 9.0], [-0.5, 1.0]]])
    s0 = min(5.0 / (math.sqrt(7.5**2 + 81) + 1e-8), 1.0)  # token 0: 5 / 11.72
    s1 = min(1.0 / (math.sqrt(1.25) + 1e-8), 1.0)  # token 1: 1 / 1.118
    close(cfg_combine(V, V_NO_TEXT, V_NO_IMAGE, 2.0, 1.5, "channel"), v_ * torch.tensor([[[s0], [s1]]]))


def test_text_channel_renorms_the_text_part_before_image_guidance():
    # v_text = [[5, 6], [0, 1]] renormed per token: token0 x 5 / sqrt(61), token1 x min(1/1, 1) = 1
    s0 = 5.0 / (math.sqrt(61) + 1e-8)
    v_text = torch.tensor([[[5.0 * s0, 6.0 * s0], [0.0, 1.0 / (1.0 + 1e-8)]]])
    close(cfg_combine(V, V_NO_TEXT, None, 2.0, 1.0, "text_channel"), v_text)
    # then plain image guidance on top, no second renorm
    close(cfg_combine(V, V_NO_TEXT, V_NO_IMAGE, 2.0, 1.5, "text_channel"), V_NO_IMAGE + 1.5 * (v_text - V_NO_IMAGE))


def test_global_norm_is_per_sample_in_a_batch():
    two = torch.cat([V, 10 * V])
    out = cfg_combine(two, torch.cat([V_NO_TEXT, 10 * V_NO_TEXT]), None, 2.0, 1.0, "global")
    close(out[1:], 10 * out[:1], tol=1e-5)  # each sample renormed on its own norm


def test_bad_renorm_type_and_missing_branch():
    with pytest.raises(ValueError, match="renorm_type"):
        cfg_combine(V, V_NO_TEXT, None, 2.0, 1.0, "bogus")
    with pytest.raises(ValueError, match="needs its velocity"):
        cfg_combine(V, V_NO_TEXT, None, 2.0, 1.5)


def test_gradients_flow_through_the_guidance():
    v = V.clone().requires_grad_(True)
    cfg_combine(v, V_NO_TEXT, V_NO_IMAGE, 4.0, 2.0, "text_channel").sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


def test_timestep_schedule():
    close(timestep_schedule(5, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # shift 3: t' = 3 t / (1 + 2 t)
    close(timestep_schedule(3, 3.0), torch.tensor([1.0, 1.5 / 2.0, 0.0]))
    ts = timestep_schedule(16, 3.0)
    assert ts.shape == (16,) and ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    with pytest.raises(ValueError):
        timestep_schedule(1)


def test_cfg_interval_is_open_below_closed_above():
    assert cfg_active(1.0, (0.4, 1.0)) and cfg_active(0.41, (0.4, 1.0))
    assert not cfg_active(0.4, (0.4, 1.0)) and not cfg_active(0.0, (0.0, 1.0))


def test_euler_step():
    close(euler_step(torch.ones(2), torch.tensor([2.0, -1.0]), 0.75, 0.5), torch.tensor([0.5, 1.25]))
