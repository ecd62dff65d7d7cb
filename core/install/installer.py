"""The install pipeline: allowlist -> a resolution per environment -> checked wheels -> a release.

One install at a time (the installer lock). Every environment is resolved (one universal uv run
for all of them where it answers, core/install/resolution.py); the wheels of all of them are
deduplicated by sha256, so a pure-Python wheel several environments share is downloaded, checked
and stored once, and a wheel the blob store already holds is not downloaded at all. The release
(one signed manifest per environment under one sequence) is published in one transaction, or
nothing is: any failure leaves the previous release desired everywhere, so the fleet stays on
the last good set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packaging.utils import parse_wheel_filename

from core.fanout.desired import load_desired
from core.fanout.hub import Hub
from core.install.audit import Auditor
from core.install.exports import origin_for
from core.install.install_state import EnvProgress, InstallState, read_state, update_state
from core.install.pylock import LockedWheel
from core.install.resolution import resolve_all
from core.install.wheel_intake import WheelIntake
from core.state import allowlist, environments, releases, settings
from core.state.audits import AuditResult
from core.state.db import BlobRecord, Database, database_proxy, now
from core.state.index_config import RegistrySettings
from core.state.keys import SecretBox
from core.state.locks import Activity, InstallerLock, Lease
from core.state.origins import Origin, record_origins
from core.storage.blobstore import BlobStore
from core.storage.deltas import DeltaService
from shared.environments import Environment, supported_tags
from shared.errors import FailedPrecondition, IntegrityError, SpkError
from shared.logs import fields as log_fields
from shared.manifest import Manifest, ManifestEntry
from shared.tags import native_platform
from shared.tree_content import DEFAULT_CONTENT_POLICY, TreeContentPolicy

log = logging.getLogger(__name__)
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
    # environment -> sha256 -> where it came from (exports name it; not part of the manifest)
    origins: dict[str, dict[str, Origin]] = field(default_factory=dict)


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
        content: TreeContentPolicy = DEFAULT_CONTENT_POLICY,
        auditor: Auditor | None = None,
        deltas: DeltaService | None = None,
    ) -> None:
        self._db = db
        self._auditor = auditor  # the audit policy's gate before publish; audits after it
        self._deltas = deltas  # patches from the previous release, computed after `ready`
        # Shared with GC, migration and rollback: one of them at a time (and one core instance).
        self._lock = lock or InstallerLock()
        self._box = box
        self._key = signing_key
        self._store = store
        self._hub = hub
        self._work_dir = work_dir
        self._uv_cache = work_dir.parent / "uv-cache"
        self._content = content  # start-up hooks allowed (shared.tree_content)
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
            checked = await self._audit_gate(built)
            state = await self._db.run(self._publish, built)
            self._hub.publish(await self._db.run(load_desired))
            event, self._changed = self._changed, asyncio.Event()
            event.set()
            if self._auditor is not None:  # in the background: `ready` never waits for it
                self._auditor.after_publish(state.release_sequence, checked)
            if self._deltas is not None:  # in the background: never delays `ready`
                self._deltas.after_publish(state.release_sequence)
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
        # The environment that failed says "error" already; the others were not published
        # because of it ("built": checked and fine; "cancelled": stopped half-way).
        for p in progress:
            if p.status in ("pending", "resolving", "fetching"):
                p.status = "cancelled"
        await self._set(
            status="error", error=message, finished_at=now(), phase="", environments=progress
        )

    async def _audit_gate(self, built: _Built) -> AuditResult | None:
        """A blocking audit policy refuses the release here, before anything is published."""
        if self._auditor is None or not await self._auditor.enforcing():
            return None
        await self._set(phase="auditing")
        return await self._auditor.check_before_publish(built.manifests, built.order)

    # ---- building ----

    async def _build(self, progress: list[EnvProgress]) -> _Built:
        reqs = await self._db.run(allowlist.enabled_requirements)
        config = await self._db.run(settings.load_registry, self._box)
        cap = await self._db.run(settings.load_size_cap)
        envs = await self._db.run(environments.ensure_default)
        native = native_platform()
        progress[:] = [EnvProgress(e.name, "pending") for e in envs]
        await self._set(phase="resolving", environments=progress)
        locks = await resolve_all(
            reqs,
            config.settings,
            envs,
            native,
            self._work_dir,
            self._uv_cache,
            progress,
            lambda: self._set(environments=progress),
        )
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
            built.origins[env.name] = {w.sha256: origin_for(w, config.settings) for w in wheels}
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
            else:
                p.status = "built"
        default = built.manifests[built.order[0]]
        await self._set(
            attempted_hash=default.lockfile_hash,
            total_bytes=default.total_size,
            environments=progress,
        )
        if blocked:
            raise FailedPrecondition("; ".join(blocked))
        return built

    async def _obtain_all(
        self, wheels: list[LockedWheel], registry: RegistrySettings
    ) -> dict[str, int]:
        """Make every wheel a blob (downloaded and checked unless the store has it); sizes."""
        await self._set(phase="fetching", wheels_total=len(wheels), wheels_done=0)
        counter = _Progress(total=len(wheels))

        async def count() -> None:
            counter.done += 1
            clock = time.monotonic()
            if counter.done == counter.total or clock - counter.reported_at >= PROGRESS_INTERVAL:
                counter.reported_at = clock
                await self._set(wheels_done=counter.done)

        intake = WheelIntake(self._store, self._work_dir, self._content)
        stored = await intake.obtain(wheels, registry, count)
        # Every blob gets its index row, also one the store already held (restored by hand, say):
        # without it GC and migration would not see the blob.
        rows = [(sha, size, backend) for sha, (size, backend) in stored.items()]
        await self._db.run(_record_blobs, rows)
        return {sha: size for sha, (size, _) in stored.items()}

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
            for name, manifest in built.manifests.items():
                record_origins(manifest.lockfile_hash, built.origins.get(name, {}))
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


def _record_blobs(blobs: list[tuple[str, int, str]]) -> None:
    fields = [BlobRecord.sha256, BlobRecord.size, BlobRecord.backend]
    with database_proxy.atomic():
        for i in range(0, len(blobs), BLOB_ROWS_PER_INSERT):
            rows = blobs[i : i + BLOB_ROWS_PER_INSERT]
            BlobRecord.insert_many(rows, fields=fields).on_conflict_ignore().execute()
