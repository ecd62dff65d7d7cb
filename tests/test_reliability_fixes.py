"""Regression tests for what the fault-injection runs (tests/stress, docs/reliability.md) found.

Each test pins one fix at unit level, so it fails fast and says what broke:
- fault 3: the install state becomes `ready` in the transaction that makes a new hash desired;
  a killed install's scratch (registry token in its netrc) is removed at startup; the
  resolver dies with the core.
- fault 4: a failed sync is retried without a new hash; a full disk reads as such.
- fault 5: drift repair swaps a tree atomically and keeps the displaced one while it is pinned.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.install import uv_resolver
from core.install.install_state import (
    read_state,
    recover_stale_install,
    remove_stale_work,
    update_state,
)
from core.install.installer import Installer, _Built
from core.state import environments, lockfiles
from core.state.db import open_database
from core.state.keys import new_signing_key
from satellite.backoff import Backoff
from satellite.retry import SyncRetry
from satellite.store import SatelliteStore
from satellite.sync import Outcome, ReconcileResult, reconcile_to_hash
from satellite.sync.materialiser import ReconcileFailed
from shared.errors import DiskFull, is_disk_full
from shared.fsutil import exchange
from shared.manifest import Manifest
from tests.core_process import eventually, eventually_async
from tests.test_reconciler import World, world  # noqa: F401 -- the fixture
from tests.test_satellite_store import make_manifest, materialise, wheel_entry
from tests.wheelfactory import WheelSpec


def test_publish_makes_the_state_ready_in_the_same_transaction(tmp_path: Path) -> None:
    db = open_database(tmp_path)
    try:
        inst = Installer(None, None, new_signing_key(), None, None, tmp_path)  # type: ignore[arg-type]
        update_state(status="installing")
        manifest = Manifest.build([], environments.native_target())
        published = inst._publish(_Built(["default"], {"default": manifest}, {"default": []}))
        # The core dies here, before _run's own update: the restart must find it finished.
        assert not recover_stale_install()
        state = read_state()
        assert state.status == "ready" and state.release_sequence == published.release_sequence
        assert state.lockfile_hash == lockfiles.desired_hash() == manifest.lockfile_hash
    finally:
        db.close()


def test_stale_install_work_is_removed_and_other_work_kept(tmp_path: Path) -> None:
    work = tmp_path / "work"
    scratch = work / "resolve-abc123"
    (scratch / "tmp").mkdir(parents=True)
    (scratch / "netrc").write_text("machine index login __token__ password secret\n")
    (work / "dl-feed-1234.whl").write_bytes(b"half a wheel")
    (work / "migrate-beef-1234.tmp").write_bytes(b"the migrator's own")
    assert sorted(remove_stale_work(work)) == ["dl-feed-1234.whl", "resolve-abc123"]
    assert [p.name for p in work.iterdir()] == ["migrate-beef-1234.tmp"]
    assert remove_stale_work(tmp_path / "missing") == []


def test_guarded_child_dies_with_its_parent(tmp_path: Path) -> None:
    # A parent starts core/install/child_guard.py around a program that blocks (python reading a
    # pipe nobody writes), reports the child's pid, and is SIGKILLed: the child must follow,
    # although the guard exec'ed the program (the death signal survives exec).
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-I', {str(uv_resolver.CHILD_GUARD)!r},"
        " str(os.getpid()), sys.executable, '-c', 'import sys; sys.stdin.read()'],"
        " stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().split()[2] in ("Z", "X")
        except OSError:
            return True

    eventually(gone, timeout=10, interval=0.02)


class _FakeWorker:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def request(self, lockfile_hash: str | None) -> None:
        self.calls.append(f"request {lockfile_hash}")

    def request_repair(self) -> None:
        self.calls.append("repair")


async def test_failed_sync_is_retried_without_a_new_hash() -> None:
    worker = _FakeWorker()
    retry = SyncRetry(worker, Backoff(0.01, 0.02))
    target = "b" * 64
    retry.on_result(ReconcileResult(target, Outcome.FAILED, error="No space left on device"))
    await eventually_async(lambda: worker.calls, timeout=5)
    assert worker.calls == ["request None"]  # the desired hash again, whatever it is by then

    # A success in between cancels a pending retry and resets the backoff.
    retry.on_result(ReconcileResult(target, Outcome.FAILED, error="x"))
    assert retry.pending and retry.backoff.attempt == 2
    retry.on_result(ReconcileResult(target, Outcome.FLIPPED))
    assert not retry.pending and retry.backoff.attempt == 0
    assert worker.calls == ["request None"]


async def test_failed_repair_is_retried_as_a_repair() -> None:
    worker = _FakeWorker()
    retry = SyncRetry(worker, Backoff(0.01, 0.02))
    failed = ReconcileResult("c" * 64, Outcome.FAILED, error="repairing tree", drift_repair=True)
    retry.on_result(failed)
    await eventually_async(lambda: worker.calls, timeout=5)
    assert worker.calls == ["repair"]


def test_disk_full_is_found_through_the_failure_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            raise ReconcileFailed(f"pkg 1.0: {exc}") from exc
    except ReconcileFailed as outer:
        assert is_disk_full(outer)
    try:
        try:
            raise DiskFull(os.strerror(errno.EDQUOT))  # what satellite.store.AsyncStore raises
        except DiskFull as exc:
            raise ReconcileFailed(f"pkg 1.0: {exc}") from exc
    except ReconcileFailed as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(ReconcileFailed("blob a1b2: core unavailable"))
    assert not is_disk_full(OSError(errno.EACCES, "denied"))


def test_exchange_swaps_two_directories_atomically(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from-a").touch()
    (b / "from-b").touch()
    assert exchange(a, b)  # Linux with glibc >= 2.28, as on every machine we run on
    assert [p.name for p in a.iterdir()] == ["from-b"]
    assert [p.name for p in b.iterdir()] == ["from-a"]


def test_repair_swaps_the_tree_in_place_and_keeps_the_pinned_old_one(tmp_path: Path) -> None:
    store = SatelliteStore(tmp_path / "sat")
    entry, data = wheel_entry(tmp_path / "w", WheelSpec("alpha", "1.0"))
    manifest = make_manifest([entry])
    materialise(store, manifest, {entry.sha256: data})
    store.flip_current(manifest.lockfile_hash)
    with store.pin_tree(manifest.lockfile_hash) as pin:
        old_pin_inode = os.fstat(pin.fd).st_ino
        store.assemble_tree(manifest, replace=True)
        assert store.current_hash() == manifest.lockfile_hash
        displaced = list(store.trees.root.glob(".old-*"))
        # The run's tree is still whole on disk, just no longer under the hash's name.
        assert len(displaced) == 1 and (displaced[0] / ".spk-pin").stat().st_ino == old_pin_inode
        assert store.trees.hashes() == [manifest.lockfile_hash]
        store.gc_trees(0, 1e12)
        assert displaced[0].exists()  # still pinned
    store.gc_trees(0, 1e12)
    assert not list(store.trees.root.glob(".old-*"))
    assert store.verify_tree(manifest.lockfile_hash) == []


def test_a_run_pinned_before_a_repair_keeps_the_name_it_reads_through(tmp_path: Path) -> None:
    store = SatelliteStore(tmp_path / "sat")
    a, data_a = wheel_entry(tmp_path / "w", WheelSpec("alpha", "1.0"))
    b, data_b = wheel_entry(tmp_path / "w", WheelSpec("beta", "1.0"))
    first, second = make_manifest([a]), make_manifest([b], sequence=2)
    materialise(store, first, {a.sha256: data_a})
    materialise(store, second, {b.sha256: data_b})
    store.flip_current(first.lockfile_hash)
    with store.pin_tree(first.lockfile_hash) as pin:
        store.assemble_tree(first, replace=True)  # the run's pin is now on the displaced tree
        store.flip_current(second.lockfile_hash)
        store.retire_others(0.0)
        store.gc_trees(0, 1e12)
        # The run reads through trees/<first>/..., so that name must survive its pin.
        assert (pin.site / "alpha" / "__init__.py").read_bytes()
    assert store.gc_trees(0, 1e12) == [first.lockfile_hash]
    assert not list(store.trees.root.glob(".old-*"))


async def test_a_full_disk_is_reported_as_such_without_tracebacks(
    world: World,  # noqa: F811 -- the fixture imported above
    caplog: pytest.LogCaptureFixture,
) -> None:
    manifest = world.publish(world.package("alpha", "1.0"))
    # What satellite.store.AsyncStore raises for ENOSPC (tests/test_async_store.py).
    full = DiskFull(str(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    world.store.fail["open_blob"] = full
    world.store.fail["save_state"] = full
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FAILED
    assert "No space left on device" in result.error and "disk is full" in result.error
    assert world.core.reports[-1].error == result.error
    assert caplog.records and not [r for r in caplog.records if r.exc_info]
