"""The KServe v2 / Triton protocol end to end with tritonclient (sync and asyncio): against real
`alphagrpo serve` subprocesses for every model, metadata and config, bad input, streaming, TLS and
auth; in-process servers where the test looks inside (a batch shared by a native and a KServe
request, health, limits, deadlines and cancellation). Every bad request is followed by a good one."""

import asyncio
import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from grpc_health.v1 import health_pb2
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from alphagrpo_serve.client import AsyncClient, Client
from alphagrpo_serve.models.tiny_policy import TinyPolicy
from alphagrpo_serve.shapes.world import Obj, Scene, render
from serving import run, running, self_signed_cert, small_policy, wait_for_line

GENERATE, REFLECT, VERIFY, DECOMPOSE = (
    "alphagrpo_generate",
    "alphagrpo_reflect",
    "alphagrpo_verify",
    "alphagrpo_decompose",
)
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BYTES": object}
RED_CIRCLE = render(Scene([Obj("circle", "red", 16, 16, 5)]))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def inputs(**named):
    """tritonclient inputs from name=(datatype, value); raw contents, as tritonclient sends them."""
    out = []
    for name, (datatype, value) in named.items():
        if datatype == "BYTES":
            values = value if isinstance(value, list) else [value]
            arr = np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object)
        else:
            arr = np.asarray(value, dtype=NUMPY[datatype])
            arr = arr.reshape(1) if arr.ndim == 0 else arr
        t = tc.InferInput(name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def gen_inputs(prompt="a red circle", **more):
    return inputs(prompt=("BYTES", prompt), steps=("INT32", 2), **more)


@contextlib.contextmanager
def serve_process(tmp_path, *args):
    """`alphagrpo serve` with a small random tiny UMM; yields (native address, proc)."""
    from alphagrpo_serve.models.pretrain import export_safetensors

    weights = tmp_path / "w.safetensors"
    export_safetensors(small_policy().model, str(weights))
    port = free_port()
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
            "2",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen = wait_for_line(proc, "listening on")
        assert seen and "listening on" in seen[-1], "".join(seen)
        # keep reading its log, or a full pipe would block the server's event loop
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_process(tmp_path_factory.mktemp("kserve")) as (addr, _):
        yield addr


def status(exc: InferenceServerException) -> str:
    return str(exc.status()).replace("StatusCode.", "")


# ---- real subprocess: metadata, every model, bad input, streaming -----------------------------------------
def test_health_metadata_and_config(server):
    c = tc.InferenceServerClient(server)
    assert c.is_server_live() and c.is_server_ready()
    for m in (GENERATE, REFLECT, VERIFY, DECOMPOSE):
        assert c.is_model_ready(m) and c.is_model_ready(m, "1")
    assert not c.is_model_ready("alphagrpo_nope") and not c.is_model_ready(GENERATE, "2")
    meta = c.get_server_metadata()
    assert meta.name == "alphagrpo-serve" and meta.version and "model_configuration" in meta.extensions

    md = c.get_model_metadata(GENERATE)
    assert md.name == GENERATE and list(md.versions) == ["1"] and md.platform == "alphagrpo"
    ins = {t.name: (t.datatype, list(t.shape)) for t in md.inputs}
    outs = {t.name: (t.datatype, list(t.shape)) for t in md.outputs}
    assert ins["prompt"] == ("BYTES", [1]) and ins["seed"] == ("INT64", [1]) and ins["group_size"] == ("INT32", [1])
    assert ins["steps"] == ("INT32", [1]) and ins["guidance"] == ("FP32", [1]) and ins["think"] == ("BOOL", [1])
    assert ins["sde_window"] == ("INT32", [2]) and "image_guidance" not in ins  # tiny has no image guidance branch
    assert outs == {
        "image": ("UINT8", [-1, 32, 32, 3]),
        "thought": ("BYTES", [-1]),
        "seed": ("INT64", [-1]),
        "step_log_probs": ("FP32", [-1, -1]),
        "policy_version": ("INT64", [-1]),
        "resolved_params": ("BYTES", [1]),
    }
    vm = c.get_model_metadata(VERIFY, as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in vm["inputs"]] == [
        ("prompt", "BYTES", ["1"]),
        ("image", "UINT8", ["-1", "-1", "3"]),
    ]  # int64 shapes come as strings in JSON
    assert [t["name"] for t in vm["outputs"]] == ["reward", "semantic", "quality", "breakdown"]
    rm = c.get_model_metadata(REFLECT)
    assert [(t.name, t.datatype, list(t.shape)) for t in rm.inputs][:2] == [
        ("prompt", "BYTES", [1]),
        ("image", "UINT8", [32, 32, 3]),
    ]
    assert "think" not in {t.name for t in rm.inputs}

    cfg = c.get_model_config(GENERATE).config
    assert cfg.name == GENERATE and cfg.max_batch_size == 0 and cfg.platform == "alphagrpo"
    cin = {t.name: t for t in cfg.input}
    assert not cin["prompt"].optional and cin["prompt"].data_type == model_config_pb2.TYPE_STRING
    assert (
        cin["steps"].optional
        and cin["steps"].data_type == model_config_pb2.TYPE_INT32
        and list(cin["steps"].dims) == [1]
    )
    assert {t.name: list(t.dims) for t in cfg.output}["image"] == [-1, 32, 32, 3]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    defaults = json.loads(params["defaults"])
    assert defaults["steps"] == 20 and defaults["guidance"] == 3.0 and defaults["mode"] == "ode"
    assert params["max_batch_samples"] == "64" and params["policy"] == "tiny" and params["task"] == "shapes"
    assert "seed + j" in json.loads(params["inputs"])["seed"]
    for call in (lambda: c.get_model_metadata("alphagrpo_nope"), lambda: c.get_model_config(GENERATE, "2")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert status(info.value) == "NOT_FOUND" and "is not found" in info.value.message()
    c.close()


def test_every_model_agrees_with_the_native_services(server):
    c = tc.InferenceServerClient(server)
    r = c.infer(
        GENERATE,
        inputs(
            prompt=("BYTES", "a red circle"),
            group_size=("INT32", 2),
            seed=("INT64", 5),
            steps=("INT32", 3),
            guidance=("FP32", 3.0),
            think=("BOOL", True),
            mode=("BYTES", "sde"),
            sde_window=("INT32", [0, 2]),
            max_thought_tokens=("INT32", 4),
        ),
        request_id="g1",
    )
    res = r.get_response()
    assert res.id == "g1" and res.model_name == GENERATE and res.model_version == "1" and res.parameters["boot_id"]
    images = r.as_numpy("image")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert r.as_numpy("seed").tolist() == [5, 6] and r.as_numpy("policy_version").tolist() == [0, 0]
    assert r.as_numpy("step_log_probs").shape == (2, 2) and np.isfinite(r.as_numpy("step_log_probs")).all()
    thoughts = [t.decode() for t in r.as_numpy("thought")]
    resolved = json.loads(r.as_numpy("resolved_params")[0])
    assert (
        resolved["steps"] == 3 and resolved["mode"] == "sde" and resolved["think"] and resolved["sde_window"] == [0, 2]
    )
    with Client(server) as native:  # the same engine: same seed and settings, same samples
        out = native.generate(
            ["a red circle"],
            group_size=2,
            seed=5,
            steps=3,
            cfg_scale=3.0,
            think=True,
            mode="sde",
            sde_window=(0, 2),
            max_thought_tokens=4,
            return_trajectory=True,
        )
        for k in range(2):
            assert np.array_equal(out[k].image, images[k]) and out[k].thought == thoughts[k]
            assert np.allclose(out[k].trajectory.image.log_probs.numpy(), r.as_numpy("step_log_probs")[k])
        (native_reward,) = native.verify(["a red circle"], [RED_CIRCLE])

    # reflect with typed contents instead of raw ones, straight through the service stub
    req = service_pb2.ModelInferRequest(model_name=REFLECT, id="typed")
    for name, datatype, shape, field, values in (
        ("prompt", "BYTES", [1], "bytes_contents", [b"a red circle"]),
        ("image", "UINT8", [32, 32, 3], "uint_contents", images[0].reshape(-1).tolist()),
        ("steps", "INT32", [1], "int_contents", [2]),
        ("group_size", "INT32", [1], "int_contents", [3]),
    ):
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        getattr(t.contents, field).extend(values)
    with grpc.insecure_channel(server) as ch:
        ref = tc.InferResult(service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60))
    assert ref.get_response().id == "typed" and ref.as_numpy("image").shape == (3, 32, 32, 3)
    assert len(ref.as_numpy("thought")) == 3 and ref.as_numpy("seed").tolist() == [0, 1, 2]

    v = c.infer(VERIFY, inputs(prompt=("BYTES", "a red circle"), image=("UINT8", RED_CIRCLE)))
    assert v.as_numpy("reward")[0] == pytest.approx(native_reward.reward, abs=1e-6) and v.as_numpy("reward")[0] > 0.9
    assert v.as_numpy("semantic")[0] == pytest.approx(native_reward.semantic, abs=1e-6)
    breakdown = json.loads(v.as_numpy("breakdown")[0])
    assert breakdown["failed"] == 0 and [a["tag"] for a in breakdown["answers"]][:2] == ["Existence", "Attribute"]
    assert [a["question"] for a in breakdown["answers"]] == [a.question.text for a in native_reward.answers]

    d = c.infer(DECOMPOSE, inputs(prompt=("BYTES", "three green triangles")))
    assert [t.decode() for t in d.as_numpy("tags")][:2] == ["Existence", "Count"]
    assert d.as_numpy("question_ids")[0] == b"q0" and set(d.as_numpy("kinds")) == {b"semantic", b"quality"}

    only = c.infer(GENERATE, gen_inputs(), outputs=[tc.InferRequestedOutput("seed"), tc.InferRequestedOutput("image")])
    assert [o.name for o in only.get_response().outputs] == ["seed", "image"] and only.as_numpy("thought") is None
    c.close()


def _raw_prompt(cut: bytes):
    req = service_pb2.ModelInferRequest(
        model_name=GENERATE,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="prompt", datatype="BYTES", shape=[1])],
    )
    req.raw_input_contents.append(cut)
    return req


