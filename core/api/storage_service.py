"""PackageAdmin's storage and blob GC methods: thin translation, mixed into AdminService.

Domain errors propagate to the auth interceptor, which maps them to status codes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.state.db import Database
from core.state.releases import ReleaseView
from core.storage.backends import StoreRegistry, backend_stats, load_active_name
from core.storage.gc import BlobGc, GcRun
from core.storage.migration import MigrationState, Migrator
from shared.proto.scriptpkgs.v1 import admin_pb2 as pb


@dataclass(frozen=True)
class StorageOps:
    """What the storage, GC and rollback RPCs act on (assembled by the server)."""

    db: Database
    registry: StoreRegistry
    migrator: Migrator
    gc: BlobGc
    rollback: Callable[..., Awaitable[ReleaseView]]  # (lockfile_hash, sequence=...)


def _migration_pb(s: MigrationState) -> pb.StorageMigrationState:
    return pb.StorageMigrationState(
        status=s.status,
        target=s.target,
        done=s.done,
        total=s.total,
        bytes=s.bytes,
        error=s.error,
        delete_source=s.delete_source,
        started_at_unix=s.started_at,
        finished_at_unix=s.finished_at,
        max_bytes_per_second=s.max_bytes_per_second,
    )


def _gc_run_pb(r: GcRun) -> pb.BlobGcRun:
    return pb.BlobGcRun(
        dry_run=r.dry_run,
        candidates=r.candidates,
        deleted=len(r.deleted),
        kept_within_grace=r.kept_within_grace,
        bytes_reclaimed=r.bytes_reclaimed,
        deleted_sha256=list(r.deleted),
        finished_at_unix=r.finished_at,
        failed=r.failed,
        kept_lockfiles=list(r.kept_lockfiles),
        pruned_lockfiles=r.pruned_lockfiles,
    )


class StorageAdminMixin:
    _ops: StorageOps

    async def _backends(self) -> list[pb.StorageBackend]:
        stats = await self._ops.db.run(backend_stats)
        # From the database, not this instance's cache: another core may have switched it.
        active = await self._ops.db.run(load_active_name)
        return [
            pb.StorageBackend(
                name=name,
                active=name == active,
                blob_count=stats.get(name, (0, 0))[0],
                bytes=stats.get(name, (0, 0))[1],
            )
            for name in self._ops.registry.names()
        ]

    async def ListStorageBackends(
        self, request: pb.ListStorageBackendsRequest, context: object
    ) -> pb.ListStorageBackendsResponse:
        return pb.ListStorageBackendsResponse(backends=await self._backends())

    async def GetStorageBackend(
        self, request: pb.GetStorageBackendRequest, context: object
    ) -> pb.StorageBackend:
        return next(b for b in await self._backends() if b.active)

    async def SetStorageBackend(
        self, request: pb.SetStorageBackendRequest, context: object
    ) -> pb.StorageBackend:
        await self._ops.migrator.switch_backend(request.name)
        return next(b for b in await self._backends() if b.active)

    async def MigrateStorage(
        self, request: pb.MigrateStorageRequest, context: object
    ) -> pb.StorageMigrationState:
        state = await self._ops.migrator.start(
            request.target, request.delete_source, request.max_bytes_per_second
        )
        return _migration_pb(state)

    async def GetStorageMigrationState(
        self, request: pb.GetStorageMigrationStateRequest, context: object
    ) -> pb.StorageMigrationState:
        return _migration_pb(await self._ops.migrator.state())

    async def GcBlobs(self, request: pb.GcBlobsRequest, context: object) -> pb.BlobGcRun:
        return _gc_run_pb(await self._ops.gc.run(dry_run=request.dry_run))

    async def GetBlobGcState(
        self, request: pb.GetBlobGcStateRequest, context: object
    ) -> pb.BlobGcState:
        gc = self._ops.gc
        state = await gc.state()
        return pb.BlobGcState(
            last_run=_gc_run_pb(state.last_run) if state.last_run else None,
            total_deleted=state.total_deleted,
            total_bytes_reclaimed=state.total_bytes_reclaimed,
            keep_previous=gc.policy.keep_previous,
            grace_seconds=gc.policy.grace_seconds,
            interval_seconds=gc.policy.interval_seconds,
            next_run_unix=gc.next_run_at(state) or 0,
        )
