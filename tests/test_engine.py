"""The dynamic batcher: batches by key and size, waits at most max_wait, bounded queue, deadlines,
cancellation, exclusive jobs between batches."""

import asyncio
import threading
import time

import pytest

from alphagrpo_serve.engine import DeadlineExpired, Engine, QueueFull


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_batches_group_by_key_and_size():
    batches = []

    def run_batch(key, payloads):
        batches.append((key, list(payloads)))
        time.sleep(0.01)
        return [f"{key}:{p}" for p in payloads]

    async def main():
        eng = Engine(max_batch=4, max_wait_ms=50)
        b = eng.add("gen", run_batch)
        eng.start()
        calls = [b.submit("a", 2, 1), b.submit("b", 1, 2), b.submit("a", 2, 3), b.submit("a", 1, 4)]
        out = await asyncio.gather(*calls)
        await eng.stop()
        return out

    out = run(main())
    assert out == ["a:1", "b:2", "a:3", "a:4"]
    assert batches[0] == ("a", [1, 3])  # 2 + 2 samples fill the batch of 4
    assert ("b", [2]) in batches and ("a", [4]) in batches


def test_waits_at_most_max_wait():
    async def main():
        eng = Engine(max_batch=64, max_wait_ms=30)
        b = eng.add("gen", lambda k, ps: ps)
        eng.start()
        t = time.monotonic()
        r = await b.submit("k", 1, "x")
        dt = time.monotonic() - t
        await eng.stop()
        return r, dt

    r, dt = run(main())
    assert r == "x" and 0.02 <= dt < 1.0


def test_queue_limit_deadline_and_cancel():
    gate = threading.Event()
    ran = []

    def run_batch(key, payloads):
        gate.wait(5)
        ran.extend(payloads)
        return payloads

    async def main():
        eng = Engine(max_batch=2, max_wait_ms=0, max_queue=3)
        b = eng.add("gen", run_batch)
        eng.start()
        first = asyncio.ensure_future(b.submit("k", 2, "first"))  # occupies the model thread
        await asyncio.sleep(0.05)
        expired = asyncio.ensure_future(b.submit("k", 1, "late", deadline=time.monotonic() + 0.01))
        cancelled = asyncio.ensure_future(b.submit("k", 1, "gone"))
        await asyncio.sleep(0.02)
        with pytest.raises(QueueFull, match="queue is full"):
            await b.submit("k", 2, "too many")
        cancelled.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        assert await first == "first"
        with pytest.raises(DeadlineExpired):
            await expired
        ok = await b.submit("k", 1, "after")
        await eng.stop()
        return ok

    assert run(main()) == "after"
    assert ran == ["first", "after"], ran  # the expired and the cancelled item never ran


def test_exclusive_jobs_run_between_batches():
    order = []

    def run_batch(key, payloads):
        order.append(("batch-start", payloads))
        time.sleep(0.05)
        order.append(("batch-end", payloads))
        return payloads

    async def main():
        eng = Engine(max_batch=1, max_wait_ms=0)
        b = eng.add("gen", run_batch)
        eng.start()
        t1 = asyncio.ensure_future(b.submit("k", 1, 1))
        await asyncio.sleep(0.01)
        upd = asyncio.ensure_future(eng.exclusive(lambda: order.append(("update", None))))
        t2 = asyncio.ensure_future(b.submit("k", 1, 2))
        await asyncio.gather(t1, upd, t2)
        await eng.stop()

    run(main())
    i = order.index(("update", None))
    assert order[i - 1][0] == "batch-end" and (i + 1 == len(order) or order[i + 1][0] == "batch-start")


def test_batch_failure_reaches_every_caller():
    def boom(key, payloads):
        raise RuntimeError("model exploded")

    async def main():
        eng = Engine(max_batch=4, max_wait_ms=10)
        b = eng.add("gen", boom)
        eng.start()
        res = await asyncio.gather(b.submit("k", 1, 1), b.submit("k", 1, 2), return_exceptions=True)
        await eng.stop()
        return res

    res = run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in res)


def test_one_failing_item_fails_alone_and_its_batch_neighbours_complete():
    calls = []

    def run_batch(key, payloads):
        calls.append(list(payloads))
        if "bad" in payloads:
            raise ValueError(f"cannot run {payloads}")
        return [p.upper() for p in payloads]

    async def main():
        eng = Engine(max_batch=8, max_wait_ms=50)
        b = eng.add("gen", run_batch)
        eng.start()
        res = await asyncio.gather(*(b.submit("k", 1, p) for p in ("a", "b", "bad", "c", "d")), return_exceptions=True)
        await eng.stop()
        return res

    res = run(main())
    assert res[:2] == ["A", "B"] and res[3:] == ["C", "D"], res
    assert isinstance(res[2], ValueError) and str(res[2]) == "cannot run ['bad']", res[2]  # the error of its own run
    assert calls[0] == ["a", "b", "bad", "c", "d"]  # they did share the first batch
    assert len(calls) <= 1 + 2 * 3, calls  # bisection: O(log n) re-runs per guilty item


def test_admission_is_all_or_nothing_and_a_failed_request_leaves_nothing_queued():
    gate = threading.Event()
    ran = []

    def run_batch(key, payloads):
        gate.wait(5)
        ran.extend(payloads)
        if any(p.startswith("boom") for p in payloads):
            raise RuntimeError("boom")
        return payloads

    async def main():
        eng = Engine(max_batch=2, max_wait_ms=0, max_queue=4)
        b = eng.add("gen", run_batch)
        eng.start()
        busy = asyncio.ensure_future(b.submit("k", 2, "busy"))  # occupies the model thread
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="needs 6 samples, more than"):
            await b.submit_all("k", [(2, "x1"), (2, "x2"), (2, "x3")])
        assert b.queued_samples == 0 and not b.queue  # nothing of the refused request stayed
        big = asyncio.ensure_future(b.submit_all("k", [(2, "y1"), (2, "y2")]))
        await asyncio.sleep(0.02)
        with pytest.raises(QueueFull, match="queue is full"):
            await b.submit("k", 1, "z")
        big.cancel()  # the caller goes away: both parts leave the queue at once
        await asyncio.sleep(0.02)
        assert b.queued_samples == 0 and not b.queue
        failing = asyncio.ensure_future(b.submit_all("k", [(2, "boom"), (2, "w2")]))
        await asyncio.sleep(0.02)
        gate.set()
        assert await busy == "busy"
        with pytest.raises(RuntimeError):
            await failing
        await asyncio.sleep(0.05)
        assert b.queued_samples == 0
        await eng.stop()

    run(main())
    assert "y1" not in ran and "y2" not in ran and "x1" not in ran, ran
    assert "w2" not in ran, ran  # withdrawn when its sibling part failed
