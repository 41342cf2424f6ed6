"""How failures become gRPC status codes (docs/limits_and_errors.md lists every one)."""

from __future__ import annotations

import grpc

from ..engine import DeadlineExpired, QueueFull
from ..models.base import CapabilityError
from ..sampling.sampler import SamplingDiverged

MAX_DETAILS = 1000  # characters of an error message sent back (gRPC trailers are small; values can be huge)


class BadRequest(ValueError):
    """A request field is invalid; the message names it (INVALID_ARGUMENT)."""


class Upstream(RuntimeError):
    """A backend this server depends on (an OpenAI-compatible reward server) failed (UNAVAILABLE)."""


class ResourceLimit(Exception):
    """The request would pass a server limit that is not about one field's value: the answer's size,
    the bytes held by weight streams, the reward queue (RESOURCE_EXHAUSTED)."""


CODES = (
    (CapabilityError, grpc.StatusCode.FAILED_PRECONDITION),  # before BadRequest: both are ValueErrors
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (SamplingDiverged, grpc.StatusCode.INVALID_ARGUMENT),  # raised inside the batch; names the params
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResourceLimit, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Upstream, grpc.StatusCode.UNAVAILABLE),
)
CLIENT_ERRORS = tuple(exc for exc, _ in CODES)


def details(message: str) -> str:
    """An error message cut to MAX_DETAILS characters (a request may carry megabytes in one field)."""
    return message if len(message) <= MAX_DETAILS else message[: MAX_DETAILS - 16] + " ... (truncated)"


async def abort_for(context, exc: BaseException, prefix: str = ""):
    """Aborts the call with the code of exc's kind (re-raises anything else)."""
    for kind, code in CODES:
        if isinstance(exc, kind):
            await context.abort(code, details(prefix + str(exc)))
    raise exc
