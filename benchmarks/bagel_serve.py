"""BAGEL behind `alphagrpo serve`, measured on this machine (tiny random checkpoints in the official
layout, CPU): one run, everything compared within it.

1. Rollout throughput: 4 prompts x G = 8 (16 steps, SDE window of 10 with trajectories, the paper's
   rollout settings) as one batched request, vs the same 32 images requested one at a time
   (vLLM-Omni's default BAGEL deployment serves one request at a time, batch 1); rounds
   alternate, medians reported. The same seeds give the same images both ways.
2. G = 8 from one prefill vs 8 prefills (in-process, BagelPolicy.share_prefill): the prefill
   alone and the whole Generate, for a think context and a refinement (SRR) context.
3. Peak memory: the server's peak RSS (VmHWM) and this process's.
4. UpdateWeights throughput over gRPC chunks (1 MiB): a full push and a LoRA push (r 32 on both
   experts) of a mid-size BAGEL (hidden 1024, 4 MoT layers, float32), and what that means for
   BAGEL-7B-MoT's ~29 GB of bf16 weights.

    python benchmarks/bagel_serve.py [--rounds 3] [--threads 1] [--results benchmarks/RESULTS.md]

One intra-op thread by default (server and this process): on a shared 2-core machine more threads
oversubscribe the cores and every number turns to noise.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "trainer"), os.path.join(REPO, "tools"), os.path.dirname(__file__)]

import make_tiny_bagel  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import results  # noqa: E402
from alphagrpo_serve.client import Client  # noqa: E402

PROMPTS = [
    "a red circle",
    "a blue square to the left of a yellow triangle",
    "three green triangles",
    "a purple circle above an orange square",
]
G, STEPS, WINDOW = 8, 16, (0, 10)


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def rollout_throughput(addr: str, rounds: int) -> dict:
    kw = dict(steps=STEPS, mode="sde", sde_window=WINDOW, return_trajectory=True)
    batched, single = [], []
    with Client(addr, timeout=600) as c:
        c.generate(PROMPTS[:1], group_size=2, seed=0, **kw)  # warm-up
        for _ in range(rounds):
            t = time.perf_counter()
            a = c.generate(PROMPTS, group_size=G, seed=100, **kw)
            batched.append(len(a) / (time.perf_counter() - t))
            t = time.perf_counter()
            b = [
                c.generate([p], group_size=1, seed=100 + i * G + j, **kw)[0]
                for i, p in enumerate(PROMPTS)
                for j in range(G)
            ]
            single.append(len(b) / (time.perf_counter() - t))
        same = max(int(np.abs(x.image.astype(int) - y.image.astype(int)).max()) for x, y in zip(a, b))
    return {"batched": statistics.median(batched), "single": statistics.median(single), "max_pixel_diff": same}


def prefill_sharing(path: str, rounds: int) -> list:
    from alphagrpo_serve.models.bagel import prefill
    from alphagrpo_serve.models.bagel.contexts import materialise, shared_prefill
    from alphagrpo_serve.models.bagel.policy import BagelPolicy

    pol = BagelPolicy.load(path)
    sc = pol.resolve_sampling(dict(steps=STEPS, mode="sde", sde_window=WINDOW))
    rc = pol.resolve_sampling(dict(steps=STEPS, mode="sde", sde_window=WINDOW), reflect=True)
    text = pol.resolve_text(dict(max_tokens=16))
    first = pol.generate(PROMPTS[:1], [0], pol.resolve_sampling(dict(steps=2)), text)[0].image
    rows = []
    for job, run, rows_of in (
        (
            "think (system + prompt)",
            lambda: pol.generate([PROMPTS[1]] * G, list(range(G)), sc, text, think=True),
            lambda: [pol.contexts.prefix(j) for j in pol._jobs([PROMPTS[1]] * G, [True] * G, None, sc)[0]],
        ),
        (
            "refine (system + image + prompt)",
            lambda: pol.reflect([PROMPTS[1]] * G, [first] * G, list(range(G)), rc, text),
            None,
        ),
    ):
        out = {}
        for share in (True, False):
            pol.share_prefill = share
            with torch.no_grad():
                if rows_of is None:
                    jobs, imset = pol._jobs([PROMPTS[1]] * G, [True] * G, [first] * G, rc)
                    ctx = [pol.contexts.prefix(j) for j in jobs]
                else:
                    ctx, imset = rows_of(), None
                shared_prefill(pol.model, ctx, imset, share)  # warm-up
                t_pre, t_all = [], []
                for _ in range(rounds):
                    t = time.perf_counter()
                    shared_prefill(pol.model, ctx, imset, share)
                    t_pre.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    run()
                    t_all.append(time.perf_counter() - t)
            tokens = int(prefill(pol.model, [materialise(ctx[0], imset)]).valid.sum())
            out[share] = (statistics.median(t_pre), statistics.median(t_all), tokens)
        pol.share_prefill = True
        rows.append((job, out))
    return rows


def mid_size_checkpoint(out: str) -> str:
    """A mid-size BAGEL in the official layout (hidden 1024, 4 MoT layers) for the push benchmark."""
    m = make_tiny_bagel
    saved = (m.HIDDEN, m.INTER, m.LAYERS, m.HEADS, m.KV_HEADS, m.HEAD_DIM)
    m.HIDDEN, m.INTER, m.LAYERS, m.HEADS, m.KV_HEADS = 1024, 2816, 4, 16, 4
    m.HEAD_DIM = m.HIDDEN // m.HEADS
    try:
        return m.write(out, seed=0)
    finally:
        m.HIDDEN, m.INTER, m.LAYERS, m.HEADS, m.KV_HEADS, m.HEAD_DIM = saved


def push_throughput(path: str, rounds: int, log) -> dict:
    from alphagrpo_serve.models.bagel.policy import BagelPolicy
    from alphagrpo_trainer.servers import LocalServer

    local = BagelPolicy.load(path)
    full = local.export_weights()
    local.enable_lora(32, 64.0)
    lora = local.export_weights(lora=True)
    sizes = {
        "full": sum(t.numel() * t.element_size() for t in full.values()),
        "lora": sum(t.numel() * t.element_size() for t in lora.values()),
    }
    server = LocalServer({"name": "bagel", "path": path}, extra_args=["--task", "shapes"], start_timeout_s=600)
    try:
        res = {}
        with Client(server.address, timeout=600) as c:
            for kind, tensors in (("full", full), ("lora", lora)):
                times = []
                for _ in range(rounds):
                    t = time.perf_counter()
                    c.update_weights(tensors, lora=kind == "lora")
                    times.append(time.perf_counter() - t)
                res[kind] = (sizes[kind], statistics.median(times))
                log(f"  {kind}: {sizes[kind] / 2**20:.1f} MiB in {statistics.median(times):.2f} s")
        res["server_hwm"] = vm_hwm_mib(server.proc.pid)
    finally:
        server.stop()
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the servers and this process")
    ap.add_argument("--results", default=None, help="append the tables to this Markdown file")
    args = ap.parse_args(argv)
    from alphagrpo_trainer.servers import LocalServer

    log = print
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the servers inherit it
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_bagel.write(os.path.join(tmp, "tiny"), seed=0)
        log("1. rollout throughput (tiny BAGEL, 64x64) ...")
        server = LocalServer({"name": "bagel", "path": tiny}, extra_args=["--task", "shapes", "--max-batch", "64"])
        try:
            thr = rollout_throughput(server.address, args.rounds)
            server_hwm = vm_hwm_mib(server.proc.pid)
        finally:
            server.stop()
        log(f"  {thr}")
        log("2. prefill sharing ...")
        share = prefill_sharing(tiny, args.rounds)
        log("4. UpdateWeights throughput (mid-size BAGEL) ...")
        mid = mid_size_checkpoint(os.path.join(tmp, "mid"))
        push = push_throughput(mid, args.rounds, log)
    own_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; tiny BAGEL (hidden 128, 2 MoT layers, "
        f"vocabulary ~430, 64x64 canvas = 16 latent tokens); {args.rounds} rounds, medians.",
        "",
        f"Rollouts: {len(PROMPTS)} prompts x G={G}, {STEPS} steps, SDE window {WINDOW[1]} with trajectories, "
        f"guidance 4.0 in (0.4, 1] (two branches on those steps).",
        "",
        "| serving | images/s | speed-up |",
        "|---|---:|---:|",
        f"| one request of 4 prompts x G=8 (one batch of 32, shared prefills) | {thr['batched']:.2f} | "
        f"{thr['batched'] / thr['single']:.1f}x |",
        f"| the same 32 images, one request at a time (batch 1) | {thr['single']:.2f} | 1.0x |",
        "",
        f"Same seeds, same images both ways: largest pixel difference {thr['max_pixel_diff']} (of 255).",
        "",
        "| G = 8 samples of one prompt | context tokens | prefill, one (shared) | prefill, 8 | "
        "Generate, shared | Generate, 8 prefills |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for job, out in share:
        (p1, a1, n), (p8, a8, _) = out[True], out[False]
        lines.append(
            f"| {job} | {n} | {p1 * 1e3:.1f} ms | {p8 * 1e3:.1f} ms ({p8 / p1:.1f}x) | {a1:.2f} s | {a8:.2f} s |"
        )
    gb = 29e9
    full_b, full_t = push["full"]
    lora_b, lora_t = push["lora"]
    full_rate, lora_rate = full_b / full_t / 2**20, lora_b / lora_t / 2**20
    lines += [
        "",
        f"Peak RSS: serving process {server_hwm:.0f} MiB (tiny, batch 32), push server "
        f"{push['server_hwm']:.0f} MiB (mid-size), this process {own_hwm:.0f} MiB.",
        "",
        "| UpdateWeights (mid-size BAGEL: hidden 1024, 4 MoT layers, float32) | MiB | s | MiB/s |",
        "|---|---:|---:|---:|",
        f"| full weights by official names | {full_b / 2**20:.1f} | {full_t:.2f} | {full_rate:.0f} |",
        f"| LoRA adapters (r 32, both experts) | {lora_b / 2**20:.1f} | {lora_t:.2f} | {lora_rate:.0f} |",
        "",
        f"At {full_rate:.0f} MiB/s a full BAGEL-7B-MoT push (~29 GB bf16) takes about "
        f"{gb / 2**20 / full_rate / 60:.1f} minutes per server.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.results:
        results.append(args.results, "BAGEL serving, prefill sharing, UpdateWeights (benchmarks/bagel_serve.py)", table)


if __name__ == "__main__":
    main()
