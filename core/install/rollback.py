"""Rollback: make a lockfile from the history the desired one again, and push it to the fleet.

The manifest is re-signed under a new, higher sequence (satellites refuse lower sequences as
replays), so a rollback is indistinguishable from a fresh publish of that exact set. It holds the
installer lock, so GC cannot delete a blob between the check that all blobs exist and the push.
"""

from __future__ import annotations

import asyncio
import json
import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.fanout.hub import Hub
from core.state import lockfiles
from core.state.db import Database, InstallStateRow, database_proxy, now
from core.state.locks import Activity, InstallerLock
from core.storage.blobstore import BlobStore
from shared.errors import FailedPrecondition
from shared.manifest import Manifest, ManifestEntry
from shared.names import check_lockfile_hash

log = logging.getLogger(__name__)
MAX_NAMED = 10  # missing blobs listed by name in the error; the rest are counted


def missing_blobs(manifest: Manifest, store: BlobStore) -> list[ManifestEntry]:
    return [e for e in manifest.entries if not store.has(e.sha256)]


def make_desired(manifest: Manifest, key: Ed25519PrivateKey) -> Manifest:
    """Re-publish under the next sequence and make it desired, in one transaction."""
    with database_proxy.atomic():
        published = lockfiles.publish(manifest, key)
        InstallStateRow.update(
            status="ready",
            lockfile_hash=published.lockfile_hash,
            attempted_hash=published.lockfile_hash,
            finished_at=now(),
            total_bytes=published.total_size,
            warnings_json=json.dumps([]),
            error="",
            phase="",
        ).where(InstallStateRow._meta.primary_key == 1).execute()
    return published


async def rollback(
    lockfile_hash: str,
    db: Database,
    lock: InstallerLock,
    store: BlobStore,
    key: Ed25519PrivateKey,
    hub: Hub,
) -> Manifest:
    """NotFound for an unknown hash; FailedPrecondition when blobs are gone or the lock is busy."""
    wanted = check_lockfile_hash(lockfile_hash)
    lease = await lock.acquire(Activity.ROLLBACK)
    try:
        manifest = await db.run(lockfiles.get_manifest, wanted)
        if await db.run(lockfiles.desired_hash) == wanted:
            return manifest  # already desired: nothing to push, no new sequence
        missing = await asyncio.to_thread(missing_blobs, manifest, store)
        if missing:
            named = ", ".join(f"{e.name}=={e.version} ({e.sha256})" for e in missing[:MAX_NAMED])
            more = f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else ""
            raise FailedPrecondition(
                f"cannot roll back to {wanted}: {len(missing)} of its blobs are gone"
                f" (garbage-collected?): {named}{more}; add those pins and run InstallNow instead"
            )
        published = await db.run(make_desired, manifest, key)
    finally:
        await lease.release()
    hub.publish(published.lockfile_hash)
    log.info("rolled back to %s (sequence %d)", published.lockfile_hash, published.sequence)
    return published
