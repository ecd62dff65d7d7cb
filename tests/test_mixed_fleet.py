"""Mixed fleets (issue 12), end to end: one core resolves the allowlist for several environments
and each satellite, on its own real interpreter, converges to its environment's manifest.

The second interpreter is another CPython minor version with the project installed in its own
venv; scripts/test sets it up (scripts/lib/second_python.sh) and these tests fail, never skip,
without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import common_pb2 as cpb
from tests.core_process import AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "data" / "core-before-environments"
MINE = f"{sys.version_info[0]}.{sys.version_info[1]}"

SCRIPT = """\
import importlib.util, json, native
print(json.dumps({
    "flavor": native.FLAVOR,
    "backport": importlib.util.find_spec("backport") is not None,
    "armdep": importlib.util.find_spec("armdep") is not None,
}))
"""


def second_python() -> tuple[str, str]:
    """(interpreter, its X.Y) of the second venv; fails loudly when scripts/test did not make it."""
    path = os.environ.get("SPK_SECOND_PYTHON") or str(REPO / ".venv-second" / "bin" / "python")
    assert Path(path).exists(), (
        f"no second interpreter at {path}: run the tests with scripts/test, which sets it up"
    )
    out = subprocess.run(
        [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    version = out.stdout.strip()
    assert version != MINE, f"the second interpreter is {version}, the same as this one"
    return path, version


def older(a: str, b: str) -> bool:
    return tuple(map(int, a.split("."))) < tuple(map(int, b.split(".")))


def abi(version: str) -> str:
    return "cp" + version.replace(".", "")


def build_fleet_index(wheel_dir: Path, versions: list[str]) -> None:
    """A pure wheel; a native package with wheels for `versions` only (x86-64, and aarch64 for
    the last); an app whose dependencies carry a python_version and a platform_machine marker."""
    build_wheel(WheelSpec("purelib", "1.0"), wheel_dir)
    for v in versions:
        flavor = {"native/__init__.py": f"FLAVOR = {abi(v)!r}\n".encode()}
        build_wheel(
            WheelSpec(
                "native", "1.0", files=flavor, tag=f"{abi(v)}-{abi(v)}-manylinux_2_17_x86_64"
            ),
            wheel_dir,
        )
    arm = {"native/__init__.py": f"FLAVOR = {abi(versions[-1]) + '-arm'!r}\n".encode()}
    tag = f"{abi(versions[-1])}-{abi(versions[-1])}-manylinux_2_17_aarch64"
    build_wheel(WheelSpec("native", "1.0", files=arm, tag=tag), wheel_dir)
    newer = versions[-1]
    build_wheel(
        WheelSpec(
            "app",
            "1.0",
            requires=[
                "purelib==1.0",
                "native==1.0",
                f'backport==1.0; python_version < "{newer}"',
                'armdep==1.0; platform_machine == "aarch64"',
            ],
        ),
        wheel_dir,
    )
    build_wheel(WheelSpec("backport", "1.0"), wheel_dir)
    build_wheel(WheelSpec("armdep", "1.0"), wheel_dir)


def add_env(admin: AdminClient, name: str, python: str, platform: str) -> None:
    target = cpb.TargetEnvironment(python_version=python, abi=abi(python), platform=platform)
    admin.AddEnvironment(
        apb.AddEnvironmentRequest(environment=cpb.Environment(name=name, target=target))
    )


def setup_core(core: CoreProcess, index: PackageIndex) -> AdminClient:
    admin = core.admin()
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=index.url, timeout_seconds=10))
    admin.SetPackages(apb.SetPackagesRequest(packages=[apb.PackageSpec(name="app", version="1.0")]))
    return admin


def manifests_of(admin: AdminClient) -> dict[str, cpb.Manifest]:
    release = admin.ListReleases().releases[0]
    return {
        m.environment: admin.GetManifest(apb.AdminGetManifestRequest(lockfile_hash=m.lockfile_hash))
        for m in release.manifests
    }


def old_agent_refresh(core: CoreProcess) -> tuple[str, str]:
    """The first Refresh a subscribe without `host` (as agents before environments send) gets."""
    import grpc

    from shared.proto.scriptpkgs.v1 import distribution_pb2 as dpb
    from shared.proto.scriptpkgs.v1 import distribution_pb2_grpc

    token = core.admin().CreateSatellite(apb.CreateSatelliteRequest(name="sat-old-agent")).token
    with grpc.insecure_channel(core.target) as channel:
        stub = distribution_pb2_grpc.PackageDistributionStub(channel)
        old = dpb.SubscribeRequest(agent_version="0.9", python_version=MINE, platform="linux")
        stream = stub.RefreshScriptPackages(
            old, metadata=(("authorization", f"Bearer {token}"),), timeout=30
        )
        first = next(stream)
        stream.cancel()
    assert not first.unserved_reason, first
    return first.environment, first.lockfile_hash


def run_json(sat: SatelliteProcess, tmp_path: Path) -> dict[str, object]:
    script = tmp_path / f"probe-{sat.name}.py"
    script.write_text(SCRIPT)
    out = sat.run(script)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_two_interpreters_converge_each_to_its_own_environment(
    core: CoreProcess,
    package_index: PackageIndex,
    wheel_dir: Path,
    satellites: list[SatelliteProcess],
    tmp_path: Path,
) -> None:
    other, version = second_python()
    build_fleet_index(wheel_dir, sorted([MINE, version], key=lambda v: (len(v), v)))
    admin = setup_core(core, package_index)
    add_env(admin, "other", version, "manylinux_2_17_x86_64")
    add_env(admin, "arm", version, "manylinux_2_28_aarch64")
    admin.InstallNow(apb.InstallNowRequest())
    # WatchInstall shows each environment's step while the install runs (uv alone takes
    # hundreds of ms, so the stream sees it), and its results at the end.
    watched = list(admin.WatchInstall(apb.WatchInstallRequest(), timeout=120))
    state = watched[-1]
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    steps = {e.status for s in watched[:-1] for e in s.environments}
    assert steps & {"resolving", "fetching"}, [list(s.environments) for s in watched]
    assert [e.name for e in state.environments] == ["default", "other", "arm"]
    assert {e.status for e in state.environments} == {"ready"}
    # One universal uv run answered for all three (core/install/resolution.py).
    assert "resolved 3 environments in one universal resolution" in core.log()

    manifests = manifests_of(admin)
    assert {
        e.name: (e.lockfile_hash, e.wheels, e.total_bytes)
        for e in admin.GetInstallState().environments
    } == {env: (m.lockfile_hash, len(m.entries), m.total_size) for env, m in manifests.items()}
    names = {env: {e.name for e in m.entries} for env, m in manifests.items()}
    mine_is_older = older(MINE, version)
    old, new = ("default", "other") if mine_is_older else ("other", "default")
    assert names[old] == {"app", "purelib", "native", "backport"}  # python_version < newer
    assert names[new] == {"app", "purelib", "native"}
    assert names["arm"] == {"app", "purelib", "native", "armdep"}  # platform_machine marker
    assert len({m.lockfile_hash for m in manifests.values()}) == 3
    # The pure wheel is one blob for all three environments.
    pure = {e.sha256 for m in manifests.values() for e in m.entries if e.name == "purelib"}
    assert len(pure) == 1
    stored = {p.name for p in (core.data_dir / "blobs").rglob("*.whl")}
    unique = {e.sha256 for m in manifests.values() for e in m.entries}
    assert stored == {f"{sha}.whl" for sha in unique}
    release = admin.ListReleases().releases[0]
    assert {m.sequence for m in manifests.values()} == {release.sequence}
    # An agent older than environments says nothing of its host: the default environment
    # serves it, as before, while the upgraded agents below get their own.
    assert old_agent_refresh(core) == ("default", manifests["default"].lockfile_hash)

    mine_sat = SatelliteProcess(core, "sat-mine", tmp_path).register()
    other_sat = SatelliteProcess(core, "sat-other", tmp_path).register()
    other_sat.python = other
    satellites += [mine_sat.start(), other_sat.start()]
    eventually(lambda: mine_sat.current() == manifests["default"].lockfile_hash, 90)
    eventually(lambda: other_sat.current() == manifests["other"].lockfile_hash, 90)

    assert run_json(mine_sat, tmp_path) == {
        "flavor": abi(MINE),
        "backport": mine_is_older,
        "armdep": False,
    }
    assert run_json(other_sat, tmp_path) == {
        "flavor": abi(version),
        "backport": not mine_is_older,
        "armdep": False,
    }
    fleet = admin.ListSatellites()
    rows = {s.name: s for s in fleet.satellites}
    assert rows["sat-mine"].environment == "default" and rows["sat-other"].environment == "other"
    assert rows["sat-other"].host.abi == abi(version)
    summary = {s.environment: s for s in fleet.summary}
    eventually(
        lambda: (
            {s.environment: s.converged for s in admin.ListSatellites().summary}
            == {"default": 1, "other": 1}
        ),
        30,
    )
    assert set(summary) == {"default", "other"}

    # An environment that cannot be resolved fails the whole install, naming it and the
    # package; no manifest of that release is published for any environment.
    add_env(admin, "py39", "3.9", "manylinux_2_17_x86_64")
    failed = admin.install_and_wait()
    assert failed.status == apb.INSTALL_STATUS_ERROR
    assert "environment py39" in failed.error and "native 1.0" in failed.error
    assert "the index has wheels for:" in failed.error
    assert [r.sequence for r in admin.ListReleases().releases] == [release.sequence]
    assert admin.GetInstallState().release_sequence == release.sequence
    by_env = {e.name: e for e in failed.environments}
    assert by_env["py39"].status == "error"
    assert mine_sat.current() == manifests["default"].lockfile_hash


def test_an_unserved_satellite_is_told_how_to_fix_it_and_converges_once_served(
    core: CoreProcess,
    package_index: PackageIndex,
    wheel_dir: Path,
    satellites: list[SatelliteProcess],
    tmp_path: Path,
) -> None:
    other, version = second_python()
    build_fleet_index(wheel_dir, sorted([MINE, version], key=lambda v: (len(v), v)))
    admin = setup_core(core, package_index)
    first = admin.install_and_wait()  # only the default environment (this interpreter)
    assert first.status == apb.INSTALL_STATUS_READY, first.error
    sat = SatelliteProcess(core, "sat-other", tmp_path).register()
    sat.python = other
    satellites.append(sat.start())

    def unserved() -> apb.Satellite:
        row = sat.fleet_row()
        assert row.unserved and row.status == "unserved", row
        return row

    row = eventually(unserved, 60)
    assert row.error.startswith(f"no environment fits {abi(version)}-")
    assert "add one with: spk-core admin envs add NAME --python" in row.error
    assert sat.current() is None

    def unserved_status() -> dict[str, object]:
        status = sat.status()
        assert status["sync_status"] == "unserved", status
        return status

    assert "no environment fits" in str(eventually(unserved_status, 30)["last_error"])
    assert any(s.unserved == 1 and s.environment == "" for s in admin.ListSatellites().summary)

    # The host prints what to paste; pasting it into the admin CLI adds the environment.
    env_line = subprocess.run(
        [other, "-m", "satellite.cli", "env", "--name", "other"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert env_line[:5] == ["spk-core", "admin", "envs", "add", "other"]
    as_json = json.loads(
        subprocess.run(
            [other, "-m", "satellite.cli", "env", "--name", "other", "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert as_json["add_command"].split() == env_line
    assert as_json["environment"]["python_version"] == version
    assert as_json["environment"]["abi"] == as_json["abi"] == abi(version)

    def admin_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "core.app.cli", "admin", "--core", core.target, *args],
            capture_output=True,
            text=True,
            env=dict(os.environ, SPK_ADMIN_TOKEN=core.admin_token),
        )

    assert "  (unserved)     1 unserved" in admin_cli("status").stdout.splitlines()
    pasted = admin_cli("envs", "add", *env_line[4:])
    assert pasted.returncode == 0, pasted.stderr
    # Added, not installed yet: still unserved, and now the message says to install.
    eventually(lambda: "has no manifest for it yet" in sat.fleet_row().error, 30)
    second = admin.install_and_wait()
    assert second.status == apb.INSTALL_STATUS_READY, second.error
    wanted = admin.GetManifest(apb.AdminGetManifestRequest(environment="other")).lockfile_hash
    eventually(lambda: sat.current() == wanted, 90)
    assert sat.fleet_row().environment == "other" and not sat.fleet_row().unserved


def test_a_core_upgraded_from_before_environments_keeps_serving_its_satellites(
    tmp_path: Path, satellites: list[SatelliteProcess]
) -> None:
    # A data dir written by the previous core (schema 2), see tests/data/.../fixture.json.
    fixture = json.loads((FIXTURE / "fixture.json").read_text())
    data = tmp_path / "core"
    shutil.copytree(FIXTURE, data, ignore=shutil.ignore_patterns("fixture.json"))
    os.chmod(data / "secret.key", 0o600)
    core = CoreProcess(data, admin_token=fixture["admin_token"]).start()
    try:
        admin = core.admin()
        (env,) = admin.ListEnvironments().environments
        assert env.name == "default" and env.is_default
        state = admin.GetInstallState()
        assert (
            state.lockfile_hash == fixture["desired"] and state.status == apb.INSTALL_STATUS_READY
        )
        releases = admin.ListReleases().releases
        assert [r.sequence for r in releases] == [2, 1] and releases[0].current
        assert [m.lockfile_hash for m in releases[1].manifests] == [fixture["previous"]]

        sat = SatelliteProcess(core, fixture["satellite"], tmp_path)
        sat.token_file.write_text(fixture["satellite_token"])
        from tests.satellite_process import export_signing_key

        export_signing_key(core, sat.key_file)
        satellites.append(sat.start())
        eventually(lambda: sat.current() == fixture["desired"], 60)
        assert sat.fleet_row().environment == "default"
        # The history is still usable: roll back to the first lockfile, as a new release.
        admin.Rollback(apb.RollbackRequest(lockfile_hash=fixture["previous"]))
        eventually(lambda: sat.current() == fixture["previous"], 60)
        assert [r.sequence for r in admin.ListReleases().releases][:1] == [3]
    finally:
        core.stop()


@pytest.mark.parametrize(
    ("python", "platform", "field"),
    [
        ("three", "manylinux_2_17_x86_64", "environment.python_version"),
        ("3.12", "linux_x86_64", "environment.platform"),
        ("3.12", "manylinux_2_17_sparc", "environment.platform"),
        ("3.12", "manylinux_2_12_x86_64", "environment.platform"),
        ("3.12", "", "environment.platform"),
        ("3.12", "manylinux_2_17_x86_64,linux_x86_64", "environment.platform[1]"),
    ],
)
def test_bad_environments_are_refused_naming_the_field(
    core: CoreProcess, python: str, platform: str, field: str
) -> None:
    import grpc

    admin = core.admin()
    with pytest.raises(grpc.RpcError) as err:
        add_env(admin, "bad", python, platform)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}: ")
    assert [e.name for e in admin.ListEnvironments().environments] == ["default"]


def test_environments_are_kept_by_name_and_one_always_stays(core: CoreProcess) -> None:
    import grpc

    admin = core.admin()

    def listed() -> list[tuple[str, str]]:
        return [(e.name, e.target.platform) for e in admin.ListEnvironments().environments]

    (default,) = admin.ListEnvironments().environments
    add_env(admin, "arm", "3.12", "manylinux_2_17_aarch64")
    add_env(admin, "arm", "3.12", "manylinux_2_28_aarch64")  # the same name: replaced in place
    assert listed() == [("default", default.target.platform), ("arm", "manylinux_2_28_aarch64")]
    refused = [
        # Two names for one target would be two names for one manifest.
        ("arm2", "manylinux_2_28_aarch64", "environment: 'arm' already has this target"),
        ("Not A Name", "manylinux_2_17_x86_64", "environment.name: "),
    ]
    for name, platform, start in refused:
        with pytest.raises(grpc.RpcError) as err:
            add_env(admin, name, "3.12", platform)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(start), err.value.details()
    assert len(listed()) == 2
    assert not admin.RemoveEnvironment(apb.RemoveEnvironmentRequest(name="nosuch")).removed
    assert admin.RemoveEnvironment(apb.RemoveEnvironmentRequest(name="default")).removed
    with pytest.raises(grpc.RpcError) as err:
        admin.RemoveEnvironment(apb.RemoveEnvironmentRequest(name="arm"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'arm' is the only environment; add another" in (err.value.details() or "")
    assert listed() == [("arm", "manylinux_2_28_aarch64")]


def test_size_caps_rollback_and_gc_work_per_release(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path
) -> None:
    """Foreign environments need no host to test the release model: a Windows one here."""
    build_wheel(WheelSpec("tool", "1.0"), wheel_dir)
    build_wheel(WheelSpec("tool", "2.0"), wheel_dir)
    fat = {"tool_win/blob.bin": os.urandom(600_000)}
    build_wheel(WheelSpec("tool-win", "1.0", files=fat, tag="py3-none-win_amd64"), wheel_dir)
    build_wheel(
        WheelSpec("tool", "3.0", requires=['tool-win==1.0; sys_platform == "win32"']), wheel_dir
    )
    admin = setup_core(core, package_index)
    add_env(admin, "win", "3.12", "win_amd64")

    def pins(version: str) -> apb.SetPackagesRequest:
        return apb.SetPackagesRequest(packages=[apb.PackageSpec(name="tool", version=version)])

    admin.SetPackages(pins("1.0"))
    first = admin.install_and_wait()
    admin.SetPackages(pins("2.0"))
    second = admin.install_and_wait()
    assert first.status == second.status == apb.INSTALL_STATUS_READY, second.error
    assert [r.sequence for r in admin.ListReleases().releases] == [2, 1]

    # The cap holds per environment: only the Windows manifest is over it, and that fails the
    # whole release, naming the environment; release 2 stays desired everywhere.
    admin.SetSizeCap(apb.SizeCap(warn_bytes=100_000, block_bytes=300_000))
    admin.SetPackages(pins("3.0"))
    blocked = admin.install_and_wait()
    assert blocked.status == apb.INSTALL_STATUS_ERROR
    assert (
        blocked.error.startswith("environment win: install size") and "block limit" in blocked.error
    )
    assert [(e.name, e.status) for e in blocked.environments] == [
        ("default", "built"),
        ("win", "error"),
    ]
    assert admin.GetInstallState().release_sequence == 2
    assert [r.sequence for r in admin.ListReleases().releases] == [2, 1]

    # Rollback takes a release back whole: both its manifests, re-signed as release 3.
    old = {m.environment: m.lockfile_hash for m in admin.ListReleases().releases[1].manifests}
    admin.Rollback(apb.RollbackRequest(release_sequence=1))
    newest = admin.ListReleases().releases[0]
    assert newest.sequence == 3 and newest.current
    assert {m.environment: m.lockfile_hash for m in newest.manifests} == old
    for env, lockfile_hash in old.items():
        manifest = admin.GetManifest(apb.AdminGetManifestRequest(environment=env))
        assert manifest.lockfile_hash == lockfile_hash and manifest.sequence == 3

    # Blob GC keeps whole releases: the desired one (3 = 1's manifests) and the newest other
    # (2). The only candidates are the two wheels of the blocked install (tool 3.0 and the fat
    # Windows one), still within their grace period.
    run = admin.GcBlobs(apb.GcBlobsRequest(dry_run=True))
    kept = set(run.kept_lockfiles)
    assert set(old.values()) <= kept
    assert {m.lockfile_hash for m in admin.ListReleases().releases[1].manifests} <= kept
    assert run.candidates == run.kept_within_grace == 2 and not run.deleted_sha256
