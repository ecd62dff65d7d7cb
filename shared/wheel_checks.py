"""Structural wheel checks and the extraction plan: everything decided before a byte is written.

Kept apart from the streaming in shared.wheels so the rules a hostile archive must pass read as one
list. Cheap checks run first, so a hostile archive is refused before anything is decompressed:
filename and entry count; per entry name, type, method, duplicates, sizes, ratio; overlapping
local headers; one matching .dist-info, Wheel-Version, METADATA Name and Version against the
filename, .data categories, install-path collisions; RECORD rows against the zip. `plan` returns the
entries to stream; shared.wheels checks them against RECORD.

What is refused is what the wheel spec refuses (plus resource caps), no more: RECORD may use any
hash at least as strong as sha256, and the spec-violating but harmless shapes real wheels ship
(hex digests, a leading "/" or "./" on RECORD paths, identical duplicate rows) are normalised.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, BinaryIO, TypeVar

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from shared import wheel_metadata
from shared.errors import UnsafeWheel

# Deflate tops out near 1032:1 and real wheels get close: onnx ships 2.5 MB of test data at
# 1016:1, scipy 0.5 MB files at 235:1 (measured on the local index). Below this size an entry is
# left to the total cap; the ratio cap is for single outputs big enough to hurt.
_RATIO_FLOOR = 16 << 20
_HEX = re.compile(r"[0-9a-f]+")
# The spec allows any RECORD hash "sha256 or better" and names md5 and sha1 as refused. Accepted:
# the fixed-length algorithms hashlib guarantees on every build whose digest has at least 256
# bits. Guaranteed, so the core and every satellite (other Pythons, other OpenSSL builds) accept
# exactly the same wheels; fixed-length, since shake_* needs a length that RECORD cannot carry.
# Refused: md5, sha1, sha224, sha3_224 (too weak), and anything unknown.
_STRONG = ("sha256", "sha384", "sha512", "sha3_256", "sha3_384", "sha3_512", "blake2b", "blake2s")
RECORD_HASHES = {name: hashlib.new(name).digest_size for name in _STRONG}  # name -> digest bytes
_MAX_RECORD_BYTES = 64 << 20
_UNHASHED = frozenset({"RECORD", "RECORD.jws", "RECORD.p7s"})
_TO_ROOT = frozenset({"purelib", "platlib"})
_KEPT = frozenset({"scripts", "headers", "data"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
T = TypeVar("T")
# Malformed archives surface from zipfile/zlib as any of these; real I/O errors (OSError) do not.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class WheelLimits:
    """Caps that keep a hostile wheel from exhausting disk, memory or time."""

    max_unpacked_bytes: int = 1 << 30  # total decompressed size, declared and actual
    max_entries: int = 50_000  # archive members, directories included
    max_ratio: float = 200.0  # per entry decompressed:compressed (zip bomb), above 16 MiB


DEFAULT_LIMITS = WheelLimits()


@dataclass(frozen=True)
class WheelInfo:
    """What a checked wheel contains."""

    filename: str
    name: str  # PEP 503 normalised
    version: str
    tags: frozenset[str]  # e.g. "py3-none-any"
    files: tuple[str, ...]  # archive paths of regular files, in archive order
    unpacked_size: int
    # From the wheel's own .dist-info, as written there. plan() has checked that they match the
    # filename (name canonicalised, version by PEP 440 equality); see wheels.check_identity.
    metadata_name: str  # METADATA Name
    metadata_version: str  # METADATA Version
    requires_python: str | None  # METADATA Requires-Python, unchecked; None when absent
    wheel_version: str  # WHEEL Wheel-Version, major 1
    # extract_wheel only: install path -> (sha256 hex, size) of every file written, hashed while
    # writing, so callers need not read the tree back to record it.
    hashes: dict[str, tuple[str, int]] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    """One regular file that passed the structural checks, with what RECORD promises for it."""

    info: zipfile.ZipInfo
    target: str  # path relative to the install root, after the .data mapping
    digest: bytes | None  # None only for RECORD and its signatures
    algorithm: str  # of `digest`, a key of RECORD_HASHES
    size: int
    mode: int
    data_offset: int  # where its compressed bytes start (past the local header, checked)


def _check_count(wheel: str, count: int | None, limits: WheelLimits) -> None:
    if count is not None and count > limits.max_entries:
        raise UnsafeWheel(wheel, f"has {count} entries, more than the limit {limits.max_entries}")


def open_zip(f: BinaryIO, wheel: str, limits: WheelLimits) -> zipfile.ZipFile:
    """Open `f` as a zip, refusing it first if its end record admits to too many entries."""
    _check_count(wheel, _declared_entry_count(f.fileno()), limits)
    try:
        return zipfile.ZipFile(f)
    except ZIP_ERRORS as exc:
        raise UnsafeWheel(wheel, f"is not a readable zip archive: {exc}") from None


def _declared_entry_count(fd: int) -> int | None:
    """The entry count from the end-of-central-directory record, or None when unreadable.

    zipfile builds a ZipInfo per entry before anyone can count them (100k entries cost ~50 MB),
    so a wheel that admits to too many is refused first. A lying count only skips this shortcut:
    the count of what zipfile parsed is checked again afterwards.
    """
    size = os.fstat(fd).st_size
    tail = os.pread(fd, min(size, 22 + 0xFFFF), max(size - 22 - 0xFFFF, 0))
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        return None
    (count,) = struct.unpack_from("<H", tail, pos + 10)
    if count != 0xFFFF:
        return int(count)
    loc = pos - 20  # zip64: the locator sits right before the classic end record
    if loc < 0 or tail[loc : loc + 4] != b"PK\x06\x07":
        return None
    record = os.pread(fd, 56, struct.unpack_from("<Q", tail, loc + 8)[0])
    if len(record) < 56 or record[:4] != b"PK\x06\x06":
        return None
    return int(struct.unpack_from("<Q", record, 32)[0])


def plan(
    zf: zipfile.ZipFile, fd: int, wheel: str, limits: WheelLimits
) -> tuple[WheelInfo, list[PlannedEntry]]:
    """Every check that needs no decompression except reading RECORD (steps 1-5)."""
    try:
        name, version, _build, tags = parse_wheel_filename(wheel)
    except ValueError as exc:
        raise UnsafeWheel(wheel, f"invalid wheel filename: {exc}") from None
    infos = zf.infolist()
    _check_count(wheel, len(infos), limits)

    files: dict[str, zipfile.ZipInfo] = {}
    dirs: set[str] = set()
    declared = 0
    for info in infos:
        raw = info.orig_filename  # zipfile's .filename silently cuts at a NUL byte
        _check_entry(wheel, info, limits)
        if raw in files or raw in dirs:
            raise entry_error(wheel, raw, "appears twice (duplicate name)")
        if raw.endswith("/"):
            dirs.add(raw)
            continue
        files[raw] = info
        declared += info.file_size
        if declared > limits.max_unpacked_bytes:
            raise UnsafeWheel(wheel, f"unpacks to over {limits.max_unpacked_bytes} bytes (limit)")
    data_offsets = _check_local_headers(wheel, fd, infos, zf.start_dir)

    dist_info = _dist_info_dir(wheel, files, name, version)
    # Before the layout is read further: a new major version may change what it means.
    wheel_version = _read_member(
        zf, wheel, files[f"{dist_info}/WHEEL"], wheel_metadata.wheel_version
    )
    claims = _read_member(
        zf,
        wheel,
        files[f"{dist_info}/METADATA"],
        lambda f: wheel_metadata.identity(f, name, version),
    )
    targets = _targets(wheel, files, dist_info.removesuffix(".dist-info") + ".data")
    record = _read_record(zf, wheel, files[f"{dist_info}/RECORD"], limits)
    entries: list[PlannedEntry] = []
    for raw, info in files.items():
        algorithm, digest, size = _expected(wheel, raw, info, record.pop(raw, None), dist_info)
        mode = 0o555 if (info.external_attr >> 16) & 0o111 else 0o444
        offset = data_offsets[info.header_offset]
        entries.append(PlannedEntry(info, targets[raw], digest, algorithm, size, mode, offset))
    for raw in dirs:  # some writers list directories in RECORD; harmless
        record.pop(raw, None)
    if record:
        missing = next(iter(record))
        raise UnsafeWheel(wheel, f"RECORD lists {missing!r}, which is missing from the archive")
    # Reading in archive order keeps the I/O sequential.
    entries.sort(key=lambda e: e.info.header_offset)
    checked = WheelInfo(
        filename=wheel,
        name=name,
        version=str(version),
        tags=frozenset(map(str, tags)),
        files=tuple(files),
        unpacked_size=declared,
        metadata_name=claims.name,
        metadata_version=claims.version,
        requires_python=claims.requires_python,
        wheel_version=wheel_version,
    )
    return checked, entries


def _check_entry(wheel: str, info: zipfile.ZipInfo, limits: WheelLimits) -> None:
    raw = info.orig_filename
    problem = _name_problem(raw)
    if problem:
        raise entry_error(wheel, raw, problem)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise entry_error(wheel, raw, "is a symlink; only regular files are allowed")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise entry_error(wheel, raw, f"is not a regular file (file type {kind:#o})")
    if kind == stat.S_IFDIR and not raw.endswith("/"):
        raise entry_error(wheel, raw, "is marked as a directory but lacks a trailing /")
    if raw.endswith("/") and info.file_size:
        raise entry_error(wheel, raw, "is a directory with content")
    if info.flag_bits & 0x1:
        raise entry_error(wheel, raw, "is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise entry_error(
            wheel, raw, f"uses compression {info.compress_type}, not stored or deflate"
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _RATIO_FLOOR and ratio > limits.max_ratio:
        raise entry_error(
            wheel, raw, f"exceeds the compression ratio cap ({ratio:.0f}:1; zip bomb)"
        )


def _name_problem(name: str) -> str | None:
    """Why `name` is not a safe relative archive path, or None."""
    if not name:
        return "has an empty name"
    if _CONTROL.search(name):
        return "contains a NUL or control character"
    if "\\" in name:
        return "contains a backslash (Windows path separator)"
    if name.startswith("/"):
        return "is an absolute path"
    if _DRIVE.match(name):
        return "starts with a drive letter"
    segments = name.split("/")
    if name.endswith("/"):
        segments.pop()
    for segment in segments:
        if segment == "..":
            return "escapes the target (.. segment)"
        if segment in ("", "."):
            return "has an empty or '.' path segment"
        if len(segment.encode("utf-8", "surrogatepass")) > 255:
            return "has a path segment longer than 255 bytes"
    return None


def _check_local_headers(
    wheel: str, fd: int, infos: list[zipfile.ZipInfo], cd_start: int
) -> dict[int, int]:
    """Refuse entries whose data runs into the next local header (or the central directory),
    or whose local header names another file; header offset -> where the data starts.

    Overlapping entries let a small archive expand the same compressed bytes many times over.
    The local header is read here (not trusted from the central directory) because its extra
    field length decides where the data really starts; its name must be the central
    directory's, as zipfile requires, since extraction reads the data from here on.
    """
    ordered = sorted(infos, key=lambda i: i.header_offset)
    if ordered and ordered[0].header_offset != 0:
        raise UnsafeWheel(wheel, f"has {ordered[0].header_offset} bytes before its first entry")
    starts: dict[int, int] = {}
    for i, info in enumerate(ordered):
        # The name is read with the header: one pread per entry (a longer one falls back).
        header = os.pread(fd, 30 + 256, info.header_offset)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise entry_error(wheel, info.orig_filename, "has no valid local header")
        (flags,) = struct.unpack_from("<H", header, 6)
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        name = header[30 : 30 + name_len]
        if len(name) < name_len:
            name = os.pread(fd, name_len, info.header_offset + 30)
        local = name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if local != info.orig_filename:
            raise entry_error(
                wheel, info.orig_filename, f"has {local!r} in its local header (names differ)"
            )
        starts[info.header_offset] = info.header_offset + 30 + name_len + extra_len
        end = starts[info.header_offset] + info.compress_size
        limit = ordered[i + 1].header_offset if i + 1 < len(ordered) else cd_start
        if end > limit:
            other = ordered[i + 1].orig_filename if i + 1 < len(ordered) else "central directory"
            raise entry_error(
                wheel, info.orig_filename, f"overlaps {other!r} (overlapping zip entries)"
            )
    return starts


def _dist_info_dir(
    wheel: str, files: dict[str, zipfile.ZipInfo], name: str, version: Version
) -> str:
    tops = {raw.partition("/")[0] for raw in files if "/" in raw}
    found = sorted(top for top in tops if top.endswith(".dist-info"))
    if len(found) != 1:
        raise UnsafeWheel(wheel, f"has {len(found)} .dist-info directories {found}; need exactly 1")
    dist_info = found[0]
    # Legacy writers escaped '-' in names to '_', so the version is after the last dash.
    di_name, _, di_version = dist_info.removesuffix(".dist-info").rpartition("-")
    try:
        matches = canonicalize_name(di_name) == name and Version(di_version) == version
    except InvalidVersion:
        matches = False
    if not matches:
        raise UnsafeWheel(wheel, f"directory {dist_info!r} does not match the wheel filename")
    for required in ("METADATA", "WHEEL", "RECORD"):
        if f"{dist_info}/{required}" not in files:
            raise UnsafeWheel(wheel, f"has no {dist_info}/{required}")
    return dist_info


def _read_member(
    zf: zipfile.ZipFile, wheel: str, info: zipfile.ZipInfo, read: Callable[[IO[bytes]], T]
) -> T:
    """`read` applied to one member (WHEEL, METADATA), its refusals naming the entry."""
    try:
        with zf.open(info) as f:
            return read(f)
    except wheel_metadata.BadFields as exc:
        raise entry_error(wheel, info.orig_filename, str(exc)) from None
    except ZIP_ERRORS as exc:
        raise entry_error(wheel, info.orig_filename, f"is corrupt: {exc}") from None


def _targets(wheel: str, files: dict[str, zipfile.ZipInfo], data_dir: str) -> dict[str, str]:
    """Map archive paths to install paths; refuse two entries that land on one path."""
    targets: dict[str, str] = {}
    by_target: dict[str, str] = {}
    parents: set[str] = set()
    for raw in files:
        target = raw
        top, _, rest = raw.partition("/")
        if top == data_dir:
            category, _, inner = rest.partition("/")
            if category not in _TO_ROOT and category not in _KEPT:
                raise entry_error(wheel, raw, f"uses unknown .data category {category!r}")
            if not inner:
                raise entry_error(wheel, raw, "is not inside a .data category directory")
            if category in _TO_ROOT:
                target = inner
        if (other := by_target.get(target)) is not None:
            raise UnsafeWheel(wheel, f"entries {other!r} and {raw!r} both install to {target!r}")
        by_target[target] = raw
        targets[raw] = target
        parent = target.rpartition("/")[0]
        while parent and parent not in parents:
            parents.add(parent)
            parent = parent.rpartition("/")[0]
    for target, raw in by_target.items():
        if target in parents:
            raise entry_error(wheel, raw, "is a file where other entries need a directory")
    return targets


def _read_record(
    zf: zipfile.ZipFile, wheel: str, info: zipfile.ZipInfo, limits: WheelLimits
) -> dict[str, tuple[str, str]]:
    """RECORD rows as archive path -> (hash, size). Read whole (it is small) but capped.

    A path written with one leading "/" or "./" (selenium 4.1.0's writer does the former) means
    the archive path without it, and identical duplicate rows collapse: pip installs such wheels,
    and every row must still name an archive member whose bytes match, so nothing is trusted
    that was not before. Rows that disagree about one path, or paths that could not name a safe
    archive member, stay refused.
    """
    if info.file_size > _MAX_RECORD_BYTES:
        raise UnsafeWheel(wheel, f"RECORD is {info.file_size} bytes, over {_MAX_RECORD_BYTES}")
    try:
        with zf.open(info) as f:
            text = f.read(_MAX_RECORD_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeWheel(wheel, "RECORD is not UTF-8") from None
    except ZIP_ERRORS as exc:
        raise entry_error(wheel, info.orig_filename, f"is corrupt: {exc}") from None
    rows: dict[str, tuple[str, str]] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != 3:
                raise UnsafeWheel(wheel, f"RECORD line {reader.line_num} has {len(row)} fields")
            written, hash_field, size_field = row
            path = _record_path(wheel, written, reader.line_num)
            if (seen := rows.get(path)) is not None:
                if seen != (hash_field, size_field):
                    what = "hashes" if seen[0] != hash_field else "sizes"
                    rule = f"{seen[0]},{seen[1]} and {hash_field},{size_field}"
                    raise UnsafeWheel(
                        wheel, f"RECORD lists {path!r} twice with different {what} ({rule})"
                    )
                continue
            if len(rows) >= limits.max_entries:
                raise UnsafeWheel(wheel, f"RECORD has more than {limits.max_entries} rows")
            rows[path] = (hash_field, size_field)
    except csv.Error as exc:  # e.g. a field over csv's 128 KiB limit
        raise UnsafeWheel(wheel, f"RECORD line {reader.line_num} is not valid CSV: {exc}") from None
    return rows


def _record_path(wheel: str, written: str, line: int) -> str:
    """The archive path a RECORD row names: `written` less one leading "/" or "./"."""
    path = written[1:] if written.startswith("/") else written.removeprefix("./")
    # Archive members all pass these rules, so a row that breaks them could only be refused
    # later as missing; saying why here is clearer (e.g. "/../x" is "../x", not a member).
    if problem := _name_problem(path):
        raise UnsafeWheel(wheel, f"RECORD line {line} path {written!r} {problem}")
    return path


def _expected(
    wheel: str, raw: str, info: zipfile.ZipInfo, row: tuple[str, str] | None, dist_info: str
) -> tuple[str, bytes | None, int]:
    """The hash algorithm, digest and size RECORD promises for `raw` (size checked vs the zip)."""
    top, _, base = raw.partition("/")
    unhashed = top == dist_info and base in _UNHASHED
    if row is None or (unhashed and (base == "RECORD" or not row[0])):
        if unhashed:  # RECORD cannot hash itself; signatures over RECORD may be unlisted
            return "sha256", None, info.file_size
        raise entry_error(wheel, raw, "is not listed in RECORD")
    hash_field, size_field = row
    algorithm, _, encoded = hash_field.partition("=")
    if algorithm not in RECORD_HASHES:
        allowed = ", ".join(RECORD_HASHES)
        raise entry_error(
            wheel, raw, f"has RECORD hash {hash_field!r}; need sha256 or stronger ({allowed})"
        )
    digest = _decode_digest(encoded, RECORD_HASHES[algorithm])
    if digest is None:
        raise entry_error(wheel, raw, f"has a malformed RECORD hash {hash_field!r}")
    if not (size_field.isascii() and size_field.isdigit()):
        raise entry_error(wheel, raw, f"has RECORD size {size_field!r}; need bytes")
    if int(size_field) != info.file_size:
        rule = f"RECORD says {int(size_field)} bytes, zip says {info.file_size}"
        raise entry_error(wheel, raw, f"RECORD size mismatch: {rule}")
    return algorithm, digest, info.file_size


def entry_error(wheel: str, raw: str, rule: str) -> UnsafeWheel:
    """The refusal for archive entry `raw` breaking `rule`."""
    return UnsafeWheel(wheel, f"entry {raw!r} {rule}")


def _decode_digest(encoded: str, size: int) -> bytes | None:
    """The `size`-byte digest RECORD wrote as `encoded`, or None when it is not one."""
    # PEP 376 says base64, but some wheels (gmsh) write hex. The length tells them apart: hex
    # is 2*size characters, base64 about 1.33*size, so a base64 text of only hex digits (as
    # sha384's 64 characters could be) is never read as hex.
    if len(encoded) == 2 * size and _HEX.fullmatch(encoded):
        return bytes.fromhex(encoded)
    try:
        digest = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except ValueError:  # binascii.Error
        return None
    # The decoder silently skips junk characters; a round trip proves the text was canonical.
    return digest if len(digest) == size and b64(digest) == encoded else None


def b64(digest: bytes) -> str:
    """`digest` as RECORD writes it: urlsafe base64 without padding."""
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
