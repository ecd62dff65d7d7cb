"""Ed25519 manifest signatures: the core signs, satellites verify against a pinned public key."""

from __future__ import annotations

import dataclasses
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import IntegrityError
from shared.manifest import Manifest


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key_pem(text: str | bytes) -> Ed25519PublicKey:
    data = text.encode() if isinstance(text, str) else text
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError("the pinned signing key is not an Ed25519 public key")
    return key


def sign_manifest(manifest: Manifest, private: Ed25519PrivateKey) -> Manifest:
    signature = private.sign(manifest.signing_bytes())
    return dataclasses.replace(
        manifest, signature=signature, signing_key_id=key_id(private.public_key())
    )


def verify_manifest(manifest: Manifest, public: Ed25519PublicKey) -> None:
    """Raise IntegrityError unless the manifest is intact and signed by `public`."""
    if manifest.computed_hash() != manifest.lockfile_hash:
        raise IntegrityError(
            f"manifest {manifest.lockfile_hash[:12]}: entries do not hash to its lockfile hash"
            f" (computed {manifest.computed_hash()[:12]}); refusing it"
        )
    if not manifest.signature:
        raise IntegrityError(f"manifest {manifest.lockfile_hash[:12]} is unsigned; refusing it")
    if manifest.signing_key_id and manifest.signing_key_id != key_id(public):
        raise IntegrityError(
            f"manifest {manifest.lockfile_hash[:12]} is signed by key {manifest.signing_key_id},"
            f" expected the pinned key {key_id(public)}; refusing it (during a key rotation pin"
            " both keys: put both PEM blocks in the --signing-key file)"
        )
    try:
        public.verify(manifest.signature, manifest.signing_bytes())
    except InvalidSignature:
        raise IntegrityError(
            f"manifest {manifest.lockfile_hash[:12]}: bad signature for the pinned key; refusing it"
        ) from None


def load_public_keys_pem(text: str) -> list[Ed25519PublicKey]:
    """Every PEM public key in `text`: a satellite pins the old and the new key during rotation."""
    marker = "-----BEGIN PUBLIC KEY-----"
    blocks = [marker + part for part in text.split(marker)[1:]]
    if not blocks:
        raise IntegrityError("the signing key file holds no PEM public key")
    return [load_public_key_pem(block) for block in blocks]


def verify_manifest_any(manifest: Manifest, keys: list[Ed25519PublicKey]) -> None:
    """verify_manifest against the pinned key the manifest names (any of them if it names none)."""
    by_id = {key_id(k): k for k in keys}
    key = by_id.get(manifest.signing_key_id)
    if key is None:
        if manifest.signing_key_id or not manifest.signature:
            verify_manifest(manifest, keys[0])  # raises the precise error
        errors = []
        for candidate in keys:
            try:
                verify_manifest(manifest, candidate)
                return
            except IntegrityError as exc:
                errors.append(exc)
        raise errors[0]
    verify_manifest(manifest, key)
