"""Rollback and blob GC end to end: the real core, a real package index and a real satellite.

A satellite flips back on Rollback (the re-published manifest has a higher sequence, which its
replay guard accepts); GC keeps exactly what rollback may need; a pruned or blob-less lockfile is
refused with the right code and a message naming what is missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel


@pytest.fixture
def core(tmp_path: Path, package_index: PackageIndex) -> Iterator[CoreProcess]:
    proc = CoreProcess(tmp_path / "core")
    # Grace 0 so this test can watch GC delete; no schedule so only our calls run it.
    proc.extra_args = ["--gc-keep", "1", "--gc-grace-hours", "0", "--gc-interval-hours", "0"]
    proc.start()
    proc.admin().SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    yield proc
    proc.stop()


def _install(admin: AdminClient, name: str) -> str:
    admin.SetPackages(apb.SetPackagesRequest(packages=[apb.PackageSpec(name=name, version="1.0")]))
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    return str(state.lockfile_hash)


def _on(sat: SatelliteProcess, wanted: str) -> None:
    def check() -> bool:
        row = sat.fleet_row()
        assert row.status != "error", f"{row.error}\n{sat.log()[-2000:]}"
        return row.status == "ready" and sat.current() == wanted

    eventually(check, timeout=60, interval=0.2)


def _refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    assert err.value.code() == code, err.value.details()
    return err.value.details() or ""


def test_rollback_flips_the_fleet_back_and_gc_keeps_what_rollback_needs(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path
) -> None:
    wheels = {n: build_wheel(WheelSpec(n, "1.0"), wheel_dir) for n in ("aa", "bb", "cc")}
    sha = {n: hashlib.sha256(w.read_bytes()).hexdigest() for n, w in wheels.items()}
    admin = core.admin()
    first = _install(admin, "aa")
    sat = SatelliteProcess(core, "sat-rb", tmp_path).register().start()
    try:
        _on(sat, first)
        second = _install(admin, "bb")
        _on(sat, second)

        state = admin.Rollback(apb.RollbackRequest(lockfile_hash=first))
        assert state.lockfile_hash == first and state.status == apb.INSTALL_STATUS_READY
        _on(sat, first)  # the satellite accepted the re-signed, higher-sequence manifest
        history = {lf.lockfile_hash: lf for lf in admin.ListLockfiles().lockfiles}
        assert history[first].current and history[first].sequence > history[second].sequence
        assert admin.Rollback(apb.RollbackRequest(lockfile_hash=first)).lockfile_hash == first
        details = _refused(
            lambda: admin.Rollback(apb.RollbackRequest(lockfile_hash="ab" * 32)),
            grpc.StatusCode.NOT_FOUND,
        )
        assert "ab" * 32 in details

        third = _install(admin, "cc")
        _on(sat, third)
        # Kept: the desired (third) and the newest previous, which is `first` after the rollback.
        dry = admin.GcBlobs(apb.GcBlobsRequest(dry_run=True))
        assert dry.dry_run and list(dry.deleted_sha256) == [sha["bb"]]
        assert list(dry.kept_lockfiles) == [third, first]
        assert len(admin.ListLockfiles().lockfiles) == 3  # a dry run changes nothing
        run = admin.GcBlobs(apb.GcBlobsRequest())
        assert list(run.deleted_sha256) == [sha["bb"]] and run.deleted == 1
        assert run.bytes_reclaimed == wheels["bb"].stat().st_size and run.pruned_lockfiles == 1
        assert {lf.lockfile_hash for lf in admin.ListLockfiles().lockfiles} == {first, third}
        gc_state = admin.GetBlobGcState()
        assert gc_state.last_run.deleted == 1 and gc_state.total_deleted == 1
        assert gc_state.keep_previous == 1 and gc_state.interval_seconds == 0

        details = _refused(
            lambda: admin.Rollback(apb.RollbackRequest(lockfile_hash=second)),
            grpc.StatusCode.NOT_FOUND,
        )
        # A kept lockfile whose blob went missing (disk loss): refused, naming the blob.
        blob = core.data_dir / "blobs" / sha["aa"][:2] / f"{sha['aa']}.whl"
        blob.unlink()
        details = _refused(
            lambda: admin.Rollback(apb.RollbackRequest(lockfile_hash=first)),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert "aa==1.0" in details and sha["aa"] in details
        assert admin.GetInstallState().lockfile_hash == third  # nothing changed
        _on(sat, third)
    finally:
        sat.stop()