BAD = [  # (model, inputs, version, requested outputs, code, words)
    (GENERATE, inputs(seed=("INT64", 1)), "", None, "INVALID_ARGUMENT", "needs input 'prompt'"),
    (GENERATE, gen_inputs(nope=("INT32", 1)), "", None, "INVALID_ARGUMENT", "unexpected input 'nope'"),
    ("alphagrpo_nope", gen_inputs(), "", None, "NOT_FOUND", "'alphagrpo_nope' is not found"),
    (GENERATE, gen_inputs(), "7", None, "NOT_FOUND", "version 7 is not found"),
    (GENERATE, gen_inputs(seed=("INT32", 1)), "", None, "INVALID_ARGUMENT", "input 'seed' has datatype INT32"),
    (GENERATE, inputs(prompt=("BYTES", ["a", "b"])), "", None, "INVALID_ARGUMENT", "input 'prompt' has shape [2]"),
    (
        GENERATE,
        inputs(prompt=("BYTES", b"a red \xff circle")),
        "",
        None,
        "INVALID_ARGUMENT",
        "input 'prompt' is not valid UTF-8",
    ),
    (
        GENERATE,
        inputs(prompt=("BYTES", "a red circle"), steps=("INT32", 5000)),
        "",
        None,
        "INVALID_ARGUMENT",
        "input 'steps' must be in [1, 100]",
    ),
    (GENERATE, gen_inputs(guidance=("FP32", float("nan"))), "", None, "INVALID_ARGUMENT", "input 'guidance'"),
    (GENERATE, gen_inputs(group_size=("INT32", 1000)), "", None, "INVALID_ARGUMENT", "input 'group_size' must be in"),
    (GENERATE, gen_inputs(group_size=("INT32", 0)), "", None, "INVALID_ARGUMENT", "input 'group_size' must be in"),
    (GENERATE, gen_inputs(seed=("INT64", -1)), "", None, "INVALID_ARGUMENT", "input 'seed' must be >= 0"),
    (GENERATE, gen_inputs(mode=("BYTES", "fast")), "", None, "INVALID_ARGUMENT", "input 'mode' must be 'ode' or 'sde'"),
    (
        GENERATE,
        gen_inputs(mode=("BYTES", "sde"), sde_window=("INT32", [1, 9])),
        "",
        None,
        "INVALID_ARGUMENT",
        "input 'sde_window'",
    ),
    (GENERATE, gen_inputs(top_p=("FP32", 2.0)), "", None, "INVALID_ARGUMENT", "input 'top_p'"),
    (GENERATE, gen_inputs(prompt="a red blob"), "", None, "INVALID_ARGUMENT", "input 'prompt': cannot parse prompt"),
    (GENERATE, gen_inputs(), "", ["nope"], "INVALID_ARGUMENT", "unexpected output 'nope'"),
    (
        REFLECT,
        gen_inputs(image=("UINT8", np.zeros((64, 64, 3)))),
        "",
        None,
        "INVALID_ARGUMENT",
        "input 'image' has shape [64, 64, 3]; model 'alphagrpo_reflect' expects [32, 32, 3]",
    ),
    (
        VERIFY,
        inputs(prompt=("BYTES", "a red circle"), image=("UINT8", np.zeros((32, 16, 3)))),
        "",
        None,
        "INVALID_ARGUMENT",
        "input 'image' must be square",
    ),
    (
        VERIFY,
        inputs(prompt=("BYTES", "a red blob"), image=("UINT8", RED_CIRCLE)),
        "",
        None,
        "INVALID_ARGUMENT",
        "input 'prompt': cannot parse prompt 'a red blob'",
    ),
    (
        VERIFY,
        inputs(prompt=("BYTES", "a red circle"), image=("UINT8", np.zeros((1100, 2, 3)))),
        "",
        None,
        "INVALID_ARGUMENT",
        "input 'image' is 2x1100",
    ),
    (DECOMPOSE, inputs(prompt=("BYTES", "   ")), "", None, "INVALID_ARGUMENT", "input 'prompt' is empty"),
]


