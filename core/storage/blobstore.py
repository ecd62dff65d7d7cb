"""Content-addressed blob storage: one interface, several backends (filesystem for now).

A blob is a wheel file; its id is the sha256 (hex) of its bytes. Stores are idempotent (putting
a blob twice is a no-op) and never expose a half-written blob under its final name. Every sha256
passes `check_sha256` before it becomes part of a path, so an id can never be `../x`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from shared.errors import IntegrityError, InvalidArgument, NotFound, StoreError
from shared.fsutil import fsync_dir, publish_file
from shared.hashing import READ_CHUNK
from shared.names import check_sha256

BLOB_SUFFIX = ".whl"
_TMP_PREFIX = ".tmp-"


class BlobStore(Protocol):
    """What the install pipeline, the distribution servicer, GC and migration rely on."""

    @property
    def name(self) -> str:
        """The backend's registry name (read-only, so the registry can report its active one)."""
        ...

    def has(self, sha256: str) -> bool: ...

    def locate(self, sha256: str) -> str | None:
        """The name of the backend that holds the blob, or None."""
        ...

    def size(self, sha256: str) -> int | None: ...

    def local_path(self, sha256: str) -> Path | None:
        """The blob as a file on this host, if the backend keeps it as one (read-only use)."""
        ...

    def put_file(self, sha256: str, src: Path) -> bool:
        """Store `src` as blob `sha256`; False if it was already present (idempotent)."""
        ...

    def open_read(self, sha256: str, offset: int = 0) -> BinaryIO:
        """A reader positioned at `offset`; NotFound if the blob is missing."""
        ...

    def delete(self, sha256: str) -> bool: ...

    def list(self) -> Iterator[str]: ...


class FilesystemBlobStore:
    """Blobs at root/ab/<sha256>.whl (the first two hex characters shard the directory)."""

    name = "filesystem"

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        digest = check_sha256(sha256)
        return self.root / digest[:2] / f"{digest}{BLOB_SUFFIX}"

    def locate(self, sha256: str) -> str | None:
        return self.name if self.has(sha256) else None

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def size(self, sha256: str) -> int | None:
        try:
            return self.path_for(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def local_path(self, sha256: str) -> Path | None:
        path = self.path_for(sha256)
        return path if path.is_file() else None

    def put_file(self, sha256: str, src: Path) -> bool:
        final = self.path_for(sha256)
        digest = final.name[: -len(BLOB_SUFFIX)]
        if final.is_file():
            return False
        # Unique per writer, so concurrent puts of the same blob never share a temp file.
        tmp = final.with_name(f"{_TMP_PREFIX}{digest[:16]}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            actual = self._fill(tmp, src)
            if actual != digest:
                # The one choke point every blob passes: content must match its address.
                raise IntegrityError(f"{src.name}: sha256 is {actual}, expected {digest}")
            publish_file(tmp, final)  # fsync, rename, fsync dir: never a half-written blob
        except OSError as exc:
            raise StoreError(f"cannot store blob {digest}: {exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return True

    @staticmethod
    def _fill(tmp: Path, src: Path) -> str:
        """Make `tmp` hold src's bytes (hard link when possible, else a copy); return its sha256."""
        h = hashlib.sha256()
        try:
            # Same filesystem: a link costs no copy. The pipeline hands over a file it is done
            # with (its download scratch), so sharing the inode is safe here.
            os.link(src, tmp)
        except OSError:
            with src.open("rb") as fin, tmp.open("xb") as fout:
                while chunk := fin.read(READ_CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
            return h.hexdigest()
        with tmp.open("rb") as f:
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def open_read(self, sha256: str, offset: int = 0) -> BinaryIO:
        if offset < 0:
            raise InvalidArgument("offset", "must be >= 0")
        path = self.path_for(sha256)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"blob {check_sha256(sha256)} is not in the {self.name} store") from None
        size = os.fstat(f.fileno()).st_size
        if offset > size:
            f.close()
            raise InvalidArgument("offset", f"{offset} is beyond the blob's {size} bytes")
        f.seek(offset)
        return f

    def delete(self, sha256: str) -> bool:
        path = self.path_for(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete blob {path.name}: {exc}") from None
        fsync_dir(path.parent)
        return True

    def list(self) -> Iterator[str]:
        """Every stored blob id; temp files and anything that is not a blob are skipped."""
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir() or len(shard.name) != 2:
                continue
            for entry in sorted(shard.iterdir()):
                digest = entry.name[: -len(BLOB_SUFFIX)]
                if entry.name.endswith(BLOB_SUFFIX) and digest[:2] == shard.name:
                    with contextlib.suppress(InvalidArgument):
                        yield check_sha256(digest)

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a crash left behind (call at startup, before any put)."""
        removed = 0
        for tmp in self.root.glob(f"??/{_TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
        return removed
