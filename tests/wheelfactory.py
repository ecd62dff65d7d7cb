"""Build real wheel files for tests: well-formed ones and deliberately hostile ones."""

from __future__ import annotations

import base64
import hashlib
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name


def _record_hash(data: bytes, algorithm: str = "sha256") -> str:
    digest = base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest()).rstrip(b"=").decode()
    return f"{algorithm}={digest}"


@dataclass
class WheelSpec:
    """A wheel to build. `files` maps archive paths to content (the dist-info is added)."""

    name: str
    version: str
    files: Mapping[str, bytes] = field(default_factory=dict)
    requires: Sequence[str] = ()
    tag: str = "py3-none-any"
    # Hostile knobs (all off by default).
    extra_entries: Mapping[str, bytes] = field(default_factory=dict)  # written but NOT in RECORD
    record_overrides: Mapping[str, str] = field(default_factory=dict)  # path -> "hash,size" lie
    symlinks: Mapping[str, str] = field(default_factory=dict)  # archive path -> link target
    omit_record: bool = False
    executables: Sequence[str] = ()  # paths in `files` stored with mode 0o755
    special_entries: Mapping[str, int] = field(default_factory=dict)  # path -> st_mode, empty
    extra_record_lines: Sequence[str] = ()  # raw RECORD lines, e.g. for files not in the zip
    # Shapes the spec allows or real wheels ship (defaults are what most writers do).
    record_algorithm: str = "sha256"  # hashlib name used for every RECORD row
    record_paths: Mapping[str, str] = field(default_factory=dict)  # path -> as RECORD writes it
    wheel_version: str | None = "1.0"  # WHEEL's Wheel-Version; None leaves the field out
    metadata_name: str | None = None  # METADATA Name when not `name`
    metadata_version: str | None = None  # METADATA Version when not `version`
    metadata_tail: str = ""  # raw text after the generated METADATA fields (fields, body)

    @property
    def dist(self) -> str:
        return canonicalize_name(self.name).replace("-", "_")

    @property
    def filename(self) -> str:
        return f"{self.dist}-{self.version}-{self.tag}.whl"

    @property
    def dist_info(self) -> str:
        return f"{self.dist}-{self.version}.dist-info"


def default_module(spec: WheelSpec) -> dict[str, bytes]:
    mod = spec.dist
    return {f"{mod}/__init__.py": f"NAME = {spec.name!r}\nVERSION = {spec.version!r}\n".encode()}


