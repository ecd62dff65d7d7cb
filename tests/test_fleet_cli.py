"""Watching a rollout: `spk-core admin install --wait-fleet`, `satellites list`, `status`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from core.api.admin_service import fleet_summary
from core.app.fleet_view import (
    FleetCounts,
    environment_lines,
    satellites_table,
    state_of,
    wait_fleet,
)
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import ADMIN_TOKEN, CoreProcess
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel

H1, H2 = "1" * 64, "2" * 64


def _admin_cli(
    core: CoreProcess, tmp_path: Path
) -> Callable[..., subprocess.CompletedProcess[str]]:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_")}

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "core.app.cli", "admin", "--core", core.target,
             "--token-file", str(token_file), *args],
            capture_output=True, text=True, timeout=180, env=env,
        )  # fmt: skip

    return admin


def test_install_waits_for_the_fleet_and_names_who_did_not_converge(
    core: CoreProcess,
    package_index: PackageIndex,
    wheel_dir: Path,
    tmp_path: Path,
    satellites: list[SatelliteProcess],
) -> None:
    for version in ("1.0", "2.0"):
        build_wheel(WheelSpec("alpha", version), wheel_dir)
    admin = _admin_cli(core, tmp_path)
    assert admin("registry", "set", "--index-url", package_index.url).returncode == 0
    assert admin("packages", "add", "alpha==1.0").returncode == 0
    up = SatelliteProcess(core, "host-up", tmp_path).register()
    SatelliteProcess(core, "host-down", tmp_path).register()  # registered, never started
    satellites.append(up.start())

    waited = admin("install", "--wait-fleet", "--timeout", "15")
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert "status=ready" in waited.stdout
    assert "fleet: 1 converged, 0 syncing, 0 error, 1 offline (of 2)" in waited.stdout
    assert "1 of 2 satellites did not converge within 15 s" in waited.stderr
    assert "host-down (" in waited.stderr and "offline, last seen never" in waited.stderr
    assert "host-up" not in waited.stderr

    table = admin("satellites", "list").stdout.splitlines()
    assert table[0].split() == [
        "NAME", "ENVIRONMENT", "CURRENT", "DESIRED", "STATE", "LAST", "SEEN", "LAST", "ERROR"
    ]  # fmt: skip
    fleet_at = next(i for i, line in enumerate(table) if line.startswith("fleet: "))
    row = {line.split()[0]: line.split() for line in table[1:fleet_at]}
    assert row["host-up"][4] == "converged" and row["host-up"][5] == "connected"
    # The core counts per environment; host-down never reported, so it is neither of the three.
    assert table[fleet_at + 1 :] == ["  default        1 converged, 0 syncing, 0 error, 1 other"]
    assert row["host-down"][4] == "offline" and "never" in row["host-down"]
    listed = json.loads(admin("--json", "satellites", "list").stdout)
    assert {s["name"] for s in listed["satellites"]} == {"host-up", "host-down"}

    assert admin("satellites", "revoke", "host-down").returncode == 0
    assert admin("packages", "add", "alpha==2.0").returncode == 0
    second = admin("install", "--wait-fleet", "--timeout", "60")
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.strip().endswith(
        "fleet: 1 converged, 0 syncing, 0 error, 0 offline (of 1)"
    )

    screen = admin("status")
    assert screen.returncode == 0, screen.stderr
    text = screen.stdout
    assert "desired release  2" in text and "install          ready" in text
    assert "fleet            1 converged" in text and "storage          filesystem (active)" in text
    assert "gc " in text
    doc = json.loads(admin("--json", "status").stdout)
    assert set(doc) == {"install", "releases", "satellites", "backends", "migration", "gc"}
    assert doc["install"]["status"] == "INSTALL_STATUS_READY"


def test_a_failed_install_exits_before_waiting_for_the_fleet(
    core: CoreProcess, package_index: PackageIndex, tmp_path: Path
) -> None:
    admin = _admin_cli(core, tmp_path)
    assert admin("registry", "set", "--index-url", package_index.url).returncode == 0
    assert admin("packages", "add", "nothere==1.0").returncode == 0
    failed = admin("install", "--wait-fleet", "--timeout", "600")
    assert failed.returncode == 1 and "status=error" in failed.stdout
    assert "fleet:" not in failed.stdout


def _sat(name: str, status: str, current: str, desired: str, **kw: object) -> apb.Satellite:
    return apb.Satellite(name=name, status=status, current_hash=current, desired_hash=desired, **kw)  # type: ignore[arg-type]


def test_states_and_the_wait_loop() -> None:
    fleet = [
        _sat("a", "ready", H2, H2, connected=True, environment="default"),
        _sat("b", "ready", H2, H2),  # converged though offline: it runs the release
        _sat("c", "error", H1, H2, connected=True, error="blob 1111: sha256 mismatch"),
        _sat("d", "ready", H1, H2, connected=True),  # not told yet: syncing
        _sat("e", "syncing", H1, H2, last_seen_unix=1),
        _sat("f", "unserved", "", "", unserved=True, connected=True),
        _sat("g", "ready", H1, H2, revoked=True),
    ]
    assert [state_of(s) for s in fleet[:6]] == [
        "converged", "converged", "error", "syncing", "offline", "unserved"
    ]  # fmt: skip
    counts = FleetCounts.of(fleet)
    assert counts.total == 6
    assert counts.line() == "2 converged, 1 syncing, 1 error, 1 offline, 1 unserved (of 6)"
    table = satellites_table(apb.ListSatellitesResponse(satellites=fleet), now=100)
    assert "sha256 mismatch" in table and "revoked" in table and "1m ago" in table

    replies = iter([fleet, fleet, [*fleet[:2]]])
    ticks = iter(range(100))
    out, err = io.StringIO(), io.StringIO()
    code = wait_fleet(
        lambda: apb.ListSatellitesResponse(satellites=next(replies)),
        timeout=10,
        out=out,
        err=err,
        clock=lambda: float(next(ticks)),
        sleep=lambda _s: None,
    )
    assert code == 0 and out.getvalue().splitlines()[-1].startswith("fleet: 2 converged")
    assert len(out.getvalue().splitlines()) == 2  # an unchanged line is not printed again

    err = io.StringIO()
    code = wait_fleet(
        lambda: apb.ListSatellitesResponse(satellites=fleet),
        timeout=3,
        out=io.StringIO(),
        err=err,
        clock=lambda: float(next(ticks)),
        sleep=lambda _s: None,
    )
    assert code == 1
    report = err.getvalue()
    assert "4 of 6 satellites did not converge within 3 s" in report
    assert "c (no environment): error: blob 1111: sha256 mismatch" in report
    assert "e (no environment): offline, last seen" in report
    assert "f (no environment): unserved" in report


def test_the_fleet_is_counted_per_environment() -> None:
    fleet = [
        _sat("a", "ready", H2, H2, environment="default"),
        _sat("b", "syncing", H1, H2, environment="default", connected=True),
        _sat("c", "error", H1, H2, environment="default", connected=True),
        _sat("d", "ready", H1, H2, environment="default"),  # offline on an older release: other
        _sat("e", "ready", H2, H2, environment="arm"),
        _sat("f", "syncing", "", H2, environment="arm", connected=True),
        _sat("g", "unserved", "", "", unserved=True),
        _sat("h", "unserved", "", "", unserved=True),
        _sat("i", "ready", H1, H2, environment="arm", revoked=True),  # not counted
    ]
    summary = fleet_summary(fleet)
    assert [
        (r.environment, r.converged, r.syncing, r.error, r.unserved, r.other) for r in summary
    ] == [
        ("", 0, 0, 0, 2, 0),
        ("arm", 1, 1, 0, 0, 0),
        ("default", 1, 1, 1, 0, 1),
    ]
    assert environment_lines(summary) == [
        "  (unserved)     2 unserved",
        "  arm            1 converged, 1 syncing, 0 error",
        "  default        1 converged, 1 syncing, 1 error, 1 other",
    ]
    listed = satellites_table(apb.ListSatellitesResponse(satellites=fleet, summary=summary), 100)
    assert listed.splitlines()[-4:] == [
        "fleet: 2 converged, 2 syncing, 1 error, 1 offline, 2 unserved (of 8)"
    ] + [line.rstrip() for line in environment_lines(summary)]


def test_fleet_progress_is_one_live_line_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    steps = iter([[_sat("a", "syncing", H1, H2, connected=True)], [_sat("a", "ready", H2, H2)]])
    code = wait_fleet(
        lambda: apb.ListSatellitesResponse(satellites=next(steps)),
        timeout=10,
        out=out,
        sleep=lambda _s: None,
    )
    assert code == 0
    assert out.getvalue().count("\r\033[K") == 2 and out.getvalue().endswith("\n")
