"""core/state/locks.py: one of install / GC / migration / rollback at a time, in a process and (with
Postgres) across core instances, each refusal naming what runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.state.db import open_database
from core.state.locks import Activity, InstallerLock
from shared.errors import FailedPrecondition


async def test_in_process_lock_names_the_holder_and_releases_once() -> None:
    lock = InstallerLock(settle_seconds=0.05)
    lease = await lock.acquire(Activity.INSTALL)
    assert lock.holder is Activity.INSTALL
    for other in Activity:
        with pytest.raises(FailedPrecondition, match="an install is running"):
            await lock.acquire(other)
    await lease.release()
    await lease.release()  # idempotent: must not free a later holder's claim
    second = await lock.acquire(Activity.MIGRATION)
    await lease.release()
    assert lock.holder == second.activity == Activity.MIGRATION
    await second.release()
    assert lock.holder is None


async def test_postgres_advisory_lock_excludes_another_instance(
    tmp_path: Path, postgres_url: str
) -> None:
    db = open_database(tmp_path, postgres_url)
    try:
        # Two cores on the same database: two lock objects, two sessions.
        core_a, core_b = InstallerLock(db, 0.05), InstallerLock(db, 0.05)
        lease = await core_a.acquire(Activity.MIGRATION)
        with pytest.raises(FailedPrecondition, match="another core instance is running a storage"):
            await core_b.acquire(Activity.INSTALL)
        assert core_b.holder is None  # a refused attempt leaves no claim behind
        await lease.release()  # closing the session frees it, as a crash would
        lease_b = await core_b.acquire(Activity.INSTALL)
        with pytest.raises(FailedPrecondition, match="another core instance is installing"):
            await core_a.acquire(Activity.GC)
        await lease_b.release()
    finally:
        db.close()


async def test_a_holder_letting_go_within_the_settle_time_is_waited_for() -> None:
    """An install's `ready` is visible a moment before its lease goes: a migration started on
    seeing it must get the lock, not "an install is running"."""
    lock = InstallerLock(settle_seconds=5.0)
    lease = await lock.acquire(Activity.INSTALL)
    asyncio.get_running_loop().call_later(0.1, lambda: asyncio.ensure_future(lease.release()))
    second = await lock.acquire(Activity.MIGRATION)
    assert lock.holder is Activity.MIGRATION
    await second.release()


async def test_another_instance_letting_go_within_the_settle_time_is_waited_for(
    tmp_path: Path, postgres_url: str
) -> None:
    db = open_database(tmp_path, postgres_url)
    try:
        core_a, core_b = InstallerLock(db), InstallerLock(db, settle_seconds=5.0)
        lease = await core_a.acquire(Activity.INSTALL)
        asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(lease.release()))
        second = await core_b.acquire(Activity.MIGRATION)
        assert core_b.holder is Activity.MIGRATION
        await second.release()
    finally:
        db.close()
