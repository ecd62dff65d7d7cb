"""Make a manifest's packages present: pull missing blobs (resuming), verify, unpack.

Pure orchestration like the reconciler, over satellite.sync.ports (a PackageStore and a
BlobSource). Each package is its own pipeline (pull -> stage), so unpacking the first wheel
overlaps downloading the next; pulls and unpacks have separate bounds because one waits on the
network and the other on CPU and disk (the file-system store unpacks a big sync in worker
processes, so unpacks use every core). The biggest packages go first, so the last one to
finish is a small one rather than numpy started last (on wsci, 2 cores: ~0.2 s of the cold
sync). Staged packages are
published in groups (PUBLISH_GROUP packages or PUBLISH_GROUP_BYTES of wheels, whichever comes
first): one durability sync per group instead of one per package, and an agent killed halfway
through a big batch keeps every group published before the kill, so a crash-looping agent still
converges. How bytes are fetched (URLs, resume, batching) is satellite/sync/fetch.py; which
blobs come as binary patches, and their fallback, satellite/sync/deltas.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

from satellite.sync.deltas import find_deltas, pull_via_patch
from satellite.sync.fetch import (
    WRITE_BATCH,
    BlobRef,
    HasSha,
    Sources,
    fetch_blob,
    find_locations,
)
from satellite.sync.ports import BlobSource, PackageStore, Staged, UrlSource
from satellite.sync.results import Progress
from shared.errors import BlobCorrupt, SpkError
from shared.manifest import ManifestEntry

__all__ = ["WRITE_BATCH", "ReconcileFailed", "Sources", "ensure_pkgs", "find_sources"]
log = logging.getLogger(__name__)
PUBLISH_GROUP = 32  # packages per durability sync (w31's 31 wheels: one group, as before)
PUBLISH_GROUP_BYTES = 64 * 1024 * 1024  # ... or this many bytes of wheels, if sooner


class ReconcileFailed(SpkError):
    """One or more packages could not be materialised; the message names each of them."""


async def find_sources(
    blobs: Sequence[HasSha],
    core: BlobSource,
    urls: UrlSource | None,
    base_url: str,
) -> Sources:
    """Sources for these blobs: the core, and the URLs it (or the host's mirror) names."""
    return Sources(core, urls, await find_locations(blobs, core, urls, base_url))


async def plan_sources(
    missing: Sequence[ManifestEntry],
    store: PackageStore,
    core: BlobSource,
    urls: UrlSource | None,
    base_url: str,
    deltas: bool,
    max_window_log: int,
    delta_wait: Callable[[int], int | None] = lambda _bytes: None,
) -> Sources:
    """Everything a sync asks the core before pulling: patches (one GetDeltas), then URLs for
    what may be fetched (one GetBlobLocations): the patches and the whole blobs (those too that
    come as patches: a patch that fails falls back to the blob, from its URL where it has one)."""
    if not deltas:
        return Sources(core, urls, await find_locations(missing, core, urls, base_url))
    to_fetch, offers = await find_deltas(missing, store, core, max_window_log, delta_wait)
    fetched: list[HasSha] = list(to_fetch)
    fetched += [BlobRef(o.patch_sha256, o.patch_size, "patch") for o in offers.values()]
    locations = await find_locations(fetched, core, urls, base_url)
    return Sources(core, urls, locations, offers, max_window_log)


class _Publisher:
    """Publishes staged packages in groups; one group at a time, the rest keep unpacking."""

    def __init__(self, store: PackageStore, progress: Progress) -> None:
        self._store = store
        self._progress = progress
        self._pending: list[Staged] = []
        self._bytes = 0
        self._lock = asyncio.Lock()
        self.error: Exception | None = None

    async def add(self, staged: Staged, size: int) -> None:
        self._pending.append(staged)
        self._bytes += size
        if len(self._pending) >= PUBLISH_GROUP or self._bytes >= PUBLISH_GROUP_BYTES:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            group, self._pending, self._bytes = self._pending, [], 0
            if not group:
                return
            try:
                await self._store.publish_pkgs(group)
            except Exception as exc:  # the store removed that group's staging dirs
                self.error = self.error or exc
                return
            self._progress.pkgs_unpacked += len(group)


async def ensure_pkgs(
    entries: Iterable[ManifestEntry],
    store: PackageStore,
    sources: BlobSource | Sources,
    progress: Progress,
    pull_concurrency: int,
    unpack_concurrency: int,
    missing: Sequence[ManifestEntry] | None = None,
) -> None:
    """Pull and unpack every package that is not unpacked yet; ReconcileFailed names failures.
    `missing`: what the caller already found not unpacked (saves the store a second look)."""
    if missing is None:
        unique = list({e.sha256: e for e in entries}.values())
        missing = await store.missing_pkgs(unique)
    else:
        missing = list({e.sha256: e for e in missing}.values())
    missing = sorted(missing, key=lambda e: e.size, reverse=True)
    src = sources if isinstance(sources, Sources) else Sources(sources)
    pulls = asyncio.Semaphore(pull_concurrency)
    unpacks = asyncio.Semaphore(unpack_concurrency)
    publisher = _Publisher(store, progress)
    # gather, not a TaskGroup: one failure must not cancel the others midway (a store call
    # cannot be stopped halfway and would go on unobserved); every package finishes or fails
    # on its own.
    results = await asyncio.gather(
        *(_ensure_pkg(e, store, src, progress, pulls, unpacks, publisher) for e in missing),
        return_exceptions=True,
    )
    # Published even when another package failed: the next attempt then has less to do.
    await publisher.flush()
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result
    failures = [r for r in results if isinstance(r, Exception)]
    if publisher.error is not None:
        failures.append(publisher.error)
    if failures:
        messages = [str(f) for f in failures]
        more = f" (and {len(messages) - 3} more)" if len(messages) > 3 else ""
        raise ReconcileFailed("; ".join(messages[:3]) + more) from failures[0]


async def _ensure_pkg(
    entry: ManifestEntry,
    store: PackageStore,
    sources: Sources,
    progress: Progress,
    pulls: asyncio.Semaphore,
    unpacks: asyncio.Semaphore,
    publisher: _Publisher,
) -> None:
    try:
        for attempt in (1, 2):
            pulled = False
            if not await store.has_blob(entry.sha256):
                async with pulls:
                    await obtain_blob(entry, store, sources, progress)
                pulled = True
            try:
                async with unpacks:
                    staged = await store.stage_pkg(entry, pulled)
            except BlobCorrupt:
                if attempt == 2:
                    raise
                # The store deleted the rotten blob; the next round pulls a fresh copy.
                log.warning("blob of %s rotted on disk; pulling it again", entry.filename)
                continue
            if staged is not None:
                await publisher.add(staged, entry.size)
            return
        raise AssertionError("unreachable")  # pragma: no cover
    except Exception as exc:
        raise ReconcileFailed(
            f"{entry.name} {entry.version} ({entry.filename}, blob {entry.sha256[:12]}): {exc}"
        ) from exc


async def pull_blobs(
    entries: Iterable[ManifestEntry],
    store: PackageStore,
    sources: BlobSource | Sources,
    progress: Progress,
    pull_concurrency: int,
) -> None:
    """Only the pull half of ensure_pkgs: every missing blob, verified and in the store."""
    pulls = asyncio.Semaphore(pull_concurrency)
    src = sources if isinstance(sources, Sources) else Sources(sources)

    async def one(entry: ManifestEntry) -> None:
        if not await store.has_blob(entry.sha256):
            async with pulls:
                await obtain_blob(entry, store, src, progress)

    unique = {e.sha256: e for e in entries}.values()
    await asyncio.gather(*(one(e) for e in unique))


async def obtain_blob(
    entry: ManifestEntry, store: PackageStore, sources: Sources, progress: Progress
) -> None:
    """The entry's blob into the store: from a patch where one is offered, else whole."""
    with progress.pull_clock.pulling():
        await _obtain_blob(entry, store, sources, progress)


async def _obtain_blob(
    entry: ManifestEntry, store: PackageStore, sources: Sources, progress: Progress
) -> None:
    offer = sources.deltas.get(entry.sha256)
    if offer is not None:
        if await pull_via_patch(entry, offer, store, sources, progress):
            progress.patches_used += 1
            progress.blobs_pulled += 1
            progress.wheel_bytes += entry.size
            return
        progress.patch_fallbacks += 1
    ref = BlobRef(entry.sha256, entry.size, entry.filename)
    await fetch_blob(ref, store.open_blob, sources, progress)
    progress.blobs_pulled += 1
    progress.wheel_bytes += entry.size


def is_expected(exc: BaseException) -> bool:
    """Our own errors carry their explanation; anything else is a bug worth a traceback."""
    while isinstance(exc, ReconcileFailed) and exc.__cause__ is not None:
        exc = exc.__cause__
    return isinstance(exc, SpkError)
