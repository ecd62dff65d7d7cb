"""Who holds a refresh stream, seen from every core instance.

One instance knows its own subscribers (the hub); behind a load balancer an admin's call lands
on any instance, which would show every satellite streaming to another one as offline. With
shared state (Postgres) each instance therefore leases the streams it holds. It writes a lease
when a stream opens (in the subscribe's own row update, fleet.touch), renews all of its leases
every LEASE_SECONDS / 3, and drops one when its last stream for that satellite closes (unless
another instance took the lease meanwhile). An instance that dies leaves leases that run out
within LEASE_SECONDS; its agents reconnect to another instance within seconds, which takes them
over.

A single instance (SQLite) needs none of this: its hub is the whole truth, and nothing is
written.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from core.fanout.hub import Hub
from core.state import fleet
from core.state.db import Database

log = logging.getLogger(__name__)
LEASE_SECONDS = 60


class StreamLeases:
    def __init__(self, db: Database, hub: Hub, shared: bool, owner: str = "") -> None:
        self._db = db
        self._hub = hub
        self.shared = shared
        self.owner = owner or uuid.uuid4().hex  # this instance, for as long as it runs
        self._writes: set[asyncio.Task[None]] = set()

    def connected(self, name: str, stream_until: int, now: float | None = None) -> bool:
        """Streaming to this instance, or (shared state) to another one holding a lease."""
        if self._hub.is_connected(name):
            return True
        return self.shared and stream_until > (time.time() if now is None else now)

    def lease(self) -> tuple[str, int] | None:
        """(owner, until) for a stream opening now, written with its subscribe; None alone."""
        return (self.owner, self._until()) if self.shared else None

    def closed(self, name: str) -> None:
        """A stream ended: release the lease once this instance holds none for `name`. In the
        background, as closing may run while gRPC tears the stream's generator down."""
        if self.shared and not self._hub.is_connected(name):
            task = asyncio.get_running_loop().create_task(self._release(name))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def run(self) -> None:
        """Renew this instance's leases until cancelled (shared state only)."""
        while self.shared:
            await asyncio.sleep(LEASE_SECONDS / 3)
            names = self._hub.connected_keys()
            if not names:
                continue
            try:
                await self._db.run(fleet.lease_streams, names, self.owner, self._until())
            except Exception as exc:  # the next round retries; leases outlive two misses
                log.warning("renewing %d stream leases failed: %s", len(names), exc)

    async def flush(self) -> None:
        """Wait for the lease writes in flight (at shutdown: streams just closed release theirs)."""
        await asyncio.gather(*self._writes, return_exceptions=True)

    def _until(self) -> int:
        return int(time.time() + LEASE_SECONDS)

    async def _release(self, name: str) -> None:
        try:
            await self._db.run(fleet.release_stream, name, self.owner)
        except Exception as exc:  # it runs out within LEASE_SECONDS anyway
            log.warning("releasing the stream lease of %s failed: %s", name, exc)
