"""Server load test on loopback: closed-loop clients (each sends Generate(1 prompt x G=4, 20 steps)
again as soon as the last answer arrives) for a fixed time, against `alphagrpo serve` with
batching on and with batching off (max-batch = G: one request per batch), and, in the same run,
the same model in a direct in-process batched loop at its best batch size (the ceiling). Then the
same closed loop through tritonclient (the KServe v2 model alphagrpo_generate) against the native
client on one server, in alternating rounds (native, KServe, KServe, native, ...).

Reports images/s, p50/p99 latency, mean batch size (from the server's metrics) and server RSS.

    python benchmarks/serve_load.py [--clients 1,8,64,256] [--seconds 20] [--results benchmarks/RESULTS.md]
    python benchmarks/serve_load.py --kserve-only [--kserve-clients 64 --kserve-rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import results  # noqa: E402
from alphagrpo_serve.client import AsyncClient  # noqa: E402

G, STEPS = 4, 20
PROMPTS = [
    "a red circle",
    "three green triangles",
    "a blue square to the left of a yellow circle",
    "a circle and a square",
]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def batch_totals(metrics_port: int):
    """(samples, batches) the server's generate queue has run so far."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    s = re.search(r'alphagrpo_batch_samples_sum\{kind="generate"\} ([0-9.e+]+)', text)
    c = re.search(r'alphagrpo_batch_samples_count\{kind="generate"\} ([0-9.e+]+)', text)
    return (float(s.group(1)), float(c.group(1))) if s and c else (0.0, 0.0)


async def closed_loop(addr: str, clients: int, seconds: float):
    lat = []
    stop = time.monotonic() + seconds

    async def one(i, c):
        while time.monotonic() < stop:
            t = time.monotonic()
            await c.generate([PROMPTS[i % len(PROMPTS)]], group_size=G, steps=STEPS, seed=i, timeout=600)
            lat.append(time.monotonic() - t)

    async with AsyncClient(addr, timeout=600) as c:
        await c.generate([PROMPTS[0]], group_size=G, steps=STEPS)  # warm-up
        t0 = time.monotonic()
        await asyncio.gather(*(one(i, c) for i in range(clients)))
        elapsed = time.monotonic() - t0
    return len(lat) * G / elapsed, lat


async def closed_loop_kserve(addr: str, clients: int, seconds: float):
    """closed_loop's requests through tritonclient.grpc.aio and the KServe model alphagrpo_generate."""
    import numpy as np
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as tca

    def request(i: int):
        ins = []
        for name, datatype, arr in (
            ("prompt", "BYTES", np.array([PROMPTS[i % len(PROMPTS)].encode()], dtype=object)),
            ("group_size", "INT32", np.array([G], np.int32)),
            ("steps", "INT32", np.array([STEPS], np.int32)),
            ("seed", "INT64", np.array([i])),
        ):
            t = tc.InferInput(name, [1], datatype)
            t.set_data_from_numpy(arr)
            ins.append(t)
        return ins

    lat = []
    stop = time.monotonic() + seconds

    async def one(i, c):
        while time.monotonic() < stop:
            t = time.monotonic()
            (await c.infer("alphagrpo_generate", request(i), client_timeout=600)).as_numpy("image")
            lat.append(time.monotonic() - t)

    async with tca.InferenceServerClient(addr) as c:
        await c.infer("alphagrpo_generate", request(0), client_timeout=600)  # warm-up
        t0 = time.monotonic()
        await asyncio.gather(*(one(i, c) for i in range(clients)))
        elapsed = time.monotonic() - t0
    return len(lat) * G / elapsed, lat


