"""Install trees on a satellite: `trees/<lockfile hash>/`, assembled from `pkgs/` by links.

    trees/<hash>/site-packages/   what scripts import; sealed read-only after assembly
    trees/<hash>/.spk-tree.json   the manifest and every link (format 3; format 2 also listed
                                  every file, see TreeDir.meta)
    trees/<hash>/.spk-pin         runs hold a shared flock on it; GC needs it exclusive
    trees/<hash>/.spk-retired     when it stopped being current (absent while current)
    trees/<hash>/pycache/         the runner's bytecode cache (-X pycache_prefix); dies with it
    trees/.old-<hash>-<rand>/     a tree drift repair swapped out; GC removes it once unpinned

A top-level entry of site-packages (`requests/`, `six.py`, `attrs-26.1.0.dist-info/`) that only
one package of the manifest ships is a relative symlink into `pkgs/<sha>/site-packages/`: w31's
3,904 files become ~80 links, so a warm tree costs milliseconds instead of the `cp -al` floor
(one hard link per file; see docs/benchmarks.md). Where several packages share a directory (a
namespace such as `google/`), that directory is real and the rule repeats one level down, so
identical shared files (old-style `__init__.py`) link once and anything else clashes loudly.
Links share the package files just as hard links would: see pkgs.py for why drift checks compare
against recorded hashes, and satellite/drift.py for why `pkgs/` is watched too. A tree is built
in `trees/.tmp-<hash>-<rand>/` and renamed into place after one syncfs (only directory entries
are new; the package files are already durable). The clash rules and the links themselves are
shared with `spk-core admin tree`, which builds the same tree for an editor (shared/tree_build.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from satellite.store.blobs import checked_sha
from satellite.store.pkgs import PkgDir
from shared.errors import NotFound, StoreError
from shared.fsutil import exchange, fsync_dir, write_bytes_atomic
from shared.manifest import Manifest
from shared.tree_build import (
    SITE,
    TMP_PREFIX,
    FileMap,
    claim_files,
    link_tree,
    remove_dir,
    seal,
    syncfs,
    temp_name,
    tree_problems,
)

TREE_META = ".spk-tree.json"
PIN_FILE = ".spk-pin"
RETIRED_MARK = ".spk-retired"
OLD_PREFIX = ".old-"  # a tree displaced by drift repair, kept until no run pins it
PYCACHE = "pycache"


@dataclass(frozen=True)
class TreePin:
    """A tree held for a script run. `fd` carries the shared lock; pass it to the child."""

    lockfile_hash: str
    site: Path
    pycache: Path
    fd: int


@dataclass(frozen=True)
class TreeMeta:
    manifest: Manifest
    files: FileMap | None  # as recorded by a format 2 meta; None: the packages' markers say
    links: dict[str, str]  # relative path in site-packages -> symlink text


class TreeDir:
    """The `trees/` directory: assembly, verification, retirement, pins and GC."""

    def __init__(self, root: Path, files_of: Callable[[str], FileMap]) -> None:
        """`files_of(sha256)`: an unpacked package's file map (PkgDir.files)."""
        self.root = root
        self._files_of = files_of
        # Manifests by lockfile hash: immutable for a hash, asked for on every flip (the drift
        # watcher's scope) and parsing wsci's 1.5 MB tree meta on the event loop took 30 ms.
        self._manifests: dict[str, Manifest] = {}

    def dir(self, lockfile_hash: str) -> Path:
        return self.root / checked_sha(lockfile_hash)

    def site(self, lockfile_hash: str) -> Path:
        return self.dir(lockfile_hash) / SITE

    def has(self, lockfile_hash: str) -> bool:
        return (self.dir(lockfile_hash) / TREE_META).is_file()

    def hashes(self) -> list[str]:
        """Every complete tree on disk."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith((TMP_PREFIX, OLD_PREFIX)) and (p / TREE_META).is_file()
        )

    def meta(self, lockfile_hash: str) -> TreeMeta:
        """The tree's record. Format 3 (this agent's) holds the manifest and the links; every
        file's expected hash is in the markers of the packages the manifest names, which were
        written when they were unpacked. Format 2 (older agents) repeated every file of every
        package, which cost wsci's one-pin sync 30-45 ms to write (2.7 MB of JSON) and every
        read of the manifest as much again; both are read."""
        path = self.dir(lockfile_hash) / TREE_META
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"tree {lockfile_hash} is not on this satellite") from None
        except ValueError as exc:
            raise StoreError(f"tree {lockfile_hash}: unreadable {path}: {exc}") from None
        recorded = raw.get("files")
        files = (
            None
            if recorded is None
            else {rel: (str(v[0]), int(v[1])) for rel, v in recorded.items()}
        )
        links = {str(rel): str(text) for rel, text in raw.get("links", {}).items()}
        manifest = Manifest.from_json(json.dumps(raw["manifest"]))
        self._manifests[lockfile_hash] = manifest
        return TreeMeta(manifest, files, links)

    def manifest(self, lockfile_hash: str) -> Manifest:
        """The manifest the tree was built from (its meta, read once)."""
        known = self._manifests.get(lockfile_hash)
        if known is not None and self.has(lockfile_hash):
            return known
        return self.meta(lockfile_hash).manifest

    def assemble(self, manifest: Manifest, pkgs: PkgDir, replace: bool = False) -> Path:
        """Link every package of `manifest` into a new tree; every package must be unpacked.

        Two wheels may ship the same path only with identical content (old-style namespace
        packages such as `google/__init__.py`); anything else is refused, naming both wheels.
        With `replace`, an existing tree of the same hash is swapped out (drift repair); a
        directory without `.spk-tree.json` is never a tree and is always swapped out.
        """
        lockfile_hash = checked_sha(manifest.lockfile_hash)
        final = self.dir(lockfile_hash)
        if self.has(lockfile_hash) and not replace:
            raise StoreError(f"tree {lockfile_hash} already exists at {final}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / temp_name(lockfile_hash)
        site = tmp / SITE
        site.mkdir(parents=True)
        try:
            files = claim_files(manifest, pkgs.files)
            to_pkgs = os.path.relpath(pkgs.root, self.root)
            links = link_tree(files, site, to_pkgs)
            (tmp / PIN_FILE).touch(0o444)
            meta = {"format": 3, "manifest": json.loads(manifest.to_json()), "links": links}
            (tmp / TREE_META).write_text(json.dumps(meta, sort_keys=True))
            seal(site)
            syncfs(tmp)
            if final.exists():
                # Drift repair. One atomic swap where the kernel can, so `current` and runs
                # reading through it never find the tree missing; the displaced tree waits as
                # `.old-*` until no run pins it, then GC removes it (deleting it at once broke
                # the path walks of runs pinned to it: docs/reliability.md, fault 5).
                displaced = self.root / f"{OLD_PREFIX}{lockfile_hash}-{secrets.token_hex(4)}"
                if exchange(tmp, final):
                    os.rename(tmp, displaced)
                else:  # no renameat2: two renames, `current` dangles for a moment
                    os.rename(final, displaced)
                    os.rename(tmp, final)
                fsync_dir(self.root)
                doomed = self._unlink_unless_pinned(displaced)
                if doomed is not None:
                    remove_dir(doomed)
            else:
                os.rename(tmp, final)
                fsync_dir(self.root)
        except BaseException:
            remove_dir(tmp)
            raise
        self._manifests[lockfile_hash] = manifest
        return final / SITE

    def files(self, meta: TreeMeta) -> FileMap:
        """Every file the tree should hold, with its recorded hash and size."""
        if meta.files is not None:
            return meta.files
        claimed = claim_files(meta.manifest, self._files_of)
        return {rel: (sha, size) for rel, (sha, size, _) in claimed.items()}

    def verify(self, lockfile_hash: str) -> list[str]:
        """Missing, changed and extra files (and directories) compared with the recorded hashes."""
        meta = self.meta(lockfile_hash)
        label = f"tree {lockfile_hash[:12]}"
        try:
            expected = self.files(meta)
        except StoreError as exc:  # a package it links to is gone: drift, which repair fixes
            return [f"{label}: {exc}"]
        files = {rel: (sha, size, "") for rel, (sha, size) in expected.items()}
        return tree_problems(self.site(lockfile_hash), files, meta.links, label)

    def retire_others(self, current: str | None, now: float) -> list[str]:
        """Mark every tree except `current` as retired at `now`, unless it already is."""
        retired: list[str] = []
        for lockfile_hash in self.hashes():
            mark = self.dir(lockfile_hash) / RETIRED_MARK
            if lockfile_hash == current or mark.exists():
                continue
            write_bytes_atomic(mark, f"{now}\n".encode())
            retired.append(lockfile_hash)
        return retired

    def unretire(self, lockfile_hash: str) -> None:
        """A tree becoming current again must not carry its old retirement into the next GC."""
        mark = self.dir(lockfile_hash) / RETIRED_MARK
        if mark.exists():
            mark.unlink()
            fsync_dir(mark.parent)

    def retired_at(self, lockfile_hash: str) -> float | None:
        mark = self.dir(lockfile_hash) / RETIRED_MARK
        try:
            return float(mark.read_text().strip())
        except FileNotFoundError:
            return None
        except ValueError:
            return mark.stat().st_mtime

    def gc(self, current: str | None, grace_seconds: float, now: float) -> list[str]:
        """Delete trees retired for longer than the grace and not pinned; never `current`."""
        removed: list[str] = []
        for old in sorted(self.root.glob(f"{OLD_PREFIX}*")) if self.root.is_dir() else []:
            displaced = self._unlink_unless_pinned(old)  # replaced by a repair, now unpinned
            if displaced is not None:
                remove_dir(displaced)
        for lockfile_hash in self.hashes():
            if lockfile_hash == current:
                continue
            retired = self.retired_at(lockfile_hash)
            if retired is None or now - retired < grace_seconds:
                continue
            if any(self.root.glob(f"{OLD_PREFIX}{lockfile_hash}-*")):
                # Still pinned by a run from before a repair swap: that run reads through this
                # name, so its pin (on the displaced tree) protects the name too.
                continue
            doomed = self._unlink_unless_pinned(self.dir(lockfile_hash))
            if doomed is not None:
                remove_dir(doomed)
                removed.append(lockfile_hash)
                self._manifests.pop(lockfile_hash, None)
        return removed

    def remove_unless_pinned(self, lockfile_hash: str) -> bool:
        """Delete a (non-current) tree now unless a run pins it; whether it went."""
        if not self.has(lockfile_hash):
            return False
        doomed = self._unlink_unless_pinned(self.dir(lockfile_hash))
        if doomed is None:
            return False
        remove_dir(doomed)
        self._manifests.pop(lockfile_hash, None)
        return True

    def _unlink_unless_pinned(self, tree: Path) -> Path | None:
        """Rename the tree out of sight while holding its pin exclusively; None when pinned."""
        try:
            fd = os.open(tree / PIN_FILE, os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None
            # Renamed while locked: a run that wins the lock after us finds no tree at the path
            # (TreeDir.pin checks) instead of a half-deleted one.
            doomed = self.root / temp_name(f"gc-{tree.name}")
            os.rename(tree, doomed)
            fsync_dir(self.root)
            return doomed
        finally:
            if fd is not None:
                os.close(fd)

    @contextlib.contextmanager
    def pin(self, lockfile_hash: str) -> Iterator[TreePin]:
        """Hold a shared flock on the tree's pin file for the duration of a run."""
        tree = self.dir(lockfile_hash)
        pin_path = tree / PIN_FILE
        try:
            fd = os.open(pin_path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"tree {lockfile_hash} is not on this satellite") from None
        try:
            # Blocking is fine: GC holds the lock exclusively only for one rename.
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.fstat(fd).st_ino == os.stat(pin_path).st_ino
            except FileNotFoundError:
                same = False
            if not same or not (tree / TREE_META).is_file():
                raise NotFound(f"tree {lockfile_hash} was removed while it was being pinned")
            yield TreePin(lockfile_hash, tree / SITE, tree / PYCACHE, fd)
        finally:
            os.close(fd)

    def size_bytes(self, lockfile_hash: str) -> int:
        return sum(size for _, size in self.files(self.meta(lockfile_hash)).values())

    def cleanup_temp(self) -> list[Path]:
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for path in self.root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                remove_dir(path)
                removed.append(path)
            elif path.is_dir():
                for inner in path.glob(f"{TMP_PREFIX}*"):  # write_bytes_atomic leftovers
                    inner.unlink()
                    removed.append(inner)
        return removed
