"""Resolve the allowlist with `uv pip compile`, read back as PEP 751 pylock.

    resolve_environment()   I/O: private scratch dir, one uv run for one environment
    resolve_universal()     I/O: the same, one run for every environment (core/install/universal.py)
      uv_platform()         pure: a wheel platform tag -> uv's --python-platform target
      build_uv_argv()       pure: the exact command line (never carries a secret)
      build_child_env()     pure: the minimal environment uv runs in
      render_netrc()        pure: the only place the token is written down
    core/install/pylock.py reads the lockfile uv writes.

Why uv and not pip (docs/resolver.md has the measurements): pip's --python-version/--platform
change only the wheel tags and still evaluate environment markers for the interpreter running
pip (pypa/pip#11664), so `tomli; python_version < "3.11"` is resolved wrongly for a foreign
target; uv evaluates markers for the target. And uv writes a structured lockfile naming every
wheel with its URL and sha256, so nothing parses a resolver's English to learn what it chose.

uv only resolves: it reads metadata (PEP 658 files, or ranges of the wheel), never installs, and
with `--only-binary :all:` never builds an sdist, so no index code runs on the core. The core
downloads and checks every wheel itself (core/install/fetch.py, installer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from core.install.pylock import LockedPackage, LockedWheel, parse_pylock, read_packages
from core.state.index_config import RegistrySettings, validate_settings
from shared.environments import Environment, tag_rank
from shared.errors import InvalidArgument, RegistryError, ResolveError, StoreError
from shared.names import exact_version, normalize_name

# Network plumbing a host may need to reach its index at all; none of these name package sources.
_PASSTHROUGH_ENV = (
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR",
)  # fmt: skip
# uv's --python-platform knows these glibc versions (uv 0.13); a tag between two of them is
# resolved for the older one, which a newer host always runs too.
_UV_GLIBC = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
_MANYLINUX = re.compile(r"^manylinux_2_(\d+)_(x86_64|aarch64)$")
_LEGACY = {"manylinux2014": 17}
_MUSL = re.compile(r"^musllinux_1_(\d+)_(x86_64|aarch64)$")
_MACOS = re.compile(r"^macosx_(\d+)_(\d+)_(x86_64|arm64)$")
_WINDOWS = {
    "win_amd64": "x86_64-pc-windows-msvc",
    "win_arm64": "aarch64-pc-windows-msvc",
    "win32": "i686-pc-windows-msvc",
}
CHILD_GUARD = Path(__file__).with_name("child_guard.py")


# --------------------------------------------------------------------------- pure builders


def uv_platform(tag: str) -> tuple[str, dict[str, str]]:
    """uv's --python-platform for a wheel platform tag, and environment it needs (macOS)."""
    if tag.startswith("manylinux2014_"):
        tag = f"manylinux_2_{_LEGACY['manylinux2014']}_{tag.removeprefix('manylinux2014_')}"
    if m := _MANYLINUX.match(tag):
        minor, arch = int(m.group(1)), m.group(2)
        usable = [v for v in _UV_GLIBC if v <= minor]
        if usable:
            return f"{arch}-manylinux_2_{usable[-1]}", {}
        raise InvalidArgument(
            "environment.platform",
            f"{tag}: glibc older than 2.17 (manylinux2014) cannot be resolved for",
        )
    if m := _MUSL.match(tag):
        if int(m.group(1)) < 2:
            raise InvalidArgument(
                "environment.platform", f"{tag}: musllinux older than 1.2 cannot be resolved for"
            )
        return f"{m.group(2)}-unknown-linux-musl", {}
    if m := _MACOS.match(tag):
        arch = "aarch64" if m.group(3) == "arm64" else "x86_64"
        return f"{arch}-apple-darwin", {"MACOSX_DEPLOYMENT_TARGET": f"{m.group(1)}.{m.group(2)}"}
    if tag in _WINDOWS:
        return _WINDOWS[tag], {}
    raise InvalidArgument(
        "environment.platform",
        f"{tag}: the resolver (uv) targets manylinux_2_17+ and musllinux_1_2+ on x86_64 and"
        " aarch64, macOS (x86_64, arm64) and Windows; this platform cannot be resolved for",
    )


def resolution_target(env: Environment, native: str) -> str:
    """The platform tag resolution aims at: the environment's first, else the core's own."""
    return (env.platforms or (native,))[0]


def render_requirements(requirements: Sequence[tuple[str, str]], marker: str = "") -> str:
    """One `name==version` line per pin, each `; marker` when one is given."""
    suffix = f" ; {marker}" if marker else ""
    return "".join(f"{name}=={version}{suffix}\n" for name, version in requirements)


