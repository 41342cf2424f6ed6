"""Assertion helpers for kernel tests: they say where and by how much values differ."""

from __future__ import annotations

import zlib

import torch


def seed_of(*parts) -> int:
    """A stable seed from test parameters (Python's hash() of str is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _where(diff: torch.Tensor) -> str:
    flat = int(torch.argmax(diff.reshape(-1)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return f"index {idx}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "value"):
    """Elementwise |actual - expected| <= atol + rtol |expected| (in float64), NaN never passes."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bad_nan = torch.isnan(a) & ~torch.isnan(e)
    assert not bad_nan.any(), (
        f"{name}: {int(bad_nan.sum())} NaN values (first at {_where(bad_nan.double())}); unwritten output?"
    )
    diff = (a - e).abs()
    excess = diff - (atol + rtol * e.abs())
    if (excess > 0).any():
        i = _where(excess)
        flat = int(torch.argmax(excess.reshape(-1)))
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())}/{a.numel()} elements out of tolerance (atol={atol:g}, rtol={rtol:g}); "
            f"worst at {i}: actual {a.reshape(-1)[flat].item():.9g} vs expected {e.reshape(-1)[flat].item():.9g} "
            f"(|diff| {diff.reshape(-1)[flat].item():.3g}); max |diff| overall {diff.max().item():.3g}"
        )


def assert_close_to_ref(
    ours: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowp: torch.Tensor,
    *,
    k: float = 2.0,
    ulps: float = 4.0,
    name: str = "value",
):
    """The fast path's max error against the float64 reference is within k times the error of the
    plain-PyTorch reference run in the low-precision dtype itself, plus a floor of `ulps` ulp of
    the output dtype at the output's scale (for outputs PyTorch happens to compute exactly)."""
    o, r, lp = ours.detach().double().cpu(), ref64.detach().double().cpu(), ref_lowp.detach().double().cpu()
    assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != expected {tuple(r.shape)}"
    assert not torch.isnan(o).any(), f"{name}: NaN in output (first at {_where(torch.isnan(o).double())})"
    err = (o - r).abs()
    base = (lp - r).abs().max().item()
    floor = ulps * torch.finfo(ours.dtype).eps * max(r.abs().max().item(), 1e-3)
    tol = k * base + floor
    if err.max().item() > tol:
        flat = int(torch.argmax(err.reshape(-1)))
        raise AssertionError(
            f"{name} ({ours.dtype}): max error {err.max().item():.3e} at {_where(err)} (ours "
            f"{o.reshape(-1)[flat].item():.9g}, float64 reference {r.reshape(-1)[flat].item():.9g}) exceeds "
            f"{tol:.3e} = {k} x the PyTorch reference's own {ours.dtype} error {base:.3e} + floor {floor:.3e}"
        )
