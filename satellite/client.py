"""The gRPC adapter behind the agent's CoreConnection (satellite/agent.py), which includes the
sync logic's BlobSource (satellite/sync/ports.py). Transport errors become shared.errors here,
and only here; generated protobuf types never leave this module."""

from __future__ import annotations

import platform
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import grpc

from satellite.sync.ports import DeltaOffer, Desired, SyncReport, SyncStatus
from shared.errors import (
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SpkError,
    Unauthenticated,
    Unavailable,
)
from shared.manifest import Manifest
from shared.proto.scriptpkgs.v1 import distribution_pb2 as pb
from shared.proto.scriptpkgs.v1 import distribution_pb2_grpc
from shared.tags import describe_host
from shared.wire import host_to_pb, manifest_from_pb

AGENT_VERSION = "0.1.0"
MANIFEST_TIMEOUT = 30.0  # seconds, as in the original system
REPORT_TIMEOUT = 10.0
LOCATIONS_PER_CALL = 4096  # the core's limit per GetBlobLocations
DELTAS_PER_CALL = 4096  # the core's limit per GetDeltas (wanted and bases each)
# GetDeltas may wait for the core to compute a patch (its --delta-wait-seconds, 20 s by default).
DELTAS_TIMEOUT = 60.0
BLOB_IDLE_TIMEOUT = 60.0  # a blob stream that stalls longer than this is abandoned and resumed

_STATUS = {
    SyncStatus.SYNCING: pb.SYNC_STATUS_SYNCING,
    SyncStatus.READY: pb.SYNC_STATUS_READY,
    SyncStatus.ERROR: pb.SYNC_STATUS_ERROR,
}


class CoreUnavailable(Unavailable):
    """The core cannot be reached right now; the agent retries with backoff."""


class CoreFailed(SpkError):
    """The core (or a proxy in front of it) failed to answer: a bug or outage there, not ours."""


