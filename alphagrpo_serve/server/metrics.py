"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


def cancelled_code(context) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: its deadline passed (DEADLINE_EXCEEDED) or the client went away
    (CANCELLED); an explicit code set before the cancellation wins."""
    if isinstance(context.code(), grpc.StatusCode):
        return context.code()
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0.001:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("alphagrpo_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.latency = Histogram(
            "alphagrpo_request_seconds",
            "RPC latency by method",
            ["method"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_size = Histogram(
            "alphagrpo_batch_samples",
            "samples per model batch",
            ["kind"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_seconds = Histogram("alphagrpo_batch_seconds", "model time per batch", ["kind"], registry=r)
        self.queue_depth = Gauge("alphagrpo_queue_samples", "samples waiting, by queue", ["kind"], registry=r)
        self.images = Counter("alphagrpo_images", "images produced", registry=r)
        self.policy_version = Gauge("alphagrpo_policy_version", "version of the served weights", registry=r)

    @contextlib.contextmanager
    def track(self, method: str, context):
        """Records the call under the status code its client sees: OK, the code it was aborted with,
        DEADLINE_EXCEEDED or CANCELLED when gRPC cancelled the handler (deadline passed, client gone),
        UNKNOWN for any other exception (what gRPC answers then)."""
        start = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            yield
        except asyncio.CancelledError:
            code = cancelled_code(context)
            raise
        except BaseException:
            code = context.code() if isinstance(context.code(), grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.record(method, code, time.monotonic() - start)

    def record(self, method: str, code: grpc.StatusCode, seconds: float = 0.0) -> None:
        """One finished call: the counter, the latency histogram and a log line."""
        self.requests.labels(method, code.name).inc()
        self.latency.labels(method).observe(seconds)
        logging.getLogger("alphagrpo.server").info(
            json.dumps({"event": "rpc", "method": method, "code": code.name, "seconds": round(seconds, 4)})
        )

    def count(self, method: str, code: str) -> int:
        """Calls recorded so far for (method, code name)."""
        value = self.registry.get_sample_value("alphagrpo_requests_total", {"method": method, "code": code})
        return int(value or 0)

    def on_queue(self, kind: str, samples: int) -> None:
        self.queue_depth.labels(kind).set(samples)

    def on_batch(self, kind: str, samples: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(samples)
        self.batch_seconds.labels(kind).observe(seconds)

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Exposes /metrics on host:port; returns the server (call .shutdown() to stop)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
