"""The admin surface of the real core process: auth, allowlist rules, registry config, size cap."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess


def _code(call: object) -> grpc.StatusCode:
    assert isinstance(call, grpc.RpcError)
    return call.code()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.app.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_health_reports_serving(core: CoreProcess) -> None:
    with grpc.insecure_channel(core.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "scriptpkgs.v1.PackageAdmin"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_auth_missing_wrong_and_read_tokens(core: CoreProcess) -> None:
    with pytest.raises(grpc.RpcError) as err:
        core.admin(token="").ListPackages()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        core.admin(token="spk_admin_not-a-real-token").ListPackages()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    created = _cli("admin-token", "create", "--role", "read", "--data-dir", str(core.data_dir))
    assert created.returncode == 0, created.stderr
    read_token = created.stdout.strip()
    assert read_token.startswith("spk_admin_")
    reader = core.admin(token=read_token)
    assert reader.ListPackages().packages == []
    with pytest.raises(grpc.RpcError) as err:
        reader.AddPackage(apb.AddPackageRequest(name="six", version="1.17.0"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "manage" in (err.value.details() or "")
    assert reader.ListPackages().packages == []  # the refused call changed nothing
    # Tokens are stored hashed: the plaintext is nowhere in the data dir.
    for path in core.data_dir.rglob("*"):
        if path.is_file():
            assert read_token.encode() not in path.read_bytes()


@pytest.mark.parametrize(
    ("name", "version", "field"),
    [
        ("requests", "requests>=2", "version"),
        ("requests", ">=2", "version"),
        ("requests", "^1.0", "version"),
        ("requests", "latest", "version"),
        ("requests", "1.*", "version"),
        ("requests", "", "version"),
        ("requests", "1.0+local", "version"),
        ("", "1.0", "name"),
        ("-bad-", "1.0", "name"),
        ("bad name", "1.0", "name"),
        ("a" * 200, "1.0", "name"),
        ("evil\x00name", "1.0", "name"),
    ],
)
def test_add_package_refuses_bad_input(
    core: CoreProcess, name: str, version: str, field: str
) -> None:
    admin = core.admin()
    with pytest.raises(grpc.RpcError) as err:
        admin.AddPackage(apb.AddPackageRequest(name=name, version=version))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field)
    assert admin.ListPackages().packages == []


def test_allowlist_upsert_remove_enable(core: CoreProcess) -> None:
    admin = core.admin()
    pkg = admin.AddPackage(apb.AddPackageRequest(name="Typing_Extensions", version="1.0.0rc1"))
    assert (pkg.name, pkg.version, pkg.enabled) == ("typing-extensions", "1.0.0rc1", True)
    again = admin.AddPackage(apb.AddPackageRequest(name="typing.extensions", version="2.0"))
    assert (again.name, again.version, again.added_at_unix) == (
        "typing-extensions",
        "2.0",
        pkg.added_at_unix,
    )
    assert len(admin.ListPackages().packages) == 1
    off = admin.SetPackageEnabled(
        apb.SetPackageEnabledRequest(name="typing-extensions", enabled=False)
    )
    assert not off.enabled
    with pytest.raises(grpc.RpcError) as err:
        admin.SetPackageEnabled(apb.SetPackageEnabledRequest(name="nope", enabled=True))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert admin.RemovePackage(apb.RemovePackageRequest(name="unknown-pkg")).removed is False
    assert admin.RemovePackage(apb.RemovePackageRequest(name="TYPING_extensions")).removed is True
    assert admin.ListPackages().packages == []


def test_set_packages_is_all_or_nothing(core: CoreProcess) -> None:
    admin = core.admin()
    admin.AddPackage(apb.AddPackageRequest(name="keep", version="1.0"))
    bad = apb.SetPackagesRequest(
        packages=[
            apb.PackageSpec(name="a", version="1.0"),
            apb.PackageSpec(name="b", version=">=2"),
        ]
    )
    with pytest.raises(grpc.RpcError) as err:
        admin.SetPackages(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "packages[1].version" in (err.value.details() or "")
    assert [p.name for p in admin.ListPackages().packages] == ["keep"]
    dup = apb.SetPackagesRequest(
        packages=[
            apb.PackageSpec(name="A", version="1.0"),
            apb.PackageSpec(name="a", version="2.0"),
        ]
    )
    with pytest.raises(grpc.RpcError) as err:
        admin.SetPackages(dup)
    assert "twice" in (err.value.details() or "")
    good = apb.SetPackagesRequest(
        packages=[
            apb.PackageSpec(name="x", version="1.0"),
            apb.PackageSpec(name="y", version="2.0", enabled=False),
        ]
    )
    listed = admin.SetPackages(good).packages
    assert [(p.name, p.enabled) for p in listed] == [("x", True), ("y", False)]


def test_registry_config_token_is_write_only(core: CoreProcess) -> None:
    admin = core.admin()
    secret = "canary-registry-token-5f1e2d"
    cfg = admin.SetRegistryConfig(
        apb.SetRegistryConfigRequest(
            index_url="http://127.0.0.1:1/simple", username="__token__", auth_token=secret
        )
    )
    assert cfg.has_auth_token and cfg.index_url == "http://127.0.0.1:1/simple" and cfg.wheels_only
    assert secret not in str(cfg)
    kept = admin.SetRegistryConfig(apb.SetRegistryConfigRequest(username="bot"))
    assert kept.has_auth_token and kept.username == "bot"
    for bad, field in [
        ("ftp://example.invalid/simple", "index_url"),
        ("https://user:pw@example.invalid/simple", "index_url"),
        ("not a url", "index_url"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=bad, auth_token=""))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(field)
        assert "pw" not in (err.value.details() or "")
    assert admin.GetRegistryConfig().has_auth_token  # the refused calls changed nothing
    cleared = admin.SetRegistryConfig(apb.SetRegistryConfigRequest(auth_token=""))
    assert not cleared.has_auth_token
    for path in core.data_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes()
    assert secret not in core.log()


def test_credentials_and_hashes_travel_only_over_tls(core: CoreProcess) -> None:
    admin = core.admin()
    secret = "canary-registry-token-77ab"
    before = admin.SetRegistryConfig(
        apb.SetRegistryConfigRequest(index_url="https://index.example.invalid/simple")
    )
    for request, field in [
        (
            apb.SetRegistryConfigRequest(index_url="http://10.1.2.3/simple", auth_token=secret),
            "index_url",
        ),
        (
            apb.SetRegistryConfigRequest(index_url="http://pkgs.lan/simple", username="bot"),
            "index_url",
        ),
        (apb.SetRegistryConfigRequest(index_url="http://pkgs.lan/simple"), "index_url"),
        (
            apb.SetRegistryConfigRequest(
                extra_index_urls=["http://pkgs.lan/simple"], replace_extra_index_urls=True
            ),
            "extra_index_urls[0]",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            admin.SetRegistryConfig(request)
        details = err.value.details() or ""
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"{field}: plain http is only allowed for localhost"), details
        assert "use https" in details and secret not in details
    after = admin.GetRegistryConfig()
    assert after == before and not after.has_auth_token  # nothing changed
    # Loopback is not a network path: a local mirror may speak plain http, with a token too.
    local = apb.SetRegistryConfigRequest(index_url="http://[::1]:8080/simple", auth_token=secret)
    assert admin.SetRegistryConfig(local).has_auth_token
    assert secret not in core.log()


def test_wheels_only_cannot_be_switched_off(core: CoreProcess) -> None:
    admin = core.admin()
    before = admin.GetRegistryConfig()
    with pytest.raises(grpc.RpcError) as err:
        admin.SetRegistryConfig(
            apb.SetRegistryConfigRequest(
                index_url="https://other.example.invalid/simple", wheels_only=False
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(
        "wheels_only: must be true: installing from a source"
    )
    assert admin.GetRegistryConfig() == before  # the URL beside it was not taken either
    kept = admin.SetRegistryConfig(apb.SetRegistryConfigRequest(wheels_only=True))
    assert kept.wheels_only


def test_size_cap_rules(core: CoreProcess) -> None:
    admin = core.admin()
    default = admin.GetSizeCap()
    assert (default.warn_bytes, default.block_bytes) == (150 * 2**20, 300 * 2**20)
    for warn, block, field in [(10, 5, "warn_bytes"), (0, 5, "warn_bytes"), (5, 0, "block_bytes")]:
        with pytest.raises(grpc.RpcError) as err:
            admin.SetSizeCap(apb.SizeCap(warn_bytes=warn, block_bytes=block))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(field)
    assert admin.GetSizeCap() == default
    assert admin.SetSizeCap(apb.SizeCap(warn_bytes=7, block_bytes=7)).block_bytes == 7


def test_empty_allowlist_installs_stable_empty_manifest(core: CoreProcess) -> None:
    admin = core.admin()
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    assert len(state.lockfile_hash) == 64
    manifest = admin.GetManifest(apb.AdminGetManifestRequest())
    assert manifest.lockfile_hash == state.lockfile_hash and not manifest.entries
    assert manifest.signature
    again = admin.install_and_wait()
    assert again.lockfile_hash == state.lockfile_hash
    assert len(admin.ListLockfiles().lockfiles) == 1
    with pytest.raises(grpc.RpcError) as err:
        admin.GetManifest(apb.AdminGetManifestRequest(lockfile_hash="0" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    work = core.data_dir / "work"
    assert not work.exists() or not any(work.iterdir())  # no pip run, no scratch dir


def test_busy_port_and_unwritable_dir_fail_with_one_line(core: CoreProcess, tmp_path: Path) -> None:
    busy = _cli("serve", "--data-dir", str(tmp_path / "other"), "--listen", core.target)
    assert busy.returncode == 1
    assert "cannot listen on" in busy.stderr and "Traceback" not in busy.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = _cli("serve", "--data-dir", str(blocker / "sub"), "--listen", "127.0.0.1:0")
    assert bad.returncode == 1
    assert "not writable" in bad.stderr and "Traceback" not in bad.stderr


def test_sigterm_stops_gracefully(core: CoreProcess) -> None:
    assert core.stop() == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", core.port)) != 0
