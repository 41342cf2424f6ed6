"""`alphagrpo serve`: a grpc.aio server with PolicyService, RewardService, gRPC health checking
(NOT_SERVING while loading and while draining) and server reflection, optional bearer-token auth
and TLS, Prometheus metrics, and a graceful stop on SIGTERM/SIGINT (stop accepting, drain in-flight
work up to the grace period, exit 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass, field
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .._proto.alphagrpo.v1 import policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from ..engine import Engine
from ..models.registry import load_policy
from ..tasks.registry import load_task
from .guard import MalformedRequestGuard
from .metrics import Metrics
from .policy_service import PolicyServicer
from .reward_service import RewardServicer
from .validation import Limits

log = logging.getLogger("alphagrpo.server")
UNAUTHENTICATED_OK = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    policy: str = "tiny"  # registry name (models/registry.py)
    model: Optional[str] = None  # the policy's weights: a file or folder (default: the policy's own default)
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: Optional[str] = None  # float32 | bfloat16 | float16 (default: the policy's default for the device)
    task: Optional[str] = None  # prompt domain (tasks/registry.py); default: the policy's, else "open"
    reward: str = "embedded"  # embedded (the task's own reward) | openai
    decomposer_url: Optional[str] = None  # --reward openai: OpenAI-compatible API base of the decomposer LLM
    decomposer_model: Optional[str] = None
    verifier_url: Optional[str] = None  # ... and of the verifier MLLM
    verifier_model: Optional[str] = None
    reward_api_key: Optional[str] = None
    reward_concurrency: int = 16  # requests in flight per reward backend
    decomposition_cache: Optional[str] = None  # JSONL cache of decompositions (read at start, appended to)
    reward_url: Optional[str] = None  # --reward kserve: HOST:PORT of a KServe v2 server hosting a verifier model
    reward_model: Optional[str] = None  # ... its name there (the alphagrpo_verify signature, docs/kserve.md)
    reward_ca_cert: Optional[str] = None  # ... PEM root certificate: talk TLS to it
    kserve: bool = True  # also serve the KServe v2 / Triton inference protocol (server/kserve.py)
    kserve_port: Optional[int] = None  # None: on `port` beside the native services; N: on its own port
    max_batch: int = 64  # samples per model batch
    max_wait_ms: float = 5.0  # longest wait for a batch to fill
    max_queue: int = 1024  # samples queued per request kind before RESOURCE_EXHAUSTED
    max_message_mb: int = 64  # gRPC message size limit, both directions
    auth_token_file: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    metrics_port: int = 0  # 0: no metrics endpoint
    grace_s: float = 10.0
    exit_with_parent: bool = False  # stop (gracefully) when the process that started this one exits
    limits: Limits = field(default_factory=Limits)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method but health checking and reflection."""

    def __init__(self, token: str, metrics: Optional[Metrics] = None):
        self.expected = f"Bearer {token}"
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        if details.method.startswith(UNAUTHENTICATED_OK):
            return await continuation(details)
        meta = dict(details.invocation_metadata or ())
        if meta.get("authorization") == self.expected:
            return await continuation(details)
        handler = await continuation(details)
        why = "missing authorization metadata" if "authorization" not in meta else "wrong token"
        metrics, method = self.metrics, details.method.rsplit("/", 1)[-1]

        async def deny_unary(request, context):
            if metrics:
                metrics.record(method, grpc.StatusCode.UNAUTHENTICATED)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        async def deny_stream(request_iterator, context):
            if metrics:
                metrics.record(method, grpc.StatusCode.UNAUTHENTICATED)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        if handler is None:
            return None
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                deny_stream, handler.request_deserializer, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            deny_unary, handler.request_deserializer, handler.response_serializer
        )


