"""The satellite's data dir: one agent per dir, everything published by rename.

    <data>/agent.lock               flock held by the one agent using this dir
    <data>/state.json               AgentState (desired hash, last status and error, sequence)
    <data>/signing-key.pem          the core's key, pinned on trust-on-first-use
    <data>/blobs/ab/<sha256>.whl    verified wheels             (satellite/store/blobs.py)
    <data>/blobs/ab/<sha256>.json   what the wheel is (store GC, delta bases)
    <data>/blobs/.partial/<sha256>  resumable downloads
    <data>/blobs/.patches/<sha256>  a downloaded patch until it is applied (deltas.py)
    <data>/pkgs/<sha256>/           unpacked wheels             (satellite/store/pkgs.py)
    <data>/staging/                 packages being built, swapped out or deleted
    <data>/trees/<hash>/            assembled install trees     (satellite/store/trees.py)
    <data>/current -> trees/<hash>  relative symlink, replaced by rename(2), never unlinked first

Every method is synchronous and blocking. The agent's sync logic reaches them only through
satellite/store/async_store.py, which runs them in worker threads; the script runner and
`spk-satellite status` call them directly. Operations on different sha256s are independent, so
unpacking several wheels at once from several threads is safe. Anything named `.tmp-*` or
`current.tmp-*`, and anything in `staging/`, is an unfinished build that `cleanup_temp()`
removes at agent start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from packaging.utils import canonicalize_name

from satellite.store import deltas, store_gc
from satellite.store.blobs import BlobDir, BlobWriter, checked_sha
from satellite.store.pkgs import TMP_PREFIX, PkgDir, StagedPkg, Unpacker, remove_dir
from satellite.store.trees import TreeDir, TreePin
from satellite.sync.ports import (
    AgentState,
    DeltaBases,
    DeltaOffer,
    StoreGcPolicy,
    StoreGcReport,
)
from shared.errors import IntegrityError, SpkError, StoreError
from shared.fsutil import fsync_dir, write_bytes_atomic
from shared.manifest import Manifest, ManifestEntry
from shared.tree_build import unpack_package

log = logging.getLogger(__name__)

CURRENT = "current"
CURRENT_TMP = "current.tmp-"
STAGING = "staging"  # packages being built, swapped out or deleted (satellite/store/pkgs.py)
STATE_FILE = "state.json"
LOCK_FILE = "agent.lock"
PINNED_KEY_FILE = "signing-key.pem"  # written on trust-on-first-use


class SatelliteStore:
    """The synchronous data dir: behind AsyncStore (the agent), the runner and drift repair."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = BlobDir(self.root / "blobs")
        self.pkgs = PkgDir(self.root / "pkgs", self.root / STAGING)
        self.trees = TreeDir(self.root / "trees", self.pkgs.files)

    # -- agent lock ------------------------------------------------------------------------

    @contextlib.contextmanager
    def acquire_agent_lock(self) -> Iterator[None]:
        """Hold `agent.lock` exclusively; a second agent on the same dir gets StoreError."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                by = f", held by pid {holder}" if holder.isdigit() else ""
                raise StoreError(
                    f"another agent is using data dir {self.root} (lock file {path}{by});"
                    " stop it or give this agent its own --data-dir"
                ) from None
            # The pid is only a hint for the message above; the flock is the lock.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    # -- blobs -----------------------------------------------------------------------------

    def has_blob(self, sha256: str) -> bool:
        return self.blobs.has(sha256)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs.path(sha256)

    def partial_offset(self, sha256: str) -> int:
        return self.blobs.partial_offset(sha256)

    def open_blob_writer(self, sha256: str, expected_size: int) -> BlobWriter:
        return self.blobs.open_writer(sha256, expected_size)

    def open_patch_writer(self, sha256: str, expected_size: int) -> BlobWriter:
        return self.blobs.open_patch_writer(sha256, expected_size)

    def delta_bases(self, entries: list[ManifestEntry]) -> DeltaBases:
        return deltas.delta_bases(self.blobs, entries)

    def apply_patch(self, entry: ManifestEntry, offer: DeltaOffer, max_window_log: int) -> None:
        deltas.apply(self.blobs, entry, offer, max_window_log)

    def gc_store(self, policy: StoreGcPolicy, grace_seconds: float, now: float) -> StoreGcReport:
        """Store GC after tree GC (same grace, pins and `current`; see store_gc.py)."""
        self.gc_trees(grace_seconds, now)
        return store_gc.collect(self.blobs, self.pkgs, self.trees, self.current_hash(), policy, now)

    # -- unpacked packages -----------------------------------------------------------------

    def has_pkg(self, sha256: str) -> bool:
        return self.pkgs.has(sha256)

    def unpack(self, entry: ManifestEntry) -> Path:
        """Re-verify the blob (disks rot), then extract it; BlobCorrupt deletes a rotten blob."""
        if self.pkgs.has(entry.sha256):
            return self.pkgs.site(entry.sha256)
        site = self.pkgs.unpack(entry, self.blobs.verify(entry.sha256), self._donor(entry))
        self.blobs.note(entry)
        return site

    def stage_pkg(
        self, entry: ManifestEntry, blob_verified: bool = False, unpack: Unpacker = unpack_package
    ) -> StagedPkg | None:
        """Unpack into a temp dir (None: already unpacked); `publish_pkgs` makes it visible.

        `blob_verified`: the blob was hashed while it was written just now, so it is not read
        once more; otherwise it is re-verified first (disks rot) and BlobCorrupt deletes it.
        `unpack` may run the extraction elsewhere (AsyncStore: worker processes).
        """
        if self.pkgs.has(entry.sha256):
            return None
        blobs = self.blobs
        blob = blobs.path(entry.sha256) if blob_verified else blobs.verify(entry.sha256)
        staged = self.pkgs.stage(entry, blob, unpack=unpack, donor=self._donor(entry))
        blobs.note(entry)  # what this blob is: store GC and delta bases go by it
        return staged

    def _donor(self, entry: ManifestEntry) -> str | None:
        """The package of `entry`'s project in the current tree, when it is another one: an
        upgrade links its unchanged files from there (sympy 1.14.0 -> 1.13.3: 1,072 of 1,555
        files). Drift repair never takes a donor: it must not trust what is on disk."""
        current = self.current_hash()
        if current is None:
            return None
        try:
            entries = self.trees.manifest(current).entries
        except SpkError:  # the tree went away meanwhile: unpack everything, as without one
            return None
        name = canonicalize_name(entry.name)
        for other in entries:
            if other.sha256 != entry.sha256 and canonicalize_name(other.name) == name:
                return other.sha256 if self.pkgs.has(other.sha256) else None
        return None

    def publish_pkgs(self, staged: list[StagedPkg]) -> None:
        """One syncfs for the whole batch, then each package is renamed into place."""
        self.pkgs.publish(staged)

    def verify_pkg(self, sha256: str) -> list[str]:
        return self.pkgs.verify(sha256)

    def replace_pkg(self, entry: ManifestEntry, unpack: Unpacker = unpack_package) -> None:
        """Drift repair: unpack a fresh copy from the blob and swap it in atomically, so trees
        linking to the package never see it missing. Without a good blob that cannot be done:
        the package is discarded and the next materialise pulls it (a short gap)."""
        try:
            blob = self.blobs.verify(entry.sha256)
        except (IntegrityError, StoreError):  # gone or rotten (BlobCorrupt deleted it)
            self.pkgs.discard(entry.sha256)
            return
        staged = self.pkgs.stage(entry, blob, replace=True, unpack=unpack)
        if staged is not None:
            self.pkgs.publish([staged])

    def discard_pkg(self, sha256: str) -> None:
        self.pkgs.discard(sha256)

    # -- trees -----------------------------------------------------------------------------

    def has_tree(self, lockfile_hash: str) -> bool:
        return self.trees.has(lockfile_hash)

    def tree_site(self, lockfile_hash: str) -> Path:
        return self.trees.site(lockfile_hash)

    def assemble_tree(self, manifest: Manifest, replace: bool = False) -> Path:
        return self.trees.assemble(manifest, self.pkgs, replace=replace)

    def tree_manifest(self, lockfile_hash: str) -> Manifest:
        """The manifest a tree was built from, read offline from its `.spk-tree.json`."""
        return self.trees.manifest(lockfile_hash)

    def verify_tree(self, lockfile_hash: str) -> list[str]:
        return self.trees.verify(lockfile_hash)

    def tree_size_bytes(self, lockfile_hash: str) -> int:
        return self.trees.size_bytes(lockfile_hash)

    def retire_others(self, now: float) -> list[str]:
        return self.trees.retire_others(self.current_hash(), now)

    def gc_trees(self, grace_seconds: float, now: float) -> list[str]:
        return self.trees.gc(self.current_hash(), grace_seconds, now)

    def pin_tree(self, lockfile_hash: str) -> contextlib.AbstractContextManager[TreePin]:
        return self.trees.pin(lockfile_hash)

    # -- current ---------------------------------------------------------------------------

    def current_hash(self) -> str | None:
        """The hash `current` names, or None when it is missing, foreign or dangling."""
        try:
            target = os.readlink(self.root / CURRENT)
        except OSError:  # missing, or not a symlink
            return None
        parts = Path(target).parts
        if len(parts) != 2 or parts[0] != "trees":
            return None
        try:
            lockfile_hash = checked_sha(parts[1])
        except IntegrityError:
            return None
        return lockfile_hash if self.trees.has(lockfile_hash) else None

    def flip_current(self, lockfile_hash: str) -> None:
        """Point `current` at a built tree: new symlink, rename over the old one, fsync."""
        if not self.trees.has(lockfile_hash):
            raise StoreError(f"cannot flip to tree {lockfile_hash}: it is not built")
        self.trees.unretire(lockfile_hash)
        tmp = self.root / f"{CURRENT_TMP}{secrets.token_hex(4)}"
        os.symlink(f"trees/{lockfile_hash}", tmp)
        # The link (its 70-byte target lives in a data block, not the inode) is made durable
        # before its name is: a symlink cannot be opened to fsync, its directory can. ext4's
        # ordered journal would keep this order anyway; other file systems need not.
        fsync_dir(self.root)
        try:
            os.replace(tmp, self.root / CURRENT)
        except OSError as exc:
            tmp.unlink()
            raise StoreError(
                f"cannot replace {self.root / CURRENT} ({exc.strerror}); it must be a symlink"
            ) from exc
        fsync_dir(self.root)

    # -- state -----------------------------------------------------------------------------

    def load_state(self) -> AgentState:
        path = self.root / STATE_FILE
        try:
            raw = json.loads(path.read_text())
            fields = {f.name for f in dataclasses.fields(AgentState)}
            return AgentState(**{k: v for k, v in raw.items() if k in fields})
        except FileNotFoundError:
            return AgentState()
        except (ValueError, TypeError) as exc:
            # Written atomically, so this means outside interference: start afresh, loudly.
            log.error("ignoring unreadable agent state %s: %s", path, exc)
            return AgentState()

    def save_state(self, state: AgentState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        body = json.dumps(dataclasses.asdict(state), sort_keys=True, indent=1)
        write_bytes_atomic(self.root / STATE_FILE, body.encode())

    # -- pinned signing key ----------------------------------------------------------------

    def read_pinned_key(self) -> str | None:
        """The PEM pinned on trust-on-first-use, None before the first contact."""
        try:
            return (self.root / PINNED_KEY_FILE).read_text()
        except FileNotFoundError:
            return None

    def pin_key(self, pem: str) -> None:
        """Pin the core's key durably: a crash never leaves a torn key that refuses every
        manifest (or no key, so the next start trusts the network again)."""
        write_bytes_atomic(self.root / PINNED_KEY_FILE, pem.encode())

    # -- housekeeping ----------------------------------------------------------------------

    def cleanup_temp(self) -> list[Path]:
        """Remove unfinished builds left by a crash. Resumable partial downloads are kept.

        Call it only while holding the agent lock: another agent's builds look the same.
        """
        removed = self.trees.cleanup_temp()
        leftovers = [self.pkgs.root.glob(f"{TMP_PREFIX}*"), self.pkgs.staging.glob("*")]
        for path in (p for group in leftovers for p in group):  # pkgs/.tmp-*: older versions
            remove_dir(path)
            removed.append(path)
        if self.root.is_dir():
            for pattern in (f"{CURRENT_TMP}*", f"{TMP_PREFIX}*"):
                for path in self.root.glob(pattern):
                    remove_dir(path)
                    removed.append(path)
        for path in removed:
            log.info("removed leftover %s", path)
        self.pkgs.staging.mkdir(parents=True, exist_ok=True)  # part of the layout from the start
        return removed
