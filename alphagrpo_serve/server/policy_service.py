"""PolicyService: Generate, Reflect, UpdateWeights and GetModelInfo over any policy of the registry.

Requests are checked at the door (validation.py), resolved against the policy's defaults, split
into work items and batched by the engine with every item of compatible settings (BatchKey).
"""

from __future__ import annotations

from typing import Callable, List

from .._proto.alphagrpo.v1 import policy_pb2, policy_pb2_grpc
from ..engine import BatchKey, Engine, Work
from ..models.base import Policy
from ..wire import NAMES, config_to_params, image_to_proto, proto_to_image, sample_seed, trajectory_to_proto
from .errors import CLIENT_ERRORS, BadRequest, abort_for
from .metrics import Metrics
from .validation import Limits, check_answer_size, check_message_size, check_prompts, deadline, request_settings
from .weights import StreamBudget, receive_weights


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(
        self,
        policy: Policy,
        engine: Engine,
        limits: Limits,
        metrics: Metrics,
        boot_id: str,
        check_prompt: Callable[[str], None],
        task: str = "open",
    ):
        self.policy, self.engine, self.limits, self.metrics = policy, engine, limits, metrics
        self.boot_id, self.check_prompt, self.task = boot_id, check_prompt, task
        self.weight_budget = StreamBudget(limits.max_update_total_bytes)
        self.generate_batcher = engine.add("generate", self._run_batch)
        self.reflect_batcher = engine.add("reflect", self._run_batch)
        metrics.policy_version.set(policy.version)
        self._snapshot()

    # ---- model thread ----------------------------------------------------------------------------
    def _run_batch(self, key: BatchKey, items: List[Work]):
        """One model call for every item of a batch; returns each item's samples."""
        prompts = [p for w in items for p in w.prompts]
        seeds = [s for w in items for s in w.seeds]
        if key.kind == "reflect":
            images = [im for w in items for im in w.images]
            samples = self.policy.reflect(prompts, images, seeds, key.sampling, key.text)
        else:
            samples = self.policy.generate(prompts, seeds, key.sampling, key.text, think=key.think)
        out, i = [], 0
        for w in items:
            out.append(samples[i : i + w.size])
            i += w.size
        return out

    # ---- encoding ---------------------------------------------------------------------------------
    @staticmethod
    def _sample_proto(s, prompt_index, sample_index, raw, with_traj) -> policy_pb2.Sample:
        msg = policy_pb2.Sample(
            prompt_index=prompt_index,
            sample_index=sample_index,
            image=image_to_proto(s.image, raw),
            thought=s.thought,
            seed=s.seed,
            policy_version=s.policy_version,
        )
        if with_traj:
            msg.trajectory.CopyFrom(trajectory_to_proto(s.text.ids, s.text.logps, s.trajectory))
        return msg

    async def sample(self, kind: str, prompts, group_size: int, params, seed: int, until=None, images=None):
        """Checks the group size and settings, submits every batch-sized part of each prompt's group
        to the shared batcher and waits: ([(prompt index, sample index, Sample)], sampling, text,
        think). Generate/Reflect and the KServe front-end (kserve.py) both come through here, so the
        two protocols share batches, limits and deadlines."""
        G = group_size or 1
        if not 1 <= G <= self.limits.max_group:
            raise BadRequest(f"group_size must be in [1, {self.limits.max_group}], got {G}")
        sc, text, think = request_settings(self.policy, params, self.limits, reflect=kind == "reflect")
        if not think:  # no text is written: text settings must not split batches
            text = self.policy.info.text_defaults
        key = BatchKey(kind, sc, text, think)
        batcher = self.reflect_batcher if kind == "reflect" else self.generate_batcher
        try:
            self.policy.check_context(prompts, text, think, reflect=kind == "reflect")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        parts, index = [], []
        step = batcher.max_batch  # a group larger than a batch is split into batch-sized parts
        for i, p in enumerate(prompts):
            for j0 in range(0, G, step):
                n = min(step, G - j0)
                work = Work(
                    [p] * n,
                    [sample_seed(seed, i * G + j) for j in range(j0, j0 + n)],
                    None if images is None else [images[i]] * n,
                )
                parts.append((n, work))
                index.append((i, j0))
        results = await batcher.submit_all(key, parts, until)  # all parts queued, or none
        self.metrics.images.inc(len(prompts) * G)
        samples = [(i, j0 + dj, s) for (i, j0), part in zip(index, results) for dj, s in enumerate(part)]
        return samples, sc, text, think

    async def _run(self, request, context, kind: str, prompts, images=None):
        """Returns (samples, resolved params)."""
        G = request.group_size or 1
        if 1 <= G <= self.limits.max_group:  # (sample() names a bad group size)
            sc, _, _ = request_settings(self.policy, request.params, self.limits, reflect=kind == "reflect")
            check_answer_size(len(prompts) * G, sc.width, sc.height, request.return_raw, self.limits)
        samples, sc, text, think = await self.sample(
            kind, prompts, request.group_size, request.params, int(request.seed), deadline(context), images
        )
        return (
            [self._sample_proto(s, i, j, request.return_raw, request.return_trajectory) for i, j, s in samples],
            config_to_params(sc, text, think),
        )

    def check_reflect_image(self, arr, sc, field: str) -> None:
        """An image to refine must have the request's canvas when the policy draws one size only."""
        canvas = self.policy.info.capabilities.canvas
        if arr.shape[:2] != (sc.height, sc.width) and canvas.min_side == canvas.max_side:
            raise BadRequest(f"{field} must be {sc.width}x{sc.height}, got {arr.shape[1]}x{arr.shape[0]}")

    # ---- rpcs ---------------------------------------------------------------------------------------
    async def Generate(self, request: policy_pb2.GenerateRequest, context) -> policy_pb2.GenerateResponse:
        with self.metrics.track("Generate", context):
            try:
                prompts = check_prompts(request.prompts, self.limits, self.check_prompt)
                samples, resolved = await self._run(request, context, "generate", prompts)
                response = policy_pb2.GenerateResponse(samples=samples, boot_id=self.boot_id, resolved_params=resolved)
                check_message_size(response, self.limits)
            except CLIENT_ERRORS as exc:
                await abort_for(context, exc)
            return response

    async def Reflect(self, request: policy_pb2.ReflectRequest, context) -> policy_pb2.ReflectResponse:
        with self.metrics.track("Reflect", context):
            try:
                self.policy.require("reflect")
                prompts = check_prompts(request.prompts, self.limits, self.check_prompt)
                if len(request.images) != len(prompts):
                    raise BadRequest(f"images has {len(request.images)} entries but prompts has {len(prompts)}")
                sc, _, _ = request_settings(self.policy, request.params, self.limits, reflect=True)
                images = []
                for i, im in enumerate(request.images):
                    try:
                        arr = proto_to_image(im, f"images[{i}]")
                    except (ValueError, TypeError) as exc:
                        raise BadRequest(str(exc)) from None
                    self.check_reflect_image(arr, sc, f"images[{i}]")
                    images.append(arr)
                samples, resolved = await self._run(request, context, "reflect", prompts, images)
                response = policy_pb2.ReflectResponse(samples=samples, boot_id=self.boot_id, resolved_params=resolved)
                check_message_size(response, self.limits)
            except CLIENT_ERRORS as exc:
                await abort_for(context, exc)
            return response

    def _snapshot(self, base: bool = True) -> None:
        """What UpdateWeights and GetModelInfo read on the event loop, taken while no import runs
        (at start, and on the model thread after each import): the accepted tensor specs, full and
        LoRA, and the base weights' fingerprint (`base`: retake those too). An import may add LoRA
        modules, so reading the policy's structure from the event loop meanwhile would race."""
        p = self.policy
        if base:
            self.full_specs = dict(p.weight_specs(lora=False))
            self.fingerprint = p.weights_fingerprint()
        self.lora_enabled = p.lora_enabled
        self.lora_specs = dict(p.weight_specs(lora=True)) if self.lora_enabled else {}

    def _import(self, tensors, lora: bool) -> None:
        """On the model thread, with no batch running: the import, then a new snapshot (a LoRA
        import leaves the base weights as they were)."""
        try:
            self.policy.import_weights(tensors, lora=lora)
        finally:
            self._snapshot(base=not lora)

    async def UpdateWeights(self, request_iterator, context) -> policy_pb2.UpdateWeightsResponse:
        with self.metrics.track("UpdateWeights", context):
            try:
                with self.weight_budget.hold() as hold:  # this stream's received bytes, until applied or refused
                    tensors, lora, received = await receive_weights(
                        request_iterator,
                        self.full_specs,
                        self.limits.max_update_bytes,
                        self.lora_specs,
                        hold,
                        lambda: self.policy.require("lora"),
                    )
                    await self.engine.exclusive(lambda: self._import(tensors, lora))
                    applied = len(tensors)
                    tensors.clear()  # the received bytes are freed before the stream's share is returned
            except CLIENT_ERRORS as exc:
                await abort_for(context, exc, f"weights not updated (still version {self.policy.version}): ")
            except (KeyError, TypeError, ValueError) as exc:  # the policy's import refused a tensor
                why = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                await abort_for(
                    context, BadRequest(why), f"weights not updated (still version {self.policy.version}): "
                )
            self.metrics.policy_version.set(self.policy.version)
            return policy_pb2.UpdateWeightsResponse(
                policy_version=self.policy.version, tensors_applied=applied, bytes_received=received
            )

    async def GetModelInfo(self, request, context) -> policy_pb2.ModelInfo:
        with self.metrics.track("GetModelInfo", context):
            info = self.policy.info
            caps, canvas = info.capabilities, info.capabilities.canvas
            specs = {**self.full_specs, **self.lora_specs}
            params = [
                policy_pb2.TensorSpec(name=n, dtype=NAMES.get(dt, str(dt)), shape=list(shape))
                for n, (shape, dt) in specs.items()
            ]
            return policy_pb2.ModelInfo(
                name=info.name,
                policy_version=self.policy.version,
                boot_id=self.boot_id,
                canvas=canvas.default[0],
                parameters=params,
                lora_enabled=self.lora_enabled,
                capabilities=policy_pb2.Capabilities(
                    think=caps.think,
                    reflect=caps.reflect,
                    understanding=caps.understanding,
                    guidance_branches=list(caps.guidance_branches),
                    lora=caps.lora,
                ),
                canvas_rule=policy_pb2.CanvasRule(
                    default_width=canvas.default[0],
                    default_height=canvas.default[1],
                    multiple=canvas.multiple,
                    min_side=canvas.min_side,
                    max_side=canvas.max_side,
                ),
                parameter_count=info.parameters,
                dtype=NAMES.get(info.dtype, str(info.dtype)),
                device=str(info.device),
                generate_defaults=config_to_params(info.generate_defaults, info.text_defaults),
                reflect_defaults=config_to_params(info.reflect_defaults, info.text_defaults),
                task=self.task,
                weights_fingerprint=self.fingerprint,
            )
