"""BagelPolicy beyond the contract test: its draws equal the official loop written out with the
core functions (contexts as the official inferencer builds them, guidance, Euler steps); the G
samples of a prompt share one prefill; padding and batching do not change a sample; recompute =
record for mixed batches; LoRA adapters go through PEFT's on-disk format both ways."""

from __future__ import annotations

import json
import os

import pytest
import torch

from alphagrpo_serve.kernels import flow_sde_logprob
from alphagrpo_serve.models.bagel import (
    KVCache,
    Text,
    VaeImage,
    VitImage,
    cfg_active,
    cfg_combine,
    patchify,
    prefill,
    resize_pixels,
    timestep_schedule,
    to_pixels,
    velocity,
    vit_pixels,
)
from alphagrpo_serve.models.bagel import contexts as ctx_mod
from alphagrpo_serve.models.bagel.contexts import GEN_THINK_SYSTEM_PROMPT, REFLECT_SYSTEM_PROMPT
from alphagrpo_serve.models.bagel.policy import BagelPolicy, canvas_rule, sample_seeds
from helpers import assert_close

PROMPT, LONG = "a red circle", "two blue squares left of a yellow triangle above the green circle"


@pytest.fixture
def pol(tiny_bagel_dir):  # noqa: F811
    return BagelPolicy.load(tiny_bagel_dir)


def captured_latents(pol, fn):
    """Runs fn() and returns the final latent tokens the policy decoded."""
    seen = []
    decode = pol.vae.decode

    def spy(z):
        seen.append(z.clone())
        return decode(z)

    pol.vae.decode = spy
    try:
        out = fn()
    finally:
        pol.vae.decode = decode
    return out, seen[0]


