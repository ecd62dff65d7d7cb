"""The grpc-prometheus interceptor on a real grpc.aio server: every handler kind, and the code each
call really ended with (OK, an abort's code, CANCELLED when the client leaves, UNKNOWN)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from core.api.grpc_metrics import GrpcServerMetrics
from tests.core_process import eventually_async

SERVICE = "test.v1.Echo"


def _identity(data: bytes) -> bytes:
    return data


async def _unary(request: bytes, context: Any) -> bytes:
    if request == b"abort":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused")
    if request == b"boom":
        raise RuntimeError("boom")
    return request


async def _server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(int(request or b"3")):
        yield b"x"
    if request == b"0":
        await asyncio.sleep(30)  # until the client cancels


async def _bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def _write_style(request: bytes, context: Any) -> None:
    await context.write(b"written")  # grpc_health's Watch streams this way


def _handlers() -> grpc.GenericRpcHandler:
    kw = {"request_deserializer": _identity, "response_serializer": _identity}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary, **kw),
            "Stream": grpc.unary_stream_rpc_method_handler(_server_stream, **kw),
            "Bidi": grpc.stream_stream_rpc_method_handler(_bidi, **kw),
            "Write": grpc.unary_stream_rpc_method_handler(_write_style, **kw),
        },
    )


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (and our service)."""
    wanted = {"grpc_service": SERVICE, **labels}
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    )


async def test_codes_and_messages_as_calls_really_end() -> None:
    registry = CollectorRegistry()
    metrics = GrpcServerMetrics(registry)
    server = grpc.aio.server(interceptors=[metrics.interceptor()])
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary: Any = channel.unary_unary(f"/{SERVICE}/Unary")
            assert await unary(b"hi", timeout=10) == b"hi"
            for request, code in ((b"abort", "FAILED_PRECONDITION"), (b"boom", "UNKNOWN")):
                try:
                    await unary(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code().name == code
            stream: Any = channel.unary_stream(f"/{SERVICE}/Stream")
            assert [m async for m in stream(b"3", timeout=10)] == [b"x"] * 3
            call = stream(b"0", timeout=10)  # blocks after no message: cancelled by us
            await asyncio.sleep(0.2)
            call.cancel()
            bidi: Any = channel.stream_stream(f"/{SERVICE}/Bidi")
            assert [m async for m in bidi(iter([b"a", b"b"]), timeout=10)] == [b"a", b"b"]
            write: Any = channel.unary_stream(f"/{SERVICE}/Write")
            assert [m async for m in write(b"", timeout=10)] == [b"written"]
            missing: Any = channel.unary_unary(f"/{SERVICE}/Nope")
            try:
                await missing(b"", timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED

        def handled(method: str, code: str) -> float:
            return _value(registry, "grpc_server_handled_total", grpc_method=method, grpc_code=code)

        await eventually_async(lambda: handled("Stream", "CANCELLED") == 1, timeout=10)
        assert handled("Unary", "OK") == 1
        assert handled("Unary", "FAILED_PRECONDITION") == 1
        assert handled("Unary", "UNKNOWN") == 1
        assert handled("Stream", "OK") == 1
        assert handled("Bidi", "OK") == 1 and handled("Write", "OK") == 1
        kinds = {"Unary": "unary", "Stream": "server_stream", "Bidi": "bidi_stream"}
        for method, kind in kinds.items():
            started = _value(
                registry, "grpc_server_started_total", grpc_method=method, grpc_type=kind
            )
            assert started >= 1, method
        assert _value(registry, "grpc_server_msg_sent_total", grpc_method="Stream") == 3
        assert _value(registry, "grpc_server_msg_received_total", grpc_method="Bidi") == 2
        count = _value(registry, "grpc_server_handling_seconds_count", grpc_method="Unary")
        assert count == 3
        # An unknown method is the client's input: never a label value.
        assert _value(registry, "grpc_server_started_total", grpc_method="Nope") == 0
    finally:
        await server.stop(None)
