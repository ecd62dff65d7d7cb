"""Where the wheels of each published manifest came from (sync, DB thread; see db.WheelOrigin)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.state.db import Lockfile, WheelOrigin, database_proxy

ROWS_PER_INSERT = 200  # well under SQLite's bound-variable limit


@dataclass(frozen=True)
class Origin:
    url: str  # the wheel file, without credentials, query or fragment
    index_url: str  # the index it was resolved from


def record_origins(lockfile_hash: str, origins: Mapping[str, Origin]) -> None:
    """Keep (sha256 -> origin) for a manifest; a republished manifest keeps its first origins.

    Rows of manifests GC has pruned from the history go at the same time.
    """
    rows = [(lockfile_hash, sha, o.url, o.index_url) for sha, o in sorted(origins.items())]
    fields = [WheelOrigin.lockfile_hash, WheelOrigin.sha256, WheelOrigin.url, WheelOrigin.index_url]
    with database_proxy.atomic():
        for i in range(0, len(rows), ROWS_PER_INSERT):
            batch = rows[i : i + ROWS_PER_INSERT]
            WheelOrigin.insert_many(batch, fields=fields).on_conflict_ignore().execute()
        kept = Lockfile.select(Lockfile.lockfile_hash)
        WheelOrigin.delete().where(WheelOrigin.lockfile_hash.not_in(kept)).execute()


def load_origins(lockfile_hash: str) -> dict[str, Origin]:
    rows = WheelOrigin.select().where(WheelOrigin.lockfile_hash == lockfile_hash)
    return {r.sha256: Origin(r.url, r.index_url) for r in rows}
