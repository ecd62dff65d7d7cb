"""satellite.store.unpack_pool: unpacking in real worker processes, and what happens when they fail.

The pool runs exactly shared.tree_build.unpack_package, so the result must be the same files and
marker as unpacking in-process; a refusal must come back as the same error; a worker that dies
must fail only the package it held, and the pool must come back for the next one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from satellite.store import unpack_pool
from satellite.store.unpack_pool import UnpackPool
from shared.errors import InvalidArgument, StoreError, UnsafeWheel
from shared.manifest import ManifestEntry
from shared.tree_build import PKG_MARKER, SITE, unpack_package, unpack_part
from tests.core_process import eventually
from tests.wheelfactory import WheelSpec, build_wheel

FILES = {"pkg/__init__.py": b"X = 1\n", "pkg/data/big.bin": bytes(200_000)}


def _entry(wheel: Path) -> ManifestEntry:
    data = wheel.read_bytes()
    name, version = wheel.name.split("-")[:2]
    return ManifestEntry(
        name, version, wheel.name, hashlib.sha256(data).hexdigest(), len(data), True
    )


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode & 0o777)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def pool() -> Iterator[UnpackPool]:
    workers = UnpackPool(2)
    yield workers
    workers.close()


def test_a_worker_unpacks_exactly_what_the_process_would(tmp_path: Path, pool: UnpackPool) -> None:
    wheel = build_wheel(WheelSpec("demo", "1.0", files=FILES), tmp_path / "w")
    entry = _entry(wheel)
    here = unpack_package(entry, wheel, tmp_path / "here")
    there = pool.unpack(entry, wheel, tmp_path / "there")
    assert there == here
    assert _tree(tmp_path / "there" / SITE) == _tree(tmp_path / "here" / SITE)
    marker = json.loads((tmp_path / "there" / PKG_MARKER).read_text())
    assert marker["sha256"] == entry.sha256 and "pkg/data/big.bin" in marker["files"]


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_a_refusal_comes_back_as_the_same_error(
    tmp_path: Path, pool: UnpackPool, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    if split:  # every worker takes a share of the wheel (a big wheel unpacked alone)
        monkeypatch.setattr(unpack_pool, "SPLIT_MIN_BYTES", 0)
    wrong = base64.urlsafe_b64encode(hashlib.sha256(b"other").digest()).rstrip(b"=").decode()
    overrides = {"pkg/data/big.bin": f"sha256={wrong},200000"}
    wheel = build_wheel(
        WheelSpec("demo", "1.0", files=FILES, record_overrides=overrides), tmp_path / "w"
    )
    with pytest.raises(UnsafeWheel) as caught:
        pool.unpack(_entry(wheel), wheel, tmp_path / "t")
    assert caught.value.wheel == wheel.name
    assert "'pkg/data/big.bin' RECORD hash mismatch" in caught.value.reason
    assert not (tmp_path / "t" / SITE).exists()  # extract_wheel cleaned up after itself


def test_a_big_wheel_unpacked_alone_is_split_across_the_workers(
    tmp_path: Path, pool: UnpackPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unpack_pool, "SPLIT_MIN_BYTES", 0)
    files = {**FILES, **{f"pkg/m{i % 5}/f{i}.py": f"V = {i}\n".encode() for i in range(40)}}
    wheel = build_wheel(WheelSpec("demo", "1.0", files=files), tmp_path / "w")
    entry = _entry(wheel)
    executor = pool._acquire()  # the workers' executor, as during a sync
    pool._release()
    assert executor is not None
    parts: list[int] = []
    submit = executor.submit

    def recording(fn: Any, /, *args: Any) -> Any:
        if fn is unpack_part:
            parts.append(args[4])
        return submit(fn, *args)

    monkeypatch.setattr(executor, "submit", recording)
    here = unpack_package(entry, wheel, tmp_path / "here")
    there = pool.unpack(entry, wheel, tmp_path / "there")
    assert sorted(parts) == [0, 1]  # both workers, one share each
    assert there == here
    assert _tree(tmp_path / "there" / SITE) == _tree(tmp_path / "here" / SITE)
    assert (tmp_path / "there" / PKG_MARKER).read_text() == (
        tmp_path / "here" / PKG_MARKER
    ).read_text()


def test_errors_survive_pickling_with_their_fields() -> None:
    for error in (UnsafeWheel("w.whl", "bad entry"), InvalidArgument("name", "must be set")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
        assert again.__dict__ == error.__dict__


def test_a_dead_worker_fails_its_package_and_the_pool_recovers(
    tmp_path: Path, pool: UnpackPool
) -> None:
    wheel = build_wheel(WheelSpec("demo", "1.0", files=FILES), tmp_path / "w")
    entry = _entry(wheel)
    # A "blob" that is a FIFO: the worker blocks opening it, so the kill lands mid-task.
    stuck = tmp_path / "stuck-1.0-py3-none-any.whl"
    os.mkfifo(stuck)
    pool.warm()
    executor = pool._executor
    assert executor is not None
    workers = list(executor._processes.values())  # type: ignore[attr-defined]
    assert len(workers) == 2

    def kill_soon() -> None:
        time.sleep(0.3)
        for process in workers:
            os.kill(process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with pytest.raises(StoreError, match=r"the process unpacking stuck-1\.0-.* died"):
        pool.unpack(
            ManifestEntry("stuck", "1.0", stuck.name, "0" * 64, 1, True), stuck, tmp_path / "k"
        )
    killer.join()
    assert pool.unpack(entry, wheel, tmp_path / "after")  # a new pool, same result
    assert (tmp_path / "after" / PKG_MARKER).is_file()


def test_workers_die_with_the_agent(tmp_path: Path) -> None:
    """A SIGKILLed parent takes its workers along (PR_SET_PDEATHSIG), even one stuck in a task
    (without it, the one blocked on the FIFO would live on)."""
    script = tmp_path / "parent.py"
    stuck = tmp_path / "stuck-1.0-py3-none-any.whl"
    os.mkfifo(stuck)  # a worker opening it blocks until killed
    script.write_text(
        "import sys, threading, time\n"
        "from pathlib import Path\n"
        "from satellite.store.unpack_pool import UnpackPool\n"
        "from shared.manifest import ManifestEntry\n"
        "if __name__ == '__main__':\n"
        "    pool = UnpackPool(2)\n"
        "    pool.warm()\n"
        f"    blob = Path({str(stuck)!r})\n"
        "    entry = ManifestEntry('stuck', '1.0', blob.name, '0' * 64, 1, True)\n"
        "    job = lambda: pool.unpack(entry, blob, blob.with_name('out'))\n"
        "    threading.Thread(target=job, daemon=True).start()\n"
        "    time.sleep(0.5)\n"
        "    print(' '.join(str(p.pid) for p in pool._executor._processes.values()), flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    parent.kill()
    parent.wait()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"  # reaped by nobody yet: dead all the same

    eventually(lambda: all(gone(p) for p in pids), timeout=10)


def test_without_processes_unpacking_stays_in_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(38, "Function not implemented")  # no semaphores (no /dev/shm), say

    monkeypatch.setattr(unpack_pool, "ProcessPoolExecutor", refuse)
    pool = UnpackPool(2)
    wheel = build_wheel(WheelSpec("demo", "1.0", files=FILES), tmp_path / "w")
    files = pool.unpack(_entry(wheel), wheel, tmp_path / "t")
    assert "pkg/__init__.py" in files
    assert "cannot start unpack processes" in caplog.text
    assert pool._executor is None


def test_an_idle_pool_lets_its_workers_go(tmp_path: Path) -> None:
    pool = UnpackPool(2, idle_seconds=0.2)
    try:
        pool.warm()
        executor = pool._executor
        assert executor is not None
        workers = list(executor._processes.values())  # type: ignore[attr-defined]
        eventually(lambda: pool._executor is None, timeout=10)
        eventually(lambda: not any(p.is_alive() for p in workers), timeout=10)
        wheel = build_wheel(WheelSpec("demo", "1.0", files=FILES), tmp_path / "w")
        assert pool.unpack(_entry(wheel), wheel, tmp_path / "t")  # starts again on demand
    finally:
        pool.close()
