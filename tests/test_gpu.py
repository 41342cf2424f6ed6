"""CUDA kernels against the float64 reference (run on a GPU by benchmarks/gpu_check.sh; skipped
without CUDA). Inputs are fresh random tensors; outputs are poisoned with NaN before each call."""

import pytest
import torch

from alphagrpo_serve import kernels as K
from alphagrpo_serve.kernels import reference as R
from helpers import assert_close, assert_close_to_ref
from test_flow_sde import make_inputs
from test_grpo_linear_token_loss import NAMES, make_linear_batch
from test_grpo_linear_token_loss import run as run_linear
from test_grpo_token_loss import make_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not K.build_info()["with_cuda"],
        reason="needs CUDA and an extension built with CUDA",
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (3, 769), (2, 5125), (4, 16, 64, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [False, True])
def test_flow_sde_step_cuda(poison, shape, dtype, cfg):
    x, v, noise, vu, s, sn = make_inputs(shape, dtype, seed=101, cfg=cfg)
    out = K.flow_sde_step(
        *cuda(x, v, s, sn),
        noise=noise.cuda(),
        v_uncond=None if vu is None else vu.cuda(),
        cfg_scale=3.0,
        noise_level=0.8,
        sigma_max=0.95,
    )
    ref64 = R.flow_sde_step(
        x.double(),
        v.double(),
        s.double(),
        sn.double(),
        0.8,
        0.95,
        noise.double(),
        None if vu is None else vu.double(),
        3.0,
    )
    reflp = R.flow_sde_step(x, v, s, sn, 0.8, 0.95, noise, vu, 3.0)
    for name, o, r64, rlp in zip(("x_next", "mean", "std", "log_prob"), out, ref64, reflp):
        if name in ("std", "log_prob"):
            assert_close(o, r64, atol=1e-5, rtol=1e-5, name=name)  # float32 per-sample math, as on the CPU
        else:
            assert_close_to_ref(o, r64, rlp, name=name)


