"""What the core knows for binary deltas: which wheel a blob is, and which pairs were computed.

Sync functions, run through Database.run. A blob's identity (distribution, version, tags) comes
from the published manifests: the blob index knows only sha256 and size. `WheelCatalog` keeps the
manifests it has parsed (they never change once published), so a sync's GetDeltas costs one query
for the list of lockfiles plus the rows of the pairs it asks about.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from packaging.utils import canonicalize_name

from core.state import releases
from core.state.db import BLOB_PATCH, BlobRecord, DeltaPatch, Lockfile, database_proxy, now
from core.state.lockfiles import get_manifest
from shared.manifest import Manifest, ManifestEntry

READY = "ready"
USELESS = "useless"
ROWS_PER_QUERY = 400  # well under SQLite's bound-variable limit


@dataclass(frozen=True)
class WheelRef:
    """A wheel blob as delta planning sees it."""

    sha256: str
    name: str  # normalized (PEP 503)
    version: str
    tags: str  # the file name's python-abi-platform part: same tags, same environment
    size: int
    filename: str = ""

    @classmethod
    def of(cls, entry: ManifestEntry) -> WheelRef:
        stem = entry.filename[: -len(".whl")] if entry.filename.endswith(".whl") else ""
        parts = stem.split("-")
        tags = "-".join(parts[-3:]) if len(parts) >= 5 else ""
        return cls(
            entry.sha256,
            canonicalize_name(entry.name),
            entry.version,
            tags,
            entry.size,
            entry.filename,
        )


@dataclass(frozen=True)
class PatchRow:
    target_sha256: str
    base_sha256: str
    status: str  # READY | USELESS
    patch_sha256: str = ""
    patch_size: int = 0
    target_size: int = 0
    window_log: int = 0
    compute_ms: int = 0
    reason: str = ""


class WheelCatalog:
    """sha256 -> WheelRef over every manifest in the history (parsed once each). Thread-safe:
    with Postgres the database runs on several threads."""

    def __init__(self) -> None:
        self._parsed: set[str] = set()
        self._wheels: dict[str, WheelRef] = {}
        self._lock = threading.Lock()

    def lookup(self, shas: Iterable[str]) -> dict[str, WheelRef]:
        with self._lock:
            self._refresh()
            return {s: self._wheels[s] for s in shas if s in self._wheels}

    def _refresh(self) -> None:
        hashes = {str(r.lockfile_hash) for r in Lockfile.select(Lockfile.lockfile_hash)}
        for lockfile_hash in sorted(hashes - self._parsed):
            for entry in get_manifest(lockfile_hash).entries:
                self._wheels.setdefault(entry.sha256, WheelRef.of(entry))
            self._parsed.add(lockfile_hash)
        # A pruned manifest's wheels stay known: a satellite may still hold them as bases.


def rows_for(targets: Sequence[str]) -> dict[tuple[str, str], PatchRow]:
    """Every computed pair whose target is one of `targets`, by (target, base)."""
    found: dict[tuple[str, str], PatchRow] = {}
    unique = list(dict.fromkeys(targets))
    for i in range(0, len(unique), ROWS_PER_QUERY):
        query = DeltaPatch.select().where(
            DeltaPatch.target_sha256.in_(unique[i : i + ROWS_PER_QUERY])
        )
        for r in query:
            row = PatchRow(
                str(r.target_sha256),
                str(r.base_sha256),
                str(r.status),
                str(r.patch_sha256),
                int(r.patch_size),
                int(r.target_size),
                int(r.window_log),
                int(r.compute_ms),
                str(r.reason),
            )
            found[(row.target_sha256, row.base_sha256)] = row
    return found


def record(row: PatchRow, backend: str = "") -> None:
    """Store a computed pair; a ready one also gets the patch's blob index row (kind patch),
    in the same transaction, so GC and migration see the patch exactly when it is offered."""
    with database_proxy.atomic():
        if row.status == READY:
            BlobRecord.insert(
                sha256=row.patch_sha256,
                size=row.patch_size,
                backend=backend,
                created_at=now(),
                kind=BLOB_PATCH,
            ).on_conflict_ignore().execute()
        fields = {
            DeltaPatch.status: row.status,
            DeltaPatch.patch_sha256: row.patch_sha256,
            DeltaPatch.patch_size: row.patch_size,
            DeltaPatch.target_size: row.target_size,
            DeltaPatch.window_log: row.window_log,
            DeltaPatch.compute_ms: row.compute_ms,
            DeltaPatch.reason: row.reason[:256],
            DeltaPatch.created_at: now(),
        }
        # ON CONFLICT ... DO UPDATE: SQLite and Postgres alike (two instances may compute the
        # same pair; the content-addressed patch is the same either way).
        DeltaPatch.insert(
            {
                DeltaPatch.target_sha256: row.target_sha256,
                DeltaPatch.base_sha256: row.base_sha256,
                **fields,
            }
        ).on_conflict(
            conflict_target=[DeltaPatch.target_sha256, DeltaPatch.base_sha256], update=fields
        ).execute()


def upgrade_pairs(sequence: int) -> list[tuple[WheelRef, WheelRef]]:
    """(base, target) for every wheel release `sequence` changed: per environment, the same
    distribution's wheel in the release before it (the likely base on a satellite)."""
    history = sorted(releases.list_releases(), key=lambda r: r.sequence)
    index = next((i for i, r in enumerate(history) if r.sequence == sequence), None)
    if not index:  # unknown, or the first release: nothing to patch from
        return []
    new, old = history[index], history[index - 1]
    pairs: dict[tuple[str, str], tuple[WheelRef, WheelRef]] = {}
    for environment, new_hash in new.manifests:
        old_hash = old.hash_for(environment)
        if old_hash is None or old_hash == new_hash:
            continue
        before = _by_name(get_manifest(old_hash))
        for name, target in _by_name(get_manifest(new_hash)).items():
            base = before.get(name)
            if base is not None and base.sha256 != target.sha256 and base.tags == target.tags:
                pairs[(base.sha256, target.sha256)] = (base, target)
    return list(pairs.values())


def _by_name(manifest: Manifest) -> dict[str, WheelRef]:
    return {ref.name: ref for ref in map(WheelRef.of, manifest.entries)}


# ---- GC's view (core/storage/gc.py) ----


def patch_targets() -> dict[str, str]:
    """patch sha256 -> the sha256 of the wheel it produces (ready pairs only)."""
    query = DeltaPatch.select(DeltaPatch.patch_sha256, DeltaPatch.target_sha256).where(
        DeltaPatch.status == READY
    )
    targets: dict[str, str] = {}
    for r in query:
        targets.setdefault(str(r.patch_sha256), str(r.target_sha256))
    return targets


def prune_rows() -> int:
    """Drop pairs whose target is gone from the blob index, or whose patch blob is; how many."""
    indexed = BlobRecord.select(BlobRecord.sha256)
    with database_proxy.atomic():
        gone_target = DeltaPatch.delete().where(DeltaPatch.target_sha256.not_in(indexed))
        removed = int(gone_target.execute())
        gone_patch = DeltaPatch.delete().where(
            (DeltaPatch.status == READY) & DeltaPatch.patch_sha256.not_in(indexed)
        )
        return removed + int(gone_patch.execute())
