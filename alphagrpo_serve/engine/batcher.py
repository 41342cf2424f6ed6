"""Dynamic batching: requests become model batches.

Each request kind has its own queue. A batch forms from queued work items with compatible
settings (the same key) until it holds max_batch samples (a Generate of G samples counts G) or
the oldest item has waited max_wait_ms. The model runs on one worker thread, off the event loop,
so the server keeps accepting calls, answering health checks and computing rewards while a batch
runs; weight updates run on the same thread, so they land between batches, never inside one.
Items whose deadline passed or whose caller went away are dropped before their batch runs.

Admission is all or nothing: a request's parts (a group larger than a batch is split) are queued
together or not at all, and a refused, failed or cancelled request takes its queued parts with it.
A batch that raises is split in halves and re-run until the items that fail on their own are
found: only they get the error, their neighbours complete.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple


class QueueFull(Exception):
    """The queue holds max_queue samples already."""


class DeadlineExpired(Exception):
    """The item's deadline passed before its batch ran."""


@dataclass
class WorkItem:
    key: Hashable  # items with equal keys may share a batch
    size: int  # samples this item adds to a batch
    payload: Any
    deadline: Optional[float] = None  # time.monotonic() by which the result is needed
    future: Optional[asyncio.Future] = None
    enqueued: float = field(default_factory=time.monotonic)
    siblings: List["WorkItem"] = field(default_factory=list)  # the other parts of the same request


