"""Unpacked wheels on a satellite (`pkgs/<sha256>/`) and the file-system helpers trees share.

    pkgs/<sha256>/site-packages/   the wheel extracted by shared.wheels (RECORD-verified, 0o444)
    pkgs/<sha256>/.spk-complete    JSON: the wheel and every file's sha256 and size

A package is built in `pkgs/.tmp-<sha>-<rand>/`, made durable, then renamed into place, so a
directory under `pkgs/` with its marker is always complete. The marker's hashes are the reference
for drift checks: trees hard-link these files, so a write through a tree changes the file here
too (the same inode), and only hashes recorded at unpack time can tell.

Durability: packages are staged in parallel (each in its own `.tmp-*` dir), then published as a
batch: one syncfs(2) over all of them, then one rename each, then one fsync of `pkgs/`. So a
package is never visible before its bytes are durable, and the set costs one syncfs instead of
one per package (sync(2) where syncfs is missing); fsync of every file was measured far slower
(w31-shaped set, 3,999 files, loaded 2-core VM: fsync each 4.4 s, one syncfs 0.34 s).
File hashes for the marker come from extraction itself (every file is hashed while it is written
and checked against RECORD), so nothing is read back.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

from satellite.store.blobs import checked_sha
from shared.errors import IntegrityError, StoreError
from shared.fsutil import exchange, fsync_dir
from shared.hashing import sha256_file
from shared.manifest import ManifestEntry
from shared.tree_content import AT_SATELLITE
from shared.wheels import extract_wheel

SITE = "site-packages"
PKG_MARKER = ".spk-complete"
TMP_PREFIX = ".tmp-"

# relative path -> (sha256 hex, size)
FileMap = dict[str, tuple[str, int]]


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return func


_SYNCFS = _load_syncfs()


def syncfs(path: Path) -> None:
    """Flush every dirty page and inode of the file system holding `path`."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def temp_name(final_name: str) -> str:
    return f"{TMP_PREFIX}{final_name}-{secrets.token_hex(4)}"


def scan_files(root: Path, links: Mapping[str, str] | None = None) -> tuple[FileMap, list[str]]:
    """Hash every regular file under `root`; anything else (symlink, fifo...) is a problem.

    `links` (relative path -> expected link text) are the symlinks a tree is allowed to hold:
    those are checked and followed, so what they point at is hashed like the rest.
    """
    files: FileMap = {}
    problems: list[str] = []
    allowed = links or {}

    def walk(directory: str, prefix: str) -> None:
        with os.scandir(directory) as it:
            for item in sorted(it, key=lambda e: e.name):
                rel = f"{prefix}{item.name}"
                if item.is_symlink():
                    if rel not in allowed:
                        problems.append(f"unexpected symlink {rel}")
                        continue
                    if os.readlink(item.path) != allowed[rel]:
                        problems.append(f"symlink {rel} points elsewhere")
                        continue
                    if not os.path.exists(item.path):
                        problems.append(f"missing {rel} (dangling symlink)")
                        continue
                if item.is_dir():  # follows only the links allowed above
                    walk(item.path, f"{rel}/")
                elif item.is_file():
                    path = Path(item.path)
                    files[rel] = (sha256_file(path), item.stat().st_size)
                else:
                    problems.append(f"unexpected special file {rel}")

    walk(str(root), "")
    return files, problems


def list_dirs(root: Path, links: Mapping[str, str] | None = None) -> set[str]:
    """Relative paths of every directory below `root`, following only the allowed `links`."""
    found: set[str] = set()
    allowed = links or {}

    def walk(directory: str, prefix: str) -> None:
        with os.scandir(directory) as it:
            for item in it:
                rel = f"{prefix}{item.name}"
                if item.is_symlink() and rel not in allowed:
                    continue
                if item.is_dir():
                    found.add(rel)
                    walk(item.path, f"{rel}/")

    walk(str(root), "")
    return found


def seal(root: Path) -> None:
    """Make every directory under (and including) `root` read-only, so nothing can be added.

    Files are already 0o444; root ignores both, which is why drift checks hash everything.
    """
    for dirpath, _, _ in os.walk(root, topdown=False):
        os.chmod(dirpath, 0o555)  # noqa: S103 -- read-only for everyone is the point


