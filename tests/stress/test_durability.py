"""Fault 7: every rename that publishes something is ordered after its fsync, then its dir fsync.

A real agent syncs two manifests (blobs, packages, trees, `current`, state, retirement marks,
tree GC) and a real core runs installs, each under `strace -f -y`; tests/stress/strace_check.py
checks the ordering rule on every publishing rename. Database rows are not published by rename:
SQLite runs in WAL mode with synchronous=FULL (core/state/db.py), so a commit returns only after the
WAL is fsynced. The test checks both pragmas on a database opened by the core's own code, and on
the core's trace that no WAL write is left without a following fsync.

strace is required: the test fails (it does not skip) when it is missing; scripts/test and
.ci/run install it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from core.state.db import open_database
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.stress import harness, strace_check


def _strace(out: Path) -> list[str]:
    exe = shutil.which("strace")
    if exe is None:
        pytest.fail(
            "strace is not installed, so the durability order cannot be checked: install it"
            " (apt-get install -y strace; scripts/test and .ci/run do this)"
        )
    return [exe, "-f", "-qq", "--seccomp-bpf", "-y", "-s", "4096",
            "-e", f"trace={strace_check.TRACED}", "-o", str(out)]  # fmt: skip


def _stop_traced(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the traced program (strace's child), then wait for strace to finish writing."""
    assert proc is not None
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        subprocess.run(["kill", "-TERM", pid], check=False)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _sets(wheel_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    first = harness.build_set(wheel_dir, ["dur-a", "dur-b", "dur-c"], "1.0", 20, 2000, seed=1)
    second = harness.build_set(wheel_dir, ["dur-c"], "2.0", 20, 2000, seed=1)
    return first.pins, [*first.pins[:2], *second.pins]


def test_sqlite_is_wal_with_synchronous_full(tmp_path: Path) -> None:
    db = open_database(tmp_path)
    try:
        assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        db.close()


def test_satellite_publishes_only_durable_things(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    first, second = _sets(wheel_dir)
    trace = tmp_path / "satellite.strace"
    core = CoreProcess(tmp_path / "core").start()
    sat = SatelliteProcess(core, "sat-dur", tmp_path, "--tree-grace", "0")
    sat.wrapper = _strace(trace)
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        for n, pins in enumerate((first, second)):
            wanted = harness.install(admin, pins)
            if n == 0:
                sat.register().start()
            eventually(lambda: (r := harness.fleet(admin)[sat.name]).status == "ready"
                       and r.current_hash == wanted, timeout=120)  # fmt: skip
        eventually(lambda: harness.fleet(admin)[sat.name].last_pull_blobs == 1, timeout=30)
    finally:
        _stop_traced(sat.proc)
        core.stop()
    calls = strace_check.parse(trace.read_text(errors="replace"))
    problems, kinds = strace_check.check(calls, sat.data_dir.absolute())
    harness.record("durability_satellite", syscalls=len(calls), renames_checked=kinds,
                   violations=len(problems))  # fmt: skip
    assert not problems, "\n".join(problems[:20])
    for kind in ("blob", "package", "tree", "current", "file state.json", "file .spk-retired"):
        assert kinds.get(kind), f"no {kind} publication seen in the trace: {kinds}"


def test_core_publishes_only_durable_things(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    first, second = _sets(wheel_dir)
    trace = tmp_path / "core.strace"
    core = CoreProcess(tmp_path / "core")
    core.wrapper = _strace(trace)
    core.start(timeout=60)
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        harness.install(admin, first)
        harness.install(admin, second)
    finally:
        _stop_traced(core.proc)  # signalling strace itself would leave the core running
        core.stop()
    calls = strace_check.parse(trace.read_text(errors="replace"))
    problems, kinds = strace_check.check(calls, core.data_dir.absolute())
    writes, syncs, unsynced = strace_check.wal_unsynced(calls)
    harness.record("durability_core", syscalls=len(calls), renames_checked=kinds,
                   wal_writes=writes, wal_syncs=syncs,
                   violations=len(problems) + len(unsynced))  # fmt: skip
    assert not problems, "\n".join(problems[:20])
    assert kinds.get("blob"), f"no blob publication seen in the trace: {kinds}"
    assert writes and syncs and not unsynced, unsynced[:10]
