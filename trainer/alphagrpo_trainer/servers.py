"""The servers a trainer talks to: one blocking client per address, weight pushes to all of them,
restart detection (boot id + policy version), and a local server subprocess for `--server local`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

import grpc

from alphagrpo_serve.client import Client


class ServerError(RuntimeError):
    """A server could not be reached (after retries) or refused a call; the message names it."""


class LocalServer:
    """`alphagrpo serve` in a subprocess on a free 127.0.0.1 port; stop() sends SIGTERM (graceful)."""

    def __init__(
        self,
        policy: Optional[dict] = None,
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 120.0,
        log_path: Optional[str] = None,
        port: int = 0,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
    ):
        """policy: {name, path} as in TrainConfig (default: the tiny UMM's shipped weights)."""
        cmd = [
            sys.executable,
            "-m",
            "alphagrpo_serve.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-prompts",
            "256",
            "--exit-with-parent",
        ]
        policy = policy or {"name": "tiny", "path": None}
        cmd += ["--policy", policy["name"]]
        if policy.get("path"):
            cmd += ["--model", policy["path"]]
        if device:
            cmd += ["--device", device]
        if dtype:
            cmd += ["--dtype", dtype]
        cmd += list(extra_args)
        self.log = open(log_path, "a") if log_path else None
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.log or subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.address = None
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                if self.log:
                    self.log.write(line)
                    self.log.flush()
                m = re.search(r"listening on (\S+:\d+)", line)
                if m and not found.is_set():
                    self.address = m.group(1)
                    found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        deadline = time.time() + start_timeout_s
        while not found.wait(0.2):
            if self.proc.poll() is not None:
                raise ServerError(
                    f"the local server exited with code {self.proc.returncode} before listening"
                    + (f" (log: {log_path})" if log_path else "")
                )
            if time.time() > deadline:
                self.stop()
                raise ServerError(f"the local server did not start listening within {start_timeout_s:.0f} s")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
            self.log = None


class ServerPool:
    """One Client per address. Requests are spread over the addresses; weights go to all of them."""

    def __init__(
        self,
        addresses: Sequence[str],
        timeout_s: float = 300.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        offset: int = 0,
    ):
        if not addresses:
            raise ValueError("no server address given")
        self.addresses = list(addresses)
        self.clients = [Client(a, timeout=timeout_s, retries=retries, backoff=backoff_s) for a in self.addresses]
        self.retries = retries
        self.offset = offset  # rank r starts its round-robin at address r
        self.known: Dict[str, tuple] = {}  # address -> (boot_id, policy_version) after our last push
        self._pool = ThreadPoolExecutor(max_workers=max(8, 2 * len(self.addresses)))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self.clients:
            try:
                c.close()
            except Exception:  # closing a channel to a dead server must not hide the real error
                pass

    def _call(self, i: int, what: str, fn: Callable):
        try:
            return fn(self.clients[i])
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "ERROR"
            tried = f" after {self.retries} retries" if code == grpc.StatusCode.UNAVAILABLE else ""
            raise ServerError(
                f"server {self.addresses[i]}: {what} failed{tried} ({name}: "
                f"{exc.details() if hasattr(exc, 'details') else exc})"
            ) from None

    def map(self, what: str, jobs: Sequence[Callable]) -> List[tuple]:
        """Runs job k on address (offset + k) % n, concurrently; [(address, result)] in job order."""
        n = len(self.clients)
        idx = [(self.offset + k) % n for k in range(len(jobs))]
        futs = [self._pool.submit(self._call, i, what, job) for i, job in zip(idx, jobs)]
        return [(self.addresses[i], f.result()) for i, f in zip(idx, futs)]

    def verify_all(self, prompts: Sequence[str], images: Sequence, chunk: int = 64) -> List:
        """Rewards of (prompt, image) pairs, in chunks spread over the servers, in order."""
        jobs = [
            lambda c, i=i: c.verify(list(prompts[i : i + chunk]), list(images[i : i + chunk]))
            for i in range(0, len(prompts), chunk)
        ]
        return [r for _, part in self.map("Verify", jobs) for r in part]

    def info(self) -> List:
        return [self._call(i, "GetModelInfo", lambda c: c.model_info()) for i in range(len(self.clients))]

    def stale(self, infos: Optional[Sequence] = None) -> List[int]:
        """Indices of servers whose (boot id, version) is not what our last push left: restarted,
        or updated by someone else, or never pushed to. `infos`: their ModelInfo, if just read."""
        out = []
        for i, inf in enumerate(self.info() if infos is None else infos):
            if self.known.get(self.addresses[i]) != (inf.boot_id, inf.policy_version):
                out.append(i)
        return out

    def push(self, tensor_sets: Sequence[tuple], only: Optional[Sequence[int]] = None) -> Dict[str, int]:
        """Pushes each (tensors, lora) set in order to every server (or `only` these); returns
        {address: new policy version}. A refused update raises ServerError naming the server."""
        idx = range(len(self.clients)) if only is None else only
        versions = {}
        for i in idx:
            for tensors, lora in tensor_sets:
                v = self._call(i, "UpdateWeights", lambda c, t=tensors, lo=lora: c.update_weights(t, lora=lo))
            inf = self._call(i, "GetModelInfo", lambda c: c.model_info())
            self.known[self.addresses[i]] = (inf.boot_id, inf.policy_version)
            versions[self.addresses[i]] = v
        return versions

    def expected_version(self, address: str) -> Optional[int]:
        k = self.known.get(address)
        return None if k is None else k[1]
