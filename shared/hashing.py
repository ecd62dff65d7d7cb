"""Streaming sha256 verification: hash while data flows, compare once at the end."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from shared.errors import IntegrityError

READ_CHUNK = 1024 * 1024


class StreamVerifier:
    """Feed chunks in order; `finish()` raises IntegrityError on a size or hash mismatch."""

    def __init__(self, what: str, expected_sha256: str, expected_size: int | None = None) -> None:
        self.what = what
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.expected_size is not None and self.size > self.expected_size:
            raise IntegrityError(
                f"{self.what}: more data than the declared {self.expected_size} bytes; refused"
            )
        self._hash.update(chunk)

    def finish(self) -> None:
        if self.expected_size is not None and self.size != self.expected_size:
            raise IntegrityError(
                f"{self.what}: size {self.size} bytes, expected {self.expected_size}"
            )
        actual = self._hash.hexdigest()
        if actual != self.expected_sha256:
            raise IntegrityError(
                f"{self.what}: sha256 mismatch, expected {self.expected_sha256}, got {actual}"
            )


def verify_chunks(
    what: str, chunks: Iterable[bytes], expected_sha256: str, expected_size: int | None = None
) -> None:
    verifier = StreamVerifier(what, expected_sha256, expected_size)
    for chunk in chunks:
        verifier.update(chunk)
    verifier.finish()


def sha256_file(path: Path, start_hash: hashlib._Hash | None = None) -> str:
    h = start_hash or hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_chunks(path: Path, offset: int = 0, chunk_size: int = READ_CHUNK) -> Iterable[bytes]:
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(chunk_size):
            yield chunk
