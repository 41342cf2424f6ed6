"""KServe v2 tensor codec (server/kserve_tensors.py) against tritonclient's own request building and
result parsing: every datatype raw and typed, and every malformed form answered with a message
naming the input."""

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

from alphagrpo_serve.server.errors import BadRequest
from alphagrpo_serve.server.kserve_models import GENERATE, build_models, check_inputs, name_inputs, sampling_params
from alphagrpo_serve.server.kserve_tensors import decode_inputs, encode_output, serialize_bytes

ARRAYS = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
    "UINT16": np.array([0, 65535], dtype=np.uint16),
    "UINT32": np.array([7, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 127], dtype=np.int8),
    "INT16": np.array([-3, 5], dtype=np.int16),
    "INT32": np.array([[1, -2], [3, -4]], dtype=np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    "FP16": np.array([0.5, -1.25], dtype=np.float16),
    "FP32": np.array([1.5, -2.25, 3e-8], dtype=np.float32),
    "FP64": np.array([np.pi], dtype=np.float64),
    "BYTES": np.array([b"a red circle", "caf\u00e9".encode(), b"", b"\x00\xff"], dtype=object),
}
TYPED = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def request_of(*inputs, raw=True):
    req = _get_inference_request("m", list(inputs), "", "", None, 0, False, False, 0, None, None)
    if not raw:
        del req.raw_input_contents[:]
    return req


def tc_input(name, arr, datatype):
    t = tc.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr)
    return t


@pytest.mark.parametrize("datatype", sorted(ARRAYS))
def test_raw_inputs_as_tritonclient_sends_them(datatype):
    arr = ARRAYS[datatype]
    ((got_type, got),) = decode_inputs(request_of(tc_input("x", arr, datatype))).values()
    assert got_type == datatype and got.shape == arr.shape
    assert got.tolist() == arr.tolist(), (got, arr)


@pytest.mark.parametrize("datatype", sorted(TYPED))
def test_typed_contents(datatype):
    arr = ARRAYS[datatype]
    t = service_pb2.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=list(arr.shape))
    getattr(t.contents, TYPED[datatype]).extend(arr.reshape(-1).tolist())
    ((got_type, got),) = decode_inputs(service_pb2.ModelInferRequest(inputs=[t])).values()
    assert got_type == datatype and got.dtype.kind == (arr.dtype.kind if datatype != "BYTES" else "O")
    assert got.tolist() == arr.tolist()


@pytest.mark.parametrize("datatype", sorted(ARRAYS))
def test_outputs_read_back_by_tritonclient(datatype):
    arr = ARRAYS[datatype]
    res = service_pb2.ModelInferResponse()
    res.raw_output_contents.append(encode_output(res.outputs.add(name="y"), arr, datatype))
    back = tc.InferResult(res).as_numpy("y")
    assert back.shape == arr.shape and back.tolist() == arr.tolist()


def _typed(name, datatype, shape, field, values):
    t = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    getattr(t.contents, field).extend(values)
    return t


