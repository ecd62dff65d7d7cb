"""Drift repair trigger: a watchdog observer on the store notices writes to the current tree or a
broken `current`, and asks the reconciler (its single worker) to re-verify and rebuild.

Trees are mostly symlinks into `pkgs/` (satellite/trees.py), so a write "into the tree" lands in
`pkgs/<sha>/`: that directory is watched as well, and a change there counts when the package
belongs to the current tree.

The observer thread only records that something happened; the decision runs on the event loop
after a short debounce, so a burst of events (a `pip install` into the tree, say) costs one
verification, and our own reads (which inotify reports as open/close-no-write) are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from satellite.reconciler import Reconciler
from satellite.store import SatelliteStore

log = logging.getLogger(__name__)
DEBOUNCE_SECONDS = 0.5
# Events that mean content or names changed; reads (opened, closed_no_write) do not count.
_CHANGES = {"created", "deleted", "modified", "moved", "closed"}


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: DriftWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Our own builds happen in `.tmp-*` dirs and are renamed into place: not drift. Dropped
        # here, in the observer thread, so unpacking thousands of files costs no loop callbacks.
        if f"{os.sep}.tmp-" in str(event.src_path):
            return
        if event.event_type in _CHANGES:
            self._watcher.notify_from_thread(
                str(event.src_path), str(getattr(event, "dest_path", ""))
            )


class DriftWatcher:
    def __init__(self, store: SatelliteStore, reconciler: Reconciler) -> None:
        self._store = store
        self._reconciler = reconciler
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._pending: asyncio.TimerHandle | None = None
        self._paths: set[str] = set()
        self.repairs_requested = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        trees = self._store.root / "trees"
        trees.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        handler = _Handler(self)
        observer.schedule(handler, str(trees), recursive=True)
        pkgs = self._store.pkgs.root
        pkgs.mkdir(parents=True, exist_ok=True)
        observer.schedule(handler, str(pkgs), recursive=True)
        observer.schedule(handler, str(self._store.root), recursive=False)  # `current` itself
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def notify_from_thread(self, *paths: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._note, paths)

    def _note(self, paths: tuple[str, ...]) -> None:
        self._paths.update(p for p in paths if p)
        if self._pending is None:
            assert self._loop is not None
            self._pending = self._loop.call_later(DEBOUNCE_SECONDS, self._decide)

    def _decide(self) -> None:
        self._pending = None
        paths, self._paths = self._paths, set()
        current_link = str(self._store.root / "current")
        current_hash = self._store.current_hash()
        if current_hash is None:
            if os.path.lexists(current_link) or current_link in paths:
                log.warning("`current` is broken; rebuilding the desired tree")
                self._request()
            return
        site = str(self._store.tree_site(current_hash))
        if any(p == site or p.startswith(site + os.sep) for p in paths) or self._in_current_pkgs(
            current_hash, paths
        ):
            log.warning("files changed in the current tree %s; re-verifying", current_hash[:12])
            self._request()

    def _in_current_pkgs(self, current_hash: str, paths: set[str]) -> bool:
        prefix = str(self._store.pkgs.root) + os.sep
        touched = {p[len(prefix) :].partition(os.sep)[0] for p in paths if p.startswith(prefix)}
        if not touched:
            return False
        try:
            entries = self._store.tree_manifest(current_hash).entries
        except Exception:  # unreadable meta: let verification say what is wrong
            return True
        return any(e.sha256 in touched for e in entries)

    def _request(self) -> None:
        self.repairs_requested += 1
        self._reconciler.request_repair()
        # A dangling `current` is fixed by an ordinary reconcile to the desired hash.
        self._reconciler.request(self._reconciler.desired)
