"""core/install/uv_resolver.py + diagnosis.py: uv against a real pypiserver on loopback, and
every refusal explained from what the index really serves."""

from __future__ import annotations

import asyncio
import itertools
import netrc
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import core.install.uv_resolver as uv_resolver
from core.install.diagnosis import resolve_or_explain
from core.install.install_state import EnvProgress
from core.install.pylock import LockedWheel, parse_pylock
from core.install.resolution import resolve_all
from core.install.universal import fleet_marker, select_wheels
from core.install.uv_resolver import (
    build_child_env,
    build_uv_argv,
    render_netrc,
    render_requirements,
    resolve_universal,
    uv_platform,
)
from core.state.environments import native_target
from core.state.index_config import RegistrySettings, validate_settings
from shared.environments import Environment, tag_rank
from shared.errors import InvalidArgument, RegistryError, ResolveError
from shared.manifest import TargetEnvironment
from shared.tags import native_platform
from tests.core_process import eventually_async
from tests.index_server import PackageIndex, StaticIndex
from tests.wheelfactory import WheelSpec, build_sdist, build_wheel

WIN = Environment("win", TargetEnvironment("3.11", "cp", "cp311", "win_amd64"))
LINUX = Environment("linux", TargetEnvironment("3.11", "cp", "cp311", "manylinux_2_17_x86_64"))
NATIVE = Environment("default", native_target())
PY310 = Environment("py310", TargetEnvironment("3.10", "cp", "cp310", "manylinux_2_17_x86_64"))


def settings_for(index: PackageIndex | StaticIndex, **kw: object) -> RegistrySettings:
    return RegistrySettings(index_url=index.url, timeout_seconds=5, **kw)  # type: ignore[arg-type]


async def resolve(
    pins: list[tuple[str, str]],
    settings: RegistrySettings,
    env: Environment,
    scratch: Path,
    deadline_seconds: float = 600.0,
) -> list[LockedWheel]:
    return await resolve_or_explain(
        pins, settings, env, native_platform(), scratch, deadline_seconds=deadline_seconds
    )


@pytest.fixture
def chain(wheel_dir: Path) -> dict[str, Path]:
    """a==1.0 -> b==2.0 -> c (any); c also has a newer prerelease that must not win."""
    return {
        "a": build_wheel(WheelSpec("a", "1.0", requires=["b==2.0"]), wheel_dir),
        "b": build_wheel(WheelSpec("b", "2.0", requires=["c"]), wheel_dir),
        "c": build_wheel(WheelSpec("c", "3.0"), wheel_dir),
        "c-rc": build_wheel(WheelSpec("c", "3.1rc1"), wheel_dir),
    }


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- pure parts


def test_uv_argv_is_exact_and_carries_no_secret(tmp_path: Path) -> None:
    s = RegistrySettings(
        index_url="https://idx.example/simple",
        extra_index_urls=("https://extra.example/simple",),
        username="bob",
        token="SECRET",
    )

    def argv_for(env: Environment, universal: bool = False) -> list[str]:
        return build_uv_argv(
            "/bin/uv",
            s,
            env,
            "",
            requirements_file=tmp_path / "r.txt",
            output_file=tmp_path / "pylock.toml",
            cache_dir=tmp_path / "c",
            universal=universal,
        )

    argv = argv_for(LINUX)
    joined = " ".join(argv)
    assert argv[:3] == ["/bin/uv", "pip", "compile"]
    for flag in ("--no-config", "--only-binary", "--keyring-provider", "--no-python-downloads"):
        assert flag in argv
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--only-binary"] == ":all:" and pairs["--keyring-provider"] == "disabled"
    assert pairs["--python-version"] == "3.11"
    assert pairs["--python-platform"] == "x86_64-manylinux_2_17"
    assert pairs["--default-index"] == "https://idx.example/simple"
    assert pairs["--index"] == "https://extra.example/simple"
    assert "SECRET" not in joined and "bob" not in joined
    # The universal run: the oldest environment's Python, no single platform.
    universal = argv_for(PY310, universal=True)
    assert "--universal" in universal and "--python-platform" not in universal
    assert dict(itertools.pairwise(universal))["--python-version"] == "3.10"
    assert render_requirements([("a", "1.0")], "sys_platform == 'linux'") == (
        "a==1.0 ; sys_platform == 'linux'\n"
    )


