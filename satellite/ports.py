"""The seams the reconciler depends on. Generated protobuf types never cross them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from shared.manifest import Manifest


class SyncStatus(Enum):
    SYNCING = "syncing"
    READY = "ready"
    ERROR = "error"


@dataclass(frozen=True)
class SyncReport:
    lockfile_hash: str
    status: SyncStatus
    error: str = ""
    blobs_pulled: int = 0
    bytes_pulled: int = 0
    duration_ms: int = 0
    current_hash: str = ""


class CoreClient(Protocol):
    """What the satellite needs from the core. The gRPC adapter lives in satellite/client.py."""

    async def get_manifest(self, lockfile_hash: str) -> Manifest:
        """The signed manifest; raises shared.errors.NotFound for an unknown hash."""
        ...

    def download_blob(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset` on, in chunks; NotFound for an unknown blob."""
        ...

    async def report(self, report: SyncReport) -> None: ...
