"""Drift repair trigger: a watchdog observer on the store notices writes to the current tree or a
broken `current`, and asks the reconciler (its single worker) to re-verify and rebuild.

Trees are mostly symlinks into `pkgs/` (satellite/store/trees.py), so a write "into the tree"
lands in `pkgs/<sha>/`: every package directory has a recursive watch of its own, put on it as
it is published (PkgDir.on_published, before the tree that uses it can be current), and a
change there counts when the package belongs to the current tree. `pkgs/` itself is watched
without recursion (a package directory appearing or going). One recursive watch on `pkgs/`
made watchdog walk each package renamed in and emit a "created" event per file (wsci: ~16,000
events, 0.3-0.5 s of the agent's CPU in a cold sync, all dropped here). The observer thread
passes on only changes to `current`, the current tree and the current tree's packages.

The observer thread only records that something happened; the decision runs on the event loop
after a short debounce, so a burst of events (a `pip install` into the tree, say) costs one
verification, and our own reads (which inotify reports as open/close-no-write) are ignored.

Starting the observer (inotify_init, one watch per directory of a large tree) and stopping it
(joining its threads) block, so both run in a worker thread. A host out of inotify instances
or watches keeps its agent: drift repair is off, said once in a warning naming the sysctl.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from satellite.store.data_dir import SatelliteStore

log = logging.getLogger(__name__)
# watchdog (7.x) shares one inotify fd per process; when a tree is renamed into place it adds
# watches for directories whose inodes it already watches, and warns "Callback with id ...
# already exists for watch ... It will be Overwritten" with the whole watch in the text (up to
# 25 KB a line, on every sync of a real package set). Re-adding our own callback is harmless.
# Its twin on removal ("... does not exist for watch ... cannot be removed") is as harmless.
warnings.filterwarnings(
    "ignore", message=r"Callback with id .* for watch ", category=RuntimeWarning
)
DEBOUNCE_SECONDS = 0.5
# Events that mean content or names changed; reads (opened, closed_no_write) do not count.
_CHANGES = {"created", "deleted", "modified", "moved", "closed"}
# The same, as watchdog's event filter: it also narrows the inotify mask, so the imports of every
# script run (opens and reads of the tree's files) raise no events at all, and a directory's
# own "modified" (one per file created in it, as when a package is renamed in whole) is skipped.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
]
# What watchdog raises when a limit is reached (OSError with these errnos), and the knob for it.
_INOTIFY_LIMITS = {
    errno.EMFILE: ("instance", "fs.inotify.max_user_instances"),
    errno.ENOSPC: ("watch", "fs.inotify.max_user_watches"),
}


class RepairRequests(Protocol):
    """What the watcher asks of the reconcile worker (satellite.sync.Reconciler)."""

    @property
    def desired(self) -> str | None: ...
    def request(self, lockfile_hash: str | None) -> None: ...
    def request_repair(self) -> None: ...


class ObserverLike(Protocol):
    """The part of watchdog's Observer the watcher uses (tests inject their own)."""

    daemon: bool

    def schedule(
        self,
        handler: FileSystemEventHandler,
        path: str,
        *,
        recursive: bool,
        event_filter: list[type[FileSystemEvent]] | None = None,
    ) -> object: ...

    def unschedule(self, watch: Any) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: DriftWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Only what can be drift reaches the loop: `current` itself, the current tree and its
        # packages. Publishing a package (thousands of events when it is renamed into pkgs/)
        # and our own `.tmp-*` builds are dropped here, in the observer thread, at the cost of
        # one startswith per event.
        if event.event_type not in _CHANGES:
            return
        src, dest = str(event.src_path), str(getattr(event, "dest_path", ""))
        watcher = self._watcher
        if f"{os.sep}.tmp-" not in src and (watcher.concerns(src) or watcher.concerns(dest)):
            watcher.notify_from_thread(src, dest)


