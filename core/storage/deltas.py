"""Binary deltas at the core: compute each (base, target) patch once, store it as a blob, offer it.

    after_publish(sequence)   background: patches from the previous release's wheels (the bases
                              satellites most likely hold) to the ones this release changed
    offers(wanted, bases)     GetDeltas: what the planner (delta_plan.py) picks; pairs never
                              computed are computed now, waited for up to `wait_seconds` or
                              the satellite's own bound (its link's time for the wheels)

Bounds: `workers` computations at once, in a thread pool of that size (zstd releases the GIL);
each holds the base, the target and zstd's tables for a window of at most 2**max_window_log
bytes; at most `max_queued` wait; nothing here ever delays an install's `ready` or a sync's
blobs (a pair still computing when the wait ends is simply not offered this time). A patch is
stored content-addressed through the same BlobStore as wheels (its index row has kind `patch`),
so backends, migration and GetBlobLocations handle it like any blob; GC (gc.py) removes a patch
once its target is gone. A failure is logged and retried no sooner than RETRY_SECONDS later.
Each computation's end is told to `observer` (core/api/metrics.py counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from core.state import patches
from core.state.db import Database
from core.state.patches import READY, USELESS, PatchRow, WheelCatalog, WheelRef
from core.storage.blobstore import BlobStore
from core.storage.delta_plan import DeltaPolicy, Offer, fits_window, plan_offers, worth_offering
from shared.errors import IntegrityError
from shared.hashing import READ_CHUNK
from shared.zstd_patch import make_patch, patch_base, window_log_for

log = logging.getLogger(__name__)
RETRY_SECONDS = 600.0
MAX_PER_REQUEST = 4096


class DeltaObserver(Protocol):
    """Told how each patch computation ended: ready (stored, offered), useless (computed or
    judged too big to keep), failed (an error; retried later)."""

    def delta_computed(self, result: str) -> None: ...


class DeltaService:
    def __init__(self, db: Database, store: BlobStore, policy: DeltaPolicy, work_dir: Path) -> None:
        self.policy = policy
        self._db = db
        self._store = store
        self._work_dir = work_dir
        self._catalog = WheelCatalog()  # touched only in the database thread
        self._pool = ThreadPoolExecutor(max_workers=policy.workers, thread_name_prefix="delta")
        self._slots = asyncio.Semaphore(policy.workers)
        self._inflight: dict[tuple[str, str], asyncio.Task[PatchRow | None]] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._dropped_logged = False
        self.observer: DeltaObserver | None = None
        # Temp files of an earlier process (killed while storing a patch); ours are unique.
        for leftover in work_dir.glob("delta-*") if work_dir.is_dir() else []:
            with contextlib.suppress(OSError):
                leftover.unlink()

    # ---- GetDeltas ----

    async def offers(
        self, wanted: Sequence[str], bases: Sequence[str], max_wait: float | None = None
    ) -> list[Offer]:
        """Offers for `wanted` from `bases`; pairs still computing are waited for up to the
        policy's wait, or `max_wait` (the asker's bound) when that is shorter."""
        if not self.policy.enabled or not wanted or not bases:
            return []
        targets, held, rows = await self._db.run(self._load, list(wanted), list(bases))
        offers, compute = plan_offers(targets, held, rows, self.policy)
        scheduled = [(b, t, self._schedule(b, t)) for b, t in compute]
        running = [(b, t, task) for b, t, task in scheduled if task is not None]
        wait = (
            self.policy.wait_seconds
            if max_wait is None
            else min(max_wait, self.policy.wait_seconds)
        )
        if not running or wait <= 0:
            return offers
        # Wait without cancelling: the computation goes on for the next satellite if we give up.
        await asyncio.wait([task for *_, task in running], timeout=wait)
        for base, target, task in running:
            row = task.result() if task.done() and not task.cancelled() else None
            if row is not None and worth_offering(row, self.policy):
                offers.append(
                    Offer(
                        target.sha256,
                        base.sha256,
                        row.patch_sha256,
                        row.patch_size,
                        row.window_log,
                        target.size,
                    )
                )
        return offers

    def _load(
        self, wanted: list[str], bases: list[str]
    ) -> tuple[list[WheelRef], list[WheelRef], dict[tuple[str, str], PatchRow]]:
        """(Database thread) the wheels named, and the pairs computed for the wanted ones."""
        known = self._catalog.lookup([*wanted, *bases])
        targets = [known[s] for s in dict.fromkeys(wanted) if s in known]
        held = [known[s] for s in dict.fromkeys(bases) if s in known]
        return targets, held, patches.rows_for([t.sha256 for t in targets])

    # ---- after a publish ----

    def after_publish(self, sequence: int) -> None:
        """Start computing the patches this release will be asked for; returns at once."""
        if not self.policy.enabled:
            return
        task = asyncio.create_task(self._precompute(sequence), name=f"deltas-{sequence}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _precompute(self, sequence: int) -> None:
        try:
            pairs = await self._db.run(patches.upgrade_pairs, sequence)
            rows = await self._db.run(patches.rows_for, [t.sha256 for _, t in pairs])
        except Exception:
            log.exception("deltas for release %d: reading the release failed", sequence)
            return
        todo = [(b, t) for b, t in pairs if (t.sha256, b.sha256) not in rows]
        if todo:
            log.info("deltas for release %d: computing %d patch(es)", sequence, len(todo))
        for base, target in todo:
            self._schedule(base, target)

    # ---- computing ----

    def _schedule(self, base: WheelRef, target: WheelRef) -> asyncio.Task[PatchRow | None] | None:
        key = (target.sha256, base.sha256)
        running = self._inflight.get(key)
        if running is not None:
            return running
        failed_at = self._failed.get(key)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_SECONDS:
            return None
        if len(self._inflight) >= self.policy.max_queued:
            if not self._dropped_logged:
                log.warning(
                    "deltas: %d computations queued already; more are computed on request",
                    len(self._inflight),
                )
                self._dropped_logged = True
            return None
        task = asyncio.create_task(self._compute(base, target), name=f"delta-{target.filename}")
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return task

    async def _compute(self, base: WheelRef, target: WheelRef) -> PatchRow | None:
        key = (target.sha256, base.sha256)
        try:
            async with self._slots:
                loop = asyncio.get_running_loop()
                row, backend = await loop.run_in_executor(
                    self._pool, self._compute_sync, base, target
                )
            await self._db.run(patches.record, row, backend)
        except Exception as exc:
            self._failed[key] = time.monotonic()
            if self.observer is not None:
                self.observer.delta_computed("failed")
            log.warning(
                "delta %s -> %s failed (retried in %d s): %s",
                base.filename or base.sha256[:12],
                target.filename or target.sha256[:12],
                RETRY_SECONDS,
                exc,
            )
            return None
        self._failed.pop(key, None)
        self._dropped_logged = False
        if self.observer is not None:
            self.observer.delta_computed("ready" if row.status == READY else "useless")
        if row.status == READY:
            log.info(
                "delta %s -> %s: %d bytes (%.1f%% of %d) in %d ms",
                base.filename,
                target.filename,
                row.patch_size,
                100 * row.patch_size / max(1, row.target_size),
                row.target_size,
                row.compute_ms,
            )
        else:
            log.info("delta %s -> %s not kept: %s", base.filename, target.filename, row.reason)
        return row

    def _compute_sync(self, base: WheelRef, target: WheelRef) -> tuple[PatchRow, str]:
        """(Worker thread) Make the patch; store it when it is worth offering."""
        started = time.monotonic()
        policy = self.policy
        if not fits_window(base, target, policy):
            need = window_log_for(base.size, target.size)
            reason = f"needs a 2**{need} window, the limit is 2**{policy.max_window_log}"
            return PatchRow(
                target.sha256, base.sha256, USELESS, target_size=target.size, reason=reason
            ), ""
        old = patch_base(self._read(base))  # zstd's copy only
        new = self._read(target)
        patch, window_log = make_patch(old, new, policy.level, policy.max_window_log)
        del old, new
        elapsed = round((time.monotonic() - started) * 1000)
        size = len(patch)
        if size > policy.threshold * target.size:
            share = size / target.size
            reason = f"the patch is {share:.2f} of the wheel (threshold {policy.threshold})"
            return PatchRow(
                target.sha256,
                base.sha256,
                USELESS,
                patch_size=size,
                target_size=target.size,
                window_log=window_log,
                compute_ms=elapsed,
                reason=reason,
            ), ""
        digest = hashlib.sha256(patch).hexdigest()
        self._work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._work_dir / f"delta-{digest[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.write_bytes(patch)
            self._store.put_file(digest, tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        backend = self._store.locate(digest) or self._store.name
        row = PatchRow(
            target.sha256, base.sha256, READY, digest, size, target.size, window_log, elapsed
        )
        return row, backend

    def _read(self, wheel: WheelRef) -> bytes:
        """A whole blob, checked against its sha256: a rotten copy must not become a patch."""
        h = hashlib.sha256()
        parts: list[bytes] = []
        with self._store.open_read(wheel.sha256) as reader:
            while chunk := reader.read(READ_CHUNK):
                h.update(chunk)
                parts.append(chunk)
        data = b"".join(parts)
        if h.hexdigest() != wheel.sha256 or len(data) != wheel.size:
            raise IntegrityError(
                f"blob {wheel.sha256} ({wheel.filename}) in the store does not match its"
                f" sha256/size; not using it for a delta"
            )
        return data

    async def wait_idle(self) -> None:
        """For tests and the bench: until every scheduled computation has finished."""
        while self._background or self._inflight:
            await asyncio.gather(
                *self._background, *self._inflight.values(), return_exceptions=True
            )

    async def stop(self) -> None:
        for task in [*self._background, *self._inflight.values()]:
            task.cancel()
        for task in [*self._background, *self._inflight.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=True)
