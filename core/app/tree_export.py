"""`spk-core admin tree HASH DIR`: a release's tree for an editor, built exactly as a satellite
builds it, from the core's blobs (verified), never from the index.

    DIR/pkgs/<sha256>/site-packages/    each wheel unpacked with the satellite's checks
    DIR/trees/<hash>/site-packages/     linked from pkgs/ with the satellite's clash rules
    DIR/trees/<hash>/.spk-tree.json     the manifest, every file's sha256 and every link
    DIR/site-packages -> trees/<hash>/site-packages   point pyright / VS Code / PyCharm here

Runs on an admin's machine (the CLI process): the manifest comes from GetManifest and must hash
to HASH (and verify against --signing-key when given); each blob comes from GetBlob and must
match the manifest's sha256 and size before shared/tree_build.py unpacks it. A hash the core
does not hold is NOT_FOUND before DIR is touched, never an empty tree. Running it again with
another hash reuses the packages already unpacked and flips `site-packages` atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.errors import IntegrityError, StoreError
from shared.fsutil import fsync_dir
from shared.hashing import StreamVerifier
from shared.manifest import Manifest, ManifestEntry
from shared.names import check_lockfile_hash, check_sha256
from shared.signing import verify_manifest
from shared.tree_build import (
    PKG_MARKER,
    SITE,
    TreeFiles,
    claim_files,
    compare_files,
    link_tree,
    package_files,
    remove_dir,
    scan_files,
    seal,
    syncfs,
    temp_name,
    tree_problems,
    unpack_package,
)

DIR_MARKER = ".spk-editor-tree"  # DIR was made by this command (it may be reused)
TREE_META = ".spk-tree.json"  # the satellite's name and format for the same record


class ReleaseSource(Protocol):
    """The core, as this command needs it (the CLI adapts the admin stub)."""

    def manifest(self, lockfile_hash: str) -> Manifest: ...

    def blob(self, sha256: str) -> Iterable[bytes]: ...


def _prepare(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / DIR_MARKER).is_file():
        raise StoreError(
            f"{root} is not empty and was not made by `spk-core admin tree`; give an empty or"
            " new directory (nothing in it is replaced)"
        )
    for sub in (root / "pkgs", root / "trees"):
        sub.mkdir(parents=True, exist_ok=True)
    (root / DIR_MARKER).write_text("made by spk-core admin tree; safe to delete\n")


def _download(source: ReleaseSource, entry: ManifestEntry, dest: Path) -> None:
    verifier = StreamVerifier(f"blob of {entry.filename}", entry.sha256, entry.size)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in source.blob(entry.sha256):
                verifier.update(chunk)
                f.write(chunk)
        verifier.finish()
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _package(source: ReleaseSource, entry: ManifestEntry, pkgs: Path) -> None:
    """pkgs/<sha> for one entry: reused when intact against its marker, else built afresh."""
    sha = check_sha256(entry.sha256)
    final = pkgs / sha
    if (final / PKG_MARKER).is_file():
        actual, problems = scan_files(final / SITE)
        problems += compare_files(package_files(final, sha), actual, f"package {sha[:12]}")
        if not problems:
            return
        remove_dir(final)
    tmp = pkgs / temp_name(sha)
    blob = pkgs / f"{temp_name(sha)}.whl"
    try:
        _download(source, entry, blob)
        unpack_package(entry, blob, tmp)
        os.rename(tmp, final)
    except BaseException:
        remove_dir(tmp)
        raise
    finally:
        blob.unlink(missing_ok=True)


def _assemble(manifest: Manifest, root: Path) -> tuple[Path, TreeFiles, dict[str, str]]:
    pkgs, trees = root / "pkgs", root / "trees"
    files = claim_files(manifest, lambda sha: package_files(pkgs / sha, sha))
    final = trees / manifest.lockfile_hash
    if (final / TREE_META).is_file():
        recorded = json.loads((final / TREE_META).read_text())["links"]
        links = {str(k): str(v) for k, v in recorded.items()}
        return final, files, links
    remove_dir(final)  # a leftover without its record is never a tree
    tmp = trees / temp_name(manifest.lockfile_hash)
    (tmp / SITE).mkdir(parents=True)
    try:
        links = link_tree(files, tmp / SITE, os.path.relpath(pkgs, trees))
        meta = {"format": 3, "manifest": json.loads(manifest.to_json()), "links": links}
        (tmp / TREE_META).write_text(json.dumps(meta, sort_keys=True))
        seal(tmp / SITE)
        syncfs(tmp)
        os.rename(tmp, final)
        fsync_dir(trees)
    except BaseException:
        remove_dir(tmp)
        raise
    return final, files, links


def _point(root: Path, tree: Path) -> Path:
    """DIR/site-packages -> trees/<hash>/site-packages, replaced by rename (never missing)."""
    link = root / SITE
    if link.exists() and not link.is_symlink():
        raise StoreError(f"{link} exists and is not the link this command keeps")
    tmp = root / temp_name(SITE)
    os.symlink(os.path.relpath(tree / SITE, root), tmp)
    os.replace(tmp, link)
    fsync_dir(root)
    return link


def materialise_tree(
    source: ReleaseSource,
    lockfile_hash: str,
    root: Path,
    signing_key: Ed25519PublicKey | None = None,
) -> Path:
    """Build (or reuse) the tree of `lockfile_hash` under `root`; returns DIR/site-packages."""
    wanted = check_lockfile_hash(lockfile_hash)
    manifest = source.manifest(wanted)  # NotFound (from the core) before anything is written
    if manifest.lockfile_hash != wanted or manifest.computed_hash() != wanted:
        raise IntegrityError(
            f"the core answered a manifest that hashes to {manifest.computed_hash()} for"
            f" {wanted}; refusing it"
        )
    if signing_key is not None:
        verify_manifest(manifest, signing_key)
    _prepare(root)
    for entry in manifest.entries:
        _package(source, entry, root / "pkgs")
    syncfs(root / "pkgs")
    tree, files, links = _assemble(manifest, root)
    problems = tree_problems(tree / SITE, files, links, f"tree {wanted[:12]}")
    if problems:
        raise IntegrityError("; ".join(problems[:10]))
    return _point(root, tree)