def _netrc_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_netrc(settings: RegistrySettings) -> str:
    """netrc lines for every index host; empty when there is no token."""
    if not settings.token:
        return ""
    hosts = dict.fromkeys(urlsplit(u).hostname or "" for u in settings.index_urls)
    login, password = _netrc_quote(settings.login), _netrc_quote(settings.token)
    return "".join(f"machine {h} login {login} password {password}\n" for h in hosts if h)


def build_uv_argv(
    uv: str,
    settings: RegistrySettings,
    env: Environment,
    native: str,
    *,
    requirements_file: Path,
    output_file: Path,
    cache_dir: Path,
    universal: bool = False,
) -> list[str]:
    """The uv command line. Credentials never appear here: argv is world-readable in /proc.

    `universal`: one resolution for every Python from `env`'s version up (the oldest
    environment's) and every platform the pins' marker allows, markers kept in the lockfile,
    instead of for `env` alone."""
    argv = [uv, "pip", "compile", "--no-config", "--quiet", "--color", "never", "--no-progress"]
    argv += ["--no-header", "--no-annotate", "--no-python-downloads", "--python", sys.executable]
    argv += ["--python-version", env.target.python_version]
    if universal:
        argv.append("--universal")
    else:
        argv += ["--python-platform", uv_platform(resolution_target(env, native))[0]]
    # Wheels only, always: building an sdist to read its metadata runs the index's code.
    argv += ["--only-binary", ":all:", "--keyring-provider", "disabled"]
    argv += ["--default-index", settings.index_url]
    for url in settings.extra_index_urls:
        argv += ["--index", url]
    argv += ["--cache-dir", str(cache_dir), "--output-file", str(output_file)]
    argv.append(str(requirements_file))
    return argv


def build_child_env(
    scratch: Path, settings: RegistrySettings, extra: Mapping[str, str], parent: Mapping[str, str]
) -> dict[str, str]:
    """A minimal environment built from scratch: no UV_* (but ours), no PYTHON*, HOME private."""
    env = {
        "PATH": parent.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "HOME": str(scratch),
        "XDG_CONFIG_HOME": str(scratch / "config"),
        "XDG_CACHE_HOME": str(scratch / "cache"),
        "TMPDIR": str(scratch / "tmp"),
        "NETRC": str(scratch / "netrc"),  # the token's only way in (never argv or env)
        "UV_NO_CONFIG": "1",
        "UV_HTTP_TIMEOUT": str(settings.timeout_seconds),
        "UV_HTTP_RETRIES": str(settings.retries),
        "UV_CONCURRENT_DOWNLOADS": "8",
        "GRPC_ENABLE_FORK_SUPPORT": "false",
    }
    env.update({k: parent[k] for k in _PASSTHROUGH_ENV if k in parent})
    env.update(extra)
    return env


# --------------------------------------------------------------------------- I/O


def uv_binary() -> str:
    try:
        from uv import find_uv_bin
    except ImportError:
        raise StoreError(
            "the resolver is missing: install uv into the core's environment (pip install uv)"
        ) from None
    return str(find_uv_bin())


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _prepare_scratch(
    parent: Path, pins: list[tuple[str, str]], settings: RegistrySettings, marker: str
) -> Path:
    """A 0700 dir holding requirements.txt, the 0600 netrc and uv's private cache and TMPDIR."""
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="resolve-", dir=parent))  # mkdtemp: mode 0700
    try:
        for sub in ("tmp", "cache", "config"):
            (scratch / sub).mkdir(mode=0o700)
        _write_private(scratch / "requirements.txt", render_requirements(pins, marker))
        if netrc := render_netrc(settings):
            _write_private(scratch / "netrc", netrc)  # the token's only plaintext copy on disk
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch


async def _run(argv: list[str], env: dict[str, str], cwd: Path, deadline: float) -> tuple[int, str]:
    """(exit code, stderr) of one resolver run, killed at `deadline` seconds."""
    guarded = [sys.executable, "-I", str(CHILD_GUARD), str(os.getpid()), *argv]
    # asyncio's subprocess API, never multiprocessing: fork after grpc has threads is unsafe.
    proc = await asyncio.create_subprocess_exec(
        *guarded,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=deadline)
    except BaseException:  # timeout or cancellation: never leave the resolver running
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    return proc.returncode or 0, err.decode("utf-8", "replace")


def clean_pins(requirements: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (normalize_name(n, f"requirements[{i}]"), exact_version(v, f"requirements[{i}]"))
        for i, (n, v) in enumerate(requirements)
    ]


class ResolveFailure(ResolveError):
    """uv could not satisfy the pins for one environment; core/install/diagnosis.py explains
    it better from the index itself, or passes uv's own words on."""

    def __init__(self, environment: str, uv_message: str) -> None:
        super().__init__(
            f"environment {environment}: the index cannot satisfy the allowlist: {uv_message}"
        )
        self.environment = environment
        self.uv_message = uv_message


