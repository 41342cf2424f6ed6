"""Issue 18: every bad request of the hostile-client report, sent beside a good one on a real server
(127.0.0.1), with both answers checked. Servers run with a batching window wide enough that
concurrent requests with equal settings share a model batch, and a recording policy shows that they
did."""

import asyncio
import io
import os
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from alphagrpo_serve._proto.alphagrpo.v1 import (
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from alphagrpo_serve.client import AsyncClient
from alphagrpo_serve.models.base import seed_streams
from alphagrpo_serve.models.tiny_policy import TinyPolicy
from alphagrpo_serve.reward import embedded_reward
from alphagrpo_serve.server.app import ServeConfig, Server
from alphagrpo_serve.server.validation import Limits
from alphagrpo_serve.wire import image_to_proto, sample_seed
from serving import running, small_policy

P = policy_pb2.SamplingParams
GOOD = dict(prompts=["a red circle"], params=P(steps=2))


def run(coro, timeout=180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class RecordingPolicy(TinyPolicy):
    """Records every model batch (its prompts and seeds); optionally fails any batch holding `poison`."""

    def __init__(self, poison=None, delay=0.0):
        super().__init__(small_policy().model)
        self.batches, self.poison, self.delay = [], poison, delay

    def generate(self, prompts, seeds, *a, **k):
        self.batches.append((list(prompts), list(seeds)))
        time.sleep(self.delay)
        if self.poison is not None and self.poison in prompts:
            raise ValueError(f"poisoned batch of {len(prompts)} samples")
        return super().generate(prompts, seeds, *a, **k)

    def reflect(self, prompts, images, seeds, *a, **k):
        self.batches.append((list(prompts), list(seeds)))
        return super().reflect(prompts, images, seeds, *a, **k)


async def outcome(call):
    """(code name, details) of an awaited call; ('OK', response) when it succeeds."""
    try:
        return "OK", await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's header)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# ---- 1. seeds and failures inside a batch ----------------------------------------------------------------
def test_seed_streams_keep_existing_seeds_and_cover_uint64():
    for s in (0, 1, 5, 2**62, 2**63 - 1):
        assert seed_streams(s, 2) == (2 * s, 2 * s + 1)  # the images of every seed below 2^63 are unchanged
    for s in (2**63, 2**64 - 1, -1, 2**70):
        assert all(0 <= g < 2**64 for g in seed_streams(s, 2)) and all(0 <= g < 2**64 for g in seed_streams(s, 3))
    assert sample_seed(2**64 - 1, 1) == 0 and sample_seed(7, 3) == 10


def test_huge_seeds_beside_a_good_request_in_one_batch():
    async def main():
        pol = RecordingPolicy()
        async with running(policy=pol, max_wait_ms=300) as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                reqs = [policy_pb2.GenerateRequest(seed=s, group_size=2, **GOOD) for s in (2**63, 2**64 - 1, 7)]
                results = await asyncio.gather(*(outcome(stub.Generate(r)) for r in reqs))
        assert [code for code, _ in results] == ["OK"] * 3, results
        assert [s.seed for s in results[1][1].samples] == [2**64 - 1, 0]  # seed + index wraps modulo 2^64
        assert [s.seed for s in results[2][1].samples] == [7, 8]
        assert len(pol.batches) == 1 and len(pol.batches[0][0]) == 6, pol.batches  # all three shared one batch

    run(main())


def test_an_error_inside_a_batch_fails_only_its_own_request():
    async def main():
        pol = RecordingPolicy(poison="a blue square")
        async with running(policy=pol, max_wait_ms=300) as (server, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                bad = policy_pb2.GenerateRequest(prompts=["a blue square"], params=P(steps=2), group_size=2)
                goods = [
                    policy_pb2.GenerateRequest(prompts=[p], params=P(steps=2), group_size=2)
                    for p in ("a red circle", "two green triangles", "a square")
                ]
                results = await asyncio.gather(outcome(stub.Generate(bad)), *(outcome(stub.Generate(g)) for g in goods))
            assert results[0][0] == "UNKNOWN" and "poisoned" in results[0][1], results[0]
            assert [code for code, _ in results[1:]] == ["OK"] * 3, results
            assert len(pol.batches[0][0]) == 8  # the four requests did share the first batch
            assert server.metrics.count("Generate", "OK") == 3 and server.metrics.count("Generate", "UNKNOWN") == 1

    run(main())


# ---- 2. weight streams ---------------------------------------------------------------------------------
def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


async def _stream(stub, chunks, timeout=30):
    async def gen():
        for c in chunks:
            if isinstance(c, asyncio.Event):
                await c.wait()
            else:
                yield c

    return await outcome(stub.UpdateWeights(gen(), timeout=timeout))


def test_weight_headers_are_checked_before_anything_is_allocated():
    async def main():
        pol = small_policy()
        async with running(policy=pol) as (server, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                W = policy_pb2.WeightChunk
                cases = [
                    (
                        [W(name="blocks.0.qkv.weight", dtype="float32", shape=[2**60], data=b"1234")],
                        "blocks.0.qkv.weight: shape [1152921504606846976] sent",
                    ),
                    (
                        [W(name="blocks.0.qkv.lora_A", dtype="float32", shape=[2**62, 2**62], data=b"1234", lora=True)],
                        "blocks.0.qkv.lora_A: float32 [4611686018427387904, 4611686018427387904] is",
                    ),  # overflows int64
                    (
                        [W(name="blocks.0.qkv.lora_A", dtype="float32", shape=[2**28, 2], data=b"x" * 12, lora=True)],
                        "more than the limit of 1073741824",
                    ),  # 2 GiB declared
                    (
                        [W(name="blocks.0.qkv.weight", dtype="float32", shape=[96, 32], data=b"x" * 12)],
                        "blocks.0.qkv.weight: received 12 of 12288 bytes",
                    ),
                    (
                        [W(name="blocks.0.qkv.weight", dtype="float32", shape=[96, 32], offset=-5, data=b"x")],
                        "blocks.0.qkv.weight: chunk at offset -5",
                    ),
                    ([W(name="blocks.0.qkv.weight", dtype="complex64", shape=[96, 32])], "blocks.0.qkv.weight.dtype"),
                    ([W(name="blocks.0.qkv.weight", dtype="float32", shape=[-1, 32])], "negative dimension"),
                ]
                for chunks, words in cases:  # each beside a good Generate
                    (code, details), (ok, _) = await asyncio.gather(
                        _stream(stub, chunks), outcome(stub.Generate(policy_pb2.GenerateRequest(**GOOD)))
                    )
                    assert code == "INVALID_ARGUMENT" and words in details and ok == "OK", (words, code, details)
                assert pol.version == 0 and server.policy_service.weight_budget.held == 0
                # a stream whose header declares 1 GiB (the limit) but carries 12 bytes: RSS follows the 12 bytes
                if not _rss_peak_reset():
                    pytest.skip("cannot reset the peak RSS here")
                before = _rss_kb("VmRSS")
                code, details = await _stream(
                    stub, [W(name="blocks.0.qkv.lora_A", dtype="float32", shape=[2**27, 2], data=b"x" * 12, lora=True)]
                )
                grew_mb = (_rss_kb("VmHWM") - before) / 1024
                assert code == "INVALID_ARGUMENT" and "received 12 of 1073741824 bytes" in details, details
                assert grew_mb < 64, f"peak RSS grew by {grew_mb:.0f} MB for a 12-byte stream"

    run(main())


def test_bytes_held_by_concurrent_weight_streams_are_bounded():
    async def main():
        pol = small_policy()
        limits = Limits(max_update_total_bytes=40_000)
        async with running(policy=pol, limits=limits) as (server, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                name = "blocks.0.qkv.weight"  # float32 [96, 32]: 12,288 bytes
                raw = pol.export_weights()[name].numpy().tobytes()
                W = policy_pb2.WeightChunk
                go = asyncio.Event()
                first = asyncio.ensure_future(
                    _stream(
                        stub,
                        [
                            W(name=name, dtype="float32", shape=[96, 32], data=raw[:8000]),
                            go,
                            W(name=name, dtype="float32", shape=[96, 32], offset=8000, data=raw[8000:]),
                        ],
                    )
                )
                for _ in range(100):  # the first stream now holds 8,000 bytes
                    if server.policy_service.weight_budget.held:
                        break
                    await asyncio.sleep(0.02)
                assert server.policy_service.weight_budget.held == 8000
                specs = pol.weight_specs()
                name2 = max(specs, key=lambda n: int(np.prod(specs[n][0])))  # the largest tensor (> 32,000 bytes)
                t2 = pol.export_weights()[name2]
                assert t2.numel() * 4 > 32_000, (name2, t2.shape)
                code, details = await _stream(
                    stub, [W(name=name2, dtype="float32", shape=list(t2.shape), data=t2.numpy().tobytes())]
                )
                assert code == "RESOURCE_EXHAUSTED" and "--max-update-total-mb" in details, (code, details)
                go.set()
                code, res = await first
                assert code == "OK" and res.policy_version == 1, (code, res)
                assert server.policy_service.weight_budget.held == 0

    run(main())


# ---- 3. floats and enums at the door ---------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
BAD_PARAMS = [
    (P(cfg_scale=NAN), "params.cfg_scale"),
    (P(cfg_scale=INF), "params.cfg_scale"),
    (P(cfg_scale=-1), "params.cfg_scale"),
    (P(mode=2, noise_level=NAN), "params.noise_level"),
    (P(mode=2, noise_level=INF), "params.noise_level"),
    (P(temperature=1e-38, think=True), "params.temperature"),
    (P(temperature=NAN), "params.temperature"),
    (P(top_p=0.0), "params.top_p"),
    (P(top_p=NAN), "params.top_p"),
    (P(cfg_interval_low=NAN, cfg_interval_high=1.0), "params.cfg_interval_low/cfg_interval_high"),
    (P(cfg_interval_low=0.5, cfg_interval_high=INF), "params.cfg_interval_low/cfg_interval_high"),
    (P(cfg_img_scale=NAN), "params.cfg_img_scale"),
    (P(cfg_renorm_min=INF), "params.cfg_renorm_min"),
    (P(timestep_shift=0.0), "params.timestep_shift"),
    (P(timestep_shift=-INF), "params.timestep_shift"),
    (P(mode=7), "params.mode"),
    (P(mode=-1), "params.mode"),
    (P(steps=-3), "params.steps"),
    (P(width=-32), "params.width"),
    (P(max_thought_tokens=0), "params.max_thought_tokens"),
    (P(cfg_renorm_type="x" * 100_000), "params.cfg_renorm_type"),
    (P(mode=2, sde_window_start=1, sde_window_size=9, steps=4), "params.sde_window_start/sde_window_size"),
]


def test_every_bad_float_and_enum_is_refused_at_the_door_naming_it_on_generate_and_reflect():
    async def main():
        pol = RecordingPolicy()
        async with running(policy=pol, max_wait_ms=50) as (server, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                img = image_to_proto(np.zeros((32, 32, 3), np.uint8))
                for params, field in BAD_PARAMS:
                    params = (
                        P(steps=2, **{f.name: v for f, v in params.ListFields()})
                        if not params.HasField("steps")
                        else params
                    )
                    bad_g = stub.Generate(policy_pb2.GenerateRequest(prompts=["a red circle"], params=params))
                    bad_r = stub.Reflect(
                        policy_pb2.ReflectRequest(prompts=["a red circle"], images=[img], params=params)
                    )
                    good = stub.Generate(policy_pb2.GenerateRequest(**GOOD))
                    (cg, dg), (cr, dr), (ok, _) = await asyncio.gather(outcome(bad_g), outcome(bad_r), outcome(good))
                    assert (cg, cr, ok) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "OK"), (field, cg, dg, cr, dr, ok)
                    if field == "params.mode":
                        assert field in dg and field in dr, (dg, dr)
                    else:
                        assert dg.startswith(field) and dr.startswith(field), (field, dg, dr)
                    assert len(dg) <= 1000
                assert all(p == ["a red circle"] for p, _ in pol.batches)  # no bad request reached the model
                assert server.metrics.count("Generate", "UNKNOWN") == 0

    run(main())


def test_in_range_settings_that_diverge_answer_invalid_argument_naming_params():
    async def main():
        async with running() as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                wild = P(
                    steps=100,
                    mode=2,
                    sde_window_start=0,
                    sde_window_size=100,
                    noise_level=10,
                    cfg_scale=100,
                    timestep_shift=100,
                )
                (code, details), (ok, _) = await asyncio.gather(
                    outcome(stub.Generate(policy_pb2.GenerateRequest(prompts=["a red circle"], params=wild))),
                    outcome(stub.Generate(policy_pb2.GenerateRequest(**GOOD))),
                )
                assert code == "INVALID_ARGUMENT" and "params.noise_level" in details and ok == "OK", (code, details)

    run(main())


def test_a_prompt_too_long_for_the_context_is_refused_at_the_door():
    async def main():
        pol = RecordingPolicy()
        async with running(policy=pol, task="open", max_wait_ms=100) as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                long = policy_pb2.GenerateRequest(
                    prompts=["x", "a " * 250], params=P(steps=2, think=True, max_thought_tokens=128)
                )
                (code, details), (ok, _) = await asyncio.gather(
                    outcome(stub.Generate(long)), outcome(stub.Generate(policy_pb2.GenerateRequest(**GOOD)))
                )
                assert code == "INVALID_ARGUMENT" and details.startswith("prompts[1] is too long"), details
                assert ok == "OK" and len(pol.batches) == 1

    run(main())


# ---- 4. admission is all or nothing -----------------------------------------------------------------------
def test_a_refused_or_cancelled_request_leaves_nothing_queued():
    async def main():
        pol = RecordingPolicy(delay=0.4)
        async with running(policy=pol, max_queue=8, max_batch=4, max_wait_ms=0) as (server, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)

                def gen(prompt, G):
                    return stub.Generate(policy_pb2.GenerateRequest(prompts=[prompt], group_size=G, params=P(steps=1)))

                code, details = await outcome(gen("a square", 16))
                assert code == "RESOURCE_EXHAUSTED" and "needs 16 samples" in details, details
                busy = asyncio.ensure_future(outcome(gen("a red circle", 4)))  # runs (0.4 s)
                await asyncio.sleep(0.1)
                queued = asyncio.ensure_future(outcome(gen("a circle", 4)))  # 4 of 8 queued
                await asyncio.sleep(0.1)
                code, details = await outcome(gen("three squares", 8))  # two parts of 4: only one would fit
                assert code == "RESOURCE_EXHAUSTED", details
                cancelled = gen("two circles", 4)
                await asyncio.sleep(0.1)
                cancelled.cancel()
                assert (await busy)[0] == "OK" and (await queued)[0] == "OK"
                assert (await outcome(gen("a triangle", 1)))[0] == "OK"
                await asyncio.sleep(0.2)
        prompts = [p[0] for p, _ in pol.batches]
        assert "a square" not in prompts and "three squares" not in prompts and "two circles" not in prompts, prompts
        assert server.engine.queue_depth() == {"generate": 0, "reflect": 0}

    run(main())


# ---- 5. LoRA: a rejected update changes nothing; listed names are accepted --------------------------------
def test_rejected_lora_update_changes_nothing_and_model_info_names_are_accepted():
    async def main():
        pol = small_policy()
        async with running(policy=pol) as (_, addr):
            async with AsyncClient(addr, retries=0) as c:
                info0 = await c.model_info()
                lora = {}
                for i, blk in enumerate(pol.model.blocks):
                    for n in ("qkv", "proj"):
                        lin = getattr(blk, n)
                        lora[f"blocks.{i}.{n}.lora_A"] = torch.randn(4, lin.in_features) * 0.01
                        lora[f"blocks.{i}.{n}.lora_B"] = torch.randn(lin.out_features, 4) * 0.01
                bad = dict(lora)
                bad["blocks.0.proj.lora_B"] = torch.full_like(bad["blocks.0.proj.lora_B"], float("nan"))
                for tensors in (bad, {**lora, "blocks.0.qkv.lora_A": torch.zeros(3, 32)}):  # non-finite; mixed ranks
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await c.update_weights(tensors, lora=True)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
                    info1 = await c.model_info()
                    assert not info1.lora_enabled and info1.parameter_count == info0.parameter_count
                    assert [p.name for p in info1.parameters] == [p.name for p in info0.parameters]
                    assert pol.version == 0 and not pol.lora_enabled
                assert not any(".base." in p.name for p in info0.parameters)
                # every name GetModelInfo lists is accepted by UpdateWeights, with the listed shape and dtype
                full = pol.export_weights()
                assert sorted(full) == sorted(p.name for p in info0.parameters)
                assert await c.update_weights({p.name: full[p.name] for p in info0.parameters}) == 1
                assert await c.update_weights(lora, lora=True) == 2
                info2 = await c.model_info()
                assert info2.lora_enabled and info2.parameter_count > info0.parameter_count
                names = {p.name for p in info2.parameters}
                assert set(lora) <= names and not any(".base." in n for n in names)
                adapters = {n: t for n, t in lora.items()}
                assert await c.update_weights(adapters, lora=True) == 3
                full = pol.export_weights()
                assert await c.update_weights({n: full[n] for n in names if "lora_" not in n}) == 4

    run(main())


# ---- 6. images, Verify's field names, deadlines, answer size, malformed bytes, reward queue ---------------
def test_png_bombs_are_refused_from_the_header_beside_good_requests():
    async def main():
        async with running(max_wait_ms=50) as (server, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                ps, rs = policy_pb2_grpc.PolicyServiceStub(ch), reward_pb2_grpc.RewardServiceStub(ch)
                bomb = common_pb2.Image(png=png_claiming(20000, 20000))
                good_img = image_to_proto(np.zeros((32, 32, 3), np.uint8))
                zero = common_pb2.Image(png=png_claiming(0, 5))
                junk = common_pb2.Image(png=b"\x89PNG\r\n\x1a\n" + os.urandom(40))
                for req_images, field in (([bomb], "images[0]"), ([zero], "images[0]"), ([junk], "images[0]")):
                    (code, details), (ok, _) = await asyncio.gather(
                        outcome(
                            ps.Reflect(
                                policy_pb2.ReflectRequest(
                                    prompts=["a red circle"], images=req_images, params=P(steps=2)
                                )
                            )
                        ),
                        outcome(
                            ps.Reflect(
                                policy_pb2.ReflectRequest(
                                    prompts=["a red circle"], images=[good_img], params=P(steps=2)
                                )
                            )
                        ),
                    )
                    assert code == "INVALID_ARGUMENT" and details.startswith(field) and ok == "OK", (code, details)
                item = reward_pb2.VerifyItem(prompt="a red circle", image=bomb)
                good = reward_pb2.VerifyItem(prompt="a red circle", image=good_img)
                (code, details), (ok, _) = await asyncio.gather(
                    outcome(rs.Verify(reward_pb2.VerifyRequest(items=[item]))),
                    outcome(rs.Verify(reward_pb2.VerifyRequest(items=[good]))),
                )
                assert code == "INVALID_ARGUMENT" and "items[0].image is 20000x20000" in details and ok == "OK", details
                raw = common_pb2.Image(raw=common_pb2.Tensor(dtype="uint8", shape=[2000, 1, 3], data=b"\0" * 6000))
                code, details = await outcome(
                    rs.Verify(reward_pb2.VerifyRequest(items=[reward_pb2.VerifyItem(prompt="a red circle", image=raw)]))
                )
                assert code == "INVALID_ARGUMENT" and "items[0].image is 1x2000" in details, details
            assert server.metrics.count("Reflect", "UNKNOWN") == server.metrics.count("Verify", "UNKNOWN") == 0

    run(main())


def test_verify_and_decompose_errors_name_their_fields():
    async def main():
        async with running() as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                rs = reward_pb2_grpc.RewardServiceStub(ch)
                img = image_to_proto(np.zeros((32, 32, 3), np.uint8))
                small = image_to_proto(np.zeros((8, 8, 3), np.uint8))

                def one(prompt, image):
                    return reward_pb2.VerifyRequest(items=[reward_pb2.VerifyItem(prompt=prompt, image=image)])

                for req, start in (
                    (reward_pb2.VerifyRequest(), "items is empty"),
                    (one("a red blob", img), "items: cannot parse prompt"),
                    (one("a red circle", small), "items: images must be square"),
                    (one(" ", img), "items[0] is empty"),
                ):
                    code, details = await outcome(rs.Verify(req))
                    assert code == "INVALID_ARGUMENT" and details.startswith(start), (start, details)
                    assert "prompts" not in details
                code, details = await outcome(rs.Decompose(reward_pb2.DecomposeRequest(prompts=["a red blob"])))
                assert code == "INVALID_ARGUMENT" and details.startswith("prompts: cannot parse"), details
                assert (await outcome(rs.Decompose(reward_pb2.DecomposeRequest(prompts=["a red circle"]))))[0] == "OK"

    run(main())


def test_metrics_and_logs_record_the_code_the_client_saw(caplog):
    import logging

    async def main():
        pol = RecordingPolicy(delay=0.6)
        async with running(policy=pol, max_wait_ms=0) as (server, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = policy_pb2_grpc.PolicyServiceStub(ch)
                code, _ = await outcome(stub.Generate(policy_pb2.GenerateRequest(**GOOD), timeout=0.2))
                assert code == "DEADLINE_EXCEEDED"
                call = stub.Generate(policy_pb2.GenerateRequest(**GOOD))
                await asyncio.sleep(0.2)
                call.cancel()
                raw = ch.unary_unary(
                    "/alphagrpo.v1.PolicyService/Generate",
                    request_serializer=lambda b: b,
                    response_deserializer=lambda b: b,
                )
                code, details = await outcome(raw(b"\xff\xff\xff\xff"))
                assert code == "INVALID_ARGUMENT" and "alphagrpo.v1.GenerateRequest" in details, details
                stream = ch.stream_unary(
                    "/alphagrpo.v1.PolicyService/UpdateWeights",
                    request_serializer=lambda b: b,
                    response_deserializer=lambda b: b,
                )
                good_chunk = policy_pb2.WeightChunk(
                    name="blocks.0.qkv.weight", dtype="float32", shape=[96, 32], data=b"\0" * 16
                ).SerializeToString()
                code, details = await outcome(stream(iter([good_chunk, b"\x0a\xff\xff"])))
                assert code == "INVALID_ARGUMENT" and "request message 1" in details, details
                await asyncio.sleep(1.0)  # the cancelled and expired calls finish on the server
                m = server.metrics
                assert m.count("Generate", "DEADLINE_EXCEEDED") == 1 and m.count("Generate", "CANCELLED") == 1
                assert m.count("Generate", "INVALID_ARGUMENT") == 1
                assert m.count("UpdateWeights", "INVALID_ARGUMENT") == 1
                assert m.count("Generate", "UNKNOWN") == 0 and m.count("UpdateWeights", "UNKNOWN") == 0
                assert (await outcome(stub.Generate(policy_pb2.GenerateRequest(**GOOD))))[0] == "OK"

    with caplog.at_level(logging.INFO, logger="alphagrpo.server"):
        run(main())
    logged = [r.getMessage() for r in caplog.records if '"event": "rpc"' in r.getMessage()]
    assert any('"code": "DEADLINE_EXCEEDED"' in m for m in logged) and not any('"code": "UNKNOWN"' in m for m in logged)


def test_answers_larger_than_the_message_limit_are_refused_and_counted_as_such():
    async def main():
        pol = RecordingPolicy()
        async with running(policy=pol, max_message_mb=1) as (server, addr):
            async with grpc.aio.insecure_channel(addr) as ch:  # 8 x 64 raw 32x32 images: refused up front
                code, details = await outcome(
                    policy_pb2_grpc.PolicyServiceStub(ch).Generate(
                        policy_pb2.GenerateRequest(
                            prompts=["a red circle"] * 8, group_size=64, params=P(steps=1), return_raw=True
                        )
                    )
                )
                assert code == "RESOURCE_EXHAUSTED" and "at least" in details, details
                assert pol.batches == []  # nothing was computed
            async with AsyncClient(addr, retries=0) as c:
                with pytest.raises(grpc.aio.AioRpcError) as info:  # trajectories only show their size once computed
                    await c.generate(
                        ["a red circle"], group_size=16, steps=6, mode="sde", sde_window=(0, 6), return_trajectory=True
                    )  # 16 x 7 latents of 12 KB: 1.4 MB
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
                assert "message limit" in info.value.details(), info.value.details()
                assert len(await c.generate(["a red circle"], steps=1)) == 1
            m = server.metrics
            assert m.count("Generate", "RESOURCE_EXHAUSTED") == 2 and m.count("Generate", "OK") == 1

    run(main())


class SlowReward:
    """The embedded reward, slowed down so that items pile up."""

    def __init__(self, delay):
        self.inner, self.delay = embedded_reward(), delay

    def __call__(self, prompts, images):
        time.sleep(self.delay)
        return self.inner(prompts, images)

    def decompose(self, prompts):
        return self.inner.decompose(prompts)


def test_the_reward_queue_is_bounded():
    async def main():
        server = Server(
            ServeConfig(host="127.0.0.1", port=0, limits=Limits(max_reward_queue=3)),
            policy=small_policy(),
            reward=SlowReward(0.5),
        )
        port = await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", retries=0) as c:
                img = np.zeros((32, 32, 3), np.uint8)
                first = asyncio.ensure_future(c.verify(["a red circle"] * 2, [img] * 2))
                await asyncio.sleep(0.1)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.verify(["a red circle"] * 2, [img] * 2)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "reward queue" in info.value.details(), info.value.details()
                assert len(await c.verify(["a circle"], [img])) == 1  # one more item still fits
                assert len(await first) == 2
                assert len(await c.verify(["a red circle"] * 3, [img] * 3)) == 3
                assert server.reward_service.pending == 0
        finally:
            await server.stop(grace=1.0)

    run(main())


def test_valid_png_of_other_formats_is_not_decoded():
    async def main():
        async with running() as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                rs = reward_pb2_grpc.RewardServiceStub(ch)
                buf = io.BytesIO()
                Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="BMP")
                code, details = await outcome(
                    rs.Verify(
                        reward_pb2.VerifyRequest(
                            items=[
                                reward_pb2.VerifyItem(prompt="a red circle", image=common_pb2.Image(png=buf.getvalue()))
                            ]
                        )
                    )
                )
                assert code == "INVALID_ARGUMENT", details
                assert details.startswith("items[0].image.png is not a valid PNG"), details

    run(main())
