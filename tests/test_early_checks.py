"""core/install/early_checks.py: wheels checked while pip runs (real index, real pip)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from watchdog.observers import Observer

from core.install import early_checks
from core.install.early_checks import EarlyChecks, outcome
from core.install.pip_downloads import HeldWheel, ResolvedWheel
from core.install.pip_resolver import resolve
from core.state.index_config import RegistrySettings
from tests.core_process import eventually
from tests.index_server import PackageIndex
from tests.wheelfactory import WheelSpec, build_wheel


def as_downloaded(wheel: Path, where: Path) -> ResolvedWheel:
    """A copy of `wheel` at `where`, as pip's --dest would hold it."""
    where.mkdir(parents=True, exist_ok=True)
    copy = Path(shutil.copy(wheel, where / wheel.name))
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    return ResolvedWheel("c", "3.0", wheel.name, copy, digest, copy.stat().st_size, True)


def pip_writes(tmp: Path, wheel: Path, unpack: str = "pip-unpack-x1") -> None:
    """What pip does with a download: a fresh pip-unpack-* dir, the file written and closed."""
    (tmp / unpack).mkdir()
    time.sleep(0.2)  # let the observer put its watch on the new directory
    shutil.copy(wheel, tmp / unpack / wheel.name)


@pytest.fixture
def early(package_index: PackageIndex, tmp_path: Path) -> Iterator[EarlyChecks]:
    checks = EarlyChecks(tmp_path / "early", RegistrySettings(index_url=package_index.url))
    yield checks
    checks.close()


@pytest.fixture
def pip_tmp(tmp_path: Path) -> Path:
    """Stands in for pip's TMPDIR."""
    path = tmp_path / "tmp"
    path.mkdir()
    return path


async def test_a_wheel_checked_early_is_handed_over(
    early: EarlyChecks, pip_tmp: Path, wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    with early.watching(pip_tmp):
        pip_writes(pip_tmp, wheel)
        eventually(lambda: wheel.name in early, timeout=10, interval=0.02)
    shutil.rmtree(pip_tmp)  # pip deletes its temp dir when it exits
    saved = as_downloaded(wheel, tmp_path / "dest")
    checked = await early.inspected(saved)
    assert await early.published(saved)
    assert checked is not None and checked.parent == tmp_path / "early"
    assert checked.read_bytes() == wheel.read_bytes()
    # Only for the same bytes: another file under the same name gets no pass.
    saved.path.write_bytes(b"other bytes")
    other = ResolvedWheel(
        "c", "3.0", wheel.name, saved.path, hashlib.sha256(b"other bytes").hexdigest(), 11, True
    )
    assert await early.inspected(other) is None
    assert not await early.published(other)


async def test_a_failed_early_check_hands_over_nothing(
    early: EarlyChecks, pip_tmp: Path, wheel_dir: Path, tmp_path: Path
) -> None:
    # RECORD lies about a file: the early check fails, and the installer must check (and
    # report) it itself.
    spec = WheelSpec("c", "3.0", record_overrides={"c/__init__.py": "sha256=AAAA,3"})
    wheel = build_wheel(spec, wheel_dir)
    with early.watching(pip_tmp):
        pip_writes(pip_tmp, wheel)
        eventually(lambda: wheel.name in early, timeout=10, interval=0.02)
    saved = as_downloaded(wheel, tmp_path / "dest")
    assert await early.inspected(saved) is None
    assert await early.published(saved)  # the index does publish it: only RECORD lies


async def test_files_outside_pip_unpack_dirs_are_ignored(
    early: EarlyChecks, pip_tmp: Path, wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    with early.watching(pip_tmp):
        pip_writes(pip_tmp, wheel, unpack="pip-build-env-x")
        shutil.copy(wheel, pip_tmp / wheel.name)
        (pip_tmp / "pip-unpack-y").mkdir()
        time.sleep(0.2)
        (pip_tmp / "pip-unpack-y" / "c-3.0.tar.gz").write_bytes(b"sdist")
        time.sleep(0.3)
    assert wheel.name not in early and "c-3.0.tar.gz" not in early
    assert not (tmp_path / "early").exists() or os.listdir(tmp_path / "early") == []


async def test_real_pip_downloads_are_checked_while_it_runs(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    # 4 MiB of incompressible payload: pip takes a while to write it, as with real wheels.
    payload = {"big/__init__.py": b"", "big/blob.bin": os.urandom(4 * 1024 * 1024)}
    build_wheel(WheelSpec("big", "1.0", files=payload), wheel_dir)
    settings = RegistrySettings(index_url=package_index.url, timeout_seconds=10)
    early = EarlyChecks(tmp_path / "dl" / "early", settings)
    (tmp_path / "dl").mkdir()
    try:
        (got,) = await resolve(
            [("big", "1.0")],
            settings,
            None,
            tmp_path / "work",
            tmp_path / "dl",
            watch=early.watching,
        )
        checked = await early.inspected(got)
        assert await early.published(got)
        assert checked is not None and checked.read_bytes() == got.path.read_bytes()
    finally:
        early.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_check_still_queued_is_left_to_the_installer() -> None:
    # One worker busy with a slow check: the next one is still queued when the installer asks,
    # so it gets no result (and is dropped) instead of waiting behind it.
    gate = threading.Event()
    pool = ThreadPoolExecutor(1)
    try:
        busy = pool.submit(gate.wait, 10)
        queued = pool.submit(lambda: "ab" * 32)
        started = time.monotonic()
        assert await outcome(queued, "d-1.0-py3-none-any.whl") is None
        assert queued.cancelled() and time.monotonic() - started < 0.5
        gate.set()
        assert await outcome(busy, "c-3.0-py3-none-any.whl") is True
        assert await outcome(None, "x") is None
    finally:
        pool.shutdown()


async def test_held_wheels_published_hashes_are_fetched_before_pip_runs(
    early: EarlyChecks, wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    early.expect({wheel.name: HeldWheel(sha(wheel), wheel)})
    assert await early.published(as_downloaded(wheel, tmp_path / "dest"))
    assert await early.inspected(as_downloaded(wheel, tmp_path / "dest2")) is None


async def test_no_inotify_means_checks_after_pip_not_a_failed_install(
    early: EarlyChecks,
    package_index: PackageIndex,
    wheel_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NoInotify(Observer):  # type: ignore[misc,valid-type]
        def start(self) -> None:  # what watchdog raises when the instance limit is reached
            raise OSError(errno.EMFILE, "inotify instance limit reached")

    monkeypatch.setattr(early_checks, "Observer", NoInotify)
    build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    (tmp_path / "dl").mkdir()
    settings = RegistrySettings(index_url=package_index.url, timeout_seconds=10)
    (got,) = await resolve(
        [("c", "3.0")], settings, None, tmp_path / "work", tmp_path / "dl", watch=early.watching
    )
    assert got.name == "c" and await early.inspected(got) is None  # left to the installer
