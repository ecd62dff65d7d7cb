"""Safe wheel inspection and extraction: the one choke point the core and the satellites share.

`inspect_wheel` checks without writing; `extract_wheel` applies the same checks while it writes.
Every refusal is `UnsafeWheel(wheel, reason)`, the reason naming the entry and the rule. The
structural checks, made before anything is decompressed, are in shared.wheel_checks; then every
file is streamed here (capped at its declared size) and its digest/size compared with RECORD.
pip verifies none of this (see the design's pitfalls), so nothing here relies on it.
`check_identity` ties a checked wheel to the name and version it was listed as.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from shared.errors import UnsafeWheel
from shared.tree_content import DEFAULT_CONTENT_POLICY, TreeContentPolicy, left_out
from shared.wheel_checks import (
    DEFAULT_LIMITS,
    PlannedEntry,
    WheelInfo,
    WheelLimits,
    b64,
    entry_error,
    open_zip,
    plan,
)
from shared.zip_members import CorruptMember, member_chunks

__all__ = ["WheelInfo", "WheelLimits", "check_identity", "extract_wheel", "inspect_wheel"]

_CHUNK = 256 * 1024
_FILE_COST = 4096  # what creating a file weighs against its bytes when splitting a wheel
_LINKED_SHARE = 2  # a linked member is still inflated and hashed (its donor too): ~half the cost
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def inspect_wheel(
    path: Path,
    limits: WheelLimits = DEFAULT_LIMITS,
    filename: str | None = None,
    content: TreeContentPolicy = DEFAULT_CONTENT_POLICY,
) -> WheelInfo:
    """Check the wheel at `path` completely without writing anything; raise UnsafeWheel."""
    wheel = filename or path.name
    with path.open("rb") as f, open_zip(f, wheel, limits) as zf:
        info, entries = plan(zf, f.fileno(), wheel, limits)
        left_out(wheel, info, entries, content)  # what no tree may hold (shared.tree_content)
        for entry in entries:
            _copy_verified(f.fileno(), wheel, entry, None)
    return info


def extract_wheel(
    path: Path,
    dest: Path,
    limits: WheelLimits = DEFAULT_LIMITS,
    filename: str | None = None,
    content: TreeContentPolicy = DEFAULT_CONTENT_POLICY,
    *,
    part: int = 0,
    parts: int = 1,
    reuse: Mapping[str, str] | None = None,
) -> WheelInfo:
    """Check the wheel and unpack it into `dest` (created here, must not exist) as site-packages.

    `<dist>.data/purelib` and `platlib` go to the root; what shared.tree_content leaves out
    (other .data categories, start-up hooks) is verified but not written. Files are 0o444 (0o555
    when executable in the zip). On any failure `dest` is removed and the error re-raised.
    Nothing is fsynced: the caller fsyncs and renames the tree.

    `part` of `parts` (> 1): several processes unpack one big wheel together into a `dest` the
    caller made. Each checks the whole wheel first, exactly as above, then writes and checks its
    share of the members (split by size, the same in every process) and returns their hashes;
    a directory a sibling made is accepted once it proves a real directory inside `dest`. On a
    failure the caller removes `dest`, after every part has ended.

    `reuse` (sha256 hex -> path of a file said to hold exactly those bytes: the previous
    version's unpacked files) lets a member whose RECORD sha256 is there be hard-linked instead
    of written: the donor must prove a regular file with the member's mode whose bytes hash to
    RECORD's, and the inode so checked is linked into a checked directory; otherwise the member
    is written as usual. The member itself is still inflated and checked against RECORD: only
    the file creation and the writes are saved, and every check stays as it is
    (docs/storage.md).
    """
    wheel = filename or path.name
    with path.open("rb") as f, open_zip(f, wheel, limits) as zf:
        info, entries = plan(zf, f.fileno(), wheel, limits)
        skipped = left_out(wheel, info, entries, content)
        src = f.fileno()
        donors = reuse or {}
        if parts > 1:
            entries = _share(entries, part, parts, donors)
        else:
            # Created only now, so a structurally hostile wheel never touches the disk; an
            # existing dest raises FileExistsError and is left alone: it is not ours to delete.
            dest.mkdir(mode=0o755, parents=True)
        try:
            writer = _TreeWriter(dest.resolve(), wheel, shared=parts > 1)
            hashes: dict[str, tuple[str, int]] = {}
            for entry in entries:
                if entry.target in skipped:  # checked against RECORD all the same
                    _copy_verified(src, wheel, entry, None)
                    continue
                donor = _donor(entry, donors)
                if donor is not None and _link_verified(writer, entry, donor):
                    # The member is checked against RECORD all the same, only not written.
                    hashes[entry.target] = (_copy_verified(src, wheel, entry, None), entry.size)
                    continue
                fd = writer.create_file(entry.target, entry.mode)
                try:
                    hashes[entry.target] = (_copy_verified(src, wheel, entry, fd), entry.size)
                finally:
                    os.close(fd)
        except BaseException:
            if parts == 1:
                _remove_tree(dest)
            raise
    return replace(info, hashes=hashes)


def _share(
    entries: list[PlannedEntry], part: int, parts: int, donors: Mapping[str, str]
) -> list[PlannedEntry]:
    """This part's members: each goes to the part with the fewest bytes so far (a file costs
    its size plus a little for creating it; a linked one about half), in archive order,
    so every part computes the same split and reads its members in order."""
    loads = [0] * parts
    mine: list[PlannedEntry] = []
    for entry in entries:
        lightest = loads.index(min(loads))
        linked = _donor(entry, donors) is not None
        loads[lightest] += (entry.size // _LINKED_SHARE if linked else entry.size) + _FILE_COST
        if lightest == part:
            mine.append(entry)
    return mine


def check_identity(info: WheelInfo, name: str, version: str) -> None:
    """Refuse a checked wheel that is not project `name` at `version`, as it was listed.

    inspect_wheel and extract_wheel have tied METADATA's Name and Version to the filename; this
    ties them to the caller's entry (the resolver's report, say), so an index cannot serve one
    project, or one release, in place of another.
    """
    try:
        same = canonicalize_name(name) == info.name and Version(version) == Version(info.version)
    except InvalidVersion:
        same = False
    if not same:
        raise UnsafeWheel(
            info.filename,
            f"METADATA says {info.metadata_name} {info.metadata_version}, the entry says"
            f" {name} {version}; a wheel must be the project and version it is listed as",
        )


def _copy_verified(fd_in: int, wheel: str, entry: PlannedEntry, fd: int | None) -> str:
    """Stream one member through sha256 (and into `fd`), compare it with RECORD; its sha256 hex.

    sha256 always, since callers record it; a RECORD that uses a stronger algorithm is checked
    with that one too (a second pass over each chunk, only for such wheels).
    """
    info = entry.info
    hasher = hashlib.sha256()
    checker = hashlib.new(entry.algorithm) if entry.algorithm != "sha256" else hasher
    chunks = member_chunks(
        fd_in,
        entry.data_offset,
        info.compress_size,
        entry.size,
        info.CRC,
        info.compress_type == zipfile.ZIP_DEFLATED,
        _CHUNK,
    )
    try:
        for chunk in chunks:
            hasher.update(chunk)
            if checker is not hasher:
                checker.update(chunk)
            if fd is not None:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
    except CorruptMember as exc:
        raise entry_error(wheel, info.orig_filename, str(exc)) from None
    if entry.digest is not None and (actual := checker.digest()) != entry.digest:
        rule = f"RECORD says {entry.algorithm}={b64(entry.digest)}, content is {b64(actual)}"
        raise entry_error(wheel, info.orig_filename, f"RECORD hash mismatch: {rule}")
    return hasher.hexdigest()


def _donor(entry: PlannedEntry, donors: Mapping[str, str]) -> str | None:
    """A file to link for this member: only by a sha256 RECORD row, never for an empty file
    (nothing to inflate, and a link per empty `__init__.py` would pile onto one inode)."""
    if not donors or entry.size == 0 or entry.algorithm != "sha256" or entry.digest is None:
        return None
    return donors.get(entry.digest.hex())


def _link_verified(writer: _TreeWriter, entry: PlannedEntry, donor: str) -> bool:
    """Link `donor` as the member if it is a regular file with the member's mode, size and
    sha256; False (nothing written) otherwise. The inode that was checked is the one linked
    (through /proc/self/fd), so nothing can be swapped in between; O_NONBLOCK, so a FIFO put
    in a donor's place cannot stall the unpack."""
    try:
        fd = os.open(donor, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone, or a symlink (O_NOFOLLOW: ELOOP)
        return False
    try:
        st = os.fstat(fd)
        same = stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == entry.mode
        same = same and st.st_size == entry.size and _sha256_fd(fd) == entry.digest
        # A donor changed since it was unpacked is left alone: the member is written instead.
        return same and writer.link_file(entry.target, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _sha256_fd(fd: int) -> bytes:
    hasher = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        hasher.update(chunk)
    return hasher.digest()


class _TreeWriter:
    """Creates files under `root`; every directory it makes is checked to resolve inside root.

    Names were already checked, so this is the second line of defence. Directories are resolved
    once each (resolving every file would cost a realpath walk per file on the hot path); files
    are then created with O_EXCL|O_NOFOLLOW inside a checked directory, so no link is followed.
    """

    def __init__(self, root: Path, wheel: str, shared: bool = False) -> None:
        self._root = root
        self._root_str = str(root)
        self._wheel = wheel
        self._dirs = {""}
        self._shared = shared  # other processes create directories in `root` too

    def create_file(self, rel: str, mode: int) -> int:
        self._ensure_dir(rel.rpartition("/")[0])
        fd = os.open(os.path.join(self._root_str, rel), _FILE_FLAGS, mode)
        os.fchmod(fd, mode)  # the umask must not change what a content-addressed tree looks like
        return fd

    def link_file(self, rel: str, fd_path: str) -> bool:
        """Hard-link the open file `fd_path` (/proc/self/fd/N) names as `rel`; False when the
        link cannot be made (no /proc, another file system, too many links)."""
        parent, _, name = rel.rpartition("/")
        self._ensure_dir(parent)
        # A directory fd makes os.link call linkat(AT_SYMLINK_FOLLOW), which resolves the
        # /proc link to the open inode; plain link(2) would try to link the /proc entry itself.
        dir_fd = os.open(
            os.path.join(self._root_str, parent), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        )
        try:
            os.link(fd_path, name, dst_dir_fd=dir_fd, follow_symlinks=True)
        except FileExistsError:
            raise  # as create_file: a duplicate member is a bug upstream, never overwritten
        except OSError:
            return False
        finally:
            os.close(dir_fd)
        return True

    def _ensure_dir(self, rel: str) -> None:
        if rel in self._dirs:
            return
        self._ensure_dir(rel.rpartition("/")[0])
        path = os.path.join(self._root_str, rel)
        if not _inside(self._root, path):
            raise UnsafeWheel(self._wheel, f"directory {rel!r} resolves outside the target")
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            # A sibling part made it: only a real directory (never a link) will do, and it
            # must still resolve inside the target.
            if not self._shared or not stat.S_ISDIR(os.lstat(path).st_mode):
                raise
            if not _inside(self._root, path):
                raise UnsafeWheel(
                    self._wheel, f"directory {rel!r} resolves outside the target"
                ) from None
        os.chmod(path, 0o755)  # noqa: S103 -- the tree is shared read-only with script runs
        self._dirs.add(rel)


def _inside(root: Path, path: str) -> bool:
    # is_relative_to compares components: /x/dest-evil is not inside /x/dest; a string prefix is.
    return Path(path).resolve().is_relative_to(root)


def _remove_tree(path: Path) -> None:
    def make_writable_and_retry(func: Callable[..., Any], failed: str, _exc: Any) -> None:
        # Our files are read-only; rmtree needs write permission on their directory.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o755)  # noqa: S103 -- about to delete it
        func(failed)

    # Cleanup must not mask the original error, which the caller re-raises.
    with contextlib.suppress(OSError):
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=make_writable_and_retry)
        else:
            shutil.rmtree(path, onerror=make_writable_and_retry)
