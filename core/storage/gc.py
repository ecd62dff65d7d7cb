"""Blob GC: keep what the fleet may still need, delete the rest once it is old enough.

Policy: every blob of the desired release (all its environments) and of the newest
`keep_previous` other releases is kept (so Rollback to them stays possible); any other blob is
deleted once older than the grace period (a blob an install just fetched is not garbage yet), and
the history is pruned to the kept releases (a manifest goes with the last release holding it).
A patch blob (a binary delta, core/storage/deltas.py) follows its target: it stays while the
wheel it produces stays and goes, without grace, in the pass that deletes that wheel (or in any
pass once the wheel is gone).
`plan_gc` is that policy as a pure function; `BlobGc` does the I/O under the installer lock, on
demand (GcBlobs) and on a schedule.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from core.state import patches, releases
from core.state.db import (
    BLOB_PATCH,
    BlobRecord,
    Database,
    Lockfile,
    Release,
    ReleaseManifest,
    Setting,
    database_proxy,
    upsert,
)
from core.state.locks import Activity, InstallerLock
from core.storage.blobstore import BlobStore
from shared.errors import FailedPrecondition
from shared.manifest import Manifest

log = logging.getLogger(__name__)
STATE_KEY = "blob_gc_state"
HOUR = 3600
MAX_NAP_SECONDS = HOUR  # the schedule re-reads the shared state at least this often
RETRY_SECONDS = 600  # a scheduled pass refused (install running) tries again after this


@dataclass(frozen=True)
class GcPolicy:
    keep_previous: int = 1  # releases kept besides the desired one
    grace_seconds: int = 24 * HOUR
    interval_seconds: int = 24 * HOUR  # 0: no scheduled pass

    def __post_init__(self) -> None:
        if self.keep_previous < 0 or self.grace_seconds < 0 or self.interval_seconds < 0:
            raise ValueError("GC policy values must be >= 0")


@dataclass(frozen=True)
class ReleaseBlobs:
    sequence: int
    lockfiles: tuple[str, ...]  # its manifests, default environment first
    blobs: frozenset[str]  # every blob of every one of them


@dataclass(frozen=True)
class BlobAge:
    sha256: str
    size: int
    created_at: int
    kind: str = "wheel"  # or BLOB_PATCH


@dataclass(frozen=True)
class GcPlan:
    kept_releases: tuple[int, ...]  # desired first, then newest first
    pruned_releases: tuple[int, ...]
    delete: tuple[BlobAge, ...]
    within_grace: tuple[BlobAge, ...]
    kept_lockfiles: tuple[str, ...]  # the manifests of the kept releases, in that order

    @property
    def candidates(self) -> int:
        return len(self.delete) + len(self.within_grace)


def plan_gc(
    desired: int,
    history: Sequence[ReleaseBlobs],
    blobs: Sequence[BlobAge],
    policy: GcPolicy,
    now: int,
    patch_targets: Mapping[str, str] | None = None,
) -> GcPlan:
    """Which releases and blobs stay, which go. Pure: no I/O, no clock. `desired` is the desired
    release's sequence (0: nothing installed yet); `patch_targets` maps each patch blob to the
    wheel it produces (a patch without one is an orphan and goes)."""
    by_sequence = {r.sequence: r for r in history}
    if desired and desired not in by_sequence:
        # Without the desired release we cannot know what to keep: refuse rather than guess.
        raise FailedPrecondition(
            f"the desired release {desired} is missing from the history; blob GC refused"
        )
    newest = sorted(history, key=lambda r: r.sequence, reverse=True)
    previous = [r for r in newest if r.sequence != desired][: policy.keep_previous]
    kept = ([by_sequence[desired]] if desired else []) + previous
    kept_sequences = {r.sequence for r in kept}
    protected = frozenset().union(*(r.blobs for r in kept))
    delete: list[BlobAge] = []
    within_grace: list[BlobAge] = []
    targets = patch_targets or {}
    patch_blobs: list[BlobAge] = []
    for blob in sorted(blobs, key=lambda b: b.sha256):
        if blob.kind == BLOB_PATCH or blob.sha256 in targets:
            patch_blobs.append(blob)
            continue
        if blob.sha256 in protected:
            continue
        if now - blob.created_at >= policy.grace_seconds:
            delete.append(blob)
        else:
            within_grace.append(blob)
    going = {b.sha256 for b in delete}
    patch_shas = {b.sha256 for b in patch_blobs}
    wheels = {b.sha256 for b in blobs if b.sha256 not in patch_shas}
    for blob in patch_blobs:
        target = targets.get(blob.sha256)
        if target is None or target in going or target not in wheels:
            delete.append(blob)  # nothing left to produce: no grace for a patch
    return GcPlan(
        kept_releases=tuple(r.sequence for r in kept),
        pruned_releases=tuple(r.sequence for r in newest if r.sequence not in kept_sequences),
        delete=tuple(delete),
        within_grace=tuple(within_grace),
        kept_lockfiles=tuple(dict.fromkeys(h for r in kept for h in r.lockfiles)),
    )


@dataclass(frozen=True)
class GcRun:
    dry_run: bool
    candidates: int
    deleted: tuple[str, ...]  # on a dry run: what would go
    kept_within_grace: int
    bytes_reclaimed: int
    failed: int
    kept_lockfiles: tuple[str, ...]
    pruned_lockfiles: int
    finished_at: int


@dataclass(frozen=True)
class GcState:
    last_run: GcRun | None
    total_deleted: int = 0
    total_bytes_reclaimed: int = 0


# ---- database side (sync; run through Database.run) ----


def load_inputs() -> tuple[int, list[ReleaseBlobs], list[BlobAge]]:
    manifest_blobs = {
        row.lockfile_hash: frozenset(
            e.sha256 for e in Manifest.from_json(row.manifest_json).entries
        )
        for row in Lockfile.select()
    }
    history = [
        ReleaseBlobs(
            r.sequence,
            r.hashes,
            frozenset().union(*(manifest_blobs.get(h, frozenset()) for h in r.hashes)),
        )
        for r in releases.list_releases()
    ]
    query = BlobRecord.select(
        BlobRecord.sha256, BlobRecord.size, BlobRecord.created_at, BlobRecord.kind
    )
    blobs = [BlobAge(str(r.sha256), int(r.size), int(r.created_at), str(r.kind)) for r in query]
    return releases.desired_sequence(), history, blobs


def load_patch_targets() -> dict[str, str]:
    return patches.patch_targets()


def delete_record(sha256: str) -> None:
    BlobRecord.delete().where(BlobRecord.sha256 == sha256).execute()


def prune_history(sequences: Sequence[int]) -> int:
    """Drop the given releases (never the desired one) and every manifest no release still
    holds; returns how many manifests went."""
    if not sequences:
        return 0
    with database_proxy.atomic():
        # Re-read inside the transaction: the desired release is never pruned, whatever the plan.
        keep = releases.desired_sequence()
        doomed = [s for s in sequences if s != keep]
        if doomed:
            ReleaseManifest.delete().where(ReleaseManifest.sequence.in_(doomed)).execute()
            Release.delete().where(Release.sequence.in_(doomed)).execute()
        held = ReleaseManifest.select(ReleaseManifest.lockfile_hash)
        return int(Lockfile.delete().where(Lockfile.lockfile_hash.not_in(held)).execute())


def load_state() -> GcState:
    row = Setting.get_or_none(Setting.key == STATE_KEY)
    if row is None:
        return GcState(None)
    raw = json.loads(row.value)
    last = raw.get("last_run")
    run = None
    if last is not None:
        last.update(deleted=tuple(last["deleted"]), kept_lockfiles=tuple(last["kept_lockfiles"]))
        run = GcRun(**last)
    return GcState(run, int(raw["total_deleted"]), int(raw["total_bytes_reclaimed"]))


def record_run(run: GcRun) -> GcState:
    with database_proxy.atomic():
        old = load_state()
        state = GcState(
            run,
            old.total_deleted + len(run.deleted),
            old.total_bytes_reclaimed + run.bytes_reclaimed,
        )
        doc = {
            "last_run": dataclasses.asdict(run),  # only the last run's ids, so it stays small
            "total_deleted": state.total_deleted,
            "total_bytes_reclaimed": state.total_bytes_reclaimed,
        }
        upsert(Setting, key=STATE_KEY, value=json.dumps(doc))
    return state


class BlobGc:
    """Runs GC passes under the installer lock; `clock` is injectable for tests."""

    def __init__(
        self,
        db: Database,
        lock: InstallerLock,
        store: BlobStore,
        policy: GcPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._lock = lock
        self._store = store
        self.policy = policy
        self._clock = clock
        self._schedule_started: int | None = None

    async def state(self) -> GcState:
        return await self._db.run(load_state)

    def next_run_at(self, state: GcState) -> int | None:
        if self.policy.interval_seconds <= 0 or self._schedule_started is None:
            return None
        base = state.last_run.finished_at if state.last_run else self._schedule_started
        return base + self.policy.interval_seconds

    async def run(self, dry_run: bool) -> GcRun:
        lease = await self._lock.acquire(Activity.GC)
        try:
            return await self._run_locked(dry_run)
        finally:
            await lease.release()

    async def _run_if_due(self) -> GcRun | None:
        """A scheduled pass: under the lock, and only if no instance ran one since we looked.

        Every instance sharing the state wakes at the same due time; re-reading the state under
        the lock is what makes the deployment run one pass per interval, not one per instance
        (the one that gets the lock second sees the first one's finished_at).
        """
        lease = await self._lock.acquire(Activity.GC)
        try:
            due = self.next_run_at(await self.state())
            if due is not None and due > self._clock():
                return None
            return await self._run_locked(dry_run=False)
        finally:
            await lease.release()

    async def _run_locked(self, dry_run: bool) -> GcRun:
        desired, history, blobs = await self._db.run(load_inputs)
        targets = await self._db.run(load_patch_targets)
        plan = plan_gc(desired, history, blobs, self.policy, int(self._clock()), targets)
        if dry_run:
            return self._report(plan, True, plan.delete, 0, 0)
        deleted: list[BlobAge] = []
        failed = pruned = 0
        try:
            for blob in plan.delete:
                try:
                    # Blob first, index row second: a failure leaves the row, so the next pass
                    # retries instead of forgetting a blob that is still stored.
                    await asyncio.to_thread(self._store.delete, blob.sha256)
                    await self._db.run(delete_record, blob.sha256)
                except Exception as exc:
                    failed += 1
                    log.warning("blob GC: cannot delete %s, continuing: %s", blob.sha256, exc)
                    continue
                deleted.append(blob)
        finally:
            pruned = await self._db.run(prune_history, plan.pruned_releases)
            await self._db.run(patches.prune_rows)  # pairs whose target or patch went
        run = self._report(plan, False, deleted, failed, pruned)
        await self._db.run(record_run, run)
        log.info(
            "blob GC: %d candidates, %d deleted (%d bytes), %d within grace, %d failed,"
            " %d lockfiles pruned; deleted %s",
            run.candidates,
            len(run.deleted),
            run.bytes_reclaimed,
            run.kept_within_grace,
            run.failed,
            run.pruned_lockfiles,
            ", ".join(run.deleted) or "nothing",
        )
        return run

    def _report(
        self, plan: GcPlan, dry_run: bool, gone: Sequence[BlobAge], failed: int, pruned: int
    ) -> GcRun:
        return GcRun(
            dry_run=dry_run,
            candidates=plan.candidates,
            deleted=tuple(b.sha256 for b in gone),
            kept_within_grace=len(plan.within_grace),
            bytes_reclaimed=sum(b.size for b in gone),
            failed=failed,
            kept_lockfiles=plan.kept_lockfiles,
            pruned_lockfiles=pruned,
            finished_at=int(self._clock()),
        )

    async def run_schedule(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Forever: a real pass whenever `interval` has passed since the last one (any instance's,
        as recorded in the shared state). Returns at once when the interval is 0 (off)."""
        if self.policy.interval_seconds <= 0:
            return
        self._schedule_started = int(self._clock())
        while True:
            due = self.next_run_at(await self.state())
            assert due is not None
            wait = due - self._clock()
            if wait > 0:
                await sleep(min(wait, MAX_NAP_SECONDS))
                continue
            try:
                await self._run_if_due()
            except FailedPrecondition as exc:
                log.info("scheduled blob GC postponed: %s", exc.message)
                await sleep(min(RETRY_SECONDS, self.policy.interval_seconds))
            except Exception:
                log.exception("scheduled blob GC failed; retrying later")
                await sleep(min(RETRY_SECONDS, self.policy.interval_seconds))
