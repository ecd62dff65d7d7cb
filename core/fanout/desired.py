"""Read the desired release from the database in the shape the hub fans out (sync; DB thread)."""

from __future__ import annotations

import functools

from core.fanout.hub import Desired
from core.state import environments, releases
from core.state.lockfiles import get_manifest
from shared.manifest import TargetEnvironment
from shared.tags import native_platform


@functools.lru_cache(maxsize=256)
def _target_of(lockfile_hash: str) -> TargetEnvironment:
    # A lockfile hash covers its environment, so this never changes for a given hash.
    return get_manifest(lockfile_hash).environment


def load_desired() -> Desired:
    release = releases.desired_release()
    configured = tuple(environments.list_environments())
    if release is None:
        return Desired(configured=configured, native_platform=native_platform())
    manifests = tuple((name, _target_of(h), h) for name, h in release.manifests)
    return Desired(release.sequence, manifests, configured, native_platform())