def test_malformed_inputs_name_the_input():
    p = tc_input("prompt", ARRAYS["BYTES"][:1], "BYTES")
    cases = []
    short = request_of(tc_input("seed", np.array([1], np.int64), "INT64"))
    short.raw_input_contents[0] = short.raw_input_contents[0][:5]
    cases.append((short, "input 'seed': raw contents have 5 bytes; INT64 [1] needs 8"))
    cut = request_of(p)
    cut.raw_input_contents[0] = cut.raw_input_contents[0][:-2]
    cases.append((cut, "input 'prompt': raw BYTES element 0 declares 12 bytes but only 10 remain"))
    extra = request_of(p)
    extra.raw_input_contents[0] += b"\x01"
    cases.append((extra, "input 'prompt': raw BYTES contents hold 1 bytes after the 1 elements"))
    frame = request_of(p)
    frame.raw_input_contents[0] = b"\x01\x00"
    cases.append((frame, "end inside element 0"))
    two = request_of(p, tc_input("seed", np.array([1], np.int64), "INT64"))
    del two.raw_input_contents[1]
    cases.append((two, "raw_input_contents has 1 entries for 2 inputs"))
    both = request_of(p)
    both.inputs[0].contents.bytes_contents.append(b"x")
    cases.append((both, "input 'prompt' has typed contents although the request uses raw_input_contents"))
    dup = request_of(p, p)
    cases.append((dup, "input 'prompt' is given twice"))
    cases.append(
        (
            service_pb2.ModelInferRequest(inputs=[_typed("g", "UINT8", [1], "uint_contents", [300])]),
            "input 'g': value 300 does not fit UINT8",
        )
    )
    cases.append(
        (
            service_pb2.ModelInferRequest(inputs=[_typed("g", "INT32", [2], "int_contents", [1])]),
            "input 'g': contents.int_contents has 1 elements; shape [2] needs 2",
        )
    )
    cases.append(
        (
            service_pb2.ModelInferRequest(inputs=[_typed("g", "INT32", [1], "int64_contents", [1])]),
            "input 'g': a INT32 tensor's typed data goes in contents.int_contents, not int64_contents",
        )
    )
    cases.append(
        (
            service_pb2.ModelInferRequest(inputs=[_typed("h", "FP16", [1], "fp32_contents", [1.0])]),
            "input 'h': FP16 has no typed contents field",
        )
    )
    cases.append(
        (
            service_pb2.ModelInferRequest(inputs=[_typed("g", "INT33", [1], "int_contents", [1])]),
            "input 'g': 'INT33' is not a KServe v2 datatype",
        )
    )
    cases.append(
        (
            service_pb2.ModelInferRequest(inputs=[_typed("g", "INT32", [-1], "int_contents", [1])]),
            "input 'g' has a negative dimension",
        )
    )
    cases.append(
        (service_pb2.ModelInferRequest(inputs=[_typed("", "INT32", [1], "int_contents", [1])]), "inputs[0] has no name")
    )
    shm = service_pb2.ModelInferRequest(inputs=[_typed("g", "INT32", [1], "int_contents", [1])])
    shm.inputs[0].parameters["shared_memory_region"].string_param = "r0"
    cases.append((shm, "input 'g': shared memory is not supported"))
    bad_bool = request_of(tc_input("b", np.array([True]), "BOOL"))
    bad_bool.raw_input_contents[0] = b"\x07"
    cases.append((bad_bool, "input 'b': BOOL elements must be bytes 0 or 1"))
    for req, words in cases:
        with pytest.raises(BadRequest) as info:
            decode_inputs(req)
        assert words in str(info.value), (words, str(info.value))


def test_signature_checks_and_sampling_inputs():
    from alphagrpo_serve.models.tiny_policy import TinyPolicy

    model = build_models(TinyPolicy.load().info)[GENERATE]
    ok = {
        "prompt": ("BYTES", ARRAYS["BYTES"][:1]),
        "guidance_interval": ("FP32", np.array([0.2, 0.9], np.float32)),
        "mode": ("BYTES", np.array([b"sde"], dtype=object)),
        "think": ("BOOL", np.array([True])),
        "steps": ("INT32", np.array([7], np.int32)),
    }
    p = sampling_params(model, check_inputs(model, ok))
    assert (p.mode, p.steps, p.think, p.cfg_interval_high) == (2, 7, True, pytest.approx(0.9))
    assert not p.HasField("cfg_scale")  # unset: the policy's default
    for bad, words in (
        ({"seed": ("INT64", np.array([1]))}, "needs input 'prompt'"),
        (
            dict(ok, seed=("INT32", np.array([1], np.int32))),
            "input 'seed' has datatype INT32; model 'alphagrpo_generate' expects INT64",
        ),
        (dict(ok, steps=("INT32", np.array([1, 2], np.int32))), "input 'steps' has shape [2]"),
        (dict(ok, nope=("INT32", np.array([1], np.int32))), "unexpected input 'nope'"),
    ):
        with pytest.raises(BadRequest) as info:
            check_inputs(model, bad)
        assert words in str(info.value), str(info.value)
    with pytest.raises(BadRequest, match="input 'mode' must be 'ode' or 'sde'"):
        sampling_params(model, check_inputs(model, dict(ok, mode=("BYTES", np.array([b"fast"], dtype=object)))))
    assert name_inputs("params.cfg_scale must be in [0, 100]") == "input 'guidance' must be in [0, 100]"
    assert name_inputs("params.sde_window_start/sde_window_size x") == "input 'sde_window' x"
    assert name_inputs("prompts[0]: cannot parse") == "input 'prompt': cannot parse"
    assert serialize_bytes(["ab"]) == b"\x02\x00\x00\x00ab"