def remove_dir(path: Path) -> None:
    """Delete a sealed directory tree; missing is fine."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return

    # rmtree needs write permission on every directory it empties; sealed ones have none.
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o755)  # noqa: S103 -- about to delete it
    shutil.rmtree(path)


@dataclass(frozen=True)
class StagedPkg:
    """An unpacked, sealed package in its temp dir, waiting for PkgDir.publish."""

    sha256: str
    tmp: Path
    replace: bool = False  # swap out an existing copy (drift repair) instead of adding one


class PkgDir:
    """The `pkgs/` directory: one unpacked, verified wheel per blob sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, sha256: str) -> Path:
        return self.root / checked_sha(sha256)

    def site(self, sha256: str) -> Path:
        return self.dir(sha256) / SITE

    def has(self, sha256: str) -> bool:
        return (self.dir(sha256) / PKG_MARKER).is_file()

    def files(self, sha256: str) -> FileMap:
        """The marker's file map; StoreError when the package is not unpacked."""
        marker = self.dir(sha256) / PKG_MARKER
        try:
            raw = json.loads(marker.read_text())
        except FileNotFoundError:
            raise StoreError(f"package {sha256} is not unpacked on this satellite") from None
        except ValueError as exc:
            raise StoreError(f"package {sha256}: unreadable marker {marker}: {exc}") from None
        return {rel: (str(v[0]), int(v[1])) for rel, v in raw["files"].items()}

    def unpack(self, entry: ManifestEntry, blob: Path) -> Path:
        """Extract the (already verified) blob of `entry` durably; returns its site-packages dir."""
        staged = self.stage(entry, blob)
        if staged is not None:
            self.publish([staged])
        return self.site(entry.sha256)

    def stage(self, entry: ManifestEntry, blob: Path, replace: bool = False) -> StagedPkg | None:
        """Extract and seal the blob in a temp dir, not yet durable nor visible (see publish).

        None when the package is already unpacked, unless `replace` (drift repair: a fresh copy
        that publish swaps in). Safe to run for different shas in parallel.
        """
        sha = checked_sha(entry.sha256)
        if self.has(sha) and not replace:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / temp_name(sha)
        tmp.mkdir()
        try:
            info = extract_wheel(blob, tmp / SITE, filename=entry.filename, content=AT_SATELLITE)
            if canonicalize_name(info.name) != canonicalize_name(entry.name) or Version(
                info.version
            ) != Version(entry.version):
                raise IntegrityError(
                    f"{entry.filename}: the wheel is {info.name} {info.version}, the manifest"
                    f" says {entry.name} {entry.version}; refusing it"
                )
            marker = {
                "format": 1,
                "sha256": sha,
                "filename": entry.filename,
                "files": {rel: [h, size] for rel, (h, size) in sorted(info.hashes.items())},
            }
            (tmp / PKG_MARKER).write_text(json.dumps(marker, sort_keys=True))
            seal(tmp / SITE)
        except BaseException:
            remove_dir(tmp)
            raise
        return StagedPkg(sha, tmp, replace)

    def publish(self, staged: Sequence[StagedPkg]) -> None:
        """Make staged packages durable with one syncfs, then rename each into place."""
        if not staged:
            return
        try:
            syncfs(self.root)
            for item in staged:
                final = self.dir(item.sha256)
                if item.replace and self.has(item.sha256):
                    self._swap_in(item.tmp, final)
                    continue
                # Callers stage each sha once at a time (the materialiser dedupes, the agent
                # lock keeps other agents out), so anything here is a leftover without marker.
                if final.exists() and not self.has(item.sha256):
                    remove_dir(final)
                if self.has(item.sha256):
                    remove_dir(item.tmp)
                else:
                    os.rename(item.tmp, final)
            fsync_dir(self.root)
        except BaseException:
            for item in staged:
                remove_dir(item.tmp)
            raise

    def _swap_in(self, tmp: Path, final: Path) -> None:
        """Trees link into `final`: swap atomically where the kernel can, so no run ever finds
        the package missing; `tmp` then holds the old copy, which is deleted."""
        if exchange(tmp, final):
            remove_dir(tmp)
            return
        old = self.root / temp_name(f"old-{final.name}")  # no renameat2: a moment's gap
        os.rename(final, old)
        os.rename(tmp, final)
        remove_dir(old)

    def verify(self, sha256: str) -> list[str]:
        """Problems of one unpacked package against its marker (empty when intact)."""
        expected = self.files(sha256)
        actual, problems = scan_files(self.site(sha256))
        return problems + compare_files(expected, actual, label=f"package {sha256[:12]}")

    def discard(self, sha256: str) -> None:
        final = self.dir(sha256)
        if not final.exists():
            return
        # Rename first so a crash mid-delete never leaves a half package that looks complete.
        doomed = self.root / temp_name(f"discard-{final.name}")
        os.rename(final, doomed)
        fsync_dir(self.root)
        remove_dir(doomed)


def compare_files(expected: FileMap, actual: FileMap, label: str) -> list[str]:
    problems: list[str] = []
    for rel, (sha, size) in sorted(expected.items()):
        got = actual.get(rel)
        if got is None:
            problems.append(f"{label}: missing {rel}")
        elif got[0] != sha:
            problems.append(
                f"{label}: changed {rel} (expected sha256 {sha[:12]}, {size} bytes;"
                f" found {got[0][:12]}, {got[1]} bytes)"
            )
    problems.extend(f"{label}: extra file {rel}" for rel in sorted(actual.keys() - expected.keys()))
    return problems


def is_plain_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except FileNotFoundError:
        return False
