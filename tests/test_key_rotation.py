"""Rotating the manifest signing key and admin tokens (the procedure in docs/security.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel


def _cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "core.app.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _install(core: CoreProcess, name: str, version: str) -> str:
    admin = core.admin()
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name=name, version=version)])
    )
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    return str(state.lockfile_hash)


def test_signing_key_rotation_with_overlap(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    build_wheel(WheelSpec("alpha", "2.0"), wheel_dir)
    core = CoreProcess(tmp_path / "core").start()
    both = SatelliteProcess(core, "sat-both", tmp_path / "a")
    old_only = SatelliteProcess(core, "sat-old", tmp_path / "b")
    try:
        core.admin().SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        first = _install(core, "alpha", "1.0")
        old_pem = _cli("signing-key", "export", "--data-dir", str(core.data_dir))
        for sat in (both, old_only):
            sat.data_dir.parent.mkdir(parents=True)
            sat.register().start()
        eventually(lambda: both.current() == first and old_only.current() == first, timeout=60)

        # 1. pin old + new on the satellites; 2. rotate on the core and restart it.
        core.stop()
        new_pem = _cli("signing-key", "rotate", "--data-dir", str(core.data_dir))
        assert new_pem != old_pem
        both.stop()
        both.key_file.write_text(old_pem + new_pem)
        both.start()
        core.start()
        assert _cli("signing-key", "export", "--data-dir", str(core.data_dir)) == new_pem
        second = _install(core, "alpha", "2.0")
        eventually(lambda: both.current() == second, timeout=60)
        row = eventually(
            lambda: (r := old_only.fleet_row()).status == "error" and "pinned key" in r.error and r,
            timeout=60,
        )
        assert row.error
        assert old_only.current() == first
    finally:
        both.stop()
        old_only.stop()
        core.stop()


def test_admin_tokens_list_and_revoke(tmp_path: Path) -> None:
    core = CoreProcess(tmp_path / "core").start()
    try:
        data = str(core.data_dir)
        token = _cli("admin-token", "create", "--role", "read", "--label", "ci", "--data-dir", data)
        token = token.strip()
        assert core.admin(token=token).ListPackages().packages == []
        listing = _cli("admin-token", "list", "--data-dir", data)
        assert token not in listing
        line = next(ln for ln in listing.splitlines() if ln.rstrip().endswith("ci"))
        _cli("admin-token", "revoke", line.split()[0], "--data-dir", data)
        with pytest.raises(grpc.RpcError) as err:
            core.admin(token=token).ListPackages()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        core.stop()
