"""Conversions between wire messages (alphagrpo.v1) and tensors / images, with errors that name
what is wrong. Tensors travel as {dtype, shape, raw little-endian bytes}; images as PNG."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch

from .._proto.alphagrpo.v1 import common_pb2

DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_IMAGE_SIDE = 1024


def tensor_to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    if t.dtype not in NAMES:
        raise TypeError(f"cannot send dtype {t.dtype}; supported: {sorted(DTYPES)}")
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return common_pb2.Tensor(dtype=NAMES[t.dtype], shape=list(t.shape), data=raw.numpy().tobytes())


def check_header(dtype_name: str, shape, field: str) -> tuple:
    """Validates a wire tensor's dtype name and shape; returns the shape as a tuple."""
    if dtype_name not in DTYPES:
        raise ValueError(f"{field}.dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{field}.shape {list(shape)} has a negative dimension")
    return shape


def proto_to_tensor(msg: common_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    shape = check_header(msg.dtype, msg.shape, field)
    expected = nbytes(msg.dtype, shape)
    if len(msg.data) != expected:
        raise ValueError(f"{field}.data has {len(msg.data)} bytes; {msg.dtype} {list(shape)} needs {expected}")
    return bytes_to_tensor(msg.data, msg.dtype, shape)


def nbytes(dtype_name: str, shape) -> int:
    """Raw size of a tensor of that dtype name and shape."""
    return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=DTYPES[dtype_name]).element_size()


def bytes_to_tensor(data, dtype_name: str, shape) -> torch.Tensor:
    """Little-endian row-major bytes of the right size -> a tensor that owns its memory."""
    dtype = DTYPES[dtype_name]
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
    t = torch.from_numpy(np.frombuffer(data, dtype=np_dtype).reshape(tuple(shape)).copy())
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def image_to_proto(img: np.ndarray, raw: bool = False) -> common_pb2.Image:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="PNG")
    msg = common_pb2.Image(png=buf.getvalue())
    if raw:
        msg.raw.CopyFrom(tensor_to_proto(torch.from_numpy(np.ascontiguousarray(img))))
    return msg


def proto_to_image(msg: common_pb2.Image, field: str = "image", side: Optional[int] = None) -> np.ndarray:
    """uint8 [H, W, 3] from PNG bytes (or a raw uint8 tensor); side: the required height and width."""
    from PIL import Image as PILImage, UnidentifiedImageError

    if msg.png:
        try:
            with PILImage.open(io.BytesIO(msg.png)) as im:
                if max(im.size) > MAX_IMAGE_SIDE:
                    raise ValueError(f"{field} is {im.size[0]}x{im.size[1]}, larger than {MAX_IMAGE_SIDE}")
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{field}.png is not a valid PNG image ({exc})") from None
    elif msg.HasField("raw"):
        t = proto_to_tensor(msg.raw, f"{field}.raw")
        if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[2] != 3:
            raise ValueError(f"{field}.raw must be uint8 [H, W, 3], got {NAMES[t.dtype]} {list(t.shape)}")
        arr = t.numpy()
    else:
        raise ValueError(f"{field} is empty: set png or raw")
    if side is not None and arr.shape[:2] != (side, side):
        raise ValueError(f"{field} must be {side}x{side}, got {arr.shape[1]}x{arr.shape[0]}")
    return arr
