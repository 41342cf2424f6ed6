"""Fuzz tier (issue 18): Hypothesis generates arbitrary requests for every RPC (random field values,
enum values out of range, extreme and non-finite numbers, random bytes as images and tensors,
truncated and random protobuf bytes) against a real server on 127.0.0.1. Properties, per request:

- the answer is OK or a documented client-error code (INVALID_ARGUMENT, FAILED_PRECONDITION,
  RESOURCE_EXHAUSTED) whose details name a field of the request, never UNKNOWN or INTERNAL;
- a good request sent beside it (and a twin with its settings but good prompts, which shares its
  model batch when both pass the door) is not harmed; a good request right after still succeeds;
- the server's RSS stays bounded over the run.

`make test` runs a bounded budget (ALPHAGRPO_FUZZ_EXAMPLES examples per test, default 40, derandomized);
`make fuzz` runs the long, random one (benchmarks/RESULTS.md records one of >= 20,000 requests) and
writes a JSON summary to ALPHAGRPO_FUZZ_REPORT when set.
"""

import asyncio
import collections
import io
import json
import os
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from alphagrpo_serve._proto.alphagrpo.v1 import common_pb2, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from alphagrpo_serve.reward import embedded_reward
from alphagrpo_serve.server.app import ServeConfig, Server
from alphagrpo_serve.server.validation import Limits
from alphagrpo_serve.wire import DTYPES, image_to_proto, tensor_to_proto
from test_server import small_policy

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("ALPHAGRPO_FUZZ_EXAMPLES", "40"))
LONG = "ALPHAGRPO_FUZZ_EXAMPLES" in os.environ
REPORT = os.environ.get("ALPHAGRPO_FUZZ_REPORT")
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
CLIENT_CODES = {"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
RSS_GROWTH_MB = 400  # bound on the server process's RSS growth over a run
TIMEOUT = 60.0

LIMITS = Limits(
    max_prompts=3,
    max_prompt_chars=80,
    max_group=3,
    max_steps=3,
    max_thought_tokens=6,
    max_update_bytes=1 << 20,
    max_update_total_bytes=4 << 20,
    max_reward_queue=64,
)
GOOD_PROMPTS = [
    "a red circle",
    "three squares",
    "a square",
    "two green triangles",
    "a blue square",
    "a circle to the left of a triangle",
    "a red circle and a blue square",
]
SAFE = policy_pb2.SamplingParams(steps=1, max_thought_tokens=2)


# ---- the server, on its own event loop in a thread ------------------------------------------------------
class BackgroundServer:
    def __init__(self):
        # one intra-op thread: the tiny model gains nothing from two, and on a shared 2-core machine
        # two spinning threads per op made a 1-step Generate 20x slower (240 ms vs 12 ms)
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.policy = small_policy()
        self.weights = {k: v.clone() for k, v in self.policy.export_weights().items()}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fuzz-server")
        self.thread.start()
        cfg = ServeConfig(
            host="127.0.0.1", port=0, max_batch=8, max_wait_ms=5, max_queue=64, max_message_mb=1, limits=LIMITS
        )
        self.server = Server(cfg, policy=self.policy, reward=embedded_reward())
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 8 << 20)])
        self.policy_stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.reward_stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.codes = collections.Counter()  # (rpc, code) of every generated request
        self.neighbours = collections.Counter()  # code of every good neighbour and follow-up request
        self.details = collections.defaultdict(collections.Counter)  # (rpc, code) -> first words of its details
        self.rss_start = rss_mb()
        self.rss_peak = self.rss_start
        self.rss_trace = []  # (requests so far, RSS MB), every 1,000 requests
        self.started = time.monotonic()

    def close(self):
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        torch.set_num_threads(self.threads)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def srv():
    s = BackgroundServer()
    yield s
    summary = {
        "requests": sum(s.codes.values()),
        "by_rpc_and_code": {f"{r} {c}": n for (r, c), n in sorted(s.codes.items())},
        "neighbours": dict(s.neighbours),
        "top_details": {k: dict(v.most_common(4)) for k, v in sorted(s.details.items())},
        "rss_start_mb": round(s.rss_start, 1),
        "rss_peak_mb": round(s.rss_peak, 1),
        "rss_end_mb": round(rss_mb(), 1),
        "rss_every_1000_requests": s.rss_trace,
        "seconds": round(time.monotonic() - s.started, 1),
        "server_unknown_or_internal": sum(
            s.server.metrics.count(m, c)
            for m in ("Generate", "Reflect", "UpdateWeights", "GetModelInfo", "Verify", "Decompose")
            for c in ("UNKNOWN", "INTERNAL")
        ),
    }
    s.close()
    print("\nfuzz summary:", json.dumps(summary))
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(summary, f, indent=1)
    assert summary["server_unknown_or_internal"] == 0, summary


