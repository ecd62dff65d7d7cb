"""Signed manifests and hostile content, end to end: the satellite accepts only what the pinned
signing key vouches for, whatever the core's database or blob store says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.manifest import Manifest
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.signing import public_key_pem
from tests import core_tamper
from tests.core_process import AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel


@pytest.fixture
def core(package_index: PackageIndex, core: CoreProcess) -> CoreProcess:
    """The conftest core with the test index as registry (the index outlives the core)."""
    core.admin().SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    return core


def _install(admin: AdminClient, *pins: tuple[str, str]) -> str:
    specs = [apb.PackageSpec(name=n, version=v) for n, v in pins]
    admin.SetPackages(apb.SetPackagesRequest(packages=specs))
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    return str(state.lockfile_hash)


def _start(
    core: CoreProcess, tmp_path: Path, satellites: list[SatelliteProcess], name: str
) -> SatelliteProcess:
    sat = SatelliteProcess(core, name, tmp_path).register().start()
    satellites.append(sat)
    return sat


def _at(sat: SatelliteProcess, wanted: str) -> None:
    eventually(lambda: sat.current() == wanted and sat.fleet_row().status == "ready", timeout=60)


def _refused(sat: SatelliteProcess, *needles: str) -> str:
    def check() -> str | None:
        row = sat.fleet_row()
        ok = row.status == "error" and all(n in row.error for n in needles)
        return str(row.error) if ok else None

    return eventually(check, timeout=60)


def test_wrong_pinned_key_is_refused(
    core: CoreProcess, tmp_path: Path, satellites: list[SatelliteProcess]
) -> None:
    wanted = _install(core.admin())
    sat = SatelliteProcess(core, "sat-k", tmp_path).register()
    sat.key_file.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    satellites.append(sat.start())
    _refused(sat, "expected the pinned key")
    assert sat.current() is None and wanted


def test_tampered_unsigned_and_replayed_manifests_are_refused(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    build_wheel(WheelSpec("alpha", "2.0"), wheel_dir)
    build_wheel(WheelSpec("beta", "1.0"), wheel_dir)
    admin = core.admin()
    first = _install(admin, ("alpha", "1.0"))
    sat = _start(core, tmp_path, satellites, "sat-t")
    _at(sat, first)
    second = _install(admin, ("alpha", "2.0"))
    _at(sat, second)

    # Replay: the database points back at an older, validly signed manifest (lower sequence).
    core_tamper.make_desired(core.data_dir, first)
    _refused(sat, "below the highest")
    assert sat.current() == second

    # Tampered entry: the stored manifest of a new desired set names another blob.
    sat.stop()
    third = _install(admin, ("alpha", "2.0"), ("beta", "1.0"))
    other = admin.GetManifest(apb.AdminGetManifestRequest(lockfile_hash=first)).entries[0]

    def swap_blob(m: Manifest) -> Manifest:
        entries = tuple(
            dataclasses.replace(e, sha256=other.sha256, size=other.size) if e.name == "beta" else e
            for e in m.entries
        )
        return dataclasses.replace(m, entries=entries)

    core_tamper.rewrite_desired(core.data_dir, swap_blob)
    sat.start()
    _refused(sat, "not to its lockfile hash")
    assert sat.current() == second

    # Unsigned: a new desired set whose stored manifest lost its signature.
    sat.stop()
    _install(admin, ("alpha", "1.0"), ("beta", "1.0"))
    core_tamper.rewrite_desired(
        core.data_dir, lambda m: dataclasses.replace(m, signature=b"", signing_key_id="")
    )
    sat.start()
    _refused(sat, "unsigned")
    assert sat.current() == second and third


def test_hostile_admin_input_changes_nothing(core: CoreProcess) -> None:
    admin = core.admin()
    huge = apb.SetPackagesRequest(
        packages=[apb.PackageSpec(name=f"p{i}", version="1.0") for i in range(2_001)]
    )
    with pytest.raises(grpc.RpcError) as err:
        admin.SetPackages(huge)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 2000" in (err.value.details() or "")
    for name in ("a\nb", "x" * 129, "é", "a;rm -rf /"):
        with pytest.raises(grpc.RpcError) as err:
            admin.AddPackage(apb.AddPackageRequest(name=name, version="1.0"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        admin.SetRegistryConfig(
            apb.SetRegistryConfigRequest(index_url="https://me:hunter2@index.example/simple")
        )
    assert "credentials" in (err.value.details() or "") and "hunter2" not in (
        err.value.details() or ""
    )
    assert admin.ListPackages().packages == []
    assert admin.GetRegistryConfig().index_url.startswith("http://127.0.0.1")
