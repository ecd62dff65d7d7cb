"""shared.wheels: real wheels built in tmp_path, good ones and a hostile corpus.

Every hostile wheel must be refused by inspect_wheel AND extract_wheel, with a message naming the
entry or rule, leaving no dest behind and nothing written anywhere else under tmp_path.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import stat
import time
import warnings
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from shared import wheel_checks, wheels
from shared.errors import UnsafeWheel
from shared.wheels import WheelInfo, WheelLimits, extract_wheel, inspect_wheel
from tests.wheelfactory import (
    WheelSpec,
    alias_central_entry,
    build_wheel,
    build_wide_wheel,
    patch_archive_bytes,
    set_declared_size,
)

FILES = {"pkg/__init__.py": b"X = 1\n", "pkg/data.txt": b"hello"}


def record_hash(data: bytes, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm, data).digest()
    return f"{algorithm}=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def spec(files: dict[str, bytes] | None = None, **knobs: Any) -> WheelSpec:
    return WheelSpec("demo", "1.0", files={**FILES, **(files or {})}, **knobs)


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_mode for p in root.rglob("*")}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- good wheels ---------------------------------------------------------------------------------


def test_inspect_good_wheel(tmp_path: Path) -> None:
    wheel = build_wheel(WheelSpec("Demo.Pkg", "1.0.0", files=FILES), tmp_path)

    info = inspect_wheel(wheel)

    assert info.filename == "demo_pkg-1.0.0-py3-none-any.whl"
    assert (info.name, info.version, info.tags) == (
        "demo-pkg",
        "1.0.0",
        frozenset({"py3-none-any"}),
    )
    assert set(info.files) == {
        "pkg/__init__.py",
        "pkg/data.txt",
        "demo_pkg-1.0.0.dist-info/METADATA",
        "demo_pkg-1.0.0.dist-info/WHEEL",
        "demo_pkg-1.0.0.dist-info/RECORD",
    }
    with zipfile.ZipFile(wheel) as zf:
        assert info.unpacked_size == sum(i.file_size for i in zf.infolist())


def test_compressed_tag_set_gives_every_tag(tmp_path: Path) -> None:
    wheel = build_wheel(WheelSpec("demo", "2", files=FILES, tag="py2.py3-none-any"), tmp_path)
    assert inspect_wheel(wheel).tags == {"py2-none-any", "py3-none-any"}


def test_extract_good_wheel_matches_content_and_is_read_only(tmp_path: Path) -> None:
    files = {**FILES, "pkg/sub/tool.py": b"#!/usr/bin/env python\n", "top.py": b"T = 2\n"}
    wheel = build_wheel(spec(files, executables=["pkg/sub/tool.py"]), tmp_path / "w")
    dest = tmp_path / "out" / "dest"

    info = extract_wheel(wheel, dest)

    assert info == inspect_wheel(wheel)
    extracted = tree(dest)
    # Hashed while written, so callers can record the tree without reading it back.
    assert info.hashes == {p: (hashlib.sha256(d).hexdigest(), len(d)) for p, d in extracted.items()}
    for path, data in files.items():
        assert extracted[path] == data
    assert set(extracted) == set(info.files)
    for path in extracted:
        expected = 0o555 if path == "pkg/sub/tool.py" else 0o444
        assert stat.S_IMODE((dest / path).stat().st_mode) == expected, path
    for directory in (dest, dest / "pkg", dest / "pkg" / "sub"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755


def test_data_purelib_and_platlib_go_to_root_other_categories_stay_out(tmp_path: Path) -> None:
    data = "demo-1.0.data"
    files = {
        f"{data}/purelib/pure/__init__.py": b"P = 1\n",
        f"{data}/platlib/plat.py": b"Q = 1\n",
        f"{data}/scripts/demo-tool": b"#!python\n",
        f"{data}/headers/demo.h": b"int x;\n",
        f"{data}/data/share/demo.txt": b"d",
    }
    wheel = build_wheel(spec(files, executables=[f"{data}/scripts/demo-tool"]), tmp_path / "w")
    dest = tmp_path / "dest"

    info = extract_wheel(wheel, dest)

    extracted = tree(dest)
    assert set(info.hashes) == set(extracted)  # keyed by install path, after the mapping
    assert extracted["pure/__init__.py"] == b"P = 1\n"
    assert extracted["plat.py"] == b"Q = 1\n"
    # scripts, headers and data have no place in an import path (shared/tree_content.py)
    assert not (dest / data).exists()
    assert f"{data}/scripts/demo-tool" in info.files  # still part of the checked wheel


def test_blob_name_needs_the_filename_override(tmp_path: Path) -> None:
    wheel = build_wheel(spec(), tmp_path)
    blob = tmp_path / f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}.whl"
    wheel.rename(blob)

    with pytest.raises(UnsafeWheel, match="invalid wheel filename"):
        inspect_wheel(blob)
    assert inspect_wheel(blob, filename="demo-1.0-py3-none-any.whl").name == "demo"
    info = extract_wheel(blob, tmp_path / "dest", filename="demo-1.0-py3-none-any.whl")
    assert info.filename == "demo-1.0-py3-none-any.whl"


def test_existing_dest_is_refused_and_left_alone(tmp_path: Path) -> None:
    wheel = build_wheel(spec(), tmp_path / "w")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")

    with pytest.raises(FileExistsError):
        extract_wheel(wheel, dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_legit_oddities_are_accepted(tmp_path: Path) -> None:
    # Seen in real wheels on the local index: hex RECORD hashes (gmsh), test data compressing
    # ~1000:1 (onnx 2.5 MB, scipy 0.5 MB), explicit directory entries, unhashed RECORD.jws.
    blob = bytes(3 << 20)
    hex_hash = f"sha256={hashlib.sha256(b'hello').hexdigest()},5"
    wheel = build_wheel(
        spec(
            {"pkg/zeros.pb": blob, "demo-1.0.dist-info/RECORD.jws": b"{}"},
            record_overrides={"pkg/data.txt": hex_hash, "demo-1.0.dist-info/RECORD.jws": ","},
            extra_entries={"pkg/empty/": b""},
        ),
        tmp_path / "w",
    )
    info = extract_wheel(wheel, tmp_path / "dest")
    assert "pkg/empty/" not in info.files
    assert (tmp_path / "dest" / "pkg" / "zeros.pb").stat().st_size == len(blob)


def test_threads_extract_concurrently(tmp_path: Path) -> None:
    built = [
        build_wheel(
            WheelSpec(f"t{i}", "1.0", files={f"t{i}/m{j}.py": b"x" * j for j in range(40)}),
            tmp_path / "w",
        )
        for i in range(6)
    ]
    with ThreadPoolExecutor(4) as pool:
        infos = list(pool.map(lambda w: extract_wheel(w, tmp_path / "out" / w.stem), built))
    assert [len(i.files) for i in infos] == [43] * 6
    assert (tmp_path / "out" / built[5].stem / "t5" / "m39.py").read_bytes() == b"x" * 39


# --- the hostile corpus --------------------------------------------------------------------------

Builder = Callable[[Path], Path]


def _built(**knobs: Any) -> Builder:
    return lambda tmp: build_wheel(spec(**knobs), tmp / "wheels")


def _duplicate(tmp: Path) -> Path:
    with warnings.catch_warnings():  # zipfile warns, then writes the duplicate anyway
        warnings.simplefilter("ignore")
        return build_wheel(spec(extra_entries={"pkg/data.txt": b"evil!"}), tmp / "wheels")


def _absolute(tmp: Path) -> Path:
    return build_wheel(spec({f"{tmp}/abs/x.py": b"x"}), tmp / "wheels")


def _nul_in_name(tmp: Path) -> Path:
    wheel = build_wheel(spec({"pkg/a@b.py": b"x"}), tmp / "wheels")
    patch_archive_bytes(wheel, b"pkg/a@b.py", b"pkg/a\0b.py")
    return wheel


def _overlapping(tmp: Path) -> Path:
    wheel = build_wheel(spec(), tmp / "wheels")
    alias_central_entry(wheel, "pkg/data.txt", "pkg/alias.txt")
    return wheel


def _lying_file_size(tmp: Path) -> Path:
    # The zip claims 100 bytes for 10 MB of zeros, and RECORD agrees with the claim.
    overrides = {"pkg/big.bin": f"{record_hash(bytes(100))},100"}
    wheel = build_wheel(
        spec({"pkg/big.bin": bytes(10 << 20)}, record_overrides=overrides), tmp / "wheels"
    )
    set_declared_size(wheel, "pkg/big.bin", 100)
    return wheel


def _leading_junk(tmp: Path) -> Path:
    wheel = build_wheel(spec(), tmp / "wheels")
    wheel.write_bytes(b"#!/bin/sh\nexit 0\n" + wheel.read_bytes())
    return wheel


def _not_a_zip(tmp: Path) -> Path:
    (tmp / "wheels").mkdir()
    wheel = tmp / "wheels" / "demo-1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04 not really")
    return wheel


HOSTILE: list[tuple[str, Builder, str]] = [
    (
        "dotdot",
        _built(files={"../evil.py": b"x"}),
        r"'\.\./evil\.py' escapes the target \(\.\. seg",
    ),
    ("absolute", _absolute, r"abs/x\.py' is an absolute path"),
    ("backslash", _built(files={"..\\x.py": b"x"}), r"'\.\.\\\\x\.py' contains a backslash"),
    ("drive-letter", _built(files={"C:/x.py": b"x"}), r"'C:/x\.py' starts with a drive letter"),
    ("sibling-prefix", _built(files={"../dest-evil/x": b"x"}), r"'\.\./dest-evil/x' escapes"),
    ("nul-in-name", _nul_in_name, r"'pkg/a\\x00b\.py' contains a NUL or control character"),
    ("symlink", _built(symlinks={"pkg/link": "/etc/passwd"}), r"'pkg/link' is a symlink"),
    ("fifo", _built(special_entries={"pkg/p": stat.S_IFIFO | 0o644}), r"'pkg/p' is not a regular"),
    ("device", _built(special_entries={"pkg/d": stat.S_IFCHR | 0o644}), r"'pkg/d' is not a regul"),
    ("duplicate", _duplicate, r"'pkg/data\.txt' appears twice \(duplicate name\)"),
    ("not-in-record", _built(extra_entries={"pkg/x.py": b"x"}), r"'pkg/x\.py' is not listed in"),
    (
        "record-hash-mismatch",
        _built(record_overrides={"pkg/data.txt": f"{record_hash(b'HELLO')},5"}),
        r"'pkg/data\.txt' RECORD hash mismatch",
    ),
    (
        "record-size-mismatch",
        _built(record_overrides={"pkg/data.txt": f"{record_hash(b'hello')},6"}),
        r"'pkg/data\.txt' RECORD size mismatch: RECORD says 6 bytes, zip says 5",
    ),
    (
        "record-md5",
        _built(record_overrides={"pkg/data.txt": "md5=XUFAKrxLKna5cZ2REBfFkg,5"}),
        r"'pkg/data\.txt' has RECORD hash 'md5=.*need sha256",
    ),
    (
        "record-sha1",
        _built(record_algorithm="sha1"),
        r"'pkg/__init__\.py' has RECORD hash 'sha1=.*; need sha256 or stronger \(sha256, sha384",
    ),
    (
        "record-sha224",
        _built(record_overrides={"pkg/data.txt": f"{record_hash(b'hello', 'sha224')},5"}),
        r"'pkg/data\.txt' has RECORD hash 'sha224=.*; need sha256 or stronger",
    ),
    (
        # Not guaranteed by hashlib: a satellite on another OpenSSL build might lack it.
        "record-sha512_256",
        _built(record_overrides={"pkg/data.txt": f"sha512_256={'A' * 43},5"}),
        r"'pkg/data\.txt' has RECORD hash 'sha512_256=.*; need sha256 or stronger",
    ),
    (
        # The stronger algorithm is really checked, not only sha256.
        "record-sha512-mismatch",
        _built(
            record_algorithm="sha512",
            record_overrides={"pkg/data.txt": f"{record_hash(b'HELLO', 'sha512')},5"},
        ),
        r"'pkg/data\.txt' RECORD hash mismatch: RECORD says sha512=",
    ),
    (
        "record-rows-differ-in-hash",
        _built(extra_record_lines=[f"/pkg/data.txt,{record_hash(b'HELLO')},5"]),
        r"RECORD lists 'pkg/data\.txt' twice with different hashes \(sha256=.*,5 and sha256=",
    ),
    (
        "record-rows-differ-in-size",
        _built(extra_record_lines=[f"pkg/data.txt,{record_hash(b'hello')},6"]),
        r"RECORD lists 'pkg/data\.txt' twice with different sizes",
    ),
    (
        "record-slash-dotdot",
        _built(extra_record_lines=[f"/../evil.py,{record_hash(b'x')},1"]),
        r"RECORD line 5 path '/\.\./evil\.py' escapes the target \(\.\. segment\)",
    ),
    (
        "record-double-slash",  # only one leading / is dropped
        _built(extra_record_lines=[f"//etc/passwd,{record_hash(b'x')},1"]),
        r"RECORD line 5 path '//etc/passwd' is an absolute path",
    ),
    (
        "record-dot-dot-slash",
        _built(extra_record_lines=[f"./../evil.py,{record_hash(b'x')},1"]),
        r"RECORD line 5 path '\./\.\./evil\.py' escapes the target",
    ),
    (
        "wheel-version-2",
        _built(wheel_version="2.0"),
        r"entry 'demo-1\.0\.dist-info/WHEEL' says Wheel-Version 2\.0 is not supported \(this"
        r" installer knows 1\.x\)",
    ),
    (
        "wheel-version-missing",
        _built(wheel_version=None),
        r"entry 'demo-1\.0\.dist-info/WHEEL' has no Wheel-Version",
    ),
    (
        "wheel-version-malformed",
        _built(wheel_version="one"),
        r"entry 'demo-1\.0\.dist-info/WHEEL' has Wheel-Version 'one'; need numbers such as 1\.0",
    ),
    (
        "metadata-other-name",
        _built(metadata_name="other"),
        r"entry 'demo-1\.0\.dist-info/METADATA' has Name 'other', but the filename names 'demo';"
        r" METADATA Name must match the wheel filename",
    ),
    (
        "metadata-other-version",
        _built(metadata_version="2.0"),
        r"entry 'demo-1\.0\.dist-info/METADATA' has Version '2\.0', but the filename says '1\.0';"
        r" METADATA Version must match the wheel filename",
    ),
    (
        # pip reads the first Name, other readers the last: the two must agree.
        "metadata-two-names",
        _built(metadata_tail="Name: other\n"),
        r"'demo-1\.0\.dist-info/METADATA' has 2 different Name fields \['demo', 'other'\]",
    ),
    (
        "record-names-missing-file",
        _built(extra_record_lines=[f"pkg/ghost.py,{record_hash(b'')},0"]),
        r"RECORD lists 'pkg/ghost\.py', which is missing from the archive",
    ),
    ("missing-record", _built(omit_record=True), r"has no demo-1\.0\.dist-info/RECORD"),
    (
        "record-short-row",
        _built(extra_record_lines=["pkg/x.py,sha256="]),
        r"RECORD line 5 has 2 fields",
    ),
    (
        "record-not-csv",
        _built(extra_record_lines=["x" * 200_000 + ",,"]),
        r"RECORD line \d+ is not",
    ),
    (
        "two-dist-infos",
        _built(files={"other-1.0.dist-info/METADATA": b""}),
        r"has 2 \.dist-info directories",
    ),
    (
        "unknown-data-category",
        _built(files={"demo-1.0.data/evil/x": b"x"}),
        r"'demo-1\.0\.data/evil/x' uses unknown \.data category 'evil'",
    ),
    (
        "purelib-collision",
        _built(files={"demo-1.0.data/purelib/pkg/data.txt": b"x"}),
        r"both install to 'pkg/data\.txt'",
    ),
    (
        "file-dir-conflict",
        _built(files={"pkg/data.txt/inner.py": b"x"}),
        r"'pkg/data\.txt' is a file where other entries need a directory",
    ),
    (
        "zip-bomb-ratio",
        _built(files={"pkg/zeros.bin": bytes(50_000_000)}),
        r"'pkg/zeros\.bin' exceeds the compression ratio cap \(\d+:1; zip bomb\)",
    ),
    ("overlapping", _overlapping, r"'pkg/data\.txt' overlaps 'pkg/alias\.txt' \(overlapping zip"),
    ("lying-file-size", _lying_file_size, r"'pkg/big\.bin' is corrupt: Bad CRC-32"),
    ("leading-junk", _leading_junk, r"has 17 bytes before its first entry"),
    ("not-a-zip", _not_a_zip, r"is not a readable zip archive"),
    (
        "100k-entries",
        lambda tmp: build_wide_wheel("wide", "1.0", 100_000, tmp / "wheels"),
        r"has 100003 entries, more than the limit 50000",
    ),
]


@pytest.mark.parametrize(
    ("builder", "match"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_wheel_is_refused_by_inspect_and_extract(
    tmp_path: Path, builder: Builder, match: str
) -> None:
    wheel = builder(tmp_path)
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    dest = tmp_path / "out" / "dest"

    started = time.perf_counter()
    with pytest.raises(UnsafeWheel, match=match) as inspected:
        inspect_wheel(wheel)
    elapsed = time.perf_counter() - started
    with pytest.raises(UnsafeWheel, match=match):
        extract_wheel(wheel, dest)

    assert inspected.value.wheel == wheel.name
    assert not dest.exists()
    assert snapshot(tmp_path) == before  # nothing written anywhere, e.g. no out/dest-evil
    assert elapsed < 2.0  # the 100k-entry wheel is refused from its end record, not parsed


def test_failure_midway_removes_the_partial_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lie is in the last member written, so earlier files are on disk when it is found.
    wheel = build_wheel(
        spec(record_overrides={"pkg/data.txt": f"{record_hash(b'HELLO')},5"}), tmp_path / "w"
    )
    seen: list[dict[str, bytes]] = []
    real_remove = wheels._remove_tree

    def remove_recording(p: Path) -> None:
        seen.append(tree(p))
        real_remove(p)

    monkeypatch.setattr(wheels, "_remove_tree", remove_recording)
    dest = tmp_path / "dest"

    with pytest.raises(UnsafeWheel, match="RECORD hash mismatch"):
        extract_wheel(wheel, dest)

    assert seen and "pkg/__init__.py" in seen[0]
    assert not dest.exists()


def test_resolved_path_check_backs_up_the_name_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the name rules switched off, the resolved-path check alone must stop the escape.
    monkeypatch.setattr(wheel_checks, "_name_problem", lambda name: None)
    wheel = build_wheel(spec({"../dest-evil/x.py": b"x"}), tmp_path / "w")
    before = snapshot(tmp_path)

    with pytest.raises(UnsafeWheel, match=r"directory '\.\.' resolves outside the target"):
        extract_wheel(wheel, tmp_path / "dest")

    assert snapshot(tmp_path) == before


def test_inside_compares_components_not_string_prefixes(tmp_path: Path) -> None:
    root = tmp_path / "dest"
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "dest-evil", target_is_directory=True)

    assert wheels._inside(root, f"{root}/pkg/x.py")
    assert not wheels._inside(root, f"{root}-evil/x.py")  # str.startswith would say inside
    assert not wheels._inside(root, f"{root}/link/x.py")


def test_limits_are_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = build_wheel(spec(), tmp_path)
    with pytest.raises(UnsafeWheel, match=r"unpacks to over 10 bytes \(limit\)"):
        inspect_wheel(wheel, WheelLimits(max_unpacked_bytes=10))
    with pytest.raises(UnsafeWheel, match="has 5 entries, more than the limit 4"):
        inspect_wheel(wheel, WheelLimits(max_entries=4))
    # An end record that lies about the count only skips the shortcut; the parsed count decides.
    monkeypatch.setattr(wheel_checks, "_declared_entry_count", lambda fd: None)
    with pytest.raises(UnsafeWheel, match="has 5 entries, more than the limit 4"):
        extract_wheel(wheel, tmp_path / "dest", WheelLimits(max_entries=4))
    assert not (tmp_path / "dest").exists()
    assert isinstance(inspect_wheel(wheel, WheelLimits(max_entries=5)), WheelInfo)


def test_dist_info_must_match_the_filename(tmp_path: Path) -> None:
    wheel = build_wheel(spec(), tmp_path)
    with pytest.raises(
        UnsafeWheel, match=r"'demo-1\.0\.dist-info' does not match the wheel filename"
    ):
        inspect_wheel(wheel, filename="other-1.0-py3-none-any.whl")
    with pytest.raises(UnsafeWheel, match="does not match"):
        inspect_wheel(wheel, filename="demo-2.0-py3-none-any.whl")


# --------------------------------------------------------------------------- in parts


def _many_files() -> dict[str, bytes]:
    files = {f"pkg/m{i // 10}/f{i}.py": f"V = {i}\n".encode() * (i % 7 + 1) for i in range(60)}
    return {**files, "pkg/__init__.py": b"", "pkg/big.bin": bytes(300_000), "top.py": b"T = 1\n"}


def test_a_wheel_unpacked_in_parts_is_the_wheel_unpacked_whole(tmp_path: Path) -> None:
    wheel = build_wheel(spec(_many_files(), executables=["top.py"]), tmp_path / "w")
    whole = extract_wheel(wheel, tmp_path / "whole")
    dest = tmp_path / "parts"
    dest.mkdir()
    # At once, as the unpack workers run them: each makes directories the other may have made.
    with ThreadPoolExecutor(3) as pool:
        infos = list(pool.map(lambda k: extract_wheel(wheel, dest, part=k, parts=3), range(3)))
    shares = [set(info.hashes) for info in infos]
    assert all(shares) and sum(len(s) for s in shares) == len(set().union(*shares))  # disjoint
    merged = {path: h for info in infos for path, h in info.hashes.items()}
    assert merged == whole.hashes
    assert tree(dest) == tree(tmp_path / "whole")
    for path in tree(dest):
        assert (dest / path).stat().st_mode == (tmp_path / "whole" / path).stat().st_mode, path
    assert all(
        dataclasses.replace(i, hashes={}) == dataclasses.replace(whole, hashes={}) for i in infos
    )


def test_every_part_checks_the_whole_wheel_before_writing(tmp_path: Path) -> None:
    hostile = build_wheel(spec({**_many_files(), "../escape.py": b"x = 1\n"}), tmp_path / "w")
    dest = tmp_path / "parts"
    dest.mkdir()
    for k in range(2):
        with pytest.raises(UnsafeWheel, match="escapes the target"):
            extract_wheel(hostile, dest, part=k, parts=2)
    assert list(dest.iterdir()) == []  # neither part wrote anything
    assert not (tmp_path / "escape.py").exists()


def test_the_part_holding_a_lying_member_refuses_it(tmp_path: Path) -> None:
    files = _many_files()
    lie = f"{record_hash(b'something else')},{len(files['pkg/big.bin'])}"
    wheel = build_wheel(spec(files, record_overrides={"pkg/big.bin": lie}), tmp_path / "w")
    dest = tmp_path / "parts"
    dest.mkdir()
    outcomes = []
    for k in range(2):
        try:
            extract_wheel(wheel, dest, part=k, parts=2)
            outcomes.append("ok")
        except UnsafeWheel as exc:
            outcomes.append(exc.reason)
    assert sorted(o == "ok" for o in outcomes) == [False, True]
    assert any("'pkg/big.bin' RECORD hash mismatch" in o for o in outcomes)


def test_a_link_where_a_sibling_made_a_directory_is_refused(tmp_path: Path) -> None:
    wheel = build_wheel(spec(_many_files()), tmp_path / "w")
    dest = tmp_path / "parts"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "pkg").symlink_to(outside)  # not a directory a sibling part made
    with pytest.raises((UnsafeWheel, FileExistsError)):
        extract_wheel(wheel, dest, part=0, parts=2)
    assert list(outside.iterdir()) == []
