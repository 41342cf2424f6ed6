"""The wire codec shared by the server and the client: conversions between alphagrpo.v1 messages
and tensors, images, sampling settings and trajectories, with errors that name what is wrong.
Tensors travel as {dtype, shape, raw little-endian bytes}; images as PNG (or raw uint8)."""

from __future__ import annotations

import io
import math
import struct
from typing import Optional

import numpy as np
import torch

from ._proto.alphagrpo.v1 import common_pb2, policy_pb2

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_IMAGE_SIDE = 1024
SEED_MODULUS = 1 << 64  # seeds are uint64 on the wire
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` (= prompt index * group_size + sample index) of a request with base
    seed `seed`: seed + index, wrapping modulo 2^64 so that every uint64 base seed works."""
    return (int(seed) + int(index)) % SEED_MODULUS


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
    """Raw size of a tensor of that dtype name and shape, exact (Python integers: a declared shape
    whose size overflows 64 bits is simply a very large number, never a wrapped small one)."""
    return math.prod(int(d) for d in shape) * DTYPES[dtype_name].itemsize


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


def png_size(data: bytes, field: str = "image.png") -> tuple:
    """(width, height) read from a PNG's header (signature + IHDR), before anything is decoded."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError(f"{field} is not a valid PNG image (no PNG signature and IHDR header)")
    return struct.unpack(">II", data[16:24])


def _check_side(field: str, width: int, height: int) -> None:
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise ValueError(f"{field} is {width}x{height}; each side must be in [1, {MAX_IMAGE_SIDE}]")


def proto_to_image(msg: common_pb2.Image, field: str = "image", side: Optional[int] = None) -> np.ndarray:
    """uint8 [H, W, 3] from PNG bytes (or a raw uint8 tensor); side: the required height and width.
    The size is checked from the PNG header (or the raw tensor's shape) before anything is decoded,
    and only PNG is decoded; every failure is a ValueError naming the field."""
    from PIL import Image as PILImage

    if msg.png:
        w, h = png_size(msg.png, f"{field}.png")
        _check_side(field, w, h)
        try:
            with PILImage.open(io.BytesIO(msg.png), formats=["PNG"]) as im:
                if im.size != (w, h):
                    raise ValueError(f"header says {w}x{h}, the decoder {im.size[0]}x{im.size[1]}")
                arr = np.asarray(im.convert("RGB"))
        except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, zlib.error, ...) for bad data
            raise ValueError(f"{field}.png is not a valid PNG image ({type(exc).__name__}: {str(exc)[:200]})") from None
        if arr.shape != (h, w, 3):
            raise ValueError(f"{field}.png decoded to {list(arr.shape)}, not [{h}, {w}, 3]")
    elif msg.HasField("raw"):
        t = proto_to_tensor(msg.raw, f"{field}.raw")
        if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[2] != 3:
            raise ValueError(f"{field}.raw must be uint8 [H, W, 3], got {NAMES[t.dtype]} {list(t.shape)}")
        _check_side(field, int(t.shape[1]), int(t.shape[0]))
        arr = t.numpy()
    else:
        raise ValueError(f"{field} is empty: set png or raw")
    if side is not None and arr.shape[:2] != (side, side):
        raise ValueError(f"{field} must be {side}x{side}, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


# ---- sampling settings -------------------------------------------------------------------------------
MODES = {"ode": policy_pb2.SAMPLING_MODE_ODE, "sde": policy_pb2.SAMPLING_MODE_SDE}
# SamplingParams field -> (SamplingConfig field, converter); the window and interval are pairs
_SCALAR_FIELDS = {
    "steps": "steps",
    "cfg_scale": "cfg_scale",
    "noise_level": "noise_level",
    "width": "width",
    "height": "height",
    "cfg_img_scale": "cfg_img_scale",
    "cfg_renorm_type": "cfg_renorm_type",
    "cfg_renorm_min": "cfg_renorm_min",
    "timestep_shift": "shift",
}
_TEXT_FIELDS = {"temperature": "temperature", "top_p": "top_p", "max_thought_tokens": "max_tokens"}


def params_to_overrides(p: policy_pb2.SamplingParams) -> tuple:
    """(sampling overrides, text overrides): the fields a request set, under the names of
    SamplingConfig / TextConfig. ValueError names an unknown mode or a half-set pair."""
    ov = {}
    if p.mode != policy_pb2.SAMPLING_MODE_UNSPECIFIED:
        names = {v: k for k, v in MODES.items()}
        if p.mode not in names:
            raise ValueError(f"params.mode {p.mode} is not a SamplingMode (ODE = 1, SDE = 2)")
        ov["mode"] = names[p.mode]
    for wire, ours in _SCALAR_FIELDS.items():
        if p.HasField(wire):
            ov[ours] = getattr(p, wire)
    for a, b, ours, conv in (
        ("sde_window_start", "sde_window_size", "sde_window", int),
        ("cfg_interval_low", "cfg_interval_high", "cfg_interval", float),
    ):
        if p.HasField(a) != p.HasField(b):
            raise ValueError(f"params.{a} and params.{b} must be set together")
        if p.HasField(a):
            ov[ours] = (conv(getattr(p, a)), conv(getattr(p, b)))
    text = {ours: getattr(p, wire) for wire, ours in _TEXT_FIELDS.items() if p.HasField(wire)}
    return ov, text


def config_to_params(sc, text=None, think: bool = False) -> policy_pb2.SamplingParams:
    """Every field set from a SamplingConfig (and TextConfig): a resolved SamplingParams."""
    msg = policy_pb2.SamplingParams(
        mode=MODES[sc.mode],
        think=think,
        steps=sc.steps,
        cfg_scale=sc.cfg_scale,
        cfg_interval_low=sc.cfg_interval[0],
        cfg_interval_high=sc.cfg_interval[1],
        sde_window_start=sc.sde_window[0],
        sde_window_size=sc.sde_window[1],
        noise_level=sc.noise_level,
        width=sc.width,
        height=sc.height,
        cfg_img_scale=sc.cfg_img_scale,
        cfg_renorm_type=sc.cfg_renorm_type,
        cfg_renorm_min=sc.cfg_renorm_min,
        timestep_shift=sc.shift,
    )
    if text is not None:
        msg.temperature, msg.top_p, msg.max_thought_tokens = text.temperature, text.top_p, text.max_tokens
    return msg


def params_to_config(p: policy_pb2.SamplingParams):
    """(SamplingConfig, TextConfig) from a fully resolved SamplingParams (a response's resolved_params).
    float32 wire values are rounded back to the nearest short decimal the sender most likely meant."""
    from .sampling.sampler import SamplingConfig, TextConfig

    ov, text = params_to_overrides(p)
    ov = {
        k: (
            _f32(v)
            if isinstance(v, float)
            else tuple(_f32(x) for x in v)
            if isinstance(v, tuple) and isinstance(v[0], float)
            else v
        )
        for k, v in ov.items()
    }
    text = {k: (_f32(v) if isinstance(v, float) else v) for k, v in text.items()}
    return SamplingConfig(**ov), TextConfig(**text)


def _f32(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (0.699999988 -> 0.7)."""
    return float(np.format_float_positional(np.float32(x), unique=True))


# ---- trajectories ------------------------------------------------------------------------------------------
def trajectory_to_proto(text_ids, text_logps, tr) -> policy_pb2.Trajectory:
    return policy_pb2.Trajectory(
        token_ids=list(text_ids),
        token_logprobs=list(text_logps),
        latents=tensor_to_proto(tr.latents.float()),
        sigmas=tr.sigmas.tolist(),
        sigma_nexts=tr.sigma_nexts.tolist(),
        step_logprobs=tr.log_probs.tolist(),
        window_start=tr.window_start,
        sigma_max=tr.sigma_max,
    )


def proto_to_trajectory(t: policy_pb2.Trajectory):
    """(token ids, token log-probs, ImageTrajectory) from a wire trajectory."""
    from .sampling.sampler import ImageTrajectory

    traj = ImageTrajectory(
        proto_to_tensor(t.latents, "trajectory.latents").float(),
        torch.tensor(list(t.sigmas)),
        torch.tensor(list(t.sigma_nexts)),
        torch.tensor(list(t.step_logprobs)),
        int(t.window_start),
        float(t.sigma_max),
    )
    return list(t.token_ids), list(t.token_logprobs), traj
