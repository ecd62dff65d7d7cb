"""Releases: one signed manifest per environment under one sequence, published all or nothing.

Sync functions, run through Database.run. The desired release is `InstallStateRow.desired_sequence`;
`InstallStateRow.lockfile_hash` mirrors its default environment's hash for older clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import peewee as pw
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.state import environments
from core.state.db import (
    InstallStateRow,
    Lockfile,
    Release,
    ReleaseManifest,
    database_proxy,
    now,
    upsert,
)
from core.state.lockfiles import get_manifest
from shared.environments import Environment
from shared.errors import NotFound
from shared.manifest import Manifest
from shared.signing import sign_manifest


@dataclass(frozen=True)
class ReleaseView:
    """A release as the hub and the admin API see it; `manifests` in environment order."""

    sequence: int
    created_at: int
    manifests: tuple[tuple[str, str], ...]  # (environment name, lockfile hash); first = default

    def hash_for(self, environment: str) -> str | None:
        return next((h for name, h in self.manifests if name == environment), None)

    @property
    def hashes(self) -> tuple[str, ...]:
        return tuple(h for _, h in self.manifests)


def desired_sequence() -> int:
    return int(InstallStateRow.get_by_id(1).desired_sequence)


def get_release(sequence: int) -> ReleaseView:
    row = Release.get_or_none(Release.sequence == sequence)
    if row is None:
        raise NotFound(f"no release with sequence {sequence}")
    members = (
        ReleaseManifest.select()
        .where(ReleaseManifest.sequence == sequence)
        .order_by(ReleaseManifest.position, ReleaseManifest.environment)
    )
    return ReleaseView(
        int(row.sequence),
        int(row.created_at),
        tuple((m.environment, m.lockfile_hash) for m in members),
    )


def desired_release() -> ReleaseView | None:
    sequence = desired_sequence()
    return get_release(sequence) if sequence else None


def desired_manifests() -> list[tuple[str, Manifest]]:
    """(environment, manifest) of the desired release, default first; [] before any install."""
    release = desired_release()
    if release is None:
        return []
    return [(name, get_manifest(h)) for name, h in release.manifests]


def list_releases() -> list[ReleaseView]:
    """Every release in the history, newest first."""
    rows = ReleaseManifest.select().order_by(
        ReleaseManifest.sequence.desc(), ReleaseManifest.position, ReleaseManifest.environment
    )
    created = {int(r.sequence): int(r.created_at) for r in Release.select()}
    grouped: dict[int, list[tuple[str, str]]] = {}
    for m in rows:
        grouped.setdefault(int(m.sequence), []).append((m.environment, m.lockfile_hash))
    return [ReleaseView(s, created.get(s, 0), tuple(ms)) for s, ms in grouped.items()]


def release_for_hash(lockfile_hash: str) -> int:
    """The newest release holding `lockfile_hash`; NotFound when none does."""
    found = (
        ReleaseManifest.select(pw.fn.MAX(ReleaseManifest.sequence))
        .where(ReleaseManifest.lockfile_hash == lockfile_hash)
        .scalar()
    )
    if not found:
        raise NotFound(f"no release holds lockfile {lockfile_hash}")
    return int(found)


def next_sequence() -> int:
    top_lockfile = Lockfile.select(pw.fn.MAX(Lockfile.sequence)).scalar() or 0
    top_release = Release.select(pw.fn.MAX(Release.sequence)).scalar() or 0
    return max(int(top_lockfile), int(top_release)) + 1


def publish_release(
    manifests: Mapping[str, Manifest], key: Ed25519PrivateKey, order: list[str]
) -> tuple[ReleaseView, dict[str, Manifest]]:
    """Sign every manifest under one new sequence, record them and make the release desired.

    One transaction: a reader sees the previous release or all of this one. `order` lists the
    environment names, the default first. The caller holds the installer lock.
    """
    with database_proxy.atomic():
        sequence = next_sequence()
        created = now()
        Release.insert(sequence=sequence, created_at=created).execute()
        signed: dict[str, Manifest] = {}
        for position, name in enumerate(order):
            stamped = dataclasses.replace(
                manifests[name], sequence=sequence, created_at_unix=created
            )
            manifest = sign_manifest(stamped, key)
            signed[name] = manifest
            upsert(
                Lockfile,
                lockfile_hash=manifest.lockfile_hash,
                sequence=sequence,
                manifest_json=manifest.to_json(),
                entry_count=len(manifest.entries),
                total_size=manifest.total_size,
                created_at=created,
                environment=name,
            )
            ReleaseManifest.insert(
                sequence=sequence,
                environment=name,
                lockfile_hash=manifest.lockfile_hash,
                position=position,
            ).execute()
        default_hash = signed[order[0]].lockfile_hash if order else ""
        InstallStateRow.update(desired_sequence=sequence, lockfile_hash=default_hash).where(
            InstallStateRow._meta.primary_key == 1
        ).execute()
        return get_release(sequence), signed


def republish(sequence: int, key: Ed25519PrivateKey) -> tuple[ReleaseView, dict[str, Manifest]]:
    """Rollback: the manifests of an old release, re-signed as a new release."""
    old = get_release(sequence)
    manifests = {name: get_manifest(h) for name, h in old.manifests}
    return publish_release(manifests, key, [name for name, _ in old.manifests])


def same_as_desired(hashes: Mapping[str, str]) -> bool:
    """Whether the desired release already is exactly these (environment -> hash)."""
    release = desired_release()
    return release is not None and dict(release.manifests) == dict(hashes)


def configured_for_fanout() -> tuple[ReleaseView | None, list[Environment]]:
    """What the hub matches satellites against: the desired release and the admin's list."""
    return desired_release(), environments.list_environments()