@pytest.mark.parametrize(
    ("tag", "target"),
    [
        ("manylinux_2_17_x86_64", "x86_64-manylinux_2_17"),
        ("manylinux2014_aarch64", "aarch64-manylinux_2_17"),
        ("manylinux_2_28_aarch64", "aarch64-manylinux_2_28"),
        ("manylinux_2_30_x86_64", "x86_64-manylinux_2_28"),  # uv's nearest older glibc
        ("manylinux_2_36_x86_64", "x86_64-manylinux_2_36"),
        ("musllinux_1_2_x86_64", "x86_64-unknown-linux-musl"),
        ("win_amd64", "x86_64-pc-windows-msvc"),
        ("macosx_11_0_arm64", "aarch64-apple-darwin"),
    ],
)
def test_platform_tags_map_to_uv_targets(tag: str, target: str) -> None:
    assert uv_platform(tag)[0] == target


def test_macos_passes_the_deployment_target() -> None:
    assert uv_platform("macosx_12_3_x86_64") == (
        "x86_64-apple-darwin",
        {"MACOSX_DEPLOYMENT_TARGET": "12.3"},
    )


@pytest.mark.parametrize(
    "tag", ["manylinux_2_12_x86_64", "musllinux_1_1_x86_64", "manylinux_2_17_ppc64le"]
)
def test_untargetable_platforms_are_refused_naming_the_field(tag: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^environment\.platform: "):
        uv_platform(tag)


def test_child_env_is_built_from_scratch(tmp_path: Path) -> None:
    parent = {
        "PATH": "/usr/bin",
        "UV_INDEX_URL": "http://evil",
        "UV_CACHE_DIR": "/tmp/shared",
        "PYTHONPATH": "/evil",
        "HOME": "/root",
        "HTTPS_PROXY": "http://proxy:3128",
        "SSL_CERT_FILE": "/etc/ca.pem",
    }
    s = RegistrySettings(timeout_seconds=7, retries=1)
    env = build_child_env(tmp_path, s, {"MACOSX_DEPLOYMENT_TARGET": "11.0"}, parent)
    assert env["HOME"] == str(tmp_path) and env["NETRC"] == str(tmp_path / "netrc")
    assert env["UV_NO_CONFIG"] == "1" and env["UV_HTTP_TIMEOUT"] == "7"
    assert env["HTTPS_PROXY"] == "http://proxy:3128" and env["SSL_CERT_FILE"] == "/etc/ca.pem"
    assert "UV_INDEX_URL" not in env and "UV_CACHE_DIR" not in env and "PYTHONPATH" not in env
    assert env["MACOSX_DEPLOYMENT_TARGET"] == "11.0"


def test_netrc_round_trips_through_the_stdlib_parser(tmp_path: Path) -> None:
    token = 'a "quoted" \\ token'
    s = RegistrySettings(
        index_url="https://one.example/simple",
        extra_index_urls=("https://two.example/simple", "https://one.example/other"),
        token=token,
    )
    path = tmp_path / "netrc"
    path.write_text(render_netrc(s))
    parsed = netrc.netrc(str(path))
    assert set(parsed.hosts) == {"one.example", "two.example"}
    assert parsed.authenticators("one.example") == ("__token__", "", token)
    assert render_netrc(RegistrySettings()) == ""


def test_settings_are_validated_without_echoing_secrets() -> None:
    with pytest.raises(InvalidArgument, match=r"registry\.index_url") as err:
        validate_settings(RegistrySettings(index_url="ftp://x/simple", token="SECRET"))
    assert "SECRET" not in str(err.value)
    with pytest.raises(InvalidArgument, match="plain http is only allowed for localhost"):
        validate_settings(RegistrySettings(index_url="http://index.example.invalid/simple/"))
    validate_settings(RegistrySettings(index_url="http://127.0.0.1:1/simple", token="t"))


def test_pylock_is_read_strictly() -> None:
    url = "https://f.example/six-1.17.0-py2.py3-none-any.whl"
    digest = "AB" + "cd" * 31
    good = (
        'lock-version = "1.0"\n[[packages]]\nname = "Six"\nversion = "1.17.0"\n'
        f'wheels = [{{ url = "{url}", size = 10, hashes = {{ sha256 = "{digest}" }} }}]\n'
    )
    rank = tag_rank(LINUX, "")
    (wheel,) = parse_pylock(good, {"six"}, "e", rank)
    assert (wheel.name, wheel.version, wheel.size, wheel.requested) == ("six", "1.17.0", 10, True)
    assert wheel.sha256 == "ab" + "cd" * 31 and wheel.filename == "six-1.17.0-py2.py3-none-any.whl"
    with pytest.raises(ResolveError, match="gave no sha256"):
        parse_pylock(good.replace("sha256", "md5"), set(), "e", rank)
    with pytest.raises(ResolveError, match="other than a wheel"):
        bad = good + 'sdist = { url = "https://f.example/six-1.17.0.tar.gz" }\n'
        parse_pylock(bad, set(), "e", rank)
    with pytest.raises(ResolveError, match=r"is not Six 1\.16\.0"):
        parse_pylock(good.replace('version = "1.17.0"', 'version = "1.16.0"'), set(), "e", rank)
    with pytest.raises(ResolveError, match="none of which environment e runs"):
        parse_pylock(good.replace("py2.py3-none-any", "cp311-cp311-win_amd64"), set(), "e", rank)


def test_of_several_fitting_wheels_the_one_the_hosts_prefer_is_taken() -> None:
    # uv lists every wheel that fits the target: both of these fit a glibc 2.28 host.
    def entry(tag: str, digit: str) -> str:
        return (
            f'{{ url = "https://f.example/n-1.0-cp311-cp311-{tag}.whl",'
            f' hashes = {{ sha256 = "{digit * 64}" }} }}'
        )

    text = (
        'lock-version = "1.0"\n[[packages]]\nname = "n"\nversion = "1.0"\n'
        f"wheels = [{entry('manylinux_2_17_x86_64', 'a')}, {entry('manylinux_2_28_x86_64', 'b')}]\n"
    )
    new = Environment("new", TargetEnvironment("3.11", "cp", "cp311", "manylinux_2_28_x86_64"))
    assert parse_pylock(text, set(), "new", tag_rank(new, ""))[0].sha256 == "b" * 64
    assert parse_pylock(text, set(), "linux", tag_rank(LINUX, ""))[0].sha256 == "a" * 64


# --------------------------------------------------------------------------- real uv, real index


async def test_resolves_a_dependency_chain(
    package_index: PackageIndex, chain: dict[str, Path], tmp_path: Path
) -> None:
    wheels = await resolve([("A", "1.0")], settings_for(package_index), NATIVE, tmp_path / "s")
    got = {w.name: w for w in wheels}
    assert set(got) == {"a", "b", "c"}
    assert got["a"].requested and not got["b"].requested and not got["c"].requested
    assert got["c"].version == "3.0"  # the prerelease is not picked for a bare "c"
    for name in ("a", "b", "c"):
        assert got[name].filename == chain[name].name
        assert got[name].sha256 == sha(chain[name])
        assert got[name].url.startswith(package_index.base_url)
    assert list((tmp_path / "s").iterdir()) == []  # scratch removed after success


async def test_markers_are_evaluated_for_the_target_not_the_core(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    # pip evaluates these for the interpreter running pip (pypa/pip#11664); uv for the target.
    build_wheel(
        WheelSpec(
            "app",
            "1.0",
            requires=[
                'backport==1.0; python_version < "3.11"',
                'armonly==1.0; platform_machine == "aarch64"',
            ],
        ),
        wheel_dir,
    )
    build_wheel(WheelSpec("backport", "1.0"), wheel_dir)
    build_wheel(WheelSpec("armonly", "1.0"), wheel_dir)
    s = settings_for(package_index)
    old = await resolve([("app", "1.0")], s, PY310, tmp_path / "a")
    assert {w.name for w in old} == {"app", "backport"}
    new = await resolve([("app", "1.0")], s, LINUX, tmp_path / "b")
    assert {w.name for w in new} == {"app"}
    arm = Environment("arm", TargetEnvironment("3.12", "cp", "cp312", "manylinux_2_28_aarch64"))
    assert {w.name for w in await resolve([("app", "1.0")], s, arm, tmp_path / "c")} == {
        "app",
        "armonly",
    }


def fleet_index(wheel_dir: Path, windows_dep: bool = False) -> None:
    """app -> purelib, native (wheels for cp310 and cp311 x86-64, cp312 aarch64, and cp311
    manylinux_2_28), two marker-dependent dependencies; and with `windows_dep` one for
    Windows only that the index does not have (as a mirror of what a Linux fleet needs)."""
    build_wheel(
        WheelSpec(
            "app",
            "1.0",
            requires=[
                "purelib>=1",
                "native==1.0",
                'backport==1.0; python_version < "3.11"',
                'armonly==1.0; platform_machine == "aarch64"',
                *(['notmirrored==1.0; sys_platform == "win32"'] if windows_dep else []),
            ],
        ),
        wheel_dir,
    )
    for tag in (
        "cp310-cp310-manylinux_2_17_x86_64",
        "cp311-cp311-manylinux_2_17_x86_64",
        "cp311-cp311-manylinux_2_28_x86_64",
        "cp312-cp312-manylinux_2_17_aarch64",
    ):
        build_wheel(WheelSpec("native", "1.0", tag=tag), wheel_dir)
    for name in ("purelib", "backport", "armonly"):
        build_wheel(WheelSpec(name, "1.0"), wheel_dir)


ARM312 = Environment("arm", TargetEnvironment("3.12", "cp", "cp312", "manylinux_2_28_aarch64"))
NEW311 = Environment("new", TargetEnvironment("3.11", "cp", "cp311", "manylinux_2_28_x86_64"))


async def test_one_universal_resolution_picks_what_each_environment_resolves_to(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    fleet_index(wheel_dir)
    s = settings_for(package_index)
    envs = [LINUX, PY310, ARM312, NEW311]
    marker = fleet_marker(envs, native_platform())
    packages = await resolve_universal([("app", "1.0")], s, envs, marker, tmp_path / "u")
    assert list((tmp_path / "u").iterdir()) == []  # scratch removed
    for env in envs:
        picked = select_wheels(env, native_platform(), packages, {"app"})
        alone = await resolve([("app", "1.0")], s, env, tmp_path / env.name)
        assert sorted(picked, key=lambda w: w.name) == sorted(alone, key=lambda w: w.name), env
    by_env = {
        e.name: {w.name: w.filename for w in select_wheels(e, "", packages, {"app"})} for e in envs
    }
    assert set(by_env["py310"]) == {"app", "purelib", "native", "backport"}
    assert set(by_env["arm"]) == {"app", "purelib", "native", "armonly"}
    assert by_env["new"]["native"] == "native-1.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert by_env["linux"]["native"] == "native-1.0-cp311-cp311-manylinux_2_17_x86_64.whl"


async def test_what_the_universal_lockfile_cannot_serve_is_resolved_per_environment(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # uv's universal run needs the metadata of every platform's dependencies, and this index
    # lacks a Windows-only one: each environment is then resolved on its own, and rightly.
    fleet_index(wheel_dir, windows_dep=True)
    s = settings_for(package_index)
    caplog.set_level("INFO", logger="core.install.resolution")
    envs = [LINUX, PY310]
    progress = [EnvProgress(e.name, "pending") for e in envs]
    pins = [("app", "1.0")]
    seen = _Reports(progress)
    locks = await resolve_all(pins, s, envs, "", tmp_path, tmp_path / "c", progress, seen)
    # The universal try, then the first environment alone, then the others: each step recorded.
    assert seen.steps[:2] == [("resolving", "resolving"), ("pending", "pending")]
    assert seen.steps[2:4] == [("resolving", "pending"), ("fetching", "pending")]
    assert seen.steps[-1] == ("fetching", "fetching")
    assert "resolving each environment on its own" in caplog.text
    assert "notmirrored" in caplog.text  # uv's reason, for the operator
    assert [{w.name for w in lock} for lock in locks] == [
        {"app", "purelib", "native"},
        {"app", "purelib", "native", "backport"},
    ]
    assert [p.status for p in progress] == ["fetching", "fetching"]

    # An environment no wheel serves: the lockfile does not answer for it, and the refusal is
    # explained from the index, naming environment and wheel, as with one environment.
    py39 = Environment("py39", TargetEnvironment("3.9", "cp", "cp39", "manylinux_2_17_x86_64"))
    envs = [LINUX, py39, PY310]
    progress = [EnvProgress(e.name, "pending") for e in envs]
    with pytest.raises(ResolveError) as err:
        await resolve_all(pins, s, envs, "", tmp_path, tmp_path / "c", progress, _Reports(progress))
    assert str(err.value).startswith("environment py39: no wheel of native 1.0 for cp39")
    assert (progress[0].status, progress[1].status) == ("fetching", "error")
    assert progress[1].error == str(err.value)


async def test_several_environments_resolve_in_one_universal_run(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet_index(wheel_dir)
    caplog.set_level("INFO", logger="core.install.resolution")
    progress = [EnvProgress(e.name, "pending") for e in (LINUX, PY310)]
    s = settings_for(package_index)
    envs = [LINUX, PY310]
    seen = _Reports(progress)
    locks = await resolve_all(
        [("app", "1.0")], s, envs, "", tmp_path, tmp_path / "c", progress, seen
    )
    assert "resolved 2 environments in one universal resolution" in caplog.text
    assert [len(lock) for lock in locks] == [3, 4]
    assert seen.steps == [("resolving", "resolving"), ("fetching", "fetching")]
    assert [p.status for p in progress] == ["fetching", "fetching"]


class _Reports:
    """What resolve_all recorded: every environment's status at each report."""

    def __init__(self, progress: list[EnvProgress]) -> None:
        self.progress = progress
        self.steps: list[tuple[str, ...]] = []

    async def __call__(self) -> None:
        self.steps.append(tuple(p.status for p in self.progress))


async def test_empty_allowlist_runs_nothing(tmp_path: Path) -> None:
    s = RegistrySettings(index_url="http://127.0.0.1:9/simple")
    assert await resolve([], s, NATIVE, tmp_path / "s") == []
    assert not (tmp_path / "s").exists()


async def test_bad_pin_is_refused_before_uv_runs(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"requirements\[0\]"):
        await resolve([("--index-url=http://evil", "1.0")], RegistrySettings(), NATIVE, tmp_path)


async def test_platform_only_wheel_names_package_environment_and_what_exists(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("winonly", "1.0", tag="cp311-cp311-win_amd64"), wheel_dir)
    s = settings_for(package_index)
    with pytest.raises(ResolveError) as err:
        await resolve([("winonly", "1.0")], s, LINUX, tmp_path)
    assert str(err.value) == (
        "environment linux: no wheel of winonly 1.0 for cp311 manylinux_2_17_x86_64"
        " (environment linux); the index has wheels for: cp311-cp311-win_amd64; add a wheel"
        " for this environment or change the pin"
    )
    # ... and the same index serves it to a Windows target.
    (wheel,) = await resolve([("winonly", "1.0")], s, WIN, tmp_path)
    assert wheel.filename == "winonly-1.0-cp311-cp311-win_amd64.whl"


async def test_transitive_platform_only_wheel_names_the_dependency(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("top", "1.0", requires=["winonly>=1"]), wheel_dir)
    build_wheel(WheelSpec("winonly", "1.0", tag="cp311-cp311-win_amd64"), wheel_dir)
    with pytest.raises(ResolveError, match=r"no wheel of winonly 1\.0 for cp311"):
        await resolve([("top", "1.0")], settings_for(package_index), LINUX, tmp_path)


async def test_sdist_only_package_is_refused_and_never_built(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "build-ran"
    build_sdist("sdonly", "1.0", wheel_dir, setup_marker=marker)
    with pytest.raises(ResolveError) as err:
        await resolve([("sdonly", "1.0")], settings_for(package_index), NATIVE, tmp_path / "s")
    assert "'sdonly' 1.0 is only published as a source distribution" in str(err.value)
    assert "building them runs code from the index on the core" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "a-dependency"])
async def test_no_resolver_path_builds_an_sdist(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path, pinned: bool
) -> None:
    # Several environments take the universal run first, then the per-environment runs that
    # explain a refusal: neither may run the sdist's setup.py, pinned or pulled in.
    marker = tmp_path / "build-ran"
    build_sdist("sdonly", "1.0", wheel_dir, setup_marker=marker)
    build_wheel(WheelSpec("usesit", "1.0", requires=["sdonly==1.0"]), wheel_dir)
    pins = [("sdonly", "1.0")] if pinned else [("usesit", "1.0")]
    s = settings_for(package_index)
    envs = [LINUX, PY310]
    with pytest.raises(ResolveError):
        await resolve_universal(pins, s, envs, fleet_marker(envs, ""), tmp_path / "u")
    progress = [EnvProgress(e.name, "pending") for e in envs]
    with pytest.raises(ResolveError) as err:
        await resolve_all(pins, s, envs, "", tmp_path, tmp_path / "c", progress, _Reports(progress))
    assert str(err.value).startswith("environment linux: ")
    assert "'sdonly' 1.0 is only published as a source distribution" in str(err.value)
    assert not marker.exists()


async def test_requires_python_mismatch_is_explained(
    static_index: StaticIndex, tmp_path: Path
) -> None:
    # pypiserver does not publish data-requires-python, so serve a static PEP 503 tree.
    wheel = build_wheel(WheelSpec("newpy", "1.0"), static_index.packages)
    static_index.publish("newpy", wheel, attrs='data-requires-python="&gt;=3.99"')
    with pytest.raises(ResolveError) as err:
        await resolve([("newpy", "1.0")], settings_for(static_index), NATIVE, tmp_path / "s")
    message = str(err.value)
    assert message.startswith("environment default: the index cannot satisfy the allowlist:")
    assert "newpy==1.0" in message and "3.99" in message


async def test_conflicting_pins_name_the_cause(
    package_index: PackageIndex, chain: dict[str, Path], wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("needsc", "1.0", requires=["c==3.0"]), wheel_dir)
    pins = [("needsc", "1.0"), ("c", "3.1rc1")]
    with pytest.raises(ResolveError) as err:
        await resolve(pins, settings_for(package_index), NATIVE, tmp_path)
    message = str(err.value)
    assert message.startswith("environment default: the index cannot satisfy the allowlist:")
    assert "needsc==1.0" in message and "c==3.0" in message and "3.1rc1" in message


async def test_unknown_package(
    package_index: PackageIndex, chain: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ResolveError) as err:
        await resolve([("nosuch", "1.0")], settings_for(package_index), NATIVE, tmp_path / "s")
    assert str(err.value) == (
        f"environment default: package 'nosuch' was not found on the index {package_index.url}"
    )
    assert list((tmp_path / "s").iterdir()) == []  # scratch removed after failure


async def test_unknown_version_lists_available_ones(
    package_index: PackageIndex, chain: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ResolveError) as err:
        await resolve([("c", "9.9")], settings_for(package_index), NATIVE, tmp_path)
    assert "version 9.9 of 'c' is not on the index" in str(err.value)
    assert str(err.value).endswith("; available: 3.1rc1, 3.0")


async def test_closed_port_is_a_registry_error_quickly(tmp_path: Path) -> None:
    with socket.socket() as s:  # bound, never listening: connection refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/simple/"
        started = time.monotonic()
        settings = RegistrySettings(index_url=url, retries=0)
        with pytest.raises(RegistryError, match="is unreachable"):
            await resolve([("c", "3.0")], settings, NATIVE, tmp_path)
    assert time.monotonic() - started < 20


async def test_silent_index_times_out(tmp_path: Path) -> None:
    with socket.socket() as s:  # listening but never accepting: the request hangs
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/simple/"
        settings = RegistrySettings(index_url=url, timeout_seconds=1, retries=0)
        with pytest.raises(RegistryError, match=r"unreachable.*timed out"):
            await resolve([("c", "3.0")], settings, NATIVE, tmp_path)
        # An overall deadline kills uv even when every socket op stays under its timeout.
        slow = RegistrySettings(index_url=url, timeout_seconds=30, retries=0)
        with pytest.raises(RegistryError, match="did not finish within"):
            await resolve([("c", "3.0")], slow, NATIVE, tmp_path / "d", deadline_seconds=1.5)
        assert list((tmp_path / "d").iterdir()) == []


def _pids_with(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            status = (proc / "status").read_text()
        except OSError:
            continue
        if marker.encode() in cmd and "State:\tZ" not in status:
            pids.append(int(proc.name))
    return pids


async def test_cancel_kills_uv_and_removes_scratch(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/simple/"
        settings = RegistrySettings(index_url=url, timeout_seconds=60, retries=0, token="t")
        task = asyncio.create_task(resolve([("c", "3.0")], settings, NATIVE, scratch))
        await eventually_async(lambda: _pids_with(str(scratch)), timeout=10, interval=0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # uv itself is killed and reaped before the cancel returns (_run waits for it). Once, on a
    # loaded CI machine, a process with the scratch path in its command line was still alive
    # right after: one uv had started (its interpreter probe), which ends on its own.
    await eventually_async(lambda: _pids_with(str(scratch)) == [], timeout=10, interval=0.05)
    assert list(scratch.iterdir()) == []


async def test_auth_index(
    auth_package_index: PackageIndex, chain: dict[str, Path], tmp_path: Path
) -> None:
    token = auth_package_index.token
    assert token
    ok = await resolve(
        [("a", "1.0")], settings_for(auth_package_index, token=token), NATIVE, tmp_path
    )
    assert {w.name for w in ok} == {"a", "b", "c"}

    with pytest.raises(RegistryError) as missing:
        await resolve([("a", "1.0")], settings_for(auth_package_index), NATIVE, tmp_path)
    assert "the index rejected the credentials (HTTP 401)" in str(missing.value)

    wrong = settings_for(auth_package_index, token=token + "-wrong")
    with pytest.raises(RegistryError) as rejected:
        await resolve([("a", "1.0")], wrong, NATIVE, tmp_path)
    # pypiserver answers 403 (not 401) when credentials are present but wrong.
    assert "the index rejected the credentials (HTTP 40" in str(rejected.value)
    assert token not in str(rejected.value) and "wrong" not in str(rejected.value)


async def test_host_uv_config_and_env_do_not_leak(
    package_index: PackageIndex,
    chain: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoy_dir = tmp_path / "decoy"
    build_wheel(WheelSpec("c", "9.9"), decoy_dir)
    build_wheel(WheelSpec("decoy", "1.0"), decoy_dir)
    with PackageIndex(decoy_dir) as decoy:
        config = tmp_path / "xdg" / "uv"
        config.mkdir(parents=True)
        (config / "uv.toml").write_text(f'extra-index-url = ["{decoy.url}"]\n')
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("UV_FIND_LINKS", str(decoy_dir))
        monkeypatch.setenv("UV_INDEX_URL", decoy.url)
        monkeypatch.setenv("UV_EXTRA_INDEX_URL", decoy.url)
        monkeypatch.setenv("UV_INDEX", decoy.url)
        monkeypatch.setenv("UV_CONFIG_FILE", str(config / "uv.toml"))
        monkeypatch.setenv("PIP_INDEX_URL", decoy.url)
        s = settings_for(package_index)
        for pin in (("c", "9.9"), ("decoy", "1.0")):
            with pytest.raises(ResolveError, match=f"'{pin[0]}'"):
                await resolve([pin], s, NATIVE, tmp_path / "s")
        wheels = await resolve([("a", "1.0")], s, NATIVE, tmp_path / "s")
        # c 9.9 lives only on the decoy: every file is the real index's.
        assert {w.filename: w.sha256 for w in wheels} == {
            chain[n].name: sha(chain[n]) for n in ("a", "b", "c")
        }


def _watch_uv(stop: threading.Event, seen: list[tuple[str, dict[str, str]]]) -> None:
    """Collect (cmdline, environ) of every `uv pip compile` process until `stop` is set."""
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if "pip compile" not in cmd or any(c == cmd for c, _ in seen):
                    continue
                raw = (proc / "environ").read_bytes().split(b"\0")
                env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
                seen.append((cmd, env))
            except (OSError, ValueError):
                continue
        time.sleep(0.005)


@pytest.fixture
def uv_watcher() -> Iterator[list[tuple[str, dict[str, str]]]]:
    seen: list[tuple[str, dict[str, str]]] = []
    stop = threading.Event()
    thread = threading.Thread(target=_watch_uv, args=(stop, seen), daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join()


async def test_token_never_reaches_argv_or_env(
    auth_package_index: PackageIndex,
    chain: dict[str, Path],
    tmp_path: Path,
    uv_watcher: list[tuple[str, dict[str, str]]],
) -> None:
    token = auth_package_index.token
    assert token
    await resolve([("a", "1.0")], settings_for(auth_package_index, token=token), NATIVE, tmp_path)
    assert uv_watcher, "the /proc watcher never saw uv running"
    for cmd, env in uv_watcher:
        assert token not in cmd and "__token__" not in cmd
        assert token not in " ".join(env.values())
        assert not {k for k in env if k.startswith("PYTHON")}
        assert {k for k in env if k.startswith("UV_")} <= {
            "UV_NO_CONFIG",
            "UV_HTTP_TIMEOUT",
            "UV_HTTP_RETRIES",
            "UV_CONCURRENT_DOWNLOADS",
        }
        assert env["GRPC_ENABLE_FORK_SUPPORT"] == "false"


async def test_scratch_is_private_while_uv_runs(
    package_index: PackageIndex,
    chain: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    modes: dict[str, int] = {}
    real_run = uv_resolver._run

    async def spy(
        argv: list[str], env: dict[str, str], cwd: Path, deadline: float
    ) -> tuple[int, str]:
        modes.update({p.name: p.stat().st_mode & 0o777 for p in [cwd, *cwd.iterdir()]})
        return await real_run(argv, env, cwd, deadline)

    monkeypatch.setattr(uv_resolver, "_run", spy)
    s = settings_for(package_index, token="t0k")  # a token so the netrc exists
    await resolve([("a", "1.0")], s, NATIVE, tmp_path / "scratch")
    scratch_name = next(n for n in modes if n.startswith("resolve-"))
    assert modes[scratch_name] == 0o700
    assert modes["netrc"] == 0o600 and modes["requirements.txt"] == 0o600
    assert list((tmp_path / "scratch").iterdir()) == []
