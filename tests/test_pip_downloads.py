"""core/install/pip_downloads.py: which files `pip download` left are the resolved set (held
wheels too)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from core.install.pip_downloads import (
    HeldWheel,
    choose_files,
    plan_downloads,
    reported_names,
)
from core.install.pip_resolver import resolve
from core.state.index_config import RegistrySettings
from shared.errors import ResolveError
from tests.index_server import StaticIndex
from tests.wheelfactory import WheelSpec, build_wheel

A1, A2 = "a-1.0-py3-none-any.whl", "a-2.0-py3-none-any.whl"
B1, C1 = "b-1.0-py3-none-any.whl", "c-1.0-py3-none-any.whl"


def test_plan_downloads() -> None:
    got = plan_downloads(
        ["foo_bar-1.0-py3-none-any.whl", "dep-2.0.post0-cp311-cp311-manylinux_2_17_x86_64.whl"],
        {"foo-bar"},
    )
    assert [(w.name, w.version, w.requested) for w in got] == [
        ("dep", "2.0.post0", False),
        ("foo-bar", "1.0", True),
    ]
    assert got[1].filename == "foo_bar-1.0-py3-none-any.whl"
    assert plan_downloads([], {"x"}) == []
    with pytest.raises(ResolveError, match=r"'dep' 2.0 resolved to dep-2.0.tar.gz; source distr"):
        plan_downloads(["dep-2.0.tar.gz"], set())
    with pytest.raises(ResolveError, match=r"'notes\.txt', which is not a wheel"):
        plan_downloads(["notes.txt"], set())


def test_reported_names_reads_the_last_closing_line() -> None:
    log = (
        "2026-11-27T03:35:26,094 Successfully downloaded old\n"
        "2026-11-27T03:35:27,094 Successfully downloaded Foo_Bar MarkupSafe six\n"
    )
    assert reported_names(log) == {"foo-bar", "markupsafe", "six"}
    assert reported_names("Collecting six==1.0\n") is None


def test_without_seeds_every_file_is_the_set() -> None:
    assert choose_files([B1, A1], seeds=[], reported=None) == [A1, B1]


def test_seeds_pip_did_not_use_are_left_out() -> None:
    # Held: a 1.0 and c 1.0. pip resolved a 2.0 (downloaded) and b (downloaded); c is gone.
    files = [A1, A2, B1, C1]
    assert choose_files(files, seeds=[A1, C1], reported={"a", "b"}) == [A2, B1]
    # pip used the held a 1.0 and c 1.0 and downloaded b.
    assert choose_files([A1, B1, C1], seeds=[A1, C1], reported={"a", "b", "c"}) == [A1, B1, C1]


def test_ambiguous_or_unreported_files_fail_closed() -> None:
    with pytest.raises(ResolveError, match="'Successfully downloaded"):
        choose_files([A1, B1], seeds=[A1], reported=None)
    with pytest.raises(ResolveError, match=r"pip saved b-1\.0-py3-none-any\.whl but does not list"):
        choose_files([A1, B1], seeds=[A1], reported={"a"})
    with pytest.raises(ResolveError, match="'c' but its files are ambiguous: none"):
        choose_files([A1], seeds=[A1], reported={"a", "c"})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_held_wheels_are_not_downloaded_again(
    static_index: StaticIndex, tmp_path: Path
) -> None:
    packages = static_index.packages
    top = build_wheel(WheelSpec("top", "1.0", requires=["dep>=1"]), tmp_path / "built")
    dep1 = build_wheel(WheelSpec("dep", "1.0"), packages)
    dep2 = build_wheel(WheelSpec("dep", "2.0"), packages)  # new on the index since then
    gone = build_wheel(WheelSpec("gone", "1.0"), packages)
    # The index lists top 1.0 but cannot serve it: only the held copy can satisfy it.
    static_index.publish("top", top)
    static_index.publish("dep", dep1, dep2)
    static_index.publish("gone", gone)
    blobs = tmp_path / "blobs"  # stands in for the store's files
    blobs.mkdir()
    held = {}
    for wheel in (top, dep1, gone):
        blob = Path(shutil.copy(wheel, blobs / f"{sha(wheel)}.whl"))
        held[wheel.name] = HeldWheel(sha(wheel), blob)
    settings = RegistrySettings(index_url=static_index.url, timeout_seconds=10)
    dest = tmp_path / "dest"
    dest.mkdir()
    got = await resolve([("top", "1.0")], settings, None, tmp_path / "work", dest, held=held)
    by_name = {w.name: w for w in got}
    assert set(by_name) == {"top", "dep"}  # not "gone", whose held wheel pip did not need
    assert by_name["top"].path == held[top.name].path  # the blob itself, never fetched
    assert by_name["top"].sha256 == sha(top) and by_name["top"].requested
    assert by_name["dep"].filename == dep2.name and by_name["dep"].path.parent == dest
    assert by_name["dep"].sha256 == sha(dep2) and not by_name["dep"].requested
    assert sorted(p.name for p in blobs.iterdir()) == sorted(
        f"{sha(w)}.whl" for w in (top, dep1, gone)
    )


async def test_a_held_wheel_the_index_no_longer_publishes_is_fetched_again(
    static_index: StaticIndex, tmp_path: Path
) -> None:
    now = build_wheel(WheelSpec("top", "1.0"), static_index.packages)
    static_index.publish("top", now)
    stale = tmp_path / "blobs" / "stale.whl"  # same file name, other bytes than published
    stale.parent.mkdir()
    stale.write_bytes(b"not the published wheel")
    held = {now.name: HeldWheel("0" * 64, stale)}
    settings = RegistrySettings(index_url=static_index.url, timeout_seconds=10)
    dest = tmp_path / "dest"
    dest.mkdir()
    (got,) = await resolve([("top", "1.0")], settings, None, tmp_path / "work", dest, held=held)
    assert got.path.parent == dest and got.sha256 == sha(now)  # pip re-downloaded it
    assert stale.read_bytes() == b"not the published wheel"  # and left the blob alone
