"""The drift watcher's watches on a real store with real inotify (watchdog's own observer).

What it must see (changes to the current tree's packages, after a flip and after a repair swap
too) is covered end to end in test_satellite_e2e.py; here: what publishing costs it, and that
every package is watched from the moment it is published.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers import Observer

from satellite.drift import DriftWatcher
from satellite.store import SatelliteStore
from tests.core_process import eventually_async
from tests.test_satellite_store import make_manifest, materialise, put_blob, wheel_entry
from tests.wheelfactory import WheelSpec

MANY = {f"many/sub{i // 50}/m{i}.py": f"I = {i}\n".encode() for i in range(600)}


class _Repairs:
    def __init__(self) -> None:
        self.repairs = 0

    @property
    def desired(self) -> str | None:
        return None

    def request(self, lockfile_hash: str | None) -> None:
        return None

    def request_repair(self) -> None:
        self.repairs += 1


class _Counting(DriftWatcher):
    """Counts the events that reach the scope check (each one a Python call per event)."""

    seen: list[str]

    def concerns(self, path: str) -> bool:
        self.seen.append(path)
        return super().concerns(path)


async def test_publishing_a_package_costs_the_watcher_one_event_and_watches_it(
    tmp_path: Path,
) -> None:
    store = SatelliteStore(tmp_path / "data")
    first, first_data = wheel_entry(tmp_path / "w", WheelSpec("small", "1.0"))
    manifest = make_manifest([first])
    materialise(store, manifest, {first.sha256: first_data})
    store.flip_current(manifest.lockfile_hash)

    repairs = _Repairs()
    watcher = _Counting(store, repairs)
    watcher.seen = []
    await watcher.start()
    try:
        many, data = wheel_entry(tmp_path / "w", WheelSpec("many", "1.0", files=MANY))
        put_blob(store, many, data)
        await asyncio.to_thread(store.unpack, many)  # staged, then renamed into pkgs/ whole
        await asyncio.sleep(0.5)
        published = [p for p in watcher.seen if many.sha256 in p]
        # One recursive watch on pkgs/ made watchdog report every file of a package renamed
        # in (600 here); the package's directory itself is all that is left.
        assert len(published) <= 2, published[:5]

        # It is watched all the same: a write into it is seen (not drift: not current).
        victim = store.pkgs.site(many.sha256) / "many" / "sub3" / "m150.py"
        victim.parent.chmod(0o755)
        victim.chmod(0o644)
        victim.write_text("I = 'changed'\n")
        await eventually_async(lambda: str(victim) in watcher.seen, timeout=10)
        assert repairs.repairs == 0
    finally:
        await watcher.stop()
    assert store.pkgs.on_published is None


async def test_a_package_deleted_by_gc_gives_its_watch_back(tmp_path: Path) -> None:
    store = SatelliteStore(tmp_path / "data")
    entries = []
    for name in ("one", "two"):
        entry, data = wheel_entry(tmp_path / "w", WheelSpec(name, "1.0"))
        put_blob(store, entry, data)
        entries.append(entry)
    store.unpack(entries[0])
    watcher = DriftWatcher(store, _Repairs())
    await watcher.start()
    try:
        assert set(watcher.watched_packages) == {entries[0].sha256}
        store.discard_pkg(entries[0].sha256)
        await asyncio.to_thread(store.unpack, entries[1])  # the next publish sweeps
        assert set(watcher.watched_packages) == {entries[1].sha256}
    finally:
        await watcher.stop()


class _RunsOutOfWatches:
    """watchdog's observer, until `full` is set: then a new watch hits the watch limit."""

    def __init__(self) -> None:
        self._real = Observer()
        self.full = False
        self.stopped = threading.Event()

    @property
    def daemon(self) -> bool:
        return bool(self._real.daemon)

    @daemon.setter
    def daemon(self, value: bool) -> None:
        self._real.daemon = value

    def schedule(self, handler: Any, path: str, **kw: Any) -> object:
        if self.full:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return self._real.schedule(handler, path, **kw)

    def unschedule(self, watch: Any) -> None:
        self._real.unschedule(watch)

    def start(self) -> None:
        self._real.start()

    def stop(self) -> None:
        self._real.stop()
        self.stopped.set()

    def join(self, timeout: float | None = None) -> None:
        self._real.join(timeout)


async def test_the_watch_limit_met_while_publishing_turns_drift_repair_off_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SatelliteStore(tmp_path / "data")
    observer = _RunsOutOfWatches()
    watcher = DriftWatcher(store, _Repairs(), lambda: observer)
    await watcher.start()
    try:
        assert watcher.active
        observer.full = True
        entry, data = wheel_entry(tmp_path / "w", WheelSpec("late", "1.0"))
        put_blob(store, entry, data)
        await asyncio.to_thread(store.unpack, entry)  # published all the same
        assert store.pkgs.has(entry.sha256) and not watcher.active
        assert await asyncio.to_thread(observer.stopped.wait, 10)
    finally:
        await watcher.stop()
    off = [r.getMessage() for r in caplog.records if "drift repair is off" in r.getMessage()]
    assert len(off) == 1 and "fs.inotify.max_user_watches" in off[0]
