"""The tiny UMM, its sampler and its policy interface, on a small random model (and the shipped weights)."""

import os

import numpy as np
import pytest
import torch

from alphagrpo_serve.kernels import flow_sde_logprob
from alphagrpo_serve.models.layout import collate
from alphagrpo_serve.models.tiny_policy import DEFAULT_WEIGHTS, TinyPolicy
from alphagrpo_serve.models.tiny_umm import TinyUMM, TinyUMMConfig, attention_mask, patchify, unpatchify
from alphagrpo_serve.models.tokenizer import Tokenizer
from alphagrpo_serve.sampling.sampler import SamplingConfig, TextConfig, sample_images, shifted_sigmas
from alphagrpo_serve.shapes.grammar import CATEGORIES, all_prompts
from alphagrpo_serve.shapes.implicit import all_implicit

TOK = Tokenizer()


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return TinyPolicy(TinyUMM(TinyUMMConfig(vocab_size=len(TOK), width=48, layers=2, heads=2)))


def test_tokenizer_round_trips_every_prompt():
    prompts = [p for c in CATEGORIES for p in all_prompts(c)] + all_implicit()
    for p in prompts:
        ids = TOK.encode(p)
        assert TOK.unk_id not in ids, p
        assert TOK.decode(ids) == p
    assert (
        TOK.decode([TOK.think_id] + TOK.encode("a red circle") + [TOK.think_end_id], skip_special=False)
        == "<think> a red circle </think>"
    )


def test_patchify_round_trip():
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 32), x)
    assert patchify(x, 4).shape == (2, 64, 48)


def test_attention_rule_by_hand():
    # two text tokens, a 64-patch clean image, one text token: text is causal, the image is one block
    b = collate(
        [[("text", [1, 3], False), ("image", np.zeros((32, 32, 3), np.uint8)), ("text", [8], False)]], TOK.pad_id, 4, 32
    )
    m = attention_mask(b.blocks, b.valid)[0, 0]
    assert m[0, 0] and not m[0, 1]  # text: causal
    assert m[2, 65] and m[65, 2]  # patches of one image see each other both ways
    assert m[2, 0] and m[2, 1]  # patches see the text before the image
    assert not m[2, 66] and m[66, 65] and m[66, 0]  # the text after the image sees it; the image does not see it


def test_schedule_by_hand():
    assert torch.allclose(shifted_sigmas(2, 2.0), torch.tensor([1.0, 2 / 3, 0.0]))
    assert torch.allclose(shifted_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="steps must be"):
        SamplingConfig(steps=0)
    with pytest.raises(ValueError, match="sde_window"):
        SamplingConfig(steps=4, mode="sde", sde_window=(3, 2))


def _fake_velocity(scale):
    def velocity(x, sigma):
        vc = -x * 0.3 + 0.1
        return (vc, x * 0.2, scale) if scale != 1.0 else (vc, None, 1.0)

    return velocity


def test_ode_equals_sde_at_noise_zero_and_cfg_one_is_conditional():
    noise0 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ode, _ = sample_images(_fake_velocity(2.0), noise0, SamplingConfig(steps=6, mode="ode", cfg_scale=2.0))
    sde0, trajs = sample_images(
        _fake_velocity(2.0),
        noise0,
        SamplingConfig(steps=6, mode="sde", noise_level=0.0, sde_window=(1, 3), cfg_scale=2.0),
    )
    assert torch.equal(ode, sde0)
    assert trajs[0].latents.shape == (4, 3, 32, 32) and torch.equal(trajs[0].log_probs, torch.zeros(3))
    one, _ = sample_images(_fake_velocity(1.0), noise0, SamplingConfig(steps=6, cfg_scale=1.0))
    # by hand: 6 Euler steps of x' = x + (sigma_next - sigma) (-0.3 x + 0.1) on the shifted schedule
    sig, x = shifted_sigmas(6, 2.0).double(), noise0.double()
    for k in range(6):
        x = x + (sig[k + 1] - sig[k]) * (-0.3 * x + 0.1)
    assert torch.allclose(one.double(), x, atol=1e-5)
    # with guidance the uncond branch matters
    assert not torch.equal(ode, one)


