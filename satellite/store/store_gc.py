"""Satellite store GC: the blobs and unpacked packages no tree needs, bounded by a byte cap.

Rules (StoreGcPolicy, run by the reconcile worker after each flip and on a schedule, never while
a reconcile runs):

- **needed**: every package, and its blob, of every tree still on disk after tree GC: `current`,
  retired trees within their grace, trees pinned by runs (and trees a drift repair displaced,
  until their runs end). Tree GC (trees.py) decides which trees those are, with pins and grace;
  this module never deletes a package a tree on disk links to.
- **delta bases**: of each distribution a kept tree uses, the newest `keep_bases` other versions
  whose blobs are held (the next upgrade's patch applies to one of them).
- everything else in `blobs/` and `pkgs/` is deleted, and so are orphaned sidecars, patches left
  by a crash and partial downloads older than PARTIAL_MAX_AGE.
- **max_store_bytes** (blobs + packages; 0 = no cap): past it, delta bases go first, oldest
  first, then retired trees still within grace, longest retired first (a run's pin still wins:
  such a tree is skipped). `current` and pinned trees always stay, even over the cap
  (`over_cap` in the report, a warning in the log).

Crash safety (kill -9 at any point): a package is renamed into `staging/` before it is
deleted and a tree to `trees/.tmp-gc-*` (both removed by the next start's cleanup_temp), so no
half-deleted entry is ever visible under its name; a blob is one unlink; the needed set is read
from the trees that are on disk, so an interrupted pass leaves only more than needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from satellite.store.blobs import BlobDir, BlobInfo, checked_sha
from satellite.store.pkgs import PKG_MARKER, TMP_PREFIX, PkgDir
from satellite.store.trees import OLD_PREFIX, PIN_FILE, TREE_META, TreeDir
from satellite.sync.ports import StoreGcPolicy, StoreGcReport
from shared.errors import IntegrityError
from shared.manifest import Manifest, ManifestEntry

log = logging.getLogger(__name__)
PARTIAL_MAX_AGE = 24 * 3600.0


@dataclass
class _Tree:
    name: str  # the directory name (a hash, or .old-<hash>-<rand>)
    lockfile_hash: str
    entries: tuple[ManifestEntry, ...]
    protected: bool  # current, or pinned by a run right now
    retired_at: float | None


def collect(
    blobs: BlobDir,
    pkgs: PkgDir,
    trees: TreeDir,
    current: str | None,
    policy: StoreGcPolicy,
    now: float,
) -> StoreGcReport:
    """One store GC pass; see the module docstring for the rules."""
    on_disk = _trees(trees, current)
    held = blobs.held()
    catalog = blobs.catalog()
    for tree in on_disk:  # blobs without a sidecar (older agents) are named by the trees
        for entry in tree.entries:
            if entry.sha256 in held and entry.sha256 not in catalog:
                with contextlib.suppress(OSError):
                    blobs.note(entry)
                catalog[entry.sha256] = BlobInfo(
                    entry.sha256, canonicalize_name(entry.name), entry.version, entry.filename
                )
    pkg_sizes = _pkg_sizes(pkgs)
    bases = _delta_bases(on_disk, catalog, held, policy.keep_bases)
    bases_oldest_first = sorted(bases, key=lambda sha: _mtime(blobs.path(sha)))

    evicted = 0
    if policy.max_store_bytes > 0:
        kept = list(on_disk)
        while _size(kept, bases_oldest_first, held, pkg_sizes) > policy.max_store_bytes:
            if bases_oldest_first:
                bases_oldest_first.pop(0)
                continue
            candidates = sorted(
                (t for t in kept if not t.protected and not t.name.startswith(OLD_PREFIX)),
                key=lambda t: t.retired_at if t.retired_at is not None else now,
            )
            if not candidates:
                break
            victim = candidates[0]
            kept.remove(victim)
            if trees.remove_unless_pinned(victim.lockfile_hash):
                evicted += 1
                log.info(
                    "store GC: removed tree %s (retired, within grace) to stay under %d bytes",
                    victim.lockfile_hash[:12],
                    policy.max_store_bytes,
                )
    keep_bases = set(bases_oldest_first)

    # What is deleted is decided from the trees that really are on disk now.
    needed = {e.sha256 for t in _trees(trees, current) for e in t.entries}
    freed = 0
    pkgs_removed = blobs_removed = 0
    for sha, size in sorted(pkg_sizes.items()):
        if sha not in needed:
            pkgs.discard(sha)
            pkgs_removed += 1
            freed += size
    for sha, size in sorted(held.items()):
        if sha not in needed and sha not in keep_bases:
            blobs.discard(sha)
            blobs_removed += 1
            freed += size
    _sweep(blobs, now)
    remaining = sum(s for sha, s in held.items() if sha in needed or sha in keep_bases)
    remaining += sum(s for sha, s in pkg_sizes.items() if sha in needed)
    cap = policy.max_store_bytes
    return StoreGcReport(
        blobs_removed=blobs_removed,
        pkgs_removed=pkgs_removed,
        trees_evicted=evicted,
        bytes_freed=freed,
        store_bytes=remaining,
        over_cap=cap > 0 and remaining > cap,
    )


def _trees(trees: TreeDir, current: str | None) -> list[_Tree]:
    """Every tree directory with a readable meta: built ones and displaced (`.old-*`) ones."""
    found: list[_Tree] = []
    if not trees.root.is_dir():
        return found
    for path in sorted(trees.root.iterdir()):
        if path.name.startswith(TMP_PREFIX) or not (path / TREE_META).is_file():
            continue
        try:
            raw = json.loads((path / TREE_META).read_text())
            manifest = Manifest.from_json(json.dumps(raw["manifest"]))
        except (OSError, ValueError, KeyError, TypeError, IntegrityError) as exc:
            # Unreadable: keep everything it might need by treating it as pinned... which we
            # cannot know. Refuse the pass instead of guessing (drift repair rebuilds it).
            raise IntegrityError(f"store GC: cannot read {path / TREE_META}: {exc}") from None
        lockfile_hash = manifest.lockfile_hash
        is_current = lockfile_hash == current and not path.name.startswith(OLD_PREFIX)
        found.append(
            _Tree(
                path.name,
                lockfile_hash,
                manifest.entries,
                is_current or _pinned(path),
                trees.retired_at(lockfile_hash) if not path.name.startswith(OLD_PREFIX) else None,
            )
        )
    return found


def _pinned(tree: Path) -> bool:
    """Whether a run holds the tree's pin right now (a hint for eviction order only: the
    removal itself re-checks under the exclusive lock)."""
    try:
        fd = os.open(tree / PIN_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _delta_bases(
    trees: list[_Tree], catalog: dict[str, BlobInfo], held: dict[str, int], keep: int
) -> list[str]:
    """The newest `keep` other versions of each distribution the trees use, among held blobs."""
    if keep <= 0:
        return []
    needed = {e.sha256 for t in trees for e in t.entries}
    names = {canonicalize_name(e.name) for t in trees for e in t.entries}
    by_name: dict[str, list[BlobInfo]] = {}
    for sha, info in catalog.items():
        if sha in held and sha not in needed and info.name in names:
            by_name.setdefault(info.name, []).append(info)
    chosen: list[str] = []
    for infos in by_name.values():
        infos.sort(key=lambda i: (_version(i.version), i.sha256), reverse=True)
        chosen.extend(i.sha256 for i in infos[:keep])
    return chosen


def _version(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        return Version("0")


def _size(
    trees: list[_Tree], bases: list[str], held: dict[str, int], pkg_sizes: dict[str, int]
) -> int:
    needed = {e.sha256 for t in trees for e in t.entries}
    blobs = sum(held.get(sha, 0) for sha in needed | set(bases))
    return blobs + sum(pkg_sizes.get(sha, 0) for sha in needed)


def _pkg_sizes(pkgs: PkgDir) -> dict[str, int]:
    """sha256 -> bytes of every complete package (from its marker: nothing is walked)."""
    sizes: dict[str, int] = {}
    if not pkgs.root.is_dir():
        return sizes
    for path in pkgs.root.iterdir():
        if path.name.startswith(TMP_PREFIX):
            continue
        try:
            sha = checked_sha(path.name)
            raw = json.loads((path / PKG_MARKER).read_text())
            sizes[sha] = sum(int(v[1]) for v in raw["files"].values())
        except (OSError, ValueError, KeyError, TypeError, IntegrityError):
            continue  # no marker: not a package (publish removes such leftovers)
    return sizes


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _sweep(blobs: BlobDir, now: float) -> None:
    """Sidecars without a blob, patches a crash left, partial downloads nobody resumed."""
    root = blobs.root
    if not root.is_dir():
        return
    for meta in root.glob("??/*.json"):
        if not meta.with_suffix(".whl").exists():
            with contextlib.suppress(FileNotFoundError):
                meta.unlink()
    for leftover in root.glob("??/.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    patches = root / ".patches"
    if patches.is_dir():
        for patch in patches.iterdir():  # applied (or not) within the reconcile that got it
            with contextlib.suppress(FileNotFoundError):
                patch.unlink()
    if blobs.partial_root.is_dir():
        wall = now if now > 0 else time.time()
        for partial in blobs.partial_root.iterdir():
            if wall - _mtime(partial) > PARTIAL_MAX_AGE or partial.name.endswith(".patched"):
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