def official_loop(pol, full_ctx, no_text_ctx, no_image_ctx, seed, sc):
    """BAGEL's generate_image written out: shifted timesteps, velocity of the three contexts, the
    guidance rule inside cfg_interval, x <- x - v dt; then unpatchify (packed tokens returned)."""
    m = pol.model
    h, w = sc.height // 16, sc.width // 16
    full = prefill(m, [full_ctx]).cache
    no_text = prefill(m, [no_text_ctx]).cache if no_text_ctx else KVCache.empty(m, 1)
    no_image = prefill(m, [no_image_ctx]).cache
    x = torch.randn(h * w, 64, generator=torch.Generator().manual_seed(sample_seeds(seed)[0]))[None]
    ts = timestep_schedule(sc.steps + 1, sc.shift)
    for i in range(sc.steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        on = cfg_active(t, sc.cfg_interval)
        v = velocity(m, full, x, t, (h, w))
        if on and sc.cfg_scale > 1:
            v_nt = velocity(m, no_text, x, t, (h, w))
            v_ni = velocity(m, no_image, x, t, (h, w)) if sc.cfg_img_scale > 1 else None
            v = cfg_combine(v, v_nt, v_ni, sc.cfg_scale, sc.cfg_img_scale, sc.cfg_renorm_type, sc.cfg_renorm_min)
        x = x - v * (t - t_next)
    return x[0]


def wrap(pol, s):
    return Text(pol.tokens.wrap(pol.tokenizer.encode(s)))


@torch.no_grad()
def test_text_to_image_is_the_official_loop(pol):
    sc = pol.resolve_sampling(dict(steps=6, width=48, height=32))
    assert (sc.cfg_scale, sc.cfg_interval, sc.cfg_renorm_type, sc.shift) == (4.0, (0.4, 1.0), "global", 3.0)
    out, z = captured_latents(pol, lambda: pol.generate([PROMPT], [7], sc, pol.resolve_text()))
    assert out[0].image.shape == (32, 48, 3) and out[0].text.ids == []
    # official: the no-text context is what came before the prompt (nothing); no-image = full
    ref = official_loop(pol, [wrap(pol, PROMPT)], [], [wrap(pol, PROMPT)], 7, sc)
    assert_close(patchify(z[0], 2), ref, atol=1e-5, rtol=1e-5, name="latents")


@torch.no_grad()
def test_a_guidance_interval_below_the_first_step_is_still_guided(pol):
    """An interval whose top is below t = 1 leaves the first steps unguided and guides later ones:
    the no-text context must be built for those later steps too."""
    sc = pol.resolve_sampling(dict(steps=6, width=32, height=32, cfg_interval=(0.0, 0.5)))
    assert sc.cfg_interval == (0.0, 0.5)
    out, z = captured_latents(pol, lambda: pol.generate([PROMPT], [3], sc, pol.resolve_text()))
    ref = official_loop(pol, [wrap(pol, PROMPT)], [], [wrap(pol, PROMPT)], 3, sc)
    assert_close(patchify(z[0], 2), ref, atol=1e-5, rtol=1e-5, name="latents")
    unguided = official_loop(pol, [wrap(pol, PROMPT)], [], [wrap(pol, PROMPT)], 3, sc.replace(cfg_scale=1.0))
    assert (ref - unguided).abs().max() > 1e-3  # the later steps were guided


@torch.no_grad()
def test_think_plans_in_the_conditional_context_only(pol):
    sc = pol.resolve_sampling(dict(steps=5))
    text = pol.resolve_text(dict(max_tokens=6, temperature=0.8))
    out, z = captured_latents(pol, lambda: pol.generate([PROMPT], [3], sc, text, think=True))
    s = out[0]
    assert s.think and 1 <= len(s.text.ids) <= 6 and len(s.text.logps) == len(s.text.ids)
    ids = list(s.text.ids) + ([] if s.text.ids[-1] == pol.tokens.eos else [pol.tokens.eos])
    plan = Text([pol.tokens.bos] + ids)
    system = wrap(pol, GEN_THINK_SYSTEM_PROMPT)
    ref = official_loop(pol, [system, wrap(pol, PROMPT), plan], [system], [system, wrap(pol, PROMPT)], 3, sc)
    assert_close(patchify(z[0], 2), ref, atol=1e-5, rtol=1e-5, name="latents")


@torch.no_grad()
def test_reflect_edits_with_the_image_in_the_context_and_image_guidance(pol):
    first = pol.generate([PROMPT], [1], pol.resolve_sampling(dict(steps=2)), pol.resolve_text())[0].image
    sc = pol.resolve_sampling(dict(steps=5), reflect=True)
    assert (sc.cfg_scale, sc.cfg_img_scale, sc.cfg_interval, sc.cfg_renorm_type) == (
        4.0,
        2.0,
        (0.0, 1.0),
        "text_channel",
    )
    text = pol.resolve_text(dict(max_tokens=5))
    out, z = captured_latents(pol, lambda: pol.reflect([PROMPT], [first], [4], sc, text))
    s = out[0]
    assert s.reflect and len(s.text.ids) >= 1 and s.image.shape == first.shape
    ids = list(s.text.ids) + ([] if s.text.ids[-1] == pol.tokens.eos else [pol.tokens.eos])
    critique = Text([pol.tokens.bos] + ids)
    latent = pol.vae.encode(resize_pixels(to_pixels(first), (sc.height, sc.width))[None])[0].float()
    vae, vit = VaeImage.from_latent(latent), VitImage(vit_pixels(pol.config, first))
    system = wrap(pol, REFLECT_SYSTEM_PROMPT)
    # official editing: image (VAE then ViT) before the text; no-text keeps the image, no-image the text
    ref = official_loop(
        pol, [system, vae, vit, wrap(pol, PROMPT), critique], [system, vae, vit], [system, wrap(pol, PROMPT)], 4, sc
    )
    assert_close(patchify(z[0], 2), ref, atol=1e-5, rtol=1e-5, name="latents")


@torch.no_grad()
def test_group_samples_share_one_prefill_and_batches_mix_prompt_lengths(pol, monkeypatch):
    rows = []
    real = ctx_mod.prefill

    def counting(model, contexts, cache=None, special=None):
        rows.append((len(contexts), cache is not None))
        return real(model, contexts, cache, special)

    monkeypatch.setattr(ctx_mod, "prefill", counting)
    sc = pol.resolve_sampling(dict(steps=4, mode="sde", sde_window=(0, 2)))
    prompts, seeds = [PROMPT] * 3 + [LONG] * 3, [10, 11, 12, 13, 14, 15]
    out, z = captured_latents(pol, lambda: pol.generate(prompts, seeds, sc, pol.resolve_text()))
    # one prefill of the two distinct contexts (no-text is empty, no-image is the full context here);
    # the denoising steps run against it without prefilling again
    assert rows == [(2, False)], rows
    rows.clear()
    _, z_alone = captured_latents(pol, lambda: pol.generate([LONG], [14], sc, pol.resolve_text()))
    assert_close(z[4], z_alone[0], atol=1e-5, rtol=1e-5, name="a sample batched with a shorter prompt vs alone")
    assert len({s.trajectory.latents[-1].sum().item() for s in out}) == 6, "samples shared noise"
    # think: the shared prefix once, the plans (one per sample) on top of it; no-text = system prompt once
    rows.clear()
    pol.generate(prompts, seeds, sc, pol.resolve_text(dict(max_tokens=3)), think=True)
    assert rows == [(2, False), (6, True), (1, False)], rows


def test_recompute_equals_the_record_for_a_mixed_batch(pol):
    """Think and plain samples, two prompts and a renorm 'none' batch recomputed together."""
    text = pol.resolve_text(dict(max_tokens=4))
    sc = pol.resolve_sampling(dict(steps=4, mode="sde", sde_window=(1, 2)))
    sc_none = sc.replace(cfg_renorm_type="none", cfg_img_scale=1.5)
    a = pol.generate([PROMPT, LONG], [1, 2], sc, text, think=True)
    b = pol.generate([LONG], [3], sc, text, think=False)
    c = pol.generate([PROMPT], [4], sc_none, text, think=True)
    samples = a + b + c
    with torch.no_grad():
        lp = pol.token_logps(samples, chunk_tokens=3)
        for i, s in enumerate(samples):
            assert torch.allclose(lp[i, : len(s.text.ids)], torch.tensor(s.text.logps), atol=1e-5)
            assert not lp[i, len(s.text.ids) :].any()
        for k in range(2):
            v = pol.guided_velocity(samples, k)
            for i, s in enumerate(samples):
                tr = s.trajectory
                rec = flow_sde_logprob(
                    tr.latents[k : k + 1],
                    v[i : i + 1],
                    tr.latents[k + 1 : k + 2],
                    float(tr.sigmas[k]),
                    float(tr.sigma_nexts[k]),
                    noise_level=sc.noise_level,
                    sigma_max=tr.sigma_max,
                )
                assert abs(rec.item() - tr.log_probs[k].item()) <= 1e-5, (k, i)
    # differentiable in the weights: one backward reaches both experts and the head
    pol.model.zero_grad(set_to_none=True)
    v = pol.guided_velocity(samples, 0)
    hidden, tokens, mask = pol.token_hidden(samples)
    (v.square().mean() + hidden.square().mean()).backward()
    grads = {n for n, p in pol.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "language_model.model.layers.1.mlp_moe_gen.up_proj.weight" in grads
    assert "language_model.model.layers.1.mlp.up_proj.weight" in grads


def test_greedy_text_and_canvas_rule(pol):
    text = pol.resolve_text(dict(temperature=0.0, max_tokens=5))
    sc = pol.resolve_sampling(dict(steps=2))
    a = pol.generate([PROMPT], [1], sc, text, think=True)[0]
    b = pol.generate([PROMPT], [2], sc, text, think=True)[0]
    assert a.text.ids == b.text.ids  # greedy: the seed does not matter for the text
    assert all(lp <= 0 for lp in a.text.logps)
    rule = canvas_rule(64)  # BAGEL-7B-MoT: a 64x64 latent table
    assert (rule.default, rule.multiple, rule.max_side) == ((1024, 1024), 16, 1024)
    assert pol.info.capabilities.canvas.max_side == 16 * pol.config.max_latent_size
    with pytest.raises(ValueError, match="height"):
        pol.resolve_sampling(dict(width=64, height=40))
    pol.check_context([PROMPT, LONG], pol.resolve_text(), think=True, reflect=True)
    with pytest.raises(ValueError, match=r"prompts\[1\] needs"):  # the tiny checkpoint has 4,096 positions
        pol.check_context([PROMPT, "red " * 4000], pol.resolve_text(), think=True)


def test_lora_on_the_generation_expert_through_peft_format(pol, tiny_bagel_dir, tmp_path):  # noqa: F811
    from peft import PeftModel

    pol.enable_lora(4, 8.0, targets=("gen",))
    names = pol.weight_specs(lora=True)
    assert names and all("moe_gen" in n for n in names)
    assert {id(p) for p in pol.trainable_parameters()} == {
        id(p) for n, p in pol.model.named_parameters() if ".lora_" in n
    }
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = pol.save_lora(str(tmp_path / "adapter"))
    cfg = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4  # scale folded
    # PEFT itself loads the folder onto a fresh BAGEL and computes what the policy computes
    fresh = BagelPolicy.load(tiny_bagel_dir)
    base = BagelPolicy.load(tiny_bagel_dir)
    peft_model = PeftModel.from_pretrained(fresh.model, folder).base_model.model
    ctx = [[Text(pol.tokens.wrap(pol.tokenizer.encode(PROMPT)))]]
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = velocity(pol.model, prefill(pol.model, ctx).cache, x, 0.7, (4, 4))
        theirs = velocity(peft_model, prefill(peft_model, ctx).cache, x, 0.7, (4, 4))
        plain = velocity(base.model, prefill(base.model, ctx).cache, x, 0.7, (4, 4))
    assert_close(theirs, ours, atol=1e-5, rtol=1e-5, name="PEFT-loaded adapters")
    assert (plain - ours).abs().max() > 1e-3
    # and back: a policy loads the PEFT folder (LoRA enabled from it), same adapters as exported
    again = BagelPolicy.load(tiny_bagel_dir)
    again.load_lora(folder)
    assert again.lora_enabled and again.version == 1
    exp, got = pol.export_weights(lora=True), again.export_weights(lora=True)
    assert set(exp) == set(got) and all(torch.allclose(exp[k], got[k], atol=1e-6) for k in exp)
    # a full save merges the adapters and keeps them beside in PEFT's format
    saved = pol.save(str(tmp_path / "merged"))
    assert os.path.exists(os.path.join(saved, "lora", "adapter_model.safetensors"))
    merged = BagelPolicy.load(saved)
    with torch.no_grad():
        mv = velocity(merged.model, prefill(merged.model, ctx).cache, x, 0.7, (4, 4))
    assert_close(mv, ours, atol=1e-5, rtol=1e-5, name="merged weights")


def test_lora_imports_are_checked_by_name_and_pairing(pol):
    sender = BagelPolicy.load(pol.path)
    sender.enable_lora(2, 4.0)
    adapters = sender.export_weights(lora=True)
    assert any("mlp.up_proj" in n for n in adapters) and any("moe_gen" in n for n in adapters)  # default: both
    only_a = {k: v for k, v in adapters.items() if k.endswith("lora_A")}
    with pytest.raises(KeyError, match="come together"):
        pol.import_weights(only_a, lora=True)
    vit = {
        "vit_model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 32),
        "vit_model.vision_model.encoder.layers.0.self_attn.q_proj.lora_B": torch.zeros(32, 2),
    }
    with pytest.raises(KeyError, match="not a LoRA adapter"):
        pol.import_weights(vit, lora=True)
    assert not pol.lora_enabled and pol.version == 0
    pol.import_weights(adapters, lora=True)
    assert set(pol.weight_specs(lora=True)) == set(adapters)


def test_training_checkpoints_layers_with_the_same_gradients(pol):
    sc = pol.resolve_sampling(dict(steps=3, mode="sde", sde_window=(0, 2)))
    samples = pol.generate([PROMPT, LONG], [1, 2], sc, pol.resolve_text(dict(max_tokens=3)), think=True)
    grads = {}
    for ckpt in (False, True):
        pol.model.checkpoint_layers = ckpt
        pol.train()
        pol.model.zero_grad(set_to_none=True)
        hidden, _, _ = pol.token_hidden(samples)
        (pol.guided_velocity(samples, 1).square().mean() + hidden.square().mean()).backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in pol.model.named_parameters() if p.grad is not None}
    pol.eval()
    assert set(grads[True]) == set(grads[False])
    for n, g in grads[False].items():
        assert_close(grads[True][n], g, atol=1e-6, rtol=1e-5, name=n)


def test_adapters_of_a_bf16_model_stay_float32_and_learn(tiny_bagel_dir):  # noqa: F811
    """bf16 base weights, float32 adapters: a small AdamW step survives (in bf16 it would round
    away), the LoRA layers still compute (PEFT casts around them), a second bf16 policy imports
    the adapters and computes the same velocity."""
    pol = BagelPolicy.load(tiny_bagel_dir, dtype=torch.bfloat16)
    pol.enable_lora(4, 8.0)
    params = pol.trainable_parameters()
    assert params and {p.dtype for p in params} == {torch.float32}
    assert {dt for _, dt in pol.weight_specs(lora=True).values()} == {torch.float32}
    with torch.no_grad():
        for p in params:
            if not p.any():  # lora_B starts at zero: give the adapters an effect
                p.add_(torch.randn_like(p) * 0.05)
    before = [p.detach().clone() for p in params]
    ctx = [[Text(pol.tokens.wrap(pol.tokenizer.encode(PROMPT)))]]
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    v = velocity(pol.model, prefill(pol.model, ctx).cache, x, 0.7, (4, 4))
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    v.float().square().mean().backward()
    opt.step()
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(params, before))
    assert 5e-6 < moved < 2e-5  # Adam's first step moves each weight by ~lr
    other = BagelPolicy.load(tiny_bagel_dir, dtype=torch.bfloat16)
    other.import_weights(pol.export_weights(lora=True), lora=True)
    with torch.no_grad():
        a = velocity(pol.model, prefill(pol.model, ctx).cache, x, 0.7, (4, 4))
        b = velocity(other.model, prefill(other.model, ctx).cache, x, 0.7, (4, 4))
    assert_close(b.float(), a.float(), atol=1e-2, rtol=1e-2, name="imported adapters (bf16 base)")
