"""The install pipeline of the real core against a real package index (pypiserver on loopback)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from core.state.db import BlobRecord, open_database
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.conftest import INDEX_TOKEN
from tests.core_process import AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex, StaticIndex
from tests.wheelfactory import WheelSpec, build_sdist, build_wheel


def _point_at(admin: AdminClient, index: PackageIndex, token: str | None = None) -> None:
    req = apb.SetRegistryConfigRequest(index_url=index.url, timeout_seconds=10)
    if token is not None:
        req.auth_token = token
    admin.SetRegistryConfig(req)


def _allow(admin: AdminClient, *pins: tuple[str, str]) -> None:
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name=n, version=v) for n, v in pins])
    )


def _chain(wheel_dir: Path) -> dict[str, Path]:
    return {
        "alpha": build_wheel(WheelSpec("alpha", "1.0", requires=["beta==2.0"]), wheel_dir),
        "beta": build_wheel(WheelSpec("beta", "2.0", requires=["gamma>=1"]), wheel_dir),
        "gamma": build_wheel(WheelSpec("gamma", "1.5"), wheel_dir),
    }


def _blob_files(core: CoreProcess) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in (core.data_dir / "blobs").rglob("*.whl")}


def test_dependency_chain_publishes_verified_blobs(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheels = _chain(wheel_dir)
    admin = core.admin()
    _point_at(admin, package_index)
    _allow(admin, ("alpha", "1.0"))
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    manifest = admin.GetManifest(apb.AdminGetManifestRequest(lockfile_hash=state.lockfile_hash))
    got = {(e.name, e.version, e.requested) for e in manifest.entries}
    assert got == {("alpha", "1.0", True), ("beta", "2.0", False), ("gamma", "1.5", False)}
    for entry in manifest.entries:
        data = wheels[entry.name].read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.size == len(data) and entry.filename == wheels[entry.name].name
        blob = core.data_dir / "blobs" / entry.sha256[:2] / f"{entry.sha256}.whl"
        assert blob.read_bytes() == data
    assert state.total_bytes == sum(e.size for e in manifest.entries)

    # Same allowlist again: same hash, no new history row, and no blob written again.
    before = _blob_files(core)
    again = admin.install_and_wait()
    assert again.status == apb.INSTALL_STATUS_READY
    assert again.lockfile_hash == state.lockfile_hash
    assert _blob_files(core) == before
    assert len(admin.ListLockfiles().lockfiles) == 1
    assert not any((core.data_dir / "work").iterdir())  # scratch dirs are gone


def test_an_install_downloads_only_what_the_store_lacks(
    core: CoreProcess, static_index: StaticIndex
) -> None:
    packages = static_index.packages
    dep = build_wheel(WheelSpec("dep", "1.0"), packages)
    top1 = build_wheel(WheelSpec("top", "1.0", requires=["dep==1.0"]), packages)
    top2 = build_wheel(WheelSpec("top", "2.0", requires=["dep==1.0"]), packages)
    static_index.publish("dep", dep)
    static_index.publish("top", top1, top2)
    admin = core.admin()
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=static_index.url))
    _allow(admin, ("top", "1.0"))
    first = admin.install_and_wait()
    assert first.status == apb.INSTALL_STATUS_READY, first.error
    # The index still lists dep 1.0 but can no longer serve it: only the held blob can do.
    dep.unlink()
    _allow(admin, ("top", "2.0"))
    second = admin.install_and_wait()
    assert second.status == apb.INSTALL_STATUS_READY, second.error
    entries = admin.GetManifest(apb.AdminGetManifestRequest()).entries
    assert {(e.name, e.version) for e in entries} == {("top", "2.0"), ("dep", "1.0")}
    assert not any((core.data_dir / "work").iterdir())  # scratch dirs are gone


def _assert_failure_keeps_previous(admin: AdminClient, previous: str, *needles: str) -> str:
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_ERROR
    for needle in needles:
        assert needle in state.error, state.error
    assert state.lockfile_hash == previous
    current = admin.GetManifest(apb.AdminGetManifestRequest())
    assert current.lockfile_hash == previous
    return state.error


def test_failures_name_the_package_and_keep_the_previous_set(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path
) -> None:
    build_wheel(WheelSpec("good", "1.0"), wheel_dir)
    build_wheel(WheelSpec("winonly", "1.0", tag="cp311-cp311-win_amd64"), wheel_dir)
    build_sdist("sdistonly", "1.0", wheel_dir)
    build_wheel(
        WheelSpec("escaper", "1.0", extra_entries={"../evil.py": b"print('pwned')"}), wheel_dir
    )
    liar = WheelSpec("liar", "1.0")
    liar.record_overrides = {
        "liar/__init__.py": "sha256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA,5"
    }
    build_wheel(liar, wheel_dir)
    admin = core.admin()
    _point_at(admin, package_index)
    _allow(admin, ("good", "1.0"))
    good = admin.install_and_wait()
    assert good.status == apb.INSTALL_STATUS_READY, good.error

    _allow(admin, ("good", "1.0"), ("nosuchpkg", "1.0"))
    _assert_failure_keeps_previous(admin, good.lockfile_hash, "nosuchpkg")
    _allow(admin, ("good", "9.9"))
    _assert_failure_keeps_previous(admin, good.lockfile_hash, "good", "9.9")
    _allow(admin, ("winonly", "1.0"))
    _assert_failure_keeps_previous(admin, good.lockfile_hash, "winonly")
    _allow(admin, ("sdistonly", "1.0"))
    _assert_failure_keeps_previous(admin, good.lockfile_hash, "sdistonly", "sdist")
    _allow(admin, ("escaper", "1.0"))
    _assert_failure_keeps_previous(admin, good.lockfile_hash, "escaper", "..")
    _allow(admin, ("liar", "1.0"))
    _assert_failure_keeps_previous(admin, good.lockfile_hash, "liar", "RECORD")
    # Nothing from the refused wheels reached the blob store.
    names = {p.name for p in (core.data_dir / "blobs").rglob("*.whl")}
    assert len(names) == 1


def test_unreachable_index_and_concurrent_install_refused(core: CoreProcess) -> None:
    # A listener that accepts and never answers: pip waits for its timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        admin = core.admin()
        admin.SetRegistryConfig(
            apb.SetRegistryConfigRequest(
                index_url=f"http://127.0.0.1:{port}/simple", timeout_seconds=2
            )
        )
        _allow(admin, ("anything", "1.0"))
        admin.InstallNow(apb.InstallNowRequest())
        with pytest.raises(grpc.RpcError) as err:
            admin.InstallNow(apb.InstallNowRequest())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already running" in (err.value.details() or "")
        state = eventually(
            lambda: (s := admin.GetInstallState()).status != apb.INSTALL_STATUS_INSTALLING and s,
            timeout=90,
        )
    assert state.status == apb.INSTALL_STATUS_ERROR
    assert "127.0.0.1" in state.error
    assert state.lockfile_hash == ""


def test_size_cap_warns_and_blocks(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path
) -> None:
    big = WheelSpec("big", "1.0", files={"big/data.bin": os.urandom(64 * 1024)})
    size = build_wheel(big, wheel_dir).stat().st_size
    admin = core.admin()
    _point_at(admin, package_index)
    _allow(admin, ("big", "1.0"))
    admin.SetSizeCap(apb.SizeCap(warn_bytes=size, block_bytes=size * 2))
    assert not admin.install_and_wait().warnings  # exactly warn: fine
    admin.SetPackageEnabled(apb.SetPackageEnabledRequest(name="big", enabled=False))
    empty = admin.install_and_wait()
    admin.SetPackageEnabled(apb.SetPackageEnabledRequest(name="big", enabled=True))
    admin.SetSizeCap(apb.SizeCap(warn_bytes=size - 1, block_bytes=size))
    warned = admin.install_and_wait()  # exactly block: only a warning
    assert warned.status == apb.INSTALL_STATUS_READY and "warn limit" in warned.warnings[0]
    admin.SetPackageEnabled(apb.SetPackageEnabledRequest(name="big", enabled=False))
    assert admin.install_and_wait().lockfile_hash == empty.lockfile_hash
    admin.SetPackageEnabled(apb.SetPackageEnabledRequest(name="big", enabled=True))
    admin.SetSizeCap(apb.SizeCap(warn_bytes=size - 2, block_bytes=size - 1))
    error = _assert_failure_keeps_previous(admin, empty.lockfile_hash, "block limit")
    assert str(size) in error and str(size - 1) in error


def _watch_argv(stop: threading.Event, seen: list[str]) -> None:
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError):
                    seen.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
        time.sleep(0.005)


def test_token_protected_index_and_secret_hygiene(
    core: CoreProcess, auth_package_index: PackageIndex, wheel_dir: Path
) -> None:
    _chain(wheel_dir)
    admin = core.admin()
    _point_at(admin, auth_package_index)
    _allow(admin, ("alpha", "1.0"))
    refused = admin.install_and_wait()
    assert refused.status == apb.INSTALL_STATUS_ERROR
    assert "401" in refused.error or "credentials" in refused.error

    _point_at(admin, auth_package_index, token="wrong-token-value")
    refused = admin.install_and_wait()
    assert refused.status == apb.INSTALL_STATUS_ERROR and "wrong-token-value" not in refused.error

    stop, seen = threading.Event(), list[str]()
    watcher = threading.Thread(target=_watch_argv, args=(stop, seen), daemon=True)
    watcher.start()
    try:
        _point_at(admin, auth_package_index, token=INDEX_TOKEN)
        state = admin.install_and_wait()
    finally:
        stop.set()
        watcher.join()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    assert any("compile" in argv and "--python-platform" in argv for argv in seen), "no uv seen"
    assert not any(INDEX_TOKEN in argv for argv in seen)
    assert INDEX_TOKEN not in core.log()
    assert INDEX_TOKEN not in str(admin.GetRegistryConfig())
    for path in core.data_dir.rglob("*"):
        if path.is_file():
            assert INDEX_TOKEN.encode() not in path.read_bytes(), path


def test_target_environment_is_configurable(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path
) -> None:
    build_wheel(WheelSpec("winonly", "1.0", tag="cp311-cp311-win_amd64"), wheel_dir)
    admin = core.admin()
    _point_at(admin, package_index)
    _allow(admin, ("winonly", "1.0"))
    assert admin.install_and_wait().status == apb.INSTALL_STATUS_ERROR  # native: no wheel
    target = apb.SetRegistryConfigRequest()
    target.target.python_version = "3.11"
    target.target.implementation = "cp"
    target.target.abi = "cp311"
    target.target.platform = "win_amd64"
    cfg = admin.SetRegistryConfig(target)
    assert cfg.target.platform == "win_amd64"
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    manifest = admin.GetManifest(apb.AdminGetManifestRequest())
    assert manifest.environment.platform == "win_amd64"
    assert [e.filename for e in manifest.entries] == ["winonly-1.0-cp311-cp311-win_amd64.whl"]
    bad = apb.SetRegistryConfigRequest()
    bad.target.python_version = "three"
    bad.target.platform = "win_amd64"
    with pytest.raises(grpc.RpcError) as err:
        admin.SetRegistryConfig(bad)
    assert (err.value.details() or "").startswith("target.python_version")


def test_blob_without_index_row_gets_one(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path
) -> None:
    _chain(wheel_dir)
    admin = core.admin()
    _point_at(admin, package_index)
    _allow(admin, ("alpha", "1.0"))
    assert admin.install_and_wait().status == apb.INSTALL_STATUS_READY
    open_database(core.data_dir)
    assert BlobRecord.delete().execute() == 3  # e.g. blobs restored from a backup by hand
    assert admin.install_and_wait().status == apb.INSTALL_STATUS_READY
    rows = {(r.sha256, r.backend) for r in BlobRecord.select()}
    assert len(rows) == 3 and {b for _, b in rows} == {"filesystem"}


def test_a_wheel_whose_metadata_names_another_project_is_refused(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path
) -> None:
    liar = build_wheel(WheelSpec("honest", "1.0", metadata_name="other"), wheel_dir)
    admin = core.admin()
    _point_at(admin, package_index)
    _allow(admin, ("honest", "1.0"))
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_ERROR
    assert liar.name in state.error and "'other'" in state.error and "'honest'" in state.error
    assert "METADATA Name must match the wheel filename" in state.error
    assert admin.ListReleases().releases == []  # nothing published