class DriftWatcher:
    """`await start()` ... `await stop()`; `active` says whether drift is being watched."""

    def __init__(
        self,
        store: SatelliteStore,
        reconciler: RepairRequests,
        observer_factory: Callable[[], ObserverLike] = Observer,
    ) -> None:
        self._store = store
        self._reconciler = reconciler
        self._observer_factory = observer_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: ObserverLike | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._paths: set[str] = set()
        self.repairs_requested = 0
        # Path prefixes of the current tree and its packages; replaced whole (a tuple) when
        # `current` changes, so the observer thread reads it without a lock.
        self._scope: tuple[str, ...] = ()
        self._current_link = str(store.root / "current")
        self._pkgs_root = str(store.pkgs.root)
        self._handler = _Handler(self)
        self._pkg_watches: dict[str, Any] = {}  # package sha -> its recursive watch
        self._watches_lock = threading.Lock()  # the store's threads, the loop, stop()

    @property
    def active(self) -> bool:
        return self._observer is not None

    @property
    def watched_packages(self) -> frozenset[str]:
        """The packages with a watch of their own (every package on disk, once published)."""
        with self._watches_lock:
            return frozenset(self._pkg_watches)

    async def start(self) -> None:
        """Watch the store; an inotify limit only turns drift repair off (one warning)."""
        self._loop = asyncio.get_running_loop()
        self._refresh_scope()
        await asyncio.to_thread(self._start_observer)

    def concerns(self, path: str) -> bool:
        """Whether a change at `path` may be drift (called in the observer thread)."""
        return path == self._current_link or path.startswith(self._scope or (self._current_link,))

    def _refresh_scope(self) -> None:
        current = self._store.current_hash()
        if current is None:
            self._scope = ()
            return
        scope = [str(self._store.tree_site(current).parent)]
        try:
            entries = self._store.tree_manifest(current).entries
        except Exception:  # unreadable meta: watch all packages; verification will tell
            scope.append(str(self._store.pkgs.root))
        else:
            scope += [str(self._store.pkgs.dir(e.sha256)) for e in entries]
        self._scope = tuple(scope)

    def _start_observer(self) -> None:
        trees = self._store.root / "trees"
        pkgs = self._store.pkgs.root
        # Before the observer: a full disk here is not an inotify limit (both say ENOSPC).
        trees.mkdir(parents=True, exist_ok=True)
        pkgs.mkdir(parents=True, exist_ok=True)
        observer = self._observer_factory()
        try:
            for path, recursive in ((trees, True), (pkgs, False), (self._store.root, False)):
                observer.schedule(
                    self._handler, str(path), recursive=recursive, event_filter=_EVENT_FILTER
                )  # the root, not recursively: for `current`
            with self._watches_lock:
                # Hooked first, so a package published meanwhile is watched either way.
                self._observer = observer
                self._store.pkgs.on_published = self._published
                for sha in _package_dirs(pkgs):
                    self._watch_package(observer, sha)
            observer.daemon = True
            observer.start()
        except OSError as exc:
            with self._watches_lock:
                self._observer = None
                self._pkg_watches.clear()
            self._store.pkgs.on_published = None
            if _INOTIFY_LIMITS.get(exc.errno or 0) is None:
                raise
            with contextlib.suppress(Exception):  # emitters already started hold inotify fds
                observer.stop()
            self._limit_reached(exc)

    def _limit_reached(self, exc: OSError) -> None:
        what, sysctl = _INOTIFY_LIMITS[exc.errno or 0]
        log.warning(
            "drift repair is off: this host's inotify %s limit is reached (%s) while"
            " watching %s; raise sysctl %s and restart the agent to turn it on (syncing"
            " goes on without it)",
            what,
            exc,
            self._store.root,
            sysctl,
        )

    def _watch_package(self, observer: ObserverLike, sha: str) -> None:
        """A fresh recursive watch on pkgs/<sha> (the caller holds the lock). A package swapped
        in by drift repair is a new directory: the old watch followed the old one out."""
        old = self._pkg_watches.pop(sha, None)
        if old is not None:
            with contextlib.suppress(KeyError):
                observer.unschedule(old)
        self._pkg_watches[sha] = observer.schedule(
            self._handler, self._path(sha), recursive=True, event_filter=_EVENT_FILTER
        )

    def _published(self, shas: list[str]) -> None:
        """PkgDir.on_published, in the publishing thread: before the tree is assembled, so a
        package is watched before anything can make it current. Watches of packages deleted
        since (store GC) are released here too."""
        with self._watches_lock:
            observer = self._observer
            if observer is None:
                return
            for sha in [s for s in self._pkg_watches if not os.path.isdir(self._path(s))]:
                with contextlib.suppress(KeyError):
                    observer.unschedule(self._pkg_watches.pop(sha))
            try:
                for sha in shas:
                    self._watch_package(observer, sha)
            except OSError as exc:
                if _INOTIFY_LIMITS.get(exc.errno or 0) is None:
                    log.warning("cannot watch new packages for drift: %s", exc)
                    return
                self._limit_reached(exc)
                self._observer = None
                self._pkg_watches.clear()
            else:
                return
        # The limit: drift repair is off; what was started is released, off this thread.
        threading.Thread(target=_stop, args=(observer,), daemon=True).start()

    def _path(self, sha: str) -> str:
        return os.path.join(self._pkgs_root, sha)

    async def stop(self) -> None:
        """Idempotent; the observer's threads are stopped and joined in a worker thread."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        with self._watches_lock:
            observer, self._observer = self._observer, None
            self._pkg_watches.clear()
        if self._store.pkgs.on_published == self._published:
            self._store.pkgs.on_published = None
        if observer is not None:
            await asyncio.to_thread(_stop, observer)

    def notify_from_thread(self, *paths: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._note, paths)

    def _note(self, paths: tuple[str, ...]) -> None:
        if self._current_link in paths:  # a flip (or drift of the link): the scope moves on
            self._refresh_scope()
        self._paths.update(p for p in paths if p)
        if self._pending is None:
            assert self._loop is not None
            self._pending = self._loop.call_later(DEBOUNCE_SECONDS, self._decide)

    def _decide(self) -> None:
        self._pending = None
        paths, self._paths = self._paths, set()
        current_link = self._current_link
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


def _package_dirs(pkgs: Path) -> list[str]:
    return [p.name for p in pkgs.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _stop(observer: ObserverLike) -> None:
    observer.stop()  # stops and joins the emitters too
    observer.join(timeout=5)
