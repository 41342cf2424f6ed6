"""A real gRPC server on a free 127.0.0.1 port, talked to through the generated stubs and the client
library (a small random tiny UMM keeps it fast). Every bad request is followed by a good one."""

import asyncio
import dataclasses
import subprocess
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alphagrpo_serve._proto.alphagrpo.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from alphagrpo_serve.client import AsyncClient
from alphagrpo_serve.models.tiny_policy import TinyPolicy
from alphagrpo_serve.shapes.world import Obj, Scene, render
from alphagrpo_serve.wire import image_to_proto
from serving import run, running, self_signed_cert, small_policy, wait_for_line


class SlowPolicy(TinyPolicy):
    """A tiny policy whose every Generate batch takes at least `delay` seconds longer."""

    def __init__(self, delay: float):
        super().__init__(small_policy().model)
        self.delay = delay

    def generate(self, *a, **k):
        time.sleep(self.delay)
        return super().generate(*a, **k)


FAST = dict(steps=3, max_thought_tokens=4)


def test_generate_reflect_verify_and_health():
    async def main():
        async with running() as (server, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                hs = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
                assert hs.status == health_pb2.HealthCheckResponse.SERVING
            async with AsyncClient(addr) as c:
                out = await c.generate(
                    ["a red circle", "three squares"],
                    group_size=2,
                    think=True,
                    mode="sde",
                    sde_window=(0, 2),
                    return_trajectory=True,
                    seed=5,
                    **FAST,
                )
                assert [(s.prompt_index, s.sample_index) for s in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
                assert all(s.image.shape == (32, 32, 3) and s.policy_version == 0 for s in out)
                tr = out[0].trajectory.image
                assert tr.latents.shape == (3, 3, 32, 32) and len(tr.log_probs) == 2
                assert len(out[0].trajectory.token_ids) == len(out[0].trajectory.token_logprobs) > 0
                again = await c.generate(
                    ["a red circle"], group_size=2, think=True, mode="sde", sde_window=(0, 2), seed=5, **FAST
                )
                assert np.array_equal(again[0].image, out[0].image)  # same seed, same settings
                ref = await c.reflect(["a red circle"], [out[0].image], group_size=2, **FAST)
                assert len(ref) == 2 and ref[0].image.shape == (32, 32, 3)
                img = render(Scene([Obj("circle", "red", 16, 16, 5)]))
                (r,) = await c.verify(["a red circle"], [img])
                assert r.reward > 0.9 and any(a.question.tag == "Existence" for a in r.answers)
                qs = await c.decompose(["three green triangles"])
                assert [q["tag"] for q in qs[0]][:2] == ["Existence", "Count"]
                assert out[0].sampling.steps == 3 and out[0].sampling.mode == "sde" and out[0].sampling.cfg_scale == 3.0
                info = await c.model_info()
                assert info.canvas == 32 and info.boot_id == server.boot_id and len(info.parameters) > 10
                assert info.name == "tiny" and info.task == "shapes" and info.capabilities.reflect
                assert list(info.capabilities.guidance_branches) == ["text"] and info.dtype == "float32"
                assert info.generate_defaults.steps == 20 and info.canvas_rule.max_side == 32

    run(main())


@pytest.mark.parametrize(
    "request_, field",
    [
        (policy_pb2.GenerateRequest(), "prompts is empty"),
        (policy_pb2.GenerateRequest(prompts=["a red circle " * 100]), "prompts[0] has"),
        (policy_pb2.GenerateRequest(prompts=["a red blob"]), "prompts[0]: cannot parse prompt"),
        (policy_pb2.GenerateRequest(prompts=["a red circle"], group_size=1000), "group_size must be in"),
        (
            policy_pb2.GenerateRequest(prompts=["a red circle"], params=policy_pb2.SamplingParams(steps=5000)),
            "params.steps",
        ),
        (
            policy_pb2.GenerateRequest(prompts=["a red circle"], params=policy_pb2.SamplingParams(top_p=2.0)),
            "params.top_p",
        ),
    ],
)
def test_bad_generate_then_good(request_, field):
    async def main():
        async with running() as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Generate(request_)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert field in info.value.details(), info.value.details()
                ok = await stub.Generate(
                    policy_pb2.GenerateRequest(prompts=["a red circle"], params=policy_pb2.SamplingParams(steps=2))
                )
                assert len(ok.samples) == 1

    run(main())


def test_bad_reflect_and_verify_images():
    async def main():
        async with running() as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Reflect(
                        policy_pb2.ReflectRequest(prompts=["a red circle"], images=[common_pb2.Image(png=b"junk")])
                    )
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "images[0]" in info.value.details()
            async with AsyncClient(addr) as c:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.verify(["a red circle"], [np.zeros((32, 16, 3), np.uint8)])
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "square" in info.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.verify(["a red blob"], [np.zeros((32, 32, 3), np.uint8)])
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "blob" in info.value.details()
                (r,) = await c.verify(["a red circle"], [np.zeros((32, 32, 3), np.uint8)])
                assert r.reward == 0.0  # a blank image: reward 0 with its breakdown

    run(main())


def test_update_weights_atomic_and_versioned():
    async def main():
        pol = small_policy()
        async with running(policy=pol) as (_, addr):
            async with AsyncClient(addr) as c:
                before = pol.export_weights()
                name = "blocks.0.qkv.weight"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.update_weights(
                        {
                            name: before[name] + 1,
                            "blocks.0.proj.weight": torch.full_like(before["blocks.0.proj.weight"], float("nan")),
                        }
                    )
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in info.value.details()
                for bad, words in (
                    ({"nope": torch.zeros(2)}, "nope: not a parameter"),
                    ({name: torch.zeros(3)}, "shape"),
                    ({name: before[name].double()}, "dtype"),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await c.update_weights(bad)
                    assert words in info.value.details()
                assert torch.equal(pol.export_weights()[name], before[name]) and pol.version == 0
                v = await c.update_weights({name: before[name] * 0.5}, chunk_bytes=1000)  # many chunks
                assert v == 1 and torch.equal(pol.export_weights()[name], before[name] * 0.5)
                out = await c.generate(["a square"], steps=2)
                assert out[0].policy_version == 1

    run(main())


def test_auth_token_and_metrics(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    mport = s.getsockname()[1]
    s.close()

    async def main():
        async with running(auth_token_file=str(token), metrics_port=mport) as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                hs = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                assert hs.status == health_pb2.HealthCheckResponse.SERVING  # health needs no token
            for tok, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
                async with AsyncClient(addr, token=tok) as c:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await c.decompose(["a red circle"])
                    assert info.value.code() == code
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await c.update_weights({"x": torch.zeros(1)})
                    assert info.value.code() == code
            async with AsyncClient(addr, token="s3cret") as c:
                assert (await c.decompose(["a red circle"]))[0]
            text = await asyncio.get_running_loop().run_in_executor(
                None, lambda: urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
            )
            assert 'alphagrpo_requests_total{code="OK",method="Decompose"}' in text
            assert "alphagrpo_policy_version 0.0" in text and "alphagrpo_request_seconds_bucket" in text

    run(main())


def test_group_larger_than_a_batch_is_split():
    async def main():
        async with running(max_batch=3) as (_, addr):
            async with AsyncClient(addr) as c:
                out = await c.generate(["a red circle", "a square"], group_size=7, steps=2, seed=11)
                assert [(s.prompt_index, s.sample_index) for s in out] == [(i, j) for i in range(2) for j in range(7)]
                assert [s.seed for s in out] == list(range(11, 25))

    run(main())


def test_queue_full_and_deadline():
    async def main():
        async with running(policy=SlowPolicy(0.5), max_queue=3, max_batch=2, max_wait_ms=0) as (_, addr):
            async with AsyncClient(addr, retries=0) as c:
                first = asyncio.ensure_future(c.generate(["a square"], group_size=2, steps=2))
                await asyncio.sleep(0.1)  # the first batch runs; the queue is empty again
                second = asyncio.ensure_future(c.generate(["a square"], group_size=2, steps=2))
                await asyncio.sleep(0.1)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.generate(["a circle"], group_size=2, steps=2)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.generate(["a circle"], steps=2, timeout=0.2)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert len(await first) == 2 and len(await second) == 2
                assert len(await c.generate(["a circle"], steps=2)) == 1
                # a cancelled call frees its slots at once
                busy = asyncio.ensure_future(c.generate(["a square"], group_size=2, steps=2))
                await asyncio.sleep(0.1)
                queued = asyncio.ensure_future(c.generate(["a square"], group_size=2, steps=2))
                await asyncio.sleep(0.1)
                queued.cancel()
                await asyncio.sleep(0.1)
                assert len(await c.generate(["a circle"], group_size=2, steps=2)) == 2  # would not fit otherwise
                assert len(await busy) == 2

    run(main())


def test_tls_with_self_signed_certificate(tmp_path):
    key, cert = self_signed_cert(tmp_path)

    async def main():
        async with running(tls_cert=str(cert), tls_key=str(key)) as (_, addr):
            async with AsyncClient(addr, root_certificates=cert.read_bytes()) as c:
                assert (await c.decompose(["a red circle"]))[0]
            async with AsyncClient(addr, retries=0, timeout=5) as plain:  # plaintext to a TLS port fails cleanly
                with pytest.raises(grpc.aio.AioRpcError):
                    await plain.decompose(["a red circle"])

    run(main())


def test_cli_serve_subprocess_sigterm_drains_and_exits_zero(tmp_path):
    """`alphagrpo serve` as users start it: prints where it listens, answers the CLI client, and on
    SIGTERM finishes the in-flight call and exits 0."""
    import signal
    import socket
    import sys

    from alphagrpo_serve.models.pretrain import export_safetensors

    weights = tmp_path / "w.safetensors"
    export_safetensors(small_policy().model, str(weights))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alphagrpo_serve.cli",
            "serve",
            "--port",
            str(port),
            "--weights",
            str(weights),
            "--grace-s",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen = wait_for_line(proc, "listening on")  # a few structured log lines may come first
        assert seen and f"listening on 127.0.0.1:{port}" in seen[-1], seen
        img = tmp_path / "x.png"
        __import__("PIL.Image").Image.fromarray(render(Scene([Obj("circle", "red", 16, 16, 5)]))).save(img)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "alphagrpo_serve.cli",
                "verify",
                "--server",
                f"127.0.0.1:{port}",
                "--prompt",
                "a red circle",
                "--image",
                str(img),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "Is there a red circle in the image?" in out.stdout, out.stdout + out.stderr

        async def slow_call_then_sigterm():
            async with AsyncClient(f"127.0.0.1:{port}", retries=0) as c:
                await c.decompose(["a red circle"])  # the connection is up before the slow call starts
                call = asyncio.ensure_future(c.generate(["a red circle"] * 4, group_size=8, steps=30))
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                return await call

        samples = run(slow_call_then_sigterm())
        assert len(samples) == 32  # the in-flight call completed during the drain
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_message_size_limits_and_image_size():
    async def main():
        async with running(max_message_mb=1) as (_, addr):
            big = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)  # ~3 MB as PNG
            async with AsyncClient(addr, retries=0) as c:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.verify(["a red circle"], [big])
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "larger than max" in info.value.details(), info.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.reflect(["a red circle"], [np.zeros((64, 64, 3), np.uint8)], steps=2)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be 32x32" in info.value.details()
                assert (await c.decompose(["a red circle"]))[0]
            async with AsyncClient(addr, retries=0, max_message_mb=0) as tiny:  # the client's own receive limit
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await tiny.generate(["a red circle"], steps=2, return_trajectory=True)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(main())


def test_retries_unavailable_over_addresses_reflection_and_health_during_a_batch():
    import socket

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there

    async def main():
        async with running(policy=SlowPolicy(1.0)) as (_, addr):
            # round-robin starts at the dead address; UNAVAILABLE is retried on the next one
            async with AsyncClient([dead, addr], retries=2, backoff=0.01) as c:
                assert (await c.decompose(["a red circle"]))[0]
                batch = asyncio.ensure_future(c.generate(["a square"], steps=2))
                await asyncio.sleep(0.3)  # the model thread is busy now
                async with grpc.aio.insecure_channel(addr) as ch:
                    t = time.monotonic()
                    hs = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert hs.status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() - t < 0.5
                    (r,) = await c.verify(["a red circle"], [render(Scene([Obj("circle", "red", 16, 16, 5)]))])
                    assert not batch.done() and r.reward > 0.9  # rewards are computed beside the running batch
                    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
                    responses = stub.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                    )
                    names = [svc.name async for resp in responses for svc in resp.list_services_response.service]
                    assert {"alphagrpo.v1.PolicyService", "alphagrpo.v1.RewardService", "grpc.health.v1.Health"} <= set(
                        names
                    )
                assert len(await batch) == 1
            async with AsyncClient([dead], retries=1, backoff=0.01, timeout=5) as only_dead:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await only_dead.decompose(["a red circle"])
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            async with AsyncClient(addr, retries=3) as c:  # other errors are not retried
                calls = []
                orig = c._policy[0].Generate

                async def counting(*a, **k):
                    calls.append(1)
                    return await orig(*a, **k)

                c._policy[0].Generate = counting
                with pytest.raises(grpc.aio.AioRpcError):
                    await c.generate(["a red blob"], steps=2)
                assert len(calls) == 1

    run(main())


class NoReflectPolicy(TinyPolicy):
    """A tiny policy that declares it cannot reflect (a text-to-image-only model)."""

    @property
    def info(self):
        info = super().info
        return dataclasses.replace(
            info, capabilities=dataclasses.replace(info.capabilities, reflect=False, think=False)
        )

    def reflect(self, *a, **k):  # pragma: no cover - the server must refuse before calling it
        raise AssertionError("reflect called on a policy without the capability")


def test_missing_capabilities_are_failed_precondition_naming_them():
    async def main():
        async with running(policy=NoReflectPolicy(small_policy().model)) as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                img = common_pb2.Image(png=image_to_proto(np.zeros((32, 32, 3), np.uint8)).png)
                for call, req, word in (
                    (stub.Reflect, policy_pb2.ReflectRequest(prompts=["a red circle"], images=[img]), "reflect"),
                    (
                        stub.Generate,
                        policy_pb2.GenerateRequest(
                            prompts=["a red circle"], params=policy_pb2.SamplingParams(think=True)
                        ),
                        "think",
                    ),
                    (
                        stub.Generate,
                        policy_pb2.GenerateRequest(
                            prompts=["a red circle"], params=policy_pb2.SamplingParams(cfg_img_scale=2.0)
                        ),
                        "image guidance",
                    ),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(req)
                    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
                    assert word in info.value.details(), info.value.details()
                ok = await stub.Generate(
                    policy_pb2.GenerateRequest(prompts=["a red circle"], params=policy_pb2.SamplingParams(steps=2))
                )
                assert len(ok.samples) == 1
                mi = await stub.GetModelInfo(policy_pb2.GetModelInfoRequest())
                assert not mi.capabilities.reflect and not mi.capabilities.think

    run(main())


def test_open_task_accepts_any_prompt_and_zero_is_a_real_value():
    async def main():
        async with running(task="open") as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                res = await stub.Generate(
                    policy_pb2.GenerateRequest(
                        prompts=["a watercolour lighthouse at dusk"],
                        params=policy_pb2.SamplingParams(
                            steps=2, cfg_scale=0.0, temperature=0.0, think=True, max_thought_tokens=3
                        ),
                    )
                )
                assert len(res.samples) == 1
                # cfg_scale 0 and temperature 0 were honoured, not replaced by the defaults
                assert res.resolved_params.cfg_scale == 0.0 and res.resolved_params.temperature == 0.0
                unset = await stub.Generate(
                    policy_pb2.GenerateRequest(prompts=["x"], params=policy_pb2.SamplingParams(steps=2))
                )
                assert unset.resolved_params.cfg_scale == 3.0 and unset.resolved_params.temperature == 1.0
                mi = await stub.GetModelInfo(policy_pb2.GetModelInfoRequest())
                assert mi.task == "open"
        async with running() as (_, addr):  # the tiny UMM's own domain: ShapesWorld's grammar
            async with grpc.aio.insecure_channel(addr) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await policy_pb2_grpc.PolicyServiceStub(ch).Generate(
                        policy_pb2.GenerateRequest(prompts=["a watercolour lighthouse at dusk"])
                    )
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts[0]" in info.value.details()

    run(main())