def test_sampling_config_rejects_non_finite_and_out_of_range_values():
    for kw, field in (
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(cfg_scale=float("inf")), "cfg_scale"),
        (dict(noise_level=-1.0), "noise_level"),
        (dict(cfg_interval=(0.5, 0.2)), "cfg_interval"),
        (dict(cfg_renorm_type="spherical"), "cfg_renorm_type"),
        (dict(shift=0.0), "shift"),
        (dict(width=-16), "width"),
    ):
        with pytest.raises(ValueError, match=field):
            SamplingConfig(**kw)
    for kw in (dict(temperature=1e-38), dict(temperature=float("nan")), dict(top_p=0.0), dict(max_tokens=0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            TextConfig(**kw)
    assert TextConfig(temperature=0.0).logp_temperature == 1.0


def test_same_seed_same_image_bit_for_bit(policy):
    sc = SamplingConfig(steps=4, mode="sde", sde_window=(0, 2), cfg_scale=2.0)
    tc = TextConfig(max_tokens=4)
    a = policy.generate(["a red circle", "three squares"], [5, 6], sc, tc, think=True)
    b = policy.generate(["a red circle", "three squares"], [5, 6], sc, tc, think=True)
    c = policy.generate(["a red circle", "three squares"], [7, 6], sc, tc, think=True)
    assert np.array_equal(a[0].image, b[0].image) and a[0].text.ids == b[0].text.ids
    assert not np.array_equal(a[0].image, c[0].image)
    assert a[0].image.shape == (32, 32, 3) and a[0].image.dtype == np.uint8


def test_recorded_logprobs_equal_training_recompute(policy):
    # guidance only where sigma <= 0.8: the recompute must apply the interval as sampling did
    sc = SamplingConfig(steps=5, mode="sde", sde_window=(0, 4), cfg_scale=2.5, noise_level=0.8, cfg_interval=(0.0, 0.8))
    out = policy.generate(
        ["a blue square", "as many circles as the wheels of a car"],
        [1, 2],
        sc,
        TextConfig(temperature=0.9, max_tokens=6),
        think=True,
    )
    with torch.no_grad():
        lp = policy.token_logps(out, temperature=0.9)
    for i, s in enumerate(out):
        assert len(s.text.ids) == len(s.text.logps) > 0
        assert torch.allclose(lp[i, : len(s.text.ids)], torch.tensor(s.text.logps), atol=1e-5), (lp[i], s.text.logps)
    sig = shifted_sigmas(5, 2.0)
    assert sig[1] > 0.8 >= sig[2]  # steps 0 and 1 unguided, 2 and 3 guided
    for k in range(4):
        with torch.no_grad():
            v = policy.guided_velocity(out, k)
        for i, s in enumerate(out):
            tr = s.trajectory
            rec = flow_sde_logprob(
                tr.latents[k : k + 1],
                v[i : i + 1],
                tr.latents[k + 1 : k + 2],
                float(tr.sigmas[k]),
                float(tr.sigma_nexts[k]),
                noise_level=0.8,
                sigma_max=tr.sigma_max,
            )
            assert abs(rec.item() - tr.log_probs[k].item()) <= 1e-5, (k, rec.item(), tr.log_probs[k].item())


def test_reflect_runs_and_checks_images(policy):
    img = np.zeros((32, 32, 3), np.uint8)
    out = policy.reflect(["a red circle"], [img], [0], SamplingConfig(steps=3), TextConfig(max_tokens=5))
    assert out[0].image.shape == (32, 32, 3) and len(out[0].text.ids) <= 5
    with pytest.raises(ValueError, match="32, 32, 3"):
        policy.reflect(["a red circle"], [np.zeros((64, 64, 3), np.uint8)], [0], SamplingConfig(steps=3), TextConfig())


def test_import_weights_is_validated_and_atomic(policy):
    before = policy.export_weights()
    name = "blocks.0.qkv.weight"
    bad = {
        name: torch.zeros_like(before[name]) + 1.0,
        "blocks.1.proj.weight": torch.full_like(before["blocks.1.proj.weight"], float("nan")),
    }
    with pytest.raises(ValueError, match="non-finite"):
        policy.import_weights(bad)
    assert torch.equal(policy.export_weights()[name], before[name]), "a failed update changed weights"
    with pytest.raises(KeyError, match="not a full weight"):
        policy.import_weights({"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        policy.import_weights({name: torch.zeros(3)})
    with pytest.raises(TypeError, match="dtype"):
        policy.import_weights({name: before[name].double()})
    v = policy.version
    policy.import_weights({name: before[name] * 1.0})
    assert policy.version == v + 1


def test_lora_export_import():
    torch.manual_seed(1)
    pol = TinyPolicy(TinyUMM(TinyUMMConfig(vocab_size=len(TOK), width=32, layers=1, heads=1)))
    pol.enable_lora(rank=2, alpha=4.0)
    lora = pol.export_weights(lora=True)
    assert lora and all("lora_" in k for k in lora)
    trainable = [n for n, p in pol.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    new = {k: torch.randn_like(v) for k, v in lora.items()}
    pol.import_weights(new, lora=True)
    assert all(torch.equal(pol.export_weights(lora=True)[k], new[k]) for k in new)


def test_rejected_lora_import_leaves_the_structure_as_it_was():
    torch.manual_seed(3)
    pol = TinyPolicy(TinyUMM(TinyUMMConfig(vocab_size=len(TOK), width=32, layers=1, heads=1)))
    n_before, names_before = pol.info.parameters, set(pol.state_dict())
    good = {"blocks.0.qkv.lora_A": torch.randn(4, 32), "blocks.0.qkv.lora_B": torch.randn(96, 4)}
    for bad in (
        {**good, "blocks.0.qkv.lora_B": torch.randn(96, 3)},  # B's rank differs from A's
        {**good, "blocks.0.qkv.lora_A": torch.full((4, 32), float("nan"))},
        {**good, "blocks.7.qkv.lora_A": torch.randn(4, 32)},
    ):
        with pytest.raises((KeyError, ValueError)):
            pol.import_weights(bad, lora=True)
        assert not pol.lora_enabled and pol.info.parameters == n_before and set(pol.state_dict()) == names_before
    assert pol.version == 0
    pol.import_weights(good, lora=True)  # the names it accepts are the ones weight_specs lists afterwards
    assert pol.lora_enabled and set(good) <= set(pol.weight_specs(lora=True)) and pol.version == 1
    assert not any(".base." in n for n in pol.weight_specs())


def test_pretraining_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    from alphagrpo_serve.models.pretrain import PretrainConfig, pretrain

    kw = dict(batch=4, width=32, layers=1, heads=1, ckpt_every=1, warmup=2)
    pretrain(PretrainConfig(steps=3, stop_at=2, **kw), str(tmp_path / "a"), progress=False)
    a = load_file(pretrain(PretrainConfig(steps=3, **kw), str(tmp_path / "a"), resume=True, progress=False))
    b = load_file(pretrain(PretrainConfig(steps=3, **kw), str(tmp_path / "b"), progress=False))
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.skipif(not os.path.exists(DEFAULT_WEIGHTS), reason="shipped weights not present")
def test_shipped_weights_draw_a_red_circle():
    from alphagrpo_serve.shapes.detect import detect

    pol = TinyPolicy.load()
    out = pol.generate(["a red circle"] * 4, [0, 1, 2, 3], pol.info.generate_defaults, TextConfig())
    hits = [any(d.shape == "circle" and d.color == "red" for d in detect(s.image).objects) for s in out]
    assert sum(hits) >= 3, hits


def test_group_samples_share_the_context_work(policy, monkeypatch):
    """G samples of one prompt encode the prompt once; the result equals encoding every copy."""
    calls = []
    real = policy.model.run

    def counting_run(x, mask, past=None):
        calls.append(x.shape[0])
        return real(x, mask, past)

    sc = SamplingConfig(steps=2, cfg_scale=1.0)
    ref = policy.generate(["a red circle", "a square"], [3, 4], sc, TextConfig())
    monkeypatch.setattr(policy.model, "run", counting_run)
    out = policy.generate(["a red circle"] * 4 + ["a square"], [3, 10, 11, 12, 4], sc, TextConfig())
    assert calls[0] == 2, calls  # two distinct contexts encoded for five samples
    assert np.array_equal(out[0].image, ref[0].image) and np.array_equal(out[4].image, ref[1].image)


def test_conv_decoder_recompute_matches_sampling():
    torch.manual_seed(2)
    pol = TinyPolicy(TinyUMM(TinyUMMConfig(vocab_size=len(TOK), width=32, layers=1, heads=1, decoder="conv")))
    for p in pol.model.refine.parameters():  # give the zero-initialised output layer some weight
        torch.nn.init.normal_(p, std=0.05)
    sc = SamplingConfig(steps=3, mode="sde", sde_window=(0, 2), cfg_scale=2.0)
    out = pol.generate(["a red circle"], [1], sc, TextConfig())
    with torch.no_grad():
        v = pol.guided_velocity(out, 1)
    tr = out[0].trajectory
    rec = flow_sde_logprob(
        tr.latents[1:2],
        v,
        tr.latents[2:3],
        float(tr.sigmas[1]),
        float(tr.sigma_nexts[1]),
        noise_level=0.7,
        sigma_max=tr.sigma_max,
    )
    assert abs(rec.item() - tr.log_probs[1].item()) <= 1e-5
    with pytest.raises(ValueError, match="decoder must be"):
        TinyUMM(TinyUMMConfig(vocab_size=len(TOK), decoder="deconv"))


def test_reflect_evaluation_keeps_images_the_critique_finds_correct():
    from types import SimpleNamespace

    from alphagrpo_serve.shapes.evaluate import ground_truth_images
    from alphagrpo_serve.shapes.policy_eval import evaluate_policy

    rows = [
        {"prompt": "a red circle", "category": "single_object", "seed": 0},
        {"prompt": "a blue square", "category": "single_object", "seed": 1},
    ]
    good = ground_truth_images([r["prompt"] for r in rows])
    blank = np.zeros_like(good[0])

    class Scripted(TinyPolicy):  # first draws are right; the redraws are blank, the first critique says "correct"
        def generate(self, prompts, seeds, sampling, text, think=False):
            return [SimpleNamespace(image=good[i], thought="") for i in range(len(prompts))]

        def reflect(self, prompts, images, seeds, sampling, text):
            return [
                SimpleNamespace(image=blank, thought=t)
                for t in (
                    "i see a red circle . it is correct . draw a red circle",
                    "i see a blue square . draw a red circle",
                )
            ]

    res = evaluate_policy(
        Scripted(TinyUMM(TinyUMMConfig(vocab_size=len(TOK), width=16, layers=1, heads=1))), rows=rows, reflect=True
    )
    assert res.report.correct == [True, False]  # kept the judged-correct image, took the (blank) redraw otherwise
