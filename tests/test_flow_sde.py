"""flow_sde_step / flow_sde_logprob: native kernels against the float64 reference."""

import math

import pytest
import torch

from alphagrpo_serve import kernels as K
from alphagrpo_serve.kernels import reference as R
from helpers import assert_close, assert_close_to_ref, seed_of
from test_grpo_token_loss import cpu_isas, use_cpu_isa

pytestmark = pytest.mark.skipif(not K.have_extension(), reason="extension not built")

SHAPES = [(1, 1), (7, 7), (3, 769), (2, 5125), (2, 4, 33, 65), (3, 16, 32, 40)]  # last ones span several chunks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(shape, dtype, seed, cfg=False):
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    vu = torch.randn(shape, generator=g).to(dtype) if cfg else None
    # per-sample timesteps; sample 0 sits at sigma == 1 (the sigma_max branch), the last may end at 0
    sigma = torch.rand(B, generator=g) * 0.8 + 0.15
    sigma[0] = 1.0
    sigma_next = sigma * torch.rand(B, generator=g) * 0.9
    if B > 2:
        sigma_next[-1] = 0.0
    return x, v, noise, vu, sigma, sigma_next


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [False, True])
def test_step_matches_float64_reference(poison, shape, dtype, cfg):
    x, v, noise, vu, s, sn = make_inputs(shape, dtype, seed=seed_of(shape, str(dtype), cfg), cfg=cfg)
    kw = dict(noise_level=0.8, sigma_max=0.95)
    out = K.flow_sde_step(x, v, s, sn, noise=noise, v_uncond=vu, cfg_scale=4.5, **kw)
    ref64 = R.flow_sde_step(
        x.double(),
        v.double(),
        s.double(),
        sn.double(),
        0.8,
        0.95,
        noise.double(),
        None if vu is None else vu.double(),
        4.5,
    )
    reflp = R.flow_sde_step(x, v, s, sn, 0.8, 0.95, noise, vu, 4.5)
    for name, o, r64, rlp in zip(("x_next", "mean", "std", "log_prob"), out, ref64, reflp):
        assert o.dtype == rlp.dtype, f"{name}: dtype {o.dtype} != reference {rlp.dtype}"
        if o.dtype == torch.float32 and name in ("std", "log_prob"):
            # per-sample float32 math: the log-prob averages D squared terms, so the float32 error
            # of the sum grows ~ sqrt(D) ulp; 1e-5 relative is 80 ulp.
            assert_close(o, r64, atol=1e-5, rtol=1e-5, name=name)
        else:
            assert_close_to_ref(o, r64, rlp, name=name)


def test_step_float64_is_exact_to_reference(poison):
    x, v, noise, vu, s, sn = make_inputs((5, 3, 17), torch.float64, seed=3, cfg=True)
    out = K.flow_sde_step(
        x, v, s.double(), sn.double(), noise=noise, v_uncond=vu, cfg_scale=2.0, noise_level=1.1, sigma_max=0.9
    )
    ref = R.flow_sde_step(x, v, s.double(), sn.double(), 1.1, 0.9, noise, vu, 2.0)
    for name, o, r in zip(("x_next", "mean", "std", "log_prob"), out, ref):
        assert_close(o, r, atol=1e-12, rtol=1e-12, name=name)


