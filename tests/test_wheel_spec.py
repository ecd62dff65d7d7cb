"""What the wheel spec allows is accepted; WHEEL and METADATA are read as pip reads them.

The refusals (weak RECORD hashes, conflicting rows, Wheel-Version 2, METADATA of another project)
are in the hostile corpus of tests/test_wheels.py, which also runs end to end.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import io
import random
import time
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from shared import wheel_checks
from shared.errors import UnsafeWheel
from shared.wheel_metadata import BadFields, identity, read_fields, wheel_version
from shared.wheels import check_identity, extract_wheel, inspect_wheel
from tests.test_wheels import FILES, record_hash, spec, tree
from tests.wheelfactory import WheelSpec, build_wheel

DIST_INFO = "demo-1.0.dist-info"
ALL_PATHS = [*FILES, f"{DIST_INFO}/METADATA", f"{DIST_INFO}/WHEEL", f"{DIST_INFO}/RECORD"]
SELENIUM_FILES = {
    "selenium/__init__.py": b'__version__ = "4.1.0"\n',
    "selenium/webdriver/__init__.py": b"from .remote.webdriver import WebDriver\n",
    "selenium/webdriver/remote/webdriver.py": b"class WebDriver: ...\n",
}


def _selenium_shaped(tmp: Path) -> Path:
    # selenium 4.1.0 on PyPI (bazel-wheelmaker): package rows start with "/", dist-info rows not.
    shaped = WheelSpec(
        "selenium",
        "4.1.0",
        files=SELENIUM_FILES,
        record_paths={path: f"/{path}" for path in SELENIUM_FILES},
    )
    return build_wheel(shaped, tmp)


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    *((f"record-{name}", {"record_algorithm": name}) for name in wheel_checks.RECORD_HASHES),
    (
        "record-sha512-hex",  # hex, as gmsh writes sha256, with the longer digest
        {
            "record_algorithm": "sha512",
            "record_overrides": {
                "pkg/data.txt": f"sha512={hashlib.sha512(b'hello').hexdigest()},5"
            },
        },
    ),
    ("record-leading-slash", {"record_paths": {p: f"/{p}" for p in ALL_PATHS}}),
    ("record-leading-dot-slash", {"record_paths": {p: f"./{p}" for p in ALL_PATHS}}),
    (
        "record-identical-duplicates",  # also once written with a leading "/"
        {
            "extra_record_lines": [
                f"pkg/data.txt,{record_hash(b'hello')},5",
                f"/pkg/data.txt,{record_hash(b'hello')},5",
                f"./{DIST_INFO}/RECORD,,",
            ]
        },
    ),
    ("wheel-version-1.9", {"wheel_version": "1.9"}),  # a newer minor: pip only warns
    ("wheel-version-1", {"wheel_version": "1"}),
    ("metadata-name-spelled-differently", {"metadata_name": "DEMO"}),
    ("metadata-version-pep440-equal", {"metadata_version": "1.0.0"}),
    ("metadata-identical-names", {"metadata_tail": "Name: demo\n"}),
]


@pytest.mark.parametrize("knobs", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_spec_legal_wheel_is_accepted(tmp_path: Path, knobs: dict[str, Any]) -> None:
    wheel = build_wheel(spec(**knobs), tmp_path / "w")

    inspected = inspect_wheel(wheel)
    info = extract_wheel(wheel, tmp_path / "dest")

    assert info == inspected
    assert (info.name, info.version) == ("demo", "1.0")
    # Whatever RECORD uses, callers get sha256 of every file written.
    assert info.hashes == {
        p: (hashlib.sha256(d).hexdigest(), len(d)) for p, d in tree(tmp_path / "dest").items()
    }
    assert tree(tmp_path / "dest")["pkg/data.txt"] == b"hello"


def test_selenium_4_1_0_shaped_wheel_is_accepted(tmp_path: Path) -> None:
    wheel = _selenium_shaped(tmp_path / "w")

    info = extract_wheel(wheel, tmp_path / "dest")

    assert (info.name, info.metadata_name, info.metadata_version) == (
        "selenium",
        "selenium",
        "4.1.0",
    )
    extracted = tree(tmp_path / "dest")
    for path, data in SELENIUM_FILES.items():
        assert extracted[path] == data


def test_wheel_info_reports_what_the_dist_info_says(tmp_path: Path) -> None:
    tail = "Requires-Python: >=3.9\n"
    wheel = build_wheel(WheelSpec("Demo.Pkg", "1.0", files=FILES, metadata_tail=tail), tmp_path)

    info = inspect_wheel(wheel)

    assert (info.name, info.metadata_name, info.metadata_version) == ("demo-pkg", "Demo.Pkg", "1.0")
    assert (info.requires_python, info.wheel_version) == (">=3.9", "1.0")
    assert inspect_wheel(build_wheel(spec(), tmp_path / "plain")).requires_python is None


def test_a_big_description_is_not_read(tmp_path: Path) -> None:
    # Legacy writers put the description in a folded header; newer ones in the body.
    folded = "Description: " + "\n        ".join(["x" * 1000] * 2000) + "\n"
    tail = folded + "Requires-Python: >=3.8\n\n" + "Name: other\n" + "y" * (8 << 20)
    wheel = build_wheel(spec(metadata_tail=tail), tmp_path)

    started = time.perf_counter()
    info = inspect_wheel(wheel)

    assert info.requires_python == ">=3.8"  # a field after the 2 MB folded one is still found
    # The body (hashed like any file) is never parsed: its "Name: other" is not a second Name.
    assert time.perf_counter() - started < 2.0


def test_check_identity_ties_the_wheel_to_its_entry(tmp_path: Path) -> None:
    info = inspect_wheel(build_wheel(WheelSpec("Demo.Pkg", "1.0", files=FILES), tmp_path))

    check_identity(info, "demo_pkg", "1.0.0")  # the same project and release, spelled otherwise
    with pytest.raises(UnsafeWheel) as refused:
        check_identity(info, "other", "1.0")
    assert str(refused.value) == (
        "unsafe wheel demo_pkg-1.0-py3-none-any.whl: METADATA says Demo.Pkg 1.0, the entry says"
        " other 1.0; a wheel must be the project and version it is listed as"
    )
    with pytest.raises(UnsafeWheel, match=r"the entry says demo-pkg 1\.1; a wheel must be"):
        check_identity(info, "demo-pkg", "1.1")
    with pytest.raises(UnsafeWheel, match="the entry says demo-pkg not-a-version"):
        check_identity(info, "demo-pkg", "not-a-version")


# --- the readers, on their own -------------------------------------------------------------------


def fields(text: bytes, *wanted: str) -> dict[str, list[str]]:
    return read_fields(io.BytesIO(text), set(wanted))


@pytest.mark.parametrize(
    "text",
    [
        b"Name: demo\nVersion: 1.0\n\nName: body\n",
        b"name:demo\nNAME: second\n",
        b"Name : not-name\nName: demo\n",  # keys are not stripped: "Name " is another field
        b"Summary: s\n folded\nName: de\n mo\n",
        b"Name: demo\r\nVersion: 1\r\n\r\nName: body\r\n",
        b"From someone\nName: demo\n",
        b"Name: demo\nFrom someone\nName: second\n",
        b"X: y\rName: evil\nName: demo\n",  # a lone CR ends a line too
        b"Name: demo\r\rName: body\n",
        b"Name: de\r mo\r\n",
        b"Name: demo\nthis is not a field\nName: after\n",  # a non-field line ends the headers
        b" leading continuation\nName: demo\n",
        b"Name: demo",  # no final newline
        b"",
    ],
)
def test_fields_are_split_as_email_parser_splits_them(text: bytes) -> None:
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    expected = [v.strip() for v in parser.parsebytes(text).get_all("name") or []]
    assert fields(text, "name").get("name", []) == expected


def test_fields_skip_what_is_not_wanted_and_refuse_what_cannot_be_real() -> None:
    long_line = b"Description: " + b"d" * 300_000 + b"\n"
    assert fields(long_line + b"Name: demo\n", "name") == {"name": ["demo"]}
    assert fields(b"Author: J\xe9r\xf4me\nName: demo\n", "name") == {"name": ["demo"]}
    with pytest.raises(BadFields, match="has a field over 65536 bytes"):
        fields(b"Name: " + b"n" * 70_000 + b"\n", "name")
    with pytest.raises(BadFields, match="has a 'name' field that is not UTF-8"):
        fields(b"Name: d\xe9mo\n", "name")


@pytest.mark.parametrize("text", ["1.0", "1.9", "1", "0.9", "1.0.1", "1.0\nWheel-Version: 2.0"])
def test_wheel_version_1_x_is_accepted(text: str) -> None:
    # pip too reads the first value only, and takes a newer minor with a warning.
    assert wheel_version(io.BytesIO(f"Wheel-Version: {text}\n".encode())) == text.split("\n")[0]


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        (
            "Wheel-Version: 2.0\n",
            r"says Wheel-Version 2\.0 is not supported \(this installer knows",
        ),
        ("Wheel-Version: 10\n", r"says Wheel-Version 10 is not supported"),
        ("Generator: x\n", "has no Wheel-Version"),
        ("Wheel-Version:\n", "has Wheel-Version ''; need numbers such as 1.0"),
        ("Wheel-Version: 1.\n", r"has Wheel-Version '1\.'; need numbers such as 1\.0"),
        ("Wheel-Version: \u0661.0\n", "need numbers such as 1.0"),  # int() would take it
        ("Wheel-Version: +1.0\n", "need numbers"),
    ],
)
def test_wheel_version_refusals(text: str, rule: str) -> None:
    with pytest.raises(BadFields, match=rule):
        wheel_version(io.BytesIO(text.encode()))


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("Version: 1.0\n", "has no Name field"),
        ("Name:\nVersion: 1.0\n", "has no Name field"),
        ("Name: demo\n", "has no Version field"),
        (
            "Name: demo\nVersion: 1.0\nVersion: 1.1\n",
            r"2 different Version fields \['1\.0', '1\.1'",
        ),
        ("Name: demo\nVersion: one\n", "has Version 'one', but the filename says '1.0'"),
        ("Name: demo-two\nVersion: 1.0\n", "has Name 'demo-two', but the filename names 'demo'"),
    ],
)
def test_identity_refusals(text: str, rule: str) -> None:
    with pytest.raises(BadFields, match=rule):
        identity(io.BytesIO(text.encode()), "demo", Version("1.0"))


def test_fields_match_email_parser_on_mixed_lines() -> None:
    # Deterministic mixes of the shapes above, so no combination of them reads differently.
    pieces = [b"Name: a", b"name:b", b"Name : c", b" folded", b"\tfolded", b"", b"From x"]
    pieces += [b"not a field", b"Version: 1", b"X: y", b"Name:"]
    ends = [b"\n", b"\r\n", b"\r"]
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    rng = random.Random(12)
    for _ in range(2000):
        text = b"".join(rng.choice(pieces) + rng.choice(ends) for _ in range(rng.randint(1, 8)))
        expected = [v.strip() for v in parser.parsebytes(text).get_all("name") or []]
        assert fields(text, "name").get("name", []) == expected, text
