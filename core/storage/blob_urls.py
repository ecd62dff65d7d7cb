"""Where satellites may fetch blobs without the core in the byte path (GetBlobLocations).

    BlobUrlPolicy     what the operator allowed: presigned S3 GETs, a CDN/mirror base URL, or off
    BlobUrls.locate() the URL for each blob that has one (sync; runs in the database thread)

A base URL names a read-only copy of the blob store (`<base>/ab/<sha256>.whl`, the layout of
both the filesystem store and the S3 prefix), behind any HTTP cache: blobs are immutable and
named by their sha256, and every byte is verified against the signed manifest on arrival, so a
cache cannot change what a satellite runs. Presigned URLs are minted per request (they are short
lived and each satellite gets its own), only for blobs the index says live in S3, and are
secrets until they expire: nothing here logs them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from core.state.db import BlobRecord
from core.storage.backends import StoreRegistry
from core.storage.s3_store import S3BlobStore
from shared.errors import InvalidArgument
from shared.names import check_sha256

MAX_PER_REQUEST = 4096


@dataclass(frozen=True)
class BlobUrlPolicy:
    presign_s3: bool = False  # hand out presigned GETs for blobs stored in S3
    presign_ttl_seconds: int = 900
    base_url: str = ""  # a CDN or mirror of the blob store; wins over presigning

    @property
    def enabled(self) -> bool:
        return self.presign_s3 or bool(self.base_url)


@dataclass(frozen=True)
class Location:
    sha256: str
    url: str
    expires_at: int  # 0: never


class BlobUrls:
    def __init__(self, policy: BlobUrlPolicy, registry: StoreRegistry) -> None:
        self.policy = policy
        self._registry = registry

    def locate(self, sha256s: Sequence[str], now: float | None = None) -> list[Location]:
        if len(sha256s) > MAX_PER_REQUEST:
            raise InvalidArgument("sha256", f"at most {MAX_PER_REQUEST} blobs per request")
        wanted = [check_sha256(s) for s in dict.fromkeys(sha256s)]
        policy = self.policy
        if not policy.enabled or not wanted:
            return []
        if policy.base_url:
            base = policy.base_url.rstrip("/")
            return [Location(s, f"{base}/{s[:2]}/{s}.whl", 0) for s in wanted]
        store = self._s3()
        if store is None:
            return []
        rows = BlobRecord.select(BlobRecord.sha256).where(
            BlobRecord.sha256.in_(wanted) & (BlobRecord.backend == store.name)
        )
        expires = int((now if now is not None else time.time()) + policy.presign_ttl_seconds)
        return [
            Location(r.sha256, store.presigned_get(r.sha256, policy.presign_ttl_seconds), expires)
            for r in rows
        ]

    def _s3(self) -> S3BlobStore | None:
        if "s3" not in self._registry.names():
            return None
        store = self._registry.get("s3")
        return store if isinstance(store, S3BlobStore) else None
