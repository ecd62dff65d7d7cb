"""Make a manifest's packages present: pull missing blobs (resuming), verify, unpack.

Pure orchestration like the reconciler, over satellite.sync.ports (a PackageStore and a
BlobSource). Each package is its own pipeline (pull -> stage), so unpacking the first wheel
overlaps downloading the next; pulls and unpacks have separate bounds because one waits on the
network and the other on CPU and disk (the file-system store unpacks in worker threads, and
zlib, hashing and file I/O release the GIL, so unpacks use every core). Staged packages are
published together at the end: one durability sync for the batch instead of one per package.
Blob bytes reach the store in batches of WRITE_BATCH, not chunk by chunk (see _receive).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable

from satellite.sync.ports import BlobSink, BlobSource, PackageStore, Staged
from satellite.sync.results import Progress
from shared.errors import BlobCorrupt, IntegrityError, SpkError
from shared.manifest import ManifestEntry

log = logging.getLogger(__name__)
WRITE_BATCH = 4 * 1024 * 1024  # bytes handed to the store per BlobSink.write


class ReconcileFailed(SpkError):
    """One or more packages could not be materialised; the message names each of them."""


async def ensure_pkgs(
    entries: Iterable[ManifestEntry],
    store: PackageStore,
    core: BlobSource,
    progress: Progress,
    pull_concurrency: int,
    unpack_concurrency: int,
) -> None:
    """Pull and unpack every package that is not unpacked yet; ReconcileFailed names failures."""
    unique = list({e.sha256: e for e in entries}.values())
    missing = await store.missing_pkgs(unique)
    pulls = asyncio.Semaphore(pull_concurrency)
    unpacks = asyncio.Semaphore(unpack_concurrency)
    # gather, not a TaskGroup: one failure must not cancel the others midway (a store call
    # cannot be stopped halfway and would go on unobserved); every package finishes or fails
    # on its own.
    results = await asyncio.gather(
        *(_ensure_pkg(e, store, core, progress, pulls, unpacks) for e in missing),
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
    core: BlobSource,
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
    core: BlobSource,
    progress: Progress,
    pull_concurrency: int,
) -> None:
    """Only the pull half of ensure_pkgs: every missing blob, verified and in the store."""
    pulls = asyncio.Semaphore(pull_concurrency)

    async def one(entry: ManifestEntry) -> None:
        if not await store.has_blob(entry.sha256):
            async with pulls:
                await _pull(entry, store, core, progress)

    unique = {e.sha256: e for e in entries}.values()
    await asyncio.gather(*(one(e) for e in unique))


async def _pull(
    entry: ManifestEntry, store: PackageStore, core: BlobSource, progress: Progress
) -> None:
    """Download one blob into the store, resuming a partial; a bad resume starts over once."""
    for attempt in (1, 2):
        sink = await store.open_blob(entry.sha256, entry.size)
        resumed_at = sink.offset
        if resumed_at:
            log.info(
                "resuming the download of %s at offset %d of %d bytes",
                entry.filename,
                resumed_at,
                entry.size,
                extra={"blob": entry.sha256, "offset": resumed_at, "bytes": entry.size},
            )
        stream = core.download_blob(entry.sha256, resumed_at)
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
