"""UpdateWeights streams: named tensors in chunks, checked against what the policy accepts before
any memory is set aside for them, assembled from the bytes actually received.

Memory: a stream holds the chunks it has received (never what a header declares), each tensor is
assembled into its final buffer as soon as its last chunk arrives, and the bytes held by every
stream in progress together are bounded (StreamBudget, --max-update-total-mb)."""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, Dict, Optional, Tuple

import numpy as np
import torch

from ..wire import DTYPES, NAMES, check_header, nbytes
from .errors import BadRequest, ResourceLimit

LORA_SUFFIXES = ("lora_A", "lora_B")


class StreamBudget:
    """Bytes held by all UpdateWeights streams in progress, at most `limit` together. One per server;
    used from the event loop only."""

    def __init__(self, limit: int):
        self.limit, self.held = int(limit), 0

    def hold(self) -> "Hold":
        return Hold(self)


class Hold:
    """One stream's share of the budget: grows with the bytes it receives, returned on exit."""

    def __init__(self, budget: StreamBudget):
        self.budget, self.bytes = budget, 0

    def take(self, n: int, name: str) -> None:
        b = self.budget
        if b.held + n > b.limit:
            raise ResourceLimit(
                f"{name}: weight streams in progress hold {b.held} bytes and this chunk adds {n}, "
                f"more than the server's {b.limit} (--max-update-total-mb); retry when they finish"
            )
        b.held += n
        self.bytes += n

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        self.budget.held -= self.bytes
        self.bytes = 0


class _Part:
    __slots__ = ("dtype", "shape", "size", "chunks", "filled", "tensor")

    def __init__(self, dtype: str, shape: tuple, size: int):
        self.dtype, self.shape, self.size = dtype, shape, size
        self.chunks: Deque[bytes] = deque()
        self.filled = 0
        self.tensor: Optional[torch.Tensor] = None

    def assemble(self) -> None:
        """The tensor from its chunks, each chunk freed as soon as it is copied (no joined copy)."""
        buf = np.empty(self.size, dtype=np.uint8)
        pos = 0
        while self.chunks:
            c = self.chunks.popleft()
            buf[pos : pos + len(c)] = np.frombuffer(c, dtype=np.uint8)
            pos += len(c)
        self.tensor = torch.from_numpy(buf).view(DTYPES[self.dtype]).reshape(self.shape)


async def receive_weights(
    request_iterator,
    specs: Dict[str, tuple],
    max_bytes: int,
    lora_specs: Optional[Dict[str, tuple]] = None,
    hold: Optional[Hold] = None,
    check_lora: Optional[Callable[[], None]] = None,
) -> Tuple[Dict[str, torch.Tensor], bool, int]:
    """Reads the stream; returns (tensors, lora, bytes received).

    specs: {name: (shape, dtype)} the policy accepts for full weights (policy.weight_specs()).
    lora_specs: the same for LoRA adapters (policy.weight_specs(lora=True)); empty while LoRA is off,
    when the rank is new: then names are checked by pattern here and fully by the policy's import.
    hold: this stream's share of the server's StreamBudget (every received byte is taken from it).
    check_lora: called when the stream turns out to carry LoRA tensors (raises CapabilityError).
    A tensor's header is checked (name, dtype, shape, declared size against max_bytes) on its first
    chunk, before anything of it is stored."""
    parts: Dict[str, _Part] = {}
    received = 0
    declared = 0
    lora = None
    lora_specs = lora_specs or {}
    async for chunk in request_iterator:
        name = chunk.name
        if not name:
            raise BadRequest("a chunk has no name")
        if lora is None:
            lora = bool(chunk.lora)
            if lora and check_lora is not None:
                check_lora()
        elif bool(chunk.lora) != lora:
            raise BadRequest(f"{name}: a stream carries either full weights or LoRA tensors, not both")
        part = parts.get(name)
        if part is None:
            try:
                shape = check_header(chunk.dtype, chunk.shape, name)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            if lora and lora_specs:
                _check_spec(name, shape, chunk.dtype, lora_specs, "a LoRA adapter")
            elif lora:
                if not name.endswith(LORA_SUFFIXES) or len(shape) != 2:
                    raise BadRequest(f"{name}: LoRA tensors are 2-D and named *.lora_A or *.lora_B")
                if len(parts) >= 2 * len(specs):  # at most an A and a B per weight of the policy
                    raise BadRequest(f"{name}: the stream carries more LoRA tensors than the policy has weights")
            else:
                _check_spec(name, shape, chunk.dtype, specs, "a parameter")
            size = nbytes(chunk.dtype, shape)
            declared += size
            if declared > max_bytes:
                raise BadRequest(
                    f"{name}: {chunk.dtype} {list(shape)} is {size} bytes; the stream declares {declared} "
                    f"bytes in all, more than the limit of {max_bytes}"
                )
            part = parts[name] = _Part(chunk.dtype, shape, size)
        elif (part.dtype, part.shape) != (chunk.dtype, tuple(int(d) for d in chunk.shape)):
            raise BadRequest(f"{name}: dtype/shape changed between chunks")
        n = len(chunk.data)
        if chunk.offset != part.filled or chunk.offset + n > part.size:
            raise BadRequest(
                f"{name}: chunk at offset {chunk.offset} with {n} bytes does not continue "
                f"the {part.filled} of {part.size} bytes received"
            )
        if n:
            if hold is not None:
                hold.take(n, name)
            part.chunks.append(bytes(chunk.data))
            part.filled += n
            received += n
        if part.filled == part.size and part.tensor is None:
            part.assemble()
    if not parts:
        raise BadRequest("the stream carried no tensors")
    for name, part in parts.items():
        if part.tensor is None:
            raise BadRequest(f"{name}: received {part.filled} of {part.size} bytes")
    return {name: part.tensor for name, part in parts.items()}, bool(lora), received


def _check_spec(name: str, shape: tuple, dtype: str, specs: Dict[str, tuple], what: str) -> None:
    if name not in specs:
        raise BadRequest(f"{name}: not {what} of the served policy (GetModelInfo lists them)")
    want_shape, want_dtype = specs[name]
    if tuple(shape) != tuple(want_shape):
        raise BadRequest(f"{name}: shape {list(shape)} sent, the policy's is {list(want_shape)}")
    if DTYPES[dtype] != want_dtype:
        raise BadRequest(f"{name}: dtype {dtype} sent, the policy's is {NAMES.get(want_dtype, want_dtype)}")
