"""KServe v2 tensors on the wire: datatypes, request inputs (raw_input_contents or typed contents)
decoded into numpy arrays, and outputs encoded as raw_output_contents (the form tritonclient reads).

Raw contents are row-major little-endian; BOOL is one byte per element; a BYTES tensor is its
elements one after another, each a 4-byte little-endian length followed by that many bytes.
Every error is a BadRequest naming the input.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import BadRequest

# KServe datatype -> (numpy dtype, InferTensorContents field holding it; None: raw only)
DATATYPES: Dict[str, Tuple[np.dtype, Optional[str]]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype("<u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("<i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP16": (np.dtype("<f2"), None),
    "BF16": (np.dtype("<u2"), None),  # no numpy type: kept as its raw 16-bit words
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "BYTES": (np.dtype(object), "bytes_contents"),
}
_LEN = struct.Struct("<I")


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _shape(t, where: str) -> Tuple[int, ...]:
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise BadRequest(f"{where} has a negative dimension in its shape {list(shape)}")
    return shape


def deserialize_bytes(data: bytes, count: int, where: str) -> np.ndarray:
    """count length-prefixed elements -> object array of bytes; BadRequest when the framing is off."""
    out = np.empty(count, dtype=object)
    view, pos = memoryview(data), 0
    for i in range(count):
        if pos + 4 > len(view):
            raise BadRequest(
                f"{where}: raw BYTES contents end inside element {i} of {count} (each element is a "
                f"4-byte little-endian length, then its bytes)"
            )
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > len(view):
            raise BadRequest(f"{where}: raw BYTES element {i} declares {n} bytes but only {len(view) - pos} remain")
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise BadRequest(
            f"{where}: raw BYTES contents hold {len(view) - pos} bytes after the {count} elements its shape declares"
        )
    return out


def serialize_bytes(values) -> bytes:
    """Elements (bytes or str, any shape) -> the length-prefixed raw form."""
    parts: List[bytes] = []
    for v in np.asarray(values, dtype=object).reshape(-1):
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _from_raw(data: bytes, datatype: str, shape: Tuple[int, ...], where: str) -> np.ndarray:
    count = _count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(data, count, where).reshape(shape)
    dtype = DATATYPES[datatype][0]
    if count * dtype.itemsize != len(data):
        raise BadRequest(
            f"{where}: raw contents have {len(data)} bytes; {datatype} {list(shape)} needs {count * dtype.itemsize}"
        )
    arr = np.frombuffer(data, dtype=np.uint8 if datatype == "BOOL" else dtype).reshape(shape)
    if datatype == "BOOL":
        if arr.size and arr.max() > 1:
            raise BadRequest(f"{where}: BOOL elements must be bytes 0 or 1")
        arr = arr.astype(np.bool_)
    return arr


def _from_contents(contents, datatype: str, shape: Tuple[int, ...], where: str) -> np.ndarray:
    dtype, field = DATATYPES[datatype]
    if field is None:
        raise BadRequest(f"{where}: {datatype} has no typed contents field; send it in raw_input_contents")
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise BadRequest(f"{where}: a {datatype} tensor's typed data goes in contents.{field}, not {', '.join(others)}")
    values = getattr(contents, field)
    count = _count(shape)
    if len(values) != count:
        raise BadRequest(f"{where}: contents.{field} has {len(values)} elements; shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    wide = np.asarray(list(values), dtype=np.float64 if dtype.kind == "f" else object if dtype.kind in "iu" else dtype)
    if dtype.kind in "iu" and count:
        info = np.iinfo(dtype)
        bad = [int(v) for v in values if not info.min <= int(v) <= info.max]
        if bad:
            raise BadRequest(f"{where}: value {bad[0]} does not fit {datatype}")
    return wide.astype(dtype).reshape(shape)


def decode_inputs(request) -> Dict[str, Tuple[str, np.ndarray]]:
    """{name: (KServe datatype, array)} of a ModelInferRequest's inputs."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: give raw "
            f"contents for every input, in the order of the inputs, or for none"
        )
    out: Dict[str, Tuple[str, np.ndarray]] = {}
    for k, t in enumerate(request.inputs):
        if not t.name:
            raise BadRequest(f"inputs[{k}] has no name")
        where = f"input '{t.name}'"
        if t.name in out:
            raise BadRequest(f"{where} is given twice")
        if "shared_memory_region" in t.parameters:
            raise BadRequest(f"{where}: shared memory is not supported by this server; send the data in the request")
        if t.datatype not in DATATYPES:
            raise BadRequest(f"{where}: {t.datatype!r} is not a KServe v2 datatype ({', '.join(DATATYPES)})")
        shape = _shape(t, where)
        if raw:
            if t.HasField("contents") and t.contents.ListFields():
                raise BadRequest(f"{where} has typed contents although the request uses raw_input_contents")
            out[t.name] = (t.datatype, _from_raw(raw[k], t.datatype, shape, where))
        else:
            out[t.name] = (t.datatype, _from_contents(t.contents, t.datatype, shape, where))
    return out


def encode_output(tensor, arr: np.ndarray, datatype: str) -> bytes:
    """Fills an InferOutputTensor's name-less header (datatype, shape) and returns the raw contents."""
    arr = np.asarray(arr, dtype=object if datatype == "BYTES" else None)
    tensor.datatype = datatype
    tensor.shape.extend(int(d) for d in arr.shape)
    if datatype == "BYTES":
        return serialize_bytes(arr)
    if datatype == "BOOL":
        return np.ascontiguousarray(arr, dtype=np.bool_).tobytes()
    return np.ascontiguousarray(arr, dtype=DATATYPES[datatype][0]).tobytes()
