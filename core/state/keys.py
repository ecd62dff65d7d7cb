"""Secrets at rest: the core's AES-256-GCM key, bearer tokens (stored hashed), the signing key.

The secret key comes from SPK_SECRET_KEY (base64 of 32 bytes) or from `secret.key` in the data
dir, created 0600 on first start. Nothing here ever logs or returns a plaintext secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.errors import StoreError

SECRET_KEY_ENV = "SPK_SECRET_KEY"  # noqa: S105 - a variable name, not a secret
KEY_FILE = "secret.key"


class SecretBox:
    """AES-256-GCM with a random 96-bit nonce per message; `aad` binds a value to its purpose."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise StoreError("the secret key must be 32 bytes (AES-256)")
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: bytes, aad: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, aad.encode())

    def decrypt(self, blob: bytes, aad: str) -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], aad.encode())
        except InvalidTag:
            raise StoreError(
                f"cannot decrypt the stored {aad}: the secret key changed or the data is corrupt"
            ) from None


def load_or_create_key(data_dir: Path, env: dict[str, str] | None = None) -> bytes:
    environ = os.environ if env is None else env
    if raw := environ.get(SECRET_KEY_ENV):
        try:
            key = base64.b64decode(raw, validate=True)
        except ValueError:
            raise StoreError(f"{SECRET_KEY_ENV} must be base64 of 32 bytes") from None
        if len(key) != 32:
            raise StoreError(f"{SECRET_KEY_ENV} must be base64 of 32 bytes, got {len(key)}")
        return key
    path = data_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != 32:
            raise StoreError(f"{path} is not a 32-byte key") from None
        return key
    key = os.urandom(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    """Tokens are 256-bit random, so a plain sha256 is a safe one-way form to store."""
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signing_key_to_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def signing_key_from_bytes(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)