# ---- strategies ---------------------------------------------------------------------------------------------
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(
        [0.0, -0.0, 1.0, 0.5, 1e-38, 1e-45, 1e38, -1.0, 100.0, 100.5, 3.4e38, float("nan"), float("inf"), float("-inf")]
    ),
    st.floats(0.0, 3.0, width=32),
)
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 8))
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-2, 200))
TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(GOOD_PROMPTS),
    st.text(min_size=70, max_size=300),
    st.just(""),
    st.just("   "),
    st.sampled_from(["a red blob", "a " * 60, "\x00", "three three"]),
)


def weighted(*choices):
    """One of the strategies, with the given weights: [(weight, strategy), ...] (one_of has none)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


GOOD_LIST = st.lists(st.sampled_from(GOOD_PROMPTS), min_size=1, max_size=3)
PROMPTS = weighted((6, GOOD_LIST), (2, st.lists(TEXT, max_size=3)), (1, st.lists(TEXT, min_size=4, max_size=5)))
GROUP = weighted((4, st.integers(1, 3)), (1, st.integers(-1, 4)), (1, INT32))


INT_FIELDS = ("steps", "sde_window_start", "sde_window_size", "max_thought_tokens", "width", "height")
FLOAT_FIELDS = (
    "cfg_scale",
    "cfg_interval_low",
    "cfg_interval_high",
    "noise_level",
    "temperature",
    "top_p",
    "cfg_img_scale",
    "cfg_renorm_min",
    "timestep_shift",
)


@st.composite
def sampling_params(draw):
    """Settings that pass the door (so that batches run), with some fields then set to anything."""
    p = policy_pb2.SamplingParams(mode=draw(st.sampled_from([0, 1, 2])), think=draw(st.booleans()))
    steps = draw(st.integers(1, 3))
    if draw(st.booleans()):
        p.steps = steps
    else:
        p.steps = 1  # the server's default of 20 steps is valid but slow here
    if draw(st.booleans()):
        start = draw(st.integers(0, steps))
        p.sde_window_start, p.sde_window_size = start, draw(st.integers(0, steps - start))
    valid_floats = {
        "cfg_scale": st.floats(0, 8),
        "noise_level": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "temperature": st.one_of(st.just(0.0), st.floats(0.001, 3)),
        "cfg_renorm_min": st.floats(0, 1),
        "timestep_shift": st.floats(0.1, 5),
        "cfg_img_scale": st.just(1.0),
    }
    for name, strategy in valid_floats.items():
        if draw(st.booleans()):
            setattr(p, name, draw(strategy))
    if draw(st.booleans()):
        lo = draw(st.floats(0, 1))
        p.cfg_interval_low, p.cfg_interval_high = lo, draw(st.floats(lo, 1))
    if draw(st.sampled_from([True] * 5 + [False])):  # (Hypothesis leans to the first choice)
        p.max_thought_tokens = draw(st.integers(1, 6))  # (unset: the policy's 40 is over this server's 6)
    if draw(st.booleans()):
        p.cfg_renorm_type = draw(st.sampled_from(["none", "global", "channel", "text_channel"]))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 4]))):  # then anything, anywhere
        field = draw(st.sampled_from(INT_FIELDS + FLOAT_FIELDS + ("mode", "cfg_renorm_type", "width")))
        if field == "mode":
            p.mode = draw(INT32)
        elif field == "cfg_renorm_type":
            p.cfg_renorm_type = draw(TEXT)
        elif field in INT_FIELDS:
            setattr(p, field, draw(INT32))
        else:
            setattr(p, field, draw(FLOATS))
    return p


def png(width: int, height: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@st.composite
def tensors(draw):
    t = common_pb2.Tensor(dtype=draw(st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=8))))
    t.shape.extend(draw(st.lists(st.one_of(st.integers(0, 40), INT64), max_size=4)))
    t.data = draw(st.binary(max_size=5000))
    return t


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["good", "good", "good", "png", "bytes", "header", "raw", "empty", "truncated"]))
    if kind == "good":
        return image_to_proto(np.random.default_rng(draw(st.integers(0, 9))).integers(0, 256, (32, 32, 3), np.uint8))
    if kind == "png":
        return common_pb2.Image(
            png=png(
                draw(st.integers(1, 48)),
                draw(st.integers(1, 48)),
                draw(st.integers(0, 99)),
                draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16"])),
            )
        )
    if kind == "bytes":
        return common_pb2.Image(png=draw(st.binary(max_size=300)))
    if kind == "header":
        return common_pb2.Image(png=png_header(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))))
    if kind == "raw":
        if draw(st.booleans()):
            h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
            return common_pb2.Image(raw=common_pb2.Tensor(dtype="uint8", shape=[h, w, 3], data=b"\x80" * (h * w * 3)))
        return common_pb2.Image(raw=draw(tensors()))
    if kind == "truncated":
        data = png(32, 32, draw(st.integers(0, 9)))
        return common_pb2.Image(png=data[: draw(st.integers(0, len(data)))])
    return common_pb2.Image()


@st.composite
def generate_requests(draw):
    return policy_pb2.GenerateRequest(
        prompts=draw(PROMPTS),
        group_size=draw(GROUP),
        params=draw(sampling_params()),
        seed=draw(st.integers(0, 2**64 - 1)),
        return_raw=draw(st.booleans()),
        return_trajectory=draw(st.booleans()),
    )


@st.composite
def reflect_requests(draw):
    prompts = draw(PROMPTS)
    n = len(prompts) if draw(st.integers(0, 3)) else draw(st.integers(0, 4))
    if draw(st.booleans()):  # images the server should accept, so that refinements run
        ims = [image_to_proto(np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)) for i in range(n)]
    else:
        ims = draw(st.lists(images(), min_size=n, max_size=n))
    return policy_pb2.ReflectRequest(
        prompts=prompts,
        images=ims,
        group_size=draw(GROUP),
        params=draw(sampling_params()),
        seed=draw(st.integers(0, 2**64 - 1)),
        return_raw=draw(st.booleans()),
        return_trajectory=draw(st.booleans()),
    )


@st.composite
def verify_requests(draw):
    prompt = st.one_of(st.sampled_from(GOOD_PROMPTS), st.sampled_from(GOOD_PROMPTS), TEXT)
    item = st.builds(lambda p, im: reward_pb2.VerifyItem(prompt=p, image=im), prompt, images())
    good = st.builds(
        lambda p, i: reward_pb2.VerifyItem(
            prompt=p, image=image_to_proto(np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8))
        ),
        st.sampled_from(GOOD_PROMPTS),
        st.integers(0, 9),
    )
    items = draw(
        st.one_of(
            st.lists(good, min_size=1, max_size=3), st.lists(item, min_size=1, max_size=3), st.lists(item, max_size=5)
        )
    )
    return reward_pb2.VerifyRequest(items=items)


@st.composite
def weight_streams(draw, names):
    chunks = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(
            st.one_of(
                st.sampled_from(names),
                st.text(max_size=20),
                st.sampled_from(["blocks.0.qkv.lora_A", "blocks.0.qkv.lora_B", "x.lora_A"]),
            )
        )
        t = draw(tensors())
        chunks.append(
            policy_pb2.WeightChunk(
                name=name,
                dtype=t.dtype,
                shape=list(t.shape),
                data=t.data,
                offset=draw(st.one_of(st.just(0), INT64)),
                lora=draw(st.booleans()),
            )
        )
    return chunks


RPCS = {  # method path -> request class
    "/alphagrpo.v1.PolicyService/Generate": policy_pb2.GenerateRequest,
    "/alphagrpo.v1.PolicyService/Reflect": policy_pb2.ReflectRequest,
    "/alphagrpo.v1.PolicyService/GetModelInfo": policy_pb2.GetModelInfoRequest,
    "/alphagrpo.v1.RewardService/Verify": reward_pb2.VerifyRequest,
    "/alphagrpo.v1.RewardService/Decompose": reward_pb2.DecomposeRequest,
}


# ---- checks -------------------------------------------------------------------------------------------------
FIELDS = {  # words an error's details must contain one of (the request fields it is about)
    "Generate": ("prompts", "group_size", "params", "request", "answer"),
    "Reflect": ("prompts", "images", "group_size", "params", "request", "reflect", "answer"),
    "Verify": ("items", "request"),
    "Decompose": ("prompts", "request"),
    "GetModelInfo": ("request",),
}


def outcome(future):
    try:
        return "OK", future.result()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def check(srv, rpc: str, code: str, details, words=None):
    srv.codes[(rpc, code)] += 1
    if code != "OK":
        srv.details[f"{rpc} {code}"][" ".join(str(details).split()[:3])[:40]] += 1
    assert code in CLIENT_CODES, f"{rpc} answered {code}: {details}"
    if code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
        words = words if words is not None else FIELDS[rpc]
        assert any(w in details for w in words), f"{rpc} {code} names none of {words}: {details}"
    assert code != "RESOURCE_EXHAUSTED" or details, rpc


def good_generate(srv, **kw):
    return srv.policy_stub.Generate.future(
        policy_pb2.GenerateRequest(prompts=["a red circle"], params=SAFE, **kw), timeout=TIMEOUT
    )


def good_verify(srv):
    img = image_to_proto(np.zeros((32, 32, 3), np.uint8))
    return srv.reward_stub.Verify.future(
        reward_pb2.VerifyRequest(items=[reward_pb2.VerifyItem(prompt="a red circle", image=img)]), timeout=TIMEOUT
    )


def neighbour_ok(srv, future, what: str):
    code, details = outcome(future)
    srv.neighbours[f"{what} {code}"] += 1
    assert code == "OK", f"a good {what} beside or after a fuzzed request answered {code}: {details}"


def after(srv):
    """A good request right after the fuzzed one succeeds, and the server's RSS stays bounded."""
    neighbour_ok(srv, good_generate(srv), "follow-up Generate")
    rss = rss_mb()
    srv.rss_peak = max(srv.rss_peak, rss)
    n = sum(srv.codes.values())
    if n % 1000 == 0:
        srv.rss_trace.append((n, round(rss, 1)))
    assert rss - srv.rss_start < RSS_GROWTH_MB, f"RSS grew from {srv.rss_start:.0f} to {rss:.0f} MB"


