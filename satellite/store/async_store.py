"""The one place the satellite's sync logic meets threads: SatelliteStore behind async Protocols.

`AsyncStore` implements satellite.sync.ports.PackageStore, TreeStore and StateStore (and what the
agent itself needs of its data dir) by running the synchronous, blocking SatelliteStore methods
in the default executor with `asyncio.to_thread`. One call is one thread hop, so the batching
the sync logic does is kept exactly: a BlobSink.write carries a whole batch of chunks (one hop
per ~4 MiB, not per chunk), `missing_pkgs` looks at a whole manifest at once, and
`publish_pkgs` publishes every staged package behind one syncfs. Unpacks run concurrently
because each `stage_pkg` is its own hop (the materialiser bounds how many at once), and each
hop hands the extraction itself to a worker process (unpack_pool.py: the GIL made threads
barely faster than one), started when `missing_pkgs` first finds something to unpack. A small
sync (under SPAWN_MIN_BYTES of wheels to unpack) unpacks in threads unless the workers are up
already: starting them costs 0.3-0.5 s here, which the demo's two-wheel sync paid in full
(742 ms; threads unpack 32 MiB of wheels in about that time).

It is also the I/O edge for errors: an OSError meaning the disk or quota is full (ENOSPC,
EDQUOT) becomes shared.errors.DiskFull here, so the sync logic sees types, never errno. Other
OSErrors pass through unchanged (they look like bugs, and get a traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Callable, Sequence
from typing import TypeVar

from satellite.store.blobs import BlobWriter
from satellite.store.data_dir import SatelliteStore
from satellite.store.pkgs import StagedPkg
from satellite.store.unpack_pool import UnpackPool, shared_pool
from satellite.sync.ports import (
    AgentState,
    BlobSink,
    DeltaBases,
    DeltaOffer,
    Staged,
    StoreGcPolicy,
    StoreGcReport,
)
from shared.errors import DiskFull
from shared.manifest import Manifest, ManifestEntry
from shared.tree_build import unpack_package

T = TypeVar("T")
SPAWN_MIN_BYTES = 32 * 1024 * 1024  # of wheels to unpack: below it, threads (see above)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _call(fn: Callable[[], T]) -> T:
    """Run `fn`; a full disk or quota becomes DiskFull (same message, the OSError its cause)."""
    try:
        return fn()
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise DiskFull(str(exc)) from exc
        raise


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(_call, fn)


class AsyncBlobSink:
    """BlobSink over a BlobWriter (which is thread-safe: close() may race a write)."""

    def __init__(self, writer: BlobWriter) -> None:
        self._writer = writer

    @property
    def offset(self) -> int:
        return self._writer.offset

    async def write(self, chunks: Sequence[bytes]) -> None:
        def write_all() -> None:
            # Chunk by chunk, not b"".join(chunks): a joined copy is one more batch-sized
            # buffer per pull, allocated in a worker thread (glibc then keeps it; peak RSS
            # grew ~30 MiB).
            for chunk in chunks:
                self._writer.write(chunk)

        await _in_thread(write_all)

    async def commit(self) -> None:
        await _in_thread(self._writer.commit)

    def close(self) -> None:
        _call(self._writer.close)


class AsyncStore:
    """The async face of one data dir; `disk` is the synchronous SatelliteStore underneath."""

    def __init__(self, disk: SatelliteStore, unpacker: UnpackPool | None = None) -> None:
        """`unpacker`: where extraction runs (default: this process's shared worker pool)."""
        self.disk = disk
        self._unpacker = unpacker if unpacker is not None else shared_pool()
        self._warming: asyncio.Future[None] | None = None
        self._in_processes = True  # decided per sync by missing_pkgs

    # -- PackageStore ----------------------------------------------------------------------

    async def missing_pkgs(self, entries: Sequence[ManifestEntry]) -> list[ManifestEntry]:
        disk = self.disk
        missing = await _in_thread(lambda: [e for e in entries if not disk.has_pkg(e.sha256)])
        if not missing:
            return missing
        big = sum(e.size for e in missing) >= SPAWN_MIN_BYTES
        self._in_processes = big or self._unpacker.running
        if self._in_processes and (self._warming is None or self._warming.done()):
            # The workers start while the blobs are pulled (warm() logs its own failures).
            self._warming = asyncio.get_running_loop().run_in_executor(None, self._unpacker.warm)
        return missing

    async def has_blob(self, sha256: str) -> bool:
        return await _in_thread(lambda: self.disk.has_blob(sha256))

    async def open_blob(self, sha256: str, size: int) -> BlobSink:
        writer = await _in_thread(lambda: self.disk.open_blob_writer(sha256, size))
        return AsyncBlobSink(writer)

    async def delta_bases(self, entries: Sequence[ManifestEntry]) -> DeltaBases:
        return await _in_thread(lambda: self.disk.delta_bases(list(entries)))

    async def open_patch(self, sha256: str, size: int) -> BlobSink:
        writer = await _in_thread(lambda: self.disk.open_patch_writer(sha256, size))
        return AsyncBlobSink(writer)

    async def apply_patch(
        self, entry: ManifestEntry, offer: DeltaOffer, max_window_log: int
    ) -> None:
        await _in_thread(lambda: self.disk.apply_patch(entry, offer, max_window_log))

    async def stage_pkg(self, entry: ManifestEntry, blob_verified: bool = False) -> Staged | None:
        unpack = self._unpacker.unpack if self._in_processes else unpack_package
        return await _in_thread(lambda: self.disk.stage_pkg(entry, blob_verified, unpack))

    async def publish_pkgs(self, staged: Sequence[Staged]) -> None:
        ours = [_own(item) for item in staged]
        await _in_thread(lambda: self.disk.publish_pkgs(ours))

    async def verify_pkg(self, sha256: str) -> list[str]:
        return await _in_thread(lambda: self.disk.verify_pkg(sha256))

    async def replace_pkg(self, entry: ManifestEntry) -> None:
        await _in_thread(lambda: self.disk.replace_pkg(entry, self._unpacker.unpack))

    # -- TreeStore -------------------------------------------------------------------------

    async def current_hash(self) -> str | None:
        return await _in_thread(self.disk.current_hash)

    async def has_tree(self, lockfile_hash: str) -> bool:
        return await _in_thread(lambda: self.disk.has_tree(lockfile_hash))

    async def assemble_tree(self, manifest: Manifest, replace: bool = False) -> None:
        await _in_thread(lambda: self.disk.assemble_tree(manifest, replace))

    async def tree_manifest(self, lockfile_hash: str) -> Manifest:
        return await _in_thread(lambda: self.disk.tree_manifest(lockfile_hash))

    async def verify_tree(self, lockfile_hash: str) -> list[str]:
        return await _in_thread(lambda: self.disk.verify_tree(lockfile_hash))

    async def flip_current(self, lockfile_hash: str) -> None:
        await _in_thread(lambda: self.disk.flip_current(lockfile_hash))

    async def retire_others(self, now: float) -> list[str]:
        return await _in_thread(lambda: self.disk.retire_others(now))

    async def gc_trees(self, grace_seconds: float, now: float) -> list[str]:
        return await _in_thread(lambda: self.disk.gc_trees(grace_seconds, now))

    async def gc_store(
        self, policy: StoreGcPolicy, grace_seconds: float, now: float
    ) -> StoreGcReport:
        return await _in_thread(lambda: self.disk.gc_store(policy, grace_seconds, now))

    # -- StateStore ------------------------------------------------------------------------

    async def load_state(self) -> AgentState:
        return await _in_thread(self.disk.load_state)

    async def save_state(self, state: AgentState) -> None:
        await _in_thread(lambda: self.disk.save_state(state))

    # -- what the agent needs of its data dir ----------------------------------------------

    def agent_lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the data dir's lock (a non-blocking flock: quick enough for the event loop)."""
        return self.disk.acquire_agent_lock()

    async def cleanup_temp(self) -> int:
        """Remove unfinished builds of an earlier run; how many entries went."""
        return len(await _in_thread(self.disk.cleanup_temp))

    async def read_pinned_key(self) -> str | None:
        return await _in_thread(self.disk.read_pinned_key)

    async def pin_key(self, pem: str) -> None:
        await _in_thread(lambda: self.disk.pin_key(pem))


def _own(staged: Staged) -> StagedPkg:
    if not isinstance(staged, StagedPkg):
        raise TypeError(f"not staged by this store: {staged!r}")
    return staged
