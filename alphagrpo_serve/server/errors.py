"""How failures become gRPC status codes (docs/limits_and_errors.md lists every one)."""
from __future__ import annotations

import grpc

from ..engine import DeadlineExpired, QueueFull
from ..models.base import CapabilityError


class BadRequest(ValueError):
    """A request field is invalid; the message names it (INVALID_ARGUMENT)."""


class Upstream(RuntimeError):
    """A backend this server depends on (an OpenAI-compatible reward server) failed (UNAVAILABLE)."""


CODES = (
    (CapabilityError, grpc.StatusCode.FAILED_PRECONDITION),  # before BadRequest: both are ValueErrors
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Upstream, grpc.StatusCode.UNAVAILABLE),
)
CLIENT_ERRORS = tuple(exc for exc, _ in CODES)


async def abort_for(context, exc: BaseException, prefix: str = ""):
    """Aborts the call with the code of exc's kind (re-raises anything else)."""
    for kind, code in CODES:
        if isinstance(exc, kind):
            await context.abort(code, prefix + str(exc))
    raise exc
