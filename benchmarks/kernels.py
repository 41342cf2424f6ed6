"""Kernel microbenchmarks: ours vs the eager PyTorch reference vs torch.compile(reference), in one run.

For every op and shape: median time over repeats, achieved GB/s over the bytes that must move
(each input read once, each output written once), that as a % of the device copy bandwidth
measured in the same run, and peak extra memory. Prints a markdown table, writes JSON, and with
--results appends the table, with date, machine and versions, to benchmarks/RESULTS.md.

    python benchmarks/kernels.py                 # CPU shapes that fit a 2-core machine
    python benchmarks/kernels.py --device cuda   # the GPU shapes (H100/H200)
    python benchmarks/kernels.py --quick         # a smoke run: small shapes, few repeats
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


def peak_extra_bytes(fn: Callable[[], object], device) -> float:
    """Peak memory above what was allocated before the call. CUDA: the caching allocator's peak.
    CPU (Linux): the process's resident-set high-water mark, reset through /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _rss_bytes("VmRSS:")
    out = fn()
    peak = _rss_bytes("VmHWM:")
    del out
    return max(peak - before, 0)


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


def advantages_cases(groups, G, device):
    r = torch.rand(groups, G, device=device)
    return {"fwd": (lambda: torch.ops.alphagrpo.grpo_advantages(r, "batch", 1e-4, None),
                    lambda: R.grpo_advantages(r, "batch", 1e-4, None), None, 2 * r.numel() * 4)}


# ---- driver -----------------------------------------------------------------------------------------
def run(args) -> list:
    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    copy_bw = copy_bandwidth_gbps(device, (64 << 20) if device.type == "cpu" else (2 << 30), repeats)
    print(f"device copy bandwidth: {copy_bw:.1f} GB/s", flush=True)
    if device.type == "cuda":
        sde_shapes = [(64, 16, 128, 128), (64, 16, 64, 64)]
        tok_shapes = [(16384, 151936), (4096, 32000)]
    elif args.quick:
        sde_shapes, tok_shapes = [(4, 16, 32, 32)], [(256, 4096)]
    else:
        sde_shapes = [(16, 16, 64, 64)]
        tok_shapes = [(2048, 32000)]
    cases = []
    for shape in sde_shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for cfg in (False, True):
                cases.append((f"flow_sde_step{'+cfg' if cfg else ''}", shape, dtype, sde_cases(shape, dtype, device, cfg)))
            cases.append(("flow_sde_logprob", shape, dtype, logprob_cases(shape, dtype, device)))
    for n, vocab in tok_shapes:
        cases.append(("grpo_token_loss", (n, vocab), torch.bfloat16, token_loss_cases(n, vocab, torch.bfloat16, device)))
        if device.type == "cpu":
            cases.append(("grpo_token_loss", (n, vocab), torch.float32, token_loss_cases(n, vocab, torch.float32, device)))
    cases.append(("grpo_advantages", (4096, 16), torch.float32, advantages_cases(4096, 16, device)))

    rows = []
    for op, shape, dtype, modes in cases:
        for mode, (ours, eager, _, nbytes) in modes.items():
            providers = {"ours": ours, "eager": eager}
            if not args.no_compile:
                providers["compile"] = torch.compile(eager)
            eager_ms = None
            for name, fn in providers.items():
                try:
                    ms = time_ms(fn, device, repeats)
                    peak = peak_extra_bytes(fn, device)
                except Exception as exc:  # a provider that cannot run this case is reported, not fatal
                    print(f"  {op} {mode} {name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                gbps = nbytes / ms / 1e6
                row = Row(op, "x".join(map(str, shape)), str(dtype).replace("torch.", ""), mode, name, ms, gbps,
                          100 * gbps / copy_bw, peak / 2**20)
                if name == "eager":
                    eager_ms = ms
                rows.append(row)
                print(f"  {op:22s} {row.shape:18s} {row.dtype:9s} {mode:8s} {name:8s} {ms:9.3f} ms "
                      f"{gbps:8.1f} GB/s {row.pct_copy_bw:5.1f}% peak+{row.peak_extra_mib:8.1f} MiB", flush=True)
            for r in rows:
                if r.op == op and r.shape == "x".join(map(str, shape)) and r.mode == mode and eager_ms and \
                        r.dtype == str(dtype).replace("torch.", ""):
                    r.speedup_vs_eager = eager_ms / r.ms
    return rows, copy_bw


def markdown(rows, copy_bw, device_name) -> str:
    lines = [f"Device: {device_name}; copy bandwidth measured in the same run: {copy_bw:.1f} GB/s", "",
             "| op | shape | dtype | mode | provider | ms | GB/s | % copy BW | peak extra MiB | x eager |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {r.ms:.3f} | {r.gbps:.1f} | "
                     f"{r.pct_copy_bw:.1f} | {r.peak_extra_mib:.1f} | {r.speedup_vs_eager:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per case; the median is reported")
    p.add_argument("--quick", action="store_true", help="small shapes and 3 repeats (a smoke run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) provider")
    p.add_argument("--json", default=None, help="where to write the rows as JSON (default benchmarks/out/kernels-<device>.json)")
    p.add_argument("--results", default=None, help="append the table with date, machine and versions to this Markdown file")
    args = p.parse_args(argv)
    if not K.have_extension():
        sys.exit(f"the native extension is not built: {K.build_info()['error']}")
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
        results.append(args.results, f"Kernels on {device_name}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}",
                       table)


if __name__ == "__main__":
    main()
