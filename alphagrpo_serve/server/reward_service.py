"""RewardService: Verify and Decompose on whichever reward backend the server runs. Rewards run on
their own threads, beside the model thread."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._proto.alphagrpo.v1 import reward_pb2, reward_pb2_grpc
from ..wire import proto_to_image
from .errors import BadRequest, ResourceLimit, Upstream, abort_for
from .metrics import Metrics
from .validation import Limits, check_prompts


def _accept(prompt: str) -> None:
    """The reward checks its own prompts (a ShapesWorld reward raises for prompts outside its grammar)."""


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, reward, limits: Limits, metrics: Metrics, workers: int = 2):
        self.reward, self.limits, self.metrics = reward, limits, metrics
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
        self.pending = 0  # items admitted and not finished (queued for or running on the reward threads)
        self._lock = threading.Lock()

    def _release(self, n: int) -> None:
        with self._lock:
            self.pending -= n

    async def _call(self, fn, prompts, *args):
        """fn(prompts, *args) on the reward threads. Admission counts items (prompts): past
        limits.max_reward_queue items waiting or running, ResourceLimit; an item leaves the count when
        its work finishes, or at once when its caller goes away before the work started."""
        n = len(prompts)
        with self._lock:
            if self.pending + n > self.limits.max_reward_queue:
                raise ResourceLimit(
                    f"the reward queue is full ({self.pending} of {self.limits.max_reward_queue} items "
                    f"waiting or running, the request has {n})"
                )
            self.pending += n
        try:
            work = self.executor.submit(fn, prompts, *args)
        except BaseException:
            self._release(n)
            raise
        work.add_done_callback(lambda _: self._release(n))
        try:
            return await asyncio.wrap_future(work)
        except (ValueError, TypeError) as exc:  # prompts the reward cannot judge (PromptError is a ValueError)
            raise BadRequest(str(exc)) from None
        except RuntimeError as exc:  # reward backend failures (openai_backend.BackendError)
            raise Upstream(f"reward backend: {exc}") from None

    async def score(self, prompts, images: np.ndarray, field: str = "items"):
        """Checks the prompts and runs the reward on its threads: one RewardResult per (prompt, image),
        images uint8 [N, H, W, 3]. For front-ends beside Verify (the KServe models, kserve.py)."""
        prompts = check_prompts(prompts, self.limits, _accept, field=field)
        return await self._call(self.reward, prompts, images)

    async def questions(self, prompts, field: str = "prompts"):
        """Checked prompts -> their questions (Decompose's work, for other front-ends)."""
        prompts = check_prompts(prompts, self.limits, _accept, field=field)
        return await self._call(self.reward.decompose, prompts)

    async def Verify(self, request: reward_pb2.VerifyRequest, context) -> reward_pb2.VerifyResponse:
        with self.metrics.track("Verify", context):
            try:
                items = list(request.items)
                prompts = check_prompts([it.prompt for it in items], self.limits, _accept, field="items")
                images = []
                for i, it in enumerate(items):
                    try:
                        images.append(proto_to_image(it.image, f"items[{i}].image"))
                    except (ValueError, TypeError) as exc:
                        raise BadRequest(str(exc)) from None
                if len({im.shape for im in images}) > 1:
                    raise BadRequest("items: every image of one request must have the same size")
                try:
                    results = await self._call(self.reward, prompts, np.stack(images))
                except BadRequest as exc:  # the reward judged the items (prompts outside its domain, image sizes)
                    raise BadRequest(_naming("items", str(exc))) from None
            except (BadRequest, ResourceLimit, Upstream) as exc:
                await abort_for(context, exc)
            return reward_pb2.VerifyResponse(rewards=[_reward_proto(r) for r in results])

    async def Decompose(self, request: reward_pb2.DecomposeRequest, context) -> reward_pb2.DecomposeResponse:
        with self.metrics.track("Decompose", context):
            try:
                prompts = check_prompts(request.prompts, self.limits, _accept)
                try:
                    qs = await self._call(self.reward.decompose, prompts)
                except BadRequest as exc:
                    raise BadRequest(_naming("prompts", str(exc))) from None
            except (BadRequest, ResourceLimit, Upstream) as exc:
                await abort_for(context, exc)
            return reward_pb2.DecomposeResponse(
                decompositions=[
                    reward_pb2.Decomposition(prompt=p, questions=[_question_proto(q) for q in qq])
                    for p, qq in zip(prompts, qs)
                ]
            )


def _naming(field: str, message: str) -> str:
    """A reward backend's message, prefixed with the request field it is about."""
    return message if message.startswith(field) else f"{field}: {message}"


def _question_proto(q) -> reward_pb2.Question:
    return reward_pb2.Question(id=q.id, text=q.text, kind=q.kind, tag=q.tag)


def _reward_proto(r) -> reward_pb2.Reward:
    return reward_pb2.Reward(
        prompt=r.prompt,
        reward=r.reward,
        semantic=r.semantic,
        quality=r.quality,
        failed=r.failed,
        answers=[
            reward_pb2.Answer(
                question=_question_proto(a.question),
                score=a.score if a.score is not None else 0.0,
                answer=a.answer,
                failed=a.failed or a.score is None,
                detail=a.detail,
            )
            for a in r.answers
        ],
    )
