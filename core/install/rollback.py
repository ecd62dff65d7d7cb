"""Rollback: make a release from the history desired again (all its environments), and push it.

Its manifests are re-signed under a new, higher sequence (satellites refuse lower sequences as
replays), so a rollback is indistinguishable from a fresh publish of that exact release. It holds
the installer lock, so GC cannot delete a blob between the check that all blobs exist and the
push.
"""

from __future__ import annotations

import asyncio
import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.fanout.desired import load_desired
from core.fanout.hub import Hub
from core.install.install_state import EnvProgress, read_state, update_state
from core.state import releases
from core.state.db import Database, database_proxy, now
from core.state.lockfiles import get_manifest
from core.state.locks import Activity, InstallerLock
from core.storage.blobstore import BlobStore
from shared.errors import FailedPrecondition, InvalidArgument
from shared.manifest import Manifest, ManifestEntry
from shared.names import check_lockfile_hash

log = logging.getLogger(__name__)
MAX_NAMED = 10  # missing blobs listed by name in the error; the rest are counted


def missing_blobs(manifest: Manifest, store: BlobStore) -> list[ManifestEntry]:
    return [e for e in manifest.entries if not store.has(e.sha256)]


def _target_sequence(lockfile_hash: str, sequence: int) -> int:
    if sequence:
        releases.get_release(sequence)  # NotFound for an unknown one
        return sequence
    if not lockfile_hash:
        raise InvalidArgument("release_sequence", "name the release, or a lockfile_hash in it")
    return releases.release_for_hash(check_lockfile_hash(lockfile_hash))


def make_desired(sequence: int, key: Ed25519PrivateKey) -> releases.ReleaseView:
    """Re-publish the release under the next sequence and make it desired, in one transaction.

    The install state says `ready` with no error: the last install's error (or warnings) are
    about a set that is no longer desired.
    """
    with database_proxy.atomic():
        release, signed = releases.republish(sequence, key)
        default = signed[release.manifests[0][0]]
        update_state(
            status="ready",
            lockfile_hash=default.lockfile_hash,
            attempted_hash=default.lockfile_hash,
            finished_at=now(),
            total_bytes=default.total_size,
            warnings=[],
            error="",
            phase="",
            environments=[
                EnvProgress(name, "ready", m.lockfile_hash, len(m.entries), m.total_size)
                for name, m in signed.items()
            ],
        )
    return release


def confirm_desired(release: releases.ReleaseView) -> None:
    """The install state says `ready` on `release` (the desired one), without a stale error."""
    state = read_state()
    if state.status != "error":
        return
    envs = [(name, get_manifest(h)) for name, h in release.manifests]
    update_state(
        status="ready",
        attempted_hash=state.lockfile_hash,
        warnings=[],
        error="",
        phase="",
        environments=[
            EnvProgress(name, "ready", m.lockfile_hash, len(m.entries), m.total_size)
            for name, m in envs
        ],
    )


async def rollback(
    lockfile_hash: str,
    db: Database,
    lock: InstallerLock,
    store: BlobStore,
    key: Ed25519PrivateKey,
    hub: Hub,
    sequence: int = 0,
) -> releases.ReleaseView:
    """NotFound for an unknown release; FailedPrecondition when blobs are gone or the lock is
    busy. A release that is already desired is left as it is (no new sequence)."""
    lease = await lock.acquire(Activity.ROLLBACK)
    try:
        wanted = await db.run(_target_sequence, lockfile_hash, sequence)
        old = await db.run(releases.get_release, wanted)
        current = await db.run(releases.desired_release)
        if current is not None and dict(current.manifests) == dict(old.manifests):
            # Already desired: nothing to push, no new sequence. A failed install since then
            # is about a set that was just declined: the answer must not carry its error.
            await db.run(confirm_desired, current)
            return current
        manifests = [await db.run(get_manifest, h) for h in old.hashes]
        missing = [
            (m, e) for m in manifests for e in await asyncio.to_thread(missing_blobs, m, store)
        ]
        if missing:
            named = ", ".join(f"{e.name}=={e.version} ({e.sha256})" for _, e in missing[:MAX_NAMED])
            more = f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else ""
            raise FailedPrecondition(
                f"cannot roll back to release {wanted}: {len(missing)} of its blobs are gone"
                f" (garbage-collected?): {named}{more}; add those pins and run InstallNow instead"
            )
        release = await db.run(make_desired, wanted, key)
    finally:
        await lease.release()
    hub.publish(await db.run(load_desired))
    log.info("rolled back to release %d as release %d", wanted, release.sequence)
    return release
