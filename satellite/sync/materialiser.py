"""Make a manifest's packages present: pull missing blobs (resuming), verify, unpack.

Pure orchestration like the reconciler, over satellite.sync.ports (a PackageStore and a
BlobSource). Each package is its own pipeline (pull -> stage), so unpacking the first wheel
overlaps downloading the next; pulls and unpacks have separate bounds because one waits on the
network and the other on CPU and disk (the file-system store unpacks in worker threads, and
zlib, hashing and file I/O release the GIL, so unpacks use every core). Staged packages are
published together at the end: one durability sync for the batch instead of one per package.
Blob bytes reach the store in batches of WRITE_BATCH, not chunk by chunk (see _receive).

Where a blob has a URL (a presigned object-store GET or a CDN the core names, or the host's own
mirror), its bytes come from there instead of through the core; the store's sink verifies them
exactly as it verifies the core's (size and sha256 from the signed manifest), and any failure
falls back to the core, resuming after the bytes that did arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

from satellite.sync.ports import BlobSink, BlobSource, PackageStore, Staged, UrlSource
from satellite.sync.results import Progress
from shared.errors import BlobCorrupt, IntegrityError, SpkError
from shared.manifest import ManifestEntry

log = logging.getLogger(__name__)
WRITE_BATCH = 4 * 1024 * 1024  # bytes handed to the store per BlobSink.write


class ReconcileFailed(SpkError):
    """One or more packages could not be materialised; the message names each of them."""


@dataclass(frozen=True)
class Sources:
    """Where blob bytes come from: the core always, URLs for the blobs that have one."""

    core: BlobSource
    urls: UrlSource | None = None
    locations: dict[str, str] = field(default_factory=dict)  # sha256 -> URL


async def find_sources(
    entries: Sequence[ManifestEntry],
    core: BlobSource,
    urls: UrlSource | None,
    base_url: str,
) -> Sources:
    """One question to the core for all the blobs a sync lacks (none with a host mirror)."""
    if urls is None or not entries:
        return Sources(core)
    if base_url:
        base = base_url.rstrip("/")
        return Sources(
            core, urls, {e.sha256: f"{base}/{e.sha256[:2]}/{e.sha256}.whl" for e in entries}
        )
    try:
        return Sources(core, urls, await core.blob_locations([e.sha256 for e in entries]))
    except SpkError as exc:  # the core streams everything itself, as before
        log.warning("asking the core for blob URLs failed (%s); pulling from the core", exc)
        return Sources(core)


async def ensure_pkgs(
    entries: Iterable[ManifestEntry],
    store: PackageStore,
    sources: BlobSource | Sources,
    progress: Progress,
    pull_concurrency: int,
    unpack_concurrency: int,
) -> None:
    """Pull and unpack every package that is not unpacked yet; ReconcileFailed names failures."""
    unique = list({e.sha256: e for e in entries}.values())
    missing = await store.missing_pkgs(unique)
    src = sources if isinstance(sources, Sources) else Sources(sources)
    pulls = asyncio.Semaphore(pull_concurrency)
    unpacks = asyncio.Semaphore(unpack_concurrency)
    # gather, not a TaskGroup: one failure must not cancel the others midway (a store call
    # cannot be stopped halfway and would go on unobserved); every package finishes or fails
    # on its own.
    results = await asyncio.gather(
        *(_ensure_pkg(e, store, src, progress, pulls, unpacks) for e in missing),
        return_exceptions=True,
    )
    staged = [r for r in results if r is not None and not isinstance(r, BaseException)]
    # Published even when another package failed: the next attempt then has less to do.
    await store.publish_pkgs(staged)
    progress.pkgs_unpacked += len(staged)
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures:
        if not isinstance(failure, Exception):
            raise failure
    if failures:
        messages = [str(f) for f in failures]
        more = f" (and {len(messages) - 3} more)" if len(messages) > 3 else ""
        raise ReconcileFailed("; ".join(messages[:3]) + more) from failures[0]


async def _ensure_pkg(
    entry: ManifestEntry,
    store: PackageStore,
    core: Sources,
    progress: Progress,
    pulls: asyncio.Semaphore,
    unpacks: asyncio.Semaphore,
) -> Staged | None:
    try:
        for attempt in (1, 2):
            pulled = False
            if not await store.has_blob(entry.sha256):
                async with pulls:
                    await _pull(entry, store, core, progress)
                pulled = True
            try:
                async with unpacks:
                    return await store.stage_pkg(entry, pulled)
            except BlobCorrupt:
                if attempt == 2:
                    raise
                # The store deleted the rotten blob; the next round pulls a fresh copy.
                log.warning("blob of %s rotted on disk; pulling it again", entry.filename)
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
                await _pull(entry, store, src, progress)

    unique = {e.sha256: e for e in entries}.values()
    await asyncio.gather(*(one(e) for e in unique))


async def _pull(
    entry: ManifestEntry, store: PackageStore, sources: Sources, progress: Progress
) -> None:
    """Download one blob into the store, resuming a partial; a bad resume starts over once."""
    url = sources.locations.get(entry.sha256)
    if url is not None and sources.urls is not None:
        if await _pull_url(entry, store, sources.urls, url, progress):
            return
        progress.url_fallbacks += 1
    for attempt in (1, 2):
        sink = await store.open_blob(entry.sha256, entry.size)
        resumed_at = sink.offset
        stream = sources.core.download_blob(entry.sha256, resumed_at)
        try:
            await _receive(stream, sink, progress)
            await sink.commit()
            progress.blobs_pulled += 1
            return
        except IntegrityError:
            # The sink deleted the partial: if the old bytes were the bad ones, a fresh
            # download succeeds; if the core serves bad bytes, the second attempt fails too.
            if resumed_at == 0 or attempt == 2:
                raise
            log.warning("resumed download of %s failed verification; retrying", entry.filename)
        finally:
            # Synchronous on purpose: waits at most for one batch write still finishing, and
            # must run even when this task is being cancelled. The partial stays for a resume.
            sink.close()
            await _aclose(stream)


async def _pull_url(
    entry: ManifestEntry, store: PackageStore, urls: UrlSource, url: str, progress: Progress
) -> bool:
    """The blob from its URL, verified like any other; False (logged) on any failure, the
    partial kept when its bytes were fine so the core resumes after them."""
    sink = await store.open_blob(entry.sha256, entry.size)
    stream = urls.fetch(url, sink.offset)
    try:
        await _receive(stream, sink, progress)
        await sink.commit()
    except SpkError as exc:
        log.warning(
            "fetching blob %s (%s) from %s failed: %s; falling back to the core",
            entry.sha256[:12],
            entry.filename,
            _host(url),
            exc,
        )
        return False
    finally:
        sink.close()
        await _aclose(stream)
    progress.blobs_pulled += 1
    progress.blobs_by_url += 1
    return True


def _host(url: str) -> str:
    """scheme://host of a URL: what a log line may say (a presigned query is a secret)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].rsplit('@', 1)[-1]}"


