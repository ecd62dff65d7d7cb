"""The install pipeline: allowlist -> pip resolution -> verified wheels -> signed manifest.

One install at a time. Any failure leaves the previous desired hash and manifest in place, so the
fleet stays on the last good set. Every wheel crosses the network once: pip's own download is the
one that is checked (published sha256, RECORD, no hostile members) and stored; blobs the store
already holds are only recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.fanout.hub import Hub
from core.install.early_checks import EarlyChecks
from core.install.index_client import check_published
from core.install.pip_downloads import HeldWheel, ResolvedWheel
from core.install.pip_resolver import resolve
from core.state import allowlist, lockfiles, settings
from core.state.db import BlobRecord, Database, InstallStateRow, database_proxy, now
from core.state.index_config import RegistrySettings
from core.state.keys import SecretBox
from core.state.locks import Activity, InstallerLock, Lease
from core.storage.blobstore import BlobStore
from shared.errors import FailedPrecondition, SpkError
from shared.manifest import Manifest, ManifestEntry
from shared.tree_content import DEFAULT_CONTENT_POLICY, TreeContentPolicy
from shared.wheels import inspect_wheel

log = logging.getLogger(__name__)
# Wheels checked and stored at once: index page fetches overlap RECORD checks (zlib and hashlib
# release the GIL); more than 4 gained nothing on 2 cores.
VERIFY_CONCURRENCY = 4
# Seconds between progress rows: each is a commit on the one DB thread, and a watcher reading
# "17/31" ten times a second learns nothing more from 31 rows in 80 ms.
PROGRESS_INTERVAL = 0.1
BLOB_ROWS_PER_INSERT = 200  # well under SQLite's bound-variable limit


@dataclass(frozen=True)
class InstallState:
    status: str
    lockfile_hash: str
    attempted_hash: str
    started_at: int
    finished_at: int
    total_bytes: int
    warnings: tuple[str, ...]
    error: str
    phase: str
    wheels_done: int
    wheels_total: int


def _state_from_row(row: InstallStateRow) -> InstallState:
    return InstallState(
        row.status,
        row.lockfile_hash,
        row.attempted_hash,
        row.started_at,
        row.finished_at,
        row.total_bytes,
        tuple(json.loads(row.warnings_json)),
        row.error,
        row.phase,
        row.wheels_done,
        row.wheels_total,
    )


def read_state() -> InstallState:
    return _state_from_row(InstallStateRow.get_by_id(1))


def _update_state(**fields: object) -> InstallState:
    if "warnings" in fields:
        fields["warnings_json"] = json.dumps(list(fields.pop("warnings")))  # type: ignore[call-overload]
    InstallStateRow.update(**fields).where(InstallStateRow._meta.primary_key == 1).execute()
    return read_state()


def recover_stale_install() -> bool:
    """At startup: an install left `installing` by a crashed core is marked failed."""
    row = InstallStateRow.get_by_id(1)
    if row.status != "installing":
        return False
    _update_state(
        status="error",
        finished_at=now(),
        phase="",
        error="the core stopped during this install; the previous desired hash stays."
        " Run InstallNow again.",
    )
    return True


def remove_stale_work(work_dir: Path) -> list[str]:
    """At startup: delete what a killed install left in its work dir (not this process's).

    `resolve-*` is the resolver's scratch, whose netrc holds the registry token in plaintext;
    `dl-*` hold pip's downloads while they are checked. Their `finally` cleanups never ran
    under SIGKILL.
    """
    removed: list[str] = []
    for path in [*work_dir.glob("resolve-*"), *work_dir.glob("dl-*")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def _desired_entries() -> list[ManifestEntry]:
    desired = lockfiles.desired_hash()
    return list(lockfiles.get_manifest(desired).entries) if desired else []


@dataclass
class _Progress:
    done: int = 0
    total: int = 0
    reported_at: float = 0.0


class Installer:
    def __init__(
        self,
        db: Database,
        box: SecretBox,
        signing_key: Ed25519PrivateKey,
        store: BlobStore,
        hub: Hub,
        work_dir: Path,
        lock: InstallerLock | None = None,
        content: TreeContentPolicy = DEFAULT_CONTENT_POLICY,
    ) -> None:
        self._db = db
        # Shared with GC, migration and rollback: one of them at a time (and one core instance).
        self._lock = lock or InstallerLock()
        self._box = box
        self._key = signing_key
        self._store = store
        self._hub = hub
        self._work_dir = work_dir
        self._content = content  # start-up hooks allowed (shared.tree_content)
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def state(self) -> InstallState:
        return await self._db.run(read_state)

    async def start(self) -> InstallState:
        if self.running:
            current = await self.state()
            raise FailedPrecondition(
                f"an install is already running (phase {current.phase or 'starting'},"
                f" started at {current.started_at}); wait for it or watch it with WatchInstall"
            )
        lease = await self._lock.acquire(Activity.INSTALL)
        try:
            state = await self._set(
                status="installing",
                attempted_hash="",
                started_at=now(),
                finished_at=0,
                total_bytes=0,
                warnings=[],
                error="",
                phase="starting",
                wheels_done=0,
                wheels_total=0,
            )
        except BaseException:
            await lease.release()
            raise
        self._task = asyncio.create_task(self._run_holding(lease), name="install")
        return state

    async def _run_holding(self, lease: Lease) -> None:
        try:
            await self._run()
        finally:
            await lease.release()

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    async def cancel(self) -> None:
        """Shutdown: stop a running install; it is recorded as failed, the desired hash stays."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def watch(self) -> AsyncIterator[InstallState]:
        """The current state at once, then every change until the install settles."""
        while True:
            event = self._changed
            state = await self.state()
            yield state
            if state.status != "installing":
                return
            await event.wait()

    async def _set(self, **fields: object) -> InstallState:
        state = await self._db.run(lambda: _update_state(**fields))
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        return state

    async def _run(self) -> None:
        try:
            manifest, warnings = await self._build_manifest()
            published = await self._db.run(self._publish, manifest)
            await self._set(
                status="ready",
                lockfile_hash=published.lockfile_hash,
                attempted_hash=published.lockfile_hash,
                finished_at=now(),
                total_bytes=published.total_size,
                warnings=warnings,
                phase="",
            )
            self._hub.publish(published.lockfile_hash)
            log.info(
                "install ready: %s (%d wheels, %d bytes)",
                published.lockfile_hash,
                len(published.entries),
                published.total_size,
            )
        except asyncio.CancelledError:
            await self._set(
                status="error",
                error="the core stopped during this install; the previous desired hash stays",
                finished_at=now(),
                phase="",
            )
            raise
        except SpkError as exc:
            log.warning("install failed: %s", exc.message)
            await self._set(status="error", error=exc.message, finished_at=now(), phase="")
        except Exception as exc:
            log.exception("install failed unexpectedly")
            await self._set(
                status="error",
                error=f"internal error: {type(exc).__name__}; see the core log",
                finished_at=now(),
                phase="",
            )

    async def _build_manifest(self) -> tuple[Manifest, list[str]]:
        reqs = await self._db.run(allowlist.enabled_requirements)
        config = await self._db.run(settings.load_registry, self._box)
        cap = await self._db.run(settings.load_size_cap)
        environment = config.target or settings.native_environment()
        # An empty allowlist needs no pip run and no scratch dir.
        entries = await self._fetch_set(reqs, config) if reqs else []
        manifest = Manifest.build(entries, environment)
        await self._set(attempted_hash=manifest.lockfile_hash, total_bytes=manifest.total_size)
        warnings, blocked = settings.check_size(manifest.total_size, cap)
        if blocked:
            raise FailedPrecondition(blocked)
        return manifest, warnings

    async def _fetch_set(
        self, reqs: list[tuple[str, str]], config: settings.RegistryConfig
    ) -> list[ManifestEntry]:
        """Resolve and download with pip, check every wheel, store the new ones."""
        await self._set(phase="resolving")
        self._work_dir.mkdir(parents=True, exist_ok=True)
        downloads = Path(tempfile.mkdtemp(prefix="dl-", dir=self._work_dir))
        early = EarlyChecks(downloads / "early", config.settings, self._content)
        try:
            held = await self._held_wheels()
            early.expect(held)
            wheels = await resolve(
                reqs,
                config.settings,
                config.target,
                self._work_dir,
                downloads,
                watch=early.watching,
                held=held,
            )
            await self._set(phase="verifying", wheels_total=len(wheels))
            return await self._store_all(wheels, config.settings, early)
        finally:
            early.close()
            # Synchronous, like the resolver's cleanup: it must also run under cancellation.
            shutil.rmtree(downloads, ignore_errors=True)

    async def _held_wheels(self) -> dict[str, HeldWheel]:
        """The desired set's wheels that the store keeps as local files.

        Offered to pip as already downloaded, so an install that changes one pin fetches one
        wheel.
        """
        entries = await self._db.run(_desired_entries)

        def locate() -> dict[str, HeldWheel]:
            paths = ((e, self._store.local_path(e.sha256)) for e in entries)
            return {e.filename: HeldWheel(e.sha256, p) for e, p in paths if p is not None}

        return await asyncio.to_thread(locate)

    async def _store_all(
        self, wheels: list[ResolvedWheel], registry: RegistrySettings, early: EarlyChecks
    ) -> list[ManifestEntry]:
        limit = asyncio.Semaphore(VERIFY_CONCURRENCY)
        progress = _Progress(total=len(wheels))

        async def one(wheel: ResolvedWheel) -> tuple[ManifestEntry, str]:
            async with limit:
                backend = await self._check_and_store(wheel, registry, early)
            progress.done += 1
            clock = time.monotonic()
            if progress.done == progress.total or clock - progress.reported_at >= PROGRESS_INTERVAL:
                progress.reported_at = clock
                await self._set(wheels_done=progress.done)
            entry = ManifestEntry(
                wheel.name, wheel.version, wheel.filename, wheel.sha256, wheel.size, wheel.requested
            )
            return entry, backend

        # Biggest first: the largest wheel's RECORD check is the longest single step, so it
        # should not start last (the manifest sorts its entries anyway).
        by_size = sorted(wheels, key=lambda w: w.size, reverse=True)
        stored = await asyncio.gather(*(one(w) for w in by_size))
        # Every blob gets its index row, also one the store already held (restored by hand, say):
        # without it GC and migration would not see the blob.
        await self._db.run(self._record_blobs, [(e.sha256, e.size, b) for e, b in stored])
        return [entry for entry, _ in stored]

    async def _check_and_store(
        self, wheel: ResolvedWheel, registry: RegistrySettings, early: EarlyChecks
    ) -> str:
        """Check the wheel unless its early check passed, store it if new; its backend's name."""
        checked = await early.inspected(wheel)  # the same bytes, already inspected
        if not await early.published(wheel):
            await check_published(wheel, registry)
        return await asyncio.to_thread(self._store_checked, wheel, checked)

    def _store_checked(self, wheel: ResolvedWheel, checked: Path | None) -> str:
        """(Worker thread) Store a blob the store lacks; one thread hop for the whole step."""
        if (backend := self._store.locate(wheel.sha256)) is not None:
            return backend
        if checked is None:
            # pip does not check RECORD or refuse symlinks; we do, before anything is published.
            inspect_wheel(wheel.path, filename=wheel.filename, content=self._content)
        self._store.put_file(wheel.sha256, checked or wheel.path)
        return self._store.name

    @staticmethod
    def _record_blobs(blobs: list[tuple[str, int, str]]) -> None:
        fields = [BlobRecord.sha256, BlobRecord.size, BlobRecord.backend]
        with database_proxy.atomic():
            for i in range(0, len(blobs), BLOB_ROWS_PER_INSERT):
                rows = blobs[i : i + BLOB_ROWS_PER_INSERT]
                BlobRecord.insert_many(rows, fields=fields).on_conflict_ignore().execute()

    def _publish(self, manifest: Manifest) -> Manifest:
        """Record and make desired in one transaction; re-installing the desired set is a no-op."""
        with database_proxy.atomic():
            if lockfiles.desired_hash() == manifest.lockfile_hash:
                return lockfiles.get_manifest(manifest.lockfile_hash)
            published = lockfiles.publish(manifest, self._key)
            # `ready` in the same transaction as the new desired hash: a core killed right after
            # this commit must not restart into "installing" (which recovery marks failed with
            # "the previous desired hash stays") while the new hash is in fact desired.
            _update_state(
                status="ready",
                lockfile_hash=published.lockfile_hash,
                attempted_hash=published.lockfile_hash,
                finished_at=now(),
                total_bytes=published.total_size,
                phase="",
            )
            return published
