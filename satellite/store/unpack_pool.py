"""Wheel unpacking in worker processes, so every core inflates, hashes and writes at once.

Threads were measured first, on the wsci set (76 wheels, 14,253 files, 489 MB unpacked, 2-core
VM): one thread 1.9 s, two threads 1.7 s at 1.5x the CPU (the per-member Python work holds the
GIL and the hand-offs cost more than the second core gives), two spawned processes 1.3-1.5 s.

One pool per process, shared by every agent in it (the fan-out benchmark runs hundreds), sized
to the CPU count. Workers are spawned, never forked (the agent runs grpc's threads), on first
use, and the pool shuts down after `IDLE_SECONDS` without work, so an idle agent holds no
extra processes or memory; a worker dies with the agent (shared/parent_death.py). A program
that starts agents must guard its main module (`if __name__ == "__main__"`), as multiprocessing
requires of spawned children. The worker runs exactly shared.tree_build.unpack_package, every
check included (a big wheel unpacked alone is split: every worker runs unpack_part, each
checking the whole wheel before writing its share); its errors come back as themselves
(shared.errors pickles). Where processes cannot be started at all, unpacking stays in the
calling thread, with one warning.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from shared.errors import StoreError
from shared.manifest import ManifestEntry
from shared.parent_death import die_with_parent
from shared.tree_build import (
    SITE,
    FileMap,
    finish_package,
    remove_dir,
    unpack_package,
    unpack_part,
)
from shared.tree_content import AT_SATELLITE, TreeContentPolicy

log = logging.getLogger(__name__)
IDLE_SECONDS = 30.0
MAX_BREAKS = 3
SPLIT_MIN_BYTES = 4 * 1024 * 1024  # a wheel this big is split across the workers when alone


class UnpackPool:
    def __init__(self, workers: int, idle_seconds: float = IDLE_SECONDS) -> None:
        self.workers = max(1, workers)
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._executor: Executor | None = None
        self._busy = 0
        self._idle_timer: threading.Timer | None = None
        self._unavailable = False
        self._breaks = 0  # pools broken in a row; at MAX_BREAKS unpacking moves to threads

    @property
    def running(self) -> bool:
        """Whether worker processes are up (a sync may use them without paying their start)."""
        return self._executor is not None

    def warm(self) -> None:
        """Start the workers now (a sync about to unpack): spawning overlaps the pull."""
        executor = self._acquire()
        try:
            if executor is not None:
                for future in [executor.submit(int) for _ in range(self.workers)]:
                    future.result()
        except (OSError, BrokenProcessPool) as exc:  # no work was lost: workers cannot start
            self._broken(executor, exc, give_up=True)
        finally:
            self._release()

    def unpack(
        self,
        entry: ManifestEntry,
        blob: Path,
        pkg_dir: Path,
        content: TreeContentPolicy = AT_SATELLITE,
        *,
        reuse_from: Path | None = None,
    ) -> FileMap:
        """shared.tree_build.unpack_package in a worker; blocks the calling thread."""
        executor = self._acquire()
        try:
            if executor is None:
                return unpack_package(entry, blob, pkg_dir, content, reuse_from=reuse_from)
            try:
                if entry.size >= SPLIT_MIN_BYTES and self.workers > 1 and self._alone():
                    files = self._split(executor, entry, blob, pkg_dir, content, reuse_from)
                else:
                    job = executor.submit(
                        unpack_package, entry, blob, pkg_dir, content, reuse_from=reuse_from
                    )
                    files = job.result()
            except BrokenProcessPool as exc:  # a worker died (OOM kill, say): a new pool next
                self._broken(executor, exc, give_up=False)
                raise StoreError(
                    f"the process unpacking {entry.filename} died ({exc}); the sync is retried"
                ) from exc
            self._breaks = 0
            return files
        finally:
            self._release()

    def _alone(self) -> bool:
        with self._lock:
            return self._busy == 1

    def _split(
        self,
        executor: Executor,
        entry: ManifestEntry,
        blob: Path,
        pkg_dir: Path,
        content: TreeContentPolicy,
        reuse_from: Path | None,
    ) -> FileMap:
        """One big wheel on every worker (shared.wheels `part`): when it is the only unpack
        running, the other workers would idle (one pin changed: sympy 155 -> 100 ms, scipy
        400 -> 250 ms on 2 cores). Each part checks the whole wheel before writing; every
        part ends before a failure is raised, so none still writes into the dir the caller
        then removes."""
        pkg_dir.mkdir()
        (pkg_dir / SITE).mkdir(mode=0o755)
        futures = [
            executor.submit(unpack_part, entry, blob, pkg_dir, content, k, self.workers, reuse_from)
            for k in range(self.workers)
        ]
        wait(futures)
        try:
            infos = [f.result() for f in futures]  # raises the first part's error
        except BaseException:
            remove_dir(pkg_dir / SITE)  # as extract_wheel cleans up after itself
            raise
        files: FileMap = {}
        for info in infos:
            files.update(info.hashes)
        return finish_package(entry, pkg_dir, infos[0], files)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _acquire(self) -> Executor | None:
        with self._lock:
            self._busy += 1
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            if self._executor is None and not self._unavailable:
                try:
                    self._executor = ProcessPoolExecutor(
                        self.workers,
                        mp_context=multiprocessing.get_context("spawn"),
                        initializer=die_with_parent,
                        initargs=(os.getpid(),),
                    )
                except OSError as exc:
                    self._unavailable = True
                    log.warning("cannot start unpack processes (%s); unpacking in threads", exc)
            return self._executor

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._busy == 0 and self._executor is not None:
                self._idle_timer = threading.Timer(self._idle_seconds, self._shut_if_idle)
                self._idle_timer.daemon = True
                self._idle_timer.start()

    def _shut_if_idle(self) -> None:
        with self._lock:
            if self._busy or self._executor is None:
                return
            executor, self._executor, self._idle_timer = self._executor, None, None
        executor.shutdown(wait=False)

    def _broken(self, executor: Executor | None, exc: BaseException, give_up: bool) -> None:
        with self._lock:
            self._breaks += 1
            if give_up or self._breaks >= MAX_BREAKS:
                self._unavailable = True
            if self._executor is executor:
                self._executor = None
        if self._unavailable:
            log.warning("unpack processes keep failing (%s); unpacking in threads from now", exc)
        else:
            log.warning("an unpack process died (%s); starting new ones", exc)
        if executor is not None:
            executor.shutdown(wait=False)


_SHARED: UnpackPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool() -> UnpackPool:
    """This process's pool, sized to its CPUs."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = UnpackPool(os.cpu_count() or 2)
        return _SHARED
