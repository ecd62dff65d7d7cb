"""Fault 6: the core restarts under a connected fleet (200 satellites in the long mode).

The satellites are real Agent objects hosted by a few processes (tests/stress/agent_host.py),
each with its own data dir and token. With every satellite connected and synced, the core is
stopped (SIGTERM: every refresh stream ends at once, the herd case; the long mode also does
SIGKILL) and started again on the same port. Measured: time until every satellite is connected
again, the peak number of re-subscriptions per second the core saw (from its own log), and the
time for the whole fleet to converge on an install made after the restart. None may be left
behind: every satellite connected, ready, on the new hash.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import export_signing_key
from tests.stress import harness
from tests.stress.harness import pick
from tests.wheelfactory import WheelSpec, build_wheel

SATELLITES = pick(20, 200)
HOSTS = pick(2, 4)
RESTARTS = pick(["SIGTERM"], ["SIGTERM", "SIGKILL"])
SUBSCRIBED = re.compile(r"^(\S+ \S+) INFO core\.distribution_service: satellite (\S+) subscribed")


def _subscriptions(log_text: str) -> list[float]:
    """Wall-clock times of every `satellite X subscribed` line in a core log excerpt."""
    times = []
    for line in log_text.splitlines():
        m = SUBSCRIBED.match(line)
        if m:
            times.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def _peak_per_second(times: list[float]) -> int:
    """The most events in any 1-second window."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _all(admin_rows: dict[str, apb.Satellite], wanted: str | None) -> bool:
    return len(admin_rows) == SATELLITES and all(
        r.connected and (wanted is None or (r.current_hash == wanted and r.status == "ready"))
        for r in admin_rows.values()
    )


def _host_status(paths: list[Path]) -> dict[str, dict[str, object]]:
    merged: dict[str, dict[str, object]] = {}
    for path in paths:
        if path.exists():
            merged.update(json.loads(path.read_text())["agents"])
    return merged


def test_core_restart_with_a_connected_fleet(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    build_wheel(WheelSpec("fleet-a", "1.0"), wheel_dir)
    build_wheel(WheelSpec("fleet-a", "2.0"), wheel_dir)
    build_wheel(WheelSpec("fleet-a", "3.0"), wheel_dir)
    core = CoreProcess(tmp_path / "core").start()
    hosts: list[subprocess.Popen[bytes]] = []
    statuses = [tmp_path / f"host{h}.status.json" for h in range(HOSTS)]
    figures: dict[str, object] = {"satellites": SATELLITES, "host_processes": HOSTS}
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        wanted = harness.install(admin, [("fleet-a", "1.0")])
        agents = []
        for i in range(SATELLITES):
            name = f"fleet-{i:03d}"
            token = admin.CreateSatellite(apb.CreateSatelliteRequest(name=name)).token
            agents.append({"name": name, "token": token, "data_dir": str(tmp_path / "sats" / name)})
        key_pem = export_signing_key(core, tmp_path / "key.pem").read_text()
        for h in range(HOSTS):
            spec = tmp_path / f"host{h}.spec.json"
            spec.write_text(json.dumps(
                {"core": core.target, "key_pem": key_pem, "agents": agents[h::HOSTS]}))  # fmt: skip
            log = (tmp_path / f"host{h}.log").open("ab")
            hosts.append(subprocess.Popen(
                [sys.executable, "-m", "tests.stress.agent_host", str(spec), str(statuses[h])],
                stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        eventually(lambda: _all(harness.fleet(admin), wanted), timeout=180, interval=0.5)

        for n, how in enumerate(RESTARTS):
            offset = core.log_path.stat().st_size
            core.stop(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
            down = time.monotonic()
            core.start()
            up = time.monotonic()
            admin = core.admin()
            eventually(lambda: _all(harness.fleet(admin), None), timeout=180, interval=0.2)
            reconnected = time.monotonic()
            with core.log_path.open("rb") as f:
                f.seek(offset)
                subs = _subscriptions(f.read().decode(errors="replace"))
            wanted = harness.install(admin, [("fleet-a", f"{n + 2}.0")])
            installed = time.monotonic()
            eventually(lambda: _all(harness.fleet(admin), wanted), timeout=180, interval=0.2)
            per_second = Counter(int(t) for t in subs)
            figures[how] = {
                "core_down_s": round(up - down, 2),
                "all_reconnected_after_up_s": round(reconnected - up, 2),
                "resubscriptions": len(subs),
                "peak_resubscriptions_per_s": _peak_per_second(subs),
                "busiest_wall_second": max(per_second.values()) if per_second else 0,
                "converged_after_install_s": round(time.monotonic() - installed, 2),
            }

        def behind() -> list[str]:
            status = _host_status(statuses)
            missing = [a["name"] for a in agents if a["name"] not in status]
            return missing + [
                n for n, s in status.items() if not s["alive"] or s["current"] != wanted
            ]

        # The agents' own view too (their status files lag by up to 0.25 s).
        with contextlib.suppress(AssertionError):
            eventually(lambda: not behind(), timeout=10)
        left_behind = behind()
        status = _host_status(statuses)
        figures["agent_reconnect_attempts"] = sum(int(s["reconnects"]) for s in status.values())  # type: ignore[call-overload]
        figures["left_behind"] = len(left_behind)
    finally:
        for proc in hosts:
            proc.send_signal(signal.SIGTERM)
        for proc in hosts:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        core.stop()
    figures["violations"] = len(left_behind)
    harness.record("fleet_restart", **figures)
    assert not left_behind, left_behind
