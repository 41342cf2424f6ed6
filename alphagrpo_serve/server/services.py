"""The gRPC services: validate, call the engine (policy) or the reward, encode.

Every bad field is answered with INVALID_ARGUMENT naming it; the server keeps serving. A full
queue is RESOURCE_EXHAUSTED, a deadline passed in the queue DEADLINE_EXCEEDED.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import grpc
import numpy as np

from .._proto.alphagrpo.v1 import policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from ..engine import DeadlineExpired, Engine, QueueFull
from ..sampling.sampler import SamplingConfig
from ..shapes.grammar import PromptError
from .codec import NAMES, bytes_to_tensor, check_header, image_to_proto, nbytes, proto_to_image, tensor_to_proto
from .metrics import Metrics


@dataclass
class Limits:
    max_prompts: int = 64  # prompts (or items) per request
    max_prompt_chars: int = 512
    max_group: int = 64
    max_steps: int = 100
    max_thought_tokens: int = 128
    max_update_bytes: int = 1 << 30  # one UpdateWeights stream


class BadRequest(ValueError):
    """A request field is invalid; the message names it."""


def _sampling(p: policy_pb2.SamplingParams, limits: Limits) -> Tuple[SamplingConfig, dict]:
    steps = p.steps or 20
    if not 1 <= steps <= limits.max_steps:
        raise BadRequest(f"params.steps must be in [1, {limits.max_steps}], got {steps}")
    lo, hi = (p.cfg_interval_low, p.cfg_interval_high) if (p.cfg_interval_low or p.cfg_interval_high) else (0.0, 1.0)
    window = (p.sde_window_start, p.sde_window_size) if (p.sde_window_start or p.sde_window_size) else (0, min(4, steps))
    try:
        sc = SamplingConfig(steps=steps, mode="sde" if p.mode == policy_pb2.SAMPLING_MODE_SDE else "ode",
                            noise_level=p.noise_level or 0.7, sde_window=window,
                            cfg_scale=p.cfg_scale or 3.0, cfg_interval=(lo, hi))
    except ValueError as exc:
        raise BadRequest(f"params: {exc}") from None
    temperature = p.temperature or 1.0
    top_p = p.top_p or 1.0
    if not temperature > 0:
        raise BadRequest(f"params.temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise BadRequest(f"params.top_p must be in (0, 1], got {top_p}")
    max_tokens = p.max_thought_tokens or 40
    if not 1 <= max_tokens <= limits.max_thought_tokens:
        raise BadRequest(f"params.max_thought_tokens must be in [1, {limits.max_thought_tokens}], got {max_tokens}")
    return sc, dict(temperature=temperature, top_p=top_p, max_thought_tokens=max_tokens)


def _check_prompts(prompts, limits: Limits, check_prompt) -> List[str]:
    if not prompts:
        raise BadRequest("prompts is empty")
    if len(prompts) > limits.max_prompts:
        raise BadRequest(f"prompts has {len(prompts)} entries; at most {limits.max_prompts}")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise BadRequest(f"prompts[{i}] is empty")
        if len(p) > limits.max_prompt_chars:
            raise BadRequest(f"prompts[{i}] has {len(p)} characters; at most {limits.max_prompt_chars}")
        try:
            check_prompt(p)
        except (PromptError, ValueError) as exc:
            raise BadRequest(f"prompts[{i}]: {exc}") from None
    return list(prompts)


def _deadline(context) -> Optional[float]:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Upstream(RuntimeError):
    """A backend this server depends on (an OpenAI-compatible reward server) failed."""


async def _abort_for(context, exc: BaseException):
    if isinstance(exc, Upstream):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, BadRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, QueueFull):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, DeadlineExpired):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    raise exc


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, policy, engine: Engine, limits: Limits, metrics: Metrics, boot_id: str, check_prompt):
        self.policy, self.engine, self.limits, self.metrics = policy, engine, limits, metrics
        self.boot_id, self.check_prompt = boot_id, check_prompt
        self.generate_batcher = engine.add("generate", self._run_batch)
        self.reflect_batcher = engine.add("reflect", self._run_batch)
        self.canvas = policy.model.cfg.canvas
        metrics.policy_version.set(policy.version)

    # ---- model thread ----------------------------------------------------------------------------
    def _run_batch(self, key, payloads):
        """One model call for every item of a batch; key = (kind, sampling, think, text kwargs)."""
        kind, sc, think, kw = key[0], key[1], key[2], dict(key[3])
        prompts = [p for pl in payloads for p in pl["prompts"]]
        seeds = [s for pl in payloads for s in pl["seeds"]]
        if kind == "reflect":
            images = [im for pl in payloads for im in pl["images"]]
            samples = self.policy.reflect(prompts, images, seeds, sc, **kw)
        else:
            samples = self.policy.generate(prompts, seeds, sc, think=think, **kw)
        return self._split(payloads, samples)

    @staticmethod
    def _split(payloads, samples):
        out, i = [], 0
        for pl in payloads:
            n = len(pl["prompts"])
            out.append(samples[i:i + n])
            i += n
        return out

    # ---- encoding ---------------------------------------------------------------------------------
    def _sample_proto(self, s, prompt_index, sample_index, raw, with_traj) -> policy_pb2.Sample:
        msg = policy_pb2.Sample(prompt_index=prompt_index, sample_index=sample_index, image=image_to_proto(s.image, raw),
                                thought=s.thought, seed=s.seed, policy_version=s.policy_version)
        if with_traj:
            tr = s.trajectory
            msg.trajectory.CopyFrom(policy_pb2.Trajectory(
                token_ids=s.text.ids, token_logprobs=s.text.logps, latents=tensor_to_proto(tr.latents.float()),
                sigmas=tr.sigmas.tolist(), sigma_nexts=tr.sigma_nexts.tolist(), step_logprobs=tr.log_probs.tolist(),
                window_start=tr.window_start, sigma_max=tr.sigma_max))
        return msg

    async def _run(self, batcher, request, context, kind, prompts, images=None):
        G = request.group_size or 1
        if not 1 <= G <= self.limits.max_group:
            raise BadRequest(f"group_size must be in [1, {self.limits.max_group}], got {G}")
        sc, kw = _sampling(request.params, self.limits)
        think = bool(request.params.think) if kind == "generate" else True
        key = (kind, sc, think, tuple(sorted(kw.items())))  # compatible settings share a batch (compared with ==)
        deadline = _deadline(context)
        calls, index = [], []
        step = batcher.max_batch  # a group larger than a batch is split into batch-sized parts
        for i, p in enumerate(prompts):
            for j0 in range(0, G, step):
                n = min(step, G - j0)
                payload = {"prompts": [p] * n, "seeds": [int(request.seed) + i * G + j for j in range(j0, j0 + n)]}
                if images is not None:
                    payload["images"] = [images[i]] * n
                calls.append(batcher.submit(key, n, payload, deadline))
                index.append((i, j0))
        results = await asyncio.gather(*calls)
        self.metrics.images.inc(len(prompts) * G)
        samples = []
        for (i, j0), part in zip(index, results):
            for dj, s in enumerate(part):
                samples.append(self._sample_proto(s, i, j0 + dj, request.return_raw, request.return_trajectory))
        return samples

    # ---- rpcs ---------------------------------------------------------------------------------------
    async def Generate(self, request: policy_pb2.GenerateRequest, context) -> policy_pb2.GenerateResponse:
        with self.metrics.track("Generate", context):
            try:
                prompts = _check_prompts(request.prompts, self.limits, self.check_prompt)
                samples = await self._run(self.generate_batcher, request, context, "generate", prompts)
            except (BadRequest, QueueFull, DeadlineExpired) as exc:
                await _abort_for(context, exc)
            return policy_pb2.GenerateResponse(samples=samples, boot_id=self.boot_id)

    async def Reflect(self, request: policy_pb2.ReflectRequest, context) -> policy_pb2.ReflectResponse:
        with self.metrics.track("Reflect", context):
            try:
                prompts = _check_prompts(request.prompts, self.limits, self.check_prompt)
                if len(request.images) != len(prompts):
                    raise BadRequest(f"images has {len(request.images)} entries but prompts has {len(prompts)}")
                images = []
                for i, im in enumerate(request.images):
                    try:
                        images.append(proto_to_image(im, f"images[{i}]", side=self.canvas))
                    except (ValueError, TypeError) as exc:
                        raise BadRequest(str(exc)) from None
                samples = await self._run(self.reflect_batcher, request, context, "reflect", prompts, images)
            except (BadRequest, QueueFull, DeadlineExpired) as exc:
                await _abort_for(context, exc)
            return policy_pb2.ReflectResponse(samples=samples, boot_id=self.boot_id)

    async def UpdateWeights(self, request_iterator, context) -> policy_pb2.UpdateWeightsResponse:
        with self.metrics.track("UpdateWeights", context):
            try:
                tensors, lora, received = await self._receive(request_iterator)
                await self.engine.exclusive(lambda: self._apply(tensors, lora))
            except (BadRequest, KeyError, TypeError, ValueError) as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"weights not updated (still version {self.policy.version}): {exc}")
            self.metrics.policy_version.set(self.policy.version)
            return policy_pb2.UpdateWeightsResponse(policy_version=self.policy.version, tensors_applied=len(tensors),
                                                    bytes_received=received)

    def _apply(self, tensors, lora):
        if lora and not self.policy.lora_enabled:
            ranks = {int(t.shape[0]) for n, t in tensors.items() if n.endswith("lora_A") and t.dim() == 2}
            if len(ranks) != 1:
                raise ValueError(f"LoRA update needs lora_A tensors of one rank, got ranks {sorted(ranks)}")
            rank = ranks.pop()
            self.policy.enable_lora(rank=rank, alpha=float(rank))  # scale 1: senders fold theirs into lora_B
        self.policy.import_weights(tensors, lora=lora)

    async def _receive(self, request_iterator):
        """Assembles chunked tensors; validates sizes and offsets as they arrive."""
        parts: Dict[str, dict] = {}
        received = 0
        lora = None
        async for chunk in request_iterator:
            name = chunk.name
            if not name:
                raise BadRequest("a chunk has no name")
            if lora is None:
                lora = chunk.lora
            elif chunk.lora != lora:
                raise BadRequest(f"{name}: a stream carries either full weights or LoRA tensors, not both")
            try:
                shape = check_header(chunk.dtype, chunk.shape, name)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            size = nbytes(chunk.dtype, shape)
            part = parts.setdefault(name, {"dtype": chunk.dtype, "shape": shape, "buf": bytearray(size), "filled": 0})
            if (part["dtype"], part["shape"]) != (chunk.dtype, shape):
                raise BadRequest(f"{name}: dtype/shape changed between chunks")
            if chunk.offset != part["filled"] or chunk.offset + len(chunk.data) > size:
                raise BadRequest(f"{name}: chunk at offset {chunk.offset} with {len(chunk.data)} bytes does not continue "
                                 f"the {part['filled']} of {size} bytes received")
            part["buf"][chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
            part["filled"] += len(chunk.data)
            received += len(chunk.data)
            if received > self.limits.max_update_bytes:
                raise BadRequest(f"the stream exceeds {self.limits.max_update_bytes} bytes")
        if not parts:
            raise BadRequest("the stream carried no tensors")
        tensors = {}
        for name, part in parts.items():
            if part["filled"] != len(part["buf"]):
                raise BadRequest(f"{name}: received {part['filled']} of {len(part['buf'])} bytes")
            tensors[name] = bytes_to_tensor(bytes(part["buf"]), part["dtype"], part["shape"])
        return tensors, bool(lora), received

    async def GetModelInfo(self, request, context) -> policy_pb2.ModelInfo:
        with self.metrics.track("GetModelInfo", context):
            sd = self.policy.model.state_dict()
            params = [policy_pb2.TensorSpec(name=n, dtype=NAMES.get(t.dtype, str(t.dtype)), shape=list(t.shape))
                      for n, t in sd.items()]
            return policy_pb2.ModelInfo(name="tiny-umm", policy_version=self.policy.version, boot_id=self.boot_id,
                                        canvas=self.canvas, parameters=params,
                                        lora_enabled=any("lora_" in n for n in sd))


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Rewards run on their own threads, beside the model thread."""

    def __init__(self, reward, limits: Limits, metrics: Metrics, workers: int = 2):
        self.reward, self.limits, self.metrics = reward, limits, metrics
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")

    async def Verify(self, request: reward_pb2.VerifyRequest, context) -> reward_pb2.VerifyResponse:
        with self.metrics.track("Verify", context):
            try:
                items = list(request.items)
                prompts = _check_prompts([it.prompt for it in items], self.limits, lambda p: None)
                images = []
                for i, it in enumerate(items):
                    try:
                        images.append(proto_to_image(it.image, f"items[{i}].image"))
                    except (ValueError, TypeError) as exc:
                        raise BadRequest(str(exc)) from None
                if len({im.shape for im in images}) > 1:
                    raise BadRequest("items: every image of one request must have the same size")
                loop = asyncio.get_running_loop()
                try:
                    results = await loop.run_in_executor(self.executor, self.reward, prompts, np.stack(images))
                except (PromptError, ValueError, TypeError) as exc:
                    raise BadRequest(str(exc)) from None
                except RuntimeError as exc:  # reward backend failures (openai_backend.BackendError)
                    raise Upstream(f"reward backend: {exc}") from None
            except (BadRequest, Upstream) as exc:
                await _abort_for(context, exc)
            return reward_pb2.VerifyResponse(rewards=[_reward_proto(r) for r in results])

    async def Decompose(self, request: reward_pb2.DecomposeRequest, context) -> reward_pb2.DecomposeResponse:
        with self.metrics.track("Decompose", context):
            try:
                prompts = _check_prompts(request.prompts, self.limits, lambda p: None)
                loop = asyncio.get_running_loop()
                try:
                    qs = await loop.run_in_executor(self.executor, self.reward.decompose, prompts)
                except (PromptError, ValueError) as exc:
                    raise BadRequest(str(exc)) from None
                except RuntimeError as exc:
                    raise Upstream(f"reward backend: {exc}") from None
            except (BadRequest, Upstream) as exc:
                await _abort_for(context, exc)
            return reward_pb2.DecomposeResponse(decompositions=[
                reward_pb2.Decomposition(prompt=p, questions=[_question_proto(q) for q in qq]) for p, qq in zip(prompts, qs)])


def _question_proto(q) -> reward_pb2.Question:
    return reward_pb2.Question(id=q.id, text=q.text, kind=q.kind, tag=q.tag)


def _reward_proto(r) -> reward_pb2.Reward:
    return reward_pb2.Reward(prompt=r.prompt, reward=r.reward, semantic=r.semantic, quality=r.quality, failed=r.failed,
                             answers=[reward_pb2.Answer(question=_question_proto(a.question),
                                                        score=a.score if a.score is not None else 0.0,
                                                        answer=a.answer, failed=a.failed or a.score is None,
                                                        detail=a.detail) for a in r.answers])


def new_boot_id() -> str:
    return uuid.uuid4().hex
