"""The `kserve` reward backend (reward/kserve_backend.py): a server whose reward stage calls the
alphagrpo_verify model of a second `alphagrpo serve` process over the KServe v2 protocol; and, against a
scripted KServe server, retries on UNAVAILABLE only, timeouts, the concurrency limit and malformed
answers."""

import contextlib
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from alphagrpo_serve.client import AsyncClient
from alphagrpo_serve.reward.kserve_backend import KServeEndpoint, KServeReward
from alphagrpo_serve.reward.openai_backend import BackendError
from alphagrpo_serve.server.app import ServeConfig, Server
from alphagrpo_serve.server.kserve_tensors import encode_output
from test_kserve import RED_CIRCLE, free_port, run, serve_process, small_policy


def test_reward_stage_on_a_second_serve_process(tmp_path):
    with serve_process(tmp_path) as (remote, _):

        async def main():
            cfg = ServeConfig(
                host="127.0.0.1",
                port=0,
                reward="kserve",
                reward_url=remote,
                reward_model="alphagrpo_verify",
                reward_concurrency=4,
            )
            server = Server(cfg, policy=small_policy())
            await server.start()
            try:
                images = [RED_CIRCLE, np.zeros_like(RED_CIRCLE), RED_CIRCLE]
                prompts = ["a red circle", "a red circle", "a blue square"]
                async with AsyncClient(f"127.0.0.1:{server.port}") as here, AsyncClient(remote) as there:
                    got = await here.verify(prompts, images)
                    want = await there.verify(prompts, images)
                    for g, w in zip(got, want):
                        assert (g.prompt, g.failed) == (w.prompt, w.failed)
                        assert g.reward == pytest.approx(w.reward, abs=1e-6) and g.quality == pytest.approx(
                            w.quality, abs=1e-6
                        )
                        assert [(a.question, a.answer) for a in g.answers] == [
                            (a.question, a.answer) for a in w.answers
                        ]
                        assert [a.score for a in g.answers] == pytest.approx([a.score for a in w.answers], abs=1e-6)
                    assert got[0].reward > 0.9 and got[1].reward < 0.1
                    assert await here.decompose(["three green triangles"]) == await there.decompose(
                        ["three green triangles"]
                    )
                    with pytest.raises(grpc.aio.AioRpcError) as info:  # the remote verifier refuses the prompt
                        await here.verify(["a red blob"], [RED_CIRCLE])
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "input 'prompt': cannot parse prompt 'a red blob'" in info.value.details()
                    assert (await here.verify(["a red circle"], [RED_CIRCLE]))[0].reward > 0.9
                assert server.reward.requests >= 5 and server.reward.retried == 0
            finally:
                await server.stop(grace=1.0)
                server.reward.close()

        run(main())


def test_unreachable_verifier_is_unavailable_naming_it_and_flags_are_required():
    dead = f"127.0.0.1:{free_port()}"
    reward = KServeReward(KServeEndpoint(dead, "alphagrpo_verify", retries=1, backoff_s=0.01, timeout_s=5))

    async def main():
        server = Server(ServeConfig(host="127.0.0.1", port=0), policy=small_policy(), reward=reward)
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{server.port}", retries=0) as c:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.verify(["a red circle"], [RED_CIRCLE])
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert f"KServe {dead} (model 'alphagrpo_verify') after 2 attempts: UNAVAILABLE" in info.value.details()
                assert len(await c.generate(["a red circle"], steps=2)) == 1  # the policy side is unaffected
        finally:
            await server.stop(grace=1.0)

    run(main())
    reward.close()
    from alphagrpo_serve.cli import main as cli

    with pytest.raises(SystemExit, match="--reward kserve needs --reward-url, --reward-model"):
        cli(["serve", "--port", "0", "--reward", "kserve"])
    with pytest.raises(ValueError, match="HOST:PORT"):
        KServeEndpoint("http://h:1", "m")


class Scripted(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A KServe server that answers the alphagrpo_verify signature: UNAVAILABLE for the first `fail`
    calls, INVALID_ARGUMENT for the prompt 'bad', after `delay` seconds; it counts calls and the most
    in flight at once."""

    def __init__(self, fail=0, delay=0.0, outputs=("reward", "semantic", "quality")):
        self.fail, self.delay, self.outputs = fail, delay, outputs
        self.calls = self.in_flight = self.most = 0
        self.lock = threading.Lock()

    def ModelInfer(self, request, context):
        with self.lock:
            self.calls += 1
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            failing = self.calls <= self.fail
        try:
            time.sleep(self.delay)
            if failing:
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            prompt = request.raw_input_contents[0][4:]
            if prompt == b"bad":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input 'prompt': bad")
            res = service_pb2.ModelInferResponse(model_name=request.model_name)
            for name in self.outputs:
                res.raw_output_contents.append(
                    encode_output(res.outputs.add(name=name), np.array([0.25], np.float32), "FP32")
                )
            return res
        finally:
            with self.lock:
                self.in_flight -= 1


@contextlib.contextmanager
def scripted(**kw):
    servicer = Scripted(**kw)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def _reward(addr, **kw):
    return KServeReward(KServeEndpoint(addr, "verifier", **dict(dict(backoff_s=0.01), **kw)))


def test_retries_timeouts_and_concurrency_limit():
    image = np.zeros((32, 32, 3), np.uint8)
    with scripted(fail=2) as (s, addr):
        r = _reward(addr, retries=3)
        (res,) = r(["a red circle"], [image])
        assert (res.reward, res.semantic, res.answers) == (0.25, 0.25, []) and r.retried == 2 and s.calls == 3
        with pytest.raises(ValueError, match="input 'prompt': bad"):  # INVALID_ARGUMENT: no retry
            r(["bad"], [image])
        assert s.calls == 4
        r.close()
    with scripted(fail=100) as (s, addr):
        r = _reward(addr, retries=2)
        with pytest.raises(
            BackendError, match=f"KServe {addr} .model 'verifier'. after 3 attempts: UNAVAILABLE: warming up"
        ):
            r(["a red circle"], [image])
        assert s.calls == 3
        r.close()
    with scripted(delay=1.0) as (s, addr):
        r = _reward(addr, timeout_s=0.2)
        t = time.monotonic()
        with pytest.raises(BackendError, match="DEADLINE_EXCEEDED"):  # a timeout is not retried
            r(["a red circle"], [image])
        assert time.monotonic() - t < 0.9 and s.calls == 1
        r.close()
    with scripted(delay=0.15) as (s, addr):
        r = _reward(addr, concurrency=2)
        assert len(r(["a red circle"] * 6, [image] * 6)) == 6 and s.most == 2
        r.close()
    with scripted(outputs=("reward",)) as (s, addr):
        r = _reward(addr)
        with pytest.raises(BackendError, match="no semantic"):
            r(["a red circle"], [image])
        r.close()


def test_thread_safe_from_many_threads():
    with scripted(delay=0.05) as (s, addr):
        r = _reward(addr, concurrency=3)
        image = np.zeros((32, 32, 3), np.uint8)
        with futures.ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda i: r([f"p{i}"], [image])[0].prompt, range(8)))
        assert outs == [f"p{i}" for i in range(8)] and s.most <= 3
        r.close()
        r.close()  # closing twice is harmless
