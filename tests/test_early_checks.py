"""core/early_checks.py: wheels checked while pip runs, against a real index and real pip."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from core.early_checks import EarlyChecks, LoggedHashes
from core.pip_downloads import ResolvedWheel
from core.registry import RegistrySettings, resolve
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


async def test_a_wheel_checked_early_is_handed_over(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    early = EarlyChecks(tmp_path / "early", RegistrySettings(index_url=package_index.url))
    pip_tmp = tmp_path / "tmp"
    pip_tmp.mkdir()
    try:
        with early.watching(pip_tmp, tmp_path / "pip.log"):
            pip_writes(pip_tmp, wheel)
            eventually(lambda: wheel.name in early, timeout=10, interval=0.02)
        shutil.rmtree(pip_tmp)  # pip deletes its temp dir when it exits
        saved = as_downloaded(wheel, tmp_path / "dest")
        checked = await early.passed(saved)
        assert checked is not None and checked.parent == tmp_path / "early"
        assert checked.read_bytes() == wheel.read_bytes()
        # Only for the same bytes: another file under the same name gets no pass.
        saved.path.write_bytes(b"other bytes")
        other = ResolvedWheel(
            "c", "3.0", wheel.name, saved.path, hashlib.sha256(b"other bytes").hexdigest(), 11, True
        )
        assert await early.passed(other) is None
    finally:
        early.close()


async def test_a_failed_early_check_hands_over_nothing(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    # RECORD lies about a file: the early check fails, and the installer must check (and
    # report) it itself.
    spec = WheelSpec("c", "3.0", record_overrides={"c/__init__.py": "sha256=AAAA,3"})
    wheel = build_wheel(spec, wheel_dir)
    early = EarlyChecks(tmp_path / "early", RegistrySettings(index_url=package_index.url))
    pip_tmp = tmp_path / "tmp"
    pip_tmp.mkdir()
    try:
        with early.watching(pip_tmp, tmp_path / "pip.log"):
            pip_writes(pip_tmp, wheel)
            eventually(lambda: wheel.name in early, timeout=10, interval=0.02)
        assert await early.passed(as_downloaded(wheel, tmp_path / "dest")) is None
    finally:
        early.close()


async def test_files_outside_pip_unpack_dirs_are_ignored(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    early = EarlyChecks(tmp_path / "early", RegistrySettings(index_url=package_index.url))
    pip_tmp = tmp_path / "tmp"
    pip_tmp.mkdir()
    try:
        with early.watching(pip_tmp, tmp_path / "pip.log"):
            pip_writes(pip_tmp, wheel, unpack="pip-build-env-x")
            shutil.copy(wheel, pip_tmp / wheel.name)
            (pip_tmp / "pip-unpack-y").mkdir()
            time.sleep(0.2)
            (pip_tmp / "pip-unpack-y" / "c-3.0.tar.gz").write_bytes(b"sdist")
            time.sleep(0.3)
        assert wheel.name not in early and "c-3.0.tar.gz" not in early
        assert not (tmp_path / "early").exists() or os.listdir(tmp_path / "early") == []
    finally:
        early.close()


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
        checked = await early.passed(got)
        assert checked is not None and checked.read_bytes() == got.path.read_bytes()
    finally:
        early.close()


async def test_hashes_in_pips_log_are_used_without_reading_the_page(
    wheel_dir: Path, tmp_path: Path
) -> None:
    good = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    bad = build_wheel(WheelSpec("d", "1.0"), wheel_dir)
    log = tmp_path / "pip.log"
    log.write_text(
        f"2026-11-27T03:35:26,066   Found link http://x/packages/{good.name}#sha256={sha(good)}"
        " (from http://x/simple/c/), version: 3.0\n"
        f"2026-11-27T03:35:26,067   Found link http://x/packages/{bad.name}#sha256={'ab' * 32}"
        " (from http://x/simple/d/), version: 1.0\n"
    )
    nowhere = RegistrySettings(index_url="http://127.0.0.1:9/simple/")  # nothing listens
    early = EarlyChecks(tmp_path / "early", nowhere)
    pip_tmp = tmp_path / "tmp"
    pip_tmp.mkdir()
    try:
        with early.watching(pip_tmp, log):
            pip_writes(pip_tmp, good, unpack="pip-unpack-1")
            pip_writes(pip_tmp, bad, unpack="pip-unpack-2")
            eventually(lambda: good.name in early and bad.name in early, timeout=10, interval=0.02)
        assert await early.passed(as_downloaded(good, tmp_path / "dest")) is not None
        assert await early.passed(as_downloaded(bad, tmp_path / "dest")) is None
    finally:
        early.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_logged_hashes_are_read_a_new_piece_at_a_time(tmp_path: Path) -> None:
    log = tmp_path / "pip.log"
    line = "2026-11-27T03:35:26,066   Found link http://x/p/c-3.0-py3-none-any.whl#sha256="
    log.write_text(f"{line}{'ab' * 32} (from http://x/simple/c/)\n{line}{'cd' * 16}")
    logged = LoggedHashes(log)
    assert logged.get("c-3.0-py3-none-any.whl") == {"ab" * 32}
    with log.open("a") as f:  # pip finishes the line it was writing
        f.write(f"{'cd' * 16} (from http://mirror/simple/c/)\n")
    assert logged.get("c-3.0-py3-none-any.whl") == {"ab" * 32, "cd" * 32}
    assert logged.get("d-1.0-py3-none-any.whl") == frozenset()


async def test_a_check_still_queued_is_left_to_the_installer(
    wheel_dir: Path, tmp_path: Path
) -> None:
    # A slow index page (no hash in pip's log) holds the one worker; the next file's check is
    # still queued when the installer asks, so it gets no pass and checks the file itself.
    first = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    second = build_wheel(WheelSpec("d", "1.0"), wheel_dir)

    class SlowIndex(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(1.5)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowIndex)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/simple/"
    early = EarlyChecks(tmp_path / "early", RegistrySettings(index_url=url, timeout_seconds=5))
    pip_tmp = tmp_path / "tmp"
    pip_tmp.mkdir()
    try:
        with early.watching(pip_tmp, tmp_path / "pip.log"):
            pip_writes(pip_tmp, first, unpack="pip-unpack-1")
            pip_writes(pip_tmp, second, unpack="pip-unpack-2")
            eventually(lambda: second.name in early, timeout=10, interval=0.02)
        started = time.monotonic()
        assert await early.passed(as_downloaded(second, tmp_path / "dest")) is None
        assert time.monotonic() - started < 0.5  # not behind the slow check
    finally:
        early.close()
        server.shutdown()
        server.server_close()
