"""Refuses request bytes that are not a valid message of the method's request type.

gRPC deserialises a request before the servicer runs; a DecodeError there would answer UNKNOWN and
never reach the service's metrics. This interceptor wraps every method's request deserializer: bytes
that do not parse become a marker, and the call is answered INVALID_ARGUMENT naming the request type
(for a request stream: the index of the bad message), and recorded in the metrics under that code.
"""

from __future__ import annotations

import inspect

import grpc

from .metrics import Metrics


class _Malformed:
    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _guarded_deserializer(deserialize):
    if deserialize is None:
        return None

    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as exc:  # google.protobuf.message.DecodeError, and anything a parser raises
            return _Malformed(exc)

    return parse


def _type_name(deserialize, method: str) -> str:
    cls = getattr(deserialize, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else f"request of {method}"


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if not (inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)):
            return handler  # a synchronous handler (none here): left as it is
        method = details.method
        short = method.rsplit("/", 1)[-1]
        what = _type_name(handler.request_deserializer, method)
        metrics = self.metrics

        async def refuse(context, message: str):
            metrics.record(short, grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        def message_for(bad: _Malformed, index=None) -> str:
            where = "the request" if index is None else f"request message {index}"
            return f"{where} is not a valid {what} ({type(bad.error).__name__}: {str(bad.error)[:200]})"

        deserializer = _guarded_deserializer(handler.request_deserializer)
        if not handler.request_streaming:
            inner = handler.unary_unary or handler.unary_stream
            if handler.response_streaming:
                if inspect.isasyncgenfunction(inner):

                    async def behaviour(request, context):
                        if isinstance(request, _Malformed):
                            await refuse(context, message_for(request))
                        async for item in inner(request, context):
                            yield item
                else:

                    async def behaviour(request, context):
                        if isinstance(request, _Malformed):
                            await refuse(context, message_for(request))
                        return await _maybe_await(inner(request, context))

                return grpc.unary_stream_rpc_method_handler(behaviour, deserializer, handler.response_serializer)

            async def behaviour(request, context):
                if isinstance(request, _Malformed):
                    await refuse(context, message_for(request))
                return await _maybe_await(inner(request, context))

            return grpc.unary_unary_rpc_method_handler(behaviour, deserializer, handler.response_serializer)

        inner = handler.stream_unary or handler.stream_stream

        def checked(request_iterator, context):
            async def gen():
                index = 0
                async for request in _aiter(request_iterator):
                    if isinstance(request, _Malformed):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message_for(request, index))
                    index += 1
                    yield request

            return gen()

        if not handler.response_streaming:

            async def behaviour(request_iterator, context):
                return await _maybe_await(inner(checked(request_iterator, context), context))

            return grpc.stream_unary_rpc_method_handler(behaviour, deserializer, handler.response_serializer)
        if inspect.isasyncgenfunction(inner):

            async def behaviour(request_iterator, context):
                async for item in inner(checked(request_iterator, context), context):
                    yield item
        else:

            async def behaviour(request_iterator, context):
                return await _maybe_await(inner(checked(request_iterator, context), context))

        return grpc.stream_stream_rpc_method_handler(behaviour, deserializer, handler.response_serializer)


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


async def _aiter(iterator):
    if hasattr(iterator, "__aiter__"):
        async for item in iterator:
            yield item
    else:  # a synchronous iterator (grpc's sync servicers); not used by grpc.aio, kept for safety
        for item in iterator:
            yield item
