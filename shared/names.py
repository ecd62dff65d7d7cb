"""Name and version rules for the allowlist (PEP 503 names, exact PEP 440 versions)."""

from __future__ import annotations

import re

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from shared.errors import InvalidArgument

# PEP 508 distribution name: letters/digits, inner . _ - ; starts and ends alphanumeric.
_NAME_RE = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
MAX_NAME_LENGTH = 128
MAX_VERSION_LENGTH = 64
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def normalize_name(raw: str, field: str = "name") -> str:
    """Return the PEP 503 form of a distribution name, or raise InvalidArgument."""
    name = raw.strip()
    if not name:
        raise InvalidArgument(field, "a package name is required")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_NAME_LENGTH} characters")
    if not _NAME_RE.match(name):
        raise InvalidArgument(
            field,
            f"{name!r} is not a valid distribution name (letters, digits and inner . _ - only)",
        )
    return canonicalize_name(name)


def exact_version(raw: str, field: str = "version") -> str:
    """Return the normalised exact PEP 440 version, or raise InvalidArgument.

    Ranges, wildcards, "latest" and local versions are refused: the allowlist pins.
    """
    text = raw.strip()
    rule = "must be one exact PEP 440 version such as 2.31.0 or 1.0.0rc1"
    if not text:
        raise InvalidArgument(field, f"is empty; {rule}")
    if len(text) > MAX_VERSION_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_VERSION_LENGTH} characters")
    try:
        version = Version(text)
    except InvalidVersion:
        raise InvalidArgument(field, f"{text!r} {rule}") from None
    if version.local is not None:
        raise InvalidArgument(field, f"{text!r}: local versions (+...) are not on an index; {rule}")
    return str(version)


def check_sha256(raw: str, field: str = "sha256") -> str:
    value = raw.strip().lower()
    if not _SHA256_RE.match(value):
        raise InvalidArgument(field, "must be 64 lowercase hex characters (a sha256)")
    return value


def check_lockfile_hash(raw: str, field: str = "lockfile_hash") -> str:
    return check_sha256(raw, field)