def test_log_prob_is_gaussian_density_by_hand():
    # One sample, two elements, numbers worked by hand: sigma 0.5 -> 0.25, noise_level 0.5.
    x = torch.tensor([[0.2, -0.4]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    noise = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    out = K.flow_sde_step(x, v, 0.5, 0.25, noise_level=0.5, sigma_max=0.9, noise=noise)
    std = 0.5 * math.sqrt(0.5 / 0.5)  # 0.5
    dt = -0.25
    a = 1 + std**2 / (2 * 0.5) * dt  # 0.9375
    b = (1 + std**2 * 0.5 / (2 * 0.5)) * dt  # -0.28125
    scale = std * math.sqrt(0.25)  # 0.25
    mean = [a * 0.2 + b * 1.0, a * -0.4 + b * 0.5]
    xn = [mean[0] + scale * 0.3, mean[1] + scale * -1.2]
    lp = (
        sum(-((scale * n) ** 2) / (2 * scale**2) - math.log(scale) - 0.5 * math.log(2 * math.pi) for n in (0.3, -1.2))
        / 2
    )
    assert_close(out.mean, torch.tensor([mean], dtype=torch.float64), atol=1e-15, rtol=0, name="mean")
    assert_close(out.x_next, torch.tensor([xn], dtype=torch.float64), atol=1e-15, rtol=0, name="x_next")
    assert abs(out.std.item() - std) < 1e-15
    assert abs(out.log_prob.item() - lp) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_level_zero_is_euler_step_exactly(dtype):
    x, v, noise, _, s, sn = make_inputs((4, 3, 9, 9), dtype, seed=11)
    out = K.flow_sde_step(x, v, s, sn, noise_level=0.0, noise=noise)
    dt = (sn - s).reshape(-1, 1, 1, 1)
    euler = (x.float() + v.float() * dt).to(dtype)
    assert torch.equal(out.x_next, euler), (out.x_next.float() - euler.float()).abs().max()
    assert torch.equal(out.mean, euler)
    assert torch.equal(out.log_prob, torch.zeros(4)), out.log_prob
    assert torch.equal(out.std, torch.zeros(4))


def test_generator_noise_is_reproducible():
    x, v, _, _, s, sn = make_inputs((3, 2, 8, 8), torch.float32, seed=5)
    a = K.flow_sde_step(x, v, s, sn, generator=torch.Generator().manual_seed(7))
    b = K.flow_sde_step(x, v, s, sn, generator=torch.Generator().manual_seed(7))
    c = K.flow_sde_step(x, v, s, sn, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.x_next, b.x_next)
    assert not torch.equal(a.x_next, c.x_next)
    # the drawn noise is standard normal: the implied z-scores have unit variance
    z = (a.x_next - a.mean) / (a.std * (s - sn).sqrt()).reshape(-1, 1, 1, 1)
    assert abs(z.var().item() - 1.0) < 0.25


def test_strided_inputs(poison):
    g = torch.Generator().manual_seed(2)
    big = torch.randn(4, 6, 10, 12, generator=g)
    x = big[:, ::2]  # non-contiguous in dim 1
    v = torch.randn(4, 12, 10, 3, generator=g).permute(0, 3, 2, 1)  # permuted view
    noise = torch.randn(4, 3, 10, 12, generator=g)
    s, sn = torch.tensor([0.9, 0.8, 0.5, 0.3]), torch.tensor([0.8, 0.6, 0.2, 0.0])
    assert not x.is_contiguous() and not v.is_contiguous()
    out = K.flow_sde_step(x, v, s, sn, noise=noise, noise_level=0.6)
    ref = R.flow_sde_step(x.double(), v.double(), s.double(), sn.double(), 0.6, 0.98, noise.double())
    for name, o, r in zip(("x_next", "mean", "std", "log_prob"), out, ref):
        assert_close(o, r, atol=1e-5, rtol=1e-5, name=name)
    lp = K.flow_sde_logprob(x, v, out.x_next, s, sn, noise_level=0.6)
    assert_close(lp, ref[3], atol=1e-5, rtol=1e-5, name="logprob(strided)")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logprob_forward_backward(poison, shape, dtype):
    x, v, noise, _, s, sn = make_inputs(shape, dtype, seed=17)
    kw = dict(noise_level=0.9, sigma_max=0.96)
    x_next = K.flow_sde_step(x, v, s, sn, noise=noise, **kw).x_next
    # the recompute at the sampled point: perturb v (as after an optimiser step)
    v2 = (v.float() + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    vq = v2.clone().requires_grad_()
    xq = x.clone().requires_grad_()
    lp = K.flow_sde_logprob(xq, vq, x_next, s, sn, **kw)
    w = torch.linspace(-1, 1, shape[0])
    gx, gv = torch.autograd.grad((lp * w).sum(), (xq, vq))

    x64 = x.double().requires_grad_()
    v64 = v2.double().requires_grad_()
    lp64 = R.flow_sde_logprob(x64, v64, x_next.double(), s.double(), sn.double(), 0.9, 0.96)
    gx64, gv64 = torch.autograd.grad((lp64 * w.double()).sum(), (x64, v64))
    xl, vl = x.clone().requires_grad_(), v2.clone().requires_grad_()
    lpl = R.flow_sde_logprob(xl, vl, x_next, s, sn, 0.9, 0.96)
    gxl, gvl = torch.autograd.grad((lpl * w).sum(), (xl, vl))
    assert_close(lp, lp64, atol=2e-5, rtol=1e-5, name="log_prob")
    assert_close_to_ref(gv, gv64, gvl, name="grad_v")
    assert_close_to_ref(gx, gx64, gxl, name="grad_x")


def test_recorded_logprob_equals_recompute():
    x, v, noise, _, s, sn = make_inputs((6, 3, 16, 16), torch.float32, seed=23)
    out = K.flow_sde_step(x, v, s, sn, noise=noise, noise_level=0.7, sigma_max=0.9)
    lp = K.flow_sde_logprob(x, v, out.x_next, s, sn, noise_level=0.7, sigma_max=0.9)
    assert_close(lp, out.log_prob, atol=1e-5, rtol=1e-6, name="recompute")


def test_gradcheck_float64():
    x, v, noise, _, s, sn = make_inputs((3, 2, 5), torch.float64, seed=29)
    s, sn = s.double(), sn.double()
    xn = R.flow_sde_step(x, v, s, sn, 0.7, 0.9, noise)[0]
    xq, vq = x.clone().requires_grad_(), (v + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: K.flow_sde_logprob(a, b, xn, s, sn, noise_level=0.7, sigma_max=0.9), (xq, vq)
    )


def test_opcheck():
    x, v, noise, vu, s, sn = make_inputs((3, 2, 5), torch.float32, seed=31, cfg=True)
    torch.library.opcheck(torch.ops.alphagrpo.flow_sde_step.default, (x, v, vu, 3.0, s, sn, 0.7, 0.9, noise))
    torch.library.opcheck(torch.ops.alphagrpo.flow_sde_step.default, (x, v, None, 1.0, s, sn, 0.7, 0.9, noise))
    xn = x + 0.1
    torch.library.opcheck(
        torch.ops.alphagrpo.flow_sde_logprob.default, (x, v.clone().requires_grad_(), xn, s, sn, 0.7, 0.9)
    )
    torch.library.opcheck(
        torch.ops.alphagrpo.flow_sde_logprob_backward.default, (torch.ones(3), x, v, xn, s, sn, 0.7, 0.9, True)
    )


def test_torch_compile_fullgraph():
    x, v, noise, vu, s, sn = make_inputs((3, 2, 5), torch.float32, seed=37, cfg=True)

    def f(x, v, vu, noise, s, sn):
        out = K.flow_sde_step(x, v, s, sn, noise=noise, v_uncond=vu, cfg_scale=2.0, noise_level=0.7, sigma_max=0.9)
        return out.x_next * 2, K.flow_sde_logprob(x, v, out.x_next, s, sn, noise_level=0.7, sigma_max=0.9)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = compiled(x, v, vu, noise, s, sn)
    ea, eb = f(x, v, vu, noise, s, sn)
    assert torch.equal(a, ea) and torch.equal(b, eb)


# ---- bad input ------------------------------------------------------------------------------------
def _good():
    x, v, noise, _, _, _ = make_inputs((2, 3, 4), torch.float32, seed=41)
    return x, v, noise


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(sigma=1.5), ValueError, "sigma must be in (0, 1]"),
        (dict(sigma=0.0), ValueError, "sigma must be in (0, 1]"),
        (dict(sigma_next=0.6), ValueError, "sigma_next must be in [0, sigma)"),
        (dict(sigma_next=-0.1), ValueError, "sigma_next"),
        (dict(noise_level=-0.5), ValueError, "noise_level"),
        (dict(noise_level=float("nan")), ValueError, "noise_level"),
        (dict(sigma_max=1.0), ValueError, "sigma_max"),
        (dict(v=torch.zeros(2, 3, 5)), ValueError, "v must have the shape of x"),
        (dict(v=torch.zeros(2, 3, 4, dtype=torch.float64)), TypeError, "v must have the dtype of x"),
        (dict(noise=torch.zeros(3, 3, 4)), ValueError, "noise must have the shape"),
        (dict(x=torch.zeros(0, 3, 4), v=torch.zeros(0, 3, 4)), ValueError, "batch > 0"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "x must be a floating tensor"),
        (dict(sigma=torch.tensor([0.5, 0.5, 0.5])), ValueError, "sigma must be a float or a [2] tensor"),
    ],
)
def test_bad_input_names_the_argument(change, exc, words):
    x, v, noise = _good()
    args = dict(x=x, v=v, sigma=0.6, sigma_next=0.4, noise=noise, noise_level=0.7, sigma_max=0.9)
    args.update(change)
    with pytest.raises(exc) as info:
        K.flow_sde_step(args.pop("x"), args.pop("v"), args.pop("sigma"), args.pop("sigma_next"), **args)
    assert words in str(info.value)


