"""The install pipeline: allowlist -> a resolution per environment -> checked wheels -> a release.

One install at a time (the installer lock). Every environment is resolved concurrently (one uv
run each); the wheels of all of them are deduplicated by sha256, so a pure-Python wheel several
environments share is downloaded, checked and stored once, and a wheel the blob store already
holds is not downloaded at all. The release (one signed manifest per environment under one
sequence) is published in one transaction, or nothing is: any failure leaves the previous
release desired everywhere, so the fleet stays on the last good set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packaging.utils import parse_wheel_filename

from core.fanout.desired import load_desired
from core.fanout.hub import Hub
from core.install.diagnosis import resolve_or_explain
from core.install.fetch import FetchedWheel, Fetcher
from core.install.install_state import EnvProgress, InstallState, read_state, update_state
from core.install.uv_resolver import LockedWheel, clean_pins
from core.state import allowlist, environments, releases, settings
from core.state.db import BlobRecord, Database, database_proxy, now
from core.state.index_config import RegistrySettings
from core.state.keys import SecretBox
from core.state.locks import Activity, InstallerLock, Lease
from core.storage.blobstore import BlobStore
from shared.environments import Environment, supported_tags
from shared.errors import FailedPrecondition, IntegrityError, SpkError
from shared.logs import fields as log_fields
from shared.manifest import Manifest, ManifestEntry
from shared.tags import native_platform
from shared.wheels import check_identity, inspect_wheel

log = logging.getLogger(__name__)
FETCH_CONCURRENCY = 8  # downloads in flight: the index is the limit, not our CPU
# Wheels checked at once: zlib and hashlib release the GIL, so two threads use both cores;
# more only queue behind them.
CHECK_CONCURRENCY = 2
# Seconds between progress rows: each is a commit on the one DB thread, and a watcher reading
# "17/31" ten times a second learns nothing more from 31 rows in 80 ms.
PROGRESS_INTERVAL = 0.1
BLOB_ROWS_PER_INSERT = 200  # well under SQLite's bound-variable limit

__all__ = ["InstallState", "Installer", "read_state"]


@dataclass
class _Progress:
    done: int = 0
    total: int = 0
    reported_at: float = 0.0


@dataclass(frozen=True)
class _Built:
    """What an install produced, before it is published."""

    order: list[str]  # environment names, the default first
    manifests: dict[str, Manifest]
    warnings: dict[str, list[str]]


class InstallObserver(Protocol):
    """Told when an install starts and how it ended (core/api/metrics.py counts them)."""

    def install_started(self) -> None: ...
    def install_settled(self, result: str, seconds: float) -> None:
        """`result` is ready or error; `seconds` the install's wall time."""
        ...


