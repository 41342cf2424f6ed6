"""Kernel microbenchmarks: ours vs the eager PyTorch reference vs torch.compile(reference), in one run.

For every op and shape: median time over repeats, achieved GB/s over the bytes that must move
(each input read once, each output written once), that as a % of the device copy bandwidth
measured in the same run, and peak extra memory. Prints a markdown table, writes JSON, and with
--results appends the table, with date, machine and versions, to benchmarks/RESULTS.md.

    python benchmarks/kernels.py                 # CPU shapes that fit a 2-core machine
    python benchmarks/kernels.py --device cuda   # the GPU shapes (H100/H200)
    python benchmarks/kernels.py --quick         # a smoke run: small shapes, few repeats
    python benchmarks/kernels.py --only grpo_linear_token_loss   # one op's rows

grpo_linear_token_loss (hidden states and LM head in, chunked over tokens) runs forward+backward
(gradients of hidden and weight) against the logits path (hidden @ weight.T, then our
grpo_token_loss), the unfused reference eager and under torch.compile, and on CUDA Liger-Kernel's
LigerFusedLinearGRPOLoss when liger_kernel imports. Its "outputs MiB" column is the size of what
each provider returns (the two gradients, identical for all): peak extra memory includes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # noqa: E402
from alphagrpo_serve import kernels as K  # noqa: E402
from alphagrpo_serve.kernels import reference as R  # noqa: E402


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    mode: str  # fwd | bwd | fwd+bwd
    provider: str
    ms: float
    gbps: float
    pct_copy_bw: float
    peak_extra_mib: float
    speedup_vs_eager: float = float("nan")
    outputs_mib: float = float("nan")  # bytes of the tensors the call returns (part of peak extra)


# ---- measurement ------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    return 0


def peak_extra_bytes(fn: Callable[[], object], device, with_outputs: bool = False):
    """Peak memory above what was allocated before the call. CUDA: the caching allocator's peak.
    CPU (Linux): the process's resident-set high-water mark, reset through /proc/self/clear_refs.
    with_outputs: returns (peak, bytes of the returned tensors) instead."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            return (float("nan"), float("nan")) if with_outputs else float("nan")
        before = _rss_bytes("VmRSS:")
        out = fn()
        peak = max(_rss_bytes("VmHWM:") - before, 0)
    nbytes = _nbytes(out)
    del out
    return (peak, nbytes) if with_outputs else peak


def time_and_peak_interleaved(providers: dict, device, repeats: int):
    """For calls of seconds each on a shared machine: one warm-up call per provider (compilation
    included), then `repeats` rounds that call every provider once in turn, so that load drifting
    over the minutes hits all of them alike; the first round also measures peak memory. Returns
    {name: (median ms, peak extra bytes, output bytes)}, or {name: exception} for one that failed."""
    failed = {}
    for name, fn in providers.items():
        try:
            fn()
        except Exception as exc:  # reported by the caller, not fatal
            failed[name] = exc
        _release(device)
    times = {name: [] for name in providers if name not in failed}
    peaks = {}
    for r in range(repeats):
        for name in times:
            fn = providers[name]
            _sync(device)
            t0 = time.perf_counter()
            if r == 0:
                peaks[name] = peak_extra_bytes(fn, device, with_outputs=True)
            else:
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
            _release(device)
    out = {name: (statistics.median(t), *peaks[name]) for name, t in times.items()}
    out.update(failed)
    return out


