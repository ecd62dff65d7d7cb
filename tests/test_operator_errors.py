"""Rough edges a new operator hits: oversized requests, careless caps, a rollback's stale error,
a missing optional driver, a superseded tree that lingered."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from core.api.request_limits import REQUEST_BYTES, STRING_BYTES, check_request
from core.state.db import open_database
from core.storage.backends import save_active_name
from shared.errors import InvalidArgument
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel


def test_an_oversized_request_is_invalid_argument_naming_the_field(core: CoreProcess) -> None:
    admin = core.admin()
    with pytest.raises(grpc.RpcError) as caught:
        admin.AddPackage(apb.AddPackageRequest(name="a" * 10_000_000, version="1.0"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(f"name: at most {STRING_BYTES} bytes")
    many = [apb.PackageSpec(name=f"p{i}", version="1.0") for i in range(150_000)]
    with pytest.raises(grpc.RpcError) as caught:
        admin.SetPackages(apb.SetPackagesRequest(packages=many))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("request: at most")
    assert admin.ListPackages().packages == []  # nothing was changed
    # Beyond gRPC's own receive limit only the transport can answer; the core survives it.
    with pytest.raises(grpc.RpcError) as caught:
        admin.AddPackage(apb.AddPackageRequest(name="a" * 20_000_000, version="1.0"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert admin.ListPackages().packages == []


def test_check_request_names_nested_fields() -> None:
    req = apb.SetPackagesRequest(
        packages=[apb.PackageSpec(name="ok", version="1"), apb.PackageSpec(name="x" * 70_000)]
    )
    with pytest.raises(InvalidArgument) as caught:
        check_request(req)
    assert caught.value.field == "packages[1].name"
    check_request(apb.SetPackagesRequest(packages=[apb.PackageSpec(name="ok", version="1")]))
    assert REQUEST_BYTES > STRING_BYTES


def test_size_caps_refuse_what_a_negative_number_becomes(core: CoreProcess) -> None:
    admin = core.admin()
    for warn, block in ((2**64 - 1, 2**64 - 1), (1, 2**64 - 1), (0, 10)):
        with pytest.raises(grpc.RpcError) as caught:
            admin.SetSizeCap(apb.SizeCap(warn_bytes=warn, block_bytes=block))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1099511627776 bytes (1 TiB)" in str(
        _refusal(lambda: admin.SetSizeCap(apb.SizeCap(warn_bytes=1, block_bytes=2**64 - 1)))
    )
    ok = admin.SetSizeCap(apb.SizeCap(warn_bytes=2**40, block_bytes=2**40))
    assert ok.block_bytes == 2**40


def _refusal(call) -> str:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as exc:
        return exc.details() or ""
    raise AssertionError("the call was not refused")


def test_rollback_clears_the_failed_install_error(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    admin = core.admin()
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name="alpha", version="1.0")])
    )
    good = admin.install_and_wait()
    assert good.status == apb.INSTALL_STATUS_READY
    admin.SetPackages(apb.SetPackagesRequest(packages=[apb.PackageSpec(name="alpha", version="9")]))
    failed = admin.install_and_wait()
    assert failed.status == apb.INSTALL_STATUS_ERROR and failed.error
    # Rolling back to the release that is still desired: a no-op, but the answer is `ready`.
    rolled = admin.Rollback(apb.RollbackRequest(release_sequence=good.release_sequence))
    assert rolled.status == apb.INSTALL_STATUS_READY
    assert rolled.error == "" and list(rolled.warnings) == []
    assert rolled.lockfile_hash == good.lockfile_hash
    assert admin.GetInstallState().error == ""
    # Rolling back across a failed install to an older release: a new sequence, no error.
    build_wheel(WheelSpec("alpha", "2.0"), wheel_dir)
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name="alpha", version="2.0")])
    )
    newer = admin.install_and_wait()
    assert newer.status == apb.INSTALL_STATUS_READY
    admin.SetPackages(apb.SetPackagesRequest(packages=[apb.PackageSpec(name="alpha", version="8")]))
    assert admin.install_and_wait().error
    back = admin.Rollback(apb.RollbackRequest(lockfile_hash=good.lockfile_hash))
    assert back.status == apb.INSTALL_STATUS_READY and back.error == ""
    assert back.lockfile_hash == good.lockfile_hash
    assert back.release_sequence > newer.release_sequence
    assert [e.status for e in back.environments] == ["ready"]


def _serve_without(module: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """`spk-core serve` in a process where `module` cannot be imported (as if not installed)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from core.app.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "serve", "--data-dir", str(tmp_path / "core"),
         "--listen", "127.0.0.1:0", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_postgres_url_without_its_driver_says_what_to_install(tmp_path: Path) -> None:
    out = _serve_without(
        "psycopg2", tmp_path, "--database-url", "postgresql://spk:s3cret@127.0.0.1:5/spk"
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines == [
        "spk-core: error: --database-url is a postgresql:// URL but the Postgres driver"
        " (psycopg2) is not installed: pip install 'script-packages[postgres]'"
    ], out.stderr
    assert "s3cret" not in out.stderr


def test_s3_without_boto3_says_what_to_install(tmp_path: Path) -> None:
    s3 = {
        "SPK_S3_BUCKET": "b",
        "SPK_S3_REGION": "us-east-1",
        "SPK_S3_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "SPK_S3_SECRET_ACCESS_KEY": "canary-s3-secret",
        "SPK_S3_ENDPOINT": "http://127.0.0.1:9",
    }
    data_dir = tmp_path / "core"
    data_dir.mkdir(mode=0o700)
    db = open_database(data_dir)
    save_active_name("s3")  # as another core that has boto3 would have left it
    db.close()
    out = _serve_without("boto3", tmp_path, env=s3)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "boto3 is not installed (pip install 'script-packages[s3]')" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("spk-core: error: the active storage")
    assert "canary-s3-secret" not in out.stderr


def test_a_superseded_tree_goes_right_after_the_flip_and_a_pinned_one_on_the_timer(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    for version in ("1.0", "2.0", "3.0"):
        build_wheel(WheelSpec("alpha", version), wheel_dir)
    core = CoreProcess(tmp_path / "core").start()
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))

        def install(version: str) -> str:
            pins = [apb.PackageSpec(name="alpha", version=version)]
            admin.SetPackages(apb.SetPackagesRequest(packages=pins))
            state = admin.install_and_wait()
            assert state.status == apb.INSTALL_STATUS_READY, state.error
            return str(state.lockfile_hash)

        first = install("1.0")
        sat = SatelliteProcess(core, "sat-gc", tmp_path, "--tree-grace", "0")
        sat.extra += ["--tree-gc-interval", "1"]
        satellites.append(sat.register().start())
        eventually(lambda: sat.current() == first, timeout=60)
        trees = sat.data_dir / "trees"
        second = install("2.0")
        eventually(lambda: sat.current() == second, timeout=60)
        # Gone with the flip's own GC pass: no later reconcile needed.
        eventually(lambda: not (trees / first).exists(), timeout=10)
        # A run holds the current tree while the next release flips: it stays while pinned,
        # and the timer collects it once the run is over (no release needed for that).
        script = tmp_path / "hold.py"
        flag, started = tmp_path / "release-me", tmp_path / "started"
        script.write_text(
            "import pathlib, sys, time\n"
            f"pathlib.Path({str(started)!r}).touch()\n"
            f"while not pathlib.Path({str(flag)!r}).exists(): time.sleep(0.05)\n"
        )
        run = subprocess.Popen(
            [sys.executable, "-m", "satellite.cli", "run", "--data-dir", str(sat.data_dir),
             str(script)],
        )  # fmt: skip
        eventually(started.exists, timeout=30)  # the runner pins `second` before it starts it
        third = install("3.0")
        eventually(lambda: sat.current() == third, timeout=60)
        time.sleep(2.5)  # flip GC and two timer passes: the pin holds it
        assert (trees / second).exists()
        flag.write_text("")
        assert run.wait(30) == 0
        eventually(lambda: not (trees / second).exists(), timeout=10)
    finally:
        core.stop()
