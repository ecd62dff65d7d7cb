"""Postgres LISTEN/NOTIFY between core instances: a change of the desired hash on one instance
wakes the others at once, instead of at their next poll (the poll stays as the backstop).

The notification carries no data we trust: a listener only re-reads the desired hash from the
database, so a forged or stale NOTIFY can at worst cause one extra read.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
CHANNEL = "spk_desired_hash"


def send(db: object) -> None:
    """NOTIFY the other instances (run in a DB thread after the change committed)."""
    db.execute_sql(f"NOTIFY {CHANNEL}")  # type: ignore[attr-defined]


class Listener:
    """A thread with its own Postgres connection that LISTENs and calls `wake` on the loop."""

    def __init__(self, dsn: str, wake: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self._dsn = dsn
        self._wake = wake
        self._loop = loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg2  # only in Postgres mode

        while not self._stop.is_set():
            try:
                conn = psycopg2.connect(self._dsn)
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(f"LISTEN {CHANNEL}")
                while not self._stop.is_set():
                    if select.select([conn], [], [], 1.0)[0]:
                        conn.poll()
                        if conn.notifies:
                            conn.notifies.clear()
                            self._loop.call_soon_threadsafe(self._wake)
                conn.close()
            except Exception as exc:  # reconnect; the periodic poll covers the gap
                log.warning("LISTEN connection lost (%s); retrying", type(exc).__name__)
                self._stop.wait(2.0)
