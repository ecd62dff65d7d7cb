"""Each environment's wheels picked from one universal lockfile. Pure: no I/O.

    marker_environment()  the PEP 508 marker values of an environment's hosts
    fleet_marker()        a marker true on exactly the environments' hosts (for the pins)
    select_wheels()       PEP 751's installer rule: the packages whose marker holds, and of
                          each the wheel the environment's hosts prefer

`uv pip compile --universal` resolves once for the whole fleet (every pin carries fleet_marker),
keeps each package's marker, and lists all its wheels. Picking from that is
what a PEP 751 installer does on a host, done here for a host we are not on. So nothing is
guessed: a marker that reads a value we do not know for the environment (platform_release, the
host's kernel, say), or whose answer depends on the patch release (the environment names only
X.Y), is NotSelectable, and the caller resolves that install per environment instead, as it did
before universal resolution. The same goes for a package with no wheel for the environment: the
per-environment path explains that from the index (core/install/diagnosis.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from packaging.markers import InvalidMarker, Marker

from core.install.pylock import LockedPackage, LockedWheel, preferred_wheel
from shared.environments import Environment, tag_rank
from shared.errors import ResolveError

# The patch releases a host of an X.Y environment may run: a marker must answer the same for
# both ends (uv writes `python_full_version >= '3.11'`, which does; `>= '3.11.4'` would not).
PATCH_BOUNDS = (0, 99)
_LINUX = re.compile(r"^(?:manylinux\d*|musllinux)_(?:\d+_\d+_)?([a-z0-9_]+)$")
_MACOS = re.compile(r"^macosx_\d+_\d+_(x86_64|arm64)$")
# platform.machine() on Windows names the OS's architecture, not the interpreter's: a 32-bit
# CPython (win32) on 64-bit Windows says AMD64, so win32 hosts have no one value (not known).
_WINDOWS = {"win_amd64": "AMD64", "win_arm64": "ARM64"}
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_OPERATORS = frozenset({"and", "or", "not", "in"})
_FLEET_KEYS = ("python_version", "implementation_name", "sys_platform", "platform_machine")


class NotSelectable(ResolveError):
    """The universal lockfile does not answer for an environment; resolve it on its own."""


def _platform_values(tag: str) -> dict[str, str]:
    if tag in _WINDOWS:
        return _values("win32", "Windows", "nt", _WINDOWS[tag])
    if m := _MACOS.match(tag):
        return _values("darwin", "Darwin", "posix", m.group(1))
    if m := _LINUX.match(tag):
        return _values("linux", "Linux", "posix", m.group(1))
    raise NotSelectable(f"no marker values are known for platform {tag}")


def _values(sys_platform: str, system: str, os_name: str, machine: str) -> dict[str, str]:
    return {
        "sys_platform": sys_platform,
        "platform_system": system,
        "os_name": os_name,
        "platform_machine": machine,
    }


def marker_environment(env: Environment, native: str, patch: int) -> dict[str, str]:
    """What `env`'s hosts answer to every marker variable we can know (CPython X.Y.patch)."""
    version = env.target.python_version
    full = f"{version}.{patch}"
    values = {
        "python_version": version,
        "python_full_version": full,
        "implementation_name": "cpython",
        "implementation_version": full,
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    values.update(_platform_values((env.platforms or (native,))[0]))
    return values


def fleet_marker(envs: Iterable[Environment], native: str) -> str:
    """True on the hosts of any of `envs` (Python X.Y, OS, machine), false elsewhere. Every pin
    of the universal run carries it, so uv resolves for the fleet, not for every platform."""
    clauses: dict[str, None] = {}
    for env in envs:
        values = marker_environment(env, native, 0)
        parts = [f"{key} == '{values[key]}'" for key in _FLEET_KEYS]
        clauses["(" + " and ".join(parts) + ")"] = None
    return " or ".join(clauses)


def _holds(marker: str | None, environments: Sequence[dict[str, str]], where: str) -> bool:
    if marker is None or not marker.strip():
        return True
    # packaging fills any variable we leave out from the core's own interpreter, which is the
    # very mistake (pypa/pip#11664) a foreign environment must not inherit: refuse instead.
    unknown = set(_WORD.findall(_QUOTED.sub(" ", marker))) - _OPERATORS - set(environments[0])
    if unknown:
        raise NotSelectable(f"{where}: its marker reads {', '.join(sorted(unknown))}")
    try:
        parsed = Marker(marker)
    except InvalidMarker as exc:
        raise NotSelectable(f"{where}: unreadable marker {marker!r}: {exc}") from None
    try:
        answers = {parsed.evaluate(dict(values)) for values in environments}
    except ValueError as exc:  # packaging's UndefinedComparison, InvalidVersion
        raise NotSelectable(f"{where}: its marker {marker!r} cannot be evaluated: {exc}") from None
    if len(answers) != 1:
        raise NotSelectable(f"{where}: its marker {marker!r} depends on the patch release")
    return answers.pop()


def select_wheels(
    env: Environment, native: str, packages: Iterable[LockedPackage], requested: set[str]
) -> list[LockedWheel]:
    """`env`'s wheels, one per package whose marker holds; NotSelectable when the lockfile
    does not answer for `env` (an unknown marker value, two versions of one package, no wheel
    the hosts run, a pin missing)."""
    environments = [marker_environment(env, native, patch) for patch in PATCH_BOUNDS]
    rank = tag_rank(env, native)
    chosen: dict[str, LockedWheel] = {}
    for package in packages:
        where = f"environment {env.name}: {package.name} {package.version}"
        if not _holds(package.marker, environments, where):
            continue
        if package.name in chosen:
            raise NotSelectable(f"{where}: a second version of {package.name} applies")
        wheel = preferred_wheel(package, rank)
        if wheel is None:
            raise NotSelectable(f"{where}: no wheel fits {env.describe(native)}")
        chosen[package.name] = wheel
    if missing := sorted(requested - set(chosen)):
        raise NotSelectable(f"environment {env.name}: {', '.join(missing)} not selected")
    return list(chosen.values())
