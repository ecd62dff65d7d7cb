"""core/storage/gc.py: the keep/delete policy as a pure function, then real passes over real
stores and a real database with an injected clock (no sleeps), and the schedule driven by a
fake clock."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.state.db import BlobRecord, Lockfile
from core.state.locks import Activity, InstallerLock
from core.storage.backends import StoreRegistry
from core.storage.blobstore import FilesystemBlobStore
from core.storage.gc import RETRY_SECONDS, BlobAge, BlobGc, GcPolicy, GcRun, ReleaseBlobs, plan_gc
from shared.errors import FailedPrecondition, StoreError
from tests.storage_env import StorageEnv

H = 3600
DAY = 24 * H
T0 = 1_800_000_000


def rel(seq: int, hashes: str, *blobs: str) -> ReleaseBlobs:
    """A release: its sequence, its manifests (comma-separated names) and all their blobs."""
    return ReleaseBlobs(seq, tuple(hashes.split(",")), frozenset(blobs))


def blob(sha: str, age: int, now: int = T0, size: int = 10) -> BlobAge:
    return BlobAge(sha, size, now - age)


# ---- the policy (pure) ----


def test_plan_keeps_desired_and_newest_previous_and_honours_grace() -> None:
    history = [rel(1, "L1", "a", "s"), rel(2, "L2", "b", "s"), rel(3, "L3,M3", "c", "s")]
    blobs = [
        blob("a", 2 * DAY),
        blob("b", 2 * DAY),
        blob("c", 2 * DAY),
        blob("s", 2 * DAY),
        blob("old-orphan", 2 * DAY),
        blob("young-orphan", H),
        blob("just-at-grace", DAY),
    ]
    plan = plan_gc(3, history, blobs, GcPolicy(keep_previous=1), T0)
    assert plan.kept_releases == (3, 2) and plan.pruned_releases == (1,)
    assert plan.kept_lockfiles == ("L3", "M3", "L2")
    assert [b.sha256 for b in plan.delete] == ["a", "just-at-grace", "old-orphan"]
    assert [b.sha256 for b in plan.within_grace] == ["young-orphan"]
    assert plan.candidates == 4


def test_plan_after_a_rollback_keeps_by_sequence_and_never_the_desired_twice() -> None:
    # A rollback re-publishes release 1 as release 4: 4 desired, 3 the newest other.
    history = [rel(1, "L1", "a"), rel(2, "L2", "b"), rel(3, "L3", "c"), rel(4, "L1", "a")]
    blobs = [blob(x, 2 * DAY) for x in "abc"]
    plan = plan_gc(4, history, blobs, GcPolicy(keep_previous=1), T0)
    assert plan.kept_releases == (4, 3) and plan.kept_lockfiles == ("L1", "L3")
    assert [b.sha256 for b in plan.delete] == ["b"]
    everything = plan_gc(4, history, blobs, GcPolicy(keep_previous=5), T0)
    assert everything.delete == () and everything.pruned_releases == ()
    only_desired = plan_gc(4, history, blobs, GcPolicy(keep_previous=0), T0)
    assert [b.sha256 for b in only_desired.delete] == ["b", "c"]


def test_plan_edge_cases() -> None:
    # Nothing installed yet: nothing is protected except by N, and grace still applies.
    plan = plan_gc(0, [], [blob("x", 2 * DAY), blob("y", 0)], GcPolicy(), T0)
    assert [b.sha256 for b in plan.delete] == ["x"] and plan.kept_releases == ()
    # The desired release is missing: refuse instead of deleting what it may need.
    with pytest.raises(FailedPrecondition, match="missing from the history"):
        plan_gc(9, [rel(1, "L1", "a")], [blob("a", 2 * DAY)], GcPolicy(), T0)
    with pytest.raises(ValueError):
        GcPolicy(keep_previous=-1)


# ---- real passes ----


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if len(self.slept) >= self.max_sleeps:
            raise asyncio.CancelledError

    slept: list[float]
    max_sleeps: int = 1_000


@pytest.fixture
def env(tmp_path: Path) -> Iterator[StorageEnv]:
    e = StorageEnv(tmp_path)
    yield e
    e.close()


async def test_pass_deletes_only_unkept_blobs_past_grace(env: StorageEnv) -> None:
    old, young = T0 - 2 * DAY, T0 - H
    a = env.add_blob(b"only in L1", old)
    s = env.add_blob(b"shared by all", old)
    b = env.add_blob(b"only in L2", old, env.dbstore)  # kept blobs may live on any backend
    c = env.add_blob(b"only in L3", old)
    orphan = env.add_blob(b"from a failed install", old, env.dbstore)
    fresh = env.add_blob(b"fetched an hour ago", young)
    l1, l2, l3 = env.publish([a, s]), env.publish([b, s]), env.publish([c, s])
    clock = Clock(T0)
    gc = BlobGc(env.database, env.lock, env.registry, GcPolicy(keep_previous=1), clock)

    dry = await gc.run(dry_run=True)
    assert dry.dry_run and set(dry.deleted) == {a, orphan} and dry.kept_within_grace == 1
    assert dry.candidates == 3 and dry.bytes_reclaimed == len(b"only in L1") + len(
        b"from a failed install"
    )
    assert all(env.registry.has(x) for x in (a, orphan))
    assert Lockfile.select().count() == 3 and (await gc.state()).last_run is None

    run = await gc.run(dry_run=False)
    assert set(run.deleted) == {a, orphan} and run.failed == 0 and run.pruned_lockfiles == 1
    assert run.kept_lockfiles == (l3, l2)
    assert not env.registry.has(a) and not env.registry.has(orphan)
    for kept in (s, b, c, fresh):
        assert env.registry.has(kept), kept
    assert set(env.indexed()) == {s, b, c, fresh}
    assert {r.lockfile_hash for r in Lockfile.select()} == {l2, l3}
    assert l1 not in {r.lockfile_hash for r in Lockfile.select()}

    clock.now += DAY  # the young orphan has aged past the grace
    again = await gc.run(dry_run=False)
    assert again.deleted == (fresh,) and not env.registry.has(fresh)
    state = await gc.state()
    assert state.last_run == again
    assert state.total_deleted == 3
    assert state.total_bytes_reclaimed == run.bytes_reclaimed + again.bytes_reclaimed


class FlakyDelete(FilesystemBlobStore):
    """A filesystem store whose delete fails for one blob (a disk error we cannot cause)."""

    def __init__(self, root: Path, refuse: set[str]) -> None:
        super().__init__(root)
        self.refuse = refuse

    def delete(self, sha256: str) -> bool:
        if sha256 in self.refuse:
            raise StoreError(f"cannot delete blob {sha256}: Input/output error")
        return super().delete(sha256)


async def test_failing_delete_is_logged_and_the_pass_goes_on(
    env: StorageEnv, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyDelete(env.fs.root, set())
    registry = StoreRegistry([flaky, env.dbstore])
    old = T0 - 2 * DAY
    doomed = [env.add_blob(f"garbage {i}".encode(), old) for i in range(3)]
    flaky.refuse.add(doomed[1])
    keep = env.add_blob(b"kept", old)
    env.publish([doomed[0]], desired=False)
    env.publish([doomed[1]], desired=False)
    current = env.publish([keep])
    gc = BlobGc(env.database, env.lock, registry, GcPolicy(keep_previous=0), Clock(T0))
    run = await gc.run(dry_run=False)
    assert run.failed == 1 and set(run.deleted) == {doomed[0], doomed[2]}
    assert doomed[1] in caplog.text and "continuing" in caplog.text
    assert set(env.indexed()) == {doomed[1], keep}  # its row stays: the next pass retries
    assert [r.lockfile_hash for r in Lockfile.select()] == [current]  # pruned regardless
    flaky.refuse.clear()
    assert (await gc.run(dry_run=False)).deleted == (doomed[1],)


async def test_refused_while_an_install_or_migration_holds_the_lock(env: StorageEnv) -> None:
    gc = BlobGc(env.database, env.lock, env.registry, GcPolicy(), Clock(T0))
    for activity, reason in [
        (Activity.INSTALL, "an install is running"),
        (Activity.MIGRATION, "a storage migration is running"),
    ]:
        lease = await env.lock.acquire(activity)
        with pytest.raises(FailedPrecondition, match=reason):
            await gc.run(dry_run=True)
        await lease.release()
    await gc.run(dry_run=True)  # released: allowed again


async def test_schedule_runs_when_due_and_retries_when_refused(env: StorageEnv) -> None:
    old = env.add_blob(b"stale", T0 - 2 * DAY)
    clock = Clock(T0)
    clock.slept, clock.max_sleeps = [], 4
    policy = GcPolicy(keep_previous=1, grace_seconds=DAY, interval_seconds=2 * H)
    gc = BlobGc(env.database, env.lock, env.registry, policy, clock)
    lease = await env.lock.acquire(Activity.INSTALL)
    original = clock.sleep

    async def sleep(seconds: float) -> None:
        if seconds == RETRY_SECONDS:  # the due pass was refused; the install ends meanwhile
            await lease.release()
        await original(seconds)

    with pytest.raises(asyncio.CancelledError):
        await gc.run_schedule(sleep)
    # 1 h naps until due (2 h); the refused attempt retries after 10 min, runs, then naps again.
    assert clock.slept[:3] == [H, H, RETRY_SECONDS]
    state = await gc.state()
    assert state.last_run is not None and state.last_run.deleted == (old,)
    assert state.last_run.finished_at == T0 + 2 * H + 600
    assert gc.next_run_at(state) == T0 + 4 * H + 600
    assert clock.slept[3] == H  # naps are capped, so another instance's pass is noticed


async def test_schedule_off_returns_at_once(env: StorageEnv) -> None:
    gc = BlobGc(env.database, env.lock, env.registry, GcPolicy(interval_seconds=0), Clock(T0))
    await gc.run_schedule()
    assert gc.next_run_at(await gc.state()) is None


async def test_a_blob_without_an_index_row_is_never_a_candidate(env: StorageEnv) -> None:
    # Only indexed blobs are considered: an unknown file is left alone, never deleted by guess.
    sha = env.add_blob(b"not indexed", T0 - 2 * DAY)
    BlobRecord.delete().execute()
    gc = BlobGc(env.database, env.lock, env.registry, GcPolicy(grace_seconds=0), Clock(T0))
    assert (await gc.run(dry_run=False)).candidates == 0
    assert env.fs.has(sha)


class SharedClock:
    """One fake wall clock for several schedules; the test moves it, sleepers wake when due."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        while self.now < until:
            await asyncio.sleep(0.001)


