"""Converge this satellite to a desired lockfile hash: pure orchestration over injected seams.

`reconcile_to_hash(target, deps)` never touches the disk or the network itself; every effect goes
through `deps.store` (a ReconcileStore, in production satellite.store.SatelliteStore, called in
worker threads), `deps.core` (satellite.ports.CoreClient) and `deps.verify_manifest`. Steps:

    nothing desired -> report READY, touch nothing
    current == target -> report READY, tree GC
    report SYNCING -> manifest -> verify (hash, signature, sequence, wheel tags)
      -> per package, concurrently: pull the blob if missing (resumes) -> unpack
      -> assemble the tree -> still the newest request? -> flip -> retire others
      -> report READY -> tree GC

Failures never raise out of `reconcile_to_hash` (only cancellation does): they are reported to the
core as ERROR, recorded in the agent state and returned as a FAILED result, so the `Reconciler`
worker loop stays simple and `current` is never touched by a failed run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace

from satellite.materialiser import Progress, ensure_pkgs, is_expected
from satellite.ports import SyncReport, SyncStatus
from satellite.reconcile_types import (
    DEFAULT_TREE_GRACE_SECONDS,
    Outcome,
    ReconcileDeps,
    ReconcileResult,
    ReconcileStore,
    disk_full,
    make_result,
    sync_report,
)
from shared.errors import FailedPrecondition, IntegrityError, InvalidArgument
from shared.manifest import Manifest, ManifestEntry
from shared.names import check_lockfile_hash

__all__ = [
    "DEFAULT_TREE_GRACE_SECONDS",
    "Outcome",
    "ReconcileDeps",
    "ReconcileResult",
    "ReconcileStore",
    "Reconciler",
    "reconcile_to_hash",
    "repair_tree",
]

log = logging.getLogger(__name__)


class _Superseded(Exception):
    pass


async def _materialise_pkgs(
    entries: tuple[ManifestEntry, ...], deps: ReconcileDeps, progress: Progress
) -> None:
    await ensure_pkgs(
        entries, deps.store, deps.core, progress, deps.pull_concurrency, deps.unpack_concurrency
    )


async def reconcile_to_hash(
    target_hash: str | None,
    deps: ReconcileDeps,
    still_wanted: Callable[[], bool] = lambda: True,
) -> ReconcileResult:
    """Bring `current` to `target_hash`. See the module docstring for the steps and errors.

    `still_wanted` is asked before the tree is assembled and right before the flip; when it
    says no, the run stops with SUPERSEDED (downloaded blobs and packages stay cached).
    """
    started = deps.monotonic()
    target = target_hash or ""
    store = deps.store
    current = await asyncio.to_thread(store.current_hash)
    if not target:
        await _record(deps, desired_hash="", status=SyncStatus.READY, error="")
        await _report(deps, SyncReport("", SyncStatus.READY, current_hash=current or ""))
        return ReconcileResult("", Outcome.NOTHING_DESIRED)
    if current == target:
        await _record(deps, desired_hash=target, status=SyncStatus.READY, error="")
        await _report(deps, SyncReport(target, SyncStatus.READY, current_hash=target))
        collected = await _collect_trees(deps)
        return ReconcileResult(target, Outcome.ALREADY_CURRENT, trees_collected=collected)

    progress = Progress()
    try:
        check_lockfile_hash(target, "desired lockfile hash")
    except InvalidArgument as exc:  # never let a malformed hash near a path or the state
        return await _failed(target, exc, progress, deps, started, current)
    await _record(deps, desired_hash=target, status=SyncStatus.SYNCING, error="")
    await _report(deps, SyncReport(target, SyncStatus.SYNCING, current_hash=current or ""))
    try:
        manifest = await deps.core.get_manifest(target)
        state = await asyncio.to_thread(store.load_state)
        _check_manifest(manifest, target, state.highest_sequence, deps)
        if not await asyncio.to_thread(store.has_tree, target):
            await _materialise_pkgs(manifest.entries, deps, progress)
            if not still_wanted():
                raise _Superseded
            await asyncio.to_thread(store.assemble_tree, manifest)
            progress.tree_built = True
        if not still_wanted():
            raise _Superseded
        await asyncio.to_thread(store.flip_current, target)
    except _Superseded:
        log.info("reconcile to %s superseded by a newer request before the flip", target)
        return make_result(target, Outcome.SUPERSEDED, progress, deps, started)
    except Exception as exc:
        return await _failed(target, exc, progress, deps, started, current)

    result = make_result(target, Outcome.FLIPPED, progress, deps, started)
    log.info(
        "flipped to %s: %d blobs (%d bytes) pulled, %d packages unpacked in %d ms",
        target,
        result.blobs_pulled,
        result.bytes_pulled,
        result.pkgs_unpacked,
        result.duration_ms,
    )
    await _record(
        deps,
        status=SyncStatus.READY,
        error="",
        highest_sequence=max(state.highest_sequence, manifest.sequence),
    )
    try:
        await asyncio.to_thread(store.retire_others, deps.wall_clock())
    except Exception:  # the new tree is live; a missed mark is retried after the next flip
        log.exception("retiring old trees after the flip to %s failed", target)
    await _report(deps, sync_report(result, SyncStatus.READY, target))
    collected = await _collect_trees(deps)
    return replace(result, trees_collected=collected)


async def _failed(
    target: str,
    exc: Exception,
    progress: Progress,
    deps: ReconcileDeps,
    started: float,
    current: str | None,
) -> ReconcileResult:
    """Report and record a failed reconcile; `current` was not touched."""
    message = str(exc) or type(exc).__name__
    full = disk_full(exc)
    if full:
        message += "; the satellite's data disk is full: free space there, the agent retries"
    quiet = full or is_expected(exc)  # a traceback only for what looks like a bug
    log.error("reconcile to %s failed: %s", target, message, exc_info=not quiet)
    result = make_result(target, Outcome.FAILED, progress, deps, started, message, exc)
    await _record(deps, status=SyncStatus.ERROR, error=message)
    await _report(deps, sync_report(result, SyncStatus.ERROR, current or ""))
    return result


async def repair_tree(lockfile_hash: str, deps: ReconcileDeps) -> ReconcileResult:
    """Drift repair: re-hash a tree and, if anything differs, rebuild it in place.

    Packages whose files changed (a write through a hard link changes `pkgs/` too) are
    discarded and unpacked again from their blobs; blobs that are gone or rotten are pulled.
    """
    started = deps.monotonic()
    store = deps.store
    progress = Progress()
    try:
        problems = await asyncio.to_thread(store.verify_tree, lockfile_hash)
        if not problems:
            return make_result(lockfile_hash, Outcome.INTACT, progress, deps, started)
        log.warning("tree %s drifted: %s", lockfile_hash, "; ".join(problems[:10]))
        manifest = await asyncio.to_thread(store.tree_manifest, lockfile_hash)
        for entry in manifest.entries:
            if await asyncio.to_thread(store.has_pkg, entry.sha256):
                bad = await asyncio.to_thread(store.verify_pkg, entry.sha256)
                if bad:
                    log.warning("package %s drifted too; unpacking it again", entry.filename)
                    # Swapped in whole: trees link into pkgs/, so discarding first would
                    # leave the current tree with a hole until the rebuild.
                    await asyncio.to_thread(store.replace_pkg, entry)
        await _materialise_pkgs(manifest.entries, deps, progress)
        await asyncio.to_thread(store.assemble_tree, manifest, True)
        progress.tree_built = True
    except Exception as exc:
        message = f"repairing tree {lockfile_hash}: {exc}"
        log.error("%s", message, exc_info=not is_expected(exc))
        return make_result(lockfile_hash, Outcome.FAILED, progress, deps, started, message, exc)
    return make_result(lockfile_hash, Outcome.REPAIRED, progress, deps, started)


def _check_manifest(
    manifest: Manifest, target: str, highest_sequence: int, deps: ReconcileDeps
) -> None:
    if manifest.lockfile_hash != target:
        raise IntegrityError(
            f"asked the core for manifest {target}, got {manifest.lockfile_hash}; refusing it"
        )
    if manifest.computed_hash() != target:
        raise IntegrityError(
            f"manifest {target[:12]}: its entries hash to {manifest.computed_hash()[:12]},"
            " not to its lockfile hash; refusing it"
        )
    deps.verify_manifest(manifest)
    if manifest.sequence < highest_sequence:
        raise IntegrityError(
            f"manifest {target[:12]} has sequence {manifest.sequence}, below the highest this"
            f" satellite accepted ({highest_sequence}): a replayed or rolled-back manifest;"
            " refusing it (a rollback on the core publishes it again with a new sequence)"
        )
    unsupported = deps.unsupported_wheels(e.filename for e in manifest.entries)
    if unsupported:
        raise FailedPrecondition(
            f"{len(unsupported)} wheel(s) cannot be installed on this satellite:"
            f" {', '.join(unsupported)}; the lockfile was resolved for"
            f" {manifest.environment.describe()}, this satellite runs"
            f" {deps.describe_interpreter()}"
        )


async def _collect_trees(deps: ReconcileDeps) -> tuple[str, ...]:
    try:
        removed = await asyncio.to_thread(
            deps.store.gc_trees, deps.tree_grace_seconds, deps.wall_clock()
        )
    except Exception:  # GC is housekeeping: it must never fail a reconcile
        log.exception("tree GC failed")
        return ()
    if removed:
        log.info("tree GC removed %s", ", ".join(removed))
    return tuple(removed)


async def _record(
    deps: ReconcileDeps,
    status: SyncStatus,
    error: str,
    desired_hash: str | None = None,
    highest_sequence: int | None = None,
) -> None:
    """Update state.json (None keeps a field); bookkeeping, so a failure is only logged."""

    def update() -> None:
        old = deps.store.load_state()
        new = replace(old, status=status.value, error=error)
        if desired_hash is not None:
            new = replace(new, desired_hash=desired_hash)
        if highest_sequence is not None:
            new = replace(new, highest_sequence=highest_sequence)
        if new != old:
            deps.store.save_state(replace(new, updated_at_unix=deps.wall_clock()))

    try:
        await asyncio.to_thread(update)
    except Exception as exc:
        # The old state stays whole (written by rename); a full disk is no bug to trace.
        log.error("recording the agent state failed: %s", exc, exc_info=not disk_full(exc))


async def _report(deps: ReconcileDeps, report: SyncReport) -> None:
    try:
        await deps.core.report(report)
    except Exception as exc:  # the core may be the thing that is down; the state file has it
        log.warning(
            "reporting %s for %s failed: %s", report.status.value, report.lockfile_hash, exc
        )


class Reconciler:
    """Serialises reconciles and coalesces requests: the worker always goes for the newest hash.

    `request(h)` only records `h` and wakes the worker, so a burst h1, h2, h3 while a reconcile
    runs ends on h3 with at most one reconcile in between. A run whose hash is no longer the
    newest request stops before its flip (SUPERSEDED), so a stale hash is never made current
    after a newer one was asked for. `request_repair()` queues drift repair of `current`, done
    by the same worker so it never races a reconcile.
    """

    def __init__(
        self,
        deps: ReconcileDeps,
        on_result: Callable[[ReconcileResult], None] | None = None,
    ) -> None:
        self._deps = deps
        self._on_result = on_result
        self._desired: str | None = None
        self._requested = 0  # generation of the newest request
        self._handled = 0  # generation the worker has finished
        self._repair = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.last_result: ReconcileResult | None = None

    @property
    def desired(self) -> str | None:
        return self._desired

    def request(self, lockfile_hash: str | None) -> None:
        """Make `lockfile_hash` the target ("": nothing desired); never blocks.

        None changes nothing but re-runs the current target (a cheap no-op when `current`
        already names it): what a drift watcher wants after `current` broke.
        """
        if lockfile_hash is not None:
            self._desired = lockfile_hash
        self._requested += 1
        self._wake.set()

    def request_repair(self) -> None:
        self._repair = True
        self._requested += 1
        self._wake.set()

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="spk-reconciler")
        return self._task

    async def run(self) -> None:
        """The worker loop; runs until cancelled (see shutdown)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            generation = self._requested
            if self._repair:
                self._repair = False
                await self._repair_current()
            target = self._desired
            if target is not None:

                def still_wanted(wanted: str = target) -> bool:
                    return self._desired == wanted

                result = await reconcile_to_hash(target, self._deps, still_wanted)
                self._publish(result)
            async with self._idle:
                self._handled = generation
                self._idle.notify_all()

    async def _repair_current(self) -> None:
        current = await asyncio.to_thread(self._deps.store.current_hash)
        if current is not None:
            self._publish(await repair_tree(current, self._deps))
        # A missing or dangling `current` needs no repair: the reconcile that follows
        # rebuilds the desired tree because `current` no longer names it.

    def _publish(self, result: ReconcileResult) -> None:
        self.last_result = result
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                log.exception("reconcile result callback failed")

    async def wait_idle(self) -> ReconcileResult | None:
        """Wait until every request made so far has been handled; the last result."""
        wanted = self._requested
        async with self._idle:
            await self._idle.wait_for(lambda: self._handled >= wanted)
        return self.last_result

    async def shutdown(self) -> None:
        """Stop the worker (idempotent). A reconcile in flight is cancelled: partial downloads
        are kept for resume and unfinished builds are removed by the next cleanup_temp()."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> Reconciler:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