@pytest.mark.parametrize("shape", [(1, 1), (3, 769), (4, 16, 64, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_sde_logprob_cuda(poison, shape, dtype):
    x, v, noise, _, s, sn = make_inputs(shape, dtype, seed=102)
    xn = R.flow_sde_step(x, v, s, sn, 0.9, 0.96, noise)[0]
    xq, vq = x.cuda().requires_grad_(), (v.float() + 0.05).to(dtype).cuda().requires_grad_()
    lp = K.flow_sde_logprob(xq, vq, xn.cuda(), s.cuda(), sn.cuda(), noise_level=0.9, sigma_max=0.96)
    gx, gv = torch.autograd.grad(lp.sum(), (xq, vq))
    x64, v64 = x.double().requires_grad_(), (v.float() + 0.05).to(dtype).double().requires_grad_()
    lp64 = R.flow_sde_logprob(x64, v64, xn.double(), s.double(), sn.double(), 0.9, 0.96)
    gx64, gv64 = torch.autograd.grad(lp64.sum(), (x64, v64))
    xl, vl = x.clone().requires_grad_(), (v.float() + 0.05).to(dtype).requires_grad_()
    gxl, gvl = torch.autograd.grad(R.flow_sde_logprob(xl, vl, xn, s, sn, 0.9, 0.96).sum(), (xl, vl))
    assert_close(lp, lp64, atol=2e-5, rtol=1e-5, name="log_prob")
    assert_close_to_ref(gv, gv64, gvl, name="grad_v")
    assert_close_to_ref(gx, gx64, gxl, name="grad_x")


@pytest.mark.parametrize("shape", [(1, 1, 7), (2, 7, 769), (2, 3, 32000), (1, 2, 151936)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_grpo_token_loss_cuda(poison, shape, dtype, ratio_level):
    logits, tokens, adv, mask, old, ref = make_batch(*shape, dtype, seed=103)
    kw = dict(
        temperature=0.9,
        eps_low=0.2,
        eps_high=0.28,
        beta=0.04,
        ratio_level=ratio_level,
        aggregation="seq-mean-token-mean",
        dual_clip=3.0,
    )
    lg = logits.cuda().requires_grad_()
    out = K.grpo_token_loss(lg, *cuda(tokens, adv, mask), old_logp=old.cuda(), ref_logp=ref.cuda(), **kw)
    (g,) = torch.autograd.grad(out.loss, lg)
    args = (
        tokens,
        adv.double(),
        mask,
        old.double(),
        ref.double(),
        0.9,
        0.2,
        0.28,
        3.0,
        0.04,
        ratio_level,
        "seq-mean-token-mean",
    )
    l64 = logits.double().requires_grad_()
    loss64, m64, p64 = R.grpo_token_loss(l64, *args)
    (g64,) = torch.autograd.grad(loss64, l64)
    llp = logits.clone().requires_grad_()
    (glp,) = torch.autograd.grad(
        R.grpo_token_loss(
            llp, tokens, adv, mask, old, ref, 0.9, 0.2, 0.28, 3.0, 0.04, ratio_level, "seq-mean-token-mean"
        )[0],
        llp,
    )
    assert_close(out.loss, loss64, atol=2e-6, rtol=2e-6, name="loss")
    assert_close(out.metrics, m64, atol=2e-6, rtol=2e-6, name="metrics")
    assert_close(out.logp, p64, atol=2e-5, rtol=2e-6, name="logp")
    assert g.dtype == dtype
    assert_close_to_ref(g, g64, glp, name="grad_logits")


@pytest.mark.parametrize("scope", ["group", "batch", "none"])
def test_grpo_advantages_cuda(scope):
    r = torch.rand(4096, 16)
    assert_close(
        K.grpo_advantages(r.cuda(), scope, clip=2.0),
        R.grpo_advantages(r.double(), scope, 1e-4, 2.0),
        atol=2.4e-7,
        rtol=2.4e-7,
        name=scope,
    )


def test_flow_grpo_loss_cuda():
    g = torch.Generator().manual_seed(5)
    old = torch.randn(64, 10, generator=g)
    logp = old + 0.01 * torch.randn(64, 10, generator=g)
    adv, kl = torch.randn(64, generator=g), torch.rand(64, 10, generator=g)
    lp = logp.cuda().requires_grad_()
    out = K.flow_grpo_loss(lp, old.cuda(), adv.cuda(), clip_range=5e-3, kl=kl.cuda(), beta=0.04)
    (gr,) = torch.autograd.grad(out.loss, lp)
    lp64 = logp.double().requires_grad_()
    ref = R.flow_grpo_loss(lp64, old.double(), adv.double(), 5e-3, kl.double(), 0.04)
    (gr64,) = torch.autograd.grad(ref[0], lp64)
    assert_close(out.loss, ref[0], atol=1e-6, rtol=1e-6, name="loss")
    assert_close(gr, gr64, atol=1e-7, rtol=1e-6, name="grad")


def test_sampler_steps_capture_in_a_cuda_graph():
    """A whole SDE window (4 steps) replayed from a CUDA graph equals the eager loop."""
    B, shape = 8, (8, 16, 32, 32)
    x0 = torch.randn(shape, device="cuda")
    noises = [torch.randn(shape, device="cuda") for _ in range(4)]
    sig = torch.linspace(1.0, 0.2, 5, device="cuda")

    def loop(x):
        for i in range(4):
            v = -x * 0.5  # a stand-in velocity: the graph captures the kernel launches
            s, sn = sig[i].expand(B).contiguous(), sig[i + 1].expand(B).contiguous()
            x = torch.ops.alphagrpo.flow_sde_step(x, v, None, 1.0, s, sn, 0.7, 0.9, noises[i])[0]
        return x

    eager = loop(x0.clone())
    static_x = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop(static_x)  # warm-up on a side stream, as the CUDA-graph docs ask
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


def test_token_loss_bad_token_on_gpu_is_an_error():
    logits, tokens, adv, mask, _, _ = make_batch(2, 3, 11, torch.float32, seed=7)
    tokens[1, 1] = 11
    with pytest.raises(IndexError, match="tokens must be in"):
        torch.ops.alphagrpo.grpo_token_loss(
            logits.cuda(),
            tokens.cuda(),
            adv[:, None].expand(2, 3).contiguous().cuda(),
            mask.float().cuda(),
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio_level, chunk", [("token", 5), ("sequence", 5), ("sequence", 9)])
def test_grpo_linear_token_loss_cuda(poison, dtype, ratio_level, chunk):
    """The CUDA row backend against the float64 unfused composition, within the error of the unfused
    composition in the same dtype on the GPU (tolerances as in test_grpo_linear_token_loss.py)."""
    B, T, H, V = 2, 7, 64, 769
    batch = cuda(*make_linear_batch(B, T, H, V, dtype, seed=104))
    kw = dict(temperature=0.9, beta=0.04, ratio_level=ratio_level, aggregation="seq-mean-token-mean", dual_clip=3.0)
    ours = run_linear("ours", *batch, chunk_tokens=chunk, **kw)
    ref64 = run_linear("ref64", *batch, **kw)
    reflp = run_linear("reflp", *batch, **kw)
    n_chunks = -(-B * T // chunk) if ratio_level == "token" or chunk < T else -(-B // (chunk // T))
    for name, o, r64, rlp in zip(NAMES, ours, ref64, reflp):
        ulps = 4 + (n_chunks if name == "grad_weight" else 0)
        assert_close_to_ref(o, r64, rlp, k=2.0, ulps=ulps, name=name)


def test_grpo_linear_token_loss_cuda_large_vocab_memory():
    """BAGEL's vocabulary, 4 x 1,024 tokens, bf16, default chunks: the result matches the unfused
    composition and the op's peak memory beyond its outputs stays within two chunks of logits
    (the [4,096 x 151,936] logits alone would be 1.2 GB)."""
    B, T, H, V = 4, 1024, 1024, 151936
    hidden, weight, _, tokens, adv, mask, old, ref = cuda(
        *make_linear_batch(B, T, H, V, torch.bfloat16, seed=105, bias=False)
    )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = K.grpo_linear_token_loss(h, w, tokens, adv, mask, old_logp=old, ref_logp=ref, beta=0.04)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    outputs = h.numel() * 2 + w.numel() * 2  # grad_hidden and grad_weight, bf16
    chunk_bytes = K.build_info()["linear_chunk_bytes"]
    assert peak - outputs <= 2 * chunk_bytes, f"peak {peak / 2**20:.0f} MiB beyond outputs {outputs / 2**20:.0f} MiB"
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss64, m64, p64 = R.grpo_linear_token_loss(
        h64, w64, tokens, adv.double(), mask, None, old.double(), ref.double(), 1.0, 0.2, 0.28, None, 0.04
    )
    gh64, gw64 = torch.autograd.grad(loss64, (h64, w64))
    hl, wl = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lossl, _, pl = R.grpo_linear_token_loss(hl, wl, tokens, adv, mask, None, old, ref, 1.0, 0.2, 0.28, None, 0.04)
    ghl, gwl = torch.autograd.grad(lossl, (hl, wl))
    assert_close_to_ref(out.loss, loss64, lossl, name="loss")
    assert_close_to_ref(out.logp, p64, pl, name="logp")
    assert_close_to_ref(gh, gh64, ghl, name="grad_hidden")
    assert_close_to_ref(gw, gw64, gwl, ulps=4 + 5, name="grad_weight")  # 5 chunks of 883 tokens


def test_grpo_linear_bad_token_on_gpu_is_an_error():
    hidden, weight, _, tokens, adv, mask, _, _ = make_linear_batch(2, 3, 8, 11, torch.float32, seed=106, bias=False)
    tokens[1, 1] = 11
    with pytest.raises(IndexError, match="tokens must be in"):
        torch.ops.alphagrpo.grpo_linear_token_loss(
            *cuda(hidden, weight),
            None,
            tokens.cuda(),
            adv[:, None].expand(2, 3).contiguous().cuda(),
            mask.float().cuda(),
            None,
            None,
            1.0,
            0.2,
            0.2,
            None,
            0.0,
            "token",
            "token-mean",
            2,
            True,
            True,
            False,
        )