def test_bad_input_names_it_and_the_next_request_is_served(server):
    c = tc.InferenceServerClient(server)
    for model, ins, version, outs, code, words in BAD:
        with pytest.raises(InferenceServerException) as info:
            c.infer(
                model,
                ins,
                model_version=version,
                request_id="r7",
                outputs=[tc.InferRequestedOutput(o) for o in outs] if outs else None,
            )
        assert status(info.value) == code and words in info.value.message(), (words, info.value)
        assert info.value.message().startswith("[request id: r7] ")
        assert c.infer(GENERATE, gen_inputs()).as_numpy("image").shape == (1, 32, 32, 3)
    with grpc.insecure_channel(server) as ch:  # raw BYTES whose framing does not hold
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        for raw, words in (
            (b"\x0c\x00\x00\x00a red", "declares 12 bytes but only 5 remain"),
            (b"\x02\x00", "end inside element 0"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(_raw_prompt(raw), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input 'prompt'" in info.value.details()
            assert words in info.value.details()
    assert c.infer(GENERATE, gen_inputs()).as_numpy("seed").tolist() == [0]
    c.close()


def test_streaming_sync_and_asyncio(server):
    c = tc.InferenceServerClient(server)
    got: "queue.Queue" = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    c.async_stream_infer(GENERATE, gen_inputs(group_size=("INT32", 2)), request_id="a")
    c.async_stream_infer(GENERATE, gen_inputs(prompt="a red blob"), request_id="bad")
    c.async_stream_infer(VERIFY, inputs(prompt=("BYTES", "a red circle"), image=("UINT8", RED_CIRCLE)), request_id="v")
    answers = [got.get(timeout=60) for _ in range(3)]
    c.stop_stream()
    ok = {r.get_response().id: r for r, e in answers if e is None}
    errors = [e for r, e in answers if e is not None]
    assert (
        set(ok) == {"a", "v"}
        and ok["a"].as_numpy("image").shape == (2, 32, 32, 3)
        and ok["v"].as_numpy("reward")[0] > 0.9
    )
    assert len(errors) == 1 and "[request id: bad]" in errors[0].message() and "input 'prompt'" in errors[0].message()
    c.close()

    async def main():
        async with tca.InferenceServerClient(server) as ac:

            async def requests():
                for i in range(3):
                    yield {"model_name": GENERATE, "inputs": gen_inputs(seed=("INT64", 10 * i)), "request_id": str(i)}

            seeds = {}
            async for result, error in ac.stream_infer(requests(), stream_timeout=60):
                assert error is None, error
                seeds[result.get_response().id] = result.as_numpy("seed").tolist()
            assert seeds == {"0": [0], "1": [10], "2": [20]}
            r = await ac.infer(DECOMPOSE, inputs(prompt=("BYTES", "a red circle")), client_timeout=60)
            assert r.as_numpy("questions")[0] == b"Is there a red circle in the image?"

    run(main())


def test_tls_auth_and_a_port_of_its_own(tmp_path):
    key, cert = self_signed_cert(tmp_path)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    kport = free_port()
    auth = {"authorization": "Bearer s3cret"}
    with serve_process(
        tmp_path,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--auth-token-file",
        str(token),
        "--kserve-port",
        str(kport),
    ) as (native, _):
        addr = f"127.0.0.1:{kport}"
        c = tc.InferenceServerClient(addr, ssl=True, root_certificates=str(cert))
        for tok in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as info:
                c.infer(GENERATE, gen_inputs(), headers=tok)
            assert status(info.value) == "UNAUTHENTICATED"
        assert c.is_model_ready(GENERATE, headers=auth)
        assert c.infer(GENERATE, gen_inputs(), headers=auth).as_numpy("image").shape == (1, 32, 32, 3)
        c.close()
        plain = tc.InferenceServerClient(addr)
        with pytest.raises(InferenceServerException):
            plain.is_server_live(headers=auth, client_timeout=5)
        plain.close()

        async def main():
            async with tca.InferenceServerClient(addr, ssl=True, root_certificates=str(cert)) as ac:
                r = await ac.infer(
                    VERIFY,
                    inputs(prompt=("BYTES", "a red circle"), image=("UINT8", RED_CIRCLE)),
                    headers=auth,
                    client_timeout=60,
                )
                assert r.as_numpy("reward")[0] > 0.9
            async with tca.InferenceServerClient(native, ssl=True, root_certificates=str(cert)) as other:
                with pytest.raises(InferenceServerException) as info:  # KServe lives on its own port here
                    await other.is_server_live(headers=auth)
                assert status(info.value) == "UNIMPLEMENTED"

        run(main())


# ---- in-process servers: shared batches, health, limits --------------------------------------------------
class RecordingPolicy(TinyPolicy):
    """Records the seeds of every Generate batch; sleeps `delay` seconds in each."""

    def __init__(self, delay: float = 0.0):
        super().__init__(small_policy().model)
        self.batches, self.delay = [], delay

    def generate(self, prompts, seeds, *a, **k):
        self.batches.append(sorted(seeds))
        time.sleep(self.delay)
        return super().generate(prompts, seeds, *a, **k)


def test_native_and_kserve_requests_share_a_batch_and_health():
    pol = RecordingPolicy()

    async def main():
        async with running(policy=pol, max_wait_ms=400) as (server, addr):
            async with AsyncClient(addr) as native, tca.InferenceServerClient(addr) as kc:
                await native.generate(["a square"], steps=2)  # warm: the channels are up
                await kc.infer(GENERATE, gen_inputs())
                pol.batches.clear()
                a, b = await asyncio.gather(
                    native.generate(["a red circle"], group_size=2, seed=100, steps=2),
                    kc.infer(GENERATE, gen_inputs("three squares", group_size=("INT32", 2), seed=("INT64", 200))),
                )
                assert pol.batches == [[100, 101, 200, 201]]  # one model batch for both protocols
                assert [s.seed for s in a] == [100, 101] and b.as_numpy("seed").tolist() == [200, 201]

                name = "blocks.0.qkv.weight"
                v = await native.update_weights({name: pol.export_weights()[name] * 0.5})
                r = await kc.infer(GENERATE, gen_inputs(group_size=("INT32", 2)))
                assert v == 1 and r.as_numpy("policy_version").tolist() == [1, 1]

                # readiness follows the native health (NOT_SERVING while loading and draining)
                await server._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                assert not await kc.is_server_ready() and not await kc.is_model_ready(GENERATE)
                assert await kc.is_server_live()
                with pytest.raises(InferenceServerException) as info:
                    await kc.infer(GENERATE, gen_inputs())
                assert status(info.value) == "UNAVAILABLE" and "not ready" in info.value.message()
                await server._set_health(health_pb2.HealthCheckResponse.SERVING)
                assert await kc.is_model_ready(GENERATE)
                assert (await kc.infer(GENERATE, gen_inputs())).as_numpy("image").shape == (1, 32, 32, 3)
        assert not server.serving

    run(main())


def test_limits_deadlines_and_cancellation():
    async def main():
        async with running(policy=RecordingPolicy(delay=0.5), max_queue=3, max_batch=2, max_wait_ms=0) as (_, addr):
            async with tca.InferenceServerClient(addr) as c:

                def two(seed=0):
                    return c.infer(
                        GENERATE, gen_inputs(group_size=("INT32", 2), seed=("INT64", seed)), client_timeout=60
                    )

                first = asyncio.ensure_future(two())
                await asyncio.sleep(0.1)  # the first batch runs; the queue is empty again
                second = asyncio.ensure_future(two())
                await asyncio.sleep(0.1)
                with pytest.raises(InferenceServerException) as info:  # 2 queued + 2 > 3
                    await two()
                assert status(info.value) == "UNAVAILABLE" and "queue is full" in info.value.message()
                with pytest.raises(InferenceServerException) as info:
                    await c.infer(GENERATE, gen_inputs(), client_timeout=0.2)
                assert status(info.value) == "DEADLINE_EXCEEDED"
                with pytest.raises(InferenceServerException) as info:  # Triton's timeout parameter (microseconds)
                    await c.infer(GENERATE, gen_inputs(), timeout=100_000, client_timeout=60)
                assert status(info.value) == "DEADLINE_EXCEEDED" and "deadline passed" in info.value.message()
                assert len((await first).as_numpy("seed")) == 2 and len((await second).as_numpy("seed")) == 2

                # a cancelled stream withdraws its queued work at once
                busy = asyncio.ensure_future(two(50))
                await asyncio.sleep(0.1)
                hold = asyncio.Event()

                async def requests():
                    yield {"model_name": GENERATE, "inputs": gen_inputs(group_size=("INT32", 2))}
                    await hold.wait()

                stream = c.stream_infer(requests())
                reader = asyncio.ensure_future(stream.__anext__())
                await asyncio.sleep(0.2)
                stream.cancel()
                with contextlib.suppress(BaseException):
                    await reader
                await asyncio.sleep(0.1)
                assert len((await two(60)).as_numpy("seed")) == 2  # would not fit had the stream's 2 stayed queued
                assert (await busy).as_numpy("seed").tolist() == [50, 51]

    run(main())


def test_reflection_lists_kserve_and_no_kserve_turns_it_off():
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def services(addr):
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            return {svc.name async for resp in responses for svc in resp.list_services_response.service}

    async def main():
        async with running() as (_, addr):
            assert "inference.GRPCInferenceService" in await services(addr)
        async with running(kserve=False) as (_, addr):
            assert "inference.GRPCInferenceService" not in await services(addr)
            async with tca.InferenceServerClient(addr) as c:
                with pytest.raises(InferenceServerException) as info:
                    await c.is_server_live()
                assert status(info.value) == "UNIMPLEMENTED"
            async with AsyncClient(addr) as native:  # the native services are unaffected
                assert len(await native.generate(["a red circle"], steps=2)) == 1

    run(main())


def test_an_answer_over_the_message_limit_is_resource_exhausted_and_the_next_is_served():
    async def main():
        async with running() as (server, addr):
            # a 100 kB answer limit: one 32x32 sample fits, 64 of them (196 kB of pixels) do not
            server.policy_service.limits.max_message_bytes = 100_000
            c = tca.InferenceServerClient(addr)
            try:
                with pytest.raises(InferenceServerException) as info:
                    await c.infer(
                        GENERATE, inputs(prompt=("BYTES", "a red circle"), group_size=("INT32", 64), steps=("INT32", 1))
                    )
                assert status(info.value) == "RESOURCE_EXHAUSTED" and "message limit" in info.value.message()
                ok = await c.infer(GENERATE, inputs(prompt=("BYTES", "a red circle"), steps=("INT32", 1)))
                assert ok.as_numpy("image").shape == (1, 32, 32, 3)
            finally:
                await c.close()

    run(main())
