"""Check each wheel while pip is still resolving, instead of after it exits.

`pip download` fetches every wheel into its TMPDIR (`pip-unpack-*/<file>`) as it resolves, but
saves the set to `--dest` only at the end. The core's own checks (the index's published sha256,
RECORD and member safety: ~0.3 s for w31, mostly CPU) would then start only after pip exits,
while pip keeps one core busy and the other idles. So a watchdog observer on pip's TMPDIR links
each wheel pip finishes writing (inotify close-after-write) and checks it on one worker thread.

A file that passes is also handed to the kernel's writeback here, so the blob store's fsync
after pip (24 MB for w31) finds little left to write.

Purely an optimisation, never a source of truth: a result is keyed by the sha256 of the bytes
that passed, and the installer uses it only for a file pip saved with that same sha256 (content
addressing makes the two interchangeable). A miss (a small file written and closed before the
watch on its new directory was set up, pip changing its temp layout, a failed check) means the
check runs after pip, as it would without this module, and reports its own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from watchdog.events import FileClosedEvent, FileSystemEventHandler
from watchdog.observers import Observer

from core.index_client import check_published_sync
from core.pip_downloads import ResolvedWheel, plan_downloads, published_in_log
from core.registry import RegistrySettings
from shared.errors import SpkError
from shared.fsutil import start_writeback
from shared.wheels import inspect_wheel

log = logging.getLogger(__name__)
CHECK_NICENESS = 10


def check_wheel_file(
    path: Path, filename: str, published: frozenset[str], settings: RegistrySettings
) -> str:
    """Both of the installer's checks on one file; the sha256 of the bytes that passed.

    `published`: the hashes pip logged for the file's links (empty: read the project page).
    """
    (plan,) = plan_downloads([filename], ())
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = os.fstat(f.fileno()).st_size
        wheel = ResolvedWheel(
            plan.name, plan.version, filename, path, digest, size, False, published
        )
        inspect_wheel(path, filename=filename)
        check_published_sync(wheel, settings)
        # Start writing it to disk now, so the blob store's fsync later has little left to do.
        start_writeback(f.fileno())
    return digest


class LoggedHashes:
    """The hashes in pip's growing debug log, read a new piece at a time.

    pip logs a file's index links before it downloads the file, so they are there by the time
    its download is closed. Against PyPI the log holds every version's links (megabytes), so it
    is never re-read from the start. Used from the one worker thread only.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._hashes: dict[str, frozenset[str]] = {}

    def get(self, filename: str) -> frozenset[str]:
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                new = f.read()
        except OSError:
            new = b""
        whole = new.rfind(b"\n") + 1  # a line pip is still writing waits for the next call
        self._offset += whole
        for name, hashes in published_in_log(new[:whole].decode("utf-8", "replace")).items():
            self._hashes[name] = self._hashes.get(name, frozenset()) | hashes
        return self._hashes.get(filename, frozenset())


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):  # per-thread nice is a Linux feature
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECK_NICENESS)


class _OnClosed(FileSystemEventHandler):
    def __init__(self, callback: Callable[[str], None]) -> None:
        self._callback = callback

    def on_closed(self, event: FileClosedEvent) -> None:
        self._callback(os.fsdecode(event.src_path))


class EarlyChecks:
    """One install's early checks: `watching(...)` around the pip run, then `passed()`."""

    def __init__(self, links_dir: Path, settings: RegistrySettings) -> None:
        self._links_dir = links_dir  # on pip's filesystem, removed by the caller
        self._settings = settings
        # One worker, at a lower priority: pip (and a local index) come first, the checks fill
        # the gaps. On 2 cores, nice 10 took 0.07 s off a w31 install (docs/benchmarks.md).
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="early-check", initializer=_lower_priority
        )
        self._futures: dict[str, tuple[Future[str], Path]] = {}
        self._logged = LoggedHashes(Path(os.devnull))
        self._seq = itertools.count()

    def _on_closed(self, src: str) -> None:
        filename = os.path.basename(src)
        in_unpack_dir = os.path.basename(os.path.dirname(src)).startswith("pip-unpack-")
        if not (in_unpack_dir and filename.endswith(".whl")):
            return
        # A link of our own keeps the bytes after pip deletes its temp dir; pip never rewrites a
        # finished download in place.
        link = self._links_dir / f"{next(self._seq)}-{filename}"
        try:
            os.link(src, link)
        except OSError:
            return  # gone already, or another filesystem: the installer checks it later
        self._futures[filename] = (self._pool.submit(self._check, link, filename), link)

    def _check(self, link: Path, filename: str) -> str:
        return check_wheel_file(link, filename, self._logged.get(filename), self._settings)

    @contextlib.contextmanager
    def watching(self, pip_tmp: Path, pip_log: Path) -> Iterator[None]:
        self._logged = LoggedHashes(pip_log)
        self._links_dir.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        handler = _OnClosed(self._on_closed)
        observer.schedule(handler, str(pip_tmp), recursive=True, event_filter=[FileClosedEvent])
        observer.start()
        try:
            yield
        finally:
            observer.stop()
            observer.join()

    def __contains__(self, filename: object) -> bool:
        """Whether a check of `filename` was started (done or not)."""
        return filename in self._futures

    async def passed(self, wheel: ResolvedWheel) -> Path | None:
        """A checked file with `wheel`'s bytes (waiting for a running check), or None."""
        future, path = self._futures.get(wheel.filename, (None, None))
        if future is None or path is None:
            return None
        if future.cancel():
            # Still queued behind slower checks (project pages on a remote index): checking it
            # now, next to the others, is sooner than waiting for the one worker.
            return None
        try:
            digest = await asyncio.wrap_future(future)
        except Exception as exc:  # the installer repeats the check and reports what it finds
            reason = exc.message if isinstance(exc, SpkError) else type(exc).__name__
            log.debug("early check of %s failed: %s", wheel.filename, reason)
            return None
        return path if digest == wheel.sha256 else None

    def close(self) -> None:
        # No waiting: this may run during cancellation, on the event loop. A check still
        # running finds its link gone with the caller's directory and ends on its own.
        self._pool.shutdown(wait=False, cancel_futures=True)
