"""Binary deltas end to end: a real core and real satellites on loopback (issue 17).

A ~1.5 MiB wheel whose next version shares most bytes is upgraded: the satellite must use a
patch (bytes on the wire far below the wheel's, as ReportSyncState and ListSatellites show), build
the right tree, fall back to the whole wheel (and say so) when the stored patch is tampered with,
and an agent that never asks for deltas (as older agents) still gets whole wheels.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import textwrap
from pathlib import Path

import pytest

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel

PAYLOAD = os.urandom(1536 * 1024)  # incompressible: the wheel is ~1.5 MiB, the same in each


@pytest.fixture
def core(package_index: PackageIndex, core: CoreProcess) -> CoreProcess:
    core.admin().SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    return core


def _big(version: str, wheel_dir: Path) -> Path:
    files = {
        "bigpkg/__init__.py": f"VERSION = {version!r}\n".encode(),
        "bigpkg/payload.bin": PAYLOAD,
    }
    return build_wheel(WheelSpec("bigpkg", version, files=files), wheel_dir)


def _install(admin: AdminClient, version: str) -> str:
    return admin.install_pins(("bigpkg", version))


def _converged(sat: SatelliteProcess, wanted: str) -> apb.Satellite:
    def check() -> apb.Satellite | None:
        row = sat.fleet_row()
        assert row.status != "error", f"{sat.name}: {row.error}\n{sat.log()[-3000:]}"
        done = row.current_hash == wanted and row.status == "ready" and sat.current() == wanted
        return row if done else None

    return eventually(check, timeout=90, interval=0.2)


def _tree_is(sat: SatelliteProcess, tmp_path: Path, version: str) -> None:
    script = tmp_path / f"check-{version}.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import hashlib, importlib.resources, bigpkg
            data = importlib.resources.files("bigpkg").joinpath("payload.bin").read_bytes()
            assert bigpkg.VERSION == {version!r}, bigpkg.VERSION
            print(hashlib.sha256(data).hexdigest())
            """
        )
    )
    out = sat.run(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hashlib.sha256(PAYLOAD).hexdigest()


def _ready_patches(core: CoreProcess) -> list[tuple[str, str]]:
    """(target, patch sha256) of every stored patch, read from the core's database."""
    db = sqlite3.connect(core.data_dir / "core.sqlite3", timeout=10)
    try:
        rows = db.execute(
            "SELECT target_sha256, patch_sha256 FROM deltapatch WHERE status = 'ready'"
        ).fetchall()
    finally:
        db.close()
    return [(str(t), str(p)) for t, p in rows]


def test_upgrade_uses_a_patch_and_a_tampered_patch_falls_back(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    wheels = {v: _big(v, wheel_dir) for v in ("1.0", "2.0", "3.0")}
    admin = core.admin()
    first = _install(admin, "1.0")
    # Told to wait for patches as a host on a slow link would (on loopback, left to measure
    # its link, it would rightly pull the wheel rather than wait for the computation).
    sat = SatelliteProcess(core, "sat-delta", tmp_path, "--delta-wait", "30").register().start()
    old = SatelliteProcess(core, "sat-old", tmp_path, "--no-deltas").register().start()
    satellites += [sat, old]
    row = _converged(sat, first)
    assert row.last_pull_patches == 0 and row.last_pull_bytes == wheels["1.0"].stat().st_size
    _converged(old, first)
    state = json.loads((old.data_dir / "state.json").read_text())
    assert state["pull_bytes_per_second"] > 0  # measured on the first pull, kept for restarts

    # 1.0 -> 2.0: the core computes the patch after the publish; the satellite waits for it.
    second = _install(admin, "2.0")
    row = _converged(sat, second)
    size = wheels["2.0"].stat().st_size
    assert row.last_pull_blobs == 1 and row.last_pull_patches == 1, sat.log()[-2000:]
    assert row.last_wheel_bytes == size
    assert row.last_pull_bytes < size // 20, (row.last_pull_bytes, size)  # << the wheel
    _tree_is(sat, tmp_path, "2.0")
    eventually(lambda: "1 from patches" in sat.log(), timeout=10)  # logged after the report

    # An agent that never calls GetDeltas (as agents before it) pulls the whole wheel.
    row_old = _converged(old, second)
    assert row_old.last_pull_patches == 0
    assert row_old.last_pull_bytes == size == row_old.last_wheel_bytes
    _tree_is(old, tmp_path, "2.0")

    # 2.0 -> 3.0 with the stored patch tampered with (same size, one byte flipped): the
    # satellite's check of the patch's own sha256 refuses it, and it pulls the whole wheel.
    sat.stop()
    third = _install(admin, "3.0")
    target = hashlib.sha256(wheels["3.0"].read_bytes()).hexdigest()
    patch = eventually(
        lambda: next((p for t, p in _ready_patches(core) if t == target), None), timeout=60
    )
    blob = core.data_dir / "blobs" / patch[:2] / f"{patch}.whl"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    sat.start()
    row = _converged(sat, third)
    assert row.last_pull_patches == 0
    assert row.last_wheel_bytes == wheels["3.0"].stat().st_size
    assert row.last_pull_bytes >= row.last_wheel_bytes  # the whole wheel (plus the bad patch)
    _tree_is(sat, tmp_path, "3.0")
    assert "falling back to the whole wheel" in sat.log()  # logged during the pull
    # The sync's result line comes after the flip and its GC passes.
    eventually(lambda: "1 patch(es) fell back to the whole wheel" in sat.log(), timeout=10)


def test_core_without_deltas_serves_whole_wheels(
    package_index: PackageIndex, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    core = CoreProcess(tmp_path / "core-nodelta")
    core.extra_args = ["--no-deltas"]
    core.start()
    try:
        core.admin().SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        wheels = {v: _big(v, wheel_dir) for v in ("1.0", "2.0")}
        admin = core.admin()
        first = _install(admin, "1.0")
        sat = SatelliteProcess(core, "sat-x", tmp_path).register().start()
        satellites.append(sat)
        _converged(sat, first)
        second = _install(admin, "2.0")
        row = _converged(sat, second)
        assert row.last_pull_patches == 0
        assert row.last_pull_bytes == wheels["2.0"].stat().st_size
        assert not _ready_patches(core)
    finally:
        core.stop()


def _store_bytes(data_dir: Path) -> int:
    """blobs/ + pkgs/ as --max-store-bytes counts them (wheels and unpacked files)."""
    total = sum(p.stat().st_size for p in (data_dir / "blobs").glob("??/*.whl"))
    for marker in (data_dir / "pkgs").glob("*/.spk-complete"):
        site = marker.parent / "site-packages"
        total += sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    return total


def test_store_stays_under_the_cap_over_many_upgrades_and_each_uses_a_patch(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    versions = [f"1.{i}" for i in range(8)]
    wheels = {v: _big(v, wheel_dir) for v in versions}
    unit = 2 * wheels["1.0"].stat().st_size  # one version: its blob and its unpacked files
    cap = int(2.5 * unit)  # current + a base; trees within grace must make room
    admin = core.admin()
    first = _install(admin, versions[0])
    sat = SatelliteProcess(
        core,
        "sat-bound",
        tmp_path,
        "--no-drift-watch",
        "--max-store-bytes",
        str(cap),
        "--delta-wait",
        "30",
    )
    satellites.append(sat.register().start())
    _converged(sat, first)
    for version in versions[1:]:
        wanted = _install(admin, version)
        row = _converged(sat, wanted)
        assert row.last_pull_patches == 1, (version, sat.log()[-2000:])
        assert row.last_pull_bytes < row.last_wheel_bytes // 20
        # The store GC pass runs right after the flip's report: wait for it, then measure.
        eventually(lambda: _store_bytes(sat.data_dir) <= cap, timeout=20)
    _tree_is(sat, tmp_path, versions[-1])
    eventually(lambda: "store GC removed" in sat.log(), timeout=10)
