"""The KServe v2 / Triton gRPC inference protocol (`inference.GRPCInferenceService`, the service
stubs that the tritonclient package ships) beside the native services, on the same engine.

Generate and reflect requests go through PolicyServicer.sample, so they are checked by the same
validation, queue in the same batchers (a KServe request and a native one with the same settings
share a model batch), obey the same limits and deadlines and free their slots when cancelled.
Verify and decompose run on the server's reward backend through RewardServicer.

Status codes follow Triton's: an unknown model or version is NOT_FOUND, a model that is not ready
(loading, draining) UNAVAILABLE, a bad input INVALID_ARGUMENT naming it, a full queue UNAVAILABLE
(Triton's "exceeds maximum queue size"), an expired deadline DEADLINE_EXCEEDED. ModelStreamInfer
answers each request of the stream as soon as it is done (match them by id); a failed request is
reported in the stream's error_message and the stream goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable, Dict, List, Optional

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from ..engine import DeadlineExpired, QueueFull
from ..models.base import CapabilityError
from ..wire import MAX_IMAGE_SIDE
from .errors import BadRequest, ResourceLimit, Upstream
from .kserve_models import (
    DECOMPOSE,
    GENERATE,
    PLATFORM,
    REFLECT,
    VERIFY,
    VERSION,
    Model,
    build_models,
    check_inputs,
    name_inputs,
    resolved_json,
    sampling_params,
    scalar,
    text,
)
from .kserve_tensors import decode_inputs, encode_output
from .validation import check_message_size, check_prompts, deadline, request_settings

SERVICE = "inference.GRPCInferenceService"
log = logging.getLogger("alphagrpo.server")


class ModelNotFound(LookupError):
    """No such model or version (NOT_FOUND)."""


class NotReady(RuntimeError):
    """The server is loading or draining (UNAVAILABLE)."""


CODES = (
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (CapabilityError, grpc.StatusCode.INVALID_ARGUMENT),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Upstream, grpc.StatusCode.UNAVAILABLE),
    (ResourceLimit, grpc.StatusCode.RESOURCE_EXHAUSTED),
)
ERRORS = tuple(exc for exc, _ in CODES)


def code_of(exc: BaseException) -> grpc.StatusCode:
    return next(code for kind, code in CODES if isinstance(exc, kind))


class KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Models alphagrpo_generate, alphagrpo_reflect (when the policy reflects), alphagrpo_verify and
    alphagrpo_decompose; signatures in kserve_models.py and docs/kserve.md."""

    def __init__(self, policy_service, reward_service, ready: Callable[[], bool], metrics, settings: Dict[str, str]):
        self.policy_service, self.reward_service = policy_service, reward_service
        self.ready, self.metrics, self.settings = ready, metrics, settings
        self.models: Dict[str, Model] = build_models(policy_service.policy.info)
        self.handlers = {
            GENERATE: self._generate,
            REFLECT: self._reflect,
            VERIFY: self._verify,
            DECOMPOSE: self._decompose,
        }

    # ---- lookup -----------------------------------------------------------------------------------
    def _model(self, name: str, version: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found (models: {', '.join(self.models)})")
        if version not in ("", VERSION):
            raise ModelNotFound(
                f"Request for unknown model: '{name}' version {version} is not found (versions: {VERSION})"
            )
        return model

    # ---- health and metadata ------------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request, context):
        ready = self.ready() and request.name in self.models and request.version in ("", VERSION)
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("alphagrpo-serve")
        except PackageNotFoundError:  # pragma: no cover - a source tree without an install
            v = "0"
        return service_pb2.ServerMetadataResponse(name="alphagrpo-serve", version=v, extensions=["model_configuration"])

    async def ModelMetadata(self, request, context):
        try:
            m = self._model(request.name, request.version)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        meta = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=m.name,
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in m.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in m.outputs],
        )

    async def ModelConfig(self, request, context):
        try:
            m = self._model(request.name, request.version)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return service_pb2.ModelConfigResponse(config=self._config(m))

    def _config(self, m: Model) -> model_config_pb2.ModelConfig:
        def dtype(d):
            return model_config_pb2.DataType.Value("TYPE_STRING" if d == "BYTES" else f"TYPE_{d}")

        info = self.policy_service.policy.info
        params = dict(
            self.settings,
            description=m.doc,
            policy=info.name,
            device=str(info.device),
            task=self.policy_service.task,
            inputs=json.dumps({t.name: t.doc for t in m.inputs}),
            outputs=json.dumps({t.name: t.doc for t in m.outputs}),
        )
        if m.name in (GENERATE, REFLECT):
            sc = info.reflect_defaults if m.name == REFLECT else info.generate_defaults
            params["defaults"] = resolved_json(sc, info.text_defaults, False)
            params["canvas"] = info.capabilities.canvas.describe()
        return model_config_pb2.ModelConfig(
            name=m.name,
            platform=PLATFORM,
            backend=PLATFORM,
            max_batch_size=0,
            input=[
                model_config_pb2.ModelInput(
                    name=t.name, data_type=dtype(t.datatype), dims=list(t.shape), optional=t.optional
                )
                for t in m.inputs
            ],
            output=[
                model_config_pb2.ModelOutput(name=t.name, data_type=dtype(t.datatype), dims=list(t.shape))
                for t in m.outputs
            ],
            parameters={k: model_config_pb2.ModelParameter(string_value=str(v)) for k, v in params.items()},
        )

    # ---- inference ----------------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        with self.metrics.track("ModelInfer", context):
            try:
                return await self._infer(request, deadline(context))
            except ERRORS as exc:
                await context.abort(code_of(exc), _message(request, exc))

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request runs as it arrives; responses come back as they finish."""
        with self.metrics.track("ModelStreamInfer", context):
            until = deadline(context)
            out: asyncio.Queue = asyncio.Queue()
            tasks: set = set()
            done = object()

            async def one(req):
                try:
                    res = service_pb2.ModelStreamInferResponse(infer_response=await self._infer(req, until))
                except ERRORS as exc:
                    res = _stream_error(req, _message(req, exc))
                except Exception as exc:  # a bug must not end the stream of other requests
                    log.exception("ModelStreamInfer request failed")
                    res = _stream_error(req, _message(req, exc))
                await out.put(res)

            async def read():
                try:
                    async for req in request_iterator:
                        t = asyncio.ensure_future(one(req))
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
                    while tasks:
                        await asyncio.gather(*list(tasks), return_exceptions=True)
                finally:
                    await out.put(done)

            reader = asyncio.ensure_future(read())
            try:
                while True:
                    res = await out.get()
                    if res is done:
                        break
                    yield res
            finally:  # the client went away: its queued work is withdrawn at once
                reader.cancel()
                for t in list(tasks):
                    t.cancel()

    async def _infer(self, request, until: Optional[float]) -> service_pb2.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        if not self.ready():
            raise NotReady(f"model '{model.name}' is not ready: the server is loading or draining")
        if "timeout" in request.parameters:  # Triton's per-request timeout, microseconds
            t = request.parameters["timeout"].int64_param
            if t > 0:
                mine = time.monotonic() + t / 1e6
                until = mine if until is None else min(until, mine)
        names = self._requested(model, request)
        inputs = check_inputs(model, decode_inputs(request))
        outputs = await self.handlers[model.name](model, inputs, until)
        res = service_pb2.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request.id)
        if model.name in (GENERATE, REFLECT):
            res.parameters["boot_id"].string_param = self.policy_service.boot_id
        for name in names:
            tensor = res.outputs.add(name=name)
            res.raw_output_contents.append(encode_output(tensor, outputs[name], model.output(name).datatype))
        check_message_size(res, self.policy_service.limits)  # gRPC would drop a larger answer on the way out
        return res

    @staticmethod
    def _requested(model: Model, request) -> List[str]:
        names = []
        for o in request.outputs:
            if model.output(o.name) is None:
                raise BadRequest(
                    f"unexpected output '{o.name}': model '{model.name}' gives "
                    f"{', '.join(t.name for t in model.outputs)}"
                )
            for p in ("classification", "shared_memory_region"):
                if p in o.parameters:
                    raise BadRequest(f"output '{o.name}': parameter {p!r} is not supported by this server")
            names.append(o.name)
        return names or [t.name for t in model.outputs]

    # ---- models -------------------------------------------------------------------------------------
    def _prompt(self, inputs) -> List[str]:
        ps = self.policy_service
        try:
            return check_prompts([text(inputs, "prompt")], ps.limits, ps.check_prompt)
        except BadRequest as exc:
            raise BadRequest(name_inputs(str(exc))) from None

    async def _sample(self, kind: str, model: Model, inputs, until, images=None, sc_check=None):
        G = scalar(inputs, "group_size", 1)
        seed = scalar(inputs, "seed", 0)
        limits = self.policy_service.limits
        if not 1 <= G <= limits.max_group:
            raise BadRequest(f"input 'group_size' must be in [1, {limits.max_group}], got {G}")
        if seed < 0:
            raise BadRequest(f"input 'seed' must be >= 0, got {seed}")
        try:
            prompts = self._prompt(inputs)
            params = sampling_params(model, inputs)
            if sc_check is not None:  # reflect: the image must fit the canvas the request resolves to
                sc, _, _ = request_settings(self.policy_service.policy, params, limits, reflect=True)
                sc_check(sc)
            samples, sc, text_cfg, think = await self.policy_service.sample(
                kind, prompts, G, params, seed, until, images
            )
        except (BadRequest, CapabilityError) as exc:
            raise type(exc)(name_inputs(str(exc))) from None
        ss = [s for _, _, s in samples]
        steps = np.stack([s.trajectory.log_probs.detach().cpu().numpy().astype(np.float32).reshape(-1) for s in ss])
        return {
            "image": np.stack([s.image for s in ss]),
            "thought": np.array([s.thought.encode("utf-8") for s in ss], dtype=object),
            "seed": np.array([s.seed for s in ss], dtype=np.int64),
            "step_log_probs": steps,
            "policy_version": np.array([s.policy_version for s in ss], dtype=np.int64),
            "resolved_params": np.array([resolved_json(sc, text_cfg, think).encode()], dtype=object),
        }

    async def _generate(self, model: Model, inputs, until):
        return await self._sample("generate", model, inputs, until)

    async def _reflect(self, model: Model, inputs, until):
        image = _image(inputs)
        return await self._sample(
            "reflect",
            model,
            inputs,
            until,
            [image],
            lambda sc: self.policy_service.check_reflect_image(image, sc, "input 'image'"),
        )

    async def _verify(self, model: Model, inputs, until):
        prompt, image = text(inputs, "prompt"), _image(inputs)
        try:
            (r,) = await _within(self.reward_service.score([prompt], image[None], field="prompts"), until)
        except BadRequest as exc:
            raise BadRequest(_reward_message(str(exc))) from None
        breakdown = {
            "prompt": r.prompt,
            "reward": r.reward,
            "semantic": r.semantic,
            "quality": r.quality,
            "failed": r.failed,
            "answers": [
                {
                    "id": a.question.id,
                    "question": a.question.text,
                    "kind": a.question.kind,
                    "tag": a.question.tag,
                    "score": a.score,
                    "answer": a.answer,
                    "failed": a.failed,
                    "detail": a.detail,
                }
                for a in r.answers
            ],
        }
        f32 = lambda v: np.array([v], dtype=np.float32)  # noqa: E731
        return {
            "reward": f32(r.reward),
            "semantic": f32(r.semantic),
            "quality": f32(r.quality),
            "breakdown": np.array([json.dumps(breakdown).encode()], dtype=object),
        }

    async def _decompose(self, model: Model, inputs, until):
        try:
            (qs,) = await _within(self.reward_service.questions([text(inputs, "prompt")]), until)
        except BadRequest as exc:
            raise BadRequest(_reward_message(str(exc))) from None

        def col(attr):
            return np.array([getattr(q, attr).encode() for q in qs], dtype=object)

        return {"question_ids": col("id"), "questions": col("text"), "kinds": col("kind"), "tags": col("tag")}


def _image(inputs) -> np.ndarray:
    image = inputs["image"]
    h, w = image.shape[:2]
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise BadRequest(f"input 'image' is {w}x{h}; each side must be in [1, {MAX_IMAGE_SIDE}]")
    return np.ascontiguousarray(image)


async def _within(coro, until: Optional[float]):
    """Rewards do not queue in a batcher; their deadline is enforced here."""
    if until is None:
        return await coro
    try:
        return await asyncio.wait_for(coro, max(0.0, until - time.monotonic()))
    except asyncio.TimeoutError:
        raise DeadlineExpired("deadline passed while the reward ran") from None


def _reward_message(message: str) -> str:
    message = name_inputs(message)
    if message.startswith("input '"):
        return message
    for word in ("image ", "images "):
        if message.startswith(word):
            return "input 'image' " + message[len(word) :]
    return f"input 'prompt': {message}" if "prompt" in message else message


def _message(request, exc: BaseException) -> str:
    return (f"[request id: {request.id}] " if request.id else "") + str(exc)


def _stream_error(request, message: str) -> service_pb2.ModelStreamInferResponse:
    return service_pb2.ModelStreamInferResponse(
        error_message=message,
        infer_response=service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


async def add_kserve(server) -> Optional[grpc.aio.Server]:
    """Registers the KServe service for an app.Server: on its own gRPC server when cfg.kserve_port is
    set (same TLS, auth and message limits; returned started, for the caller to stop), else on the
    native server (returns None)."""
    cfg = server.cfg
    settings = {"max_batch_samples": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms, "max_queue_samples": cfg.max_queue}
    servicer = KServeServicer(
        server.policy_service, server.reward_service, lambda: server.serving, server.metrics, settings
    )
    server.kserve_service = servicer
    if cfg.kserve_port is None:
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server._server)
        return None
    own = server.new_grpc_server()  # the same auth, malformed-request guard and message limits
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, own)
    server.kserve_port = server.bind(own, cfg.kserve_port)
    await own.start()
    return own
