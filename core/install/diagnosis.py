"""Explain a failed resolution from what the index really serves, per environment.

uv's refusal says that the pins are unsatisfiable; an operator needs to know which package, for
which environment, and what the index has instead. `explain` asks the index (project pages, the
same ones the resolver read) about each package the refusal names, or about every pin when it
names none, and returns the first precise reason found:

    not on the index             package 'x' was not found on the index ...
    version missing              version 9.9 of 'x' is not on the index; available: ...
    sdist only                   'x' 1.0 is only published as a source distribution ...
    no wheel fits                no wheel of x 1.0 for cp313 manylinux_2_28_aarch64 (environment
                                 arm-313); the index has wheels for: cp311-cp311-win_amd64, ...

    not the wheel it says     a wheel that fits but that uv refused is fetched (verified against
                              the published sha256) and run through our own wheel checks, so a
                              wheel whose METADATA names another project is refused naming the
                              file, both names and the rule

When none applies (a conflict between pins, Requires-Python), uv's own message is passed on,
prefixed with the environment. Reading the refusal's text here only chooses what to look up:
what was resolved is never learned from it.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from core.install.fetch import Fetcher
from core.install.index_client import (
    VERSIONS_TIMEOUT_SECONDS,
    IndexFile,
    project_files_sync,
    versions_from_filenames,
)
from core.install.pylock import LockedWheel
from core.install.uv_resolver import (
    ResolveFailure,
    clean_pins,
    resolution_target,
    resolve_environment,
)
from core.state.index_config import RegistrySettings
from shared.environments import Environment, supported_tags
from shared.errors import NotFound, RegistryError, ResolveError, SpkError
from shared.names import normalize_name
from shared.wheels import check_identity, inspect_wheel

SDIST_RULE = (
    "source distributions (sdists) are not installed because building them runs code from the"
    " index on the core; ask for a wheel or pick a version that has one"
)
_PINNED = re.compile(r"\b([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]*[A-Za-z0-9])")
MAX_LISTED = 12


def _version_of(project: str, files: Sequence[IndexFile], version: str) -> list[IndexFile]:
    return [f for f in files if versions_from_filenames(project, [f.filename]) == [version]]


def _wheel_tags(filename: str) -> list[str]:
    try:
        return sorted(str(t) for t in parse_wheel_filename(filename)[3])
    except ValueError:
        return []


def explain_package(
    name: str,
    version: str,
    files: Sequence[IndexFile],
    env: Environment,
    native: str,
    settings: RegistrySettings,
) -> str | None:
    """Pure: why `name==version` cannot be installed in `env`, or None if a wheel fits."""
    project = normalize_name(name)
    mine = _version_of(project, files, version)
    if not mine:
        available = versions_from_filenames(project, (f.filename for f in files))[:MAX_LISTED]
        return (
            f"version {version} of '{project}' is not on the index {settings.describe_index()};"
            f" available: {', '.join(available) or 'none'}"
        )
    wheels = [f.filename for f in mine if f.filename.endswith(".whl")]
    if not wheels:
        return f"'{project}' {version} is only published as a source distribution; {SDIST_RULE}"
    accepted = supported_tags(env, native)
    if any(not accepted.isdisjoint(parse_wheel_filename(w)[3]) for w in wheels):
        return None
    offered = sorted({min(_wheel_tags(w), default=w) for w in wheels})
    target = f"{env.target.abi} {resolution_target(env, native)}"
    return (
        f"no wheel of {project} {version} for {target} (environment {env.name}); the index has"
        f" wheels for: {', '.join(offered[:MAX_LISTED])}; add a wheel for this environment or"
        " change the pin"
    )


def explain(
    failure: ResolveFailure,
    pins: Sequence[tuple[str, str]],
    settings: RegistrySettings,
    env: Environment,
    native: str,
) -> SpkError:
    """(Worker thread) The clearest error for `failure`; never raises itself."""
    named: list[tuple[str, str]] = [
        (canonicalize_name(n), v) for n, v in _PINNED.findall(failure.uv_message)
    ]
    # Pins the refusal mentions by name (`x` rather than x==1.0) are worth a closer look too.
    words = {canonicalize_name(w) for w in re.findall(r"[A-Za-z0-9][\w.-]*", failure.uv_message)}
    named += [(n, v) for n, v in pins if n in words]
    candidates = list(dict.fromkeys([*named, *pins]))
    for name, version in candidates:
        try:
            files = project_files_sync(name, settings, VERSIONS_TIMEOUT_SECONDS)
        except NotFound:
            if (name, version) in pins:
                return ResolveError(
                    f"environment {env.name}: package '{name}' was not found on the index"
                    f" {settings.describe_index()}"
                )
            continue
        except RegistryError as exc:
            return exc  # the index is down or refuses us: that is the cause to report
        except SpkError:
            continue
        reason = explain_package(name, version, files, env, native, settings)
        if reason is not None:
            return ResolveError(f"environment {env.name}: {reason}")
        if (name, version) in named and (
            found := _check_fitting_wheel(name, version, files, env, native, settings)
        ):
            return found
    return failure


def _check_fitting_wheel(
    name: str,
    version: str,
    files: Sequence[IndexFile],
    env: Environment,
    native: str,
    settings: RegistrySettings,
) -> SpkError | None:
    """Our own checks on the wheel uv refused though it fits: the reason, or None if it passes."""
    accepted = supported_tags(env, native)
    project = normalize_name(name)
    fitting = [
        f
        for f in _version_of(project, files, version)
        if f.filename.endswith(".whl")
        and f.url
        and f.sha256
        and not accepted.isdisjoint(parse_wheel_filename(f.filename)[3])
    ]
    if not fitting:
        return None
    file = fitting[0]
    wheel = LockedWheel(project, version, file.filename, file.url, str(file.sha256), None, True)
    with tempfile.TemporaryDirectory(prefix="diagnose-") as scratch:
        try:
            with Fetcher(settings, Path(scratch), concurrency=1) as fetcher:
                fetched = fetcher.fetch(wheel)
            check_identity(inspect_wheel(fetched.path, filename=file.filename), project, version)
        except SpkError as exc:
            return ResolveError(f"environment {env.name}: {exc.message}")
    return None


async def resolve_or_explain(
    requirements: Sequence[tuple[str, str]],
    settings: RegistrySettings,
    env: Environment,
    native: str,
    scratch_parent: Path,
    *,
    cache_dir: Path | None = None,
    deadline_seconds: float = 600.0,
) -> list[LockedWheel]:
    """resolve_environment, with a refusal explained from the index (see `explain`)."""
    try:
        return await resolve_environment(
            requirements,
            settings,
            env,
            native,
            scratch_parent,
            cache_dir=cache_dir,
            deadline_seconds=deadline_seconds,
        )
    except ResolveFailure as failure:
        pins = clean_pins(requirements)
        raise await asyncio.to_thread(explain, failure, pins, settings, env, native) from None
