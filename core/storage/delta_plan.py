"""Which patch serves which wanted blob: the pure half of binary deltas (no I/O, no clock).

A satellite asks once per sync: "I lack these blobs, I hold those". For each wanted wheel the
candidates are the held wheels of the same distribution with the same tags (the same
environment's build), nearest older version first, then nearest newer. The first candidate with
a stored patch small enough is offered; the first one never computed is scheduled (one new
computation per wanted wheel and request, so a request cannot queue a pile of work); a pair
remembered as useless is skipped. `worth_offering` is the threshold rule, applied again on every
request, so a lowered threshold takes effect without recomputing anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from core.state.patches import READY, USELESS, PatchRow, WheelRef
from shared.zstd_patch import DEFAULT_LEVEL, DEFAULT_MAX_WINDOW_LOG, window_log_for


@dataclass(frozen=True)
class DeltaPolicy:
    """The core's delta settings (spk-core serve --delta-*)."""

    enabled: bool = True
    threshold: float = 0.5  # offer a patch only if smaller than this fraction of the wheel
    level: int = DEFAULT_LEVEL  # zstd level: CPU per pair against bytes per satellite
    max_window_log: int = DEFAULT_MAX_WINDOW_LOG  # base + target must fit 2**this (memory)
    workers: int = 1  # patches computed at once (each holds base, target and zstd's tables)
    wait_seconds: float = 20.0  # a GetDeltas waits this long for pairs being computed
    max_queued: int = 256  # pending computations beyond this are dropped (computed on demand)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError("delta threshold must be in (0, 1]")
        if self.workers < 1 or self.max_queued < 1 or self.wait_seconds < 0:
            raise ValueError("delta workers and queue must be >= 1, the wait >= 0")
        if not 10 <= self.max_window_log <= 31:
            raise ValueError("delta max window log must be within 10..31")


@dataclass(frozen=True)
class Offer:
    target_sha256: str
    base_sha256: str
    patch_sha256: str
    patch_size: int
    window_log: int
    target_size: int = 0  # the wheel's: what the satellite would pull without the patch


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def base_candidates(target: WheelRef, held: Iterable[WheelRef]) -> list[WheelRef]:
    """Held wheels that may serve as `target`'s base, best first."""
    mine = _version(target.version)
    same = [
        w
        for w in held
        if w.name == target.name and w.tags == target.tags and w.sha256 != target.sha256
    ]
    if mine is None:
        return sorted(same, key=lambda w: w.sha256)
    older: list[tuple[Version, WheelRef]] = []
    newer: list[tuple[Version, WheelRef]] = []
    for w in same:
        v = _version(w.version)
        if v is None:
            continue
        (older if v <= mine else newer).append((v, w))
    older.sort(key=lambda p: (p[0], p[1].sha256), reverse=True)
    newer.sort(key=lambda p: (p[0], p[1].sha256))
    return [w for _, w in older + newer]


def fits_window(base: WheelRef, target: WheelRef, policy: DeltaPolicy) -> bool:
    return window_log_for(base.size, target.size) <= policy.max_window_log


def worth_offering(row: PatchRow, policy: DeltaPolicy) -> bool:
    return (
        row.status == READY
        and row.target_size > 0
        and row.patch_size <= policy.threshold * row.target_size
        and row.window_log <= policy.max_window_log
    )


def plan_offers(
    wanted: Sequence[WheelRef],
    held: Sequence[WheelRef],
    rows: Mapping[tuple[str, str], PatchRow],
    policy: DeltaPolicy,
) -> tuple[list[Offer], list[tuple[WheelRef, WheelRef]]]:
    """(offers, pairs to compute): at most one of either per wanted wheel."""
    offers: list[Offer] = []
    compute: list[tuple[WheelRef, WheelRef]] = []
    if not policy.enabled:
        return offers, compute
    for target in wanted:
        for base in base_candidates(target, held):
            row = rows.get((target.sha256, base.sha256))
            if row is None:
                if fits_window(base, target, policy):
                    compute.append((base, target))
                    break
                continue  # too big for the window: not worth a row, never computed
            if worth_offering(row, policy):
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
                break
            if row.status not in (READY, USELESS):  # pragma: no cover -- defensive
                continue
    return offers, compute