class Server:
    """Owns the grpc.aio server, the engine and the health state."""

    def __init__(self, cfg: ServeConfig, policy=None, reward=None):
        self.cfg = cfg
        self.metrics = Metrics()
        self.boot_id = uuid.uuid4().hex
        self.policy, self.reward = policy, reward
        self.engine: Optional[Engine] = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.port: Optional[int] = None
        self._server: Optional[grpc.aio.Server] = None
        self._metrics_http = None
        self._stopped = asyncio.Event()
        self.serving = False  # what health says (KServe readiness follows it)
        self.kserve_port: Optional[int] = None  # set when KServe has a port of its own
        self._kserve_server: Optional[grpc.aio.Server] = None
        self.policy_service: Optional[PolicyServicer] = None
        self.reward_service: Optional[RewardServicer] = None

    async def _set_health(self, status) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ("", "alphagrpo.v1.PolicyService", "alphagrpo.v1.RewardService"):
            res = self.health.set(name, status)
            if asyncio.iscoroutine(res):
                await res

    def new_grpc_server(self) -> grpc.aio.Server:
        """A grpc.aio server with this server's interceptors (auth, malformed-request guard) and
        message limits; the native services and a KServe port of its own both use one."""
        cfg = self.cfg
        limit = cfg.max_message_mb * 1024 * 1024
        interceptors = []
        if cfg.auth_token_file:
            with open(cfg.auth_token_file) as f:
                token = f.read().strip()
            if not token:
                raise ValueError(f"auth token file {cfg.auth_token_file} is empty")
            interceptors.append(AuthInterceptor(token, self.metrics))
        interceptors.append(MalformedRequestGuard(self.metrics))  # inside auth: strangers learn nothing of parsing
        return grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )

    def bind(self, grpc_server: grpc.aio.Server, port: int) -> int:
        """Listens on host:port (TLS when configured); returns the port bound."""
        cfg = self.cfg
        address = f"{cfg.host}:{port}"
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            with open(cfg.tls_key, "rb") as f:
                key = f.read()
            with open(cfg.tls_cert, "rb") as f:
                cert = f.read()
            return grpc_server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        return grpc_server.add_insecure_port(address)

    async def start(self) -> int:
        cfg = self.cfg
        limits = dataclasses.replace(cfg.limits, max_message_bytes=cfg.max_message_mb * 1024 * 1024)
        self._server = self.new_grpc_server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.bind(self._server, cfg.port)
        # services are registered before start; they answer once the model is loaded (health says when)
        self.engine = Engine(
            cfg.max_batch,
            cfg.max_wait_ms,
            cfg.max_queue,
            on_batch=self.metrics.on_batch,
            on_queue=self.metrics.on_queue,
        )
        loop = asyncio.get_running_loop()
        if self.policy is None:
            self.policy = await loop.run_in_executor(None, self._load_policy)
        task_name = cfg.task or self.policy.info.prompt_domain or "open"
        task = load_task(task_name)
        if self.reward is None:
            self.reward = self._load_reward(task)
        self.policy_service = PolicyServicer(
            self.policy, self.engine, limits, self.metrics, self.boot_id, task.check_prompt, task_name
        )
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(self.policy_service, self._server)
        self.reward_service = RewardServicer(self.reward, limits, self.metrics)
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.reward_service, self._server)
        extra = []
        if cfg.kserve:  # the KServe v2 models on the same engine (beside the native services unless kserve_port)
            from .kserve import SERVICE as KSERVE
            from .kserve import add_kserve

            self._kserve_server = await add_kserve(self)
            extra = [KSERVE] if self._kserve_server is None else []
        reflection.enable_server_reflection(
            [
                policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
                reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
                *extra,
            ],
            self._server,
        )
        await self._server.start()
        self.engine.start()
        if cfg.metrics_port:
            self._metrics_http = self.metrics.serve_http(cfg.metrics_port, cfg.host)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            json.dumps(
                {
                    "event": "serving",
                    "address": f"{cfg.host}:{self.port}",
                    "boot_id": self.boot_id,
                    "tls": bool(cfg.tls_cert),
                    "auth": bool(cfg.auth_token_file),
                }
            )
        )
        return self.port

    def _load_policy(self):
        return load_policy(self.cfg.policy, self.cfg.model, self.cfg.device, self.cfg.dtype)

    def _load_reward(self, task):
        c = self.cfg
        if c.reward == "embedded":
            reward = task.reward()
            if reward is None:
                raise ValueError(f"task {task.name!r} has no embedded reward: use --reward openai")
            return reward
        if c.reward == "openai":
            from ..reward.openai_backend import Endpoint, openai_reward

            missing = [
                f"--{n.replace('_', '-')}"
                for n in ("decomposer_url", "decomposer_model", "verifier_url", "verifier_model")
                if not getattr(c, n)
            ]
            if missing:
                raise ValueError(f"--reward openai needs {', '.join(missing)}")
            dec = Endpoint(c.decomposer_url, c.decomposer_model, c.reward_api_key, c.reward_concurrency)
            ver = Endpoint(c.verifier_url, c.verifier_model, c.reward_api_key, c.reward_concurrency)
            return openai_reward(dec, ver, cache_path=c.decomposition_cache)
        if c.reward == "kserve":
            from ..reward.kserve_backend import KServeEndpoint, KServeReward

            missing = [f"--{n.replace('_', '-')}" for n in ("reward_url", "reward_model") if not getattr(c, n)]
            if missing:
                raise ValueError(f"--reward kserve needs {', '.join(missing)}")
            return KServeReward(
                KServeEndpoint(
                    c.reward_url, c.reward_model, c.reward_api_key, c.reward_concurrency, ca_cert=c.reward_ca_cert
                )
            )
        raise ValueError(f"unknown --reward {c.reward!r}; available: embedded, openai, kserve")

    async def stop(self, grace: Optional[float] = None) -> None:
        """NOT_SERVING, stop accepting, let in-flight calls finish within the grace period."""
        if self._server is None or self._stopped.is_set():
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        grace = self.cfg.grace_s if grace is None else grace
        await asyncio.gather(
            self._server.stop(grace), *([self._kserve_server.stop(grace)] if self._kserve_server else [])
        )
        if self.engine:
            await self.engine.stop()
        if self._metrics_http:
            self._metrics_http.shutdown()
        if self.reward_service is not None:
            self.reward_service.executor.shutdown(wait=False)
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def _watch_parent(server: "Server", parent: int, every_s: float = 1.0) -> None:
    """Stops the server once its parent process is gone (the orphan is re-parented: getppid changes),
    e.g. a trainer that started it and was killed without the chance to stop it."""
    while os.getppid() == parent:
        await asyncio.sleep(every_s)
    _say(f"alphagrpo serve: parent process {parent} exited: stopping")
    await server.stop()


def _say(line: str) -> None:
    """A status line on stdout, which may be a pipe whose reader (a parent) is gone."""
    try:
        print(line, flush=True)
    except (BrokenPipeError, OSError):
        pass


async def serve(cfg: ServeConfig) -> int:
    """Runs until SIGTERM or SIGINT (or, with exit_with_parent, its parent's exit); returns the exit code."""
    parent = os.getppid()
    server = Server(cfg)
    port = await server.start()
    print(f"alphagrpo serve: listening on {cfg.host}:{port} (boot {server.boot_id})", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    watcher = asyncio.ensure_future(_watch_parent(server, parent)) if cfg.exit_with_parent else None
    await server.wait()
    if watcher is not None:
        watcher.cancel()
    _say("alphagrpo serve: stopped")
    return 0


def main(cfg: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return asyncio.run(serve(cfg))