def build_wheel(spec: WheelSpec, out_dir: Path) -> Path:
    """Write the wheel into out_dir and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = dict(spec.files) if spec.files else default_module(spec)
    meta = [
        "Metadata-Version: 2.1",
        f"Name: {spec.name if spec.metadata_name is None else spec.metadata_name}",
        f"Version: {spec.version if spec.metadata_version is None else spec.metadata_version}",
    ]
    meta += [f"Requires-Dist: {r}" for r in spec.requires]
    files[f"{spec.dist_info}/METADATA"] = ("\n".join(meta) + "\n" + spec.metadata_tail).encode()
    wheel = [] if spec.wheel_version is None else [f"Wheel-Version: {spec.wheel_version}"]
    wheel += ["Generator: wheelfactory", "Root-Is-Purelib: true", f"Tag: {spec.tag}"]
    files[f"{spec.dist_info}/WHEEL"] = ("\n".join(wheel) + "\n").encode()
    record_path = f"{spec.dist_info}/RECORD"
    lines = []
    for path, data in files.items():
        row = f"{_record_hash(data, spec.record_algorithm)},{len(data)}"
        lines.append(f"{spec.record_paths.get(path, path)},{spec.record_overrides.get(path, row)}")
    lines.extend(spec.extra_record_lines)
    lines.append(f"{spec.record_paths.get(record_path, record_path)},,")
    target = out_dir / spec.filename
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            if path in spec.executables:
                exe = zipfile.ZipInfo(path)
                exe.external_attr = 0o100755 << 16
                zf.writestr(exe, data, zipfile.ZIP_DEFLATED)
            else:
                zf.writestr(path, data)
        for path, data in spec.extra_entries.items():
            zf.writestr(path, data)
        for path, link in spec.symlinks.items():
            info = zipfile.ZipInfo(path)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, link)
        for path, mode in spec.special_entries.items():
            info = zipfile.ZipInfo(path)
            info.external_attr = mode << 16
            zf.writestr(info, b"")
        if not spec.omit_record:
            zf.writestr(record_path, "\n".join(lines) + "\n")
    return target


def build_sdist(name: str, version: str, out_dir: Path, setup_marker: Path | None = None) -> Path:
    """A minimal sdist (tar.gz). The core must refuse to build it: with `setup_marker`, its
    setup.py (and its build backend hook) writes that file when run, which proves it ran."""
    import io
    import tarfile

    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    target = out_dir / f"{base}.tar.gz"
    with tarfile.open(target, "w:gz") as tf:
        pkg_info = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        info.size = len(pkg_info)
        tf.addfile(info, io.BytesIO(pkg_info))
        touch = f"open({str(setup_marker)!r}, 'w').close()\n" if setup_marker else ""
        setup = f"{touch}from setuptools import setup\nsetup()\n".encode()
        info = tarfile.TarInfo(f"{base}/setup.py")
        info.size = len(setup)
        tf.addfile(info, io.BytesIO(setup))
    return target


# Raw-byte hostile archives: things zipfile will not write on its own.


def patch_archive_bytes(wheel: Path, old: bytes, new: bytes) -> None:
    """Replace `old` by `new` (same length) throughout the archive, e.g. a NUL into a name."""
    assert len(old) == len(new), "same length keeps every offset valid"
    data = wheel.read_bytes()
    assert old in data, f"{old!r} not found in {wheel.name}"
    wheel.write_bytes(data.replace(old, new))


def _central_entry(data: bytes, name: str) -> tuple[int, int, int, int]:
    """(record position, record length, central directory offset, size) of `name`.

    Assumes no zip64 and no archive comment, which is what build_wheel writes.
    """
    eocd = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<II", data, eocd + 12)
    pos = cd_offset
    while pos < cd_offset + cd_size:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        length = 46 + name_len + extra_len + comment_len
        if data[pos + 46 : pos + 46 + name_len] == name.encode():
            return pos, length, cd_offset, cd_size
        pos += length
    raise KeyError(name)


def alias_central_entry(wheel: Path, existing: str, alias: str) -> None:
    """Add a central-directory entry `alias` pointing at `existing`'s local header.

    Two entries sharing one local header is the overlapping-entries zip bomb: the same
    compressed bytes are expanded once per alias.
    """
    data = wheel.read_bytes()
    pos, _, cd_offset, cd_size = _central_entry(data, existing)
    record = bytearray(data[pos : pos + 46])
    struct.pack_into("<HHH", record, 28, len(alias.encode()), 0, 0)  # no extra, no comment
    record += alias.encode()
    eocd = data.rfind(b"PK\x05\x06")
    end = bytearray(data[eocd:])
    n_disk, n_total = struct.unpack_from("<HH", end, 8)
    struct.pack_into("<HHI", end, 8, n_disk + 1, n_total + 1, cd_size + len(record))
    cd_end = cd_offset + cd_size
    wheel.write_bytes(data[:cd_end] + bytes(record) + data[cd_end:eocd] + end)


def set_declared_size(wheel: Path, name: str, size: int) -> None:
    """Make both headers of `name` claim `size` uncompressed bytes: a lying file_size."""
    data = bytearray(wheel.read_bytes())
    pos, _, _, _ = _central_entry(bytes(data), name)
    (local,) = struct.unpack_from("<I", data, pos + 42)
    struct.pack_into("<I", data, pos + 24, size)
    struct.pack_into("<I", data, local + 22, size)
    wheel.write_bytes(bytes(data))


def build_wide_wheel(name: str, version: str, n_files: int, out_dir: Path) -> Path:
    """A well-formed wheel with `n_files` empty modules (zip64 when needed).

    Written as raw stored entries: zipfile needs ~5 s for 100,000 entries, this ~0.5 s.
    """
    spec = WheelSpec(name, version)
    files = {f"{spec.dist}/m{i}.py": b"" for i in range(n_files)}
    files[f"{spec.dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    )
    files[f"{spec.dist_info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {spec.tag}\n".encode()
    )
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{spec.dist_info}/RECORD"] = (record + f"{spec.dist_info}/RECORD,,\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / spec.filename
    local, central = bytearray(), bytearray()
    for path, data in files.items():
        raw, crc, offset = path.encode(), zlib.crc32(data), len(local)
        # version 2.0, UTF-8 names, stored, 1980-01-01, regular file 0o644 made on Unix
        local += struct.pack(
            "<4s5H3L2H",
            b"PK\x03\x04",
            20,
            0x800,
            0,
            0,
            0x21,
            crc,
            len(data),
            len(data),
            len(raw),
            0,
        )
        local += raw + data
        central += struct.pack(
            "<4s6H3L5H2L",
            b"PK\x01\x02",
            0x314,
            20,
            0x800,
            0,
            0,
            0x21,
            crc,
            len(data),
            len(data),
            len(raw),
            0,
            0,
            0,
            0,
            0o100644 << 16,
            offset,
        )
        central += raw
    count, cd_offset, tail = len(files), len(local), b""
    if count > 0xFFFF:
        zip64_at = cd_offset + len(central)
        tail = struct.pack(
            "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), cd_offset
        )
        tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
    short = min(count, 0xFFFF)
    tail += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, short, short, len(central), cd_offset, 0)
    target.write_bytes(bytes(local) + bytes(central) + tail)
    return target
