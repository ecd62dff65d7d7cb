"""Fetch one blob (a wheel or a patch) into a store sink: from its URL if it has one, else the core.

Pure orchestration over satellite.sync.ports. A download resumes from the sink's partial; a
resumed download that fails verification starts over once; bytes reach the sink in batches of
WRITE_BATCH, the next batch arriving while one is written. Where a blob has a URL (a presigned
object-store GET, a CDN the core names, or the host's own mirror) its bytes come from there; the
sink verifies them exactly as it verifies the core's, and any failure falls back to the core,
resuming after the bytes that did arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from satellite.sync.ports import (
    DEFAULT_MAX_WINDOW_LOG,
    BlobSink,
    BlobSource,
    DeltaOffer,
    UrlSource,
)
from satellite.sync.results import Progress
from shared.errors import IntegrityError, SpkError

log = logging.getLogger(__name__)
WRITE_BATCH = 4 * 1024 * 1024  # bytes handed to the store per BlobSink.write


class HasSha(Protocol):
    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int
    label: str  # what a log line calls it: the wheel's file name, "patch for <file name>"


OpenSink = Callable[[str, int], Awaitable[BlobSink]]


@dataclass(frozen=True)
class Sources:
    """Where blob bytes come from: the core always, URLs for the blobs that have one, and the
    patches the core offered for blobs this satellite lacks (by target sha256)."""

    core: BlobSource
    urls: UrlSource | None = None
    locations: dict[str, str] = field(default_factory=dict)  # sha256 -> URL
    deltas: dict[str, DeltaOffer] = field(default_factory=dict)
    max_window_log: int = DEFAULT_MAX_WINDOW_LOG  # the decoder's bound for those patches


async def find_locations(
    blobs: Sequence[HasSha], core: BlobSource, urls: UrlSource | None, base_url: str
) -> dict[str, str]:
    """One question to the core for all the blobs a sync fetches (none with a host mirror)."""
    if urls is None or not blobs:
        return {}
    if base_url:
        base = base_url.rstrip("/")
        return {b.sha256: f"{base}/{b.sha256[:2]}/{b.sha256}.whl" for b in blobs}
    try:
        return await core.blob_locations([b.sha256 for b in blobs])
    except SpkError as exc:  # the core streams everything itself, as before
        log.warning("asking the core for blob URLs failed (%s); pulling from the core", exc)
        return {}


async def fetch_blob(
    ref: BlobRef, open_sink: OpenSink, sources: Sources, progress: Progress
) -> None:
    """Download one blob into the sink `open_sink` gives, resuming a partial; a bad resume
    starts over once. Counts bytes (and URL use) on `progress`, not the blob itself."""
    url = sources.locations.get(ref.sha256)
    if url is not None and sources.urls is not None:
        if await _fetch_url(ref, open_sink, sources.urls, url, progress):
            progress.blobs_by_url += 1
            return
        progress.url_fallbacks += 1
    for attempt in (1, 2):
        sink = await open_sink(ref.sha256, ref.size)
        resumed_at = sink.offset
        if resumed_at:
            log.info(
                "resuming the download of %s at offset %d of %d bytes",
                ref.label,
                resumed_at,
                ref.size,
                extra={"blob": ref.sha256, "offset": resumed_at, "bytes": ref.size},
            )
        stream = sources.core.download_blob(ref.sha256, resumed_at)
        try:
            await receive(stream, sink, progress)
            await sink.commit()
            return
        except IntegrityError:
            # The sink deleted the partial: if the old bytes were the bad ones, a fresh
            # download succeeds; if the core serves bad bytes, the second attempt fails too.
            if resumed_at == 0 or attempt == 2:
                raise
            log.warning("resumed download of %s failed verification; retrying", ref.label)
        finally:
            # Synchronous on purpose: waits at most for one batch write still finishing, and
            # must run even when this task is being cancelled. The partial stays for a resume.
            sink.close()
            await aclose(stream)


async def _fetch_url(
    ref: BlobRef, open_sink: OpenSink, urls: UrlSource, url: str, progress: Progress
) -> bool:
    """The blob from its URL, verified like any other; False (logged) on any failure, the
    partial kept when its bytes were fine so the core resumes after them."""
    sink = await open_sink(ref.sha256, ref.size)
    stream = urls.fetch(url, sink.offset)
    try:
        await receive(stream, sink, progress)
        await sink.commit()
    except SpkError as exc:
        log.warning(
            "fetching blob %s (%s) from %s failed: %s; falling back to the core",
            ref.sha256[:12],
            ref.label,
            url_host(url),
            exc,
        )
        return False
    finally:
        sink.close()
        await aclose(stream)
    return True


def url_host(url: str) -> str:
    """scheme://host of a URL: what a log line may say (a presigned query is a secret)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].rsplit('@', 1)[-1]}"


async def receive(stream: AsyncIterator[bytes], sink: BlobSink, progress: Progress) -> None:
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


async def aclose(stream: AsyncIterator[bytes]) -> None:
    aclose_ = getattr(stream, "aclose", None)
    if aclose_ is not None:
        try:
            await aclose_()
        except Exception:
            log.debug("closing a blob stream failed", exc_info=True)
