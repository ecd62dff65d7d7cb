"""shared.zip_members: members read straight from the archive, checked as zipfile checks them.

Real archives written by zipfile (deflated and stored), each member's bytes compared with what
zipfile itself reads; then every way a member can lie: bad deflate, cut short, too long, a wrong
CRC, a local header naming another file. ISA-L and zlib must give the same bytes.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from shared import zip_members
from shared.errors import UnsafeWheel
from shared.wheels import extract_wheel, inspect_wheel
from shared.zip_members import CorruptMember, member_chunks
from tests.wheelfactory import WheelSpec, build_wheel, patch_archive_bytes

CONTENT = {
    "empty.txt": b"",
    "small.py": b"X = 1\n" * 10,
    "big.bin": os.urandom(300_000) + bytes(700_000),  # spans several read and output chunks
}


def _archive(tmp_path: Path, method: int) -> Path:
    path = tmp_path / f"a-{method}.zip"
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in CONTENT.items():
            zf.writestr(name, data)
    return path


def _read_all(path: Path, name: str, **override: int) -> bytes:
    with zipfile.ZipFile(path) as zf, path.open("rb") as f:
        info = zf.getinfo(name)
        header = os.pread(f.fileno(), 30, info.header_offset)
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        args = {
            "data_offset": info.header_offset + 30 + name_len + extra_len,
            "compress_size": info.compress_size,
            "file_size": info.file_size,
            "crc": info.CRC,
        }
        args.update(override)
        chunks = member_chunks(
            f.fileno(),
            args["data_offset"],
            args["compress_size"],
            args["file_size"],
            args["crc"],
            info.compress_type == zipfile.ZIP_DEFLATED,
            chunk=64 * 1024,
        )
        out = b"".join(chunks)
    return out


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_members_read_exactly_as_zipfile_reads_them(tmp_path: Path, method: int) -> None:
    path = _archive(tmp_path, method)
    for name, data in CONTENT.items():
        assert _read_all(path, name) == data


def test_zlib_and_isal_give_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _archive(tmp_path, zipfile.ZIP_DEFLATED)
    fast = {name: _read_all(path, name) for name in CONTENT}
    monkeypatch.setattr(zip_members, "INFLATE", zlib)
    assert {name: _read_all(path, name) for name in CONTENT} == fast == CONTENT


def test_a_member_longer_than_declared_stops_at_size_plus_one(tmp_path: Path) -> None:
    path = _archive(tmp_path, zipfile.ZIP_DEFLATED)
    crc_of_prefix = zlib.crc32(CONTENT["big.bin"][:1000])
    with pytest.raises(CorruptMember, match="is longer than its declared size"):
        _read_all(path, "big.bin", file_size=1000, crc=crc_of_prefix)
    with pytest.raises(CorruptMember, match="Bad CRC-32"):  # what zipfile says for a lying size
        _read_all(path, "big.bin", file_size=1000)


def test_cut_short_bad_crc_and_bad_deflate_are_corrupt(tmp_path: Path) -> None:
    path = _archive(tmp_path, zipfile.ZIP_DEFLATED)
    size = len(CONTENT["big.bin"])
    with pytest.raises(CorruptMember, match=f"is shorter than its declared {size + 5} bytes"):
        _read_all(path, "big.bin", file_size=size + 5)
    with pytest.raises(CorruptMember, match="Bad CRC-32"):
        _read_all(path, "big.bin", crc=zlib.crc32(b"other"))
    with pytest.raises(CorruptMember, match="ends before the end of its stream"):
        _read_all(path, "big.bin", compress_size=1000)
    with pytest.raises(CorruptMember, match="is corrupt"):
        _read_all(path, "big.bin", data_offset=0)  # a local header is not deflate data


def test_the_archive_ending_inside_a_member_is_corrupt(tmp_path: Path) -> None:
    path = _archive(tmp_path, zipfile.ZIP_STORED)
    with pytest.raises(CorruptMember, match="the archive ends inside its data"):
        _read_all(path, "big.bin", compress_size=10 << 20, file_size=10 << 20)


def test_a_local_header_naming_another_file_is_refused(tmp_path: Path) -> None:
    # zipfile refuses this on open; extraction now reads the data itself, so the plan does.
    wheel = build_wheel(WheelSpec("demo", "1.0", files={"pkg/aaaa.py": b"A = 1\n"}), tmp_path)
    data = wheel.read_bytes()
    first = data.index(b"pkg/aaaa.py")  # local headers come before the central directory
    wheel.write_bytes(data[:first] + b"pkg/bbbb.py" + data[first + len(b"pkg/aaaa.py") :])
    refused = r"'pkg/aaaa\.py' has 'pkg/bbbb\.py' in its local header"
    with pytest.raises(UnsafeWheel, match=refused):
        inspect_wheel(wheel)
    with pytest.raises(UnsafeWheel, match=refused):
        extract_wheel(wheel, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_corrupt_member_in_a_wheel_names_the_entry(tmp_path: Path) -> None:
    body = b"Z = 0\n" * 2000
    wheel = build_wheel(WheelSpec("demo", "1.0", files={"pkg/z.py": body}), tmp_path)
    compressed = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw = compressed.compress(body) + compressed.flush()
    patch_archive_bytes(wheel, raw[:8], bytes(8))  # the first deflate block's header, zeroed
    with pytest.raises(UnsafeWheel, match=r"'pkg/z\.py' is (corrupt|shorter|longer)"):
        extract_wheel(wheel, tmp_path / "t")
    assert not (tmp_path / "t").exists()