async def test_instances_sharing_postgres_run_one_scheduled_pass_per_interval(
    tmp_path: Path, postgres_url: str
) -> None:
    # Two core instances (each its own installer lock, i.e. its own Postgres session) run the
    # schedule over one shared state: a pass per interval for the deployment, not per instance.
    env = StorageEnv(tmp_path, postgres_url)
    try:
        clock = SharedClock(T0)
        policy = GcPolicy(keep_previous=1, grace_seconds=DAY, interval_seconds=H)
        passes: list[tuple[str, float]] = []
        running: list[str] = []  # the clock stands still during a pass, however slow Postgres is

        class Counted(BlobGc):
            def __init__(self, name: str) -> None:
                super().__init__(env.database, InstallerLock(env.db), env.registry, policy, clock)
                self.name = name

            async def _run_locked(self, dry_run: bool) -> GcRun:
                passes.append((self.name, clock.now))
                running.append(self.name)
                try:
                    return await super()._run_locked(dry_run)
                finally:
                    running.remove(self.name)

        async def late_sleep(seconds: float) -> None:  # b wakes a minute after a: after a's pass
            await clock.sleep(seconds + 60)

        schedules = [
            asyncio.create_task(Counted("a").run_schedule(clock.sleep)),
            asyncio.create_task(Counted("b").run_schedule(late_sleep)),
        ]
        for _ in range(5 * 60):  # five hours in one-minute steps
            await asyncio.sleep(0.01)
            while running:
                await asyncio.sleep(0.01)
            clock.now += 60
        await asyncio.sleep(0.2)
        for task in schedules:
            task.cancel()
        await asyncio.gather(*schedules, return_exceptions=True)
        times = [when for _, when in passes]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(passes) >= 4 and all(gap >= H for gap in gaps), passes
    finally:
        env.close()
