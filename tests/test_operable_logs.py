"""Logs an operator can read: an agent killed mid-download leaves no traceback on the core, a
resumed download says so with its offset, a sync of a real-size tree logs no watchdog dumps, and
--log-format json writes one object per line with the structured fields."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.tcp_proxy import TcpProxy
from tests.wheelfactory import WheelSpec, build_wheel

CLUTTER = ("Traceback", "Task exception was never retrieved", "different Context", "Overwritten")


def _partial_size(sat: SatelliteProcess) -> int:
    partial = sat.data_dir / "blobs" / ".partial"
    return sum(f.stat().st_size for f in partial.glob("*")) if partial.exists() else 0


def test_agent_killed_mid_download_leaves_a_clean_core_log_and_resumes_loudly(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    big = build_wheel(
        WheelSpec("big", "1.0", files={"big/blob.bin": os.urandom(16 * 2**20)}), wheel_dir
    )
    core = CoreProcess(tmp_path / "core").start()
    proxy = TcpProxy(core.port, rate=4 * 2**20)  # ~4 s for the blob: time to kill the agent
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        wanted = admin.install_pins(("big", "1.0"))
        sat = SatelliteProcess(core, "sat-kill", tmp_path).register()
        sat.target = proxy.target
        for _ in range(2):  # killed twice mid-stream, the second time after a resume
            satellites.append(sat.start())
            floor = _partial_size(sat) + 2**20
            eventually(lambda: _partial_size(sat) > floor, timeout=60, interval=0.02)
            sat.stop(signal.SIGKILL)
            proxy.cut()
            eventually(lambda: "unsubscribed" in core.log(), timeout=30)
        resumed_from = _partial_size(sat)
        assert 0 < resumed_from < big.stat().st_size
        satellites.append(sat.start())
        eventually(lambda: sat.current() == wanted, timeout=120)
        assert f"at offset {resumed_from}" in sat.log(), sat.log()[-3000:]
        eventually(lambda: core.log().count("satellite sat-kill subscribed") >= 3, timeout=30)
    finally:
        proxy.close()
        core.stop()
    noise = [line for line in core.log().splitlines() if any(c in line for c in CLUTTER)]
    assert not noise, "\n".join(noise[:20])


def _nested_wheel(name: str, version: str, wheel_dir: Path) -> Path:
    files = {
        f"{name}/{a}/{b}/{c}.py": f"# {name} {a}{b}{c}\n".encode()
        for a in ("core", "util", "io")
        for b in ("x", "y", "z")
        for c in ("one", "two")
    }
    files[f"{name}/__init__.py"] = f"VERSION = {version!r}\n".encode()
    return build_wheel(WheelSpec(name, version, files=files), wheel_dir)


def test_json_logs_carry_structured_fields_and_no_watchdog_dumps(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    for version in ("1.0", "2.0"):
        _nested_wheel("deep", version, wheel_dir)
        _nested_wheel("wide", version, wheel_dir)
    core = CoreProcess(tmp_path / "core")
    core.extra_args = ["--log-format", "json"]
    core.start()
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        first = admin.install_pins(("deep", "1.0"), ("wide", "1.0"))
        sat = SatelliteProcess(core, "sat-json", tmp_path, "--log-format", "json").register()
        satellites.append(sat.start())
        eventually(lambda: sat.current() == first, timeout=60)
        second = admin.install_pins(("deep", "2.0"), ("wide", "2.0"))
        eventually(lambda: sat.current() == second, timeout=60)
        eventually(lambda: '"status":"flipped"' in sat.log(), timeout=30)
    finally:
        core.stop()
    sat.stop()
    for log_text in (core.log(), sat.log()):
        records = [json.loads(line) for line in log_text.splitlines() if line.strip()]
        assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
        assert not [r for r in records if any(c in r["message"] for c in CLUTTER)]
    sat_records = [json.loads(line) for line in sat.log().splitlines()]
    flips = [r for r in sat_records if r.get("status") == "flipped"]
    assert {r["lockfile_hash"] for r in flips} == {first, second}
    assert all(r["duration_seconds"] >= 0 and r["sequence"] >= 1 for r in flips)
    core_records = [json.loads(line) for line in core.log().splitlines()]
    ready = [r for r in core_records if r.get("status") == "ready" and "sequence" in r]
    assert [r["lockfile_hash"] for r in ready] == [first, second]
    assert any(r.get("satellite") == "sat-json" for r in core_records)
    assert {"resolving", "fetching"} <= {r.get("phase") for r in core_records}