class DynamicBatcher:
    """run_batch(key, payloads) -> list of results (one per payload), called on the worker thread."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[Hashable, List[Any]], List[Any]],
        executor: ThreadPoolExecutor,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        on_batch: Optional[Callable[[str, int, float], None]] = None,
        on_queue: Optional[Callable[[str, int], None]] = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.name, self.run_batch, self.executor = name, run_batch, executor
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.on_batch, self.on_queue = on_batch, on_queue
        self.queue: List[WorkItem] = []
        self.queued_samples = 0
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._closing = False

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Finishes what is queued, then stops."""
        self._closing = True
        if self._wakeup:
            self._wakeup.set()
        if self._task:
            await self._task

    async def submit(self, key: Hashable, size: int, payload: Any, deadline: Optional[float] = None):
        """Queues one item and waits for its result. Raises QueueFull, DeadlineExpired or what run_batch raised."""
        (result,) = await self.submit_all(key, [(size, payload)], deadline)
        return result

    async def submit_all(
        self, key: Hashable, parts: Sequence[Tuple[int, Any]], deadline: Optional[float] = None
    ) -> List[Any]:
        """Queues every (size, payload) part of one request at once, or none of them (QueueFull), and
        waits for all their results. When one part fails, or the caller goes away, the parts still
        queued are withdrawn before the error propagates: a failed request leaves no work behind."""
        for size, _ in parts:
            if size > self.max_batch:
                raise ValueError(f"{size} samples exceed the batch limit of {self.max_batch}")
        total = sum(size for size, _ in parts)
        if self._closing:
            raise QueueFull(f"{self.name} queue is draining")
        if total > self.max_queue:
            raise QueueFull(
                f"the request needs {total} samples, more than the {self.name} queue holds ({self.max_queue})"
            )
        if self.queued_samples + total > self.max_queue:
            raise QueueFull(
                f"{self.name} queue is full ({self.queued_samples} of {self.max_queue} samples queued, "
                f"the request needs {total})"
            )
        loop = asyncio.get_running_loop()
        items = [WorkItem(key, size, payload, deadline, loop.create_future()) for size, payload in parts]
        if len(items) > 1:
            for it in items:
                it.siblings = [o for o in items if o is not it]
        self.queue.extend(items)
        self.queued_samples += total
        self._report_queue()
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(it.future for it in items)))
        except BaseException:  # one part failed or the caller went away: withdraw the rest now
            self._withdraw(items)
            raise

    def _fail(self, item: WorkItem, exc: BaseException) -> None:
        """item's caller gets exc; the other parts of its request leave the queue now, before any
        of them can join a batch (the request has failed already)."""
        if not item.future.done():
            item.future.set_exception(exc)
        if item.siblings:
            self._withdraw(item.siblings)

    def _withdraw(self, items: List[WorkItem]) -> None:
        """Removes the still-queued items and cancels every unfinished one (a running batch drops its result)."""
        ids = {id(it) for it in items}
        kept = [it for it in self.queue if id(it) not in ids]
        if len(kept) != len(self.queue):
            self.queued_samples -= sum(it.size for it in self.queue if id(it) in ids)
            self.queue = kept
            self._report_queue()
        for it in items:
            if not it.future.done():
                it.future.cancel()

    def _take_batch(self) -> List[WorkItem]:
        """The oldest live item and every later item with its key, up to max_batch samples."""
        now = time.monotonic()
        live = []
        for it in self.queue:
            if it.future.done():  # cancelled by its caller
                self.queued_samples -= it.size
            elif it.deadline is not None and now > it.deadline:
                self.queued_samples -= it.size
                it.future.set_exception(DeadlineExpired(f"deadline passed after {now - it.enqueued:.3f} s in queue"))
            else:
                live.append(it)
        self.queue = live
        if not live:
            return []
        key, batch, n = live[0].key, [], 0
        for it in live:
            if it.key == key and n + it.size <= self.max_batch:
                batch.append(it)
                n += it.size
        chosen = set(map(id, batch))
        self.queue = [it for it in live if id(it) not in chosen]
        self.queued_samples -= n
        self._report_queue()
        return batch

    def _report_queue(self) -> None:
        if self.on_queue:
            self.on_queue(self.name, self.queued_samples)

    def _ready(self) -> bool:
        if not self.queue:
            return False
        if self._closing:
            return True
        oldest = self.queue[0]
        same = sum(it.size for it in self.queue if it.key == oldest.key)
        return same >= self.max_batch or time.monotonic() - oldest.enqueued >= self.max_wait

    async def _loop(self) -> None:
        while True:
            if not self.queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._ready():
                wait = max(0.0, self.max_wait - (time.monotonic() - self.queue[0].enqueued))
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    async def _run(self, batch: List[WorkItem]) -> None:
        """Runs one batch; when it raises, runs each half on its own (recursively), so that only the
        items that fail by themselves get an error and every other item completes."""
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        try:
            results = await loop.run_in_executor(
                self.executor, self.run_batch, batch[0].key, [it.payload for it in batch]
            )
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            live = self._still_wanted(batch)
            if len(batch) == 1 or not live:
                for it in live:
                    self._fail(it, exc)
                return
            half = len(live) // 2 or 1
            for part in (live[:half], live[half:]):
                part = self._still_wanted(part)  # the first half's run took time: deadlines may have passed
                if part:
                    await self._run(part)
            return
        if self.on_batch:
            self.on_batch(self.name, sum(it.size for it in batch), time.monotonic() - start)
        for it, res in zip(batch, results):
            if not it.future.done():
                if isinstance(res, Exception):
                    self._fail(it, res)
                else:
                    it.future.set_result(res)

    def _still_wanted(self, items: List[WorkItem]) -> List[WorkItem]:
        """The items whose caller still waits; expired ones get DeadlineExpired."""
        now, live = time.monotonic(), []
        for it in items:
            if it.future.done():
                continue
            if it.deadline is not None and now > it.deadline:
                self._fail(it, DeadlineExpired(f"deadline passed after {now - it.enqueued:.3f} s"))
                continue
            live.append(it)
        return live


class Engine:
    """One worker thread for the model, a batcher per request kind, and exclusive jobs (weight
    updates) that run between batches."""

    def __init__(
        self,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        on_batch: Optional[Callable[[str, int, float], None]] = None,
        on_queue: Optional[Callable[[str, int], None]] = None,
    ):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.settings = dict(
            max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, on_batch=on_batch, on_queue=on_queue
        )
        self.batchers: Dict[str, DynamicBatcher] = {}

    def add(self, name: str, run_batch: Callable[[Hashable, List[Any]], List[Any]], **overrides) -> DynamicBatcher:
        b = DynamicBatcher(name, run_batch, self.executor, **dict(self.settings, **overrides))
        self.batchers[name] = b
        return b

    def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    async def exclusive(self, fn: Callable[[], Any]) -> Any:
        """Runs fn on the model thread between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def stop(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        self.executor.shutdown(wait=True)

    def queue_depth(self) -> Dict[str, int]:
        return {n: b.queued_samples for n, b in self.batchers.items()}
