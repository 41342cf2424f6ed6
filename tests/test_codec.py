"""Wire codecs: tensors and images to and from alphagrpo.v1 messages."""

import numpy as np
import pytest
import torch

from alphagrpo_serve._proto.alphagrpo.v1 import common_pb2
from alphagrpo_serve.wire import image_to_proto, proto_to_image, proto_to_tensor, tensor_to_proto


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
)
def test_tensor_round_trip(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    msg = common_pb2.Tensor.FromString(tensor_to_proto(t[:, 1:]).SerializeToString())  # a strided view
    back = proto_to_tensor(msg)
    assert back.dtype == dtype and torch.equal(back, t[:, 1:])


def test_tensor_bytes_are_little_endian_row_major():
    msg = tensor_to_proto(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32))
    assert msg.data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0]) and list(msg.shape) == [2, 2]


@pytest.mark.parametrize(
    "msg, words",
    [
        (common_pb2.Tensor(dtype="float8", shape=[1], data=b"\0"), "dtype 'float8'"),
        (common_pb2.Tensor(dtype="float32", shape=[2], data=b"\0" * 4), "has 4 bytes; float32 [2] needs 8"),
        (common_pb2.Tensor(dtype="float32", shape=[-1], data=b""), "negative"),
    ],
)
def test_bad_tensors(msg, words):
    with pytest.raises(ValueError) as info:
        proto_to_tensor(msg, "weights")
    assert words in str(info.value) and "weights" in str(info.value)


def test_image_round_trip_and_errors():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    msg = image_to_proto(img, raw=True)
    assert np.array_equal(proto_to_image(msg), img)
    assert np.array_equal(proto_to_image(common_pb2.Image(raw=msg.raw)), img)
    with pytest.raises(ValueError, match="not a valid PNG"):
        proto_to_image(common_pb2.Image(png=b"not a png"), "items[0].image")
    with pytest.raises(ValueError, match="is empty"):
        proto_to_image(common_pb2.Image())
    with pytest.raises(ValueError, match="must be 64x64"):
        proto_to_image(msg, side=64)
