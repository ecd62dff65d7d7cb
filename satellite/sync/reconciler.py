"""Converge this satellite to a desired lockfile hash: pure orchestration over injected seams.

`reconcile_to_hash(target, deps)` never touches the disk or the network itself; every effect goes
through the Protocols of satellite/sync/ports.py: `deps.pkgs`, `deps.trees`, `deps.state` (in
production one satellite.store.AsyncStore), `deps.core` (satellite/client.py) and
`deps.verify_manifest`. Steps:

    nothing desired -> report READY, touch nothing
    current == target -> report READY, tree GC
    report SYNCING (in the background, landing before anything after it) -> manifest
      -> verify (hash, signature, sequence, wheel tags)
      -> ask for patches (one GetDeltas, waiting for ones being computed only about as long as
         this host's link needs for the whole wheels) and URLs (one GetBlobLocations)
      -> per package, concurrently: pull the blob if missing (a patch where offered, verified
         like the whole blob; resumes) -> unpack -> publish in groups
      -> assemble the tree -> still the newest request? -> flip -> retire others
      -> report READY -> tree GC -> store GC (blobs and packages no tree needs)

Failures never raise out of `reconcile_to_hash` (only cancellation does, and a failure to read
`current` before anything started): they are reported to the core as ERROR, recorded in the
agent state and returned as a FAILED result, so the worker loop (satellite/sync/worker.py) stays
simple and `current` is never touched by a failed run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from satellite.sync.link_rate import patch_wait_ms, updated_rate
from satellite.sync.materialiser import ensure_pkgs, is_expected, plan_sources
from satellite.sync.ports import ReconcileDeps, StoreGcReport, SyncReport, SyncStatus
from satellite.sync.results import Outcome, Progress, ReconcileResult, make_result, sync_report
from shared.errors import FailedPrecondition, IntegrityError, InvalidArgument, is_disk_full
from shared.manifest import Manifest, ManifestEntry
from shared.names import check_lockfile_hash

log = logging.getLogger(__name__)


class _Superseded(Exception):
    pass


def _delta_wait(deps: ReconcileDeps, rate: float) -> Callable[[int], int | None]:
    """How long the core may wait for patches, by the bytes of wheels they would replace."""
    fixed = deps.delta_wait_seconds
    if fixed is not None:
        return lambda _bytes: int(1000 * fixed)
    return lambda wheel_bytes: patch_wait_ms(rate, wheel_bytes)


async def _materialise_pkgs(
    entries: tuple[ManifestEntry, ...], deps: ReconcileDeps, progress: Progress, rate: float
) -> None:
    # Without URLs or deltas nothing is asked: the core streams every blob, as it always did.
    asks = deps.urls is not None or deps.deltas
    missing = await deps.pkgs.missing_pkgs(entries) if asks else None
    sources = await plan_sources(
        missing or [],
        deps.pkgs,
        deps.core,
        deps.urls,
        deps.blob_base_url,
        deps.deltas,
        deps.max_window_log,
        _delta_wait(deps, rate),
    )
    await ensure_pkgs(
        entries,
        deps.pkgs,
        sources,
        progress,
        deps.pull_concurrency,
        deps.unpack_concurrency,
        missing,
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
    trees = deps.trees
    current = await trees.current_hash()
    if not target:
        await _record(deps, desired_hash="", status=SyncStatus.READY, error="")
        await _report(deps, SyncReport("", SyncStatus.READY, current_hash=current or ""))
        return ReconcileResult("", Outcome.NOTHING_DESIRED)
    if current == target:
        await _record(deps, desired_hash=target, status=SyncStatus.READY, error="")
        await _report(deps, SyncReport(target, SyncStatus.READY, current_hash=target))
        collected = await collect_trees(deps)
        return ReconcileResult(target, Outcome.ALREADY_CURRENT, trees_collected=collected)

    progress = Progress()
    try:
        check_lockfile_hash(target, "desired lockfile hash")
    except InvalidArgument as exc:  # never let a malformed hash near a path or the state
        return await _failed(target, exc, progress, deps, started, current)
    # Recorded and reported while the sync goes on (a state fsync and a round trip to the core,
    # 7-60 ms of wsci's one-pin sync), and awaited before anything is recorded or reported
    # after it, so the core and the state file see SYNCING first.
    syncing = asyncio.ensure_future(_syncing(deps, target, current))
    try:
        try:
            manifest = await deps.core.get_manifest(target)
            state = await deps.state.load_state()
            _check_manifest(manifest, target, state.highest_sequence, deps)
            if not await trees.has_tree(target):
                rate = state.pull_bytes_per_second
                await _materialise_pkgs(manifest.entries, deps, progress, rate)
                if not still_wanted():
                    raise _Superseded
                await trees.assemble_tree(manifest)
                progress.tree_built = True
            if not still_wanted():
                raise _Superseded
            await trees.flip_current(target)
        finally:
            await syncing
    except _Superseded:
        log.info("reconcile to %s superseded by a newer request before the flip", target)
        return _result(target, Outcome.SUPERSEDED, progress, deps, started)
    except Exception as exc:
        return await _failed(target, exc, progress, deps, started, current)

    result = _result(target, Outcome.FLIPPED, progress, deps, started)
    log.info(
        "flipped to %s: %d blobs pulled (%d from patches), %d bytes on the wire for %d bytes"
        " of wheels, %d packages unpacked in %d ms",
        target,
        result.blobs_pulled,
        result.patches_used,
        result.bytes_pulled,
        result.wheel_bytes,
        result.pkgs_unpacked,
        result.duration_ms,
    )
    await _record(
        deps,
        status=SyncStatus.READY,
        error="",
        highest_sequence=max(state.highest_sequence, manifest.sequence),
        pull_rate=updated_rate(
            state.pull_bytes_per_second, progress.bytes_pulled, progress.pull_clock.busy_seconds
        ),
    )
    try:
        await trees.retire_others(deps.wall_clock())
    except Exception:  # the new tree is live; a missed mark is retried after the next flip
        log.exception("retiring old trees after the flip to %s failed", target)
    await _report(deps, sync_report(result, SyncStatus.READY, target))
    collected = await collect_trees(deps)
    store_gc = await collect_store(deps)
    return replace(result, trees_collected=collected, store_gc=store_gc)


def _result(
    target: str,
    outcome: Outcome,
    progress: Progress,
    deps: ReconcileDeps,
    started: float,
    error: str = "",
    exception: BaseException | None = None,
    drift_repair: bool = False,
) -> ReconcileResult:
    duration = deps.monotonic() - started
    return make_result(target, outcome, progress, duration, error, exception, drift_repair)


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
    full = is_disk_full(exc)
    if full:
        message += "; the satellite's data disk is full: free space there, the agent retries"
    quiet = full or is_expected(exc)  # a traceback only for what looks like a bug
    log.error("reconcile to %s failed: %s", target, message, exc_info=not quiet)
    result = _result(target, Outcome.FAILED, progress, deps, started, message, exc)
    await _record(deps, status=SyncStatus.ERROR, error=message)
    await _report(deps, sync_report(result, SyncStatus.ERROR, current or ""))
    return result


async def repair_tree(lockfile_hash: str, deps: ReconcileDeps) -> ReconcileResult:
    """Drift repair: re-hash a tree and, if anything differs, rebuild it in place.

    Packages whose files changed (a write through a tree's link changes `pkgs/` too) are
    discarded and unpacked again from their blobs; blobs that are gone or rotten are pulled.
    """
    started = deps.monotonic()
    pkgs, trees = deps.pkgs, deps.trees
    progress = Progress()
    try:
        problems = await trees.verify_tree(lockfile_hash)
        if not problems:
            return _result(
                lockfile_hash, Outcome.INTACT, progress, deps, started, drift_repair=True
            )
        log.warning("tree %s drifted: %s", lockfile_hash, "; ".join(problems[:10]))
        manifest = await trees.tree_manifest(lockfile_hash)
        missing = {e.sha256 for e in await pkgs.missing_pkgs(manifest.entries)}
        for entry in manifest.entries:
            if entry.sha256 not in missing and await pkgs.verify_pkg(entry.sha256):
                log.warning("package %s drifted too; unpacking it again", entry.filename)
                # Swapped in whole: trees link into the package, so discarding it first would
                # leave the current tree with a hole until the rebuild.
                await pkgs.replace_pkg(entry)
        rate = (await deps.state.load_state()).pull_bytes_per_second
        await _materialise_pkgs(manifest.entries, deps, progress, rate)
        await trees.assemble_tree(manifest, replace=True)
        progress.tree_built = True
    except Exception as exc:
        message = f"repairing tree {lockfile_hash}: {exc}"
        log.error("%s", message, exc_info=not is_expected(exc))
        return _result(
            lockfile_hash, Outcome.FAILED, progress, deps, started, message, exc, drift_repair=True
        )
    return _result(lockfile_hash, Outcome.REPAIRED, progress, deps, started, drift_repair=True)


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


async def collect_trees(deps: ReconcileDeps) -> tuple[str, ...]:
    """Tree GC with the configured grace; never fails (housekeeping), returns what went."""
    try:
        removed = await deps.trees.gc_trees(deps.tree_grace_seconds, deps.wall_clock())
    except Exception:  # GC is housekeeping: it must never fail a reconcile
        log.exception("tree GC failed")
        return ()
    if removed:
        log.info("tree GC removed %s", ", ".join(removed))
    return tuple(removed)


async def collect_store(deps: ReconcileDeps) -> StoreGcReport | None:
    """Store GC (blobs/ and pkgs/) after tree GC; housekeeping, so a failure is only logged.
    Called only by the reconcile worker: no reconcile can be about to use what it deletes."""
    if not deps.store_gc.enabled:
        return None
    try:
        report = await deps.trees.gc_store(
            deps.store_gc, deps.tree_grace_seconds, deps.wall_clock()
        )
    except Exception as exc:
        log.error("store GC failed: %s", exc, exc_info=not is_expected(exc))
        return None
    if report.blobs_removed or report.pkgs_removed or report.trees_evicted:
        log.info(
            "store GC removed %d blobs, %d packages, %d trees (%d bytes); the store holds %d bytes",
            report.blobs_removed,
            report.pkgs_removed,
            report.trees_evicted,
            report.bytes_freed,
            report.store_bytes,
        )
    if report.over_cap:
        log.warning(
            "the store holds %d bytes, above --max-store-bytes %d, and all of it is in use"
            " (the current tree, pinned runs)",
            report.store_bytes,
            deps.store_gc.max_store_bytes,
        )
    return report


async def _syncing(deps: ReconcileDeps, target: str, current: str | None) -> None:
    await _record(deps, desired_hash=target, status=SyncStatus.SYNCING, error="")
    await _report(deps, SyncReport(target, SyncStatus.SYNCING, current_hash=current or ""))


async def _record(
    deps: ReconcileDeps,
    status: SyncStatus,
    error: str,
    desired_hash: str | None = None,
    highest_sequence: int | None = None,
    pull_rate: float | None = None,
) -> None:
    """Update the agent state (None keeps a field); bookkeeping, so a failure is only logged."""
    try:
        old = await deps.state.load_state()
        new = replace(old, status=status.value, error=error)
        if desired_hash is not None:
            new = replace(new, desired_hash=desired_hash)
        if highest_sequence is not None:
            new = replace(new, highest_sequence=highest_sequence)
        if pull_rate is not None:
            new = replace(new, pull_bytes_per_second=pull_rate)
        if new != old:
            await deps.state.save_state(replace(new, updated_at_unix=deps.wall_clock()))
    except Exception as exc:
        # The old state stays whole (saved atomically); a full disk is no bug to trace.
        log.error("recording the agent state failed: %s", exc, exc_info=not is_disk_full(exc))


async def _report(deps: ReconcileDeps, report: SyncReport) -> None:
    try:
        await deps.core.report(report)
    except Exception as exc:  # the core may be the thing that is down; the state file has it
        log.warning(
            "reporting %s for %s failed: %s", report.status.value, report.lockfile_hash, exc
        )
