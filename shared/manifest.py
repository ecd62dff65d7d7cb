"""The manifest model, its lockfile hash and the canonical bytes that get signed.

Pure data: no I/O, no generated protobuf types (see shared/wire.py for those).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TargetEnvironment:
    """What the lockfile was resolved for. `platform` empty means the core's native platforms."""

    python_version: str
    implementation: str = "cp"
    abi: str = ""
    platform: str = ""

    def describe(self) -> str:
        plat = self.platform or "native"
        return f"{self.implementation}{self.python_version} abi={self.abi or 'any'} platform={plat}"

    def as_dict(self) -> dict[str, str]:
        return {
            "python_version": self.python_version,
            "implementation": self.implementation,
            "abi": self.abi,
            "platform": self.platform,
        }


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    version: str
    filename: str
    sha256: str
    size: int
    requested: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "filename": self.filename,
            "sha256": self.sha256,
            "size": self.size,
            "requested": self.requested,
        }


def _sort_key(entry: ManifestEntry) -> tuple[str, str, str]:
    return (entry.name, entry.version, entry.filename)


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def lockfile_hash(entries: list[ManifestEntry], environment: TargetEnvironment) -> str:
    """sha256 (hex) over the sorted entries plus the environment; independent of input order."""
    body = {
        "entries": [e.as_dict() for e in sorted(entries, key=_sort_key)],
        "environment": environment.as_dict(),
        "format": 1,
    }
    return hashlib.sha256(_canonical(body)).hexdigest()


@dataclass(frozen=True)
class Manifest:
    lockfile_hash: str
    entries: tuple[ManifestEntry, ...]
    environment: TargetEnvironment
    sequence: int = 0
    created_at_unix: int = 0
    signature: bytes = b""
    signing_key_id: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def build(
        cls, entries: list[ManifestEntry], environment: TargetEnvironment, **kw: object
    ) -> Manifest:
        ordered = tuple(sorted(entries, key=_sort_key))
        return cls(lockfile_hash(list(ordered), environment), ordered, environment, **kw)  # type: ignore[arg-type]

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries)

    def computed_hash(self) -> str:
        return lockfile_hash(list(self.entries), self.environment)

    def signing_bytes(self) -> bytes:
        """Canonical bytes the signature covers: entries, environment, sequence, lockfile hash."""
        return _canonical(
            {
                "entries": [e.as_dict() for e in sorted(self.entries, key=_sort_key)],
                "environment": self.environment.as_dict(),
                "lockfile_hash": self.lockfile_hash,
                "sequence": self.sequence,
                "format": 1,
            }
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "lockfile_hash": self.lockfile_hash,
                "entries": [e.as_dict() for e in self.entries],
                "environment": self.environment.as_dict(),
                "sequence": self.sequence,
                "created_at_unix": self.created_at_unix,
                "signature": self.signature.hex(),
                "signing_key_id": self.signing_key_id,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls(
            lockfile_hash=raw["lockfile_hash"],
            entries=tuple(ManifestEntry(**e) for e in raw["entries"]),
            environment=TargetEnvironment(**raw["environment"]),
            sequence=int(raw.get("sequence", 0)),
            created_at_unix=int(raw.get("created_at_unix", 0)),
            signature=bytes.fromhex(raw.get("signature", "")),
            signing_key_id=raw.get("signing_key_id", ""),
        )