def twin_of(params) -> policy_pb2.GenerateRequest:
    """Good prompts with the fuzzed request's settings: it shares the fuzzed request's batch when both
    pass the door, and can fail only on those settings."""
    return policy_pb2.GenerateRequest(prompts=["a blue square"], params=params)


def check_twin(srv, code, details):
    srv.neighbours[f"twin Generate {code}"] += 1
    assert code in CLIENT_CODES, f"twin answered {code}: {details}"
    if code != "OK":
        assert any(w in details for w in ("params", "cfg_img_scale", "think", "prompts[0] is too long")), details


# ---- the properties -----------------------------------------------------------------------------------------
VALID = policy_pb2.SamplingParams(
    steps=2, max_thought_tokens=3, think=True, mode=2, sde_window_start=0, sde_window_size=1
)
GOOD_IMAGE = image_to_proto(np.full((32, 32, 3), 200, np.uint8))


@FUZZ
@example(
    req=policy_pb2.GenerateRequest(
        prompts=["a square", "two green triangles"], group_size=2, params=VALID, seed=2**64 - 1, return_trajectory=True
    )
)
@given(req=generate_requests())
def test_fuzz_generate(srv, req):
    fut = srv.policy_stub.Generate.future(req, timeout=TIMEOUT)
    twin = srv.policy_stub.Generate.future(twin_of(req.params), timeout=TIMEOUT)
    good = good_generate(srv)
    check(srv, "Generate", *outcome(fut))
    check_twin(srv, *outcome(twin))
    neighbour_ok(srv, good, "Generate")
    after(srv)


