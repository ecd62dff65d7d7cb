"""Resolve the allowlist with pip against the configured package index, keeping pip's downloads.

    resolve()                 I/O: private scratch dir, `pip download`, wheels moved to `dest`
      build_pip_argv()        pure: the exact pip command line (never carries a secret)
      build_child_env()       pure: the minimal environment pip runs in
      render_netrc()          pure: the only place the token is written down
      collect()               see core/install/pip_downloads.py: which files pip left are the set
      classify_failure()      pure: pip's output (+ debug log) -> ResolveError / RegistryError

`pip download` rather than `pip install --dry-run --report`: an index without PEP 658 metadata
(pypiserver, many private ones) makes pip fetch every wheel to read its dependencies, and the
report throws those bytes away, so every wheel crossed the network twice. pip checks each file
against the sha256 its index link publishes; core/install/index_client.py re-checks that the index
published one at all (`check_published`) before a wheel is stored.

pip runs at its default verbosity (its INFO lines are read) and without `--log`: its debug log
lists every file of every version it looked at, 12 MB and 0.8 s of a 2.4 s run for w31 against
PyPI. Only a failure whose reason pip logs at debug level alone (a wheel skipped for its tags,
an sdist refused) is run again with `--log`; the index answered the first time, so that is quick.

pip runs as `sys.executable -m pip`, `--isolated` and with PIP_CONFIG_FILE=/dev/null: --isolated
alone skips PIP_* variables and the user config but still reads the global (/etc, /etc/xdg) and
site pip.conf files, which on a real host add indexes, find-links or constraints we must not
inherit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from core.install.pip_downloads import HeldWheel, ResolvedWheel, collect, seed
from core.install.pip_failures import classify_failure, needs_debug_log
from core.state.index_config import RegistrySettings, validate_settings
from shared.errors import RegistryError
from shared.manifest import TargetEnvironment
from shared.names import exact_version, normalize_name

# Network plumbing a host may need to reach its index at all; none of these name package sources.
_PASSTHROUGH_ENV = (
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR",
)  # fmt: skip


# --------------------------------------------------------------------------- pure builders


def render_requirements(requirements: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in requirements)


def _netrc_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_netrc(settings: RegistrySettings) -> str:
    """netrc lines for every index host; empty when there is no token."""
    if not settings.token:
        return ""
    hosts = dict.fromkeys(urlsplit(u).hostname or "" for u in settings.index_urls)
    login, password = _netrc_quote(settings.login), _netrc_quote(settings.token)
    return "".join(f"machine {h} login {login} password {password}\n" for h in hosts if h)


def build_pip_argv(
    settings: RegistrySettings,
    environment: TargetEnvironment | None,
    *,
    requirements_file: Path,
    download_dir: Path,
    log_file: Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The pip command line. Credentials never appear here: argv is world-readable in /proc."""
    cross = environment is not None and bool(environment.platform)
    argv = [python, "-m", "pip", "download", "--dest", str(download_dir)]
    argv += ["--isolated", "--no-cache-dir"]
    argv += ["--disable-pip-version-check", "--no-input", "--progress-bar", "off", "--no-color"]
    # keyring could fetch credentials from the core's own user session: only our netrc counts.
    argv += ["--keyring-provider", "disabled"]
    if log_file is not None:  # the debug log says WHY a link was skipped
        argv += ["--log", str(log_file)]
    if settings.wheels_only or cross:  # pip refuses --platform without it anyway
        argv.append("--only-binary=:all:")
    argv += ["--index-url", settings.index_url]
    for url in settings.extra_index_urls:
        argv += ["--extra-index-url", url]
    argv += ["--timeout", str(settings.timeout_seconds), "--retries", str(settings.retries)]
    if environment is not None and cross:
        argv += ["--python-version", environment.python_version]
        if environment.implementation:
            argv += ["--implementation", environment.implementation]
        if environment.abi:
            argv += ["--abi", environment.abi]
        for plat in filter(None, (p.strip() for p in environment.platform.split(","))):
            argv += ["--platform", plat]
    argv += ["-r", str(requirements_file)]
    return argv


def build_child_env(scratch: Path, parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment built from scratch: no PIP_* (but one), no PYTHON*, HOME private."""
    parent = os.environ if parent is None else parent
    env = {
        "PATH": parent.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "HOME": str(scratch),
        "NETRC": str(scratch / "netrc"),
        "TMPDIR": str(scratch / "tmp"),  # pip's own temp dirs die with the scratch dir
        "PIP_CONFIG_FILE": os.devnull,  # the one PIP_ variable: "read no config file at all"
        "GRPC_ENABLE_FORK_SUPPORT": "false",
    }
    env.update({k: parent[k] for k in _PASSTHROUGH_ENV if k in parent})
    return env


# --------------------------------------------------------------------------- I/O


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _prepare_scratch(parent: Path, pins: list[tuple[str, str]], settings: RegistrySettings) -> Path:
    """A 0700 dir holding requirements.txt, the 0600 netrc and pip's private TMPDIR."""
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="resolve-", dir=parent))  # mkdtemp: mode 0700
    try:
        (scratch / "tmp").mkdir(mode=0o700)
        _write_private(scratch / "requirements.txt", render_requirements(pins))
        if netrc := render_netrc(settings):
            _write_private(scratch / "netrc", netrc)  # the token's only plaintext copy on disk
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch


