"""The reconciler's seams and results: what it needs from the store, what it returns and reports.

Kept apart from satellite/reconciler.py (which re-exports what its callers use) so the orchestration
module stays readable; nothing here does I/O.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from satellite.materialiser import PackageStore, Progress
from satellite.ports import CoreClient, SyncReport, SyncStatus
from shared import tags
from shared.manifest import Manifest, ManifestEntry

if TYPE_CHECKING:  # only passed through; no runtime tie to the file-system store
    from satellite.store import AgentState

DEFAULT_TREE_GRACE_SECONDS = 3600.0  # longer than any script run; pins protect longer ones


class ReconcileStore(PackageStore, Protocol):
    """The store operations the reconciler needs (satellite.store.SatelliteStore)."""

    def current_hash(self) -> str | None: ...
    def load_state(self) -> AgentState: ...
    def save_state(self, state: AgentState) -> None: ...
    def verify_pkg(self, sha256: str) -> list[str]: ...
    def discard_pkg(self, sha256: str) -> None: ...
    def replace_pkg(self, entry: ManifestEntry) -> None: ...
    def has_tree(self, lockfile_hash: str) -> bool: ...
    def assemble_tree(self, manifest: Manifest, replace: bool = False) -> Path: ...
    def tree_manifest(self, lockfile_hash: str) -> Manifest: ...
    def verify_tree(self, lockfile_hash: str) -> list[str]: ...
    def flip_current(self, lockfile_hash: str) -> None: ...
    def retire_others(self, now: float) -> list[str]: ...
    def gc_trees(self, grace_seconds: float, now: float) -> list[str]: ...


def _default_concurrency() -> int:
    return os.cpu_count() or 2


@dataclass(frozen=True)
class ReconcileDeps:
    """Everything a reconcile may touch. Tests pass fakes; the agent passes the real things."""

    store: ReconcileStore
    core: CoreClient
    verify_manifest: Callable[[Manifest], None]  # signature check; raises IntegrityError
    unsupported_wheels: Callable[[Iterable[str]], list[str]] = tags.unsupported_wheels
    describe_interpreter: Callable[[], str] = tags.describe_interpreter
    wall_clock: Callable[[], float] = time.time  # retirement marks and GC
    monotonic: Callable[[], float] = time.monotonic  # durations
    pull_concurrency: int = 4
    unpack_concurrency: int = field(default_factory=_default_concurrency)
    tree_grace_seconds: float = DEFAULT_TREE_GRACE_SECONDS


class Outcome(Enum):
    NOTHING_DESIRED = "nothing_desired"  # empty hash: nothing touched
    ALREADY_CURRENT = "already_current"
    FLIPPED = "flipped"
    SUPERSEDED = "superseded"  # a newer hash was requested before the flip; not flipped
    REPAIRED = "repaired"  # drift repair rebuilt the tree
    INTACT = "intact"  # drift repair found nothing to do
    FAILED = "failed"


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
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.outcome is not Outcome.FAILED


def make_result(
    target: str,
    outcome: Outcome,
    progress: Progress,
    deps: ReconcileDeps,
    started: float,
    error: str = "",
    exception: BaseException | None = None,
) -> ReconcileResult:
    """The result of a run that started at `started` (deps.monotonic) and did `progress`."""
    return ReconcileResult(
        lockfile_hash=target,
        outcome=outcome,
        error=error,
        blobs_pulled=progress.blobs_pulled,
        bytes_pulled=progress.bytes_pulled,
        pkgs_unpacked=progress.pkgs_unpacked,
        tree_built=progress.tree_built,
        duration_ms=max(0, round((deps.monotonic() - started) * 1000)),
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
    )


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """Whether a failure comes down to a full disk (or quota): an operator matter, not a bug."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