@FUZZ
@example(
    req=policy_pb2.ReflectRequest(prompts=["a square"], images=[GOOD_IMAGE], group_size=2, params=VALID, seed=2**63)
)
@given(req=reflect_requests())
def test_fuzz_reflect(srv, req):
    fut = srv.policy_stub.Reflect.future(req, timeout=TIMEOUT)
    good = good_generate(srv)
    check(srv, "Reflect", *outcome(fut))
    neighbour_ok(srv, good, "Generate")
    after(srv)


@FUZZ
@example(req=reward_pb2.VerifyRequest(items=[reward_pb2.VerifyItem(prompt="a red circle", image=GOOD_IMAGE)]))
@given(req=verify_requests())
def test_fuzz_verify(srv, req):
    fut = srv.reward_stub.Verify.future(req, timeout=TIMEOUT)
    good = good_verify(srv)
    check(srv, "Verify", *outcome(fut))
    neighbour_ok(srv, good, "Verify")
    after(srv)


@FUZZ
@given(prompts=PROMPTS)
def test_fuzz_decompose(srv, prompts):
    fut = srv.reward_stub.Decompose.future(reward_pb2.DecomposeRequest(prompts=prompts), timeout=TIMEOUT)
    good = good_verify(srv)
    check(srv, "Decompose", *outcome(fut))
    neighbour_ok(srv, good, "Verify")
    after(srv)


