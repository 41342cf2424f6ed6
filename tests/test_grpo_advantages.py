"""grpo_advantages against hand-computed values and the float64 reference."""

import math

import pytest
import torch

from alphagrpo_serve import kernels as K
from alphagrpo_serve.kernels import reference as R
from helpers import assert_close

pytestmark = pytest.mark.skipif(not K.have_extension(), reason="extension not built")


def test_hand_computed_group_and_batch():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    g_std = math.sqrt(2.0 / 3.0)
    adv = K.grpo_advantages(r, "group", eps=0.0 + 1e-4)
    expected = torch.tensor([[-1 / (g_std + 1e-4), 0.0, 1 / (g_std + 1e-4)], [0.0, 0.0, 0.0]])
    assert_close(adv, expected, atol=1e-6, rtol=1e-6, name="group")
    # batch std over all six rewards: mean 1.25, deviations (-.25, .75, 1.75, -.75 x3)
    b_std = math.sqrt((0.0625 + 0.5625 + 3.0625 + 3 * 0.5625) / 6)
    adv = K.grpo_advantages(r, "batch", eps=1e-4)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) / (b_std + 1e-4)
    assert_close(adv, expected, atol=1e-6, rtol=1e-6, name="batch")
    adv = K.grpo_advantages(r, "none")
    assert_close(adv, torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), atol=0, rtol=0, name="none")
    adv = K.grpo_advantages(r, "group", clip=0.5)
    assert_close(adv, torch.tensor([[-0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]), atol=0, rtol=0, name="clipped")


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (5, 16), (4096, 16)])
@pytest.mark.parametrize("scope", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_float64_reference(poison, shape, scope, dtype):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    r = torch.rand(shape, generator=g).to(dtype)
    for clip in (None, 1.5):
        ours = K.grpo_advantages(r, scope, eps=1e-4, clip=clip)
        ref = R.grpo_advantages(r.double(), scope, 1e-4, clip)
        assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # accumulated in double, rounded once to float32: 2 ulp
        tol = 1e-12 if dtype == torch.float64 else 2.4e-7
        assert_close(ours, ref, atol=tol, rtol=tol, name=f"{scope} clip={clip}")


def test_opcheck():
    r = torch.rand(4, 6)
    torch.library.opcheck(torch.ops.alphagrpo.grpo_advantages.default, (r, "group", 1e-4, None))
    torch.library.opcheck(torch.ops.alphagrpo.grpo_advantages.default, (r, "batch", 1e-4, 2.0))


def test_compile_fullgraph():
    r = torch.rand(4, 6)
    f = torch.compile(lambda r: K.grpo_advantages(r, "batch") * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(r), K.grpo_advantages(r, "batch") * 2)


@pytest.mark.parametrize(
    "args, exc, words",
    [
        ((torch.rand(4),), ValueError, "rewards must be [prompts, group]"),
        ((torch.rand(0, 4),), ValueError, "non-empty"),
        ((torch.ones(2, 2, dtype=torch.int64),), TypeError, "rewards must be a floating"),
        ((torch.rand(2, 2), "sample"), ValueError, "std_scope must be one of"),
        ((torch.tensor([[1.0, float("nan")]]),), ValueError, "rewards contains non-finite"),
        ((torch.rand(2, 2), "group", 1e-4, -1.0), ValueError, "clip must be > 0"),
    ],
)
def test_bad_input(args, exc, words):
    with pytest.raises(exc) as info:
        K.grpo_advantages(*args)
    assert words in str(info.value)


def test_falls_back_to_reference_with_one_warning(monkeypatch):
    import warnings

    from alphagrpo_serve.kernels import _registry

    monkeypatch.setattr(_registry, "_C", None)
    monkeypatch.setattr(_registry, "_WARNED", set())
    r = torch.rand(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="using the PyTorch reference"):
        a = K.grpo_advantages(r, "group")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call stays quiet
        b = K.grpo_advantages(r, "group")
    assert torch.equal(a, R.grpo_advantages(r, "group")) and torch.equal(a, b)
