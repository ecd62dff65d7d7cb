"""Check each wheel while pip is still resolving, instead of after it exits.

`pip download` fetches every wheel into its TMPDIR (`pip-unpack-*/<file>`) as it resolves, but
saves the set to `--dest` only at the end. The core's own checks would then start only after
pip exits: RECORD and member safety (~0.2 s of CPU for w31) while pip keeps one core busy and
the other idles, and the index's published sha256 (a project page per wheel, a network round
trip). So a watchdog observer on pip's TMPDIR links each wheel pip finishes writing (inotify
close-after-write) and starts both checks at once:

    inspection     one worker thread at nice 10 (CPU: pip and a local index come first)
    published hash four worker threads (network: the project pages)

The published hashes of the wheels pip is offered as already held (`expect`) are fetched from
the start, since their names are known before pip runs. A file that passes is also handed to
the kernel's writeback, so the blob store's fsync after pip finds little left to write.

Purely an optimisation, never a source of truth: a result counts only for a file whose sha256
equals the bytes that were checked (content addressing makes the two interchangeable). A miss
(a small file written and closed before the watch on its new directory was set up, pip
changing its temp layout, a check still queued or failed) means the installer checks the file
itself after pip, as it would without this module, and reports its own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from watchdog.events import FileClosedEvent, FileSystemEventHandler
from watchdog.observers import Observer

from core.install.index_client import published_hashes_sync
from core.install.pip_downloads import HeldWheel, ResolvedWheel, plan_downloads
from core.state.index_config import RegistrySettings
from shared.errors import SpkError
from shared.fsutil import start_writeback
from shared.tree_content import DEFAULT_CONTENT_POLICY, TreeContentPolicy
from shared.wheels import inspect_wheel

log = logging.getLogger(__name__)
CHECK_NICENESS = 10
PAGE_FETCHES = 4  # a local pypiserver stalls ~1 s when 8 clients connect at once
T = TypeVar("T")


def inspect_file(
    path: Path, filename: str, content: TreeContentPolicy = DEFAULT_CONTENT_POLICY
) -> str:
    """RECORD and member safety on one file, then start its writeback; its sha256."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        inspect_wheel(path, filename=filename, content=content)
        start_writeback(f.fileno())
    return digest


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):  # per-thread nice is a Linux feature
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECK_NICENESS)


class _OnClosed(FileSystemEventHandler):
    def __init__(self, callback: Callable[[str], None]) -> None:
        self._callback = callback

    def on_closed(self, event: FileClosedEvent) -> None:
        self._callback(os.fsdecode(event.src_path))


async def outcome(future: Future[T] | None, what: str) -> T | None:
    """The result of a check, None if there is none yet (still queued: given up) or it failed."""
    if future is None or future.cancel():
        return None
    try:
        return await asyncio.wrap_future(future)
    except Exception as exc:  # the installer repeats the check and reports what it finds
        reason = exc.message if isinstance(exc, SpkError) else type(exc).__name__
        log.debug("early check of %s failed: %s", what, reason)
        return None


class EarlyChecks:
    """One install's early checks: `expect` and `watching(...)` around the pip run, then
    `inspected` and `published` per wheel."""

    def __init__(
        self,
        links_dir: Path,
        settings: RegistrySettings,
        content: TreeContentPolicy = DEFAULT_CONTENT_POLICY,
    ) -> None:
        self._links_dir = links_dir  # on pip's filesystem, removed by the caller
        self._settings = settings
        self._content = content
        # Inspection: one worker at a lower priority; on 2 cores nice 10 took 0.07 s off a w31
        # install (docs/benchmarks.md). Page fetches wait on the network, so several at once.
        self._cpu = ThreadPoolExecutor(1, "early-inspect", initializer=_lower_priority)
        self._io = ThreadPoolExecutor(PAGE_FETCHES, "early-published")
        self._inspections: dict[str, tuple[Future[str], Path]] = {}
        self._published: dict[str, Future[frozenset[str]]] = {}
        self._seq = itertools.count()

    def _start_published(self, filename: str) -> None:
        if filename not in self._published:
            (plan,) = plan_downloads([filename], ())
            fetch = published_hashes_sync
            self._published[filename] = self._io.submit(fetch, plan.name, filename, self._settings)

    def expect(self, held: Mapping[str, HeldWheel]) -> None:
        """Start fetching the published hashes of wheels pip is offered as already held."""
        for filename in held:
            self._start_published(filename)

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
        self._inspections[filename] = (
            self._cpu.submit(inspect_file, link, filename, self._content),
            link,
        )
        self._start_published(filename)

    @contextlib.contextmanager
    def watching(self, pip_tmp: Path) -> Iterator[None]:
        self._links_dir.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        handler = _OnClosed(self._on_closed)
        try:
            observer.schedule(handler, str(pip_tmp), recursive=True, event_filter=[FileClosedEvent])
            observer.start()
        except OSError as exc:  # e.g. the inotify instance limit: only slower, never broken
            log.warning("checking wheels after pip, not during: cannot watch %s: %s", pip_tmp, exc)
            yield
            return
        try:
            yield
        finally:
            observer.stop()
            observer.join()

    def __contains__(self, filename: object) -> bool:
        """Whether an inspection of `filename` was started (done or not)."""
        return filename in self._inspections

    async def inspected(self, wheel: ResolvedWheel) -> Path | None:
        """A file with `wheel`'s bytes that passed RECORD and member checks, or None."""
        future, path = self._inspections.get(wheel.filename, (None, None))
        digest = await outcome(future, wheel.filename)
        return path if digest is not None and digest == wheel.sha256 else None

    async def published(self, wheel: ResolvedWheel) -> bool:
        """Whether the index was found to publish `wheel`'s sha256 for its file name."""
        hashes = await outcome(self._published.get(wheel.filename), wheel.filename)
        return hashes is not None and wheel.sha256 in hashes

    def close(self) -> None:
        # No waiting: this may run during cancellation, on the event loop. A check still
        # running finds its link gone with the caller's directory and ends on its own.
        self._cpu.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)
