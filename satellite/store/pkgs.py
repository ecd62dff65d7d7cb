"""Unpacked wheels on a satellite (`pkgs/<sha256>/`): staging, batch durability, drift repair.

    pkgs/<sha256>/site-packages/   the wheel extracted by shared.wheels (RECORD-verified, 0o444)
    pkgs/<sha256>/.spk-complete    JSON: the wheel and every file's sha256 and size

A package is built in `staging/.tmp-<sha>-<rand>/` (beside `pkgs/`, on the same file system),
made durable, then renamed into place, so a directory under `pkgs/` with its marker is always
complete. Staging, swaps and deletions happen outside `pkgs/` because the drift watcher watches
`pkgs/` recursively: every file created there is an inotify event watchdog handles in Python (on
wsci, 84,000-91,000 events and 1.4-1.6 s of the agent's CPU per cold sync, against 17,400 events
and 0.4 s when only the finished packages are renamed in). The marker's hashes are the reference
for drift checks: trees hard-link these files, so a write through a tree changes the file here
too (the same inode), and only hashes recorded at unpack time can tell.

Durability: packages are staged in parallel (each in its own `.tmp-*` dir), then published as a
batch: one syncfs(2) over all of them, then one rename each, then one fsync of `pkgs/`. So a
package is never visible before its bytes are durable, and the set costs one syncfs instead of
one per package (sync(2) where syncfs is missing); fsync of every file was measured far slower
(w31-shaped set, 3,999 files, loaded 2-core VM: fsync each 4.4 s, one syncfs 0.34 s).
File hashes for the marker come from extraction itself (every file is hashed while it is written
and checked against RECORD), so nothing is read back. An upgrade hard-links the files it shares
with the project's package in the current tree (`donor`; docs/storage.md, "Upgrades link what
they share"). Extraction, the marker and the file-system helpers trees use are shared with
`spk-core admin tree` (shared/tree_build.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from satellite.store.blobs import checked_sha
from shared.fsutil import exchange, fsync_dir
from shared.manifest import ManifestEntry

# The unpack, hashing and sealing rules are shared with `spk-core admin tree` (an editor's copy
# of a release); they live in shared/tree_build.py and are re-exported here for the store.
from shared.tree_build import (
    PKG_MARKER,
    SITE,
    TMP_PREFIX,
    FileMap,
    compare_files,
    list_dirs,
    package_files,
    remove_dir,
    scan_files,
    seal,
    syncfs,
    temp_name,
    unpack_package,
)

__all__ = [
    "PKG_MARKER",
    "SITE",
    "TMP_PREFIX",
    "FileMap",
    "PkgDir",
    "StagedPkg",
    "compare_files",
    "is_plain_dir",
    "list_dirs",
    "remove_dir",
    "scan_files",
    "seal",
    "syncfs",
    "temp_name",
]


class Unpacker(Protocol):
    """shared.tree_build.unpack_package, or a stand-in running it elsewhere (unpack_pool.py)."""

    def __call__(
        self, entry: ManifestEntry, blob: Path, pkg_dir: Path, *, reuse_from: Path | None = None
    ) -> FileMap: ...


@dataclass(frozen=True)
class StagedPkg:
    """An unpacked, sealed package in its temp dir, waiting for PkgDir.publish."""

    sha256: str
    tmp: Path
    replace: bool = False  # swap out an existing copy (drift repair) instead of adding one


class PkgDir:
    """The `pkgs/` directory: one unpacked, verified wheel per blob sha256."""

    def __init__(self, root: Path, staging: Path) -> None:
        self.root = root
        self.staging = staging  # temp dirs: builds, swapped-out and doomed copies
        # Called with the shas just published (new or swapped in), in the publishing thread:
        # the drift watcher puts a watch on each (satellite/drift.py). Its errors are its own.
        self.on_published: Callable[[list[str]], None] | None = None

    def dir(self, sha256: str) -> Path:
        return self.root / checked_sha(sha256)

    def site(self, sha256: str) -> Path:
        return self.dir(sha256) / SITE

    def has(self, sha256: str) -> bool:
        return (self.dir(sha256) / PKG_MARKER).is_file()

    def files(self, sha256: str) -> FileMap:
        """The marker's file map; StoreError when the package is not unpacked."""
        return package_files(self.dir(sha256), sha256, where="on this satellite")

    def unpack(self, entry: ManifestEntry, blob: Path, donor: str | None = None) -> Path:
        """Extract the (already verified) blob of `entry` durably; returns its site-packages dir."""
        staged = self.stage(entry, blob, donor=donor)
        if staged is not None:
            self.publish([staged])
        return self.site(entry.sha256)

    def stage(
        self,
        entry: ManifestEntry,
        blob: Path,
        replace: bool = False,
        unpack: Unpacker = unpack_package,
        donor: str | None = None,
    ) -> StagedPkg | None:
        """Extract and seal the blob in a temp dir, not yet durable nor visible (see publish).

        None when the package is already unpacked, unless `replace` (drift repair: a fresh copy
        that publish swaps in). Safe to run for different shas in parallel. `unpack` is
        shared.tree_build.unpack_package or a stand-in running it elsewhere (unpack_pool.py).
        `donor`: an unpacked package (the project's previous version) whose identical files
        are hard-linked rather than written again (each still checked against RECORD).
        """
        sha = checked_sha(entry.sha256)
        if self.has(sha) and not replace:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        tmp = self.staging / temp_name(sha)
        reuse_from = self.dir(donor) if donor is not None and self.has(donor) else None
        try:
            unpack(entry, blob, tmp, reuse_from=reuse_from)
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
        if self.on_published is not None:
            self.on_published([item.sha256 for item in staged])

    def _swap_in(self, tmp: Path, final: Path) -> None:
        """Trees link into `final`: swap atomically where the kernel can, so no run ever finds
        the package missing; `tmp` then holds the old copy, which is deleted."""
        if exchange(tmp, final):
            remove_dir(tmp)
            return
        old = self.staging / temp_name(f"old-{final.name}")  # no renameat2: a moment's gap
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
        self.staging.mkdir(parents=True, exist_ok=True)
        doomed = self.staging / temp_name(f"discard-{final.name}")
        os.rename(final, doomed)
        fsync_dir(self.root)
        remove_dir(doomed)


def is_plain_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except FileNotFoundError:
        return False
