"""grpo_token_loss: the fused kernel against the float64 reference and hand-computed values."""

import math

import pytest
import torch

from alphagrpo_serve import kernels as K
from alphagrpo_serve.kernels import reference as R
from alphagrpo_serve.kernels._registry import _C
from helpers import assert_close, assert_close_to_ref, seed_of

pytestmark = pytest.mark.skipif(not K.have_extension(), reason="extension not built")

AGGS = list(R.AGGREGATIONS)


def cpu_isas() -> list:
    """The vectorised CPU loops this machine runs (e.g. ['avx512', 'avx2', 'scalar'])."""
    return list(_C.cpu_isas()) if K.have_extension() else []


class use_cpu_isa:
    """Context manager: the native CPU kernels run with the named loops, then the previous ones."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.prev = _C.set_cpu_isa(self.name)
        return self

    def __exit__(self, *exc):
        _C.set_cpu_isa(self.prev)


def make_batch(B, T, V, dtype, seed, with_old=True, with_ref=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2.0).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    lsm = torch.log_softmax(logits.double() / 0.9, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # old/ref policies near the current one, so ratios fall on both sides of the clip range
    old = (lsm + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_old else None
    ref = (lsm + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_ref else None
    return logits, tokens, adv, mask, old, ref


def run_both(logits, tokens, adv, mask, old, ref, **kw):
    """ours, float64 reference and low-precision reference: each (loss, metrics, logp, grad)."""
    results = []
    for kind in ("ours", "ref64", "reflp"):
        lg = logits.double() if kind == "ref64" else logits
        lg = lg.clone().requires_grad_()
        if kind == "ours":
            out = K.grpo_token_loss(lg, tokens, adv, mask, old_logp=old, ref_logp=ref, **kw)
            loss, metrics, logp = out
        else:
            cast = (lambda t: None if t is None else t.double()) if kind == "ref64" else (lambda t: t)
            loss, metrics, logp = R.grpo_token_loss(
                lg,
                tokens,
                cast(adv),
                mask,
                cast(old),
                cast(ref),
                kw.get("temperature", 1.0),
                kw.get("eps_low", 0.2),
                kw.get("eps_high", 0.28),
                kw.get("dual_clip"),
                kw.get("beta", 0.0),
                kw.get("ratio_level", "token"),
                kw.get("aggregation", "token-mean"),
            )
        (grad,) = torch.autograd.grad(loss, lg)
        results.append((loss, metrics, logp, grad))
    return results


@pytest.mark.parametrize("shape", [(1, 1, 7), (2, 7, 769), (3, 5, 5125), (2, 3, 32000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_matches_float64_reference(poison, shape, dtype, ratio_level):
    logits, tokens, adv, mask, old, ref = make_batch(*shape, dtype, seed=seed_of(shape, str(dtype), ratio_level))
    kw = dict(
        temperature=0.9,
        eps_low=0.2,
        eps_high=0.28,
        beta=0.04,
        ratio_level=ratio_level,
        aggregation="seq-mean-token-mean",
        dual_clip=3.0,
    )
    (lo, mo, po, go), (l64, m64, p64, g64), (_, _, _, glp) = run_both(logits, tokens, adv, mask, old, ref, **kw)
    # loss, metrics and logp are float32 from float32 math over the vocabulary: relative 2e-6 is
    # ~16 ulp, room for the log-sum-exp over up to 32,000 terms (the reference itself errs ~1e-7).
    assert_close(lo, l64, atol=2e-6, rtol=2e-6, name="loss")
    assert_close(mo, m64, atol=2e-6, rtol=2e-6, name="metrics")
    assert_close(po, p64, atol=2e-5, rtol=2e-6, name="logp")
    assert go.dtype == dtype, "the gradient comes back in the logits' dtype"
    # float32: the softmax normaliser sums V exps in float32 (16 lanes: ~sqrt(V/16) rounding steps)
    # and the vectorised exp adds <= 3 ulp, so allow 16 ulp where PyTorch happens to be closer.
    assert_close_to_ref(go, g64, glp, ulps=16, name="grad_logits")


@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("opts", [dict(), dict(beta=0.1), dict(dual_clip=2.5, temperature=0.7), dict(old=False)])
def test_every_mode_float64_exact(poison, aggregation, ratio_level, opts):
    opts = dict(opts)
    with_old = opts.pop("old", True)
    logits, tokens, adv, mask, old, ref = make_batch(4, 6, 33, torch.float64, seed=13, with_old=with_old)
    if "beta" not in opts:
        ref = None
    kw = dict(aggregation=aggregation, ratio_level=ratio_level, eps_low=0.2, eps_high=0.3, **opts)
    old = None if old is None else old.double()
    ref = None if ref is None else ref.double()
    (lo, mo, po, go), (l64, m64, p64, g64), _ = run_both(logits, tokens, adv.double(), mask, old, ref, **kw)
    for name, a, b in (("loss", lo, l64), ("metrics", mo, m64), ("logp", po, p64), ("grad", go, g64)):
        assert_close(a, b, atol=1e-12, rtol=1e-10, name=name)


def test_hand_computed():
    # B=1, T=2, V=3; logits chosen so softmax is easy to write down.
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(5.0)], [1.0, 1.0, 1.0]]], dtype=torch.float64)
    tokens = torch.tensor([[2, 0]])
    logp = [math.log(5 / 8), math.log(1 / 3)]
    old = torch.tensor([[logp[0] - 0.5, logp[1] + 0.1]], dtype=torch.float64)  # ratios e^0.5, e^-0.1
    adv = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.ones(1, 2)
    lg = logits.clone().requires_grad_()
    out = K.grpo_token_loss(lg, tokens, adv, mask, old_logp=old, eps_low=0.2, eps_high=0.2)
    r = [math.exp(0.5), math.exp(-0.1)]
    # token 0: r = 1.6487 > 1.2 with A > 0: clipped, loss -1.2; token 1: r = 0.905 in range, loss -0.905
    expected = (-1.2 - r[1]) / 2
    assert abs(out.loss.item() - expected) < 1e-12
    assert_close(out.logp, torch.tensor([logp], dtype=torch.float64), atol=1e-12, rtol=0, name="logp")
    assert_close(
        out.metrics,
        torch.tensor([(r[0] + r[1]) / 2, 0.5, 0.0], dtype=torch.float64),
        atol=1e-12,
        rtol=0,
        name="metrics",
    )
    (g,) = torch.autograd.grad(out.loss, lg)
    # clipped token: no gradient; token 1: d/dlogit = -A r / 2 * (onehot - softmax) = -r/2 * ([1,0,0] - 1/3)
    expected_g = torch.tensor([[[0.0, 0.0, 0.0], [-r[1] / 2 * (2 / 3), r[1] / 6, r[1] / 6]]], dtype=torch.float64)
    assert_close(g, expected_g, atol=1e-12, rtol=0, name="grad")


def test_strided_logits(poison):
    logits, tokens, adv, mask, old, ref = make_batch(3, 4, 300, torch.float32, seed=3)
    wide = torch.randn(3, 4, 400)
    wide[..., :300] = logits
    view = wide[..., :300]  # rows with stride 400: not contiguous
    assert not view.is_contiguous()
    a = K.grpo_token_loss(view, tokens, adv, mask, old_logp=old, ref_logp=ref, beta=0.1)
    b = K.grpo_token_loss(logits, tokens, adv, mask, old_logp=old, ref_logp=ref, beta=0.1)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logp, b.logp)


def test_no_grad_returns_no_gradient_buffer():
    logits, tokens, adv, mask, old, ref = make_batch(2, 3, 50, torch.float32, seed=4)
    with torch.no_grad():
        outs = torch.ops.alphagrpo.grpo_token_loss(
            logits,
            tokens,
            adv[:, None].expand(2, 3).contiguous(),
            mask.float(),
            old,
            ref,
            1.0,
            0.2,
            0.2,
            None,
            0.0,
            "token",
            "token-mean",
            False,
        )
    assert outs[3].numel() == 0
    out = K.grpo_token_loss(logits, tokens, adv, mask, old_logp=old)
    assert not out.loss.requires_grad


def test_gradcheck_float64():
    logits, tokens, adv, mask, old, ref = make_batch(2, 3, 5, torch.float64, seed=5)
    lg = logits.clone().requires_grad_()
    for level in ("token", "sequence"):
        assert torch.autograd.gradcheck(
            lambda x: (
                K.grpo_token_loss(
                    x,
                    tokens,
                    adv.double(),
                    mask,
                    old_logp=old.double(),
                    ref_logp=ref.double(),
                    beta=0.1,
                    ratio_level=level,
                    temperature=0.8,
                ).loss
            ),
            (lg,),
        )


def test_opcheck():
    logits, tokens, adv, mask, old, ref = make_batch(2, 3, 11, torch.float32, seed=6)
    args = (
        logits.clone().requires_grad_(),
        tokens,
        adv[:, None].expand(2, 3).contiguous(),
        mask.float(),
        old,
        ref,
        0.9,
        0.2,
        0.28,
        3.0,
        0.05,
        "sequence",
        "seq-mean-token-sum",
        True,
    )
    torch.library.opcheck(torch.ops.alphagrpo.grpo_token_loss.default, args)


def test_torch_compile_fullgraph_forward_backward():
    logits, tokens, adv, mask, old, ref = make_batch(2, 3, 11, torch.float32, seed=7)

    def f(lg):
        return K.grpo_token_loss(lg, tokens, adv, mask, old_logp=old, ref_logp=ref, beta=0.05).loss * 3.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    la, lb = compiled(a), f(b)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-6, name="compiled grad")


def test_gradient_scales_with_upstream_grad():
    logits, tokens, adv, mask, old, ref = make_batch(2, 3, 11, torch.float32, seed=8)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    K.grpo_token_loss(a, tokens, adv, mask, old_logp=old).loss.backward()
    (K.grpo_token_loss(b, tokens, adv, mask, old_logp=old).loss * -2.5).backward()
    assert_close(b.grad, -2.5 * a.grad, atol=1e-7, rtol=1e-6, name="scaled grad")


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(tokens=torch.full((2, 3), 11)), IndexError, "tokens must be in [0, 11)"),
        (dict(tokens=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "tokens must be an int64"),
        (dict(tokens=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "tokens must be [2, 3]"),
        (dict(logits=torch.zeros(2, 3)), ValueError, "logits must be [batch, tokens, vocab]"),
        (dict(advantages=torch.zeros(3)), ValueError, "advantages must be [2, 3] or [2]"),
        (dict(mask=torch.ones(2, 2)), ValueError, "mask must be [2, 3]"),
        (dict(old_logp=torch.full((2, 3), float("nan"))), ValueError, "old_logp contains non-finite"),
        (dict(aggregation="mean"), ValueError, "aggregation must be one of"),
        (dict(ratio_level="seq"), ValueError, "ratio_level must be one of"),
        (dict(beta=0.1), ValueError, "beta != 0 needs ref_logp"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(dual_clip=0.5), ValueError, "dual_clip must be > 1"),
    ],
)
def test_bad_input_names_the_argument(change, exc, words):
    logits, tokens, adv, mask, _, _ = make_batch(2, 3, 11, torch.float32, seed=9)
    args = dict(logits=logits, tokens=tokens, advantages=adv, mask=mask)
    args.update(change)
    with pytest.raises(exc) as info:
        K.grpo_token_loss(args.pop("logits"), args.pop("tokens"), args.pop("advantages"), args.pop("mask"), **args)
    assert words in str(info.value)


def test_non_finite_logits_are_an_error():
    logits, tokens, adv, mask, _, _ = make_batch(2, 3, 11, torch.float32, seed=10)
    logits[1, 2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"logits has a non-finite value .* row \(1, 2\)"):
        K.grpo_token_loss(logits, tokens, adv, mask)


def test_direct_op_call_with_bad_token_does_not_crash():
    logits, tokens, adv, mask, _, _ = make_batch(2, 3, 11, torch.float32, seed=11)
    tokens[0, 1] = -4
    with pytest.raises(IndexError, match="tokens must be in"):
        torch.ops.alphagrpo.grpo_token_loss(
            logits,
            tokens,
            adv[:, None].expand(2, 3).contiguous(),
            mask.float(),
            None,
            None,
            1.0,
            0.2,
            0.2,
            None,
            0.0,
            "token",
            "token-mean",
            True,
        )


# ---- every vectorised CPU path --------------------------------------------------------------------
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2, 7), (2, 3, 5125)])
def test_every_cpu_isa_matches_float64_reference(poison, isa, dtype, shape):
    """The AVX-512, AVX2 and portable row loops (whichever this CPU runs) against float64; 5125 and
    7 leave tails of every length class after the 16- and 8-wide vectors."""
    logits, tokens, adv, mask, old, ref = make_batch(*shape, dtype, seed=seed_of(shape, str(dtype), isa))
    kw = dict(temperature=0.9, beta=0.04, ratio_level="token", aggregation="token-mean", dual_clip=3.0)
    with use_cpu_isa(isa):
        (lo, mo, po, go), (l64, m64, p64, g64), (_, _, _, glp) = run_both(logits, tokens, adv, mask, old, ref, **kw)
    assert_close(lo, l64, atol=2e-6, rtol=2e-6, name=f"loss [{isa}]")  # as test_matches_float64_reference
    assert_close(mo, m64, atol=2e-6, rtol=2e-6, name=f"metrics [{isa}]")
    assert_close(po, p64, atol=2e-5, rtol=2e-6, name=f"logp [{isa}]")
    assert_close_to_ref(go, g64, glp, ulps=16, name=f"grad_logits [{isa}]")


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("order", ["ascending", "descending", "masked-vocab"])
def test_online_normaliser_edge_rows(isa, order):
    """Rows whose maximum moves in every block (ascending), sits in the first element (descending),
    or that have -inf logits (a masked vocabulary): the online max/sum-exp must rescale exactly."""
    V = 1000
    row = torch.linspace(-30.0, 30.0, V)
    if order == "descending":
        row = row.flip(0)
    logits = row.repeat(2, 3, 1).clone()
    if order == "masked-vocab":
        logits[..., ::3] = float("-inf")
    tokens = torch.tensor([[1, 500, 998], [4, 250, 997]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3)
    with use_cpu_isa(isa):
        lg = logits.clone().requires_grad_()
        out = K.grpo_token_loss(lg, tokens, adv, mask, temperature=0.8)
        (g,) = torch.autograd.grad(out.loss, lg)
    l64 = logits.double().requires_grad_()
    loss64, _, p64 = R.grpo_token_loss(l64, tokens, adv.double(), mask, None, None, 0.8)
    (g64,) = torch.autograd.grad(loss64, l64)
    # |logp| reaches ~75 here: 2e-6 relative is ~16 ulp of float32 at that scale.
    assert_close(out.logp, p64, atol=2e-5, rtol=2e-6, name=f"logp [{isa}, {order}]")
    assert_close(g, g64, atol=1e-7, rtol=1e-5, name=f"grad [{isa}, {order}]")
