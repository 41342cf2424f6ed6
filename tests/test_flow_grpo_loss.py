"""flow_grpo_loss against hand-computed values and the float64 reference."""

import math

import pytest
import torch

from alphagrpo_serve import kernels as K
from alphagrpo_serve.kernels import reference as R
from helpers import assert_close

pytestmark = pytest.mark.skipif(not K.have_extension(), reason="extension not built")


def make(B, K_, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, K_, generator=g, dtype=torch.float64).to(dtype)
    logp = (old.double() + 0.01 * torch.randn(B, K_, generator=g, dtype=torch.float64)).to(dtype)
    adv = torch.randn(B, generator=g).to(dtype)
    kl = torch.rand(B, K_, generator=g).to(dtype)
    return logp, old, adv, kl


def test_hand_computed():
    logp = torch.tensor([[0.0, 0.3]], dtype=torch.float64)
    old = torch.tensor([[0.1, 0.0]], dtype=torch.float64)
    adv = torch.tensor([2.0], dtype=torch.float64)
    lp = logp.clone().requires_grad_()
    out = K.flow_grpo_loss(lp, old, adv, clip_range=0.2)
    r = [math.exp(-0.1), math.exp(0.3)]  # 0.905 in range; 1.35 > 1.2 with A > 0 -> clipped at 1.2
    assert abs(out.loss.item() - (-2 * r[0] - 2 * 1.2) / 2) < 1e-12
    (g,) = torch.autograd.grad(out.loss, lp)
    assert_close(g, torch.tensor([[-2 * r[0] / 2, 0.0]], dtype=torch.float64), atol=1e-12, rtol=0, name="grad")
    assert_close(
        out.metrics,
        torch.tensor([(r[0] + r[1]) / 2, 0.5, 0.0], dtype=torch.float64),
        atol=1e-12,
        rtol=0,
        name="metrics",
    )


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (64, 10)])
@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(poison, shape, with_kl, dtype):
    logp, old, adv, kl = make(*shape, seed=shape[0], dtype=dtype)
    kl = kl.clone().requires_grad_() if with_kl else None
    lp = logp.clone().requires_grad_()
    out = K.flow_grpo_loss(lp, old, adv, clip_range=5e-3, kl=kl, beta=0.04)
    grads = torch.autograd.grad(out.loss, [lp] + ([kl] if with_kl else []))
    lp64 = logp.double().requires_grad_()
    kl64 = kl.detach().double().requires_grad_() if with_kl else None
    ref = R.flow_grpo_loss(lp64, old.double(), adv.double(), 5e-3, kl64, 0.04)
    grads64 = torch.autograd.grad(ref[0], [lp64] + ([kl64] if with_kl else []))
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # reductions run in double, one float32 rounding
    assert_close(out.loss, ref[0], atol=tol, rtol=tol, name="loss")
    assert_close(out.metrics, ref[1], atol=tol, rtol=tol, name="metrics")
    for i, (a, b) in enumerate(zip(grads, grads64)):
        assert_close(a, b, atol=tol, rtol=tol, name=f"grad[{i}]")


def test_opcheck_and_gradcheck():
    logp, old, adv, kl = make(3, 4, seed=1, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.alphagrpo.flow_grpo_loss.default,
        (logp.clone().requires_grad_(), old, adv, kl.clone().requires_grad_(), 0.01, 0.1),
    )
    torch.library.opcheck(torch.ops.alphagrpo.flow_grpo_loss.default, (logp, old, adv, None, 0.01, 0.0))
    assert torch.autograd.gradcheck(
        lambda a, b: K.flow_grpo_loss(a, old, adv, clip_range=0.01, kl=b, beta=0.1).loss,
        (logp.clone().requires_grad_(), kl.clone().requires_grad_()),
    )


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(logp=torch.zeros(2)), ValueError, "logp must be [batch, steps]"),
        (dict(old_logp=torch.zeros(2, 2)), ValueError, "old_logp must have the shape of logp"),
        (dict(advantages=torch.zeros(3)), ValueError, "advantages must be [2]"),
        (dict(kl=torch.zeros(2, 2)), ValueError, "kl must have the shape"),
        (dict(clip_range=0.0), ValueError, "clip_range must be > 0"),
        (dict(advantages=torch.tensor([1.0, float("inf")])), ValueError, "advantages contains non-finite"),
    ],
)
def test_bad_input(change, exc, words):
    logp, old, adv, _ = make(2, 3, seed=2)
    args = dict(logp=logp, old_logp=old, advantages=adv)
    args.update(change)
    with pytest.raises(exc) as info:
        K.flow_grpo_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), **args)
    assert words in str(info.value)
