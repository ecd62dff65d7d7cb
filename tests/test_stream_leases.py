"""core/fanout/stream_leases.py: every core instance on one Postgres tells a satellite streaming
to another instance from an offline one; a single instance writes nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from core.fanout import stream_leases
from core.fanout.hub import Hub, Subscription
from core.fanout.stream_leases import LEASE_SECONDS, StreamLeases
from core.state import fleet
from core.state.db import Database, SatelliteRow, open_database
from tests.core_process import eventually_async


async def _subscribe(db: Database, hub: Hub, leases: StreamLeases, name: str) -> Subscription:
    """What RefreshScriptPackages does as a stream opens."""
    await db.run(fleet.touch, name, "1.0", "3.11", "linux", "", None, leases.lease())
    return hub.subscribe(name)


def _until(name: str) -> int:
    return int(SatelliteRow.get(SatelliteRow.name == name).stream_until)


async def test_instances_on_one_database_see_each_others_streams(
    tmp_path: Path, postgres_url: str
) -> None:
    db = Database(open_database(tmp_path, postgres_url))
    try:
        for name in ("sat-a", "sat-b"):
            await db.run(fleet.create, name)
        hub_a, hub_b = Hub(), Hub()
        a, b = StreamLeases(db, hub_a, shared=True), StreamLeases(db, hub_b, shared=True)

        sub = await _subscribe(db, hub_a, a, "sat-a")
        assert _until("sat-a") > time.time()
        row = await db.run(SatelliteRow.get, SatelliteRow.name == "sat-a")
        assert a.connected("sat-a", row.stream_until)  # its own hub
        assert b.connected("sat-a", row.stream_until)  # the lease, on the other instance
        assert not b.connected("sat-b", 0)
        # Nobody renews a dead instance's lease: it runs out.
        assert not b.connected("sat-a", row.stream_until, now=time.time() + LEASE_SECONDS + 1)

        # The agent moves to B before A notices its old stream ended: A's release must not
        # drop the lease B holds now.
        sub_b = await _subscribe(db, hub_b, b, "sat-a")
        assert SatelliteRow.get(SatelliteRow.name == "sat-a").stream_owner == b.owner
        hub_a.unsubscribe(sub)
        a.closed("sat-a")
        await a.flush()
        assert _until("sat-a") > time.time()
        assert SatelliteRow.get(SatelliteRow.name == "sat-a").stream_owner == b.owner

        # B's last stream for it closes: released at once, not at the lease's end.
        hub_b.unsubscribe(sub_b)
        b.closed("sat-a")
        await eventually_async(lambda: _until("sat-a") == 0, timeout=10)
        assert not a.connected("sat-a", 0)
    finally:
        db.close()


async def test_renewal_covers_every_stream_the_instance_holds(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_leases, "LEASE_SECONDS", 0.3)  # renewed every 0.1 s here
    db = Database(open_database(tmp_path, postgres_url))
    try:
        names = [f"sat-{i}" for i in range(3)]
        for name in names:
            await db.run(fleet.create, name)
        hub = Hub()
        for name in names[:2]:
            hub.subscribe(name)
        task = asyncio.create_task(StreamLeases(db, hub, shared=True).run())
        await eventually_async(lambda: all(_until(n) > 0 for n in names[:2]), timeout=10)
        task.cancel()
        assert _until(names[2]) == 0  # not held here: never leased
    finally:
        db.close()


async def test_a_single_instance_writes_no_lease(tmp_path: Path) -> None:
    db = Database(open_database(tmp_path))  # SQLite: one instance, its hub is the truth
    try:
        await db.run(fleet.create, "sat-a")
        hub = Hub()
        leases = StreamLeases(db, hub, shared=False)
        await _subscribe(db, hub, leases, "sat-a")
        assert leases.lease() is None and _until("sat-a") == 0
        assert leases.connected("sat-a", 0)
        assert not leases.connected("sat-b", int(time.time()) + 60)  # a stale lease is ignored
    finally:
        db.close()
