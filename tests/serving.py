"""Shared helpers of the server tests: a small random tiny UMM and an in-process server on a free
127.0.0.1 port (stopped at the end), a bounded asyncio runner, a self-signed certificate, and a
bounded wait for a child process's status line."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import subprocess
import threading
import time

import pytest
import torch

from alphagrpo_serve.models.tiny_policy import TinyPolicy
from alphagrpo_serve.models.tiny_umm import TinyUMM, TinyUMMConfig
from alphagrpo_serve.models.tokenizer import Tokenizer
from alphagrpo_serve.reward import embedded_reward
from alphagrpo_serve.server.app import ServeConfig, Server


def small_policy():
    torch.manual_seed(0)
    return TinyPolicy(TinyUMM(TinyUMMConfig(vocab_size=len(Tokenizer()), width=32, layers=1, heads=1)))


@contextlib.asynccontextmanager
async def running(policy=None, **cfg):
    server = Server(
        ServeConfig(host="127.0.0.1", port=0, **cfg), policy=policy or small_policy(), reward=embedded_reward()
    )
    port = await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=1.0)


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def self_signed_cert(folder):
    """(key, cert) paths of a fresh self-signed certificate for localhost and 127.0.0.1, written by
    openssl into `folder`; skips the test when openssl cannot make one."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    args = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
    args += ["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    made = subprocess.run(args, capture_output=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {made.stderr[-300:]}")
    return key, cert


def wait_for_line(proc: subprocess.Popen, marker: str, timeout_s: float = 120.0) -> list:
    """The lines a child process (text stdout pipe) prints up to and including the first that
    contains `marker`; fewer when its stdout closes or `timeout_s` passes first. A reader thread does
    the blocking reads, so a silent child cannot hold the test past the deadline; it stops reading
    at the marker, so the caller may go on reading proc.stdout."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in iter(proc.stdout.readline, ""):
            lines.put(line)
            if marker in line:
                break
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return seen
        if line is None:
            return seen
        seen.append(line)
        if marker in line:
            return seen