def _release(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth_gbps(device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / ms / 1e6


# ---- cases ------------------------------------------------------------------------------------------
def sde_cases(shape, dtype, device, cfg: bool):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device, generator=g)
    v = torch.randn(shape, dtype=dtype, device=device, generator=g)
    vu = torch.randn(shape, dtype=dtype, device=device, generator=g) if cfg else None
    noise = torch.randn(shape, dtype=dtype, device=device, generator=g)
    B = shape[0]
    s = torch.full((B,), 0.7, device=device)
    sn = torch.full((B,), 0.6, device=device)
    el = x.element_size() * x.numel()
    nbytes = el * (6 if cfg else 5)  # read x, v, noise (+ v_uncond); write x_next, mean

    def ours():
        return torch.ops.alphagrpo.flow_sde_step(x, v, vu, 4.0, s, sn, 0.7, 0.9, noise)

    def eager():
        return R.flow_sde_step(x, v, s, sn, 0.7, 0.9, noise, vu, 4.0)

    return {"fwd": (ours, eager, eager, nbytes)}


def logprob_cases(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(shape, dtype=dtype, device=device, generator=g)
    v = torch.randn(shape, dtype=dtype, device=device, generator=g)
    xn = torch.randn(shape, dtype=dtype, device=device, generator=g)
    B = shape[0]
    s, sn = torch.full((B,), 0.7, device=device), torch.full((B,), 0.6, device=device)
    el = x.element_size() * x.numel()
    vq = v.clone().requires_grad_()

    def fb(fn):
        def run():
            lp = fn(x, vq, xn, s, sn, 0.7, 0.9)
            (gv,) = torch.autograd.grad(lp.sum(), vq)
            return gv

        return run

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(x, v, xn, s, sn, 0.7, 0.9)

        return run

    return {
        "fwd": (fwd(torch.ops.alphagrpo.flow_sde_logprob), fwd(R.flow_sde_logprob), None, 3 * el),
        "fwd+bwd": (fb(torch.ops.alphagrpo.flow_sde_logprob), fb(R.flow_sde_logprob), None, 4 * el),
    }


def token_loss_cases(n_tokens, vocab, dtype, device):
    B = 16 if n_tokens >= 16384 else max(1, n_tokens // 1024)
    T = n_tokens // B
    g = torch.Generator(device=device).manual_seed(2)
    logits = torch.randn(B, T, vocab, dtype=dtype, device=device, generator=g)
    tokens = torch.randint(0, vocab, (B, T), device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    mask = torch.ones(B, T, device=device)
    old = torch.full((B, T), -10.5, device=device)
    el = logits.element_size() * logits.numel()
    lq = logits.clone().requires_grad_()

    def ours_fb():
        out = K.grpo_token_loss(lq, tokens, adv, mask, old_logp=old)
        (g_,) = torch.autograd.grad(out.loss, lq)
        return g_

    def ref_fb():
        loss = R.grpo_token_loss(lq, tokens, adv, mask, old)[0]
        (g_,) = torch.autograd.grad(loss, lq)
        return g_

    def ours_f():
        with torch.no_grad():
            return K.grpo_token_loss(logits, tokens, adv, mask, old_logp=old).loss

    def ref_f():
        with torch.no_grad():
            return R.grpo_token_loss(logits, tokens, adv, mask, old)[0]

    return {"fwd": (ours_f, ref_f, None, el), "fwd+bwd": (ours_fb, ref_fb, None, 2 * el)}


def liger_grpo(hidden, weight, tokens, adv, mask, old):
    """Liger-Kernel's fused linear GRPO loss (token-mean = its 'bnpo' loss type, no KL), forward and
    backward; None with the reason when liger_kernel does not import."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as exc:  # not installed, or built for another torch
        return None, f"{type(exc).__name__}: {exc}"
    try:
        loss_fn = LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo", temperature=1.0
        )
    except TypeError:  # older releases: fewer options
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)

    def run():
        out = loss_fn(hidden, weight, tokens, mask, adv, old_per_token_logps=old)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return torch.autograd.grad(loss, (hidden, weight))

    return run, None


def linear_loss_cases(B, T, H, V, dtype, device):
    """grpo_linear_token_loss forward+backward (gradients of hidden and weight) and its providers."""
    g = torch.Generator(device=device).manual_seed(3)
    hidden = torch.randn(B, T, H, dtype=dtype, device=device, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=g) * H**-0.5).to(dtype).requires_grad_()
    tokens = torch.randint(0, V, (B, T), device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    mask = torch.ones(B, T, device=device)
    old = torch.full((B, T), -12.0, device=device)

    def ours():
        out = K.grpo_linear_token_loss(hidden, weight, tokens, adv, mask, old_logp=old)
        return torch.autograd.grad(out.loss, (hidden, weight))

    def logits_path():
        out = K.grpo_token_loss(torch.nn.functional.linear(hidden, weight), tokens, adv, mask, old_logp=old)
        return torch.autograd.grad(out.loss, (hidden, weight))

    def ref():
        loss = R.grpo_linear_token_loss(hidden, weight, tokens, adv, mask, None, old)[0]
        return torch.autograd.grad(loss, (hidden, weight))

    extra = {"logits-path": logits_path}
    if device.type == "cuda":
        liger, why = liger_grpo(hidden, weight, tokens, adv, mask, old)
        if liger is None:
            print(f"  liger provider skipped: {why}", flush=True)
        else:
            extra["liger"] = liger
    # bytes that must move: read hidden and weight twice (forward GEMM, backward GEMMs), write both gradients
    nbytes = 3 * (hidden.numel() + weight.numel()) * hidden.element_size()
    return {"fwd+bwd": (ours, ref, None, nbytes, extra)}


def advantages_cases(groups, G, device):
    r = torch.rand(groups, G, device=device)
    return {
        "fwd": (
            lambda: torch.ops.alphagrpo.grpo_advantages(r, "batch", 1e-4, None),
            lambda: R.grpo_advantages(r, "batch", 1e-4, None),
            None,
            2 * r.numel() * 4,
        )
    }


# ---- driver -----------------------------------------------------------------------------------------
def run(args) -> list:
    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    if device.type == "cpu":
        # glibc serves allocations above its mmap threshold (128 KiB until a larger mmapped block is
        # freed) with fresh pages, faulted in on every call: free one 30 MiB block first so that the
        # outputs of the first case come from the heap like those of every later case.
        torch.empty(30 << 20, dtype=torch.uint8).fill_(0)  # freed at once
    copy_bw = copy_bandwidth_gbps(device, (64 << 20) if device.type == "cpu" else (2 << 30), repeats)
    print(f"device copy bandwidth: {copy_bw:.1f} GB/s", flush=True)
    if device.type == "cuda":
        sde_shapes = [(64, 16, 128, 128), (64, 16, 64, 64)]
        tok_shapes = [(16384, 151936), (4096, 32000)]
        lin_shapes = [((16, 1024, 3584, 151936), torch.bfloat16)]  # 16 x 1,024 tokens, BAGEL's Qwen2 head
    elif args.quick:
        sde_shapes, tok_shapes = [(4, 16, 32, 32)], [(256, 4096)]
        lin_shapes = [((2, 128, 256, 8192), torch.bfloat16)]
    else:
        sde_shapes = [(16, 16, 64, 64)]
        tok_shapes = [(2048, 32000)]
        lin_shapes = [((4, 1024, 1024, 151936), torch.bfloat16), ((4, 1024, 1024, 151936), torch.float32)]
    cases = []  # (op, shape, dtype, modes, slow): slow cases take seconds per call
    for shape in sde_shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for cfg in (False, True):
                cases.append(
                    (
                        f"flow_sde_step{'+cfg' if cfg else ''}",
                        shape,
                        dtype,
                        lambda shape=shape, dtype=dtype, cfg=cfg: sde_cases(shape, dtype, device, cfg),
                        False,
                    )
                )
            cases.append(
                (
                    "flow_sde_logprob",
                    shape,
                    dtype,
                    lambda shape=shape, dtype=dtype: logprob_cases(shape, dtype, device),
                    False,
                )
            )
    for n, vocab in tok_shapes:
        for dtype in (torch.bfloat16, torch.float32) if device.type == "cpu" else (torch.bfloat16,):
            cases.append(
                (
                    "grpo_token_loss",
                    (n, vocab),
                    dtype,
                    lambda n=n, vocab=vocab, dtype=dtype: token_loss_cases(n, vocab, dtype, device),
                    False,
                )
            )
    cases.append(("grpo_advantages", (4096, 16), torch.float32, lambda: advantages_cases(4096, 16, device), False))
    for shape, dtype in lin_shapes:
        cases.append(
            (
                "grpo_linear_token_loss",
                shape,
                dtype,
                lambda shape=shape, dtype=dtype: linear_loss_cases(*shape, dtype, device),
                True,
            )
        )

    rows = []
    for op, shape, dtype, make, slow in cases:
        if args.only and op not in args.only:
            continue
        modes = make()
        for mode, (ours, eager, _, nbytes, *extra) in modes.items():
            providers = {"ours": ours, **(extra[0] if extra else {}), "eager": eager}
            if not args.no_compile:
                providers["compile"] = torch.compile(eager)
            eager_ms = None
            measured = time_and_peak_interleaved(providers, device, args.slow_repeats) if slow else None
            for name, fn in providers.items():
                try:
                    if slow:
                        if isinstance(measured[name], Exception):
                            raise measured[name]
                        ms, peak, out_bytes = measured[name]
                    else:
                        ms = time_ms(fn, device, repeats)
                        peak, out_bytes = peak_extra_bytes(fn, device, with_outputs=True)
                except Exception as exc:  # a provider that cannot run this case is reported, not fatal
                    print(f"  {op} {mode} {name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                finally:
                    _release(device)
                gbps = nbytes / ms / 1e6
                row = Row(
                    op,
                    "x".join(map(str, shape)),
                    str(dtype).replace("torch.", ""),
                    mode,
                    name,
                    ms,
                    gbps,
                    100 * gbps / copy_bw,
                    peak / 2**20,
                    outputs_mib=out_bytes / 2**20,
                )
                if name == "eager":
                    eager_ms = ms
                rows.append(row)
                print(
                    f"  {op:22s} {row.shape:18s} {row.dtype:9s} {mode:8s} {name:11s} {ms:10.3f} ms "
                    f"{gbps:8.1f} GB/s {row.pct_copy_bw:5.1f}% peak+{row.peak_extra_mib:8.1f} MiB "
                    f"(outputs {row.outputs_mib:.1f})",
                    flush=True,
                )
            for r in rows:
                if (
                    r.op == op
                    and r.shape == "x".join(map(str, shape))
                    and r.mode == mode
                    and eager_ms
                    and r.dtype == str(dtype).replace("torch.", "")
                ):
                    r.speedup_vs_eager = eager_ms / r.ms
        del modes
    return rows, copy_bw


def markdown(rows, copy_bw, device_name) -> str:
    lines = [
        f"Device: {device_name}; copy bandwidth measured in the same run: {copy_bw:.1f} GB/s",
        "",
        "| op | shape | dtype | mode | provider | ms | GB/s | % copy BW | peak extra MiB | outputs MiB | x eager |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {r.ms:.3f} | {r.gbps:.1f} | "
            f"{r.pct_copy_bw:.1f} | {r.peak_extra_mib:.1f} | {r.outputs_mib:.1f} | {r.speedup_vs_eager:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per case; the median is reported")
    p.add_argument("--quick", action="store_true", help="small shapes and 3 repeats (a smoke run)")
    p.add_argument(
        "--slow-repeats",
        type=int,
        default=3,
        help="timed rounds of the cases that take seconds per call (grpo_linear_token_loss), which "
        "run their providers interleaved",
    )
    p.add_argument("--only", nargs="*", default=None, help="run only these ops (e.g. grpo_linear_token_loss)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for every provider (on a shared, oversubscribed machine 1 thread "
        "keeps OpenMP barrier waits out of the comparison)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) provider")
    p.add_argument(
        "--json", default=None, help="where to write the rows as JSON (default benchmarks/out/kernels-<device>.json)"
    )
    p.add_argument(
        "--results", default=None, help="append the table with date, machine and versions to this Markdown file"
    )
    args = p.parse_args(argv)
    if not K.have_extension():
        sys.exit(f"the native extension is not built: {K.build_info()['error']}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, copy_bw = run(args)
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    table = markdown(rows, copy_bw, device_name)
    print()
    print(table)
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", f"kernels-{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": device_name, "copy_bw_gbps": copy_bw, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if args.results:
        results.append(
            args.results,
            f"Kernels on {device_name}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}",
            table,
        )


if __name__ == "__main__":
    main()