NAMES = sorted(small_policy().weight_specs())


@FUZZ
@given(chunks=weight_streams(NAMES), whole=st.one_of(st.none(), st.sampled_from(NAMES)))
def test_fuzz_update_weights(srv, chunks, whole):
    if whole is not None:  # now and then a well-formed tensor too (the served values: a valid no-op update)
        t = tensor_to_proto(srv.weights[whole])
        chunks = chunks + [policy_pb2.WeightChunk(name=whole, dtype=t.dtype, shape=list(t.shape), data=t.data)]
    good = good_generate(srv)
    fut = srv.policy_stub.UpdateWeights.future(iter(chunks), timeout=TIMEOUT)
    words = tuple(c.name for c in chunks if c.name) + ("chunk", "stream", "LoRA", "lora", "request")
    check(srv, "UpdateWeights", *outcome(fut), words=words)
    neighbour_ok(srv, good, "Generate")
    restore(srv)
    after(srv)


def restore(srv):
    """A valid update changed the served weights (random values can make every image diverge): put the
    original weights back through UpdateWeights, and zero any LoRA adapters it enabled."""
    if not srv.policy.version:
        return
    info = srv.policy_stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=TIMEOUT)
    if info.lora_enabled:
        zero = [
            policy_pb2.WeightChunk(
                name=p.name,
                dtype=p.dtype,
                shape=list(p.shape),
                lora=True,
                data=b"\0" * (int(np.prod(p.shape)) * DTYPES[p.dtype].itemsize),
            )
            for p in info.parameters
            if "lora_B" in p.name
        ]
        srv.policy_stub.UpdateWeights(iter(zero), timeout=TIMEOUT)
    full = [tensor_to_proto(t) for t in srv.weights.values()]
    srv.policy_stub.UpdateWeights(
        iter(
            policy_pb2.WeightChunk(name=n, dtype=t.dtype, shape=list(t.shape), data=t.data)
            for n, t in zip(srv.weights, full)
        ),
        timeout=TIMEOUT,
    )


@st.composite
def raw_messages(draw):
    method = draw(st.sampled_from(sorted(RPCS)))
    kind = draw(st.sampled_from(["random", "truncated", "flipped"]))
    if kind == "random":
        return method, draw(st.binary(max_size=400))
    valid = {
        "Generate": lambda: generate_requests(),
        "Reflect": lambda: reflect_requests(),
        "Verify": lambda: verify_requests(),
    }.get(method.rsplit("/", 1)[-1])
    msg = draw(valid()) if valid else RPCS[method]()
    data = msg.SerializeToString()
    if kind == "truncated":
        return method, data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if not data:
        return method, b"\xff"
    i = draw(st.integers(0, len(data) - 1))
    return method, data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]


@FUZZ
@given(message=raw_messages())
def test_fuzz_protobuf_bytes(srv, message):
    method, data = message
    call = srv.channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    good = good_generate(srv)
    fut = call.future(data, timeout=TIMEOUT)
    check(srv, method.rsplit("/", 1)[-1], *outcome(fut))
    neighbour_ok(srv, good, "Generate")
    after(srv)


@FUZZ
@given(messages=st.lists(st.binary(max_size=200), max_size=4))
def test_fuzz_weight_stream_bytes(srv, messages):
    call = srv.channel.stream_unary(
        "/alphagrpo.v1.PolicyService/UpdateWeights", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    fut = call.future(iter(messages), timeout=TIMEOUT)
    code, details = outcome(fut)
    names = []
    for m in messages:  # the bytes that do parse name their tensors
        try:
            names.append(policy_pb2.WeightChunk.FromString(m).name)
        except Exception:  # noqa: BLE001 - not a WeightChunk: the guard names the message index
            pass
    words = tuple(n for n in names if n) + ("request message", "chunk", "stream")
    check(srv, "UpdateWeights", code, details, words=words)
    restore(srv)
    after(srv)
