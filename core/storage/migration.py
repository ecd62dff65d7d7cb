"""Storage migration: move every indexed blob to another backend without ever losing one.

The work set is "blobs whose index row (BlobRecord.backend) is not the target", recomputed on
every (re)start, so a run killed at any point resumes where it stopped. Per blob: copy, read the
target copy back and compare its sha256, and only then flip the row (progress is saved in the same
transaction). The active backend flips in one update at the very end; an error leaves it as it
was. Reads fall back across backends, so satellites keep syncing throughout. The whole run holds
the installer lock: no install, GC or backend switch can interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from core.state.db import BlobRecord, Database, Setting, database_proxy, now, upsert
from core.state.locks import Activity, InstallerLock, Lease
from core.storage.backends import StoreRegistry, save_active_name
from core.storage.blobstore import BlobStore, FilesystemBlobStore
from shared.errors import FailedPrecondition, IntegrityError, NotFound, SpkError, StoreError
from shared.hashing import READ_CHUNK

log = logging.getLogger(__name__)
STATE_KEY = "storage_migration"
WATCH_SECONDS = 30.0  # how often an instance looks for a migration another one left behind


@dataclass(frozen=True)
class MigrationState:
    status: str = "idle"  # idle | migrating | done | error
    target: str = ""
    delete_source: bool = False
    done: int = 0
    total: int = 0
    bytes: int = 0
    error: str = ""
    started_at: int = 0
    finished_at: int = 0
    max_bytes_per_second: int = 0  # 0: unthrottled


@dataclass(frozen=True)
class WorkItem:
    sha256: str
    size: int
    backend: str  # where the index says it is


def work_set(records: Iterable[WorkItem], target: str) -> list[WorkItem]:
    """What is left to move: every indexed blob not recorded on the target (stable order)."""
    return sorted((r for r in records if r.backend != target), key=lambda r: r.sha256)


def throttle_delay(bytes_done: int, elapsed: float, max_bytes_per_second: int) -> float:
    """Seconds to wait so the average rate stays at or below the limit (0: unthrottled)."""
    if max_bytes_per_second <= 0:
        return 0.0
    return max(0.0, bytes_done / max_bytes_per_second - elapsed)


# ---- database side (sync; run through Database.run) ----


def load_state() -> MigrationState:
    row = Setting.get_or_none(Setting.key == STATE_KEY)
    return MigrationState() if row is None else MigrationState(**json.loads(row.value))


def save_state(state: MigrationState) -> None:
    upsert(Setting, key=STATE_KEY, value=json.dumps(dataclasses.asdict(state)))


def load_records() -> list[WorkItem]:
    query = BlobRecord.select(BlobRecord.sha256, BlobRecord.size, BlobRecord.backend)
    return [WorkItem(str(r.sha256), int(r.size), str(r.backend)) for r in query]


def flip_record(sha256: str, state: MigrationState) -> None:
    with database_proxy.atomic():
        BlobRecord.update(backend=state.target).where(BlobRecord.sha256 == sha256).execute()
        save_state(state)


def finish(state: MigrationState) -> None:
    with database_proxy.atomic():
        save_active_name(state.target)
        save_state(state)


def shas_on(backend: str) -> set[str]:
    query = BlobRecord.select(BlobRecord.sha256).where(BlobRecord.backend == backend)
    return {str(r.sha256) for r in query}


class Migrator:
    """Starts, resumes and reports migrations; also switches the active backend (same lock)."""

    def __init__(
        self,
        db: Database,
        lock: InstallerLock,
        registry: StoreRegistry,
        work_dir: Path,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._db = db
        self._lock = lock
        self._registry = registry
        self._work_dir = work_dir
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def state(self) -> MigrationState:
        return await self._db.run(load_state)

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task

    async def cancel(self) -> None:
        """Shutdown: stop copying; the state stays `migrating` and resumes at the next start."""
        if self.running:
            assert self._task is not None
            self._task.cancel()
            await self.wait()

    async def start(
        self, target: str, delete_source: bool, max_bytes_per_second: int = 0
    ) -> MigrationState:
        self._registry.get(target, "target")  # InvalidArgument before anything else
        self._registry.check_shared(target, "target")
        lease = await self._lock.acquire(Activity.MIGRATION)
        state = MigrationState(
            status="migrating",
            target=target,
            delete_source=delete_source,
            started_at=now(),
            max_bytes_per_second=max_bytes_per_second,
        )
        return await self._launch(lease, state)

    async def resume_if_stuck(self) -> bool:
        """A migration left `migrating` (its core died) continues here, if no one else runs it."""
        if self.running or (await self.state()).status != "migrating":
            return False
        try:
            lease = await self._lock.acquire(Activity.MIGRATION)
        except FailedPrecondition:
            return False  # someone holds the lock: that instance runs it (or will look later)
        state = await self.state()  # re-read under the lock
        if state.status != "migrating":
            await lease.release()
            return False
        log.warning("resuming the storage migration to %s (%d done)", state.target, state.done)
        await self._launch(lease, state)
        return True

    async def watch(self) -> None:
        """Forever: resume a migration another core instance left behind."""
        while True:
            await self._sleep(WATCH_SECONDS)
            try:
                await self.resume_if_stuck()
            except Exception:
                log.exception("checking for an unfinished storage migration failed")

    async def switch_backend(self, name: str) -> None:
        """Make `name` the backend new blobs go to (existing blobs stay where they are)."""
        self._registry.get(name)
        self._registry.check_shared(name, "name")
        lease = await self._lock.acquire(Activity.STORAGE_SWITCH)
        try:
            state = await self.state()
            if state.status == "migrating":
                raise FailedPrecondition(
                    f"a storage migration to {state.target} is unfinished"
                    f" ({state.done}/{state.total} blobs); it resumes on its own, see"
                    " GetStorageMigrationState"
                )
            await self._db.run(save_active_name, name)
            self._registry.set_active(name)
        finally:
            await lease.release()

    async def _launch(self, lease: Lease, state: MigrationState) -> MigrationState:
        try:
            self._registry.get(state.target)
            todo = work_set(await self._db.run(load_records), state.target)
            state = dataclasses.replace(state, total=state.done + len(todo), error="")
            await self._db.run(save_state, state)
        except BaseException:
            await lease.release()
            raise
        self._task = asyncio.create_task(self._run(lease, state, todo), name="storage-migration")
        return state

    async def _run(self, lease: Lease, state: MigrationState, todo: list[WorkItem]) -> None:
        try:
            await self._migrate(state, todo)
        except asyncio.CancelledError:
            raise  # shutdown: stays `migrating`, resumed at the next start
        except Exception as exc:
            message = (
                exc.message
                if isinstance(exc, SpkError)
                else f"internal error: {type(exc).__name__}; see the core log"
            )
            if not isinstance(exc, SpkError):
                log.exception("storage migration failed unexpectedly")
            log.error("storage migration to %s stopped: %s", state.target, message)
            current = await self._db.run(load_state)
            failed = dataclasses.replace(current, status="error", error=message, finished_at=now())
            await self._db.run(save_state, failed)
        finally:
            await lease.release()

    async def _migrate(self, state: MigrationState, todo: list[WorkItem]) -> None:
        target = self._registry.get(state.target)
        started, moved = self._clock(), 0
        for item in todo:
            source = await asyncio.to_thread(self._copy_verified, item, target)
            state = dataclasses.replace(state, done=state.done + 1, bytes=state.bytes + item.size)
            await self._db.run(flip_record, item.sha256, state)
            if state.delete_source:
                # Only after the row flipped: a crash in between leaves an extra copy, never none.
                # Only where it was (asking every backend costs a round trip each on S3).
                holders = {item.backend, source} - {target.name}
                await asyncio.to_thread(self._delete_from, item.sha256, holders)
            moved += item.size
            delay = throttle_delay(moved, self._clock() - started, state.max_bytes_per_second)
            if delay > 0:
                await self._sleep(delay)
        if state.delete_source:
            # Copies a crash left between "row flipped" and "source deleted".
            on_target = await self._db.run(shas_on, target.name)
            await asyncio.to_thread(self._sweep_sources, on_target, target.name)
        state = dataclasses.replace(state, status="done", finished_at=now())
        await self._db.run(finish, state)
        self._registry.set_active(state.target)
        elapsed = max(self._clock() - started, 1e-9)
        log.info(
            "storage migration to %s done: %d blobs, %d bytes this run (%.1f MiB/s)",
            state.target,
            len(todo),
            moved,
            moved / elapsed / 2**20,
        )

    # ---- blocking work (runs in a thread) ----

    def _copy_verified(self, item: WorkItem, target: BlobStore) -> str:
        """Copy (put_file skips a copy a run that died before the flip made), verify it, and
        return the backend copied from."""
        source = self._copy(item, target)
        actual = _sha256_of(target, item.sha256)
        if actual != item.sha256:
            with contextlib.suppress(SpkError):
                target.delete(item.sha256)  # so the next attempt copies afresh
            raise IntegrityError(
                f"blob {item.sha256}: the copy on {target.name} reads back with sha256 {actual};"
                f" migration stopped, active backend unchanged. Check the {target.name} backend,"
                " then run MigrateStorage again"
            )
        return source

    def _copy(self, item: WorkItem, target: BlobStore) -> str:
        names = [item.backend, *(n for n in self._registry.names() if n != item.backend)]
        for name in names:
            if name == target.name or name not in self._registry.names():
                continue
            source = self._registry.get(name)
            try:
                src, temporary = self._stage(source, item.sha256)
            except NotFound:
                continue
            try:
                target.put_file(item.sha256, src)
            except IntegrityError as exc:
                raise IntegrityError(
                    f"blob {item.sha256}: the copy on {name} is corrupt ({exc.message});"
                    " restore it (or delete it and re-install), then run MigrateStorage again"
                ) from None
            finally:
                if temporary:
                    src.unlink(missing_ok=True)
            return name
        if target.has(item.sha256):
            return target.name  # only the target has it (copied, source lost): verify and flip
        raise StoreError(
            f"blob {item.sha256} (indexed on {item.backend}) is in no storage backend;"
            " re-install the lockfile that needs it, then run MigrateStorage again"
        )

    def _stage(self, source: BlobStore, sha256: str) -> tuple[Path, bool]:
        """A local file holding the blob: the filesystem store's own file, else a temp copy."""
        if isinstance(source, FilesystemBlobStore):
            path = source.path_for(sha256)
            if not path.is_file():
                raise NotFound(sha256)
            return path, False
        self._work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._work_dir / f"migrate-{sha256}-{os.getpid()}.tmp"
        try:
            with source.open_read(sha256) as reader, tmp.open("wb") as out:
                while chunk := reader.read(READ_CHUNK):
                    out.write(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, True

    def _delete_from(self, sha256: str, backends: Iterable[str]) -> None:
        for name in backends:
            if name not in self._registry.names():
                continue  # indexed on a backend this instance does not have
            try:
                self._registry.get(name).delete(sha256)
            except SpkError as exc:
                log.warning("cannot delete the %s copy of %s: %s", name, sha256, exc)

    def _sweep_sources(self, on_target: set[str], target: str) -> None:
        for name in self._registry.names():
            if name != target:
                for sha in sorted(set(self._registry.get(name).list()) & on_target):
                    self._delete_from(sha, [name])


def _sha256_of(store: BlobStore, sha256: str) -> str:
    h = hashlib.sha256()
    try:
        with store.open_read(sha256) as reader:
            while chunk := reader.read(READ_CHUNK):
                h.update(chunk)
    except NotFound:
        return "(missing)"
    return h.hexdigest()
