"""Server interceptors: metrics, correlation-scoped logs, error mapping, request parsing.

Order (outermost first): metrics see the final status code of every call;
correlation binds the caller's ``x-correlation-id`` (or a new one) for logs and
events; authentication (omnistock.grpc.auth) checks the token; errors turn
domain exceptions into rich statuses in one place; innermost, each request is
parsed, so bytes that are no request are a clear INVALID_ARGUMENT.
Streaming responses are wrapped, never awaited whole.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_interceptor.server import AsyncServerInterceptor

from omnistock import metrics
from omnistock.errors import DomainError, FieldViolation, InvalidArgument
from omnistock.grpc import Context
from omnistock.grpc.errors import internal_status, to_status
from omnistock.logs import CORRELATION_HEADER, correlation_scope, get_logger

log = get_logger(__name__)


def _split(method_name: str) -> tuple[str, str]:
    _, service, method = method_name.split("/")
    return service, method


def _code_name(context: Context, error: BaseException | None) -> str:
    code = context.code()
    if code is None:
        if error is None:
            return "OK"
        if isinstance(error, asyncio.CancelledError):
            # grpc.aio cancels the handler when the client cancels and when the
            # deadline passes; only the remaining time tells them apart.
            remaining = context.time_remaining()
            return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        return "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return "UNKNOWN"


class MetricsInterceptor(AsyncServerInterceptor):
    """Counts and times every RPC with the conventional ``grpc_server_*`` metrics."""

    async def intercept(
        self,
        method: Callable[..., Any],
        request_or_iterator: Any,
        context: Context,
        method_name: str,
    ) -> Any:
        service, rpc = _split(method_name)
        started = time.perf_counter()
        response = method(request_or_iterator, context)
        streaming_in = hasattr(request_or_iterator, "__aiter__")
        if hasattr(response, "__aiter__"):
            grpc_type = "bidi_stream" if streaming_in else "server_stream"
            return self._stream(response, context, service, rpc, started, grpc_type)
        grpc_type = "client_stream" if streaming_in else "unary"
        metrics.GRPC_STARTED.labels(grpc_type, service, rpc).inc()
        error: BaseException | None = None
        try:
            return await response
        except BaseException as raised:
            error = raised
            raise
        finally:
            self._done(context, grpc_type, service, rpc, started, error)

    async def _stream(
        self,
        response: AsyncIterator[Any],
        context: Context,
        service: str,
        rpc: str,
        started: float,
        grpc_type: str,
    ) -> AsyncIterator[Any]:
        metrics.GRPC_STARTED.labels(grpc_type, service, rpc).inc()
        sent = metrics.GRPC_MSG_SENT.labels(grpc_type, service, rpc)
        error: BaseException | None = None
        try:
            async for item in response:
                sent.inc()
                yield item
        except BaseException as raised:
            error = raised
            raise
        finally:
            self._done(context, grpc_type, service, rpc, started, error)

    @staticmethod
    def _done(
        context: Context,
        grpc_type: str,
        service: str,
        rpc: str,
        started: float,
        error: BaseException | None,
    ) -> None:
        metrics.GRPC_HANDLED.labels(grpc_type, service, rpc, _code_name(context, error)).inc()
        metrics.GRPC_HANDLING_SECONDS.labels(grpc_type, service, rpc).observe(
            time.perf_counter() - started
        )


class CorrelationInterceptor(AsyncServerInterceptor):
    """Binds the caller's correlation id (or a fresh one) and echoes it back."""

    async def intercept(
        self,
        method: Callable[..., Any],
        request_or_iterator: Any,
        context: Context,
        method_name: str,
    ) -> Any:
        incoming = dict(context.invocation_metadata() or ()).get(CORRELATION_HEADER)
        correlation_id = str(incoming) if incoming else None
        response = method(request_or_iterator, context)
        if hasattr(response, "__aiter__"):
            return self._stream(response, context, correlation_id)
        with correlation_scope(correlation_id) as bound:
            await context.send_initial_metadata(((CORRELATION_HEADER, bound),))
            return await response

    @staticmethod
    async def _stream(
        response: AsyncIterator[Any], context: Context, correlation_id: str | None
    ) -> AsyncIterator[Any]:
        with correlation_scope(correlation_id) as bound:
            await context.send_initial_metadata(((CORRELATION_HEADER, bound),))
            async for item in response:
                yield item


class ErrorInterceptor(AsyncServerInterceptor):
    """Turns domain errors into rich statuses; logs and hides unexpected ones."""

    async def intercept(
        self,
        method: Callable[..., Any],
        request_or_iterator: Any,
        context: Context,
        method_name: str,
    ) -> Any:
        response = method(request_or_iterator, context)
        if hasattr(response, "__aiter__"):
            return self._stream(response, context, method_name)
        async with _mapped_errors(context, method_name):
            return await response

    @staticmethod
    async def _stream(
        response: AsyncIterator[Any], context: Context, method_name: str
    ) -> AsyncIterator[Any]:
        async with _mapped_errors(context, method_name):
            async for item in response:
                yield item


@asynccontextmanager
async def _mapped_errors(context: Context, method_name: str) -> AsyncIterator[None]:
    """The one place a failed call becomes a status: domain errors with their details,
    anything unexpected as INTERNAL (logged here, never shown to the caller)."""
    try:
        yield
    except DomainError as error:
        log.info("grpc.rejected", method=method_name, reason=error.reason, message=error.message)
        await context.abort_with_status(to_status(error))
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.exception("grpc.unexpected_error", method=method_name)
        await context.abort_with_status(internal_status())


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Parses each request inside the interceptor chain, so bytes that are not the
    method's request message are INVALID_ARGUMENT (reason MALFORMED_REQUEST)
    through the error mapping and the metrics, not grpc.aio's UNKNOWN
    ("Unexpected <class 'DecodeError'>"). Innermost: the others see it fail."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        found = await continuation(handler_call_details)
        if found is None or found.request_streaming or found.request_deserializer is None:
            return found  # client streams (reflection) keep gRPC's own parsing
        # The aio handler's behaviours are coroutines; the stubs type the sync ones.
        handler: Any = found
        decode = handler.request_deserializer
        method: str = handler_call_details.method
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await unary(_decoded(decode, raw, method), context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def unary_stream(
                raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async for item in stream(_decoded(decode, raw, method), context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, response_serializer=handler.response_serializer
            )
        return found


def _decoded(decode: Callable[[bytes], Any], raw: bytes, method: str) -> Any:
    try:
        return decode(raw)
    except DecodeError as error:
        name = method.rsplit("/", 1)[-1]
        raise InvalidArgument(
            [FieldViolation("(request)", f"is not a valid {name} request: {error}")],
            reason="MALFORMED_REQUEST",
        ) from None
