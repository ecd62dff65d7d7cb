"""What a reconcile or a drift repair returns, and what the core is told about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from satellite.sync.link_rate import PullClock
from satellite.sync.ports import StoreGcReport, SyncReport, SyncStatus


class Outcome(Enum):
    NOTHING_DESIRED = "nothing_desired"  # empty hash: nothing touched
    ALREADY_CURRENT = "already_current"
    FLIPPED = "flipped"
    SUPERSEDED = "superseded"  # a newer hash was requested before the flip; not flipped
    REPAIRED = "repaired"  # drift repair rebuilt the tree
    INTACT = "intact"  # drift repair found nothing to do
    FAILED = "failed"


@dataclass
class Progress:
    """Counters of work actually done (what a reconcile reports to the core)."""

    blobs_pulled: int = 0
    bytes_pulled: int = 0
    pkgs_unpacked: int = 0
    tree_built: bool = False
    blobs_by_url: int = 0  # of blobs_pulled: fetched from a URL, not streamed by the core
    url_fallbacks: int = 0  # URL fetches that failed and fell back to the core
    wheel_bytes: int = 0  # the blobs those pulls produced (bytes_pulled: on the wire)
    patches_used: int = 0  # of blobs_pulled: made from a binary delta
    patch_fallbacks: int = 0  # patches that failed: the whole blob was pulled instead
    pull_clock: PullClock = field(default_factory=PullClock)  # the link rate's sample


@dataclass(frozen=True)
class ReconcileResult:
    lockfile_hash: str
    outcome: Outcome
    error: str = ""
    blobs_pulled: int = 0
    bytes_pulled: int = 0
    pkgs_unpacked: int = 0
    tree_built: bool = False
    duration_ms: int = 0
    trees_collected: tuple[str, ...] = ()
    blobs_by_url: int = 0  # of blobs_pulled: from a URL (object store, CDN), not the core
    url_fallbacks: int = 0
    wheel_bytes: int = 0  # the wheels the pulls produced; bytes_pulled counts the wire
    patches_used: int = 0
    patch_fallbacks: int = 0
    store_gc: StoreGcReport | None = None  # the store GC pass after the flip, if one ran
    # From repair_tree rather than reconcile_to_hash: a failed repair is retried as a repair.
    drift_repair: bool = False
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.outcome is not Outcome.FAILED


def make_result(
    target: str,
    outcome: Outcome,
    progress: Progress,
    duration_s: float,
    error: str = "",
    exception: BaseException | None = None,
    drift_repair: bool = False,
) -> ReconcileResult:
    """The result of a run that took `duration_s` seconds and did `progress`."""
    return ReconcileResult(
        lockfile_hash=target,
        outcome=outcome,
        error=error,
        blobs_pulled=progress.blobs_pulled,
        bytes_pulled=progress.bytes_pulled,
        pkgs_unpacked=progress.pkgs_unpacked,
        tree_built=progress.tree_built,
        duration_ms=max(0, round(duration_s * 1000)),
        blobs_by_url=progress.blobs_by_url,
        url_fallbacks=progress.url_fallbacks,
        wheel_bytes=progress.wheel_bytes,
        patches_used=progress.patches_used,
        patch_fallbacks=progress.patch_fallbacks,
        drift_repair=drift_repair,
        exception=exception,
    )


def sync_report(result: ReconcileResult, status: SyncStatus, current: str) -> SyncReport:
    """What the core is told about `result`; `current` is the tree live on this satellite."""
    return SyncReport(
        lockfile_hash=result.lockfile_hash,
        status=status,
        error=result.error,
        blobs_pulled=result.blobs_pulled,
        bytes_pulled=result.bytes_pulled,
        duration_ms=result.duration_ms,
        current_hash=current,
        wheel_bytes=result.wheel_bytes,
        patches_used=result.patches_used,
        patch_fallbacks=result.patch_fallbacks,
    )
