"""core/install/pip_resolver.py: pip resolution against a real pypiserver on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import netrc
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import core.install.pip_resolver as registry
from core.install.pip_downloads import ResolvedWheel
from core.install.pip_failures import classify_failure, needs_debug_log
from core.install.pip_resolver import (
    RegistrySettings,
    build_child_env,
    build_pip_argv,
    render_netrc,
    resolve,
    validate_settings,
)
from shared.errors import IntegrityError, InvalidArgument, RegistryError, ResolveError
from shared.manifest import TargetEnvironment
from tests.index_server import PackageIndex, StaticIndex
from tests.wheelfactory import WheelSpec, build_sdist, build_wheel

WIN = TargetEnvironment("3.11", "cp", "cp311", "win_amd64")
LINUX = TargetEnvironment("3.11", "cp", "cp311", "manylinux_2_17_x86_64")


def settings_for(index: PackageIndex, **kw: object) -> RegistrySettings:
    return RegistrySettings(index_url=index.url, timeout_seconds=5, **kw)  # type: ignore[arg-type]


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
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def resolve_to(
    pins: list[tuple[str, str]],
    settings: RegistrySettings,
    environment: TargetEnvironment | None,
    scratch_parent: Path,
    **kw: float,
) -> list[ResolvedWheel]:
    """resolve() into a fresh dest dir beside the scratch parent (which tests expect empty)."""
    dest = Path(tempfile.mkdtemp(prefix="dest-", dir=scratch_parent.parent))
    return await resolve(pins, settings, environment, scratch_parent, dest, **kw)


# --------------------------------------------------------------------------- pure parts


def test_build_pip_argv_is_exact_and_carries_no_secret(tmp_path: Path) -> None:
    s = RegistrySettings(
        index_url="https://idx.example/simple",
        extra_index_urls=("https://extra.example/simple",),
        username="bob",
        token="tok-SECRET",
        timeout_seconds=7,
    )
    argv = build_pip_argv(
        s,
        LINUX,
        requirements_file=tmp_path / "r.txt",
        download_dir=tmp_path / "dl",
        log_file=tmp_path / "pip.log",
        python="/py",
    )
    assert argv[:4] == ["/py", "-m", "pip", "download"]
    for flag in ("--isolated", "--no-cache-dir", "--no-input", "--no-color"):
        assert flag in argv
    assert "--disable-pip-version-check" in argv and "--only-binary=:all:" in argv
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1)}
    assert pairs["--index-url"] == "https://idx.example/simple"
    assert pairs["--extra-index-url"] == "https://extra.example/simple"
    assert pairs["--timeout"] == "7"
    assert pairs["--python-version"] == "3.11" and pairs["--implementation"] == "cp"
    assert pairs["--abi"] == "cp311" and pairs["--platform"] == "manylinux_2_17_x86_64"
    assert pairs["--dest"] == str(tmp_path / "dl") and pairs["--log"] == str(tmp_path / "pip.log")
    assert pairs["--progress-bar"] == "off" and "--quiet" not in argv  # its INFO lines are read
    assert argv[-2:] == ["-r", str(tmp_path / "r.txt")]
    joined = " ".join(argv)
    assert "SECRET" not in joined and "bob" not in joined

    native = build_pip_argv(
        RegistrySettings(),
        TargetEnvironment("3.11"),  # no platform: the core's own tags, no target flags
        requirements_file=Path("r"),
        download_dir=Path("p"),
    )
    assert native[0] == sys.executable
    assert not {"--platform", "--python-version", "--abi", "--extra-index-url"} & set(native)
    assert "--log" not in native  # pip's debug log is asked for only to explain a failure


def test_child_env_is_built_from_scratch(tmp_path: Path) -> None:
    parent = {
        "PATH": "/usr/bin",
        "PIP_FIND_LINKS": "/decoy",
        "PIP_INDEX_URL": "http://decoy/simple",
        "PYTHONPATH": "/decoy",
        "HOME": "/root",
        "SECRET_THING": "x",
        "https_proxy": "http://proxy:3128",
    }
    env = build_child_env(tmp_path, parent)
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "HOME": str(tmp_path),
        "NETRC": str(tmp_path / "netrc"),
        "TMPDIR": str(tmp_path / "tmp"),
        "PIP_CONFIG_FILE": os.devnull,
        "GRPC_ENABLE_FORK_SUPPORT": "false",
        "https_proxy": "http://proxy:3128",
    }


def test_netrc_round_trips_through_the_stdlib_parser(tmp_path: Path) -> None:
    token = 'we"ird\\tok#en with space'
    s = RegistrySettings(
        index_url="https://a.example:8443/simple",
        extra_index_urls=("https://b.example/s",),
        token=token,
    )
    path = tmp_path / "netrc"
    path.write_text(render_netrc(s))
    parsed = netrc.netrc(str(path))
    assert parsed.authenticators("a.example") == ("__token__", "", token)
    assert parsed.authenticators("b.example") == ("__token__", "", token)
    assert render_netrc(RegistrySettings()) == ""
    assert 'login "bob"' in render_netrc(RegistrySettings(username="bob", token="t"))


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (RegistrySettings(index_url="https://u:p@idx.example/simple"), "registry.index_url"),
        (RegistrySettings(index_url="file:///opt/pypi/simple"), "registry.index_url"),
        (RegistrySettings(extra_index_urls=("ftp://x",)), "registry.extra_index_urls[0]"),
        (RegistrySettings(token="line\nbreak-SECRET"), "registry.token"),
        (RegistrySettings(timeout_seconds=0), "registry.timeout_seconds"),
    ],
)
def test_settings_are_validated_without_echoing_secrets(
    settings: RegistrySettings, field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_settings(settings)
    assert err.value.field == field
    assert "SECRET" not in str(err.value)


def test_token_is_not_in_repr() -> None:
    assert "tok-SECRET" not in repr(RegistrySettings(token="tok-SECRET"))


def test_debug_log_is_asked_for_only_when_nothing_else_explains_a_miss() -> None:
    miss = "ERROR: No matching distribution found for c==3.0\n"
    assert needs_debug_log("Collecting c==3.0\n", miss)  # tags or sdists: debug level only
    fetch = "Could not fetch URL https://idx/simple/c/: connection error: refused - skipping\n"
    assert not needs_debug_log(fetch, miss)
    assert not needs_debug_log("", "ERROR: 401 Client Error: Unauthorized for url\n" + miss)
    assert not needs_debug_log("", "ERROR: Cannot install a and b (conflicting dependencies)\n")


def test_classify_failure_scrubs_the_token() -> None:
    s = RegistrySettings(token="tok-SECRET")
    stderr = "ERROR: something odd tok-SECRET happened\nERROR: https://u:tok-SECRET@h/x\n"
    err = classify_failure(1, stderr, "", s, None)
    assert isinstance(err, ResolveError)
    assert "tok-SECRET" not in str(err) and "something odd" in str(err)


NO_MATCH = (
    "ERROR: Could not find a version that satisfies the requirement c==3.0 (from versions: none)\n"
    "ERROR: No matching distribution found for c==3.0\n"
)


@pytest.mark.parametrize(
    ("log_line", "expected"),
    [  # lines captured from pip 26.3's --log output
        (
            "Could not fetch URL https://idx.example/simple/c/: connection error: Failed to "
            "resolve IP address for 'idx.example' ([Errno -2] Name or service not known)"
            " - skipping",
            "the index https://idx.example/simple is unreachable: connection error: Failed to "
            "resolve IP address",
        ),
        (
            "Could not fetch URL https://idx.example/simple/c/: 503 Server Error: Service "
            "Unavailable for url: https://idx.example/simple/c/ - skipping",
            "the index https://idx.example/simple is unreachable: 503 Server Error",
        ),
    ],
)
def test_classify_network_failures(log_line: str, expected: str) -> None:
    s = RegistrySettings(index_url="https://idx.example/simple")
    err = classify_failure(1, NO_MATCH, f"2026-01-01T00:00:00,000 {log_line}\n", s, None)
    assert isinstance(err, RegistryError)
    assert str(err).startswith(expected)


# --------------------------------------------------------------------------- real pip, real index


async def test_resolves_a_dependency_chain(
    package_index: PackageIndex, chain: dict[str, Path], tmp_path: Path
) -> None:
    wheels = await resolve_to(
        [("A", "1.0")], settings_for(package_index), None, tmp_path / "scratch"
    )
    got = {w.name: w for w in wheels}
    assert set(got) == {"a", "b", "c"}
    assert got["a"].requested and not got["b"].requested and not got["c"].requested
    assert got["c"].version == "3.0"  # the prerelease is not picked for a bare "c"
    for name in ("a", "b", "c"):
        assert got[name].filename == chain[name].name
        assert got[name].sha256 == sha(chain[name])
        assert got[name].size == chain[name].stat().st_size
        assert got[name].path.read_bytes() == chain[name].read_bytes()  # pip's download, kept
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch removed after success


async def test_empty_allowlist_runs_nothing(tmp_path: Path) -> None:
    assert (
        await resolve_to(
            [], RegistrySettings(index_url="http://127.0.0.1:9/simple"), None, tmp_path / "s"
        )
        == []
    )
    assert not (tmp_path / "s").exists()


async def test_bad_pin_is_refused_before_pip_runs(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"requirements\[0\]"):
        await resolve_to([("--index-url=http://evil", "1.0")], RegistrySettings(), None, tmp_path)


async def test_platform_only_wheel_names_package_and_environment(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("winonly", "1.0", tag="cp311-cp311-win_amd64"), wheel_dir)
    s = settings_for(package_index)
    with pytest.raises(ResolveError) as err:
        await resolve_to([("winonly", "1.0")], s, LINUX, tmp_path)
    msg = str(err.value)
    assert "no wheel of 'winonly' 1.0 fits the target environment" in msg
    assert "manylinux_2_17_x86_64" in msg and "cp311-cp311-win_amd64" in msg
    assert "not installed because building them runs code" in msg
    with pytest.raises(ResolveError, match="winonly"):
        await resolve_to([("winonly", "1.0")], s, None, tmp_path)  # native linux core
    # ... and the same index serves it to a Windows target.
    (wheel,) = await resolve_to([("winonly", "1.0")], s, WIN, tmp_path)
    assert wheel.filename == "winonly-1.0-cp311-cp311-win_amd64.whl"


async def test_transitive_platform_only_wheel_names_the_dependency(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("top", "1.0", requires=["winonly>=1"]), wheel_dir)
    build_wheel(WheelSpec("winonly", "1.0", tag="cp311-cp311-win_amd64"), wheel_dir)
    with pytest.raises(ResolveError, match="no wheel of 'winonly'"):
        await resolve_to([("top", "1.0")], settings_for(package_index), LINUX, tmp_path)


async def test_sdist_only_package_is_refused(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    build_sdist("sdonly", "1.0", wheel_dir)
    with pytest.raises(ResolveError) as err:
        await resolve_to([("sdonly", "1.0")], settings_for(package_index), None, tmp_path)
    assert "'sdonly' 1.0 is only published as a source distribution" in str(err.value)
    assert "sdists) are not installed because building them runs code" in str(err.value)


async def test_requires_python_mismatch_is_explained(
    static_index: StaticIndex, tmp_path: Path
) -> None:
    # pypiserver does not publish data-requires-python, so serve a static PEP 503 tree.
    wheel = build_wheel(WheelSpec("newpy", "1.0"), static_index.packages)
    static_index.publish("newpy", wheel, attrs='data-requires-python="&gt;=3.99"')
    with pytest.raises(ResolveError) as err:
        settings = RegistrySettings(index_url=static_index.url)
        await resolve_to([("newpy", "1.0")], settings, None, tmp_path / "s")
    assert "'newpy' 1.0 cannot be installed" in str(err.value)
    assert "require a different python version: 1.0 Requires-Python >=3.99" in str(err.value)


async def test_bytes_that_differ_from_the_published_hash_are_refused(
    static_index: StaticIndex, tmp_path: Path
) -> None:
    # The page promises one sha256, the file server delivers other bytes (a tampered mirror).
    wheel = build_wheel(WheelSpec("hm", "1.0"), static_index.packages)
    static_index.publish("hm", wheel, sha256="ab" * 32)
    with pytest.raises(IntegrityError) as err:
        settings = RegistrySettings(index_url=static_index.url)
        await resolve_to([("hm", "1.0")], settings, None, tmp_path / "s")
    assert str(err.value) == (
        f"hm==1.0: the index publishes sha256 {'ab' * 32} for {wheel.name} but served bytes"
        f" with sha256 {sha(wheel)}; refusing a tampered or corrupt download"
    )


async def test_conflicting_pins_name_the_cause(
    package_index: PackageIndex, chain: dict[str, Path], wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("needsc", "1.0", requires=["c==3.0"]), wheel_dir)
    pins = [("needsc", "1.0"), ("c", "3.1rc1")]
    with pytest.raises(ResolveError) as err:
        await resolve_to(pins, settings_for(package_index), None, tmp_path)
    assert str(err.value) == (
        "the allowlist has conflicting dependencies: "
        "The user requested c==3.1rc1; needsc 1.0 depends on c==3.0"
    )


async def test_unknown_package(
    package_index: PackageIndex, chain: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ResolveError) as err:
        await resolve_to([("nosuch", "1.0")], settings_for(package_index), None, tmp_path / "s")
    assert str(err.value) == f"package 'nosuch' was not found on the index {package_index.url}"
    assert list((tmp_path / "s").iterdir()) == []  # scratch removed after failure


async def test_unknown_version_lists_available_ones(
    package_index: PackageIndex, chain: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ResolveError) as err:
        await resolve_to([("c", "9.9")], settings_for(package_index), None, tmp_path)
    assert "version 9.9 of 'c' is not on the index" in str(err.value)
    assert str(err.value).endswith(": 3.1rc1, 3.0")


async def test_closed_port_is_a_registry_error_quickly(tmp_path: Path) -> None:
    with socket.socket() as s:  # bound, never listening: connection refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/simple/"
        started = time.monotonic()
        with pytest.raises(RegistryError, match="is unreachable"):
            await resolve_to([("c", "3.0")], RegistrySettings(index_url=url), None, tmp_path)
    assert time.monotonic() - started < 10


async def test_plain_http_to_a_remote_host_is_explained(tmp_path: Path) -> None:
    # pip drops a non-local http index before connecting (no network is touched here).
    settings = RegistrySettings(index_url="http://index.example.invalid/simple/")
    with pytest.raises(RegistryError, match="plain http is only allowed for localhost"):
        await resolve_to([("c", "3.0")], settings, None, tmp_path)


async def test_silent_index_times_out(tmp_path: Path) -> None:
    with socket.socket() as s:  # listening but never accepting: the request hangs
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/simple/"
        settings = RegistrySettings(index_url=url, timeout_seconds=1, retries=0)
        with pytest.raises(RegistryError, match="didn't respond within"):
            await resolve_to([("c", "3.0")], settings, None, tmp_path)
        # An overall deadline kills pip even when every socket op stays under its timeout.
        slow = RegistrySettings(index_url=url, timeout_seconds=30, retries=0)
        with pytest.raises(RegistryError, match="did not finish within"):
            await resolve_to([("c", "3.0")], slow, None, tmp_path / "d", deadline_seconds=1.5)
        assert list((tmp_path / "d").iterdir()) == []


async def test_cancel_kills_pip_and_removes_scratch(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/simple/"
        settings = RegistrySettings(index_url=url, timeout_seconds=60, retries=0, token="t")
        task = asyncio.create_task(resolve_to([("c", "3.0")], settings, None, scratch))
        deadline = time.monotonic() + 10
        while not _pip_pids(str(scratch)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert _pip_pids(str(scratch)), "pip never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert _pip_pids(str(scratch)) == []
    assert list(scratch.iterdir()) == []


def _pip_pids(marker: str) -> list[int]:
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


async def test_auth_index(
    auth_package_index: PackageIndex, chain: dict[str, Path], tmp_path: Path
) -> None:
    token = auth_package_index.token
    assert token
    ok = await resolve_to(
        [("a", "1.0")], settings_for(auth_package_index, token=token), None, tmp_path
    )
    assert {w.name for w in ok} == {"a", "b", "c"}

    with pytest.raises(RegistryError) as missing:
        await resolve_to([("a", "1.0")], settings_for(auth_package_index), None, tmp_path)
    assert "the index rejected the credentials (HTTP 401)" in str(missing.value)

    wrong = settings_for(auth_package_index, token=token + "-wrong")
    with pytest.raises(RegistryError) as rejected:
        await resolve_to([("a", "1.0")], wrong, None, tmp_path)
    # pypiserver answers 403 (not 401) when credentials are present but wrong.
    assert "the index rejected the credentials (HTTP 40" in str(rejected.value)
    assert token not in str(rejected.value) and "wrong" not in str(rejected.value)


async def test_host_pip_config_and_env_do_not_leak(
    package_index: PackageIndex,
    chain: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoy_dir = tmp_path / "decoy"
    build_wheel(WheelSpec("c", "9.9"), decoy_dir)
    build_wheel(WheelSpec("decoy", "1.0"), decoy_dir)
    with PackageIndex(decoy_dir) as decoy:
        conf = tmp_path / "pip.conf"
        conf.write_text(f"[global]\nextra-index-url = {decoy.url}\nfind-links = {decoy_dir}\n")
        monkeypatch.setenv("PIP_FIND_LINKS", str(decoy_dir))
        monkeypatch.setenv("PIP_INDEX_URL", decoy.url)
        monkeypatch.setenv("PIP_EXTRA_INDEX_URL", decoy.url)
        monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
        monkeypatch.setenv("PIP_NO_INDEX", "1")
        s = settings_for(package_index)
        for pin in (("c", "9.9"), ("decoy", "1.0")):
            with pytest.raises(ResolveError, match=f"'{pin[0]}'"):
                await resolve_to([pin], s, None, tmp_path)
        wheels = await resolve_to([("a", "1.0")], s, None, tmp_path)
        # c 9.9 lives only on the decoy: every file is the real index's.
        assert {w.filename: w.sha256 for w in wheels} == {
            chain[n].name: sha(chain[n]) for n in ("a", "b", "c")
        }


def _watch_pip(stop: threading.Event, seen: list[tuple[str, dict[str, str]]]) -> None:
    """Collect (cmdline, environ) of every `pip download` process until `stop` is set."""
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if "pip download" not in cmd or any(c == cmd for c, _ in seen):
                    continue
                raw = (proc / "environ").read_bytes().split(b"\0")
                env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
                seen.append((cmd, env))
            except (OSError, ValueError):
                continue
        time.sleep(0.01)


@pytest.fixture
def pip_watcher() -> Iterator[list[tuple[str, dict[str, str]]]]:
    seen: list[tuple[str, dict[str, str]]] = []
    stop = threading.Event()
    thread = threading.Thread(target=_watch_pip, args=(stop, seen), daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join()


async def test_token_never_reaches_argv_or_env(
    auth_package_index: PackageIndex,
    chain: dict[str, Path],
    tmp_path: Path,
    pip_watcher: list[tuple[str, dict[str, str]]],
) -> None:
    token = auth_package_index.token
    assert token
    await resolve_to([("a", "1.0")], settings_for(auth_package_index, token=token), None, tmp_path)
    assert pip_watcher, "the /proc watcher never saw pip running"
    for cmd, env in pip_watcher:
        assert token not in cmd and "__token__" not in cmd
        assert token not in " ".join(env.values())
        assert not {k for k in env if k.startswith("PYTHON")}
        assert {k for k in env if k.startswith("PIP_")} == {"PIP_CONFIG_FILE"}
        assert env["GRPC_ENABLE_FORK_SUPPORT"] == "false"


async def test_scratch_is_private_while_pip_runs(
    package_index: PackageIndex,
    chain: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    modes: dict[str, int] = {}
    real_run = registry._run_pip

    async def spy(
        argv: list[str], env: dict[str, str], cwd: Path, deadline: float
    ) -> tuple[int, str]:
        modes.update({p.name: p.stat().st_mode & 0o777 for p in [cwd, *cwd.iterdir()]})
        return await real_run(argv, env, cwd, deadline)

    monkeypatch.setattr(registry, "_run_pip", spy)
    s = settings_for(package_index, token="t0k")  # a token so the netrc exists
    await resolve_to([("a", "1.0")], s, None, tmp_path / "scratch")
    scratch_name = next(n for n in modes if n.startswith("resolve-"))
    assert modes[scratch_name] == 0o700
    assert modes["netrc"] == 0o600 and modes["requirements.txt"] == 0o600
    assert list((tmp_path / "scratch").iterdir()) == []
