"""The hostile corpus of tests/test_wheels.py, end to end, at the core and at the satellite.

Defence in depth: every wheel of the hostile corpus, injected straight into the core's blob
store under a validly signed manifest (an attacker with the store AND the signing key), is still
refused by the satellite at unpack time, with nothing written outside its target."""

from __future__ import annotations

import shutil
from pathlib import Path

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests import core_tamper
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.test_wheels import HOSTILE


def _outside_target(sat: SatelliteProcess) -> set[str]:
    """Every path in the data dir except the package cache (where unpacking happens)."""
    return {
        str(p.relative_to(sat.data_dir))
        for p in sat.data_dir.rglob("*")
        if not str(p.relative_to(sat.data_dir)).startswith(("pkgs", "blobs"))
        and p.name != "state.json"
        and not p.name.startswith(".tmp-state.json")  # its atomic write, caught mid-way once
    }


def test_hostile_corpus_is_refused_by_the_satellite(tmp_path: Path) -> None:
    core = CoreProcess(tmp_path / "core")
    core.extra_args = ["--desired-poll-seconds", "0.2"]
    core.start()
    # No retry of a refused sync while the data dir is compared: it would unpack in staging/.
    sat = SatelliteProcess(
        core, "sat-hostile", tmp_path, "--retry-base", "3600", "--retry-cap", "3600"
    )
    try:
        baseline = core_tamper.publish_signed(core.data_dir, [])
        sat.register().start()
        eventually(lambda: sat.current() == baseline, timeout=60)
        before = _outside_target(sat)
        escaped = tmp_path / "dest-evil"
        for case, builder, _match in HOSTILE:
            (tmp_path / "corpus" / case).mkdir(parents=True)
            wheel = builder(tmp_path / "corpus" / case)
            entry = core_tamper.put_blob(core.data_dir, wheel)
            wanted = core_tamper.publish_signed(core.data_dir, [entry])

            def refused(blob: str = entry.sha256[:12]) -> str | None:
                row = sat.fleet_row()
                ok = row.status == "error" and blob in row.error
                return str(row.error) if ok else None

            error = eventually(refused, timeout=60, interval=0.1)
            assert entry.filename in error and wanted, (case, error)
            assert sat.current() == baseline, case
            assert not list((sat.data_dir / "pkgs").glob(f"{entry.sha256}*")), case
            assert _outside_target(sat) == before, case
            assert not escaped.exists() and not Path("/abs").exists(), case
    finally:
        sat.stop()
        core.stop()


def test_hostile_corpus_is_refused_by_the_core(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    core = CoreProcess(tmp_path / "core").start()
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        admin.SetPackages(
            apb.SetPackagesRequest(packages=[apb.PackageSpec(name="demo", version="1.0")])
        )
        for case, builder, _match in HOSTILE:
            (tmp_path / "corpus" / case).mkdir(parents=True)
            wheel = builder(tmp_path / "corpus" / case)
            for old in wheel_dir.iterdir():
                old.unlink()
            shutil.copyfile(wheel, wheel_dir / wheel.name)
            state = admin.install_and_wait()
            assert state.status == apb.INSTALL_STATUS_ERROR, case
            assert "demo" in state.error, (case, state.error)
            assert state.lockfile_hash == "", case  # nothing was ever published
            assert not list((core.data_dir / "blobs").rglob("*.whl")), case
            assert not (tmp_path / "dest-evil").exists() and not Path("/abs").exists(), case
    finally:
        core.stop()
