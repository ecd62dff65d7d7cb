"""Manifest history, the desired hash and the signing key. Sync functions (run via Database.run)."""

from __future__ import annotations

import base64
import dataclasses
import json

import peewee as pw
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.state.db import InstallStateRow, Lockfile, Setting, database_proxy, now, upsert
from core.state.keys import SecretBox, new_signing_key, signing_key_from_bytes, signing_key_to_bytes
from shared.errors import NotFound
from shared.manifest import Manifest
from shared.signing import sign_manifest

SIGNING_KEY = "signing_key"


def load_or_create_signing_key(box: SecretBox) -> Ed25519PrivateKey:
    """Kept in the database (encrypted) so every core instance signs with the same key."""
    with database_proxy.atomic():
        row = Setting.get_or_none(Setting.key == SIGNING_KEY)
        if row is None:
            key = new_signing_key()
            ct = box.encrypt(signing_key_to_bytes(key), "signing key")
            value = json.dumps({"ct": base64.b64encode(ct).decode()})
            Setting.insert(key=SIGNING_KEY, value=value).on_conflict_ignore().execute()
            row = Setting.get(Setting.key == SIGNING_KEY)
    raw = box.decrypt(base64.b64decode(json.loads(row.value)["ct"]), "signing key")
    return signing_key_from_bytes(raw)


def rotate_signing_key(box: SecretBox) -> Ed25519PrivateKey:
    """A fresh signing key replaces the old one; running cores pick it up on restart."""
    key = new_signing_key()
    ct = box.encrypt(signing_key_to_bytes(key), "signing key")
    value = json.dumps({"ct": base64.b64encode(ct).decode()})
    Setting.replace(key=SIGNING_KEY, value=value).execute()
    return key


def desired_hash() -> str:
    return str(InstallStateRow.get_by_id(1).lockfile_hash)


def get_manifest(lockfile_hash: str) -> Manifest:
    row = Lockfile.get_or_none(Lockfile.lockfile_hash == lockfile_hash)
    if row is None:
        raise NotFound(f"no manifest with lockfile hash {lockfile_hash}")
    return Manifest.from_json(row.manifest_json)


def publish(manifest: Manifest, key: Ed25519PrivateKey) -> Manifest:
    """Sign under the next sequence and record it in the history (republish keeps one row).

    The caller makes it desired in the same transaction (see `make_desired`).
    """
    top = Lockfile.select(pw.fn.MAX(Lockfile.sequence)).scalar() or 0
    stamped = dataclasses.replace(manifest, sequence=top + 1, created_at_unix=now())
    signed = sign_manifest(stamped, key)
    upsert(
        Lockfile,
        lockfile_hash=signed.lockfile_hash,
        sequence=signed.sequence,
        manifest_json=signed.to_json(),
        entry_count=len(signed.entries),
        total_size=signed.total_size,
        created_at=signed.created_at_unix,
    )
    return signed


def list_lockfiles() -> list[tuple[Lockfile, bool]]:
    """Every manifest in the history, newest first; the flag: the default environment's desired."""
    current = desired_hash()
    rows = Lockfile.select().order_by(Lockfile.sequence.desc(), Lockfile.environment)
    return [(r, r.lockfile_hash == current) for r in rows]
