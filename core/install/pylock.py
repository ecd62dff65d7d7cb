"""PEP 751 lockfiles as uv writes them, read strictly. Pure: text in, wheels out.

    LockedWheel      one wheel the resolver chose (URL, the index's sha256, size)
    LockedPackage    one `[[packages]]` table: its marker and every wheel it lists
    read_packages()  pylock.toml -> packages; anything but index wheels is refused
    preferred_wheel  of a package's wheels, the one a host prefers (its best-ranked tag)
    parse_pylock()   a one-environment lockfile: the preferred wheel of each package

A universal lockfile (core/install/universal.py) lists every wheel of a package, one per
interpreter and platform, and a marker saying which environments need the package at all.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from packaging.tags import Tag
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from shared.errors import ResolveError
from shared.names import exact_version

_NOT_A_WHEEL = ("sdist", "vcs", "directory", "archive")


@dataclass(frozen=True)
class LockedWheel:
    """One wheel of a resolution, as the lockfile names it (nothing downloaded yet)."""

    name: str  # PEP 503 normalised
    version: str
    filename: str
    url: str
    sha256: str  # as the index published it (lower-case hex)
    size: int | None  # when the index published it
    requested: bool  # on the allowlist (top level) vs pulled in as a dependency


@dataclass(frozen=True)
class LockedPackage:
    """A package of a lockfile: the environments it is for (`marker`, None for all) and its
    wheels (one in a single-environment lockfile, all the index has in a universal one)."""

    name: str
    version: str
    marker: str | None
    wheels: tuple[LockedWheel, ...]


def _wheel_of(entry: object, where: str) -> tuple[str, str, int | None]:
    if not isinstance(entry, dict):
        raise ResolveError(f"{where}: a wheel entry is not a table")
    url, hashes = entry.get("url"), entry.get("hashes")
    sha256 = hashes.get("sha256") if isinstance(hashes, dict) else None
    if not isinstance(url, str) or not url:
        raise ResolveError(f"{where}: a wheel without a URL (only index files are allowed)")
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ResolveError(
            f"{where}: the index gave no sha256 for {url.rsplit('/', 1)[-1]};"
            " refusing an unverifiable wheel"
        )
    size = entry.get("size")
    return url, sha256.lower(), size if isinstance(size, int) and size >= 0 else None


def _locked_wheel(
    entry: object, name: str, version: str, requested: bool, where: str
) -> LockedWheel:
    url, sha256, size = _wheel_of(entry, where)
    filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    try:
        wname, wversion, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        raise ResolveError(f"{where}: {filename!r} is not a wheel file name") from None
    if wname != canonicalize_name(name) or str(wversion) != str(exact_version(version, where)):
        raise ResolveError(f"{where}: {filename} is not {name} {version}")
    return LockedWheel(str(wname), str(wversion), filename, url, sha256, size, requested)


def read_packages(text: str, requested: set[str], label: str) -> list[LockedPackage]:
    """Every package of a lockfile, each wheel named by URL and sha256. `label` starts errors
    ("environment py311", "the universal resolution")."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ResolveError(f"{label}: the resolver wrote an unreadable lockfile: {exc}") from None
    packages: list[LockedPackage] = []
    for package in doc.get("packages", []):
        name, version = package.get("name"), package.get("version")
        where = f"{label}: package {name!r}"
        if not isinstance(name, str) or not isinstance(version, str):
            raise ResolveError(f"{where}: no name or version in the lockfile")
        if any(key in package for key in _NOT_A_WHEEL):
            raise ResolveError(f"{where}: resolved to something other than a wheel; refusing it")
        marker = package.get("marker")
        if marker is not None and not isinstance(marker, str):
            raise ResolveError(f"{where}: its marker is not a string")
        entries = package.get("wheels")
        if not isinstance(entries, list) or not entries:
            raise ResolveError(f"{where}: the lockfile lists no wheels")
        top = canonicalize_name(name) in requested
        wheels = tuple(_locked_wheel(e, name, version, top, where) for e in entries)
        packages.append(LockedPackage(wheels[0].name, wheels[0].version, marker, wheels))
    return packages


def preferred_wheel(package: LockedPackage, rank: Mapping[Tag, int]) -> LockedWheel | None:
    """The wheel whose best tag ranks first (`rank`: tag -> position, shared.environments
    `tag_rank`), as an installer on the host would pick; None when no wheel fits."""
    best: tuple[int, LockedWheel] | None = None
    for wheel in package.wheels:
        scores = [rank[t] for t in parse_wheel_filename(wheel.filename)[3] if t in rank]
        if scores and (best is None or min(scores) < best[0]):
            best = (min(scores), wheel)
    return best[1] if best else None


def parse_pylock(
    text: str, requested: set[str], env_name: str, rank: Mapping[Tag, int]
) -> list[LockedWheel]:
    """The wheels of a one-environment lockfile, one per package. uv lists every wheel that
    fits the target (a manylinux_2_17 and a manylinux_2_28 wheel for a 2.28 target, say):
    the one the hosts prefer is taken."""
    label = f"environment {env_name}"
    wheels: list[LockedWheel] = []
    for package in read_packages(text, requested, label):
        wheel = preferred_wheel(package, rank)
        if wheel is None:
            names = ", ".join(w.filename for w in package.wheels)
            raise ResolveError(
                f"{label}: package {package.name!r}: the resolver chose {names}, none of which"
                f" environment {env_name} runs; refusing the install"
            )
        wheels.append(wheel)
    return wheels
