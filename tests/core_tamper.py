"""Play the attacker who controls the core's database or blob store (for defence-in-depth tests).

These helpers write straight into a core's data dir while it runs, the way a compromised store
would; the satellite must still refuse anything the signing key does not vouch for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

from core.state import lockfiles, releases
from core.state.db import InstallStateRow, Lockfile, open_database
from core.state.environments import native_target
from core.state.keys import SecretBox, load_or_create_key
from shared.manifest import Manifest, ManifestEntry
from shared.signing import sign_manifest


def _open(data_dir: Path) -> SecretBox:
    open_database(data_dir)
    return SecretBox(load_or_create_key(data_dir))


def put_blob(data_dir: Path, wheel: Path) -> ManifestEntry:
    """Copy a wheel into the filesystem blob store under its sha256, bypassing every check."""
    data = wheel.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    dest = data_dir / "blobs" / sha[:2] / f"{sha}.whl"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wheel, dest)
    name, version = wheel.name.split("-")[:2]
    return ManifestEntry(name.replace("_", "-"), version, wheel.name, sha, len(data), True)


def publish_signed(data_dir: Path, entries: list[ManifestEntry]) -> str:
    """A manifest signed with the core's real key (as if the attacker had it) made desired."""
    box = _open(data_dir)
    key = lockfiles.load_or_create_signing_key(box)
    manifest = Manifest.build(entries, native_target())
    _, signed = releases.publish_release({"default": manifest}, key, ["default"])
    return signed["default"].lockfile_hash


def rewrite_desired(data_dir: Path, change: object) -> str:
    """Replace the desired manifest's stored JSON with `change(manifest)` (no re-signing)."""
    _open(data_dir)
    desired = lockfiles.desired_hash()
    row = Lockfile.get_by_id(desired)
    manifest = Manifest.from_json(row.manifest_json)
    tampered = change(manifest)  # type: ignore[operator]
    Lockfile.update(manifest_json=tampered.to_json()).where(
        Lockfile.lockfile_hash == desired
    ).execute()
    return desired


def make_desired(data_dir: Path, lockfile_hash: str) -> None:
    """Point the desired release at an existing (older) one without re-publishing: a replay."""
    _open(data_dir)
    sequence = releases.release_for_hash(lockfile_hash)
    InstallStateRow.update(lockfile_hash=lockfile_hash, desired_sequence=sequence).execute()


def sign_with(manifest: Manifest, key: object) -> Manifest:
    return sign_manifest(dataclasses.replace(manifest), key)  # type: ignore[arg-type]
