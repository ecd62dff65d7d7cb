"""PackageDistribution servicer: the satellite-facing stream, manifests, blobs and reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from core.api.auth import current_identity
from core.api.metrics import CoreMetrics
from core.fanout.hub import Hub
from core.fanout.stream_leases import StreamLeases
from core.state import fleet, lockfiles
from core.state.db import Database, database_proxy
from core.storage.blob_urls import BlobUrls
from core.storage.blobstore import BlobStore
from core.storage.deltas import MAX_PER_REQUEST as MAX_DELTAS_PER_REQUEST
from core.storage.deltas import DeltaService
from shared.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from shared.logs import fields
from shared.names import check_lockfile_hash, check_sha256
from shared.proto.scriptpkgs.v1 import common_pb2, distribution_pb2_grpc
from shared.proto.scriptpkgs.v1 import distribution_pb2 as pb
from shared.signing import key_id, public_key_pem
from shared.wire import host_from_pb, manifest_to_pb

log = logging.getLogger(__name__)
if TYPE_CHECKING:  # the stubs are generic, the runtime class is not
    Ctx = grpc.aio.ServicerContext[Any, Any]

# A client keeps only whole messages, so a dropped link loses the message in flight on every open
# stream: with 1 MiB chunks that was ~750 KB per cut on a throttled link, with 256 KiB ~80 KB
# (docs/reliability.md, fault 2). Loopback throughput (48 MiB blob, best of 5) was no worse:
# 256 KiB 298-428 MiB/s, 1 MiB 249-334 MiB/s on the 2-core test VM. The wire cap stays 1 MiB.
# scripts/bench agrees for the agent's whole pull path (hash, write, fsync; 256 MiB blob, core
# process -> satellite process, one core per size at once, rounds taking turns, median of 8):
# 256 KiB 139 MB/s, 1 MiB 142 MB/s, 64 KiB clearly slower (docs/benchmarks.md, figure 2). The
# transport alone favours 1 MiB (252 vs 184 MB/s, median of 7), but hashing and the disk hide it.
CHUNK_SIZE = 256 * 1024
# Chunks read per thread hop. One hop per chunk capped a stream at ~570 MB/s on the 2-core VM
# (py-spy: the loop waited on each hop between two sends); four per hop gave 1.1-1.6 GB/s for a
# 256 MiB blob, and a typical wheel (< 1 MiB) is now opened, sized and read in a single hop.
READ_AHEAD = 4

_STATUS = {
    pb.SYNC_STATUS_SYNCING: "syncing",
    pb.SYNC_STATUS_READY: "ready",
    pb.SYNC_STATUS_ERROR: "error",
}


@dataclass(frozen=True)
class ClientLimits:
    """Per-satellite caps, so one broken or hostile agent cannot exhaust the core."""

    max_downloads: int = 8  # concurrent DownloadBlob streams per satellite
    max_subscriptions: int = 4  # open RefreshScriptPackages streams per satellite token


class _Counter:
    """Counts open calls per satellite; `enter` refuses past the cap."""

    def __init__(self, cap: int, what: str) -> None:
        self._cap = cap
        self._what = what
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def enter(self, name: str) -> Iterator[None]:
        if self._open.get(name, 0) >= self._cap:
            raise ResourceExhausted(
                f"satellite {name!r} already has {self._cap} open {self._what}; close some first"
            )
        self._open[name] = self._open.get(name, 0) + 1
        try:
            yield
        finally:
            self._open[name] -= 1
            if not self._open[name]:
                del self._open[name]


def _record_reports(batch: list[tuple[str, fleet.SyncReportIn]]) -> None:
    with database_proxy.atomic():  # one commit (one fsync) for the whole batch
        for name, report in batch:
            fleet.record_report(name, report)


class _ReportBatcher:
    """Group commit for sync reports: each caller waits until its report is committed, but
    reports that arrive while a commit runs share the next one.

    A fan-out makes every satellite report SYNCING and READY within seconds; one commit each
    (SQLite synchronous=full: an fsync each, on the single database thread) was measured as
    the core's bottleneck with 200 agents (docs/benchmarks.md, figure 4).
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: list[tuple[str, fleet.SyncReportIn, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, name: str, report: fleet.SyncReportIn) -> None:
        done = asyncio.get_running_loop().create_future()
        self._pending.append((name, report, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="sync-report-commit")
        await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._db.run(_record_reports, [(n, r) for n, r, _ in batch])
            except Exception as exc:
                for *_, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for *_, done in batch:
                    if not done.done():  # a caller that gave up (cancelled) is skipped
                        done.set_result(None)


class DistributionService(distribution_pb2_grpc.PackageDistributionServicer):
    def __init__(
        self,
        db: Database,
        hub: Hub,
        store: BlobStore,
        public_key: Ed25519PublicKey,
        limits: ClientLimits | None = None,
        urls: BlobUrls | None = None,
        deltas: DeltaService | None = None,
        metrics: CoreMetrics | None = None,
        leases: StreamLeases | None = None,
    ) -> None:
        limits = limits or ClientLimits()
        self._leases = leases or StreamLeases(db, hub, shared=False)
        self._deltas = deltas
        self._metrics = metrics
        self._downloads = _Counter(limits.max_downloads, "blob downloads")
        self._subscriptions = _Counter(limits.max_subscriptions, "refresh streams")
        self._db = db
        self._reports = _ReportBatcher(db)
        self._hub = hub
        self._store = store
        self._urls = urls
        self._signing_key = pb.SigningKey(
            public_key_pem=public_key_pem(public_key), key_id=key_id(public_key)
        )

    async def RefreshScriptPackages(
        self, request: pb.SubscribeRequest, context: Ctx
    ) -> AsyncIterator[pb.Refresh]:
        name = current_identity().name
        host = host_from_pb(request.host)
        await self._db.run(
            fleet.touch,
            name,
            request.agent_version,
            request.python_version,
            request.platform,
            request.current_hash,
            host,
            self._leases.lease(),
        )
        with self._subscriptions.enter(name):
            subscription = self._hub.subscribe(name, host)
            log.info("satellite %s subscribed", name, extra=fields(satellite=name))
            if self._metrics is not None:
                self._metrics.subscriptions.inc()
            try:
                async for offer in subscription.values():
                    if offer.unserved:
                        log.warning(
                            "satellite %s is unserved: %s",
                            name,
                            offer.unserved,
                            extra=fields(satellite=name, status="unserved"),
                        )
                    yield pb.Refresh(
                        lockfile_hash=offer.lockfile_hash,
                        environment=offer.environment,
                        release_sequence=offer.sequence,
                        unserved_reason=offer.unserved,
                    )
            finally:
                if self._metrics is not None:
                    self._metrics.subscriptions.dec()
                # Now, not when the inner generator is finalised: the lease check needs it.
                self._hub.unsubscribe(subscription)
                self._leases.closed(name)
                log.info("satellite %s unsubscribed", name, extra=fields(satellite=name))
        if subscription.revoked:
            raise Unauthenticated("satellite token revoked")
        if subscription.closed:
            raise Unavailable("core shutting down; reconnect")

    async def GetManifest(
        self, request: pb.GetManifestRequest, context: Ctx
    ) -> common_pb2.Manifest:
        wanted = check_lockfile_hash(request.lockfile_hash)
        return manifest_to_pb(await self._db.run(lockfiles.get_manifest, wanted))

    async def DownloadBlob(
        self, request: pb.DownloadBlobRequest, context: Ctx
    ) -> AsyncIterator[pb.BlobChunk]:
        with self._downloads.enter(current_identity().name):
            async for chunk in self._stream_blob(request):
                yield chunk

    async def _stream_blob(self, request: pb.DownloadBlobRequest) -> AsyncIterator[pb.BlobChunk]:
        sha = check_sha256(request.sha256)
        offset = request.offset
        metrics = self._metrics
        if metrics is not None:
            metrics.blob_downloads.inc()
            if offset:
                metrics.blob_resumes.inc()
                log.info(
                    "satellite %s resumes blob %s at offset %d",
                    current_identity().name,
                    sha[:12],
                    offset,
                    extra=fields(satellite=current_identity().name, blob=sha, offset=offset),
                )
        # Size, open and the first chunk in one thread hop: most blobs are one chunk, and each
        # hop costs event-loop work that a 200-agent fan-out multiplies (docs/benchmarks.md).
        total, reader, data = await asyncio.to_thread(self._open_blob, sha, offset)
        if reader is None:
            return
        chunk = CHUNK_SIZE
        try:
            while data:
                if metrics is not None:  # once per read-ahead batch, not per chunk
                    metrics.blob_bytes.inc(len(data))
                    metrics.blob_chunks.inc(-(-len(data) // chunk))
                for start in range(0, len(data), chunk):
                    piece = data[start : start + chunk]
                    yield pb.BlobChunk(data=piece, offset=offset, total_size=total)
                    offset += len(piece)
                if offset >= total:
                    break  # no extra hop just to read the end of the file
                data = await asyncio.to_thread(reader.read, chunk * READ_AHEAD)
        finally:
            reader.close()

    def _open_blob(self, sha: str, offset: int) -> tuple[int, BinaryIO | None, bytes]:
        total = self._store.size(sha)
        if total is None:
            raise NotFound(f"no blob {sha} in the store")
        if offset > total:
            raise InvalidArgument("offset", f"must be <= the blob size {total}")
        if offset == total:
            return total, None, b""
        reader = self._store.open_read(sha, offset)
        try:
            return total, reader, reader.read(CHUNK_SIZE * READ_AHEAD)
        except BaseException:
            reader.close()
            raise

    async def ReportSyncState(
        self, request: pb.ReportSyncStateRequest, context: Ctx
    ) -> pb.ReportSyncStateResponse:
        status = _STATUS.get(request.status)
        if status is None:
            raise InvalidArgument("status", "must be SYNCING, READY or ERROR")
        report = fleet.SyncReportIn(
            request.lockfile_hash,
            status,
            request.error,
            request.blobs_pulled,
            request.bytes_pulled,
            request.duration_ms,
            request.current_hash,
            request.wheel_bytes,
            request.patches_used,
        )
        await self._reports.record(current_identity().name, report)
        if self._metrics is not None:
            self._metrics.sync_reports.labels(status).inc()
        return pb.ReportSyncStateResponse()

    async def GetSigningKey(self, request: pb.GetSigningKeyRequest, context: Ctx) -> pb.SigningKey:
        return self._signing_key

    async def GetBlobLocations(
        self, request: pb.GetBlobLocationsRequest, context: Ctx
    ) -> pb.GetBlobLocationsResponse:
        if self._urls is None or not self._urls.policy.enabled:
            return pb.GetBlobLocationsResponse()
        found = await self._db.run(self._urls.locate, list(request.sha256))
        if self._metrics is not None:
            self._metrics.blob_locations.inc(len(found))
        return pb.GetBlobLocationsResponse(
            locations=[
                pb.BlobLocation(sha256=loc.sha256, url=loc.url, expires_at_unix=loc.expires_at)
                for loc in found
            ]
        )

    async def GetDeltas(self, request: pb.GetDeltasRequest, context: Ctx) -> pb.GetDeltasResponse:
        for field, values in (("wanted", request.wanted), ("bases", request.bases)):
            if len(values) > MAX_DELTAS_PER_REQUEST:
                raise InvalidArgument(field, f"at most {MAX_DELTAS_PER_REQUEST} sha256s")
        wanted = [check_sha256(s) for s in request.wanted]
        bases = [check_sha256(s) for s in request.bases]
        if self._deltas is None:
            return pb.GetDeltasResponse()
        # The satellite's bound (its link's time for the whole wheels); the core's caps it.
        wait = request.max_wait_ms / 1000 if request.HasField("max_wait_ms") else None
        offers = await self._deltas.offers(wanted, bases, wait)
        if self._metrics is not None and offers:
            self._metrics.delta_offers.inc(len(offers))
            saved = sum(max(0, o.target_size - o.patch_size) for o in offers)
            self._metrics.delta_offered_saving.inc(saved)
        return pb.GetDeltasResponse(
            deltas=[
                pb.Delta(
                    target_sha256=o.target_sha256,
                    base_sha256=o.base_sha256,
                    patch_sha256=o.patch_sha256,
                    patch_size=o.patch_size,
                    window_log=o.window_log,
                )
                for o in offers
            ]
        )
