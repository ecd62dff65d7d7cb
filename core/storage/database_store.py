"""Database blob store: blobs as chunked rows in the core's own database (SQLite or Postgres).

Needs no extra infrastructure and is shared by every core instance on the same Postgres. A blob is
one `StoredBlob` header plus `BlobChunk` rows of `chunk_size` bytes (the last one shorter), written
in one transaction with the header last, so a header means a complete blob. Reads fetch one chunk
per query: a download streams without ever holding the whole wheel in memory.

Every call runs in the caller's thread on that thread's own peewee connection; callers on the event
loop go through `asyncio.to_thread` like they do for the filesystem store.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import peewee as pw

from core.state.db import BlobChunk, StoredBlob, database_proxy
from shared.errors import IntegrityError, InvalidArgument, NotFound, StoreError
from shared.names import check_sha256

# 1 MiB: the same slice the distribution stream sends, so a download costs one query per message.
CHUNK_SIZE = 1024 * 1024


class DatabaseBlobStore:
    """BlobStore over the StoredBlob / BlobChunk tables (core/state/db.py, schema migration 2)."""

    name = "database"

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        if chunk_size <= 0:
            raise InvalidArgument("chunk_size", "must be positive")
        self.chunk_size = chunk_size

    def locate(self, sha256: str) -> str | None:
        return self.name if self.has(sha256) else None

    def has(self, sha256: str) -> bool:
        digest = check_sha256(sha256)
        return bool(StoredBlob.select().where(StoredBlob.sha256 == digest).exists())

    def size(self, sha256: str) -> int | None:
        row = StoredBlob.get_or_none(StoredBlob.sha256 == check_sha256(sha256))
        return None if row is None else int(row.size)

    def local_path(self, sha256: str) -> Path | None:
        return None  # rows, not files

    def put_file(self, sha256: str, src: Path) -> bool:
        digest = check_sha256(sha256)
        if self.has(digest):
            return False
        try:
            with database_proxy.atomic():
                size, count = self._insert_chunks(digest, src)
                StoredBlob.insert(
                    sha256=digest, size=size, chunk_size=self.chunk_size, chunk_count=count
                ).execute()
        except pw.IntegrityError:
            # A concurrent writer stored the same blob first; content-addressed, so that is fine.
            if self.has(digest):
                return False
            raise StoreError(f"cannot store blob {digest} in the database") from None
        except OSError as exc:
            raise StoreError(f"cannot read {src.name} to store blob {digest}: {exc}") from None
        return True

    def _insert_chunks(self, digest: str, src: Path) -> tuple[int, int]:
        """Insert the chunks, hashing as they go; IntegrityError (rolls the transaction back)."""
        h = hashlib.sha256()
        size = seq = 0
        with src.open("rb") as f:
            while chunk := f.read(self.chunk_size):
                h.update(chunk)
                BlobChunk.insert(sha256=digest, seq=seq, data=chunk).execute()
                size += len(chunk)
                seq += 1
        actual = h.hexdigest()
        if actual != digest:
            # The one choke point every blob passes: content must match its address.
            raise IntegrityError(f"{src.name}: sha256 is {actual}, expected {digest}")
        return size, seq

    def open_read(self, sha256: str, offset: int = 0) -> BinaryIO:
        digest = check_sha256(sha256)
        if offset < 0:
            raise InvalidArgument("offset", "must be >= 0")
        row = StoredBlob.get_or_none(StoredBlob.sha256 == digest)
        if row is None:
            raise NotFound(f"blob {digest} is not in the {self.name} store")
        if offset > row.size:
            raise InvalidArgument("offset", f"{offset} is beyond the blob's {row.size} bytes")
        raw = _ChunkReader(digest, int(row.size), int(row.chunk_size), offset)
        return io.BufferedReader(raw, buffer_size=int(row.chunk_size))

    def delete(self, sha256: str) -> bool:
        digest = check_sha256(sha256)
        with database_proxy.atomic():
            # Header first: from here on readers see the blob as absent, never as half there.
            gone = StoredBlob.delete().where(StoredBlob.sha256 == digest).execute()
            BlobChunk.delete().where(BlobChunk.sha256 == digest).execute()
        return bool(gone)

    def list(self) -> Iterator[str]:
        """Every stored blob id, sorted; fetched up front so no cursor outlives the call."""
        query = StoredBlob.select(StoredBlob.sha256).order_by(StoredBlob.sha256)
        return iter([str(row.sha256) for row in query])


class _ChunkReader(io.RawIOBase):
    """Serves reads from BlobChunk rows, one query per chunk, keeping the last chunk for reuse."""

    def __init__(self, sha256: str, size: int, chunk_size: int, offset: int) -> None:
        super().__init__()
        self._sha = sha256
        self._size = size
        self._chunk_size = chunk_size
        self._pos = offset
        self._cached: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._pos >= self._size:
            return 0
        seq, within = divmod(self._pos, self._chunk_size)
        data = self._chunk(seq)[within : within + len(buffer)]
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def _chunk(self, seq: int) -> bytes:
        if self._cached is not None and self._cached[0] == seq:
            return self._cached[1]
        row = BlobChunk.get_or_none((BlobChunk.sha256 == self._sha) & (BlobChunk.seq == seq))
        if row is None:
            # Deleted while we streamed it (GC or a migration's delete_source): the client
            # resumes from its offset and the registry finds the blob's new home.
            raise StoreError(f"blob {self._sha} was removed from the database store mid-read")
        data = bytes(row.data)  # Postgres hands back a memoryview
        self._cached = (seq, data)
        return data
