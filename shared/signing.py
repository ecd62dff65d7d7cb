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
            f" expected the pinned key {key_id(public)}; refusing it"
        )
    try:
        public.verify(manifest.signature, manifest.signing_bytes())
    except InvalidSignature:
        raise IntegrityError(
            f"manifest {manifest.lockfile_hash[:12]}: bad signature for the pinned key; refusing it"
        ) from None