def check_fits(env: Environment, native: str, wheels: Sequence[LockedWheel]) -> None:
    """Defence in depth: every wheel chosen for `env` must carry a tag `env` runs."""
    accepted = supported_tags(env, native)
    wrong = [w.filename for w in wheels if accepted.isdisjoint(parse_wheel_filename(w.filename)[3])]
    if wrong:
        raise IntegrityError(
            f"environment {env.name}: the resolver chose {', '.join(wrong)}, which"
            f" {env.describe(native)} cannot run; refusing the install"
        )


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
    ) -> None:
        self._db = db
        # Shared with GC, migration and rollback: one of them at a time (and one core instance).
        self._lock = lock or InstallerLock()
        self._box = box
        self._key = signing_key
        self._store = store
        self._hub = hub
        self._work_dir = work_dir
        self._uv_cache = work_dir.parent / "uv-cache"
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.observer: InstallObserver | None = None
        self._phase = ""  # the last phase logged

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
                environments=[],
            )
        except BaseException:
            await lease.release()
            raise
        self._task = asyncio.create_task(self._run_holding(lease), name="install")
        return state

    async def _run_holding(self, lease: Lease) -> None:
        began = time.monotonic()
        result = "error"
        if self.observer is not None:
            self.observer.install_started()
        try:
            result = await self._run()
        finally:
            await lease.release()
            if self.observer is not None:
                self.observer.install_settled(result, time.monotonic() - began)

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    async def cancel(self) -> None:
        """Shutdown: stop a running install; it is recorded as failed, the release stays."""
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
        state = await self._db.run(lambda: update_state(**fields))
        phase = fields.get("phase")
        if isinstance(phase, str) and phase and phase != self._phase:
            log.info("install phase %s", phase, extra=log_fields(phase=phase, status="installing"))
        if isinstance(phase, str):
            self._phase = phase
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        return state

    async def _run(self) -> str:
        """Runs the install to its end; "ready" or "error" (recorded in the install state)."""
        progress: list[EnvProgress] = []
        try:
            built = await self._build(progress)
            state = await self._db.run(self._publish, built)
            self._hub.publish(await self._db.run(load_desired))
            event, self._changed = self._changed, asyncio.Event()
            event.set()
            log.info(
                "install ready: release %d, %s",
                state.release_sequence,
                ", ".join(
                    f"{e.name} {e.lockfile_hash[:12]} ({e.wheels} wheels)"
                    for e in state.environments
                ),
                extra=log_fields(
                    sequence=state.release_sequence,
                    lockfile_hash=state.lockfile_hash,
                    status="ready",
                ),
            )
            return "ready"
        except asyncio.CancelledError:
            await self._fail(
                progress, "the core stopped during this install; the previous release stays"
            )
            raise
        except SpkError as exc:
            log.warning("install failed: %s", exc.message, extra=log_fields(status="error"))
            await self._fail(progress, exc.message)
        except Exception as exc:
            log.exception("install failed unexpectedly", extra=log_fields(status="error"))
            await self._fail(progress, f"internal error: {type(exc).__name__}; see the core log")
        return "error"

    async def _fail(self, progress: list[EnvProgress], message: str) -> None:
        for p in progress:
            if p.status != "ready":
                p.status, p.error = "error", p.error or message
        await self._set(
            status="error", error=message, finished_at=now(), phase="", environments=progress
        )

    # ---- building ----

    async def _build(self, progress: list[EnvProgress]) -> _Built:
        reqs = await self._db.run(allowlist.enabled_requirements)
        config = await self._db.run(settings.load_registry, self._box)
        cap = await self._db.run(settings.load_size_cap)
        envs = await self._db.run(environments.ensure_default)
        native = native_platform()
        progress[:] = [EnvProgress(e.name, "pending") for e in envs]
        await self._set(phase="resolving", environments=progress)
        locks = await self._resolve_all(reqs, config.settings, envs, native, progress)
        for env, wheels in zip(envs, locks, strict=True):
            check_fits(env, native, wheels)
        unique = {w.sha256: w for wheels in locks for w in wheels}
        sizes = await self._obtain_all(list(unique.values()), config.settings)
        built = _Built([e.name for e in envs], {}, {})
        blocked: list[str] = []
        for env, wheels, p in zip(envs, locks, progress, strict=True):
            entries = [
                ManifestEntry(w.name, w.version, w.filename, w.sha256, sizes[w.sha256], w.requested)
                for w in wheels
            ]
            manifest = Manifest.build(entries, env.target)
            warnings, block = settings.check_size(manifest.total_size, cap)
            built.manifests[env.name] = manifest
            built.warnings[env.name] = [f"environment {env.name}: {w}" for w in warnings]
            p.lockfile_hash, p.wheels, p.total_bytes = (
                manifest.lockfile_hash,
                len(entries),
                manifest.total_size,
            )
            p.warnings = built.warnings[env.name]
            if block:
                p.status, p.error = "error", block
                blocked.append(f"environment {env.name}: {block}")
        default = built.manifests[built.order[0]]
        await self._set(
            attempted_hash=default.lockfile_hash,
            total_bytes=default.total_size,
            environments=progress,
        )
        if blocked:
            raise FailedPrecondition("; ".join(blocked))
        return built

    async def _resolve_all(
        self,
        reqs: list[tuple[str, str]],
        registry: RegistrySettings,
        envs: list[Environment],
        native: str,
        progress: list[EnvProgress],
    ) -> list[list[LockedWheel]]:
        """Every environment at once; the first failure (in list order) fails the install."""
        if not reqs:  # an empty allowlist needs no resolver and no scratch dir
            clean_pins(reqs)
            return [[] for _ in envs]

        async def one(env: Environment, p: EnvProgress) -> list[LockedWheel]:
            p.status = "resolving"
            wheels = await resolve_or_explain(
                reqs, registry, env, native, self._work_dir, cache_dir=self._uv_cache
            )
            p.status = "fetching"
            return wheels

        tasks = [asyncio.create_task(one(e, p)) for e, p in zip(envs, progress, strict=True)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for p, result in zip(progress, results, strict=True):
            if isinstance(result, SpkError):
                p.status, p.error = "error", result.message
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        return [r for r in results if isinstance(r, list)]

    async def _obtain_all(
        self, wheels: list[LockedWheel], registry: RegistrySettings
    ) -> dict[str, int]:
        """Make every wheel a blob (downloaded and checked unless the store has it); sizes."""
        await self._set(phase="fetching", wheels_total=len(wheels), wheels_done=0)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        downloads = Path(tempfile.mkdtemp(prefix="dl-", dir=self._work_dir))
        fetches = asyncio.Semaphore(FETCH_CONCURRENCY)
        checks = asyncio.Semaphore(CHECK_CONCURRENCY)
        counter = _Progress(total=len(wheels))
        stored: dict[str, tuple[int, str]] = {}
        try:
            with Fetcher(registry, downloads, FETCH_CONCURRENCY) as fetcher:

                async def one(wheel: LockedWheel) -> None:
                    held = await asyncio.to_thread(self._held, wheel.sha256)
                    if held is None:
                        async with fetches:
                            fetched = await asyncio.to_thread(fetcher.fetch, wheel)
                        async with checks:
                            held = await asyncio.to_thread(self._check_and_store, fetched)
                    stored[wheel.sha256] = held
                    await self._count(counter)

                # Biggest first: the largest wheel's download and check are the longest single
                # steps, so they should not start last.
                ordered = sorted(wheels, key=lambda w: w.size or 0, reverse=True)
                await _gather_all(one(w) for w in ordered)
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, downloads, True))
        # Every blob gets its index row, also one the store already held (restored by hand, say):
        # without it GC and migration would not see the blob.
        rows = [(sha, size, backend) for sha, (size, backend) in stored.items()]
        await self._db.run(_record_blobs, rows)
        return {sha: size for sha, (size, _) in stored.items()}

    async def _count(self, counter: _Progress) -> None:
        counter.done += 1
        clock = time.monotonic()
        if counter.done == counter.total or clock - counter.reported_at >= PROGRESS_INTERVAL:
            counter.reported_at = clock
            await self._set(wheels_done=counter.done)

    def _held(self, sha256: str) -> tuple[int, str] | None:
        """(Worker thread) (size, backend) of a blob the store already has."""
        backend = self._store.locate(sha256)
        if backend is None:
            return None
        size = self._store.size(sha256)
        return (size, backend) if size is not None else None

    def _check_and_store(self, fetched: FetchedWheel) -> tuple[int, str]:
        """(Worker thread) Check a downloaded wheel completely, then store it; (size, backend)."""
        wheel = fetched.wheel
        # The index's sha256 was checked while downloading. pip checks no more than that; we
        # check the archive, RECORD, METADATA against the file name, and the name against the
        # resolution: an index must not serve one project or release in place of another.
        info = inspect_wheel(fetched.path, filename=wheel.filename)
        check_identity(info, wheel.name, wheel.version)
        self._store.put_file(wheel.sha256, fetched.path)
        return fetched.size, self._store.name

    # ---- publishing ----

    def _publish(self, built: _Built) -> InstallState:
        """Record the release and make it desired in one transaction; a repeat is a no-op."""
        hashes = {name: m.lockfile_hash for name, m in built.manifests.items()}
        with database_proxy.atomic():
            if releases.same_as_desired(hashes):
                release = releases.desired_release()
                assert release is not None
            else:
                release, _ = releases.publish_release(built.manifests, self._key, built.order)
            default = built.manifests[built.order[0]]
            progress = [
                EnvProgress(
                    name,
                    "ready",
                    m.lockfile_hash,
                    len(m.entries),
                    m.total_size,
                    warnings=built.warnings[name],
                )
                for name, m in ((n, built.manifests[n]) for n in built.order)
            ]
            # `ready` in the same transaction as the new desired release: a core killed right
            # after this commit must not restart into "installing" (which recovery marks
            # failed with "the previous release stays") while the new one is in fact desired.
            return update_state(
                status="ready",
                lockfile_hash=default.lockfile_hash,
                attempted_hash=default.lockfile_hash,
                finished_at=now(),
                total_bytes=default.total_size,
                warnings=[w for name in built.order for w in built.warnings[name]],
                phase="",
                environments=progress,
                desired_sequence=release.sequence,
            )


async def _gather_all(coros: object) -> None:
    """Run every coroutine to its end; then raise the first failure (none is cancelled midway,
    so no worker thread keeps running unobserved)."""
    results = await asyncio.gather(*coros, return_exceptions=True)  # type: ignore[misc]
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _record_blobs(blobs: list[tuple[str, int, str]]) -> None:
    fields = [BlobRecord.sha256, BlobRecord.size, BlobRecord.backend]
    with database_proxy.atomic():
        for i in range(0, len(blobs), BLOB_ROWS_PER_INSERT):
            rows = blobs[i : i + BLOB_ROWS_PER_INSERT]
            BlobRecord.insert_many(rows, fields=fields).on_conflict_ignore().execute()
