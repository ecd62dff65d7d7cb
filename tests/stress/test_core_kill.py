"""Fault 3: SIGKILL of the core during an install, and during a blob stream.

Install: the allowlist gets a new version of a package (so the install resolves AND downloads),
InstallNow starts, the core is killed at a uniformly random moment of the install's calibrated
length and started again on the same port and data dir. Expected: the install is marked failed
with a reason (or it had finished: then the new hash is desired and ready, never a mix), the
previous desired hash stays, nothing of the dead install is left in the core's work dir or blob
store (the resolver's scratch holds the registry token in its netrc), the satellite stays ready
on the old hash, the next InstallNow succeeds and the satellite converges.

Blob stream: a satellite pulls a large blob through a throttled link and the core is killed at a
random point of the transfer; after the restart the satellite resumes from its partial and
converges, re-pulling only what was in flight.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.stress import harness
from tests.stress.harness import pick
from tests.tcp_proxy import TcpProxy
from tests.wheelfactory import WheelSpec, build_wheel

INSTALL_KILLS = pick(2, 12)
STREAM_KILLS = pick(1, 10)
RETRY = ["--retry-base", "0.2", "--retry-cap", "2"]
BASE = [("ck-base", "1.0"), ("ck-dep", "1.0")]


def _wheels(wheel_dir: Path, versions: int) -> None:
    rng = random.Random(5)
    build_wheel(WheelSpec("ck-base", "1.0", requires=["ck-dep==1.0"]), wheel_dir)
    build_wheel(
        WheelSpec("ck-dep", "1.0", files={"ck_dep/d.bin": rng.randbytes(1 << 20)}), wheel_dir
    )
    for v in range(versions + 2):
        files = {f"ck_moving/m{i}.py": rng.randbytes(4096) for i in range(40)}
        build_wheel(WheelSpec("ck-moving", f"1.{v}", files=files), wheel_dir)


def _core_leftovers(core: CoreProcess) -> list[str]:
    work = core.data_dir / "work"
    found = [p.name for p in work.glob("resolve-*")] + [p.name for p in work.glob("dl-*")]
    found += [p.name for p in (core.data_dir / "blobs").glob("??/.tmp-*")]
    return found


def _orphans(core: CoreProcess) -> list[int]:
    """Processes still working in the core's work dir (a pip the killed core started)."""
    needle = str(core.data_dir / "work").encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _ready_on(sat: SatelliteProcess, admin: AdminClient, wanted: str) -> bool:
    row = harness.fleet(admin)[sat.name]
    return row.status == "ready" and row.current_hash == wanted and sat.current() == wanted


def test_core_sigkill_during_install_keeps_the_desired_hash(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    rng = random.Random(13)
    _wheels(wheel_dir, INSTALL_KILLS)
    core = CoreProcess(tmp_path / "core").start()
    sat = SatelliteProcess(core, "sat-ck", tmp_path, *RETRY)
    outcomes: dict[str, int] = {"failed, previous hash kept": 0, "finished before the kill": 0}
    violations: list[str] = []
    orphans = 0
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        started = time.monotonic()
        desired = harness.install(admin, [*BASE, ("ck-moving", "1.0")])
        install_s = time.monotonic() - started
        sat.register().start()
        eventually(lambda: _ready_on(sat, admin, desired), timeout=60)
        for kill in range(INSTALL_KILLS):
            pins = [*BASE, ("ck-moving", f"1.{kill + 1}")]
            admin.SetPackages(
                apb.SetPackagesRequest(
                    packages=[apb.PackageSpec(name=n, version=v) for n, v in pins]
                )
            )
            admin.InstallNow(apb.InstallNowRequest())
            time.sleep(rng.uniform(0, install_s))  # the random kill point
            core.kill()
            orphans += len(_orphans(core))
            violations += [f"kill {kill}: pip {pid} outlived the core" for pid in _orphans(core)]
            core.start()
            admin = core.admin()
            state = admin.GetInstallState()
            if state.status == apb.INSTALL_STATUS_READY and state.lockfile_hash != desired:
                outcomes["finished before the kill"] += 1
                desired = state.lockfile_hash
            else:
                outcomes["failed, previous hash kept"] += 1
                if state.status != apb.INSTALL_STATUS_ERROR or "stopped" not in state.error:
                    violations.append(f"kill {kill}: state after restart: {state}")
                if state.lockfile_hash != desired:
                    violations.append(f"kill {kill}: desired moved to {state.lockfile_hash}")
            violations += [f"kill {kill}: leftover {p}" for p in _core_leftovers(core)]
            eventually(lambda: _ready_on(sat, admin, desired), timeout=60)
            desired = harness.install(admin, pins)
            eventually(lambda: _ready_on(sat, admin, desired), timeout=60)
    finally:
        sat.stop()
        core.stop()
    harness.record(
        "core_kill_install",
        kills=INSTALL_KILLS,
        install_s=round(install_s, 2),
        outcomes=outcomes,
        orphaned_pip_processes=orphans,
        violations=len(violations),
    )
    assert not violations, "\n".join(violations)


def test_core_sigkill_during_blob_stream_resumes(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    rng = random.Random(17)
    size = pick(16, 32) << 20
    wheels = [
        build_wheel(
            WheelSpec(f"ck-big{i}", "1.0", files={f"ck_big{i}/d.bin": rng.randbytes(size)}),
            wheel_dir,
        )
        for i in range(STREAM_KILLS)
    ]
    core = CoreProcess(tmp_path / "core").start()
    proxy = TcpProxy(core.port, rate=16 << 20)  # ~1-2 s per blob: time to kill the core
    resent: list[int] = []
    violations: list[str] = []
    mid_stream = 0
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        desired = harness.install(admin, [])
        sat = SatelliteProcess(core, "sat-cs", tmp_path, *RETRY).register()
        sat.target = proxy.target
        sat.start()
        eventually(lambda: _ready_on(sat, admin, desired), timeout=60)
        for kill, wheel in enumerate(wheels):
            blob = wheel.stat().st_size
            before = proxy.bytes_down - proxy.undelivered  # the pull starts with the install
            desired = harness.install(admin, [(f"ck-big{kill}", "1.0")])
            at = before + int(blob * rng.uniform(0.05, 0.95))
            eventually(lambda: proxy.bytes_down >= at, timeout=60, interval=0.01)
            core.kill()
            proxy.cut()
            mid_stream += any((sat.data_dir / "blobs" / ".partial").glob("*"))
            core.start()
            admin = core.admin()
            state = admin.GetInstallState()
            if state.status != apb.INSTALL_STATUS_READY or state.lockfile_hash != desired:
                violations.append(f"kill {kill}: install state after restart: {state}")
            eventually(lambda: _ready_on(sat, admin, desired), timeout=120)
            resent.append(proxy.bytes_down - proxy.undelivered - before - blob)
        sat.stop()
        violations += [f"satellite leftover {p}" for p in harness.temp_leftovers(sat.data_dir)]
    finally:
        proxy.close()
        core.stop()
    harness.record(
        "core_kill_stream",
        kills=STREAM_KILLS,
        kills_with_a_partial_blob_on_disk=mid_stream,
        blob_bytes=size,
        resent_bytes=resent,
        resent_pct_max=round(100 * max(resent) / size, 2),
        violations=len(violations),
    )
    assert not violations, "\n".join(violations)
    assert max(resent) < 0.1 * size
