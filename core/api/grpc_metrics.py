"""The standard gRPC server series, named as grpc-prometheus names them (Go, Java and Python share
the names), counted by an interceptor that wraps every registered method's handler:

    grpc_server_started_total{grpc_type,grpc_service,grpc_method}
    grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
    grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}   (histogram)
    grpc_server_msg_received_total / grpc_server_msg_sent_total{grpc_type,grpc_service,grpc_method}

grpc_code is the status the call really ended with: OK, an abort's code (our domain errors are
aborted with their status by the auth interceptor, core/api/auth.py, which runs inside this one),
CANCELLED when the client went away, UNKNOWN for an exception gRPC itself turns into a status.
Codes are spelled as grpc.StatusCode names (INVALID_ARGUMENT), as the Python and Java interceptors
do. Only registered methods are counted (an unknown method name is unbounded input).

Cost: the label children of a method are looked up once and cached; per message the only work is
one prometheus-client counter increment.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

if TYPE_CHECKING:  # the stubs are generic, the runtime classes are not
    Ctx = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]

LABELS = ("grpc_type", "grpc_service", "grpc_method")
# grpc-prometheus' default buckets (Prometheus' defaults): most admin and distribution calls end
# in milliseconds; refresh streams last hours and land in +Inf, as they do for every gRPC server.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _code_name(code: object) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc's cython context may hand back the numeric code
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate.name
    return grpc.StatusCode.UNKNOWN.name


def _ended_with(context: Ctx, default: grpc.StatusCode) -> str:
    try:
        code = context.code()
    except Exception:  # pragma: no cover - an older grpcio without ServicerContext.code()
        code = None
    return default.name if code is None else _code_name(code)


class GrpcServerMetrics:
    """The series above on `registry`; `interceptor()` counts into them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level"
            " handled by the server.",
            LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server.",
            LABELS,
            registry=registry,
        )
        self.sent = Counter(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server.",
            LABELS,
            registry=registry,
        )
        self._series: dict[str, _Series] = {}

    def series(self, method: str, grpc_type: str) -> _Series:
        found = self._series.get(method)
        if found is None:
            service, _, name = method.lstrip("/").rpartition("/")
            found = self._series[method] = _Series(self, (grpc_type, service, name))
        return found

    def preregister(self, methods: Iterable[tuple[str, str]]) -> None:
        """Zero-valued series for (full method, grpc_type) pairs, as grpc-prometheus'
        InitializeMetrics does: a rate() over a method never called yet is 0, not absent."""
        for method, grpc_type in methods:
            self.series(method, grpc_type).handled_child(grpc.StatusCode.OK.name)

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)


class _Series:
    """The label children of one method, looked up once."""

    __slots__ = ("_handled", "_handling", "_metrics", "labels", "received", "sent", "started")

    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self.labels = labels
        self.started = metrics.started.labels(*labels)
        # Created at the first call: 14 zero buckets for each of ~45 methods is noise.
        self._handling: Any = None
        self.received = metrics.received.labels(*labels)
        self.sent = metrics.sent.labels(*labels)
        self._handled: dict[str, Any] = {}

    def handled_child(self, code: str) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._metrics.handled.labels(*self.labels, code)
        return child

    def begin(self) -> float:
        self.started.inc()
        return time.perf_counter()

    def end(self, began: float, code: str) -> None:
        if self._handling is None:
            self._handling = self._metrics.handling.labels(*self.labels)
        self._handling.observe(time.perf_counter() - began)
        self.handled_child(code).inc()


def grpc_type_of(handler: Handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _classify(exc: BaseException, context: Ctx) -> str:
    if isinstance(exc, grpc.aio.AbortError):
        return _ended_with(context, grpc.StatusCode.UNKNOWN)
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the client went away
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name


async def _counted(requests: AsyncIterator[Any], series: _Series) -> AsyncIterator[Any]:
    async for message in requests:
        series.received.inc()
        yield message


def _wrap(handler: Handler, series: _Series) -> Handler:
    """A handler of the same kind that counts into `series`."""
    if handler.unary_unary is not None:
        inner_uu: Callable[..., Any] = handler.unary_unary

        async def unary_unary(request: Any, context: Ctx) -> Any:
            began = series.begin()
            series.received.inc()
            try:
                reply = inner_uu(request, context)
                if inspect.isawaitable(reply):
                    reply = await reply
            except BaseException as exc:
                series.end(began, _classify(exc, context))
                raise
            series.sent.inc()
            series.end(began, _ended_with(context, grpc.StatusCode.OK))
            return reply

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream_wrapper(handler.unary_stream, series, streaming_request=False),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _stream_wrapper(handler.stream_stream, series, streaming_request=True),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary is not None:
        inner_su: Callable[..., Awaitable[Any]] = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Ctx) -> Any:
            began = series.begin()
            try:
                reply = await inner_su(_counted(requests, series), context)
            except BaseException as exc:
                series.end(began, _classify(exc, context))
                raise
            series.sent.inc()
            series.end(began, _ended_with(context, grpc.StatusCode.OK))
            return reply

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    return handler  # pragma: no cover - every handler kind is covered above


def _stream_wrapper(
    inner: Callable[..., Any], series: _Series, streaming_request: bool
) -> Callable[..., Any]:
    """Response streams come as async generators (ours) or as coroutines that call
    context.write (grpc_health's Watch): the wrapper is of the same kind as `inner`."""

    def request_of(request: Any) -> Any:
        if streaming_request:
            return _counted(request, series)
        series.received.inc()
        return request

    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: Ctx) -> AsyncIterator[Any]:
            began = series.begin()
            stream = inner(request_of(request), context)
            try:
                async for message in stream:
                    series.sent.inc()
                    yield message
            except BaseException as exc:
                series.end(began, _classify(exc, context))
                raise
            finally:
                await stream.aclose()  # the inner stream's cleanup runs here, in this task
            series.end(began, _ended_with(context, grpc.StatusCode.OK))

        return generator

    async def coroutine(request: Any, context: Ctx) -> Any:
        began = series.begin()
        try:
            result = inner(request_of(request), context)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as exc:
            series.end(began, _classify(exc, context))
            raise
        series.end(began, _ended_with(context, grpc.StatusCode.OK))
        return result

    return coroutine


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Outermost interceptor: sees the status every call ends with, auth refusals included."""

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED: not counted, the method name is the client's input
        method: str = details.method
        return _wrap(handler, self._metrics.series(method, grpc_type_of(handler)))
