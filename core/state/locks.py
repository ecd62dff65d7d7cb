"""The installer lock: installs, blob GC, storage migration and rollback exclude each other.

Two layers, neither queueing (a refused action tells the operator why instead of waiting its
turn), though each gives a holder SETTLE_SECONDS to let go first: an install's `ready` is
committed a moment before its lease is released, and an operator (or a script) that starts a
migration the instant an install reports ready must not be refused for that moment (seen: a
test's MigrateStorage right after `ready` got "an install is running"):
- in this process: a holder slot, checked and set without awaiting in between, so two coroutines
  can never both pass;
- across core instances sharing Postgres: a session advisory lock (`pg_try_advisory_lock`) on a
  dedicated connection held for the lease's lifetime. If the core dies, Postgres ends the session
  and the lock with it, so a crash never wedges the fleet's installer.
SQLite mode is single-instance by construction (one data dir), so the first layer suffices there.

The holder also records what it is doing in the `installer_lock` setting, only so that another
instance's refusal can name the activity ("another core instance is installing").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from typing import Any

import peewee as pw

from core.state.db import Setting, now, upsert
from shared.errors import FailedPrecondition, StoreError

log = logging.getLogger(__name__)
HOLDER_KEY = "installer_lock"
# Any constant works as long as every core uses the same one; this spells "SPKINST".
ADVISORY_KEY = 0x53504B494E5354
SETTLE_SECONDS = 1.0
_SETTLE_POLL = 0.02


class Activity(enum.Enum):
    """What holds the lock; values are (running here, running elsewhere) for messages."""

    INSTALL = ("an install is running", "installing")
    GC = ("a blob GC pass is running", "running a blob GC pass")
    MIGRATION = ("a storage migration is running", "running a storage migration")
    ROLLBACK = ("a rollback is running", "rolling back")
    STORAGE_SWITCH = ("the storage backend is being switched", "switching the storage backend")
    RECOVERY = ("startup recovery is running", "recovering after a restart")

    @property
    def here(self) -> str:
        return self.value[0]

    @property
    def elsewhere(self) -> str:
        return self.value[1]


class Lease:
    """Proof of holding the lock; `release()` is idempotent."""

    def __init__(self, lock: InstallerLock, activity: Activity, conn: Any) -> None:
        self._lock = lock
        self.activity = activity
        self._conn = conn
        self._released = False

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            if self._conn is not None:
                await asyncio.to_thread(_close_quietly, self._conn)
        finally:
            self._lock._holder = None
            self._lock._free.set()


class InstallerLock:
    """`lease = await lock.acquire(Activity.GC)` or FailedPrecondition naming what runs."""

    def __init__(
        self, db: pw.Database | None = None, settle_seconds: float = SETTLE_SECONDS
    ) -> None:
        # Only Postgres needs the cross-instance layer.
        self._pg = db if isinstance(db, pw.PostgresqlDatabase) else None
        self._holder: Activity | None = None
        self._settle = settle_seconds
        self._free = asyncio.Event()  # set while nothing holds the lock here
        self._free.set()

    @property
    def holder(self) -> Activity | None:
        return self._holder

    async def acquire(self, activity: Activity) -> Lease:
        if self._holder is not None:  # a holder about to let go gets SETTLE_SECONDS (see above)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._free.wait(), self._settle)
        if self._holder is not None:
            raise FailedPrecondition(f"{self._holder.here}; try again when it has finished")
        self._free.clear()
        self._holder = activity  # claimed before the first await: no other coroutine can pass
        try:
            conn = None if self._pg is None else await asyncio.to_thread(self._pg_acquire, activity)
        except BaseException:
            self._holder = None
            self._free.set()
            raise
        return Lease(self, activity, conn)

    def _pg_acquire(self, activity: Activity) -> Any:
        assert self._pg is not None
        import psycopg2

        try:
            conn = psycopg2.connect(database=self._pg.database, **self._pg.connect_params)
        except psycopg2.Error as exc:
            raise StoreError(f"cannot reach Postgres for the installer lock: {exc}") from None
        try:
            conn.autocommit = True
            deadline = time.monotonic() + self._settle
            with conn.cursor() as cur:
                while True:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_KEY,))
                    got = bool(cur.fetchone()[0])
                    if got or time.monotonic() >= deadline:
                        break
                    time.sleep(_SETTLE_POLL)  # another instance's holder about to let go
        except BaseException:
            _close_quietly(conn)
            raise
        if not got:
            _close_quietly(conn)
            raise FailedPrecondition(
                f"another core instance is {_other_activity()}; try again when it has finished"
            )
        # peewee opens this worker thread's own connection on first use (autoconnect).
        holder = {"activity": activity.name, "since": now()}
        upsert(Setting, key=HOLDER_KEY, value=json.dumps(holder))
        return conn


def _other_activity() -> str:
    """Best effort: what the holder wrote when it took the lock."""
    try:
        row = Setting.get_or_none(Setting.key == HOLDER_KEY)
        if row is not None:
            return Activity[json.loads(row.value)["activity"]].elsewhere
    except Exception:  # the refusal matters, the detail does not
        log.debug("cannot read the installer lock holder", exc_info=True)
    return "holding the installer lock (install, GC or migration)"


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()  # ends the session, which releases the advisory lock
    except Exception:
        log.warning("closing the installer lock connection failed", exc_info=True)