async def mixed(addr: str, clients: int, seconds: float):
    """clients / 2 native and clients / 2 tritonclient closed loops at once (their requests share
    batches): each protocol's images/s under exactly the same load."""
    (n_ips, n_lat), (k_ips, k_lat) = await asyncio.gather(
        closed_loop(addr, clients // 2, seconds), closed_loop_kserve(addr, clients - clients // 2, seconds)
    )
    return n_ips, k_ips


def kserve_vs_native(clients: int, seconds: float, rounds: int, results_path=None):
    """The native client and tritonclient against one server (max-batch 64), alternating rounds of
    `seconds` (native, KServe, KServe, native, ...) so that drift in the machine's load hits both;
    then one mixed round, half the clients on each protocol at once."""
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alphagrpo_serve.cli",
            "serve",
            "--port",
            str(port),
            "--max-batch",
            "64",
            "--max-wait-ms",
            "10",
            "--max-queue",
            "100000",
            "--metrics-port",
            str(mport),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    loops = {"native": closed_loop, "KServe (tritonclient)": closed_loop_kserve}
    got = {name: [] for name in loops}
    try:
        for _ in range(20):
            if "listening on" in proc.stdout.readline():
                break
        import threading

        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the log pipe open
        for r in range(rounds):
            for name in list(loops) if r % 2 == 0 else list(loops)[::-1]:
                s0, c0 = batch_totals(mport)
                ips, lat = asyncio.run(loops[name](f"127.0.0.1:{port}", clients, seconds))
                s1, c1 = batch_totals(mport)
                got[name].append((ips, lat, (s1 - s0) / max(c1 - c0, 1)))
                print(
                    f"round {r}: {name:22s} {clients} clients: {ips:6.1f} img/s batch {got[name][-1][2]:.1f}",
                    flush=True,
                )
        mixed_ips = asyncio.run(mixed(f"127.0.0.1:{port}", clients, seconds))
        print(f"mixed round: native {mixed_ips[0]:.1f} img/s, KServe {mixed_ips[1]:.1f} img/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lines = [
        "| client | clients | images/s per round | mean images/s | p50 s | p99 s | mean batch |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    means = {}
    for name, runs in got.items():
        lat = sorted(x for _, ls, _ in runs for x in ls)
        means[name] = statistics.mean(ips for ips, _, _ in runs)
        lines.append(
            f"| {name} | {clients} | {', '.join(f'{ips:.1f}' for ips, _, _ in runs)} | {means[name]:.1f} | "
            f"{statistics.median(lat):.2f} | {lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.2f} | "
            f"{statistics.mean(b for _, _, b in runs):.1f} |"
        )
    native, kserve = means.values()
    lines += [
        "",
        f"KServe / native images/s: {100 * kserve / native:.0f}% (target >= 90%)",
        "",
        f"Mixed round ({clients // 2} native + {clients - clients // 2} tritonclient clients at once, sharing "
        f"batches): native {mixed_ips[0]:.1f} images/s, KServe {mixed_ips[1]:.1f} images/s "
        f"(KServe / native {100 * mixed_ips[1] / mixed_ips[0]:.0f}%)",
    ]
    table = "\n".join(lines)
    print(table)
    if results_path:
        results.append(
            results_path,
            f"Server load, native client vs tritonclient (KServe v2), Generate(1 x G={G}, "
            f"{STEPS} steps), {rounds} alternating rounds of {seconds:g} s",
            table,
        )
    return kserve / native


def ceiling(batch: int, seconds: float) -> float:
    from alphagrpo_serve.models.registry import load_policy

    pol = load_policy("tiny")
    sc, text = pol.resolve_sampling(dict(steps=STEPS)), pol.resolve_text()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    pol.generate(prompts[:4], list(range(4)), sc, text)
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        pol.generate(prompts, list(range(batch)), sc, text)
        n += batch
    return n / (time.monotonic() - t0)


def run_server(max_batch: int, clients_list, seconds: float):
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alphagrpo_serve.cli",
            "serve",
            "--port",
            str(port),
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            "10",
            "--max-queue",
            "100000",
            "--metrics-port",
            str(mport),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rows = []
    try:
        for _ in range(20):
            if "listening on" in proc.stdout.readline():
                break
        for n in clients_list:
            s0, c0 = batch_totals(mport)
            ips, lat = asyncio.run(closed_loop(f"127.0.0.1:{port}", n, seconds))
            s1, c1 = batch_totals(mport)
            lat.sort()
            rows.append(
                (
                    max_batch,
                    n,
                    ips,
                    statistics.median(lat),
                    lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                    (s1 - s0) / max(c1 - c0, 1),
                    rss_mib(proc.pid),
                )
            )
            print(
                f"max-batch {max_batch:3d} clients {n:4d}: {ips:7.1f} img/s p50 {rows[-1][3]:.2f}s "
                f"p99 {rows[-1][4]:.2f}s batch {rows[-1][5]:.1f} rss {rows[-1][6]:.0f} MiB",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows


def rss_growth(requests: int, steps: int, results_path=None):
    """Server RSS after a warm-up of requests // 10, then after `requests` more."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "alphagrpo_serve.cli", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )

    async def send(n):
        async with AsyncClient(f"127.0.0.1:{port}", timeout=600) as c:
            left = [n]

            async def worker(i):
                while left[0] > 0:
                    left[0] -= 1
                    await c.generate([PROMPTS[i % len(PROMPTS)]], group_size=G, steps=steps, seed=left[0])

            await asyncio.gather(*(worker(i) for i in range(8)))

    try:
        for _ in range(20):
            if "listening on" in proc.stdout.readline():
                break
        asyncio.run(send(max(requests // 10, 100)))
        before = rss_mib(proc.pid)
        t = time.monotonic()
        asyncio.run(send(requests))
        after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    table = (
        f"| requests after warm-up | seconds | RSS before MiB | RSS after MiB | growth |\n|---:|---:|---:|---:|---:|\n"
        f"| {requests} (G={G}, {steps} steps, 8 clients) | {time.monotonic() - t:.0f} | {before:.0f} | {after:.0f} | "
        f"{100 * (after - before) / before:+.1f}% |"
    )
    print(table)
    if results_path:
        results.append(results_path, "Server RSS over many requests", table)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,64,256", help="closed-loop client counts (default 1,8,64,256)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per measurement (default 20)")
    p.add_argument(
        "--unbatched-clients",
        type=int,
        default=64,
        help="clients against the server with batching off, --max-batch 1 (default 64)",
    )
    p.add_argument(
        "--rss-requests",
        type=int,
        default=0,
        help="instead: send this many requests (8 clients, --rss-steps steps) and report RSS growth after warm-up",
    )
    p.add_argument("--rss-steps", type=int, default=2, help="sampling steps of the RSS run's requests (default 2)")
    p.add_argument("--results", default=None, help="append the table with date and machine to this Markdown file")
    p.add_argument(
        "--kserve-clients",
        type=int,
        default=64,
        help="clients of the native vs tritonclient (KServe v2) comparison (default 64; 0: skip it)",
    )
    p.add_argument(
        "--kserve-rounds", type=int, default=4, help="alternating rounds of each client in that comparison (default 4)"
    )
    p.add_argument("--kserve-only", action="store_true", help="run only the native vs tritonclient comparison")
    args = p.parse_args(argv)
    if args.kserve_only:
        return kserve_vs_native(args.kserve_clients, args.seconds, args.kserve_rounds, args.results)
    if args.rss_requests:
        return rss_growth(args.rss_requests, args.rss_steps, args.results)
    clients = [int(c) for c in args.clients.split(",")]
    ceil = ceiling(64, args.seconds)
    print(f"ceiling (direct, batch 64): {ceil:.1f} img/s", flush=True)
    rows = run_server(64, clients, args.seconds) + run_server(1, [args.unbatched_clients], args.seconds)
    lines = [
        f"Ceiling (in-process loop, batch 64): {ceil:.1f} images/s",
        "",
        "| max-batch | clients | images/s | % of ceiling | p50 s | p99 s | mean batch | server RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mb, n, ips, p50, p99, b, rss in rows:
        lines.append(
            f"| {mb} | {n} | {ips:.1f} | {100 * ips / ceil:.0f}% | {p50:.2f} | {p99:.2f} | {b:.1f} | {rss:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.results:
        results.append(args.results, f"Server load, Generate(1 x G={G}, {STEPS} steps)", table)
    if args.kserve_clients:
        kserve_vs_native(args.kserve_clients, args.seconds, args.kserve_rounds, args.results)


if __name__ == "__main__":
    main()
