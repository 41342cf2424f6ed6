"""UpdateWeights streams: named tensors in chunks, checked against what the policy accepts before
any memory is set aside for them, assembled from the bytes actually received."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..wire import DTYPES, NAMES, bytes_to_tensor, check_header, nbytes
from .errors import BadRequest

LORA_SUFFIXES = ("lora_A", "lora_B")


class _Part:
    __slots__ = ("dtype", "shape", "size", "chunks", "filled")

    def __init__(self, dtype: str, shape: tuple, size: int):
        self.dtype, self.shape, self.size = dtype, shape, size
        self.chunks: List[bytes] = []
        self.filled = 0


async def receive_weights(request_iterator, specs: Dict[str, tuple], max_bytes: int
                          ) -> Tuple[Dict[str, torch.Tensor], bool, int]:
    """Reads the stream; returns (tensors, lora, bytes received).

    specs: {name: (shape, dtype)} the policy accepts for full weights (policy.weight_specs()); LoRA
    streams are checked by name pattern here and fully by the policy's import (their rank may be
    new). A tensor's header is checked (name, dtype, shape, declared size against max_bytes) on its
    first chunk, before anything is stored."""
    parts: Dict[str, _Part] = {}
    received = 0
    declared = 0
    lora = None
    async for chunk in request_iterator:
        name = chunk.name
        if not name:
            raise BadRequest("a chunk has no name")
        if lora is None:
            lora = bool(chunk.lora)
        elif bool(chunk.lora) != lora:
            raise BadRequest(f"{name}: a stream carries either full weights or LoRA tensors, not both")
        part = parts.get(name)
        if part is None:
            try:
                shape = check_header(chunk.dtype, chunk.shape, name)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            if lora:
                if not name.endswith(LORA_SUFFIXES) or len(shape) != 2:
                    raise BadRequest(f"{name}: LoRA tensors are 2-D and named *.lora_A or *.lora_B")
            else:
                if name not in specs:
                    raise BadRequest(f"{name}: not a parameter of the served policy (GetModelInfo lists them)")
                want_shape, want_dtype = specs[name]
                if tuple(shape) != tuple(want_shape):
                    raise BadRequest(f"{name}: shape {list(shape)} sent, the policy's is {list(want_shape)}")
                if DTYPES[chunk.dtype] != want_dtype:
                    raise BadRequest(f"{name}: dtype {chunk.dtype} sent, the policy's is "
                                     f"{NAMES.get(want_dtype, want_dtype)}")
            size = nbytes(chunk.dtype, shape)
            declared += size
            if declared > max_bytes:
                raise BadRequest(f"{name}: the stream declares {declared} bytes, more than the limit of {max_bytes}")
            part = parts[name] = _Part(chunk.dtype, shape, size)
        elif (part.dtype, part.shape) != (chunk.dtype, tuple(int(d) for d in chunk.shape)):
            raise BadRequest(f"{name}: dtype/shape changed between chunks")
        if chunk.offset != part.filled or chunk.offset + len(chunk.data) > part.size:
            raise BadRequest(f"{name}: chunk at offset {chunk.offset} with {len(chunk.data)} bytes does not continue "
                             f"the {part.filled} of {part.size} bytes received")
        part.chunks.append(bytes(chunk.data))
        part.filled += len(chunk.data)
        received += len(chunk.data)
    if not parts:
        raise BadRequest("the stream carried no tensors")
    tensors = {}
    for name, part in parts.items():
        if part.filled != part.size:
            raise BadRequest(f"{name}: received {part.filled} of {part.size} bytes")
        tensors[name] = bytes_to_tensor(b"".join(part.chunks), part.dtype, part.shape)
        part.chunks = []
    return tensors, bool(lora), received
