"""grpo_linear_token_loss: the chunked fused op against the float64 unfused composition
grpo_token_loss(hidden @ weight.T + bias), for every aggregation, ratio level and dtype."""

import pytest
import torch

from alphagrpo_serve import kernels as K
from alphagrpo_serve.kernels import reference as R
from helpers import assert_close, assert_close_to_ref, seed_of

pytestmark = pytest.mark.skipif(not K.have_extension(), reason="extension not built")

AGGS = list(R.AGGREGATIONS)


def make_linear_batch(B, T, H, V, dtype, seed, bias=True, with_old=True, with_ref=True, temperature=0.9):
    """hidden, weight, bias in dtype; old/ref near the policy (ratios on both sides of the clip
    range); sequence 1 fully masked out (an empty row) when B > 1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    tokens = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    if B > 1:
        mask[1] = False
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), None if b is None else b.double())
    lsm = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old = (lsm + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_old else None
    ref = (lsm + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_ref else None
    return hidden, weight, b, tokens, adv, mask, old, ref


def run(kind, hidden, weight, bias, tokens, adv, mask, old, ref, chunk_tokens=None, **kw):
    """(loss, metrics, logp, grads of hidden, weight[, bias]) from ours ('ours'), the unfused
    reference in float64 ('ref64') or the unfused reference in the inputs' dtype ('reflp')."""
    cast = (lambda t: None if t is None else t.double()) if kind == "ref64" else (lambda t: t)
    leaves = [cast(t).clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w = leaves[:2]
    b = leaves[2] if bias is not None else None
    if kind == "ours":
        out = K.grpo_linear_token_loss(
            h, w, tokens, adv, mask, bias=b, old_logp=old, ref_logp=ref, chunk_tokens=chunk_tokens, **kw
        )
    else:
        out = R.grpo_linear_token_loss(
            h,
            w,
            tokens,
            cast(adv),
            mask,
            b,
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
    grads = torch.autograd.grad(out[0], leaves)
    return (out[0], out[1], out[2], *grads)


NAMES = ("loss", "metrics", "logp", "grad_hidden", "grad_weight", "grad_bias")


# B = 3 sequences of T = 5 tokens (15 in all). Chunks: 4 and 7 divide neither; for GSPO, 4 < T
# takes the two-pass path (log-probs first) and 7 >= T the whole-sequence path (7 -> 5).
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize(
    "chunk, bias, opts",
    [
        (4, True, dict(beta=0.1, temperature=0.7)),
        (7, False, dict(beta=0.1, dual_clip=2.5)),
        (None, True, dict(old=False)),
    ],
)
def test_float64_equals_unfused_reference(poison, aggregation, ratio_level, chunk, bias, opts):
    opts = dict(opts)
    with_old = opts.pop("old", True)
    hidden, weight, b, tokens, adv, mask, old, ref = make_linear_batch(
        3,
        5,
        8,
        37,
        torch.float64,
        seed=seed_of(aggregation, ratio_level, chunk),
        bias=bias,
        with_old=with_old,
        temperature=opts.get("temperature", 1.0),
    )
    if "beta" not in opts:
        ref = None
    kw = dict(aggregation=aggregation, ratio_level=ratio_level, eps_low=0.2, eps_high=0.3, **opts)
    old = None if old is None else old.double()
    ref = None if ref is None else ref.double()
    ours = run("ours", hidden, weight, b, tokens, adv.double(), mask, old, ref, chunk_tokens=chunk, **kw)
    ref64 = run("ref64", hidden, weight, b, tokens, adv, mask, old, ref, **kw)
    # float64 throughout: only summation order differs (chunked GEMMs, per-row sums), ~1e-15.
    for name, o, r in zip(NAMES, ours, ref64):
        assert_close(o, r, atol=1e-12, rtol=1e-10, name=name)


# Low precision: the logits are a GEMM rounded to the inputs' dtype, in ours and in the unfused
# PyTorch composition alike, so ours must be as close to float64 as that composition is.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio_level, chunk", [("token", 5), ("sequence", 5), ("sequence", 9)])
def test_low_precision_within_pytorch_error(poison, dtype, ratio_level, chunk):
    B, T, H, V = 2, 7, 64, 769
    hidden, weight, b, tokens, adv, mask, old, ref = make_linear_batch(
        B, T, H, V, dtype, seed=seed_of(str(dtype), ratio_level, chunk)
    )
    kw = dict(temperature=0.9, beta=0.04, ratio_level=ratio_level, aggregation="seq-mean-token-mean", dual_clip=3.0)
    ours = run("ours", hidden, weight, b, tokens, adv, mask, old, ref, chunk_tokens=chunk, **kw)
    ref64 = run("ref64", hidden, weight, b, tokens, adv, mask, old, ref, **kw)
    reflp = run("reflp", hidden, weight, b, tokens, adv, mask, old, ref, **kw)
    n_chunks = -(-B * T // chunk) if ratio_level == "token" or chunk < T else -(-B // (chunk // T))
    for name, o, r64, rlp in zip(NAMES, ours, ref64, reflp):
        if name.startswith("grad"):
            assert o.dtype == dtype, f"{name} comes back in the inputs' dtype"
        # 16-bit weight gradients are accumulated in their dtype: one extra rounding (<= 1/2 ulp of
        # the running sum) per chunk on top of the unfused error.
        ulps = 4 + (n_chunks if name == "grad_weight" else 0)
        assert_close_to_ref(o.float() if o.dtype != dtype else o, r64, rlp, k=2.0, ulps=ulps, name=name)


def test_gradcheck_float64():
    hidden, weight, b, tokens, adv, mask, old, ref = make_linear_batch(2, 3, 4, 5, torch.float64, seed=5)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    for level, chunk in (("token", 4), ("sequence", 2), ("sequence", 3)):
        assert torch.autograd.gradcheck(
            lambda h, w, bb: (
                K.grpo_linear_token_loss(
                    h,
                    w,
                    tokens,
                    adv.double(),
                    mask,
                    bias=bb,
                    old_logp=old.double(),
                    ref_logp=ref.double(),
                    beta=0.1,
                    ratio_level=level,
                    temperature=0.8,
                    chunk_tokens=chunk,
                ).loss
            ),
            leaves,
        )


def _gemm_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


def test_frozen_weight_gets_no_gradient_and_no_gemm():
    hidden, weight, _, tokens, adv, mask, old, _ = make_linear_batch(2, 6, 8, 40, torch.float32, seed=6, bias=False)

    def step(train_weight):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(train_weight)
        K.grpo_linear_token_loss(h, w, tokens, adv, mask, old_logp=old, chunk_tokens=5).loss.backward()
        return h, w

    h, w = step(False)
    assert w.grad is None
    h64 = hidden.double().requires_grad_()
    R.grpo_linear_token_loss(h64, weight.double(), tokens, adv.double(), mask, None, old.double())[0].backward()
    assert_close(h.grad, h64.grad, atol=1e-6, rtol=1e-5, name="grad_hidden (frozen weight)")
    # 3 chunks: logits + grad_hidden GEMM each (6); a trainable weight adds one GEMM per chunk (9)
    assert _gemm_calls(lambda: step(False)) == 6
    assert _gemm_calls(lambda: step(True)) == 9


def test_no_grad_returns_no_gradient_buffers():
    hidden, weight, b, tokens, adv, mask, old, _ = make_linear_batch(2, 3, 8, 11, torch.float32, seed=7)
    with torch.no_grad():
        outs = torch.ops.alphagrpo.grpo_linear_token_loss(
            hidden,
            weight,
            b,
            tokens,
            adv[:, None].expand(2, 3).contiguous(),
            mask.float(),
            old,
            None,
            1.0,
            0.2,
            0.2,
            None,
            0.0,
            "token",
            "token-mean",
            4,
            False,
            False,
            False,
        )
    assert [o.numel() for o in outs[3:]] == [0, 0, 0]
    out = K.grpo_linear_token_loss(hidden.requires_grad_(), weight, tokens, adv, mask, bias=b, old_logp=old)
    assert out.loss.requires_grad
    with torch.no_grad():
        assert not K.grpo_linear_token_loss(hidden, weight, tokens, adv, mask, bias=b, old_logp=old).loss.requires_grad


def test_backward_without_the_gradient_it_needs_is_an_error():
    hidden, weight, _, tokens, adv, mask, old, _ = make_linear_batch(1, 3, 4, 9, torch.float32, seed=8, bias=False)
    h = hidden.clone().requires_grad_()
    loss = torch.ops.alphagrpo.grpo_linear_token_loss(
        h,
        weight,
        None,
        tokens,
        adv[:, None].expand(1, 3).contiguous(),
        mask.float(),
        old,
        None,
        1.0,
        0.2,
        0.2,
        None,
        0.0,
        "token",
        "token-mean",
        None,
        False,
        False,
        False,
    )[0]
    with pytest.raises(RuntimeError, match="called with grad_hidden=False"):
        loss.backward()


def test_gradient_scales_with_upstream_grad():
    hidden, weight, b, tokens, adv, mask, old, _ = make_linear_batch(2, 3, 8, 11, torch.float32, seed=9)
    grads = []
    for factor in (1.0, -2.5):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        (
            K.grpo_linear_token_loss(leaves[0], leaves[1], tokens, adv, mask, bias=leaves[2], old_logp=old).loss
            * factor
        ).backward()
        grads.append([t.grad for t in leaves])
    for name, a, s in zip(("hidden", "weight", "bias"), *grads):
        assert_close(s, -2.5 * a, atol=1e-7, rtol=1e-6, name=f"scaled grad {name}")


def test_opcheck():
    hidden, weight, b, tokens, adv, mask, old, ref = make_linear_batch(2, 3, 8, 11, torch.float32, seed=10)
    args = (
        hidden.clone().requires_grad_(),
        weight.clone().requires_grad_(),
        b.clone().requires_grad_(),
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
        2,
        True,
        True,
        True,
    )
    torch.library.opcheck(torch.ops.alphagrpo.grpo_linear_token_loss.default, args)


def test_torch_compile_fullgraph_forward_backward():
    hidden, weight, b, tokens, adv, mask, old, ref = make_linear_batch(2, 3, 8, 11, torch.float32, seed=11)

    def f(h, w, bb):
        return (
            K.grpo_linear_token_loss(
                h, w, tokens, adv, mask, bias=bb, old_logp=old, ref_logp=ref, beta=0.05, chunk_tokens=4
            ).loss
            * 3.0
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    e = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    la, le = compiled(*a), f(*e)
    la.backward()
    le.backward()
    assert torch.equal(la, le)
    for name, x, y in zip(("hidden", "weight", "bias"), a, e):
        assert_close(x.grad, y.grad, atol=1e-7, rtol=1e-6, name=f"compiled grad {name}")


def test_strided_hidden_and_transposed_weight():
    hidden, weight, b, tokens, adv, mask, old, _ = make_linear_batch(2, 4, 8, 13, torch.float32, seed=12)
    wide = torch.randn(2, 4, 16)
    wide[..., ::2] = hidden
    view = wide[..., ::2]
    w_t = weight.t().contiguous().t()  # [V, H] with strides (1, V)
    assert not view.is_contiguous() and not w_t.is_contiguous()
    a = K.grpo_linear_token_loss(view, w_t, tokens, adv, mask, bias=b, old_logp=old)
    r = R.grpo_linear_token_loss(hidden.double(), weight.double(), tokens, adv.double(), mask, b.double(), old.double())
    assert_close(a.loss, r[0], atol=1e-6, rtol=1e-5, name="loss (strided)")
    assert_close(a.logp, r[2], atol=1e-5, rtol=1e-5, name="logp (strided)")


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(hidden=torch.zeros(6, 8)), ValueError, "hidden must be [batch, tokens, hidden]"),
        (dict(hidden=torch.zeros(2, 3, 8, dtype=torch.int64)), TypeError, "hidden must be a floating"),
        (dict(weight=torch.zeros(11, 7)), ValueError, "weight must be [vocab, 8]"),
        (dict(weight=torch.zeros(11, 8, dtype=torch.float64)), TypeError, "weight must be a tensor of hidden's dtype"),
        (dict(bias=torch.zeros(10)), ValueError, "bias must be [11]"),
        (dict(bias=torch.zeros(11, dtype=torch.bfloat16)), TypeError, "bias must be a tensor of hidden's dtype"),
        (dict(tokens=torch.full((2, 3), 11)), IndexError, "tokens must be in [0, 11)"),
        (dict(tokens=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "tokens must be [2, 3]"),
        (dict(advantages=torch.zeros(4)), ValueError, "advantages must be [2, 3] or [2]"),
        (dict(mask=torch.ones(2, 2)), ValueError, "mask must be [2, 3]"),
        (dict(old_logp=torch.full((2, 3), float("inf"))), ValueError, "old_logp contains non-finite"),
        (dict(chunk_tokens=0), ValueError, "chunk_tokens must be a positive int"),
        (dict(aggregation="sum"), ValueError, "aggregation must be one of"),
        (dict(ratio_level="seq"), ValueError, "ratio_level must be one of"),
        (dict(beta=0.1), ValueError, "beta != 0 needs ref_logp"),
        (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    ],
)
def test_bad_input_names_the_argument(change, exc, words):
    hidden, weight, b, tokens, adv, mask, _, _ = make_linear_batch(2, 3, 8, 11, torch.float32, seed=13)
    args = dict(hidden=hidden, weight=weight, tokens=tokens, advantages=adv, mask=mask, bias=b)
    args.update(change)
    with pytest.raises(exc) as info:
        K.grpo_linear_token_loss(
            args.pop("hidden"), args.pop("weight"), args.pop("tokens"), args.pop("advantages"), args.pop("mask"), **args
        )
    assert words in str(info.value)


def _direct(hidden, weight, bias, tokens, adv, mask, **over):
    args = dict(old=None, ref=None, temperature=1.0, chunk=2, grad_bias=False)
    args.update(over)
    return torch.ops.alphagrpo.grpo_linear_token_loss(
        hidden,
        weight,
        bias,
        tokens,
        adv[:, None].expand(tokens.shape).contiguous(),
        mask.float(),
        args["old"],
        args["ref"],
        args["temperature"],
        0.2,
        0.2,
        None,
        0.0,
        "token",
        "token-mean",
        args["chunk"],
        True,
        True,
        args["grad_bias"],
    )


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (
            dict(token=(1, 2, -3)),
            IndexError,
            "tokens must be in [0, 11) (the rows of weight), got -3 at position (1, 2)",
        ),
        (dict(weight=torch.zeros(11, 8, dtype=torch.float64)), TypeError, "weight must have the dtype of hidden"),
        (dict(bias=torch.zeros(12)), ValueError, "bias must be [11]"),
        (dict(grad_bias=True), ValueError, "grad_bias needs a bias"),
        (dict(chunk=0), ValueError, "chunk_tokens must be >= 1"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    ],
)
def test_direct_op_call_checks_its_arguments(change, exc, words):
    hidden, weight, _, tokens, adv, mask, _, _ = make_linear_batch(2, 3, 8, 11, torch.float32, seed=14, bias=False)
    bias = change.pop("bias", None)
    if "token" in change:
        b, t, v = change.pop("token")
        tokens[b, t] = v
    weight = change.pop("weight", weight)
    with pytest.raises(exc) as info:
        _direct(hidden, weight, bias, tokens, adv, mask, **change)
    assert words in str(info.value)


def test_non_finite_hidden_names_the_row():
    hidden, weight, _, tokens, adv, mask, _, _ = make_linear_batch(2, 3, 8, 11, torch.float32, seed=15, bias=False)
    hidden[1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite logit .* row \(1, 2\): check hidden, weight and bias"):
        K.grpo_linear_token_loss(hidden, weight, tokens, adv, mask)


def test_default_chunk_budget_is_documented_value():
    assert K.build_info()["linear_chunk_bytes"] == 256 << 20