async def _receive(stream: AsyncIterator[bytes], sink: BlobSink, progress: Progress) -> None:
    """Write the stream in batches, the next batch arriving while one is being written.

    One store write per batch, not per chunk: the file-system store hops to a worker thread for
    each, and each hop costs GIL hand-offs with grpc's own threads (measured: a hop per 1 MiB
    chunk cost a third more client CPU). Bytes that arrived before the stream broke are still
    written, so a resume starts after them.
    """
    batch: list[bytes] = []
    batched = 0
    pending: asyncio.Future[None] | None = None
    try:
        try:
            async for chunk in stream:
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH:
                    if pending is not None:
                        await pending
                    # At most two batches in memory: one being written, one arriving.
                    pending = asyncio.ensure_future(_write(sink, batch, progress))
                    batch, batched = [], 0
        except Exception:
            if pending is not None:
                await pending  # a failed write (IntegrityError) outranks the stream's error
            with contextlib.suppress(SpkError, OSError):
                await _write(sink, batch, progress)
            raise
        if pending is not None:
            await pending
        await _write(sink, batch, progress)
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # the store finishes its batch; sink.close() waits for it
        elif pending is not None and not pending.cancelled():
            pending.exception()  # raised above already, or superseded by the error in flight


async def _write(sink: BlobSink, batch: list[bytes], progress: Progress) -> None:
    if batch:
        await sink.write(batch)
        progress.bytes_pulled += sum(len(c) for c in batch)


async def _aclose(stream: AsyncIterator[bytes]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.debug("closing a blob stream failed", exc_info=True)


def is_expected(exc: BaseException) -> bool:
    """Our own errors carry their explanation; anything else is a bug worth a traceback."""
    while isinstance(exc, ReconcileFailed) and exc.__cause__ is not None:
        exc = exc.__cause__
    return isinstance(exc, SpkError)
