"""The policy contract (models/base.py), checked on every registered policy.

Each registered policy has one entry in CASES: how to write a small random checkpoint of it in its
own format, and prompts it accepts. A new policy that is not listed here fails
test_every_registered_policy_has_a_contract_case."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List

import numpy as np
import pytest
import torch

from alphagrpo_serve.kernels import flow_sde_logprob
from alphagrpo_serve.models import registry
from alphagrpo_serve.models.base import CapabilityError, Policy
from alphagrpo_serve.sampling.sampler import SamplingConfig


@dataclass
class Case:
    make: Callable  # make(tmp_dir) -> path of a small random checkpoint the policy's load() reads
    prompts: List[str]  # two prompts in the policy's domain
    steps: int = 4  # sampling steps for the checks (small: speed)


def _tiny(tmp):
    from alphagrpo_serve.models.pretrain import export_safetensors
    from alphagrpo_serve.models.tiny_umm import TinyUMM, TinyUMMConfig
    from alphagrpo_serve.models.tokenizer import Tokenizer

    torch.manual_seed(0)
    path = str(tmp / "tiny.safetensors")
    export_safetensors(TinyUMM(TinyUMMConfig(vocab_size=len(Tokenizer()), width=32, layers=1, heads=1)), path)
    return path


def _bagel(tmp):
    from bagel_fixtures import make_tiny_bagel

    return make_tiny_bagel.write(str(tmp / "bagel"), seed=0)


CASES = {
    "tiny": Case(_tiny, ["a red circle", "a shape with no corners, coloured like the sky"]),
    "bagel": Case(_bagel, ["a red circle", "two blue squares left of a yellow triangle, drawn as a picture"]),
}


def test_every_registered_policy_has_a_contract_case():
    assert set(registry.available()) <= set(CASES), f"add a contract case for {set(registry.available()) - set(CASES)}"


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    c = CASES[name]
    path = c.make(tmp_path_factory.mktemp(name))
    return name, c, path


def _load(case, **kw) -> Policy:
    name, _, path = case
    return registry.policy_class(name).load(path, **kw)


def _sde(pol: Policy, case, reflect=False) -> SamplingConfig:
    steps = case[1].steps
    return pol.resolve_sampling(dict(steps=steps, mode="sde", sde_window=(1, steps - 2)), reflect=reflect)


def test_info_and_defaults_are_consistent(case):
    name, _, _ = case
    pol = _load(case)
    info = pol.info
    assert info.name == name and isinstance(pol, registry.policy_class(name))
    assert info.parameters == sum(p.numel() for p in pol.state_dict().values() if p.is_floating_point())
    assert info.dtype == torch.float32 and info.device.type == "cpu"
    caps = info.capabilities
    for d in (info.generate_defaults, info.reflect_defaults):
        assert isinstance(d, SamplingConfig)
        assert caps.canvas.resolve(d.width, d.height) == (
            d.width or caps.canvas.default[0],
            d.height or caps.canvas.default[1],
        )
        assert d.cfg_img_scale == 1.0 or "image" in caps.guidance_branches
    with pytest.raises(ValueError, match="width"):
        caps.canvas.resolve(caps.canvas.max_side + caps.canvas.multiple, 0)
    assert set(pol.weight_specs()) == set(pol.export_weights())


def test_generate_shapes_dtypes_and_recompute_equals_the_record(case):
    _, c, _ = case
    pol = _load(case)
    sc = _sde(pol, case)
    text = pol.resolve_text(dict(temperature=0.9, max_tokens=6))
    think = pol.info.capabilities.think
    out = pol.generate([c.prompts[0]] * 2 + [c.prompts[1]], [0, 1, 2], sc, text, think=think)
    assert len(out) == 3
    for s in out:
        assert s.image.dtype == np.uint8 and s.image.shape == (sc.height, sc.width, 3)
        tr = s.trajectory
        K = len(sc.window())
        assert tr.latents.dtype == torch.float32 and tr.latents.device.type == "cpu" and tr.latents.shape[0] == K + 1
        assert tr.log_probs.shape == (K,) and bool(torch.isfinite(tr.log_probs).all())
        assert s.sampling == sc and s.text_config == text and s.policy_version == pol.version
        assert len(s.text.ids) == len(s.text.logps) and (len(s.text.ids) > 0) == think
    assert not torch.equal(out[0].trajectory.latents[-1], out[1].trajectory.latents[-1]), "G samples shared noise"
    with torch.no_grad():
        if think:
            lp = pol.token_logps(out, temperature=text.logp_temperature)
            for i, s in enumerate(out):
                assert torch.allclose(lp[i, : len(s.text.ids)], torch.tensor(s.text.logps), atol=1e-5)
        for k in range(len(sc.window())):
            v = pol.guided_velocity(out, k)
            for i, s in enumerate(out):
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
                assert abs(rec.item() - tr.log_probs[k].item()) <= 1e-5, (k, i, rec.item(), tr.log_probs[k].item())


def test_reflect_follows_its_capability(case):
    _, c, _ = case
    pol = _load(case)
    first = pol.generate([c.prompts[0]], [0], pol.resolve_sampling(dict(steps=2)), pol.resolve_text())
    sc = _sde(pol, case, reflect=True)
    if not pol.info.capabilities.reflect:
        with pytest.raises(CapabilityError, match="reflect"):
            pol.reflect([c.prompts[0]], [first[0].image], [0], sc, pol.resolve_text())
        return
    text = pol.resolve_text(dict(max_tokens=5))
    out = pol.reflect([c.prompts[0]] * 2, [first[0].image] * 2, [3, 4], sc, text)
    assert [s.image.shape for s in out] == [first[0].image.shape] * 2 and all(s.reflect for s in out)
    refl = [first[0].image] * 2
    with torch.no_grad():
        lp = pol.token_logps(out, refl, temperature=text.logp_temperature)
        v = pol.guided_velocity(out, 0, refl)
    for i, s in enumerate(out):
        assert torch.allclose(lp[i, : len(s.text.ids)], torch.tensor(s.text.logps), atol=1e-5)
        tr = s.trajectory
        rec = flow_sde_logprob(
            tr.latents[:1],
            v[i : i + 1],
            tr.latents[1:2],
            float(tr.sigmas[0]),
            float(tr.sigma_nexts[0]),
            noise_level=sc.noise_level,
            sigma_max=tr.sigma_max,
        )
        assert abs(rec.item() - tr.log_probs[0].item()) <= 1e-5


def test_lora_round_trip_and_rejected_imports_change_nothing(case):
    _, c, _ = case
    pol = _load(case)
    if not pol.info.capabilities.lora:
        with pytest.raises(CapabilityError):
            pol.enable_lora(4, 8.0)
        return
    sender = _load(case)
    sender.enable_lora(4, 8.0)
    with torch.no_grad():
        for p in sender.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    adapters = sender.export_weights(lora=True)
    assert adapters and set(adapters) == set(sender.weight_specs(lora=True))
    # a rejected LoRA import (one adapter non-finite) leaves the receiver exactly as it was
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    bad = dict(adapters)
    k0 = next(iter(bad))
    bad[k0] = torch.full_like(bad[k0], float("nan"))
    with pytest.raises(ValueError):
        pol.import_weights(bad, lora=True)
    assert not pol.lora_enabled and set(pol.state_dict()) == set(before) and pol.version == 0
    assert all(torch.equal(pol.state_dict()[k], v) for k, v in before.items())
    # a rejected full import (one unknown name among good tensors) likewise
    full = pol.export_weights()
    with pytest.raises((KeyError, ValueError)):
        pol.import_weights({**{k: v + 1 for k, v in full.items()}, "no.such.weight": torch.zeros(1)})
    assert all(torch.equal(pol.state_dict()[k], v) for k, v in before.items())
    # the accepted import: same adapters, same images as the sender
    pol.import_weights(adapters, lora=True)
    assert pol.lora_enabled and pol.version == 1
    got = pol.export_weights(lora=True)
    assert all(torch.allclose(got[k], adapters[k]) for k in adapters)
    sc, text = pol.resolve_sampling(dict(steps=3)), pol.resolve_text(dict(temperature=0.0, max_tokens=4))
    a = sender.generate([c.prompts[0]], [7], sc, text)[0].image
    b = pol.generate([c.prompts[0]], [7], sc, text)[0].image
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # folded vs unfolded scale: rounding only


def test_save_and_load_round_trip(case, tmp_path):
    _, c, _ = case
    pol = _load(case)
    with torch.no_grad():
        for p in pol.trainable_parameters()[:3]:
            p.mul_(1.01)
    written = pol.save(str(tmp_path / "saved"))
    again = registry.policy_class(case[0]).load(written)
    sc, text = pol.resolve_sampling(dict(steps=3)), pol.resolve_text(dict(temperature=0.0, max_tokens=4))
    assert np.array_equal(
        pol.generate([c.prompts[1]], [5], sc, text)[0].image, again.generate([c.prompts[1]], [5], sc, text)[0].image
    )


def test_bfloat16_weights_draw_and_keep_their_dtype(case):
    _, c, _ = case
    pol = _load(case, dtype=torch.bfloat16)
    assert pol.info.dtype == torch.bfloat16
    assert all(dt == torch.bfloat16 for _, dt in pol.weight_specs().values() if dt.is_floating_point)
    out = pol.generate([c.prompts[0]], [0], _sde(pol, case), pol.resolve_text(dict(max_tokens=4)))
    assert out[0].trajectory.latents.dtype == torch.float32 and bool(torch.isfinite(out[0].trajectory.log_probs).all())


def test_unknown_names_list_the_available_ones():
    with pytest.raises(ValueError, match="available: .*tiny"):
        registry.policy_class("no-such-policy")
    with pytest.raises(ValueError, match="available"):
        registry.parse_dtype("float8")
    from alphagrpo_serve.tasks import load_task

    with pytest.raises(ValueError, match="available: open, shapes"):
        load_task("nope")


def test_resolve_sampling_names_what_the_policy_cannot_do(case):
    pol = _load(case)
    if "image" not in pol.info.capabilities.guidance_branches:
        with pytest.raises(CapabilityError, match="image guidance"):
            pol.resolve_sampling(dict(cfg_img_scale=2.0))
    sc = pol.resolve_sampling(dict(steps=3))  # the default window clipped to the steps
    assert sc.steps == 3 and sum(sc.sde_window) <= 3
    assert dataclasses.replace(sc, mode="sde").window() == range(sc.sde_window[0], sum(sc.sde_window))


def test_weights_fingerprint_names_the_base_checkpoint(case):
    """Equal for two loads of one checkpoint, unchanged by LoRA adapters, changed by a full import
    that alters one weight or by another dtype."""
    a, b = _load(case), _load(case)
    fp = a.weights_fingerprint()
    assert len(fp) == 32 and b.weights_fingerprint() == fp
    if a.info.capabilities.lora:
        b.enable_lora(4, 8.0)
        with torch.no_grad():
            for p in b.trainable_parameters():
                p.add_(0.1)
        assert b.weights_fingerprint() == fp
    full = a.export_weights()
    name = max(full, key=lambda k: full[k].numel())
    changed = full[name].clone()
    changed.view(-1)[0] += 1.0  # the first element is always among the sampled ones
    a.import_weights({name: changed})
    assert a.weights_fingerprint() != fp
    assert _load(case, dtype=torch.bfloat16).weights_fingerprint() != fp


def test_a_partial_lora_import_keeps_the_other_adapters_effect(case):
    """Adapters travel with their scale folded into B and are applied at scale 1: the adapters a
    partial import does not carry must keep their effect (their own scale folded in)."""
    pol = _load(case)
    if not pol.info.capabilities.lora:
        return
    pol.enable_lora(4, 8.0)  # scale 2
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    before = pol.export_weights(lora=True)  # scale folded into B
    module = sorted(before)[0].rpartition(".")[0]
    part = {k: v * 0.5 for k, v in before.items() if k.rpartition(".")[0] == module}
    assert len(part) == 2 and len(before) > 2
    pol.import_weights(part, lora=True)
    after = pol.export_weights(lora=True)
    for k, v in before.items():
        assert torch.allclose(after[k], part.get(k, v), atol=1e-6), k


def test_evenly_spaced_rows_keep_every_category():
    """tasks.base.evenly_spaced, the one row picker of every held-out evaluation, by hand: 4 of 10 rows
    are 0, 2, 5, 7; limit 0 or >= the row count keeps all; on a split of 3 categories x 4 rows,
    6 rows take 2 of each."""
    from alphagrpo_serve.tasks.base import evenly_spaced

    assert evenly_spaced(range(10), 4) == [0, 2, 5, 7]
    assert evenly_spaced(range(5), 0) == [0, 1, 2, 3, 4] and evenly_spaced(range(5), 9) == [0, 1, 2, 3, 4]
    split = [c for c in "abc" for _ in range(4)]
    assert sorted(evenly_spaced(split, 6)) == ["a", "a", "b", "b", "c", "c"]