async def resolve_environment(
    requirements: Sequence[tuple[str, str]],
    settings: RegistrySettings,
    env: Environment,
    native: str,
    scratch_parent: Path,
    *,
    cache_dir: Path | None = None,
    deadline_seconds: float = 600.0,
) -> list[LockedWheel]:
    """The wheels `env` needs for the pinned (name, version) pairs, dependencies included.

    `cache_dir` is uv's cache, kept between installs: it holds index pages and wheel metadata
    (never credentials, never wheels we install), so an install that changes one pin asks the
    index about that pin only. uv locks it, so the environments' runs may share it. Without
    one, a private cache in the scratch dir dies with the run.

    Raises InvalidArgument (bad pins, settings or an environment uv cannot target),
    ResolveFailure (uv could not satisfy the pins: the installer explains it), RegistryError
    (the resolver did not finish in time).
    """
    pins = clean_pins(requirements)
    validate_settings(settings)
    if not pins:
        return []
    _, extra = uv_platform(resolution_target(env, native))
    label = f"environment {env.name}"
    code, err, lockfile = await _compile(
        pins, settings, env, native, scratch_parent, extra, label, cache_dir, deadline_seconds
    )
    if code != 0:
        raise ResolveFailure(env.name, err)
    return parse_pylock(lockfile, {n for n, _ in pins}, env.name, tag_rank(env, native))


UNIVERSAL = "the universal resolution"


async def resolve_universal(
    requirements: Sequence[tuple[str, str]],
    settings: RegistrySettings,
    envs: Sequence[Environment],
    marker: str,
    scratch_parent: Path,
    *,
    cache_dir: Path | None = None,
    deadline_seconds: float = 600.0,
) -> list[LockedPackage]:
    """One lockfile for every environment: each package with its marker and all its wheels
    (core/install/universal.py picks each environment's). Python from the oldest of `envs`
    up; every pin carries `marker` (the fleet's environments, universal.fleet_marker), so
    what only other platforms need (colorama on Windows, say) is never resolved and need
    not be on the index. Raises as resolve_environment does; a refusal is a plain
    ResolveError, which the caller answers by resolving each environment on its own."""
    pins = clean_pins(requirements)
    validate_settings(settings)
    if not pins or not envs:
        return []
    floor = min(envs, key=lambda e: int(e.target.python_version.split(".")[1]))
    code, err, lockfile = await _compile(
        pins,
        settings,
        floor,
        "",
        scratch_parent,
        {},
        UNIVERSAL,
        cache_dir,
        deadline_seconds,
        marker=marker,
    )
    if code != 0:
        raise ResolveError(f"{UNIVERSAL} failed: {err}")
    return read_packages(lockfile, {n for n, _ in pins}, UNIVERSAL)


async def _compile(
    pins: list[tuple[str, str]],
    settings: RegistrySettings,
    env: Environment,
    native: str,
    scratch_parent: Path,
    extra: Mapping[str, str],
    label: str,
    cache_dir: Path | None,
    deadline_seconds: float,
    *,
    marker: str | None = None,
) -> tuple[int, str, str]:
    """One uv run in a private scratch dir: (exit code, uv's scrubbed stderr, the lockfile).
    A `marker` makes it the universal run, each pin carrying it."""
    scratch = _prepare_scratch(scratch_parent, pins, settings, marker or "")
    try:
        output = scratch / "pylock.toml"
        argv = build_uv_argv(
            uv_binary(),
            settings,
            env,
            native,
            requirements_file=scratch / "requirements.txt",
            output_file=output,
            cache_dir=cache_dir or scratch / "cache",
            universal=marker is not None,
        )
        child_env = build_child_env(scratch, settings, extra, os.environ)
        try:
            code, err = await _run(argv, child_env, scratch, deadline_seconds)
        except TimeoutError:
            raise RegistryError(
                f"{label}: the resolver did not finish within"
                f" {deadline_seconds:.0f} s against {settings.describe_index()}"
            ) from None
        if code != 0:
            return code, _scrub(err, settings), ""
        return 0, "", output.read_text("utf-8")
    finally:
        await remove_scratch(scratch)


async def remove_scratch(scratch: Path) -> None:
    """The netrc (the token) goes at once, synchronously: this runs in `finally`, also under
    cancellation, where an await could be interrupted. The rest (uv's cache, many small
    files) is deleted in a thread, which finishes even if the wait for it is cancelled."""
    with contextlib.suppress(FileNotFoundError):
        (scratch / "netrc").unlink()
    await asyncio.shield(asyncio.to_thread(shutil.rmtree, scratch, True))


def _scrub(text: str, settings: RegistrySettings) -> str:
    """uv's message without secrets or noise: the token never, and at most a few lines."""
    if settings.token:
        text = text.replace(settings.token, "***")
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[:12])