def test_non_finite_input_is_an_error():
    x, v, noise = _good()
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        K.flow_sde_step(x, v, 0.6, 0.4, noise=noise)
    with pytest.raises(ValueError, match="non-finite"):
        K.flow_sde_logprob(x, v, v, 0.6, 0.4)


def test_direct_op_calls_reject_bad_input_without_crashing():
    x, v, noise = _good()
    s, sn = torch.full((2,), 0.6), torch.full((2,), 0.4)
    with pytest.raises(ValueError, match="v must have the shape of x"):
        torch.ops.alphagrpo.flow_sde_step(x, v[:, :2], None, 1.0, s, sn, 0.7, 0.9, noise)
    with pytest.raises(ValueError, match="sigma must have shape"):
        torch.ops.alphagrpo.flow_sde_step(x, v, None, 1.0, s[:1], sn, 0.7, 0.9, noise)
    with pytest.raises(ValueError, match="sigma_next must be in"):
        torch.ops.alphagrpo.flow_sde_logprob(x, v, x, s, s, 0.7, 0.9)
    with pytest.raises(TypeError, match="noise must have the dtype"):
        torch.ops.alphagrpo.flow_sde_step(x, v, None, 1.0, s, sn, 0.7, 0.9, noise.double())


# ---- every vectorised CPU path --------------------------------------------------------------------
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [False, True])
def test_every_cpu_isa_matches_float64_reference(poison, isa, dtype, cfg):
    """The AVX-512, AVX2 and portable loops (whichever this CPU runs): step, log-prob and its
    gradient at (3, 769) (tails after 16- and 8-wide vectors) against float64, with the same
    tolerances as the tests above; noise_level 0 is still exactly the Euler step."""
    shape = (3, 769)
    x, v, noise, vu, s, sn = make_inputs(shape, dtype, seed=seed_of(isa, str(dtype), cfg), cfg=cfg)
    with use_cpu_isa(isa):
        out = K.flow_sde_step(x, v, s, sn, noise=noise, v_uncond=vu, cfg_scale=4.5, noise_level=0.8, sigma_max=0.95)
        vq = v.clone().requires_grad_()
        lp = K.flow_sde_logprob(x, vq, out.x_next, s, sn, noise_level=0.8, sigma_max=0.95)
        (gv,) = torch.autograd.grad(lp.sum(), vq)
        euler = K.flow_sde_step(x, v, s, sn, noise=noise, noise_level=0.0).x_next
    ref64 = R.flow_sde_step(
        x.double(),
        v.double(),
        s.double(),
        sn.double(),
        0.8,
        0.95,
        noise.double(),
        None if vu is None else vu.double(),
        4.5,
    )
    reflp = R.flow_sde_step(x, v, s, sn, 0.8, 0.95, noise, vu, 4.5)
    for name, o, r64, rlp in zip(("x_next", "mean", "std", "log_prob"), out, ref64, reflp):
        if o.dtype == torch.float32 and name in ("std", "log_prob"):
            assert_close(o, r64, atol=1e-5, rtol=1e-5, name=f"{name} [{isa}]")  # as test_step_matches_float64_reference
        else:
            assert_close_to_ref(o, r64, rlp, name=f"{name} [{isa}]")
    v64 = v.double().requires_grad_()
    lp64 = R.flow_sde_logprob(x.double(), v64, out.x_next.double(), s.double(), sn.double(), 0.8, 0.95)
    (gv64,) = torch.autograd.grad(lp64.sum(), v64)
    vl = v.clone().requires_grad_()
    (gvl,) = torch.autograd.grad(R.flow_sde_logprob(x, vl, out.x_next, s, sn, 0.8, 0.95).sum(), vl)
    assert_close(lp, lp64, atol=2e-5, rtol=1e-5, name=f"log_prob recompute [{isa}]")
    assert_close_to_ref(gv, gv64, gvl, name=f"grad_v [{isa}]")
    assert torch.equal(euler, (x.float() + v.float() * (sn - s)[:, None]).to(dtype)), f"Euler step [{isa}]"
