"""A/B server load between two checkouts: the same closed-loop load (64 clients, Generate 1 x G=4,
20 steps, raw stubs) against `alphagrpo serve` of checkout A and of checkout B, in alternating
rounds, so that whatever else the machine does hits both alike.

    git worktree add /tmp/base <commit> && (cd /tmp/base && python tools/gen_protos.py && python setup.py build_ext --inplace)
    python benchmarks/serve_ab.py --a /tmp/base --b . [--rounds 4 --seconds 30 --clients 64]
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alphagrpo_serve._proto.alphagrpo.v1 import policy_pb2, policy_pb2_grpc  # noqa: E402

PROMPTS = [
    "a red circle",
    "three green triangles",
    "a blue square to the left of a yellow circle",
    "a circle and a square",
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


async def closed_loop(addr, clients, seconds):
    n = 0
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        req = lambda i: policy_pb2.GenerateRequest(
            prompts=[PROMPTS[i % 4]], group_size=4, seed=i, params=policy_pb2.SamplingParams(steps=20)
        )
        await stub.Generate(req(0), timeout=600)
        stop = time.monotonic() + seconds

        async def one(i):
            nonlocal n
            while time.monotonic() < stop:
                await stub.Generate(req(i), timeout=600)
                n += 4

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(clients)))
        return n / (time.monotonic() - t0)


def run(tree, clients, seconds):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{tree}:{tree}/trainer")
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
        ],
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(50):
            if "listening on" in proc.stdout.readline():
                break
        return asyncio.run(closed_loop(f"127.0.0.1:{port}", clients, seconds))
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="checkout A (its extension and stubs built)")
    p.add_argument("--b", required=True, help="checkout B")
    p.add_argument("--rounds", type=int, default=4, help="rounds; each runs A and B, the order alternating (default 4)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per measurement (default 30)")
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients (default 64)")
    args = p.parse_args()
    trees = [("A", os.path.abspath(args.a)), ("B", os.path.abspath(args.b))]
    rows = []
    for r in range(args.rounds):
        for name, tree in trees if r % 2 == 0 else trees[::-1]:
            ips = run(tree, args.clients, args.seconds)
            rows.append((r, name, ips))
            print(r, name, f"{ips:.2f} img/s", "load", os.getloadavg(), flush=True)
    for name, _ in trees:
        v = [x for _, n, x in rows if n == name]
        print(f"{name}: mean {sum(v) / len(v):.2f} img/s over {len(v)} rounds (min {min(v):.2f}, max {max(v):.2f})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