def _read_text(path: Path) -> str:
    return path.read_text("utf-8", "replace") if path.exists() else ""


PIP_GUARD = Path(__file__).with_name("pip_guard.py")


def _dies_with_core(argv: list[str]) -> list[str]:
    """`python -m pip ...` becomes `python -I .../pip_guard.py <our pid> pip ...` (see there).

    Run by path, so it needs no installed `core` package; -I keeps its directory (core/, which
    holds a `secrets.py`) off sys.path.
    """
    if argv[1:3] != ["-m", "pip"]:
        return argv
    return [argv[0], "-I", str(PIP_GUARD), str(os.getpid()), *argv[2:]]


async def _run_pip(
    argv: list[str], env: dict[str, str], cwd: Path, deadline: float
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one pip run, killed at `deadline` seconds."""
    # asyncio's subprocess API, never multiprocessing: fork after grpc has threads is unsafe.
    proc = await asyncio.create_subprocess_exec(
        *_dies_with_core(argv),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=deadline)
    except BaseException:  # timeout or cancellation: never leave pip running
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        # Reap it here so its transport closes on this loop (no zombie, no late __del__ noise).
        await asyncio.shield(proc.wait())
        raise
    code = proc.returncode or 0
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


async def resolve(
    requirements: Sequence[tuple[str, str]],
    settings: RegistrySettings,
    environment: TargetEnvironment | None,
    scratch_parent: Path,
    dest: Path,
    *,
    deadline_seconds: float = 600.0,
    watch: Callable[[Path], contextlib.AbstractContextManager[object]] | None = None,
    held: Mapping[str, HeldWheel] | None = None,
) -> list[ResolvedWheel]:
    """Resolve pinned (name, version) pairs to wheels, dependencies included, downloaded once.

    The wheels land in `dest` (an existing directory on the scratch parent's filesystem; the
    caller owns and removes it). Raises InvalidArgument (bad settings or pins), ResolveError
    (the index cannot satisfy the allowlist; names the package), IntegrityError (a file did not
    match the hash its index link published) or RegistryError (index unreachable, credentials
    rejected). `watch`, if given, is entered with pip's TMPDIR while pip runs.
    `held` (file name -> blob) are wheels the store holds: pip is offered them instead of
    downloading them again, and a held wheel in the set is returned with its blob's path.
    """
    pins = [
        (normalize_name(n, f"requirements[{i}]"), exact_version(v, f"requirements[{i}]"))
        for i, (n, v) in enumerate(requirements)
    ]
    validate_settings(settings)
    if not pins:
        return []  # nothing to resolve: no subprocess, no scratch dir
    scratch = _prepare_scratch(scratch_parent, pins, settings)
    try:
        downloaded, log_file = scratch / "downloads", scratch / "pip.log"
        held = held or {}
        seed(downloaded, held)
        env, started = build_child_env(scratch), time.monotonic()

        def argv(log: Path | None) -> list[str]:
            reqs = scratch / "requirements.txt"
            return build_pip_argv(
                settings, environment, requirements_file=reqs, download_dir=downloaded, log_file=log
            )

        try:
            with watch(scratch / "tmp") if watch else contextlib.nullcontext():
                rc, out, err = await _run_pip(argv(None), env, scratch, deadline_seconds)
            if rc != 0 and needs_debug_log(out, err):
                left = deadline_seconds - (time.monotonic() - started)
                rc, out, err = await _run_pip(argv(log_file), env, scratch, left)
        except TimeoutError:
            raise RegistryError(
                f"pip did not finish within {deadline_seconds:.0f} s resolving against "
                f"{settings.describe_index()}"
            ) from None
        if rc != 0:
            log = f"{out}\n{_read_text(log_file)}"
            raise classify_failure(rc, err, log, settings, environment)
        requested = {name for name, _ in pins}
        return await asyncio.to_thread(collect, downloaded, dest, requested, held, out)
    finally:
        # Synchronous on purpose: a `finally` may run during cancellation, where awaiting a
        # thread could be interrupted and leave the netrc (the token) on disk.
        shutil.rmtree(scratch, ignore_errors=True)