# Every status code a call can end with, mapped to the error type the agent acts on. The core
# sends these for our own errors (core/api/status.py); the rest come from gRPC itself or from
# something in between (a proxy, a load balancer). INTERNAL and UNKNOWN are the core's bugs or
# a proxy's failure (CoreFailed): the agent retries them like an outage, naming which it was.
_BY_CODE: dict[grpc.StatusCode, type[SpkError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ALREADY_EXISTS: FailedPrecondition,
    grpc.StatusCode.ABORTED: CoreUnavailable,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNIMPLEMENTED: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: CoreUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: CoreUnavailable,
    grpc.StatusCode.CANCELLED: CoreUnavailable,
    grpc.StatusCode.INTERNAL: CoreFailed,
    grpc.StatusCode.UNKNOWN: CoreFailed,
}
_HINTS = {
    grpc.StatusCode.UNIMPLEMENTED: "; the core is older than this agent: upgrade the core",
    grpc.StatusCode.INTERNAL: "; see the core's log",
    grpc.StatusCode.UNKNOWN: "; see the logs of the core and of any proxy in front of it",
}


def translate(exc: grpc.aio.AioRpcError, what: str) -> SpkError:
    """The one place a gRPC status becomes one of our errors on the satellite side."""
    code, detail = exc.code(), exc.details() or ""
    cls = _BY_CODE.get(code, CoreUnavailable)
    hint = _HINTS.get(code, "")
    if cls is InvalidArgument:
        return InvalidArgument(what, f"{detail}{hint}")
    if cls is CoreUnavailable:
        return CoreUnavailable(f"{what}: core unavailable ({code.name}: {detail}){hint}")
    if cls is CoreFailed:
        return CoreFailed(f"{what}: the core failed ({code.name}: {detail}){hint}")
    return cls(f"{what}: {detail}{hint}")


@dataclass(frozen=True)
class ClientConfig:
    target: str  # host:port
    token: str = field(repr=False)
    root_certificates: bytes | None = None  # PEM CA bundle: TLS when set
    client_cert: bytes | None = None  # PEM, for mTLS
    client_key: bytes | None = field(default=None, repr=False)


def channel_options() -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        # Ping every 20 s (the core permits >= 10 s) so a dead core is noticed within ~30 s.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # We do our own jittered backoff; keep gRPC's reconnect quick underneath it.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.enable_retries", 0),
        # One connection per agent even when many agents share a process (the fan-out bench):
        # grpc's global subchannel pool would otherwise put them all on one connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]


class GrpcCoreClient:
    """`async with GrpcCoreClient(config) as client: ...` — one channel, closed on exit."""

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        if config.root_certificates is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=config.root_certificates,
                private_key=config.client_key,
                certificate_chain=config.client_cert,
            )
            self._channel = grpc.aio.secure_channel(config.target, creds, options=channel_options())
        else:
            self._channel = grpc.aio.insecure_channel(config.target, options=channel_options())
        self._stub = distribution_pb2_grpc.PackageDistributionStub(self._channel)
        self._metadata = (("authorization", f"Bearer {config.token}"),)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> GrpcCoreClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def subscribe(self, current_hash: str) -> AsyncIterator[Desired]:
        """What is desired: the first at once, then one per change. Ends or raises on loss.

        The request describes this host (interpreter, abi, supported platform tags) so the core
        can pick the environment that fits it.
        """
        request = pb.SubscribeRequest(
            agent_version=AGENT_VERSION,
            python_version=platform.python_version(),
            platform=f"{sys.implementation.name}-{platform.machine()}-{sys.platform}",
            current_hash=current_hash,
            host=host_to_pb(describe_host()),
        )
        call = self._stub.RefreshScriptPackages(request, metadata=self._metadata)
        try:
            async for refresh in call:
                yield Desired(
                    refresh.lockfile_hash,
                    refresh.environment,
                    refresh.release_sequence,
                    refresh.unserved_reason,
                )
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "refresh stream") from None
        finally:
            call.cancel()

    async def get_manifest(self, lockfile_hash: str) -> Manifest:
        try:
            reply = await self._stub.GetManifest(
                pb.GetManifestRequest(lockfile_hash=lockfile_hash),
                metadata=self._metadata,
                timeout=MANIFEST_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, f"manifest {lockfile_hash[:12]}") from None
        return manifest_from_pb(reply)

    async def download_blob(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        call = self._stub.DownloadBlob(
            pb.DownloadBlobRequest(sha256=sha256, offset=offset), metadata=self._metadata
        )
        try:
            async for chunk in call:
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, f"blob {sha256[:12]}") from None
        finally:
            call.cancel()

    async def report(self, report: SyncReport) -> None:
        try:
            await self._stub.ReportSyncState(
                pb.ReportSyncStateRequest(
                    lockfile_hash=report.lockfile_hash,
                    status=_STATUS[report.status],
                    error=report.error[:4000],
                    blobs_pulled=report.blobs_pulled,
                    bytes_pulled=report.bytes_pulled,
                    duration_ms=report.duration_ms,
                    current_hash=report.current_hash,
                    wheel_bytes=report.wheel_bytes,
                    patches_used=report.patches_used,
                    patch_fallbacks=report.patch_fallbacks,
                ),
                metadata=self._metadata,
                timeout=REPORT_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "sync report") from None

    async def blob_locations(self, sha256s: Sequence[str]) -> dict[str, str]:
        """URLs for blobs the core need not stream; {} from a core that offers none."""
        found: dict[str, str] = {}
        for start in range(0, len(sha256s), LOCATIONS_PER_CALL):
            try:
                reply = await self._stub.GetBlobLocations(
                    pb.GetBlobLocationsRequest(
                        sha256=list(sha256s[start : start + LOCATIONS_PER_CALL])
                    ),
                    metadata=self._metadata,
                    timeout=MANIFEST_TIMEOUT,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return found  # a core older than this call streams everything itself
                raise translate(exc, "blob locations") from None
            found.update({loc.sha256: loc.url for loc in reply.locations if loc.url})
        return found

    async def deltas(
        self, wanted: Sequence[str], bases: Sequence[str], max_wait_ms: int | None = None
    ) -> dict[str, DeltaOffer]:
        """Patches for blobs this satellite lacks; {} from a core older than GetDeltas."""
        found: dict[str, DeltaOffer] = {}
        held = list(bases[:DELTAS_PER_CALL])  # nearest versions first: the tail matters least
        for start in range(0, len(wanted), DELTAS_PER_CALL):
            try:
                reply = await self._stub.GetDeltas(
                    pb.GetDeltasRequest(
                        wanted=list(wanted[start : start + DELTAS_PER_CALL]),
                        bases=held,
                        max_wait_ms=max_wait_ms,
                    ),
                    metadata=self._metadata,
                    timeout=DELTAS_TIMEOUT,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return found  # an older core: whole blobs, as before
                raise translate(exc, "deltas") from None
            for d in reply.deltas:
                found[d.target_sha256] = DeltaOffer(
                    d.target_sha256, d.base_sha256, d.patch_sha256, d.patch_size, d.window_log
                )
        return found

    async def signing_key_pem(self) -> str:
        try:
            reply = await self._stub.GetSigningKey(
                pb.GetSigningKeyRequest(), metadata=self._metadata, timeout=MANIFEST_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "signing key") from None
        return str(reply.public_key_pem)
