"""What `pip download --dest` leaves behind, read as the resolved set of wheel files.

    seed()              I/O: link the wheels the blob store already holds into --dest
    reported_names()    pure: pip's closing "Successfully downloaded a b c" line -> names
    choose_files()      pure: the files of the resolution (seeds pip did not use left out)
    plan_downloads()    pure: file names -> wheels by name; sdists refused
    collect()           I/O: move pip's new files out of the scratch dir and hash them

Held wheels: `pip download` does not fetch a file that is already in --dest with the sha256 its
index link publishes ("File was already downloaded"), and reads its metadata locally. So the
core seeds --dest with symlinks to the blobs of the desired set, and an install whose set barely
changed downloads only what changed (an index with PEP 658 metadata, PyPI, used to cost the
changed wheels only; without the seeds every install would fetch every wheel again). Seeds pip
did not need stay in --dest next to the ones it used, so pip's closing line, which names every
project of the resolution, tells them apart; without seeds that line is not needed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

from core.install.pip_failures import SDIST_REFUSAL
from shared.errors import ResolveError

_REPORTED = re.compile(r"Successfully downloaded (?P<names>.*)$", re.MULTILINE)


@dataclass(frozen=True)
class PlannedWheel:
    """A wheel pip chose, named by its file (pure: no path, no bytes)."""

    name: str  # PEP 503 normalised
    version: str
    filename: str
    requested: bool  # on the allowlist (top level) vs pulled in as a dependency


@dataclass(frozen=True)
class ResolvedWheel:
    name: str  # PEP 503 normalised
    version: str
    filename: str
    path: Path  # pip's download (in the caller's `dest`), or the store's blob for a held wheel
    sha256: str  # of the file (pip checked it against the index link's published hash)
    size: int
    requested: bool


@dataclass(frozen=True)
class HeldWheel:
    """A wheel the blob store holds as a local file, offered to pip as already downloaded."""

    sha256: str
    path: Path


def _project_of(filename: str) -> str | None:
    try:
        return str(parse_wheel_filename(filename)[0])
    except InvalidWheelFilename:
        pass
    try:
        return str(parse_sdist_filename(filename)[0])
    except InvalidSdistFilename:
        return None


def reported_names(output: str) -> set[str] | None:
    """The projects pip's last "Successfully downloaded" line names; None if there is none."""
    lines = list(_REPORTED.finditer(output))
    if not lines:
        return None
    return {canonicalize_name(n) for n in lines[-1]["names"].split()}


def choose_files(
    files: Collection[str], seeds: Collection[str], reported: set[str] | None
) -> list[str]:
    """The files of the resolved set. `seeds`: the files in --dest that are still our links."""
    if not any(f in seeds for f in files):
        return sorted(files)  # everything pip left is what it resolved
    if reported is None:
        raise ResolveError(
            "pip's output does not name the projects it resolved ('Successfully downloaded ...'),"
            " so the held wheels it used cannot be told from the ones it did not"
        )
    by_project: dict[str | None, list[str]] = {}
    for f in sorted(files):
        by_project.setdefault(_project_of(f), []).append(f)
    stray = [f for p, fs in by_project.items() if p not in reported for f in fs if f not in seeds]
    if stray:
        raise ResolveError(f"pip saved {', '.join(stray)} but does not list it as resolved")
    chosen: list[str] = []
    for name in sorted(reported):
        fetched = [f for f in by_project.get(name, []) if f not in seeds]
        held = [f for f in by_project.get(name, []) if f in seeds]
        if len(fetched) == 1:
            chosen += fetched  # a seed of another version of it was not used
        elif not fetched and len(held) == 1:
            chosen += held
        else:
            found = ", ".join(fetched + held) or "none"
            raise ResolveError(f"pip resolved '{name}' but its files are ambiguous: {found}")
    return chosen


def plan_downloads(filenames: Collection[str], requested: Collection[str]) -> list[PlannedWheel]:
    """What pip saved, as wheels; an sdist is refused by name, a stray file as pip's fault."""
    wheels: list[PlannedWheel] = []
    for filename in sorted(filenames):
        try:
            name, version, _, _ = parse_wheel_filename(filename)
        except InvalidWheelFilename:
            try:
                sname, sversion = parse_sdist_filename(filename)
            except InvalidSdistFilename:
                raise ResolveError(f"pip saved {filename!r}, which is not a wheel") from None
            raise ResolveError(
                f"'{sname}' {sversion} resolved to {filename}; {SDIST_REFUSAL}"
            ) from None
        wheels.append(PlannedWheel(name, str(version), filename, name in requested))
    return wheels


def seed(downloads: Path, held: Mapping[str, HeldWheel]) -> None:
    """Symlinks named like the wheels, to the blobs: pip only reads them (or unlinks one whose
    hash its index no longer publishes, and downloads the file again)."""
    downloads.mkdir(mode=0o700, exist_ok=True)
    for filename, wheel in held.items():
        if _project_of(filename) is not None and "/" not in filename:
            os.symlink(wheel.path, downloads / filename)


def _still_seeded(path: Path, held: Mapping[str, HeldWheel]) -> bool:
    wheel = held.get(path.name)
    return wheel is not None and path.is_symlink() and os.readlink(path) == str(wheel.path)


def collect(
    downloads: Path,
    dest: Path,
    requested: Collection[str],
    held: Mapping[str, HeldWheel],
    output: str,
) -> list[ResolvedWheel]:
    """The resolved wheels: new ones moved into `dest` and hashed, held ones as their blobs.

    `output`: pip's INFO output, which ends with the "Successfully downloaded" line.
    """
    files = os.listdir(downloads)
    seeds = {f for f in files if _still_seeded(downloads / f, held)}
    chosen = choose_files(files, seeds, reported_names(output) if seeds else None)
    wheels: list[ResolvedWheel] = []
    for plan in plan_downloads(chosen, requested):
        if plan.filename in seeds:
            known = held[plan.filename]  # its sha256 is its address in the store
            path, digest, size = known.path, known.sha256, known.path.stat().st_size
        else:
            path = dest / plan.filename
            os.rename(downloads / plan.filename, path)  # same filesystem: the work dir
            with path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                size = os.fstat(f.fileno()).st_size
        wheels.append(
            ResolvedWheel(
                plan.name, plan.version, plan.filename, path, digest, size, plan.requested
            )
        )
    return wheels
