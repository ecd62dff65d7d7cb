"""Verified wheel blobs on a satellite: `blobs/ab/<sha256>.whl`, resumable partial downloads.

    blobs/ab/<sha256>.whl      a verified wheel
    blobs/ab/<sha256>.json     what it is (name, version, file name): a hint for store GC and
                               delta bases, written when it is unpacked; rebuilt from trees
    blobs/.partial/<sha256>    a resumable download (a wheel's or a patch's)
    blobs/.patches/<sha256>    a verified patch, deleted once applied (or not)

A download is written to `blobs/.partial/<sha256>` while it is hashed. `BlobWriter.commit()`
checks size and sha256, fsyncs, renames into place and fsyncs the directory, so a blob under
`blobs/ab/` is always complete and was verified at least once. A partial outlives a dropped
stream and is resumed (its bytes re-hashed) by the next writer; any verification failure deletes
it, since a partial that produced a wrong hash cannot be trusted for a resume either.

Durability without a stall at the end: every WRITEBACK_STEP bytes the writer asks the kernel to
start writing the new range to disk (sync_file_range, Linux), so that writeback overlaps the
download and the fsync in commit() only waits for the tail. Measured on a 256 MiB blob over
loopback (docs/benchmarks.md): the final fsync alone took 0.4-1.1 s on this VM's disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from packaging.utils import canonicalize_name

from shared.errors import BlobCorrupt, IntegrityError, StoreError
from shared.fsutil import fsync_dir, start_writeback
from shared.hashing import READ_CHUNK, StreamVerifier, sha256_file
from shared.manifest import ManifestEntry
from shared.names import check_sha256

PARTIAL_DIR = ".partial"
PATCH_DIR = ".patches"
META_SUFFIX = ".json"
WRITEBACK_STEP = 8 * 1024 * 1024


@dataclass(frozen=True)
class BlobInfo:
    """What a held blob is, from its sidecar (or a tree's manifest)."""

    sha256: str
    name: str  # normalized
    version: str
    filename: str


def checked_sha(sha256: str) -> str:
    """The one choke point for hashes that become path components: 64 lowercase hex only."""
    try:
        return check_sha256(sha256)
    except Exception:
        raise IntegrityError(f"{sha256!r} is not a sha256 hex digest; refusing it") from None


class BlobDir:
    """The `blobs/` directory: lookups, writers and on-disk verification."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial_root = root / PARTIAL_DIR

    def path(self, sha256: str) -> Path:
        sha = checked_sha(sha256)
        return self.root / sha[:2] / f"{sha}.whl"

    def partial_path(self, sha256: str) -> Path:
        return self.partial_root / checked_sha(sha256)

    def meta_path(self, sha256: str) -> Path:
        sha = checked_sha(sha256)
        return self.root / sha[:2] / f"{sha}{META_SUFFIX}"

    def patch_path(self, sha256: str) -> Path:
        return self.root / PATCH_DIR / checked_sha(sha256)

    def note(self, entry: ManifestEntry) -> None:
        """Remember what a held blob is. A hint, written in place without a sync: a torn or lost
        one reads as unknown (rewritten here next time, or rebuilt by GC from the trees), and an
        unknown blob is only ever treated as garbage, never as needed; nothing is published by
        it, so it costs no fsync per package."""
        path = self.meta_path(entry.sha256)
        if not self.has(entry.sha256) or self._read_meta(path) is not None:
            return
        doc = {"name": entry.name, "version": entry.version, "filename": entry.filename}
        path.write_text(json.dumps(doc, sort_keys=True))

    @staticmethod
    def _read_meta(path: Path) -> BlobInfo | None:
        sha = path.name[: -len(META_SUFFIX)]
        try:
            doc = json.loads(path.read_text())
            return BlobInfo(
                checked_sha(sha),
                canonicalize_name(str(doc["name"])),
                str(doc["version"]),
                str(doc["filename"]),
            )
        except (OSError, ValueError, KeyError, TypeError, IntegrityError):
            return None

    def catalog(self) -> dict[str, BlobInfo]:
        """Every held blob with a readable sidecar."""
        found: dict[str, BlobInfo] = {}
        if not self.root.is_dir():
            return found
        for meta in self.root.glob(f"??/*{META_SUFFIX}"):
            info = self._read_meta(meta)
            if info is not None and self.has(info.sha256):
                found[info.sha256] = info
        return found

    def held(self) -> dict[str, int]:
        """sha256 -> size of every complete blob."""
        found: dict[str, int] = {}
        if not self.root.is_dir():
            return found
        for path in self.root.glob("??/*.whl"):
            sha = path.name[: -len(".whl")]
            try:
                found[checked_sha(sha)] = path.stat().st_size
            except (OSError, IntegrityError):
                continue
        return found

    def open_patch_writer(self, sha256: str, expected_size: int) -> BlobWriter:
        """A resumable download of a patch blob, published under `.patches/` when verified."""
        self.partial_root.mkdir(parents=True, exist_ok=True)
        (self.root / PATCH_DIR).mkdir(parents=True, exist_ok=True)
        return BlobWriter(self.partial_path(sha256), self.patch_path(sha256), sha256, expected_size)

    def open_patched_writer(self, sha256: str, expected_size: int) -> BlobWriter:
        """A writer for a blob made from a patch: its own partial (never resumed, so a failed
        apply cannot leave bytes a later download would resume from), the blob's final path."""
        self.partial_root.mkdir(parents=True, exist_ok=True)
        partial = self.partial_root / f"{checked_sha(sha256)}.patched"
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        return BlobWriter(partial, self.path(sha256), sha256, expected_size)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def partial_offset(self, sha256: str) -> int:
        try:
            return self.partial_path(sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def open_writer(self, sha256: str, expected_size: int) -> BlobWriter:
        """A writer that resumes a partial download of `sha256`, if one is usable."""
        self.partial_root.mkdir(parents=True, exist_ok=True)
        return BlobWriter(self.partial_path(sha256), self.path(sha256), sha256, expected_size)

    def verify(self, sha256: str) -> Path:
        """The blob's path after re-hashing it; a rotten blob is deleted and BlobCorrupt raised."""
        path = self.path(sha256)
        if not path.is_file():
            raise StoreError(f"blob {sha256} is not on this satellite (expected {path})")
        actual = sha256_file(path)
        if actual != sha256:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise BlobCorrupt(
                f"blob {sha256} on disk hashes to {actual} (bit rot or tampering); deleted it,"
                " the next pull downloads it again"
            )
        return path

    def discard(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.meta_path(sha256).unlink()


class BlobWriter:
    """Appends one blob's bytes to its partial file while hashing them.

    `offset` is where the download must resume. `write` refuses bytes beyond `expected_size`
    (a stream that never ends). Thread-safe: the async caller writes through worker threads and
    may `close()` from the event loop after a cancellation while a write is still running.
    """

    def __init__(self, partial: Path, final: Path, sha256: str, expected_size: int) -> None:
        self.sha256 = sha256
        self.expected_size = expected_size
        self._partial = partial
        self._final = final
        self._lock = threading.Lock()
        self._verifier = StreamVerifier(f"blob {sha256}", sha256, expected_size)
        self._fd: int | None = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._rehash_existing()
        except BaseException:
            self.close()
            raise
        self.offset = self._verifier.size
        self._written_back = self.offset  # bytes before this were handed to writeback

    def _rehash_existing(self) -> None:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size > self.expected_size:
            # Cannot be a prefix of the blob: start over rather than fail forever.
            os.ftruncate(self._fd, 0)
            return
        pos = 0
        while pos < size:
            chunk = os.pread(self._fd, min(READ_CHUNK, size - pos), pos)
            if not chunk:
                break
            self._verifier.update(chunk)
            pos += len(chunk)

    def write(self, chunk: bytes) -> None:
        with self._lock:
            fd = self._require_open()
            try:
                self._verifier.update(chunk)
            except IntegrityError:
                self._discard_locked()
                raise
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            size = self._verifier.size
            if size - self._written_back >= WRITEBACK_STEP:
                start_writeback(fd, self._written_back, size - self._written_back)
                self._written_back = size

    def commit(self) -> Path:
        """Verify size and sha256, then publish durably. On mismatch the partial is deleted."""
        with self._lock:
            fd = self._require_open()
            try:
                self._verifier.finish()
            except IntegrityError:
                self._discard_locked()
                raise
            os.fsync(fd)
            os.close(fd)
            self._fd = None
            self._final.parent.mkdir(exist_ok=True)
            os.replace(self._partial, self._final)
            fsync_dir(self._final.parent)
            fsync_dir(self._partial.parent)
            return self._final

    def discard(self) -> None:
        """Close and delete the partial: its bytes must not be resumed from."""
        with self._lock:
            self._discard_locked()

    def close(self) -> None:
        """Release the file; an uncommitted partial stays for the next resume."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _require_open(self) -> int:
        if self._fd is None:
            raise StoreError(f"blob {self.sha256}: writer already closed")
        return self._fd

    def _discard_locked(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self._partial.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
