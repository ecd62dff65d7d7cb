"""The gRPC plumbing of the core's server: transport security, channel options, reflection.

grpcio-reflection ships only v1alpha; grpcurl and newer tools ask for v1 first, whose messages
are the same, so v1 is served by name too. `registered_methods` lists every method the server
answers, so the metrics interceptor can start each series at zero (core/api/grpc_metrics.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as refl_pb2

from shared.errors import StoreError
from shared.proto.scriptpkgs.v1 import admin_pb2, distribution_pb2

# gRPC's receive limit. Generous on purpose: a request over it gets RESOURCE_EXHAUSTED without a
# word about which field; below it, core/api/request_limits.py refuses anything over 1 MiB (or a
# string over 64 KiB) with INVALID_ARGUMENT naming the field.
MAX_RECEIVE = 16 * 1024 * 1024
SERVICE_NAMES = (
    admin_pb2.DESCRIPTOR.services_by_name["PackageAdmin"].full_name,
    distribution_pb2.DESCRIPTOR.services_by_name["PackageDistribution"].full_name,
)
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE),
    ("grpc.max_send_message_length", 2 * 1024 * 1024),
    # Let agents ping every 10 s while idle so a dead peer is noticed; more is abuse.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.so_reuseport", 0),
]


def server_credentials(
    tls_cert: Path | None, tls_key: Path | None, tls_client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS (mTLS with a client CA) from the PEM files; None for plaintext."""
    if tls_cert is None and tls_key is None:
        if tls_client_ca is not None:
            raise StoreError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if tls_cert is None or tls_key is None:
        raise StoreError("TLS needs both --tls-cert and --tls-key")
    try:
        cert, key = tls_cert.read_bytes(), tls_key.read_bytes()
        client_ca = tls_client_ca.read_bytes() if tls_client_ca else None
    except OSError as exc:
        raise StoreError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def add_reflection(server: grpc.aio.Server) -> None:
    """Reflection v1alpha and v1 for our services and health."""
    names = [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)
    _add_reflection_v1(server, servicer)


def _add_reflection_v1(server: grpc.aio.Server, servicer: Any) -> None:
    handler = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=refl_pb2.ServerReflectionRequest.FromString,
                response_serializer=refl_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


def registered_methods() -> list[tuple[str, str]]:
    """(full method, grpc_type) of every method of our services, health and reflection."""
    kinds = {
        (False, False): "unary",
        (False, True): "server_stream",
        (True, False): "client_stream",
        (True, True): "bidi_stream",
    }
    found = []
    for file in (admin_pb2.DESCRIPTOR, distribution_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for m in service.methods:
                kind = kinds[(m.client_streaming, m.server_streaming)]
                found.append((f"/{service.full_name}/{m.name}", kind))
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        found.append((f"/{name}/ServerReflectionInfo", "bidi_stream"))
    return found
