"""DVReward from a verifier behind the KServe v2 / Triton gRPC inference protocol: any server that
hosts a model with the `alphagrpo_verify` signature (prompt BYTES [1], image UINT8 [H, W, 3] ->
reward, semantic, quality FP32 [1], optional breakdown BYTES [1] JSON; docs/kserve.md), another
`alphagrpo serve` included.

Requests go through tritonclient.grpc.aio on one private event loop (one channel for the
process), one request per image, at most `concurrency` in flight, each with a timeout; UNAVAILABLE
(and only that) is retried with exponential backoff. A prompt the remote verifier refuses
(INVALID_ARGUMENT) is a ValueError naming it (the server answers INVALID_ARGUMENT in turn); any
other failure is a BackendError naming the server and the model (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .openai_backend import BackendError
from .types import Answer, Question, RewardResult


@dataclass
class KServeEndpoint:
    """A KServe v2 gRPC server and the verifier model on it."""

    url: str  # HOST:PORT
    model: str  # the verifier model (alphagrpo_verify signature)
    token: Optional[str] = None  # sent as `authorization: Bearer <token>`
    concurrency: int = 16  # requests in flight at once
    timeout_s: float = 60.0  # per request
    retries: int = 3  # extra attempts on UNAVAILABLE
    backoff_s: float = 0.2  # first retry delay; doubles each time (with jitter)
    ca_cert: Optional[str] = None  # PEM root certificate file: TLS
    decompose_model: str = "alphagrpo_decompose"  # used by decompose() only
    max_message_mb: int = 64

    def __post_init__(self):
        if "://" in self.url or ":" not in self.url:
            raise ValueError(f"the KServe reward url is HOST:PORT, got {self.url!r}")
        if not self.model:
            raise ValueError("the KServe reward model must be named")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    def __str__(self) -> str:
        return f"{self.url} (model {self.model!r})"


class KServeReward:
    """reward(prompts, images) -> [RewardResult]; reward.decompose(prompts) -> [[Question]] (the
    Decompose RPC, through the endpoint's decompose_model). Thread-safe: callable from any thread."""

    def __init__(self, endpoint: KServeEndpoint):
        self.ep = endpoint
        self.requests = 0
        self.retried = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="kserve-reward")
        self._thread.start()
        self._client, self._sem = self._run(self._open())

    async def _open(self):
        import tritonclient.grpc.aio as tc

        limit = self.ep.max_message_mb * 1024 * 1024
        client = tc.InferenceServerClient(
            self.ep.url,
            ssl=bool(self.ep.ca_cert),
            root_certificates=self.ep.ca_cert,
            channel_args=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
        )
        return client, asyncio.Semaphore(self.ep.concurrency)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # ---- one request ---------------------------------------------------------------------------------
    async def _infer(self, model: str, inputs):
        from tritonclient.utils import InferenceServerException

        headers = {"authorization": f"Bearer {self.ep.token}"} if self.ep.token else None
        delay = self.ep.backoff_s
        async with self._sem:
            for attempt in range(self.ep.retries + 1):
                self.requests += 1
                try:
                    return await self._client.infer(model, inputs, client_timeout=self.ep.timeout_s, headers=headers)
                except InferenceServerException as exc:
                    status = str(exc.status() or "")
                    if status.endswith("INVALID_ARGUMENT"):
                        raise ValueError(exc.message()) from None
                    if not status.endswith("UNAVAILABLE") or attempt == self.ep.retries:
                        tries = f" after {attempt + 1} attempts" if attempt else ""
                        raise BackendError(
                            f"KServe {self.ep.url} (model {model!r}){tries}: "
                            f"{status.replace('StatusCode.', '') or 'error'}: {exc.message()}"
                        ) from None
                self.retried += 1
                await asyncio.sleep(delay * (1 + 0.25 * random.random()))
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _inputs(prompt: str, image: Optional[np.ndarray] = None):
        import tritonclient.grpc as tc

        p = tc.InferInput("prompt", [1], "BYTES")
        p.set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=object))
        if image is None:
            return [p]
        arr = np.ascontiguousarray(image, dtype=np.uint8)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"images must be uint8 [H, W, 3], got shape {list(arr.shape)}")
        im = tc.InferInput("image", list(arr.shape), "UINT8")
        im.set_data_from_numpy(arr)
        return [p, im]

    async def _verify_one(self, prompt: str, image) -> RewardResult:
        res = await self._infer(self.ep.model, self._inputs(prompt, image))
        values = {}
        for name in ("reward", "semantic", "quality"):
            arr = res.as_numpy(name)
            if arr is None or arr.size != 1:
                raise BackendError(
                    f"KServe {self.ep}: the response has no {name} [1] output (is it a verifier with "
                    f"the alphagrpo_verify signature?)"
                )
            values[name] = float(arr.reshape(-1)[0])
        answers, failed = [], 0
        raw = res.as_numpy("breakdown")
        if raw is not None and raw.size:
            try:
                b = json.loads(raw.reshape(-1)[0])
                answers = [
                    Answer(
                        Question(a["id"], a["question"], a["kind"], a["tag"]),
                        a.get("score"),
                        a.get("answer", ""),
                        bool(a.get("failed", False)),
                        a.get("detail", ""),
                    )
                    for a in b.get("answers", [])
                ]
                failed = int(b.get("failed", 0))
            except (ValueError, KeyError, TypeError) as exc:
                raise BackendError(f"KServe {self.ep}: malformed breakdown output ({exc})") from None
        return RewardResult(prompt, values["reward"], values["semantic"], values["quality"], answers, failed)

    async def _decompose_one(self, prompt: str) -> List[Question]:
        res = await self._infer(self.ep.decompose_model, self._inputs(prompt))
        cols = [res.as_numpy(n) for n in ("question_ids", "questions", "kinds", "tags")]
        if any(c is None for c in cols):
            raise BackendError(
                f"KServe {self.ep.url}: model {self.ep.decompose_model!r} lacks the alphagrpo_decompose "
                f"outputs (question_ids, questions, kinds, tags)"
            )
        try:
            return [Question(*(v.decode("utf-8") for v in row)) for row in zip(*(c.reshape(-1) for c in cols))]
        except (ValueError, UnicodeDecodeError) as exc:
            raise BackendError(f"KServe {self.ep.url}: malformed decomposition ({exc})") from None

    # ---- the reward interface ---------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[str], images) -> List[RewardResult]:
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")

        async def all_():
            return await asyncio.gather(*[self._verify_one(p, im) for p, im in zip(prompts, images)])

        return self._run(all_())

    def decompose(self, prompts: Sequence[str]) -> List[List[Question]]:
        async def all_():
            return await asyncio.gather(*[self._decompose_one(p) for p in prompts])

        return self._run(all_())
