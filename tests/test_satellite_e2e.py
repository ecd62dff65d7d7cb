"""Satellites against the real core, as real processes on loopback (issue: push-triggered sync)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests import core_tamper
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.tcp_proxy import TcpProxy
from tests.wheelfactory import WheelSpec, build_wheel


@pytest.fixture
def core(package_index: PackageIndex, core: CoreProcess) -> CoreProcess:
    """The conftest core with the test index as registry (the index outlives the core)."""
    core.admin().SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    return core


NO_RETRY = ("--retry-base", "3600", "--retry-cap", "3600")


def _sat(
    core: CoreProcess, tmp_path: Path, started: list[SatelliteProcess], name: str, *extra: str
) -> SatelliteProcess:
    sat = SatelliteProcess(core, name, tmp_path, *extra).register().start()
    started.append(sat)
    return sat


def _converged(sat: SatelliteProcess, wanted: str, timeout: float = 60) -> apb.Satellite:
    def check() -> apb.Satellite | None:
        row = sat.fleet_row()
        assert row.status != "error", f"{sat.name}: {row.error}\n{sat.log()[-3000:]}"
        return (
            row
            if row.current_hash == wanted and row.status == "ready" and sat.current() == wanted
            else None
        )

    return eventually(check, timeout=timeout, interval=0.2)


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / f"script-{abs(hash(body))}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_two_satellites_converge_and_delta_pulls_one_wheel(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    build_wheel(WheelSpec("alpha", "1.0", requires=["beta==2.0"]), wheel_dir)
    build_wheel(WheelSpec("beta", "2.0"), wheel_dir)
    extra = build_wheel(
        WheelSpec("gamma", "3.0", files={"gamma/__init__.py": b"X = 3\n" * 500}), wheel_dir
    )
    admin = core.admin()
    first = admin.install_pins(("alpha", "1.0"))
    a = _sat(core, tmp_path, satellites, "sat-a")
    b = _sat(core, tmp_path, satellites, "sat-b")
    row_a, row_b = _converged(a, first), _converged(b, first)
    assert row_a.last_pull_blobs == 2 and row_b.last_pull_blobs == 2
    assert row_a.connected and row_a.agent_version and row_a.python_version

    script = _script(
        tmp_path,
        """
        import alpha, beta
        print(alpha.VERSION, beta.VERSION)
    """,
    )
    out = a.run(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.0", "2.0"]

    second = admin.install_pins(("alpha", "1.0"), ("gamma", "3.0"))
    row = _converged(a, second)
    assert row.last_pull_blobs == 1
    assert row.last_pull_bytes == extra.stat().st_size  # exactly that wheel's bytes
    _converged(b, second)
    assert a.status()["state"] == "ready"

    # A package that is not on the allowlist does not import, even if the agent's venv has it.
    leak = _script(
        tmp_path,
        """
        import importlib.util, sys
        for mod in ("peewee", "pip", "grpc"):
            assert importlib.util.find_spec(mod) is None, mod
        import gamma
        sys.exit(7)
    """,
    )
    assert a.run(leak).returncode == 7


def test_corrupted_blob_is_refused_and_current_kept(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    build_wheel(WheelSpec("beta", "2.0"), wheel_dir)
    admin = core.admin()
    first = admin.install_pins(("alpha", "1.0"))
    # No retry while the leftovers are looked for below: a retry's download is a .tmp- file.
    sat = _sat(core, tmp_path, satellites, "sat-c", *NO_RETRY)
    _converged(sat, first)
    # Offline while the blob is corrupted: a satellite pulls within milliseconds of the install,
    # so corrupting it afterwards would race the pull.
    sat.stop()
    second = admin.install_pins(("alpha", "1.0"), ("beta", "2.0"))
    manifest = admin.GetManifest(apb.AdminGetManifestRequest(lockfile_hash=second))
    beta = next(e for e in manifest.entries if e.name == "beta")
    blob = core.data_dir / "blobs" / beta.sha256[:2] / f"{beta.sha256}.whl"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))  # same size, different content
    sat.start()

    def errored() -> apb.Satellite | None:
        row = sat.fleet_row()
        return row if row.status == "error" else None

    row = _converged_or(errored, sat)
    assert beta.sha256[:12] in row.error or "beta" in row.error
    assert sat.current() == first
    leftovers = [p for p in sat.data_dir.rglob("*") if ".tmp-" in p.name]
    assert not leftovers
    assert not any(sat.data_dir.glob(f"pkgs/{beta.sha256}*"))


def _converged_or(check, sat: SatelliteProcess):  # type: ignore[no-untyped-def]
    return eventually(check, timeout=60, interval=0.2)


def test_offline_satellite_converges_on_reconnect_and_revoke_closes_stream(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    build_wheel(WheelSpec("alpha", "1.1"), wheel_dir)
    admin = core.admin()
    first = admin.install_pins(("alpha", "1.0"))
    sat = _sat(core, tmp_path, satellites, "sat-d")
    _converged(sat, first)
    sat.stop()
    eventually(lambda: not sat.fleet_row().connected, timeout=20)
    second = admin.install_pins(("alpha", "1.1"))
    sat.start()
    _converged(sat, second)

    admin.RevokeSatellite(apb.RevokeSatelliteRequest(name="sat-d"))
    row = eventually(lambda: (r := sat.fleet_row()).revoked and not r.connected and r, timeout=20)
    assert row.revoked
    eventually(
        lambda: "token revoked" in sat.log() or "refused this satellite" in sat.log(), timeout=20
    )
    # And it stays refused: an install after the revoke does not reach it.
    build_wheel(WheelSpec("alpha", "1.2"), wheel_dir)
    admin.install_pins(("alpha", "1.2"))
    assert sat.current() == second


def test_pinned_run_survives_flip_and_gc(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    build_wheel(WheelSpec("alpha", "2.0"), wheel_dir)
    admin = core.admin()
    first = admin.install_pins(("alpha", "1.0"))
    sat = _sat(core, tmp_path, satellites, "sat-e", "--tree-grace", "0")
    _converged(sat, first)
    go = tmp_path / "go"
    script = _script(
        tmp_path,
        f"""
        import os, sys, time, importlib
        import alpha
        print("started", alpha.VERSION, flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        for name in list(sys.modules):
            if name.startswith("alpha"):
                del sys.modules[name]
        import alpha  # re-import from disk: the pinned tree must still be there
        print("after", alpha.VERSION, flush=True)
    """,
    )
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "satellite.cli",
            "run",
            "--data-dir",
            str(sat.data_dir),
            str(script),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stdout is not None
        assert run.stdout.readline().split() == ["started", "1.0"]
        second = admin.install_pins(("alpha", "2.0"))
        _converged(sat, second)
        assert (sat.data_dir / "trees" / first).is_dir()  # grace 0, but pinned by the run
        go.write_text("")
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    assert out.split() == ["after", "1.0"]
    # Unpinned now: the next GC pass (after the next flip) removes it.
    build_wheel(WheelSpec("alpha", "3.0"), wheel_dir)
    third = admin.install_pins(("alpha", "3.0"))
    _converged(sat, third)
    eventually(lambda: not (sat.data_dir / "trees" / first).exists(), timeout=20)
    assert (sat.data_dir / "trees" / third).is_dir()


def test_deleted_file_in_current_tree_is_repaired(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    admin = core.admin()
    first = admin.install_pins(("alpha", "1.0"))
    sat = _sat(core, tmp_path, satellites, "sat-f")
    _converged(sat, first)
    target = sat.data_dir / "trees" / first / "site-packages" / "alpha" / "__init__.py"
    original = target.read_bytes()
    target.unlink()
    eventually(lambda: target.exists() and target.read_bytes() == original, timeout=30)
    # A write through the tree (which lands in pkgs/: the tree links there) is repaired too.
    target.chmod(0o644)
    target.write_bytes(b"raise SystemExit('tampered')\n")
    eventually(lambda: target.read_bytes() == original, timeout=30)
    script = _script(tmp_path, "import alpha; print(alpha.VERSION)\n")
    out = sat.run(script)
    assert out.returncode == 0 and out.stdout.strip() == "1.0", out.stderr
    assert sat.current() == first


def test_drift_is_watched_in_the_tree_current_names_after_a_flip(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    # The watcher passes on only changes to the current tree and its packages: after a flip
    # it must follow `current` to the new tree's packages, which were published while the old
    # tree was current (their events then were not drift).
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    build_wheel(WheelSpec("alpha", "2.0"), wheel_dir)
    admin = core.admin()
    first = admin.install_pins(("alpha", "1.0"))
    sat = _sat(core, tmp_path, satellites, "sat-drift-flip")
    _converged(sat, first)
    second = admin.install_pins(("alpha", "2.0"))
    _converged(sat, second)
    target = sat.data_dir / "trees" / second / "site-packages" / "alpha" / "__init__.py"
    original = target.read_bytes()
    target.chmod(0o644)
    target.write_bytes(b"raise SystemExit('tampered')\n")
    eventually(lambda: target.read_bytes() == original, timeout=30)
    # Replaced the way editors and installers write (a new file renamed over it): a move
    # into a watched directory, which the watcher sees as a creation.
    package_dir = target.resolve().parent
    package_dir.chmod(0o755)
    outside = tmp_path / "replacement.py"  # written outside any watch: only the move is seen
    outside.write_bytes(b"raise SystemExit('replaced')\n")
    os.rename(outside, package_dir / "__init__.py")
    eventually(lambda: target.read_bytes() == original, timeout=30)
    assert sat.current() == second


def test_core_killed_mid_download_resumes_without_repulling(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    big = build_wheel(
        WheelSpec("big", "1.0", files={"big/blob.bin": os.urandom(24 * 2**20)}), wheel_dir
    )
    core = CoreProcess(tmp_path / "core").start()
    proxy = TcpProxy(core.port, rate=8 * 2**20)  # ~3 s for the blob: time to kill the core
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        wanted = admin.install_pins(("big", "1.0"))
        sat = SatelliteProcess(core, "sat-g", tmp_path).register()
        sat.target = proxy.target
        satellites.append(sat.start())
        partial_dir = sat.data_dir / "blobs" / ".partial"

        def partial_size() -> int:
            files = list(partial_dir.glob("*")) if partial_dir.exists() else []
            return sum(f.stat().st_size for f in files)

        eventually(lambda: partial_size() > 4 * 2**20, timeout=60, interval=0.05)
        core.kill()
        proxy.cut()
        eventually(lambda: "error" in sat.log().lower() or "lost" in sat.log(), timeout=30)
        resumed_from = partial_size()
        assert 0 < resumed_from < big.stat().st_size
        core.start()  # same port, same data dir
        row = _converged(sat, wanted, timeout=120)
        assert row.last_pull_blobs == 1
        assert row.last_pull_bytes <= big.stat().st_size - resumed_from
        assert row.last_pull_bytes > 0
    finally:
        proxy.close()
        core.stop()


def test_foreign_wheels_are_refused_with_both_environments(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    build_wheel(WheelSpec("winonly", "1.0", tag="cp311-cp311-win_amd64"), wheel_dir)
    admin = core.admin()
    first = admin.install_pins(("alpha", "1.0"))
    sat = _sat(core, tmp_path, satellites, "sat-h")
    _converged(sat, first)
    req = apb.SetRegistryConfigRequest()
    req.target.python_version, req.target.implementation = "3.11", "cp"
    req.target.abi, req.target.platform = "cp311", "win_amd64"
    admin.SetRegistryConfig(req)
    admin.install_pins(("alpha", "1.0"), ("winonly", "1.0"))
    # The only environment is Windows now: the core serves this Linux host nothing, says why,
    # and the host keeps its tree.
    row = eventually(lambda: (r := sat.fleet_row()).status == "unserved" and r, timeout=60)
    assert row.error.startswith("no environment fits cp311-") and "win_amd64" in row.error
    assert sat.current() == first
    # Defence in depth: a validly signed manifest for this host's environment that names a
    # Windows wheel anyway (a compromised core database) is refused by the satellite itself.
    entry = core_tamper.put_blob(core.data_dir, wheel_dir / "winonly-1.0-cp311-cp311-win_amd64.whl")
    core_tamper.publish_signed(core.data_dir, [entry])
    row = eventually(lambda: (r := sat.fleet_row()).status == "error" and r, timeout=60)
    assert "winonly-1.0-cp311-cp311-win_amd64.whl" in row.error
    assert "this satellite runs" in row.error
    assert sat.current() == first


def test_second_agent_on_the_same_data_dir_exits_clearly(
    core: CoreProcess, tmp_path: Path, satellites: list[SatelliteProcess]
) -> None:
    first = core.admin().install_pins()
    sat = _sat(core, tmp_path, satellites, "sat-i")
    _converged(sat, first)
    second = subprocess.run(
        [sys.executable, "-m", "satellite.cli", "agent", "--core", core.target,
         "--token-file", str(sat.token_file), "--signing-key", str(sat.key_file),
         "--data-dir", str(sat.data_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1
    assert "another agent" in second.stderr and "Traceback" not in second.stderr


def test_run_refuses_when_not_ready_and_runs_bare_when_nothing_desired(
    core: CoreProcess, tmp_path: Path, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    admin = core.admin()
    empty = admin.install_pins()
    sat = _sat(core, tmp_path, satellites, "sat-j")
    _converged(sat, empty)
    script = _script(tmp_path, "import sys; print('bare'); sys.exit(3)\n")
    out = sat.run(script)
    assert out.returncode == 3 and out.stdout.strip() == "bare"
    sat.stop()
    wanted = admin.install_pins(("alpha", "1.0"))
    # Pretend the agent heard of the new hash but has not materialised it yet.
    state_file = sat.data_dir / "state.json"
    state = json.loads(state_file.read_text())
    state["desired_hash"] = wanted
    state_file.write_text(json.dumps(state))
    refused = sat.run(script)
    assert refused.returncode == 1
    assert f"packages not ready on this satellite: expected {wanted}" in refused.stderr
