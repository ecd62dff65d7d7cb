"""What the gRPC metrics interceptor costs: unary calls and a 256 KiB-chunk stream on a real
grpc.aio server on loopback, with and without core.api.grpc_metrics (docs/operations.md, Cost).

    .venv/bin/python scripts/bench_metrics.py [--calls 3000] [--chunks 2048] [--rounds 5]

Rounds alternate between the two servers; the median of each is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.api.grpc_metrics import GrpcServerMetrics

SERVICE = "bench.v1.Echo"
CHUNK = b"\0" * (256 * 1024)


def _identity(data: bytes) -> bytes:
    return data


async def _unary(request: bytes, context: Any) -> bytes:
    return request


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(int(request)):
        yield CHUNK


async def _server(with_metrics: bool) -> tuple[grpc.aio.Server, int]:
    interceptors = [GrpcServerMetrics(CollectorRegistry()).interceptor()] if with_metrics else []
    server = grpc.aio.server(interceptors=interceptors)
    kw: dict[str, Any] = {"request_deserializer": _identity, "response_serializer": _identity}
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(_unary, **kw),
                    "Stream": grpc.unary_stream_rpc_method_handler(_stream, **kw),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _round(port: int, calls: int, chunks: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary: Any = channel.unary_unary(f"/{SERVICE}/Unary")
        stream: Any = channel.unary_stream(f"/{SERVICE}/Stream")
        await unary(b"warm")
        began = time.perf_counter()
        for _ in range(calls):
            await unary(b"x")
        per_call_us = (time.perf_counter() - began) / calls * 1e6
        began = time.perf_counter()
        received = 0
        async for chunk in stream(str(chunks).encode()):
            received += len(chunk)
        mb_s = received / (time.perf_counter() - began) / 1e6
    return per_call_us, mb_s


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--chunks", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    servers = {name: await _server(name == "metrics") for name in ("plain", "metrics")}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    for _ in range(args.rounds):
        for name, (_, port) in servers.items():
            results[name].append(await _round(port, args.calls, args.chunks))
    for name, rows in results.items():
        us = statistics.median(r[0] for r in rows)
        mbs = statistics.median(r[1] for r in rows)
        print(f"{name:8} unary {us:7.1f} us/call   stream {mbs:7.1f} MB/s (256 KiB chunks)")
    for server, _ in servers.values():
        await server.stop(None)


if __name__ == "__main__":
    asyncio.run(main())
