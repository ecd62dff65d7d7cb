"""Unpacked packages and link-assembled trees: the file-system rules satellites and editors share.

    <root>/pkgs/<sha256>/site-packages/   a wheel extracted by shared.wheels (RECORD-verified)
    <root>/pkgs/<sha256>/.spk-complete    JSON: the wheel and every file's sha256 and size
    <root>/trees/<hash>/site-packages/    one relative symlink per top-level entry into pkgs/

A satellite's store (satellite/store/pkgs.py, trees.py) and `spk-core admin tree` (an editor's
copy of a release, core/app/tree_export.py) build exactly this, with these functions: the same
extraction and identity check per wheel, the same clash rules and links per tree, the same
hashes recorded for later verification. Durability, pins, GC and drift repair stay with the
satellite's store; nothing here knows about them.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

from shared.errors import IntegrityError, StoreError
from shared.hashing import sha256_file
from shared.manifest import Manifest, ManifestEntry
from shared.tree_content import AT_SATELLITE, TreeContentPolicy
from shared.wheel_checks import WheelInfo
from shared.wheels import extract_wheel

SITE = "site-packages"
PKG_MARKER = ".spk-complete"
TMP_PREFIX = ".tmp-"

# relative path -> (sha256 hex, size)
FileMap = dict[str, tuple[str, int]]
# relative path in a tree -> (sha256 hex, size, sha256 of the package that provides it)
TreeFiles = dict[str, tuple[str, int, str]]


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


# --------------------------------------------------------------------------- packages


def unpack_package(
    entry: ManifestEntry,
    blob: Path,
    pkg_dir: Path,
    content: TreeContentPolicy = AT_SATELLITE,
    *,
    reuse_from: Path | None = None,
) -> FileMap:
    """Extract the (already sha256-verified) blob of `entry` into `pkg_dir` and seal it.

    `pkg_dir` must not exist. Writes `site-packages/` (every RECORD check applied while
    writing), refuses a wheel that is not the entry's project and version, records every
    file's hash in the marker, makes the directories read-only. Not durable: callers fsync
    (a satellite syncs a whole batch at once) and rename into place. `reuse_from`: another
    unpacked package (the project's previous version) whose files may be hard-linked where
    RECORD names the same bytes (shared.wheels `reuse`).
    """
    pkg_dir.mkdir()
    info = extract_wheel(
        blob,
        pkg_dir / SITE,
        filename=entry.filename,
        content=content,
        reuse=reusable_files(reuse_from),
    )
    return finish_package(entry, pkg_dir, info, dict(info.hashes))


def unpack_part(
    entry: ManifestEntry,
    blob: Path,
    pkg_dir: Path,
    content: TreeContentPolicy,
    part: int,
    parts: int,
    reuse_from: Path | None = None,
) -> WheelInfo:
    """One share of unpack_package for a big wheel, run in several processes at once: the
    caller made `pkg_dir/site-packages`, and calls finish_package with every part's hashes."""
    return extract_wheel(
        blob,
        pkg_dir / SITE,
        filename=entry.filename,
        content=content,
        part=part,
        parts=parts,
        reuse=reusable_files(reuse_from),
    )


def reusable_files(pkg_dir: Path | None) -> dict[str, str]:
    """sha256 hex -> path of a file of the unpacked package at `pkg_dir`, by its marker.

    Only a hint: shared.wheels hashes whatever it links. A package that is gone or unreadable
    offers nothing (the unpack then writes every file, as without one).
    """
    if pkg_dir is None:
        return {}
    try:
        files = package_files(pkg_dir, pkg_dir.name)
    except (StoreError, OSError, KeyError, TypeError, ValueError):
        return {}
    site = pkg_dir / SITE
    return {sha: str(site / rel) for rel, (sha, size) in files.items() if size > 0}


def finish_package(
    entry: ManifestEntry, pkg_dir: Path, info: WheelInfo, hashes: FileMap
) -> FileMap:
    """The end of unpack_package: the identity check, the marker with every file, the seal."""
    if canonicalize_name(info.name) != canonicalize_name(entry.name) or Version(
        info.version
    ) != Version(entry.version):
        raise IntegrityError(
            f"{entry.filename}: the wheel is {info.name} {info.version}, the manifest"
            f" says {entry.name} {entry.version}; refusing it"
        )
    marker = {
        "format": 1,
        "sha256": entry.sha256,
        "filename": entry.filename,
        "files": {rel: [h, size] for rel, (h, size) in sorted(hashes.items())},
    }
    (pkg_dir / PKG_MARKER).write_text(json.dumps(marker, sort_keys=True))
    seal(pkg_dir / SITE)
    return hashes


def package_files(pkg_dir: Path, sha256: str, where: str = "here") -> FileMap:
    """The marker's file map of an unpacked package; StoreError when it is not unpacked."""
    marker = pkg_dir / PKG_MARKER
    try:
        raw = json.loads(marker.read_text())
    except FileNotFoundError:
        raise StoreError(f"package {sha256} is not unpacked {where}") from None
    except ValueError as exc:
        raise StoreError(f"package {sha256}: unreadable marker {marker}: {exc}") from None
    return {rel: (str(v[0]), int(v[1])) for rel, v in raw["files"].items()}


# --------------------------------------------------------------------------- trees


def claim_files(manifest: Manifest, files_of: Callable[[str], FileMap]) -> TreeFiles:
    """Every file of the tree: rel -> (sha256, size, package sha). Refuses clashes by name.

    `files_of(sha256)` is an unpacked package's file map. Two wheels may ship the same path
    only with identical content (old-style namespace packages such as `google/__init__.py`).
    """
    owners: TreeFiles = {}
    owner_files: dict[str, str] = {}
    for entry in manifest.entries:
        for rel, (sha, size) in sorted(files_of(entry.sha256).items()):
            previous = owners.get(rel)
            if previous is not None:
                if previous[0] == sha:
                    continue
                raise StoreError(
                    f"{owner_files[rel]} and {entry.filename} both install {rel} with different"
                    " content; they cannot share one tree (fix the allowlist)"
                )
            owners[rel] = (sha, size, entry.sha256)
            owner_files[rel] = entry.filename
    _refuse_file_where_directory(owners, owner_files)
    return owners


def parents(rel: str) -> Iterator[str]:
    while rel:
        yield rel
        rel = rel.rpartition("/")[0]


def _refuse_file_where_directory(owners: TreeFiles, owner_files: dict[str, str]) -> None:
    """A file of one wheel where another has a directory cannot share a tree.

    Only paths under a top-level entry that several packages provide can clash (a package that
    is both was refused when it was unpacked), so only those pay for the walk up their parents.
    """
    providers: dict[str, set[str]] = {}
    for rel, (_, _, pkg) in owners.items():
        providers.setdefault(rel.partition("/")[0], set()).add(pkg)
    shared = {top for top, pkgs in providers.items() if len(pkgs) > 1}
    dirs = {
        parent
        for rel in owners
        if rel.partition("/")[0] in shared
        for parent in parents(rel.rpartition("/")[0])
    }
    for rel in sorted(dirs & owners.keys()):
        inside = next(p for p in sorted(owners) if p.startswith(f"{rel}/"))
        raise StoreError(
            f"{owner_files[inside]} installs {inside}, which clashes with the file {rel} of"
            f" {owner_files[rel]}; they cannot share one tree"
        )


def link_tree(files: TreeFiles, site: Path, to_pkgs: str) -> dict[str, str]:
    """Create the links for `files` under `site`; returns rel -> link text (for the meta).

    `to_pkgs` is the path from the trees directory to the pkgs directory. A path whose files
    all come from one package becomes one symlink; a directory shared by several packages is
    created and its entries are handled the same way, one level down.
    """
    links: dict[str, str] = {}
    site_str = str(site)

    def place(prefix: str, members: list[str], depth: int) -> None:
        # From trees/<hash>/site-packages/<prefix> up to the trees' parent, then into pkgs/.
        up = "../" * (depth + 2) + to_pkgs
        entries: dict[str, list[str]] = {}  # this level's entry -> the files at or under it
        for rel in members:
            entries.setdefault(prefix + rel[len(prefix) :].partition("/")[0], []).append(rel)
        for rel in sorted(entries):
            inside = entries[rel]
            if rel in files or len({files[f][2] for f in inside}) == 1:
                owner = files[rel if rel in files else inside[0]][2]  # shared identical: first
                text = f"{up}/{owner}/{SITE}/{rel}"
                os.symlink(text, os.path.join(site_str, rel))
                links[rel] = text
            else:
                os.mkdir(os.path.join(site_str, rel), 0o755)
                place(f"{rel}/", inside, depth + 1)

    place("", list(files), 0)
    return links


def tree_problems(
    site: Path, files: Mapping[str, tuple[str, int, str]], links: Mapping[str, str], label: str
) -> list[str]:
    """Missing, changed and extra files (and directories) of an assembled tree."""
    if not site.is_dir():
        return [f"{label}: {SITE} is missing"]
    actual, problems = scan_files(site, links)
    problems = [f"{label}: {p}" for p in problems]
    problems += compare_files({r: (s, n) for r, (s, n, _) in files.items()}, actual, label)
    expected_dirs = {rel.rpartition("/")[0] for rel in files}
    expected_dirs |= {d for rel in expected_dirs for d in parents(rel)}
    for extra in sorted(list_dirs(site, links) - expected_dirs):
        problems.append(f"{label}: extra directory {extra}")
    return problems


# --------------------------------------------------------------------------- file-system helpers


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
