"""Client library for alphagrpo servers: asyncio (AsyncClient) and blocking (Client).

Several addresses are served round-robin ("h1:p,h2:p"), or one "dns:///name:port" target uses
gRPC's own round_robin policy. Every call has a deadline; UNAVAILABLE (and only that) is retried
with exponential backoff. Images come back as numpy uint8 [H, W, 3]; trajectories as tensors.

    async with AsyncClient("127.0.0.1:50051") as c:
        samples = await c.generate(["a red circle"], group_size=4, think=True)
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import grpc
import numpy as np
import torch

from ._proto.alphagrpo.v1 import policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from .reward.types import Answer, Question, RewardResult
from .sampling.sampler import ImageTrajectory, SamplingConfig, TextConfig
from .wire import MODES, NAMES, image_to_proto, params_to_config, proto_to_image, proto_to_trajectory


@dataclass
class Trajectory:
    token_ids: List[int]
    token_logprobs: List[float]
    image: ImageTrajectory  # latents [K + 1, ...], sigmas, sigma_nexts, step log-probs, window start, sigma_max


@dataclass
class GeneratedImage:
    prompt: str
    prompt_index: int
    sample_index: int
    image: np.ndarray
    thought: str
    seed: int
    policy_version: int
    trajectory: Optional[Trajectory] = None
    sampling: Optional[SamplingConfig] = None  # the settings the server resolved and drew with
    text_config: Optional[TextConfig] = None


class AsyncClient:
    def __init__(
        self,
        addresses: Union[str, Sequence[str]],
        *,
        token: Optional[str] = None,
        root_certificates: Optional[bytes] = None,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.2,
        max_message_mb: int = 64,
    ):
        addrs = [a.strip() for a in (addresses.split(",") if isinstance(addresses, str) else addresses) if a.strip()]
        if not addrs:
            raise ValueError("no server address given")
        limit = max_message_mb * 1024 * 1024
        opts = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        if len(addrs) == 1 and addrs[0].startswith("dns:"):
            opts.append(("grpc.lb_policy_name", "round_robin"))
        creds = grpc.ssl_channel_credentials(root_certificates) if root_certificates else None
        self.addresses = addrs
        self.channels = [
            grpc.aio.secure_channel(a, creds, options=opts) if creds else grpc.aio.insecure_channel(a, options=opts)
            for a in addrs
        ]
        self._policy = [policy_pb2_grpc.PolicyServiceStub(ch) for ch in self.channels]
        self._reward = [reward_pb2_grpc.RewardServiceStub(ch) for ch in self.channels]
        self._next = itertools.cycle(range(len(addrs)))
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    async def _call(self, kind: str, method: str, request, timeout: Optional[float] = None):
        """Round-robin over addresses; retries UNAVAILABLE with exponential backoff, nothing else."""
        delay, last = self.backoff, None
        for attempt in range(self.retries + 1):
            i = next(self._next)
            stub = (self._policy if kind == "policy" else self._reward)[i]
            try:
                return await getattr(stub, method)(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise
                last = exc
                await asyncio.sleep(delay)
                delay *= 2
        raise last  # pragma: no cover

    # ---- policy ------------------------------------------------------------------------------
    @staticmethod
    def params(think: bool = False, mode: Optional[str] = None, **fields) -> policy_pb2.SamplingParams:
        """SamplingParams with only the given fields set (the rest take the policy's defaults).

        fields: steps, cfg_scale, cfg_interval=(low, high), sde_window=(start, size), noise_level,
        temperature, top_p, max_thought_tokens, width, height, cfg_img_scale, cfg_renorm_type,
        cfg_renorm_min, timestep_shift; None means unset."""
        msg = policy_pb2.SamplingParams(think=think)
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be 'ode' or 'sde', got {mode!r}")
            msg.mode = MODES[mode]
        pairs = {
            "sde_window": ("sde_window_start", "sde_window_size"),
            "cfg_interval": ("cfg_interval_low", "cfg_interval_high"),
        }
        for name, value in fields.items():
            if value is None:
                continue
            if name in pairs:
                setattr(msg, pairs[name][0], value[0])
                setattr(msg, pairs[name][1], value[1])
            elif name in policy_pb2.SamplingParams.DESCRIPTOR.fields_by_name:
                setattr(msg, name, value)
            else:
                raise TypeError(f"unknown sampling parameter {name!r}")
        return msg

    @staticmethod
    def _samples(prompts, res) -> List[GeneratedImage]:
        sc = tc = None
        if res.HasField("resolved_params"):
            sc, tc = params_to_config(res.resolved_params)
        out = []
        for s in res.samples:
            traj = None
            if s.HasField("trajectory"):
                ids, logps, image_traj = proto_to_trajectory(s.trajectory)
                traj = Trajectory(ids, logps, image_traj)
            out.append(
                GeneratedImage(
                    prompts[s.prompt_index],
                    s.prompt_index,
                    s.sample_index,
                    proto_to_image(s.image),
                    s.thought,
                    s.seed,
                    s.policy_version,
                    traj,
                    sc,
                    tc,
                )
            )
        return out

    async def generate(
        self,
        prompts: Sequence[str],
        group_size: int = 1,
        seed: int = 0,
        return_trajectory: bool = False,
        timeout: Optional[float] = None,
        **params,
    ) -> List[GeneratedImage]:
        req = policy_pb2.GenerateRequest(
            prompts=list(prompts),
            group_size=group_size,
            seed=seed,
            params=self.params(**params),
            return_trajectory=return_trajectory,
        )
        res = await self._call("policy", "Generate", req, timeout)
        self.last_boot_id = res.boot_id
        return self._samples(list(prompts), res)

    async def reflect(
        self,
        prompts: Sequence[str],
        images: Sequence[np.ndarray],
        group_size: int = 1,
        seed: int = 0,
        return_trajectory: bool = False,
        timeout: Optional[float] = None,
        **params,
    ) -> List[GeneratedImage]:
        req = policy_pb2.ReflectRequest(
            prompts=list(prompts),
            images=[image_to_proto(im) for im in images],
            group_size=group_size,
            seed=seed,
            params=self.params(**params),
            return_trajectory=return_trajectory,
        )
        res = await self._call("policy", "Reflect", req, timeout)
        self.last_boot_id = res.boot_id
        return self._samples(list(prompts), res)

    async def update_weights(
        self,
        tensors: Dict[str, torch.Tensor],
        lora: bool = False,
        chunk_bytes: int = 1 << 20,
        timeout: Optional[float] = None,
    ) -> int:
        """Streams named tensors in chunks of at most chunk_bytes; returns the new policy version."""

        def chunks():
            for name, t in tensors.items():
                t = t.detach().contiguous().cpu()
                raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
                for off in range(0, max(len(raw), 1), chunk_bytes):
                    yield policy_pb2.WeightChunk(
                        name=name,
                        dtype=NAMES[t.dtype],
                        shape=list(t.shape),
                        offset=off,
                        data=raw[off : off + chunk_bytes],
                        lora=lora,
                    )

        stub = self._policy[next(self._next)]
        res = await stub.UpdateWeights(chunks(), timeout=timeout or self.timeout, metadata=self.metadata)
        return res.policy_version

    async def model_info(self) -> policy_pb2.ModelInfo:
        return await self._call("policy", "GetModelInfo", policy_pb2.GetModelInfoRequest())

    # ---- reward ------------------------------------------------------------------------------
    async def verify(
        self, prompts: Sequence[str], images: Sequence[np.ndarray], timeout: Optional[float] = None
    ) -> List[RewardResult]:
        """Rewards with their breakdown, as the DVReward types (RewardResult.table() prints it)."""
        req = reward_pb2.VerifyRequest(
            items=[reward_pb2.VerifyItem(prompt=p, image=image_to_proto(im)) for p, im in zip(prompts, images)]
        )
        res = await self._call("reward", "Verify", req, timeout)
        return [
            RewardResult(
                r.prompt,
                r.reward,
                r.semantic,
                r.quality,
                [
                    Answer(
                        Question(a.question.id, a.question.text, a.question.kind, a.question.tag),
                        None if a.failed else a.score,
                        a.answer,
                        a.failed,
                        a.detail,
                    )
                    for a in r.answers
                ],
                r.failed,
            )
            for r in res.rewards
        ]

    async def decompose(self, prompts: Sequence[str], timeout: Optional[float] = None) -> List[List[Dict]]:
        res = await self._call("reward", "Decompose", reward_pb2.DecomposeRequest(prompts=list(prompts)), timeout)
        return [[dict(id=q.id, text=q.text, kind=q.kind, tag=q.tag) for q in d.questions] for d in res.decompositions]


class Client:
    """Blocking twin of AsyncClient (same methods), running its own event loop on a private thread."""

    def __init__(self, addresses, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="alphagrpo-client")
        self._thread.start()
        self._async = self._run(self._make(addresses, kwargs))

    async def _make(self, addresses, kwargs):
        return AsyncClient(addresses, **kwargs)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name):
        fn = getattr(self._async, name)
        if not asyncio.iscoroutinefunction(fn):
            return fn
        return lambda *a, **k: self._run(fn(*a, **k))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
