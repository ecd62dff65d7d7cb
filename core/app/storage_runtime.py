"""Assembles the storage side of the core: backends, the installer lock, GC, migration, rollback.

The server calls `open` early (it validates the active backend before anything is served),
`bind` once the signing key is known, `start_background` once serving, and `stop` on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.api.storage_service import StorageOps
from core.fanout.hub import Hub
from core.install.rollback import rollback
from core.state.db import Database
from core.state.locks import Activity, InstallerLock
from core.storage.backends import (
    INSTANCE_LOCAL,
    StoreRegistry,
    build_registry,
    choose_active_once,
    load_active_name,
    local_backend_refusal,
)
from core.storage.gc import BlobGc, GcPolicy
from core.storage.migration import Migrator
from shared.errors import FailedPrecondition, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageRuntime:
    def __init__(self, db: Database, registry: StoreRegistry, work_dir: Path) -> None:
        self.db = db
        self.registry = registry
        self.lock = InstallerLock(db.db)
        self.migrator = Migrator(db, self.lock, registry, work_dir)
        self._tasks: list[asyncio.Task[None]] = []
        self.gc: BlobGc | None = None

    @classmethod
    async def open(
        cls,
        db: Database,
        data_dir: Path,
        env: Mapping[str, str],
        *,
        shared: bool = False,
        allow_local: bool = False,
    ) -> StorageRuntime:
        """`shared`: the state is in Postgres, so other core instances serve the same fleet and
        an instance-local backend is refused (`allow_local`: the offline migration, which is
        how blobs get off one)."""
        registry = build_registry(data_dir, env, load_active=load_active_name)
        registry.shared = shared
        if shared:
            active = await db.run(choose_active_once, registry.shared_default())
            if active in INSTANCE_LOCAL and not allow_local:
                raise StoreError(local_backend_refusal(active))
        else:
            active = await db.run(load_active_name)
        if active not in registry.names():
            # Writing anywhere else would scatter blobs where other instances cannot see them.
            reason = registry.unavailable.get(active, "not a known backend")
            raise StoreError(
                f"the active storage backend is {active!r}, which is not available here"
                f" ({reason}); configure it, or switch with SetStorageBackend on a core that has it"
            )
        registry.set_active(active)
        return cls(db, registry, data_dir / "work")

    async def when_idle(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` in the database thread under the installer lock; None if someone holds it."""
        try:
            lease = await self.lock.acquire(Activity.RECOVERY)
        except FailedPrecondition:
            return None  # another core instance is busy: its state is not stale
        try:
            return await self.db.run(fn)
        finally:
            await lease.release()

    def bind(self, hub: Hub, key: Ed25519PrivateKey, policy: GcPolicy) -> StorageOps:
        self.gc = BlobGc(self.db, self.lock, self.registry, policy)
        undo = functools.partial(
            rollback, db=self.db, lock=self.lock, store=self.registry, key=key, hub=hub
        )
        return StorageOps(self.db, self.registry, self.migrator, self.gc, undo)

    def start_background(self) -> None:
        assert self.gc is not None
        self._tasks = [
            asyncio.create_task(self.gc.run_schedule(), name="blob-gc-schedule"),
            asyncio.create_task(self.migrator.watch(), name="migration-watch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self.migrator.cancel()
